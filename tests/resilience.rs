//! Fault injection end to end: the primary endpoint fails in one way while a
//! client runs a fixed number of requests. Every request must succeed on
//! another endpoint or get a clear error, none is answered twice, and the
//! attempts made match the retries the sidecar counted against its budget.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Mock, Stack, MODEL};
use futures::StreamExt;
use switchyard::cluster::{self, PolicyEndpoint};

/// One answer as the app saw it.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    endpoint: String,
    attempts: u32,
    degraded: String,
    retry_after: Option<String>,
    body: String,
}

/// A one-line summary per answer, for assertion messages.
fn brief(answers: &[Answer]) -> String {
    answers
        .iter()
        .map(|a| {
            format!(
                "{}:{}:{}:{}",
                a.status,
                a.endpoint,
                a.attempts,
                a.error_code().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Answer {
    fn error_code(&self) -> Option<String> {
        if let Some(e) = self.stream_error() {
            return e["code"].as_str().map(str::to_string);
        }
        let json = self
            .body
            .trim()
            .strip_prefix("data: ")
            .unwrap_or(&self.body);
        serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
    }

    /// A streamed answer that ended with an error event instead of [DONE].
    fn stream_error(&self) -> Option<serde_json::Value> {
        let last = self.body.trim_end().rsplit("\n\n").next()?;
        let v: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ")?).ok()?;
        v.get("error").cloned()
    }

    fn completion_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .body
            .split("\n\n")
            .filter_map(|c| {
                let json = c.trim().strip_prefix("data: ").unwrap_or(c.trim());
                serde_json::from_str::<serde_json::Value>(json).ok()
            })
            .filter_map(|v| v["id"].as_str().map(str::to_string))
            .collect();
        ids.dedup();
        ids
    }
}

async fn ask(stack: &Stack, stream: bool, class: Option<&str>) -> Answer {
    let mut req = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .json(&stack.chat_body(stream));
    if let Some(c) = class {
        req = req.header("x-switchyard-class", c);
    }
    let r = req.send().await.expect("the sidecar answers");
    let h = |k: &str| {
        r.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (status, endpoint, attempts, degraded, retry_after) = (
        r.status().as_u16(),
        h("x-switchyard-endpoint").unwrap_or_default(),
        h("x-switchyard-attempts").map_or(0, |v| v.parse().expect("attempts")),
        h("x-switchyard-degraded").unwrap_or_default(),
        h("retry-after"),
    );
    let mut body = String::new();
    let mut s = r.bytes_stream();
    while let Some(c) = s.next().await {
        match c {
            Ok(c) => body.push_str(&String::from_utf8_lossy(&c)),
            Err(e) => panic!("the app saw a broken connection, not a clear error: {e}"),
        }
    }
    Answer {
        status,
        endpoint,
        attempts,
        degraded,
        retry_after,
        body,
    }
}

/// Runs `n` requests, `workers` at a time, alternating streamed and not.
async fn run(stack: &Arc<Stack>, n: usize, workers: usize) -> Vec<Answer> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (stack, next) = (stack.clone(), next.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= n {
                        return out;
                    }
                    out.push(ask(&stack, i % 2 == 1, None).await);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// The invariants every fault test shares: a success or a clear error for
/// each request, no answer twice, attempts equal to first tries plus counted
/// retries.
async fn check(stack: &Stack, answers: &[Answer], n: usize) {
    assert_eq!(answers.len(), n);
    let mut ids = std::collections::HashSet::new();
    let mut successes = 0;
    for a in answers {
        if a.status == 200 && a.stream_error().is_none() {
            successes += 1;
            let got = a.completion_ids();
            assert_eq!(got.len(), 1, "one completion per answer: {a:?}");
            assert!(ids.insert(got[0].clone()), "answered twice: {a:?}");
        } else if a.status == 200 {
            let e = a.stream_error().unwrap();
            assert!(
                e["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{a:?}"
            );
            assert!(
                !a.body.contains("[DONE]"),
                "an error event ends the stream: {a:?}"
            );
        } else {
            assert!(a.error_code().is_some(), "a clear error body: {a:?}");
        }
        assert!(a.attempts >= 1, "{a:?}");
    }
    let mut completed = 0;
    for m in &stack.mocks {
        if !m.proc_exited() {
            completed += m.stats(&stack.http).await["completed"].as_u64().unwrap();
        }
    }
    assert_eq!(
        completed, successes as u64,
        "every success was generated once"
    );
    let extra: u32 = answers.iter().map(|a| a.attempts - 1).sum();
    let retries = stack.metric_sum("switchyard_retries_total", &[]).await;
    let hedges = stack.metric_sum("switchyard_hedges_total", &[]).await;
    assert_eq!(
        f64::from(extra),
        retries + hedges,
        "attempts beyond the first are the counted retries"
    );
}

trait Exited {
    fn proc_exited(&self) -> bool;
}

impl Exited for Mock {
    fn proc_exited(&self) -> bool {
        std::fs::metadata(format!("/proc/{}", self.proc.pid().unwrap_or(0))).is_err()
            || self.proc.pid().is_none()
    }
}

const THREE: [(&str, &str, &[&str]); 3] = [
    ("onprem-a", "onprem", &[]),
    ("burst-b", "burst", &[]),
    ("fallback-c", "fallback", &[]),
];

/// A policy over the mocks (or `override_addr` for the first) with one class.
fn policy(mocks: &[Mock], class_extra: &str, override_addr: Option<SocketAddr>) -> String {
    let mut eps = common::endpoints_of(mocks, MODEL, |i| (i as f64, i as f64));
    if let (Some(addr), Some(first)) = (override_addr, eps.first_mut()) {
        first.addr = addr;
    }
    let class = format!(
        "  - name: standard\n    ttft_timeout_ms: 500\n    deadline_ms: 4000\n    weights: {{ onprem-a: 1 }}\n{class_extra}"
    );
    cluster::policy_with_classes(&eps, "standard", &class)
}

async fn faulty_primary(
    label: &str,
    fault: serde_json::Value,
    n: usize,
) -> (Arc<Stack>, Vec<Answer>) {
    let stack = Arc::new(Stack::start_with(label, &THREE, |m| policy(m, "", None), &[]).await);
    stack.mocks[0].configure(&stack.http, fault).await;
    let answers = run(&stack, n, 4).await;
    check(&stack, &answers, n).await;
    (stack, answers)
}

fn served_by(answers: &[Answer], endpoint: &str) -> usize {
    answers
        .iter()
        .filter(|a| a.status == 200 && a.stream_error().is_none() && a.endpoint == endpoint)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_fails_over() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let stack =
        Arc::new(Stack::start_with("refused", &THREE, |m| policy(m, "", Some(dead)), &[]).await);
    let answers = run(&stack, 40, 4).await;
    check(&stack, &answers, 40).await;
    assert_eq!(served_by(&answers, "burst-b"), 40, "{}", brief(&answers));
    assert!(
        stack
            .metric("switchyard_ejections_total", &[("endpoint", "onprem-a")])
            .await
            >= 1.0
    );
    // Once ejected, the primary is skipped without an attempt.
    assert!(answers.iter().any(|a| a.attempts == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_past_the_ttft_timeout_fails_over() {
    let (_stack, answers) =
        faulty_primary("hang", serde_json::json!({"hang_ratio": 1.0}), 24).await;
    assert_eq!(served_by(&answers, "burst-b"), 24, "{}", brief(&answers));
    assert!(
        answers.iter().any(|a| a.attempts == 2),
        "the hang was tried, then abandoned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_500s_fail_over() {
    let (stack, answers) =
        faulty_primary("e500", serde_json::json!({"error_500_ratio": 0.5}), 60).await;
    let ok = answers
        .iter()
        .filter(|a| a.status == 200 && a.stream_error().is_none())
        .count();
    assert_eq!(ok, 60, "{}", brief(&answers));
    assert!(served_by(&answers, "burst-b") > 0);
    let faults = stack.mocks[0].stats(&stack.http).await["faults"]["500"]
        .as_u64()
        .unwrap_or(0);
    assert!(faults > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_throttles_the_endpoint_for_its_retry_after() {
    let (stack, answers) = faulty_primary(
        "e429",
        serde_json::json!({"error_429_ratio": 1.0, "retry_after_s": 30}),
        40,
    )
    .await;
    assert_eq!(served_by(&answers, "burst-b"), 40, "{}", brief(&answers));
    // Throttled for 30 s after the first 429: at most one per worker in flight
    // when it came back reached the primary.
    let hits = stack.mocks[0].requests(&stack.http).await;
    assert!((1..=4).contains(&hits), "primary hit {hits} times");
    // The throttle is visible, with the time it has left.
    let left = stack
        .metric(
            "switchyard_endpoint_cooldown_seconds",
            &[("endpoint", "onprem-a"), ("reason", "throttled")],
        )
        .await;
    assert!(left > 0.0 && left <= 30.0, "throttle left: {left}");
    let other = stack
        .metric(
            "switchyard_endpoint_cooldown_seconds",
            &[("endpoint", "burst-b"), ("reason", "throttled")],
        )
        .await;
    assert_eq!(other, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_mid_way_ends_with_an_error_event_never_a_duplicate() {
    let stack = Arc::new(
        Stack::start_with(
            "drop",
            &THREE,
            |m| policy(m, "", None),
            &["--eject-after", "3"],
        )
        .await,
    );
    stack.mocks[0]
        .configure(
            &stack.http,
            serde_json::json!({"drop_mid_stream_ratio": 1.0, "inter_token_ms": 20}),
        )
        .await;
    let mut answers = Vec::new();
    for _ in 0..12 {
        answers.push(ask(&stack, true, None).await);
    }
    check(&stack, &answers, 12).await;
    let broken: Vec<_> = answers
        .iter()
        .filter(|a| a.stream_error().is_some())
        .collect();
    assert_eq!(
        broken.len(),
        3,
        "ejected after three broken streams: {}",
        brief(&answers)
    );
    for b in &broken {
        assert_eq!(
            (b.endpoint.as_str(), b.attempts),
            ("onprem-a", 1),
            "no retry after the first byte"
        );
        assert_eq!(b.error_code().as_deref(), Some("stream_interrupted"));
    }
    assert_eq!(served_by(&answers, "burst-b"), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_onprem_tier_down_moves_to_burst() {
    let mocks: [(&str, &str, &[&str]); 3] = [
        ("onprem-a", "onprem", &[]),
        ("onprem-b", "onprem", &[]),
        ("burst-b", "burst", &[]),
    ];
    let mut stack = Stack::start_with(
        "tierdown",
        &mocks,
        |m| {
            policy(m, "", None).replace(
                "weights: { onprem-a: 1 }",
                "weights: { onprem-a: 1, onprem-b: 1 }",
            )
        },
        &[],
    )
    .await;
    stack.mocks[0].proc.kill().await.unwrap();
    stack.mocks[1].proc.kill().await.unwrap();
    let stack = Arc::new(stack);
    let answers = run(&stack, 40, 4).await;
    check(&stack, &answers, 40).await;
    assert_eq!(served_by(&answers, "burst-b"), 40, "{}", brief(&answers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_down_is_a_clear_503_within_the_deadline() {
    let mut stack = Stack::start_with("alldown", &THREE, |m| policy(m, "", None), &[]).await;
    for m in stack.mocks.iter_mut() {
        m.proc.kill().await.unwrap();
    }
    let stack = Arc::new(stack);
    let started = std::time::Instant::now();
    let answers = run(&stack, 12, 2).await;
    check(&stack, &answers, 12).await;
    for a in &answers {
        assert_eq!(
            (a.status, a.error_code().as_deref()),
            (503, Some("upstream_unavailable")),
            "{a:?}"
        );
    }
    // Deadline 4 s a request; 6 rounds of 2.
    assert!(started.elapsed() < Duration::from_secs(6 * 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_retries() {
    // No floor, and retries worth half the requests; ejection off.
    let stack = Arc::new(
        Stack::start_with(
            "budget",
            &THREE,
            |m| {
                policy(
                    m,
                    "    retry_budget: { ratio: 0.5, min_per_second: 0 }\n",
                    None,
                )
            },
            &["--eject-after", "1000", "--eject-failure-rate", "2"],
        )
        .await,
    );
    stack.mocks[0]
        .configure(&stack.http, serde_json::json!({"error_500_ratio": 1.0}))
        .await;
    let mut answers = Vec::new();
    for _ in 0..40 {
        answers.push(ask(&stack, false, None).await);
    }
    check(&stack, &answers, 40).await;
    let retried = answers.iter().filter(|a| a.attempts == 2).count();
    assert_eq!(retried, 20, "half of 40 requests may be retried");
    for a in &answers {
        match a.attempts {
            2 => assert_eq!((a.status, a.endpoint.as_str()), (200, "burst-b")),
            _ => assert_eq!(
                (a.status, a.error_code().as_deref()),
                (502, Some("upstream_error")),
                "{a:?}"
            ),
        }
    }
    assert_eq!(
        stack
            .metric_sum("switchyard_retry_budget_exhausted_total", &[])
            .await,
        20.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_takes_the_first_answer_and_cancels_the_loser() {
    let stack = Arc::new(
        Stack::start_with(
            "hedge",
            &THREE,
            |m| {
                policy(m, "    hedge: true\n", None)
                    .replace("ttft_timeout_ms: 500", "ttft_timeout_ms: 2000")
                    .replace("deadline_ms: 4000", "deadline_ms: 60000")
            },
            &[],
        )
        .await,
    );
    // The primary would answer after a minute; the hedge waits half the
    // TTFT timeout (no TTFT seen yet) and goes to the burst tier.
    stack.mocks[0]
        .configure(&stack.http, serde_json::json!({"ttft_ms": 60000}))
        .await;
    let a = ask(&stack, false, None).await;
    assert_eq!(
        (a.status, a.endpoint.as_str(), a.attempts),
        (200, "burst-b", 2),
        "{a:?}"
    );
    check(&stack, std::slice::from_ref(&a), 1).await;
    assert_eq!(
        stack
            .metric(
                "switchyard_hedges_cancelled_total",
                &[("class", "standard"), ("endpoint", "onprem-a")]
            )
            .await,
        1.0
    );
    // The loser's connection was closed, so the provider stopped working on it.
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = stack.mocks[0].stats(&stack.http).await;
        if s["in_flight"] == 0 {
            assert_eq!(s["completed"], 0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the loser is still generating: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shedding_keeps_the_high_class_whole_and_sheds_the_low_one() {
    let classes = "  - name: high\n    priority: 1\n    ttft_timeout_ms: 5000\n    deadline_ms: 20000\n  - name: low\n    priority: 0\n    ttft_timeout_ms: 5000\n    deadline_ms: 20000\n";
    let stack = Arc::new(
        Stack::start_with(
            "shed",
            &[("onprem-a", "onprem", &["--ttft-ms", "40"])],
            |m| {
                let ep = PolicyEndpoint {
                    name: &m[0].name,
                    addr: m[0].addr,
                    tier: "onprem",
                    model: MODEL,
                    price_in: 0.0,
                    price_out: 0.0,
                };
                cluster::policy_with_classes(&[ep], "low", classes)
                    .replace("price: {", "capacity: 3\n    price: {")
            },
            &["--queue-limit", "8"],
        )
        .await,
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let low: Vec<_> = (0..12)
        .map(|_| {
            let (stack, stop) = (stack.clone(), stop.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    out.push(ask(&stack, false, Some("low")).await);
                }
                out
            })
        })
        .collect();
    // Wait until the low flood is being shed before the high class starts.
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while stack
        .metric("switchyard_sheds_total", &[("class", "low")])
        .await
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < end,
            "the low flood was never shed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let high: Vec<_> = (0..2)
        .map(|_| {
            let stack = stack.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..25 {
                    out.push(ask(&stack, false, Some("high")).await);
                }
                out
            })
        })
        .collect();
    let mut highs = Vec::new();
    for h in high {
        highs.extend(h.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut lows = Vec::new();
    for l in low {
        lows.extend(l.await.unwrap());
    }
    assert!(
        highs.iter().all(|a| a.status == 200),
        "{:?}",
        highs.iter().find(|a| a.status != 200)
    );
    let shed: Vec<_> = lows.iter().filter(|a| a.status == 429).collect();
    assert!(!shed.is_empty());
    for s in &shed {
        assert_eq!(s.error_code().as_deref(), Some("overloaded"));
        assert_eq!(s.retry_after.as_deref(), Some("1"));
    }
    assert!(lows.iter().all(|a| a.status == 200 || a.status == 429));
    assert_eq!(
        stack
            .metric("switchyard_sheds_total", &[("class", "high")])
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degradation_routes_to_a_smaller_model_or_rejects_visibly() {
    let small = "llama-3-8b";
    let classes = format!(
        "  - name: standard\n    ttft_timeout_ms: 500\n    deadline_ms: 4000\n    weights: {{ onprem-a: 1 }}\n    degrade: {{ model: {small} }}\n  - name: strict\n    ttft_timeout_ms: 500\n    deadline_ms: 4000\n    weights: {{ onprem-a: 1 }}\n    degrade: {{ reject: maintenance }}\n"
    );
    let mut stack = Stack::start_with(
        "degrade",
        &[
            ("onprem-a", "onprem", &[]),
            ("small-b", "burst", &["--model", "llama-3-8b"]),
        ],
        |m| {
            let eps = [
                PolicyEndpoint {
                    name: &m[0].name,
                    addr: m[0].addr,
                    tier: "onprem",
                    model: MODEL,
                    price_in: 0.0,
                    price_out: 0.0,
                },
                PolicyEndpoint {
                    name: &m[1].name,
                    addr: m[1].addr,
                    tier: "burst",
                    model: small,
                    price_in: 0.1,
                    price_out: 0.1,
                },
            ];
            cluster::policy_with_classes(&eps, "standard", &classes)
        },
        &["--eject-after", "2"],
    )
    .await;
    // Healthy: no degradation.
    let a = ask(&stack, false, None).await;
    assert_eq!(
        (a.status, a.endpoint.as_str(), a.degraded.as_str()),
        (200, "onprem-a", "")
    );

    stack.mocks[0].proc.kill().await.unwrap();
    // Only onprem-a serves the big model: the first failures are clear errors
    // until the sidecar ejects it.
    for _ in 0..2 {
        let a = ask(&stack, false, None).await;
        assert_eq!(a.status, 503, "{a:?}");
    }
    let a = ask(&stack, false, None).await;
    assert_eq!(
        (a.status, a.endpoint.as_str(), a.degraded.as_str()),
        (200, "small-b", "smaller-model"),
        "{a:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(
        v["model"], small,
        "the provider was asked for the smaller model"
    );

    let a = ask(&stack, false, Some("strict")).await;
    assert_eq!((a.status, a.degraded.as_str()), (503, "reject"), "{a:?}");
    assert!(a.body.contains("maintenance"));
    assert_eq!(a.error_code().as_deref(), Some("degraded_reject"));
    assert_eq!(
        stack
            .metric(
                "switchyard_degraded_total",
                &[("class", "strict"), ("action", "reject")]
            )
            .await,
        1.0
    );
    stack.sidecar.kill().await.unwrap();
}

/// On-prem dead, the fallback at its capacity, more streams than it can
/// take at once: every request waits for the fallback (admission queue, or
/// a failed attempt's wait for a slot) instead of being sent to the
/// endpoint the sidecar itself ejected, so none is answered with the dead
/// endpoint's connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_prem_dead_and_the_fallback_full_requests_wait_for_the_fallback() {
    const MOCKS: [(&str, &str, &[&str]); 2] = [
        ("onprem-a", "onprem", &[]),
        (
            "fallback-c",
            "fallback",
            &["--output-tokens", "8", "--inter-token-ms", "5"],
        ),
    ];
    let mut stack = Stack::start_with(
            "busydead",
            &MOCKS,
            |m| {
                let eps = common::endpoints_of(m, MODEL, |i| (i as f64, i as f64));
                let class = "  - name: standard\n    ttft_timeout_ms: 5000\n    deadline_ms: 20000\n    weights: { onprem-a: 1 }\n";
                cluster::policy_with_classes(&eps, "standard", class)
                    .replace("  - name: fallback-c\n", "  - name: fallback-c\n    capacity: 2\n")
            },
            &[],
        )
        .await;
    stack.mocks[0].proc.kill().await.unwrap();
    let stack = Arc::new(stack);
    let n = 120;
    let answers = run(&stack, n, 6).await;
    let failed: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status != 200 || a.stream_error().is_some())
        .collect();
    assert!(failed.is_empty(), "{}", brief(&answers));
    assert_eq!(served_by(&answers, "fallback-c"), n, "{}", brief(&answers));
    check(&stack, &answers, n).await;
}
