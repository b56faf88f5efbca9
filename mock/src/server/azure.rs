//! Azure OpenAI's routes: the OpenAI API under
//! `/openai/deployments/{deployment}/...`, an `api-version` query parameter
//! every request must carry, the key in an `api-key` header, and the
//! deployment as the answer's model.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::json;

use super::Shared;

/// Azure's error shape: `code` and `message`, no `type`.
fn azure_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// What every Azure route checks first: the API version, then the key.
fn refuse(s: &Shared, query: &HashMap<String, String>, headers: &HeaderMap) -> Option<Response> {
    if query.get("api-version").is_none_or(String::is_empty) {
        return Some(azure_error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        ));
    }
    let key = s.config.api_key.as_deref()?;
    if headers.get("api-key").and_then(|v| v.to_str().ok()) == Some(key) {
        return None;
    }
    s.unauthorized.fetch_add(1, Ordering::Relaxed);
    Some(azure_error(
        StatusCode::UNAUTHORIZED,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
         provide a valid key for an active subscription and use a correct regional API \
         endpoint for your resource.",
    ))
}

pub(super) async fn chat(
    State(s): State<Arc<Shared>>,
    Path(deployment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = refuse(&s, &query, &headers) {
        return r;
    }
    super::openai_chat(s, body, Some(deployment)).await
}

pub(super) async fn completions(
    State(s): State<Arc<Shared>>,
    Path(deployment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = refuse(&s, &query, &headers) {
        return r;
    }
    super::completions::answer(s, body, Some(deployment)).await
}

pub(super) async fn embeddings(
    State(s): State<Arc<Shared>>,
    Path(deployment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = refuse(&s, &query, &headers) {
        return r;
    }
    super::embeddings::answer(s, body, Some(deployment)).await
}
