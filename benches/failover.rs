//! Failover bench: 1,000 requests/s (open loop) through the sidecar to an
//! on-prem primary with a burst endpoint behind it; the primary is killed
//! (SIGKILL) mid-run. Prints the share of requests that failed, the time
//! from the kill until requests succeed again, and latency before and after.
//!
//! `cargo bench --bench failover`; knobs: `SWITCHYARD_BENCH_RATE` (default
//! 1000), `SWITCHYARD_BENCH_SECONDS` (default 6; the kill is at a third).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use switchyard::cluster::{self, PolicyEndpoint, Proc};
use switchyard::loadgen::{self, Sample};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn percentiles(samples: &[&Sample]) -> String {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    for s in samples.iter().filter(|s| s.ok()) {
        let _ = h.record((s.latency.as_micros() as u64).max(1));
    }
    format!(
        "{} ok, p50 {} µs, p99 {} µs, max {} µs",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let rate: u64 = env("SWITCHYARD_BENCH_RATE", 1000);
    let seconds: u64 = env("SWITCHYARD_BENCH_SECONDS", 6);
    let bin = Path::new(env!("CARGO_BIN_EXE_switchyard"));
    let dir = cluster::run_dir("failover")?;
    let mock = |name: &'static str, tier: &'static str| {
        args(&[
            "mock",
            "--name",
            name,
            "--tier",
            tier,
            "--model",
            "m",
            "--ttft-ms",
            "2",
        ])
    };
    let (mut primary, primary_addr) =
        Proc::spawn_announced(bin, &mock("onprem-a", "onprem"), &dir, "onprem-a").await?;
    let (_backup, backup_addr) =
        Proc::spawn_announced(bin, &mock("burst-b", "burst"), &dir, "burst-b").await?;
    let eps = [
        PolicyEndpoint {
            name: "onprem-a",
            addr: primary_addr,
            tier: "onprem",
            model: "m",
            price_in: 0.0,
            price_out: 0.0,
        },
        PolicyEndpoint {
            name: "burst-b",
            addr: backup_addr,
            tier: "burst",
            model: "m",
            price_in: 1.0,
            price_out: 1.0,
        },
    ];
    let policy = dir.join("policy.yaml");
    cluster::write_atomic(&policy, &cluster::policy_yaml(&eps, &[("onprem-a", 1.0)]))?;
    let (_control, control) =
        cluster::start_control(bin, &dir, &policy, "127.0.0.1:0", &[]).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .http1_only()
        .build()?;
    let (_sidecar, sidecar_addr) = cluster::start_sidecar(bin, &dir, control, &[], &http).await?;
    let body = Arc::new(serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": "failover bench"}],
    }))?);
    let url = format!("http://{sidecar_addr}/v1/chat/completions");
    // Warm the pools.
    loadgen::open_loop(&http, &url, body.clone(), rate, Duration::from_millis(500)).await;

    let kill_at = Duration::from_secs(seconds) / 3;
    let run = loadgen::open_loop(&http, &url, body, rate, Duration::from_secs(seconds));
    let kill = async {
        tokio::time::sleep(kill_at).await;
        primary.signal(libc::SIGKILL);
    };
    let (samples, ()) = tokio::join!(run, kill);
    let _ = primary.kill().await;

    let failed: Vec<&Sample> = samples.iter().filter(|s| !s.ok()).collect();
    let before: Vec<&Sample> = samples.iter().filter(|s| s.due < kill_at).collect();
    let after: Vec<&Sample> = samples.iter().filter(|s| s.due >= kill_at).collect();
    let first_after = after.first().map_or(kill_at, |s| s.due);
    // Recovery: from the kill to the last request that did not succeed (or
    // to the first request after the kill, when none failed).
    let recovered_at = failed
        .last()
        .map_or(first_after, |s| s.due.max(first_after));
    let on_primary_after = after
        .iter()
        .filter(|s| s.ok() && s.endpoint.as_deref() == Some("onprem-a"))
        .count();
    println!(
        "rate {rate}/s for {seconds} s; primary killed at {} ms",
        kill_at.as_millis()
    );
    println!(
        "requests {}, failed {} ({:.3}%)",
        samples.len(),
        failed.len(),
        100.0 * failed.len() as f64 / samples.len().max(1) as f64
    );
    println!(
        "time from kill until requests succeed again: {} ms",
        recovered_at.saturating_sub(kill_at).as_millis()
    );
    println!("before kill: {}", percentiles(&before));
    let first_second: Vec<&Sample> = after
        .iter()
        .copied()
        .filter(|s| s.due < kill_at + Duration::from_secs(1))
        .collect();
    println!("first second after kill: {}", percentiles(&first_second));
    println!("answered by the dead primary after the kill (in flight then): {on_primary_after}");
    Ok(())
}
