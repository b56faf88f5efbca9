//! The exposition read back by a Prometheus text parser (`prometheus-parse`),
//! every line accounted for.

use super::*;
use prometheus_parse::{LineInfo, Scrape, Value};

/// Parses `text` strictly: every line is a HELP, TYPE or sample line the
/// parser understands (or OpenMetrics' `# EOF`), every sample belongs to a
/// declared family, and no series appears twice.
pub(crate) fn parse_strict(text: &str) -> Scrape {
    let mut families: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Doc { .. } => {}
            LineInfo::Type { metric_name, .. } => families.push(metric_name),
            LineInfo::Sample {
                metric_name,
                labels,
                ..
            } => {
                assert!(
                    families.iter().any(|f| metric_name.starts_with(f.as_str())),
                    "sample of an undeclared family: {line}"
                );
                assert!(
                    seen.insert((metric_name.to_string(), labels.map(str::to_string))),
                    "series twice: {line}"
                );
            }
            LineInfo::Empty => {}
            LineInfo::Ignored => assert_eq!(line, "# EOF", "unparsed line: {line:?}"),
        }
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| {
            x.metric == name
                && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v))
                && x.labels.len() == labels.len()
        })
        .map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn counters_render_with_todays_names_and_labels_in_both_formats() {
    let m = Metrics::new();
    let class: Arc<str> = Arc::from("std");
    let ep: Arc<str> = Arc::from("a\"b,c");
    let c = m.class(&class, Some("reject"));
    let pair = PairCounters::default();
    c.request(&m, Some((&pair, &ep)), 200);
    c.request(&m, Some((&pair, &ep)), 200);
    c.request(&m, None, 503);
    c.request(&m, Some((&pair, &ep)), 418);
    c.action(&m, &pair, &ep, Action::Retry);
    c.action(&m, &pair, &ep, Action::Fallback);
    c.sheds.inc();
    if let Some(d) = &c.degraded {
        d.inc();
    }
    m.ejections(&ep).inc();

    for openmetrics in [false, true] {
        let text = m.render(openmetrics);
        let s = parse_strict(&text);
        // (prometheus-parse splits labels at commas, so the odd endpoint
        // name is checked as rendered.)
        assert!(
            text.contains(
                "switchyard_requests_total{class=\"std\",endpoint=\"a\\\"b,c\",code=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("switchyard_requests_total{class=\"std\",code=\"503\"} 1"),
            "{text}"
        );
        assert!(text.contains("code=\"418\"} 1"), "{text}");
        assert_eq!(
            value(&s, "switchyard_sheds_total", &[("class", "std")]),
            Some(1.0)
        );
        assert_eq!(
            value(
                &s,
                "switchyard_degraded_total",
                &[("class", "std"), ("action", "reject")]
            ),
            Some(1.0)
        );
        // Created with the class, before anything happened.
        assert_eq!(
            value(
                &s,
                "switchyard_over_budget_rejections_total",
                &[("class", "std")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &s,
                "switchyard_retry_budget_exhausted_total",
                &[("class", "std")]
            ),
            Some(0.0)
        );
        assert!(
            text.contains("switchyard_retries_total{class=\"std\",endpoint=\"a\\\"b,c\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_fallbacks_total{class=\"std\",endpoint=\"a\\\"b,c\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_ejections_total{endpoint=\"a\\\"b,c\"} 1"),
            "{text}"
        );
        assert_eq!(openmetrics, text.ends_with("# EOF\n"));
    }
}

#[test]
fn live_gauges_show_the_table_version_in_flight_and_cooldowns() {
    let live = Arc::new(Live::default());
    let state = live.endpoints.get("e1");
    state
        .in_flight
        .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
    let now = Instant::now();
    state.throttle(now + std::time::Duration::from_secs(30), now);
    struct NoRtt;
    impl switchyard_rtt::RttSource for NoRtt {
        fn rtt(&self, _: std::net::SocketAddr) -> Option<switchyard_rtt::RttSample> {
            None
        }
        fn source(&self) -> &'static str {
            "tcp-info"
        }
        fn observe(&self, _: std::os::fd::RawFd, _: std::net::SocketAddr, _: bool) {}
    }
    let rtt = Arc::new(crate::rtt::RttView::new(Arc::new(NoRtt)));
    let m = Metrics::new().with_live_gauges(Arc::default(), live, rtt);
    let text = m.render(false);
    let s = parse_strict(&text);
    assert_eq!(value(&s, "switchyard_table_version", &[]), Some(0.0));
    assert_eq!(
        value(&s, "switchyard_endpoint_in_flight", &[("endpoint", "e1")]),
        Some(3.0)
    );
    assert_eq!(
        value(&s, "switchyard_endpoint_ejected", &[("endpoint", "e1")]),
        Some(0.0)
    );
    let throttled = value(
        &s,
        "switchyard_endpoint_cooldown_seconds",
        &[("endpoint", "e1"), ("reason", "throttled")],
    )
    .unwrap();
    assert!(throttled > 29.0 && throttled <= 30.0, "{throttled}");
    assert_eq!(
        value(
            &s,
            "switchyard_endpoint_cooldown_seconds",
            &[("endpoint", "e1"), ("reason", "ejected")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "switchyard_rtt_source_info", &[("source", "tcp-info")]),
        Some(1.0)
    );
}
