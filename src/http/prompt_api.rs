//! Prompt-set routes: `GET /api/v1/prompts` (active version and history), and the
//! bearer-protected `POST /api/v1/prompts/reload` (activate what `prompts_dir/active`
//! names) and `POST /api/v1/prompts/rollback` (`{"version": N}`, any earlier version;
//! 0 is the bundle's own set).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
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

/// `POST /api/v1/prompts/reload`.
pub async fn reload(_: Bearer, State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
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
    let m = s.prompt_manager.clone();
    let from = m.active().version;
    let to = tokio::task::spawn_blocking(move || m.rollback(version))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), "version"))?
        .map_err(refused)?;
    Ok(Json(json!({ "previous": from, "active": to })))
}
