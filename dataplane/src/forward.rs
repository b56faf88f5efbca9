//! One attempt at one endpoint: send the request through pingora's pooled
//! connector and wait for the response header and the first body chunk.
//!
//! The sidecar owns the upstream exchange rather than handing it to
//! pingora's proxy phase because pingora replays at most 64 KiB of a request
//! body it has already read (LLM prompts are often larger), and because an
//! attempt must only count as answered once its first token arrived: until
//! then a failure can still move to another endpoint without the app seeing
//! anything.

use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::ErrorType;
use tokio::time::{timeout_at, Instant};

use crate::table::Endpoint;
use crate::usage::ErrorKind;

/// How long an idle upstream connection stays in the pool.
pub const POOL_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
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
}

/// An upstream that answered: its header, and its first body chunk unless
/// the body was empty.
pub struct Opened {
    pub session: HttpSession,
    pub header: ResponseHeader,
    pub first: Option<Bytes>,
    pub ttft: Duration,
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
pub async fn open(
    connector: &Connector,
    ep: &Endpoint,
    req: Box<RequestHeader>,
    body: Bytes,
    started: Instant,
    ttft_deadline: Instant,
) -> Result<Opened, AttemptError> {
    let wait = ttft_deadline.saturating_duration_since(started);
    let timed_out = || AttemptError::Timeout(wait);
    let (mut session, reused) = timeout_at(ttft_deadline, connector.get_http_session(&ep.peer))
        .await
        .map_err(|_| timed_out())?
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
    let exchange = async {
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
        Ok::<_, AttemptError>(first)
    };
    let first = timeout_at(ttft_deadline, exchange)
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
        .get("retry-after")
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
