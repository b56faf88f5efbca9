//! The `ProxyHttp` implementation: answers the sidecar's own routes, and for
//! chat completions reads the body, routes it on the current table, and
//! streams the chosen endpoint's answer back chunk by chunk.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use tokio::time::Instant;

use crate::classify::{self, ClassifyError};
use crate::forward::{self, AttemptError, Opened};
use crate::reply::ApiError;
use crate::table::{Endpoint, RouteError, Table, CHAT_PATH};
use crate::usage::{ErrorKind, Outcome, Usage};

/// Attempts per request, counting retries on stale pooled connections and
/// failover after connection failures.
const MAX_ATTEMPTS: usize = 3;

pub struct Sidecar {
    pub tables: Arc<ArcSwapOption<Table>>,
    pub usage: Arc<Usage>,
    pub connector: Connector,
    pub max_body_bytes: usize,
    pub rtt: Arc<crate::rtt::RttView>,
}

/// Per-request state, read by `logging()`.
pub struct RequestCtx {
    started: std::time::Instant,
    endpoint: Option<Arc<str>>,
    attempts: u8,
    status: u16,
    table_version: u64,
}

enum Step {
    Done,
    /// The app went away or the exchange broke mid-response: close the
    /// downstream connection instead of reusing it.
    Abort(Box<Error>),
}

fn downstream_err(e: Box<Error>) -> Step {
    Step::Abort(e)
}

impl Sidecar {
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
    ) -> Result<()> {
        ctx.status = status;
        let mut h = ResponseHeader::build(status, Some(3))?;
        h.insert_header("content-type", content_type)?;
        h.insert_header("content-length", body.len())?;
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(body), true).await
    }

    async fn error(&self, session: &mut Session, ctx: &mut RequestCtx, e: ApiError) -> Result<()> {
        let body = e.body();
        self.respond(session, ctx, e.status, "application/json", body)
            .await
    }

    /// Reads the whole request body, refusing more than the limit.
    async fn read_body(
        &self,
        session: &mut Session,
    ) -> Result<std::result::Result<Bytes, ApiError>> {
        let too_large = || {
            ApiError::new(
                413,
                "invalid_request_error",
                format!(
                    "request body exceeds the {} byte limit",
                    self.max_body_bytes
                ),
            )
            .code("request_too_large")
        };
        let declared = session
            .req_header()
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes) {
            return Ok(Err(too_large()));
        }
        let mut first: Option<Bytes> = None;
        let mut rest: Option<BytesMut> = None;
        while let Some(chunk) = session.read_request_body().await? {
            let len = first.as_ref().map_or(0, Bytes::len)
                + rest.as_ref().map_or(0, BytesMut::len)
                + chunk.len();
            if len > self.max_body_bytes {
                return Ok(Err(too_large()));
            }
            match (&mut first, &mut rest) {
                (None, _) => first = Some(chunk),
                (Some(f), None) => {
                    let mut b = BytesMut::with_capacity(declared.unwrap_or(len * 2).max(len));
                    b.extend_from_slice(f);
                    b.extend_from_slice(&chunk);
                    rest = Some(b);
                }
                (Some(_), Some(b)) => b.extend_from_slice(&chunk),
            }
        }
        Ok(Ok(match rest {
            Some(b) => b.freeze(),
            None => first.unwrap_or_default(),
        }))
    }

    async fn chat(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let body = match self.read_body(session).await? {
            Ok(b) => b,
            Err(e) => {
                // The rest of the body was not read: the connection cannot be reused.
                session.set_keepalive(None);
                return self.error(session, ctx, e).await;
            }
        };
        let req = match classify::parse(&body) {
            Ok(r) => r,
            Err(ClassifyError::MissingModel) => {
                let e = ApiError::invalid(ClassifyError::MissingModel.to_string()).param("model");
                return self.error(session, ctx, e).await;
            }
            Err(e) => {
                return self
                    .error(session, ctx, ApiError::invalid(e.to_string()))
                    .await
            }
        };
        let Some(table) = self.tables.load_full() else {
            let e = ApiError::new(503, "server_error", "the sidecar has no routing table yet")
                .code("not_ready");
            return self.error(session, ctx, e).await;
        };
        ctx.table_version = table.version;
        let class_header = header_str(session.req_header(), "x-switchyard-class");
        let (class, route) = match table.route(class_header, &req.model) {
            Ok(r) => r,
            Err(RouteError::UnknownClass(c)) => {
                let e =
                    ApiError::invalid(format!("unknown request class `{c}`")).code("unknown_class");
                return self.error(session, ctx, e).await;
            }
            Err(RouteError::UnknownModel) => {
                let e = ApiError::new(
                    404,
                    "invalid_request_error",
                    format!(
                        "The model `{}` does not exist or you do not have access to it.",
                        req.model
                    ),
                )
                .code("model_not_found")
                .param("model");
                return self.error(session, ctx, e).await;
            }
            Err(RouteError::NoRoute) => {
                let e = ApiError::new(
                    503,
                    "server_error",
                    format!(
                        "no endpoint allowed for this request class serves `{}`",
                        req.model
                    ),
                )
                .code("no_route");
                return self.error(session, ctx, e).await;
            }
        };
        let started = Instant::now();
        let app_deadline = header_str(session.req_header(), "x-switchyard-timeout-ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let deadline = started + app_deadline.map_or(class.deadline, |d| d.min(class.deadline));

        let upstream_req = upstream_request(session.req_header())?;
        let mut tried = [usize::MAX; MAX_ATTEMPTS];
        let mut next = route
            .choice
            .as_ref()
            .map_or(route.fallback[0], |c| c.pick(fastrand::f64()));
        let mut last_err = None;
        for attempt in 0..MAX_ATTEMPTS {
            let ep = &table.endpoints[next];
            tried[attempt] = next;
            ctx.attempts = attempt as u8 + 1;
            ctx.endpoint = Some(ep.name.clone());
            let slot = self.usage.start(&ep.name);
            let attempt_start = Instant::now();
            let ttft_deadline = (attempt_start + class.ttft_timeout).min(deadline);
            let mut req = Box::new(upstream_req.clone());
            req.set_raw_path(ep.chat_path.as_bytes())?;
            req.insert_header("host", &ep.authority)?;
            req.insert_header("content-length", body.len())?;
            let opened = forward::open(
                &self.connector,
                ep,
                req,
                body.clone(),
                attempt_start,
                ttft_deadline,
            )
            .await;
            match opened {
                Ok(o) => {
                    let step = self
                        .relay(
                            session,
                            ctx,
                            ep,
                            o,
                            attempt_start,
                            deadline,
                            class.inter_token_timeout,
                        )
                        .await;
                    drop(slot);
                    return match step {
                        Step::Done => Ok(()),
                        Step::Abort(e) => Err(e),
                    };
                }
                Err(e) => {
                    self.usage.record(
                        &ep.name,
                        Outcome {
                            error: Some(e.kind()),
                            ttft: None,
                            latency: attempt_start.elapsed(),
                        },
                    );
                    tracing::debug!(endpoint = %ep.name, error = %e, "attempt failed");
                    let retry_same = matches!(e, AttemptError::Broken { stale: true, .. });
                    let failover = matches!(e, AttemptError::Connect(_));
                    last_err = Some(e);
                    if Instant::now() >= deadline {
                        break;
                    }
                    if retry_same {
                        continue;
                    }
                    if !failover {
                        break;
                    }
                    match route.fallback.iter().find(|i| !tried.contains(i)) {
                        Some(i) => next = *i,
                        None => break,
                    }
                }
            }
        }
        let e = match last_err {
            Some(AttemptError::Timeout(d)) => ApiError::new(
                504,
                "server_error",
                format!("no endpoint answered within {} ms", d.as_millis()),
            )
            .code("upstream_timeout"),
            Some(e) => ApiError::new(502, "server_error", format!("upstream failed: {e}"))
                .code("upstream_error"),
            None => ApiError::new(502, "server_error", "no endpoint was tried"),
        };
        let mut e = e;
        e.message
            .push_str(&format!(" (after {} attempts)", ctx.attempts));
        self.error(session, ctx, e).await
    }

    /// Streams an opened upstream answer to the app, chunk by chunk.
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        ep: &Endpoint,
        opened: Opened,
        attempt_start: Instant,
        deadline: Instant,
        inter_token: Duration,
    ) -> Step {
        let Opened {
            session: mut up,
            header: up_header,
            first,
            ttft,
        } = opened;
        let status = up_header.status.as_u16();
        ctx.status = status;
        let sse = up_header
            .headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let mut resp = match build_response(&up_header, ep, ctx) {
            Ok(r) => r,
            Err(e) => return Step::Abort(e),
        };
        let mut done = up.response_done();
        if done {
            let _ = resp.insert_header("content-length", first.as_ref().map_or(0, Bytes::len));
        }
        let error_kind = match status {
            429 => Some(ErrorKind::Status429),
            500..=599 => Some(ErrorKind::Status5xx),
            _ => None,
        };
        let mut outcome = Outcome {
            error: error_kind,
            ttft: Some(ttft),
            latency: Duration::ZERO,
        };
        let result = async {
            session
                .write_response_header(Box::new(resp), false)
                .await
                .map_err(downstream_err)?;
            if let Some(chunk) = first {
                session
                    .write_response_body(Some(chunk), done)
                    .await
                    .map_err(downstream_err)?;
            }
            while !done {
                let wait = (Instant::now() + inter_token).min(deadline);
                let next = tokio::time::timeout_at(wait, up.read_response_body()).await;
                let reason = match next {
                    Ok(Ok(Some(chunk))) => {
                        session
                            .write_response_body(Some(chunk), false)
                            .await
                            .map_err(downstream_err)?;
                        continue;
                    }
                    Ok(Ok(None)) => {
                        done = true;
                        session
                            .write_response_body(None, true)
                            .await
                            .map_err(downstream_err)?;
                        break;
                    }
                    Ok(Err(e)) => {
                        outcome.error = Some(ErrorKind::Broken);
                        format!("the provider broke the stream: {e}")
                    }
                    Err(_) => {
                        outcome.error = Some(ErrorKind::Timeout);
                        if wait == deadline {
                            "the request deadline passed mid-stream".to_string()
                        } else {
                            format!("no data for {} ms mid-stream", inter_token.as_millis())
                        }
                    }
                };
                // Never a silent truncation: a stream ends with an error
                // event; any other body cannot be mended, so the
                // connection is closed before its declared end.
                if sse {
                    let e = ApiError::new(502, "server_error", reason).code("stream_interrupted");
                    session
                        .write_response_body(Some(e.sse_event()), true)
                        .await
                        .map_err(downstream_err)?;
                    return Ok(());
                }
                return Err(Step::Abort(Error::explain(ErrorType::ReadError, reason)));
            }
            Ok(())
        }
        .await;
        outcome.latency = attempt_start.elapsed();
        self.usage.record(&ep.name, outcome);
        match result {
            Ok(()) => {
                if done {
                    self.connector
                        .release_http_session(up, &ep.peer, Some(forward::POOL_IDLE))
                        .await;
                }
                Step::Done
            }
            Err(step) => step,
        }
    }
}

fn header_str<'a>(h: &'a RequestHeader, name: &str) -> Option<&'a str> {
    h.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The request to send upstream: the app's headers minus hop-by-hop ones,
/// the sidecar's own, and the app's credentials, which are never forwarded
/// to a provider.
fn upstream_request(app: &RequestHeader) -> Result<RequestHeader> {
    let mut req = RequestHeader::build("POST", CHAT_PATH.as_bytes(), Some(app.headers.len() + 2))?;
    for (name, value) in app.headers.iter() {
        let n = name.as_str();
        if forward::is_hop_header(n)
            || n.starts_with("x-switchyard-")
            || n == "authorization"
            || n == "api-key"
        {
            continue;
        }
        req.append_header(name.clone(), value.clone())?;
    }
    Ok(req)
}

fn build_response(up: &ResponseHeader, ep: &Endpoint, ctx: &RequestCtx) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(up.status, Some(up.headers.len() + 3))?;
    for (name, value) in up.headers.iter() {
        let n = name.as_str();
        if n == "content-length" || !forward::is_hop_header(n) {
            resp.append_header(name.clone(), value.clone())?;
        }
    }
    resp.insert_header("x-switchyard-endpoint", &*ep.name)?;
    resp.insert_header("x-switchyard-attempts", ctx.attempts.to_string())?;
    resp.insert_header("x-switchyard-table-version", ctx.table_version.to_string())?;
    Ok(resp)
}

#[async_trait]
impl ProxyHttp for Sidecar {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: std::time::Instant::now(),
            endpoint: None,
            attempts: 0,
            status: 0,
            table_version: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let method = session.req_header().method.as_str().to_owned();
        let path = session.req_header().uri.path().to_owned();
        match (method.as_str(), path.as_str()) {
            ("POST", CHAT_PATH) => self.chat(session, ctx).await?,
            ("GET", "/v1/models") => match self.tables.load_full() {
                Some(t) => {
                    let body = t.models_json.clone();
                    self.respond(session, ctx, 200, "application/json", body)
                        .await?
                }
                None => {
                    let e = ApiError::new(503, "server_error", "no routing table yet")
                        .code("not_ready");
                    self.error(session, ctx, e).await?
                }
            },
            ("GET", "/metrics") => {
                let body = self.rtt.metrics(self.tables.load_full().as_deref());
                let ct = "text/plain; version=0.0.4";
                self.respond(session, ctx, 200, ct, Bytes::from(body))
                    .await?
            }
            ("GET", "/healthz") => {
                self.respond(session, ctx, 200, "text/plain", Bytes::from_static(b"ok\n"))
                    .await?
            }
            ("GET", "/readyz") => match self.tables.load_full() {
                Some(t) => {
                    let body = Bytes::from(format!("ready: table version {}\n", t.version));
                    self.respond(session, ctx, 200, "text/plain", body).await?
                }
                None => {
                    let body = Bytes::from_static(b"not ready: no routing table applied yet\n");
                    self.respond(session, ctx, 503, "text/plain", body).await?
                }
            },
            (_, CHAT_PATH | "/v1/models" | "/healthz" | "/readyz" | "/metrics") => {
                let e = ApiError::invalid(format!("method {method} is not allowed on {path}"));
                let e = ApiError { status: 405, ..e };
                self.error(session, ctx, e).await?
            }
            _ => {
                let e = ApiError::new(
                    404,
                    "invalid_request_error",
                    format!("Invalid URL ({method} {path})"),
                )
                .code("unknown_url");
                self.error(session, ctx, e).await?
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // Every request is answered in request_filter; reaching here is a bug.
        Error::e_explain(
            ErrorType::InternalError,
            "request was not answered by request_filter",
        )
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        tracing::debug!(
            method = %session.req_header().method,
            path = %session.req_header().uri.path(),
            status = ctx.status,
            endpoint = ctx.endpoint.as_deref().unwrap_or("-"),
            attempts = ctx.attempts,
            table_version = ctx.table_version,
            micros = ctx.started.elapsed().as_micros() as u64,
            error = e.map(|e| e.to_string()).unwrap_or_default(),
            "request"
        );
    }
}
