//! One truth in a cluster (`cluster.primary`): a replica that is not the primary sends
//! every label it stores to the primary's `POST /api/v1/labels`, with the frame
//! ([`crate::labels::forward`]), and takes the primary's active prompt set
//! (`GET /api/v1/prompts/active`), checked against its sha256 and validated before it is
//! written, then hot-swapped.
//!
//! ```text
//! operator ─▶ replica POST /api/v1/labels ─▶ label store + outbox (one transaction)
//!                                              │  wake, and every cluster.sync_interval
//!                                              ▼
//!                      primary POST /api/v1/labels {forwarded} ─▶ 201 ─▶ off the outbox
//! primary GET /api/v1/prompts/active (If-None-Match) ─▶ 200 + sha256 ─▶ verify, validate
//!   ─▶ prompts_dir/vNNNN.safetensors (atomic) ─▶ PromptManager::rollback ─▶ scoring
//! ```
//!
//! While the primary does not answer, labels stay queued in the replica's own label
//! store (persisted, so a restart keeps them), up to `cluster.forward_queue_max`; after
//! that new labels are refused with 503 rather than dropped. A label the primary refuses
//! (another model) leaves the queue and stays in the replica's store; it is sent again
//! when the replica restarts. The primary stores a label under the replica's run id, so
//! one sent twice (a reply lost) replaces itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::cluster::Follow;
use crate::labels::LabelStore;
use crate::metrics::FollowerMetrics;
use crate::score::prompt_store::{PromptManager, write_atomic};

/// How long one exchange with the primary may take, connection included.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest reply read from the primary.
const MAX_REPLY: usize = 16 << 20;

/// Labels read from the outbox at a time.
const BATCH: usize = 16;

/// Labels sent in one round at most; a longer queue goes on in the next round, right
/// after, with the prompt set asked for in between.
const MAX_PER_ROUND: usize = 256;

/// While rounds keep failing, one is logged as a warning this often (the others at
/// debug level).
const WARN_EVERY: Duration = Duration::from_secs(300);

/// Largest prompt-set version taken from a primary.
const MAX_VERSION: u64 = 1_000_000_000;

/// Response header: the version of the prompt set served.
pub const VERSION_HEADER: &str = "x-streamiq-prompt-version";

/// Response header: the sha256 (hex) of the prompt-set bytes served.
pub const SHA256_HEADER: &str = "x-streamiq-sha256";

/// Response header: which replica (`cluster.replica`) served the prompt set.
pub const REPLICA_HEADER: &str = "x-streamiq-replica";

/// Why an exchange with the primary failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// No answer (refused connection, timeout, broken reply) or a server error.
    #[error("the primary at {url} does not answer: {message}")]
    Unreachable {
        /// `cluster.primary`.
        url: String,
        /// What happened.
        message: String,
    },
    /// It answered with an error status.
    #[error("the primary at {url} answered {status} to {what}: {message}")]
    Refused {
        /// `cluster.primary`.
        url: String,
        /// The request.
        what: String,
        /// Its status.
        status: StatusCode,
        /// Its body (the error's message), shortened.
        message: String,
        /// The field its error names, if any.
        field: Option<String>,
    },
    /// A prompt set whose bytes do not hash to the sha256 sent with them.
    #[error(
        "the primary at {url} sent prompt set v{version} with sha256 {claimed}, but its bytes hash to {actual}: not used"
    )]
    Checksum {
        /// `cluster.primary`.
        url: String,
        /// The version.
        version: u64,
        /// The sha256 it was sent with.
        claimed: String,
        /// The sha256 of what arrived.
        actual: String,
    },
    /// A prompt set this replica cannot use (another model, a bad file, no room).
    #[error("prompt set v{version} from the primary at {url} is not used: {message}")]
    Rejected {
        /// `cluster.primary`.
        url: String,
        /// The version.
        version: u64,
        /// Why.
        message: String,
    },
    /// This replica's own side failed: its token file, its label store.
    #[error("{0}")]
    Local(String),
}

impl SyncError {
    /// The `kind` label of `streamiq_cluster_sync_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::Refused { status, .. }
                if matches!(*status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) =>
            {
                "unauthorized"
            }
            Self::Refused { .. } => "refused",
            Self::Checksum { .. } => "checksum",
            Self::Rejected { .. } => "rejected",
            Self::Local(_) => "local",
        }
    }

    /// Whether the primary answered as a primary of this cluster that takes this
    /// replica's token: it may still refuse one label or send an unusable set.
    fn primary_answered(&self) -> Option<bool> {
        match self {
            Self::Unreachable { .. } => Some(false),
            Self::Refused { .. } => Some(self.refuses_one_label()),
            Self::Checksum { .. } | Self::Rejected { .. } => Some(true),
            Self::Local(_) => None,
        }
    }

    /// An answer about one label (it cannot be stored there: another model, a bad
    /// field), not about the exchange (token, route, size, not the primary, overload):
    /// the label leaves the queue and the others go on.
    fn refuses_one_label(&self) -> bool {
        match self {
            Self::Refused { status, field, .. } => {
                matches!(
                    *status,
                    StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY
                ) && field.as_deref() == Some("forwarded")
            }
            _ => false,
        }
    }
}

/// The sha256 (hex) of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Aborts the HTTP connection task when the exchange ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A replica's link to the cluster's primary.
pub struct Follower {
    follow: Follow,
    replica: u32,
    store: LabelStore,
    prompts: Arc<PromptManager>,
    /// sha256 of the bundle's own prompt set (version 0).
    bundle_prompts_sha256: String,
    metrics: FollowerMetrics,
    /// Version and sha256 of the prompt set last taken from the primary (or active at
    /// start).
    applied: Mutex<Option<(u64, String)>>,
    /// sha256 of the last set refused here: not fetched again while the primary serves it.
    rejected: Mutex<Option<String>>,
    wake: tokio::sync::Notify,
    /// When a failed round was last logged as a warning (`None` after a good round).
    last_warning: Mutex<Option<std::time::Instant>>,
}

impl Follower {
    /// A follower of `follow` for replica `replica`, queuing in `store`, swapping sets
    /// through `prompts`.
    pub fn new(
        follow: Follow,
        replica: u32,
        store: LabelStore,
        prompts: Arc<PromptManager>,
        bundle_prompts_sha256: String,
        metrics: FollowerMetrics,
    ) -> Arc<Self> {
        let active = prompts.active();
        let applied = std::fs::read(&active.path)
            .ok()
            .map(|b| (active.version, sha256_hex(&b)));
        Arc::new(Self {
            follow,
            replica,
            store,
            prompts,
            bundle_prompts_sha256,
            metrics,
            applied: Mutex::new(applied),
            rejected: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            last_warning: Mutex::new(None),
        })
    }

    /// The configuration it follows.
    pub fn follow(&self) -> &Follow {
        &self.follow
    }

    /// Sends the queued labels now rather than at the next interval.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Syncs at start, when woken and every `cluster.sync_interval`, until `shutdown`.
    /// Labels the primary refused before are queued again first: the cause (another
    /// model, a primary of an older version) may have been fixed.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(
            primary = %self.follow.url,
            interval_s = self.follow.interval.as_secs_f64(),
            queue_max = self.follow.queue_max,
            "Following the cluster's primary: labels are forwarded to it, its prompt set is used"
        );
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.retry_refused()).await {
            Ok(Ok(n)) if n > 0 => {
                tracing::info!(
                    labels = n,
                    "Labels the primary refused before are sent again"
                )
            }
            Ok(Err(e)) => tracing::error!(error = %e, "Refused labels not queued again"),
            _ => {}
        }
        let mut was_up = None;
        loop {
            let (up, more) = self.round().await;
            if was_up != Some(up) && up {
                tracing::info!(primary = %self.follow.url, "The primary answers");
            }
            was_up = Some(up);
            if more {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.follow.interval) => {}
            }
        }
    }

    /// One round: the primary's prompt set, then queued labels (at most
    /// 256). Returns whether the primary answered, and whether labels are
    /// left for another round right away.
    pub async fn round(&self) -> (bool, bool) {
        let prompts = self.sync_prompts().await;
        let labels = match &prompts {
            Err(e) if e.primary_answered() == Some(false) => None,
            _ => Some(self.forward_queued().await),
        };
        let more = matches!(labels, Some(Ok((_, true))));
        let mut answered = None;
        let mut ok = true;
        for e in [prompts.err(), labels.and_then(Result::err)]
            .into_iter()
            .flatten()
        {
            ok = false;
            if let Some(a) = e.primary_answered() {
                answered = Some(answered.unwrap_or(true) && a);
            }
            self.metrics
                .sync_errors
                .with_label_values(&[e.kind()])
                .inc();
            // Once when it starts failing, then every few minutes while it goes on (the
            // counter counts every round).
            let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                *last = Some(std::time::Instant::now());
                tracing::warn!(error = %e, kind = e.kind(), "Sync with the cluster's primary failed");
            } else {
                tracing::debug!(error = %e, kind = e.kind(), "Sync with the cluster's primary failed");
            }
        }
        if ok {
            *self.last_warning.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let answered = answered.unwrap_or(ok || self.metrics.primary_up.get() == 1);
        self.metrics.primary_up.set(i64::from(answered));
        if ok {
            self.metrics
                .last_sync
                .set(crate::state::unix_seconds(std::time::SystemTime::now()));
        }
        self.update_queued().await;
        (answered, more && answered)
    }

    /// [`round`](Self::round), for tests: whether the primary answered.
    pub async fn sync_once(&self) -> bool {
        self.round().await.0
    }

    async fn update_queued(&self) {
        let store = self.store.clone();
        if let Ok(Ok((queued, refused))) =
            tokio::task::spawn_blocking(move || store.outbox_len()).await
        {
            self.metrics.labels_queued.set(queued as i64);
            self.metrics.labels_refused.set(refused as i64);
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        headers: Vec<(header::HeaderName, String)>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), SyncError> {
        let unreachable = |message: String| SyncError::Unreachable {
            url: self.follow.url.clone(),
            message,
        };
        let token = tokio::fs::read_to_string(&self.follow.token_file)
            .await
            .map_err(|e| {
                SyncError::Local(format!(
                    "reading the primary's token from {} (cluster.primary_token_file): {e}",
                    self.follow.token_file.display()
                ))
            })?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.follow.authority)
            .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(
                header::USER_AGENT,
                concat!("streamiq/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SyncError::Local(format!("building the request to the primary: {e}")))?;
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&self.follow.authority)
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.follow.authority))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
            let _conn = AbortOnDrop(tokio::spawn(async move {
                let _ = conn.await;
            }));
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("sending the request: {e}"))?;
            let (parts, body) = resp.into_parts();
            let bytes = Limited::new(body, MAX_REPLY)
                .collect()
                .await
                .map_err(|e| format!("reading the reply: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts.status, parts.headers, bytes))
        };
        let (status, headers, bytes) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no reply within {EXCHANGE_TIMEOUT:?}")))?
            .map_err(unreachable)?;
        if status.is_server_error() {
            return Err(unreachable(format!(
                "{status}: {}",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(300)
                    .collect::<String>()
            )));
        }
        Ok((status, headers, bytes))
    }

    fn refused(&self, what: &str, status: StatusCode, body: &[u8]) -> SyncError {
        let json = serde_json::from_slice::<serde_json::Value>(body).ok();
        let field = json
            .as_ref()
            .and_then(|v| v["field"].as_str().map(str::to_string));
        let message = json
            .as_ref()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
        SyncError::Refused {
            url: self.follow.url.clone(),
            what: what.to_string(),
            status,
            message,
            field,
        }
    }

    /// Sends queued labels, oldest first, at most [`MAX_PER_ROUND`]. A label the
    /// primary refuses ([`SyncError::refuses_one_label`]) leaves the queue with the
    /// reason and the others go on; any other failure ends the round. Returns how many
    /// were stored there, and whether more are queued.
    async fn forward_queued(&self) -> Result<(usize, bool), SyncError> {
        let (mut after, mut sent, mut tried) = (0, 0, 0);
        let mut refused = None;
        let local = |e: String| SyncError::Local(format!("the label store: {e}"));
        loop {
            if tried >= MAX_PER_ROUND {
                return refused.map_or(Ok((sent, true)), Err);
            }
            let store = self.store.clone();
            let batch = tokio::task::spawn_blocking(move || store.outbox(after, BATCH))
                .await
                .map_err(|e| local(e.to_string()))?
                .map_err(|e| local(e.to_string()))?;
            if batch.is_empty() {
                break;
            }
            for q in batch {
                after = q.label.id;
                tried += 1;
                let body = crate::labels::forward::request_body(&q, self.replica);
                let result = self
                    .exchange(
                        Method::POST,
                        "/api/v1/labels",
                        vec![(header::CONTENT_TYPE, "application/json".into())],
                        serde_json::to_vec(&body).expect("a JSON value serialises"),
                    )
                    .await;
                let id = q.label.id;
                let error = match result {
                    Ok((StatusCode::CREATED, _, _)) => {
                        let store = self.store.clone();
                        match tokio::task::spawn_blocking(move || store.delivered(id)).await {
                            Ok(Ok(())) => {
                                self.metrics.labels_forwarded.inc();
                                sent += 1;
                            }
                            // Sent again next round: the primary replaces it.
                            other => {
                                tracing::error!(label = id, result = ?other.map(|r| r.err()), "Forwarded label not taken off the queue")
                            }
                        }
                        continue;
                    }
                    Ok((status, _, reply)) => self.refused("a forwarded label", status, &reply),
                    Err(e) => e,
                };
                let store = self.store.clone();
                let reason = error.to_string();
                if error.refuses_one_label() {
                    tracing::error!(label = id, error = %error, "The primary refused a forwarded label: it stays in this replica's store, out of the queue, until the replica restarts");
                    let _ = tokio::task::spawn_blocking(move || store.refused(id, &reason)).await;
                    refused = Some(error);
                } else {
                    let _ = tokio::task::spawn_blocking(move || store.delivery_failed(id, &reason))
                        .await;
                    return Err(error);
                }
            }
        }
        if sent > 0 {
            tracing::info!(labels = sent, primary = %self.follow.url, "Labels forwarded to the primary");
        }
        refused.map_or(Ok((sent, false)), Err)
    }

    /// Asks the primary for its active prompt set (unless it is the one applied last,
    /// or one refused here) and activates it. Returns the version switched to, if any.
    async fn sync_prompts(&self) -> Result<Option<u64>, SyncError> {
        // The applied set only while it is still the active one: a set activated here
        // by other means (a round run beside a replica by mistake) is replaced.
        let active = self.prompts.active().version;
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|(v, _)| *v == active)
            .map(|(_, sha)| sha);
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let tags: Vec<String> = applied
            .iter()
            .chain(&rejected)
            .map(|sha| format!("\"{sha}\""))
            .collect();
        let headers = if tags.is_empty() {
            Vec::new()
        } else {
            vec![(header::IF_NONE_MATCH, tags.join(", "))]
        };
        let what = "GET /api/v1/prompts/active";
        let (status, headers, bytes) = self
            .exchange(Method::GET, "/api/v1/prompts/active", headers, Vec::new())
            .await?;
        let header_str = |name: &str| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        if status == StatusCode::OK || status == StatusCode::NOT_MODIFIED {
            let replica = header_str(REPLICA_HEADER).and_then(|v| v.parse::<u32>().ok());
            if replica != Some(self.follow.primary_replica) {
                return Err(self.refused(
                    what,
                    status,
                    format!(
                        "it is replica {}, not cluster.primary_replica = {}: cluster.primary \
                         names another daemon",
                        replica.map_or_else(|| "(unknown)".to_string(), |r| r.to_string()),
                        self.follow.primary_replica
                    )
                    .as_bytes(),
                ));
            }
        }
        if status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        if status != StatusCode::OK {
            return Err(self.refused(what, status, &bytes));
        }
        let version = header_str(VERSION_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                self.refused(
                    what,
                    status,
                    format!("no {VERSION_HEADER} header").as_bytes(),
                )
            })?;
        let claimed = header_str(SHA256_HEADER)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let actual = sha256_hex(&bytes);
        if claimed != actual {
            return Err(SyncError::Checksum {
                url: self.follow.url.clone(),
                version,
                claimed,
                actual,
            });
        }
        let rejected = |message: String| {
            *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = Some(actual.clone());
            SyncError::Rejected {
                url: self.follow.url.clone(),
                version,
                message,
            }
        };
        if version > MAX_VERSION {
            return Err(rejected(format!("a version above {MAX_VERSION}")));
        }
        if version == 0 && actual != self.bundle_prompts_sha256 {
            return Err(rejected(format!(
                "it is the primary's bundle's own set (sha256 {actual}), and this replica's \
                 bundle has another (sha256 {}): replicas must run the same model bundle",
                self.bundle_prompts_sha256
            )));
        }
        let prompts = self.prompts.clone();
        let sha = actual.clone();
        tokio::task::spawn_blocking(move || install(&prompts, version, &bytes, &sha))
            .await
            .map_err(|e| rejected(e.to_string()))?
            .map_err(rejected)?;
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, actual.clone()));
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = None;
        tracing::info!(version, sha256 = %actual, primary = %self.follow.url, "Prompt set taken from the primary");
        Ok(Some(version))
    }
}

/// Validates version `v` (`bytes`, sha256 `sha`) as any set is validated (its shape,
/// the visual tower it was made for), then writes it into the prompt directory unless
/// it holds it already, and activates it. Nothing is written for a set that does not
/// validate. A different file under the same version is kept beside it as
/// `vNNNN.safetensors.replaced-UNIXNANOS`.
fn install(prompts: &PromptManager, v: u64, bytes: &[u8], sha: &str) -> Result<(), String> {
    if v > 0 {
        let path = prompts.dir().path(v);
        prompts
            .check_bytes(v, bytes, &path)
            .map_err(|e| e.to_string())?;
        match std::fs::read(&path) {
            Ok(old) if sha256_hex(&old) == sha => {}
            Ok(_) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos();
                let aside = path.with_extension(format!("safetensors.replaced-{stamp}"));
                std::fs::rename(&path, &aside)
                    .map_err(|e| format!("moving {} aside: {e}", path.display()))?;
                tracing::warn!(
                    path = %path.display(),
                    kept = %aside.display(),
                    "A local prompt set had the version the primary sent: kept aside"
                );
                write_atomic(&path, bytes).map_err(|e| e.to_string())?;
            }
            Err(_) => write_atomic(&path, bytes).map_err(|e| e.to_string())?,
        }
    }
    prompts.rollback(v).map(drop).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::prompt_store::PromptDir;
    use crate::score::prompt_store::tests::set_file;

    /// What the stand-in primary serves at `GET /api/v1/prompts/active`: version, bytes
    /// and the sha256 header it sends with them.
    type Served = Arc<Mutex<(u64, Vec<u8>, String)>>;

    /// A server that answers `GET /api/v1/prompts/active` with whatever `served` holds,
    /// checksum right or wrong: the faults a real primary cannot be made to commit.
    async fn stand_in_primary(served: Served) -> std::net::SocketAddr {
        use axum::response::IntoResponse;
        let app = axum::Router::new().route(
            "/api/v1/prompts/active",
            axum::routing::get(move || {
                let (v, bytes, sha) = served.lock().unwrap().clone();
                async move {
                    (
                        [
                            (VERSION_HEADER, v.to_string()),
                            (SHA256_HEADER, sha),
                            (REPLICA_HEADER, "0".to_string()),
                        ],
                        bytes,
                    )
                        .into_response()
                }
            }),
        );
        serve(app).await
    }

    /// Serves `app` on a loopback port.
    async fn serve(app: axum::Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// A follower (replica 1) of the primary at `addr` (replica 0), in `dir`: a bundle
    /// whose own set has no metadata, sets of embedding size 2 for visual tower `aaaa`,
    /// the label store `dir/labels.sqlite`, a token file.
    fn follower_of(
        addr: std::net::SocketAddr,
        dir: &std::path::Path,
    ) -> (
        Arc<Follower>,
        Arc<PromptManager>,
        LabelStore,
        FollowerMetrics,
    ) {
        let bundle_set = dir.join("prompts.safetensors");
        std::fs::write(&bundle_set, set_file(&[])).unwrap();
        let initial = crate::score::prompts::PromptSet::load(&bundle_set, 2).unwrap();
        let manager = Arc::new(PromptManager::new(
            PromptDir::new(dir.join("prompts")),
            bundle_set,
            2,
            "aaaa",
            Arc::new(arc_swap::ArcSwap::from_pointee(initial)),
            None,
        ));
        std::fs::write(dir.join("token"), "t".repeat(32)).unwrap();
        let store = LabelStore::open(&dir.join("labels.sqlite")).unwrap();
        let metrics = crate::metrics::Metrics::new().register_follower();
        let follower = Follower::new(
            Follow {
                url: format!("http://{addr}"),
                authority: addr.to_string(),
                primary_replica: 0,
                token_file: dir.join("token"),
                queue_max: 10,
                interval: Duration::from_secs(1),
            },
            1,
            store.clone(),
            manager.clone(),
            sha256_hex(&set_file(&[])),
            metrics.clone(),
        );
        (follower, manager, store, metrics)
    }

    #[tokio::test]
    async fn prompt_sets_that_fail_their_checksum_or_fit_another_model_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let good = set_file(&[("model_sha256", "aaaa")]);
        let served: Served = Arc::new(Mutex::new((1, good.clone(), sha256_hex(b"other"))));
        let addr = stand_in_primary(served.clone()).await;
        let (follower, manager, _, metrics) = follower_of(addr, dir.path());
        let prompts = manager.dir().clone();
        let errors = |kind: &str| metrics.sync_errors.with_label_values(&[kind]).get();

        // Bytes that do not hash to the sha256 sent with them: not written, not used.
        let e = follower.sync_prompts().await.unwrap_err();
        assert_eq!(e.kind(), "checksum", "{e}");
        assert!(e.to_string().contains(&sha256_hex(b"other")), "{e}");
        assert!(!prompts.path(1).exists());
        assert_eq!(manager.active().version, 0);
        assert!(follower.sync_once().await, "the primary answered");
        assert_eq!(errors("checksum"), 1, "counted by the round");

        // A set adapted for another visual tower: refused naming it, the old set stays.
        let other = set_file(&[("model_sha256", "bbbb")]);
        *served.lock().unwrap() = (1, other.clone(), sha256_hex(&other));
        let e = follower.sync_prompts().await.unwrap_err();
        assert_eq!(e.kind(), "rejected", "{e}");
        assert!(e.to_string().contains("bbbb"), "{e}");
        assert_eq!(manager.active().version, 0);
        assert!(
            !prompts.path(1).exists(),
            "a set that does not validate is not written"
        );
        // A set of this version made here before is kept aside, not overwritten.
        let local = set_file(&[("model_sha256", "aaaa"), ("made", "here")]);
        crate::score::prompt_store::write_atomic(&prompts.path(1), &local).unwrap();

        // Version 0 of another bundle is refused too.
        *served.lock().unwrap() = (0, good.clone(), sha256_hex(&good));
        let e = follower.sync_prompts().await.unwrap_err();
        assert_eq!(e.kind(), "rejected", "{e}");

        // The right bytes: written in place of the local file (kept aside), activated.
        *served.lock().unwrap() = (1, good.clone(), sha256_hex(&good));
        assert_eq!(follower.sync_prompts().await.unwrap(), Some(1));
        assert_eq!(manager.active().version, 1);
        assert_eq!(std::fs::read(prompts.path(1)).unwrap(), good);
        assert_eq!(prompts.active().unwrap(), Some(1));
        let aside = std::fs::read_dir(prompts.dir())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("v0001.safetensors.replaced-"))
            .count();
        assert_eq!(aside, 1);
        assert_eq!(metrics.primary_up.get(), 1);
    }

    #[tokio::test]
    async fn a_label_the_primary_refuses_leaves_the_queue_and_a_refused_token_ends_the_round() {
        use axum::response::IntoResponse;
        let dir = tempfile::tempdir().unwrap();
        // What the stand-in primary answers to every forwarded label.
        let answer: Arc<Mutex<(StatusCode, &'static str)>> =
            Arc::new(Mutex::new((StatusCode::CONFLICT, "forwarded")));
        let a = answer.clone();
        let app = axum::Router::new()
            .route(
                "/api/v1/labels",
                axum::routing::post(move || {
                    let (status, field) = *a.lock().unwrap();
                    async move {
                        (
                            status,
                            axum::Json(serde_json::json!({"error": "no", "field": field})),
                        )
                            .into_response()
                    }
                }),
            )
            .route(
                "/api/v1/prompts/active",
                axum::routing::get(|| async {
                    (
                        StatusCode::NOT_MODIFIED,
                        [(REPLICA_HEADER, "0".to_string())],
                    )
                        .into_response()
                }),
            );
        let (follower, _, store, metrics) = follower_of(serve(app).await, dir.path());
        let label = |frame_id| crate::labels::NewLabel {
            stream: "cam".into(),
            frame_id,
            captured: 1.0,
            pts: None,
            rating: crate::labels::Rating::Mos(3.0),
            labeller: "ann".into(),
            embedding: vec![0.6, 0.8],
            provenance: crate::labels::Provenance {
                bundle: "b".into(),
                model_sha256: "a".repeat(64),
            },
            prompt_version: 0,
            model_score: 0.5,
            thumbnail: vec![0xff, 0xd8],
            frame: None,
        };
        store.insert_queued(&label(1), 10).unwrap();
        store.insert_queued(&label(2), 10).unwrap();
        let errors = |kind: &str| metrics.sync_errors.with_label_values(&[kind]).get();

        // Refused one by one (another model): both leave the queue, the primary is up.
        assert!(follower.sync_once().await);
        assert_eq!(store.outbox_len().unwrap(), (0, 2));
        assert_eq!(
            (metrics.labels_queued.get(), metrics.labels_refused.get()),
            (0, 2)
        );
        assert_eq!(errors("refused"), 1);
        assert_eq!(metrics.primary_up.get(), 1);

        // After a restart they are sent again; now the primary refuses the token: the
        // round ends at the first label, both stay queued, the primary counts as down.
        assert_eq!(store.retry_refused().unwrap(), 2);
        *answer.lock().unwrap() = (StatusCode::UNAUTHORIZED, "authorization");
        assert!(!follower.sync_once().await);
        assert_eq!(store.outbox_len().unwrap(), (2, 0));
        assert_eq!(errors("unauthorized"), 1);
        assert_eq!(metrics.primary_up.get(), 0);

        // "Not the cluster's primary" ends the round too.
        *answer.lock().unwrap() = (StatusCode::CONFLICT, "cluster");
        assert!(!follower.sync_once().await);
        assert_eq!(store.outbox_len().unwrap(), (2, 0));

        // Stored: the queue empties.
        *answer.lock().unwrap() = (StatusCode::CREATED, "");
        assert!(follower.sync_once().await);
        assert_eq!(store.outbox_len().unwrap(), (0, 0));
        assert_eq!(metrics.labels_forwarded.get(), 2);
    }
}
