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
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use tokio::time::Instant;

use std::sync::atomic::Ordering;

use crate::balance::pick_p2c;
use crate::classify::{self, ClassifyError};
use crate::forward::{self, AttemptError, Opened};
use crate::health::{EndpointState, OutlierPolicy};
use crate::metrics::{Counter, Metrics};
use crate::reply::ApiError;
use crate::shed::{Admission, Candidate};
use crate::table::{Degrade, Endpoint, Live, Route, RouteError, Table, CHAT_PATH};
use crate::usage::{ErrorKind, Outcome, Usage, UsageScan};

/// Attempts per request, hedges and stale-connection retries included.
const MAX_ATTEMPTS: usize = 4;

pub struct Sidecar {
    pub tables: Arc<ArcSwapOption<Table>>,
    pub live: Arc<Live>,
    pub usage: Arc<Usage>,
    pub metrics: Arc<Metrics>,
    pub admission: Admission,
    pub outlier: OutlierPolicy,
    pub connector: Connector,
    pub max_body_bytes: usize,
    pub rtt: Arc<crate::rtt::RttView>,
}

/// Per-request state, read by `logging()`.
pub struct RequestCtx {
    started: std::time::Instant,
    class: Option<Arc<str>>,
    endpoint: Option<Arc<str>>,
    degraded: Option<&'static str>,
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

/// A write to the app, bounded by the request's deadline: an app that stops
/// reading must not hold the upstream connection and its capacity forever.
async fn within(
    deadline: Instant,
    write: impl std::future::Future<Output = Result<()>>,
) -> std::result::Result<(), Step> {
    match tokio::time::timeout_at(deadline, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Step::Abort(e)),
        Err(_) => Err(Step::Abort(Error::explain(
            ErrorType::WriteTimedout,
            "the app did not read the answer before the deadline",
        ))),
    }
}

/// Most upstream chunks joined into one write to the app.
const COALESCE_MAX_CHUNKS: usize = 64;
const COALESCE_MAX_BYTES: usize = 64 * 1024;

/// Appends to `out` every body chunk the upstream has already delivered,
/// without waiting for any. Tokens a provider sends back to back arrive in
/// one read and are parsed out one chunk at a time; writing them to the app
/// one by one would cost a write and a flush each. What is not yet readable
/// is left for the next (waiting) read, so nothing is held back. Returns the
/// joined bytes and, when the last read ended the body or failed, its result.
fn coalesce(
    up: &mut HttpSession,
    scan: &mut UsageScan,
    out: Bytes,
) -> (Bytes, Option<Result<Option<Bytes>>>) {
    use futures::FutureExt;
    let mut joined: Option<BytesMut> = None;
    for _ in 0..COALESCE_MAX_CHUNKS {
        if joined.as_ref().map_or(out.len(), BytesMut::len) >= COALESCE_MAX_BYTES {
            break;
        }
        // pingora's body reader keeps its parse state across a dropped
        // read (a pending read has consumed nothing), so polling once and
        // giving up is safe.
        match up.read_response_body().now_or_never() {
            None => break,
            Some(Ok(Some(chunk))) => {
                let more = scan.pass(chunk);
                if !more.is_empty() {
                    joined
                        .get_or_insert_with(|| BytesMut::from(&out[..]))
                        .extend_from_slice(&more);
                }
            }
            Some(end_or_error) => {
                return (joined.map_or(out, BytesMut::freeze), Some(end_or_error));
            }
        }
    }
    (joined.map_or(out, BytesMut::freeze), None)
}

async fn write_body(
    session: &mut Session,
    data: Option<Bytes>,
    end: bool,
    deadline: Instant,
) -> std::result::Result<(), Step> {
    within(deadline, session.write_response_body(data, end)).await
}

impl Sidecar {
    /// Writes a whole response the sidecar answers itself.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
    ) -> Result<()> {
        self.respond_after(session, ctx, status, content_type, body, None)
            .await
    }

    async fn respond_after(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
        retry_after: Option<u64>,
    ) -> Result<()> {
        ctx.status = status;
        let mut h = ResponseHeader::build(status, Some(6))?;
        h.insert_header("content-type", content_type)?;
        h.insert_header("content-length", body.len())?;
        if let Some(s) = retry_after {
            h.insert_header("retry-after", s.to_string())?;
        }
        if ctx.attempts > 0 {
            h.insert_header("x-switchyard-attempts", ctx.attempts.to_string())?;
        }
        if let Some(d) = ctx.degraded {
            h.insert_header("x-switchyard-degraded", d)?;
        }
        // HEAD gets GET's headers, Content-Length included, and no body.
        if session.req_header().method == http::Method::HEAD {
            return session.write_response_header(Box::new(h), true).await;
        }
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(body), true).await
    }

    async fn error(&self, session: &mut Session, ctx: &mut RequestCtx, e: ApiError) -> Result<()> {
        let body = e.body();
        self.respond_after(
            session,
            ctx,
            e.status,
            "application/json",
            body,
            e.retry_after,
        )
        .await
    }

    fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(4096);
        self.metrics.render(&mut out);
        let version = self.tables.load().as_ref().map_or(0, |t| t.version);
        let _ = writeln!(
            out,
            "# TYPE switchyard_table_version gauge\nswitchyard_table_version {version}"
        );
        let now = std::time::Instant::now();
        let mut states = self.live.endpoints.all();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        out.push_str("# TYPE switchyard_endpoint_in_flight gauge\n");
        for (name, s) in &states {
            let _ = writeln!(
                out,
                "switchyard_endpoint_in_flight{{endpoint=\"{}\"}} {}",
                crate::metrics::escape(name),
                s.in_flight.load(Ordering::Relaxed)
            );
        }
        // One read per endpoint, so the two gauges below agree.
        let cooldowns: Vec<_> = states.iter().map(|(_, s)| s.cooldown(now)).collect();
        out.push_str("# TYPE switchyard_endpoint_ejected gauge\n");
        for ((name, _), (ejected, _)) in states.iter().zip(&cooldowns) {
            let _ = writeln!(
                out,
                "switchyard_endpoint_ejected{{endpoint=\"{}\"}} {}",
                crate::metrics::escape(name),
                u8::from(!ejected.is_zero())
            );
        }
        out.push_str("# HELP switchyard_endpoint_cooldown_seconds Time left before this sidecar sends the endpoint traffic again.\n");
        out.push_str("# TYPE switchyard_endpoint_cooldown_seconds gauge\n");
        for ((name, _), &(ejected, throttled)) in states.iter().zip(&cooldowns) {
            for (reason, left) in [("ejected", ejected), ("throttled", throttled)] {
                let _ = writeln!(
                    out,
                    "switchyard_endpoint_cooldown_seconds{{endpoint=\"{}\",reason=\"{reason}\"}} {:.3}",
                    crate::metrics::escape(name),
                    left.as_secs_f64()
                );
            }
        }
        out
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
        let expects_continue = session
            .req_header()
            .headers
            .get("expect")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue {
            session.write_continue_response().await?;
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
        let route = table.route(class_header, &req.model);
        let (class, route) = match route {
            Ok(r) => r,
            Err(e) => {
                let e = route_error(e, &req.model);
                return self.error(session, ctx, e).await;
            }
        };
        ctx.class = Some(class.name.clone());
        let started = Instant::now();
        let app_deadline = header_str(session.req_header(), "x-switchyard-timeout-ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let deadline = started + app_deadline.map_or(class.deadline, |d| d.min(class.deadline));

        let (streamed, include_usage) = (req.stream, req.include_usage);
        // Degrade when none of the class's preferred endpoints is healthy
        // and within budget.
        let mut body = body;
        let mut route = route;
        let now = started.into_std();
        let preferred = route
            .choice
            .as_ref()
            .map_or(&route.fallback[..1], |c| c.endpoints());
        let available = |i: &&usize| table.endpoints[**i].state.available(now);
        let healthy = preferred
            .iter()
            .filter(available)
            .any(|i| !table.endpoints[*i].over_budget);
        let why = if healthy {
            ""
        } else if preferred.iter().any(|i| available(&i)) {
            "over budget"
        } else {
            "unhealthy"
        };
        // Only a request whose `max_tokens` was capped for it may still go to
        // an endpoint over budget: that is what capping is for.
        let mut over_budget_ok = false;
        if !healthy && class.degrade.is_none() && why == "over budget" {
            self.metrics
                .inc(Counter::OverBudget, Some(&class.name), None, "");
            return self
                .error(session, ctx, over_budget_error(&class.name))
                .await;
        }
        if let (false, Some(d)) = (healthy, &class.degrade) {
            ctx.degraded = Some(d.label());
            self.metrics
                .inc(Counter::Degraded, Some(&class.name), None, d.label());
            let rewritten = match d {
                Degrade::Reject(reason) => {
                    let e = ApiError::new(
                        503,
                        "server_error",
                        format!(
                            "the preferred endpoints of class `{}` are {why}: {reason}",
                            class.name
                        ),
                    )
                    .code("degraded_reject");
                    return self.error(session, ctx, e).await;
                }
                Degrade::Model(m) => {
                    match table.route(Some(&class.name), m) {
                        Ok((_, r)) => route = r,
                        Err(e) => return self.error(session, ctx, route_error(e, m)).await,
                    }
                    classify::rewrite(&body, Some(m), None)
                }
                Degrade::MaxTokens(n) => {
                    over_budget_ok = true;
                    classify::rewrite(&body, None, Some(*n))
                }
            };
            match rewritten {
                Ok(b) => body = b,
                Err(e) => {
                    return self
                        .error(session, ctx, ApiError::invalid(e.to_string()))
                        .await
                }
            }
        }

        // Ask for the usage chunk on the app's behalf, so streams are
        // accounted; the relay takes it out again.
        let strip_usage = streamed && include_usage != Some(true);
        if strip_usage {
            match classify::ask_usage(&body, include_usage.is_some()) {
                Ok(b) => body = b,
                Err(e) => {
                    return self
                        .error(session, ctx, ApiError::invalid(e.to_string()))
                        .await
                }
            }
        }

        // Shed when every endpoint the request may use is at capacity.
        let candidates = || {
            route
                .choice
                .iter()
                .flat_map(|c| c.endpoints())
                .chain(&route.fallback)
                .map(|i| &table.endpoints[*i])
        };
        let queue_until = (started + class.ttft_timeout).min(deadline);
        while candidates().all(Endpoint::at_capacity) {
            let waiting_for = candidates()
                .map(|e| Candidate {
                    state: e.state.clone(),
                    capacity: e.capacity,
                })
                .collect();
            if let Err(why) = self
                .admission
                .wait(class.priority, table.max_priority, queue_until, waiting_for)
                .await
            {
                self.metrics
                    .inc(Counter::Sheds, Some(&class.name), None, "");
                let mut e = ApiError::new(
                    429,
                    "rate_limit_error",
                    format!(
                        "every endpoint for class `{}` is at capacity: {why}",
                        class.name
                    ),
                )
                .code("overloaded");
                e.retry_after = Some(1);
                return self.error(session, ctx, e).await;
            }
        }

        let upstream_req = upstream_request(session.req_header())?;
        let attempt = Attempt {
            table: &table,
            retry: &class.retry,
            req: &upstream_req,
            body: &body,
            ttft: class.ttft_timeout,
            deadline,
            over_budget_ok,
        };
        lock(&class.retry).request(now);
        let mut tried = Tried::default();
        let first = route.choice.as_ref().and_then(|c| {
            pick_p2c(
                c,
                fastrand::f64(),
                fastrand::f64(),
                |i| table.endpoints[i].usable_for(now, over_budget_ok),
                |i| table.endpoints[i].state.cost(),
            )
        });
        // With every preferred endpoint out, the chain leads; with every
        // endpoint out, the preferred choice is tried anyway rather than
        // failing without an attempt (but never over budget).
        let mut next = first
            .or_else(|| self.next_in_chain(&table, route, &tried, over_budget_ok))
            .or_else(|| route.choice.as_ref().map(|c| c.pick(fastrand::f64())))
            .unwrap_or(route.fallback[0]);
        if table.endpoints[next].over_budget && !over_budget_ok {
            self.metrics
                .inc(Counter::OverBudget, Some(&class.name), None, "");
            return self
                .error(session, ctx, over_budget_error(&class.name))
                .await;
        }
        let mut last_err = None;
        let mut stale_retried = false;
        loop {
            let outcomes = if class.hedge {
                self.hedged(&attempt, route, next, &mut tried, ctx).await
            } else {
                tried.push(next);
                ctx.attempts += 1;
                let r = attempt.run(self, next).await;
                Outcomes::one(next, r)
            };
            let mut winner = None;
            for (idx, r) in outcomes.into_iter() {
                let ep = &table.endpoints[idx];
                match r {
                    Ok(o) => winner = Some((idx, o)),
                    Err((e, took)) => {
                        self.failed(ep, &e, took);
                        last_err = Some((idx, e));
                    }
                }
            }
            if let Some((idx, (opened, slot))) = winner {
                let ep = &table.endpoints[idx];
                ctx.endpoint = Some(ep.name.clone());
                let step = self
                    .relay(
                        session,
                        ctx,
                        ep,
                        opened,
                        Relay {
                            deadline,
                            inter_token: class.inter_token_timeout,
                            strip_usage,
                        },
                    )
                    .await;
                drop(slot);
                return match step {
                    Step::Done => Ok(()),
                    Step::Abort(e) => Err(e),
                };
            }
            let Some((failed_idx, err)) = &last_err else {
                break;
            };
            if Instant::now() >= deadline || tried.len() >= MAX_ATTEMPTS {
                break;
            }
            // A pooled connection the provider had closed: same endpoint,
            // new connection, counted as a retry but not charged to the
            // budget (the provider never saw the request).
            let stale = !stale_retried && matches!(err, AttemptError::Broken { stale: true, .. });
            stale_retried |= stale;
            let candidate = if stale {
                Some(*failed_idx)
            } else {
                self.next_in_chain(&table, route, &tried, over_budget_ok)
            };
            let Some(candidate) = candidate else {
                break;
            };
            if !stale && !lock(&class.retry).try_retry(Instant::now().into_std()) {
                self.metrics
                    .inc(Counter::RetryBudgetExhausted, Some(&class.name), None, "");
                break;
            }
            let to = &table.endpoints[candidate].name;
            self.metrics
                .inc(Counter::Retries, Some(&class.name), Some(to), "");
            if candidate != *failed_idx {
                self.metrics
                    .inc(Counter::Fallbacks, Some(&class.name), Some(to), "");
            }
            next = candidate;
        }
        let e = match last_err.map(|(_, e)| e) {
            Some(AttemptError::Timeout(d)) => ApiError::new(
                504,
                "server_error",
                format!("no first token within {} ms", d.as_millis()),
            )
            .code("upstream_timeout"),
            Some(AttemptError::Status {
                status: 429,
                retry_after,
            }) => {
                let mut e = ApiError::new(
                    429,
                    "rate_limit_error",
                    "every endpoint tried is rate limited",
                )
                .code("upstream_rate_limited");
                e.retry_after = Some(retry_after.map_or(1, |d| d.as_secs().max(1)));
                e
            }
            Some(AttemptError::Connect(reason)) => ApiError::new(
                503,
                "server_error",
                format!("no endpoint could be reached: {reason}"),
            )
            .code("upstream_unavailable"),
            Some(e) => ApiError::new(502, "server_error", format!("upstream failed: {e}"))
                .code("upstream_error"),
            None => ApiError::new(502, "server_error", "no endpoint was tried"),
        };
        let mut e = e;
        e.message
            .push_str(&format!(" (after {} attempts)", ctx.attempts));
        self.error(session, ctx, e).await
    }

    /// The first endpoint of the chain not yet tried and usable now.
    fn next_in_chain(
        &self,
        table: &Table,
        route: &Route,
        tried: &Tried,
        over_budget_ok: bool,
    ) -> Option<usize> {
        let now = std::time::Instant::now();
        route
            .fallback
            .iter()
            .copied()
            .find(|i| !tried.contains(*i) && table.endpoints[*i].usable_for(now, over_budget_ok))
    }

    /// Books a failed attempt: telemetry, local outlier detection, and
    /// throttling after a 429.
    fn failed(&self, ep: &Endpoint, e: &AttemptError, took: Duration) {
        let now = std::time::Instant::now();
        self.usage.record(&ep.name, Outcome::failed(e.kind(), took));
        if let AttemptError::Status {
            status: 429,
            retry_after,
        } = e
        {
            ep.state
                .throttle(now + retry_after.unwrap_or(Duration::from_secs(1)));
        }
        if let Some(d) = ep.state.failure(took, now, &self.outlier) {
            self.metrics
                .inc(Counter::Ejections, None, Some(&ep.name), "");
            tracing::warn!(endpoint = %ep.name, for_ms = d.as_millis() as u64, error = %e,
                "endpoint ejected locally");
        }
        tracing::debug!(endpoint = %ep.name, error = %e, "attempt failed");
    }

    /// Runs `first`; if it has no first token after its endpoint's recent
    /// p95 TTFT, sends the same request to the next endpoint of the chain and
    /// keeps whichever answers first. The loser is dropped, which closes its
    /// connection, so the provider stops generating.
    async fn hedged<'a>(
        &'a self,
        attempt: &Attempt<'a>,
        route: &Route,
        first: usize,
        tried: &mut Tried,
        ctx: &mut RequestCtx,
    ) -> Outcomes<'a> {
        let table = attempt.table;
        tried.push(first);
        ctx.attempts += 1;
        let delay = table.endpoints[first]
            .state
            .p95_ttft()
            .unwrap_or(attempt.ttft / 2)
            .min(attempt.ttft);
        let primary = attempt.run(self, first);
        tokio::pin!(primary);
        tokio::select! {
            r = &mut primary => return Outcomes::one(first, r),
            _ = tokio::time::sleep(delay) => {}
        }
        // A hedge is a retry: when a provider slows down for everyone, the
        // budget keeps hedges from doubling its load.
        let second = self
            .next_in_chain(table, route, tried, attempt.over_budget_ok)
            .filter(|_| lock(attempt.retry).try_retry(std::time::Instant::now()));
        let Some(second) = second else {
            return Outcomes::one(first, primary.await);
        };
        tried.push(second);
        ctx.attempts += 1;
        let class = ctx.class.clone();
        let second_name = &table.endpoints[second].name;
        self.metrics
            .inc(Counter::Hedges, class.as_ref(), Some(second_name), "");
        let hedge = attempt.run(self, second);
        tokio::pin!(hedge);
        let cancelled = |loser: usize| {
            self.metrics.inc(
                Counter::HedgesCancelled,
                class.as_ref(),
                Some(&table.endpoints[loser].name),
                "",
            );
        };
        tokio::select! {
            r = &mut primary => match r {
                Ok(_) => { cancelled(second); Outcomes::one(first, r) }
                Err(_) => Outcomes::two((first, r), (second, hedge.await)),
            },
            r = &mut hedge => match r {
                Ok(_) => { cancelled(first); Outcomes::one(second, r) }
                Err(_) => Outcomes::two((second, r), (first, primary.await)),
            },
        }
    }

    /// Streams an opened upstream answer to the app, chunk by chunk.
    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        ep: &Endpoint,
        opened: Opened,
        how: Relay,
    ) -> Step {
        let Relay {
            deadline,
            inter_token,
            strip_usage,
        } = how;
        let Opened {
            session: mut up,
            header: up_header,
            first,
            ttft,
        } = opened;
        let attempt_start = Instant::now() - ttft;
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
        } else if !resp.headers.contains_key("content-length") {
            // Framed, so the app can tell a complete answer from a cut one
            // and keep its connection.
            let _ = resp.insert_header("transfer-encoding", "chunked");
        }
        let mut outcome = Outcome {
            error: None,
            ttft: Some(ttft),
            latency: Duration::ZERO,
            tokens: None,
            spend_usd: 0.0,
        };
        let mut scan = if sse && strip_usage {
            UsageScan::stripping()
        } else {
            UsageScan::new(sse)
        };
        let result = async {
            within(
                deadline,
                session.write_response_header(Box::new(resp), false),
            )
            .await?;
            // A read that was already done when coalescing stopped: it is
            // taken before reading again.
            let mut held = None;
            if let Some(chunk) = first {
                let mut out = scan.pass(chunk);
                if done {
                    out = [out, scan.rest()].concat().into();
                } else {
                    (out, held) = coalesce(&mut up, &mut scan, out);
                }
                if done || !out.is_empty() {
                    write_body(session, Some(out), done, deadline).await?;
                }
            }
            while !done {
                let wait = (Instant::now() + inter_token).min(deadline);
                let next = match held.take() {
                    Some(read) => Ok(read),
                    None => tokio::time::timeout_at(wait, up.read_response_body()).await,
                };
                let reason = match next {
                    Ok(Ok(Some(chunk))) => {
                        let out = scan.pass(chunk);
                        let (out, after) = coalesce(&mut up, &mut scan, out);
                        held = after;
                        // Never an empty write: in chunked framing that
                        // would end the body.
                        if !out.is_empty() {
                            write_body(session, Some(out), false, deadline).await?;
                        }
                        continue;
                    }
                    Ok(Ok(None)) => {
                        done = true;
                        let rest = scan.rest();
                        let rest = (!rest.is_empty()).then_some(rest);
                        write_body(session, rest, true, deadline).await?;
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
                    // Close a half-sent event first, so the error parses.
                    let event = if scan.mid_event() {
                        Bytes::from([b"\n\n".as_slice(), &e.sse_event()].concat())
                    } else {
                        e.sse_event()
                    };
                    write_body(session, Some(event), true, deadline).await?;
                    return Ok(());
                }
                return Err(Step::Abort(Error::explain(ErrorType::ReadError, reason)));
            }
            Ok(())
        }
        .await;
        outcome.latency = attempt_start.elapsed();
        outcome.tokens = scan.finish();
        outcome.spend_usd = outcome.tokens.map_or(0.0, |t| t.cost(&ep.prices));
        self.usage.record(&ep.name, outcome);
        let now = std::time::Instant::now();
        match outcome.error {
            None => ep.state.success(ttft, now, &self.outlier),
            Some(_) => {
                if let Some(d) = ep.state.failure(outcome.latency, now, &self.outlier) {
                    self.metrics
                        .inc(Counter::Ejections, None, Some(&ep.name), "");
                    tracing::warn!(endpoint = %ep.name, for_ms = d.as_millis() as u64,
                        "endpoint ejected locally after a broken stream");
                }
            }
        }
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

/// How an opened answer is relayed.
struct Relay {
    deadline: Instant,
    /// Longest gap between two chunks.
    inter_token: Duration,
    /// The sidecar asked for the usage chunk; the app must not see it.
    strip_usage: bool,
}

/// Endpoints a request has tried, without allocating.
#[derive(Default)]
struct Tried {
    list: [usize; MAX_ATTEMPTS + 1],
    len: usize,
}

impl Tried {
    fn push(&mut self, i: usize) {
        if self.len < self.list.len() {
            self.list[self.len] = i;
            self.len += 1;
        }
    }

    fn contains(&self, i: usize) -> bool {
        self.list[..self.len].contains(&i)
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// One in-flight slot on an endpoint; frees a queued request when dropped.
pub struct Slot<'a> {
    state: &'a EndpointState,
    admission: &'a Admission,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        // SeqCst: pairs with the queue publishing a waiter before it looks
        // at in-flight counts, so a freed slot is never missed.
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.admission.freed();
    }
}

type AttemptResult<'a> = std::result::Result<(Opened, Slot<'a>), (AttemptError, Duration)>;

/// The results of one step: one attempt, or a hedged pair.
struct Outcomes<'a> {
    items: [Option<(usize, AttemptResult<'a>)>; 2],
}

impl<'a> Outcomes<'a> {
    fn one(i: usize, r: AttemptResult<'a>) -> Self {
        Self {
            items: [Some((i, r)), None],
        }
    }

    fn two(a: (usize, AttemptResult<'a>), b: (usize, AttemptResult<'a>)) -> Self {
        Self {
            items: [Some(a), Some(b)],
        }
    }

    fn into_iter(self) -> impl Iterator<Item = (usize, AttemptResult<'a>)> {
        self.items.into_iter().flatten()
    }
}

/// What every attempt of one request shares.
struct Attempt<'a> {
    table: &'a Table,
    retry: &'a std::sync::Mutex<crate::retry::RetryBudget>,
    req: &'a RequestHeader,
    body: &'a Bytes,
    ttft: Duration,
    deadline: Instant,
    /// Whether endpoints over budget may be tried (see `chat`).
    over_budget_ok: bool,
}

impl<'a> Attempt<'a> {
    async fn run(&self, sidecar: &'a Sidecar, idx: usize) -> AttemptResult<'a> {
        let ep = &self.table.endpoints[idx];
        ep.state.in_flight.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            state: &ep.state,
            admission: &sidecar.admission,
        };
        let start = Instant::now();
        let ttft_deadline = (start + self.ttft).min(self.deadline);
        let req = (|| {
            let mut req = Box::new(self.req.clone());
            req.set_raw_path(ep.chat_path.as_bytes())?;
            req.insert_header("host", &ep.authority)?;
            req.insert_header("content-length", self.body.len())?;
            if let Some(auth) = &ep.authorization {
                req.insert_header("authorization", auth.clone())?;
            }
            Ok::<_, Box<Error>>(req)
        })()
        .map_err(|e| {
            (
                AttemptError::Broken {
                    reason: e.to_string(),
                    stale: false,
                },
                Duration::ZERO,
            )
        })?;
        match forward::open(
            &sidecar.connector,
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

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn over_budget_error(class: &str) -> ApiError {
    ApiError::new(
        503,
        "server_error",
        format!(
            "every endpoint class `{class}` may use now is over its spend budget for the last hour"
        ),
    )
    .code("over_budget")
}

fn route_error(e: RouteError<'_>, model: &str) -> ApiError {
    match e {
        RouteError::UnknownClass(c) => {
            ApiError::invalid(format!("unknown request class `{c}`")).code("unknown_class")
        }
        RouteError::UnknownModel => ApiError::new(
            404,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .code("model_not_found")
        .param("model"),
        RouteError::NoRoute => ApiError::new(
            503,
            "server_error",
            format!("no endpoint allowed for this request class serves `{model}`"),
        )
        .code("no_route"),
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
    let listed = connection_listed(&app.headers);
    for (name, value) in app.headers.iter() {
        let n = name.as_str();
        // accept-encoding: the sidecar reads usage from the answer, so it
        // asks for it uncompressed.
        if forward::is_hop_header(n)
            || n.starts_with("x-switchyard-")
            || n == "authorization"
            || n == "api-key"
            || n == "accept-encoding"
            || listed.iter().any(|l| l.eq_ignore_ascii_case(n))
        {
            continue;
        }
        req.append_header(name.clone(), value.clone())?;
    }
    Ok(req)
}

/// Header names a `Connection` header lists: hop-by-hop by declaration.
fn connection_listed(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect()
}

fn build_response(up: &ResponseHeader, ep: &Endpoint, ctx: &RequestCtx) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(up.status, Some(up.headers.len() + 3))?;
    let listed = connection_listed(&up.headers);
    for (name, value) in up.headers.iter() {
        let n = name.as_str();
        if listed.iter().any(|l| l == n) {
            continue;
        }
        if n == "content-length" || !forward::is_hop_header(n) {
            resp.append_header(name.clone(), value.clone())?;
        }
    }
    resp.insert_header("x-switchyard-endpoint", &*ep.name)?;
    resp.insert_header("x-switchyard-attempts", ctx.attempts.to_string())?;
    resp.insert_header("x-switchyard-table-version", ctx.table_version.to_string())?;
    if let Some(d) = ctx.degraded {
        resp.insert_header("x-switchyard-degraded", d)?;
    }
    Ok(resp)
}

#[async_trait]
impl ProxyHttp for Sidecar {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: std::time::Instant::now(),
            class: None,
            endpoint: None,
            degraded: None,
            attempts: 0,
            status: 0,
            table_version: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let method = session.req_header().method.as_str().to_owned();
        let path = session.req_header().uri.path().to_owned();
        // Load balancers and probes may ask with HEAD; it answers as GET does.
        let route_method = if method == "HEAD" { "GET" } else { &method };
        match (route_method, path.as_str()) {
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
                let mut body = self.render_metrics();
                body.push_str(&self.rtt.metrics(self.tables.load_full().as_deref()));
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
                    // The pid tells a launcher that the process answering on
                    // this port is the one it started, not an older sidecar
                    // still bound there.
                    let body = Bytes::from(format!(
                        "ready: table version {}, pid {}\n",
                        t.version,
                        std::process::id()
                    ));
                    self.respond(session, ctx, 200, "text/plain", body).await?
                }
                None => {
                    let body = Bytes::from(format!(
                        "not ready: no routing table applied yet, pid {}\n",
                        std::process::id()
                    ));
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
        if ctx.class.is_some() {
            self.metrics
                .request(ctx.class.as_ref(), ctx.endpoint.as_ref(), ctx.status);
        }
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
