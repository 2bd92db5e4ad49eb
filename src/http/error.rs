//! The JSON error every route answers bad input with: `{"error", "field"}`, naming the
//! field (and `WWW-Authenticate: Bearer` on a 401).

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
