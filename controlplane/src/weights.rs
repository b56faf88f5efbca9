//! The decision: which share of each request class goes to which endpoint.
//! A pure function of the policy, the operator's switches, the telemetry
//! signals and the previous decision — no I/O, no clock (the time comes in
//! with the signals) — so every rule below is unit- and property-tested.
//!
//! Health comes first, per endpoint: an endpoint the control plane judges
//! down (its probes fail, or most reporting sidecars have ejected it; see
//! `health`) gets weight 0 in every class, at once, and goes last in the
//! fallback chains but stays in them (a degraded route beats none: when
//! every endpoint a class may use is down, they all carry it). When it is
//! up again it returns on probation: judged only on samples from then on,
//! with its weight climbing by at most `max_step` per computation (rule 5)
//! until it reaches its share; the decision lists it as on probation until
//! then.
//!
//! Per class, in order:
//! 1. Eligibility. Only endpoints the class may use (tier, models) that are
//!    neither killed (by name or provider) nor drained. None left: the class
//!    is unroutable, with the reason.
//! 2. SLA and outlier ejection. An endpoint whose error rate, or whose
//!    predicted p95 TTFT (measured p95 plus RTT, timeouts counting as
//!    infinitely slow) breaks the class's SLA is ejected for
//!    `min_ejection_ms`, doubling on each repeat up to `max_ejection_ms`.
//!    Ejection ends by itself; the endpoint then returns on probation,
//!    judged only on samples taken since, and its weight climbs back by at
//!    most `max_step` per computation. When every eligible endpoint is
//!    ejected, all of them carry the class (a degraded route beats none).
//!    Spend budgets come before the SLA: an endpoint over its spend budget
//!    carries nothing while any eligible endpoint within its spend budget
//!    exists, ejected or not, and goes last in the chain.
//! 3. Fill. Healthy endpoints are taken in tier order, cheapest first;
//!    each takes traffic up to its usable capacity (capacity ×
//!    `burst_utilisation`, less when its scraped vLLM queue is deeper than
//!    `burst_queue_depth`) measured against the demand (requests in flight
//!    over the class's endpoints); the rest overflows to the next. Endpoints
//!    of close cost (`cost_tolerance`) share equally, or, for interactive
//!    classes, are filled lowest RTT first.
//! 4. Exploration. Every healthy endpoint left with less than
//!    `exploration` gets that much, so its signals stay fresh.
//! 5. Smoothing. The weights move from the previous ones towards that
//!    target along a straight line, by at most `max_step` for any endpoint,
//!    and not at all when no weight would move by `hysteresis` or more and
//!    no endpoint enters or leaves the route. Both ends sum to one, so every
//!    point between does. Kills, drains and ejections are not smoothed:
//!    their endpoint leaves at once and the others are rescaled.
//! 6. Overrides. An operator's weight for an endpoint holds until it expires;
//!    the others are scaled into what is left. Overrides cannot revive a
//!    killed, drained or forbidden endpoint.
//!
//! A class with static `weights` in the policy keeps them (normalised over
//! the endpoints not switched off); the operator pinned that split.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use switchyard_policy::{Class, Endpoint, Policy};

use crate::signals::Signals;

/// Weights below this are dropped: they would route nothing.
const NEGLIGIBLE: f64 = 1e-6;
/// Share of traffic exploration may take from a class in total.
const EXPLORATION_CAP: f64 = 0.5;
/// An ejection within this many minimum ejection times of the previous
/// return counts as a repeat and lasts longer.
const REPEAT_MEMORY: u64 = 4;

/// The operator's switches in force (from the admin API and its store).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Switches {
    /// Killed endpoints, by name, with the reason.
    pub killed: BTreeMap<String, String>,
    /// Killed providers: every endpoint naming one is killed.
    pub killed_providers: BTreeMap<String, String>,
    pub drained: BTreeMap<String, String>,
    pub overrides: Vec<Override>,
    /// Endpoints whose spend over the last hour reached their spend budget,
    /// with the reason. Set by the control plane from its ledger, not by an
    /// operator: such an endpoint is used only when no endpoint within its
    /// spend budget can carry the class.
    pub over_spend_budget: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Override {
    pub endpoint: String,
    /// `None`: every class that may use the endpoint.
    pub class: Option<String>,
    /// Share of the class's traffic, 0 to 1.
    pub weight: f64,
    /// Wall-clock milliseconds; the override is ignored from then on.
    pub expires_ms: u64,
}

/// Why an endpoint is switched off, if it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Off {
    Killed(String),
    Drained(String),
}

impl Switches {
    pub fn off(&self, e: &Endpoint) -> Option<Off> {
        if let Some(r) = self.killed.get(&e.name) {
            return Some(Off::Killed(r.clone()));
        }
        if let Some(r) = e
            .provider
            .as_ref()
            .and_then(|p| self.killed_providers.get(p))
        {
            return Some(Off::Killed(r.clone()));
        }
        self.drained.get(&e.name).map(|r| Off::Drained(r.clone()))
    }
}

/// Where one class's traffic goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassDecision {
    /// Positive weights summing to 1; empty exactly when unroutable.
    pub routes: BTreeMap<String, f64>,
    /// Failover order: every endpoint the class may still use, healthy ones
    /// first, in tier order and then by cost.
    pub fallback: Vec<String>,
    pub unroutable: Option<String>,
    /// Anything unusual about how the class is routed, for operators.
    pub note: Option<String>,
}

/// One endpoint's standing with one class: ejected or not, and why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Standing {
    /// Wall-clock ms the current ejection ends; 0 when not ejected.
    pub ejected_until_ms: u64,
    /// Why it was last ejected.
    pub reason: String,
    /// Ejections in a row; each doubles the next one's length.
    pub ejections: u32,
    /// When it last came back from an ejection; it is judged only on
    /// samples from then on. 0: never ejected.
    pub returned_ms: u64,
}

impl Standing {
    pub fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms > now_ms
    }
}

/// The whole decision: what the table carries, and the state the next
/// computation starts from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub classes: BTreeMap<String, ClassDecision>,
    /// Class → endpoint → standing.
    pub standing: BTreeMap<String, BTreeMap<String, Standing>>,
    /// Endpoints over their spend budget, with the reason; the table flags
    /// them. Stored under its old key, so a saved decision still loads.
    #[serde(default, rename = "over_budget")]
    pub over_spend_budget: BTreeMap<String, String>,
    /// Endpoints judged down, with the reason: weight 0 everywhere.
    #[serde(default)]
    pub down: BTreeMap<String, String>,
    /// Endpoints back from down whose weight is still climbing, with the
    /// wall-clock ms they came back.
    #[serde(default)]
    pub probation: BTreeMap<String, u64>,
}

impl Decision {
    /// Whether the routes, chains or routability differ in a way a sidecar
    /// would notice; standing alone changes nothing it routes on.
    pub fn routes_differ(&self, other: &Decision) -> bool {
        if self.classes.len() != other.classes.len()
            || !self
                .over_spend_budget
                .keys()
                .eq(other.over_spend_budget.keys())
        {
            return true;
        }
        self.classes.iter().any(|(name, a)| {
            let Some(b) = other.classes.get(name) else {
                return true;
            };
            a.fallback != b.fallback
                || a.unroutable != b.unroutable
                || a.routes.len() != b.routes.len()
                || a.routes.iter().any(|(e, w)| {
                    b.routes
                        .get(e)
                        .is_none_or(|v| (v - w).abs() > NEGLIGIBLE / 10.0)
                })
        })
    }
}

/// Blended price of a request in USD per million tokens, with the observed
/// mix of input and output tokens (3:1 before any is observed).
fn cost(e: &Endpoint, mix: (u64, u64)) -> f64 {
    let (i, o) = if mix.0 + mix.1 == 0 {
        (3.0, 1.0)
    } else {
        (mix.0 as f64, mix.1 as f64)
    };
    (e.price.input_per_mtok * i + e.price.output_per_mtok * o) / (i + o)
}

/// Predicted p95 TTFT: the measured p95 as sidecars saw it plus one RTT,
/// the handshake a fresh connection adds and pooled samples do not show.
/// With too few samples, only the RTT is known: a floor, not a guess.
fn breach(
    policy: &Policy,
    class: &Class,
    e: &Endpoint,
    signals: &Signals,
    since_ms: u64,
) -> Option<String> {
    let s = signals.get(&e.name)?;
    let rtt = s.rtt_ms.unwrap_or(0.0);
    let target = f64::from(class.ttft_target_ms());
    let sum = s.summary(since_ms.max(signals.window_start_ms));
    if sum.requests >= u64::from(policy.routing.min_requests.max(1)) {
        let rate = sum.error_rate();
        if rate > class.max_error_rate {
            return Some(format!(
                "error rate {:.0}% over {} requests breaks the class's {:.0}%",
                rate * 100.0,
                sum.requests,
                class.max_error_rate * 100.0
            ));
        }
        if let Some(p95) = sum.ttft_p95_ms {
            let predicted = p95 + rtt;
            if predicted > target {
                return Some(if predicted.is_finite() {
                    format!(
                        "predicted p95 TTFT {predicted:.0} ms breaks the class's {target:.0} ms"
                    )
                } else {
                    format!("over 5% of {} requests timed out", sum.requests)
                });
            }
        }
    } else if rtt > target {
        return Some(format!(
            "RTT {rtt:.0} ms alone exceeds the class's {target:.0} ms p95 TTFT"
        ));
    }
    None
}

/// The most traffic an endpoint should carry before its tier overflows, in
/// concurrent requests; infinite when nothing bounds it.
fn usable_capacity(policy: &Policy, e: &Endpoint, signals: &Signals) -> f64 {
    let mut k = if e.capacity > 0 {
        f64::from(e.capacity) * policy.routing.burst_utilisation
    } else {
        f64::INFINITY
    };
    if let (Some(max_waiting), Some(q)) = (
        policy.routing.burst_queue_depth,
        signals.get(&e.name).and_then(|s| s.queue),
    ) {
        if q.waiting > max_waiting {
            // Full whatever its nominal capacity: it holds what runs now,
            // plus the queue the policy tolerates.
            k = k.min(q.running + max_waiting);
        }
    }
    k
}

/// Splits `amount` over endpoints with per-endpoint caps, as evenly as the
/// caps allow. Returns what each was given and what was placed in all.
fn water_fill(caps: &[f64], amount: f64) -> (Vec<f64>, f64) {
    let mut placed = vec![0.0; caps.len()];
    let mut open = vec![true; caps.len()];
    let mut left = amount;
    loop {
        let n = open.iter().filter(|o| **o).count();
        if left <= 1e-12 || n == 0 {
            break;
        }
        // Each round offers every open endpoint an equal share; those with
        // less room than that are filled and close.
        let share = left / n as f64;
        let mut closed = false;
        for ((cap, out), is_open) in caps.iter().zip(&mut placed).zip(&mut open) {
            let room = cap - *out;
            if *is_open && room <= share {
                *out += room.max(0.0);
                left -= room.max(0.0);
                *is_open = false;
                closed = true;
            }
        }
        if !closed {
            for (out, _) in placed.iter_mut().zip(&open).filter(|(_, o)| **o) {
                *out += share;
            }
            left = 0.0;
        }
    }
    (placed, amount - left.max(0.0))
}

/// One endpoint of `active` while its target weight is worked out.
struct Slot<'a> {
    /// Position in `active`: the weights go back in that order.
    pos: usize,
    e: &'a Endpoint,
    rank: Option<usize>,
    cost: f64,
    /// The share of the class's demand it takes before its tier overflows.
    cap: f64,
    /// Which group it fills with: a run of one tier, cost within tolerance
    /// of the run's cheapest. Numbered from 1 in fill order.
    group: usize,
    w: f64,
}

/// The target weights before smoothing, over `active` (healthy endpoints,
/// or all eligible ones when none is healthy), in the order of `active`.
fn target(policy: &Policy, class: &Class, active: &[&Endpoint], signals: &Signals) -> Vec<f64> {
    let mix = signals.token_mix();
    // Demand, in concurrent requests, over every endpoint the class uses.
    let demand: f64 = active
        .iter()
        .filter_map(|e| signals.get(&e.name))
        .map(|s| s.in_flight)
        .sum();
    let mut slots: Vec<Slot> = active
        .iter()
        .enumerate()
        .map(|(pos, e)| Slot {
            pos,
            e,
            rank: policy.tiers.iter().position(|t| *t == e.tier),
            cost: cost(e, mix),
            cap: if demand <= 0.0 {
                f64::INFINITY
            } else {
                usable_capacity(policy, e, signals) / demand
            },
            group: 0,
            w: 0.0,
        })
        .collect();
    slots.sort_by(|a, b| {
        a.rank
            .cmp(&b.rank)
            .then(a.cost.total_cmp(&b.cost))
            .then(a.e.name.cmp(&b.e.name))
    });
    let tolerance = 1.0 + policy.routing.cost_tolerance;
    let mut groups = 0;
    let mut head = None;
    for s in &mut slots {
        let joins =
            head.is_some_and(|(tier, c0)| s.e.tier == tier && s.cost <= c0 * tolerance + 1e-9);
        if !joins {
            groups += 1;
            head = Some((s.e.tier, s.cost));
        }
        s.group = groups;
    }
    let mut left = 1.0;
    for g in 1..=groups {
        if left <= 1e-12 {
            break;
        }
        let mut group: Vec<&mut Slot> = slots.iter_mut().filter(|s| s.group == g).collect();
        if class.interactive {
            let rtt = |s: &Slot| {
                signals
                    .get(&s.e.name)
                    .and_then(|x| x.rtt_ms)
                    .unwrap_or(f64::INFINITY)
            };
            group.sort_by(|a, b| rtt(a).total_cmp(&rtt(b)));
            for s in group {
                let take = s.cap.min(left);
                s.w += take;
                left -= take;
            }
        } else {
            let caps: Vec<f64> = group.iter().map(|s| s.cap).collect();
            let (placed, total) = water_fill(&caps, left);
            left -= total;
            for (s, p) in group.into_iter().zip(placed) {
                s.w += p;
            }
        }
    }
    if left > 1e-12 {
        // Every endpoint is at its usable capacity: spread the excess in
        // proportion to those capacities, so the load stays as even as they.
        let total: f64 = slots.iter().map(|s| s.cap).filter(|c| c.is_finite()).sum();
        let n = slots.len() as f64;
        for s in &mut slots {
            s.w += if total > 0.0 {
                left * s.cap / total
            } else {
                left / n
            };
        }
    }
    slots.sort_by_key(|s| s.pos);
    let mut w: Vec<f64> = slots.iter().map(|s| s.w).collect();
    explore(&mut w, policy.routing.exploration);
    w
}

/// Exploration: standby endpoints (under `eps`) are lifted to the floor and
/// the others scaled into what is left; scaling may push another under the
/// floor, so the standby set grows until it is stable.
fn explore(w: &mut [f64], eps: f64) {
    if eps <= 0.0 || w.len() < 2 {
        return;
    }
    let mut standby: Vec<bool> = w.iter().map(|x| *x < eps).collect();
    loop {
        let n = standby.iter().filter(|s| **s).count();
        if n == 0 {
            return;
        }
        if n == w.len() {
            w.iter_mut().for_each(|x| *x = 1.0 / n as f64);
            return;
        }
        let each = eps.min(EXPLORATION_CAP / n as f64);
        let rest: f64 = w
            .iter()
            .zip(&standby)
            .filter(|(_, s)| !**s)
            .map(|(x, _)| x)
            .sum();
        let scale = (1.0 - each * n as f64) / rest;
        let grew = w.iter().zip(&standby).any(|(x, s)| !*s && x * scale < each);
        if grew {
            for (x, s) in w.iter().zip(&mut standby) {
                *s = *s || x * scale < each;
            }
            continue;
        }
        for (x, s) in w.iter_mut().zip(&standby) {
            *x = if *s { each } else { *x * scale };
        }
        return;
    }
}

fn normalise(m: &mut BTreeMap<String, f64>) {
    m.retain(|_, w| w.is_finite() && *w > NEGLIGIBLE);
    let total: f64 = m.values().sum();
    if total > 0.0 {
        for w in m.values_mut() {
            *w /= total;
        }
    }
}

/// Moves from `prev` towards `target` as the module doc says.
fn smooth(
    prev: &BTreeMap<String, f64>,
    target: &BTreeMap<String, f64>,
    max_step: f64,
    hysteresis: f64,
) -> BTreeMap<String, f64> {
    let mut from: BTreeMap<String, f64> = prev
        .iter()
        .filter(|(e, _)| target.contains_key(*e))
        .map(|(e, w)| (e.clone(), *w))
        .collect();
    if from.len() != prev.len() {
        normalise(&mut from);
    }
    if from.is_empty() {
        return target.clone();
    }
    let keys: BTreeSet<&String> = from.keys().chain(target.keys()).collect();
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let largest = keys
        .iter()
        .map(|k| (get(target, k) - get(&from, k)).abs())
        .fold(0.0, f64::max);
    let same_set = keys
        .iter()
        .all(|k| (get(target, k) > NEGLIGIBLE) == from.contains_key(*k));
    if largest < hysteresis.max(1e-12) && same_set {
        return from;
    }
    let alpha = (max_step / largest).min(1.0);
    let mut out: BTreeMap<String, f64> = keys
        .iter()
        .map(|k| {
            let (a, b) = (get(&from, k), get(target, k));
            ((*k).clone(), a + alpha * (b - a))
        })
        .collect();
    out.retain(|_, w| *w > NEGLIGIBLE);
    out
}

/// Applies the operator's overrides for `class` over the eligible endpoints.
fn apply_overrides(
    routes: &mut BTreeMap<String, f64>,
    class: &str,
    eligible: &[&Endpoint],
    switches: &Switches,
    now_ms: u64,
) -> bool {
    let mut forced: BTreeMap<String, f64> = BTreeMap::new();
    for o in &switches.overrides {
        let applies = o.expires_ms > now_ms
            && o.class.as_deref().is_none_or(|c| c == class)
            && eligible.iter().any(|e| e.name == o.endpoint)
            && o.weight.is_finite();
        if applies {
            forced.insert(o.endpoint.clone(), o.weight.clamp(0.0, 1.0));
        }
    }
    if forced.is_empty() {
        return false;
    }
    let forced_total: f64 = forced.values().sum();
    let rest_total: f64 = routes
        .iter()
        .filter(|(e, _)| !forced.contains_key(*e))
        .map(|(_, w)| w)
        .sum();
    if forced_total >= 1.0 || rest_total <= 0.0 {
        *routes = forced;
    } else {
        let scale = (1.0 - forced_total) / rest_total;
        for (e, w) in routes.iter_mut() {
            if !forced.contains_key(e) {
                *w *= scale;
            }
        }
        routes.extend(forced);
    }
    normalise(routes);
    true
}

/// The next decision. See the module documentation for the rules.
pub fn decide(
    policy: &Policy,
    switches: &Switches,
    signals: &Signals,
    prev: &Decision,
) -> Decision {
    let now = signals.now_ms;
    let r = &policy.routing;
    let mix = signals.token_mix();
    let rank = |e: &Endpoint| policy.tiers.iter().position(|t| *t == e.tier);
    let mut out = Decision::default();
    let down: BTreeMap<String, String> = policy
        .endpoints
        .iter()
        .filter_map(|e| {
            let why = signals.get(&e.name)?.down()?;
            Some((e.name.clone(), why))
        })
        .collect();
    let is_down = |e: &Endpoint| down.contains_key(&e.name);
    // Up again since the previous decision: on probation from now.
    let returning: BTreeSet<&String> = prev
        .down
        .keys()
        .filter(|n| !down.contains_key(*n))
        .collect();
    let mut probation: BTreeMap<String, u64> = policy
        .endpoints
        .iter()
        .filter(|e| !is_down(e))
        .filter_map(|e| {
            let since = if returning.contains(&e.name) {
                Some(now)
            } else {
                prev.probation.get(&e.name).copied()
            };
            since.map(|t| (e.name.clone(), t))
        })
        .collect();
    // Endpoints on probation still below their share in some class.
    let mut climbing: BTreeSet<String> = BTreeSet::new();
    for class in &policy.classes {
        let allowed: Vec<&Endpoint> = policy
            .endpoints
            .iter()
            .filter(|e| class.may_use(e) && rank(e).is_some())
            .collect();
        let eligible: Vec<&Endpoint> = allowed
            .iter()
            .copied()
            .filter(|e| switches.off(e).is_none())
            .collect();

        // Standing: carried over for every endpoint, updated for eligible ones.
        let prev_standing = prev.standing.get(&class.name);
        let mut standing: BTreeMap<String, Standing> = policy
            .endpoints
            .iter()
            .filter_map(|e| {
                prev_standing
                    .and_then(|s| s.get(&e.name))
                    .map(|s| (e.name.clone(), s.clone()))
            })
            .collect();
        let dynamic = class.weights.is_none();
        if dynamic {
            for e in &eligible {
                let st = standing.entry(e.name.clone()).or_default();
                if is_down(e) {
                    // Down says more than the SLA can; its failures while
                    // down are not held against it on return.
                    continue;
                }
                if returning.contains(&e.name) {
                    st.ejected_until_ms = 0;
                    st.returned_ms = now;
                }
                if st.ejected(now) {
                    continue;
                }
                if st.ejected_until_ms > 0 {
                    // The ejection ran out: back on probation from its end.
                    st.returned_ms = st.ejected_until_ms;
                    st.ejected_until_ms = 0;
                }
                if let Some(why) = breach(policy, class, e, signals, st.returned_ms) {
                    let min = u64::from(r.min_ejection_ms);
                    let repeat = st.returned_ms > 0
                        && now.saturating_sub(st.returned_ms) < REPEAT_MEMORY * min;
                    st.ejections = if repeat { st.ejections + 1 } else { 1 };
                    let length = min
                        .saturating_mul(1 << (st.ejections - 1).min(16))
                        .min(u64::from(r.max_ejection_ms));
                    st.ejected_until_ms = now + length.max(1);
                    st.reason = why;
                }
            }
        }
        let is_ejected = |e: &Endpoint| standing.get(&e.name).is_some_and(|s| s.ejected(now));
        let over = |e: &Endpoint| switches.over_spend_budget.contains_key(&e.name);

        let mut fallback: Vec<&Endpoint> = eligible.clone();
        fallback.sort_by(|a, b| {
            over(a)
                .cmp(&over(b))
                .then(is_down(a).cmp(&is_down(b)))
                .then(is_ejected(a).cmp(&is_ejected(b)))
                .then(rank(a).cmp(&rank(b)))
                .then(cost(a, mix).total_cmp(&cost(b, mix)))
                .then(a.name.cmp(&b.name))
        });
        let mut decision = ClassDecision {
            fallback: fallback.iter().map(|e| e.name.clone()).collect(),
            ..ClassDecision::default()
        };

        if allowed.is_empty() {
            decision.unroutable =
                Some("no endpoint in the policy serves this class's tiers and models".to_string());
        } else if eligible.is_empty() {
            let off: Vec<String> = allowed
                .iter()
                .map(|e| match switches.off(e) {
                    Some(Off::Killed(_)) => format!("{} killed", e.name),
                    _ => format!("{} drained", e.name),
                })
                .collect();
            decision.unroutable = Some(format!(
                "every endpoint the class may use is switched off: {}",
                off.join(", ")
            ));
        } else {
            let mut pinned = BTreeMap::new();
            if let Some(w) = &class.weights {
                pinned = eligible
                    .iter()
                    .filter(|e| !over(e) && !is_down(e))
                    .filter_map(|e| w.get(&e.name).map(|v| (e.name.clone(), *v)))
                    .collect();
                normalise(&mut pinned);
            }
            let routes = if !pinned.is_empty() {
                pinned
            } else {
                if class.weights.is_some() {
                    decision.note = Some(
                        "every endpoint with a static weight is switched off, over budget or down; weights computed"
                            .to_string(),
                    );
                }
                // A spend budget is firmer than the SLA: endpoints within
                // theirs that break the SLA still come before those over.
                let within: Vec<&Endpoint> =
                    eligible.iter().copied().filter(|e| !over(e)).collect();
                let up: Vec<&Endpoint> = within.iter().copied().filter(|e| !is_down(e)).collect();
                let healthy: Vec<&Endpoint> =
                    up.iter().copied().filter(|e| !is_ejected(e)).collect();
                let active = if !healthy.is_empty() {
                    healthy
                } else if !up.is_empty() {
                    decision.note = Some(
                        "every eligible endpoint within budget breaks the SLA; routing on all of them"
                            .to_string(),
                    );
                    up
                } else if !within.is_empty() {
                    decision.note = Some(
                        "every eligible endpoint within budget is down; routing on all of them"
                            .to_string(),
                    );
                    within
                } else {
                    decision.note = Some(
                        "every eligible endpoint is over budget; the class degrades".to_string(),
                    );
                    let up: Vec<&Endpoint> =
                        eligible.iter().copied().filter(|e| !is_down(e)).collect();
                    if up.is_empty() {
                        eligible.clone()
                    } else {
                        up
                    }
                };
                let t = target(policy, class, &active, signals);
                // Zero targets stay in the map: an endpoint that keeps its
                // place in the class but loses its share is smoothed out,
                // not dropped.
                let total: f64 = t.iter().filter(|w| w.is_finite()).sum();
                let t: BTreeMap<String, f64> = active
                    .iter()
                    .zip(t)
                    .map(|(e, w)| {
                        let w = if w.is_finite() && total > 0.0 {
                            w / total
                        } else {
                            0.0
                        };
                        (e.name.clone(), w)
                    })
                    .collect();
                let empty = BTreeMap::new();
                let prev_routes = prev.classes.get(&class.name).map_or(&empty, |c| &c.routes);
                let routes = smooth(prev_routes, &t, r.max_step, r.hysteresis);
                for (name, share) in &t {
                    let has = routes.get(name).copied().unwrap_or(0.0);
                    if probation.contains_key(name) && has < share - r.hysteresis.max(1e-9) {
                        climbing.insert(name.clone());
                    }
                }
                routes
            };
            let mut routes = routes;
            if apply_overrides(&mut routes, &class.name, &eligible, switches, now) {
                decision.note = Some("operator override in force".to_string());
            }
            if routes.is_empty() {
                // Cannot happen with a non-empty eligible set; never ship an
                // empty route for a routable class all the same.
                routes = eligible.iter().map(|e| (e.name.clone(), 1.0)).collect();
                normalise(&mut routes);
            }
            normalise(&mut routes);
            decision.routes = routes;
        }
        out.classes.insert(class.name.clone(), decision);
        out.standing.insert(class.name.clone(), standing);
    }
    probation.retain(|name, _| climbing.contains(name));
    out.down = down;
    out.probation = probation;
    out.over_spend_budget = switches
        .over_spend_budget
        .iter()
        .filter(|(name, _)| policy.endpoints.iter().any(|e| &e.name == *name))
        .map(|(n, r)| (n.clone(), r.clone()))
        .collect();
    out
}

#[cfg(test)]
mod tests;
