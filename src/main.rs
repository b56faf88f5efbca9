//! `switchyard`: one binary for every role: the sidecar, the control plane,
//! the mock provider, the demo and the operator's admin calls.
#![forbid(unsafe_code)]

mod admin;
mod demo;
mod link;
mod standalone;

/// jemalloc with background purging: memory a burst took is given back
/// to the system within seconds, which is what a pod's memory limit sees.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard_dataplane::control::TableSource;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Routes LLM traffic across on-prem, burst and hosted endpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: load the policy, push tables to sidecars.
    Control {
        #[arg(long)]
        policy: PathBuf,
        /// gRPC listen address; port 0 picks a free one (printed on stdout).
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// How often the policy file is checked for edits, in milliseconds.
        #[arg(long, default_value_t = 250)]
        reload_ms: u64,
        /// How often routing weights are recomputed from telemetry, in
        /// milliseconds. A table is pushed only when the weights moved.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Directory for durable state (switchyard.db: kill switches,
        /// drains, overrides, the audit log, the last decision). Default:
        /// `switchyard-state` in the working directory.
        #[arg(long, conflicts_with = "db")]
        state_dir: Option<PathBuf>,
        /// The SQLite database file itself, instead of --state-dir.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Bearer token the admin API requires. Without one, only status is served.
        #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// gRPC over TLS.
        #[command(flatten)]
        tls: ServeTls,
        /// How often each endpoint is probed with `GET /v1/models` (or its
        /// policy's `health_path`), in milliseconds; 0 turns probes off.
        /// Two failed probes in a row mark an endpoint down (weight 0),
        /// two passes in a row bring it back, on probation.
        #[arg(long, default_value_t = 2000)]
        probe_ms: u64,
        /// A probe not answered within this many milliseconds failed
        /// (never more than --probe-ms).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        probe_timeout_ms: u64,
    },
    /// Run the sidecar proxy beside an app: with a control plane
    /// (`--control`), or alone, on a policy file (`--policy`).
    Sidecar {
        /// Control plane address, host:port (or https://host:port).
        #[arg(long, required_unless_present = "policy")]
        control: Option<String>,
        #[command(flatten)]
        control_tls: link::LinkTls,
        /// Standalone mode: no control plane; tables come from this policy
        /// file (the control plane's format), with static weights and local
        /// health. Edits are applied as they are saved.
        #[arg(long, conflicts_with = "control")]
        policy: Option<PathBuf>,
        /// How often the --policy file is checked for edits, in milliseconds.
        #[arg(long, default_value_t = 250, requires = "policy")]
        reload_ms: u64,
        /// Directory where every table from the control plane is saved, so
        /// a sidecar that restarts while the control plane is away serves
        /// from it at once.
        #[arg(long, default_value = "switchyard-state")]
        state_dir: PathBuf,
        /// Where the app connects.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Names this sidecar to the control plane; defaults to host and pid.
        #[arg(long)]
        id: Option<String>,
        /// Proxy threads, each running its own connections (as nginx's
        /// workers do). One thread serves well over 10,000 requests a
        /// second and costs the least CPU per request at a sidecar's
        /// usual rates; more only help past what one core can do.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Largest request body accepted, in bytes.
        #[arg(long, default_value_t = 4 * 1024 * 1024)]
        max_body_bytes: usize,
        /// The whole request body must arrive within this many
        /// milliseconds; a body cut short or trickled gets 408.
        #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
        body_timeout_ms: u64,
        /// Requests that may wait for a free endpoint before classes are shed.
        #[arg(long, default_value_t = 64)]
        queue_limit: usize,
        /// Consecutive failures that eject an endpoint locally.
        #[arg(long, default_value_t = 5)]
        eject_after: u32,
        /// First local ejection in milliseconds; doubles on each repeat.
        #[arg(long, default_value_t = 5000)]
        eject_ms: u64,
        /// Failure rate over 10 s (and 10+ requests) that ejects; above 1 never.
        #[arg(long, default_value_t = 0.5)]
        eject_failure_rate: f64,
        /// Where endpoint RTT comes from: `ebpf` (a sock_ops program; fail
        /// if it cannot load), `tcp-info` (read the sidecar's own upstream
        /// sockets; loads nothing), or `auto` (eBPF, else tcp-info).
        ///
        /// For tests and simulations only, `file:PATH` measures nothing and
        /// reports the figures in PATH instead, one `ADDRESS:PORT
        /// RTT_MICROSECONDS` line per endpoint, re-read as it changes.
        #[arg(long, default_value_t = switchyard_rtt::RttMode::Auto)]
        rtt_source: switchyard_rtt::RttMode,
        /// cgroup v2 directory to attach the eBPF program to; default: the
        /// sidecar's own cgroup. Only connections of processes in it (or
        /// below it) are measured.
        #[arg(long)]
        rtt_cgroup: Option<PathBuf>,
        /// On SIGTERM, how long requests and streams in flight may take to
        /// finish, in milliseconds; the sidecar stops accepting at once and
        /// exits 0 as soon as none is left, or when this is over.
        #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
        grace_ms: u64,
        /// Take over the listening socket of the sidecar running on the same
        /// --listen (a graceful upgrade): once --upgrade-sock exists, send
        /// the old one SIGQUIT; it hands the socket over, keeps serving
        /// for 5 s, then drains as on SIGTERM.
        #[arg(long)]
        upgrade: bool,
        /// Unix socket the listening socket is handed over on; old and new
        /// sidecar must be given the same. Default: one per --listen
        /// address in --state-dir (created private to the user).
        #[arg(long)]
        upgrade_sock: Option<PathBuf>,
    },
    /// Run an OpenAI-compatible fake provider.
    Mock(MockArgs),
    /// Start a control plane, a sidecar and three mocks, and route traffic.
    Demo {
        /// Seconds to run; ignored with --forever.
        #[arg(long, default_value_t = 12)]
        seconds: u64,
        /// Run until Ctrl-C.
        #[arg(long)]
        forever: bool,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Operator calls on the control plane.
    Admin {
        #[command(subcommand)]
        call: admin::AdminCall,
    },
}

#[derive(clap::Args)]
struct MockArgs {
    /// Port on 127.0.0.1 (0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Listen address host; loopback by default.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value = "mock")]
    name: String,
    #[arg(long, default_value = "onprem")]
    tier: String,
    /// Models listed on /v1/models (repeatable).
    #[arg(long = "model", default_values_t = ["llama-3-70b".to_string()])]
    models: Vec<String>,
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    #[arg(long, default_value_t = 0)]
    inter_token_ms: u64,
    #[arg(long, default_value_t = 16)]
    output_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    error_500_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    error_429_ratio: f64,
    /// Share of requests answered "overloaded" (Anthropic: 529
    /// overloaded_error; OpenAI and Azure: 503).
    #[arg(long, default_value_t = 0.0)]
    overloaded_ratio: f64,
    /// Share of streamed requests overloaded after the answer began
    /// (Anthropic: 200, message_start, an overloaded_error event; OpenAI
    /// and Azure: 503).
    #[arg(long, default_value_t = 0.0)]
    overloaded_mid_stream_ratio: f64,
    #[arg(long, default_value_t = 1)]
    retry_after_s: u32,
    #[arg(long, default_value_t = 0.0)]
    hang_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    drop_mid_stream_ratio: f64,
    /// Streamed answers stop after this many tokens and keep the connection
    /// open, silent: a provider stalled mid-stream.
    #[arg(long)]
    stall_after_tokens: Option<u32>,
    /// Prompt tokens reported as read from the prompt cache.
    #[arg(long, default_value_t = 0)]
    cached_tokens: u32,
    /// Prompt tokens reported as written to the prompt cache (Anthropic's
    /// cache_creation_input_tokens).
    #[arg(long, default_value_t = 0)]
    cache_write_tokens: u32,
    /// Reasoning tokens added to (and counted in) each answer's completion tokens.
    #[arg(long, default_value_t = 0)]
    reasoning_tokens: u32,
    /// Refuse chat completions and the model list without
    /// `Authorization: Bearer KEY` (401), as a hosted provider does
    /// (Azure: `api-key: KEY`; Anthropic: `x-api-key: KEY`).
    #[arg(long)]
    api_key: Option<String>,
    /// The API spoken: openai, azure (deployment paths, api-version,
    /// api-key) or anthropic (Messages API).
    #[arg(long, default_value = "openai")]
    api: switchyard_mock::Api,
    /// Requests served at once; more queue (and show in
    /// vllm:num_requests_waiting on /metrics). Unlimited when absent.
    #[arg(long)]
    capacity: Option<u32>,
    /// Line ending of streamed events: lf, crlf or cr.
    #[arg(long, default_value = "lf")]
    sse_line_ending: switchyard_mock::LineEnding,
    /// Send a `: keep-alive` comment event before every streamed token.
    #[arg(long)]
    sse_keep_alive: bool,
    /// Send each token's event in two writes, cut inside a line ending.
    #[arg(long)]
    sse_split_events: bool,
    #[command(flatten)]
    tls: ServeTls,
}

/// Serving over TLS (the control plane's gRPC, the mock's HTTP): plain
/// text without these (loopback, tests).
#[derive(clap::Args, Debug)]
struct ServeTls {
    /// Serve over TLS with this PEM certificate chain (leaf first), with
    /// --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates that chain to these PEM CAs (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
}

impl ServeTls {
    /// Certificate, key and client CA, when TLS was asked for.
    fn files(self) -> Option<(PathBuf, PathBuf, Option<PathBuf>)> {
        let client_ca = self.client_ca;
        self.tls_cert
            .zip(self.tls_key)
            .map(|(cert, key)| (cert, key, client_ca))
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Sidecar {
            control,
            control_tls,
            policy,
            reload_ms,
            state_dir,
            listen,
            id,
            threads,
            max_body_bytes,
            body_timeout_ms,
            queue_limit,
            eject_after,
            eject_ms,
            eject_failure_rate,
            rtt_source,
            rtt_cgroup,
            grace_ms,
            upgrade,
            upgrade_sock,
        } => {
            let sidecar_id = id.unwrap_or_else(default_id);
            let upgrade_sock = match upgrade_sock {
                Some(sock) => sock,
                None => default_upgrade_sock(&state_dir, &listen)?,
            };
            let base = Duration::from_millis(eject_ms);
            let source = match (control, policy) {
                (Some(address), _) => TableSource::Control {
                    address,
                    tls: control_tls.client(),
                },
                (None, Some(policy)) => TableSource::Local(standalone::feed(
                    &policy,
                    Duration::from_millis(reload_ms.max(10)),
                )?),
                (None, None) => anyhow::bail!("--control or --policy is required"),
            };
            let config = switchyard_dataplane::SidecarConfig {
                state_dir: Some(state_dir),
                listen,
                sidecar_id,
                threads,
                max_body_bytes,
                body_timeout: Duration::from_millis(body_timeout_ms),
                queue_limit,
                outlier: switchyard_dataplane::health::OutlierPolicy {
                    consecutive_failures: eject_after.max(1),
                    base_ejection: base,
                    max_ejection: base.saturating_mul(12),
                    failure_rate: eject_failure_rate,
                    ..Default::default()
                },
                rtt_mode: rtt_source,
                rtt_cgroup,
                grace: Duration::from_millis(grace_ms),
                upgrade,
                upgrade_sock,
            };
            switchyard_dataplane::run(config, source)?;
            Ok(())
        }
        Command::Control {
            policy,
            listen,
            reload_ms,
            interval_ms,
            state_dir,
            db,
            admin_token,
            tls,
            probe_ms,
            probe_timeout_ms,
        } => runtime()?.block_on(async move {
            // State is durable unless a caller names a database: the audit
            // log must survive restarts.
            let db = match (state_dir, db) {
                (_, Some(db)) => db,
                (dir, None) => {
                    let dir = dir.unwrap_or_else(|| PathBuf::from("switchyard-state"));
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating the state directory {dir:?}"))?;
                    dir.join("switchyard.db")
                }
            };
            tracing::info!(db = %db.display(), "control plane state");
            let db = Some(db);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            announce(listener.local_addr()?);
            let config = switchyard_controlplane::ControlConfig {
                policy,
                reload_every: Duration::from_millis(reload_ms),
                interval: Duration::from_millis(interval_ms),
                db,
                admin_token,
                tls: tls
                    .files()
                    .map(|(cert, key, client_ca)| switchyard_proto::tls::ServerTls {
                        cert,
                        key,
                        client_ca,
                    }),
                probe: (probe_ms > 0).then(|| switchyard_controlplane::probe::ProbeConfig {
                    every: Duration::from_millis(probe_ms),
                    timeout: Duration::from_millis(probe_timeout_ms),
                    rule: switchyard_controlplane::health::ProbeRule::default(),
                }),
            };
            switchyard_controlplane::run(config, listener, shutdown_signal()).await?;
            Ok(())
        }),
        Command::Mock(args) => runtime()?.block_on(run_mock(args)),
        Command::Demo {
            seconds,
            forever,
            concurrency,
        } => runtime()?.block_on(demo::run(demo::DemoArgs {
            duration: (!forever).then(|| Duration::from_secs(seconds)),
            concurrency,
        })),
        Command::Admin { call } => runtime()?.block_on(admin::run(call)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "sidecar".into());
    format!("{host}-{}", std::process::id())
}

/// The sidecar's upgrade socket when none is named: one per listen
/// address, so sidecars of several apps on one host do not meet there, in
/// its state directory (created private), not a world-writable one where
/// another user could take the name first and be handed the listening
/// socket.
fn default_upgrade_sock(state_dir: &std::path::Path, listen: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    if !state_dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating the state directory {state_dir:?}"))?;
    }
    Ok(switchyard_dataplane::persist::sidecar_file(
        state_dir,
        listen,
        "upgrade.sock",
    ))
}

/// The one line on stdout that tells a parent process where we listen.
fn announce(addr: SocketAddr) {
    println!("listening on {addr}");
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run_mock(a: MockArgs) -> anyhow::Result<()> {
    let behaviour = switchyard_mock::Behaviour {
        ttft_ms: a.ttft_ms,
        inter_token_ms: a.inter_token_ms,
        output_tokens: a.output_tokens,
        error_500_ratio: a.error_500_ratio,
        error_429_ratio: a.error_429_ratio,
        overloaded_ratio: a.overloaded_ratio,
        overloaded_mid_stream_ratio: a.overloaded_mid_stream_ratio,
        retry_after_s: a.retry_after_s,
        hang_ratio: a.hang_ratio,
        drop_mid_stream_ratio: a.drop_mid_stream_ratio,
        stall_after_tokens: a.stall_after_tokens,
        cached_tokens: a.cached_tokens,
        cache_write_tokens: a.cache_write_tokens,
        reasoning_tokens: a.reasoning_tokens,
        sse_line_ending: a.sse_line_ending,
        sse_keep_alive: a.sse_keep_alive,
        sse_split_events: a.sse_split_events,
    };
    behaviour.validate().map_err(anyhow::Error::msg)?;
    let tls = a
        .tls
        .files()
        .map(|(cert, key, client_ca)| switchyard_mock::TlsFiles {
            cert,
            key,
            client_ca,
        });
    // Bad TLS files fail the start, before the address is announced.
    if let Some(files) = &tls {
        switchyard_mock::server_config(files)?;
    }
    let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
        .await
        .with_context(|| format!("binding {}:{}", a.host, a.port))?;
    announce(listener.local_addr()?);
    let config = switchyard_mock::MockConfig {
        name: a.name,
        tier: a.tier,
        models: a.models,
        behaviour,
        capacity: a.capacity,
        api_key: a.api_key,
        api: a.api,
    };
    match &tls {
        Some(files) => {
            switchyard_mock::serve_tls(listener, config, files, shutdown_signal()).await?
        }
        None => switchyard_mock::serve(listener, config, shutdown_signal()).await?,
    }
    Ok(())
}
