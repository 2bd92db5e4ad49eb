//! Scoring: the model bundle ([`bundle`]), preprocessing ([`preprocess`]), the ONNX
//! Runtime visual encoder ([`model`]), prompt sets ([`prompts`]), and the engine that
//! runs them: a batcher thread that groups queued frames and writes them straight into
//! the batch tensor, and a model thread that owns the session, while the next batch is
//! prepared, and publishes scores to a [`ScoreSink`].

pub mod bundle;
pub mod model;
pub mod preprocess;
pub mod prompt_store;
pub mod prompts;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam_channel::Receiver;

use crate::batch::batching_task;
use crate::config::ScorerSettings;
use crate::frame::{Frame, ScoredFrame};
use crate::metrics::{DropReason, Metrics};
use model::VisualModel;
use preprocess::Normaliser;
use prompts::PromptSet;

/// Where scored frames go.
pub trait ScoreSink: Send + Sync {
    /// A batch of scored frames, in queue order.
    fn publish(&self, frames: Vec<ScoredFrame>, prompts: &PromptSet);
    /// Frames that could not be scored.
    fn dropped(&self, frames: Vec<Frame>, reason: DropReason);
}

/// The active prompt set, swapped without locks on the scoring path.
pub type ActivePrompts = Arc<ArcSwap<PromptSet>>;

/// A batch on its way to the model: frames and their pixels, already normalised.
struct Batch {
    frames: Vec<Frame>,
    pixels: Vec<f32>,
}

/// The batcher and model threads.
pub struct ScoringEngine {
    batcher: JoinHandle<()>,
    model: JoinHandle<()>,
}

/// What the engine needs besides the queue.
pub struct EngineParts {
    /// The visual encoder (moved onto the model thread).
    pub model: VisualModel,
    /// Preprocessing for the bundle.
    pub normaliser: Normaliser,
    /// The active prompt set.
    pub prompts: ActivePrompts,
    /// CLIP logit scale.
    pub logit_scale: f32,
    /// Batching rules.
    pub scorer: ScorerSettings,
    /// Where scores go.
    pub sink: Arc<dyn ScoreSink>,
    /// Pipeline-wide metrics, if exported.
    pub metrics: Option<Arc<Metrics>>,
}

impl ScoringEngine {
    /// Starts both threads. They end once every sender of `rx` is dropped and the
    /// last partial batch is scored.
    pub fn start(rx: Receiver<Frame>, parts: EngineParts) -> Self {
        let (btx, brx) = crossbeam_channel::bounded::<Batch>(1);
        let (pool_tx, pool_rx) = crossbeam_channel::bounded::<Vec<f32>>(2);
        let EngineParts {
            model,
            normaliser,
            prompts,
            logit_scale,
            scorer,
            sink,
            metrics,
        } = parts;
        let size = normaliser.size();
        let views = normaliser.views_per_frame();
        let m = metrics.clone();
        let batcher = std::thread::Builder::new()
            .name("streamiq-batcher".into())
            .spawn(move || {
                let per_frame = normaliser.plane_len() * normaliser.views_per_frame();
                let flush = |frames: Vec<Frame>| {
                    let mut pixels = pool_rx.try_recv().unwrap_or_default();
                    pixels.resize(frames.len() * per_frame, 0.0);
                    for (f, out) in frames.iter().zip(pixels.chunks_exact_mut(per_frame)) {
                        normaliser.write_views(&f.image, out);
                    }
                    btx.send(Batch { frames, pixels }).is_ok()
                };
                let depth = |d: usize| {
                    if let Some(m) = &m {
                        m.queue_depth.set(d as i64);
                    }
                };
                batching_task(rx, scorer.max_batch.get(), scorer.max_wait, flush, depth);
            })
            .expect("spawn batcher thread");
        let model = std::thread::Builder::new()
            .name("streamiq-model".into())
            .spawn(move || {
                model_task(
                    model,
                    brx,
                    pool_tx,
                    Geometry { size, views },
                    prompts,
                    logit_scale,
                    sink,
                    metrics,
                )
            })
            .expect("spawn model thread");
        Self { batcher, model }
    }

    /// Waits for both threads (after the queue's senders are gone).
    pub fn join(self) {
        let _ = self.batcher.join();
        let _ = self.model.join();
    }
}

/// Input side and model inputs per frame.
#[derive(Clone, Copy)]
struct Geometry {
    size: usize,
    views: usize,
}

/// Mean of `views` normalised embeddings, normalised again (the frame's embedding).
fn mean_embedding(views: &[f32], dim: usize) -> Vec<f32> {
    let mut m = vec![0.0; dim];
    for v in views.chunks_exact(dim) {
        m.iter_mut().zip(v).for_each(|(a, b)| *a += b);
    }
    if !prompts::normalise_in_place(&mut m) {
        m.fill(f32::NAN);
    }
    m
}

#[allow(clippy::too_many_arguments)]
fn model_task(
    mut model: VisualModel,
    rx: Receiver<Batch>,
    pool: crossbeam_channel::Sender<Vec<f32>>,
    geometry: Geometry,
    prompts: ActivePrompts,
    logit_scale: f32,
    sink: Arc<dyn ScoreSink>,
    metrics: Option<Arc<Metrics>>,
) {
    let dim = model.embed_dim();
    let mut last_error_log: Option<Instant> = None;
    for Batch { frames, pixels } in rx {
        let n = frames.len() * geometry.views;
        let t0 = Instant::now();
        let result = model.embed(&pixels, n, geometry.size);
        if let Some(m) = &metrics {
            m.batch_size.observe(n as f64);
            m.inference_duration.observe(t0.elapsed().as_secs_f64());
        }
        let _ = pool.try_send(pixels);
        let embeds = match result {
            Ok(e) => e,
            Err(e) => {
                if last_error_log.is_none_or(|t| t.elapsed().as_secs() >= 10) {
                    tracing::error!(error = %e, frames = n, "Inference failed");
                    last_error_log = Some(Instant::now());
                }
                if let Some(m) = &metrics {
                    m.inference_errors.with_label_values(&[e.kind()]).inc();
                }
                sink.dropped(frames, DropReason::Error);
                continue;
            }
        };
        let active = prompts.load();
        let mean_score = |pair: &prompts::PromptPair, views: &[f32]| {
            let s: f32 = views
                .chunks_exact(dim)
                .map(|e| pair.score(e, logit_scale))
                .sum();
            s / geometry.views as f32
        };
        let scored = frames
            .into_iter()
            .zip(embeds.chunks_exact(dim * geometry.views))
            .map(|(frame, views)| ScoredFrame {
                score: mean_score(&active.quality, views),
                attributes: active
                    .attributes
                    .iter()
                    .map(|(_, p)| mean_score(p, views))
                    .collect(),
                embedding: if geometry.views == 1 {
                    views.to_vec()
                } else {
                    mean_embedding(views, dim)
                },
                prompt_version: active.version,
                frame,
            })
            .collect();
        sink.publish(scored, &active);
    }
}
