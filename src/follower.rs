//! One truth in a cluster (`cluster.primary`): a replica that is not the primary sends
//! every label it stores to the primary's `POST /api/v1/labels`, with the frame
//! ([`crate::labels::forward`]), and takes the primary's active prompt set
//! (`GET /api/v1/prompts/active`), checked against its sha256, then hot-swapped.
//!
//! ```text
//! operator ─▶ replica POST /api/v1/labels ─▶ label store + outbox (one transaction)
//!                                              │  wake, and every cluster.sync_interval
//!                                              ▼
//!                      primary POST /api/v1/labels {forwarded} ─▶ 201 ─▶ off the outbox
//! primary GET /api/v1/prompts/active (If-None-Match) ─▶ 200 + sha256 ─▶ verify
//!   ─▶ prompts_dir/vNNNN.safetensors (atomic) ─▶ PromptManager::rollback ─▶ scoring
//! ```
//!
//! While the primary does not answer, labels stay queued in the replica's own label
//! store (persisted, so a restart keeps them), up to `cluster.forward_queue_max`; after
//! that new labels are refused with 503 rather than dropped. The primary stores a label
//! under the replica's run id, so one sent twice (a reply lost) replaces itself.

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

/// Response header: the version of the prompt set served.
pub const VERSION_HEADER: &str = "x-streamiq-prompt-version";

/// Response header: the sha256 (hex) of the prompt-set bytes served.
pub const SHA256_HEADER: &str = "x-streamiq-sha256";

/// Why an exchange with the primary failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// No answer: refused connection, timeout, broken reply.
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
}

impl SyncError {
    /// The `kind` label of `streamiq_cluster_sync_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::Refused { .. } => "refused",
            Self::Checksum { .. } => "checksum",
            Self::Rejected { .. } => "rejected",
        }
    }
}

/// The sha256 (hex) of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
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
    wake: tokio::sync::Notify,
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
            wake: tokio::sync::Notify::new(),
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
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(
            primary = %self.follow.url,
            interval_s = self.follow.interval.as_secs_f64(),
            queue_max = self.follow.queue_max,
            "Following the cluster's primary: labels are forwarded to it, its prompt set is used"
        );
        let mut was_up = None;
        loop {
            let up = self.sync_once().await;
            if was_up != Some(up) && up {
                tracing::info!(primary = %self.follow.url, "The primary answers");
            }
            was_up = Some(up);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.follow.interval) => {}
            }
        }
    }

    /// One round: queued labels to the primary, then its prompt set. Returns whether
    /// the primary answered; failures are logged and counted.
    pub async fn sync_once(&self) -> bool {
        let labels = self.forward_queued().await;
        let prompts = match &labels {
            Err(SyncError::Unreachable { .. }) => None,
            _ => Some(self.sync_prompts().await),
        };
        let (mut ok, mut answered) = (true, true);
        for e in [labels.err(), prompts.and_then(Result::err)]
            .into_iter()
            .flatten()
        {
            ok = false;
            answered &= !matches!(e, SyncError::Unreachable { .. });
            self.metrics
                .sync_errors
                .with_label_values(&[e.kind()])
                .inc();
            tracing::warn!(error = %e, kind = e.kind(), "Sync with the cluster's primary failed");
        }
        self.metrics.primary_up.set(i64::from(answered));
        if ok {
            self.metrics
                .last_sync
                .set(crate::state::unix_seconds(std::time::SystemTime::now()));
        }
        self.update_queued().await;
        answered
    }

    async fn update_queued(&self) {
        let store = self.store.clone();
        if let Ok(Ok(n)) = tokio::task::spawn_blocking(move || store.outbox_len()).await {
            self.metrics.labels_queued.set(n as i64);
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
                unreachable(format!(
                    "reading the primary's token from {}: {e}",
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
            .map_err(|e| unreachable(format!("building the request: {e}")))?;
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&self.follow.authority)
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.follow.authority))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
            let conn = tokio::spawn(conn);
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
            conn.abort();
            Ok::<_, String>((parts.status, parts.headers, bytes))
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no reply within {EXCHANGE_TIMEOUT:?}")))?
            .map_err(unreachable)
    }

    fn refused(&self, what: &str, status: StatusCode, body: &[u8]) -> SyncError {
        let text = String::from_utf8_lossy(body);
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(300).collect());
        SyncError::Refused {
            url: self.follow.url.clone(),
            what: what.to_string(),
            status,
            message,
        }
    }

    /// Sends every queued label, oldest first. A label the primary refuses stays queued
    /// (with the reason) and the others go on; no answer, a refused token or a server
    /// error ends the round.
    async fn forward_queued(&self) -> Result<usize, SyncError> {
        let mut after = 0;
        let mut sent = 0;
        let mut refused = None;
        loop {
            let store = self.store.clone();
            let batch = tokio::task::spawn_blocking(move || store.outbox(after, BATCH))
                .await
                .map_err(|e| self.local_error(e.to_string()))?
                .map_err(|e| self.local_error(e.to_string()))?;
            if batch.is_empty() {
                break;
            }
            for q in batch {
                after = q.label.id;
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
                        let done = tokio::task::spawn_blocking(move || store.delivered(id)).await;
                        if let Ok(Err(e)) = done {
                            tracing::error!(label = id, error = %e, "Forwarded label not taken off the queue");
                        }
                        self.metrics.labels_forwarded.inc();
                        sent += 1;
                        tracing::debug!(label = id, "Label forwarded to the primary");
                        continue;
                    }
                    Ok((status, _, reply)) => self.refused("a forwarded label", status, &reply),
                    Err(e) => e,
                };
                let store = self.store.clone();
                let reason = error.to_string();
                let _ =
                    tokio::task::spawn_blocking(move || store.delivery_failed(id, &reason)).await;
                match &error {
                    SyncError::Refused { status, .. }
                        if status.is_client_error()
                            && !matches!(
                                *status,
                                StatusCode::UNAUTHORIZED
                                    | StatusCode::FORBIDDEN
                                    | StatusCode::MISDIRECTED_REQUEST
                                    | StatusCode::REQUEST_TIMEOUT
                                    | StatusCode::TOO_MANY_REQUESTS
                            ) =>
                    {
                        tracing::error!(label = id, error = %error, "The primary refused a forwarded label: it stays queued here");
                        refused = Some(error);
                    }
                    _ => return Err(error),
                }
            }
        }
        if sent > 0 {
            tracing::info!(labels = sent, primary = %self.follow.url, "Labels forwarded to the primary");
        }
        refused.map_or(Ok(sent), Err)
    }

    fn local_error(&self, message: String) -> SyncError {
        SyncError::Unreachable {
            url: self.follow.url.clone(),
            message: format!("reading the queue: {message}"),
        }
    }

    /// Asks the primary for its active prompt set (unless it is the one applied last)
    /// and activates it. Returns the version switched to, if any.
    async fn sync_prompts(&self) -> Result<Option<u64>, SyncError> {
        // Only while the set taken last is still the active one: a set activated here
        // by other means (a round run beside a replica by mistake) is replaced.
        let active = self.prompts.active().version;
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let headers = applied
            .iter()
            .filter(|(v, _)| *v == active)
            .map(|(_, sha)| (header::IF_NONE_MATCH, format!("\"{sha}\"")))
            .collect();
        let (status, headers, bytes) = self
            .exchange(Method::GET, "/api/v1/prompts/active", headers, Vec::new())
            .await?;
        if status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        if status != StatusCode::OK {
            return Err(self.refused("GET /api/v1/prompts/active", status, &bytes));
        }
        let header_str = |name: &str| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let version = header_str(VERSION_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                self.refused(
                    "GET /api/v1/prompts/active",
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
        let rejected = |message: String| SyncError::Rejected {
            url: self.follow.url.clone(),
            version,
            message,
        };
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
        tracing::info!(version, sha256 = %actual, primary = %self.follow.url, "Prompt set taken from the primary");
        Ok(Some(version))
    }
}

/// Writes version `v` (`bytes`, sha256 `sha`) into the prompt directory unless it holds
/// it already, and activates it (validated as any set is). A different file under the
/// same version is kept beside it as `vNNNN.safetensors.replaced-UNIXTIME`.
fn install(prompts: &PromptManager, v: u64, bytes: &[u8], sha: &str) -> Result<(), String> {
    if v > 0 {
        let path = prompts.dir().path(v);
        match std::fs::read(&path) {
            Ok(old) if sha256_hex(&old) == sha => {}
            Ok(_) => {
                let stamp = crate::state::unix_seconds(std::time::SystemTime::now()) as u64;
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
                        [(VERSION_HEADER, v.to_string()), (SHA256_HEADER, sha)],
                        bytes,
                    )
                        .into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    #[tokio::test]
    async fn prompt_sets_that_fail_their_checksum_or_fit_another_model_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let bundle_set = dir.path().join("prompts.safetensors");
        std::fs::write(&bundle_set, set_file(&[])).unwrap();
        let prompts = PromptDir::new(dir.path().join("prompts"));
        let initial = crate::score::prompts::PromptSet::load(&bundle_set, 2).unwrap();
        let manager = Arc::new(PromptManager::new(
            prompts.clone(),
            bundle_set.clone(),
            2,
            "aaaa",
            Arc::new(arc_swap::ArcSwap::from_pointee(initial)),
            None,
        ));
        let good = set_file(&[("model_sha256", "aaaa")]);
        let served: Served = Arc::new(Mutex::new((1, good.clone(), sha256_hex(b"other"))));
        let addr = stand_in_primary(served.clone()).await;
        std::fs::write(dir.path().join("token"), "t".repeat(32)).unwrap();
        let metrics = crate::metrics::Metrics::new().register_follower();
        let follower = Follower::new(
            Follow {
                url: format!("http://{addr}"),
                authority: addr.to_string(),
                token_file: dir.path().join("token"),
                queue_max: 10,
                interval: Duration::from_secs(1),
            },
            1,
            LabelStore::open(&dir.path().join("labels.sqlite")).unwrap(),
            manager.clone(),
            sha256_hex(&set_file(&[])),
            metrics.clone(),
        );
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

        // Version 0 of another bundle is refused too.
        *served.lock().unwrap() = (0, good.clone(), sha256_hex(&good));
        let e = follower.sync_prompts().await.unwrap_err();
        assert_eq!(e.kind(), "rejected", "{e}");

        // The right bytes: written in place of the refused file (kept aside), activated.
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
}
