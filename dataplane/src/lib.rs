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
//! force came from, and whether its weights still hold), `drain` (graceful
//! exit on SIGTERM and after a socket handoff).
#![forbid(unsafe_code)]

pub mod balance;
pub mod control;
pub mod credential;
pub mod drain;
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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use pingora::connectors::ConnectorOptions;
use pingora::connectors::TransportConnector;
use pingora::server::configuration::{Opt, ServerConf};
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
    /// How long requests and streams in flight may take to finish once the
    /// process was told to go (SIGTERM, or SIGQUIT after a handoff).
    pub grace: Duration,
    /// Take the listening socket from the running sidecar instead of
    /// binding it (a graceful upgrade).
    pub upgrade: bool,
    /// The unix socket listening sockets are handed over on: the new
    /// sidecar listens there, the old one sends to it on SIGQUIT.
    pub upgrade_sock: PathBuf,
}

/// How long an upgrading sidecar waits for its first table before it takes
/// the socket anyway: without a table it could only answer 503.
const UPGRADE_TABLE_WAIT: Duration = Duration::from_secs(10);
/// Longest path a unix socket address holds (`sun_path`, NUL included).
const SUN_PATH_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("starting the control thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the proxy server: {0}")]
    Server(Box<pingora::Error>),
    #[error("RTT source: {0}")]
    Rtt(#[from] switchyard_rtt::RttError),
    #[error("upgrade socket {path}: {reason}")]
    UpgradeSock { path: PathBuf, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// Runs the sidecar until a signal ends the process: SIGTERM drains (stops
/// accepting, lets requests in flight finish within `grace`, exits 0),
/// SIGQUIT hands the listening socket to a new sidecar started with
/// `upgrade` and then drains, SIGINT stops at once. Never returns on success.
pub fn run(config: SidecarConfig, source: control::TableSource) -> Result<(), SidecarError> {
    let upgrade_sock = check_upgrade_sock(&config.upgrade_sock)?;
    if config.upgrade {
        // Its appearance tells the operator this sidecar is ready to take
        // the socket; a stale one from a crashed upgrade would say so early.
        match std::fs::remove_file(&config.upgrade_sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(SidecarError::UpgradeSock {
                    path: config.upgrade_sock.clone(),
                    reason: format!("cannot remove a stale one: {e}"),
                })
            }
        }
    } else {
        // pingora retries a taken port for 30 s, then panics in its service
        // thread and leaves the process up with nothing listening; a sidecar
        // that cannot take its port must say so and exit at once instead.
        // (std sets SO_REUSEADDR, as pingora does, so TIME_WAIT is no
        // obstacle.) An upgrading sidecar skips this: the port is taken, by
        // the sidecar it receives the socket from.
        drop(
            std::net::TcpListener::bind(&config.listen).map_err(|source| SidecarError::Listen {
                addr: config.listen.clone(),
                source,
            })?,
        );
    }
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
        saved_version: Default::default(),
    };
    control::spawn(source, config.sidecar_id.clone(), applier, rtt.clone())?;

    let conf = ServerConf {
        threads: config.threads,
        // One single-threaded runtime per thread, as nginx runs workers: a
        // connection's requests stay on the thread that accepted it, so
        // no request wakes another thread (with work stealing, each one
        // cost a futex wake and a context switch).
        work_stealing: false,
        // pingora sleeps this whole period after SIGTERM before it drops
        // what is still running; `drain` exits as soon as nothing is in
        // flight, or at `grace`, so this is only a backstop past it.
        grace_period_seconds: Some(config.grace.as_secs().saturating_add(2)),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: config.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    drain::spawn(server.watch_execution_phase(), config.grace)?;
    if config.upgrade {
        wait_for_table(&tables, UPGRADE_TABLE_WAIT);
        tracing::info!(sock = %config.upgrade_sock.display(), "waiting for the listening socket: SIGQUIT the old sidecar");
    }
    // With `upgrade`, this waits (about 6 s at most) for the old sidecar
    // to send its listening socket, and exits 1 if none comes.
    server.bootstrap();
    let mut connector = ConnectorOptions::from_server_conf(&server.configuration);
    system_roots(&mut connector);
    let connections = pool::Connections::new(TransportConnector::new(Some(connector)));
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

/// The system's trust roots for https endpoints without a `ca_file`.
/// pingora's rustls connector loads them (the platform's store,
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` included) when it is built, and
/// panics if it cannot; they are loaded here first the same way, and when
/// that fails the connector starts with no roots (an empty bundle) instead:
/// the sidecar still serves http endpoints and https ones with their own
/// `ca_file`, and the others fail verification with the cause logged here.
fn system_roots(connector: &mut ConnectorOptions) {
    if connector.ca_file.is_some() {
        return;
    }
    let mut store = pingora::tls::RootCertStore::empty();
    match pingora::tls::load_platform_certs_incl_env_into_store(&mut store) {
        Ok(()) if store.is_empty() => tracing::warn!(
            "no system trust roots found: https endpoints without a ca_file will fail verification"
        ),
        Ok(()) => tracing::debug!(roots = store.len(), "system trust roots loaded"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot load the system trust roots: https endpoints without a ca_file will fail verification");
            connector.ca_file = Some("/dev/null".into());
        }
    }
}

/// The upgrade socket's path as pingora takes it, refused here when pingora
/// would panic on it (it unwraps the bind of a path it cannot use).
fn check_upgrade_sock(path: &std::path::Path) -> Result<String, SidecarError> {
    let refuse = |reason: &str| SidecarError::UpgradeSock {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let text = path.to_str().ok_or_else(|| refuse("not UTF-8"))?;
    if text.len() > SUN_PATH_MAX {
        return Err(refuse("longer than a unix socket path may be (107 bytes)"));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        return Err(refuse("its directory does not exist"));
    }
    Ok(text.to_string())
}

/// Waits until the control plane client applied a table, at most `within`.
fn wait_for_table(tables: &ArcSwapOption<table::Table>, within: Duration) {
    let end = Instant::now() + within;
    while tables.load().is_none() {
        if Instant::now() >= end {
            tracing::warn!(
                waited_ms = within.as_millis() as u64,
                "no routing table yet; taking the socket anyway"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
