//! Health the control plane can trust, end to end with real processes: its
//! probes (`GET /v1/models` or a health path, with the endpoint's
//! credential, never a completion) judge a killed endpoint down, weight 0,
//! with the reason in `admin status`; a revived one comes back through
//! probation; and a sidecar's local ejections reach the control plane in
//! its telemetry.
//!
//! Every wait polls the control plane's status (or a mock's counters)
//! against a bounded deadline; none sleeps to synchronise.

mod common;

use std::time::Duration;

use common::{endpoint, log_tail, ControlConfig, Mock, Stack};
use switchyard::cluster;
use switchyard_proto::v1 as pb;
use tokio::time::Instant;

/// How long any awaited event may take before the test fails; generous,
/// for a loaded machine: the events themselves take a few probe intervals.
const WITHIN: Duration = Duration::from_secs(30);

/// `name`'s weight in the class `standard`; 0 when it has none.
fn weight(s: &pb::StatusResponse, name: &str) -> f64 {
    endpoint(s, name)
        .weights
        .iter()
        .find(|w| w.class == "standard")
        .map_or(0.0, |w| w.weight)
}

/// The policy of the stack's mocks, computed weights, with `routing`
/// appended.
fn policy_with(mocks: &[Mock], routing: &str) -> String {
    format!("{}routing:\n{routing}", common::policy_text(mocks, &[]))
}

/// Polls `mock`'s counters until `check` holds; fails the test at `WITHIN`.
async fn mock_eventually(
    stack: &Stack,
    mock: &Mock,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = Instant::now() + WITHIN;
    loop {
        let stats = mock.stats(&stack.http).await;
        if check(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < end,
            "{what}: not within {WITHIN:?}; mock stats {stats}\n--- control log:\n{}",
            log_tail(&stack.control.log_text())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The on-prem mock is SIGKILLed: within a few probe intervals it shows
/// `down` with the probe's reason and weight 0, in the status API and in
/// `switchyard admin status`. A mock started again on its port brings it
/// back on probation: a small weight first, climbing by `max_step` per
/// computation (0.03 here, so the climb outlasts a polling hiccup), and
/// then its full share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_goes_down_with_weight_zero_and_comes_back_through_probation() {
    let control = ControlConfig {
        extra: common::args(&[
            "--interval-ms",
            "200",
            "--probe-ms",
            "200",
            "--probe-timeout-ms",
            "150",
        ]),
        admin_token: None,
    };
    let mut stack = Stack::start_with_control(
        "health-down",
        &[("onprem", "onprem", &[]), ("burst", "burst", &[])],
        |m| {
            policy_with(
                m,
                "  max_step: 0.03\n  hysteresis: 0.01\n  exploration: 0\n",
            )
        },
        &control,
        &[],
    )
    .await;
    // The climb from a cold start is itself gradual; wait for the full share.
    stack
        .eventually("on-prem carries the class", WITHIN, |s| {
            (weight(s, "onprem") > 0.99 && endpoint(s, "onprem").probe == "ok").then_some(())
        })
        .await;

    let port = stack.mocks[0].addr.port();
    stack.mocks[0].proc.kill().await.expect("mock killed");
    let down = stack
        .eventually("the killed endpoint is down", WITHIN, |s| {
            let e = endpoint(s, "onprem");
            (!e.down.is_empty()).then(|| s.clone())
        })
        .await;
    let e = endpoint(&down, "onprem");
    assert_eq!(e.down, "probe: connection refused", "{e:?}");
    assert!(e.probe.starts_with("connection refused"), "{e:?}");
    // Weight 0 is in the table the down verdict came with, not a later one.
    assert_eq!(weight(&down, "onprem"), 0.0, "{e:?}");
    assert_eq!(weight(&down, "burst"), 1.0);
    let chain = &down.classes[0].fallback;
    assert_eq!(
        chain.last().map(String::as_str),
        Some("onprem"),
        "{chain:?}"
    );

    let printed = stack.cli(&["status"], "").await.expect("admin status runs");
    let line = printed
        .lines()
        .find(|l| l.starts_with("onprem "))
        .unwrap_or_else(|| panic!("no onprem line in\n{printed}"));
    assert!(
        line.contains(" down ") && line.contains("probe: connection refused"),
        "{line}"
    );

    // Revived on the same port.
    let revived = Mock::start(
        &stack.dir,
        "onprem",
        "onprem",
        &["--port", &port.to_string()],
    )
    .await;
    assert_eq!(revived.addr.port(), port);
    stack.mocks[0] = revived;
    let back = stack
        .eventually("the revived endpoint is on probation", WITHIN, |s| {
            let e = endpoint(s, "onprem");
            (e.down.is_empty() && weight(s, "onprem") > 0.0).then(|| s.clone())
        })
        .await;
    let e = endpoint(&back, "onprem");
    assert!(e.probation, "back on probation, not at full weight: {e:?}");
    assert!(weight(&back, "onprem") < 0.5, "{e:?}");
    stack
        .eventually("the revived endpoint has its share again", WITHIN, |s| {
            let e = endpoint(s, "onprem");
            (weight(s, "onprem") > 0.95 && !e.probation).then_some(())
        })
        .await;
}

/// Probes spend no tokens and carry the endpoint's credential: a mock that
/// wants an API key (on its model list too, as OpenAI does) sees model
/// lists with the key and never a completion; an endpoint with a
/// `health_path` is probed there instead. When the control plane cannot
/// resolve the reference it probes without it and says so once; the
/// provider's 401 to a probe without the key then shows the endpoint is up
/// (keys usually live beside the sidecars only), so it is not taken away
/// from the fleet. The key never reaches the control plane's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_carry_the_credential_and_never_ask_for_a_completion() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    let key = format!("sk-probe-{}-{nanos}", std::process::id());
    let key_file = std::env::temp_dir().join(format!(
        "switchyard-probe-key-{}-{nanos}",
        std::process::id()
    ));
    std::fs::write(&key_file, format!("{key}\n")).expect("key file");
    let reference = format!("file:{}", key_file.display());
    let control = ControlConfig {
        extra: common::args(&["--interval-ms", "200", "--probe-ms", "100"]),
        admin_token: None,
    };
    let stack = Stack::start_with_control(
        "health-probe",
        &[
            ("keyed", "onprem", &["--api-key", key.as_str()]),
            ("vllm", "burst", &[]),
        ],
        |m| {
            let text = common::policy_text(m, &[]);
            let edited = text
                .replacen(
                    "    tier: onprem\n",
                    &format!("    tier: onprem\n    credential: {reference}\n"),
                    1,
                )
                .replacen(
                    "    tier: burst\n",
                    "    tier: burst\n    health_path: /health\n",
                    1,
                );
            assert_eq!(edited.matches("credential:").count(), 1);
            assert_eq!(edited.matches("health_path:").count(), 1);
            edited
        },
        &control,
        &[],
    )
    .await;
    let keyed = stack.mock("keyed");
    let vllm = stack.mock("vllm");

    let stats = mock_eventually(&stack, keyed, "several probes", |s| {
        s["models"].as_u64().is_some_and(|n| n >= 5)
    })
    .await;
    assert_eq!(stats["models_unauthorized"], 0, "{stats}");
    assert_eq!(
        (stats["requests"].as_u64(), stats["unauthorized"].as_u64()),
        (Some(0), Some(0)),
        "no completion was asked for: {stats}"
    );
    let health = mock_eventually(&stack, vllm, "probes of the health path", |s| {
        s["health"].as_u64().is_some_and(|n| n >= 5)
    })
    .await;
    assert_eq!(
        (health["models"].as_u64(), health["requests"].as_u64()),
        (Some(0), Some(0)),
        "the health path replaces the model list: {health}"
    );
    let s = stack.expect_status().await;
    for name in ["keyed", "vllm"] {
        let e = endpoint(&s, name);
        assert_eq!((e.probe.as_str(), e.down.as_str()), ("ok", ""), "{e:?}");
    }

    // A reference the control plane cannot resolve: probes go without the
    // key and the provider refuses them, which still says it is up.
    let unset = "env:SWITCHYARD_PROBE_TEST_KEY_THAT_IS_NOT_SET";
    let text = std::fs::read_to_string(&stack.policy).expect("policy");
    cluster::write_atomic(&stack.policy, &text.replace(&reference, unset)).expect("edit");
    mock_eventually(&stack, keyed, "refused probes", |s| {
        s["models_unauthorized"].as_u64().is_some_and(|n| n >= 4)
    })
    .await;
    // Two refusals in a row would have marked it down, were they failures.
    let s = stack.expect_status().await;
    let e = endpoint(&s, "keyed");
    assert_eq!((e.probe.as_str(), e.down.as_str()), ("ok", ""), "{e:?}");
    let log = stack.control.log_text();
    assert_eq!(
        log.matches("probing without the endpoint's credential")
            .count(),
        1,
        "said once:\n{}",
        log_tail(&log)
    );
    assert!(log.contains("SWITCHYARD_PROBE_TEST_KEY_THAT_IS_NOT_SET"));
    assert!(!log.contains(&key), "the key reached the log");
    let stats = keyed.stats(&stack.http).await;
    assert_eq!(stats["requests"], 0, "still no completion: {stats}");
    let _ = std::fs::remove_file(&key_file);
}

/// A sidecar's local ejection reaches the control plane in its telemetry:
/// with probes off, only the sidecar can tell. The on-prem mock is killed
/// and a request through the sidecar fails over; the sidecar ejects the
/// endpoint on that first failure and keeps reporting it ejected, so the
/// control plane judges it down because every reporting sidecar ejects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecars_ejection_reaches_the_control_plane() {
    let control = ControlConfig {
        extra: common::args(&["--interval-ms", "200", "--probe-ms", "0"]),
        admin_token: None,
    };
    let mut stack = Stack::start_with_control(
        "health-eject",
        &[("onprem", "onprem", &[]), ("burst", "burst", &[])],
        |m| policy_with(m, "  exploration: 0\n"),
        &control,
        &["--eject-after", "1", "--eject-ms", "60000"],
    )
    .await;
    let version = stack
        .eventually("on-prem carries the class", WITHIN, |s| {
            (weight(s, "onprem") > 0.99).then_some(s.table_version)
        })
        .await;
    stack.acked(version).await;
    let (status, served_by, body) = stack.chat(false).await;
    assert_eq!((status, served_by.as_str()), (200, "onprem"), "{body}");

    stack.mocks[0].proc.kill().await.expect("mock killed");
    let (status, served_by, body) = stack.chat(false).await;
    assert_eq!((status, served_by.as_str()), (200, "burst"), "{body}");
    let down = stack
        .eventually("the sidecar's ejection is seen", WITHIN, |s| {
            let e = endpoint(s, "onprem");
            (!e.down.is_empty()).then(|| s.clone())
        })
        .await;
    let e = endpoint(&down, "onprem");
    assert_eq!(e.down, "ejected by 1 of 1 sidecars", "{e:?}");
    assert_eq!((e.sidecars_reporting, e.sidecars_ejecting), (1, 1), "{e:?}");
    assert!(e.window_ejections >= 1, "{e:?}");
    assert_eq!(e.probe, "", "probes are off");
    assert_eq!(weight(&down, "onprem"), 0.0);
}
