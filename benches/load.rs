//! End-to-end load bench: the sidecar against nginx (a reference proxy) and
//! against no proxy at all, in front of one mock provider. Three parts, each
//! printing its own table:
//!
//! 1. **Open loop**: fixed request rates (each request leaves on schedule
//!    whatever earlier ones did) directly, through the sidecar and through
//!    nginx, non-streamed and streamed, in alternating rounds so machine
//!    noise hits every path alike. Per (mode, rate, path): requests, errors,
//!    p50/p99/p99.9 latency, what the proxy adds to p50 and p99, its CPU time
//!    per request, its peak RSS in the phase (VmHWM, reset before each phase
//!    through `/proc/<pid>/clear_refs`, and VmRSS sampled every 20 ms), and
//!    the load generator's own CPU use. Then the ratios: sidecar CPU/request
//!    ÷ nginx CPU/request, sidecar added p99 ÷ nginx added p99.
//!
//!    With `SWITCHYARD_BENCH_KINDS` (on by default), two more sidecar paths join the same
//!    rounds, each a stack of its own (mock, control plane, sidecar) whose
//!    mock answers the same 16 tokens: `sidecar-anthropic`, whose endpoint is
//!    `api: anthropic` (the sidecar translates the OpenAI request into
//!    Anthropic's Messages API and the answer, streamed or not, back), and
//!    `sidecar-tls`, an `openai` endpoint over `https` with a certificate from
//!    a CA the bench makes (`ca_file`). `sidecar`, `openai` over plain HTTP,
//!    is their reference: ratios of CPU/request and of added p99 to its.
//!    Their "direct" is the OpenAI mock over plain HTTP, as for every path:
//!    the app cannot call Anthropic's API itself, and the point is what each
//!    path adds on top of the bare provider. A warm-up first checks that
//!    every path answers in OpenAI's shape, so no path is timed on errors.
//! 2. **Burst**: the mock made slow (`inter_token_ms`), N streamed requests
//!    sent at once through the sidecar (then nginx, for reference), read to
//!    their end; RSS before, at peak and after, polled until it comes back
//!    down or the settle time runs out: does the proxy give memory back?
//! 3. **Closed loop, proxy on one core**: a fresh sidecar (`--threads 1`)
//!    and nginx (`worker_processes 1`) pinned to core 0 (`taskset`), the mock
//!    (one tokio worker) and `wrk` (one thread, N connections) on core 1.
//!    Max requests/s per path, the sidecar/nginx ratio, and whether the mock
//!    and `wrk` (core 1) rather than the proxy were the bottleneck.
//!
//! `cargo bench --bench load`; knobs (environment), defaults in brackets:
//!
//! | variable | meaning |
//! |---|---|
//! | `SWITCHYARD_BENCH_OPEN` [1] | run part 1 (0: skip) |
//! | `SWITCHYARD_BENCH_BURST` [1] | run part 2 (0: skip) |
//! | `SWITCHYARD_BENCH_CLOSED` [1] | run part 3 (0: skip) |
//! | `SWITCHYARD_BENCH_MODES` [`plain,stream`] | answer modes for parts 1 and 3 |
//! | `SWITCHYARD_BENCH_RATES` [`500,2000`] | open-loop rates, requests/s |
//! | `SWITCHYARD_BENCH_PHASE_MS` [2000] | one open-loop phase (one path, one rate, one mode) |
//! | `SWITCHYARD_BENCH_ROUNDS` [4] | open-loop rounds; each runs every (mode, rate, path) once |
//! | `SWITCHYARD_BENCH_KINDS` [1] | add the `sidecar-anthropic` and `sidecar-tls` paths to part 1 (0: skip) |
//! | `SWITCHYARD_BENCH_BURST_N` [1000] | streams opened at once in part 2 |
//! | `SWITCHYARD_BENCH_BURST_INTER_TOKEN_MS` [20] | the mock's pause between tokens in part 2 |
//! | `SWITCHYARD_BENCH_BURST_TOKENS` [100] | tokens per streamed answer in part 2 (100 × 20 ms: 2 s open) |
//! | `SWITCHYARD_BENCH_SETTLE_MS` [5000] | longest wait for RSS to come down after a burst |
//! | `SWITCHYARD_BENCH_CLOSED_SECS` [4] | one `wrk` run (one path, one mode) |
//! | `SWITCHYARD_BENCH_CLOSED_ROUNDS` [2] | closed-loop rounds, alternating paths |
//! | `SWITCHYARD_BENCH_CONNECTIONS` [64] | `wrk` connections |
//! | `SWITCHYARD_BENCH_QUIET_WAIT_S` [60] | part 3 waits before each run until the machine is quiet (others' builds), at most this long in all |
//! | `SWITCHYARD_BENCH_SIDECAR_ARGS` [] | extra sidecar flags, e.g. `--rtt-source tcp-info` |
//!
//! The defaults take about four minutes on a 2-core machine (three with
//! `SWITCHYARD_BENCH_KINDS=0`), one more at most waiting for a quiet machine
//! in part 3. nginx and `wrk` come from `scripts/setup.sh`; without nginx
//! its rows are left out, without `wrk` part 3 is. CPU time is the sum of
//! `se.sum_exec_runtime` over the process's threads
//! (`/proc/<pid>/task/*/sched`), or the process's utime + stime in clock
//! ticks where that file is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use switchyard::cluster::{self, PolicyEndpoint, Proc};
use switchyard::loadgen;
use tokio::time::Instant;

// The TLS tests' throwaway CA, shared by path rather than copied: rcgen is
// a dev-dependency, so the library cannot hold it.
#[path = "../tests/common/pki.rs"]
#[allow(dead_code)] // the client certificate is for the tests' mTLS alone
mod pki;

const PATH: &str = "/v1/chat/completions";
const MIB: f64 = 1024.0;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn on(name: &str) -> bool {
    env(name, 1u8) != 0
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Everything the environment can change; see the table at the top.
struct Knobs {
    open: bool,
    kinds: bool,
    burst: bool,
    closed: bool,
    modes: Vec<Mode>,
    rates: Vec<u64>,
    phase: Duration,
    rounds: u32,
    burst_n: usize,
    burst_inter_token_ms: u64,
    burst_tokens: u64,
    settle: Duration,
    closed_secs: u64,
    closed_rounds: u32,
    connections: u32,
    quiet_wait: Duration,
    sidecar_args: String,
}

impl Knobs {
    fn from_env() -> anyhow::Result<Knobs> {
        let rates = env("SWITCHYARD_BENCH_RATES", "500,2000".to_string())
            .split(',')
            .map(|r| {
                r.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|r| *r > 0)
                    .with_context(|| format!("SWITCHYARD_BENCH_RATES: bad rate {r:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let modes = env("SWITCHYARD_BENCH_MODES", "plain,stream".to_string())
            .split(',')
            .map(|m| match m.trim() {
                "plain" => Ok(Mode::Plain),
                "stream" => Ok(Mode::Stream),
                m => bail!("SWITCHYARD_BENCH_MODES: {m:?} is neither plain nor stream"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Knobs {
            open: on("SWITCHYARD_BENCH_OPEN"),
            kinds: on("SWITCHYARD_BENCH_KINDS"),
            burst: on("SWITCHYARD_BENCH_BURST"),
            closed: on("SWITCHYARD_BENCH_CLOSED"),
            modes,
            rates,
            phase: Duration::from_millis(env("SWITCHYARD_BENCH_PHASE_MS", 2000)),
            rounds: env("SWITCHYARD_BENCH_ROUNDS", 4u32).max(1),
            burst_n: env("SWITCHYARD_BENCH_BURST_N", 1000),
            burst_inter_token_ms: env("SWITCHYARD_BENCH_BURST_INTER_TOKEN_MS", 20),
            burst_tokens: env("SWITCHYARD_BENCH_BURST_TOKENS", 100),
            settle: Duration::from_millis(env("SWITCHYARD_BENCH_SETTLE_MS", 5000)),
            closed_secs: env("SWITCHYARD_BENCH_CLOSED_SECS", 4u64).max(1),
            closed_rounds: env("SWITCHYARD_BENCH_CLOSED_ROUNDS", 2u32).max(1),
            connections: env("SWITCHYARD_BENCH_CONNECTIONS", 64u32).max(1),
            quiet_wait: Duration::from_secs(env("SWITCHYARD_BENCH_QUIET_WAIT_S", 60)),
            sidecar_args: env("SWITCHYARD_BENCH_SIDECAR_ARGS", String::new()),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Stream,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Stream => "stream",
        }
    }

    fn body(self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "model": "m",
            "stream": self == Mode::Stream,
            "messages": [{"role": "user", "content": "benchmark prompt of a typical short length"}],
        }))
        .expect("a JSON value serialises")
    }
}

// ---------------------------------------------------------------- /proc

/// CPU seconds a process has used so far: the sum over its threads of the
/// scheduler's nanosecond runtime, or utime + stime in ticks without it.
fn cpu_seconds(pid: u32) -> f64 {
    sched_seconds(pid).unwrap_or_else(|| stat_seconds(pid))
}

fn sched_seconds(pid: u32) -> Option<f64> {
    let mut ms = 0.0;
    let mut any = false;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(text) = std::fs::read_to_string(task.ok()?.path().join("sched")) else {
            continue; // the thread exited meanwhile
        };
        let runtime = text
            .lines()
            .find(|l| l.starts_with("se.sum_exec_runtime"))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse::<f64>().ok())?;
        ms += runtime;
        any = true;
    }
    any.then_some(ms / 1000.0)
}

fn stat_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux target we run on.
    ticks / 100.0
}

fn cpu_sum(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS").unwrap_or(0)
}

/// Resets the process's VmHWM to its current RSS (Linux 4.0+).
fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / MIB)
}

/// Samples a process's VmRSS every 20 ms until stopped; with a VmHWM reset
/// at the start, the peak is the larger of the two.
struct RssWatch {
    pid: u32,
    hwm_reset: bool,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let hwm_reset = reset_hwm(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut most = 0;
            loop {
                most = rss_kib(pid).max(most);
                if flag.load(Ordering::Relaxed) {
                    return most;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        RssWatch {
            pid,
            hwm_reset,
            stop,
            task,
        }
    }

    /// The peak RSS in KiB since the start.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let sampled = self.task.await.unwrap_or(0);
        let hwm = if self.hwm_reset {
            status_kib(self.pid, "VmHWM").unwrap_or(0)
        } else {
            0
        };
        sampled.max(hwm)
    }
}

/// Busy and total clock ticks of each CPU, from `/proc/stat`.
fn cpu_ticks() -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle and iowait are not busy.
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle.min(total), total)
        })
        .collect()
}

/// Busy share of CPU `cpu` between two [`cpu_ticks`] readings, in percent.
fn busy_percent(before: &[(u64, u64)], after: &[(u64, u64)], cpu: usize) -> f64 {
    match (before.get(cpu), after.get(cpu)) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            100.0 * b1.saturating_sub(*b0) as f64 / (t1 - t0) as f64
        }
        _ => f64::NAN,
    }
}

/// How busy each CPU is over `over` with none of the bench's load running:
/// other work on the shared machine that every number below competes with.
async fn background_load(over: Duration) -> String {
    let t0 = cpu_ticks();
    tokio::time::sleep(over).await;
    let t1 = cpu_ticks();
    (0..t0.len())
        .map(|i| format!("cpu{i} {:.0}%", busy_percent(&t0, &t1, i)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits, in half-second looks and for at most what is left of `budget`,
/// until no CPU is more than 20% busy: the bench's own processes are idle
/// then, so that is other work. Returns the seconds waited and whether
/// the machine was found quiet.
async fn wait_quiet(budget: &mut Duration) -> (f64, bool) {
    let start = Instant::now();
    while !budget.is_zero() {
        let t0 = cpu_ticks();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t1 = cpu_ticks();
        *budget = budget.saturating_sub(Duration::from_millis(500));
        if (0..t0.len()).all(|i| busy_percent(&t0, &t1, i) < 20.0) {
            return (start.elapsed().as_secs_f64(), true);
        }
    }
    (start.elapsed().as_secs_f64(), false)
}

/// A process's children (nginx's workers are its master's).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Pins every thread of `pid` to `cpu`; threads it starts later inherit it.
fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .context("running taskset (util-linux)")?;
    if !out.status.success() {
        bail!(
            "taskset -a -p -c {cpu} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The CPUs each thread of `pid` may run on, when they all agree.
fn allowed_cpus(pid: u32) -> String {
    let mut lists: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .collect();
    lists.sort();
    lists.dedup();
    lists.join(" / ")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------- nginx

/// nginx with one worker proxying to `upstream` (keep-alive both sides).
struct Nginx {
    proc: Option<Proc>,
    addr: SocketAddr,
    master: u32,
    workers: Vec<u32>,
}

impl Nginx {
    /// `Ok(None)` when nginx is not installed.
    async fn start(
        dir: &Path,
        label: &str,
        upstream: SocketAddr,
        http: &reqwest::Client,
    ) -> anyhow::Result<Option<Nginx>> {
        let Some(nginx) = which("nginx") else {
            return Ok(None);
        };
        let dir = dir.join(label);
        std::fs::create_dir_all(&dir)?;
        let port = cluster::free_port()?;
        // keepalive_requests: nginx closes a keep-alive connection after
        // 1,000 requests by default; the sidecar never does, so neither
        // does the reference. backlog: nginx's default (511) drops SYNs
        // when a burst connects 1,000 at once, and they come back a second
        // later.
        let conf = format!(
            "worker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
               keepalive_requests 1000000;\n\
               upstream mock {{ server {upstream}; keepalive 256; keepalive_requests 1000000; }}\n\
               server {{ listen 127.0.0.1:{port} backlog=4096;\n\
                 location / {{ proxy_pass http://mock; proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\"; proxy_buffering off; }} }}\n}}\n",
            dir = dir.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let proc = Proc::spawn(
            &nginx,
            &args(&[
                "-e",
                &format!("{}/nginx-error.log", dir.display()),
                "-c",
                conf_path.to_str().context("nginx.conf path is not UTF-8")?,
                "-g",
                "daemon off;",
            ]),
            &dir,
            "nginx",
        )?;
        let master = proc.pid().context("nginx exited at once")?;
        let mut me = Nginx {
            proc: Some(proc),
            addr: ([127, 0, 0, 1], port).into(),
            master,
            workers: Vec::new(),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while me.workers.is_empty() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
            me.workers = children(master);
        }
        if me.workers.is_empty() {
            bail!(
                "nginx started no worker; see {}/nginx-error.log",
                dir.display()
            );
        }
        cluster::wait_ok(
            http,
            &format!("http://{}/health", me.addr),
            Duration::from_secs(10),
        )
        .await?;
        Ok(Some(me))
    }

    /// SIGTERM: the master stops its workers (a SIGKILL would orphan them).
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5)).await?;
        }
        Ok(())
    }
}

impl Drop for Nginx {
    /// On an early return: SIGTERM the workers too, since the master's
    /// handle SIGKILLs it as it drops, before it could stop them.
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.signal(libc::SIGTERM);
            for w in &self.workers {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &w.to_string()])
                    .status();
            }
        }
    }
}

// ---------------------------------------------------------------- the stacks

/// A mock, a control plane whose policy routes all to it, and a sidecar.
struct Stack {
    mock: Proc,
    mock_addr: SocketAddr,
    control: Proc,
    sidecar: Proc,
    sidecar_addr: SocketAddr,
}

/// A stack whose policy routes to the mock as an `openai` endpoint over
/// plain HTTP.
async fn start_stack(
    bin: &Path,
    dir: &Path,
    mock_cmd: (&Path, Vec<String>),
    sidecar_args: &[&str],
    http: &reqwest::Client,
) -> anyhow::Result<Stack> {
    let policy = |mock_addr| {
        let ep = PolicyEndpoint {
            name: "bench",
            addr: mock_addr,
            tier: "onprem",
            model: "m",
            price_in: 0.0,
            price_out: 0.0,
        };
        cluster::policy_yaml(&[ep], &[])
    };
    start_stack_with(bin, dir, mock_cmd, sidecar_args, http, policy).await
}

/// A stack whose policy `policy` writes for the mock's address.
async fn start_stack_with(
    bin: &Path,
    dir: &Path,
    mock_cmd: (&Path, Vec<String>),
    sidecar_args: &[&str],
    http: &reqwest::Client,
    policy: impl FnOnce(SocketAddr) -> String,
) -> anyhow::Result<Stack> {
    std::fs::create_dir_all(dir)?;
    let (mock, mock_addr) = Proc::spawn_announced(mock_cmd.0, &mock_cmd.1, dir, "mock").await?;
    let yaml = policy(mock_addr);
    let policy = dir.join("policy.yaml");
    cluster::write_atomic(&policy, &yaml)?;
    let (control, control_addr) =
        cluster::start_control(bin, dir, &policy, "127.0.0.1:0", &[]).await?;
    let (sidecar, sidecar_addr) =
        cluster::start_sidecar(bin, dir, control_addr, sidecar_args, http).await?;
    Ok(Stack {
        mock,
        mock_addr,
        control,
        sidecar,
        sidecar_addr,
    })
}

fn mock_args(extra: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "mock",
        "--port",
        "0",
        "--name",
        "bench",
        "--model",
        "m",
        "--output-tokens",
        "16",
    ]);
    a.extend(args(extra));
    a
}

/// A policy with one endpoint, `bench`, and one class, for the paths
/// [`cluster::policy_yaml`] cannot write: `lines` are the endpoint's own
/// (url, api, models, TLS files), indented by four spaces.
fn one_endpoint_policy(lines: &str) -> String {
    format!(
        "default_class: standard
endpoints:
  - name: bench
    tier: onprem
    price: {{ input_per_mtok: 0, output_per_mtok: 0 }}
{lines}classes:
  - name: standard
    ttft_timeout_ms: 5000
    deadline_ms: 30000
"
    )
}

/// The two stacks of `SWITCHYARD_BENCH_KINDS`, and the part 1 paths through
/// them.
struct Kinds {
    anthropic: Stack,
    tls: Stack,
}

impl Kinds {
    async fn start(
        bin: &Path,
        dir: &Path,
        sidecar_args: &[&str],
        http: &reqwest::Client,
    ) -> anyhow::Result<Kinds> {
        // The app names `m`, as on every other path; the endpoint maps it to
        // the id the Anthropic mock lists, as a real one would.
        let anthropic = start_stack_with(
            bin,
            &dir.join("anthropic"),
            (
                bin,
                mock_args(&["--api", "anthropic", "--model", "claude-bench"]),
            ),
            sidecar_args,
            http,
            |addr| {
                one_endpoint_policy(&format!(
                    "    url: http://{addr}\n    api: anthropic\n    models: {{ m: claude-bench }}\n"
                ))
            },
        )
        .await
        .context("starting the anthropic stack")?;

        let tls_dir = dir.join("tls");
        std::fs::create_dir_all(&tls_dir)?;
        // The control plane checks ca_file and the sidecar reads it, each
        // in its own working directory: an absolute path means one file.
        let tls_dir = tls_dir.canonicalize()?;
        let p = pki::issue(&tls_dir, "bench");
        let path = |p: &Path| {
            p.to_str()
                .map(str::to_string)
                .context("PKI path is not UTF-8")
        };
        let (cert, key, ca) = (path(&p.server_cert)?, path(&p.server_key)?, path(&p.ca)?);
        let tls = start_stack_with(
            bin,
            &tls_dir,
            (bin, mock_args(&["--tls-cert", &cert, "--tls-key", &key])),
            sidecar_args,
            http,
            |addr| {
                // By IP, as the certificate names 127.0.0.1: verification on,
                // hostname included, as against a real provider.
                one_endpoint_policy(&format!(
                    "    url: https://127.0.0.1:{}\n    models: [m]\n    ca_file: {ca}\n",
                    addr.port()
                ))
            },
        )
        .await
        .context("starting the TLS stack")?;
        Ok(Kinds { anthropic, tls })
    }

    fn routes(&self) -> Vec<Route> {
        [
            ("sidecar-anthropic", &self.anthropic),
            ("sidecar-tls", &self.tls),
        ]
        .into_iter()
        .map(|(name, s)| Route {
            name,
            url: format!("http://{}{PATH}", s.sidecar_addr),
            proxy: s.sidecar.pid(),
        })
        .collect()
    }
}

/// One request per mode through `route`, read as the app would: a plain
/// answer must be a `chat.completion` with `choices[0].message.content`, a
/// stream `chat.completion.chunk` events ending in `[DONE]`. A path that
/// answered errors, or another API's shape, would be timed on those.
async fn check_openai_shape(
    http: &reqwest::Client,
    route: &Route,
    modes: &[Mode],
) -> anyhow::Result<String> {
    let mut seen = Vec::new();
    for mode in modes {
        let r = http
            .post(&route.url)
            .header("content-type", "application/json")
            .body(mode.body())
            .send()
            .await
            .with_context(|| format!("{}: {} request", route.name, mode.name()))?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("{} {}: status {status}: {text}", route.name, mode.name());
        }
        match mode {
            Mode::Plain => {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} plain: not JSON: {text}", route.name))?;
                let content = v["choices"][0]["message"]["content"].as_str();
                if v["object"] != "chat.completion" || content.is_none_or(str::is_empty) {
                    bail!(
                        "{} plain: not an OpenAI chat.completion: {text}",
                        route.name
                    );
                }
                seen.push(format!(
                    "plain chat.completion, {} completion tokens",
                    v["usage"]["completion_tokens"]
                ));
            }
            Mode::Stream => {
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim)
                    .collect();
                if data.last() != Some(&"[DONE]") {
                    bail!("{} stream: does not end in [DONE]: {text}", route.name);
                }
                let mut tokens = 0;
                for d in &data[..data.len() - 1] {
                    let v: serde_json::Value = serde_json::from_str(d)
                        .with_context(|| format!("{} stream: event not JSON: {d}", route.name))?;
                    if v["object"] != "chat.completion.chunk" {
                        bail!("{} stream: not a chat.completion.chunk: {d}", route.name);
                    }
                    if v["choices"][0]["delta"]["content"]
                        .as_str()
                        .is_some_and(|c| !c.is_empty())
                    {
                        tokens += 1;
                    }
                }
                seen.push(format!(
                    "stream {} chat.completion.chunk events ({tokens} with content) + [DONE]",
                    data.len() - 1
                ));
            }
        }
    }
    Ok(format!("{}: {}", route.name, seen.join("; ")))
}

/// A path requests take: its URL and the process doing the proxying.
#[derive(Clone)]
struct Route {
    name: &'static str,
    url: String,
    /// The proxy process (nginx: its worker); none for direct.
    proxy: Option<u32>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

// ---------------------------------------------------------------- part 1

/// One (mode, rate, path) over every round.
struct Cell {
    requests: u64,
    errors: u64,
    latency: Histogram<u64>,
    proxy_cpu: f64,
    gen_cpu: f64,
    wall: f64,
    peak_rss_kib: u64,
    /// Each round's p99, for a view one stalled phase cannot move.
    round_p99: Vec<i64>,
}

impl Cell {
    fn new() -> Cell {
        Cell {
            requests: 0,
            errors: 0,
            latency: hist(),
            proxy_cpu: 0.0,
            gen_cpu: 0.0,
            wall: 0.0,
            peak_rss_kib: 0,
            round_p99: Vec::new(),
        }
    }

    fn q(&self, q: f64) -> i64 {
        self.latency.value_at_quantile(q) as i64
    }

    /// The median over rounds of this cell's p99 minus `base`'s, round by
    /// round.
    fn median_added_p99(&self, base: &Cell) -> i64 {
        let mut d: Vec<i64> = self
            .round_p99
            .iter()
            .zip(&base.round_p99)
            .map(|(a, b)| a - b)
            .collect();
        d.sort_unstable();
        d.get(d.len() / 2).copied().unwrap_or(0)
    }

    fn cpu_per_request_us(&self) -> f64 {
        self.proxy_cpu * 1e6 / self.requests.max(1) as f64
    }
}

async fn phase(
    http: &reqwest::Client,
    route: &Route,
    cell: &mut Cell,
    body: &Arc<Vec<u8>>,
    rate: u64,
    length: Duration,
) {
    let me = std::process::id();
    let watch = route.proxy.map(RssWatch::start);
    let proxy: Vec<u32> = route.proxy.into_iter().collect();
    let (cpu0, gen0, t0) = (cpu_sum(&proxy), cpu_seconds(me), Instant::now());
    let samples = loadgen::open_loop(http, &route.url, body.clone(), rate, length).await;
    cell.wall += t0.elapsed().as_secs_f64();
    cell.proxy_cpu += cpu_sum(&proxy) - cpu0;
    cell.gen_cpu += cpu_seconds(me) - gen0;
    if let Some(w) = watch {
        cell.peak_rss_kib = cell.peak_rss_kib.max(w.finish().await);
    }
    let mut this = hist();
    for s in samples {
        cell.requests += 1;
        if s.ok() {
            let _ = this.record((s.latency.as_micros() as u64).max(1));
        } else {
            cell.errors += 1;
        }
    }
    cell.round_p99.push(this.value_at_quantile(0.99) as i64);
    let _ = cell.latency.add(&this);
}

async fn open_loop(k: &Knobs, http: &reqwest::Client, routes: &[Route]) -> anyhow::Result<()> {
    println!(
        "\n== 1. open loop: rates {:?} req/s, modes {}, {} rounds of {} ms per (mode, rate, path) ==",
        k.rates,
        k.modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(","),
        k.rounds,
        k.phase.as_millis()
    );
    let kinds: Vec<&str> = routes
        .iter()
        .map(|r| r.name)
        .filter(|n| n.starts_with("sidecar-"))
        .collect();
    if !kinds.is_empty() {
        println!(
            "{}: the sidecar to an Anthropic mock (translated) and to an OpenAI mock over TLS; \
             their \"direct\" is the OpenAI mock over plain HTTP, as for every path (the app \
             cannot call Anthropic's API itself), so +p50/+p99 is all the path adds",
            kinds.join(", ")
        );
    }
    // Before timing anything: every path answers what an OpenAI client
    // reads, not errors and not another API's shape.
    for r in routes {
        println!(
            "shape check: {}",
            check_openai_shape(http, r, &k.modes).await?
        );
    }
    let bodies: Vec<Arc<Vec<u8>>> = k.modes.iter().map(|m| Arc::new(m.body())).collect();
    // Warm up every path's connection pool, in every mode.
    let top = k.rates.iter().copied().max().unwrap_or(500);
    for (mode, body) in k.modes.iter().zip(&bodies) {
        for r in routes {
            let mut warm = Cell::new();
            phase(http, r, &mut warm, body, top, Duration::from_millis(500)).await;
            if warm.errors > 0 {
                println!(
                    "NOTE: warm-up {} {}: {} of {} requests failed",
                    mode.name(),
                    r.name,
                    warm.errors,
                    warm.requests
                );
            }
        }
    }
    let w = routes
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .max(8);
    // cells[mode][rate][path]
    let mut cells: Vec<Vec<Vec<Cell>>> = k
        .modes
        .iter()
        .map(|_| {
            k.rates
                .iter()
                .map(|_| routes.iter().map(|_| Cell::new()).collect())
                .collect()
        })
        .collect();
    for _ in 0..k.rounds {
        for (m, body) in bodies.iter().enumerate() {
            for (ri, rate) in k.rates.iter().enumerate() {
                for (p, route) in routes.iter().enumerate() {
                    phase(http, route, &mut cells[m][ri][p], body, *rate, k.phase).await;
                }
            }
        }
    }

    println!(
        "\n{:<6} {:>6} {:<w$} {:>8} {:>6} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "mode",
        "rate/s",
        "path",
        "requests",
        "errors",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "+p50 µs",
        "+p99 µs",
        "+p99 med",
        "cpu µs/r",
        "peak MiB",
        "gen cpu"
    );
    for (m, mode) in k.modes.iter().enumerate() {
        for (ri, rate) in k.rates.iter().enumerate() {
            let row = &cells[m][ri];
            let direct = &row[0];
            for (p, route) in routes.iter().enumerate() {
                let c = &row[p];
                let (add50, add99, med99, cpu, rss) = match route.proxy {
                    None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
                    Some(_) => (
                        format!("{:+}", c.q(0.5) - direct.q(0.5)),
                        format!("{:+}", c.q(0.99) - direct.q(0.99)),
                        format!("{:+}", c.median_added_p99(direct)),
                        format!("{:.1}", c.cpu_per_request_us()),
                        mib(c.peak_rss_kib),
                    ),
                };
                println!(
                    "{:<6} {:>6} {:<w$} {:>8} {:>6} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6.0}%",
                    mode.name(),
                    rate,
                    route.name,
                    c.requests,
                    c.errors,
                    c.q(0.5),
                    c.q(0.99),
                    c.q(0.999),
                    add50,
                    add99,
                    med99,
                    cpu,
                    rss,
                    100.0 * c.gen_cpu / c.wall.max(1e-9),
                );
            }
        }
    }
    println!(
        "(+p50/+p99: added to direct's; +p99 med: the median over rounds of the p99 added \
         in each round, which one stalled phase cannot move; cpu µs/r: the proxy's CPU per request (nginx: its worker); \
         peak MiB: its peak RSS in those phases; gen cpu: the load generator's CPU, % of one core)"
    );

    let find = |name: &str| routes.iter().position(|r| r.name == name);
    if let (Some(s), Some(n)) = (find("sidecar"), find("nginx")) {
        println!("\nsidecar ÷ nginx:");
        for (m, mode) in k.modes.iter().enumerate() {
            for (ri, rate) in k.rates.iter().enumerate() {
                let row = &cells[m][ri];
                let (d, sc, ng) = (&row[0], &row[s], &row[n]);
                let (sa, na) = (sc.q(0.99) - d.q(0.99), ng.q(0.99) - d.q(0.99));
                let (sm, nm) = (sc.median_added_p99(d), ng.median_added_p99(d));
                let ratio = |a: i64, b: i64| {
                    if b > 0 {
                        format!("{:.1}x", a as f64 / b as f64)
                    } else {
                        "n/a (nginx adds ≤ 0)".to_string()
                    }
                };
                println!(
                    "  {:<6} {:>5}/s: CPU/request {:.1} ÷ {:.1} µs = {:.2}x; added p99 {:+} ÷ {:+} µs = {} \
                     (median of rounds {:+} ÷ {:+} µs = {})",
                    mode.name(),
                    rate,
                    sc.cpu_per_request_us(),
                    ng.cpu_per_request_us(),
                    sc.cpu_per_request_us() / ng.cpu_per_request_us().max(1e-9),
                    sa,
                    na,
                    ratio(sa, na),
                    sm,
                    nm,
                    ratio(sm, nm),
                );
            }
        }
    }
    // What an endpoint's API kind or TLS costs over the same sidecar
    // speaking OpenAI over plain HTTP to the same kind of mock.
    if let Some(s) = find("sidecar") {
        for kind in &kinds {
            let Some(x) = find(kind) else { continue };
            println!("\n{kind} ÷ sidecar (openai, plain HTTP):");
            for (m, mode) in k.modes.iter().enumerate() {
                for (ri, rate) in k.rates.iter().enumerate() {
                    let row = &cells[m][ri];
                    let (d, sc, kc) = (&row[0], &row[s], &row[x]);
                    let (ka, sa) = (kc.q(0.99) - d.q(0.99), sc.q(0.99) - d.q(0.99));
                    let (km, sm) = (kc.median_added_p99(d), sc.median_added_p99(d));
                    let ratio = |a: i64, b: i64| {
                        if b > 0 {
                            format!("{:.2}x", a as f64 / b as f64)
                        } else {
                            "n/a (sidecar adds ≤ 0)".to_string()
                        }
                    };
                    println!(
                        "  {:<6} {:>5}/s: CPU/request {:.1} ÷ {:.1} µs = {:.2}x; added p99 {:+} ÷ {:+} µs = {} \
                         (median of rounds {:+} ÷ {:+} µs = {})",
                        mode.name(),
                        rate,
                        kc.cpu_per_request_us(),
                        sc.cpu_per_request_us(),
                        kc.cpu_per_request_us() / sc.cpu_per_request_us().max(1e-9),
                        ka,
                        sa,
                        ratio(ka, sa),
                        km,
                        sm,
                        ratio(km, sm),
                    );
                }
            }
        }
    }
    if let Some(top_i) = k.rates.iter().position(|r| *r == top) {
        for (m, mode) in k.modes.iter().enumerate() {
            let rss = |name: &str| {
                find(name).map_or("-".to_string(), |p| mib(cells[m][top_i][p].peak_rss_kib))
            };
            let others: String = kinds
                .iter()
                .map(|n| format!(", {n} {} MiB", rss(n)))
                .collect();
            println!(
                "peak RSS during the {top} req/s {} phases: sidecar {} MiB{others}, nginx worker {} MiB",
                mode.name(),
                rss("sidecar"),
                rss("nginx")
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- part 2

async fn burst(k: &Knobs, route: &Route) -> anyhow::Result<()> {
    let Some(pid) = route.proxy else {
        return Ok(());
    };
    // A client of its own, keeping no idle connection: once the answers are
    // read, the proxy sees every connection close and may free what it held.
    let http = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(0)
        .build()?;
    let body = Arc::new(Mode::Stream.body());
    let before = rss_kib(pid);
    let watch = RssWatch::start(pid);
    let t0 = Instant::now();
    let held = loadgen::burst(&http, &route.url, body, k.burst_n).await;
    let took = t0.elapsed();
    drop(http);
    let peak = watch.finish().await;
    let errors = held.iter().filter(|h| !h.ok()).count();
    let open = loadgen::max_open(&held);

    // Poll until RSS is back within a tenth of the growth, or time is up.
    let settle_start = Instant::now();
    let target = before + peak.saturating_sub(before) / 10;
    let mut after = rss_kib(pid);
    let mut trace = vec![format!("{} at +0.0 s", mib(after))];
    let mut polls = 0u32;
    while after > target && settle_start.elapsed() < k.settle {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = rss_kib(pid);
        polls += 1;
        // A point a second of the curve, not every poll.
        if polls.is_multiple_of(4) {
            let t = settle_start.elapsed().as_secs_f64();
            trace.push(format!("{} at +{t:.1} s", mib(after)));
        }
    }
    let waited = settle_start.elapsed().as_secs_f64();
    let grown = peak.saturating_sub(before);
    let given = peak.saturating_sub(after);
    println!(
        "{:<8} {} streams sent at once, {} at most open together, {} errors, all done in {:.2} s",
        route.name,
        held.len(),
        open,
        errors,
        took.as_secs_f64()
    );
    println!(
        "{:<8} RSS before {} MiB, peak {} MiB, after {} MiB ({:.1} s later): gave back {} of {} MiB grown ({:.0}%)",
        "",
        mib(before),
        mib(peak),
        mib(after),
        waited,
        mib(given),
        mib(grown),
        100.0 * given as f64 / grown.max(1) as f64
    );
    println!("{:<8} after the burst: {}", "", trace.join(", "));
    if open < k.burst_n * 9 / 10 {
        println!(
            "{:<8} NOTE: fewer than 90% of the streams were open at once; raise \
             SWITCHYARD_BENCH_BURST_TOKENS or _INTER_TOKEN_MS",
            ""
        );
    }
    Ok(())
}

async fn bursts(
    k: &Knobs,
    http: &reqwest::Client,
    mock: SocketAddr,
    routes: &[Route],
) -> anyhow::Result<()> {
    println!(
        "\n== 2. burst: {} streamed requests at once, the mock at {} ms between {} tokens ==",
        k.burst_n, k.burst_inter_token_ms, k.burst_tokens
    );
    let config = |v: serde_json::Value| async move {
        let r = http
            .post(format!("http://{mock}/admin/config"))
            .json(&v)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("mock /admin/config answered {}", r.status());
        }
        anyhow::Ok(())
    };
    config(serde_json::json!({
        "inter_token_ms": k.burst_inter_token_ms,
        "output_tokens": k.burst_tokens,
    }))
    .await?;
    // Idle first, so "before" is the resting size.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut result = Ok(());
    for r in routes.iter().filter(|r| r.proxy.is_some()) {
        result = burst(k, r).await;
        if result.is_err() {
            break;
        }
    }
    config(serde_json::json!({"inter_token_ms": 0, "output_tokens": 16})).await?;
    result
}

// ---------------------------------------------------------------- part 3

/// What one `wrk` run reports (its Lua `done` prints one line of it).
struct WrkRun {
    requests: u64,
    seconds: f64,
    errors: u64,
    p50_us: u64,
    p99_us: u64,
}

const WRK_DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "SWITCHYARD requests=%d duration_us=%d errors=%d p50=%d p99=%d\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

fn wrk_script(dir: &Path, mode: Mode) -> anyhow::Result<PathBuf> {
    let body = String::from_utf8(mode.body())?;
    let script = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
         wrk.body = [==[{body}]==]\n{WRK_DONE}"
    );
    let path = dir.join(format!("wrk-{}.lua", mode.name()));
    std::fs::write(&path, script)?;
    Ok(path)
}

async fn run_wrk(
    wrk: &Path,
    script: &Path,
    url: &str,
    connections: u32,
    secs: u64,
) -> anyhow::Result<WrkRun> {
    let out = tokio::process::Command::new("taskset")
        .arg("-c")
        .arg("1")
        .arg(wrk)
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--timeout",
            "10s",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("SWITCHYARD "))
        .with_context(|| {
            format!(
                "wrk printed no summary: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(WrkRun {
        requests: field("requests"),
        seconds: field("duration_us") as f64 / 1e6,
        errors: field("errors"),
        p50_us: field("p50"),
        p99_us: field("p99"),
    })
}

/// One (mode, path) of the closed loop over every round.
#[derive(Default)]
struct Closed {
    rps: Vec<f64>,
    requests: u64,
    seconds: f64,
    errors: u64,
    p50_us: Vec<u64>,
    p99_us: Vec<u64>,
    proxy_cpu: f64,
    mock_cpu: f64,
    core: [f64; 2],
}

impl Closed {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    /// Requests per second of the proxy's CPU time: its rate if it had a
    /// whole core and nothing else limited it.
    fn per_cpu_second(&self) -> f64 {
        self.requests as f64 / self.proxy_cpu.max(1e-9)
    }
}

fn mean(v: &[u64]) -> u64 {
    v.iter().sum::<u64>() / (v.len().max(1) as u64)
}

async fn closed_loop(
    k: &Knobs,
    bin: &Path,
    dir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    println!(
        "\n== 3. closed loop: proxy alone on core 0 (sidecar --threads 1, nginx worker_processes 1); \
         mock (1 tokio worker) and wrk (1 thread, {} connections) on core 1; {} rounds of {} s ==",
        k.connections, k.closed_rounds, k.closed_secs
    );
    println!(
        "other work on the machine just before: {}",
        background_load(Duration::from_secs(1)).await
    );
    let Some(wrk) = which("wrk") else {
        println!("wrk not installed (scripts/setup.sh installs it): part 3 skipped");
        return Ok(());
    };
    let cpus = cpu_ticks().len();
    if cpus < 2 {
        println!("only {cpus} CPU: part 3 needs two; skipped");
        return Ok(());
    }
    let env_bin = which("env").context("no env(1)")?;
    let mut mock_cmd = args(&["TOKIO_WORKER_THREADS=1", "taskset", "-c", "1"]);
    mock_cmd.push(
        bin.to_str()
            .context("binary path is not UTF-8")?
            .to_string(),
    );
    mock_cmd.extend(mock_args(&[]));
    let mut sidecar_args = vec!["--threads", "1"];
    sidecar_args.extend(k.sidecar_args.split_whitespace());
    let stack = start_stack(bin, dir, (&env_bin, mock_cmd), &sidecar_args, http).await?;
    let (mock_pid, control_pid, sidecar_pid) = (
        stack.mock.pid().context("mock exited")?,
        stack.control.pid().context("control plane exited")?,
        stack.sidecar.pid().context("sidecar exited")?,
    );
    pin(control_pid, 1)?;
    pin(sidecar_pid, 0)?;
    let nginx = Nginx::start(dir, "nginx", stack.mock_addr, http).await?;
    let mut routes = vec![
        Route {
            name: "direct",
            url: format!("http://{}{PATH}", stack.mock_addr),
            proxy: None,
        },
        Route {
            name: "sidecar",
            url: format!("http://{}{PATH}", stack.sidecar_addr),
            proxy: Some(sidecar_pid),
        },
    ];
    if let Some(n) = &nginx {
        pin(n.master, 0)?;
        for w in &n.workers {
            pin(*w, 0)?;
        }
        routes.push(Route {
            name: "nginx",
            url: format!("http://{}{PATH}", n.addr),
            proxy: n.workers.first().copied(),
        });
    } else {
        println!("nginx not installed: sidecar and direct only");
    }
    println!(
        "CPUs allowed: mock {}, sidecar {}, nginx {}, control plane {}",
        allowed_cpus(mock_pid),
        allowed_cpus(sidecar_pid),
        nginx
            .as_ref()
            .and_then(|n| n.workers.first())
            .map_or("-".to_string(), |w| allowed_cpus(*w)),
        allowed_cpus(control_pid),
    );

    let result = async {
        let scripts: Vec<PathBuf> = k
            .modes
            .iter()
            .map(|m| wrk_script(dir, *m))
            .collect::<anyhow::Result<_>>()?;
        for s in &scripts {
            for r in &routes {
                run_wrk(&wrk, s, &r.url, k.connections, 1).await?;
            }
        }
        let mut budget = k.quiet_wait;
        let (mut waited, mut noisy_starts) = (0.0, 0);
        let mut cells: Vec<Vec<Closed>> = k
            .modes
            .iter()
            .map(|_| routes.iter().map(|_| Closed::default()).collect())
            .collect();
        for _ in 0..k.closed_rounds {
            for (m, script) in scripts.iter().enumerate() {
                for (p, r) in routes.iter().enumerate() {
                    let proxy: Vec<u32> = r.proxy.into_iter().collect();
                    let (w, quiet) = wait_quiet(&mut budget).await;
                    waited += w;
                    if !quiet {
                        noisy_starts += 1;
                    }
                    let (t0, c0, m0) = (cpu_ticks(), cpu_sum(&proxy), cpu_seconds(mock_pid));
                    let run = run_wrk(&wrk, script, &r.url, k.connections, k.closed_secs).await?;
                    let (t1, c1, m1) = (cpu_ticks(), cpu_sum(&proxy), cpu_seconds(mock_pid));
                    let c = &mut cells[m][p];
                    c.rps.push(run.requests as f64 / run.seconds.max(1e-9));
                    c.requests += run.requests;
                    c.seconds += run.seconds;
                    c.errors += run.errors;
                    c.p50_us.push(run.p50_us);
                    c.p99_us.push(run.p99_us);
                    c.proxy_cpu += c1 - c0;
                    c.mock_cpu += m1 - m0;
                    for (i, core) in c.core.iter_mut().enumerate() {
                        *core += busy_percent(&t0, &t1, i) * run.seconds;
                    }
                }
            }
        }
        let runs = k.closed_rounds as usize * scripts.len() * routes.len();
        println!(
            "waited {waited:.1} s in all for a quiet machine before the runs; \
             {noisy_starts} of {runs} started without one"
        );
        anyhow::Ok(cells)
    }
    .await;
    if let Some(n) = nginx {
        n.stop().await?;
    }
    drop(stack);
    let cells = result?;

    println!(
        "\n{:<6} {:<8} {:>9} {:<19} {:>6} {:>7} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7}",
        "mode",
        "path",
        "req/s",
        "per round",
        "errors",
        "p50 µs",
        "p99 µs",
        "cpu µs/r",
        "proxy%",
        "mock%",
        "core0%",
        "core1%"
    );
    for (m, mode) in k.modes.iter().enumerate() {
        for (p, r) in routes.iter().enumerate() {
            let c = &cells[m][p];
            let per_round = c
                .rps
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(" ");
            let (cpu, util) = match r.proxy {
                None => ("-".to_string(), "-".to_string()),
                Some(_) => (
                    format!("{:.1}", c.proxy_cpu * 1e6 / c.requests.max(1) as f64),
                    format!("{:.0}", 100.0 * c.proxy_cpu / c.seconds.max(1e-9)),
                ),
            };
            println!(
                "{:<6} {:<8} {:>9.0} {:<19} {:>6} {:>7} {:>8} {:>9} {:>7} {:>7.0} {:>7.0} {:>7.0}",
                mode.name(),
                r.name,
                c.rps(),
                per_round,
                c.errors,
                mean(&c.p50_us),
                mean(&c.p99_us),
                cpu,
                util,
                100.0 * c.mock_cpu / c.seconds.max(1e-9),
                c.core[0] / c.seconds.max(1e-9),
                c.core[1] / c.seconds.max(1e-9),
            );
        }
    }
    println!(
        "(p50/p99: wrk's, means over rounds; proxy%/mock%: that process's CPU as % of one core; \
         core0%/core1%: everything that ran on each core, other builds included)"
    );
    let find = |name: &str| routes.iter().position(|r| r.name == name);
    for (m, mode) in k.modes.iter().enumerate() {
        let row = &cells[m];
        let direct = row[0].rps();
        for (p, r) in routes.iter().enumerate().skip(1) {
            let c = &row[p];
            let util = 100.0 * c.proxy_cpu / c.seconds.max(1e-9);
            let core1 = c.core[1] / c.seconds.max(1e-9);
            let ratio = direct / c.rps().max(1e-9);
            let other = c.core[0] / c.seconds.max(1e-9) - util;
            let noise = if other > 15.0 {
                format!("NOISY: other processes took ~{other:.0}% of core 0; ")
            } else {
                String::new()
            };
            let verdict = if util >= 85.0 {
                let close = if ratio < 1.5 {
                    format!("; but direct is only {ratio:.2}x its rate: core 1 nearly limits too")
                } else {
                    format!("; direct ran {ratio:.1}x faster")
                };
                format!("the proxy is the bottleneck ({util:.0}% of core 0){close}")
            } else if other > 15.0 {
                format!(
                    "the proxy got only {util:.0}% of core 0 (core 1 {core1:.0}% busy, direct \
                     {ratio:.2}x its rate): its req/s is a lower bound; its CPU per request \
                     would allow ~{:.0} req/s on a whole core",
                    c.per_cpu_second()
                )
            } else if core1 >= 90.0 || ratio < 1.5 {
                format!(
                    "MOCK + WRK (core 1, {core1:.0}% busy) ARE THE BOTTLENECK, not the proxy \
                     ({util:.0}% of core 0; direct only {ratio:.2}x its rate): its req/s is a \
                     lower bound; its CPU per request would allow ~{:.0} req/s on a whole core",
                    c.per_cpu_second()
                )
            } else {
                format!(
                    "neither core is saturated (proxy {util:.0}% of core 0, core 1 {core1:.0}%): \
                     latency or connections limit it"
                )
            };
            println!("  {:<6} {:<8} {noise}{verdict}", mode.name(), r.name);
        }
        if let (Some(s), Some(n)) = (find("sidecar"), find("nginx")) {
            let (sc, ng) = (&row[s], &row[n]);
            println!(
                "  {:<6} sidecar ÷ nginx: measured {:.0} ÷ {:.0} req/s = {:.2}x; \
                 CPU-bound (requests per CPU second) {:.0} ÷ {:.0} = {:.2}x",
                mode.name(),
                sc.rps(),
                ng.rps(),
                sc.rps() / ng.rps().max(1e-9),
                sc.per_cpu_second(),
                ng.per_cpu_second(),
                sc.per_cpu_second() / ng.per_cpu_second().max(1e-9),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- main

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let k = Knobs::from_env()?;
    let started = Instant::now();
    let bin = Path::new(env!("CARGO_BIN_EXE_switchyard"));
    let dir = cluster::run_dir("bench")?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .http1_only()
        .build()?;
    println!(
        "load bench: {} CPUs, sidecar args {:?}, logs in {}",
        cpu_ticks().len(),
        k.sidecar_args,
        dir.display()
    );

    println!(
        "other work on the machine before the bench: {}",
        background_load(Duration::from_secs(1)).await
    );
    if k.open || k.burst {
        let extra: Vec<&str> = k.sidecar_args.split_whitespace().collect();
        let stack =
            start_stack(bin, &dir.join("open"), (bin, mock_args(&[])), &extra, &http).await?;
        let nginx = Nginx::start(&dir, "nginx-open", stack.mock_addr, &http).await?;
        let mut routes = vec![
            Route {
                name: "direct",
                url: format!("http://{}{PATH}", stack.mock_addr),
                proxy: None,
            },
            Route {
                name: "sidecar",
                url: format!("http://{}{PATH}", stack.sidecar_addr),
                proxy: stack.sidecar.pid(),
            },
        ];
        match &nginx {
            Some(n) => routes.push(Route {
                name: "nginx",
                url: format!("http://{}{PATH}", n.addr),
                proxy: n.workers.first().copied(),
            }),
            None => println!("nginx not installed: comparing sidecar and direct only"),
        }
        // Part 1 only: part 2 reconfigures the first stack's mock alone.
        let kinds = if k.open && k.kinds {
            Some(Kinds::start(bin, &dir.join("kinds"), &extra, &http).await?)
        } else {
            None
        };
        let mut open_routes = routes.clone();
        if let Some(kinds) = &kinds {
            // Beside `sidecar`, their reference, in every round.
            open_routes.splice(2..2, kinds.routes());
        }
        let mut result = Ok(());
        if k.open {
            result = open_loop(&k, &http, &open_routes).await;
        }
        drop(kinds);
        if k.burst && result.is_ok() {
            result = bursts(&k, &http, stack.mock_addr, &routes).await;
        }
        if let Some(n) = nginx {
            n.stop().await?;
        }
        drop(stack);
        result?;
    }
    if k.closed {
        closed_loop(&k, bin, &dir.join("closed"), &http).await?;
    }
    println!("\nbench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
