//! One attempt, the fourth stage: send the request to one endpoint through
//! pingora's pooled connector and wait for the response header and the
//! first body chunk.
//!
//! The sidecar owns the upstream exchange rather than handing it to
//! pingora's proxy phase because pingora replays at most 64 KiB of a request
//! body it has already read (LLM prompts are often larger), and because an
//! attempt only counts as answered once its first token arrived: until then
//! a failure can still move to another endpoint without the app seeing
//! anything. Provider translation (another API's request shape) plugs in
//! where the upstream request is built.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use parking_lot::Mutex;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::time::fast_timeout::fast_timeout;
use pingora::ErrorType;
use tokio::time::Instant;

use crate::health::EndpointState;
use crate::retry::RetryBudget;
use crate::shed::Admission;
use crate::table::Endpoint;
use crate::usage::ErrorKind;

/// How long an idle upstream connection stays in the pool.
pub const POOL_IDLE: Duration = Duration::from_secs(60);

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
}

impl AttemptError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AttemptError::Connect(_) => ErrorKind::Connect,
            AttemptError::Timeout(_) => ErrorKind::Timeout,
            AttemptError::Broken { .. } => ErrorKind::Broken,
            AttemptError::Status { status: 429, .. } => ErrorKind::Status429,
            AttemptError::Status { .. } => ErrorKind::Status5xx,
        }
    }

    /// Failed on a pooled connection the provider had closed.
    pub fn stale(&self) -> bool {
        matches!(self, AttemptError::Broken { stale: true, .. })
    }
}

/// An upstream that answered: its header, and its first body chunk unless
/// the body was empty.
pub struct Opened {
    pub session: HttpSession,
    pub header: ResponseHeader,
    pub first: Option<Bytes>,
    pub ttft: Duration,
}

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
    pub connector: &'a Connector,
    pub queue: &'a Admission,
    pub metrics: &'a crate::metrics::Metrics,
    pub retry: &'a Mutex<RetryBudget>,
    /// The app's request header, as it came.
    pub app: &'r RequestHeader,
    pub body: &'r Bytes,
    pub ttft: Duration,
    pub deadline: Instant,
}

impl<'a> Attempt<'a, '_> {
    /// Runs one attempt at `ep`.
    pub async fn run(&self, ep: &'a Endpoint) -> AttemptResult<'a> {
        let slot = Slot::take(&ep.state, self.queue);
        let start = Instant::now();
        let ttft_deadline = (start + self.ttft).min(self.deadline);
        let req = upstream_request(self.app, ep, self.body.len()).map_err(|e| {
            (
                AttemptError::Broken {
                    reason: e.to_string(),
                    stale: false,
                },
                Duration::ZERO,
            )
        })?;
        match open(
            self.connector,
            ep,
            req,
            self.body.clone(),
            start,
            ttft_deadline,
        )
        .await
        {
            Ok(o) => Ok((o, slot)),
            Err(e) => Err((e, start.elapsed())),
        }
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

/// Sends `req` with `body` to `ep` and waits for the first body chunk until
/// `ttft_deadline`.
async fn open(
    connector: &Connector,
    ep: &Endpoint,
    req: Box<RequestHeader>,
    body: Bytes,
    started: Instant,
    ttft_deadline: Instant,
) -> Result<Opened, AttemptError> {
    let wait = ttft_deadline.saturating_duration_since(started);
    let timed_out = || AttemptError::Timeout(wait);
    // One timer for the whole exchange, connect included.
    let exchange = async {
        let (mut session, reused) = connector
            .get_http_session(&ep.peer)
            .await
            .map_err(|e| AttemptError::Connect(e.to_string()))?;
        crate::rtt::observe_upstream(&session, &ep.peer, reused);
        let broken = |e: Box<pingora::Error>| {
            if is_connect(&e) {
                AttemptError::Connect(e.to_string())
            } else {
                AttemptError::Broken {
                    reason: e.to_string(),
                    stale: reused,
                }
            }
        };
        session.write_request_header(req).await.map_err(broken)?;
        session
            .write_request_body(body, true)
            .await
            .map_err(broken)?;
        session.finish_request_body().await.map_err(broken)?;
        // Interim answers (100, 103) come before the real one.
        loop {
            session.read_response_header().await.map_err(broken)?;
            let interim = session
                .response_header()
                .map(|h| h.status.as_u16())
                .is_some_and(|s| (100..200).contains(&s) && s != 101);
            if !interim {
                break;
            }
        }
        if let Some(h) = session.response_header() {
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
            .read_response_body()
            .await
            .map_err(|e| AttemptError::Broken {
                reason: e.to_string(),
                stale: false,
            })?;
        Ok::<_, AttemptError>((session, first))
    };
    let (session, first) = fast_timeout(wait, exchange)
        .await
        .map_err(|_| timed_out())??;
    let header = session
        .response_header()
        .cloned()
        .ok_or_else(|| AttemptError::Broken {
            reason: "no response header".into(),
            stale: false,
        })?;
    Ok(Opened {
        session,
        header,
        first,
        ttft: started.elapsed(),
    })
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
/// usage from the answer, so it asks for it uncompressed.
fn forwarded(name: &str, app: &http::HeaderMap, has_connection: bool) -> bool {
    !(is_hop_header(name)
        || name.starts_with("x-switchyard-")
        || name == "authorization"
        || name == "api-key"
        || name == "accept-encoding"
        || (has_connection && connection_lists(app, name)))
}

/// The request to send to `ep`: the app's headers that may be forwarded,
/// the endpoint's path and host, the body's length, and the endpoint's
/// credential.
pub fn upstream_request(
    app: &RequestHeader,
    ep: &Endpoint,
    body_len: usize,
) -> pingora::Result<Box<RequestHeader>> {
    let mut req = RequestHeader::build_no_case(
        http::Method::POST,
        &ep.chat_path[..],
        Some(app.headers.len() + 3),
    )?;
    let has_connection = app.headers.contains_key(header::CONNECTION);
    for (name, value) in app.headers.iter() {
        if forwarded(name.as_str(), &app.headers, has_connection) {
            req.append_header(name.clone(), value.clone())?;
        }
    }
    req.insert_header(header::HOST, ep.authority.clone())?;
    req.insert_header(header::CONTENT_LENGTH, body_len)?;
    if let Some(auth) = &ep.authorization {
        req.insert_header(header::AUTHORIZATION, auth.clone())?;
    }
    Ok(Box::new(req))
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
        ]);
        let has = a.headers.contains_key("connection");
        let kept: Vec<&str> = a
            .headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| forwarded(k, &a.headers, has))
            .collect();
        assert_eq!(kept, ["content-type", "x-request-id"]);
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
        assert_eq!(AttemptError::Connect("x".into()).kind(), ErrorKind::Connect);
        assert_eq!(
            AttemptError::Timeout(Duration::ZERO).kind(),
            ErrorKind::Timeout
        );
        let s = |status| AttemptError::Status {
            status,
            retry_after: None,
        };
        assert_eq!(s(429).kind(), ErrorKind::Status429);
        assert_eq!(s(503).kind(), ErrorKind::Status5xx);
        let stale = AttemptError::Broken {
            reason: "reset".into(),
            stale: true,
        };
        assert!(stale.stale() && stale.kind() == ErrorKind::Broken);
    }
}
