//! The labelling API: `POST /api/v1/labels` (bearer token) stores an operator's rating
//! of a recent frame with the frame's embedding and thumbnail; `GET /api/v1/labels`
//! exports labels as JSON or CSV; `GET /api/v1/labels/{id}/thumbnail.jpg` serves the
//! stored thumbnail; `GET /api/v1/labels/summary` counts what the next adaptation still
//! needs (for the labelling page). Every label-store call runs on a blocking thread.

use std::collections::BTreeMap;

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

/// The summary's recent targets per stream: at most this many, newest first.
const RECENT_TARGETS: usize = 20;

/// The summary's labelled frames of this run per stream: at most this many, newest first.
const LABELLED_FRAMES: usize = 500;

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
    let (st, sf) = find_frame(&s.streams.all(), req.frame_id).ok_or_else(|| {
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
            frame: Some(crate::labels::encode_frame_png(&sf.frame.image)),
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
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        jpeg,
    )
        .into_response())
}

/// `GET /api/v1/labels/summary`: how many labels the active encoder has and how many
/// the next adaptation still needs, plus per stream what the labelling page ranks by.
#[derive(Debug, PartialEq, Serialize)]
pub(super) struct Summary {
    /// sha256 of the active encoder's `visual.onnx`.
    model_sha256: String,
    /// This daemon run's id (frame ids restart with every run).
    run_id: String,
    /// Labels stored for the active encoder (what `streamiq-adapt` trains on).
    labels_for_model: usize,
    /// `adapt.min_labels`.
    min_labels: usize,
    /// `max(0, min_labels - labels_for_model)`.
    needed: usize,
    /// Per configured stream.
    streams: BTreeMap<String, StreamSummary>,
}

/// One stream's labels, for the labelling page.
#[derive(Debug, Default, PartialEq, Serialize)]
struct StreamSummary {
    /// Labels of this stream for the active encoder.
    labels: usize,
    /// Targets in [0, 1] of its latest labels for the active encoder, newest first.
    recent_targets: Vec<f64>,
    /// Frames of this run that have a label, newest first.
    labelled_frames: Vec<LabelledFrame>,
}

/// A frame of this run that has a label.
#[derive(Debug, PartialEq, Serialize)]
struct LabelledFrame {
    frame_id: u64,
    mos: Option<f64>,
    target: f64,
}

/// Summarises `labels` (oldest first) for the encoder `model_sha256` and `streams`.
fn summarise(
    labels: &[Label],
    model_sha256: &str,
    run_id: &str,
    streams: &[&str],
    min_labels: usize,
) -> Summary {
    let mut per_stream: BTreeMap<String, StreamSummary> = streams
        .iter()
        .map(|id| (id.to_string(), StreamSummary::default()))
        .collect();
    let mut labels_for_model = 0;
    for l in labels.iter().rev() {
        let same_model = l.model_sha256.eq_ignore_ascii_case(model_sha256);
        labels_for_model += usize::from(same_model);
        let Some(s) = per_stream.get_mut(&l.stream) else {
            continue;
        };
        if same_model {
            s.labels += 1;
            if s.recent_targets.len() < RECENT_TARGETS {
                s.recent_targets.push(l.target);
            }
        }
        if l.run_id == run_id && s.labelled_frames.len() < LABELLED_FRAMES {
            s.labelled_frames.push(LabelledFrame {
                frame_id: l.frame_id,
                mos: l.mos,
                target: l.target,
            });
        }
    }
    Summary {
        model_sha256: model_sha256.to_ascii_lowercase(),
        run_id: run_id.to_string(),
        labels_for_model,
        min_labels,
        needed: min_labels.saturating_sub(labels_for_model),
        streams: per_stream,
    }
}

/// `GET /api/v1/labels/summary`.
pub(super) async fn summary(State(s): State<AppState>) -> Result<Json<Summary>, ApiError> {
    let store = s.labels.clone();
    let labels = tokio::task::spawn_blocking(move || store.list(0, None))
        .await
        .map_err(join_error)?
        .map_err(store_error)?;
    let streams = s.streams.all();
    let ids: Vec<&str> = streams.iter().map(|st| st.id.as_str()).collect();
    Ok(Json(summarise(
        &labels,
        &s.provenance.model_sha256,
        s.labels.run_id(),
        &ids,
        s.adapt_min_labels,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(id: i64, run: &str, stream: &str, sha: &str, mos: f64) -> Label {
        Label {
            id,
            run_id: run.into(),
            stream: stream.into(),
            frame_id: id as u64 * 10,
            captured: 0.0,
            pts: None,
            mos: Some(mos),
            score: None,
            target: (mos - 1.0) / 4.0,
            labeller: "operator".into(),
            embed_dim: 4,
            bundle: "b".into(),
            model_sha256: sha.into(),
            prompt_version: 0,
            model_score: 0.5,
            created: 0.0,
            embedding_source: "live".into(),
        }
    }

    #[test]
    fn summary_counts_labels_of_the_active_encoder() {
        let labels = vec![
            label(1, "old", "cam", "aa", 1.0),
            label(2, "old", "cam", "bb", 5.0),
            label(3, "now", "cam", "AA", 5.0),
            label(4, "now", "gone", "aa", 3.0),
        ];
        let s = summarise(&labels, "aa", "now", &["cam", "idle"], 5);
        assert_eq!(s.labels_for_model, 3, "every stream, any case of the sha");
        assert_eq!((s.min_labels, s.needed), (5, 2));
        let cam = &s.streams["cam"];
        assert_eq!(cam.labels, 2);
        assert_eq!(cam.recent_targets, vec![1.0, 0.0], "newest first");
        assert_eq!(
            cam.labelled_frames,
            vec![LabelledFrame {
                frame_id: 30,
                mos: Some(5.0),
                target: 1.0
            }]
        );
        assert_eq!(s.streams["idle"], StreamSummary::default());
        assert!(!s.streams.contains_key("gone"), "configured streams only");
        assert_eq!(summarise(&labels, "aa", "now", &[], 2).needed, 0);
    }

    #[test]
    fn recent_targets_are_capped() {
        let labels: Vec<Label> = (1..=30)
            .map(|i| label(i, "r", "cam", "aa", 1.0 + (i % 5) as f64))
            .collect();
        let s = summarise(&labels, "aa", "r", &["cam"], 20);
        assert_eq!(s.streams["cam"].recent_targets.len(), RECENT_TARGETS);
        assert_eq!(s.streams["cam"].recent_targets[0], labels[29].target);
        assert_eq!(s.streams["cam"].labels, 30);
    }
}
