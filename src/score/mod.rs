//! Scoring: the model bundle ([`bundle`]), preprocessing ([`preprocess`]), the ONNX
//! Runtime visual encoder ([`model`]), prompt sets ([`prompts`], [`prompt_store`]),
//! and the [`Engine`] that runs them for the daemon and for `scan` alike: frames go in
//! through its queue ([`Engine::handoff`]), scores come out at a [`ScoreSink`].

pub mod bundle;
mod engine;
pub mod model;
pub mod preprocess;
pub mod prompt_store;
pub mod prompts;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::ModelSettings;
use crate::frame::{Frame, ScoredFrame};
use crate::metrics::DropReason;
use bundle::Bundle;
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
    /// ONNX Runtime or the visual tower.
    #[error(transparent)]
    Model(#[from] model::ModelError),
}

/// A verified bundle with its encoder and its own prompt set, ready for an [`Engine`].
pub struct LoadedModel {
    /// The verified bundle.
    pub bundle: Bundle,
    /// The encoder.
    pub model: VisualModel,
    /// The bundle's prompt set.
    pub prompts: PromptSet,
}

/// Opens the bundle, loads its prompt set and the encoder. Errors name the file.
pub fn load(settings: &ModelSettings) -> Result<LoadedModel, LoadError> {
    let bundle = Bundle::open(&settings.bundle)?;
    let dim = bundle.manifest.embed_dim;
    let prompts = PromptSet::load(&bundle.prompts_path(), dim)?;
    let opts = ModelOptions {
        execution: settings.execution.clone(),
        intra_threads: settings.intra_threads,
        onnxruntime_lib: settings.onnxruntime_lib.clone(),
    };
    // Built from the bytes whose sha256 was just checked (no second read of the file).
    let bytes = bundle.visual_bytes()?;
    let model = VisualModel::load_bytes(&bytes, &bundle.visual_path(), dim, &opts)?;
    for f in &model.failures {
        tracing::warn!(provider = f.provider.name(), reason = %f.reason, "Execution provider unavailable");
    }
    tracing::info!(
        bundle = %bundle.dir.display(),
        execution = model.provider.name(),
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
