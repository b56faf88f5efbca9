//! End-to-end load bench: a fixed request rate (open loop) at one mock
//! provider, directly, through the sidecar, and through nginx as a reference
//! proxy, in alternating rounds of one run so machine noise hits all three
//! alike. Prints latency percentiles per path, what each proxy adds, and the
//! proxies' CPU time per request.
//!
//! `cargo bench --bench load`; knobs (environment):
//! `SWITCHYARD_BENCH_RATE` (requests/s, default 1000),
//! `SWITCHYARD_BENCH_PHASE_MS` (default 2000), `SWITCHYARD_BENCH_ROUNDS`
//! (default 5), `SWITCHYARD_BENCH_SIDECAR_ARGS` (extra sidecar flags, e.g.
//! `--rtt-source tcp-info`), `SWITCHYARD_BENCH_STREAM=1` for streamed answers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use switchyard::cluster::{self, PolicyEndpoint, Proc};
use switchyard::loadgen;
use tokio::time::Instant;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux target we run on.
    ticks / 100.0
}

struct Target {
    name: &'static str,
    url: String,
    pids: Vec<u32>,
    latency: Histogram<u64>,
    requests: u64,
    errors: u64,
    cpu: f64,
}

fn start_nginx(dir: &Path, mock: SocketAddr) -> Option<(Proc, SocketAddr, Vec<u32>)> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let port = cluster::free_port().ok()?;
    let conf = format!(
        "worker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
           upstream mock {{ server {mock}; keepalive 256; }}\n\
           server {{ listen 127.0.0.1:{port};\n\
             location / {{ proxy_pass http://mock; proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\"; proxy_buffering off; }} }}\n}}\n",
        dir = dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).ok()?;
    let proc = Proc::spawn(
        Path::new(nginx),
        &args(&[
            "-e",
            &format!("{}/nginx-error.log", dir.display()),
            "-c",
            conf_path.to_str()?,
            "-g",
            "daemon off;",
        ]),
        dir,
        "nginx",
    )
    .ok()?;
    let master = proc.pid()?;
    Some((proc, ([127, 0, 0, 1], port).into(), vec![master]))
}

/// nginx's worker is a child of its master; its CPU is what serves requests.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

async fn phase(
    http: &reqwest::Client,
    target: &mut Target,
    body: &Arc<Vec<u8>>,
    rate: u64,
    length: Duration,
) {
    let cpu0: f64 = target.pids.iter().map(|p| cpu_seconds(*p)).sum();
    let samples = loadgen::open_loop(http, &target.url, body.clone(), rate, length).await;
    let cpu1: f64 = target.pids.iter().map(|p| cpu_seconds(*p)).sum();
    target.cpu += cpu1 - cpu0;
    for s in samples {
        target.requests += 1;
        if s.ok() {
            let _ = target.latency.record((s.latency.as_micros() as u64).max(1));
        } else {
            target.errors += 1;
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let rate: u64 = env("SWITCHYARD_BENCH_RATE", 1000);
    let phase_len = Duration::from_millis(env("SWITCHYARD_BENCH_PHASE_MS", 2000));
    let rounds: u32 = env("SWITCHYARD_BENCH_ROUNDS", 5);
    let stream: bool = env("SWITCHYARD_BENCH_STREAM", 0u8) == 1;
    let sidecar_extra: String = env("SWITCHYARD_BENCH_SIDECAR_ARGS", String::new());

    let bin = Path::new(env!("CARGO_BIN_EXE_switchyard"));
    let dir = cluster::run_dir("bench")?;
    let (_mock, mock) = Proc::spawn_announced(
        bin,
        &args(&[
            "mock",
            "--name",
            "bench",
            "--model",
            "m",
            "--output-tokens",
            "16",
        ]),
        &dir,
        "mock",
    )
    .await?;
    let policy = dir.join("policy.yaml");
    let ep = PolicyEndpoint {
        name: "bench",
        addr: mock,
        tier: "onprem",
        model: "m",
        price_in: 0.0,
        price_out: 0.0,
    };
    cluster::write_atomic(&policy, &cluster::policy_yaml(&[ep], &[]))?;
    let (_control, control) =
        cluster::start_control(bin, &dir, &policy, "127.0.0.1:0", &[]).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .http1_only()
        .build()?;
    let extra: Vec<&str> = sidecar_extra.split_whitespace().collect();
    let (sidecar, sidecar_addr) = cluster::start_sidecar(bin, &dir, control, &extra, &http).await?;

    let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let path = "/v1/chat/completions";
    let mut targets = vec![
        Target {
            name: "direct",
            url: format!("http://{mock}{path}"),
            pids: vec![],
            latency: hist(),
            requests: 0,
            errors: 0,
            cpu: 0.0,
        },
        Target {
            name: "sidecar",
            url: format!("http://{sidecar_addr}{path}"),
            pids: sidecar.pid().into_iter().collect(),
            latency: hist(),
            requests: 0,
            errors: 0,
            cpu: 0.0,
        },
    ];
    let nginx = start_nginx(&dir, mock);
    if let Some((_, addr, pids)) = &nginx {
        let mut workers = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        while workers.is_empty() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
            workers = children(pids[0]);
        }
        cluster::wait_ok(
            &http,
            &format!("http://{addr}/health"),
            Duration::from_secs(10),
        )
        .await?;
        targets.push(Target {
            name: "nginx",
            url: format!("http://{addr}{path}"),
            pids: workers,
            latency: hist(),
            requests: 0,
            errors: 0,
            cpu: 0.0,
        });
    } else {
        println!("nginx not installed: comparing sidecar and direct only");
    }

    let body = Arc::new(
        serde_json::to_vec(&serde_json::json!({
            "model": "m",
            "stream": stream,
            "messages": [{"role": "user", "content": "benchmark prompt of a typical short length"}],
        }))
        .unwrap(),
    );
    println!(
        "rate {rate}/s, {rounds} rounds of {} ms per path, stream={stream}, sidecar args: {sidecar_extra:?}",
        phase_len.as_millis()
    );
    // Warm up connection pools on every path.
    for t in targets.iter_mut() {
        let mut warm = Target {
            name: t.name,
            url: t.url.clone(),
            pids: vec![],
            latency: hist(),
            requests: 0,
            errors: 0,
            cpu: 0.0,
        };
        phase(&http, &mut warm, &body, rate, Duration::from_millis(500)).await;
    }
    for _ in 0..rounds {
        for t in targets.iter_mut() {
            phase(&http, t, &body, rate, phase_len).await;
        }
    }

    println!(
        "\n{:<8} {:>9} {:>7} {:>9} {:>9} {:>9} {:>12}",
        "path", "requests", "errors", "p50 µs", "p99 µs", "p99.9 µs", "cpu µs/req"
    );
    for t in &targets {
        let cpu = if t.pids.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1}", t.cpu * 1e6 / t.requests.max(1) as f64)
        };
        println!(
            "{:<8} {:>9} {:>7} {:>9} {:>9} {:>9} {:>12}",
            t.name,
            t.requests,
            t.errors,
            t.latency.value_at_quantile(0.5),
            t.latency.value_at_quantile(0.99),
            t.latency.value_at_quantile(0.999),
            cpu
        );
    }
    let direct = &targets[0].latency;
    for t in &targets[1..] {
        println!(
            "{} adds: p50 {:+} µs, p99 {:+} µs",
            t.name,
            t.latency.value_at_quantile(0.5) as i64 - direct.value_at_quantile(0.5) as i64,
            t.latency.value_at_quantile(0.99) as i64 - direct.value_at_quantile(0.99) as i64,
        );
    }
    // SIGTERM: nginx's master stops its workers, which a SIGKILL would orphan.
    if let Some((mut p, ..)) = nginx {
        p.stop(Duration::from_secs(5)).await?;
    }
    Ok(())
}
