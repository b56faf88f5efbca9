//! The sidecar's `/metrics`, through `prometheus-client`: requests by
//! class, endpoint and status, every resilience action (retries,
//! fallbacks, hedges, ejections, sheds, degradations, budget refusals),
//! and, read at scrape time, the table version, each endpoint's in-flight
//! count, cooldowns and RTT.
//!
//! The request path never looks a series up by its labels: a class's
//! counters are resolved when its table is compiled, and a (class,
//! endpoint) pair's on first use, then kept with the table, so counting is
//! one atomic add with no lock and no allocation.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::table::{Live, Table};

/// One series' labels; the absent ones are not rendered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels {
    pub class: Option<Arc<str>>,
    pub endpoint: Option<Arc<str>>,
    pub action: Option<&'static str>,
    pub code: Option<u16>,
}

impl EncodeLabelSet for Labels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        if let Some(c) = &self.class {
            ("class", &**c).encode(encoder.encode_label())?;
        }
        if let Some(e) = &self.endpoint {
            ("endpoint", &**e).encode(encoder.encode_label())?;
        }
        if let Some(a) = self.action {
            ("action", a).encode(encoder.encode_label())?;
        }
        if let Some(c) = self.code {
            ("code", c).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

type Counters = Family<Labels, Counter>;

/// The sidecar's counters and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Counters,
    retries: Counters,
    fallbacks: Counters,
    hedges: Counters,
    hedges_cancelled: Counters,
    ejections: Counters,
    sheds: Counters,
    degraded: Counters,
    retry_budget_exhausted: Counters,
    over_spend_budget: Counters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The counters, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let mut family = |name: &str, help: &str| {
            let f = Counters::default();
            registry.register(name, help, f.clone());
            f
        };
        Self {
            requests: family(
                "switchyard_requests",
                "Chat completion requests answered, by class, endpoint and status",
            ),
            retries: family(
                "switchyard_retries",
                "Further attempts of a request, by class and the endpoint tried",
            ),
            fallbacks: family(
                "switchyard_fallbacks",
                "Retries that moved to another endpoint, by class and that endpoint",
            ),
            hedges: family(
                "switchyard_hedges",
                "Second requests sent because the first was slow to its first token",
            ),
            hedges_cancelled: family(
                "switchyard_hedges_cancelled",
                "Attempts dropped because the other of a hedged pair answered first",
            ),
            ejections: family(
                "switchyard_ejections",
                "Times this sidecar took an endpoint out after failures",
            ),
            sheds: family(
                "switchyard_sheds",
                "Requests refused because every endpoint they could use was at capacity",
            ),
            degraded: family(
                "switchyard_degraded",
                "Requests served degraded (or refused) because the class's preferred endpoints were out",
            ),
            retry_budget_exhausted: family(
                "switchyard_retry_budget_exhausted",
                "Retries not made because the class's retry budget was spent",
            ),
            over_spend_budget: family(
                "switchyard_over_budget_rejections",
                "Requests refused because every endpoint they could use was over its spend budget",
            ),
            registry,
        }
    }

    /// Adds the gauges read at each scrape from the table in force, the
    /// endpoints' live state and the RTT source.
    pub fn with_live_gauges(
        mut self,
        tables: Arc<ArcSwapOption<Table>>,
        live: Arc<Live>,
        rtt: Arc<crate::rtt::RttView>,
    ) -> Self {
        self.registry
            .register_collector(Box::new(LiveGauges { tables, live, rtt }));
        self
    }

    /// The whole exposition, in OpenMetrics text when `openmetrics`, else
    /// in Prometheus text format 0.0.4.
    pub fn render(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(8192);
        let done = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "rendering metrics");
        }
        out
    }

    /// A class's counters, created (at zero) now so a scrape shows them
    /// before anything happened.
    pub fn class(&self, name: &Arc<str>, degrade: Option<&'static str>) -> ClassCounters {
        let l = |action| Labels {
            class: Some(name.clone()),
            action,
            ..Labels::default()
        };
        ClassCounters {
            class: name.clone(),
            sheds: self.sheds.get_or_create_owned(&l(None)),
            retry_budget_exhausted: self.retry_budget_exhausted.get_or_create_owned(&l(None)),
            over_spend_budget: self.over_spend_budget.get_or_create_owned(&l(None)),
            degraded: degrade.map(|a| self.degraded.get_or_create_owned(&l(Some(a)))),
            no_endpoint: PairCounters::default(),
        }
    }

    /// An endpoint's ejection counter, created at zero.
    pub fn ejections(&self, endpoint: &Arc<str>) -> Counter {
        self.ejections.get_or_create_owned(&Labels {
            endpoint: Some(endpoint.clone()),
            ..Labels::default()
        })
    }

    /// The counters of a (class, endpoint) pair, created at zero now.
    pub fn pair(&self, class: &Arc<str>, endpoint: &Arc<str>) -> PairCounters {
        let made = |family: &Counters| {
            let cell = OnceLock::new();
            let _ = cell.set(self.series(family, class, Some(endpoint), None));
            cell
        };
        PairCounters {
            retries: made(&self.retries),
            fallbacks: made(&self.fallbacks),
            hedges: made(&self.hedges),
            hedges_cancelled: made(&self.hedges_cancelled),
            requests: Default::default(),
        }
    }

    fn series(
        &self,
        family: &Counters,
        class: &Arc<str>,
        endpoint: Option<&Arc<str>>,
        code: Option<u16>,
    ) -> Counter {
        family.get_or_create_owned(&Labels {
            class: Some(class.clone()),
            endpoint: endpoint.cloned(),
            action: None,
            code,
        })
    }
}

/// Status codes whose request counters are kept at hand; others are looked
/// up (they are rare).
const CODES: [u16; 11] = [200, 400, 401, 403, 404, 408, 413, 429, 502, 503, 504];

/// Counters of one (class, endpoint) pair, resolved on first use.
#[derive(Debug, Default)]
pub struct PairCounters {
    retries: OnceLock<Counter>,
    fallbacks: OnceLock<Counter>,
    hedges: OnceLock<Counter>,
    hedges_cancelled: OnceLock<Counter>,
    requests: [OnceLock<Counter>; CODES.len()],
}

/// The counters of one class; kept with the compiled table.
#[derive(Debug)]
pub struct ClassCounters {
    class: Arc<str>,
    pub sheds: Counter,
    pub retry_budget_exhausted: Counter,
    pub over_spend_budget: Counter,
    /// For the class's degradation, when it has one.
    pub degraded: Option<Counter>,
    /// Requests answered before any endpoint was tried.
    no_endpoint: PairCounters,
}

/// What a pair counter counts.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Retry,
    Fallback,
    Hedge,
    HedgeCancelled,
}

impl ClassCounters {
    /// Counts `action` towards `endpoint`; `pair` is the class's counters
    /// for that endpoint (see `table::Class::pair`).
    pub fn action(&self, m: &Metrics, pair: &PairCounters, endpoint: &Arc<str>, action: Action) {
        let (slot, family) = match action {
            Action::Retry => (&pair.retries, &m.retries),
            Action::Fallback => (&pair.fallbacks, &m.fallbacks),
            Action::Hedge => (&pair.hedges, &m.hedges),
            Action::HedgeCancelled => (&pair.hedges_cancelled, &m.hedges_cancelled),
        };
        slot.get_or_init(|| m.series(family, &self.class, Some(endpoint), None))
            .inc();
    }

    /// Counts a request answered with `status`, by `endpoint` (with its
    /// pair counters) or by the sidecar itself.
    pub fn request(&self, m: &Metrics, endpoint: Option<(&PairCounters, &Arc<str>)>, status: u16) {
        let (pair, name) = match endpoint {
            Some((p, n)) => (p, Some(n)),
            None => (&self.no_endpoint, None),
        };
        match CODES
            .iter()
            .position(|c| *c == status)
            .and_then(|i| pair.requests.get(i))
        {
            Some(slot) => {
                slot.get_or_init(|| m.series(&m.requests, &self.class, name, Some(status)))
                    .inc();
            }
            None => {
                m.series(&m.requests, &self.class, name, Some(status)).inc();
            }
        }
    }
}

/// Gauges read from live state at each scrape.
#[derive(Debug)]
struct LiveGauges {
    tables: Arc<ArcSwapOption<Table>>,
    live: Arc<Live>,
    rtt: Arc<crate::rtt::RttView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EndpointLabels<'a> {
    endpoint: &'a str,
    reason: Option<&'static str>,
    source: Option<&'static str>,
}

impl EncodeLabelSet for EndpointLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("endpoint", self.endpoint).encode(encoder.encode_label())?;
        if let Some(r) = self.reason {
            ("reason", r).encode(encoder.encode_label())?;
        }
        if let Some(s) = self.source {
            ("source", s).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

fn gauge<'a, V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (EndpointLabels<'a>, V)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

impl Collector for LiveGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = self.tables.load_full();
        let version = table.as_ref().map_or(0, |t| t.version);
        let m = encoder.encode_descriptor(
            "switchyard_table_version",
            "Version of the routing table in force",
            None,
            MetricType::Gauge,
        )?;
        prometheus_client::metrics::gauge::ConstGauge::new(version as i64).encode(m)?;

        let origin = &self.live.origin;
        let from = origin.source();
        let mut m = encoder.encode_descriptor(
            "switchyard_table_source",
            "1 for where the table in force came from: control-plane, persisted (saved by an earlier run; the control plane has not answered yet), policy-file (standalone), none",
            None,
            MetricType::Gauge,
        )?;
        for s in crate::origin::Source::ALL {
            m.encode_family(&[("source", s.label())])?
                .encode_gauge(&i64::from(s == from))?;
        }
        for (name, help, v) in [
            (
                "switchyard_weights_expired",
                "1 while the table's weights have outlived their TTL without the control plane and the sidecar balances on local signals alone",
                origin.weights_expired(),
            ),
            (
                "switchyard_control_connected",
                "1 while the Watch stream to the control plane is up",
                origin.control_connected(),
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            prometheus_client::metrics::gauge::ConstGauge::new(i64::from(v)).encode(m)?;
        }

        let now = Instant::now();
        let mut states = self.live.endpoints.all();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        // One read per endpoint, so the ejected and cooldown gauges agree.
        let cooldowns: Vec<_> = states.iter().map(|(_, s)| s.cooldown(now)).collect();
        let ep = |endpoint, reason| EndpointLabels {
            endpoint,
            reason,
            source: None,
        };
        gauge(
            &mut encoder,
            "switchyard_endpoint_in_flight",
            "Requests this sidecar has in flight on the endpoint",
            states
                .iter()
                .map(|(n, s)| (ep(n, None), i64::from(s.in_flight()))),
        )?;
        gauge(
            &mut encoder,
            "switchyard_endpoint_ejected",
            "1 while this sidecar keeps the endpoint out after failures",
            states
                .iter()
                .zip(&cooldowns)
                .map(|((n, _), (ejected, _))| (ep(n, None), i64::from(!ejected.is_zero()))),
        )?;
        gauge(
            &mut encoder,
            "switchyard_endpoint_cooldown_seconds",
            "Time left before this sidecar sends the endpoint traffic again",
            states
                .iter()
                .zip(&cooldowns)
                .flat_map(|((n, _), (ejected, throttled))| {
                    [
                        (ep(n, Some("ejected")), ejected.as_secs_f64()),
                        (ep(n, Some("throttled")), throttled.as_secs_f64()),
                    ]
                }),
        )?;

        let source = self.rtt.source();
        let rtts = table
            .as_deref()
            .map(|t| self.rtt.endpoints(t))
            .unwrap_or_default();
        fn rtt<'e>(
            e: &'e crate::rtt::EndpointRtt,
            source: &'static str,
        ) -> (EndpointLabels<'e>, switchyard_rtt::RttSample) {
            let labels = EndpointLabels {
                endpoint: &e.endpoint,
                reason: None,
                source: Some(source),
            };
            (labels, e.sample)
        }
        let rtt = |e| rtt(e, source);
        gauge(
            &mut encoder,
            "switchyard_endpoint_rtt_seconds",
            "Smoothed kernel TCP round-trip time to the endpoint",
            rtts.iter().map(rtt).map(|(l, s)| (l, s.srtt.as_secs_f64())),
        )?;
        gauge(
            &mut encoder,
            "switchyard_endpoint_min_rtt_seconds",
            "Windowed minimum kernel TCP round-trip time to the endpoint",
            rtts.iter()
                .map(rtt)
                .map(|(l, s)| (l, s.min_rtt.as_secs_f64())),
        )?;
        gauge(
            &mut encoder,
            "switchyard_endpoint_rtt_age_seconds",
            "Time since the endpoint's RTT was last updated",
            rtts.iter().map(rtt).map(|(l, s)| (l, s.age.as_secs_f64())),
        )?;
        let m = encoder.encode_descriptor(
            "switchyard_rtt_source",
            "The RTT source in use",
            None,
            MetricType::Info,
        )?;
        prometheus_client::metrics::info::Info::new([("source", source)]).encode(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
