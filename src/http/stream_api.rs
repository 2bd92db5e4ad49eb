//! Stream routes: `GET /api/v1/streams` (state, window score, fps per stream),
//! `GET /api/v1/streams/{id}/frames` (recent scored frames) and
//! `GET /api/v1/frames/{frame_id}/thumbnail.jpg` (a recent frame as scored).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
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
    /// Added through `POST /api/v1/streams` (else from the configuration file).
    added_at_run_time: bool,
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

fn stream_view(st: &StreamState, runtime: bool) -> StreamView {
    let status = st.status();
    let alarms = st.alarms().named("_active", |a| *a);
    let m = &st.metrics;
    StreamView {
        id: st.id.clone(),
        source: st.source.clone(),
        added_at_run_time: runtime,
        phase: status.phase,
        up: m.up.get() == 1,
        quality: st.quality(),
        fps: (st.fps() * 100.0).round() / 100.0,
        alarms,
        restarts: status.restarts,
        last_error: status.last_error,
        frames_decoded: m.decoded.get(),
        frames_scored: m.scored.get(),
        frames_dropped: DropReason::ALL
            .into_iter()
            .map(|r| (r.as_str(), m.dropped_count(r)))
            .collect(),
    }
}

/// `POST /api/v1/streams` (token): a stream table as JSON (`id`, `uri` or `pipeline`,
/// and the optional keys of a config file's `[[streams]]`), validated as the config is;
/// started at once and kept in `server.runtime_streams` -> 201 and the stream.
pub(super) async fn add(
    _auth: super::auth::Bearer,
    State(s): State<AppState>,
    body: Result<Json<crate::config::StreamConfig>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    use crate::runtime_streams::{AddError, RuntimeStreamError};
    let Json(stream) = body.map_err(|r| ApiError::new(r.status(), r.body_text(), "body"))?;
    if !s.cluster.owns(&stream.id) {
        // Every replica shards by id alone: a stream is added on the one it falls to.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "stream {:?} falls to replica {} of {} (cluster.replicas): add it there",
                crate::redact::redact(&stream.id.chars().take(80).collect::<String>()),
                s.cluster.owner(&stream.id),
                s.cluster.replicas
            ),
            "id",
        ));
    }
    let (registry, runtime) = (s.streams.clone(), s.runtime_streams.clone());
    let id = stream.id.clone();
    let result = tokio::task::spawn_blocking(move || {
        let running: Vec<String> = registry.all().iter().map(|st| st.id.clone()).collect();
        let undo = registry.clone();
        runtime.add(
            stream,
            &running,
            |settings| registry.add(settings),
            move |id| {
                let _ = undo.remove(id);
            },
        )
    })
    .await
    .map_err(|e| ApiError::internal(format!("stream task failed: {e}")))?;
    match result {
        Ok(_) => {
            tracing::info!(stream = %id, "Stream added through the API");
            let st = s
                .streams
                .get(&id)
                .ok_or_else(|| ApiError::internal("the stream stopped at once"))?;
            Ok((StatusCode::CREATED, Json(stream_view(&st, true))).into_response())
        }
        Err(AddError::Refused(RuntimeStreamError::Invalid(e))) => {
            // Keys are named as in a config file (`streams[0].uri`): here the body's.
            let message = e.to_string().replacen("streams[0].", "", 1).replacen(
                "streams[0] = ",
                "stream ",
                1,
            );
            let field = match &e {
                crate::config::ConfigError::Invalid { key, reason, .. } => {
                    match key.split_once('.') {
                        Some((_, k)) => k.to_string(),
                        None if reason.contains("uri or a pipeline") => "uri".to_string(),
                        None => "body".to_string(),
                    }
                }
                _ => "body".to_string(),
            };
            let field: &'static str = match field.as_str() {
                "id" => "id",
                "uri" => "uri",
                "pipeline" => "pipeline",
                "sample_fps" => "sample_fps",
                "on_eos" => "on_eos",
                "quality_drop_threshold" => "quality_drop_threshold",
                _ => "body",
            };
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                crate::redact::redact(&message),
                field,
            ))
        }
        Err(AddError::Refused(RuntimeStreamError::Exists(id))) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("stream {id:?} already exists"),
            "id",
        )),
        Err(AddError::Refused(e)) => {
            tracing::error!(error = %e, "Stream not added");
            Err(ApiError::internal(crate::redact::redact(&e.to_string())))
        }
        Err(AddError::Start(e)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            crate::redact::redact(&e.to_string()),
            "body",
        )),
    }
}

/// `DELETE /api/v1/streams/{id}` (token): stops a stream added through the API and
/// forgets it -> 204. A stream of the configuration file is refused (409).
pub(super) async fn remove(
    _auth: super::auth::Bearer,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    use crate::runtime_streams::RuntimeStreamError;
    let (registry, runtime) = (s.streams.clone(), s.runtime_streams.clone());
    let shown = crate::redact::redact(&id.chars().take(80).collect::<String>());
    let result = tokio::task::spawn_blocking(move || {
        let from_config = registry.get(&id).is_some() && !runtime.contains(&id);
        runtime.remove(&id, from_config, |id| {
            let _ = registry.remove(id);
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("stream task failed: {e}")))?;
    match result {
        Ok(()) => {
            tracing::info!(stream = %shown, "Stream removed through the API");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Err(RuntimeStreamError::FromConfig(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("stream {shown:?} is defined in the configuration file: edit it and reload"),
            "id",
        )),
        Err(RuntimeStreamError::NotFound(_)) => {
            Err(ApiError::not_found(format!("no stream {shown:?}"), "id"))
        }
        Err(e) => {
            tracing::error!(error = %e, "Stream not removed");
            Err(ApiError::internal(e.to_string()))
        }
    }
}

pub(super) async fn streams(State(s): State<AppState>) -> Json<Vec<StreamView>> {
    let views = s
        .streams
        .all()
        .iter()
        .map(|st| stream_view(st, s.runtime_streams.contains(&st.id)))
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
