//! Model bundles: a directory with `manifest.toml`, `visual.onnx`, `prompts.safetensors`,
//! optionally `visual.pt` (the same tower in TorchScript, for the torch backend) and
//! (for the sidecar) `text/`. Every file listed in the manifest is checked against its
//! sha256 before anything is loaded.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A bundle that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file is missing or unreadable.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `manifest.toml` is malformed or inconsistent.
    #[error("{path}: {message}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file's content does not match the manifest's sha256.
    #[error("{path}: sha256 {actual} does not match the manifest's {expected}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// From the manifest.
        expected: String,
        /// Of the file on disk.
        actual: String,
    },
}

impl BundleError {
    /// Short static name, usable as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Manifest { .. } => "manifest",
            Self::Checksum { .. } => "checksum",
        }
    }
}

/// How a frame is brought to the model's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeRule {
    /// Shorter side to `size`, aspect kept, centre crop (CLIP's rule).
    ShorterSideCrop,
    /// Both sides to `size`, aspect not kept.
    Squash,
}

/// `[input]` of the manifest.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Square input side in pixels.
    pub size: u32,
    /// Per-channel mean (RGB, 0..1 scale).
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
    /// Resize rule.
    pub resize: ResizeRule,
}

/// `[text]` of the manifest: the text tower the sidecar loads from `text/`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    /// Transformer width W (token-embedding size).
    pub width: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Token positions (77 for CLIP).
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Learnable context vectors in the quality prompt (4).
    pub n_ctx: usize,
}

/// `manifest.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Bundle format version (1).
    pub format: u32,
    /// Bundle name, e.g. `streamiq-tiny`.
    pub name: String,
    /// Free-text architecture, e.g. `vit-b-16` or `convnet-tiny`.
    pub architecture: String,
    /// Image/text embedding size D.
    pub embed_dim: usize,
    /// CLIP's logit scale (about 100), frozen.
    pub logit_scale: f32,
    /// Preprocessing.
    pub input: InputSpec,
    /// The text tower, for bundles that carry `text/` (needed by the sidecar only).
    #[serde(default)]
    pub text: Option<TextSpec>,
    /// sha256 (hex) of every file, keyed by path relative to the bundle.
    pub files: BTreeMap<String, String>,
    /// Anything else the producer recorded (training command, seed, provenance).
    #[serde(default)]
    pub info: BTreeMap<String, toml::Value>,
}

/// A bundle whose manifest parsed and whose files match their checksums.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The directory.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
}

impl Bundle {
    /// Reads `dir/manifest.toml` and verifies every listed file.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        let mpath = dir.join("manifest.toml");
        let text = fs::read_to_string(&mpath).map_err(|source| BundleError::Io {
            path: mpath.clone(),
            source,
        })?;
        let manifest: Manifest = toml::from_str(&text).map_err(|e| BundleError::Manifest {
            path: mpath.clone(),
            message: e.to_string(),
        })?;
        let bad = |message: String| BundleError::Manifest {
            path: mpath.clone(),
            message,
        };
        if manifest.format != 1 {
            return Err(bad(format!(
                "format = {}: only format 1 is known",
                manifest.format
            )));
        }
        if manifest.embed_dim == 0 || !(8..=1024).contains(&manifest.input.size) {
            return Err(bad(
                "embed_dim must be > 0 and input.size within 8..=1024".into()
            ));
        }
        if !(manifest.logit_scale.is_finite() && manifest.logit_scale > 0.0) {
            return Err(bad(format!(
                "logit_scale = {}: must be finite and > 0",
                manifest.logit_scale
            )));
        }
        if manifest.input.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(bad("input.std must be > 0".into()));
        }
        for required in ["visual.onnx", "prompts.safetensors"] {
            if !manifest.files.contains_key(required) {
                return Err(bad(format!("files has no entry for {required}")));
            }
        }
        for (rel, expected) in &manifest.files {
            if rel.contains("..") || Path::new(rel).is_absolute() {
                return Err(bad(format!(
                    "files: {rel:?} must be relative to the bundle"
                )));
            }
            let path = dir.join(rel);
            let actual = sha256_file(&path)?;
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(BundleError::Checksum {
                    path,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// Path of the visual encoder.
    pub fn visual_path(&self) -> PathBuf {
        self.dir.join("visual.onnx")
    }

    /// The visual encoder's bytes, read once and checked against the manifest's sha256
    /// again: the model is built from exactly these bytes, so a file replaced between
    /// [`Bundle::open`]'s check and the load is refused, never run.
    pub fn visual_bytes(&self) -> Result<Vec<u8>, BundleError> {
        self.checked_bytes("visual.onnx")
    }

    /// Path of the TorchScript export of the visual encoder (the torch backend's).
    pub fn torchscript_path(&self) -> PathBuf {
        self.dir.join("visual.pt")
    }

    /// `visual.pt`'s bytes, checked as [`Bundle::visual_bytes`] checks `visual.onnx`'s;
    /// a bundle whose manifest lists no `visual.pt` is refused with how to make one.
    pub fn torchscript_bytes(&self) -> Result<Vec<u8>, BundleError> {
        if !self.manifest.files.contains_key("visual.pt") {
            return Err(BundleError::Manifest {
                path: self.dir.join("manifest.toml"),
                message: "files has no entry for visual.pt, the TorchScript tower the torch \
                          backend runs: add one with `make torchscript BUNDLE=DIR` \
                          (scripts/bundle_torchscript.py)"
                    .into(),
            });
        }
        self.checked_bytes("visual.pt")
    }

    /// The bytes of the bundle's file `rel`, checked against the manifest's sha256.
    fn checked_bytes(&self, rel: &str) -> Result<Vec<u8>, BundleError> {
        let path = self.dir.join(rel);
        let bytes = fs::read(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        let expected = self.manifest.files.get(rel).cloned().unwrap_or_default();
        if !actual.eq_ignore_ascii_case(&expected) {
            return Err(BundleError::Checksum {
                path,
                expected,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Path of the bundle's initial prompt set.
    pub fn prompts_path(&self) -> PathBuf {
        self.dir.join("prompts.safetensors")
    }
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let io = |source| BundleError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_visual_tower_swapped_after_the_check_is_never_loaded() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/streamiq-tiny");
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "manifest.toml",
            "visual.onnx",
            "visual.pt",
            "prompts.safetensors",
        ] {
            fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        fs::create_dir(dir.path().join("text")).unwrap();
        for f in ["weights.safetensors", "tokens.json", "vocab.json"] {
            fs::copy(src.join("text").join(f), dir.path().join("text").join(f)).unwrap();
        }
        let bundle = Bundle::open(dir.path()).unwrap();
        assert!(bundle.visual_bytes().is_ok());
        assert!(bundle.torchscript_bytes().is_ok());
        // Replaced between the check at open and the load: refused by its bytes.
        fs::write(bundle.visual_path(), b"not the model").unwrap();
        match bundle.visual_bytes() {
            Err(BundleError::Checksum { path, .. }) => assert_eq!(path, bundle.visual_path()),
            other => panic!("{other:?}"),
        }
    }
}
