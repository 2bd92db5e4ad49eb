//! The visual encoder whichever backend runs it (`scorer.backend`): what the model
//! thread calls, `pixels -> embeds`, and what the daemon reports about it.

use super::model::{ModelError, VisualModel};

/// A device or execution provider that was configured but could not be used, and why
/// (logged, and counted in `streamiq_execution_provider_failures_total{provider}`).
#[derive(Debug, Clone)]
pub struct Fallback {
    /// The name it has in `streamiq_build_info{execution}` (`cuda`, `torch-cuda:0`, ...).
    pub from: String,
    /// Why it was skipped.
    pub reason: String,
}

/// A loaded visual encoder.
pub enum Encoder {
    /// ONNX Runtime on `visual.onnx`.
    OnnxRuntime(VisualModel),
    /// libtorch on `visual.pt`.
    #[cfg(feature = "torch")]
    Torch(super::torch::TorchVisual),
    /// A KServe v2 gRPC server.
    Remote(Box<super::kserve::RemoteModel>),
}

impl Encoder {
    /// Runs `n` images (`pixels` = `[n, 3, size, size]` floats) and returns `n * D`
    /// L2-normalised embeddings.
    pub fn embed(&mut self, pixels: &[f32], n: usize, size: usize) -> Result<Vec<f32>, ModelError> {
        match self {
            Self::OnnxRuntime(m) => m.embed(pixels, n, size),
            #[cfg(feature = "torch")]
            Self::Torch(m) => m.embed(pixels, n, size),
            Self::Remote(m) => m.embed(pixels, n, size),
        }
    }

    /// Embedding size D.
    pub fn embed_dim(&self) -> usize {
        match self {
            Self::OnnxRuntime(m) => m.embed_dim(),
            #[cfg(feature = "torch")]
            Self::Torch(m) => m.embed_dim(),
            Self::Remote(m) => m.embed_dim(),
        }
    }

    /// What runs the tower, as `streamiq_build_info{execution}` shows it: an ONNX
    /// Runtime provider (`cpu`, `cuda`, `tensorrt`), `torch-<device>` or `kserve`.
    pub fn execution(&self) -> String {
        match self {
            Self::OnnxRuntime(m) => m.provider.name().to_string(),
            #[cfg(feature = "torch")]
            Self::Torch(m) => m.execution(),
            Self::Remote(_) => "kserve".to_string(),
        }
    }

    /// The configured providers or devices that could not be used, in the order tried.
    pub fn fallbacks(&self) -> Vec<Fallback> {
        match self {
            Self::OnnxRuntime(m) => m
                .failures
                .iter()
                .map(|f| Fallback {
                    from: f.provider.name().to_string(),
                    reason: f.reason.clone(),
                })
                .collect(),
            #[cfg(feature = "torch")]
            Self::Torch(m) => m.fallback.iter().cloned().collect(),
            Self::Remote(_) => Vec::new(),
        }
    }
}
