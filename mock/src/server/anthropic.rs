//! Anthropic's Messages API: `POST /v1/messages` with `x-api-key` and
//! `anthropic-version`, answered in Anthropic's shapes, streamed as its
//! events (`message_start`, `ping`, `content_block_*`, `message_delta`,
//! `message_stop`). Same answer tokens, faults, pacing and bookkeeping as
//! the OpenAI routes, so a test can compare what the app got through a
//! translating sidecar with what it gets from an OpenAI mock.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    answer_tokens, draw, prompt_tokens, slot, start, stream, tool_to_call, Fault, Script, Shared,
    TOOL_INPUT, TOOL_INPUT_PIECES,
};
use crate::behaviour::LineEnding;

#[derive(Deserialize)]
struct Request {
    model: String,
    max_tokens: Option<u32>,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Vec<Value>,
}

/// Anthropic's error shape.
fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, Json(body)).into_response()
}

/// One event as Anthropic writes it: its type named on an `event` line too.
fn event(eol: LineEnding, kind: &str, data: &Value) -> Bytes {
    let e = eol.as_str();
    Bytes::from(format!("event: {kind}{e}data: {data}{e}{e}"))
}

/// Whether the conversation ends with the user handing back tool results.
fn answered(messages: &[Value]) -> bool {
    let Some(last) = messages.last() else {
        return false;
    };
    last.get("role").and_then(Value::as_str) == Some("user")
        && last
            .get("content")
            .and_then(Value::as_array)
            .is_some_and(|blocks| {
                blocks
                    .iter()
                    .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            })
}

pub(super) async fn messages(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(key) = s.config.api_key.as_deref() {
        if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(key) {
            s.unauthorized.fetch_add(1, Ordering::Relaxed);
            return anthropic_error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            );
        }
    }
    if headers.get("anthropic-version").is_none() {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let guard = start(&s);
    s.messages.fetch_add(1, Ordering::Relaxed);
    let req: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return anthropic_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("mock could not parse the request: {e}"),
            )
        }
    };
    let Some(max_tokens) = req.max_tokens else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens: Field required",
        );
    };
    let permit = slot(&s).await;
    let b = s.behaviour.read().clone();
    let fault = draw(&s, &b, req.stream);
    match fault {
        Fault::Error500 => {
            return anthropic_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "injected failure",
            )
        }
        Fault::Error429 => {
            let mut r = anthropic_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "injected rate limit",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(b.retry_after_s));
            return r;
        }
        Fault::Overloaded => {
            let status = StatusCode::from_u16(529).expect("529 is a valid status");
            return anthropic_error(status, "overloaded_error", "Overloaded");
        }
        Fault::Hang => {
            futures::future::pending::<()>().await;
            unreachable!("pending never resolves");
        }
        Fault::None | Fault::DropMidStream | Fault::OverloadedMidStream => {}
    }

    let n = s.counter.fetch_add(1, Ordering::Relaxed);
    let id = format!("msg_{}-{n}", s.config.name);
    let tool = tool_to_call(
        &req.tools,
        |t| t.get("name")?.as_str(),
        answered(&req.messages),
    );
    let out = max_tokens.min(b.output_tokens);
    let (stop_reason, tokens) = match &tool {
        Some(_) => (
            "tool_use",
            TOOL_INPUT_PIECES.iter().map(|p| p.to_string()).collect(),
        ),
        None if out < b.output_tokens => ("max_tokens", answer_tokens(&s.config.name, out)),
        None => ("end_turn", answer_tokens(&s.config.name, out)),
    };
    // Anthropic's input_tokens leaves out what was read from or written
    // to the cache; all three add up to the prompt.
    let prompt = prompt_tokens(&req.messages, req.system.as_ref());
    let cache_read = b.cached_tokens.min(prompt);
    let cache_write = b.cache_write_tokens.min(prompt - cache_read);
    let input = prompt - cache_read - cache_write;
    let output_tokens = tokens.len() as u32 + b.reasoning_tokens;
    let tool_id = format!("toolu_{}_{n}", s.config.name);
    let model = req.model;

    tokio::time::sleep(Duration::from_millis(b.ttft_ms)).await;
    if !req.stream {
        let text: String = tokens.concat();
        s.completions.lock().insert(id.clone(), text.clone());
        s.completed.fetch_add(1, Ordering::Relaxed);
        let input_json: Value = serde_json::from_str(TOOL_INPUT).expect("the tool input is JSON");
        let content = match &tool {
            Some(name) => {
                json!([{"type": "tool_use", "id": tool_id, "name": name, "input": input_json}])
            }
            None if text.is_empty() => json!([]),
            None => json!([{"type": "text", "text": text}]),
        };
        let body = json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": input, "cache_creation_input_tokens": cache_write,
                      "cache_read_input_tokens": cache_read, "output_tokens": output_tokens},
        });
        drop(permit);
        drop(guard);
        return Json(body).into_response();
    }

    let eol = b.sse_line_ending;
    let block = match &tool {
        Some(name) => json!({"type": "tool_use", "id": tool_id, "name": name, "input": {}}),
        None => json!({"type": "text", "text": ""}),
    };
    let head = vec![
        event(
            eol,
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input, "cache_creation_input_tokens": cache_write,
                          "cache_read_input_tokens": cache_read, "output_tokens": 1}}}),
        ),
        event(
            eol,
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": block}),
        ),
        event(eol, "ping", &json!({"type": "ping"})),
    ];
    let events = tokens
        .into_iter()
        .map(|t| {
            let delta = if tool.is_some() {
                json!({"type": "input_json_delta", "partial_json": t})
            } else {
                json!({"type": "text_delta", "text": t})
            };
            let e = event(
                eol,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": delta}),
            );
            (e, t)
        })
        .collect();
    let tail = vec![
        event(
            eol,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
        event(
            eol,
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": {"output_tokens": output_tokens}}),
        ),
        event(eol, "message_stop", &json!({"type": "message_stop"})),
    ];
    // Overloaded once the stream began: its start, then the error event,
    // and the stream ends.
    let (head, events, tail) = if fault == Fault::OverloadedMidStream {
        let mut head = head;
        head.truncate(1);
        head.push(event(eol, "ping", &json!({"type": "ping"})));
        head.push(event(
            eol,
            "error",
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ));
        (head, Vec::new(), Vec::new())
    } else {
        (head, events, tail)
    };
    let script = Script {
        id,
        head,
        tokens: events,
        tail,
        // Anthropic keeps idle streams open with pings.
        keep_alive: event(eol, "ping", &json!({"type": "ping"})),
    };
    stream(s, b, fault, (guard, permit), script)
}
