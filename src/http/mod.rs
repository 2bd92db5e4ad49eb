//! HTTP (axum): `/metrics`, `/healthz`, `/readyz`, the read-only `/api/v1` routes, and
//! the labelling API ([`label_api`]) whose write route needs the bearer token ([`auth`]).
//! Bad input gets a 4xx with a JSON error `{"error", "field"}` naming the field.

pub mod auth;
pub mod label_api;
pub mod page;
pub mod prompt_api;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::frame::ScoredFrame;
use crate::labels::{LabelStore, Provenance};
use crate::metrics::{DropReason, Metrics};
use crate::score::ActivePrompts;
use crate::score::preprocess::Normaliser;
use crate::state::{StreamState, unix_seconds};

pub use auth::ApiToken;

/// Everything the routes read.
#[derive(Clone)]
pub struct AppState {
    /// Streams in config order.
    pub streams: Arc<Vec<Arc<StreamState>>>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Active prompt set.
    pub prompts: ActivePrompts,
    /// Set once the model is loaded.
    pub model_loaded: Arc<AtomicBool>,
    /// The model's crop rule (for thumbnails of what was scored).
    pub normaliser: Arc<Normaliser>,
    /// The label store.
    pub labels: LabelStore,
    /// Bearer token for write routes.
    pub api_token: ApiToken,
    /// The prompt sets: active one, history, reload and rollback.
    pub prompt_manager: Arc<crate::score::prompt_store::PromptManager>,
    /// The encoder whose embeddings labels record.
    pub provenance: Arc<Provenance>,
    /// `adapt.min_labels`: labels the next adaptation needs (the labelling page shows it).
    pub adapt_min_labels: usize,
}

/// A JSON error response.
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    /// Any status, naming the field.
    pub fn new(status: StatusCode, message: impl Into<String>, field: &'static str) -> Self {
        Self {
            status,
            message: message.into(),
            field: Some(field),
        }
    }

    /// 404 naming what was not found.
    pub fn not_found(message: impl Into<String>, field: &'static str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            field: Some(field),
        }
    }

    /// 400 naming the bad field.
    pub fn bad_request(message: impl Into<String>, field: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field),
        }
    }

    /// 401 for a missing or wrong bearer token (field `authorization`).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message, "authorization")
    }

    /// 500; the details go to the log, not to the client.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            field: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/streams", get(streams))
        .route("/api/v1/streams/{id}/frames", get(frames))
        .route("/api/v1/frames/{frame_id}/thumbnail.jpg", get(thumbnail))
        .route("/api/v1/prompts", get(prompt_api::list))
        .route(
            "/api/v1/prompts/reload",
            axum::routing::post(prompt_api::reload),
        )
        .route(
            "/api/v1/prompts/rollback",
            axum::routing::post(prompt_api::rollback),
        )
        .route(
            "/api/v1/labels",
            get(label_api::list)
                .post(label_api::create)
                .layer(DefaultBodyLimit::max(label_api::MAX_BODY)),
        )
        .route(
            "/api/v1/labels/{id}/thumbnail.jpg",
            get(label_api::thumbnail),
        )
        .route("/api/v1/labels/summary", get(label_api::summary))
        .merge(page::routes())
        .fallback(|| async { ApiError::not_found("no such route", "path") })
        .with_state(state)
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    let model = s.model_loaded.load(Ordering::Relaxed);
    let frames = s.streams.iter().any(|st| st.metrics.decoded.get() > 0);
    let body = json!({ "model_loaded": model, "frames_seen": frames });
    let code = if model && frames {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

#[derive(Serialize)]
struct StreamView {
    id: String,
    source: String,
    phase: crate::state::Phase,
    up: bool,
    quality: Option<f64>,
    fps: f64,
    black_active: bool,
    freeze_active: bool,
    restarts: u64,
    last_error: Option<String>,
    frames_decoded: u64,
    frames_scored: u64,
    frames_dropped: BTreeMap<&'static str, u64>,
}

async fn streams(State(s): State<AppState>) -> Json<Vec<StreamView>> {
    let views = s
        .streams
        .iter()
        .map(|st| {
            let status = st.status();
            let (black_active, freeze_active) = st.alarms();
            let m = &st.metrics;
            StreamView {
                id: st.id.clone(),
                source: st.source.clone(),
                phase: status.phase,
                up: m.up.get() == 1,
                quality: st.quality(),
                fps: (st.fps() * 100.0).round() / 100.0,
                black_active,
                freeze_active,
                restarts: status.restarts,
                last_error: status.last_error,
                frames_decoded: m.decoded.get(),
                frames_scored: m.scored.get(),
                frames_dropped: [DropReason::QueueFull, DropReason::Stale, DropReason::Error]
                    .into_iter()
                    .map(|r| (r.as_str(), m.dropped_count(r)))
                    .collect(),
            }
        })
        .collect();
    Json(views)
}

#[derive(Deserialize)]
struct FramesQuery {
    limit: Option<usize>,
}

#[derive(Serialize)]
struct FrameView {
    id: u64,
    time: f64,
    pts: Option<f64>,
    score: f32,
    attributes: BTreeMap<String, f32>,
    prompt_version: u64,
    thumbnail: String,
}

fn frame_view(sf: &ScoredFrame, names: &[String]) -> FrameView {
    FrameView {
        id: sf.frame.id,
        time: unix_seconds(sf.frame.captured),
        pts: sf.frame.pts,
        score: sf.score,
        attributes: names
            .iter()
            .cloned()
            .zip(sf.attributes.iter().copied())
            .collect(),
        prompt_version: sf.prompt_version,
        thumbnail: format!("/api/v1/frames/{}/thumbnail.jpg", sf.frame.id),
    }
}

async fn frames(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<FramesQuery>,
) -> Result<Json<Vec<FrameView>>, ApiError> {
    let st = s
        .streams
        .iter()
        .find(|st| st.id == id)
        .ok_or_else(|| ApiError::not_found(format!("no stream {id:?}"), "id"))?;
    let prompts = s.prompts.load();
    let names: Vec<String> = prompts.attributes.iter().map(|(n, _)| n.clone()).collect();
    let limit = q.limit.unwrap_or(usize::MAX);
    let views = st
        .recent()
        .iter()
        .rev()
        .take(limit)
        .map(|sf| {
            let names: &[String] = if sf.prompt_version == prompts.version {
                &names
            } else {
                &[]
            };
            frame_view(sf, names)
        })
        .collect();
    Ok(Json(views))
}

/// Finds a recent frame in any stream's ring.
pub fn find_frame(
    streams: &[Arc<StreamState>],
    frame_id: u64,
) -> Option<(Arc<StreamState>, Arc<ScoredFrame>)> {
    streams
        .iter()
        .find_map(|st| st.find(frame_id).map(|f| (st.clone(), f)))
}

async fn thumbnail(
    State(s): State<AppState>,
    Path(frame_id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u64 = frame_id.parse().map_err(|_| {
        ApiError::bad_request(format!("frame_id {frame_id:?} is not a number"), "frame_id")
    })?;
    let (_, sf) = find_frame(&s.streams, id)
        .ok_or_else(|| ApiError::not_found(format!("no recent frame {id}"), "frame_id"))?;
    let normaliser = s.normaliser.clone();
    let jpeg = tokio::task::spawn_blocking(move || encode_jpeg(&sf, &normaliser))
        .await
        .map_err(|_| ApiError::not_found("encoding failed", "frame_id"))?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            // Frame ids restart with every daemon run: short-lived, never immutable.
            (header::CACHE_CONTROL, "private, max-age=60"),
        ],
        jpeg,
    )
        .into_response())
}

/// The frame as scored, as JPEG: the centre region the model saw for `global`
/// views, the whole working frame for `crops:N`.
pub fn encode_jpeg(sf: &ScoredFrame, normaliser: &Normaliser) -> Vec<u8> {
    let img = &sf.frame.image;
    let (x0, y0, w, h) = if normaliser.is_global() {
        let s = normaliser.size();
        let (x0, y0) = normaliser.crop_origin(img);
        (x0, y0, s.min(img.width), s.min(img.height))
    } else {
        (0, 0, img.width, img.height)
    };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in y0..y0 + h {
        rgb.extend_from_slice(&img.row(y)[3 * x0..3 * (x0 + w)]);
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 85)
        .encode(&rgb, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
        .expect("encoding into memory does not fail");
    out
}
