//! HTTP (axum). This file only builds the router; each route's handler lives in the
//! file of its role:
//!
//! - [`health`]: `/metrics`, `/healthz`, `/readyz`;
//! - [`stream_api`]: streams, their recent frames, frame thumbnails;
//! - [`label_api`]: operator labels (write route behind the bearer token, [`auth`]);
//! - [`prompt_api`]: the active prompt set, reload and rollback;
//! - [`page`]: the labelling page;
//! - [`error`]: the JSON error `{"error", "field"}` every route answers bad input with;
//! - [`thumbnail`]: the JPEG encoding of a scored frame;
//! - [`serve`]: the server loop with its connection and time limits.

pub mod auth;
pub mod error;
pub mod health;
pub mod host;
mod incident_api;
pub mod label_api;
pub mod page;
pub mod prompt_api;
pub mod serve;
pub mod stream_api;
pub mod thumbnail;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::labels::{LabelStore, Provenance};
use crate::metrics::Metrics;
use crate::registry::StreamRegistry;
use crate::score::ActivePrompts;
use crate::score::preprocess::Normaliser;

pub use auth::ApiToken;
pub use error::ApiError;
pub use stream_api::find_frame;
pub use thumbnail::encode_jpeg;

/// Everything the routes read.
#[derive(Clone)]
pub struct AppState {
    /// The streams (added, replaced and removed at run time).
    pub streams: Arc<StreamRegistry>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Active prompt set.
    pub prompts: ActivePrompts,
    /// The scoring engine's liveness (model thread up, last model call).
    pub engine: Arc<crate::score::EngineHealth>,
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
    /// `labels.max_per_minute`.
    pub label_rate: Arc<label_api::RateLimit>,
    /// `server.allowed_hosts`.
    pub hosts: Arc<host::HostPolicy>,
    /// The incident frames kept on disk, if they are.
    pub incidents: Option<Arc<crate::incidents::IncidentStore>>,
    /// Streams added through the API.
    pub runtime_streams: Arc<crate::runtime_streams::RuntimeStreams>,
    /// Which replica this daemon is (streams added through the API must fall to it).
    pub cluster: crate::cluster::Cluster,
    /// The link to the cluster's primary, on a replica that follows one.
    pub follower: Option<Arc<crate::follower::Follower>>,
    /// This daemon is the cluster's primary: it takes the labels replicas forward.
    pub cluster_primary: bool,
}

/// The router: `/metrics`, `/healthz`, `/readyz`, the labelling page and the stream
/// list are open; every other `/api/v1` route needs the token ([`auth`]).
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/api/v1/streams/{id}/frames", get(stream_api::frames))
        .route("/api/v1/streams", post(stream_api::add))
        .route(
            "/api/v1/streams/{id}",
            axum::routing::delete(stream_api::remove),
        )
        .route(
            "/api/v1/frames/{frame_id}/thumbnail.jpg",
            get(stream_api::thumbnail),
        )
        .route("/api/v1/prompts", get(prompt_api::list))
        .route("/api/v1/prompts/active", get(prompt_api::active_file))
        .route("/api/v1/prompts/reload", post(prompt_api::reload))
        .route("/api/v1/prompts/rollback", post(prompt_api::rollback))
        .route(
            "/api/v1/labels",
            get(label_api::list)
                .post(label_api::create)
                .layer(DefaultBodyLimit::max(label_api::MAX_FORWARDED_BODY)),
        )
        .route(
            "/api/v1/labels/{id}/thumbnail.jpg",
            get(label_api::thumbnail),
        )
        .route("/api/v1/labels/summary", get(label_api::summary))
        .route("/api/v1/incidents", get(incident_api::list))
        .route(
            "/api/v1/incidents/{id}/frames/{file}",
            get(incident_api::frame),
        )
        .route(
            "/api/v1/session",
            post(auth::open_session).delete(auth::close_session),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/metrics", get(health::metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(health::readyz))
        .route("/api/v1/streams", get(stream_api::streams))
        .merge(protected)
        .merge(page::routes())
        .fallback(|| async { ApiError::not_found("no such route", "path") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            host::check,
        ))
        .with_state(state)
}
