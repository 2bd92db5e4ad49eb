//! Incident routes (behind the token): `GET /api/v1/incidents` lists the incidents kept
//! on disk, newest first, with their frames' sizes, scores and whether each can be
//! labelled; `GET /api/v1/incidents/{id}/frames/{n}.png` is frame `n` at the source's
//! resolution (capped by `labels.incident_max_px`). Label one with `POST /api/v1/labels`
//! `{"incident": ID, "frame": N, "mos": ...}`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{ApiError, AppState};
use crate::incidents::{Incident, IncidentKind};

/// One incident as listed.
#[derive(Serialize)]
struct IncidentView {
    id: String,
    stream: String,
    kind: IncidentKind,
    at: f64,
    quality: Option<f64>,
    frames: Vec<FrameView>,
}

/// One of its frames.
#[derive(Serialize)]
struct FrameView {
    n: usize,
    pts: Option<f64>,
    width: u32,
    height: u32,
    onset: bool,
    score: Option<f32>,
    labellable: bool,
    url: String,
}

fn view(i: Incident) -> IncidentView {
    IncidentView {
        frames: i
            .frames
            .iter()
            .map(|f| FrameView {
                n: f.n,
                pts: f.pts,
                width: f.width,
                height: f.height,
                onset: f.onset,
                score: f.scored.as_ref().map(|s| s.score),
                labellable: f.scored.is_some(),
                url: format!("/api/v1/incidents/{}/frames/{}.png", i.id, f.n),
            })
            .collect(),
        id: i.id,
        stream: i.stream,
        kind: i.kind,
        at: i.at,
        quality: i.quality,
    }
}

/// `GET /api/v1/incidents`.
pub(super) async fn list(State(s): State<AppState>) -> Result<Response, ApiError> {
    let Some(store) = s.incidents.clone() else {
        return Ok(Json(serde_json::json!({"enabled": false, "incidents": []})).into_response());
    };
    let all = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::internal(format!("incident task failed: {e}")))?;
    let views: Vec<IncidentView> = all.into_iter().map(view).collect();
    Ok(Json(serde_json::json!({"enabled": true, "incidents": views})).into_response())
}

/// `GET /api/v1/incidents/{id}/frames/{n}.png`.
pub(super) async fn frame(
    State(s): State<AppState>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let n = file
        .strip_suffix(".png")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < 64)
        .ok_or_else(|| {
            ApiError::not_found(format!("no frame {file:?}: expected N.png"), "frame")
        })?;
    if !crate::incidents::valid_id(&id) {
        return Err(ApiError::not_found(
            format!("no incident {id:?}"),
            "incident",
        ));
    }
    let store = s
        .incidents
        .clone()
        .ok_or_else(|| ApiError::not_found("incidents are not kept", "incident"))?;
    let (id2, png) = (
        id.clone(),
        tokio::task::spawn_blocking(move || store.frame_png(&id, n, false))
            .await
            .map_err(|e| ApiError::internal(format!("incident task failed: {e}")))?,
    );
    let png = png.ok_or_else(|| {
        ApiError::not_found(format!("incident {id2:?} has no frame {n}"), "frame")
    })?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        png,
    )
        .into_response())
}
