//! The `ProxyHttp` implementation: per-request state, dispatch to the
//! request path (`request`: chat completions, completions, embeddings) or the sidecar's own routes (`routes`), and
//! the request counters in `logging()`.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};

use crate::health::OutlierPolicy;
use crate::metrics::Metrics;
use crate::request::intake::Limits;
use crate::routes::{self, Route};
use crate::shed::Admission;
use crate::table::{Live, Table};

pub struct Sidecar {
    pub tables: Arc<ArcSwapOption<Table>>,
    pub live: Arc<Live>,
    pub metrics: Arc<Metrics>,
    /// The load-shedding queue.
    pub queue: Admission,
    pub outlier: OutlierPolicy,
    pub connections: crate::pool::Connections,
    pub limits: Limits,
}

/// Per-request state, read by `logging()`.
pub struct RequestCtx {
    pub started: Instant,
    /// The table the request was routed on.
    pub table: Option<Arc<Table>>,
    /// Its class, by position in that table.
    pub class: Option<usize>,
    /// The endpoint that answered, by id in that table.
    pub endpoint: Option<usize>,
    pub degraded: Option<&'static str>,
    pub attempts: u8,
    pub status: u16,
    /// Keeps the request counted until its context is dropped, which is
    /// after the answer was written: a draining sidecar waits for it.
    pub in_flight: crate::drain::InFlight,
}

#[async_trait]
impl ProxyHttp for Sidecar {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            table: None,
            class: None,
            endpoint: None,
            degraded: None,
            attempts: 0,
            status: 0,
            in_flight: crate::drain::InFlight::enter(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let h = session.req_header();
        match routes::route(&h.method, h.uri.path()) {
            Route::Api(op) => crate::request::serve(self, op, session, ctx).await?,
            other => routes::serve(self, other, session, ctx).await?,
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
        let table = ctx.table.as_deref();
        if let Some(class) = table.zip(ctx.class).and_then(|(t, c)| t.class_at(c)) {
            let endpoint = table
                .zip(ctx.endpoint)
                .and_then(|(t, id)| t.endpoints.get(id))
                .and_then(|ep| Some((class.pair(ep)?, &ep.name)));
            class.counters.request(&self.metrics, endpoint, ctx.status);
        }
        tracing::debug!(
            method = %session.req_header().method,
            path = %session.req_header().uri.path(),
            status = ctx.status,
            attempts = ctx.attempts,
            micros = ctx.started.elapsed().as_micros() as u64,
            error = e.map(|e| e.to_string()).unwrap_or_default(),
            "request"
        );
    }
}
