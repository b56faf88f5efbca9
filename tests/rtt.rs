//! End to end with real processes: a sidecar routing to a loopback mock
//! reports the kernel RTT to that endpoint on `/metrics`, labelled with the
//! source it uses, and leaves no sock_ops program attached once it is gone,
//! whether it ended on SIGTERM or SIGKILL. The test-only simulated source
//! (`file:PATH`) refuses to start without its file.
//!
//! The eBPF tests put the sidecar in a cgroup v2 of their own (created under
//! the cgroup2 mount), so they can tell its program from any other. Where
//! this machine cannot load eBPF they print `SKIPPED` with their name and
//! the reason; `SWITCHYARD_REQUIRE_EBPF=1` (CI) makes that a failure.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use switchyard::cluster::{self, PolicyEndpoint, Proc};
use switchyard_rtt::cgroup;

const MODEL: &str = "llama-3-70b";
const ENDPOINT: &str = "onprem-gpu";

/// A cgroup for one test, removed when dropped (once its processes are
/// gone; a leftover is removed by the next run).
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = cgroup::remove(&self.0);
    }
}

/// A fresh cgroup under the cgroup2 mount, or why there is none.
fn new_cgroup(test: &str) -> Result<TestCgroup, String> {
    let mount = cgroup::mount_point().map_err(|e| e.to_string())?;
    let mine = format!("switchyard-e2e-{}-", std::process::id());
    if let Ok(entries) = std::fs::read_dir(&mount) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Earlier runs' leftovers; this run's siblings are left alone.
            if name.starts_with("switchyard-e2e-") && !name.starts_with(&mine) {
                let _ = cgroup::remove(&e.path());
            }
        }
    }
    cgroup::create(&mount, &format!("{mine}{test}"))
        .map(TestCgroup)
        .map_err(|e| e.to_string())
}

/// The test's cgroup, or `None` after saying the test is skipped and why.
fn ebpf_cgroup(test: &str) -> Option<TestCgroup> {
    let reason = match switchyard_rtt::ebpf_unavailable() {
        Some(r) => r,
        None => match new_cgroup(test) {
            Ok(c) => return Some(c),
            Err(e) => e,
        },
    };
    if std::env::var_os("SWITCHYARD_REQUIRE_EBPF").is_some_and(|v| v == "1") {
        panic!("{test}: SWITCHYARD_REQUIRE_EBPF=1 but eBPF is unavailable: {reason}");
    }
    // Straight to stderr: the harness captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "test {test} ... SKIPPED: eBPF unavailable: {reason}"
    );
    None
}

/// A mock endpoint, a control plane and a sidecar started with `rtt_args`,
/// in `cgroup` if given.
struct Running {
    _mock: Proc,
    _control: Proc,
    sidecar: Proc,
    addr: SocketAddr,
    http: reqwest::Client,
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

async fn start(rtt_args: &[&str], cgroup: Option<&Path>) -> anyhow::Result<Running> {
    let bin = Path::new(env!("CARGO_BIN_EXE_switchyard"));
    let dir = cluster::run_dir("rtt")?;
    let (mock, mock_addr) = Proc::spawn_announced(
        bin,
        &strings(&["mock", "--name", ENDPOINT, "--model", MODEL]),
        &dir,
        "mock",
    )
    .await?;
    let policy = dir.join("policy.yaml");
    let endpoint = PolicyEndpoint {
        name: ENDPOINT,
        addr: mock_addr,
        tier: "onprem",
        model: MODEL,
        price_in: 0.0,
        price_out: 0.0,
    };
    cluster::write_atomic(
        &policy,
        &cluster::policy_yaml(&[endpoint], &[(ENDPOINT, 1.0)]),
    )?;
    let (control, control_addr) =
        cluster::start_control(bin, &dir, &policy, "127.0.0.1:0", &[]).await?;
    let http = reqwest::Client::new();
    let mut extra = vec!["--id", "rtt-e2e"];
    extra.extend_from_slice(rtt_args);
    let (sidecar, addr) =
        cluster::start_sidecar_in(bin, &dir, control_addr, &extra, &http, cgroup).await?;
    Ok(Running {
        _mock: mock,
        _control: control,
        sidecar,
        addr,
        http,
    })
}

impl Running {
    /// Completed chat completions through the sidecar, so its upstream
    /// connection to the mock has carried round trips.
    async fn chat(&self, n: usize) -> anyhow::Result<()> {
        let url = format!("http://{}/v1/chat/completions", self.addr);
        let body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "ping"}],
        });
        for _ in 0..n {
            let r = self.http.post(&url).json(&body).send().await?;
            let status = r.status();
            let text = r.text().await?;
            anyhow::ensure!(status.is_success(), "chat answered {status}: {text}");
        }
        Ok(())
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        let r = self
            .http
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "/metrics answered {}", r.status());
        Ok(r.text().await?)
    }
}

/// The endpoint's smoothed RTT in seconds as `/metrics` reports it with
/// `source`.
fn rtt_seconds(metrics: &str, source: &str) -> Option<f64> {
    let prefix =
        format!("switchyard_endpoint_rtt_seconds{{endpoint=\"{ENDPOINT}\",source=\"{source}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

/// The sidecar's eBPF RTT: metrics carry a plausible loopback figure
/// labelled `ebpf`, the program sits on the cgroup the sidecar found itself
/// in (no `--rtt-cgroup`), and SIGTERM leaves nothing attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_sidecar_reports_endpoint_rtt_and_detaches_on_sigterm() -> anyhow::Result<()> {
    let Some(cg) = ebpf_cgroup("ebpf_sidecar_reports_endpoint_rtt_and_detaches_on_sigterm") else {
        return Ok(());
    };
    let mut run = start(&["--rtt-source", "ebpf"], Some(&cg.0)).await?;
    let attached = cgroup::attached_sock_ops(&cg.0)?;
    assert_eq!(
        attached.len(),
        1,
        "the sidecar's program on its own cgroup: {attached:?}"
    );
    run.chat(5).await?;
    let m = run.metrics().await?;
    let rtt =
        rtt_seconds(&m, "ebpf").with_context(|| format!("no eBPF RTT for {ENDPOINT} in:\n{m}"))?;
    assert!(rtt > 0.0 && rtt < 0.1, "loopback RTT of {rtt} s");
    assert!(
        m.contains("switchyard_rtt_source_info{source=\"ebpf\"} 1"),
        "{m}"
    );
    assert!(!m.contains("source=\"tcp-info\""), "{m}");

    run.sidecar.signal(libc::SIGTERM);
    tokio::time::timeout(Duration::from_secs(15), run.sidecar.wait())
        .await
        .context("the sidecar did not exit within 15 s of SIGTERM")??;
    let attached = cgroup::attached_sock_ops(&cg.0)?;
    assert!(
        attached.is_empty(),
        "still attached after SIGTERM: {attached:?}"
    );
    Ok(())
}

/// SIGKILL gives the sidecar no chance to detach; the kernel must, because
/// the attachment is a link that dies with the process's descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_sidecar_killed_leaves_no_program_attached() -> anyhow::Result<()> {
    let Some(cg) = ebpf_cgroup("ebpf_sidecar_killed_leaves_no_program_attached") else {
        return Ok(());
    };
    let path = cg.0.display().to_string();
    let mut run = start(
        &["--rtt-source", "ebpf", "--rtt-cgroup", &path],
        Some(&cg.0),
    )
    .await?;
    assert_eq!(cgroup::attached_sock_ops(&cg.0)?.len(), 1);
    run.sidecar.kill().await?;
    let attached = cgroup::attached_sock_ops(&cg.0)?;
    assert!(
        attached.is_empty(),
        "still attached after SIGKILL: {attached:?}"
    );
    Ok(())
}

/// Forced TCP_INFO: the sidecar reads its own upstream socket, labels the
/// figure `tcp-info`, and loads no program (checked where a cgroup can be
/// made; the bench relies on this for its "detached" runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_info_sidecar_reports_endpoint_rtt_without_loading_a_program() -> anyhow::Result<()> {
    let cg = new_cgroup("tcp_info").ok();
    let run = start(
        &["--rtt-source", "tcp-info"],
        cg.as_ref().map(|c| c.0.as_path()),
    )
    .await?;
    run.chat(3).await?;
    let m = run.metrics().await?;
    let rtt = rtt_seconds(&m, "tcp-info")
        .with_context(|| format!("no TCP_INFO RTT for {ENDPOINT} in:\n{m}"))?;
    assert!(rtt > 0.0 && rtt < 0.1, "loopback RTT of {rtt} s");
    assert!(
        m.contains("switchyard_rtt_source_info{source=\"tcp-info\"} 1"),
        "{m}"
    );
    assert!(!m.contains("source=\"ebpf\""), "{m}");
    if let Some(cg) = &cg {
        assert!(cgroup::attached_sock_ops(&cg.0)?.is_empty());
    }
    // Reaped before the cgroup is dropped, so it can be removed.
    let mut run = run;
    run.sidecar.kill().await?;
    Ok(())
}

/// `auto` where eBPF cannot attach (a cgroup that does not exist) falls
/// back to TCP_INFO and says why once; `ebpf` there refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_info_and_says_so_once() -> anyhow::Result<()> {
    let missing = "/nonexistent/switchyard-cgroup";
    let run = start(&["--rtt-source", "auto", "--rtt-cgroup", missing], None).await?;
    run.chat(2).await?;
    let m = run.metrics().await?;
    assert!(rtt_seconds(&m, "tcp-info").is_some(), "{m}");
    let log = run.sidecar.log_text();
    assert_eq!(log.matches("eBPF RTT unavailable").count(), 1, "{log}");
    if switchyard_rtt::ebpf_unavailable().is_none() {
        // Otherwise the reason is the machine's, not the cgroup's.
        assert!(log.contains(missing), "the reason names the cgroup: {log}");
    }

    let bin = Path::new(env!("CARGO_BIN_EXE_switchyard"));
    let dir = cluster::run_dir("rtt-refuse")?;
    let args = strings(&[
        "sidecar",
        "--control",
        "127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
        "--rtt-source",
        "ebpf",
        "--rtt-cgroup",
        missing,
    ]);
    let mut refused = Proc::spawn(bin, &args, &dir, "sidecar")?;
    let status = tokio::time::timeout(Duration::from_secs(15), refused.wait())
        .await
        .context("--rtt-source ebpf without eBPF kept running")??;
    assert!(!status.success());
    assert!(
        refused.log_text().contains("RTT source"),
        "{}",
        refused.log_text()
    );
    Ok(())
}

/// The test-only `file:PATH` source refuses to start on a file it cannot
/// read, rather than run a simulation on no figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_rtt_source_without_its_file_refuses_to_start() -> anyhow::Result<()> {
    let bin = Path::new(env!("CARGO_BIN_EXE_switchyard"));
    let dir = cluster::run_dir("rtt-file-refuse")?;
    let missing = dir.join("no-such-rtt.txt");
    let source = format!("file:{}", missing.display());
    let args = strings(&[
        "sidecar",
        "--control",
        "127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
        "--rtt-source",
        &source,
    ]);
    let mut refused = Proc::spawn(bin, &args, &dir, "sidecar")?;
    let status = tokio::time::timeout(Duration::from_secs(15), refused.wait())
        .await
        .context("--rtt-source file: without its file kept running")??;
    assert!(!status.success());
    let log = refused.log_text();
    assert!(
        log.contains("reading RTT file") && log.contains("no-such-rtt.txt"),
        "{log}"
    );
    Ok(())
}
