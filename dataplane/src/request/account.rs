//! Accounting, the last stage: what every attempt and every answer leaves
//! behind. The endpoint's telemetry window (for the control plane), its
//! local health (outlier ejection, throttling after a 429, latency for the
//! balancer), and the request's own counters. An access log goes here too.

use std::time::{Duration, Instant};

use super::attempt::AttemptError;
use super::relay::Relayed;
use crate::health::OutlierPolicy;
use crate::table::Endpoint;
use crate::usage::Outcome;

/// A failed attempt: telemetry, local outlier detection, and throttling
/// after a 429.
pub fn attempt_failed(ep: &Endpoint, e: &AttemptError, took: Duration, outlier: &OutlierPolicy) {
    let Some(kind) = e.kind() else {
        // Nothing reached the endpoint: its health is not in question.
        tracing::debug!(endpoint = %ep.name, error = %e, "attempt not made");
        return;
    };
    let now = Instant::now();
    ep.state.usage.record(&Outcome::failed(kind, took));
    if let AttemptError::Status {
        status: 429,
        retry_after,
    } = e
    {
        ep.state
            .throttle(now + retry_after.unwrap_or(Duration::from_secs(1)), now);
    }
    if let Some(d) = ep.state.failure(took, now, outlier) {
        ep.ejections.inc();
        tracing::warn!(endpoint = %ep.name, for_ms = d.as_millis() as u64, error = %e,
            "endpoint ejected locally");
    }
    tracing::debug!(endpoint = %ep.name, error = %e, "attempt failed");
}

/// An answer relayed (whole or broken mid-way): tokens and spend from the
/// provider's usage, latency, and the endpoint's health.
pub fn answered(ep: &Endpoint, r: &Relayed, outlier: &OutlierPolicy) {
    let outcome = Outcome {
        error: r.error,
        ttft: Some(r.ttft),
        latency: r.latency,
        tokens: r.tokens,
        spend_usd: r.tokens.map_or(0.0, |t| t.cost(&ep.prices)),
    };
    ep.state.usage.record(&outcome);
    let now = Instant::now();
    match r.error {
        None => ep.state.success(r.ttft, now, outlier),
        Some(_) => {
            if let Some(d) = ep.state.failure(r.latency, now, outlier) {
                ep.ejections.inc();
                tracing::warn!(endpoint = %ep.name, for_ms = d.as_millis() as u64,
                    "endpoint ejected locally after a broken stream");
            }
        }
    }
}
