//! The scoring engine: the frame queue, a batcher thread that groups queued frames and
//! writes them straight into the batch tensor, and a model thread that owns the visual
//! encoder (ONNX Runtime or libtorch) while the next batch is prepared, and hands scores to a
//! [`ScoreSink`]. The daemon and `scan` start it the same way; only their sinks differ.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;

use super::encoder::Encoder;
use super::preprocess::Normaliser;
use super::prompts::{self, PromptPair};
use super::{ActivePrompts, LoadedModel, ScoreSink};
use crate::batch::batching_task;
use crate::config::ScorerSettings;
use crate::frame::{Frame, ScoredFrame};
use crate::ingest::Handoff;
use crate::metrics::{DropReason, Metrics};

/// A batch on its way to the model: frames and their pixels, already normalised.
struct Batch {
    frames: Vec<Frame>,
    pixels: Vec<f32>,
}

/// Liveness of the engine's threads, for `/readyz` and the systemd watchdog: the model
/// thread is up, and when it last finished a model call.
#[derive(Debug, Default)]
pub struct EngineHealth {
    model_running: AtomicBool,
    /// Unix milliseconds of the engine's start.
    started_ms: AtomicU64,
    /// Unix milliseconds of the last finished model call (0 = none yet).
    last_batch_ms: AtomicU64,
}

/// Frames waiting with no model call finished for this long: the engine is stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(60);

impl EngineHealth {
    /// Whether the model thread is running (false before start and after it ended).
    pub fn model_running(&self) -> bool {
        self.model_running.load(Ordering::Relaxed)
    }

    /// Time since the model last finished a call, if it ever did.
    pub fn since_last_batch(&self) -> Option<Duration> {
        let ms = self.last_batch_ms.load(Ordering::Relaxed);
        (ms != 0).then(|| {
            let now = unix_ms();
            Duration::from_millis(now.saturating_sub(ms))
        })
    }

    /// Whether the engine makes progress: the model thread runs, and if frames are
    /// waiting (`queue_depth`), a model call finished within [`STUCK_AFTER`]. Streams
    /// that deliver nothing (cameras offline) do not make the engine unhealthy.
    pub fn is_healthy(&self, queue_depth: usize) -> bool {
        let last = self
            .last_batch_ms
            .load(Ordering::Relaxed)
            .max(self.started_ms.load(Ordering::Relaxed));
        let idle = Duration::from_millis(unix_ms().saturating_sub(last));
        self.model_running() && (queue_depth == 0 || idle < STUCK_AFTER)
    }

    fn batch_done(&self) {
        self.last_batch_ms.store(unix_ms(), Ordering::Relaxed);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Marks the model thread stopped when it ends, also by a panic.
struct RunningGuard(Arc<EngineHealth>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.model_running.store(false, Ordering::Relaxed);
    }
}

/// The frame queue and the batcher and model threads behind it.
pub struct Engine {
    handoff: Handoff,
    normaliser: Normaliser,
    health: Arc<EngineHealth>,
    batcher: JoinHandle<()>,
    model: JoinHandle<()>,
}

impl Engine {
    /// Starts the engine on a loaded model. `prompts` is the prompt set it scores with
    /// (swappable at any time); frames the queue drops and frames a failed model call
    /// loses go to `sink.dropped`, scores to `sink.publish`.
    pub fn start(
        loaded: LoadedModel,
        prompts: ActivePrompts,
        scorer: &ScorerSettings,
        sink: Arc<dyn ScoreSink>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let LoadedModel { bundle, model, .. } = loaded;
        let normaliser = Normaliser::new(&bundle.manifest.input, scorer.views);
        let on_drop = {
            let sink = sink.clone();
            Arc::new(move |f: &Frame| sink.dropped(std::slice::from_ref(f), DropReason::QueueFull))
        };
        let (handoff, rx) = Handoff::new(scorer.queue_capacity.get(), scorer.when_full, on_drop);
        let (btx, brx) = crossbeam_channel::bounded::<Batch>(1);
        let (pool_tx, pool_rx) = crossbeam_channel::bounded::<Vec<f32>>(2);
        let batcher = {
            let (normaliser, metrics) = (normaliser.clone(), metrics.clone());
            let (max_batch, max_wait) = (scorer.max_batch.get(), scorer.max_wait);
            std::thread::Builder::new()
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
                    let depth = |d: usize| metrics.queue_depth.set(d as i64);
                    batching_task(rx, max_batch, max_wait, flush, depth);
                })?
        };
        let health = Arc::new(EngineHealth::default());
        health.started_ms.store(unix_ms(), Ordering::Relaxed);
        health.model_running.store(true, Ordering::Relaxed);
        let task = ModelTask {
            geometry: Geometry {
                size: normaliser.size(),
                views: normaliser.views_per_frame(),
                weights: normaliser.view_weights(),
            },
            logit_scale: bundle.manifest.logit_scale,
            prompts,
            sink,
            metrics,
            health: health.clone(),
        };
        let model = std::thread::Builder::new()
            .name("streamiq-model".into())
            .spawn(move || task.run(model, brx, pool_tx))
            .inspect_err(|_| health.model_running.store(false, Ordering::Relaxed))?;
        Ok(Self {
            handoff,
            normaliser,
            health,
            batcher,
            model,
        })
    }

    /// The queue's sending side, for sources (each holds a clone). The engine stops
    /// once [`Engine::stop`] is called and every clone is dropped.
    pub fn handoff(&self) -> Handoff {
        self.handoff.clone()
    }

    /// The preprocessing the engine applies (also what a frame's thumbnail shows).
    pub fn normaliser(&self) -> &Normaliser {
        &self.normaliser
    }

    /// The engine threads' liveness.
    pub fn health(&self) -> Arc<EngineHealth> {
        self.health.clone()
    }

    /// Scores what is still queued (the last partial batch too) and waits for both
    /// threads; returns once every other holder of the handoff has dropped it.
    pub fn stop(self) {
        drop(self.handoff);
        let _ = self.batcher.join();
        let _ = self.model.join();
    }
}

/// Input side, model inputs per frame and each input's share of the frame's score.
#[derive(Clone)]
struct Geometry {
    size: usize,
    views: usize,
    weights: Vec<f32>,
}

/// Weighted mean of the views' normalised embeddings, normalised again (the frame's
/// embedding).
fn mean_embedding(views: &[f32], weights: &[f32], dim: usize) -> Vec<f32> {
    let mut m = vec![0.0; dim];
    for (v, w) in views.chunks_exact(dim).zip(weights) {
        m.iter_mut().zip(v).for_each(|(a, b)| *a += w * b);
    }
    if !prompts::normalise_in_place(&mut m) {
        m.fill(f32::NAN);
    }
    m
}

/// What the model thread owns besides the session.
struct ModelTask {
    geometry: Geometry,
    logit_scale: f32,
    prompts: ActivePrompts,
    sink: Arc<dyn ScoreSink>,
    metrics: Arc<Metrics>,
    health: Arc<EngineHealth>,
}

impl ModelTask {
    fn run(
        self,
        mut model: Encoder,
        rx: Receiver<Batch>,
        pool: crossbeam_channel::Sender<Vec<f32>>,
    ) {
        let _running = RunningGuard(self.health.clone());
        let mut last_error_log: Option<Instant> = None;
        for Batch { frames, pixels } in rx {
            let n = frames.len() * self.geometry.views;
            let t0 = Instant::now();
            let result = model.embed(&pixels, n, self.geometry.size);
            self.metrics.batch_size.observe(n as f64);
            self.metrics
                .inference_duration
                .observe(t0.elapsed().as_secs_f64());
            self.health.batch_done();
            let _ = pool.try_send(pixels);
            match result {
                Ok(embeds) => self.publish(frames, &embeds, model.embed_dim()),
                Err(e) => {
                    if last_error_log.is_none_or(|t| t.elapsed().as_secs() >= 10) {
                        tracing::error!(error = %e, frames = n, "Inference failed");
                        last_error_log = Some(Instant::now());
                    }
                    self.metrics
                        .inference_errors
                        .with_label_values(&[e.kind()])
                        .inc();
                    self.sink.dropped(&frames, e.drop_reason());
                }
            }
        }
    }

    /// Scores each frame's views with the active prompt set and hands them on. A frame
    /// whose embedding or score is not finite (a model that produced NaN or infinity for
    /// it) is dropped as an error and counted as `inference_errors{kind="non_finite"}`,
    /// so one bad output can never poison a stream's quality window or the label store.
    fn publish(&self, frames: Vec<Frame>, embeds: &[f32], dim: usize) {
        let active = self.prompts.load();
        let (views, weights) = (self.geometry.views, &self.geometry.weights);
        let mean_score = |pair: &PromptPair, embeds: &[f32]| -> f32 {
            embeds
                .chunks_exact(dim)
                .zip(weights)
                .map(|(e, w)| w * pair.score(e, self.logit_scale))
                .sum()
        };
        let mut scored = Vec::with_capacity(frames.len());
        let mut bad = Vec::new();
        for (frame, e) in frames.into_iter().zip(embeds.chunks_exact(dim * views)) {
            let sf = ScoredFrame {
                score: mean_score(&active.quality, e),
                attributes: active
                    .attributes
                    .iter()
                    .map(|(_, p)| mean_score(p, e))
                    .collect(),
                embedding: if views == 1 {
                    e.to_vec()
                } else {
                    mean_embedding(e, weights, dim)
                },
                prompt_version: active.version,
                frame,
            };
            if is_finite(&sf) {
                scored.push(sf);
            } else {
                bad.push(sf.frame);
            }
        }
        if !bad.is_empty() {
            tracing::warn!(
                frames = bad.len(),
                "Model output not finite; frames dropped"
            );
            self.metrics
                .inference_errors
                .with_label_values(&["non_finite"])
                .inc_by(bad.len() as u64);
            self.sink.dropped(&bad, DropReason::Error);
        }
        self.sink.publish(scored, &active);
    }
}

/// Whether a scored frame's score, attributes and embedding are all finite numbers.
fn is_finite(sf: &ScoredFrame) -> bool {
    sf.score.is_finite()
        && sf.attributes.iter().all(|a| a.is_finite())
        && sf.embedding.iter().all(|x| x.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_the_model_thread_and_progress_only_when_frames_wait() {
        let h = EngineHealth::default();
        assert!(!h.is_healthy(0), "no model thread");
        h.model_running.store(true, Ordering::Relaxed);
        let now = unix_ms();
        h.started_ms.store(now, Ordering::Relaxed);
        assert!(h.is_healthy(0) && h.is_healthy(10), "just started");
        let long_ago = now - 2 * STUCK_AFTER.as_millis() as u64;
        h.started_ms.store(long_ago, Ordering::Relaxed);
        h.last_batch_ms.store(long_ago, Ordering::Relaxed);
        assert!(h.is_healthy(0), "no frames waiting: cameras may be offline");
        assert!(
            !h.is_healthy(3),
            "frames waiting, no model call for 2 minutes"
        );
        h.batch_done();
        assert!(h.is_healthy(3));
    }

    #[test]
    fn mean_embedding_of_views_is_normalised_or_nan() {
        let m = mean_embedding(&[1.0, 0.0, 0.0, 1.0], &[0.5, 0.5], 2);
        assert!((m[0] - m[1]).abs() < 1e-6 && (m[0] * m[0] + m[1] * m[1] - 1.0).abs() < 1e-5);
        // Weights tilt the mean: 3:1 towards the first view (atan(1/3), about 18 degrees).
        let m = mean_embedding(&[1.0, 0.0, 0.0, 1.0], &[0.75, 0.25], 2);
        assert!((m[1] / m[0] - 1.0 / 3.0).abs() < 1e-5, "{m:?}");
        assert!(
            mean_embedding(&[1.0, 0.0, -1.0, 0.0], &[0.5, 0.5], 2)
                .iter()
                .all(|x| x.is_nan())
        );
    }
}
