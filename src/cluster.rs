//! Starting and stopping Switchyard processes (control plane, sidecar,
//! mocks) on loopback, for the demo, the end-to-end tests and the load bench.
//! Every child dies with its parent (SIGKILL on parent death) and is killed
//! when its handle drops, so no run leaves a process behind.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running child process.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `bin args` in the working directory `dir` (so whatever it
    /// keeps by default stays in the run's directory), with stderr going
    /// to `dir/name.log`.
    pub fn spawn(bin: &Path, args: &[String], dir: &Path, name: &str) -> anyhow::Result<Proc> {
        Self::spawn_inner(bin, args, dir, name, None)
    }

    /// Spawns like [`Proc::spawn`], with the child moved into the cgroup v2
    /// directory `cgroup` before it executes, so every socket it opens, and
    /// the cgroup it finds itself in, are that one's.
    pub fn spawn_in_cgroup(
        bin: &Path,
        args: &[String],
        dir: &Path,
        name: &str,
        cgroup: &Path,
    ) -> anyhow::Result<Proc> {
        Self::spawn_inner(bin, args, dir, name, Some(cgroup))
    }

    fn spawn_inner(
        bin: &Path,
        args: &[String],
        dir: &Path,
        name: &str,
        cgroup: Option<&Path>,
    ) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).with_context(|| format!("creating {log:?}"))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        if let Some(cgroup) = cgroup {
            join_cgroup_before_exec(&mut cmd, cgroup)?;
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {bin:?} {args:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Spawns a process that prints `listening on ADDR` once it listens, and
    /// returns that address.
    pub async fn spawn_announced(
        bin: &Path,
        args: &[String],
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<(Proc, SocketAddr)> {
        let mut p = Proc::spawn(bin, args, dir, name)?;
        let addr = p.read_announce().await?;
        Ok((p, addr))
    }

    async fn read_announce(&mut self) -> anyhow::Result<SocketAddr> {
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{}: no stdout", self.name))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .map_err(|_| anyhow!("{} did not announce its address in 60 s", self.name))??;
        let Some(line) = line else {
            bail!(
                "{} exited before listening; see {:?}: {}",
                self.name,
                self.log,
                self.log_text()
            );
        };
        let addr = line
            .strip_prefix("listening on ")
            .ok_or_else(|| anyhow!("{}: unexpected first line {line:?}", self.name))?
            .parse()?;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (SIGTERM, SIGKILL, ...) without waiting.
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.child.id() {
            signal(pid, sig);
        }
    }

    /// SIGTERM, then SIGKILL if the process has not exited within `grace`.
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        self.signal(libc::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }

    /// Waits for the process to exit and reaps it.
    pub async fn wait(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        Ok(self.child.wait().await?)
    }

    /// Kills at once and reaps.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the calling (child)
    // process; nothing else runs between fork and exec here.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn join_cgroup_before_exec(cmd: &mut Command, cgroup: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // Prepared before the fork: the child may not allocate.
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    // SAFETY: between fork and exec the closure only makes async-signal-safe
    // calls (open, write, close, reading errno) on memory prepared before
    // the fork; it touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(())
}

#[allow(unsafe_code)]
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// A free loopback port, for processes (pingora) that cannot report the
/// port they bound to. Another process could take it in between; loopback
/// ports are plentiful enough that this does not happen in practice.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `url` until it answers 200 or `within` passes.
pub async fn wait_ok(client: &reqwest::Client, url: &str, within: Duration) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + within;
    let mut last = String::new();
    while tokio::time::Instant::now() < end {
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("status {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} not ready within {within:?}: {last}")
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Starts a control plane on `listen` (port 0: any free one) serving
/// `policy`, with `extra` flags; returns it and the address it bound.
pub async fn start_control(
    bin: &Path,
    dir: &Path,
    policy: &Path,
    listen: &str,
    extra: &[&str],
) -> anyhow::Result<(Proc, SocketAddr)> {
    let policy = policy.to_str().context("policy path is not UTF-8")?;
    let mut a = strings(&["control", "--listen", listen, "--policy", policy]);
    if !extra.iter().any(|x| *x == "--state-dir" || *x == "--db") {
        let state = dir.join("state");
        a.extend(["--state-dir".to_string(), state.display().to_string()]);
    }
    a.extend(strings(extra));
    Proc::spawn_announced(bin, &a, dir, "control").await
}

/// Starts a sidecar on a free loopback port, watching `control`, with
/// `extra` flags, and waits until it applied a table.
pub async fn start_sidecar(
    bin: &Path,
    dir: &Path,
    control: SocketAddr,
    extra: &[&str],
    http: &reqwest::Client,
) -> anyhow::Result<(Proc, SocketAddr)> {
    start_sidecar_in(bin, dir, control, extra, http, None).await
}

/// Like [`start_sidecar`], with the sidecar moved into the cgroup v2
/// directory `cgroup` (see [`Proc::spawn_in_cgroup`]) when one is given.
///
/// The port comes from [`free_port`], so another process may bind it first.
/// Then the sidecar exits, or a sidecar of another run answers on it; the
/// pid in `/readyz` tells the two apart, and another port is tried.
pub async fn start_sidecar_in(
    bin: &Path,
    dir: &Path,
    control: SocketAddr,
    extra: &[&str],
    http: &reqwest::Client,
    cgroup: Option<&Path>,
) -> anyhow::Result<(Proc, SocketAddr)> {
    const PORTS: usize = 5;
    let mut last_log = String::new();
    for _ in 0..PORTS {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let mut a = strings(&[
            "sidecar",
            "--control",
            &control.to_string(),
            "--listen",
            &addr.to_string(),
        ]);
        a.extend(strings(extra));
        default_state_dir(&mut a, dir);
        let mut proc = match cgroup {
            Some(cg) => Proc::spawn_in_cgroup(bin, &a, dir, "sidecar", cg)?,
            None => Proc::spawn(bin, &a, dir, "sidecar")?,
        };
        match wait_own_ready(&mut proc, http, addr, Duration::from_secs(60)).await {
            Start::Ready => return Ok((proc, addr)),
            Start::Taken => {
                proc.kill().await?;
                last_log = proc.log_text();
            }
            Start::Exited => {
                last_log = proc.log_text();
                if !last_log.contains("cannot listen") {
                    bail!("sidecar exited before it was ready\n--- sidecar log:\n{last_log}");
                }
            }
            Start::NotReady(e) => {
                bail!(
                    "sidecar not ready: {e}\n--- sidecar log:\n{}",
                    proc.log_text()
                )
            }
        }
    }
    bail!("no free port held for the sidecar in {PORTS} tries\n--- last sidecar log:\n{last_log}")
}

/// Starts a sidecar named `name` (its log is `dir/name.log`) with `args`
/// (all but `--listen`) on `addr`, and waits until it applied a table. The
/// address is given, not chosen: a restarted sidecar keeps its address, and
/// with it the table it saved.
pub async fn start_sidecar_on(
    bin: &Path,
    dir: &Path,
    name: &str,
    addr: SocketAddr,
    args: &[&str],
    http: &reqwest::Client,
) -> anyhow::Result<Proc> {
    let mut a = strings(&["sidecar", "--listen", &addr.to_string()]);
    a.extend(strings(args));
    default_state_dir(&mut a, dir);
    let mut proc = Proc::spawn(bin, &a, dir, name)?;
    match wait_own_ready(&mut proc, http, addr, Duration::from_secs(60)).await {
        Start::Ready => Ok(proc),
        Start::Taken => bail!("another process answers on {addr}"),
        Start::Exited => bail!(
            "{name} exited before it was ready\n--- log:\n{}",
            proc.log_text()
        ),
        Start::NotReady(e) => bail!("{name} not ready: {e}\n--- log:\n{}", proc.log_text()),
    }
}

/// Where a test's sidecars save their tables, unless the caller says:
/// the run directory, never the working directory of the test.
pub fn sidecar_state_dir(dir: &Path) -> PathBuf {
    dir.join("sidecar-state")
}

fn default_state_dir(a: &mut Vec<String>, dir: &Path) {
    if !a.iter().any(|x| x == "--state-dir") {
        a.extend([
            "--state-dir".to_string(),
            sidecar_state_dir(dir).display().to_string(),
        ]);
    }
}

enum Start {
    Ready,
    /// Another process answers on the port.
    Taken,
    Exited,
    NotReady(String),
}

/// Polls the sidecar's `/readyz` until it applied a table, telling by the
/// pid in the answer whether `proc` or another process holds the port.
async fn wait_own_ready(
    proc: &mut Proc,
    http: &reqwest::Client,
    addr: SocketAddr,
    within: Duration,
) -> Start {
    let url = format!("http://{addr}/readyz");
    let own = proc.pid().unwrap_or(0);
    let end = tokio::time::Instant::now() + within;
    let mut last = String::new();
    while tokio::time::Instant::now() < end {
        if proc.exited() {
            return Start::Exited;
        }
        match http.get(&url).send().await {
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                let pid = body
                    .trim_end()
                    .rsplit_once(", pid ")
                    .and_then(|(_, p)| p.parse::<u32>().ok());
                if pid != Some(own) {
                    return Start::Taken;
                }
                if status.is_success() {
                    return Start::Ready;
                }
                last = format!("status {status}: {}", body.trim());
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Start::NotReady(format!("{url} not ready within {within:?}: {last}"))
}

/// A fresh directory for one run's policy and logs.
pub fn run_dir(label: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-{label}-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// One endpoint line of a policy, for tests and the demo.
pub struct PolicyEndpoint<'a> {
    pub name: &'a str,
    pub addr: SocketAddr,
    pub tier: &'a str,
    pub model: &'a str,
    pub price_in: f64,
    pub price_out: f64,
}

/// Renders a policy with one class (`standard`, the default) whose weights
/// are given by endpoint name.
pub fn policy_yaml(endpoints: &[PolicyEndpoint<'_>], weights: &[(&str, f64)]) -> String {
    let mut s =
        String::from("  - name: standard\n    ttft_timeout_ms: 5000\n    deadline_ms: 30000\n");
    if !weights.is_empty() {
        s.push_str("    weights:\n");
        for (name, w) in weights {
            s.push_str(&format!("      {name}: {w}\n"));
        }
    }
    policy_with_classes(endpoints, "standard", &s)
}

/// Renders a policy with the given endpoints and a `classes:` list written
/// out in YAML (items indented by two spaces).
pub fn policy_with_classes(
    endpoints: &[PolicyEndpoint<'_>],
    default_class: &str,
    classes: &str,
) -> String {
    let mut s = format!("default_class: {default_class}\nendpoints:\n");
    for e in endpoints {
        s.push_str(&format!(
            "  - name: {}\n    url: http://{}\n    tier: {}\n    models: [{}]\n    price: {{ input_per_mtok: {}, output_per_mtok: {} }}\n",
            e.name, e.addr, e.tier, e.model, e.price_in, e.price_out
        ));
    }
    s.push_str("classes:\n");
    s.push_str(classes);
    s
}

/// Writes a file by renaming a sibling into place, as editors do, so a
/// reader never sees half of it.
pub fn write_atomic(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
