//! The sidecar's counters, rendered as Prometheus text on `/metrics`:
//! requests by class, endpoint and status, and every resilience action
//! (retries, fallbacks, hedges, ejections, sheds, degradations, budget
//! refusals).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Counter {
    Requests,
    Retries,
    Fallbacks,
    Hedges,
    HedgesCancelled,
    Ejections,
    Sheds,
    Degraded,
    RetryBudgetExhausted,
    /// Requests refused because every endpoint they could use is over budget.
    OverBudget,
}

impl Counter {
    fn name(self) -> &'static str {
        match self {
            Counter::Requests => "switchyard_requests_total",
            Counter::Retries => "switchyard_retries_total",
            Counter::Fallbacks => "switchyard_fallbacks_total",
            Counter::Hedges => "switchyard_hedges_total",
            Counter::HedgesCancelled => "switchyard_hedges_cancelled_total",
            Counter::Ejections => "switchyard_ejections_total",
            Counter::Sheds => "switchyard_sheds_total",
            Counter::Degraded => "switchyard_degraded_total",
            Counter::RetryBudgetExhausted => "switchyard_retry_budget_exhausted_total",
            Counter::OverBudget => "switchyard_over_budget_rejections_total",
        }
    }
}

/// Labels of one series. `detail` is the status code for requests and the
/// action for degradations; empty labels are not rendered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    counter: Counter,
    class: Option<Arc<str>>,
    endpoint: Option<Arc<str>>,
    detail: &'static str,
    code: u16,
}

#[derive(Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<Key, u64>>,
}

impl Metrics {
    pub fn inc(
        &self,
        counter: Counter,
        class: Option<&Arc<str>>,
        endpoint: Option<&Arc<str>>,
        detail: &'static str,
    ) {
        self.add(counter, class, endpoint, detail, 0);
    }

    pub fn request(&self, class: Option<&Arc<str>>, endpoint: Option<&Arc<str>>, code: u16) {
        self.add(Counter::Requests, class, endpoint, "", code);
    }

    fn add(
        &self,
        counter: Counter,
        class: Option<&Arc<str>>,
        endpoint: Option<&Arc<str>>,
        detail: &'static str,
        code: u16,
    ) {
        let key = Key {
            counter,
            class: class.cloned(),
            endpoint: endpoint.cloned(),
            detail,
            code,
        };
        *self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut last = None;
        for (k, v) in series.iter() {
            if last != Some(k.counter) {
                let _ = writeln!(out, "# TYPE {} counter", k.counter.name());
                last = Some(k.counter);
            }
            let mut labels = Vec::new();
            if let Some(c) = &k.class {
                labels.push(format!("class=\"{}\"", escape(c)));
            }
            if let Some(e) = &k.endpoint {
                labels.push(format!("endpoint=\"{}\"", escape(e)));
            }
            if !k.detail.is_empty() {
                labels.push(format!("action=\"{}\"", k.detail));
            }
            if k.code != 0 {
                labels.push(format!("code=\"{}\"", k.code));
            }
            let _ = writeln!(out, "{}{{{}}} {v}", k.counter.name(), labels.join(","));
        }
    }
}

pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        let c: Arc<str> = Arc::from("std");
        let e: Arc<str> = Arc::from("a\"b");
        m.request(Some(&c), Some(&e), 200);
        m.request(Some(&c), Some(&e), 200);
        m.inc(Counter::Degraded, Some(&c), None, "reject");
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("# TYPE switchyard_requests_total counter\n"));
        assert!(
            out.contains(
                "switchyard_requests_total{class=\"std\",endpoint=\"a\\\"b\",code=\"200\"} 2\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("switchyard_degraded_total{class=\"std\",action=\"reject\"} 1\n"),
            "{out}"
        );
    }
}
