//! Restarts without dropping a request, end to end with real processes: a
//! sidecar told to go (SIGTERM) lets what is in flight finish and exits 0;
//! a new sidecar takes the listening socket over from a running one under
//! load without a request failing; a control plane stopped with SIGTERM
//! ends the sidecar's stream cleanly, and its successor on the same address
//! is back in the sidecar's hands at once.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Mock, Stack};
use futures::StreamExt;
use switchyard::cluster::Proc;
use tokio::time::Instant;

/// Tokens per answer: the mock's default.
const TOKENS: u32 = 16;

/// The content the mock named `name` answers with: tokens `name:0`,
/// ` name:1`, ... (as the mock writes them).
fn expected_content(name: &str) -> String {
    switchyard_mock::answer_tokens(name, TOKENS).concat()
}

/// Sends one chat completion to `base` and reads the whole answer; a
/// transport error (refused, reset, cut body) is an `Err` naming it.
async fn ask(http: &reqwest::Client, base: SocketAddr, stream: bool) -> Result<String, String> {
    let body = serde_json::json!({
        "model": common::MODEL,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
    });
    let r = http
        .post(format!("http://{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("sending: {e:?}"))?;
    read_answer(r, stream).await
}

/// Reads a response to the end and checks it is a whole, well-formed
/// answer of the mock `onprem-a`.
async fn read_answer(r: reqwest::Response, stream: bool) -> Result<String, String> {
    let status = r.status().as_u16();
    let mut body = String::new();
    let mut chunks = r.bytes_stream();
    while let Some(c) = chunks.next().await {
        let c = c.map_err(|e| format!("reading the body: {e:?}; so far: {body}"))?;
        body.push_str(&String::from_utf8_lossy(&c));
    }
    if status != 200 {
        return Err(format!("status {status}: {body}"));
    }
    let want = expected_content("onprem-a");
    if stream {
        check_stream(&body, &want).map_err(|e| format!("{e}: {body}"))?;
    } else {
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))?;
        let content = v["choices"][0]["message"]["content"].as_str();
        let finish = v["choices"][0]["finish_reason"].as_str();
        if content != Some(want.as_str()) || finish != Some("stop") {
            return Err(format!("not the whole answer: {body}"));
        }
    }
    Ok(body)
}

/// A streamed answer: every event JSON, the deltas make up `want`, one
/// finishes with `stop`, and `[DONE]` closes it.
fn check_stream(body: &str, want: &str) -> Result<(), String> {
    let events: Vec<&str> = body
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if events.last() != Some(&"data: [DONE]") {
        return Err("the stream does not end with [DONE]".into());
    }
    let mut content = String::new();
    let mut stopped = false;
    for e in &events[..events.len() - 1] {
        let json = e
            .strip_prefix("data: ")
            .ok_or_else(|| format!("not a data event: {e:?}"))?;
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|x| format!("event not JSON ({x}): {e:?}"))?;
        if v.get("error").is_some() {
            return Err(format!("error event: {e}"));
        }
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
        stopped |= v["choices"][0]["finish_reason"] == "stop";
    }
    if content != want || !stopped {
        return Err(format!("not the whole answer (content {content:?})"));
    }
    Ok(())
}

/// Polls `check` every 20 ms until it holds; fails the test with `what`
/// when `within` passes first.
async fn until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < end, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn mock_in_flight(mock: &Mock, http: &reqwest::Client) -> u64 {
    mock.stats(http).await["in_flight"]
        .as_u64()
        .expect("in_flight")
}

/// The sidecar's `/readyz` text, when it answers 200.
async fn ready_text(http: &reqwest::Client, addr: SocketAddr) -> Option<String> {
    let (status, text) = common::readyz(http, addr).await;
    (status == 200).then_some(text)
}

/// The pid in the sidecar's `/readyz` answer, when it answers 200.
async fn ready_pid(http: &reqwest::Client, addr: SocketAddr) -> Option<u32> {
    let body = ready_text(http, addr).await?;
    body.trim_end().rsplit_once(", pid ")?.1.parse().ok()
}

/// The table version in the sidecar's `/readyz` answer, when it is ready.
async fn ready_version(http: &reqwest::Client, addr: SocketAddr) -> Option<u64> {
    let body = ready_text(http, addr).await?;
    body.strip_prefix("ready: table version ")?
        .split(',')
        .next()?
        .parse()
        .ok()
}

async fn wait_exit(proc: &mut Proc, within: Duration) -> std::process::ExitStatus {
    match tokio::time::timeout(within, proc.wait()).await {
        Ok(status) => status.expect("wait"),
        Err(_) => panic!(
            "{} did not exit within {within:?}\n--- log:\n{}",
            proc.name,
            common::log_tail(&proc.log_text())
        ),
    }
}

/// A fresh unix socket path, short enough for `sun_path`.
fn upgrade_sock(label: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "sy-{label}-{}-{}.sock",
        std::process::id(),
        fastrand::u32(..)
    ))
}

/// SIGTERM with streamed and whole answers in flight: each one completes,
/// whole and well formed; new connections are refused from then on; the
/// sidecar exits 0 once they are done, within its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_and_streams_in_flight_finish_then_exits_0() {
    const EACH: usize = 6;
    let mut stack = Stack::start(
        "drain",
        &[(
            "onprem-a",
            "onprem",
            &["--ttft-ms", "600", "--inter-token-ms", "120"],
        )],
        &[],
        &["--grace-ms", "20000"],
    )
    .await;
    let addr = stack.sidecar_addr;
    let mut asks = Vec::new();
    for i in 0..2 * EACH {
        let http = stack.http.clone();
        let stream = i % 2 == 0;
        asks.push((
            stream,
            tokio::spawn(async move { ask(&http, addr, stream).await }),
        ));
    }
    let mock = stack.mock("onprem-a");
    until(
        "every request in flight at the mock",
        Duration::from_secs(20),
        async || mock_in_flight(mock, &stack.http).await == 2 * EACH as u64,
    )
    .await;

    stack.sidecar.signal(libc::SIGTERM);
    until(
        "new connections refused",
        Duration::from_secs(10),
        async || {
            matches!(tokio::net::TcpStream::connect(addr).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        },
    )
    .await;

    for (stream, a) in asks {
        let answer = a.await.expect("task");
        assert!(
            answer.is_ok(),
            "a {} request in flight at SIGTERM: {answer:?}\n--- sidecar log:\n{}",
            if stream { "streamed" } else { "whole" },
            common::log_tail(&stack.sidecar.log_text())
        );
    }
    let status = wait_exit(&mut stack.sidecar, Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status:?}");
    let log = stack.sidecar.log_text();
    assert!(
        log.contains("drained: every request in flight finished"),
        "the sidecar exits because it drained, not at the end of its grace:\n{}",
        common::log_tail(&log)
    );
}

/// What the load loop saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failures: parking_lot::Mutex<Vec<String>>,
}

/// Requests in a loop until `stop`, whole or streamed.
async fn hammer(
    http: reqwest::Client,
    addr: SocketAddr,
    stream: bool,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    while !stop.load(Ordering::Relaxed) {
        match ask(&http, addr, stream).await {
            Ok(_) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tally.failures.lock().push(e),
        }
    }
}

async fn sock_exists(path: &Path) -> bool {
    tokio::fs::try_exists(path).await.unwrap_or(false)
}

/// A second sidecar takes the listening socket over (pingora's graceful
/// upgrade: started with `--upgrade`, then SIGQUIT to the first) while
/// clients hammer it: not one connection is refused and not one request
/// fails, the long streams running on the first sidecar complete, the
/// first exits 0, and the second serves on.
///
/// The hammering clients open a connection per request. What this checks
/// is the socket: it never stops accepting. A client reusing an HTTP/1.1
/// keep-alive connection whose last answer went out before the signal
/// (without `Connection: close`) can still meet the old sidecar closing it
/// as it sends: HTTP/1.1 has no way to take such a connection back, and
/// clients retry that case (the OpenAI SDKs do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sidecar_takes_over_the_socket_under_load_without_a_failed_request() {
    // One worker streams, the others send whole requests back to back.
    const WORKERS: usize = 4;
    const LONG: usize = 4;
    let sock = upgrade_sock("handoff");
    let sock_arg = sock.display().to_string();
    // Streams of about 16 x 400 ms, so those started before the handoff
    // outlast the 5 s the old sidecar keeps accepting and run into its drain.
    let mut stack = Stack::start(
        "handoff",
        &[("onprem-a", "onprem", &["--inter-token-ms", "400"])],
        &[],
        &["--grace-ms", "20000", "--upgrade-sock", &sock_arg],
    )
    .await;
    let addr = stack.sidecar_addr;
    let old_pid = stack.sidecar.pid().expect("pid");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let (http, stream) = (fresh.clone(), i == 0);
        let (stop, tally) = (stop.clone(), tally.clone());
        workers.push(tokio::spawn(hammer(http, addr, stream, stop, tally)));
    }
    until("the load running", Duration::from_secs(20), async || {
        tally.ok.load(Ordering::Relaxed) >= 100
    })
    .await;

    let new_args = common::args(&[
        "sidecar",
        "--control",
        &stack.control_addr.to_string(),
        "--listen",
        &addr.to_string(),
        "--id",
        "handoff-new",
        "--grace-ms",
        "20000",
        "--upgrade",
        "--upgrade-sock",
        &sock_arg,
    ]);
    let mut new = Proc::spawn(common::bin(), &new_args, &stack.dir, "sidecar-new").expect("spawn");
    // The socket appears once the new sidecar has its table and waits for
    // the listening socket.
    until(
        "the new sidecar waiting for the socket",
        Duration::from_secs(20),
        async || sock_exists(&sock).await,
    )
    .await;
    assert!(!new.exited(), "{}", new.log_text());

    // Streams that start on the old sidecar, before the handoff.
    let mut long = Vec::new();
    for _ in 0..LONG {
        let http = stack.http.clone();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        long.push(tokio::spawn(async move {
            let body = serde_json::json!({
                "model": common::MODEL, "stream": true,
                "messages": [{"role": "user", "content": "hello"}],
            });
            let r = http
                .post(format!("http://{addr}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .map_err(|e| format!("sending: {e:?}"));
            let _ = started_tx.send(());
            read_answer(r?, true).await
        }));
        started.await.expect("the long stream started");
    }

    stack.sidecar.signal(libc::SIGQUIT);
    let old_status = wait_exit(&mut stack.sidecar, Duration::from_secs(40)).await;
    assert!(
        old_status.success(),
        "the old sidecar exits 0: {old_status:?}\n{}",
        common::log_tail(&stack.sidecar.log_text())
    );
    // Only the new sidecar is left on the port; the load goes on there.
    let new_pid = new.pid().expect("new pid");
    assert_ne!(new_pid, old_pid);
    until(
        "the new sidecar answering",
        Duration::from_secs(10),
        async || ready_pid(&stack.http, addr).await == Some(new_pid),
    )
    .await;
    let before = tally.ok.load(Ordering::Relaxed);
    until(
        "the load served by the new sidecar",
        Duration::from_secs(20),
        async || tally.ok.load(Ordering::Relaxed) >= before + 100,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    for l in long {
        let answer = l.await.expect("task");
        assert!(
            answer.is_ok(),
            "a stream running on the old sidecar: {answer:?}\n--- old sidecar log:\n{}",
            common::log_tail(&stack.sidecar.log_text())
        );
    }
    let failures = tally.failures.lock();
    eprintln!(
        "handoff: {} requests answered, {} failed",
        tally.ok.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the handoff, first: {:?}\n--- old log:\n{}\n--- new log:\n{}",
        failures.len(),
        failures.len() as u64 + tally.ok.load(Ordering::Relaxed),
        failures.first(),
        common::log_tail(&stack.sidecar.log_text()),
        common::log_tail(&new.log_text())
    );
    assert!(!new.exited(), "the new sidecar serves on");
}

/// The control plane stopped with SIGTERM ends the sidecar's Watch stream
/// cleanly and exits 0; the sidecar reconnects at once, and a control plane
/// started again on the same address pushes it a table it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restarted_on_sigterm_is_back_in_the_sidecars_hands_at_once() {
    let mut stack = Stack::start("cprestart", &[("onprem-a", "onprem", &[])], &[], &[]).await;
    let first = stack.wait_acked_above(0).await;
    let addr = stack.sidecar_addr;

    stack.control.signal(libc::SIGTERM);
    let status = wait_exit(&mut stack.control, Duration::from_secs(10)).await;
    assert!(status.success(), "control plane exit status {status:?}");
    until(
        "the sidecar sees the stream closed cleanly",
        Duration::from_secs(10),
        async || {
            stack
                .sidecar
                .log_text()
                .contains("the control plane closed the Watch stream")
        },
    )
    .await;
    // "At once": the clean close resets the backoff to its first step
    // (50–100 ms), where a broken stream would wait up to 5 s.
    let log = strip_ansi(&stack.sidecar.log_text());
    let line = log
        .lines()
        .find(|l| l.contains("the control plane closed the Watch stream"))
        .expect("the clean close is logged");
    let retry_ms: u64 = line
        .split("retry_in_ms=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no retry_in_ms in {line:?}"));
    assert!(retry_ms <= 100, "{line}");
    // The sidecar keeps routing on its table meanwhile.
    assert_eq!(ready_version(&stack.http, addr).await, Some(first));
    let (status_code, _, body) = stack.chat(false).await;
    assert_eq!(status_code, 200, "{body}");

    let listen = stack.control_addr.to_string();
    let (control, again) =
        common::start_control_with(&stack.dir, &stack.policy, &listen, &stack.control_config).await;
    stack.control = control;
    assert_eq!(again, stack.control_addr);
    until(
        "the sidecar applies the new control plane's table",
        Duration::from_secs(10),
        async || {
            ready_version(&stack.http, addr)
                .await
                .is_some_and(|v| v > first)
        },
    )
    .await;
    let acked = stack.wait_acked_above(first).await;
    assert!(acked > first);
}

/// A log without its terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
