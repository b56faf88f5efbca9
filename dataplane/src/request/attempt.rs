//! One attempt, the fourth stage: send the request to one endpoint through
//! pingora's pooled connector and wait for the response header and the
//! first body chunk.
//!
//! The sidecar owns the upstream exchange rather than handing it to
//! pingora's proxy phase because pingora replays at most 64 KiB of a request
//! body it has already read (LLM prompts are often larger), and because an
//! attempt only counts as answered once its first token arrived: until then
//! a failure can still move to another endpoint without the app seeing
//! anything. The request is built here in the endpoint's API: its path
//! (Azure's deployment paths), its credential header, its own model id, and
//! for Anthropic's Messages API a translated body.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header;
use parking_lot::Mutex;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession;
use pingora::time::fast_timeout::fast_timeout;
use pingora::ErrorType;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::health::EndpointState;
use crate::retry::RetryBudget;
use crate::shed::Admission;
use crate::table::Endpoint;
use crate::usage::ErrorKind;
use switchyard_policy::ApiKind;
use switchyard_wire::anthropic;
use switchyard_wire::operation::Operation;
use switchyard_wire::usage::Tokens;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AttemptError {
    #[error("connecting: {0}")]
    Connect(String),
    #[error("no first token within {0:?}")]
    Timeout(Duration),
    /// The exchange broke; `stale` when it ran on a pooled connection the
    /// upstream had already closed, which is safe to retry.
    #[error("upstream exchange failed: {reason}")]
    Broken { reason: String, stale: bool },
    /// The provider answered with an error worth retrying elsewhere (5xx,
    /// 429) before anything reached the app.
    #[error("upstream answered {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The request cannot be said in the endpoint's API (e.g. `n` > 1 for
    /// Anthropic's); another endpoint may take it as it is.
    #[error("the request cannot be translated for this endpoint: {0}")]
    Untranslatable(String),
}

impl AttemptError {
    /// The failure as the endpoint's health counts it; `None` when the
    /// endpoint is not at fault (nothing was sent to it).
    pub fn kind(&self) -> Option<ErrorKind> {
        Some(match self {
            AttemptError::Connect(_) => ErrorKind::Connect,
            AttemptError::Timeout(_) => ErrorKind::Timeout,
            AttemptError::Broken { .. } => ErrorKind::Broken,
            AttemptError::Status { status: 429, .. } => ErrorKind::Status429,
            AttemptError::Status { .. } => ErrorKind::Status5xx,
            AttemptError::Untranslatable(_) => return None,
        })
    }

    /// Failed on a pooled connection the provider had closed.
    pub fn stale(&self) -> bool {
        matches!(self, AttemptError::Broken { stale: true, .. })
    }
}

/// An upstream that answered: its header, and its first body chunk unless
/// the body was empty.
pub struct Opened {
    /// Boxed: the session is large, and an answer moves through several
    /// stages (and futures) before the relay ends.
    pub session: Box<HttpSession>,
    pub header: ResponseHeader,
    pub head: Head,
    pub ttft: Duration,
}

/// What the attempt read of the answer's body.
pub enum Head {
    /// Its first chunk as the provider sent it; none for an empty body.
    Plain(Option<Bytes>),
    /// The whole answer, translated to OpenAI's shape, with its usage (see
    /// [`translate_whole`]).
    Whole(Bytes, Option<Tokens>),
    /// A stream in another API, translated up to its first token (see
    /// [`translate_until_begun`]); the translation goes on in the relay.
    Stream(Bytes, Box<anthropic::Stream>),
}

/// A whole answer held for translation may be at most this long.
const MAX_TRANSLATED: usize = 16 << 20;

/// One in-flight slot on an endpoint; frees a queued request when dropped.
pub struct Slot<'a> {
    state: &'a EndpointState,
    queue: &'a Admission,
}

impl<'a> Slot<'a> {
    fn take(state: &'a EndpointState, queue: &'a Admission) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self { state, queue }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        // SeqCst: pairs with the queue publishing a waiter before it looks
        // at in-flight counts, so a freed slot is never missed.
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.queue.freed();
    }
}

/// How one attempt ended: answered (with the slot it holds until the relay
/// ends), or failed after some time.
pub type AttemptResult<'a> = Result<(Opened, Slot<'a>), (AttemptError, Duration)>;

/// What every attempt of one request shares: `'a` is what outlives the
/// attempt (the sidecar, the table), `'r` the request's own header and body.
pub struct Attempt<'a, 'r> {
    pub connections: &'a crate::pool::Connections,
    pub queue: &'a Admission,
    pub metrics: &'a crate::metrics::Metrics,
    pub retry: &'a Mutex<RetryBudget>,
    /// The app's request header, as it came.
    pub app: &'r RequestHeader,
    pub op: Operation,
    /// The (logical) model the body asks for.
    pub model: &'r str,
    /// `max_tokens` for APIs that require one, when the body has none.
    pub default_max_tokens: u32,
    pub body: &'r Bytes,
    pub ttft: Duration,
    pub deadline: Instant,
    /// Highest class priority in the table: the request's share of the
    /// queue when a fallback has to wait for capacity.
    pub max_priority: u32,
}

impl<'a> Attempt<'a, '_> {
    /// Runs one attempt at `ep`.
    pub async fn run(&self, ep: &'a Endpoint) -> AttemptResult<'a> {
        let slot = Slot::take(&ep.state, self.queue);
        let start = Instant::now();
        let ttft_deadline = (start + self.ttft).min(self.deadline);
        let request = match self.request_for(ep) {
            Ok(r) => r,
            Err(e) => return Err((e, start.elapsed())),
        };
        match open(self.connections, ep, request, start, ttft_deadline).await {
            Ok(o) => Ok((o, slot)),
            Err(e) => Err((e, start.elapsed())),
        }
    }
}

impl Attempt<'_, '_> {
    /// The request for `ep`, in its API.
    fn request_for(&self, ep: &Endpoint) -> Result<BytesMut, AttemptError> {
        let id = ep.model_id(self.model).unwrap_or(self.model);
        let path = ep.paths.get(self.op, id);
        let body = match ep.api {
            // The endpoint's own name for the model, if it has one: a copy
            // of the body for the endpoints that need it, none for the
            // others. Azure reads the model from the deployment path.
            ApiKind::Openai if !ep.model_ids.is_empty() => {
                switchyard_wire::chat::map_model(self.body, |m| ep.model_id(m))
            }
            ApiKind::Openai | ApiKind::Azure => None,
            ApiKind::Anthropic => Some(
                switchyard_wire::anthropic::request(self.body, id, self.default_max_tokens)
                    .map_err(|e| AttemptError::Untranslatable(e.to_string()))?,
            ),
        };
        Ok(upstream_request(
            self.app,
            ep,
            &path,
            body.as_deref().unwrap_or(self.body),
        ))
    }
}

fn is_connect(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::BindError
            | ErrorType::SocketError
    )
}

/// A connection that could not be made, said as an operator reads it: the
/// endpoint, and what failed. A refused TLS handshake (a certificate the
/// endpoint's trust anchors do not vouch for, or not for its name; a
/// client certificate it refused) is a setup fault no retry mends, so it
/// is logged as a warning; like any connect failure it moves the request
/// to the next endpoint.
fn connect_failed(ep: &Endpoint, e: &pingora::Error) -> AttemptError {
    let tls = matches!(
        e.etype(),
        ErrorType::TLSHandshakeFailure
            | ErrorType::TLSWantX509Lookup
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError
    );
    let text = e.to_string();
    if tls {
        let cause = tls_cause(&text);
        tracing::warn!(endpoint = %ep.name, server_name = %ep.peer.sni, error = %cause,
            "TLS handshake with the endpoint failed");
        AttemptError::Connect(format!(
            "endpoint {:?}: TLS handshake with {} failed: {cause}",
            &*ep.name, ep.peer.sni
        ))
    } else {
        AttemptError::Connect(format!("endpoint {:?}: {}", &*ep.name, text.trim()))
    }
}

/// What a refused handshake's error says TLS refused. pingora renders it
/// as a chain (`TLS connect() failed:  TLSHandshakeFailure context: ...
/// cause: invalid peer certificate: UnknownIssuer, SNI: host cause: local
/// address ...`); the last cause before the SNI is rustls's own words. A
/// rendering of another shape is kept whole.
fn tls_cause(text: &str) -> &str {
    let t = text
        .rsplit_once(" cause: local address")
        .map_or(text, |(t, _)| t);
    let t = t.rsplit_once(", SNI: ").map_or(t, |(t, _)| t);
    t.rsplit_once(" cause: ").map_or(t, |(_, c)| c).trim()
}

/// Sends `request` (head and body, see [`upstream_request`]) to `ep` and
/// waits for the first body chunk until `ttft_deadline`.
async fn open(
    connections: &crate::pool::Connections,
    ep: &Endpoint,
    request: BytesMut,
    started: Instant,
    ttft_deadline: Instant,
) -> Result<Opened, AttemptError> {
    let wait = ttft_deadline.saturating_duration_since(started);
    // One timer for the whole exchange, connect included.
    let exchange = async {
        let (mut stream, reused) = connections
            .get(&ep.state.idle, &ep.peer)
            .await
            .map_err(|e| connect_failed(ep, &e))?;
        // Named, so the app's error says which endpoint failed (a TLS 1.3
        // server refuses a missing client certificate only here, after
        // the handshake).
        let broken = |e: Box<pingora::Error>| {
            if is_connect(&e) {
                AttemptError::Connect(format!("endpoint {:?}: {e}", &*ep.name))
            } else {
                AttemptError::Broken {
                    reason: format!("endpoint {:?}: {e}", &*ep.name),
                    stale: reused,
                }
            }
        };
        // The request goes out in one write, head and body together:
        // pingora's client would send the head and the body in two, and
        // on loopback each send costs the sender the receiver's TCP work.
        crate::rtt::observe_upstream(&stream, &ep.peer, reused);
        let sent = async {
            stream.write_all(&request).await?;
            stream.flush().await
        };
        sent.await.map_err(|e| AttemptError::Broken {
            reason: format!("sending the request: {e}"),
            stale: reused,
        })?;
        let mut session = Box::new(HttpSession::new_with_options(stream, &ep.peer));
        // Interim answers (100, 103) come before the real one.
        loop {
            session.read_response().await.map_err(broken)?;
            let interim = session
                .resp_header()
                .map(|h| h.status.as_u16())
                .is_some_and(|s| (100..200).contains(&s) && s != 101);
            if !interim {
                break;
            }
        }
        if let Some(h) = session.resp_header() {
            let status = h.status.as_u16();
            if status == 429 || status >= 500 {
                return Err(AttemptError::Status {
                    status,
                    retry_after: retry_after(h),
                });
            }
        }
        // Past this point the upstream spoke, so a failure is no longer a
        // stale pooled connection.
        let first = session
            .read_body_bytes()
            .await
            .map_err(|e| AttemptError::Broken {
                reason: e.to_string(),
                stale: false,
            })?;
        if ep.api != ApiKind::Anthropic {
            return Ok::<_, AttemptError>((session, Head::Plain(first)));
        }
        let status = session.resp_header().map_or(0, |h| h.status.as_u16());
        let head = if session.resp_header().is_some_and(is_event_stream) {
            translate_until_begun(&mut session, first).await?
        } else {
            let (body, tokens) = translate_whole(&mut session, status, first).await?;
            Head::Whole(body, tokens)
        };
        Ok::<_, AttemptError>((session, head))
    };
    let (session, head) = fast_timeout(wait, exchange)
        .await
        .map_err(|_| AttemptError::Timeout(wait))??;
    let mut header = session
        .resp_header()
        .cloned()
        .ok_or_else(|| AttemptError::Broken {
            reason: "no response header".into(),
            stale: false,
        })?;
    if let Head::Whole(..) = head {
        header
            .insert_header(header::CONTENT_TYPE, "application/json")
            .map_err(|e| AttemptError::Broken {
                reason: e.to_string(),
                stale: false,
            })?;
    }
    Ok(Opened {
        session,
        header,
        head,
        ttft: started.elapsed(),
    })
}

/// Seconds since the epoch, for the `created` of a translated answer.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An Anthropic stream, read and translated until its answer has begun
/// (see `anthropic::Stream::begun`). Its first read is only
/// `message_start`, which Anthropic sends before the model produced
/// anything: until a token, a tool call or the message's end, the attempt
/// has not answered, so the first-token timeout still runs, and an error
/// event (Anthropic sends `overloaded_error` after its 200) fails over to
/// the next endpoint as the same error before the 200 would have.
async fn translate_until_begun(
    session: &mut HttpSession,
    first: Option<Bytes>,
) -> Result<Head, AttemptError> {
    let mut t = Box::new(anthropic::Stream::new(unix_now()));
    let mut out = BytesMut::new();
    let mut next = first;
    loop {
        if let Some(chunk) = next.take() {
            out.extend_from_slice(&t.push(chunk));
        }
        if let Some(kind) = t.failure_kind() {
            return Err(AttemptError::Status {
                status: anthropic::status_of(kind),
                retry_after: None,
            });
        }
        if t.begun() || t.complete() {
            return Ok(Head::Stream(out.freeze(), t));
        }
        next = session
            .read_body_bytes()
            .await
            .map_err(|e| AttemptError::Broken {
                reason: e.to_string(),
                stale: false,
            })?;
        if next.is_none() {
            return Err(AttemptError::Broken {
                reason: "the provider ended the stream before its answer began".into(),
                stale: false,
            });
        }
    }
}

/// Whether an answer is an event stream.
pub fn is_event_stream(h: &ResponseHeader) -> bool {
    h.headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// An answer from an endpoint of another API that is not a stream (a
/// whole answer, or an error), read to its end and translated to OpenAI's
/// shape, with its usage. In the attempt rather than the relay: until the
/// app sees a byte, a provider that breaks off or answers what cannot be
/// translated is one more failed attempt, and the next endpoint may answer.
async fn translate_whole(
    session: &mut HttpSession,
    status: u16,
    first: Option<Bytes>,
) -> Result<(Bytes, Option<Tokens>), AttemptError> {
    let broken = |reason: String| AttemptError::Broken {
        reason,
        stale: false,
    };
    let mut body = BytesMut::from(first.as_deref().unwrap_or_default());
    while let Some(chunk) = session
        .read_body_bytes()
        .await
        .map_err(|e| broken(e.to_string()))?
    {
        if body.len() + chunk.len() > MAX_TRANSLATED {
            return Err(broken(format!(
                "an answer to translate is longer than {MAX_TRANSLATED} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if (200..300).contains(&status) {
        let (json, tokens) = anthropic::answer(&body, unix_now())
            .map_err(|e| broken(format!("the answer cannot be translated: {e}")))?;
        Ok((json, Some(tokens)))
    } else {
        Ok((anthropic::error_body(status, &body), None))
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from providers and
/// is read as absent).
fn retry_after(h: &ResponseHeader) -> Option<Duration> {
    h.headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

/// Hop-by-hop headers, and the ones the sidecar sets itself, are never
/// copied between the app's side and the provider's side. (`expect` too:
/// the sidecar has the whole body before it calls a provider.)
pub fn is_hop_header(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "expect"
    )
}

/// Whether a `Connection` header of `headers` lists `name` (hop-by-hop by
/// declaration). Allocates nothing; most requests have no such header.
pub fn connection_lists(headers: &http::HeaderMap, name: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| {
            t.eq_ignore_ascii_case(name)
                && !t.eq_ignore_ascii_case("close")
                && !t.eq_ignore_ascii_case("keep-alive")
        })
}

/// Whether the app's header `name` is copied to the provider: not
/// hop-by-hop, not the sidecar's own, and not the app's credentials, which
/// never reach a provider. `accept-encoding` neither: the sidecar reads
/// usage from the answer, so it asks for it uncompressed. Nor the body's
/// type, or an API version: the sidecar sets both for the endpoint's API.
fn forwarded(name: &str, app: &http::HeaderMap, has_connection: bool) -> bool {
    !(is_hop_header(name)
        || name.starts_with("x-switchyard-")
        || matches!(
            name,
            "authorization"
                | "api-key"
                | "x-api-key"
                | "accept-encoding"
                | "content-type"
                | "anthropic-version"
        )
        || (has_connection && connection_lists(app, name)))
}

/// The request to send to `ep`, serialised whole: the request line with
/// `path`, the endpoint's host, the body's type, the app's headers that may
/// be forwarded, the endpoint's credential and API headers, the body's
/// length, and the body. Header names and values are what `http` validated
/// (no CR or LF can be in them); the path comes from the endpoint's parsed
/// URL and the policy's checked model ids.
pub fn upstream_request(app: &RequestHeader, ep: &Endpoint, path: &[u8], body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(256 + body.len() + 32 * app.headers.len());
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(ep.authority.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\n");
    let has_connection = app.headers.contains_key(header::CONNECTION);
    for (name, value) in app.headers.iter() {
        if forwarded(name.as_str(), &app.headers, has_connection) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    let header = |out: &mut BytesMut, name: &str, value: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    if let Some((name, value)) = &ep.credential {
        header(&mut out, name, value.as_bytes());
    }
    for (name, value) in ep.api.fixed_headers() {
        header(&mut out, name, value.as_bytes());
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(headers: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in headers {
            h.append_header(k.to_string(), *v).unwrap();
        }
        h
    }

    #[test]
    fn hop_by_hop_own_and_credential_headers_stay_behind() {
        let a = app(&[
            ("content-type", "application/json"),
            ("authorization", "Bearer app-key"),
            ("api-key", "app-key"),
            ("x-switchyard-class", "batch"),
            ("connection", "keep-alive, x-trace"),
            ("x-trace", "1"),
            ("x-request-id", "r1"),
            ("accept-encoding", "gzip"),
            ("te", "trailers"),
            ("x-api-key", "app-key"),
            ("anthropic-version", "2020-01-01"),
        ]);
        let has = a.headers.contains_key("connection");
        let kept: Vec<&str> = a
            .headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| forwarded(k, &a.headers, has))
            .collect();
        assert_eq!(kept, ["x-request-id"]);
    }

    fn endpoint(api: ApiKind, key: Option<&str>) -> Endpoint {
        let name: std::sync::Arc<str> = std::sync::Arc::from("gpu");
        Endpoint {
            id: 0,
            name_header: http::HeaderValue::from_static("gpu"),
            tier: "onprem",
            peer: pingora::upstreams::peer::HttpPeer::new(
                std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
                false,
                String::new(),
            ),
            authority: http::HeaderValue::from_static("gpu.internal:8000"),
            api,
            paths: crate::table::Paths::new(api, "/openai", "2024-10-21"),
            prices: Default::default(),
            credential: key.map(|k| {
                let (name, value) = api.credential_header(k);
                (name, http::HeaderValue::from_str(&value).unwrap())
            }),
            capacity: 0,
            model_ids: Vec::new(),
            over_spend_budget: false,
            state: crate::health::Endpoints::default().get("gpu"),
            ejections: crate::metrics::Metrics::new().ejections(&name),
            name,
        }
    }

    #[test]
    fn the_upstream_request_is_one_http_1_1_message_with_the_endpoints_path_host_and_key() {
        let a = app(&[
            ("content-type", "application/json"),
            ("authorization", "Bearer app-key"),
            ("x-switchyard-class", "batch"),
            ("host", "sidecar:8080"),
            ("content-length", "999"),
            ("x-request-id", "r1"),
        ]);
        let body = br#"{"model":"m"}"#;
        let ep = endpoint(ApiKind::Openai, Some("sk-provider"));
        let path = ep.paths.get(Operation::Chat, "m");
        let req = upstream_request(&a, &ep, &path, body);
        let text = String::from_utf8(req.to_vec()).unwrap();
        let (head, sent_body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(sent_body.as_bytes(), body);
        let mut lines = head.split("\r\n");
        assert_eq!(
            lines.next(),
            Some("POST /openai/v1/chat/completions HTTP/1.1")
        );
        let headers: Vec<&str> = lines.collect();
        assert_eq!(
            headers,
            [
                "host: gpu.internal:8000",
                "content-type: application/json",
                "x-request-id: r1",
                "authorization: Bearer sk-provider",
                "content-length: 13",
            ]
        );
        // It parses as what it says, by an HTTP parser.
        let mut parsed = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Request::new(&mut parsed);
        let len = r.parse(&req).unwrap().unwrap();
        assert_eq!(
            (r.method, r.path),
            (Some("POST"), Some("/openai/v1/chat/completions"))
        );
        assert_eq!(req.len() - len, body.len());
        // Without a credential the app's is still not forwarded.
        let req = upstream_request(&a, &endpoint(ApiKind::Openai, None), &path, body);
        assert!(!String::from_utf8_lossy(&req).contains("authorization"));
    }

    /// The request line and headers of a request to `ep` for `op`.
    fn head_for(api: ApiKind, op: Operation, model: &str) -> Vec<String> {
        let ep = endpoint(api, Some("sk-p"));
        let path = ep.paths.get(op, model);
        let req = upstream_request(&app(&[("authorization", "Bearer app")]), &ep, &path, b"{}");
        let text = String::from_utf8(req.to_vec()).unwrap();
        let (head, _) = text.split_once("\r\n\r\n").unwrap();
        head.split("\r\n").map(str::to_string).collect()
    }

    #[test]
    fn each_api_gets_its_own_path_credential_header_and_version() {
        assert_eq!(
            head_for(ApiKind::Openai, Operation::Embeddings, "e")[0],
            "POST /openai/v1/embeddings HTTP/1.1"
        );
        let azure = head_for(ApiKind::Azure, Operation::Completions, "gpt-35-prod");
        assert_eq!(
            azure[0],
            "POST /openai/openai/deployments/gpt-35-prod/completions?api-version=2024-10-21 HTTP/1.1"
        );
        assert!(azure.contains(&"api-key: sk-p".to_string()), "{azure:?}");
        assert!(!azure.iter().any(|h| h.starts_with("authorization")));
        let anthropic = head_for(ApiKind::Anthropic, Operation::Chat, "claude");
        assert_eq!(anthropic[0], "POST /openai/v1/messages HTTP/1.1");
        assert!(anthropic.contains(&"x-api-key: sk-p".to_string()));
        assert!(anthropic.contains(&"anthropic-version: 2023-06-01".to_string()));
        assert!(!anthropic.iter().any(|h| h.starts_with("authorization")));
    }

    #[test]
    fn a_refused_handshake_is_said_in_rustls_words() {
        let pingora = "TLS connect() failed:  TLSHandshakeFailure context: tls connect error \
            cause: invalid peer certificate: UnknownIssuer, SNI: 127.0.0.1 cause: local address 127.0.0.1:34672";
        assert_eq!(
            tls_cause(pingora),
            "invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(tls_cause(" something else "), "something else");
    }

    #[test]
    fn retry_after_in_seconds_is_read_and_bounded() {
        let mut h = ResponseHeader::build(429, None).unwrap();
        assert_eq!(retry_after(&h), None);
        h.insert_header("retry-after", "7").unwrap();
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert_header("retry-after", "99999").unwrap();
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3600)));
        h.insert_header("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")
            .unwrap();
        assert_eq!(retry_after(&h), None);
        h.insert_header("retry-after", "-1").unwrap();
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_kinds_are_what_the_control_plane_weighs() {
        assert_eq!(
            AttemptError::Connect("x".into()).kind(),
            Some(ErrorKind::Connect)
        );
        assert_eq!(
            AttemptError::Timeout(Duration::ZERO).kind(),
            Some(ErrorKind::Timeout)
        );
        assert_eq!(AttemptError::Untranslatable("n".into()).kind(), None);
        let s = |status| AttemptError::Status {
            status,
            retry_after: None,
        };
        assert_eq!(s(429).kind(), Some(ErrorKind::Status429));
        assert_eq!(s(503).kind(), Some(ErrorKind::Status5xx));
        let stale = AttemptError::Broken {
            reason: "reset".into(),
            stale: true,
        };
        assert!(stale.stale() && stale.kind() == Some(ErrorKind::Broken));
    }
}
