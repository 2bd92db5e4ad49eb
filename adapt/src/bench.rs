//! `streamiq-adapt bench`: the few-shot evaluation protocol (GRMP-IQA's). Over K seeded
//! splits, 20 % of a labelled set is the test part; N training labels are drawn from the
//! rest (a fifth of them held out for early stopping). Each split compares the bundle's
//! prompts without adaptation against an adaptation round per lambda, on the test part;
//! mean and median SRCC / PLCC (4-parameter logistic) are reported.

use std::path::Path;

use anyhow::{Context, ensure};
use streamiq::eval::{median, pearson, plcc_logistic, spearman};
use streamiq::score::bundle::Bundle;
use tch::{Device, Tensor};

use crate::adapt::{self, Sample, TrainSettings};
use crate::clip;

/// Options of `bench`.
pub struct BenchOptions {
    /// Training labels per split.
    pub train: usize,
    /// Splits.
    pub splits: usize,
    /// Regularisation strengths to compare.
    pub lambdas: Vec<f64>,
    /// Epoch bound per round.
    pub max_epochs: usize,
}

fn load_set(path: &Path) -> anyhow::Result<Vec<Sample>> {
    let e = clip::read_tensor(path, "embeds")?;
    let t = clip::read_tensor(path, "targets")?;
    let (n, d) = (e.size()[0], e.size()[1]);
    ensure!(t.size() == [n], "{}: targets must be [{n}]", path.display());
    let e = Vec::<f32>::try_from(e.flatten(0, -1))?;
    let t = Vec::<f32>::try_from(t)?;
    Ok(e.chunks_exact(d as usize)
        .zip(t)
        .map(|(e, target)| Sample {
            embedding: e.to_vec(),
            target,
        })
        .collect())
}

fn agreement(scores: &[f64], targets: &[f64]) -> (f64, f64) {
    let p = plcc_logistic(scores, targets);
    (
        spearman(scores, targets),
        if p.is_finite() {
            p
        } else {
            pearson(scores, targets)
        },
    )
}

/// Runs the protocol and prints the table.
pub fn run(model: &Path, embeddings: &Path, o: &BenchOptions, dev: Device) -> anyhow::Result<()> {
    let bundle = Bundle::open(model)?;
    let tokens = clip::load_tokens(&bundle)?;
    let ctx0 = clip::read_tensor(&bundle.prompts_path(), "ctx")?;
    let initial = clip::read_tensor(&bundle.prompts_path(), "quality")?;
    let set = load_set(embeddings).with_context(|| format!("{}", embeddings.display()))?;
    let d = bundle.manifest.embed_dim;
    ensure!(
        set.iter().all(|s| s.embedding.len() == d),
        "{}: embeddings are not {d}-dimensional (made with another model?)",
        embeddings.display()
    );
    let n_test = set.len() / 5;
    ensure!(
        n_test >= 5 && set.len() - n_test >= o.train && o.train >= 10,
        "{} labelled images are too few for --train {}",
        set.len(),
        o.train
    );
    let scale = bundle.manifest.logit_scale as f64;
    let teacher = clip::TextEncoder::load(&bundle, dev)?;
    let mut methods: Vec<(String, Vec<(f64, f64)>)> = std::iter::once("no adaptation".to_string())
        .chain(o.lambdas.iter().map(|l| format!("lambda = {l}")))
        .map(|m| (m, Vec::new()))
        .collect();
    for k in 0..o.splits {
        let mut idx: Vec<usize> = (0..set.len()).collect();
        fastrand::Rng::with_seed(k as u64).shuffle(&mut idx);
        let test: Vec<Sample> = idx[..n_test].iter().map(|&i| set[i].clone()).collect();
        let train_all: Vec<Sample> = idx[n_test..n_test + o.train]
            .iter()
            .map(|&i| set[i].clone())
            .collect();
        let n_hold = (o.train / 5).max(2);
        let (holdout, train) = train_all.split_at(n_hold);
        let (e_test, _) = adapt::stack(&test, Device::Cpu);
        let y_test: Vec<f64> = test.iter().map(|s| s.target as f64).collect();
        methods[0]
            .1
            .push(agreement(&adapt::scores(&e_test, &initial, scale), &y_test));
        for (j, &lambda) in o.lambdas.iter().enumerate() {
            let mut student = clip::TextEncoder::load(&bundle, dev)?;
            let ts = TrainSettings::round(lambda, o.max_epochs, scale, 0);
            let out = adapt::train(
                &mut student,
                &teacher,
                &tokens,
                &ctx0,
                train,
                holdout,
                &ts,
                dev,
            );
            let q: Tensor = out.quality;
            methods[j + 1]
                .1
                .push(agreement(&adapt::scores(&e_test, &q, scale), &y_test));
        }
        let last: Vec<String> = methods
            .iter()
            .map(|(m, r)| format!("{m} {:.3}", r[k].0))
            .collect();
        eprintln!(
            "split {}/{}: test SRCC {}",
            k + 1,
            o.splits,
            last.join(", ")
        );
    }
    println!(
        "{} images, {} splits, {} training labels per split ({} held out for early stopping), test 20 %",
        set.len(),
        o.splits,
        o.train,
        (o.train / 5).max(2)
    );
    println!(
        "{:<16} {:>10} {:>12} {:>10} {:>12}",
        "method", "SRCC mean", "SRCC median", "PLCC mean", "PLCC median"
    );
    for (m, r) in &methods {
        let s: Vec<f64> = r.iter().map(|x| x.0).collect();
        let p: Vec<f64> = r.iter().map(|x| x.1).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "{m:<16} {:>10.4} {:>12.4} {:>10.4} {:>12.4}",
            mean(&s),
            median(s.clone()),
            mean(&p),
            median(p.clone())
        );
    }
    Ok(())
}
