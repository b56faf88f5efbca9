//! The gRPC services sidecars call: table discovery (the Watch stream) and
//! telemetry intake. Stream semantics are those written in the `.proto`
//! files. The operators' service is in `admin`.
//!
//! Both streams end cleanly (end of stream, status OK) when the control
//! plane shuts down, so a sidecar can tell "this one is going away" from a
//! broken connection and reconnect at once, to its successor or another
//! replica, instead of backing off.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use parking_lot::Mutex;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::watch_request::Kind;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::publish::{now_ms, Published};
use crate::registry::Registry;
use crate::signals::Aggregator;

#[derive(Clone)]
pub struct State {
    pub tables: watch::Receiver<Arc<Published>>,
    pub registry: Arc<Registry>,
    pub signals: Arc<Mutex<Aggregator>>,
    /// Turns true when the control plane shuts down.
    pub stopping: watch::Receiver<bool>,
}

/// Resolves once the control plane shuts down (or its state is gone).
pub(crate) async fn stopped(mut stopping: watch::Receiver<bool>) {
    // An error means the sender is gone: the server is being torn down.
    let _ = stopping.wait_for(|s| *s).await;
}

pub struct Discovery(pub State);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::TableUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::routing_discovery_server::RoutingDiscovery for Discovery {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::WatchRequest {
                kind: Some(Kind::Hello(h)),
            }) if !h.sidecar_id.is_empty() => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on Watch must be a hello with a sidecar_id",
                ))
            }
        };
        let id = hello.sidecar_id;
        tracing::info!(sidecar = %id, applied = hello.applied_version, "sidecar watching");
        let registry = self.0.registry.clone();
        registry.stream_opened(&id);
        let mut tables = self.0.tables.clone();
        let stop = stopped(self.0.stopping.clone());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            tokio::pin!(stop);
            let first = tables.borrow_and_update().update.clone();
            if tx.send(Ok(first)).await.is_ok() {
                loop {
                    tokio::select! {
                        // Dropping `tx` ends the stream with status OK.
                        () = &mut stop => {
                            tracing::info!(sidecar = %id, "shutting down: closing the Watch stream");
                            break;
                        }
                        changed = tables.changed() => {
                            if changed.is_err() {
                                break;
                            }
                            let update = tables.borrow_and_update().update.clone();
                            if tx.send(Ok(update)).await.is_err() {
                                break;
                            }
                        }
                        msg = inbound.message() => match msg {
                            Ok(Some(pb::WatchRequest { kind: Some(Kind::Ack(a)) })) => {
                                tracing::debug!(sidecar = %id, version = a.version, "ack");
                                registry.ack(&id, a.version);
                            }
                            Ok(Some(pb::WatchRequest { kind: Some(Kind::Nack(n)) })) => {
                                tracing::warn!(sidecar = %id, version = n.version, reason = %n.reason, "sidecar refused a table");
                                registry.nack(&id, n.version, n.reason);
                            }
                            Ok(Some(_)) => {
                                tracing::warn!(sidecar = %id, "unexpected message on Watch; ignored");
                            }
                            Ok(None) | Err(_) => break,
                        },
                    }
                }
            }
            tracing::info!(sidecar = %id, "sidecar stream closed");
            registry.stream_closed(&id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub struct Telemetry(pub State);

#[tonic::async_trait]
impl pb::telemetry_server::Telemetry for Telemetry {
    async fn report(
        &self,
        req: Request<Streaming<pb::TelemetryReport>>,
    ) -> Result<Response<pb::ReportSummary>, Status> {
        let mut inbound = req.into_inner();
        let mut reports = 0;
        let stop = stopped(self.0.stopping.clone());
        tokio::pin!(stop);
        loop {
            let r = tokio::select! {
                // Answering ends the call cleanly; the sidecar opens a new one.
                () = &mut stop => break,
                r = inbound.message() => match r? {
                    Some(r) => r,
                    None => break,
                },
            };
            self.0.registry.report(&r);
            self.0.signals.lock().ingest(&r, now_ms());
            reports += 1;
        }
        Ok(Response::new(pb::ReportSummary { reports }))
    }
}
