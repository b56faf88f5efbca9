//! `switchyard demo`: a control plane, one sidecar and three mock providers
//! (on-prem, burst, and a hosted fallback speaking Anthropic's API) on loopback, real chat completions through the
//! sidecar (streamed and not), and a live table of where requests went. The
//! policy is edited twice during the run to show tables being pushed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use switchyard::cluster::{self, PolicyEndpoint, Proc};

pub struct DemoArgs {
    /// `None`: until Ctrl-C.
    pub duration: Option<Duration>,
    pub concurrency: usize,
}

const MODEL: &str = "llama-3-70b";

#[derive(Default)]
struct Seen {
    per_endpoint: BTreeMap<String, EndpointSeen>,
    version: String,
    errors: u64,
    last_error: String,
}

struct EndpointSeen {
    requests: u64,
    latency_us: Histogram<u64>,
}

/// The three phases of the demo's policy: all on-prem, then bursting, then
/// on-prem drained.
fn phase_weights(phase: usize) -> &'static [(&'static str, f64)] {
    match phase {
        0 => &[("onprem-gpu", 1.0)],
        1 => &[
            ("onprem-gpu", 0.5),
            ("burst-cloud", 0.35),
            ("fallback-hosted", 0.15),
        ],
        _ => &[("burst-cloud", 0.7), ("fallback-hosted", 0.3)],
    }
}

fn phase_name(phase: usize) -> &'static str {
    match phase {
        0 => "all traffic on-prem",
        1 => "bursting: on-prem 50%, burst 35%, fallback 15%",
        _ => "on-prem drained: burst 70%, fallback 30%",
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let bin = std::env::current_exe().context("locating the switchyard binary")?;
    let dir = cluster::run_dir("demo")?;
    println!("switchyard demo: logs and policy in {}", dir.display());

    let mut procs: Vec<Proc> = Vec::new();
    let result = async {
        let mocks = [
            ("onprem-gpu", "onprem", 15, 2, 0.0, 0.0),
            ("burst-cloud", "burst", 30, 1, 0.4, 1.2),
            ("fallback-hosted", "fallback", 60, 1, 2.5, 10.0),
        ];
        let mut endpoints = Vec::new();
        for (name, tier, ttft, gap, pin, pout) in mocks {
            // The hosted fallback speaks Anthropic's Messages API: the app
            // still sees OpenAI's, translated by the sidecar.
            let api = if tier == "fallback" {
                "anthropic"
            } else {
                "openai"
            };
            let a: Vec<String> = [
                "mock",
                "--api",
                api,
                "--name",
                name,
                "--tier",
                tier,
                "--model",
                MODEL,
                "--ttft-ms",
                &ttft.to_string(),
                "--inter-token-ms",
                &gap.to_string(),
                "--output-tokens",
                "24",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let (p, addr) = Proc::spawn_announced(&bin, &a, &dir, name).await?;
            procs.push(p);
            endpoints.push((name, tier, addr, pin, pout));
        }
        let policy_for = |phase: usize| {
            let eps: Vec<PolicyEndpoint<'_>> = endpoints
                .iter()
                .map(|(name, tier, addr, pin, pout)| PolicyEndpoint {
                    name,
                    addr: *addr,
                    tier,
                    model: MODEL,
                    price_in: *pin,
                    price_out: *pout,
                })
                .collect();
            cluster::policy_yaml(&eps, phase_weights(phase)).replace(
                "  - name: fallback-hosted\n",
                "  - name: fallback-hosted\n    api: anthropic\n",
            )
        };
        let policy = dir.join("policy.yaml");
        cluster::write_atomic(&policy, &policy_for(0))?;

        let (p, control) = cluster::start_control(&bin, &dir, &policy, "127.0.0.1:0", &[]).await?;
        procs.push(p);
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .build()?;
        let (p, sidecar) =
            cluster::start_sidecar(&bin, &dir, control, &["--id", "demo-sidecar"], &http).await?;
        procs.push(p);
        println!(
            "control plane on {control}, sidecar on {sidecar}, mocks: {}",
            endpoints
                .iter()
                .map(|(n, _, a, _, _)| format!("{n}={a}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("phase 1: {}", phase_name(0));

        let seen = Arc::new(Mutex::new(Seen::default()));
        let url = format!("http://{sidecar}/v1/chat/completions");
        let workers: Vec<_> = (0..args.concurrency)
            .map(|w| tokio::spawn(worker(http.clone(), url.clone(), seen.clone(), w)))
            .collect();

        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut phase = 0;
        let phase_len = args.duration.map_or(Duration::from_secs(10), |d| d / 3);
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut ctrl_c => { println!("\nCtrl-C: stopping"); break; }
            }
            print_table(&seen, &endpoints, started.elapsed());
            if args.duration.is_some_and(|d| started.elapsed() >= d) {
                break;
            }
            let due = ((started.elapsed().as_secs_f64() / phase_len.as_secs_f64()) as usize) % 3;
            if due != phase && (args.duration.is_none() || due > phase) {
                phase = due;
                cluster::write_atomic(&policy, &policy_for(phase))?;
                println!(
                    "\npolicy edited -> phase {}: {}",
                    phase + 1,
                    phase_name(phase)
                );
            }
        }
        for w in workers {
            w.abort();
        }
        let s = seen.lock();
        let total: u64 = s.per_endpoint.values().map(|e| e.requests).sum();
        println!(
            "\n{total} requests answered, {} failed{}",
            s.errors,
            if s.errors > 0 {
                format!(" (last: {})", s.last_error)
            } else {
                String::new()
            }
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;

    for p in procs.iter_mut().rev() {
        let _ = p.stop(Duration::from_secs(5)).await;
    }
    println!("all demo processes stopped");
    result
}

async fn worker(http: reqwest::Client, url: String, seen: Arc<Mutex<Seen>>, w: usize) {
    let mut n = 0u64;
    loop {
        n += 1;
        let stream = (n + w as u64).is_multiple_of(2);
        let body = serde_json::json!({
            "model": MODEL,
            "stream": stream,
            "messages": [{"role": "user", "content": format!("demo request {w}-{n}")}],
        });
        let t0 = Instant::now();
        let result = async {
            let r = http.post(&url).json(&body).send().await?;
            let status = r.status();
            let header = |k: &str| {
                r.headers()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            let (endpoint, version) = (
                header("x-switchyard-endpoint"),
                header("x-switchyard-table-version"),
            );
            let mut body = r.bytes_stream();
            let mut text = Vec::new();
            while let Some(chunk) = body.next().await {
                text.extend_from_slice(&chunk?);
            }
            if !status.is_success() {
                anyhow::bail!("{status}: {}", String::from_utf8_lossy(&text));
            }
            Ok::<_, anyhow::Error>((endpoint, version))
        }
        .await;
        let mut s = seen.lock();
        match result {
            Ok((endpoint, version)) => {
                s.version = version;
                let e = s
                    .per_endpoint
                    .entry(endpoint)
                    .or_insert_with(|| EndpointSeen {
                        requests: 0,
                        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
                    });
                e.requests += 1;
                let _ = e.latency_us.record(t0.elapsed().as_micros() as u64);
            }
            Err(e) => {
                s.errors += 1;
                s.last_error = e.to_string();
            }
        }
    }
}

fn print_table(
    seen: &Mutex<Seen>,
    endpoints: &[(&str, &str, SocketAddr, f64, f64)],
    elapsed: Duration,
) {
    let s = seen.lock();
    println!(
        "\n[{:>4.1}s] table version in force: {}   errors: {}",
        elapsed.as_secs_f64(),
        s.version,
        s.errors
    );
    println!(
        "  {:<16} {:<9} {:>9} {:>9} {:>9}",
        "endpoint", "tier", "requests", "p50 ms", "p95 ms"
    );
    for (name, tier, ..) in endpoints {
        let (n, p50, p95) = s.per_endpoint.get(*name).map_or((0, 0.0, 0.0), |e| {
            (
                e.requests,
                e.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
                e.latency_us.value_at_quantile(0.95) as f64 / 1000.0,
            )
        });
        println!("  {name:<16} {tier:<9} {n:>9} {p50:>9.1} {p95:>9.1}");
    }
}
