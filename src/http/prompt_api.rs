//! Prompt-set routes: `GET /api/v1/prompts` (active version and history),
//! `GET /api/v1/prompts/active` (the active set's file, with its version and sha256:
//! what the cluster's replicas take from their primary), and
//! `POST /api/v1/prompts/reload` (activate what `prompts_dir/active` names) and
//! `POST /api/v1/prompts/rollback` (`{"version": N}`, any earlier version; 0 is the
//! bundle's own set), which a replica that follows a primary refuses.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Bearer;
use super::{ApiError, AppState};
use crate::score::prompts::PromptError;

fn refused(e: PromptError) -> ApiError {
    let status = match &e {
        PromptError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            StatusCode::NOT_FOUND
        }
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(status, e.to_string(), "version")
}

/// `GET /api/v1/prompts`.
pub async fn list(State(s): State<AppState>) -> Json<Value> {
    let m = s.prompt_manager.clone();
    let history = tokio::task::spawn_blocking(move || m.history())
        .await
        .unwrap_or_default();
    let p = s.prompt_manager.active();
    Json(json!({
        "active": p.version,
        "path": p.path,
        "attributes": p.attributes.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "metadata": p.metadata,
        "history": history,
    }))
}

/// `GET /api/v1/prompts/active`: the active set's bytes (`application/octet-stream`),
/// with its version (`x-streamiq-prompt-version`), its sha256 (`x-streamiq-sha256`, also
/// the `ETag`) and which replica this daemon is (`x-streamiq-replica`); `If-None-Match`
/// with that tag answers 304.
pub async fn active_file(
    State(s): State<AppState>,
    request_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let set = s.prompt_manager.active();
    let path = set.path.clone();
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(&path))
        .await
        .map_err(|e| ApiError::internal(format!("reading the prompt set: {e}")))?
        .map_err(|e| {
            tracing::error!(path = %set.path.display(), error = %e, "Active prompt set unreadable");
            ApiError::internal("the active prompt set cannot be read")
        })?;
    let sha = crate::follower::sha256_hex(&bytes);
    let etag = format!("\"{sha}\"");
    let version = set.version.to_string();
    let headers = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, "no-cache".to_string()),
        (
            header::HeaderName::from_static(crate::follower::VERSION_HEADER),
            version,
        ),
        (
            header::HeaderName::from_static(crate::follower::SHA256_HEADER),
            sha,
        ),
        (
            header::HeaderName::from_static(crate::follower::REPLICA_HEADER),
            s.cluster.replica.to_string(),
        ),
    ];
    let unchanged = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag);
    if unchanged {
        return Ok((StatusCode::NOT_MODIFIED, headers).into_response());
    }
    Ok((
        headers,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

/// On a replica that follows the cluster's primary, prompt sets are switched there.
fn refuse_on_follower(s: &AppState) -> Result<(), ApiError> {
    match &s.follower {
        Some(f) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "this replica takes its prompt set from the cluster's primary (cluster.primary = \
                 {}): reload or roll back there, and every replica follows",
                f.follow().url
            ),
            "version",
        )),
        None => Ok(()),
    }
}

/// `POST /api/v1/prompts/reload`.
pub async fn reload(_: Bearer, State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    refuse_on_follower(&s)?;
    let m = s.prompt_manager.clone();
    let from = m.active().version;
    let to = tokio::task::spawn_blocking(move || m.reload())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), "version"))?
        .map_err(refused)?;
    Ok(Json(json!({ "previous": from, "active": to })))
}

/// Body of `POST /api/v1/prompts/rollback`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// The version to return to.
    pub version: u64,
}

/// `POST /api/v1/prompts/rollback`.
pub async fn rollback(
    _: Bearer,
    State(s): State<AppState>,
    body: Result<Json<Rollback>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    // A body that is not JSON (400), not sent as JSON (415) or not `{"version": N}`
    // (422) is told apart, as the label routes do.
    let Json(Rollback { version }) = body.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("expected {{\"version\": N}}: {}", e.body_text()),
            "version",
        )
    })?;
    refuse_on_follower(&s)?;
    let m = s.prompt_manager.clone();
    let from = m.active().version;
    let to = tokio::task::spawn_blocking(move || m.rollback(version))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), "version"))?
        .map_err(refused)?;
    Ok(Json(json!({ "previous": from, "active": to })))
}
