//! The Switchyard control plane: reads the policy, turns it into versioned
//! routing tables, streams them to every sidecar, takes in their telemetry
//! and answers operators.
#![forbid(unsafe_code)]

pub mod admin;
pub mod engine;
pub mod health;
pub mod probe;
pub mod publish;
pub mod registry;
pub mod routing;
pub mod scrape;
pub mod services;
pub mod signals;
pub mod spend;
pub mod store;
pub mod weights;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use publish::LoadError;

/// How long in-flight calls may finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
pub use store::StoreError;

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub policy: PathBuf,
    /// How often the policy file is checked for edits.
    pub reload_every: Duration,
    /// How often weights are recomputed from telemetry.
    pub interval: Duration,
    /// The SQLite database for switches, the audit log and the last
    /// decision; `None` keeps them in memory only.
    pub db: Option<PathBuf>,
    /// Bearer token the admin API requires; `None` serves status only.
    pub admin_token: Option<String>,
    /// TLS for every gRPC service; `None`: plain text.
    pub tls: Option<switchyard_proto::tls::ServerTls>,
    /// How endpoints are probed; `None`: they are not, and only the
    /// sidecars' reports say whether one is down.
    pub probe: Option<probe::ProbeConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Policy(#[from] LoadError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("TTFT histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error(transparent)]
    Tls(#[from] switchyard_proto::tls::TlsError),
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    config: ControlConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ControlError> {
    let store = Arc::new(store::Store::open(config.db.as_deref())?);
    if store.path().is_none() {
        tracing::warn!("no --state-dir or --db: switches and the audit log live in memory and die with the process");
    }
    if config.admin_token.is_none() {
        tracing::warn!("no admin token: the admin API serves status only");
    }
    let interval = config.interval.max(Duration::from_millis(10));
    let aggregator = Arc::new(Mutex::new(signals::Aggregator::new(10_000)?));
    let (engine, handle, tables) = engine::Engine::start(
        &config.policy,
        interval,
        config.reload_every,
        store.clone(),
        aggregator.clone(),
    )?;
    tokio::spawn(engine.run());
    tokio::spawn(scrape::run(
        tables.clone(),
        aggregator.clone(),
        interval.max(Duration::from_millis(250)),
    ));
    match config.probe {
        Some(p) => {
            tokio::spawn(probe::run(tables.clone(), aggregator.clone(), p));
        }
        None => tracing::warn!(
            "endpoint probes are off: only the sidecars' reports say whether an endpoint is down"
        ),
    }
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let stopping_rx = stopping.clone();
    let state = services::State {
        tables,
        registry: Arc::new(registry::Registry::default()),
        signals: aggregator,
        stopping,
    };
    let admin = admin::Admin {
        state: state.clone(),
        store,
        engine: handle,
        token: config.admin_token.filter(|t| !t.is_empty()),
        interval,
    };
    // Watch and telemetry streams never end on their own, so a graceful
    // shutdown would wait for them forever: on the signal they end cleanly
    // (`stopping`), so sidecars reconnect at once to whoever serves next,
    // and the server stops accepting. Calls still running after a grace
    // period are then cut.
    let (signalled_tx, signalled) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: ending the sidecars' streams");
        let _ = stopping_tx.send(true);
        let _ = signalled_tx.send(());
    };
    let mut builder = tonic::transport::Server::builder();
    match &config.tls {
        Some(tls) => {
            builder = builder.tls_config(tls.config()?)?;
            tracing::info!(mutual = tls.client_ca.is_some(), "gRPC over TLS");
        }
        None => tracing::warn!(
            "gRPC in plain text (tables, telemetry and the admin token unencrypted; for loopback or a trusted network only)"
        ),
    }
    let serve = builder
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(pb::routing_discovery_server::RoutingDiscoveryServer::new(
            services::Discovery(state.clone()),
        ))
        .add_service(pb::telemetry_server::TelemetryServer::new(
            services::Telemetry(state),
        ))
        .add_service(pb::admin_server::AdminServer::new(admin))
        .serve_with_incoming_shutdown(until_stopping(listener, stopping_rx), shutdown);
    tokio::select! {
        served = serve => served?,
        () = async {
            if signalled.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::info!("shutdown grace over; closing the streams still open"),
    }
    Ok(())
}

/// The listener's connections, until the control plane stops: then the
/// stream ends and the listener closes at once, so a sidecar reconnecting
/// is refused and tries again (reaching the successor) rather than waiting
/// in a backlog nobody accepts from while this process finishes.
fn until_stopping(
    listener: TcpListener,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    let mut inner = Some(TcpListenerStream::new(listener));
    let mut stop = Box::pin(services::stopped(stopping));
    futures::stream::poll_fn(move |cx| {
        if inner.is_some() && stop.as_mut().poll(cx).is_ready() {
            inner = None;
        }
        match inner.as_mut() {
            Some(s) => s.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        }
    })
}
