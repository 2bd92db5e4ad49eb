//! The daemon: wires ingest, the scoring engine, per-stream state and HTTP together,
//! and owns the ordered shutdown (sources -> queue -> partial batch -> model -> HTTP).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::error::Error;
use crate::http::{ApiToken, AppState, router};
use crate::labels::{LabelStore, Provenance};
use crate::metrics::Metrics;
use crate::registry::{StreamContext, StreamRegistry, StreamSink, StreamSlots};
use crate::reload::{Reloader, sighup_task};
use crate::score::bundle::Bundle;
use crate::score::prompt_store::{PromptDir, PromptManager};
use crate::score::{Engine, EngineHealth, LoadedModel};

/// What the daemon keeps on disk besides the model: the API token and the label store.
pub struct DaemonFiles {
    /// Bearer token for write routes.
    pub api_token: ApiToken,
    /// The label store.
    pub labels: LabelStore,
}

/// Reads (or creates) `server.api_token_file` and opens (or creates) `labels.db`.
/// Errors name the file.
pub fn open_files(settings: &Settings) -> Result<DaemonFiles, Error> {
    let api_token =
        ApiToken::load_or_create(&settings.server.api_token_file).map_err(Error::ApiToken)?;
    let labels = LabelStore::open(&settings.labels_db)
        .map_err(Error::Labels)?
        .with_max_labels(settings.label_limits.max_labels.get());
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

/// How the daemon is run besides its settings.
#[derive(Default)]
pub struct RunOptions {
    /// The file the settings came from: SIGHUP re-reads it ([`crate::reload`]). Without
    /// it, SIGHUP is not handled.
    pub config_path: Option<PathBuf>,
    /// Told the HTTP address once it is bound (port 0 in tests).
    pub bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
}

/// Runs the daemon until `shutdown` is cancelled; `bound` is told the HTTP address.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), Error> {
    let opts = RunOptions {
        config_path: None,
        bound,
    };
    run_with(settings, opts, shutdown).await
}

/// Runs the daemon until `shutdown` is cancelled, with [`RunOptions`].
pub async fn run_with(
    settings: Settings,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let RunOptions { config_path, bound } = opts;
    crate::ingest::pipeline::init()?;
    let metrics = Arc::new(Metrics::new());
    let s2 = settings.clone();
    let files = blocking("opening state files", move || open_files(&s2)).await??;
    let (model_settings, backend) = (settings.model.clone(), settings.scorer.backend.clone());
    let loaded: LoadedModel = blocking("loading the model", move || {
        crate::score::load(&model_settings, &backend)
    })
    .await??;
    let (major, minor, micro, _) = gstreamer::version();
    metrics.set_build_info(
        &crate::score::model::onnxruntime_version(settings.model.onnxruntime_lib.as_deref()),
        &format!("{major}.{minor}.{micro}"),
        &loaded.model.execution(),
    );
    for f in loaded.model.fallbacks() {
        metrics
            .provider_failures
            .with_label_values(&[f.from.as_str()])
            .inc();
    }
    metrics.prompt_version.set(loaded.prompts.version as i64);
    metrics.set_cluster(settings.cluster);
    let mine = settings.cluster.mine(&settings.streams);
    let elsewhere = settings.streams.len() - mine.len();
    metrics.cluster_streams_elsewhere.set(elsewhere as i64);
    if settings.cluster.is_sharded() {
        tracing::info!(
            replica = settings.cluster.replica,
            replicas = settings.cluster.replicas.get(),
            watched = settings.streams.len() - elsewhere,
            elsewhere,
            "Sharding the configured streams"
        );
    }
    let bundle = loaded.bundle.clone();
    let provenance = provenance(&bundle);
    let prompts = Arc::new(ArcSwap::from_pointee(loaded.prompts.clone()));
    let prompt_manager = Arc::new(PromptManager::new(
        PromptDir::new(&settings.model.prompts_dir),
        bundle.prompts_path(),
        bundle.manifest.embed_dim,
        &provenance.model_sha256,
        prompts.clone(),
        Some(metrics.clone()),
    ));
    {
        // The set promoted in an earlier run. One that cannot be used stops the start
        // with an error naming it: scoring with another set than the operator chose
        // would go unnoticed (roll back or remove `active` to start from the bundle's).
        // One adapted for another visual tower (a model upgrade) cannot be used with
        // this model at all: the bundle's own set scores, loudly (PromptManager::start).
        let m = prompt_manager.clone();
        blocking("loading the active prompt set", move || m.start())
            .await?
            .map_err(Error::PromptSet)?;
    }
    let incidents = if settings.incidents.max_count > 0 {
        let store = crate::incidents::IncidentStore::open(
            settings.incidents.clone(),
            provenance.clone(),
            files.labels.run_id().to_string(),
            metrics.clone(),
        )
        .map_err(|e| {
            Error::runtime(
                "opening labels.incidents_dir",
                format!("{}: {e}", settings.incidents.dir.display()),
            )
        })?;
        Some(store)
    } else {
        None
    };
    let slots = Arc::new(StreamSlots::default());
    let engine = Engine::start(
        loaded,
        prompts.clone(),
        &settings.scorer,
        Arc::new(StreamSink::new(slots.clone(), metrics.clone())),
        metrics.clone(),
    )
    .map_err(|e| Error::runtime("starting the scoring threads", e))?;
    let streams = Arc::new(StreamRegistry::new(
        StreamContext {
            metrics: metrics.clone(),
            qc: settings.qc.clone(),
            recent_frames: settings.recent_frames.get(),
            input_size: bundle.manifest.input.size,
            resize: bundle.manifest.input.resize,
            views: settings.scorer.views,
            shutdown: shutdown.clone(),
            incidents: incidents.clone(),
        },
        slots,
        engine.handoff(),
    ));

    // Each stream starts on its own supervisor thread, before HTTP answers, so the
    // API lists every configured stream from its first request. If one cannot be
    // started, the ones that did are stopped in order and the failure is reported.
    let runtime =
        match crate::runtime_streams::RuntimeStreams::load(&settings.server.runtime_streams)
            .and_then(|r| r.combine(&mine).map(|all| (r, all)))
        {
            Ok(both) => both,
            Err(e) => {
                stop_engine(&streams, engine).await;
                return Err(Error::runtime("reading server.runtime_streams", e));
            }
        };
    let (runtime, all_streams) = (Arc::new(runtime.0), runtime.1);
    let started = {
        let (streams, list) = (streams.clone(), all_streams);
        blocking("starting the streams", move || streams.apply(&list)).await?
    };
    if let Err(e) = started {
        stop_engine(&streams, engine).await;
        return Err(Error::runtime("starting the streams", e));
    }

    let follower = match settings.follow.clone() {
        None => None,
        // The bundle's own set is in its manifest, checked when the bundle was opened.
        Some(follow) => Some(crate::follower::Follower::new(
            follow,
            settings.cluster.replica,
            files.labels.clone(),
            prompt_manager.clone(),
            bundle.manifest.files["prompts.safetensors"].to_ascii_lowercase(),
            metrics.register_follower(),
        )),
    };
    let hosts =
        crate::http::host::HostPolicy::new(&settings.server.allowed_hosts, settings.server.listen);
    if let Some(w) = hosts.warning(settings.server.listen) {
        tracing::warn!(listen = %settings.server.listen, "{w}");
    }
    let app = router(AppState {
        streams: streams.clone(),
        metrics: metrics.clone(),
        prompts: prompts.clone(),
        engine: engine.health(),
        normaliser: Arc::new(engine.normaliser().clone()),
        labels: files.labels,
        api_token: files.api_token,
        prompt_manager: prompt_manager.clone(),
        provenance: Arc::new(provenance),
        adapt_min_labels: settings.adapt.min_labels,
        label_rate: Arc::new(crate::http::label_api::RateLimit::per_minute(
            settings.label_limits.max_per_minute,
        )),
        hosts: Arc::new(hosts),
        incidents,
        runtime_streams: runtime.clone(),
        cluster: settings.cluster,
        follower: follower.clone(),
        cluster_primary: settings.cluster_primary,
    });
    let listener = match tokio::net::TcpListener::bind(settings.server.listen).await {
        Ok(l) => l,
        Err(source) => {
            stop_engine(&streams, engine).await;
            return Err(Error::Bind {
                addr: settings.server.listen,
                source,
            });
        }
    };
    let addr = listener
        .local_addr()
        .map_err(|e| Error::runtime("HTTP listener", e))?;
    tracing::info!(%addr, "HTTP listening");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(crate::http::serve::serve(
        listener,
        app,
        settings.server.limits,
        metrics.clone(),
        http_stop.clone(),
    ));

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let watchdog = tokio::spawn(watchdog_task(
        engine.health(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let reload = config_path.map(|path| {
        let reloader = Arc::new(Reloader::new(
            path,
            settings.clone(),
            streams.clone(),
            metrics.clone(),
            runtime.clone(),
        ));
        tokio::spawn(sighup_task(reloader, shutdown.clone()))
    });
    let prompt_watch = tokio::spawn(prompt_watch_task(prompt_manager, shutdown.clone()));
    let follower = follower.map(|f| tokio::spawn(f.run(shutdown.clone())));
    tracing::info!(streams = streams.len(), "Running");

    shutdown.cancelled().await;
    let t0 = Instant::now();
    let registry = streams.clone();
    tokio::task::spawn_blocking(move || {
        registry.shutdown();
        engine.stop();
    })
    .await
    .map_err(|e| Error::runtime("stopping sources and the scoring threads", e))?;
    tracing::info!(
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "Sources stopped, queue drained"
    );
    watchdog.abort();
    prompt_watch.abort();
    if let Some(task) = follower {
        task.abort();
    }
    if let Some(task) = reload {
        task.abort();
    }
    http_stop.cancel();
    http.await
        .map_err(|e| Error::runtime("the HTTP server task", e))?;
    tracing::info!("Stopped");
    Ok(())
}

/// Stops every stream and then the engine (a start-up failure after both started).
async fn stop_engine(streams: &Arc<StreamRegistry>, engine: Engine) {
    let streams = streams.clone();
    let _ = blocking("stopping the streams", move || {
        streams.shutdown();
        engine.stop();
    })
    .await;
}

/// Runs blocking start-up work (file and model loading) off the async threads.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::runtime(what, e))
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

/// Pings the systemd watchdog while the scoring engine is healthy (its model thread
/// runs and makes progress when frames wait; see [`EngineHealth::is_healthy`]): a hung
/// or dead engine stops the pings and systemd restarts the daemon. Offline cameras do
/// not count: a stream that is down is an alert, not a restart.
async fn watchdog_task(
    health: Arc<EngineHealth>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    while !shutdown.is_cancelled() {
        let depth = metrics.queue_depth.get().max(0) as usize;
        if health.is_healthy(depth) {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!(
                queue_depth = depth,
                "Scoring engine stuck or stopped; not pinging the watchdog"
            );
        }
        tokio::time::sleep(period).await;
    }
}
