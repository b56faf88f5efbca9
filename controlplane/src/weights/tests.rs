//! Unit tests for each rule of the decision, and property tests for the
//! invariants that must hold for any policy, switches and signals.

use super::*;
use crate::health::ProbeState;
use crate::signals::{Bucket, EndpointSignals, Queue};
use proptest::collection::SizeRange;
use proptest::prelude::*;

const NOW: u64 = 1_000_000;

/// Three tiers, one endpoint each, the on-prem one with 10 slots; a class
/// with a 300 ms p95 TTFT target.
fn three_tiers(routing: &str) -> Policy {
    Policy::parse(&format!(
        "\
default_class: standard
endpoints:
  - {{ name: onprem, url: 'http://127.0.0.1:1', tier: onprem, models: [m], capacity: 10, provider: lab, price: {{ input_per_mtok: 0, output_per_mtok: 0 }} }}
  - {{ name: burst, url: 'http://127.0.0.1:2', tier: burst, models: [m], provider: cloud, price: {{ input_per_mtok: 1, output_per_mtok: 2 }} }}
  - {{ name: hosted, url: 'http://127.0.0.1:3', tier: fallback, models: [m], provider: cloud, price: {{ input_per_mtok: 5, output_per_mtok: 15 }} }}
classes:
  - {{ name: standard, ttft_p95_ms: 300 }}
routing:
  min_requests: 5
  min_ejection_ms: 2000
  max_ejection_ms: 8000
{routing}"
    ))
    .expect("test policy")
}

fn signals(now: u64, eps: &[(&str, EndpointSignals)]) -> Signals {
    Signals {
        now_ms: now,
        window_start_ms: now - 10_000,
        endpoints: eps
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect(),
    }
}

/// Ten requests in the last second at `ttft_ms`, `in_flight` now.
fn traffic(now: u64, ttft_ms: f64, errors: u64, in_flight: f64) -> EndpointSignals {
    EndpointSignals {
        buckets: vec![Bucket::synthetic(now - 1000, 10, errors, ttft_ms).unwrap()],
        in_flight,
        ..Default::default()
    }
}

fn w(d: &Decision, class: &str, e: &str) -> f64 {
    d.classes[class].routes.get(e).copied().unwrap_or(0.0)
}

fn sum(d: &ClassDecision) -> f64 {
    d.routes.values().sum()
}

#[test]
fn a_cold_start_fills_the_cheapest_tier_and_explores_the_rest() {
    let p = three_tiers("");
    let d = decide(
        &p,
        &Switches::default(),
        &signals(NOW, &[]),
        &Decision::default(),
    );
    let c = &d.classes["standard"];
    assert!((w(&d, "standard", "onprem") - 0.96).abs() < 1e-9, "{c:?}");
    assert!((w(&d, "standard", "burst") - 0.02).abs() < 1e-9);
    assert!((w(&d, "standard", "hosted") - 0.02).abs() < 1e-9);
    assert_eq!(c.fallback, ["onprem", "burst", "hosted"]);
    assert!((sum(c) - 1.0).abs() < 1e-9);

    let p = three_tiers("  exploration: 0\n");
    let d = decide(
        &p,
        &Switches::default(),
        &signals(NOW, &[]),
        &Decision::default(),
    );
    assert_eq!(d.classes["standard"].routes.len(), 1, "no exploration");
}

#[test]
fn demand_past_the_burst_threshold_overflows_to_the_next_tier() {
    let p = three_tiers("  exploration: 0\n");
    // 16 in flight against 10 slots at 80%: on-prem takes 8/16.
    let s = signals(NOW, &[("onprem", traffic(NOW, 50.0, 0, 16.0))]);
    let d = decide(&p, &Switches::default(), &s, &Decision::default());
    assert!((w(&d, "standard", "onprem") - 0.5).abs() < 1e-9, "{d:?}");
    assert!((w(&d, "standard", "burst") - 0.5).abs() < 1e-9);
    assert_eq!(w(&d, "standard", "hosted"), 0.0);
    // Demand within its usable capacity: all back on-prem, smoothly.
    let s = signals(NOW + 1000, &[("onprem", traffic(NOW + 1000, 50.0, 0, 4.0))]);
    let d2 = decide(&p, &Switches::default(), &s, &d);
    assert!((w(&d2, "standard", "onprem") - 0.6).abs() < 1e-9, "{d2:?}");
    let mut d = d2;
    for i in 2..10 {
        let s = signals(NOW + i * 1000, &[("onprem", traffic(NOW, 50.0, 0, 4.0))]);
        d = decide(&p, &Switches::default(), &s, &d);
    }
    assert_eq!(w(&d, "standard", "onprem"), 1.0);
}

#[test]
fn a_deep_vllm_queue_counts_as_full() {
    let p = three_tiers("  exploration: 0\n  burst_queue_depth: 2\n");
    let mut onprem = traffic(NOW, 50.0, 0, 8.0);
    onprem.queue = Some(Queue {
        waiting: 6.0,
        running: 2.0,
        kv_cache: Some(0.9),
    });
    let s = signals(NOW, &[("onprem", onprem)]);
    let d = decide(&p, &Switches::default(), &s, &Decision::default());
    // Usable capacity: 2 running + 2 tolerated waiting = 4 of 8 in flight.
    assert!((w(&d, "standard", "onprem") - 0.5).abs() < 1e-9, "{d:?}");
}

#[test]
fn an_endpoint_breaking_the_sla_is_ejected_and_returns_gradually() {
    let p = three_tiers("  exploration: 0\n");
    let sw = Switches::default();
    let warm = decide(&p, &sw, &signals(NOW, &[]), &Decision::default());
    assert_eq!(w(&warm, "standard", "onprem"), 1.0);

    let slow = signals(NOW, &[("onprem", traffic(NOW, 600.0, 0, 1.0))]);
    let d = decide(&p, &sw, &slow, &warm);
    assert_eq!(w(&d, "standard", "onprem"), 0.0, "ejected at once");
    assert_eq!(w(&d, "standard", "burst"), 1.0);
    let st = &d.standing["standard"]["onprem"];
    assert!(st.ejected(NOW), "{st:?}");
    assert!(st.reason.contains("p95 TTFT"), "{}", st.reason);
    assert_eq!(
        d.classes["standard"].fallback,
        ["burst", "hosted", "onprem"],
        "ejected endpoints go last"
    );
    // Still ejected within the minimum time, whatever the signals say.
    let d = decide(&p, &sw, &signals(NOW + 1500, &[]), &d);
    assert_eq!(w(&d, "standard", "onprem"), 0.0);
    // Then back, by at most max_step a computation, judged only on new samples.
    let mut d = d;
    let mut seen = vec![];
    for i in 0..12 {
        let t = NOW + 2000 + i * 1000;
        // The slow samples from before the ejection are still in the window.
        d = decide(
            &p,
            &sw,
            &signals(t, &[("onprem", traffic(NOW, 600.0, 0, 1.0))]),
            &d,
        );
        seen.push(w(&d, "standard", "onprem"));
    }
    assert!(
        seen.windows(2)
            .all(|p| p[1] >= p[0] && p[1] - p[0] <= 0.1 + 1e-9),
        "{seen:?}"
    );
    assert_eq!(*seen.last().unwrap(), 1.0, "{seen:?}");
}

/// `s` with the control plane's probes failing (down) or passing.
fn probed(mut s: EndpointSignals, down: bool) -> EndpointSignals {
    s.probe = Some(ProbeState {
        failures: if down { 2 } else { 0 },
        passes: if down { 0 } else { 2 },
        last_error: "connection refused".into(),
        down,
    });
    s
}

#[test]
fn a_down_endpoint_gets_weight_zero_at_once_and_returns_on_probation() {
    let p = three_tiers("  exploration: 0\n");
    let sw = Switches::default();
    let warm = decide(&p, &sw, &signals(NOW, &[]), &Decision::default());
    assert_eq!(w(&warm, "standard", "onprem"), 1.0);

    // Killed: its probes fail, and the sidecars saw errors before that.
    let dead =
        |t: u64, down: bool| signals(t, &[("onprem", probed(traffic(NOW, 50.0, 10, 0.0), down))]);
    let d = decide(&p, &sw, &dead(NOW, true), &warm);
    assert_eq!(w(&d, "standard", "onprem"), 0.0, "out at once");
    assert_eq!(w(&d, "standard", "burst"), 1.0);
    assert_eq!(
        d.down.get("onprem").map(String::as_str),
        Some("probe: connection refused")
    );
    assert_eq!(
        d.classes["standard"].fallback,
        ["burst", "hosted", "onprem"]
    );
    assert!(
        !d.standing["standard"]["onprem"].ejected(NOW),
        "down is not also judged on the SLA"
    );
    let d = decide(&p, &sw, &dead(NOW + 1000, true), &d);
    assert_eq!(w(&d, "standard", "onprem"), 0.0);

    // Probes pass: back on probation, climbing by at most max_step, and
    // not ejected for the errors it had while down.
    let mut d = d;
    let mut seen = vec![];
    let mut on_probation = vec![];
    for i in 0..14 {
        d = decide(&p, &sw, &dead(NOW + 2000 + i * 1000, false), &d);
        assert!(d.down.is_empty());
        seen.push(w(&d, "standard", "onprem"));
        on_probation.push(d.probation.contains_key("onprem"));
    }
    assert!((seen[0] - 0.1).abs() < 1e-9, "{seen:?}");
    assert!(
        seen.windows(2)
            .all(|p| p[1] >= p[0] && p[1] - p[0] <= 0.1 + 1e-9),
        "{seen:?}"
    );
    assert_eq!(*seen.last().unwrap(), 1.0, "{seen:?}");
    assert!(on_probation[0], "on probation while it climbs");
    assert!(!on_probation.last().unwrap(), "and not once it is back");
    assert_eq!(d.probation.get("onprem"), None);
}

#[test]
fn most_sidecars_ejecting_is_down_and_a_class_with_every_endpoint_down_still_routes() {
    let p = three_tiers("");
    let ejected = EndpointSignals {
        sidecars_reporting: 3,
        sidecars_ejecting: 2,
        ..Default::default()
    };
    let s = signals(NOW, &[("onprem", ejected.clone())]);
    let d = decide(&p, &Switches::default(), &s, &Decision::default());
    assert_eq!(
        d.down.get("onprem").map(String::as_str),
        Some("ejected by 2 of 3 sidecars")
    );
    assert_eq!(w(&d, "standard", "onprem"), 0.0);

    let all = signals(
        NOW,
        &[
            ("onprem", ejected.clone()),
            ("burst", probed(EndpointSignals::default(), true)),
            ("hosted", probed(EndpointSignals::default(), true)),
        ],
    );
    let d = decide(&p, &Switches::default(), &all, &Decision::default());
    let c = &d.classes["standard"];
    assert_eq!(d.down.len(), 3);
    assert!(c.unroutable.is_none());
    assert!((sum(c) - 1.0).abs() < 1e-9);
    assert!(c.note.as_deref().unwrap().contains("down"), "{c:?}");
}

#[test]
fn static_weights_leave_out_down_endpoints() {
    let p = Policy::parse(
        "\
default_class: standard
endpoints:
  - { name: a, url: 'http://127.0.0.1:1', tier: onprem, models: [m], price: { input_per_mtok: 0, output_per_mtok: 0 } }
  - { name: b, url: 'http://127.0.0.1:2', tier: onprem, models: [m], price: { input_per_mtok: 0, output_per_mtok: 0 } }
classes:
  - { name: standard, weights: { a: 0.5, b: 0.5 } }
",
    )
    .unwrap();
    let s = signals(NOW, &[("a", probed(EndpointSignals::default(), true))]);
    let d = decide(&p, &Switches::default(), &s, &Decision::default());
    assert_eq!(w(&d, "standard", "a"), 0.0);
    assert_eq!(w(&d, "standard", "b"), 1.0);
}

#[test]
fn repeated_ejections_last_longer() {
    let p = three_tiers("");
    let sw = Switches::default();
    let bad = |t: u64| signals(t, &[("onprem", traffic(t, 10.0, 8, 1.0))]);
    let d = decide(&p, &sw, &bad(NOW), &Decision::default());
    let first = d.standing["standard"]["onprem"].clone();
    assert_eq!(first.ejected_until_ms, NOW + 2000);
    assert!(first.reason.contains("error rate"), "{}", first.reason);
    // Back at NOW + 2000; errors again in the bucket after that.
    let d = decide(&p, &sw, &bad(NOW + 3000), &d);
    let second = &d.standing["standard"]["onprem"];
    assert_eq!(second.ejections, 2);
    assert_eq!(second.ejected_until_ms, NOW + 3000 + 4000);
}

#[test]
fn when_every_endpoint_breaks_the_sla_all_of_them_carry_the_class() {
    let p = three_tiers("");
    let s = signals(
        NOW,
        &[
            ("onprem", traffic(NOW, 900.0, 0, 1.0)),
            ("burst", traffic(NOW, 900.0, 0, 1.0)),
            ("hosted", traffic(NOW, 900.0, 0, 1.0)),
        ],
    );
    let d = decide(&p, &Switches::default(), &s, &Decision::default());
    let c = &d.classes["standard"];
    assert!(c.unroutable.is_none());
    assert!((sum(c) - 1.0).abs() < 1e-9);
    assert!(c.note.as_deref().unwrap().contains("breaks the SLA"));
}

#[test]
fn killed_and_drained_endpoints_leave_routes_and_chains_at_once() {
    let p = three_tiers("");
    let prev = decide(
        &p,
        &Switches::default(),
        &signals(NOW, &[]),
        &Decision::default(),
    );
    let mut sw = Switches::default();
    sw.killed.insert("onprem".into(), "disk on fire".into());
    let d = decide(&p, &sw, &signals(NOW, &[]), &prev);
    let c = &d.classes["standard"];
    assert!(!c.routes.contains_key("onprem"));
    assert!(!c.fallback.contains(&"onprem".to_string()));
    assert!((sum(c) - 1.0).abs() < 1e-9);

    let mut sw = Switches::default();
    sw.killed_providers
        .insert("cloud".into(), "contract ended".into());
    sw.drained.insert("onprem".into(), "maintenance".into());
    let d = decide(&p, &sw, &signals(NOW, &[]), &prev);
    let c = &d.classes["standard"];
    assert!(c.routes.is_empty() && c.fallback.is_empty());
    let why = c.unroutable.as_deref().unwrap();
    assert!(
        why.contains("onprem drained")
            && why.contains("burst killed")
            && why.contains("hosted killed"),
        "{why}"
    );
}

#[test]
fn an_endpoint_over_its_spend_budget_carries_nothing_while_another_can_and_goes_last_in_the_chain()
{
    let p = three_tiers("");
    let prev = decide(
        &p,
        &Switches::default(),
        &signals(NOW, &[]),
        &Decision::default(),
    );
    assert!(w(&prev, "standard", "onprem") > 0.5);
    let mut sw = Switches::default();
    sw.over_spend_budget.insert("onprem".into(), "spent".into());
    let d = decide(&p, &sw, &signals(NOW, &[]), &prev);
    let c = &d.classes["standard"];
    assert_eq!(w(&d, "standard", "onprem"), 0.0, "leaves at once");
    assert!((sum(c) - 1.0).abs() < 1e-9);
    assert_eq!(c.fallback.last().map(String::as_str), Some("onprem"));
    assert_eq!(d.over_spend_budget.keys().collect::<Vec<_>>(), ["onprem"]);
    assert!(
        d.routes_differ(&prev),
        "a new spend-budget standing is pushed"
    );

    // Everything over its spend budget: the class still routes, on all of them, and
    // says so; the sidecar applies the class's degradation.
    for e in ["burst", "hosted"] {
        sw.over_spend_budget.insert(e.into(), "spent".into());
    }
    let d = decide(&p, &sw, &signals(NOW, &[]), &d);
    let c = &d.classes["standard"];
    assert!(c.unroutable.is_none());
    assert!((sum(c) - 1.0).abs() < 1e-9);
    assert!(c.note.as_deref().unwrap().contains("over budget"));
}

#[test]
fn static_weights_are_kept_and_rescaled_around_switched_off_endpoints() {
    let p = Policy::parse(
        "\
default_class: s
endpoints:
  - { name: a, url: 'http://127.0.0.1:1', tier: onprem, models: [m], price: { input_per_mtok: 0, output_per_mtok: 0 } }
  - { name: b, url: 'http://127.0.0.1:2', tier: burst, models: [m], price: { input_per_mtok: 1, output_per_mtok: 1 } }
  - { name: c, url: 'http://127.0.0.1:3', tier: burst, models: [m], price: { input_per_mtok: 1, output_per_mtok: 1 } }
classes:
  - { name: s, weights: { a: 2, b: 1, c: 1 } }
",
    )
    .unwrap();
    let slow = signals(NOW, &[("a", traffic(NOW, 60_000.0, 0, 1.0))]);
    let d = decide(&p, &Switches::default(), &slow, &Decision::default());
    assert_eq!(w(&d, "s", "a"), 0.5, "pinned weights ignore signals");
    let mut sw = Switches::default();
    sw.drained.insert("b".into(), "x".into());
    let d = decide(&p, &sw, &slow, &d);
    assert!((w(&d, "s", "a") - 2.0 / 3.0).abs() < 1e-9);
    assert!((w(&d, "s", "c") - 1.0 / 3.0).abs() < 1e-9);
}

#[test]
fn interactive_classes_prefer_low_rtt_among_close_costs() {
    let p = Policy::parse(
        "\
default_class: chat
endpoints:
  - { name: far, url: 'http://127.0.0.1:1', tier: burst, models: [m], price: { input_per_mtok: 1.0, output_per_mtok: 1 } }
  - { name: near, url: 'http://127.0.0.1:2', tier: burst, models: [m], price: { input_per_mtok: 1.05, output_per_mtok: 1 } }
classes:
  - { name: chat, interactive: true }
  - { name: batch }
routing: { exploration: 0 }
",
    )
    .unwrap();
    let rtt = |ms| EndpointSignals {
        rtt_ms: Some(ms),
        ..Default::default()
    };
    let s = signals(NOW, &[("far", rtt(80.0)), ("near", rtt(5.0))]);
    let d = decide(&p, &Switches::default(), &s, &Decision::default());
    assert_eq!(w(&d, "chat", "near"), 1.0);
    assert_eq!(
        w(&d, "batch", "near"),
        0.5,
        "costs within 10% share equally"
    );
}

#[test]
fn overrides_pin_a_share_until_they_expire() {
    let p = three_tiers("  exploration: 0\n");
    let mut sw = Switches::default();
    sw.overrides.push(Override {
        endpoint: "hosted".into(),
        class: None,
        weight: 0.3,
        expires_ms: NOW + 5000,
    });
    let d = decide(&p, &sw, &signals(NOW, &[]), &Decision::default());
    assert!((w(&d, "standard", "hosted") - 0.3).abs() < 1e-9);
    assert!((w(&d, "standard", "onprem") - 0.7).abs() < 1e-9);
    // Expired: the weight returns smoothly.
    let d = decide(&p, &sw, &signals(NOW + 6000, &[]), &d);
    assert!((w(&d, "standard", "hosted") - 0.2).abs() < 1e-9, "{d:?}");
    // An override cannot revive a killed endpoint.
    sw.overrides[0].expires_ms = u64::MAX;
    sw.killed.insert("hosted".into(), "x".into());
    let d = decide(&p, &sw, &signals(NOW, &[]), &d);
    assert_eq!(w(&d, "standard", "hosted"), 0.0);
}

#[test]
fn small_moves_are_not_made() {
    let p = three_tiers("  exploration: 0\n");
    let s = |f| signals(NOW, &[("onprem", traffic(NOW, 50.0, 0, f))]);
    let d = decide(&p, &Switches::default(), &s(16.0), &Decision::default());
    // 16 → 16.5 in flight moves the target by 0.015, under the hysteresis.
    let d2 = decide(&p, &Switches::default(), &s(16.5), &d);
    assert!(!d2.routes_differ(&d), "{d:?} {d2:?}");
    let d3 = decide(&p, &Switches::default(), &s(20.0), &d2);
    assert!(d3.routes_differ(&d2));
}

#[test]
fn a_class_limited_to_models_never_reaches_other_endpoints() {
    let p = Policy::parse(
        "\
default_class: s
endpoints:
  - { name: a, url: 'http://127.0.0.1:1', tier: onprem, models: [m1], price: { input_per_mtok: 0, output_per_mtok: 0 } }
  - { name: b, url: 'http://127.0.0.1:2', tier: onprem, models: [m2], price: { input_per_mtok: 0, output_per_mtok: 0 } }
classes:
  - { name: s, models: [m2] }
",
    )
    .unwrap();
    let d = decide(
        &p,
        &Switches::default(),
        &signals(NOW, &[]),
        &Decision::default(),
    );
    assert_eq!(d.classes["s"].routes.keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(d.classes["s"].fallback, ["b"]);
}

// ---- properties ----

#[derive(Debug, Clone)]
struct Ep {
    tier: usize,
    price_in: u8,
    price_out: u8,
    capacity: u8,
    provider: Option<u8>,
    models: u8,
}

#[derive(Debug, Clone)]
struct Cl {
    tiers: Option<u8>,
    models: Option<u8>,
    interactive: bool,
}

#[derive(Debug, Clone)]
struct Sig {
    requests: u8,
    errors: u8,
    ttft_ms: u16,
    in_flight: u8,
    rtt_ms: Option<u8>,
}

const TIERS: [&str; 3] = ["onprem", "burst", "fallback"];

fn ep() -> impl Strategy<Value = Ep> {
    (
        0..3usize,
        0..6u8,
        0..6u8,
        0..12u8,
        proptest::option::of(0..2u8),
        1..4u8,
    )
        .prop_map(
            |(tier, price_in, price_out, capacity, provider, models)| Ep {
                tier,
                price_in,
                price_out,
                capacity,
                provider,
                models,
            },
        )
}

/// A class that names only models in `served` (a mask, as in `Ep`), so the
/// policy never fails validation for a model no endpoint serves.
fn cl(served: u8) -> impl Strategy<Value = Cl> {
    let models: Vec<u8> = (1..4u8).filter(|m| m & !served == 0).collect();
    (
        proptest::option::of(1..8u8),
        proptest::option::of(proptest::sample::select(models)),
        any::<bool>(),
    )
        .prop_map(|(tiers, models, interactive)| Cl {
            tiers,
            models,
            interactive,
        })
}

/// Endpoints, and classes that may use what they serve: always a valid
/// policy, so no generated case is thrown away untested.
fn fleet(
    endpoints: impl Into<SizeRange>,
    classes: impl Into<SizeRange>,
) -> impl Strategy<Value = (Vec<Ep>, Vec<Cl>)> {
    let classes = classes.into();
    proptest::collection::vec(ep(), endpoints).prop_flat_map(move |eps| {
        let served = eps.iter().fold(0, |m, e| m | e.models);
        (
            Just(eps),
            proptest::collection::vec(cl(served), classes.clone()),
        )
    })
}

fn sig() -> impl Strategy<Value = Sig> {
    (
        0..30u8,
        0..30u8,
        1..2000u16,
        0..40u8,
        proptest::option::of(0..200u8),
    )
        .prop_map(|(requests, errors, ttft_ms, in_flight, rtt_ms)| Sig {
            requests,
            errors,
            ttft_ms,
            in_flight,
            rtt_ms,
        })
}

fn models_of(mask: u8) -> Vec<&'static str> {
    ["m0", "m1"]
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, m)| *m)
        .collect()
}

/// Renders the generated parts as policy YAML, so new optional policy
/// fields never break these tests. The generators only make parts of a
/// valid policy; parts that make none are a bug in them, and fail the test
/// rather than pass it untested.
fn render(eps: &[Ep], classes: &[Cl], routing: (u8, u8, u8)) -> Policy {
    let mut y = String::from("default_class: c0\nendpoints:\n");
    for (i, e) in eps.iter().enumerate() {
        y.push_str(&format!(
            "  - {{ name: e{i}, url: 'http://127.0.0.1:{}', tier: {}, models: [{}], capacity: {}, {} price: {{ input_per_mtok: {}, output_per_mtok: {} }} }}\n",
            i + 1,
            TIERS[e.tier],
            models_of(e.models).join(", "),
            e.capacity,
            e.provider.map_or(String::new(), |p| format!("provider: p{p},")),
            e.price_in,
            e.price_out,
        ));
    }
    y.push_str("classes:\n");
    for (i, c) in classes.iter().enumerate() {
        let tiers: Vec<&str> = c.tiers.map_or(vec![], |m| {
            TIERS
                .iter()
                .enumerate()
                .filter(|(k, _)| m & (1 << k) != 0)
                .map(|(_, t)| *t)
                .collect()
        });
        y.push_str(&format!(
            "  - {{ name: c{i}, ttft_p95_ms: 500, interactive: {}{}{} }}\n",
            c.interactive,
            if tiers.is_empty() {
                String::new()
            } else {
                format!(", tiers: [{}]", tiers.join(", "))
            },
            c.models.map_or(String::new(), |m| format!(
                ", models: [{}]",
                models_of(m).join(", ")
            )),
        ));
    }
    let (exploration, step, hyst) = routing;
    let max_step = 0.05 + f64::from(step) / 100.0;
    y.push_str(&format!(
        "routing: {{ exploration: {}, max_step: {max_step}, hysteresis: {}, min_requests: 5, min_ejection_ms: 2000 }}\n",
        f64::from(exploration) / 100.0,
        max_step * f64::from(hyst) / 100.0,
    ));
    Policy::parse(&y).unwrap_or_else(|e| panic!("the generators made an invalid policy: {e}\n{y}"))
}

fn make_signals(now: u64, sigs: &[Sig]) -> Signals {
    let eps: Vec<(String, EndpointSignals)> = sigs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!("e{i}"),
                EndpointSignals {
                    buckets: vec![Bucket::synthetic(
                        now - 1000,
                        u64::from(s.requests),
                        u64::from(s.errors),
                        f64::from(s.ttft_ms),
                    )
                    .unwrap()],
                    in_flight: f64::from(s.in_flight),
                    rtt_ms: s.rtt_ms.map(f64::from),
                    queue: None,
                    ..Default::default()
                },
            )
        })
        .collect();
    Signals {
        now_ms: now,
        window_start_ms: now - 10_000,
        endpoints: eps.into_iter().collect(),
    }
}

/// Signals that break no SLA: too few requests to judge, no RTT.
fn quiet(sigs: &[Sig]) -> Vec<Sig> {
    sigs.iter()
        .map(|s| Sig {
            requests: s.requests % 5,
            errors: 0,
            rtt_ms: None,
            ..s.clone()
        })
        .collect()
}

fn switches(n: usize, killed: u8, drained: u8, providers: u8) -> Switches {
    let mut sw = Switches::default();
    for i in 0..n {
        if killed & (1 << i) != 0 {
            sw.killed.insert(format!("e{i}"), "test".into());
        }
        if drained & (1 << i) != 0 {
            sw.drained.insert(format!("e{i}"), "test".into());
        }
    }
    for p in 0..2 {
        if providers & (1 << p) != 0 {
            sw.killed_providers.insert(format!("p{p}"), "test".into());
        }
    }
    sw
}

fn check_invariants(p: &Policy, sw: &Switches, d: &Decision) -> Result<(), TestCaseError> {
    for class in &p.classes {
        let c = &d.classes[&class.name];
        match &c.unroutable {
            Some(why) => {
                prop_assert!(!why.is_empty());
                prop_assert!(c.routes.is_empty());
            }
            None => {
                prop_assert!(
                    !c.routes.is_empty(),
                    "{}: routable but no route",
                    class.name
                );
                prop_assert!(
                    (sum(c) - 1.0).abs() < 1e-6,
                    "{}: sum {}",
                    class.name,
                    sum(c)
                );
            }
        }
        // An endpoint over its spend budget carries the class only when no
        // eligible one within its spend budget can (static weights are
        // normalised over the eligible ones, over spend budget or not).
        let within = p.endpoints.iter().any(|e| {
            class.may_use(e) && sw.off(e).is_none() && !sw.over_spend_budget.contains_key(&e.name)
        });
        if within {
            for name in c.routes.keys() {
                prop_assert!(
                    !sw.over_spend_budget.contains_key(name),
                    "{} routed to {name}, over its spend budget, with an endpoint within its own",
                    class.name
                );
            }
        }
        for (name, weight) in &c.routes {
            prop_assert!(weight.is_finite() && *weight > 0.0);
            prop_assert!(
                c.fallback.contains(name),
                "{name} routed but not in the chain"
            );
        }
        for e in &p.endpoints {
            let forbidden = !class.may_use(e);
            if forbidden || sw.off(e).is_some() {
                prop_assert!(
                    !c.routes.contains_key(&e.name),
                    "{} routed to {}",
                    class.name,
                    e.name
                );
                prop_assert!(
                    !c.fallback.contains(&e.name),
                    "{} chains {}",
                    class.name,
                    e.name
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn weights_sum_to_one_and_never_reach_forbidden_or_switched_off_endpoints(
        (eps, classes) in fleet(1..6, 1..4),
        sigs in proptest::collection::vec(sig(), 6),
        routing in (0..10u8, 0..45u8, 0..100u8),
        (killed, drained, providers) in (any::<u8>(), any::<u8>(), 0..4u8),
        over in any::<u8>(),
        steps in 1..6usize,
    ) {
        let p = render(&eps, &classes, routing);
        let mut sw = switches(eps.len(), killed, drained, providers);
        for i in (0..eps.len()).filter(|i| over & (1 << i) != 0) {
            sw.over_spend_budget.insert(format!("e{i}"), "test".into());
        }
        let mut d = Decision::default();
        for i in 0..steps {
            let s = make_signals(NOW + i as u64 * 1000, &sigs[..eps.len()]);
            d = decide(&p, &sw, &s, &d);
            check_invariants(&p, &sw, &d)?;
        }
    }

    #[test]
    fn each_step_moves_any_weight_by_at_most_max_step(
        (eps, classes) in fleet(1..6, 1..4),
        before in proptest::collection::vec(sig(), 6),
        after in proptest::collection::vec(sig(), 6),
        routing in (0..10u8, 0..45u8, 0..100u8),
    ) {
        let p = render(&eps, &classes, routing);
        let sw = Switches::default();
        let n = eps.len();
        let d1 = decide(&p, &sw, &make_signals(NOW, &quiet(&before[..n])), &Decision::default());
        let d2 = decide(&p, &sw, &make_signals(NOW + 1000, &quiet(&after[..n])), &d1);
        for class in &p.classes {
            let (a, b) = (&d1.classes[&class.name], &d2.classes[&class.name]);
            for e in &p.endpoints {
                let x = a.routes.get(&e.name).copied().unwrap_or(0.0);
                let y = b.routes.get(&e.name).copied().unwrap_or(0.0);
                prop_assert!((x - y).abs() <= p.routing.max_step + 1e-6,
                    "{}/{}: {x} -> {y}, max step {}", class.name, e.name, p.routing.max_step);
            }
        }
    }

    #[test]
    fn a_strictly_cheaper_endpoint_never_gets_less_at_equal_load(
        tier in 0..3usize,
        capacity in 0..12u8,
        (cheap, dearer) in (0..5u8, 1..6u8),
        others in proptest::collection::vec(ep(), 0..4),
        shared in sig(),
        other_sigs in proptest::collection::vec(sig(), 4),
        exploration in 0..10u8,
    ) {
        let dearer = cheap + dearer;
        let mut eps = vec![
            Ep { tier, price_in: cheap, price_out: cheap, capacity, provider: None, models: 1 },
            Ep { tier, price_in: dearer, price_out: dearer, capacity, provider: None, models: 1 },
        ];
        eps.extend(others.iter().cloned());
        let class = Cl { tiers: None, models: None, interactive: false };
        let p = render(&eps, &[class], (exploration, 10, 20));
        let mut sigs = vec![shared.clone(), shared];
        sigs.extend(other_sigs[..others.len()].iter().cloned());
        let d = decide(&p, &Switches::default(), &make_signals(NOW, &sigs), &Decision::default());
        prop_assert!(w(&d, "c0", "e0") + 1e-9 >= w(&d, "c0", "e1"), "{d:?}");
    }

    #[test]
    fn constant_signals_settle_instead_of_oscillating(
        (eps, classes) in fleet(1..6, 1..4),
        sigs in proptest::collection::vec(sig(), 6),
        routing in (0..10u8, 0..45u8, 0..100u8),
    ) {
        let p = render(&eps, &classes, routing);
        let sw = Switches::default();
        let mut d = Decision::default();
        let mut changes = vec![];
        for i in 0..60u64 {
            // The same samples all along, taken before the first step.
            let mut s = make_signals(NOW, &sigs[..eps.len()]);
            s.now_ms = NOW + i * 1000;
            let next = decide(&p, &sw, &s, &d);
            changes.push(next.routes_differ(&d));
            d = next;
        }
        prop_assert!(changes[45..].iter().all(|c| !c), "{changes:?}");
    }

    #[test]
    fn down_endpoints_carry_nothing_while_an_eligible_one_is_up(
        (eps, classes) in fleet(1..6, 1..4),
        sigs in proptest::collection::vec(sig(), 6),
        routing in (0..10u8, 0..45u8, 0..100u8),
        down in any::<u8>(),
        steps in 1..4usize,
    ) {
        let p = render(&eps, &classes, routing);
        let sw = Switches::default();
        let mut d = Decision::default();
        for i in 0..steps {
            let mut s = make_signals(NOW + i as u64 * 1000, &sigs[..eps.len()]);
            for (j, e) in s.endpoints.values_mut().enumerate() {
                if down & (1 << j) != 0 {
                    e.sidecars_reporting = 1;
                    e.sidecars_ejecting = 1;
                }
            }
            d = decide(&p, &sw, &s, &d);
            check_invariants(&p, &sw, &d)?;
            for class in &p.classes {
                let c = &d.classes[&class.name];
                let up = p.endpoints.iter().any(|e| class.may_use(e) && !d.down.contains_key(&e.name));
                if up && class.weights.is_none() {
                    for name in c.routes.keys() {
                        prop_assert!(!d.down.contains_key(name), "{} routed to {name}, down: {d:?}", class.name);
                    }
                }
                for name in d.down.keys() {
                    prop_assert!(!d.probation.contains_key(name));
                }
            }
        }
    }

    #[test]
    fn every_healthy_endpoint_keeps_its_exploration_share(
        eps in proptest::collection::vec(ep(), 2..6),
        sigs in proptest::collection::vec(sig(), 6),
        exploration in 1..10u8,
    ) {
        let class = Cl { tiers: None, models: None, interactive: false };
        let p = render(&eps, &[class], (exploration, 10, 20));
        let n = eps.len();
        let d = decide(&p, &Switches::default(), &make_signals(NOW, &quiet(&sigs[..n])), &Decision::default());
        let floor = p.routing.exploration.min(EXPLORATION_CAP / n as f64);
        for e in &p.endpoints {
            prop_assert!(w(&d, "c0", &e.name) + 1e-9 >= floor, "{} below {floor}: {d:?}", e.name);
        }
    }
}
