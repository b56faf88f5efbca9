//! Fail static, end to end with real processes: a sidecar that restarts
//! while its control plane is down serves from the table it saved; a
//! damaged saved table is reported and never fatal; weights expire past
//! their TTL without the control plane, and are trusted again when it
//! returns; `switchyard sidecar --policy` runs with no control plane at all.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{bin, Stack, MODEL};
use switchyard::cluster::{self, Proc};
use switchyard_dataplane::persist;
use tokio::time::Instant;

/// Polls `/readyz` every 50 ms until its text contains `want`; fails with
/// the last answer and the sidecar's log after `within`.
async fn ready_says(
    http: &reqwest::Client,
    addr: SocketAddr,
    sidecar: &Proc,
    want: &str,
    within: Duration,
) -> String {
    let end = Instant::now() + within;
    loop {
        let (_, text) = common::readyz(http, addr).await;
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < end,
            "/readyz never said {want:?} within {within:?}; last: {text}\n--- sidecar log:\n{}",
            common::log_tail(&sidecar.log_text())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `proc`'s log until it contains `want`.
async fn log_says(proc: &Proc, want: &str, within: Duration) {
    let end = Instant::now() + within;
    while !proc.log_text().contains(want) {
        assert!(
            Instant::now() < end,
            "{} never logged {want:?}:\n{}",
            proc.name,
            common::log_tail(&proc.log_text())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_restarted_while_its_control_plane_is_down_serves_the_saved_table() {
    let mut stack = Stack::start("failstatic", &[("onprem-a", "onprem", &[])], &[], &[]).await;
    let version = stack.wait_acked_above(0).await;
    assert_eq!(
        stack
            .metric("switchyard_table_source", &[("source", "control-plane")])
            .await,
        1.0
    );

    // The control plane dies, then the sidecar restarts (same address).
    stack.control.kill().await.unwrap();
    stack.sidecar.kill().await.unwrap();
    let control = stack.control_addr.to_string();
    stack.sidecar = cluster::start_sidecar_on(
        bin(),
        &stack.dir,
        "sidecar-restarted",
        stack.sidecar_addr,
        &["--control", &control, "--id", "failstatic"],
        &stack.http,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (status, text) = common::readyz(&stack.http, stack.sidecar_addr).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains(&format!("table version {version}, from persisted")),
        "{text}"
    );
    for (source, v) in [("persisted", 1.0), ("control-plane", 0.0)] {
        assert_eq!(
            stack
                .metric("switchyard_table_source", &[("source", source)])
                .await,
            v
        );
    }
    assert_eq!(stack.metric("switchyard_control_connected", &[]).await, 0.0);
    for stream in [false, true] {
        let (status, endpoint, body) = stack.chat(stream).await;
        assert_eq!((status, endpoint.as_str()), (200, "onprem-a"), "{body}");
    }

    // The control plane comes back: its table replaces the saved one.
    let (control, addr) = common::start_control(&stack.dir, &stack.policy, &control).await;
    stack.control = control;
    assert_eq!(addr, stack.control_addr);
    ready_says(
        &stack.http,
        stack.sidecar_addr,
        &stack.sidecar,
        "from control-plane",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(stack.metric("switchyard_control_connected", &[]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_saved_table_is_reported_and_ignored_never_fatal() {
    let dir = cluster::run_dir("damaged").unwrap();
    let http = reqwest::Client::new();
    let addr: SocketAddr = ([127, 0, 0, 1], cluster::free_port().unwrap()).into();
    let control: SocketAddr = ([127, 0, 0, 1], cluster::free_port().unwrap()).into();
    let state = cluster::sidecar_state_dir(&dir);
    std::fs::create_dir_all(&state).unwrap();
    let saved = persist::file_for(&state, &addr.to_string());
    std::fs::write(&saved, b"switchyard-table 1\n\x01\x02 not a table").unwrap();

    // No control plane yet: the sidecar runs, says why it has no table.
    let a = common::args(&[
        "sidecar",
        "--listen",
        &addr.to_string(),
        "--control",
        &control.to_string(),
        "--state-dir",
        &state.display().to_string(),
    ]);
    let mut sidecar = Proc::spawn(bin(), &a, &dir, "sidecar").unwrap();
    log_says(
        &sidecar,
        "the saved routing table is unreadable; ignored",
        Duration::from_secs(30),
    )
    .await;
    let text = ready_says(
        &http,
        addr,
        &sidecar,
        "not ready: no routing table",
        Duration::from_secs(30),
    )
    .await;
    assert!(!sidecar.exited(), "{text}");
    let health = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // The control plane arrives: the sidecar is ready, and the file it
    // saves is whole again.
    let mocks = [common::Mock::start(&dir, "onprem-a", "onprem", &[]).await];
    let policy = dir.join("policy.yaml");
    cluster::write_atomic(&policy, &common::policy_text(&mocks, &[])).unwrap();
    let (_control, _) = common::start_control(&dir, &policy, &control.to_string()).await;
    ready_says(
        &http,
        addr,
        &sidecar,
        "from control-plane",
        Duration::from_secs(30),
    )
    .await;
    let (table, _) = persist::load(&saved)
        .expect("the saved table reads back")
        .expect("a table was saved");
    assert!(table.version > 0);
    sidecar.kill().await.unwrap();
}

fn share_of(endpoints: &[String], name: &str) -> f64 {
    endpoints.iter().filter(|e| *e == name).count() as f64 / endpoints.len() as f64
}

async fn endpoints_of(stack: &Stack, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (status, endpoint, body) = stack.chat(false).await;
        assert_eq!(status, 200, "{body}");
        out.push(endpoint);
    }
    out
}

/// Pushed weights 0.9/0.1 hold while the control plane is there; past the
/// TTL without it, the sidecar balances by its own signals (equal shares,
/// P2C on peak-EWMA latency), says so, and trusts weights again once the
/// control plane is back. onprem-a answers 20 ms slower, so P2C prefers
/// onprem-b whenever its two draws differ: onprem-b's expected share is
/// 0.1² + 2·0.9·0.1 = 19% under the weights and 0.5² + 2·0.5·0.5 = 75%
/// on local signals alone. Over 100 requests the 45% line is more than
/// six standard deviations from both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_expire_past_their_ttl_without_the_control_plane() {
    let mut stack = Stack::start_with(
        "weightttl",
        &[
            ("onprem-a", "onprem", &["--ttft-ms", "20"]),
            ("onprem-b", "onprem", &[]),
        ],
        |m| {
            let mut p = common::policy_text(m, &[("onprem-a", 0.9), ("onprem-b", 0.1)]);
            p.push_str("routing:\n  weights_ttl_ms: 1000\n  exploration: 0\n");
            p
        },
        &[],
    )
    .await;
    stack.wait_acked_above(0).await;
    let before = endpoints_of(&stack, 100).await;
    assert!(share_of(&before, "onprem-b") < 0.45, "{before:?}");
    assert_eq!(stack.metric("switchyard_weights_expired", &[]).await, 0.0);

    stack.control.kill().await.unwrap();
    ready_says(
        &stack.http,
        stack.sidecar_addr,
        &stack.sidecar,
        "weights expired",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(stack.metric("switchyard_weights_expired", &[]).await, 1.0);
    let after = endpoints_of(&stack, 100).await;
    assert!(share_of(&after, "onprem-b") > 0.45, "{after:?}");

    let control = stack.control_addr.to_string();
    let (c, _) = common::start_control(&stack.dir, &stack.policy, &control).await;
    stack.control = c;
    ready_says(
        &stack.http,
        stack.sidecar_addr,
        &stack.sidecar,
        "weights trusted",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(stack.metric("switchyard_weights_expired", &[]).await, 0.0);
}

async fn chat_via(http: &reqwest::Client, addr: SocketAddr) -> (u16, String, String) {
    let r = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
        }))
        .send()
        .await
        .expect("sidecar answers");
    let status = r.status().as_u16();
    let endpoint = common::header(&r, "x-switchyard-endpoint");
    (status, endpoint, r.text().await.unwrap_or_default())
}

/// Polls until a chat completion is answered by `endpoint`.
async fn served_by(http: &reqwest::Client, addr: SocketAddr, endpoint: &str, sidecar: &Proc) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, by, body) = chat_via(http, addr).await;
        if status == 200 && by == endpoint {
            return;
        }
        assert!(
            Instant::now() < end,
            "never served by {endpoint}; last: {status} {by} {body}\n--- sidecar log:\n{}",
            common::log_tail(&sidecar.log_text())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_policy(path: &Path, mocks: &[common::Mock], weights: &[(&str, f64)]) {
    cluster::write_atomic(path, &common::policy_text(mocks, weights)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_mode_serves_reloads_and_keeps_local_health_without_a_control_plane() {
    let dir = cluster::run_dir("standalone").unwrap();
    let http = reqwest::Client::new();
    let mut mocks = vec![
        common::Mock::start(&dir, "onprem-a", "onprem", &["--output-tokens", "40"]).await,
        common::Mock::start(&dir, "onprem-b", "onprem", &["--output-tokens", "40"]).await,
    ];
    let policy = dir.join("policy.yaml");
    write_policy(&policy, &mocks, &[("onprem-a", 1.0)]);
    let addr: SocketAddr = ([127, 0, 0, 1], cluster::free_port().unwrap()).into();
    let policy_arg = policy.display().to_string();
    let mut sidecar = cluster::start_sidecar_on(
        bin(),
        &dir,
        "sidecar",
        addr,
        &["--policy", &policy_arg, "--reload-ms", "50"],
        &http,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (_, text) = common::readyz(&http, addr).await;
    assert!(text.contains("from policy-file, weights trusted"), "{text}");

    // The same independent client checks the foundation runs.
    common::openai_client_round_trip(&format!("http://{addr}/v1"), &mocks[0], &http).await;
    assert_eq!(
        common::listed_models(&http, &format!("http://{addr}")).await,
        [MODEL]
    );

    // An edit moves the traffic; an invalid edit is refused and changes
    // nothing.
    write_policy(&policy, &mocks, &[("onprem-b", 1.0)]);
    served_by(&http, addr, "onprem-b", &sidecar).await;
    cluster::write_atomic(&policy, "default_class: nowhere\n").unwrap();
    log_says(&sidecar, "policy change rejected", Duration::from_secs(20)).await;
    let (status, by, body) = chat_via(&http, addr).await;
    assert_eq!((status, by.as_str()), (200, "onprem-b"), "{body}");

    // Local health without anyone's help: onprem-b dies, onprem-a serves.
    mocks[1].proc.kill().await.unwrap();
    for _ in 0..10 {
        let (status, by, body) = chat_via(&http, addr).await;
        assert_eq!((status, by.as_str()), (200, "onprem-a"), "{body}");
    }
    // No table was saved: the policy file is the state.
    let saved: Vec<_> = std::fs::read_dir(cluster::sidecar_state_dir(&dir))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !saved
            .iter()
            .any(|f| f.to_string_lossy().ends_with(".table")),
        "{saved:?}"
    );
    sidecar.kill().await.unwrap();
}
