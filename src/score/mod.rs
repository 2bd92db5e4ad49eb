//! Scoring: the model bundle ([`bundle`]), preprocessing ([`preprocess`]), the visual
//! encoder ([`encoder`]: ONNX Runtime in [`model`], libtorch in `torch` with the `torch`
//! feature, or a KServe v2 server through [`kserve`], as `scorer.backend` says), prompt
//! sets ([`prompts`], [`prompt_store`]),
//! and the [`Engine`] that runs them for the daemon and for `scan` alike: frames go in
//! through its queue ([`Engine::handoff`]), scores come out at a [`ScoreSink`].

pub mod bench;
pub mod bundle;
pub mod encoder;
mod engine;
pub mod kserve;
pub mod model;
pub mod preprocess;
pub mod prompt_store;
pub mod prompts;
pub mod rewrite;
#[cfg(feature = "torch")]
pub mod torch;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Backend, ModelSettings};
use crate::frame::{Frame, ScoredFrame};
use crate::metrics::DropReason;
use bundle::Bundle;
use encoder::Encoder;
use model::{ModelOptions, VisualModel};
use prompts::PromptSet;

pub use engine::{Engine, EngineHealth, STUCK_AFTER};

/// Where scored frames go: per-stream state in the daemon, per-file reports in `scan`.
pub trait ScoreSink: Send + Sync {
    /// A batch of scored frames, in queue order.
    fn publish(&self, frames: Vec<ScoredFrame>, prompts: &PromptSet);
    /// Frames that were not scored, and why (a full queue, a failed model call).
    fn dropped(&self, frames: &[Frame], reason: DropReason);
}

/// The active prompt set, swapped without locks on the scoring path.
pub type ActivePrompts = Arc<ArcSwap<PromptSet>>;

/// Why a model could not be loaded; the message names the file or key.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bundle directory, its manifest or a checksum.
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    /// The bundle's prompt set.
    #[error(transparent)]
    Prompts(#[from] prompts::PromptError),
    /// ONNX Runtime, libtorch or the visual tower.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The configured device cannot run the tower and no fall-back is configured.
    #[error("scorer.device = \"{device}\": {message}")]
    Device {
        /// The device, as configured.
        device: String,
        /// Why it cannot be used.
        message: String,
    },
    /// `scorer.backend` names a backend this build does not have.
    #[error("scorer.backend = \"{0}\": this streamiq was built without it (cargo feature `{0}`)")]
    NotBuilt(&'static str),
}

/// A verified bundle with its encoder and its own prompt set, ready for an [`Engine`].
pub struct LoadedModel {
    /// The verified bundle.
    pub bundle: Bundle,
    /// The encoder.
    pub model: Encoder,
    /// The bundle's prompt set.
    pub prompts: PromptSet,
}

/// Opens the bundle, loads its prompt set and the encoder `backend` names. Errors name
/// the file or the key.
pub fn load(settings: &ModelSettings, backend: &Backend) -> Result<LoadedModel, LoadError> {
    let bundle = Bundle::open(&settings.bundle)?;
    let dim = bundle.manifest.embed_dim;
    let prompts = PromptSet::load(&bundle.prompts_path(), dim)?;
    let model = load_encoder(&bundle, settings, backend)?;
    for f in model.fallbacks() {
        tracing::warn!(provider = %f.from, reason = %f.reason, "Execution provider unavailable");
    }
    tracing::info!(
        bundle = %bundle.dir.display(),
        backend = backend.name(),
        execution = %model.execution(),
        embed_dim = dim,
        prompt_version = prompts.version,
        onnxruntime = %model::onnxruntime_path(settings.onnxruntime_lib.as_deref())
            .map_or_else(|| "-".to_string(), |p| p.display().to_string()),
        "Model loaded"
    );
    Ok(LoadedModel {
        bundle,
        model,
        prompts,
    })
}

/// The bundle's visual tower in `backend`, built from the bytes whose sha256 was just
/// checked (no second read of the file).
fn load_encoder(
    bundle: &Bundle,
    settings: &ModelSettings,
    backend: &Backend,
) -> Result<Encoder, LoadError> {
    match backend {
        Backend::OnnxRuntime => {
            let opts = ModelOptions {
                execution: settings.execution.clone(),
                intra_threads: settings.intra_threads,
                onnxruntime_lib: settings.onnxruntime_lib.clone(),
                graph_rewrites: settings.graph_rewrites,
            };
            let bytes = bundle.visual_bytes()?;
            let dim = bundle.manifest.embed_dim;
            let model = VisualModel::load_bytes(&bytes, &bundle.visual_path(), dim, &opts)?;
            Ok(Encoder::OnnxRuntime(model))
        }
        #[cfg(feature = "torch")]
        Backend::Torch(t) => {
            let bytes = bundle.torchscript_bytes()?;
            let opts = torch::TorchOptions {
                path: bundle.torchscript_path(),
                embed_dim: bundle.manifest.embed_dim,
                size: bundle.manifest.input.size as usize,
                settings: *t,
                intra_threads: settings.intra_threads,
            };
            Ok(Encoder::Torch(torch::load(&bytes, &opts)?))
        }
        // Refused when the config is validated; kept as an error, never a panic.
        #[cfg(not(feature = "torch"))]
        Backend::Torch(_) => Err(LoadError::NotBuilt(backend.name())),
        Backend::Kserve(k) => {
            let input = &bundle.manifest.input;
            let mut remote = kserve::RemoteModel::new(
                k.clone(),
                bundle.manifest.embed_dim,
                input.size as usize,
                input.mean,
                input.std,
            )?;
            // A server that is down now is not a reason to refuse the start: its frames
            // are dropped until it answers. One that serves another interface is.
            match remote.check() {
                Ok(pixels) => {
                    tracing::info!(endpoint = %k.endpoint, model = %k.model, ?pixels, "Remote scorer answers")
                }
                Err(e @ (model::ModelError::Unavailable(_) | model::ModelError::Timeout(_))) => {
                    tracing::warn!(endpoint = %k.endpoint, error = %e, "Remote scorer not answering yet; frames are dropped until it does")
                }
                Err(e) => return Err(e.into()),
            }
            Ok(Encoder::Remote(Box::new(remote)))
        }
    }
}
