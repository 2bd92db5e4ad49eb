//! The unauthenticated operations routes: `/metrics` (Prometheus text exposition) and
//! `/readyz` (`/healthz` is a constant in the router).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

pub(super) async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

pub(super) async fn readyz(State(s): State<AppState>) -> Response {
    let model = s.engine.model_running();
    let depth = s.metrics.queue_depth.get().max(0) as usize;
    let healthy = s.engine.is_healthy(depth);
    let frames = s
        .streams
        .all()
        .iter()
        .any(|st| st.metrics.decoded.get() > 0);
    let last_batch = s.engine.since_last_batch().map(|d| d.as_secs_f64());
    let body = json!({
        "model_loaded": model,
        "engine_healthy": healthy,
        "frames_seen": frames,
        "queue_depth": depth,
        "seconds_since_model_call": last_batch,
    });
    // Ready while the engine works, whether or not cameras deliver frames: a stream
    // that is down is an alert (StreamDown), not a reason to take the daemon out.
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}
