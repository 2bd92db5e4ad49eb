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
#[cfg(doc)]
use crate::labels::LabelStore;
use crate::labels::store::StoreSummary;
use crate::labels::{ExportFormat, Label, LabelError, LabelRequest, LabelTarget, NewLabel};
use crate::state::unix_seconds;

/// Largest accepted request body on label routes, in bytes.
pub const MAX_BODY: usize = 16 * 1024;

/// Largest accepted body of a label forwarded by a replica with its frame, in bytes.
pub const MAX_FORWARDED_BODY: usize = 8 << 20;

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
    /// On a replica that follows the cluster's primary: `queued`, for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    primary: Option<&'static str>,
}

fn store_error(e: LabelError) -> ApiError {
    if let LabelError::Full { count, limit, .. } = e {
        tracing::warn!(count, limit, "Label refused: the store is full");
        return ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "the label store holds {count} labels, labels.max_labels = {limit}: export and \
                 prune old labels (README, Labels) or raise the limit"
            ),
            "labels",
        );
    }
    tracing::error!(error = %e, kind = e.kind(), "Label store failed");
    ApiError::internal("label store error")
}

fn join_error(e: tokio::task::JoinError) -> ApiError {
    tracing::error!(error = %e, "Label task failed");
    ApiError::internal("label task failed")
}

/// The request's JSON body: at most [`MAX_BODY`] bytes, except on the cluster's primary
/// (`primary`), which reads up to [`MAX_FORWARDED_BODY`] for labels forwarded with their
/// frame; a larger body that is not one is refused as too large.
async fn read_request(
    request: axum::extract::Request,
    primary: bool,
) -> Result<LabelRequest, ApiError> {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|m| {
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        });
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`",
            "body",
        ));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            if primary {
                format!(
                    "a label request is at most {MAX_BODY} bytes (a label forwarded by a replica \
                     with its frame, {MAX_FORWARDED_BODY})"
                )
            } else {
                format!("a label request is at most {MAX_BODY} bytes")
            },
            "body",
        )
    };
    let limit = if primary {
        MAX_FORWARDED_BODY
    } else {
        MAX_BODY
    };
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|e| {
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            {
                too_large()
            } else {
                ApiError::bad_request(format!("reading the body: {e}"), "body")
            }
        })?;
    let parsed = Json::<LabelRequest>::from_bytes(&bytes);
    if bytes.len() > MAX_BODY && !matches!(&parsed, Ok(Json(r)) if r.forwarded.is_some()) {
        return Err(too_large());
    }
    let Json(req) =
        parsed.map_err(|r: JsonRejection| ApiError::new(r.status(), r.body_text(), "body"))?;
    Ok(req)
}

/// `POST /api/v1/labels`: `{"frame_id", "mos" | "score", "labeller"?}` -> 201 and the
/// stored label. The frame must still be in its stream's recent-frame ring. On the
/// cluster's primary, also a label a replica forwards (`forwarded`).
pub(super) async fn create(
    _auth: Bearer,
    State(s): State<AppState>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let req = read_request(request, s.cluster_primary).await?;
    if req.forwarded.is_some() {
        return create_forwarded(s, req).await;
    }
    if let Err(wait) = s.label_rate.admit(std::time::Instant::now()) {
        let secs = wait.as_secs().max(1);
        let mut r = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "more than labels.max_per_minute = {} labels in the last minute; retry in {secs} s",
                s.label_rate.max()
            ),
            "labels",
        )
        .into_response();
        r.headers_mut().insert(header::RETRY_AFTER, secs.into());
        return Ok(r);
    }
    let req = req
        .validate()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.message, e.field))?;
    let (rating, labeller) = (req.rating, req.labeller);
    // The run the frame was scored in: this one, except for an incident's frame.
    let (label, run_id) = match req.target {
        LabelTarget::Frame(frame_id) => {
            let (st, sf) = find_frame(&s.streams.all(), frame_id).ok_or_else(|| {
                ApiError::not_found(
                    format!(
                        "no recent frame {frame_id}; label one of /api/v1/streams/{{id}}/frames \
                         or an incident's frame"
                    ),
                    "frame_id",
                )
            })?;
            let (normaliser, provenance) = (s.normaliser.clone(), (*s.provenance).clone());
            let label = tokio::task::spawn_blocking(move || NewLabel {
                stream: st.id.clone(),
                frame_id: sf.frame.id,
                captured: unix_seconds(sf.frame.captured),
                pts: sf.frame.pts,
                rating,
                labeller,
                embedding: sf.embedding.clone(),
                provenance,
                prompt_version: sf.prompt_version,
                model_score: sf.score,
                thumbnail: encode_jpeg(&sf, &normaliser),
                frame: Some(crate::labels::encode_frame_png(&sf.frame.image)),
            })
            .await
            .map_err(join_error)?;
            (label, None)
        }
        LabelTarget::Forwarded(_) => {
            unreachable!("forwarded labels are stored by create_forwarded")
        }
        LabelTarget::Incident { id, frame } => {
            let incidents = s.incidents.clone().ok_or_else(|| {
                ApiError::not_found(
                    "incidents are not kept (labels.incidents_max = 0)",
                    "incident",
                )
            })?;
            let normaliser = s.normaliser.clone();
            let (label, run_id) = tokio::task::spawn_blocking(move || {
                incident_label(&incidents, &id, frame, rating, labeller, &normaliser)
            })
            .await
            .map_err(join_error)??;
            (label, Some(run_id))
        }
    };
    let store = s.labels.clone();
    let queue_max = s.follower.as_ref().map(|f| f.follow().queue_max);
    let inserted = tokio::task::spawn_blocking(move || {
        let run = run_id.as_deref().unwrap_or(store.run_id());
        store.insert_in_run(run, &label, queue_max)
    })
    .await
    .map_err(join_error)?
    .map_err(|e| store_error_for(&s, e))?;
    if let Some(f) = &s.follower {
        f.wake();
    }
    Ok(stored(&s, inserted, None))
}

/// The 201 reply for a stored label, logged and counted.
fn stored(s: &AppState, inserted: crate::labels::Inserted, from_replica: Option<u32>) -> Response {
    s.metrics.labels_total.inc();
    let l = &inserted.label;
    tracing::info!(
        id = l.id,
        stream = %l.stream,
        frame_id = l.frame_id,
        labeller = %l.labeller,
        target = l.target,
        replaced = inserted.replaced,
        from_replica,
        "Label stored"
    );
    let view = StoredView {
        thumbnail: format!("/api/v1/labels/{}/thumbnail.jpg", l.id),
        replaced: inserted.replaced,
        primary: s.follower.as_ref().map(|_| "queued"),
        label: inserted.label,
    };
    (StatusCode::CREATED, Json(view)).into_response()
}

/// [`store_error`], but a full forwarding queue names the primary it waits for.
fn store_error_for(s: &AppState, e: LabelError) -> ApiError {
    match (&e, &s.follower) {
        (LabelError::QueueFull { count, limit, .. }, Some(f)) => {
            tracing::warn!(count, limit, primary = %f.follow().url, "Label refused: the queue for the primary is full");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{count} labels wait to be sent to the cluster's primary at {} \
                     (cluster.forward_queue_max = {limit}): label again once they have gone \
                     (streamiq_cluster_labels_queued; the replica's log says why they wait)",
                    f.follow().url
                ),
                "labels",
            )
        }
        _ => store_error(e),
    }
}

/// A label that a replica stored first and forwards with its frame: stored under the
/// replica's run id, if it was embedded by this daemon's model. Not rate-limited (the
/// replica's own limit admitted it); refused on a replica that forwards labels itself.
async fn create_forwarded(s: AppState, req: LabelRequest) -> Result<Response, ApiError> {
    if !s.cluster_primary {
        let message = match &s.follower {
            Some(f) => format!(
                "this replica is not the cluster's primary: forward labels to {}",
                f.follow().url
            ),
            None => "this daemon is not a cluster's primary (cluster.primary, \
                     cluster.primary_replica): it takes no forwarded labels"
                .to_string(),
        };
        return Err(ApiError::new(StatusCode::CONFLICT, message, "cluster"));
    }
    let req = req
        .validate()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.message, e.field))?;
    let LabelTarget::Forwarded(f) = req.target else {
        unreachable!("a request with forwarded validates to a forwarded target")
    };
    let invalid =
        |message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message, "forwarded");
    let cluster = s.cluster;
    if f.replica >= cluster.replicas.get() || f.replica == cluster.replica {
        return Err(invalid(format!(
            "replica {}: not another replica of this cluster (cluster.replicas = {}, this \
             primary is {})",
            f.replica, cluster.replicas, cluster.replica
        )));
    }
    if f.run_id == s.labels.run_id() {
        return Err(invalid("run_id: this primary's own run".into()));
    }
    let norm = f.label.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
    if (norm - 1.0).abs() > 1e-3 {
        return Err(invalid(format!(
            "embedding: L2 norm {norm}, the model's embeddings have 1"
        )));
    }
    let mine = &*s.provenance;
    if !f
        .label
        .provenance
        .model_sha256
        .eq_ignore_ascii_case(&mine.model_sha256)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "replica {} embedded this frame with {} (visual.onnx sha256 {}); this primary \
                 scores with {} (sha256 {}): every replica must run the primary's model bundle",
                f.replica,
                f.label.provenance.bundle,
                f.label.provenance.model_sha256,
                mine.bundle,
                mine.model_sha256
            ),
            "forwarded",
        ));
    }
    let dim = s.prompt_manager.dim();
    if f.label.embedding.len() != dim {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "forwarded embedding has {} values; the model's have {dim}",
                f.label.embedding.len()
            ),
            "forwarded",
        ));
    }
    let store = s.labels.clone();
    let replica = f.replica;
    let inserted = tokio::task::spawn_blocking(move || store.insert_from(&f.run_id, &f.label))
        .await
        .map_err(join_error)?
        .map_err(store_error)?;
    Ok(stored(&s, inserted, Some(replica)))
}

/// The label for frame `n` of incident `id`: the embedding, score and working frame it
/// had when it was scored (kept with the incident), so no model runs; and the run it
/// was scored in ([`crate::incidents::ScoredInfo::label_run_id`]).
fn incident_label(
    incidents: &crate::incidents::IncidentStore,
    id: &str,
    n: usize,
    rating: crate::labels::Rating,
    labeller: String,
    normaliser: &crate::score::preprocess::Normaliser,
) -> Result<(NewLabel, String), ApiError> {
    let incident = incidents
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no incident {id:?}"), "incident"))?;
    let f =
        incident.frames.iter().find(|f| f.n == n).ok_or_else(|| {
            ApiError::not_found(format!("incident {id:?} has no frame {n}"), "frame")
        })?;
    let (Some(scored), Some(png)) = (&f.scored, incidents.frame_png(id, n, true)) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "frame {n} of incident {id:?} was not scored when it was kept: it cannot be labelled"
            ),
            "frame",
        ));
    };
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
        .map_err(|e| {
            tracing::error!(incident = id, frame = n, error = %e, "Incident frame unreadable");
            ApiError::internal("incident frame unreadable")
        })?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let img = crate::frame::RgbImage::from_packed(w, h, img.into_raw());
    let run_id = scored.label_run_id(id);
    let label = NewLabel {
        stream: incident.stream,
        frame_id: scored.frame_id,
        captured: incident.at,
        pts: f.pts,
        rating,
        labeller,
        embedding: scored.embedding.clone(),
        provenance: scored.provenance.clone(),
        prompt_version: scored.prompt_version,
        model_score: scored.score,
        thumbnail: super::thumbnail::encode_image_jpeg(&img, normaliser),
        frame: Some(png),
    };
    Ok((label, run_id))
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

/// The summary from the store's counts ([`LabelStore::summary`]).
fn summarise(counts: StoreSummary, model_sha256: &str, run_id: &str, min_labels: usize) -> Summary {
    let labels_for_model = counts.labels_for_model as usize;
    Summary {
        model_sha256: model_sha256.to_ascii_lowercase(),
        run_id: run_id.to_string(),
        labels_for_model,
        min_labels,
        needed: min_labels.saturating_sub(labels_for_model),
        streams: counts
            .streams
            .into_iter()
            .map(|c| {
                let s = StreamSummary {
                    labels: c.labels as usize,
                    recent_targets: c.recent_targets,
                    labelled_frames: c
                        .labelled_frames
                        .into_iter()
                        .map(|(frame_id, mos, target)| LabelledFrame {
                            frame_id,
                            mos,
                            target,
                        })
                        .collect(),
                };
                (c.stream, s)
            })
            .collect(),
    }
}

/// `GET /api/v1/labels/summary`: counted by SQLite, so its cost does not grow with the
/// store (the page polls it every 5 s).
pub(super) async fn summary(State(s): State<AppState>) -> Result<Json<Summary>, ApiError> {
    let store = s.labels.clone();
    let ids: Vec<String> = s.streams.all().iter().map(|st| st.id.clone()).collect();
    let model = s.provenance.model_sha256.clone();
    let run_id = s.labels.run_id().to_string();
    let counts = tokio::task::spawn_blocking(move || {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        store.summary(&model, &run_id, &ids, RECENT_TARGETS, LABELLED_FRAMES)
    })
    .await
    .map_err(join_error)?
    .map_err(store_error)?;
    Ok(Json(summarise(
        counts,
        &s.provenance.model_sha256,
        s.labels.run_id(),
        s.adapt_min_labels,
    )))
}

/// At most `max` admissions in any 60 s (`labels.max_per_minute`), all clients together.
#[derive(Debug)]
pub struct RateLimit {
    max: u32,
    admitted: std::sync::Mutex<std::collections::VecDeque<std::time::Instant>>,
}

impl RateLimit {
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

    /// A limit of `max` per minute.
    pub fn per_minute(max: std::num::NonZeroU32) -> Self {
        Self {
            max: max.get(),
            admitted: Default::default(),
        }
    }

    /// The limit.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Admits one at `now`, or says how long until the next would be admitted.
    pub fn admit(&self, now: std::time::Instant) -> Result<(), std::time::Duration> {
        let mut q = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Self::WINDOW)
        {
            q.pop_front();
        }
        if q.len() >= self.max as usize {
            let oldest = *q.front().expect("max >= 1");
            return Err(Self::WINDOW.saturating_sub(now.duration_since(oldest)));
        }
        q.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn rate_limit_admits_max_per_sliding_minute() {
        let r = RateLimit::per_minute(std::num::NonZeroU32::new(3).unwrap());
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(r.admit(t0 + Duration::from_secs(i)).is_ok());
        }
        let wait = r.admit(t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(
            r.admit(t0 + Duration::from_secs(60)).is_ok(),
            "the first has left the window"
        );
        assert!(r.admit(t0 + Duration::from_secs(60)).is_err());
    }
}
