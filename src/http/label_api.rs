//! The labelling API: `POST /api/v1/labels` (bearer token) stores an operator's rating
//! of a recent frame with the frame's embedding and thumbnail; `GET /api/v1/labels`
//! exports labels as JSON or CSV; `GET /api/v1/labels/{id}/thumbnail.jpg` serves the
//! stored thumbnail. Every label-store call runs on a blocking thread.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::auth::Bearer;
use super::{ApiError, AppState, encode_jpeg, find_frame};
use crate::labels::{ExportFormat, Label, LabelError, LabelRequest, NewLabel};
use crate::state::unix_seconds;

/// Largest accepted request body on label routes, in bytes.
pub const MAX_BODY: usize = 16 * 1024;

/// A stored label as `POST /api/v1/labels` returns it.
#[derive(Serialize)]
struct StoredView {
    #[serde(flatten)]
    label: Label,
    /// Whether an earlier label of the frame by the same labeller was replaced.
    replaced: bool,
    /// Where the stored thumbnail is served.
    thumbnail: String,
}

fn store_error(e: LabelError) -> ApiError {
    tracing::error!(error = %e, kind = e.kind(), "Label store failed");
    ApiError::internal("label store error")
}

fn join_error(e: tokio::task::JoinError) -> ApiError {
    tracing::error!(error = %e, "Label task failed");
    ApiError::internal("label task failed")
}

/// `POST /api/v1/labels`: `{"frame_id", "mos" | "score", "labeller"?}` -> 201 and the
/// stored label. The frame must still be in its stream's recent-frame ring.
pub(super) async fn create(
    _auth: Bearer,
    State(s): State<AppState>,
    body: Result<Json<LabelRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|r| ApiError::new(r.status(), r.body_text(), "body"))?;
    let req = req
        .validate()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.message, e.field))?;
    let (st, sf) = find_frame(&s.streams, req.frame_id).ok_or_else(|| {
        ApiError::not_found(
            format!(
                "no recent frame {}; label one of /api/v1/streams/{{id}}/frames",
                req.frame_id
            ),
            "frame_id",
        )
    })?;
    let (store, normaliser, provenance) = (
        s.labels.clone(),
        s.normaliser.clone(),
        (*s.provenance).clone(),
    );
    let inserted = tokio::task::spawn_blocking(move || {
        let label = NewLabel {
            stream: st.id.clone(),
            frame_id: sf.frame.id,
            captured: unix_seconds(sf.frame.captured),
            pts: sf.frame.pts,
            rating: req.rating,
            labeller: req.labeller,
            embedding: sf.embedding.clone(),
            provenance,
            prompt_version: sf.prompt_version,
            model_score: sf.score,
            thumbnail: encode_jpeg(&sf, &normaliser),
        };
        store.insert(&label)
    })
    .await
    .map_err(join_error)?
    .map_err(store_error)?;
    s.metrics.labels_total.inc();
    let l = &inserted.label;
    tracing::info!(
        id = l.id,
        stream = %l.stream,
        frame_id = l.frame_id,
        labeller = %l.labeller,
        target = l.target,
        replaced = inserted.replaced,
        "Label stored"
    );
    let view = StoredView {
        thumbnail: format!("/api/v1/labels/{}/thumbnail.jpg", l.id),
        replaced: inserted.replaced,
        label: inserted.label,
    };
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `GET /api/v1/labels` query.
#[derive(Deserialize)]
pub(super) struct ListQuery {
    /// Only labels with a larger id.
    since: Option<i64>,
    /// At most this many.
    limit: Option<usize>,
    /// `json` (default) or `csv`.
    format: Option<String>,
}

/// `GET /api/v1/labels[?since=ID][&limit=N][&format=csv]`: labels, oldest first,
/// without their blobs.
pub(super) async fn list(
    State(s): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|r| ApiError::bad_request(r.body_text(), "query"))?;
    let format = match q.format.as_deref() {
        None | Some("json") => ExportFormat::Json,
        Some("csv") => ExportFormat::Csv,
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("format {other:?}: expected \"json\" or \"csv\""),
                "format",
            ));
        }
    };
    let store = s.labels.clone();
    let since = q.since.unwrap_or(0);
    let body = tokio::task::spawn_blocking(move || store.export(since, q.limit, format))
        .await
        .map_err(join_error)?
        .map_err(store_error)?;
    let content_type = match format {
        ExportFormat::Json => "application/json",
        ExportFormat::Csv => "text/csv; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// `GET /api/v1/labels/{id}/thumbnail.jpg`: the frame as it was labelled.
pub(super) async fn thumbnail(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("label id {id:?} is not a number"), "id"))?;
    let store = s.labels.clone();
    let jpeg = tokio::task::spawn_blocking(move || store.thumbnail(id))
        .await
        .map_err(join_error)?
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(format!("no label {id}"), "id"))?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        jpeg,
    )
        .into_response())
}
