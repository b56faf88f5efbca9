//! `switchyard`: one binary for every role: the sidecar, the control plane,
//! the mock provider, the demo and the operator's admin calls.

mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard_proto::v1 as pb;

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
    },
    /// Run the sidecar proxy beside an app.
    Sidecar {
        /// Control plane address, host:port.
        #[arg(long)]
        control: String,
        /// Where the app connects.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Names this sidecar to the control plane; defaults to host and pid.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Largest request body accepted, in bytes.
        #[arg(long, default_value_t = 4 * 1024 * 1024)]
        max_body_bytes: usize,
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
        #[arg(long, default_value_t = switchyard_rtt::RttMode::Auto)]
        rtt_source: switchyard_rtt::RttMode,
        /// cgroup v2 directory to attach the eBPF program to; default: the
        /// sidecar's own cgroup. Only connections of processes in it (or
        /// below it) are measured.
        #[arg(long)]
        rtt_cgroup: Option<PathBuf>,
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
        call: AdminCall,
    },
}

/// How to reach the control plane's admin API.
#[derive(clap::Args)]
struct AdminConn {
    #[arg(long, default_value = "127.0.0.1:50051")]
    control: String,
    /// The control plane's admin token.
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Who acts and why, for the audit log.
#[derive(clap::Args)]
struct Why {
    /// Why; recorded in the audit log.
    #[arg(long)]
    reason: String,
    /// Who; defaults to $USER.
    #[arg(long)]
    actor: Option<String>,
    /// Wait until every connected sidecar has ACKed the table carrying the change.
    #[arg(long)]
    wait: bool,
}

/// An endpoint by name, or every endpoint of a provider.
#[derive(clap::Args)]
struct SwitchTarget {
    #[arg(required_unless_present = "provider", conflicts_with = "provider")]
    endpoint: Option<String>,
    #[arg(long)]
    provider: Option<String>,
}

#[derive(Subcommand)]
enum AdminCall {
    /// The table in force, every endpoint (weights, p95 TTFT, RTT, errors,
    /// in-flight, spend, ejections) and every sidecar.
    Status {
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Stop all traffic to an endpoint or a provider: weight 0 and out of
    /// every fallback chain. Lasts, across restarts, until revived.
    Kill {
        #[command(flatten)]
        target: SwitchTarget,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Undo a kill (and, for an endpoint, a drain).
    Revive {
        #[command(flatten)]
        target: SwitchTarget,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Send no new request to an endpoint; those in flight finish.
    Drain {
        endpoint: String,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Pin an endpoint's share of a class (or of every class) for a while.
    Override {
        endpoint: String,
        /// Share of the class's traffic, 0 to 1.
        #[arg(long, required_unless_present = "clear")]
        weight: Option<f64>,
        /// The class; every class that may use the endpoint when absent.
        #[arg(long)]
        class: Option<String>,
        /// How long it holds: 90s, 10m, 2h, 1d (plain numbers are seconds).
        #[arg(long, default_value = "10m", value_parser = parse_ttl)]
        ttl: Duration,
        /// Remove the override instead.
        #[arg(long, conflicts_with = "weight")]
        clear: bool,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// The audit log of admin actions, oldest first.
    Audit {
        /// How many of the latest entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        conn: AdminConn,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 10m, 2h or 1d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("unknown unit {unit:?}; use s, m, h or d")),
    };
    if secs == 0 {
        return Err("must be positive".into());
    }
    Ok(Duration::from_secs(secs))
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
    #[arg(long, default_value_t = 1)]
    retry_after_s: u32,
    #[arg(long, default_value_t = 0.0)]
    hang_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    drop_mid_stream_ratio: f64,
    /// Requests served at once; more queue (and show in
    /// vllm:num_requests_waiting on /metrics). Unlimited when absent.
    #[arg(long)]
    capacity: Option<u32>,
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
            listen,
            id,
            threads,
            max_body_bytes,
            queue_limit,
            eject_after,
            eject_ms,
            eject_failure_rate,
            rtt_source,
            rtt_cgroup,
        } => {
            let sidecar_id = id.unwrap_or_else(default_id);
            let base = Duration::from_millis(eject_ms);
            switchyard_dataplane::run(switchyard_dataplane::SidecarConfig {
                control,
                listen,
                sidecar_id,
                threads,
                max_body_bytes,
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
            })?;
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
        Command::Admin { call } => runtime()?.block_on(admin(call)),
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
        retry_after_s: a.retry_after_s,
        hang_ratio: a.hang_ratio,
        drop_mid_stream_ratio: a.drop_mid_stream_ratio,
    };
    behaviour.validate().map_err(anyhow::Error::msg)?;
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
    };
    switchyard_mock::serve(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Adds the admin token, when there is one, to every call.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.0 {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

type AdminClient = pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

async fn admin_client(conn: &AdminConn) -> anyhow::Result<AdminClient> {
    let control = &conn.control;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{control}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the control plane at {control}"))?;
    let header = conn
        .token
        .as_ref()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .context("the admin token must be printable ASCII")?;
    Ok(pb::admin_client::AdminClient::with_interceptor(
        channel,
        Bearer(header),
    ))
}

/// A refusal from the control plane, said plainly.
fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("the control plane refused: {:?}: {}", s.code(), s.message())
}

fn who(why: &Why) -> String {
    why.actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

fn switch_target(t: SwitchTarget) -> Option<pb::switch_request::Target> {
    match (t.endpoint, t.provider) {
        (_, Some(p)) => Some(pb::switch_request::Target::Provider(p)),
        (Some(e), None) => Some(pb::switch_request::Target::Endpoint(e)),
        (None, None) => None,
    }
}

/// Prints an action's reply and, with --wait, waits for every connected
/// sidecar to ACK the table that carries it.
async fn acted(
    client: &mut AdminClient,
    reply: pb::ActionReply,
    why: &Why,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::json!({"table_version": reply.table_version, "audit_id": reply.audit_id, "message": reply.message})
        );
    } else {
        println!("{} (audit #{})", reply.message, reply.audit_id);
    }
    if !why.wait {
        return Ok(());
    }
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = client
            .status(pb::StatusRequest {})
            .await
            .map_err(refused)?
            .into_inner();
        let connected: Vec<_> = s.sidecars.iter().filter(|c| c.connected).collect();
        if connected
            .iter()
            .all(|c| c.acked_version >= reply.table_version)
        {
            if !json {
                println!("ACKed by {} connected sidecar(s)", connected.len());
            }
            return Ok(());
        }
        if tokio::time::Instant::now() > end {
            anyhow::bail!(
                "not every sidecar ACKed version {} within 30 s",
                reply.table_version
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn opt_ms(v: f64) -> String {
    if v < 0.0 {
        "-".into()
    } else {
        format!("{v:.0}")
    }
}

fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "table_version": s.table_version,
        "interval_ms": s.interval_ms,
        "window_ms": s.window_ms,
        "sidecars": s.sidecars.iter().map(|c| serde_json::json!({
            "id": c.sidecar_id, "connected": c.connected,
            "acked_version": c.acked_version, "nacked_version": c.nacked_version,
            "nack_reason": c.nack_reason, "last_report_age_ms": c.last_report_age_ms,
        })).collect::<Vec<_>>(),
        "endpoints": s.endpoints.iter().map(|e| serde_json::json!({
            "name": e.name, "tier": e.tier, "provider": e.provider,
            "requests": e.requests, "errors": e.errors,
            "weights": e.weights.iter().map(|w| (w.class.clone(), serde_json::json!(w.weight))).collect::<serde_json::Map<_, _>>(),
            "ttft_p95_ms": e.ttft_p95_ms, "rtt_ms": e.rtt_ms, "error_rate": e.error_rate,
            "window_requests": e.window_requests, "in_flight": e.in_flight, "spend_usd": e.spend_usd,
            "killed": e.killed, "drained": e.drained, "switched_off_reason": e.switched_off_reason,
            "ejected": !e.ejections.is_empty(),
            "ejections": e.ejections.iter().map(|j| serde_json::json!({
                "class": j.class, "reason": j.reason, "remaining_ms": j.remaining_ms,
            })).collect::<Vec<_>>(),
            "queue_waiting": e.queue_waiting, "kv_cache": e.kv_cache,
        })).collect::<Vec<_>>(),
        "classes": s.classes.iter().map(|c| serde_json::json!({
            "name": c.name, "unroutable_reason": c.unroutable_reason, "note": c.note,
            "fallback": c.fallback,
        })).collect::<Vec<_>>(),
        "overrides": s.overrides.iter().map(|o| serde_json::json!({
            "endpoint": o.endpoint, "class": o.class, "weight": o.weight, "remaining_ms": o.remaining_ms,
        })).collect::<Vec<_>>(),
    })
}

fn print_status(s: &pb::StatusResponse) {
    println!(
        "table version in force: {} (weights every {} ms over a {} ms window)",
        s.table_version, s.interval_ms, s.window_ms
    );
    println!(
        "\n{:<18} {:<8} {:<9} {:<26} {:>7} {:>6} {:>6} {:>6} {:>9} {:>10}  why",
        "endpoint",
        "tier",
        "state",
        "weights",
        "p95 ms",
        "rtt ms",
        "err %",
        "infl",
        "requests",
        "spend $"
    );
    for e in &s.endpoints {
        let state = if e.killed {
            "killed"
        } else if e.drained {
            "drained"
        } else if !e.ejections.is_empty() {
            "ejected"
        } else {
            "ok"
        };
        let weights = e
            .weights
            .iter()
            .map(|w| format!("{}={:.2}", w.class, w.weight))
            .collect::<Vec<_>>()
            .join(",");
        let why = if !e.switched_off_reason.is_empty() {
            e.switched_off_reason.clone()
        } else {
            e.ejections
                .iter()
                .map(|j| format!("{}: {} ({} ms left)", j.class, j.reason, j.remaining_ms))
                .collect::<Vec<_>>()
                .join("; ")
        };
        println!(
            "{:<18} {:<8} {:<9} {:<26} {:>7} {:>6} {:>6.1} {:>6.0} {:>9} {:>10.4}  {}",
            e.name,
            e.tier,
            state,
            if weights.is_empty() {
                "-".into()
            } else {
                weights
            },
            opt_ms(e.ttft_p95_ms),
            opt_ms(e.rtt_ms),
            e.error_rate * 100.0,
            e.in_flight,
            e.requests,
            e.spend_usd,
            why
        );
    }
    println!("\n{:<18} fallback chain / notes", "class");
    for c in &s.classes {
        let mut line = c.fallback.join(" > ");
        if !c.unroutable_reason.is_empty() {
            line = format!("UNROUTABLE: {}", c.unroutable_reason);
        }
        if !c.note.is_empty() {
            line.push_str(&format!("  ({})", c.note));
        }
        println!("{:<18} {}", c.name, line);
    }
    if !s.overrides.is_empty() {
        println!("\noverrides:");
        for o in &s.overrides {
            let class = if o.class.is_empty() { "*" } else { &o.class };
            println!(
                "  {} in {}: {:.2} for {} s more",
                o.endpoint,
                class,
                o.weight,
                o.remaining_ms / 1000
            );
        }
    }
    println!(
        "\n{:<28} {:>9} {:>15} {:>15}  nack",
        "sidecar", "connected", "acked", "report age ms"
    );
    for c in &s.sidecars {
        println!(
            "{:<28} {:>9} {:>15} {:>15}  {}",
            c.sidecar_id, c.connected, c.acked_version, c.last_report_age_ms, c.nack_reason
        );
    }
}

async fn admin(call: AdminCall) -> anyhow::Result<()> {
    match call {
        AdminCall::Status { conn } => {
            let mut client = admin_client(&conn).await?;
            let s = client
                .status(pb::StatusRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
            } else {
                print_status(&s);
            }
            Ok(())
        }
        AdminCall::Kill { target, why, conn } => {
            let mut client = admin_client(&conn).await?;
            let req = pb::SwitchRequest {
                target: switch_target(target),
                actor: who(&why),
                reason: why.reason.clone(),
            };
            let reply = client.kill(req).await.map_err(refused)?.into_inner();
            acted(&mut client, reply, &why, conn.json).await
        }
        AdminCall::Revive { target, why, conn } => {
            let mut client = admin_client(&conn).await?;
            let req = pb::SwitchRequest {
                target: switch_target(target),
                actor: who(&why),
                reason: why.reason.clone(),
            };
            let reply = client.revive(req).await.map_err(refused)?.into_inner();
            acted(&mut client, reply, &why, conn.json).await
        }
        AdminCall::Drain {
            endpoint,
            why,
            conn,
        } => {
            let mut client = admin_client(&conn).await?;
            let req = pb::SwitchRequest {
                target: Some(pb::switch_request::Target::Endpoint(endpoint)),
                actor: who(&why),
                reason: why.reason.clone(),
            };
            let reply = client.drain(req).await.map_err(refused)?.into_inner();
            acted(&mut client, reply, &why, conn.json).await
        }
        AdminCall::Override {
            endpoint,
            weight,
            class,
            ttl,
            clear,
            why,
            conn,
        } => {
            let mut client = admin_client(&conn).await?;
            let req = pb::OverrideRequest {
                endpoint,
                class: class.unwrap_or_default(),
                weight: weight.unwrap_or(0.0),
                ttl_ms: ttl.as_millis() as u64,
                clear,
                actor: who(&why),
                reason: why.reason.clone(),
            };
            let reply = client.r#override(req).await.map_err(refused)?.into_inner();
            acted(&mut client, reply, &why, conn.json).await
        }
        AdminCall::Audit { limit, conn } => {
            let mut client = admin_client(&conn).await?;
            let entries = client
                .audit(pb::AuditRequest { limit })
                .await
                .map_err(refused)?
                .into_inner()
                .entries;
            if conn.json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "id": e.id, "at_ms": e.at_ms, "actor": e.actor, "action": e.action,
                            "target": e.target, "detail": e.detail, "reason": e.reason,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:>5}  {:<24} {:<12} {:<15} {:<28} why",
                "id", "when (UTC)", "who", "what", "target"
            );
            for e in &entries {
                let mut what = e.target.clone();
                if !e.detail.is_empty() {
                    what.push_str(&format!(" ({})", e.detail));
                }
                println!(
                    "{:>5}  {:<24} {:<12} {:<15} {:<28} {}",
                    e.id,
                    utc(e.at_ms),
                    e.actor,
                    e.action,
                    what,
                    e.reason
                );
            }
            Ok(())
        }
    }
}

/// Milliseconds since the epoch as an ISO-8601 UTC time, without a date
/// library: days to a civil date by Howard Hinnant's algorithm.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates_read_and_print() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_ttl("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("5y").is_err());
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}
