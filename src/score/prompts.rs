//! Prompt sets: the text features of the quality pair ("high quality", "low quality")
//! and of optional attribute pairs, `[2, D]` each, in a safetensors file; and the
//! CLIP-IQA score they give an image embedding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// A prompt set that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// Unreadable file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a valid prompt set for this model.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A prompt set adapted for another visual tower than the model's: its text
    /// features were trained against that tower's embeddings and would score this
    /// model's embeddings wrongly.
    #[error(
        "{path}: prompt set v{version} was adapted for the visual tower with sha256 \
         {set_sha256}, but this model's visual.onnx has sha256 {model_sha256}; roll back \
         to version 0 (the bundle's own set) or adapt a set for this model \
         (streamiq-adapt reembed, then streamiq-adapt once)"
    )]
    ModelMismatch {
        /// The file.
        path: PathBuf,
        /// The set's version.
        version: u64,
        /// The `model_sha256` the set records.
        set_sha256: String,
        /// The running model's `visual.onnx` sha256.
        model_sha256: String,
    },
}

impl PromptError {
    /// Short static name, usable as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Invalid { .. } => "invalid",
            Self::ModelMismatch { .. } => "model_mismatch",
        }
    }
}

/// A `[2, D]` pair of L2-normalised text features: index 0 "good", index 1 "bad".
#[derive(Debug, Clone, PartialEq)]
pub struct PromptPair {
    /// Normalised feature of the positive prompt.
    pub good: Vec<f32>,
    /// Normalised feature of the negative prompt.
    pub bad: Vec<f32>,
}

impl PromptPair {
    /// `softmax(scale * [cos(e, good), cos(e, bad)])[0]` for a normalised embedding `e`,
    /// written as a logistic of the difference (same value, no overflow).
    pub fn score(&self, e: &[f32], logit_scale: f32) -> f32 {
        let d = dot(e, &self.good) - dot(e, &self.bad);
        1.0 / (1.0 + (-logit_scale * d).exp())
    }
}

/// A loaded, validated prompt set.
#[derive(Debug, Clone)]
pub struct PromptSet {
    /// Version number (0 for the bundle's own set).
    pub version: u64,
    /// Where it was read from.
    pub path: PathBuf,
    /// The quality pair.
    pub quality: PromptPair,
    /// Attribute pairs, sorted by name (`attr.sharp` in the file -> `sharp`).
    pub attributes: Vec<(String, PromptPair)>,
    /// The file's metadata (`version`, `created`, `labels`, `val_srcc`, `parent`, ...).
    pub metadata: HashMap<String, String>,
}

impl PromptSet {
    /// Reads and validates a prompt set for a model with embedding size `dim`.
    pub fn load(path: &Path, dim: usize) -> Result<Self, PromptError> {
        let bytes = std::fs::read(path).map_err(|source| PromptError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes, path, dim)
    }

    /// Parses safetensors bytes; `path` is only used in errors.
    pub fn parse(bytes: &[u8], path: &Path, dim: usize) -> Result<Self, PromptError> {
        let invalid = |message: String| PromptError::Invalid {
            path: path.to_owned(),
            message,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let pair = |name: &str| -> Result<PromptPair, PromptError> {
            let t = st
                .tensor(name)
                .map_err(|_| invalid(format!("no tensor {name:?}")))?;
            if t.dtype() != Dtype::F32 {
                return Err(invalid(format!(
                    "{name}: dtype {:?}, expected F32",
                    t.dtype()
                )));
            }
            if t.shape() != [2, dim] {
                return Err(invalid(format!(
                    "{name}: shape {:?}, expected [2, {dim}] (the model's embedding size)",
                    t.shape()
                )));
            }
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let good = normalised(&v[..dim])
                .ok_or_else(|| invalid(format!("{name}[0]: not finite or zero")))?;
            let bad = normalised(&v[dim..])
                .ok_or_else(|| invalid(format!("{name}[1]: not finite or zero")))?;
            Ok(PromptPair { good, bad })
        };
        let quality = pair("quality")?;
        let mut attributes = Vec::new();
        for name in st.names() {
            if let Some(attr) = name.strip_prefix("attr.") {
                attributes.push((attr.to_string(), pair(name)?));
            }
        }
        attributes.sort_by(|a, b| a.0.cmp(&b.0));
        let version = match metadata.get("version") {
            None => 0,
            Some(v) => v
                .trim_start_matches('v')
                .parse()
                .map_err(|_| invalid(format!("metadata version = {v:?}: not a number")))?,
        };
        Ok(Self {
            version,
            path: path.to_owned(),
            quality,
            attributes,
            metadata,
        })
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Returns `v / |v|`, or `None` if `v` is zero or not finite.
pub fn normalised(v: &[f32]) -> Option<Vec<f32>> {
    if v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let n = dot(v, v).sqrt();
    (n > 1e-12).then(|| v.iter().map(|x| x / n).collect())
}

/// L2-normalises `v` in place; returns false (leaving it unchanged) if it is zero or not finite.
pub fn normalise_in_place(v: &mut [f32]) -> bool {
    let n = dot(v, v).sqrt();
    if !(n.is_finite() && n > 1e-12) {
        return false;
    }
    v.iter_mut().for_each(|x| *x /= n);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tensors: &[(&str, Vec<usize>, Vec<f32>)], meta: &[(&str, &str)]) -> Vec<u8> {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<_> = tensors
            .iter()
            .zip(&bytes)
            .map(|((n, s, _), b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let meta: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    #[test]
    fn scores_follow_the_closer_prompt() {
        let b = file(
            &[
                ("quality", vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]),
                ("attr.sharp", vec![2, 2], vec![0.0, 1.0, 1.0, 0.0]),
            ],
            &[("version", "3")],
        );
        let p = PromptSet::parse(&b, Path::new("p"), 2).unwrap();
        assert_eq!(p.version, 3);
        assert_eq!(p.attributes[0].0, "sharp");
        assert!(p.quality.score(&[1.0, 0.0], 100.0) > 0.99);
        assert!(p.quality.score(&[0.0, 1.0], 100.0) < 0.01);
        assert!(
            (p.quality
                .score(&[std::f32::consts::FRAC_1_SQRT_2; 2], 100.0)
                - 0.5)
                .abs()
                < 1e-3
        );
    }

    #[test]
    fn wrong_size_and_nan_are_refused() {
        let b = file(&[("quality", vec![2, 3], vec![1.0; 6])], &[]);
        let e = PromptSet::parse(&b, Path::new("x.safetensors"), 2).unwrap_err();
        assert!(e.to_string().contains("x.safetensors") && e.to_string().contains("[2, 2]"));
        let b = file(
            &[("quality", vec![2, 2], vec![f32::NAN, 0.0, 0.0, 1.0])],
            &[],
        );
        assert!(PromptSet::parse(&b, Path::new("x"), 2).is_err());
        assert!(PromptSet::parse(b"garbage", Path::new("x"), 2).is_err());
    }
}
