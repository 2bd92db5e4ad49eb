//! The daemon: wires ingest, the scoring engine, per-stream state and HTTP together,
//! and owns the ordered shutdown (sources -> queue -> partial batch -> model -> HTTP).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::{Settings, StreamSettings, Views};
use crate::frame::{Frame, ScoredFrame};
use crate::http::{ApiToken, AppState, router};
use crate::ingest::supervisor::{Backoff, Supervision, supervise};
use crate::ingest::{Handoff, PipelineSpec};
use crate::labels::{LabelStore, Provenance};
use crate::metrics::{DropReason, Metrics};
use crate::score::bundle::Bundle;
use crate::score::model::{ModelOptions, VisualModel};
use crate::score::preprocess::Normaliser;
use crate::score::prompt_store::{PromptDir, PromptManager};
use crate::score::prompts::PromptSet;
use crate::score::{EngineParts, ScoreSink, ScoringEngine};
use crate::state::StreamState;

/// A start-up failure that should exit with code 2 (bad configuration or model files).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartupError(pub String);

/// Publishes scores into per-stream state.
pub struct DaemonSink {
    streams: Arc<Vec<Arc<StreamState>>>,
    metrics: Arc<Metrics>,
}

impl ScoreSink for DaemonSink {
    fn publish(&self, frames: Vec<ScoredFrame>, prompts: &PromptSet) {
        let names: Vec<String> = prompts.attributes.iter().map(|(n, _)| n.clone()).collect();
        for sf in frames {
            let latency = sf.frame.arrived.elapsed().as_secs_f64();
            if let Some(st) = self.streams.get(sf.frame.stream) {
                st.publish(sf, &names);
            }
            self.metrics.frame_latency.observe(latency);
        }
    }

    fn dropped(&self, frames: Vec<Frame>, reason: DropReason) {
        for f in frames {
            if let Some(st) = self.streams.get(f.stream) {
                st.metrics.dropped(reason, 1);
            }
        }
    }
}

/// The loaded model side, shared by `run` and `scan`.
pub struct LoadedModel {
    /// The verified bundle.
    pub bundle: Bundle,
    /// The encoder.
    pub model: VisualModel,
    /// The active prompt set.
    pub prompts: PromptSet,
}

/// Opens the bundle, loads its prompt set and the encoder. Errors name the file.
pub fn load_model(settings: &Settings) -> Result<LoadedModel, StartupError> {
    let bundle = Bundle::open(&settings.model.bundle).map_err(|e| StartupError(e.to_string()))?;
    let dim = bundle.manifest.embed_dim;
    let prompts =
        PromptSet::load(&bundle.prompts_path(), dim).map_err(|e| StartupError(e.to_string()))?;
    let opts = ModelOptions {
        execution: settings.model.execution.clone(),
        intra_threads: settings.model.intra_threads,
        onnxruntime_lib: settings.model.onnxruntime_lib.clone(),
    };
    let model = VisualModel::load(&bundle.visual_path(), dim, &opts)
        .map_err(|e| StartupError(e.to_string()))?;
    for f in &model.failures {
        tracing::warn!(provider = f.provider.name(), reason = %f.reason, "Execution provider unavailable");
    }
    tracing::info!(
        bundle = %bundle.dir.display(),
        execution = model.provider.name(),
        embed_dim = dim,
        prompt_version = prompts.version,
        "Model loaded"
    );
    Ok(LoadedModel {
        bundle,
        model,
        prompts,
    })
}

/// What the daemon keeps on disk besides the model: the API token and the label store.
pub struct DaemonFiles {
    /// Bearer token for write routes.
    pub api_token: ApiToken,
    /// The label store.
    pub labels: LabelStore,
}

/// Reads (or creates) `server.api_token_file` and opens (or creates) `labels.db`.
/// Errors name the file.
pub fn open_files(settings: &Settings) -> Result<DaemonFiles, StartupError> {
    let api_token = ApiToken::load_or_create(&settings.server.api_token_file)
        .map_err(|e| StartupError(format!("server.api_token_file: {e}")))?;
    let labels = LabelStore::open(&settings.labels_db)
        .map_err(|e| StartupError(format!("labels.db: {e}")))?;
    tracing::info!(
        path = %labels.path().display(),
        run_id = labels.run_id(),
        "Label store open"
    );
    Ok(DaemonFiles { api_token, labels })
}

/// Which encoder computed the embeddings labels record (the bundle's `visual.onnx`).
pub fn provenance(bundle: &Bundle) -> Provenance {
    Provenance {
        bundle: bundle.manifest.name.clone(),
        model_sha256: bundle
            .manifest
            .files
            .get("visual.onnx")
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default(),
    }
}

/// The pipeline description for a configured stream.
pub fn pipeline_spec(s: &StreamSettings, bundle: &Bundle, views: Views) -> PipelineSpec {
    PipelineSpec {
        source: s.source.clone(),
        sample_fps: s.sample_fps,
        realtime: s.realtime,
        input_size: bundle.manifest.input.size,
        resize: bundle.manifest.input.resize,
        views,
    }
}

/// Runs the daemon until `shutdown` is cancelled; `bound` is told the HTTP address.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    crate::ingest::pipeline::init()?;
    let metrics = Arc::new(Metrics::new());
    let s2 = settings.clone();
    let files = tokio::task::spawn_blocking(move || open_files(&s2)).await??;
    let s2 = settings.clone();
    let loaded = tokio::task::spawn_blocking(move || load_model(&s2)).await??;
    let LoadedModel {
        bundle,
        model,
        prompts,
    } = loaded;
    metrics.set_build_info(model.provider.name());
    for f in &model.failures {
        metrics
            .provider_failures
            .with_label_values(&[f.provider.name()])
            .inc();
    }
    metrics.prompt_version.set(prompts.version as i64);
    let prompts = Arc::new(ArcSwap::from_pointee(prompts));
    let prompt_manager = Arc::new(PromptManager::new(
        PromptDir::new(&settings.model.prompts_dir),
        bundle.prompts_path(),
        bundle.manifest.embed_dim,
        prompts.clone(),
        Some(metrics.clone()),
    ));
    {
        // A promoted set from an earlier run; if it is bad, the bundle's set is used.
        let m = prompt_manager.clone();
        let _ = tokio::task::spawn_blocking(move || m.reload()).await?;
    }
    let model_loaded = Arc::new(AtomicBool::new(true));

    let streams: Arc<Vec<Arc<StreamState>>> = Arc::new(
        settings
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let source = match &s.source {
                    crate::config::Source::Uri(u) => u.as_str(),
                    crate::config::Source::Pipeline(p) => p.as_str(),
                };
                Arc::new(StreamState::new(
                    i,
                    &s.id,
                    source,
                    metrics.stream(&s.id),
                    &settings.qc,
                    settings.recent_frames.get(),
                ))
            })
            .collect(),
    );

    let on_drop = {
        let streams = streams.clone();
        Arc::new(move |f: &Frame| {
            if let Some(st) = streams.get(f.stream) {
                st.metrics.dropped(DropReason::QueueFull, 1);
            }
        })
    };
    let (handoff, rx) = Handoff::new(
        settings.scorer.queue_capacity.get(),
        settings.scorer.when_full,
        on_drop,
    );
    let normaliser = Normaliser::new(&bundle.manifest.input, settings.scorer.views);
    let engine = ScoringEngine::start(
        rx,
        EngineParts {
            model,
            normaliser: normaliser.clone(),
            prompts: prompts.clone(),
            logit_scale: bundle.manifest.logit_scale,
            scorer: settings.scorer.clone(),
            sink: Arc::new(DaemonSink {
                streams: streams.clone(),
                metrics: metrics.clone(),
            }),
            metrics: Some(metrics.clone()),
        },
    );

    let app = router(AppState {
        streams: streams.clone(),
        metrics: metrics.clone(),
        prompts: prompts.clone(),
        model_loaded,
        normaliser: Arc::new(normaliser),
        labels: files.labels,
        api_token: files.api_token,
        prompt_manager: prompt_manager.clone(),
        provenance: Arc::new(provenance(&bundle)),
        adapt_min_labels: settings.adapt.min_labels,
    });
    let listener = tokio::net::TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("server.listen = {}: cannot bind", settings.server.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "HTTP listening");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    let http_stop = CancellationToken::new();
    let http = {
        let stop = http_stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };

    let supervisors: Vec<_> = settings
        .streams
        .iter()
        .zip(streams.iter())
        .map(|(s, st)| {
            let sup = Supervision {
                spec: pipeline_spec(s, &bundle, settings.scorer.views),
                stall_timeout: settings.qc.stall_timeout,
                backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
                handoff: handoff.clone(),
            };
            let (st, token) = (st.clone(), shutdown.clone());
            std::thread::Builder::new()
                .name(format!("ingest-{}", s.id))
                .spawn(move || supervise(st, sup, token))
                .expect("spawn supervisor thread")
        })
        .collect();
    drop(handoff);

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let watchdog = tokio::spawn(watchdog_task(shutdown.clone()));
    let prompt_watch = tokio::spawn(prompt_watch_task(prompt_manager, shutdown.clone()));
    tracing::info!(streams = streams.len(), "Running");

    shutdown.cancelled().await;
    let t0 = Instant::now();
    tokio::task::spawn_blocking(move || {
        for h in supervisors {
            let _ = h.join();
        }
        engine.join();
    })
    .await?;
    tracing::info!(
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "Sources stopped, queue drained"
    );
    watchdog.abort();
    prompt_watch.abort();
    http_stop.cancel();
    http.await??;
    tracing::info!("Stopped");
    Ok(())
}

/// Notices a prompt set promoted by `streamiq-adapt` (the `active` file changed) and
/// hot-swaps it.
async fn prompt_watch_task(manager: Arc<PromptManager>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !shutdown.is_cancelled() {
        tick.tick().await;
        let m = manager.clone();
        let _ = tokio::task::spawn_blocking(move || m.poll()).await;
    }
}

/// Pings the systemd watchdog while the process is alive and not shutting down.
async fn watchdog_task(shutdown: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    while !shutdown.is_cancelled() {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        tokio::time::sleep(period).await;
    }
}
