//! End to end, with real processes on loopback: the control plane moving
//! traffic on telemetry (latency past the SLA, on-prem saturation, the RTT
//! the sidecar reports), the kill switch with its audit entry, and a
//! control plane restart that keeps its switches, its audit log and its
//! decision.
//!
//! Every wait polls a real signal (status over gRPC, the mocks' counters)
//! with a bounded timeout. The tests share the machine's two cores, so they
//! run one at a time.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{args, endpoint, header, log_tail, ControlConfig, Mock, Stack, MODEL};
use parking_lot::Mutex;
use switchyard_proto::v1 as pb;
use tokio::time::Instant;

const TOKEN: &str = "decide-test-token";

/// One test at a time: each drives load through real processes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The policy: the mocks as endpoints, price rising with position, the
/// first from provider `lab` and the rest from `cloudco`; extra YAML per
/// endpoint (capacity, metrics_url, budget) comes from `extra`, and the
/// classes and routing from `tail`.
fn policy_text(mocks: &[Mock], extra: &dyn Fn(&Mock) -> String, tail: &str) -> String {
    let mut y = String::from("default_class: standard\nendpoints:\n");
    for (i, m) in mocks.iter().enumerate() {
        y.push_str(&format!(
            "  - name: {}\n    url: http://{}\n    tier: {}\n    models: [{MODEL}]\n    provider: {}\n    price: {{ input_per_mtok: {}, output_per_mtok: {} }}\n{}",
            m.name,
            m.addr,
            m.tier,
            if i == 0 { "lab" } else { "cloudco" },
            i,
            i * 2,
            extra(m),
        ));
    }
    y.push_str(tail);
    y
}

/// Mocks `(name, tier, extra mock args)` behind a sidecar and a control
/// plane that decides every 200 ms and wants the admin token; the policy
/// is `policy_text`'s.
async fn start_stack(
    label: &str,
    mocks: &[(&str, &str, &[&str])],
    extra: &dyn Fn(&Mock) -> String,
    tail: &str,
) -> Stack {
    let control = ControlConfig {
        extra: args(&["--interval-ms", "200"]),
        admin_token: Some(TOKEN.into()),
    };
    Stack::start_with_control(label, mocks, |m| policy_text(m, extra, tail), &control, &[]).await
}

/// `endpoint`'s weight in the class `standard`; 0 when it has none.
fn weight(s: &pb::StatusResponse, endpoint: &str) -> f64 {
    weight_in(s, "standard", endpoint)
}

/// `endpoint`'s weight in `class`; 0 when it has none.
fn weight_in(s: &pb::StatusResponse, class: &str, endpoint: &str) -> f64 {
    s.endpoints
        .iter()
        .find(|e| e.name == endpoint)
        .and_then(|e| e.weights.iter().find(|w| w.class == class))
        .map_or(0.0, |w| w.weight)
}

#[derive(Clone, Debug)]
struct Sample {
    started: Instant,
    endpoint: String,
    status: u16,
}

/// Closed-loop load: `workers` tasks, of which the first `active` send one
/// non-streamed request after another.
struct Load {
    active: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(stack: &Stack, workers: usize, active: usize) -> Load {
        let active = Arc::new(AtomicUsize::new(active));
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let url = stack.url("/v1/chat/completions");
        let body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
        });
        let tasks = (0..workers)
            .map(|w| {
                let (active, stop, samples) = (active.clone(), stop.clone(), samples.clone());
                let (http, url, body) = (stack.http.clone(), url.clone(), body.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        if w >= active.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        let started = Instant::now();
                        let r = http.post(&url).json(&body).send().await;
                        let (status, endpoint) = match r {
                            Ok(r) => {
                                let ep = header(&r, "x-switchyard-endpoint");
                                let status = r.status().as_u16();
                                let _ = r.bytes().await;
                                (status, ep)
                            }
                            Err(_) => (0, String::new()),
                        };
                        samples.lock().push(Sample {
                            started,
                            endpoint,
                            status,
                        });
                    }
                })
            })
            .collect();
        Load {
            active,
            stop,
            samples,
            tasks,
        }
    }

    fn set_active(&self, n: usize) {
        self.active.store(n, Ordering::SeqCst);
    }

    /// Requests started in `[from, to)`: count per endpoint, and all.
    fn counts(&self, from: Instant, to: Instant) -> (BTreeMap<String, usize>, usize) {
        let samples = self.samples.lock();
        let mut by = BTreeMap::new();
        let mut n = 0;
        for s in samples
            .iter()
            .filter(|s| s.started >= from && s.started < to)
        {
            *by.entry(s.endpoint.clone()).or_insert(0) += 1;
            n += 1;
        }
        (by, n)
    }

    fn failures_since(&self, from: Instant) -> Vec<Sample> {
        self.samples
            .lock()
            .iter()
            .filter(|s| s.started >= from && s.status != 200)
            .cloned()
            .collect()
    }

    /// Lets the load run until at least `n` requests started after `from`
    /// have finished and `min` has passed; returns the end of the window.
    async fn collect(&self, from: Instant, n: usize, min: Duration) -> Instant {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let now = Instant::now();
            if now >= from + min && self.counts(from, now).1 >= n {
                return now;
            }
            assert!(now < end, "fewer than {n} requests in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn share(by: &BTreeMap<String, usize>, n: usize, endpoint: &str) -> f64 {
    by.get(endpoint).copied().unwrap_or(0) as f64 / n.max(1) as f64
}

const SLA_TAIL: &str = "\
classes:
  - name: standard
    ttft_timeout_ms: 5000
    deadline_ms: 30000
    ttft_p95_ms: 250
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_past_the_sla_moves_traffic_away_and_back_gradually() {
    let _serial = SERIAL.lock().await;
    let tail = format!(
        "{SLA_TAIL}routing:\n  window_ms: 3000\n  min_requests: 5\n  exploration: 0.05\n  max_step: 0.15\n  hysteresis: 0.01\n  min_ejection_ms: 4000\n"
    );
    let stack = start_stack(
        "latency",
        &[
            ("gpu", "onprem", &["--ttft-ms", "20"]),
            ("cloud", "burst", &["--ttft-ms", "20"]),
            ("hosted", "fallback", &["--ttft-ms", "20"]),
        ],
        &|_| String::new(),
        &tail,
    )
    .await;
    let load = Load::start(&stack, 6, 6);

    // Healthy: the cheapest tier carries all but the exploration shares.
    let t0 = Instant::now();
    let t1 = load.collect(t0, 100, Duration::from_secs(1)).await;
    let (by, n) = load.counts(t0, t1);
    assert!(share(&by, n, "gpu") > 0.75, "{by:?}");
    assert!(
        by.contains_key("cloud") || by.contains_key("hosted"),
        "exploration: {by:?}"
    );

    // gpu slows past the 250 ms SLA: ejected within a bounded time.
    let slowed = Instant::now();
    stack
        .mock("gpu")
        .configure(&stack.http, serde_json::json!({"ttft_ms": 600}))
        .await;
    let version = stack
        .eventually("gpu ejected", Duration::from_secs(10), |s| {
            let gpu = endpoint(s, "gpu");
            (weight(s, "gpu") == 0.0 && !gpu.ejections.is_empty()).then(|| {
                assert!(
                    gpu.ejections[0].reason.contains("TTFT"),
                    "{:?}",
                    gpu.ejections
                );
                s.table_version
            })
        })
        .await;
    stack.acked(version).await;
    let ejected_in = slowed.elapsed();
    // Telemetry comes once a second; a few reports must do.
    assert!(ejected_in < Duration::from_secs(8), "took {ejected_in:?}");

    // Traffic moved: nothing started after the ACK goes to gpu.
    let t2 = Instant::now();
    let t3 = load.collect(t2, 30, Duration::from_millis(1200)).await;
    let (by, n) = load.counts(t2, t3);
    assert_eq!(by.get("gpu"), None, "{by:?}");
    assert!(
        share(&by, n, "cloud") > 0.8,
        "the next cheapest takes over: {by:?}"
    );
    assert!(load.failures_since(t2).is_empty());

    // Restored: after the ejection, gpu comes back step by step.
    stack
        .mock("gpu")
        .configure(&stack.http, serde_json::json!({"ttft_ms": 20}))
        .await;
    let mut seen: Vec<f64> = vec![];
    stack
        .eventually("gpu back", Duration::from_secs(25), |s| {
            let w = weight(s, "gpu");
            if seen.last() != Some(&w) {
                seen.push(w);
            }
            (w > 0.8).then_some(())
        })
        .await;
    let climbing: Vec<f64> = seen.iter().copied().filter(|w| *w > 0.0).collect();
    assert!(
        climbing.len() >= 4,
        "gpu's weight returns in several steps, not at once: {seen:?}"
    );
    assert!(
        climbing
            .windows(2)
            .all(|p| p[1] >= p[0] && p[1] - p[0] <= 0.15 + 1e-6),
        "each step bounded by max_step: {seen:?}"
    );
    let t4 = Instant::now();
    let t5 = load.collect(t4, 100, Duration::from_secs(1)).await;
    let (by, n) = load.counts(t4, t5);
    assert!(share(&by, n, "gpu") > 0.6, "traffic returned: {by:?}");
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_prem_saturation_bursts_and_falls_back_when_load_drops() {
    let _serial = SERIAL.lock().await;
    let tail = format!(
        "{SLA_TAIL}    ttft_p95_ms: 2000\nrouting:\n  window_ms: 3000\n  exploration: 0\n  burst_utilisation: 0.75\n  max_step: 0.2\n  hysteresis: 0.02\n"
    )
    .replace("    ttft_p95_ms: 250\n", "");
    let stack = start_stack(
        "saturation",
        &[
            ("gpu", "onprem", &["--ttft-ms", "120", "--capacity", "4"]),
            ("cloud", "burst", &["--ttft-ms", "120"]),
        ],
        &|m| {
            if m.name == "gpu" {
                format!("    capacity: 4\n    metrics_url: {}\n", m.url("/metrics"))
            } else {
                String::new()
            }
        },
        &tail,
    )
    .await;
    let load = Load::start(&stack, 14, 2);

    // Two in flight against a budget of three: all on-prem.
    let t0 = Instant::now();
    let t1 = load.collect(t0, 20, Duration::from_secs(2)).await;
    let (by, n) = load.counts(t0, t1);
    assert_eq!(share(&by, n, "gpu"), 1.0, "{by:?}");

    // Fourteen in flight: the burst tier's share rises.
    load.set_active(14);
    stack
        .eventually("burst share rises", Duration::from_secs(15), |s| {
            (weight(s, "cloud") >= 0.6).then_some(())
        })
        .await;
    let t2 = Instant::now();
    let t3 = load.collect(t2, 100, Duration::from_secs(2)).await;
    let (by, n) = load.counts(t2, t3);
    assert!(share(&by, n, "cloud") > 0.5, "{by:?}");
    let s = stack.expect_status().await;
    let gpu = endpoint(&s, "gpu");
    assert!(
        gpu.queue_waiting >= 0.0,
        "the vLLM gauges are scraped: {gpu:?}"
    );
    assert!(
        gpu.in_flight <= 8.0,
        "on-prem is held near its budget, not flooded: {gpu:?}"
    );

    // Load drops back: traffic returns on-prem.
    load.set_active(2);
    stack
        .eventually("burst share falls", Duration::from_secs(15), |s| {
            (weight(s, "cloud") <= 0.05).then_some(())
        })
        .await;
    let t4 = Instant::now();
    let t5 = load.collect(t4, 20, Duration::from_secs(2)).await;
    let (by, n) = load.counts(t4, t5);
    assert!(share(&by, n, "gpu") > 0.9, "{by:?}");
    assert!(load.failures_since(t0).is_empty());
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_gets_no_request_once_acked_and_the_audit_log_says_so() {
    let _serial = SERIAL.lock().await;
    let tail = format!("{SLA_TAIL}routing:\n  window_ms: 3000\n  exploration: 0.1\n");
    let stack = start_stack(
        "kill",
        &[
            ("gpu", "onprem", &["--ttft-ms", "20"]),
            ("cloud", "burst", &["--ttft-ms", "20"]),
        ],
        &|_| String::new(),
        &tail,
    )
    .await;
    let load = Load::start(&stack, 4, 4);
    let t0 = Instant::now();
    load.collect(t0, 50, Duration::from_millis(500)).await;

    // Without the token, or with a wrong one, nothing happens.
    let e = stack
        .cli(&["kill", "gpu", "--reason", "x"], "not-the-token")
        .await
        .unwrap_err();
    assert!(e.contains("Unauthenticated"), "{e}");
    let e = stack.cli(&["audit"], "").await.unwrap_err();
    assert!(e.contains("Unauthenticated"), "{e}");

    let out = stack
        .cli(
            &[
                "kill",
                "gpu",
                "--reason",
                "GPU node fails ECC checks",
                "--actor",
                "oncall-ana",
                "--wait",
                "--json",
            ],
            TOKEN,
        )
        .await
        .expect("kill");
    let reply: serde_json::Value =
        serde_json::from_str(out.lines().next().unwrap()).expect("json reply");
    let version = reply["table_version"].as_u64().unwrap();
    stack.acked(version).await;
    let acked_at = Instant::now();

    // Requests picked before the ACK may still be running there; wait them out.
    let gpu = stack.mock("gpu");
    let end = Instant::now() + Duration::from_secs(10);
    while gpu.stats(&stack.http).await["in_flight"].as_u64() != Some(0) {
        assert!(Instant::now() < end, "gpu never went idle");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = gpu.requests(&stack.http).await;
    let t1 = Instant::now();
    let t2 = load.collect(t1, 150, Duration::from_millis(1500)).await;
    let after = gpu.requests(&stack.http).await;
    assert_eq!(after, before, "a request reached the killed endpoint");
    let (by, _) = load.counts(acked_at, t2);
    assert_eq!(by.get("gpu"), None, "{by:?}");
    assert!(load.failures_since(acked_at).is_empty());

    let s = stack.expect_status().await;
    let g = endpoint(&s, "gpu");
    assert!(g.killed && g.weights.is_empty(), "{g:?}");
    assert_eq!(g.switched_off_reason, "GPU node fails ECC checks");
    let class = &s.classes[0];
    assert!(!class.fallback.contains(&"gpu".to_string()), "{class:?}");

    let audit = stack.cli(&["audit", "--json"], TOKEN).await.expect("audit");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&audit).unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    let e = &entries[0];
    assert_eq!(
        (
            e["action"].as_str(),
            e["target"].as_str(),
            e["actor"].as_str()
        ),
        (Some("kill"), Some("endpoint gpu"), Some("oncall-ana"))
    );
    assert_eq!(e["reason"], "GPU node fails ECC checks");
    assert!(e["at_ms"].as_i64().unwrap() > 0);
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_keeps_switches_audit_and_decision_and_resumes_on_fresh_telemetry(
) {
    let _serial = SERIAL.lock().await;
    let tail = format!(
        "{SLA_TAIL}routing:\n  window_ms: 3000\n  min_requests: 5\n  exploration: 0\n  max_step: 0.25\n  min_ejection_ms: 6000\n"
    );
    let mut stack = start_stack(
        "restart",
        &[
            ("gpu", "onprem", &["--ttft-ms", "600"]),
            ("cloud", "burst", &["--ttft-ms", "20"]),
            ("hosted", "fallback", &["--ttft-ms", "20"]),
        ],
        &|_| String::new(),
        &tail,
    )
    .await;
    let load = Load::start(&stack, 6, 6);
    stack
        .cli(
            &[
                "kill",
                "--provider",
                "cloudco",
                "--reason",
                "contract paused",
            ],
            TOKEN,
        )
        .await
        .expect("kill provider");
    stack
        .cli(&["revive", "hosted", "--reason", "checked"], TOKEN)
        .await
        .expect("revive endpoint (no-op: the provider kill holds)");
    // gpu is slow from the start: ejected on telemetry, with time to spare.
    let before = stack
        .eventually("gpu ejected", Duration::from_secs(15), |s| {
            let gpu = endpoint(s, "gpu");
            gpu.ejections
                .iter()
                .any(|e| e.remaining_ms > 3500)
                .then(|| s.clone())
        })
        .await;
    let killed = |s: &pb::StatusResponse| {
        ["cloud", "hosted"]
            .iter()
            .all(|n| endpoint(s, n).killed && endpoint(s, n).weights.is_empty())
    };
    assert!(killed(&before), "{before:#?}");
    // Every endpoint is off or ejected: gpu carries the class, degraded.
    assert!(
        before.classes[0].note.contains("SLA"),
        "{:?}",
        before.classes[0]
    );
    let audit_before = stack.cli(&["audit", "--json"], TOKEN).await.unwrap();

    stack.restart_control().await;

    let after = stack.expect_status().await;
    assert!(after.table_version > before.table_version);
    assert!(killed(&after), "kills survive the restart: {after:#?}");
    let gpu = endpoint(&after, "gpu");
    assert!(!gpu.ejections.is_empty(), "the ejection resumes: {gpu:?}");
    assert_eq!(weight(&after, "gpu"), weight(&before, "gpu"));
    let audit_after = stack.cli(&["audit", "--json"], TOKEN).await.unwrap();
    assert_eq!(audit_after, audit_before, "the audit log is intact");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&audit_after).unwrap();
    assert_eq!(entries.len(), 2);

    // The sidecar comes back, reports, and the weights follow fresh
    // telemetry: revive the provider and fix gpu, and gpu (cheapest)
    // takes the class back once its ejection is over.
    stack.acked(after.table_version).await;
    stack
        .eventually("fresh telemetry", Duration::from_secs(10), |s| {
            s.sidecars
                .iter()
                .any(|c| c.connected && (0..1500).contains(&c.last_report_age_ms))
                .then_some(())
        })
        .await;
    stack
        .cli(
            &["revive", "--provider", "cloudco", "--reason", "resumed"],
            TOKEN,
        )
        .await
        .expect("revive provider");
    stack
        .mock("gpu")
        .configure(&stack.http, serde_json::json!({"ttft_ms": 20}))
        .await;
    stack
        .eventually(
            "cloud carries while gpu is out",
            Duration::from_secs(10),
            |s| (weight(s, "cloud") > 0.9).then_some(()),
        )
        .await;
    stack
        .eventually(
            "gpu back after its ejection",
            Duration::from_secs(30),
            |s| (weight(s, "gpu") > 0.9).then_some(()),
        )
        .await;
    // No NACK, by the sidecar's word and the control plane's. (Its log
    // names a refused connection to the restarting control plane too:
    // the NACK is its own line.)
    let log = stack.sidecar.log_text();
    assert!(
        !log.contains("routing table refused"),
        "no NACK: {}",
        log_tail(&log)
    );
    let s = stack.expect_status().await;
    assert!(
        s.sidecars.iter().all(|c| c.nack_reason.is_empty()),
        "no NACK: {:?}",
        s.sidecars
    );
    load.stop().await;
}

/// One chat completion through the sidecar in `class`: status, the
/// endpoint and degradation headers, and the body as JSON.
async fn ask_class(stack: &Stack, class: &str) -> (u16, String, String, serde_json::Value) {
    let r = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .header("x-switchyard-class", class)
        .json(&serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "what does this cost?"}],
        }))
        .send()
        .await
        .expect("the sidecar answers");
    let (status, ep, degraded) = (
        r.status().as_u16(),
        header(&r, "x-switchyard-endpoint"),
        header(&r, "x-switchyard-degraded"),
    );
    (status, ep, degraded, r.json().await.expect("JSON answer"))
}

/// A spend budget is one budget for the fleet, judged by the control plane
/// on its durable ledger: once an endpoint's spend over the last hour
/// reaches it, traffic leaves it for endpoints within budget, classes with
/// nowhere else to go degrade as their policy says (or get 503
/// `over_budget`), and a restarted control plane still knows it is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_moves_traffic_degrades_classes_and_survives_a_restart() {
    let _serial = SERIAL.lock().await;
    // cloud costs $1/$2 per million tokens: one answer spends more than
    // its $0.00001 budget.
    let tail = "\
classes:
  - name: standard
    weights: { cloud: 1 }
  - name: capped
    tiers: [burst]
    degrade: { max_tokens: 3 }
  - name: rejecting
    tiers: [burst]
    degrade: { reject: cloud spend is paused }
  - name: plain
    tiers: [burst]
routing:
  exploration: 0
";
    let mut stack = start_stack(
        "budget",
        &[("gpu", "onprem", &[]), ("cloud", "burst", &[])],
        &|m| {
            if m.name == "cloud" {
                "    budget_usd_per_hour: 0.00001\n".to_string()
            } else {
                String::new()
            }
        },
        tail,
    )
    .await;

    let (status, ep, _, body) = ask_class(&stack, "standard").await;
    assert_eq!((status, ep.as_str()), (200, "cloud"), "{body}");
    let usage = &body["usage"];
    let spent = (usage["prompt_tokens"].as_f64().unwrap()
        + 2.0 * usage["completion_tokens"].as_f64().unwrap())
        / 1e6;
    assert!(spent > 0.00001, "the test needs one answer to spend it all");

    let s = stack
        .eventually("cloud over budget", Duration::from_secs(15), |s| {
            (!endpoint(s, "cloud").over_budget.is_empty()).then(|| s.clone())
        })
        .await;
    let cloud = endpoint(&s, "cloud");
    assert!(
        (cloud.spend_last_hour_usd - spent).abs() < 1e-9,
        "the ledger holds what the answer cost: {cloud:?}"
    );
    assert_eq!(cloud.budget_usd_per_hour, 0.00001);
    assert!(cloud.over_budget.contains("budget"), "{cloud:?}");
    assert!(endpoint(&s, "gpu").over_budget.is_empty());
    assert_eq!(weight(&s, "cloud"), 0.0, "{s:#?}");
    assert_eq!(weight(&s, "gpu"), 1.0, "{s:#?}");
    stack.acked(s.table_version).await;
    let cloud_before = stack.mock("cloud").requests(&stack.http).await;

    // Pinned to cloud, the class moves to gpu, within budget.
    let (status, ep, degraded, _) = ask_class(&stack, "standard").await;
    assert_eq!((status, ep.as_str(), degraded.as_str()), (200, "gpu", ""));
    // Nowhere else to go: capped requests still reach cloud, smaller.
    let (status, ep, degraded, body) = ask_class(&stack, "capped").await;
    assert_eq!(
        (status, ep.as_str(), degraded.as_str()),
        (200, "cloud", "cap-max-tokens"),
        "{body}"
    );
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
    // Rejected by policy, or by default, with the reason.
    let (status, _, degraded, body) = ask_class(&stack, "rejecting").await;
    assert_eq!((status, degraded.as_str()), (503, "reject"), "{body}");
    assert_eq!(body["error"]["code"], "degraded_reject");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("over budget") && message.contains("cloud spend is paused"),
        "{message}"
    );
    let (status, _, _, body) = ask_class(&stack, "plain").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("over_budget")),
        "{body}"
    );
    for (name, labels) in [
        (
            "switchyard_over_budget_rejections_total",
            &[("class", "plain")][..],
        ),
        (
            "switchyard_degraded_total",
            &[("class", "rejecting"), ("action", "reject")],
        ),
        (
            "switchyard_degraded_total",
            &[("class", "capped"), ("action", "cap-max-tokens")],
        ),
    ] {
        assert_eq!(stack.metric(name, labels).await, 1.0, "{name}{labels:?}");
    }
    let cloud_after = stack.mock("cloud").requests(&stack.http).await;
    assert_eq!(cloud_after, cloud_before + 1, "only the capped request");

    let text = stack.cli(&["status"], TOKEN).await.expect("status");
    assert!(text.contains("over budget: spent $"), "{text}");

    // The ledger is durable: a restarted control plane starts out knowing.
    stack.restart_control().await;
    let after = stack.expect_status().await;
    let cloud = endpoint(&after, "cloud");
    assert!(!cloud.over_budget.is_empty(), "{cloud:?}");
    assert!(cloud.spend_last_hour_usd > 0.00001, "{cloud:?}");
    assert_eq!(weight(&after, "cloud"), 0.0);
}

/// The RTT loop, end to end: two endpoints of one tier and one price serve
/// the interactive class `chat` and the plain class `batch`. The sidecar
/// reports each endpoint's RTT in its telemetry; the control plane fills
/// `chat` nearest first (the farther endpoint keeps only its exploration
/// share) and splits `batch` evenly whatever the RTT. When the RTTs swap,
/// `chat`'s weight moves back to the endpoint that lost it.
///
/// The RTTs are simulated, not real: this machine's kernel has no `netem`
/// qdisc to delay loopback traffic, so the sidecar runs with the test-only
/// RTT source `--rtt-source file:PATH`, which reports the figures this test
/// writes into PATH in place of the kernel's. Everything after that source
/// (telemetry, the control plane's signals and decision, the table the
/// sidecar ACKs) is the real path. `gpu-a` is far first: the order by RTT
/// is then the opposite of the order by name, which breaks ties when no
/// RTT is known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nearer_of_two_equal_endpoints_takes_the_interactive_class_and_gives_it_back_when_rtts_swap(
) {
    let _serial = SERIAL.lock().await;
    let figures = switchyard::cluster::run_dir("rtt-figures")
        .expect("run dir")
        .join("rtt.txt");
    switchyard::cluster::write_atomic(&figures, "# written once the mocks listen\n")
        .expect("RTT file");
    let source = format!("file:{}", figures.display());
    let control = ControlConfig {
        extra: args(&["--interval-ms", "200"]),
        admin_token: Some(TOKEN.into()),
    };
    // RTTs far under the SLA, so RTT orders the endpoints and never
    // ejects one; a large max_step so the swap takes few computations.
    let classes = "  - name: chat
    interactive: true
    ttft_timeout_ms: 5000
    deadline_ms: 30000
    ttft_p95_ms: 1000
  - name: batch
    ttft_timeout_ms: 5000
    deadline_ms: 30000
routing:
  exploration: 0.05
  max_step: 0.5
  hysteresis: 0.01
";
    let stack = Stack::start_with_control(
        "rttloop",
        &[("gpu-a", "onprem", &[]), ("gpu-b", "onprem", &[])],
        |m| {
            let eps = common::endpoints_of(m, MODEL, |_| (1.0, 2.0));
            switchyard::cluster::policy_with_classes(&eps, "chat", classes)
        },
        &control,
        &["--rtt-source", &source],
    )
    .await;

    let (a, b) = (stack.mock("gpu-a").addr, stack.mock("gpu-b").addr);
    for (far, near) in [("gpu-a", "gpu-b"), ("gpu-b", "gpu-a")] {
        let rtt_us = |name: &str| if name == far { 40_000 } else { 2_000 };
        switchyard::cluster::write_atomic(
            &figures,
            &format!("{a} {}\n{b} {}\n", rtt_us("gpu-a"), rtt_us("gpu-b")),
        )
        .expect("RTT file");
        let what = format!("{far} at 40 ms, {near} at 2 ms");
        let version = stack
            .eventually(&what, Duration::from_secs(20), |s| {
                let seen = endpoint(s, far).rtt_ms == 40.0 && endpoint(s, near).rtt_ms == 2.0;
                let (w_near, w_far) = (weight_in(s, "chat", near), weight_in(s, "chat", far));
                (seen && w_near >= 0.9 && w_far <= 0.1).then_some(s.table_version)
            })
            .await;
        let s = stack.expect_status().await;
        assert!(
            weight_in(&s, "chat", far) > 0.0,
            "{what}: {far} keeps its exploration share: {s:#?}"
        );
        for ep in [far, near] {
            assert!(
                (weight_in(&s, "batch", ep) - 0.5).abs() < 1e-6,
                "{what}: batch is not interactive and ignores RTT: {s:#?}"
            );
        }
        stack.acked(version).await;
        // What the sidecar reported is what it measures on /metrics.
        let far_s = stack
            .metric(
                "switchyard_endpoint_rtt_seconds",
                &[("endpoint", far), ("source", "file")],
            )
            .await;
        assert!((far_s - 0.04).abs() < 1e-9, "{what}: {far_s}");
    }
}
