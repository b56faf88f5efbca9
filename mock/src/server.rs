//! The mock's HTTP server: the OpenAI routes, the admin routes, and the
//! bookkeeping tests read back. The other APIs' routes are in the child
//! modules, which share the bookkeeping, the faults and the streaming here.

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

use crate::behaviour::{answer_tokens, Api, Behaviour, Fault};

mod anthropic;
mod azure;
mod completions;
mod embeddings;
#[cfg(test)]
mod tests;

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
    /// The API it speaks.
    pub api: Api,
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
    /// Requests per route beside chat completions (all counted in
    /// `requests` too): Anthropic's messages, embeddings, legacy
    /// completions.
    messages: AtomicU64,
    embeddings: AtomicU64,
    text_completions: AtomicU64,
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
        messages: AtomicU64::new(0),
        embeddings: AtomicU64::new(0),
        text_completions: AtomicU64::new(0),
        completions: Mutex::new(Kept::default()),
        tls_connections: Arc::default(),
    });
    let tls_connections = Arc::clone(&shared.tls_connections);
    let app = api_routes(shared.config.api)
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/config", get(get_config).post(set_config))
        .route("/admin/stats", get(stats))
        .route("/admin/completions/:id", get(completion))
        .with_state(shared);
    (app, tls_connections)
}

/// The routes of the API the mock speaks.
fn api_routes(api: Api) -> Router<Arc<Shared>> {
    match api {
        Api::OpenAi => Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions::openai))
            .route("/v1/embeddings", post(embeddings::openai)),
        Api::Azure => Router::new()
            .route(
                "/openai/deployments/:deployment/chat/completions",
                post(azure::chat),
            )
            .route(
                "/openai/deployments/:deployment/completions",
                post(azure::completions),
            )
            .route(
                "/openai/deployments/:deployment/embeddings",
                post(azure::embeddings),
            ),
        Api::Anthropic => Router::new().route("/v1/messages", post(anthropic::messages)),
    }
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
    #[serde(default)]
    tools: Vec<Value>,
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
    openai_chat(s, body, None).await
}

/// Counts a request in and returns the guard that counts it out.
fn start(s: &Arc<Shared>) -> InFlight {
    s.requests.fetch_add(1, Ordering::Relaxed);
    s.in_flight.fetch_add(1, Ordering::Relaxed);
    InFlight(s.clone())
}

/// Draws the fault for one request and counts it.
fn draw(s: &Shared, b: &Behaviour, streamed: bool) -> Fault {
    let fault = b.fault(fastrand::f64(), streamed);
    let name = match fault {
        Fault::None => return fault,
        Fault::Error500 => "500",
        Fault::Error429 => "429",
        Fault::Overloaded => "overloaded",
        Fault::OverloadedMidStream => "overloaded_mid_stream",
        Fault::Hang => "hang",
        Fault::DropMidStream => "drop_mid_stream",
    };
    *s.faults.lock().entry(name).or_default() += 1;
    fault
}

/// The answer to a fault drawn before the answer begins, in OpenAI's
/// shape; hangs forever for a hang. `None`: answer normally.
async fn openai_fault(fault: Fault, b: &Behaviour) -> Option<Response> {
    match fault {
        Fault::Error500 => Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "injected failure",
        )),
        Fault::Error429 => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "injected rate limit",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(b.retry_after_s));
            Some(r)
        }
        Fault::Overloaded | Fault::OverloadedMidStream => Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "injected overload: the server is overloaded or not ready yet",
        )),
        Fault::Hang => {
            futures::future::pending::<()>().await;
            unreachable!("pending never resolves");
        }
        Fault::None | Fault::DropMidStream => None,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The input the mock gives the tool it calls, and the pieces it streams
/// it in (joined, the same JSON as the input serialised compactly, so a
/// translated answer and a native one say the same).
const TOOL_INPUT: &str = r#"{"location":"Paris"}"#;
const TOOL_INPUT_PIECES: [&str; 3] = [r#"{"location""#, r#":"Par"#, r#"is"}"#];

/// The name of the tool the mock calls: the first one offered, unless the
/// conversation already ends with a tool's result (then it answers in
/// text).
fn tool_to_call(
    tools: &[Value],
    name_of: impl Fn(&Value) -> Option<&str>,
    answered: bool,
) -> Option<String> {
    if answered {
        return None;
    }
    tools.first().and_then(name_of).map(str::to_owned)
}

/// A chat completion in OpenAI's shape; `deployment` (Azure) names the
/// model in the answer instead of the request's `model`.
async fn openai_chat(s: Arc<Shared>, body: Bytes, deployment: Option<String>) -> Response {
    let guard = start(&s);
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
    let fault = draw(&s, &b, req.stream);
    if let Some(r) = openai_fault(fault, &b).await {
        return r;
    }

    let n = s.counter.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-{}-{n}", s.config.name);
    let answered = req
        .messages
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        == Some("tool");
    let tool = tool_to_call(
        &req.tools,
        |t| t.get("function")?.get("name")?.as_str(),
        answered,
    );
    let limit = req.max_completion_tokens.or(req.max_tokens);
    let out = limit.map_or(b.output_tokens, |m| m.min(b.output_tokens));
    let (finish, tokens) = match &tool {
        Some(_) => (
            "tool_calls",
            TOOL_INPUT_PIECES.iter().map(|p| p.to_string()).collect(),
        ),
        None if out < b.output_tokens => ("length", answer_tokens(&s.config.name, out)),
        None => ("stop", answer_tokens(&s.config.name, out)),
    };
    let prompt_tokens = prompt_tokens(&req.messages, None);
    let completion_tokens = tokens.len() as u32 + b.reasoning_tokens;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": { "cached_tokens": b.cached_tokens.min(prompt_tokens) },
        "completion_tokens_details": { "reasoning_tokens": b.reasoning_tokens },
    });
    let created = now();
    let model = deployment.unwrap_or(req.model);
    let call_id = format!("call_{}_{n}", s.config.name);

    tokio::time::sleep(Duration::from_millis(b.ttft_ms)).await;
    if !req.stream {
        let content: String = tokens.concat();
        s.completions.lock().insert(id.clone(), content.clone());
        s.completed.fetch_add(1, Ordering::Relaxed);
        let message = match &tool {
            Some(name) => json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": TOOL_INPUT}}]}),
            None => json!({"role": "assistant", "content": content}),
        };
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
            "usage": usage,
        });
        drop(permit);
        drop(guard);
        return Json(body).into_response();
    }

    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let eol = b.sse_line_ending;
    let chunk = |delta: Value, finish: Value| {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        Bytes::from(eol.event(&v.to_string()))
    };
    let mut head = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let events = match &tool {
        Some(name) => {
            head.push(chunk(
                json!({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                Value::Null,
            ));
            tokens
                .into_iter()
                .map(|t| {
                    let delta = json!({"tool_calls": [{"index": 0, "function": {"arguments": t}}]});
                    (chunk(delta, Value::Null), t)
                })
                .collect()
        }
        None => tokens
            .into_iter()
            .map(|t| (chunk(json!({"content": t}), Value::Null), t))
            .collect(),
    };
    let mut tail = vec![chunk(json!({}), json!(finish))];
    if include_usage {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage});
        tail.push(Bytes::from(eol.event(&v.to_string())));
    }
    tail.push(Bytes::from(eol.event("[DONE]")));
    let script = Script {
        id: id.clone(),
        head,
        tokens: events,
        tail,
        keep_alive: Bytes::from(eol.comment("keep-alive")),
    };
    stream(s, b, fault, (guard, permit), script)
}

/// A streamed answer as a handler scripts it: `head` events first, then
/// one event per token (beside it, the text it adds to the completion
/// recorded under `id`), paced and faulted as the behaviour says, then
/// `tail` once the completion is recorded.
struct Script {
    id: String,
    head: Vec<Bytes>,
    tokens: Vec<(Bytes, String)>,
    tail: Vec<Bytes>,
    /// Sent before every token when `sse_keep_alive` is on.
    keep_alive: Bytes,
}

/// Plays `script` as an event stream; `held` (the in-flight count and the
/// serving slot) is let go when the stream ends.
fn stream(
    s: Arc<Shared>,
    b: Behaviour,
    fault: Fault,
    held: (InFlight, Option<tokio::sync::OwnedSemaphorePermit>),
    script: Script,
) -> Response {
    let drop_at = (fault == Fault::DropMidStream).then_some(script.tokens.len() / 2);
    let stall_at = b.stall_after_tokens.map(|n| n as usize);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let _held = held;
        for event in script.head {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        let mut sent = String::new();
        for (i, (event, text)) in script.tokens.into_iter().enumerate() {
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
            if b.sse_keep_alive && tx.send(Ok(script.keep_alive.clone())).await.is_err() {
                return;
            }
            sent.push_str(&text);
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
        s.completions.lock().insert(script.id, sent);
        s.completed.fetch_add(1, Ordering::Relaxed);
        for event in script.tail {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
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

/// The characters of prompt text in a message's `content` (or a
/// `system`): a string, or parts and blocks holding text (OpenAI's text
/// parts, Anthropic's text blocks and tool results), so a conversation
/// counts the same in either API's shape.
fn text_chars(content: &Value) -> usize {
    match content {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| {
                let text = p.get("text").and_then(Value::as_str).map_or(0, str::len);
                let result = match p.get("type").and_then(Value::as_str) {
                    Some("tool_result") => p.get("content").map_or(0, text_chars),
                    _ => 0,
                };
                text + result
            })
            .sum(),
        _ => 0,
    }
}

/// About four characters a token, which is what providers' own estimates
/// use; `system`: Anthropic's system prompt, counted as OpenAI's system
/// messages are.
fn prompt_tokens(messages: &[Value], system: Option<&Value>) -> u32 {
    let chars: usize = messages
        .iter()
        .filter_map(|m| m.get("content"))
        .chain(system)
        .map(text_chars)
        .sum();
    (chars / 4).max(1) as u32
}

async fn health(State(s): State<Arc<Shared>>) -> &'static str {
    s.health.fetch_add(1, Ordering::Relaxed);
    "ok"
}

/// Lists the models; wants the key when the mock has one, as OpenAI does
/// (as a bearer token, or in the header of the API the mock speaks, so a
/// health probe may send either).
async fn models(State(s): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    s.models.fetch_add(1, Ordering::Relaxed);
    let own_header = match s.config.api {
        Api::OpenAi => None,
        Api::Azure => Some("api-key"),
        Api::Anthropic => Some("x-api-key"),
    };
    let own_key_ok = own_header.is_some_and(|h| {
        headers.get(h).and_then(|v| v.to_str().ok()) == s.config.api_key.as_deref()
    });
    if let Some(refused) = refuse_key(&s, &headers).filter(|_| !own_key_ok) {
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
        "api": s.config.api.as_str(),
        "messages": s.messages.load(Ordering::Relaxed),
        "embeddings": s.embeddings.load(Ordering::Relaxed),
        "completions": s.text_completions.load(Ordering::Relaxed),
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
