//! Kernel RTT to each table endpoint, as the sidecar reports it: in the
//! telemetry windows (`rtt_us`, `rtt_source`) and on `GET /metrics`.
//!
//! The figures come from a [`switchyard_rtt::RttSource`]: the eBPF sock_ops
//! program, which sees every connection in its cgroup, or TCP_INFO, which
//! only knows the upstream sockets [`observe_upstream`] shows it. An
//! endpoint is matched by its resolved address (`Endpoint::peer`), so every
//! connection to that address and port counts, whichever request made it.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use pingora::upstreams::peer::HttpPeer;
use switchyard_proto::v1 as pb;
use switchyard_rtt::{RttSample, RttSource};

use crate::table::Table;

/// The sidecar's RTT source and what it derives from it.
pub struct RttView {
    source: Arc<dyn RttSource>,
}

impl std::fmt::Debug for RttView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RttView")
            .field("source", &self.source.source())
            .finish()
    }
}

/// One table endpoint's RTT.
#[derive(Debug, Clone)]
pub struct EndpointRtt {
    pub endpoint: Arc<str>,
    pub addr: SocketAddr,
    pub sample: RttSample,
}

impl RttView {
    pub fn new(source: Arc<dyn RttSource>) -> Self {
        Self { source }
    }

    /// `"ebpf"`, `"tcp-info"` or (simulated) `"file"`.
    pub fn source(&self) -> &'static str {
        self.source.source()
    }

    /// The table's endpoints with a measured RTT, in table order.
    pub fn endpoints(&self, table: &Table) -> Vec<EndpointRtt> {
        table
            .endpoints
            .iter()
            .filter_map(|ep| {
                let addr = *ep.peer._address.as_inet()?;
                let sample = self.source.rtt(addr)?;
                Some(EndpointRtt {
                    endpoint: ep.name.clone(),
                    addr,
                    sample,
                })
            })
            .collect()
    }

    /// Adds each endpoint's RTT to its telemetry window. Endpoints with an
    /// RTT but no request in the window get a window of their own, so the
    /// control plane learns the RTT of idle endpoints too.
    pub fn annotate(&self, windows: &mut Vec<pb::EndpointWindow>, table: Option<&Table>) {
        let Some(table) = table else { return };
        for e in self.endpoints(table) {
            let rtt_us = u32::try_from(e.sample.srtt.as_micros())
                .unwrap_or(u32::MAX)
                .max(1);
            let source = self.source().to_string();
            match windows.iter_mut().find(|w| *w.endpoint == *e.endpoint) {
                Some(w) => {
                    w.rtt_us = rtt_us;
                    w.rtt_source = source;
                }
                None => windows.push(pb::EndpointWindow {
                    endpoint: e.endpoint.to_string(),
                    rtt_us,
                    rtt_source: source,
                    ..Default::default()
                }),
            }
        }
    }

    /// Shows the source an upstream connection the forward step just got
    /// from the pool (`reused`) or opened. Only TCP_INFO reads it: always
    /// when fresh, at most once a second per peer when pooled.
    pub fn observe(&self, stream: &pingora::protocols::Stream, peer: &HttpPeer, reused: bool) {
        let Some(addr) = peer._address.as_inet() else {
            return;
        };
        // A plain TCP stream, or TLS over one (whose id is the socket's).
        type Tcp = pingora::protocols::l4::stream::Stream;
        let any = stream.as_any();
        let fd = if let Some(tcp) = any.downcast_ref::<Tcp>() {
            tcp.as_raw_fd()
        } else if let Some(tls) = any.downcast_ref::<pingora::protocols::tls::TlsStream<Tcp>>() {
            pingora::protocols::UniqueID::id(tls)
        } else {
            return;
        };
        self.source.observe(fd, *addr, !reused);
    }
}

/// The process's view, for the forward step. A global so the hook is one
/// line there and forward's signature stays as it is; the sidecar is one
/// per process, and `run` installs it once.
static VIEW: OnceLock<Arc<RttView>> = OnceLock::new();

/// Makes `view` the one [`observe_upstream`] uses. Later calls are ignored.
pub fn install(view: Arc<RttView>) {
    let _ = VIEW.set(view);
}

/// [`RttView::observe`] on the installed view; nothing before `install`
/// (unit tests).
pub fn observe_upstream(stream: &pingora::protocols::Stream, peer: &HttpPeer, reused: bool) {
    if let Some(v) = VIEW.get() {
        v.observe(stream, peer, reused);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::RawFd;
    use std::time::Duration;

    /// A source that knows one address.
    struct Fixed(SocketAddr);

    impl RttSource for Fixed {
        fn rtt(&self, peer: SocketAddr) -> Option<RttSample> {
            (peer == self.0).then_some(RttSample {
                srtt: Duration::from_micros(250),
                min_rtt: Duration::from_micros(200),
                samples: 3,
                age: Duration::from_millis(5),
            })
        }
        fn source(&self) -> &'static str {
            "tcp-info"
        }
        fn observe(&self, _: RawFd, _: SocketAddr, _: bool) {}
    }

    fn table(a: SocketAddr, b: SocketAddr) -> Table {
        let ep = |name: &str, addr: SocketAddr| pb::Endpoint {
            name: name.into(),
            url: format!("http://{addr}"),
            api: pb::ApiKind::Openai as i32,
            tier: pb::Tier::Onprem as i32,
            models: vec!["m".into()],
            price_input_per_mtok: 1.0,
            price_output_per_mtok: 1.0,
            capacity: 0,
            price_cached_input_per_mtok: None,
            credential: String::new(),
            over_budget: false,
            model_ids: Default::default(),
            ..Default::default()
        };
        let t = pb::RoutingTable {
            version: 7,
            endpoints: vec![ep("near\"one", a), ep("far", b)],
            classes: vec![pb::RequestClass {
                name: "standard".into(),
                routes: vec![],
                fallback: vec!["far".into()],
                ttft_timeout_ms: 0,
                deadline_ms: 5000,
                ..Default::default()
            }],
            default_class: "standard".into(),
            weights_ttl_ms: 0,
        };
        let addrs = [("near\"one".to_string(), a), ("far".to_string(), b)]
            .into_iter()
            .collect();
        Table::compile(
            &t,
            &addrs,
            &crate::table::Live::default(),
            &crate::metrics::Metrics::new(),
        )
        .unwrap()
    }

    #[test]
    fn metrics_and_telemetry_carry_the_measured_endpoints_only() {
        let near: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let far: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        let t = Arc::new(table(near, far));
        let view = Arc::new(RttView::new(Arc::new(Fixed(near))));
        let tables = Arc::new(arc_swap::ArcSwapOption::new(Some(t.clone())));
        let m = crate::metrics::Metrics::new()
            .with_live_gauges(tables, Default::default(), view.clone())
            .render(false);
        assert!(
            m.contains("switchyard_endpoint_rtt_seconds{endpoint=\"near\\\"one\",source=\"tcp-info\"} 0.00025\n"),
            "{m}"
        );
        assert!(m.contains("switchyard_endpoint_min_rtt_seconds{endpoint=\"near\\\"one\",source=\"tcp-info\"} 0.0002\n"));
        assert!(!m.contains("far"), "{m}");
        assert!(m.contains("switchyard_rtt_source_info{source=\"tcp-info\"} 1\n"));

        let mut windows = vec![pb::EndpointWindow {
            endpoint: "far".into(),
            requests: 4,
            ..Default::default()
        }];
        view.annotate(&mut windows, Some(&t));
        assert_eq!(
            windows.len(),
            2,
            "an idle endpoint with an RTT gets a window"
        );
        assert_eq!((windows[0].rtt_us, windows[0].requests), (0, 4));
        assert_eq!(windows[1].endpoint, "near\"one");
        assert_eq!(
            (
                windows[1].rtt_us,
                windows[1].rtt_source.as_str(),
                windows[1].requests
            ),
            (250, "tcp-info", 0)
        );
    }

    #[test]
    fn without_a_table_there_is_nothing_to_report() {
        let view = Arc::new(RttView::new(Arc::new(Fixed(
            "127.0.0.1:1".parse().unwrap(),
        ))));
        let mut windows = Vec::new();
        view.annotate(&mut windows, None);
        assert!(windows.is_empty());
        let m = crate::metrics::Metrics::new()
            .with_live_gauges(Default::default(), Default::default(), view)
            .render(false);
        assert!(!m.contains("rtt_seconds{"), "{m}");
    }
}
