//! `POST /v1/completions`, OpenAI's legacy text completions: the same
//! answer tokens as a chat completion, as `text_completion` objects,
//! streamed or not.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    answer_tokens, draw, error, now, openai_fault, refuse_key, slot, start, stream, Script, Shared,
    StreamOptions,
};

/// OpenAI's default when a completion request sets no limit.
const DEFAULT_MAX_TOKENS: u32 = 16;

#[derive(Deserialize)]
struct Request {
    model: String,
    #[serde(default)]
    prompt: Value,
    max_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// Prompt tokens: text at about four characters a token, token ids as
/// they are.
fn prompt_tokens(prompt: &Value) -> u32 {
    let n = match prompt {
        Value::String(s) => s.len() / 4,
        Value::Array(items) if items.iter().all(Value::is_number) => items.len(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.len() / 4,
                Value::Array(t) => t.len(),
                _ => 0,
            })
            .sum(),
        _ => 0,
    };
    n.max(1) as u32
}

pub(super) async fn openai(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_key(&s, &headers) {
        s.unauthorized.fetch_add(1, Ordering::Relaxed);
        return refused;
    }
    answer(s, body, None).await
}

/// The completion; `deployment` (Azure) names the model.
pub(super) async fn answer(s: Arc<Shared>, body: Bytes, deployment: Option<String>) -> Response {
    let guard = start(&s);
    s.text_completions.fetch_add(1, Ordering::Relaxed);
    let req: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("mock could not parse the request: {e}"),
            )
        }
    };
    if !matches!(req.prompt, Value::String(_) | Value::Array(_)) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "'prompt' must be a string or an array",
        );
    }
    let permit = slot(&s).await;
    let b = s.behaviour.read().clone();
    let fault = draw(&s, &b, req.stream);
    if let Some(r) = openai_fault(fault, &b).await {
        return r;
    }
    let n = s.counter.fetch_add(1, Ordering::Relaxed);
    let id = format!("cmpl-{}-{n}", s.config.name);
    let limit = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let out = limit.min(b.output_tokens);
    let finish = if out < b.output_tokens {
        "length"
    } else {
        "stop"
    };
    let tokens = answer_tokens(&s.config.name, out);
    let prompt_tokens = prompt_tokens(&req.prompt);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": out,
        "total_tokens": prompt_tokens + out,
    });
    let created = now();
    let model = deployment.unwrap_or(req.model);
    tokio::time::sleep(Duration::from_millis(b.ttft_ms)).await;
    if !req.stream {
        let text: String = tokens.concat();
        s.completions.lock().insert(id.clone(), text.clone());
        s.completed.fetch_add(1, Ordering::Relaxed);
        drop(permit);
        drop(guard);
        return Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        }))
        .into_response();
    }
    let eol = b.sse_line_ending;
    let chunk = |text: &str, finish: Value| {
        let v = json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]});
        Bytes::from(eol.event(&v.to_string()))
    };
    let events = tokens
        .into_iter()
        .map(|t| (chunk(&t, Value::Null), t))
        .collect();
    let mut tail = vec![chunk("", json!(finish))];
    if req.stream_options.is_some_and(|o| o.include_usage) {
        let v = json!({"id": id, "object": "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage});
        tail.push(Bytes::from(eol.event(&v.to_string())));
    }
    tail.push(Bytes::from(eol.event("[DONE]")));
    let script = Script {
        id: id.clone(),
        head: Vec::new(),
        tokens: events,
        tail,
        keep_alive: Bytes::from(eol.comment("keep-alive")),
    };
    stream(s, b, fault, (guard, permit), script)
}
