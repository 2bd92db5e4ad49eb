//! The HTTP server loop, with the limits that keep slow, idle or too many clients from
//! using up the daemon's file descriptors (which GStreamer's sockets and the label
//! store share) and from starving `/metrics`:
//!
//! - at most `server.max_connections` open connections, and at most
//!   `server.max_connections_per_ip` from one client address: a connection over either
//!   limit is closed at once (counted in `streamiq_http_connections_rejected_total`),
//!   so a flood from one address never takes the slots another client needs;
//! - `server.header_timeout`: from the moment a connection is idle (new, or done with
//!   its previous request) the client must send a whole request header within it, or
//!   the connection is closed (hyper's header-read timer, which also ends idle
//!   keep-alive connections);
//! - `server.request_timeout`: a request, its body included, must be answered within
//!   it, or it gets a 408 and the connection is closed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::timeout::TimeoutLayer;

use crate::config::HttpLimits;
use crate::metrics::Metrics;

/// How long open connections get to finish their request at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Open connections per client address.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

/// One open connection's claim on the limits; released when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<PerIp>,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.per_ip.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        self.metrics.http_connections.dec();
    }
}

impl PerIp {
    /// Counts a connection from `ip` unless it already has `max`.
    fn try_add(&self, ip: IpAddr, max: usize) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }
}

/// Serves `app` on `listener` within `limits` until `stop` is cancelled, then lets open
/// connections finish their request (5 s at most).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let app = app.layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        limits.request_timeout,
    ));
    let permits = Arc::new(Semaphore::new(limits.max_connections.get()));
    let per_ip = Arc::new(PerIp::default());
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                tracing::warn!(error = %e, "Cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = permits.clone().try_acquire_owned().ok().and_then(|permit| {
            per_ip
                .try_add(peer.ip(), limits.max_connections_per_ip.get())
                .then(|| {
                    metrics.http_connections.inc();
                    Slot {
                        _permit: permit,
                        ip: peer.ip(),
                        per_ip: per_ip.clone(),
                        metrics: metrics.clone(),
                    }
                })
        });
        let Some(slot) = slot else {
            metrics.http_connections_rejected.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|r: axum::http::Request<Incoming>| r.map(axum::body::Body::new)),
        );
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}
