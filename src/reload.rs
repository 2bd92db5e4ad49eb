//! Configuration reload on SIGHUP (`systemctl reload streamiq`): the file is read and
//! validated again; if it is valid, the stream registry is brought in line with its
//! `[[streams]]` (new streams start, changed ones restart, removed ones stop, the rest
//! are not touched and keep counting). An invalid file is refused and logged, and
//! nothing changes. Sections the running daemon cannot change in place (`[server]`,
//! `[model]`, `[scorer]`, `[qc]`, `[labels]`) are reported as needing a restart;
//! `[adapt]` is read by the sidecar at each round. The outcome is exported as
//! `streamiq_config_last_reload_successful` and
//! `streamiq_config_last_reload_success_timestamp_seconds`, as Prometheus does.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Settings};
use crate::metrics::Metrics;
use crate::registry::{ApplyReport, RegistryError, StreamRegistry};

/// Why a reload changed nothing (or, for a stream that could not start, not all).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file is invalid; nothing changed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new file lists no stream; nothing changed.
    #[error("{0}: streams: configure at least one [[streams]]")]
    NoStreams(String),
    /// A stream could not be started or stopped.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Stream changes.
    pub streams: ApplyReport,
    /// Sections that changed but need a restart to take effect.
    pub needs_restart: Vec<&'static str>,
}

/// Re-reads one configuration file into the running daemon.
pub struct Reloader {
    path: PathBuf,
    current: Mutex<Settings>,
    registry: Arc<StreamRegistry>,
    metrics: Arc<Metrics>,
    runtime: Arc<crate::runtime_streams::RuntimeStreams>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Reloader {
    /// A reloader for the daemon started from `path` with `settings`; records the start
    /// as the last successful load.
    pub fn new(
        path: PathBuf,
        settings: Settings,
        registry: Arc<StreamRegistry>,
        metrics: Arc<Metrics>,
        runtime: Arc<crate::runtime_streams::RuntimeStreams>,
    ) -> Self {
        metrics.config_reload_successful.set(1);
        metrics.config_reload_success_time.set(unix_now());
        Self {
            path,
            current: Mutex::new(settings),
            registry,
            metrics,
            runtime,
        }
    }

    /// Reads, validates and applies the file (blocking: pipelines are stopped and
    /// started). Logs and exports the outcome.
    pub fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        let result = self.try_reload();
        match &result {
            Ok(outcome) => {
                self.metrics.config_reload_successful.set(1);
                self.metrics.config_reload_success_time.set(unix_now());
                let r = &outcome.streams;
                tracing::info!(
                    path = %self.path.display(),
                    added = ?r.added,
                    restarted = ?r.restarted,
                    removed = ?r.removed,
                    unchanged = r.unchanged.len(),
                    "Configuration reloaded"
                );
                if !outcome.needs_restart.is_empty() {
                    tracing::warn!(
                        sections = ?outcome.needs_restart,
                        "Changed sections take effect only after a restart"
                    );
                }
            }
            Err(e) => {
                self.metrics.config_reload_successful.set(0);
                let error = crate::redact::redact(&e.to_string());
                tracing::error!(path = %self.path.display(), %error, "Configuration reload refused; nothing changed");
            }
        }
        result
    }

    fn try_reload(&self) -> Result<ReloadOutcome, ReloadError> {
        let new = Config::load(&self.path)?.validate()?;
        if new.streams.is_empty() {
            return Err(ReloadError::NoStreams(self.path.display().to_string()));
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        // The streams added at run time stay: the running set is the file's plus them.
        // The replica set changes only with a restart (a StatefulSet scales by
        // restarting pods): the streams are sharded as at the start.
        let mine = current.cluster.mine(&new.streams);
        let all = self.runtime.combine(&mine)?;
        let streams = self.registry.apply(&all)?;
        let old = &*current;
        let needs_restart = [
            ("server", old.server != new.server),
            ("model", old.model != new.model),
            ("scorer", old.scorer != new.scorer),
            ("qc", old.qc != new.qc),
            (
                "cluster",
                old.cluster != new.cluster
                    || old.follow != new.follow
                    || old.cluster_primary != new.cluster_primary,
            ),
            (
                "labels",
                old.labels_db != new.labels_db || old.recent_frames != new.recent_frames,
            ),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect();
        // What runs now: the new streams, and the old values of what needs a restart.
        self.metrics
            .cluster_streams_elsewhere
            .set((new.streams.len() - mine.len()) as i64);
        current.streams = new.streams;
        current.adapt = new.adapt;
        Ok(ReloadOutcome {
            streams,
            needs_restart,
        })
    }
}

/// Reloads on every SIGHUP until shutdown.
pub async fn sighup_task(reloader: Arc<Reloader>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("Cannot install the SIGHUP handler; configuration reload is off");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        tracing::info!(signal = "SIGHUP", "Reloading the configuration");
        let r = reloader.clone();
        let _ = tokio::task::spawn_blocking(move || r.reload()).await;
    }
}
