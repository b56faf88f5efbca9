//! What the sidecar counts per endpoint for the control plane: requests,
//! errors by kind, streams broken after their first byte, time to first
//! token and total latency (hdrhistogram, microseconds), tokens and spend,
//! with its local health (ejections and throttles) beside them. Each
//! endpoint keeps its own window (one short lock per finished attempt, no
//! lock shared across endpoints);
//! the telemetry reporter takes every window whole each second, so each
//! report covers only its own interval.

use std::time::Duration;

use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use switchyard_proto::v1 as pb;
use switchyard_wire::usage::Tokens;

use crate::health::{Endpoints, LocalHealth};

/// Why an attempt failed; the kinds the control plane weighs differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Status5xx,
    Status429,
    /// The upstream broke the exchange after it began (reset, malformed).
    Broken,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub error: Option<ErrorKind>,
    /// Set once the first byte came: an error with a TTFT is a stream that
    /// broke after it.
    pub ttft: Option<Duration>,
    pub latency: Duration,
    /// Tokens the provider reported, when it did.
    pub tokens: Option<Tokens>,
    pub spend_usd: f64,
}

impl Outcome {
    pub fn failed(error: ErrorKind, latency: Duration) -> Self {
        Self {
            error: Some(error),
            ttft: None,
            latency,
            tokens: None,
            spend_usd: 0.0,
        }
    }
}

/// Microseconds, 1 µs to 10 minutes, 2 significant digits: the precision
/// the control plane merges at, and about 23 KiB per histogram (3 digits
/// would be 160 KiB, per endpoint, twice).
const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 600_000_000;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(HIGHEST_US)
        .clamp(LOWEST_US, HIGHEST_US)
}

#[derive(Debug)]
struct Counts {
    requests: u64,
    /// Failures before the first byte, by kind.
    errors: [u64; 5],
    /// Failures after it.
    streams_broken: u64,
    tokens: Tokens,
    spend_usd: f64,
    /// `None` only if the histogram bounds were refused, which they are
    /// not (they are constants); then latencies go uncounted.
    ttft: Option<Histogram<u64>>,
    latency: Option<Histogram<u64>>,
}

fn histogram() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, 2).ok()
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            requests: 0,
            errors: [0; 5],
            streams_broken: 0,
            tokens: Tokens::default(),
            spend_usd: 0.0,
            ttft: histogram(),
            latency: histogram(),
        }
    }
}

/// One endpoint's counts since the last report.
#[derive(Debug, Default)]
pub struct Window {
    counts: Mutex<Counts>,
}

impl Window {
    pub fn record(&self, o: &Outcome) {
        let mut c = self.counts.lock();
        c.requests += 1;
        match (o.error, o.ttft) {
            (Some(_), Some(_)) => c.streams_broken += 1,
            (Some(e), None) => {
                if let Some(n) = c.errors.get_mut(e as usize) {
                    *n += 1;
                }
            }
            (None, _) => {}
        }
        if let (Some(t), Some(h)) = (o.ttft, c.ttft.as_mut()) {
            let _ = h.record(micros(t));
        }
        if let Some(h) = c.latency.as_mut() {
            let _ = h.record(micros(o.latency));
        }
        if let Some(t) = o.tokens {
            c.tokens.input += t.input;
            c.tokens.output += t.output;
            c.tokens.cached_input += t.cached_input;
            c.tokens.cache_write += t.cache_write;
        }
        c.spend_usd += o.spend_usd;
    }

    /// The window as telemetry, and a fresh start. The histograms are reset
    /// in place, not reallocated.
    fn take(
        &self,
        endpoint: &str,
        in_flight: u32,
        health: LocalHealth,
    ) -> Option<pb::EndpointWindow> {
        let mut c = self.counts.lock();
        if c.requests == 0 && in_flight == 0 && !health.worth_reporting() {
            return None;
        }
        let mut ser = V2Serializer::new();
        let mut encode = |h: &mut Option<Histogram<u64>>| {
            let mut buf = Vec::new();
            if let Some(h) = h {
                if !h.is_empty() && ser.serialize(h, &mut buf).is_err() {
                    buf.clear();
                }
                h.reset();
            }
            buf
        };
        let errors = |k: ErrorKind| c.errors.get(k as usize).copied().unwrap_or(0);
        let w = pb::EndpointWindow {
            endpoint: endpoint.to_string(),
            requests: c.requests,
            errors_connect: errors(ErrorKind::Connect),
            errors_timeout: errors(ErrorKind::Timeout),
            errors_5xx: errors(ErrorKind::Status5xx),
            errors_429: errors(ErrorKind::Status429),
            ttft_histogram: encode(&mut c.ttft),
            latency_histogram: encode(&mut c.latency),
            tokens_in: c.tokens.input,
            tokens_out: c.tokens.output,
            spend_usd: c.spend_usd,
            in_flight,
            ejections: health.ejections,
            ejected: health.ejected,
            throttles: health.throttles,
            throttled: health.throttled,
            streams_broken: c.streams_broken,
            ..Default::default()
        };
        c.requests = 0;
        c.errors = [0; 5];
        c.streams_broken = 0;
        c.tokens = Tokens::default();
        c.spend_usd = 0.0;
        Some(w)
    }
}

/// Takes every endpoint's window counted since the last call, as telemetry,
/// sorted by endpoint. An endpoint so slow that nothing finished in the
/// window still reports its in-flight gauge, and one ejected or throttled
/// here (so sent nothing) still reports that: that is when the control
/// plane most needs them.
pub fn take_report(live: &Endpoints) -> Vec<pb::EndpointWindow> {
    let now = std::time::Instant::now();
    let mut out: Vec<pb::EndpointWindow> = live
        .all()
        .into_iter()
        .filter_map(|(name, s)| s.usage.take(&name, s.in_flight(), s.take_health(now)))
        .collect();
    out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::Deserializer;

    #[test]
    fn windows_are_taken_whole_and_histograms_round_trip() {
        let live = Endpoints::default();
        let a = live.get("a");
        a.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for ms in [10, 20, 30] {
            a.usage.record(&Outcome {
                error: None,
                ttft: Some(Duration::from_millis(ms / 2)),
                latency: Duration::from_millis(ms),
                tokens: Some(Tokens {
                    input: 10,
                    output: 20,
                    ..Tokens::default()
                }),
                spend_usd: 0.5,
            });
        }
        a.usage.record(&Outcome::failed(
            ErrorKind::Status429,
            Duration::from_millis(1),
        ));
        let idle = live.get("idle");
        let r = take_report(&live);
        assert_eq!(
            r.len(),
            1,
            "an idle endpoint with nothing in flight is left out"
        );
        assert_eq!((r[0].requests, r[0].errors_429, r[0].in_flight), (4, 1, 1));
        assert_eq!((r[0].tokens_in, r[0].tokens_out), (30, 60));
        assert!((r[0].spend_usd - 1.5).abs() < 1e-9);
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut r[0].latency_histogram.as_slice())
            .unwrap();
        assert_eq!(h.len(), 4);
        assert!(h.value_at_quantile(1.0) >= 29_700);
        let r = take_report(&live);
        assert_eq!(
            (
                r.len(),
                r[0].requests,
                r[0].in_flight,
                r[0].latency_histogram.len()
            ),
            (1, 0, 1, 0),
            "a taken window is not reported twice; the gauge still is"
        );
        a.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        assert!(take_report(&live).is_empty());
        drop(idle);
    }

    #[test]
    fn broken_streams_and_local_health_reach_the_report() {
        let live = Endpoints::default();
        let a = live.get("a");
        let broken = |error| Outcome {
            error: Some(error),
            ttft: Some(Duration::from_millis(5)),
            latency: Duration::from_millis(50),
            tokens: None,
            spend_usd: 0.0,
        };
        a.usage.record(&broken(ErrorKind::Broken));
        a.usage.record(&broken(ErrorKind::Timeout));
        a.usage.record(&Outcome::failed(
            ErrorKind::Timeout,
            Duration::from_millis(9),
        ));
        let r = take_report(&live);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].requests, r[0].streams_broken, r[0].errors_timeout),
            (3, 2, 1),
            "a stream broken after its first byte is not also a failure before it"
        );
        assert!(!r[0].ejected && !r[0].throttled);

        // Ejected with nothing else to say: still reported, once with the
        // ejection's start and then as a gauge while it lasts.
        let p = crate::health::OutlierPolicy {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(60),
            ..Default::default()
        };
        let now = std::time::Instant::now();
        a.failure(Duration::ZERO, now, &p);
        a.throttle(now + Duration::from_secs(60), now);
        let r = take_report(&live);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (
                r[0].requests,
                r[0].ejections,
                r[0].ejected,
                r[0].throttles,
                r[0].throttled
            ),
            (0, 1, true, 1, true)
        );
        let r = take_report(&live);
        assert_eq!(
            (r.len(), r[0].ejections, r[0].ejected, r[0].throttles),
            (1, 0, true, 0)
        );
    }
}
