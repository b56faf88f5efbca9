//! The request path for chat completions, completions and embeddings, one
//! stage per module:
//!
//! 1. [`intake`]: read the body (bounded in size and time) and the
//!    sidecar's headers, check the request, find its class and route;
//! 2. [`admit`]: go, degrade, wait for capacity, or refuse;
//! 3. [`pick`]: the first endpoint, and after a failure the next one;
//! 4. [`attempt`] / [`hedge`]: one exchange with a provider, or two raced;
//! 5. [`relay`]: stream the answer to the app;
//! 6. [`account`]: telemetry, health and counters;
//!
//! and [`errors`]: every way a request ends without a provider's answer,
//! mapped once to what the app sees. This module runs them in order.

pub mod account;
pub mod admit;
pub mod attempt;
pub mod errors;
pub mod hedge;
pub mod intake;
pub mod pick;
pub mod relay;

use std::sync::Arc;
use std::time::Instant as StdInstant;

use pingora::proxy::Session;
use switchyard_wire::operation::Operation;
use tokio::time::Instant;

use self::attempt::{Attempt, AttemptError, Opened, Slot};
use self::errors::RequestError;
use self::hedge::Outcomes;
use self::pick::{Next, Now, StopReason, Tried};
use crate::metrics::Action;
use crate::proxy::{RequestCtx, Sidecar};
use crate::shed::Candidate;
use crate::table::{Class, Endpoint};

/// Why the request path stopped early.
#[derive(Debug)]
pub enum Stop {
    /// Answer the app with this error.
    Answer(RequestError),
    /// The app's connection cannot carry an answer any more (it went away,
    /// or part of a body was already sent): close it.
    Abort(Box<pingora::Error>),
}

impl From<RequestError> for Stop {
    fn from(e: RequestError) -> Self {
        Stop::Answer(e)
    }
}

impl From<switchyard_wire::chat::Invalid> for Stop {
    fn from(e: switchyard_wire::chat::Invalid) -> Self {
        Stop::Answer(e.into())
    }
}

/// Serves one request for `op`: an answer or an error, always.
pub async fn serve(
    sc: &Sidecar,
    op: Operation,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> pingora::Result<()> {
    match run(sc, op, session, ctx).await {
        Ok(()) => Ok(()),
        Err(Stop::Answer(e)) => {
            if e.closes_connection() {
                session.set_keepalive(None);
            }
            crate::reply::error(session, ctx, &e.to_api()).await
        }
        Err(Stop::Abort(e)) => Err(e),
    }
}

async fn run(
    sc: &Sidecar,
    op: Operation,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), Stop> {
    // 1. Intake.
    let body = intake::read_body(session, &sc.limits).await?;
    let request = switchyard_wire::chat::parse_for(op, &body)?;
    let app = intake::headers(session.req_header())?;
    let table = sc.tables.load_full().ok_or(RequestError::NotReady)?;
    ctx.table = Some(table.clone());
    let (class, route) = intake::classify(&table, app.class, &request.model, op)?;
    ctx.class = Some(class.index);
    let started = Instant::now();
    let deadline = started
        + app
            .timeout
            .map_or(class.deadline, |d| d.min(class.deadline));
    let (stream, include_usage) = (request.stream, request.include_usage);

    // 2. Admission.
    let queue_until = (started + class.ttft_timeout).min(deadline);
    let admitted = match admit::enter(
        &table,
        class,
        op,
        route,
        &request.model,
        body.clone(),
        &sc.queue,
        queue_until,
    )
    .await
    {
        Ok(a) => a,
        Err(e) => {
            if let RequestError::Rejected { .. } = e {
                // Refusing is the class's degradation: the app is told so.
                ctx.degraded = class.degrade.as_ref().map(crate::table::Degrade::label);
            }
            return Err(e.into());
        }
    };
    ctx.degraded = admitted.degraded;
    // Ask for the usage chunk on the app's behalf, so streams are
    // accounted; the relay takes it out again.
    let strip_usage = stream && include_usage != Some(true);
    let model = admitted.model;
    let body = if strip_usage {
        switchyard_wire::chat::ask_usage(&admitted.body, include_usage.is_some())?
    } else {
        admitted.body
    };

    // 3-4. Pick and attempt, until one answers.
    class.retry.lock().request(StdInstant::now());
    let attempt = Attempt {
        connections: &sc.connections,
        queue: &sc.queue,
        metrics: &sc.metrics,
        retry: &class.retry,
        app: session.req_header(),
        op,
        model,
        default_max_tokens: class.default_max_tokens,
        body: &body,
        ttft: class.ttft_timeout,
        deadline,
        max_priority: table.max_priority,
    };
    let route = admitted.route;
    let facts = Now {
        at: StdInstant::now(),
        may_exceed_spend: admitted.may_exceed_spend,
    };
    let first = pick::first(
        route.first_choice(sc.live.origin.weights_expired()),
        &route.chain,
        [fastrand::f64(), fastrand::f64(), fastrand::f64()],
        &facts,
    )
    .ok_or_else(|| RequestError::NoRoute(request.model.to_string()))?;
    if first.over_spend_budget && !admitted.may_exceed_spend {
        class.counters.over_spend_budget.inc();
        return Err(RequestError::OverSpendBudget {
            class: class.name.clone(),
        }
        .into());
    }
    let (ep, opened, slot) = attempts(
        sc,
        &attempt,
        class,
        &route.chain,
        first,
        admitted.may_exceed_spend,
        ctx,
    )
    .await?;

    // 5. Relay.
    ctx.endpoint = Some(ep.id);
    let stamp = relay::Stamp {
        endpoint: &ep.name_header,
        attempts: ctx.attempts,
        table_version: &table.version_header,
        degraded: ctx.degraded,
    };
    ctx.status = opened.header.status.as_u16();
    let how = relay::Relay {
        deadline,
        inter_token: class.inter_token_timeout,
        strip_usage,
    };
    let (result, relayed, reusable) = relay::relay(session, opened, &stamp, how).await;

    // 6. Account.
    account::answered(ep, &relayed, &sc.outlier);
    if let Some(mut up) = reusable {
        up.respect_keepalive();
        if let Some(stream) = up.reuse().await {
            sc.connections.release(&ep.state.idle, &ep.peer, stream);
        }
    }
    drop(slot);
    result
}

/// Runs attempts from `first` along the class's chain until one answers
/// (returning it with its in-flight slot) or the request must stop.
async fn attempts<'a>(
    sc: &Sidecar,
    attempt: &Attempt<'a, '_>,
    class: &Class,
    chain: &'a [Arc<Endpoint>],
    first: &'a Arc<Endpoint>,
    may_exceed_spend: bool,
    ctx: &mut RequestCtx,
) -> Result<(&'a Arc<Endpoint>, Opened, Slot<'a>), RequestError> {
    let mut tried = Tried::default();
    let mut reconnected = false;
    let mut next = first;
    let mut last: Option<(&Arc<Endpoint>, AttemptError)> = None;
    // The last failure of an endpoint (not of a request its API cannot
    // carry): what the app is told when every attempt failed.
    let mut blamed: Option<AttemptError> = None;
    let ended = loop {
        let facts = Now {
            at: StdInstant::now(),
            may_exceed_spend,
        };
        let outcomes = if class.hedge {
            // Boxed: a hedge holds two attempts at once; unboxed, every
            // request's future would be sized for it.
            Box::pin(hedge::hedged(
                attempt,
                class,
                chain,
                next,
                &mut tried,
                &mut ctx.attempts,
                &facts,
            ))
            .await
        } else {
            tried.push(next.id);
            ctx.attempts += 1;
            Outcomes::one(next, attempt.run(next).await)
        };
        let mut winner = None;
        for (ep, r) in outcomes.results() {
            match r {
                Ok((opened, slot)) => winner = Some((ep, opened, slot)),
                Err((e, took)) => {
                    account::attempt_failed(ep, &e, took, &sc.outlier);
                    if e.kind().is_some() {
                        blamed = Some(e.clone());
                    }
                    last = Some((ep, e));
                }
            }
        }
        if let Some(w) = winner {
            return Ok(w);
        }
        let Some((failed, err)) = &last else {
            return Err(RequestError::NoRoute(String::new()));
        };
        let retry = |e: &Arc<Endpoint>| {
            if !class.retry.lock().try_retry(StdInstant::now()) {
                class.counters.retry_budget_exhausted.inc();
                return false;
            }
            if let Some(pair) = class.pair(e) {
                class
                    .counters
                    .action(&sc.metrics, pair, &e.name, Action::Fallback);
            }
            true
        };
        let facts = Now {
            at: StdInstant::now(),
            may_exceed_spend,
        };
        let deadline_passed = Instant::now() >= attempt.deadline;
        let to = match pick::next_attempt(
            *failed,
            err.stale(),
            reconnected,
            &tried,
            chain,
            deadline_passed,
            &facts,
        ) {
            Next::Reconnect(e) => {
                reconnected = true;
                e
            }
            Next::Fallback(e) => {
                // Nothing was sent for a request the failed endpoint's API
                // cannot carry: moving on costs no retry.
                if err.kind().is_some() && !retry(e) {
                    break StopReason::RetryBudget;
                }
                e
            }
            Next::Wait(e) => {
                let waiting_for = vec![Candidate {
                    state: Arc::clone(&e.state),
                    capacity: e.capacity,
                }];
                // A request that cannot wait ends with its upstream error
                // (what went wrong) and why no attempt followed (busy); the
                // retry budget pays only for an attempt that happens.
                let waited = attempt
                    .queue
                    .wait(
                        class.priority,
                        attempt.max_priority,
                        attempt.deadline,
                        waiting_for,
                    )
                    .await;
                if waited.is_err() {
                    break StopReason::Busy;
                }
                if !retry(e) {
                    break StopReason::RetryBudget;
                }
                e
            }
            Next::Stop(reason) => break reason,
        };
        if let Some(pair) = class.pair(to) {
            class
                .counters
                .action(&sc.metrics, pair, &to.name, Action::Retry);
        }
        next = to;
    };
    match last {
        Some((_, last)) => Err(RequestError::Upstream {
            last: blamed.unwrap_or(last),
            attempts: ctx.attempts,
            ended,
        }),
        None => Err(RequestError::NoRoute(String::new())),
    }
}
