//! The sidecar's side of the control plane: watches for tables (applying,
//! ACKing or NACKing each, and saving each applied one for the next start),
//! and streams telemetry. Runs on its own thread and runtime, so the proxy
//! never waits on the control plane; when the control plane is away the
//! proxy keeps routing on its last good table, trusts its weights for the
//! table's TTL, and this side reconnects with capped, jittered exponential
//! backoff. In standalone mode the same thread runs the caller's table feed
//! (a local policy file) instead.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::watch_request::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::Metrics;
use crate::origin::{self, Source};
use crate::persist;
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
    #[error(transparent)]
    Link(#[from] switchyard_proto::tls::TlsError),
    /// With the whole chain of causes: tonic's own message is only
    /// "transport error", which hides a refused certificate.
    #[error("connecting: {}", causes(.0))]
    Connect(#[from] tonic::transport::Error),
    /// Boxed: a `tonic::Status` is large, and this error travels in every
    /// `Result` of the stream loops (clippy::result_large_err).
    #[error("stream: {}", causes(.0.as_ref()))]
    Status(Box<tonic::Status>),
    #[error("the control plane closed the stream")]
    Closed,
}

/// An error and its sources, `: `-separated.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        out.push_str(": ");
        out.push_str(&c.to_string());
        next = c.source();
    }
    out
}

impl From<tonic::Status> for StreamError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(Box::new(s))
    }
}

/// Applies tables to the sidecar, whoever sends them: compiles, swaps the
/// table in force, records where it came from, and saves what the control
/// plane pushed.
#[derive(Clone)]
pub struct Applier {
    pub tables: Arc<ArcSwapOption<Table>>,
    pub live: Arc<Live>,
    pub metrics: Arc<Metrics>,
    /// Where tables from the control plane are saved; `None`: nowhere.
    pub save_to: Option<PathBuf>,
    /// The version of the table on disk (0: none known), so the control
    /// plane's presence is recorded on the file only while that table is
    /// the one in force.
    pub saved_version: Arc<AtomicU64>,
}

impl Applier {
    /// Compiles and applies `t`. A table that does not compile changes
    /// nothing: the error is the NACK's reason.
    pub async fn apply(
        &self,
        t: &pb::RoutingTable,
        source: Source,
    ) -> Result<(), table::TableError> {
        let addrs = table::resolve(t).await?;
        let compiled = Table::compile(t, &addrs, &self.live, &self.metrics)?;
        // Saved before it is swapped in, so that once `/readyz` or the ACK
        // names a table from the control plane, it is on disk (unless the
        // disk refused it, which is logged).
        if source == Source::Control {
            if let Some(path) = &self.save_to {
                // Applied either way: a disk that refuses the file costs the
                // next cold start its table, not this table its traffic.
                match persist::save(path, t) {
                    Ok(()) => {
                        self.saved_version.store(t.version, Ordering::Relaxed);
                        tracing::debug!(version = t.version, path = %path.display(), "table saved")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot save the routing table; a restart without the control plane will not have it")
                    }
                }
            }
        }
        self.tables.store(Some(Arc::new(compiled)));
        self.live.origin.set_source(source);
        Ok(())
    }

    /// Serves from the table a previous run saved, if there is a good one.
    /// Returns when the control plane last stood behind its weights.
    async fn apply_saved(&self) -> Option<SystemTime> {
        let path = self.save_to.as_ref()?;
        match persist::load(path) {
            Ok(None) => None,
            Ok(Some((t, confirmed))) => match self.apply(&t, Source::Persisted).await {
                Ok(()) => {
                    self.saved_version.store(t.version, Ordering::Relaxed);
                    tracing::warn!(version = t.version, path = %path.display(),
                        "serving from the saved routing table until the control plane answers");
                    Some(confirmed)
                }
                Err(e) => {
                    tracing::error!(error = %e, path = %path.display(), "the saved routing table cannot be applied; ignored");
                    None
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "the saved routing table is unreadable; ignored");
                None
            }
        }
    }
}

/// A feed of tables for a sidecar without a control plane: run on the
/// control thread with the sidecar's [`Applier`].
pub type Feed = Box<dyn FnOnce(Applier) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Where a sidecar's tables come from.
pub enum TableSource {
    /// A control plane at `address` (`host:port`, or an `https://` URL),
    /// over the Watch stream, secured as `tls` says.
    Control {
        address: String,
        tls: switchyard_proto::tls::ClientTls,
    },
    /// The caller's feed (standalone mode: a local policy file).
    Local(Feed),
}

pub struct ControlClient {
    pub address: String,
    pub tls: switchyard_proto::tls::ClientTls,
    pub sidecar_id: String,
    pub applier: Applier,
    pub rtt: Arc<RttView>,
    /// When the control plane last stood behind the weights in force: the
    /// saved table's time at start, then each time a Watch stream ends
    /// (while one is up, the weights do not age at all).
    confirmed: parking_lot::Mutex<SystemTime>,
}

/// Starts the thread that brings tables in (from `source`) and keeps
/// their state: idle connections swept, weights aged.
pub fn spawn(
    source: TableSource,
    sidecar_id: String,
    applier: Applier,
    rtt: Arc<RttView>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
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
            rt.block_on(async move {
                let sweep = tokio::spawn(sweep_idle(applier.live.clone()));
                match source {
                    TableSource::Local(feed) => feed(applier).await,
                    TableSource::Control { address, tls } => {
                        let confirmed = applier.apply_saved().await;
                        let this = Arc::new(ControlClient {
                            address,
                            tls,
                            sidecar_id,
                            applier,
                            rtt,
                            confirmed: parking_lot::Mutex::new(
                                confirmed.unwrap_or_else(SystemTime::now),
                            ),
                        });
                        let telemetry = tokio::spawn(this.clone().report_loop());
                        let ageing = tokio::spawn(this.clone().age_weights());
                        this.watch_loop().await;
                        telemetry.abort();
                        ageing.abort();
                    }
                }
                sweep.abort();
            });
        })
}

impl ControlClient {
    fn tables(&self) -> &ArcSwapOption<Table> {
        &self.applier.tables
    }

    /// Once a second: decides whether the weights in force have outlived
    /// their TTL, and while the control plane is there, records on the
    /// saved table that it still stands behind them.
    async fn age_weights(self: Arc<Self>) {
        let mut tick = tokio::time::interval(AGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut touched = SystemTime::UNIX_EPOCH;
        loop {
            tick.tick().await;
            let origin = &self.applier.live.origin;
            let now = SystemTime::now();
            let connected = origin.control_connected();
            if connected {
                let in_force = self.tables().load().as_ref().map(|t| t.version);
                let saved = self.applier.saved_version.load(Ordering::Relaxed);
                if let Some(path) = self
                    .applier
                    .save_to
                    .as_ref()
                    .filter(|_| in_force == Some(saved))
                {
                    if now.duration_since(touched).is_ok_and(|d| d >= TOUCH_EVERY) {
                        touched = now;
                        if let Err(e) = persist::touch(path) {
                            tracing::debug!(error = %e, "cannot touch the saved table");
                        }
                    }
                }
            }
            let ttl = self.tables().load().as_ref().and_then(|t| t.weights_ttl);
            let confirmed = *self.confirmed.lock();
            let expired = origin::expired(ttl, connected, confirmed, now);
            if origin.set_weights_expired(expired) != expired {
                if expired {
                    tracing::warn!(ttl_ms = ttl.map_or(0, |t| t.as_millis() as u64),
                        "weights expired without the control plane; balancing on local signals over the same endpoints");
                } else {
                    tracing::info!("weights trusted again");
                }
            }
        }
    }

    fn endpoint(&self) -> Result<Endpoint, StreamError> {
        Ok(switchyard_proto::tls::endpoint(&self.address, &self.tls)?)
    }

    async fn watch_loop(&self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let ended = self.watch_stream(&mut backoff).await;
            let version = self.tables().load().as_ref().map(|t| t.version);
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
                        routing_on = version.unwrap_or(0),
                        "the control plane closed the Watch stream; reconnecting"
                    );
                    delay
                }
                Err(err) => {
                    let delay = backoff.next(fastrand::f64());
                    match version {
                        Some(version) => {
                            tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                            routing_on = version, "control plane unavailable; routing on the last good table")
                        }
                        None => {
                            tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                            "control plane unavailable and no table yet; requests get 503 not_ready")
                        }
                    }
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
        let applied = self.tables().load().as_ref().map_or(0, |t| t.version);
        let hello = pb::WatchRequest {
            kind: Some(Kind::Hello(pb::Hello {
                sidecar_id: self.sidecar_id.clone(),
                applied_version: applied,
            })),
        };
        tx.send(hello).await.map_err(|_| StreamError::Closed)?;
        let mut updates = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        // Up once a table from this stream is in force: before that, the
        // weights in force are not the control plane's word.
        let mut connected = None;
        while let Some(update) = updates.message().await? {
            backoff.reset();
            let version = update.table.as_ref().map_or(0, |t| t.version);
            let reply = match self.apply(&update).await {
                Ok(()) => {
                    connected.get_or_insert_with(|| Connected::new(self));
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
        self.applier.apply(t, Source::Control).await
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
            let table = self.tables().load_full();
            let mut endpoints = crate::usage::take_report(&self.applier.live.endpoints);
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
const AGE_EVERY: Duration = Duration::from_secs(1);
/// How often the saved table's time is renewed while connected: a restart
/// ages the weights from it, so it may lag by this much.
const TOUCH_EVERY: Duration = Duration::from_secs(5);

/// Marks the Watch stream up for as long as it lives; when it ends, the
/// control plane's last word is now.
struct Connected<'a>(&'a ControlClient);

impl<'a> Connected<'a> {
    fn new(c: &'a ControlClient) -> Self {
        c.applier.live.origin.set_control_connected(true);
        Self(c)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        *self.0.confirmed.lock() = SystemTime::now();
        self.0.applier.live.origin.set_control_connected(false);
    }
}

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
