//! The sidecar's side of the control plane: watches for tables (applying,
//! ACKing or NACKing each), and streams telemetry. Runs on its own thread and
//! runtime, so the proxy never waits on the control plane; when the control
//! plane is away the proxy keeps routing on its last good table and this
//! side reconnects with capped, jittered exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::watch_request::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::Metrics;
use crate::rtt::RttView;
use crate::table::{self, Live, Table};

pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Capped exponential backoff with jitter, reset after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay for a jitter draw `u` in `[0, 1)`: between half and
    /// all of `base * 2^attempt`, capped.
    pub fn next(&mut self, u: f64) -> Duration {
        let exp = self.base.saturating_mul(1 << self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        exp.min(self.cap).mul_f64(0.5 + 0.5 * u.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("invalid control plane address: {0}")]
    Address(String),
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// Boxed: a `tonic::Status` is large, and this error travels in every
    /// `Result` of the stream loops (clippy::result_large_err).
    #[error("stream: {0}")]
    Status(Box<tonic::Status>),
    #[error("the control plane closed the stream")]
    Closed,
}

impl From<tonic::Status> for StreamError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(Box::new(s))
    }
}

pub struct ControlClient {
    pub address: String,
    pub sidecar_id: String,
    pub tables: Arc<ArcSwapOption<Table>>,
    pub live: Arc<Live>,
    pub metrics: Arc<Metrics>,
    pub rtt: Arc<RttView>,
}

impl ControlClient {
    /// Starts the client on a thread of its own.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("switchyard-control".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        // Without it the sidecar never gets a table: say so
                        // loudly; /readyz stays 503.
                        tracing::error!(error = %e, "cannot start the control plane client");
                        return;
                    }
                };
                let this = Arc::new(self);
                rt.block_on(async move {
                    let telemetry = tokio::spawn(this.clone().report_loop());
                    let sweep = tokio::spawn(sweep_idle(this.live.clone()));
                    this.watch_loop().await;
                    telemetry.abort();
                    sweep.abort();
                });
            })
    }

    fn endpoint(&self) -> Result<Endpoint, StreamError> {
        Endpoint::from_shared(format!("http://{}", self.address))
            .map(|e| {
                e.connect_timeout(Duration::from_secs(2))
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
            })
            .map_err(|e| StreamError::Address(e.to_string()))
    }

    async fn watch_loop(&self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let ended = self.watch_stream(&mut backoff).await;
            let version = self.tables.load().as_ref().map_or(0, |t| t.version);
            let delay = match ended {
                Ok(()) => {
                    // The control plane ended the stream itself: it is
                    // shutting down, and its successor or another replica
                    // may answer already. Start over from the shortest
                    // delay (never none, so a control plane that keeps
                    // closing at once is not called in a loop).
                    backoff.reset();
                    let delay = backoff.next(fastrand::f64());
                    tracing::info!(
                        retry_in_ms = delay.as_millis() as u64,
                        routing_on = version,
                        "the control plane closed the Watch stream; reconnecting"
                    );
                    delay
                }
                Err(err) => {
                    let delay = backoff.next(fastrand::f64());
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, routing_on = version,
                        "control plane unavailable; routing on the last good table");
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// One Watch stream, until it ends: `Ok` when the control plane ended it
    /// cleanly (end of stream, status OK), an error when it broke.
    async fn watch_stream(&self, backoff: &mut Backoff) -> Result<(), StreamError> {
        let channel: Channel = self.endpoint()?.connect().await?;
        let mut client = pb::routing_discovery_client::RoutingDiscoveryClient::new(channel);
        let (tx, rx) = mpsc::channel(8);
        let applied = self.tables.load().as_ref().map_or(0, |t| t.version);
        let hello = pb::WatchRequest {
            kind: Some(Kind::Hello(pb::Hello {
                sidecar_id: self.sidecar_id.clone(),
                applied_version: applied,
            })),
        };
        tx.send(hello).await.map_err(|_| StreamError::Closed)?;
        let mut updates = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        while let Some(update) = updates.message().await? {
            backoff.reset();
            let version = update.table.as_ref().map_or(0, |t| t.version);
            let reply = match self.apply(&update).await {
                Ok(()) => {
                    tracing::info!(version, "routing table applied");
                    Kind::Ack(pb::Ack {
                        version,
                        nonce: update.nonce,
                    })
                }
                Err(e) => {
                    tracing::warn!(version, reason = %e, "routing table refused; keeping the last good one");
                    Kind::Nack(pb::Nack {
                        version,
                        nonce: update.nonce,
                        reason: e.to_string(),
                    })
                }
            };
            tx.send(pb::WatchRequest { kind: Some(reply) })
                .await
                .map_err(|_| StreamError::Closed)?;
        }
        Ok(())
    }

    async fn apply(&self, update: &pb::TableUpdate) -> Result<(), table::TableError> {
        let t = update.table.as_ref().ok_or(table::TableError::Missing)?;
        let addrs = table::resolve(t).await?;
        let compiled = Table::compile(t, &addrs, &self.live, &self.metrics)?;
        self.tables.store(Some(Arc::new(compiled)));
        Ok(())
    }

    async fn report_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.report_stream(&mut backoff).await {
                // The control plane answered, ending the call: it is
                // shutting down; report to whoever serves next promptly.
                Ok(()) => backoff.reset(),
                Err(e) => tracing::debug!(error = %e, "telemetry stream ended"),
            }
            tokio::time::sleep(backoff.next(fastrand::f64())).await;
        }
    }

    /// One telemetry call, until it ends: `Ok` when the control plane
    /// answered it (it does when it shuts down), an error when it broke.
    async fn report_stream(&self, backoff: &mut Backoff) -> Result<(), StreamError> {
        let channel: Channel = self.endpoint()?.connect().await?;
        let mut client = pb::telemetry_client::TelemetryClient::new(channel);
        let (tx, rx) = mpsc::channel(4);
        let call = tokio::spawn(async move { client.report(ReceiverStream::new(rx)).await });
        let mut tick = tokio::time::interval(REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let table = self.tables.load_full();
            let mut endpoints = crate::usage::take_report(&self.live.endpoints);
            self.rtt.annotate(&mut endpoints, table.as_deref());
            let report = pb::TelemetryReport {
                sidecar_id: self.sidecar_id.clone(),
                table_version: table.as_ref().map_or(0, |t| t.version),
                window_ms: REPORT_EVERY.as_millis() as u32,
                endpoints,
            };
            if tx.send(report).await.is_err() {
                break;
            }
            backoff.reset();
        }
        match call.await {
            Ok(Ok(_)) => Ok(()),
            Err(_) => Err(StreamError::Closed),
            Ok(Err(status)) => Err(status.into()),
        }
    }
}

/// Closes upstream connections idle for too long, whether or not the
/// control plane is there, so an endpoint that gets no more traffic does
/// not keep them open. (Runs on this thread: the proxy's threads never wait
/// for it.)
async fn sweep_idle(live: Arc<Live>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = std::time::Instant::now();
        for (_, state) in live.endpoints.all() {
            state.idle.sweep(now);
        }
    }
}

const SWEEP_EVERY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next(0.999_999).as_millis(), 99);
        assert_eq!(b.next(0.0), Duration::from_millis(100));
        assert_eq!(b.next(0.0), Duration::from_millis(200));
        for _ in 0..50 {
            assert!(b.next(1.0) <= Duration::from_secs(1));
        }
        b.reset();
        assert!(b.next(1.0) <= Duration::from_millis(100));
    }
}
