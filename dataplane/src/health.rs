//! What the sidecar itself knows about each endpoint's health, so it reacts
//! within seconds even with the control plane down: local outlier ejection
//! (consecutive failures or a failure rate over a short window), throttling
//! after a 429, a peak-EWMA latency estimate for power-of-two-choices, the
//! recent TTFTs hedging waits on, and the in-flight count.
//!
//! The state is kept per endpoint name and outlives table swaps. The
//! decision logic (`Outlier`, `PeakEwma`) takes time as an argument, so it is
//! tested without clocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use crate::usage::Window;

/// When an endpoint is taken out locally, and for how long.
#[derive(Debug, Clone)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub window: Duration,
    /// Failure rate over the window that ejects, once it holds enough requests.
    pub failure_rate: f64,
    pub min_requests: u32,
    /// First ejection; each further one doubles it, up to `max_ejection`.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            window: Duration::from_secs(10),
            failure_rate: 0.5,
            min_requests: 10,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Outlier {
    consecutive: u32,
    window_start: Option<Instant>,
    window_total: u32,
    window_failures: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row without a healthy spell between them.
    ejections: u32,
}

impl Outlier {
    fn roll(&mut self, now: Instant, p: &OutlierPolicy) {
        if self
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= p.window)
        {
            self.window_start = Some(now);
            self.window_total = 0;
            self.window_failures = 0;
        }
    }

    pub fn success(&mut self, now: Instant, p: &OutlierPolicy) {
        self.roll(now, p);
        self.window_total += 1;
        self.consecutive = 0;
        // A healthy spell as long as the longest ejection forgives the past.
        if self
            .ejected_until
            .is_some_and(|u| now.saturating_duration_since(u) >= p.max_ejection)
        {
            self.ejections = 0;
        }
    }

    /// Counts a failure; returns the ejection time if this one ejects.
    pub fn failure(&mut self, now: Instant, p: &OutlierPolicy) -> Option<Duration> {
        self.roll(now, p);
        self.window_total += 1;
        self.window_failures += 1;
        self.consecutive += 1;
        if self.ejected(now) {
            return None;
        }
        let by_rate = self.window_total >= p.min_requests
            && f64::from(self.window_failures) >= p.failure_rate * f64::from(self.window_total);
        if self.consecutive < p.consecutive_failures && !by_rate {
            return None;
        }
        let d = p
            .base_ejection
            .saturating_mul(1 << self.ejections.min(16))
            .min(p.max_ejection);
        self.ejections += 1;
        self.ejected_until = Some(now + d);
        // Start afresh on return, so one failure then does not re-eject.
        self.consecutive = 0;
        self.window_start = None;
        Some(d)
    }

    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|u| now < u)
    }
}

/// Peak-EWMA latency: jumps to any slower sample, otherwise decays towards
/// new samples with time constant `tau`, as tower's and linkerd's balancers do.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    estimate_us: f64,
    stamp: Option<Instant>,
    tau: Duration,
}

impl PeakEwma {
    pub fn new(tau: Duration) -> Self {
        Self {
            estimate_us: 0.0,
            stamp: None,
            tau,
        }
    }

    pub fn observe(&mut self, sample: Duration, now: Instant) {
        let s = sample.as_secs_f64() * 1e6;
        let current = self.estimate_us;
        self.estimate_us = if s > current {
            s
        } else {
            let elapsed = self
                .stamp
                .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
            let w = (-elapsed / self.tau.as_secs_f64()).exp();
            current * w + s * (1.0 - w)
        };
        self.stamp = Some(now);
    }

    /// Load-weighted cost: estimate × (pending + 1). Unknown latency costs
    /// like a fast endpoint, so new endpoints get tried.
    pub fn cost(&self, pending: u32) -> f64 {
        self.estimate_us.max(1.0) * f64::from(pending + 1)
    }
}

/// TTFTs kept for the hedging delay.
const TTFT_SAMPLES: usize = 64;

/// The local health the control plane is told about in each telemetry
/// window: what started in the window, and what is in force when it closes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalHealth {
    /// Local ejections started since the last report.
    pub ejections: u32,
    pub ejected: bool,
    /// 429 cooldowns started (not merely extended) since the last report.
    pub throttles: u32,
    pub throttled: bool,
}

impl LocalHealth {
    /// Whether there is anything to tell: an endpoint ejected or throttled
    /// gets no traffic, so its window would otherwise be empty and left
    /// out of the report, and the control plane would never hear of it.
    pub fn worth_reporting(&self) -> bool {
        self.ejections > 0 || self.ejected || self.throttles > 0 || self.throttled
    }
}

#[derive(Debug)]
struct Inner {
    outlier: Outlier,
    ewma: PeakEwma,
    throttled_until: Option<Instant>,
    /// Counted since the last telemetry report; see [`LocalHealth`].
    ejections_started: u32,
    throttles_started: u32,
    ttft_us: [u32; TTFT_SAMPLES],
    ttft_len: usize,
    ttft_next: usize,
}

/// The live state of one endpoint, shared by every table that names it.
#[derive(Debug)]
pub struct EndpointState {
    pub in_flight: AtomicU32,
    inner: Mutex<Inner>,
    /// What this sidecar saw of it since the last telemetry report.
    pub usage: Window,
    /// Its idle connections.
    pub idle: crate::pool::Idle,
}

impl EndpointState {
    fn new() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            usage: Window::default(),
            idle: crate::pool::Idle::default(),
            inner: Mutex::new(Inner {
                outlier: Outlier::default(),
                ewma: PeakEwma::new(Duration::from_secs(10)),
                throttled_until: None,
                ejections_started: 0,
                throttles_started: 0,
                ttft_us: [0; TTFT_SAMPLES],
                ttft_len: 0,
                ttft_next: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Requests this sidecar has in flight on the endpoint.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Neither ejected nor throttled.
    pub fn available(&self, now: Instant) -> bool {
        let i = self.lock();
        !i.outlier.ejected(now) && i.throttled_until.is_none_or(|u| now >= u)
    }

    /// Time left on the local ejection and on the 429 throttle (zero when
    /// not in force), so an operator can see why an endpoint gets no
    /// traffic from this sidecar and for how long.
    pub fn cooldown(&self, now: Instant) -> (Duration, Duration) {
        let i = self.lock();
        let left =
            |u: Option<Instant>| u.map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
        (left(i.outlier.ejected_until), left(i.throttled_until))
    }

    pub fn cost(&self) -> f64 {
        let pending = self.in_flight();
        self.lock().ewma.cost(pending)
    }

    pub fn success(&self, ttft: Duration, now: Instant, p: &OutlierPolicy) {
        let mut i = self.lock();
        i.outlier.success(now, p);
        i.ewma.observe(ttft, now);
        let slot = i.ttft_next;
        if let Some(s) = i.ttft_us.get_mut(slot) {
            *s = ttft.as_micros().min(u32::MAX as u128) as u32;
        }
        i.ttft_next = (slot + 1) % TTFT_SAMPLES;
        i.ttft_len = (i.ttft_len + 1).min(TTFT_SAMPLES);
    }

    /// Counts a failure that took `took`; returns the ejection time if it
    /// ejected the endpoint.
    pub fn failure(&self, took: Duration, now: Instant, p: &OutlierPolicy) -> Option<Duration> {
        let mut i = self.lock();
        // A failure is at least as bad as its time, so slow failures raise
        // the latency estimate too.
        i.ewma.observe(took, now);
        let ejected = i.outlier.failure(now, p);
        if ejected.is_some() {
            i.ejections_started = i.ejections_started.saturating_add(1);
        }
        ejected
    }

    /// Holds traffic back until `until` after a 429. `now` tells a new
    /// cooldown from one extending a cooldown in force.
    pub fn throttle(&self, until: Instant, now: Instant) {
        let mut i = self.lock();
        if i.throttled_until.is_none_or(|u| now >= u) {
            i.throttles_started = i.throttles_started.saturating_add(1);
        }
        i.throttled_until = Some(i.throttled_until.map_or(until, |u| u.max(until)));
    }

    /// The local health for a telemetry report, as of `now`; the counts
    /// start again from zero.
    pub fn take_health(&self, now: Instant) -> LocalHealth {
        let mut i = self.lock();
        LocalHealth {
            ejections: std::mem::take(&mut i.ejections_started),
            ejected: i.outlier.ejected(now),
            throttles: std::mem::take(&mut i.throttles_started),
            throttled: i.throttled_until.is_some_and(|u| now < u),
        }
    }

    /// p95 of the recent TTFTs; `None` before any.
    pub fn p95_ttft(&self) -> Option<Duration> {
        let i = self.lock();
        if i.ttft_len == 0 {
            return None;
        }
        let mut v = i.ttft_us;
        let s = v.get_mut(..i.ttft_len)?;
        s.sort_unstable();
        let idx = ((s.len() as f64) * 0.95).ceil() as usize;
        let p95 = s.get(idx.clamp(1, s.len()) - 1)?;
        Some(Duration::from_micros(u64::from(*p95)))
    }
}

/// Endpoint states by name.
#[derive(Debug, Default)]
pub struct Endpoints {
    map: Mutex<HashMap<String, Arc<EndpointState>>>,
}

impl Endpoints {
    pub fn get(&self, name: &str) -> Arc<EndpointState> {
        let mut m = self.map.lock();
        if let Some(s) = m.get(name) {
            return s.clone();
        }
        m.entry(name.to_string())
            .or_insert_with(|| Arc::new(EndpointState::new()))
            .clone()
    }

    pub fn all(&self) -> Vec<(String, Arc<EndpointState>)> {
        let m = self.map.lock();
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 3,
            window: Duration::from_secs(10),
            failure_rate: 0.5,
            min_requests: 10,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(8),
        }
    }

    #[test]
    fn consecutive_failures_eject_with_growing_backoff() {
        let p = policy();
        let t0 = Instant::now();
        let mut o = Outlier::default();
        assert_eq!(o.failure(t0, &p), None);
        assert_eq!(o.failure(t0, &p), None);
        assert_eq!(o.failure(t0, &p), Some(Duration::from_secs(1)));
        assert!(o.ejected(t0 + Duration::from_millis(999)));
        let t1 = t0 + Duration::from_secs(1);
        assert!(!o.ejected(t1));
        for _ in 0..2 {
            assert_eq!(o.failure(t1, &p), None);
        }
        assert_eq!(o.failure(t1, &p), Some(Duration::from_secs(2)));
        let mut t = t1;
        for _ in 0..5 {
            t += Duration::from_secs(10);
            o.failure(t, &p);
            o.failure(t, &p);
            o.failure(t, &p);
        }
        assert!(
            o.ejected(t) && !o.ejected(t + Duration::from_secs(8)),
            "capped"
        );
    }

    #[test]
    fn cooldowns_show_the_time_left_on_each() {
        let p = policy();
        let s = EndpointState::new();
        let t = Instant::now();
        assert_eq!(s.cooldown(t), (Duration::ZERO, Duration::ZERO));
        s.throttle(t + Duration::from_secs(30), t);
        s.throttle(t + Duration::from_secs(10), t); // a shorter one does not cut it
        for _ in 0..3 {
            s.failure(Duration::ZERO, t, &p);
        }
        assert_eq!(
            s.cooldown(t + Duration::from_millis(400)),
            (Duration::from_millis(600), Duration::from_millis(29_600))
        );
        assert_eq!(
            s.cooldown(t + Duration::from_secs(31)),
            (Duration::ZERO, Duration::ZERO)
        );
    }

    #[test]
    fn local_health_counts_what_started_and_says_what_is_in_force() {
        let p = policy();
        let s = EndpointState::new();
        let t = Instant::now();
        assert_eq!(s.take_health(t), LocalHealth::default());
        assert!(!LocalHealth::default().worth_reporting());
        s.throttle(t + Duration::from_secs(2), t);
        // Extending a cooldown in force is not a new throttle.
        s.throttle(t + Duration::from_secs(3), t + Duration::from_secs(1));
        for _ in 0..3 {
            s.failure(Duration::ZERO, t, &p);
        }
        let h = s.take_health(t);
        assert_eq!(
            h,
            LocalHealth {
                ejections: 1,
                ejected: true,
                throttles: 1,
                throttled: true
            }
        );
        assert!(h.worth_reporting());
        // Taken: the counts start again, the gauges still hold.
        let h = s.take_health(t + Duration::from_millis(500));
        assert_eq!(
            (h.ejections, h.ejected, h.throttles, h.throttled),
            (0, true, 0, true)
        );
        // Both over: nothing to tell; a 429 after the cooldown starts a new one.
        let later = t + Duration::from_secs(5);
        assert!(!s.take_health(later).worth_reporting());
        s.throttle(later + Duration::from_secs(1), later);
        assert_eq!(s.take_health(later).throttles, 1);
    }

    #[test]
    fn a_failure_rate_ejects_without_consecutive_failures() {
        let p = policy();
        let t = Instant::now();
        let mut o = Outlier::default();
        let mut ejected = false;
        for i in 0..20 {
            if i % 2 == 0 {
                o.success(t, &p);
            } else {
                ejected |= o.failure(t, &p).is_some();
            }
        }
        assert!(ejected);
    }

    #[test]
    fn successes_reset_the_run_and_a_healthy_spell_resets_backoff() {
        let p = policy();
        let t = Instant::now();
        let mut o = Outlier::default();
        for _ in 0..3 {
            o.failure(t, &p);
            o.failure(t, &p);
            o.success(t, &p);
        }
        assert!(
            !o.ejected(t),
            "never three in a row; 9 requests are too few for the rate"
        );
        let mut o = Outlier::default();
        (0..3).for_each(|_| {
            o.failure(t, &p);
        });
        let later = t + Duration::from_secs(30);
        o.success(later, &p);
        (0..2).for_each(|_| {
            o.failure(later, &p);
        });
        assert_eq!(o.failure(later, &p), Some(Duration::from_secs(1)));
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t = Instant::now();
        let mut e = PeakEwma::new(Duration::from_secs(10));
        e.observe(Duration::from_millis(10), t);
        e.observe(Duration::from_millis(100), t + Duration::from_millis(1));
        assert!((e.cost(0) - 100_000.0).abs() < 1.0, "peak taken at once");
        e.observe(Duration::from_millis(10), t + Duration::from_secs(10));
        let c = e.cost(0);
        assert!(c < 50_000.0 && c > 10_000.0, "decays towards 10 ms: {c}");
        assert!(
            (e.cost(3) - 4.0 * c).abs() < 1.0,
            "pending multiplies the cost"
        );
    }

    #[test]
    fn p95_of_recent_ttfts() {
        let s = EndpointState::new();
        let p = policy();
        let t = Instant::now();
        assert_eq!(s.p95_ttft(), None);
        for ms in 1..=100 {
            s.success(Duration::from_millis(ms), t, &p);
        }
        // The last 64 samples are 37..=100 ms; their p95 is the 61st.
        assert_eq!(s.p95_ttft(), Some(Duration::from_millis(97)));
    }
}
