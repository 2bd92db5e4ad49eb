//! Decoded-frame-to-score throughput and latency through the daemon's own scoring path
//! (`streamiq bench-engine`, run by `scripts/bench_gpu.sh`): synthetic RGB frames at the
//! working size ingest delivers go into the [`Engine`]'s queue as an appsink hands them
//! over, and are preprocessed, batched, copied to the device, embedded and scored exactly
//! as a stream's frames are. No GStreamer pipeline runs, so decoding is not measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::{Engine, ScoreSink};
use crate::config::{Backend, Settings};
use crate::frame::{Frame, RgbImage, ScoredFrame, next_frame_id};
use crate::metrics::{DropReason, Metrics};
use crate::score::prompts::PromptSet;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Frames scored before timing starts (warms up kernels and allocators).
    pub warmup: usize,
    /// Frames timed for throughput, pushed as fast as the queue takes them.
    pub frames: usize,
    /// Rounds of one full batch each, for latency: the batch is queued at once and the
    /// next is queued only once it is scored (no queueing behind other batches).
    pub latency_rounds: usize,
    /// Frame size as ingest delivers it (the working size: 398x224 for a 16:9 source
    /// and a 224-px model with `global` views).
    pub width: usize,
    /// Frame height.
    pub height: usize,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Frames measured.
    pub frames: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

/// One measurement, printed as a JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The bundle's name.
    pub bundle: String,
    /// Its architecture.
    pub architecture: String,
    /// `scorer.backend`.
    pub backend: String,
    /// `streamiq_build_info{execution}`.
    pub execution: String,
    /// `fp32` or `fp16`.
    pub precision: String,
    /// `scorer.max_batch` (model inputs per call; frames with `global` views).
    pub batch: usize,
    /// Frame size.
    pub frame: String,
    /// Frames timed.
    pub frames: usize,
    /// Seconds they took.
    pub seconds: f64,
    /// Frames scored per second.
    pub frames_per_s: f64,
    /// Mean model call in milliseconds over the timed frames.
    pub inference_ms: f64,
    /// Frame-to-score latency of whole batches, if measured.
    pub latency: Option<Latency>,
}

/// Counts scored frames and records their frame-to-score latency.
#[derive(Default)]
struct BenchSink {
    scored: AtomicU64,
    lost: AtomicU64,
    latencies: Mutex<Vec<f64>>,
    progress: Condvar,
}

impl ScoreSink for BenchSink {
    fn publish(&self, frames: Vec<ScoredFrame>, _prompts: &PromptSet) {
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        l.extend(
            frames
                .iter()
                .map(|f| f.frame.arrived.elapsed().as_secs_f64()),
        );
        self.scored.fetch_add(frames.len() as u64, Ordering::SeqCst);
        self.progress.notify_all();
    }

    fn dropped(&self, frames: &[Frame], _reason: DropReason) {
        self.lost.fetch_add(frames.len() as u64, Ordering::SeqCst);
        self.progress.notify_all();
    }
}

impl BenchSink {
    /// Waits until `n` frames are scored or lost in all (a minute at most per call).
    fn wait_for(&self, n: u64) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (scored, lost) = (
                self.scored.load(Ordering::SeqCst),
                self.lost.load(Ordering::SeqCst),
            );
            if lost > 0 {
                return Err(format!("{lost} frames were not scored (the model failed)"));
            }
            if scored >= n {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{scored} of {n} frames scored after a minute"));
            }
            l = self
                .progress
                .wait_timeout(l, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn take_latencies(&self) -> Vec<f64> {
        std::mem::take(&mut *self.latencies.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Seeded noise pictures of the frame size (a few, reused: the pixels' content does
/// not change the work).
fn pictures(width: usize, height: usize) -> Vec<Arc<RgbImage>> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..8)
        .map(|_| {
            let data = (0..width * height * 3).map(|_| rng.u8(..)).collect();
            Arc::new(RgbImage::from_packed(width, height, data))
        })
        .collect()
}

fn frame(image: &Arc<RgbImage>) -> Frame {
    Frame {
        id: next_frame_id(),
        stream: 0,
        pts: None,
        captured: SystemTime::now(),
        arrived: Instant::now(),
        duration: None,
        image: image.clone(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Loads `settings`' model with its backend and measures throughput at
/// `scorer.max_batch`, then (with `latency_rounds`) batch latency.
pub fn bench(settings: &Settings, opts: &BenchOptions) -> Result<BenchReport, crate::Error> {
    let loaded = super::load(&settings.model, &settings.scorer.backend)?;
    let execution = loaded.model.execution();
    let manifest = loaded.bundle.manifest.clone();
    let prompts = Arc::new(ArcSwap::from_pointee(loaded.prompts.clone()));
    let sink = Arc::new(BenchSink::default());
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::start(
        loaded,
        prompts,
        &settings.scorer,
        sink.clone(),
        metrics.clone(),
    )
    .map_err(|e| crate::Error::runtime("starting the engine", e))?;
    let handoff = engine.handoff();
    let pics = pictures(opts.width, opts.height);
    let batch = settings.scorer.max_batch.get();
    let failed = |e: String| crate::Error::runtime("bench", e);

    let mut sent = 0u64;
    let mut push = |n: usize| {
        for _ in 0..n {
            handoff.send(frame(&pics[sent as usize % pics.len()]));
            sent += 1;
        }
        sent
    };
    let warm = push(opts.warmup);
    sink.wait_for(warm).map_err(failed)?;
    let (calls0, secs0) = inference_totals(&metrics);
    let t0 = Instant::now();
    let end = push(opts.frames);
    sink.wait_for(end).map_err(failed)?;
    let seconds = t0.elapsed().as_secs_f64();
    let (calls1, secs1) = inference_totals(&metrics);
    sink.take_latencies();

    let mut latency = None;
    if opts.latency_rounds > 0 {
        for _ in 0..opts.latency_rounds {
            let n = push(batch);
            sink.wait_for(n).map_err(failed)?;
        }
        let mut l = sink.take_latencies();
        l.sort_by(f64::total_cmp);
        latency = Some(Latency {
            frames: l.len(),
            p50_ms: 1e3 * percentile(&l, 0.5),
            p99_ms: 1e3 * percentile(&l, 0.99),
            mean_ms: 1e3 * l.iter().sum::<f64>() / l.len().max(1) as f64,
        });
    }
    drop(handoff);
    engine.stop();
    let precision = match &settings.scorer.backend {
        Backend::Torch(t) => t.precision.name(),
        Backend::OnnxRuntime => "fp32",
        // As the server runs it; the views travel as the model declares.
        Backend::Kserve(_) => "remote",
    };
    Ok(BenchReport {
        bundle: manifest.name,
        architecture: manifest.architecture,
        backend: settings.scorer.backend.name().into(),
        // A fall-back to the CPU shows here, as it does in the daemon's metrics.
        precision: if execution == "torch-cpu" {
            "fp32"
        } else {
            precision
        }
        .into(),
        execution,
        batch,
        frame: format!("{}x{}", opts.width, opts.height),
        frames: opts.frames,
        seconds,
        frames_per_s: opts.frames as f64 / seconds,
        inference_ms: 1e3 * (secs1 - secs0) / (calls1 - calls0).max(1) as f64,
        latency,
    })
}

/// Model calls and their summed seconds so far.
fn inference_totals(metrics: &Metrics) -> (u64, f64) {
    let h = &metrics.inference_duration;
    (h.get_sample_count(), h.get_sample_sum())
}
