//! Stream routes: `GET /api/v1/streams` (state, window score, fps per stream),
//! `GET /api/v1/streams/{id}/frames` (recent scored frames) and
//! `GET /api/v1/frames/{frame_id}/thumbnail.jpg` (a recent frame as scored).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::thumbnail::encode_jpeg;
use super::{ApiError, AppState};
use crate::frame::ScoredFrame;
use crate::metrics::DropReason;
use crate::state::{StreamState, unix_seconds};

#[derive(Serialize)]
pub(super) struct StreamView {
    id: String,
    source: String,
    phase: crate::state::Phase,
    up: bool,
    quality: Option<f64>,
    fps: f64,
    /// `black_active`, `freeze_active`, `bars_active`: one field per segment kind.
    #[serde(flatten)]
    alarms: BTreeMap<String, bool>,
    restarts: u64,
    last_error: Option<String>,
    frames_decoded: u64,
    frames_scored: u64,
    frames_dropped: BTreeMap<&'static str, u64>,
}

pub(super) async fn streams(State(s): State<AppState>) -> Json<Vec<StreamView>> {
    let views = s
        .streams
        .all()
        .iter()
        .map(|st| {
            let status = st.status();
            let alarms = st.alarms().named("_active", |a| *a);
            let m = &st.metrics;
            StreamView {
                id: st.id.clone(),
                source: st.source.clone(),
                phase: status.phase,
                up: m.up.get() == 1,
                quality: st.quality(),
                fps: (st.fps() * 100.0).round() / 100.0,
                alarms,
                restarts: status.restarts,
                last_error: status.last_error,
                frames_decoded: m.decoded.get(),
                frames_scored: m.scored.get(),
                frames_dropped: [DropReason::QueueFull, DropReason::Error]
                    .into_iter()
                    .map(|r| (r.as_str(), m.dropped_count(r)))
                    .collect(),
            }
        })
        .collect();
    Json(views)
}

#[derive(Deserialize)]
pub(super) struct FramesQuery {
    limit: Option<usize>,
}

#[derive(Serialize)]
pub(super) struct FrameView {
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

pub(super) async fn frames(
    State(s): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<FramesQuery>, QueryRejection>,
) -> Result<Json<Vec<FrameView>>, ApiError> {
    // A malformed query gets the JSON error every route answers with, naming it.
    let Query(q) = query.map_err(|r| ApiError::bad_request(r.body_text(), "query"))?;
    let st = s
        .streams
        .get(&id)
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

pub(super) async fn thumbnail(
    State(s): State<AppState>,
    Path(frame_id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u64 = frame_id.parse().map_err(|_| {
        ApiError::bad_request(format!("frame_id {frame_id:?} is not a number"), "frame_id")
    })?;
    let (_, sf) = find_frame(&s.streams.all(), id)
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
