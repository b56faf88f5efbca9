//! The Switchyard sidecar: a pingora proxy beside the app that picks an
//! endpoint per request from a routing table the control plane pushes, and
//! streams the answer back.
//!
//! Modules: `proxy` (the `ProxyHttp` impl: dispatch and per-request
//! state), `request` (the chat completion path, one module per stage:
//! intake, admit, pick, attempt/hedge, relay, account, errors), `routes`
//! (the sidecar's own routes), `reply` (whole responses it writes itself),
//! `table` (the compiled, immutable routing table), `balance` (weighted
//! P2C), `health` (local ejection, peak-EWMA), `retry` (retry budgets),
//! `shed` (the load-shedding queue), `control` (the Watch and telemetry
//! streams), `usage` (telemetry windows), `metrics` (`/metrics`),
//! `credential` (provider keys), `rtt` (kernel RTT per endpoint), `persist`
//! (the saved table a restart serves from), `origin` (where the table in
//! force came from, and whether its weights still hold).
#![forbid(unsafe_code)]

pub mod balance;
pub mod control;
pub mod credential;
pub mod health;
pub mod metrics;
pub mod origin;
pub mod persist;
pub mod pool;
pub mod proxy;
pub mod reply;
pub mod request;
pub mod retry;
pub mod routes;
pub mod rtt;
pub mod shed;
pub mod table;
pub mod usage;

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use pingora::connectors::ConnectorOptions;
use pingora::connectors::TransportConnector;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;

#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// Where tables from the control plane are saved, and read back at
    /// start; `None`: not saved.
    pub state_dir: Option<std::path::PathBuf>,
    /// Where the app connects, `host:port`.
    pub listen: String,
    pub sidecar_id: String,
    pub threads: usize,
    pub max_body_bytes: usize,
    /// The whole request body must arrive within this.
    pub body_timeout: std::time::Duration,
    /// Requests that may wait for capacity before lower classes are shed.
    pub queue_limit: usize,
    pub outlier: health::OutlierPolicy,
    /// Where endpoint RTT comes from: eBPF, TCP_INFO, eBPF when it loads,
    /// or (tests and simulations) a file of figures.
    pub rtt_mode: switchyard_rtt::RttMode,
    /// cgroup v2 directory the eBPF program attaches to; `None`: the
    /// sidecar's own.
    pub rtt_cgroup: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("starting the control thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the proxy server: {0}")]
    Server(Box<pingora::Error>),
    #[error("RTT source: {0}")]
    Rtt(#[from] switchyard_rtt::RttError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// Runs the sidecar until a signal ends the process: SIGTERM drains, SIGINT
/// stops at once. Never returns on success.
pub fn run(config: SidecarConfig, source: control::TableSource) -> Result<(), SidecarError> {
    // pingora retries a taken port for 30 s, then panics in its service
    // thread and leaves the process up with nothing listening; a sidecar
    // that cannot take its port must say so and exit at once instead.
    // (std sets SO_REUSEADDR, as pingora does, so TIME_WAIT is no obstacle.)
    drop(
        std::net::TcpListener::bind(&config.listen).map_err(|source| SidecarError::Listen {
            addr: config.listen.clone(),
            source,
        })?,
    );
    let tables = Arc::new(ArcSwapOption::<table::Table>::empty());
    let live = Arc::new(table::Live::default());
    // Before anything listens, so `--rtt-source ebpf` that cannot load
    // fails the start instead of running without what was asked for.
    let rtt = Arc::new(rtt::RttView::new(switchyard_rtt::open(
        config.rtt_mode.clone(),
        config.rtt_cgroup.as_deref(),
    )?));
    rtt::install(rtt.clone());
    let metrics = Arc::new(metrics::Metrics::new().with_live_gauges(
        tables.clone(),
        live.clone(),
        rtt.clone(),
    ));
    let from = match &source {
        control::TableSource::Control { address, tls } => {
            if switchyard_proto::tls::encrypted(address, tls) {
                tracing::info!(control = %address, ca = ?tls.ca, client_certificate = tls.cert.is_some(),
                    "control plane link: TLS");
            } else {
                tracing::warn!(control = %address, "control plane link: plain text (tables and telemetry unencrypted; for loopback or a trusted network only)");
            }
            address.clone()
        }
        control::TableSource::Local(_) => "a local policy file".to_string(),
    };
    let save_to = match &source {
        control::TableSource::Control { .. } => config
            .state_dir
            .as_deref()
            .map(|d| persist::file_for(d, &config.listen)),
        control::TableSource::Local(_) => None,
    };
    let applier = control::Applier {
        tables: tables.clone(),
        live: live.clone(),
        metrics: metrics.clone(),
        save_to,
    };
    control::spawn(source, config.sidecar_id.clone(), applier, rtt.clone())?;

    let conf = ServerConf {
        threads: config.threads,
        // One single-threaded runtime per thread, as nginx runs workers: a
        // connection's requests stay on the thread that accepted it, so
        // no request wakes another thread (with work stealing, each one
        // cost a futex wake and a context switch).
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let connections = pool::Connections::new(TransportConnector::new(Some(
        ConnectorOptions::from_server_conf(&server.configuration),
    )));
    let sidecar = proxy::Sidecar {
        tables,
        live,
        metrics,
        queue: shed::Admission::new(config.queue_limit),
        outlier: config.outlier,
        connections,
        limits: request::intake::Limits {
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
        },
    };
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, sidecar);
    service.add_tcp(&config.listen);
    server.add_service(service);
    tracing::info!(listen = %config.listen, tables_from = %from, "sidecar starting");
    server.run_forever()
}
