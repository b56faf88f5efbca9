//! The operators' gRPC service: status, kill switches, drains, overrides and
//! the audit log, behind a bearer token.
//!
//! Each change is validated against the policy in force, written with its
//! audit entry in one SQLite transaction, and then the engine is asked to
//! compute and push at once, so the reply can name the table version that
//! carries the change.

// tonic's service API speaks `Status`; the helpers return it as is, since
// boxing it only to unbox it at the boundary buys nothing.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::engine::EngineHandle;
use crate::publish::now_ms;
use crate::services::State;
use crate::store::{Action, Store, StoreError, Target};
use crate::weights::Override;

/// Longest override accepted: overrides are for incidents, not policy.
const MAX_OVERRIDE: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct Admin {
    pub state: State,
    pub store: Arc<Store>,
    pub engine: EngineHandle,
    /// `None`: only `Status` is served.
    pub token: Option<String>,
    pub interval: Duration,
}

/// Compares in time independent of where the inputs differ, so the token
/// cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "admin action failed in the state database");
    Status::internal(format!("state database: {e}"))
}

fn required<'a>(field: &str, v: &'a str) -> Result<&'a str, Status> {
    let v = v.trim();
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(v)
    }
}

fn actor(v: &str) -> &str {
    match v.trim() {
        "" => "unknown",
        a => a,
    }
}

fn remaining(until_ms: u64, now: u64) -> i64 {
    until_ms.saturating_sub(now).min(i64::MAX as u64) as i64
}

impl Admin {
    fn authorize<T>(&self, req: &Request<T>, write: bool) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return if write {
                Err(Status::unauthenticated(
                    "this control plane has no admin token; start it with --admin-token or SWITCHYARD_ADMIN_TOKEN",
                ))
            } else {
                Ok(())
            };
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if same(g.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong admin token")),
            None => Err(Status::unauthenticated(
                "missing admin token: send `authorization: Bearer <token>`",
            )),
        }
    }

    fn target(&self, t: Option<pb::switch_request::Target>) -> Result<Target, Status> {
        let policy = self.state.tables.borrow().policy.clone();
        match t {
            Some(pb::switch_request::Target::Endpoint(e)) => {
                let e = required("endpoint", &e)?;
                if !policy.endpoints.iter().any(|x| x.name == e) {
                    return Err(Status::not_found(format!("no endpoint is named {e:?}")));
                }
                Ok(Target::Endpoint(e.to_string()))
            }
            Some(pb::switch_request::Target::Provider(p)) => {
                let p = required("provider", &p)?;
                if !policy
                    .endpoints
                    .iter()
                    .any(|x| x.provider.as_deref() == Some(p))
                {
                    return Err(Status::not_found(format!(
                        "no endpoint names provider {p:?}"
                    )));
                }
                Ok(Target::Provider(p.to_string()))
            }
            None => Err(Status::invalid_argument("name an endpoint or a provider")),
        }
    }

    async fn act(
        &self,
        actor_name: &str,
        reason: &str,
        action: Action,
        done: String,
    ) -> Result<Response<pb::ActionReply>, Status> {
        let reason = required("reason", reason)?;
        let who = actor(actor_name);
        let id = self
            .store
            .apply(who, reason, &action, now_ms())
            .map_err(internal)?;
        tracing::warn!(actor = who, reason, action = ?action, audit_id = id, "admin action");
        let version = self
            .engine
            .recompute()
            .await
            .ok_or_else(|| Status::unavailable("the control plane is shutting down"))?;
        Ok(Response::new(pb::ActionReply {
            table_version: version,
            audit_id: id as u64,
            message: format!("{done}; in force from table version {version}"),
        }))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Admin {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.authorize(&req, false)?;
        let published = self.state.tables.borrow().clone();
        let now = now_ms();
        let (signals, spend): (_, Vec<f64>) = {
            let mut agg = self.state.signals.lock();
            let s = agg.snapshot(now);
            let spend = published
                .policy
                .endpoints
                .iter()
                .map(|e| agg.spend_total(&e.name))
                .collect();
            (s, spend)
        };
        let switches = self.store.switches(now).map_err(internal)?;
        // Booked at each computation: up to one interval behind the reports.
        let last_hour = self.store.spend_last_hour(now).map_err(internal)?;
        let decision = &published.decision;
        let endpoints = published
            .policy
            .endpoints
            .iter()
            .zip(spend)
            .map(|(e, spend_usd)| {
                let (requests, errors) = self.state.registry.endpoint_totals(&e.name);
                let sig = signals.get(&e.name);
                let sum = sig
                    .map(|s| s.summary(signals.window_start_ms))
                    .unwrap_or_default();
                let off = switches.off(e);
                let weights = decision
                    .classes
                    .iter()
                    .filter_map(|(class, d)| {
                        d.routes.get(&e.name).map(|w| pb::ClassWeight {
                            class: class.clone(),
                            weight: *w,
                        })
                    })
                    .collect();
                let ejections = decision
                    .standing
                    .iter()
                    .filter_map(|(class, st)| {
                        st.get(&e.name)
                            .filter(|s| s.ejected(now))
                            .map(|s| pb::Ejection {
                                class: class.clone(),
                                reason: s.reason.clone(),
                                remaining_ms: remaining(s.ejected_until_ms, now),
                            })
                    })
                    .collect();
                pb::EndpointStatus {
                    name: e.name.clone(),
                    tier: e.tier.as_str().to_string(),
                    requests,
                    errors,
                    provider: e.provider.clone().unwrap_or_default(),
                    weights,
                    ttft_p95_ms: sum.ttft_p95_ms.filter(|v| v.is_finite()).unwrap_or(-1.0),
                    rtt_ms: sig.and_then(|s| s.rtt_ms).unwrap_or(-1.0),
                    error_rate: sum.error_rate(),
                    window_requests: sum.requests,
                    in_flight: sig.map_or(0.0, |s| s.in_flight),
                    spend_usd,
                    killed: matches!(off, Some(crate::weights::Off::Killed(_))),
                    drained: matches!(off, Some(crate::weights::Off::Drained(_))),
                    switched_off_reason: match off {
                        Some(crate::weights::Off::Killed(r) | crate::weights::Off::Drained(r)) => r,
                        None => String::new(),
                    },
                    ejections,
                    queue_waiting: sig.and_then(|s| s.queue).map_or(-1.0, |q| q.waiting),
                    kv_cache: sig
                        .and_then(|s| s.queue)
                        .and_then(|q| q.kv_cache)
                        .unwrap_or(-1.0),
                    spend_last_hour_usd: last_hour.get(&e.name).copied().unwrap_or(0.0),
                    budget_usd_per_hour: e.budget_usd_per_hour.unwrap_or(0.0),
                    over_budget: decision
                        .over_spend_budget
                        .get(&e.name)
                        .cloned()
                        .unwrap_or_default(),
                    down: decision.down.get(&e.name).cloned().unwrap_or_default(),
                    probation: decision.probation.contains_key(&e.name),
                    probe: sig
                        .and_then(|s| s.probe.as_ref())
                        .map(|p| {
                            if p.failures == 0 {
                                "ok".to_string()
                            } else {
                                format!("{} ({} failed in a row)", p.last_error, p.failures)
                            }
                        })
                        .unwrap_or_default(),
                    sidecars_reporting: sig.map_or(0, |s| s.sidecars_reporting),
                    sidecars_ejecting: sig.map_or(0, |s| s.sidecars_ejecting),
                    sidecars_throttling: sig.map_or(0, |s| s.sidecars_throttling),
                    window_ejections: sum.ejections,
                    window_throttles: sum.throttles,
                    window_streams_broken: sum.streams_broken,
                }
            })
            .collect();
        let classes = published
            .policy
            .classes
            .iter()
            .map(|c| {
                let d = decision.classes.get(&c.name).cloned().unwrap_or_default();
                pb::ClassStatus {
                    name: c.name.clone(),
                    unroutable_reason: d.unroutable.unwrap_or_default(),
                    note: d.note.unwrap_or_default(),
                    fallback: d.fallback,
                }
            })
            .collect();
        let overrides = switches
            .overrides
            .iter()
            .map(|o| pb::OverrideStatus {
                endpoint: o.endpoint.clone(),
                class: o.class.clone().unwrap_or_default(),
                weight: o.weight,
                remaining_ms: remaining(o.expires_ms, now),
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            table_version: published.update.table.as_ref().map_or(0, |t| t.version),
            sidecars: self.state.registry.sidecars(),
            endpoints,
            classes,
            overrides,
            interval_ms: self.interval.as_millis().min(u32::MAX as u128) as u32,
            window_ms: published.policy.routing.window_ms,
        }))
    }

    async fn kill(
        &self,
        req: Request<pb::SwitchRequest>,
    ) -> Result<Response<pb::ActionReply>, Status> {
        self.authorize(&req, true)?;
        let r = req.into_inner();
        let target = self.target(r.target)?;
        let done = format!("{target} killed");
        self.act(&r.actor, &r.reason, Action::Kill(target), done)
            .await
    }

    async fn revive(
        &self,
        req: Request<pb::SwitchRequest>,
    ) -> Result<Response<pb::ActionReply>, Status> {
        self.authorize(&req, true)?;
        let r = req.into_inner();
        let target = self.target(r.target)?;
        let done = format!("{target} revived");
        self.act(&r.actor, &r.reason, Action::Revive(target), done)
            .await
    }

    async fn drain(
        &self,
        req: Request<pb::SwitchRequest>,
    ) -> Result<Response<pb::ActionReply>, Status> {
        self.authorize(&req, true)?;
        let r = req.into_inner();
        let Target::Endpoint(e) = self.target(r.target)? else {
            return Err(Status::invalid_argument(
                "drain takes an endpoint; kill a provider to stop all of its endpoints",
            ));
        };
        let done = format!("endpoint {e} drained");
        self.act(&r.actor, &r.reason, Action::Drain(e), done).await
    }

    async fn r#override(
        &self,
        req: Request<pb::OverrideRequest>,
    ) -> Result<Response<pb::ActionReply>, Status> {
        self.authorize(&req, true)?;
        let r = req.into_inner();
        let policy = self.state.tables.borrow().policy.clone();
        let endpoint = required("endpoint", &r.endpoint)?.to_string();
        let Some(e) = policy.endpoints.iter().find(|x| x.name == endpoint) else {
            return Err(Status::not_found(format!(
                "no endpoint is named {endpoint:?}"
            )));
        };
        let class = match r.class.trim() {
            "" => None,
            c => {
                let Some(class) = policy.classes.iter().find(|x| x.name == c) else {
                    return Err(Status::not_found(format!("no class is named {c:?}")));
                };
                if !class.may_use(e) {
                    return Err(Status::failed_precondition(format!(
                        "class {c} may not use endpoint {endpoint} (tier or models)"
                    )));
                }
                Some(c.to_string())
            }
        };
        let scope = class
            .as_ref()
            .map_or_else(|| "every class".to_string(), |c| format!("class {c}"));
        if r.clear {
            let done = format!("override of {endpoint} in {scope} cleared");
            return self
                .act(
                    &r.actor,
                    &r.reason,
                    Action::ClearOverride { endpoint, class },
                    done,
                )
                .await;
        }
        if !(0.0..=1.0).contains(&r.weight) {
            return Err(Status::invalid_argument(format!(
                "weight must be within [0, 1], got {}",
                r.weight
            )));
        }
        if r.ttl_ms == 0 || r.ttl_ms > MAX_OVERRIDE.as_millis() as u64 {
            return Err(Status::invalid_argument(format!(
                "ttl_ms must be positive and at most {} (7 days)",
                MAX_OVERRIDE.as_millis()
            )));
        }
        let done = format!(
            "{endpoint} pinned at {} of {scope} for {} s",
            r.weight,
            r.ttl_ms / 1000
        );
        let o = Override {
            endpoint,
            class,
            weight: r.weight,
            expires_ms: now_ms() + r.ttl_ms,
        };
        self.act(&r.actor, &r.reason, Action::Override(o), done)
            .await
    }

    async fn audit(
        &self,
        req: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditResponse>, Status> {
        self.authorize(&req, true)?;
        let limit = match req.into_inner().limit {
            0 => 100,
            n => n,
        };
        let entries = self
            .store
            .audit(limit)
            .map_err(internal)?
            .into_iter()
            .map(|e| pb::AuditEntry {
                id: e.id as u64,
                at_ms: e.at_ms,
                actor: e.actor,
                action: e.action,
                target: e.target,
                detail: e.detail,
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(pb::AuditResponse { entries }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3cres"));
        assert!(!same(b"s3cret", b"s3cret!"));
        assert!(!same(b"", b"x"));
    }
}
