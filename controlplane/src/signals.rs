//! Telemetry merged across sidecars into per-endpoint signals over a sliding
//! window of one-second buckets, plus the queue gauges scraped from vLLM
//! and the control plane's own health probes.
//!
//! Reports are bucketed by when they arrive, not by the sidecar's clock:
//! every sidecar reports once a second, so arrival time is accurate to a
//! bucket, and the control plane never trusts clocks it does not own.
//! Counts and histograms add up across sidecars (each report covers only its
//! own interval); gauges (in-flight, RTT, local ejection and throttle) are
//! kept per sidecar and summed, averaged or counted over the sidecars that
//! reported recently.

use std::collections::{BTreeMap, HashMap, VecDeque};

use hdrhistogram::serialization::Deserializer;
use hdrhistogram::{CreationError, Histogram};
use switchyard_proto::v1 as pb;

use crate::health::{self, ProbeState};

/// Width of one bucket; sidecars report once a second.
pub const BUCKET_MS: u64 = 1000;
/// A sidecar's gauges count only while it keeps reporting.
const GAUGE_TTL_MS: u64 = 3 * BUCKET_MS;
/// A scrape older than this is not used.
const SCRAPE_TTL_MS: u64 = 5_000;

/// An empty TTFT histogram: microseconds, 1 µs to 10 minutes, 2
/// significant digits: 1% is finer than any SLA, and keeps a bucket's
/// histogram at about 23 KiB. Made once per aggregator; each bucket starts
/// from a clone.
pub fn ttft_histogram() -> Result<Histogram<u64>, CreationError> {
    Histogram::new_with_bounds(1, 600_000_000, 2)
}

/// One second of one endpoint's traffic, summed over sidecars.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub start_ms: u64,
    pub requests: u64,
    /// Failed attempts of every kind (connect, timeout, 5xx, 429, and
    /// streams broken after their first byte).
    pub errors: u64,
    /// The subset of `errors` that timed out; they count as slower than any
    /// recorded TTFT.
    pub timeouts: u64,
    /// The subset of `errors` that broke after their first byte.
    pub streams_broken: u64,
    /// Local ejections and 429 cooldowns sidecars started.
    pub ejections: u64,
    pub throttles: u64,
    /// Time to first token, microseconds.
    pub ttft: Histogram<u64>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub spend_usd: f64,
}

impl Bucket {
    /// An empty bucket whose TTFT histogram is a clone of `empty` (see
    /// [`ttft_histogram`]).
    pub fn new(start_ms: u64, empty: &Histogram<u64>) -> Self {
        Self {
            start_ms,
            requests: 0,
            errors: 0,
            timeouts: 0,
            streams_broken: 0,
            ejections: 0,
            throttles: 0,
            ttft: empty.clone(),
            tokens_in: 0,
            tokens_out: 0,
            spend_usd: 0.0,
        }
    }

    /// A bucket of `requests` requests, `errors` of them failed, whose
    /// successful ones all took `ttft_ms` to the first token. For tests and
    /// tools that have no sidecar.
    pub fn synthetic(
        start_ms: u64,
        requests: u64,
        errors: u64,
        ttft_ms: f64,
    ) -> Result<Self, CreationError> {
        let mut b = Bucket::new(start_ms, &ttft_histogram()?);
        b.requests = requests;
        b.errors = errors.min(requests);
        let ok = requests - b.errors;
        if ok > 0 {
            let _ = b.ttft.record_n(((ttft_ms * 1000.0) as u64).max(1), ok);
        }
        Ok(b)
    }
}

/// Queue gauges scraped from a vLLM `/metrics` page.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Queue {
    pub waiting: f64,
    pub running: f64,
    /// KV-cache use, 0 to 1, when the server says.
    pub kv_cache: Option<f64>,
}

/// What the weight computation knows about one endpoint.
#[derive(Clone, Debug, Default)]
pub struct EndpointSignals {
    /// The window's buckets, oldest first.
    pub buckets: Vec<Bucket>,
    /// Requests in flight now, summed over sidecars that report.
    pub in_flight: f64,
    /// Mean smoothed RTT over the sidecars that measured one.
    pub rtt_ms: Option<f64>,
    pub queue: Option<Queue>,
    /// Sidecars that reported on the endpoint recently, and how many of
    /// them had it ejected, or throttled after a 429, when they last did.
    pub sidecars_reporting: u32,
    pub sidecars_ejecting: u32,
    pub sidecars_throttling: u32,
    /// The control plane's probes of it; `None` when it is not probed.
    pub probe: Option<ProbeState>,
}

/// The window summed up, from some start on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub streams_broken: u64,
    pub ejections: u64,
    pub throttles: u64,
    /// p95 time to first token in ms, timeouts counted as infinitely slow;
    /// `None` without samples.
    pub ttft_p95_ms: Option<f64>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub spend_usd: f64,
}

impl Summary {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

impl EndpointSignals {
    /// Sums the buckets that started at or after `since_ms`.
    pub fn summary(&self, since_ms: u64) -> Summary {
        let mut s = Summary::default();
        let mut ttft: Option<Histogram<u64>> = None;
        for b in self.buckets.iter().filter(|b| b.start_ms >= since_ms) {
            s.requests = s.requests.saturating_add(b.requests);
            s.errors = s.errors.saturating_add(b.errors);
            s.timeouts = s.timeouts.saturating_add(b.timeouts);
            s.streams_broken = s.streams_broken.saturating_add(b.streams_broken);
            s.ejections = s.ejections.saturating_add(b.ejections);
            s.throttles = s.throttles.saturating_add(b.throttles);
            s.tokens_in = s.tokens_in.saturating_add(b.tokens_in);
            s.tokens_out = s.tokens_out.saturating_add(b.tokens_out);
            s.spend_usd += b.spend_usd;
            if !b.ttft.is_empty() {
                match &mut ttft {
                    Some(h) => {
                        let _ = h.add(&b.ttft);
                    }
                    None => ttft = Some(b.ttft.clone()),
                }
            }
        }
        let samples = ttft.as_ref().map_or(0, |h| h.len());
        let total = samples.saturating_add(s.timeouts);
        s.ttft_p95_ms = if total == 0 {
            None
        } else if s.timeouts as f64 > 0.05 * total as f64 {
            Some(f64::INFINITY)
        } else {
            // The timeouts sit above every sample: the p95 of all is a
            // higher quantile of the samples alone.
            let q = (0.95 * total as f64 / samples as f64).min(1.0);
            ttft.map(|h| h.value_at_quantile(q) as f64 / 1000.0)
        };
        s
    }

    /// Why the endpoint is down, or `None` when it is up; see
    /// [`health::judge`].
    pub fn down(&self) -> Option<String> {
        health::judge(
            self.probe.as_ref(),
            self.sidecars_ejecting,
            self.sidecars_reporting,
        )
    }
}

/// A snapshot of every endpoint's signals at one instant; the input of the
/// weight computation.
#[derive(Clone, Debug, Default)]
pub struct Signals {
    pub now_ms: u64,
    /// Start of the window the buckets cover.
    pub window_start_ms: u64,
    pub endpoints: BTreeMap<String, EndpointSignals>,
}

impl Signals {
    pub fn get(&self, endpoint: &str) -> Option<&EndpointSignals> {
        self.endpoints.get(endpoint)
    }

    /// Input and output tokens over all endpoints in the window, for
    /// blending prices into one cost per request.
    pub fn token_mix(&self) -> (u64, u64) {
        self.endpoints
            .values()
            .flat_map(|e| &e.buckets)
            .fold((0, 0), |(i, o), b| (i + b.tokens_in, o + b.tokens_out))
    }
}

#[derive(Clone, Copy, Debug)]
struct Gauge {
    in_flight: u32,
    rtt_us: u32,
    ejected: bool,
    throttled: bool,
    at_ms: u64,
}

#[derive(Default)]
struct Series {
    buckets: VecDeque<Bucket>,
    gauges: HashMap<String, Gauge>,
    scraped: Option<(u64, Queue)>,
    probe: Option<ProbeState>,
    spend_total: f64,
}

/// A window's failed requests: the attempts that failed before the first
/// byte, by kind, and the streams that broke after it (the stream
/// contract in `telemetry.proto`). Counts come from sidecars: a wild one
/// saturates, never overflows.
pub fn window_errors(w: &pb::EndpointWindow) -> u64 {
    [
        w.errors_timeout,
        w.errors_5xx,
        w.errors_429,
        w.streams_broken,
    ]
    .into_iter()
    .fold(w.errors_connect, u64::saturating_add)
}

/// Takes in reports and scrapes; hands out snapshots.
pub struct Aggregator {
    window_ms: u64,
    series: HashMap<String, Series>,
    decoder: Deserializer,
    /// Spend reported but not yet booked into the durable ledger.
    unbooked: HashMap<String, f64>,
    /// What every new bucket's TTFT histogram starts as.
    empty_ttft: Histogram<u64>,
}

impl Aggregator {
    pub fn new(window_ms: u64) -> Result<Self, CreationError> {
        Ok(Self {
            window_ms: window_ms.max(BUCKET_MS),
            series: HashMap::new(),
            decoder: Deserializer::new(),
            unbooked: HashMap::new(),
            empty_ttft: ttft_histogram()?,
        })
    }

    /// A policy edit may change the window; buckets already held stay.
    pub fn set_window(&mut self, window_ms: u64) {
        self.window_ms = window_ms.max(BUCKET_MS);
    }

    pub fn ingest(&mut self, r: &pb::TelemetryReport, now_ms: u64) {
        let start = now_ms - now_ms % BUCKET_MS;
        // An endpoint a report leaves out is neither ejected nor throttled
        // by that sidecar (the stream contract): its word on them is
        // cleared, rather than kept until it ages out.
        for (name, s) in self.series.iter_mut() {
            if !r.endpoints.iter().any(|w| &w.endpoint == name) {
                if let Some(g) = s.gauges.get_mut(&r.sidecar_id) {
                    g.ejected = false;
                    g.throttled = false;
                }
            }
        }
        for w in &r.endpoints {
            let s = self.series.entry(w.endpoint.clone()).or_default();
            s.gauges.insert(
                r.sidecar_id.clone(),
                Gauge {
                    in_flight: w.in_flight,
                    rtt_us: w.rtt_us,
                    ejected: w.ejected,
                    throttled: w.throttled,
                    at_ms: now_ms,
                },
            );
            s.spend_total += w.spend_usd;
            if w.spend_usd > 0.0 && w.spend_usd.is_finite() {
                *self.unbooked.entry(w.endpoint.clone()).or_default() += w.spend_usd;
            }
            // The report goes into the newest bucket while it is current
            // (or ahead of a clock that stepped back), else into a new one.
            let mut b = match s.buckets.pop_back() {
                Some(b) if b.start_ms >= start => b,
                older => {
                    s.buckets.extend(older);
                    Bucket::new(start, &self.empty_ttft)
                }
            };
            // Counts come from sidecars: a wild one saturates, never
            // overflows.
            let errors = window_errors(w);
            b.requests = b.requests.saturating_add(w.requests);
            b.errors = b.errors.saturating_add(errors);
            b.timeouts = b.timeouts.saturating_add(w.errors_timeout);
            b.streams_broken = b.streams_broken.saturating_add(w.streams_broken);
            b.ejections = b.ejections.saturating_add(u64::from(w.ejections));
            b.throttles = b.throttles.saturating_add(u64::from(w.throttles));
            b.tokens_in = b.tokens_in.saturating_add(w.tokens_in);
            b.tokens_out = b.tokens_out.saturating_add(w.tokens_out);
            b.spend_usd += w.spend_usd;
            if !w.ttft_histogram.is_empty() {
                match self
                    .decoder
                    .deserialize::<u64, _>(&mut w.ttft_histogram.as_slice())
                {
                    Ok(h) => {
                        for v in h.iter_recorded() {
                            let _ = b.ttft.record_n(v.value_iterated_to(), v.count_at_value());
                        }
                    }
                    Err(e) => {
                        tracing::debug!(sidecar = %r.sidecar_id, endpoint = %w.endpoint, error = ?e, "undecodable TTFT histogram; ignored")
                    }
                }
            }
            s.buckets.push_back(b);
        }
    }

    pub fn set_queue(&mut self, endpoint: &str, q: Queue, now_ms: u64) {
        self.series.entry(endpoint.to_string()).or_default().scraped = Some((now_ms, q));
    }

    /// The probe history of `endpoint`; `None` when it is no longer probed
    /// (left the policy, or cannot be probed), so no verdict is kept.
    pub fn set_probe(&mut self, endpoint: &str, probe: Option<ProbeState>) {
        match probe {
            Some(p) => self.series.entry(endpoint.to_string()).or_default().probe = Some(p),
            None => {
                if let Some(s) = self.series.get_mut(endpoint) {
                    s.probe = None;
                }
            }
        }
    }

    /// Spend reported since the last call, per endpoint, for the ledger.
    pub fn take_unbooked(&mut self) -> Vec<(String, f64)> {
        self.unbooked.drain().collect()
    }

    /// Gives back spend the ledger could not book, to try again later.
    pub fn unbook(&mut self, spend: Vec<(String, f64)>) {
        for (endpoint, usd) in spend {
            *self.unbooked.entry(endpoint).or_default() += usd;
        }
    }

    /// Spend reported for `endpoint` since the control plane started.
    pub fn spend_total(&self, endpoint: &str) -> f64 {
        self.series.get(endpoint).map_or(0.0, |s| s.spend_total)
    }

    /// Drops what fell out of the window and returns what is left.
    pub fn snapshot(&mut self, now_ms: u64) -> Signals {
        let window_start = now_ms.saturating_sub(self.window_ms);
        let mut endpoints = BTreeMap::new();
        for (name, s) in &mut self.series {
            // A bucket is kept while any part of it is inside the window.
            while s
                .buckets
                .front()
                .is_some_and(|b| b.start_ms + BUCKET_MS <= window_start)
            {
                s.buckets.pop_front();
            }
            s.gauges
                .retain(|_, g| now_ms.saturating_sub(g.at_ms) <= GAUGE_TTL_MS);
            let in_flight = s.gauges.values().map(|g| f64::from(g.in_flight)).sum();
            let rtts: Vec<f64> = s
                .gauges
                .values()
                .filter(|g| g.rtt_us > 0)
                .map(|g| f64::from(g.rtt_us) / 1000.0)
                .collect();
            let rtt_ms = (!rtts.is_empty()).then(|| rtts.iter().sum::<f64>() / rtts.len() as f64);
            let queue = s
                .scraped
                .filter(|(at, _)| now_ms.saturating_sub(*at) <= SCRAPE_TTL_MS)
                .map(|(_, q)| q);
            let count = |f: fn(&Gauge) -> bool| s.gauges.values().filter(|g| f(g)).count() as u32;
            endpoints.insert(
                name.clone(),
                EndpointSignals {
                    buckets: s.buckets.iter().cloned().collect(),
                    in_flight,
                    rtt_ms,
                    queue,
                    sidecars_reporting: s.gauges.len() as u32,
                    sidecars_ejecting: count(|g| g.ejected),
                    sidecars_throttling: count(|g| g.throttled),
                    probe: s.probe.clone(),
                },
            );
        }
        Signals {
            now_ms,
            window_start_ms: window_start,
            endpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::{Serializer, V2Serializer};

    fn window(
        endpoint: &str,
        requests: u64,
        ttft_ms: &[u64],
        in_flight: u32,
    ) -> pb::EndpointWindow {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        for t in ttft_ms {
            h.record(t * 1000).unwrap();
        }
        let mut buf = Vec::new();
        V2Serializer::new().serialize(&h, &mut buf).unwrap();
        pb::EndpointWindow {
            endpoint: endpoint.into(),
            requests,
            errors_timeout: requests - ttft_ms.len() as u64,
            ttft_histogram: buf,
            in_flight,
            rtt_us: 2_000,
            ..Default::default()
        }
    }

    fn report(sidecar: &str, w: Vec<pb::EndpointWindow>) -> pb::TelemetryReport {
        pb::TelemetryReport {
            sidecar_id: sidecar.into(),
            table_version: 1,
            window_ms: 1000,
            endpoints: w,
        }
    }

    #[test]
    fn reports_add_up_across_sidecars_and_age_out() {
        let mut a = Aggregator::new(3000).unwrap();
        a.ingest(
            &report("s1", vec![window("e", 3, &[10, 20, 30], 2)]),
            10_100,
        );
        a.ingest(&report("s2", vec![window("e", 2, &[40, 50], 5)]), 10_900);
        a.ingest(&report("s1", vec![window("e", 1, &[60], 1)]), 11_200);
        let s = a.snapshot(11_500);
        let e = s.get("e").unwrap();
        assert_eq!(e.buckets.len(), 2);
        assert_eq!(e.in_flight, 6.0, "latest gauge per sidecar, summed");
        assert_eq!(e.rtt_ms, Some(2.0));
        let sum = e.summary(0);
        assert_eq!((sum.requests, sum.errors), (6, 0));
        let p95 = sum.ttft_p95_ms.unwrap();
        assert!((59.0..=61.0).contains(&p95), "{p95}");
        assert_eq!(e.summary(11_000).requests, 1, "only buckets from then on");

        // 14.5 s: the 10 s bucket left the 3 s window, s2's gauge went stale.
        let s = a.snapshot(14_500);
        let e = s.get("e").unwrap();
        assert_eq!(e.buckets.len(), 1);
        assert_eq!(e.in_flight, 0.0);
        let s = a.snapshot(15_000);
        assert!(s.get("e").unwrap().buckets.is_empty());
    }

    #[test]
    fn timeouts_count_as_slower_than_every_sample() {
        let mut a = Aggregator::new(10_000).unwrap();
        // 19 fast answers and one timeout: the p95 is still a fast one.
        a.ingest(&report("s", vec![window("e", 20, &[5; 19], 0)]), 1000);
        let p95 = a.snapshot(1500).get("e").unwrap().summary(0).ttft_p95_ms;
        assert!(p95.unwrap() < 6.0, "{p95:?}");
        // Ten timeouts out of 30: the p95 is past any deadline.
        a.ingest(&report("s", vec![window("e", 10, &[], 0)]), 1100);
        let sum = a.snapshot(1500).get("e").unwrap().summary(0);
        assert_eq!(sum.ttft_p95_ms, Some(f64::INFINITY));
        assert_eq!(sum.timeouts, 11);
    }

    #[test]
    fn local_health_adds_up_and_most_sidecars_ejecting_is_down() {
        let mut a = Aggregator::new(10_000).unwrap();
        let ejected = |w: pb::EndpointWindow| pb::EndpointWindow {
            ejections: 1,
            ejected: true,
            throttles: 2,
            throttled: true,
            streams_broken: 3,
            ..w
        };
        a.ingest(&report("s1", vec![ejected(window("e", 4, &[5], 0))]), 1000);
        a.ingest(&report("s2", vec![window("e", 1, &[5], 0)]), 1100);
        let e = a.snapshot(1500).get("e").cloned().unwrap();
        let sum = e.summary(0);
        assert_eq!(
            (sum.requests, sum.errors, sum.timeouts, sum.streams_broken),
            (5, 6, 3, 3),
            "broken streams are failures besides the timeouts"
        );
        assert_eq!((sum.ejections, sum.throttles), (1, 2));
        assert_eq!(
            (
                e.sidecars_reporting,
                e.sidecars_ejecting,
                e.sidecars_throttling
            ),
            (2, 1, 1)
        );
        assert_eq!(e.down(), None, "one of two is not most");
        a.ingest(&report("s3", vec![ejected(window("e", 0, &[], 0))]), 1200);
        let e = a.snapshot(1500).get("e").cloned().unwrap();
        assert_eq!(e.down().as_deref(), Some("ejected by 2 of 3 sidecars"));
        // s1 and s3 come back: their latest report is what counts.
        a.ingest(&report("s1", vec![window("e", 1, &[5], 0)]), 2100);
        a.ingest(&report("s3", vec![window("e", 1, &[5], 0)]), 2100);
        assert_eq!(a.snapshot(2500).get("e").unwrap().down(), None);
        // Sidecars that stop reporting stop counting.
        a.ingest(&report("s1", vec![ejected(window("e", 0, &[], 0))]), 9000);
        let e = a.snapshot(9100).get("e").cloned().unwrap();
        assert_eq!(e.down().as_deref(), Some("ejected by 1 of 1 sidecars"));
        // A report that leaves the endpoint out takes its word back.
        a.ingest(&report("s1", vec![window("other", 1, &[5], 0)]), 9200);
        let e = a.snapshot(9300).get("e").cloned().unwrap();
        assert_eq!((e.down(), e.sidecars_ejecting), (None, 0));
    }

    #[test]
    fn probes_reach_the_snapshot_even_without_telemetry() {
        let mut a = Aggregator::new(10_000).unwrap();
        let p = ProbeState {
            failures: 2,
            passes: 0,
            last_error: "connection refused".into(),
            down: true,
        };
        a.set_probe("quiet", Some(p.clone()));
        let s = a.snapshot(1000);
        let e = s.get("quiet").unwrap();
        assert_eq!(e.probe.as_ref(), Some(&p));
        assert_eq!(e.down().as_deref(), Some("probe: connection refused"));
        a.set_probe("quiet", None);
        assert_eq!(a.snapshot(1000).get("quiet").unwrap().down(), None);
    }

    #[test]
    fn scrapes_expire() {
        let mut a = Aggregator::new(10_000).unwrap();
        let q = Queue {
            waiting: 3.0,
            running: 4.0,
            kv_cache: Some(0.5),
        };
        a.set_queue("e", q, 1000);
        assert_eq!(a.snapshot(2000).get("e").unwrap().queue, Some(q));
        assert_eq!(
            a.snapshot(1000 + SCRAPE_TTL_MS + 1).get("e").unwrap().queue,
            None
        );
    }

    #[test]
    fn synthetic_buckets_summarise_like_real_ones() {
        let e = EndpointSignals {
            buckets: vec![Bucket::synthetic(0, 10, 2, 250.0).unwrap()],
            ..Default::default()
        };
        let s = e.summary(0);
        assert_eq!((s.requests, s.errors), (10, 2));
        assert!((s.error_rate() - 0.2).abs() < 1e-9);
        assert!((s.ttft_p95_ms.unwrap() - 250.0).abs() < 3.0);
    }
}
