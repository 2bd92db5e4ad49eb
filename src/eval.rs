//! `streamiq eval`: agreement between the model's scores and labelled quality.
//!
//! SRCC (Spearman, ties ranked by their mean) and PLCC (Pearson, plain and after the
//! usual 4-parameter logistic fit), over the whole set, over random 80/20 splits
//! (mean and median of the test parts), and per distortion type when the label file
//! has a `type` column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// A label file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct LabelsError {
    /// The CSV file.
    pub path: PathBuf,
    /// What is wrong (with the line number where it applies).
    pub message: String,
}

/// Embeddings that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SaveEmbeddingsError {
    /// Not one image of the set could be scored.
    #[error("no image could be scored")]
    NothingScored,
    /// The safetensors serialisation failed.
    #[error("{0}")]
    Serialise(#[from] safetensors::SafeTensorError),
    /// The file could not be written.
    #[error("{}: {source}", path.display())]
    Write {
        /// The embeddings file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    /// Image path (relative paths are resolved against the CSV's directory).
    pub path: PathBuf,
    /// The label (MOS or quality target; higher is better).
    pub mos: f64,
    /// Distortion type, if the CSV has a `type` column.
    pub kind: Option<String>,
}

/// Reads a CSV with a header naming at least `path` and `mos` (optionally `type`).
pub fn read_labels(csv: &Path) -> Result<Vec<Labelled>, LabelsError> {
    let err = |message: String| LabelsError {
        path: csv.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(csv).map_err(|e| err(e.to_string()))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| err("empty file".into()))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let (Some(pi), Some(mi)) = (col("path"), col("mos")) else {
        return Err(err(format!(
            "header {header:?} must name the columns path and mos"
        )));
    };
    let ti = col("type");
    let base = csv.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, line) in lines {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |i: usize| {
            f.get(i)
                .copied()
                .ok_or_else(|| err(format!("line {}: missing column {}", n + 1, cols[i])))
        };
        let mos: f64 = get(mi)?
            .parse()
            .ok()
            .filter(|m: &f64| m.is_finite())
            .ok_or_else(|| err(format!("line {}: mos {:?} is not a number", n + 1, f[mi])))?;
        let p = PathBuf::from(get(pi)?);
        out.push(Labelled {
            path: if p.is_absolute() { p } else { base.join(p) },
            mos,
            kind: ti.map(get).transpose()?.map(str::to_string),
        });
    }
    if out.len() < 3 {
        return Err(err(format!(
            "{} labelled rows; at least 3 are needed",
            out.len()
        )));
    }
    Ok(out)
}

/// Ranks with ties given their mean rank (1-based).
pub fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            r[idx[k]] = mean;
        }
        i = j + 1;
    }
    r
}

/// Pearson correlation; 0 when either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx <= 0.0 || syy <= 0.0 {
        0.0
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

/// Spearman rank correlation.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

fn logistic4(p: &[f64; 4], x: f64) -> f64 {
    (p[0] - p[1]) / (1.0 + (-(x - p[2]) / p[3].abs().max(1e-9)).exp()) + p[1]
}

/// PLCC after fitting `y ~ (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2` by
/// Levenberg-Marquardt; falls back to plain PLCC if the fit does not improve it.
pub fn plcc_logistic(x: &[f64], y: &[f64]) -> f64 {
    let plain = pearson(x, y);
    let (ymax, ymin) = y
        .iter()
        .fold((f64::MIN, f64::MAX), |(a, b), v| (a.max(*v), b.min(*v)));
    let mx = x.iter().sum::<f64>() / x.len() as f64;
    let sx = (x.iter().map(|v| (v - mx).powi(2)).sum::<f64>() / x.len() as f64)
        .sqrt()
        .max(1e-6);
    let mut p = [ymax, ymin, mx, sx];
    let sse = |p: &[f64; 4]| -> f64 {
        x.iter()
            .zip(y)
            .map(|(a, b)| (logistic4(p, *a) - b).powi(2))
            .sum()
    };
    let mut err = sse(&p);
    let mut lambda = 1e-2;
    for _ in 0..200 {
        // Numerical Jacobian (4 columns), normal equations with damping.
        let mut jtj = [[0.0f64; 4]; 4];
        let mut jtr = [0.0f64; 4];
        for (a, b) in x.iter().zip(y) {
            let f0 = logistic4(&p, *a);
            let mut g = [0.0; 4];
            for (k, gk) in g.iter_mut().enumerate() {
                let mut q = p;
                let h = 1e-6 * q[k].abs().max(1e-3);
                q[k] += h;
                *gk = (logistic4(&q, *a) - f0) / h;
            }
            for i in 0..4 {
                jtr[i] += g[i] * (b - f0);
                for j in 0..4 {
                    jtj[i][j] += g[i] * g[j];
                }
            }
        }
        for (i, row) in jtj.iter_mut().enumerate() {
            row[i] *= 1.0 + lambda;
        }
        let Some(step) = solve4(jtj, jtr) else { break };
        let mut q = p;
        for k in 0..4 {
            q[k] += step[k];
        }
        let e = sse(&q);
        if e < err {
            let done = (err - e) < 1e-12 * err.max(1e-12);
            p = q;
            err = e;
            lambda = (lambda / 3.0).max(1e-9);
            if done {
                break;
            }
        } else {
            lambda *= 4.0;
            if lambda > 1e9 {
                break;
            }
        }
    }
    let fitted: Vec<f64> = x.iter().map(|a| logistic4(&p, *a)).collect();
    let r = pearson(&fitted, y);
    if r.is_finite() && r.abs() >= plain.abs() {
        r
    } else {
        plain
    }
}

fn solve4(mut a: [[f64; 4]; 4], mut b: [f64; 4]) -> Option<[f64; 4]> {
    for c in 0..4 {
        let piv = (c..4).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[piv][c].abs() < 1e-300 {
            return None;
        }
        a.swap(c, piv);
        b.swap(c, piv);
        let pivot_row = a[c];
        for r in c + 1..4 {
            let f = a[r][c] / pivot_row[c];
            for (v, p) in a[r][c..].iter_mut().zip(&pivot_row[c..]) {
                *v -= f * p;
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = [0.0; 4];
    for c in (0..4).rev() {
        x[c] = (b[c] - (c + 1..4).map(|k| a[c][k] * x[k]).sum::<f64>()) / a[c][c];
    }
    Some(x)
}

/// SRCC and PLCC of one set.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Agreement {
    /// Items.
    pub n: usize,
    /// Spearman.
    pub srcc: f64,
    /// Pearson, plain.
    pub plcc: f64,
    /// Pearson after the 4-parameter logistic fit.
    pub plcc_logistic: f64,
}

/// Agreement between scores and labels.
pub fn agreement(scores: &[f64], labels: &[f64]) -> Agreement {
    Agreement {
        n: scores.len(),
        srcc: spearman(scores, labels),
        plcc: pearson(scores, labels),
        plcc_logistic: plcc_logistic(scores, labels),
    }
}

/// Mean and median of the test parts of random 80/20 splits.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SplitSummary {
    /// Splits.
    pub splits: usize,
    /// Mean SRCC.
    pub srcc_mean: f64,
    /// Median SRCC.
    pub srcc_median: f64,
    /// Mean PLCC (logistic).
    pub plcc_mean: f64,
    /// Median PLCC (logistic).
    pub plcc_median: f64,
}

/// Median (0 for an empty set).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Evaluates `splits` seeded random 80/20 splits on their 20 % test parts.
pub fn split_summary(scores: &[f64], labels: &[f64], splits: usize, seed: u64) -> SplitSummary {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut s, mut p) = (Vec::new(), Vec::new());
    for _ in 0..splits {
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        rng.shuffle(&mut idx);
        let test = &idx[..(scores.len() / 5).max(3).min(scores.len())];
        let xs: Vec<f64> = test.iter().map(|&i| scores[i]).collect();
        let ys: Vec<f64> = test.iter().map(|&i| labels[i]).collect();
        let a = agreement(&xs, &ys);
        s.push(a.srcc);
        p.push(a.plcc_logistic);
    }
    SplitSummary {
        splits,
        srcc_mean: s.iter().sum::<f64>() / splits.max(1) as f64,
        srcc_median: median(s),
        plcc_mean: p.iter().sum::<f64>() / splits.max(1) as f64,
        plcc_median: median(p),
    }
}

/// The full report of `streamiq eval`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Over every labelled image that could be scored.
    pub all: Agreement,
    /// Over random splits.
    pub splits: SplitSummary,
    /// Per distortion type (SRCC between score and label within the type); types whose
    /// labels are all equal (such as `reference`) are left out.
    pub per_type: BTreeMap<String, Agreement>,
    /// Images that could not be scored, with the reason.
    pub unreadable: Vec<(String, String)>,
}

/// Builds the report from scores aligned with `labelled` (`None` = not scored).
pub fn report(
    labelled: &[Labelled],
    scores: &[Option<f64>],
    errors: Vec<(String, String)>,
    splits: usize,
) -> EvalReport {
    let ok: Vec<(usize, f64)> = scores
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .collect();
    let xs: Vec<f64> = ok.iter().map(|(_, s)| *s).collect();
    let ys: Vec<f64> = ok.iter().map(|(i, _)| labelled[*i].mos).collect();
    let mut groups: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for (i, s) in &ok {
        if let Some(k) = &labelled[*i].kind {
            let g = groups.entry(k.clone()).or_default();
            g.0.push(*s);
            g.1.push(labelled[*i].mos);
        }
    }
    EvalReport {
        all: agreement(&xs, &ys),
        splits: split_summary(&xs, &ys, splits, 0),
        per_type: groups
            .into_iter()
            // SRCC needs at least 3 images and labels that differ (the pristine
            // `reference` images all share one label, so they form no type).
            .filter(|(_, (x, y))| x.len() >= 3 && y.iter().any(|v| *v != y[0]))
            .map(|(k, (x, y))| (k, agreement(&x, &y)))
            .collect(),
        unreadable: errors,
    }
}

/// Labels mapped to [0, 1] for training: kept when they already lie in [0, 1], MOS in
/// [1, 5] mapped linearly, anything else min-max normalised over the set.
pub fn unit_targets(mos: &[f64]) -> Vec<f64> {
    let (lo, hi) = mos
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    if lo >= 0.0 && hi <= 1.0 {
        mos.to_vec()
    } else if lo >= 1.0 && hi <= 5.0 {
        mos.iter().map(|m| (m - 1.0) / 4.0).collect()
    } else {
        mos.iter()
            .map(|m| (m - lo) / (hi - lo).max(1e-12))
            .collect()
    }
}

/// Writes the embeddings of the scored images with their [0, 1] targets as
/// safetensors (`embeds` `[N, D]`, `targets` `[N]`; metadata `types`, comma-separated,
/// and `paths`, newline-separated). Returns N.
pub fn save_embeddings(
    path: &Path,
    labelled: &[Labelled],
    embeds: &[Option<Vec<f32>>],
) -> Result<usize, SaveEmbeddingsError> {
    let rows: Vec<(&Labelled, &Vec<f32>)> = labelled
        .iter()
        .zip(embeds)
        .filter_map(|(l, e)| e.as_ref().map(|e| (l, e)))
        .collect();
    let Some(dim) = rows.first().map(|(_, e)| e.len()) else {
        return Err(SaveEmbeddingsError::NothingScored);
    };
    let targets = unit_targets(&rows.iter().map(|(l, _)| l.mos).collect::<Vec<_>>());
    let e: Vec<u8> = rows
        .iter()
        .flat_map(|(_, e)| e.iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    let t: Vec<u8> = targets
        .iter()
        .flat_map(|v| (*v as f32).to_le_bytes())
        .collect();
    let n = rows.len();
    fn view(
        s: Vec<usize>,
        b: &[u8],
    ) -> Result<safetensors::tensor::TensorView<'_>, safetensors::SafeTensorError> {
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s, b)
    }
    let meta: std::collections::HashMap<String, String> = [
        (
            "types".to_string(),
            rows.iter()
                .map(|(l, _)| l.kind.clone().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(","),
        ),
        (
            "paths".to_string(),
            rows.iter()
                .map(|(l, _)| l.path.display().to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    ]
    .into_iter()
    .collect();
    let bytes = safetensors::serialize(
        [
            ("embeds", view(vec![n, dim], &e)?),
            ("targets", view(vec![n], &t)?),
        ],
        Some(meta),
    )?;
    crate::score::prompt_store::write_atomic(path, &bytes).map_err(|source| {
        SaveEmbeddingsError::Write {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(n)
}

/// The report as text.
pub fn format_text(r: &EvalReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let a = &r.all;
    let _ = writeln!(s, "images {} ({} unreadable)", a.n, r.unreadable.len());
    for (p, e) in &r.unreadable {
        let _ = writeln!(s, "  unreadable {p}: {e}");
    }
    let _ = writeln!(
        s,
        "all            SRCC {:.4}  PLCC {:.4}  PLCC(logistic) {:.4}",
        a.srcc, a.plcc, a.plcc_logistic
    );
    let sp = &r.splits;
    let _ = writeln!(
        s,
        "{} x 80/20     SRCC mean {:.4} median {:.4}  PLCC mean {:.4} median {:.4}",
        sp.splits, sp.srcc_mean, sp.srcc_median, sp.plcc_mean, sp.plcc_median
    );
    for (k, a) in &r.per_type {
        let _ = writeln!(
            s,
            "type {k:<24} n {:<4} SRCC {:.4}  PLCC {:.4}",
            a.n, a.srcc, a.plcc_logistic
        );
    }
    if !r.per_type.is_empty() {
        let mean = r.per_type.values().map(|a| a.srcc).sum::<f64>() / r.per_type.len() as f64;
        let _ = writeln!(s, "mean SRCC over {} types: {mean:.4}", r.per_type.len());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[10.0, 20.0, 20.0, 5.0]), vec![2.0, 3.5, 3.5, 1.0]);
    }

    #[test]
    fn correlations_of_known_sets() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert!((spearman(&x, &[2.0, 4.0, 6.0, 8.0, 10.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[5.0, 4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // Monotone but not linear: SRCC 1, plain PLCC below 1.
        let y: Vec<f64> = x.iter().map(|v: &f64| v.powi(4)).collect();
        assert!((spearman(&x, &y) - 1.0).abs() < 1e-12);
        assert!(pearson(&x, &y) < 0.97);
        assert_eq!(pearson(&x, &[1.0; 5]), 0.0);
    }

    #[test]
    fn logistic_fit_straightens_a_sigmoid() {
        let x: Vec<f64> = (0..40).map(|i| i as f64 / 39.0).collect();
        let y: Vec<f64> = x
            .iter()
            .map(|v| 1.0 + 4.0 / (1.0 + (-(v - 0.5) / 0.08).exp()))
            .collect();
        let plain = pearson(&x, &y);
        let fitted = plcc_logistic(&x, &y);
        assert!(plain < 0.97, "{plain}");
        assert!(fitted > 0.999, "{fitted}");
    }

    #[test]
    fn labels_csv_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.csv");
        std::fs::write(&p, "path,mos,type\na.png,4.5,blur\nb.png,x,blur\n").unwrap();
        let e = read_labels(&p).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("\"x\""), "{e}");
        std::fs::write(&p, "file,score\na.png,1\n").unwrap();
        assert!(
            read_labels(&p)
                .unwrap_err()
                .to_string()
                .contains("path and mos")
        );
        std::fs::write(
            &p,
            "path,mos,type\na.png,1,blur\n/abs/b.png,2,noise\nc.png,3,blur\n",
        )
        .unwrap();
        let l = read_labels(&p).unwrap();
        assert_eq!(l[0].path, dir.path().join("a.png"));
        assert_eq!(l[1].path, PathBuf::from("/abs/b.png"));
        assert_eq!(l[2].kind.as_deref(), Some("blur"));
    }
}
