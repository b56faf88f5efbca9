//! `switchyard admin`: the operator's calls on the control plane (status,
//! kill, revive, drain, override, audit), with the bearer token, and how
//! their answers are printed.

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use switchyard_proto::v1 as pb;

/// How to reach the control plane's admin API.
#[derive(clap::Args)]
pub struct AdminConn {
    #[arg(long, default_value = "127.0.0.1:50051")]
    control: String,
    /// The control plane's admin token.
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: crate::link::LinkTls,
}

/// Who acts and why, for the audit log.
#[derive(clap::Args)]
pub struct Why {
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
pub struct SwitchTarget {
    #[arg(required_unless_present = "provider", conflicts_with = "provider")]
    endpoint: Option<String>,
    #[arg(long)]
    provider: Option<String>,
}

#[derive(Subcommand)]
pub enum AdminCall {
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
    let channel = switchyard_proto::tls::endpoint(control, &conn.tls.client())?
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
            "spend_last_hour_usd": e.spend_last_hour_usd,
            "budget_usd_per_hour": e.budget_usd_per_hour, "over_budget": e.over_budget,
            "down": e.down, "probation": e.probation, "probe": e.probe,
            "sidecars_reporting": e.sidecars_reporting, "sidecars_ejecting": e.sidecars_ejecting,
            "sidecars_throttling": e.sidecars_throttling,
            "window_ejections": e.window_ejections, "window_throttles": e.window_throttles,
            "window_streams_broken": e.window_streams_broken,
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
        } else if !e.down.is_empty() {
            "down"
        } else if !e.ejections.is_empty() {
            "ejected"
        } else if !e.over_budget.is_empty() {
            "budget"
        } else if e.probation {
            "probation"
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
        } else if !e.down.is_empty() {
            e.down.clone()
        } else if !e.over_budget.is_empty() {
            format!("over budget: {}", e.over_budget)
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

pub async fn run(call: AdminCall) -> anyhow::Result<()> {
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
