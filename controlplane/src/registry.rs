//! What the control plane knows about each sidecar: the version it ACKed,
//! its last NACK, whether its stream is up, and when it last reported.

use std::collections::BTreeMap;
use std::time::Instant;

use parking_lot::Mutex;
use switchyard_proto::v1 as pb;

#[derive(Debug, Default, Clone)]
struct Sidecar {
    /// Open Watch streams; a reconnect may overlap the old stream's close.
    streams: u32,
    acked_version: u64,
    nacked_version: u64,
    nack_reason: String,
    last_report: Option<Instant>,
}

#[derive(Debug, Default)]
struct EndpointTotals {
    requests: u64,
    errors: u64,
}

#[derive(Default)]
pub struct Registry {
    sidecars: Mutex<BTreeMap<String, Sidecar>>,
    endpoints: Mutex<BTreeMap<String, EndpointTotals>>,
}

impl Registry {
    pub fn stream_opened(&self, id: &str) {
        let mut s = self.sidecars.lock();
        s.entry(id.to_string()).or_default().streams += 1;
    }

    pub fn stream_closed(&self, id: &str) {
        let mut s = self.sidecars.lock();
        let e = s.entry(id.to_string()).or_default();
        e.streams = e.streams.saturating_sub(1);
    }

    pub fn ack(&self, id: &str, version: u64) {
        let mut s = self.sidecars.lock();
        let e = s.entry(id.to_string()).or_default();
        e.acked_version = version;
        if e.nacked_version <= version {
            e.nacked_version = 0;
            e.nack_reason.clear();
        }
    }

    pub fn nack(&self, id: &str, version: u64, reason: String) {
        let mut s = self.sidecars.lock();
        let e = s.entry(id.to_string()).or_default();
        e.nacked_version = version;
        e.nack_reason = reason;
    }

    pub fn report(&self, r: &pb::TelemetryReport) {
        self.sidecars
            .lock()
            .entry(r.sidecar_id.clone())
            .or_default()
            .last_report = Some(Instant::now());
        let mut eps = self.endpoints.lock();
        for w in &r.endpoints {
            let t = eps.entry(w.endpoint.clone()).or_default();
            let errors = crate::signals::window_errors(w);
            t.requests = t.requests.saturating_add(w.requests);
            t.errors = t.errors.saturating_add(errors);
        }
    }

    pub fn sidecars(&self) -> Vec<pb::SidecarStatus> {
        let now = Instant::now();
        self.sidecars
            .lock()
            .iter()
            .map(|(id, s)| pb::SidecarStatus {
                sidecar_id: id.clone(),
                connected: s.streams > 0,
                acked_version: s.acked_version,
                nacked_version: s.nacked_version,
                nack_reason: s.nack_reason.clone(),
                last_report_age_ms: s
                    .last_report
                    .map_or(-1, |t| now.duration_since(t).as_millis() as i64),
            })
            .collect()
    }

    /// Requests and errors per endpoint name since start.
    pub fn endpoint_totals(&self, name: &str) -> (u64, u64) {
        self.endpoints
            .lock()
            .get(name)
            .map_or((0, 0), |t| (t.requests, t.errors))
    }
}
