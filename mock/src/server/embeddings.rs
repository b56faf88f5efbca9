//! `POST /v1/embeddings`: eight numbers per input, the same for the same
//! input on every mock (a hash of it), so a test can tell inputs apart and
//! compare answers across providers.

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

use super::{draw, error, openai_fault, refuse_key, slot, start, Shared};

/// Numbers in each embedding.
pub(super) const DIMENSIONS: usize = 8;

#[derive(Deserialize)]
struct Request {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// One input: text, or token ids.
enum Input {
    Text(String),
    Tokens(Vec<u64>),
}

impl Input {
    fn tokens(&self) -> u32 {
        match self {
            Input::Text(t) => (t.len() / 4).max(1) as u32,
            Input::Tokens(t) => t.len() as u32,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Input::Text(t) => t.as_bytes().to_vec(),
            Input::Tokens(t) => t.iter().flat_map(|n| n.to_le_bytes()).collect(),
        }
    }
}

fn token_ids(v: &[Value]) -> Option<Vec<u64>> {
    v.iter().map(Value::as_u64).collect()
}

/// `input` as OpenAI takes it: a string, strings, token ids, or lists of
/// token ids.
fn inputs(v: &Value) -> Result<Vec<Input>, String> {
    match v {
        Value::String(s) => Ok(vec![Input::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => Err("'input' must not be empty".into()),
        Value::Array(items) if items.iter().all(Value::is_number) => token_ids(items)
            .map(|t| vec![Input::Tokens(t)])
            .ok_or_else(|| "token ids must be non-negative integers".into()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(Input::Text(s.clone())),
                Value::Array(t) => token_ids(t)
                    .map(Input::Tokens)
                    .ok_or_else(|| "token ids must be non-negative integers".into()),
                _ => Err("each input must be a string or a list of token ids".into()),
            })
            .collect(),
        _ => Err("'input' must be a string or an array".into()),
    }
}

/// FNV-1a, then a xorshift stream from it: unit length, as OpenAI's are.
pub(super) fn embedding(input: &[u8]) -> [f32; DIMENSIONS] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in input {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut x = h | 1;
    let mut v = [0f32; DIMENSIONS];
    for e in &mut v {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *e = (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
    }
    let norm = v
        .iter()
        .map(|e| e * e)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.map(|e| e / norm)
}

/// Standard base64 with padding, for `encoding_format: "base64"` (what
/// OpenAI's Python client asks for by default).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(ALPHABET[(n >> shift) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
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

/// The embeddings answer; `deployment` (Azure) names the model.
pub(super) async fn answer(s: Arc<Shared>, body: Bytes, deployment: Option<String>) -> Response {
    let _guard = start(&s);
    s.embeddings.fetch_add(1, Ordering::Relaxed);
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, "invalid_request_error", m);
    let req: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(&format!("mock could not parse the request: {e}")),
    };
    let items = match inputs(&req.input) {
        Ok(i) => i,
        Err(e) => return bad(&e),
    };
    let base64_wanted = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return bad(&format!("unknown encoding_format {other:?}")),
    };
    let _permit = slot(&s).await;
    let b = s.behaviour.read().clone();
    let fault = draw(&s, &b, false);
    if let Some(r) = openai_fault(fault, &b).await {
        return r;
    }
    tokio::time::sleep(Duration::from_millis(b.ttft_ms)).await;
    let prompt_tokens: u32 = items.iter().map(Input::tokens).sum();
    let data: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let e = embedding(&item.bytes());
            let embedding = if base64_wanted {
                let bytes: Vec<u8> = e.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(e)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    s.completed.fetch_add(1, Ordering::Relaxed);
    Json(json!({
        "object": "list",
        "data": data,
        "model": deployment.unwrap_or(req.model),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_unit_vectors_that_tell_inputs_apart() {
        let a = embedding(b"hello");
        assert_eq!(a, embedding(b"hello"));
        assert_ne!(a, embedding(b"hellp"));
        let norm: f32 = a.iter().map(|e| e * e).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert!(a.iter().all(|e| e.is_finite()));
    }

    #[test]
    fn base64_is_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
