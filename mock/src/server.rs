//! The mock's HTTP server: the OpenAI routes, the admin routes, and the
//! bookkeeping tests read back.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::behaviour::{answer_tokens, Behaviour, Fault};

/// How many produced completions are kept for `/admin/completions/{id}`.
const KEPT_COMPLETIONS: usize = 20_000;

#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Names the mock in answers, ids and logs.
    pub name: String,
    pub tier: String,
    /// Models listed on `/v1/models`; requests for others still get answers,
    /// because a proxy's job is to not send them.
    pub models: Vec<String>,
    pub behaviour: Behaviour,
    /// Requests served at once; more wait in a queue (counted in
    /// `vllm:num_requests_waiting`), so latency grows under overload as on a
    /// real GPU server. `None`: no limit.
    pub capacity: Option<u32>,
    /// When set, chat completions and the model list without
    /// `Authorization: Bearer <key>` get a 401, as a hosted provider
    /// answers a wrong key.
    pub api_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MockError {
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

struct Shared {
    config: MockConfig,
    behaviour: RwLock<Behaviour>,
    counter: AtomicU64,
    requests: AtomicU64,
    completed: AtomicU64,
    in_flight: AtomicU64,
    /// Requests queued for a slot; part of `in_flight`.
    waiting: AtomicU64,
    slots: Option<Arc<tokio::sync::Semaphore>>,
    faults: Mutex<HashMap<&'static str, u64>>,
    /// Chat completions refused for a missing or wrong key.
    unauthorized: AtomicU64,
    /// `GET /v1/models` calls (health probes make them), and those of
    /// them refused for a missing or wrong key.
    models: AtomicU64,
    models_unauthorized: AtomicU64,
    /// `GET /health` calls.
    health: AtomicU64,
    completions: Mutex<Kept>,
    /// TLS connections accepted (handshakes completed); 0 in plain text.
    tls_connections: Arc<AtomicU64>,
}

#[derive(Default)]
struct Kept {
    by_id: HashMap<String, String>,
    order: VecDeque<String>,
}

impl Kept {
    fn insert(&mut self, id: String, content: String) {
        if self.order.len() >= KEPT_COMPLETIONS {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.by_id.insert(id, content);
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MockError> {
    let (app, _) = router(config);
    // Without TCP_NODELAY, streamed tokens (many small writes) wait on the
    // peer's delayed ACK: 40 ms stalls a real provider does not have.
    axum::serve(listener, app)
        .tcp_nodelay(true)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// The mock's routes over fresh state, and the count of TLS connections
/// accepted that `/admin/stats` shows (`serve_tls` counts them).
pub(crate) fn router(config: MockConfig) -> (Router, Arc<AtomicU64>) {
    let slots = config
        .capacity
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1) as usize)));
    let shared = Arc::new(Shared {
        behaviour: RwLock::new(config.behaviour.clone()),
        waiting: AtomicU64::new(0),
        slots,
        config,
        counter: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        faults: Mutex::new(HashMap::new()),
        unauthorized: AtomicU64::new(0),
        models: AtomicU64::new(0),
        models_unauthorized: AtomicU64::new(0),
        health: AtomicU64::new(0),
        completions: Mutex::new(Kept::default()),
        tls_connections: Arc::default(),
    });
    let tls_connections = Arc::clone(&shared.tls_connections);
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/config", get(get_config).post(set_config))
        .route("/admin/stats", get(stats))
        .route("/admin/completions/:id", get(completion))
        .with_state(shared);
    (app, tls_connections)
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    messages: Vec<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

/// Decrements the in-flight gauge however the request ends, including when the
/// client goes away and the handler is dropped.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as queued until it gets a slot or its client leaves.
struct Waiting<'a>(&'a Shared);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits for a serving slot when the mock has a capacity; the slot is held
/// until the answer is complete.
async fn slot(s: &Shared) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let sem = s.slots.clone()?;
    s.waiting.fetch_add(1, Ordering::Relaxed);
    let _queued = Waiting(s);
    sem.acquire_owned().await.ok()
}

/// The 401 a hosted provider answers a missing or wrong key with, when
/// the mock has a key and `headers` do not carry it.
fn refuse_key(s: &Shared, headers: &axum::http::HeaderMap) -> Option<Response> {
    let key = s.config.api_key.as_ref()?;
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if sent == Some(key.as_str()) {
        return None;
    }
    let body = json!({"error": {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    Some((StatusCode::UNAUTHORIZED, Json(body)).into_response())
}

async fn chat(
    State(s): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_key(&s, &headers) {
        s.unauthorized.fetch_add(1, Ordering::Relaxed);
        return refused;
    }
    s.requests.fetch_add(1, Ordering::Relaxed);
    s.in_flight.fetch_add(1, Ordering::Relaxed);
    let guard = InFlight(s.clone());
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("mock could not parse the request: {e}"),
            )
        }
    };
    let permit = slot(&s).await;
    let b = s.behaviour.read().clone();
    let fault = b.fault(fastrand::f64(), req.stream);
    if fault != Fault::None {
        let name = match fault {
            Fault::Error500 => "500",
            Fault::Error429 => "429",
            Fault::Hang => "hang",
            Fault::DropMidStream => "drop_mid_stream",
            Fault::None => unreachable!(),
        };
        *s.faults.lock().entry(name).or_default() += 1;
    }
    match fault {
        Fault::Error500 => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "injected failure",
            )
        }
        Fault::Error429 => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "injected rate limit",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(b.retry_after_s));
            return r;
        }
        Fault::Hang => {
            futures::future::pending::<()>().await;
            unreachable!("pending never resolves");
        }
        _ => {}
    }

    let n = s.counter.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-{}-{n}", s.config.name);
    let limit = req.max_completion_tokens.or(req.max_tokens);
    let out = limit.map_or(b.output_tokens, |m| m.min(b.output_tokens));
    let finish = if out < b.output_tokens {
        "length"
    } else {
        "stop"
    };
    let tokens = answer_tokens(&s.config.name, out);
    let prompt_tokens = prompt_tokens(&req.messages);
    let completion_tokens = out + b.reasoning_tokens;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": { "cached_tokens": b.cached_tokens.min(prompt_tokens) },
        "completion_tokens_details": { "reasoning_tokens": b.reasoning_tokens },
    });
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());

    tokio::time::sleep(Duration::from_millis(b.ttft_ms)).await;
    if !req.stream {
        let content: String = tokens.concat();
        s.completions.lock().insert(id.clone(), content.clone());
        s.completed.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish, "logprobs": null}],
            "usage": usage,
        });
        drop(permit);
        drop(guard);
        return Json(body).into_response();
    }

    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let drop_at = (fault == Fault::DropMidStream).then_some(tokens.len() / 2);
    let stall_at = b.stall_after_tokens.map(|n| n as usize);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let model = req.model;
    tokio::spawn(async move {
        let _guard = guard;
        let _permit = permit;
        let eol = b.sse_line_ending;
        let chunk = |delta: Value, finish: Value| {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            Bytes::from(eol.event(&v.to_string()))
        };
        let mut sent = String::new();
        if tx
            .send(Ok(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )))
            .await
            .is_err()
        {
            return;
        }
        for (i, t) in tokens.iter().enumerate() {
            if drop_at == Some(i) {
                let _ = tx
                    .send(Err(std::io::Error::other("injected mid-stream drop")))
                    .await;
                return;
            }
            if stall_at == Some(i) {
                // Silent with the connection open, until the client
                // gives up on it (its body stream is dropped).
                *s.faults.lock().entry("stall").or_default() += 1;
                tx.closed().await;
                return;
            }
            if i > 0 && b.inter_token_ms > 0 {
                tokio::time::sleep(Duration::from_millis(b.inter_token_ms)).await;
            }
            if b.sse_keep_alive
                && tx
                    .send(Ok(Bytes::from(eol.comment("keep-alive"))))
                    .await
                    .is_err()
            {
                return;
            }
            sent.push_str(t);
            let event = chunk(json!({"content": t}), Value::Null);
            let pieces = if b.sse_split_events {
                split_event(event)
            } else {
                [event, Bytes::new()]
            };
            for (k, piece) in pieces.into_iter().enumerate() {
                if piece.is_empty() {
                    continue;
                }
                if k > 0 {
                    // Apart, so the proxy reads the halves separately.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                if tx.send(Ok(piece)).await.is_err() {
                    return;
                }
            }
        }
        s.completions.lock().insert(id.clone(), sent);
        s.completed.fetch_add(1, Ordering::Relaxed);
        let _ = tx.send(Ok(chunk(json!({}), json!(finish)))).await;
        if include_usage {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "usage": usage});
            let _ = tx.send(Ok(Bytes::from(eol.event(&v.to_string())))).await;
        }
        let _ = tx.send(Ok(Bytes::from(eol.event("[DONE]")))).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("static response parts")
}

/// An event cut in two where a proxy is most likely to get framing wrong:
/// between the CR and the LF of its first CRLF, else inside its data line.
fn split_event(event: Bytes) -> [Bytes; 2] {
    let at = event
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(event.len() / 2, |i| i + 1);
    [event.slice(..at), event.slice(at..)]
}

/// About four characters a token, which is what providers' own estimates use.
fn prompt_tokens(messages: &[Value]) -> u32 {
    let chars: usize = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(str::len)
        .sum();
    (chars / 4).max(1) as u32
}

async fn health(State(s): State<Arc<Shared>>) -> &'static str {
    s.health.fetch_add(1, Ordering::Relaxed);
    "ok"
}

/// Lists the models; wants the key when the mock has one, as OpenAI does.
async fn models(State(s): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    s.models.fetch_add(1, Ordering::Relaxed);
    if let Some(refused) = refuse_key(&s, &headers) {
        s.models_unauthorized.fetch_add(1, Ordering::Relaxed);
        return refused;
    }
    let data: Vec<Value> = s
        .config
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": s.config.name}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// vLLM's queue gauges, so the control plane can scrape a mock as it would
/// an on-prem server.
async fn metrics(State(s): State<Arc<Shared>>) -> String {
    let waiting = s.waiting.load(Ordering::Relaxed);
    let running = s.in_flight.load(Ordering::Relaxed).saturating_sub(waiting);
    // A stand-in for KV-cache use: the share of serving slots taken.
    let kv = s
        .config
        .capacity
        .map_or(0.0, |c| running as f64 / f64::from(c.max(1)));
    format!(
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running {running}\n\
         # TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting {waiting}\n\
         # TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc {kv}\n"
    )
}

async fn get_config(State(s): State<Arc<Shared>>) -> Json<Behaviour> {
    Json(s.behaviour.read().clone())
}

/// Merges a partial JSON object into the current behaviour.
async fn set_config(State(s): State<Arc<Shared>>, Json(patch): Json<Value>) -> Response {
    let mut current = serde_json::to_value(&*s.behaviour.read()).expect("behaviour serialises");
    let (Some(obj), Some(p)) = (current.as_object_mut(), patch.as_object()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "config must be a JSON object",
        );
    };
    for (k, v) in p {
        obj.insert(k.clone(), v.clone());
    }
    let next: Behaviour = match serde_json::from_value(current) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &e.to_string(),
            )
        }
    };
    if let Err(e) = next.validate() {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", &e);
    }
    tracing::info!(mock = %s.config.name, config = ?next, "behaviour changed");
    *s.behaviour.write() = next.clone();
    Json(next).into_response()
}

async fn stats(State(s): State<Arc<Shared>>) -> Json<Value> {
    let faults = s.faults.lock().clone();
    Json(json!({
        "name": s.config.name,
        "tier": s.config.tier,
        "requests": s.requests.load(Ordering::Relaxed),
        "completed": s.completed.load(Ordering::Relaxed),
        "in_flight": s.in_flight.load(Ordering::Relaxed),
        "waiting": s.waiting.load(Ordering::Relaxed),
        "capacity": s.config.capacity,
        "faults": faults,
        "unauthorized": s.unauthorized.load(Ordering::Relaxed),
        "models": s.models.load(Ordering::Relaxed),
        "models_unauthorized": s.models_unauthorized.load(Ordering::Relaxed),
        "health": s.health.load(Ordering::Relaxed),
        "tls_connections": s.tls_connections.load(Ordering::Relaxed),
    }))
}

async fn completion(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let content = s.completions.lock().by_id.get(&id).cloned();
    match content {
        Some(c) => Json(json!({"id": id, "content": c})).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "no such completion"),
    }
}
