//! Standalone mode: `switchyard sidecar --policy FILE` runs the whole
//! product in one process, for a single machine or an edge site. The policy
//! is compiled into a table by the control plane's own code (the same
//! validation, the same weight rules, with no telemetry: static weights),
//! and the sidecar adds its local health on top, as it always does. An edit
//! to the file is applied within the reload interval; an invalid edit is
//! logged and the table in force stays.

use std::path::Path;
use std::time::Duration;

use switchyard_controlplane::publish::{now_ms, Publisher};
use switchyard_controlplane::signals::Signals;
use switchyard_controlplane::weights::{self, Decision, Switches};
use switchyard_dataplane::control::{Applier, Feed};
use switchyard_dataplane::origin::Source;
use switchyard_policy::Policy;
use switchyard_proto::v1 as pb;

/// The weights the control plane would give with no telemetry yet. Its
/// computation moves weights a bounded step at a time, so it is run until
/// it settles.
fn static_decision(policy: &Policy) -> Decision {
    let now = now_ms();
    let signals = Signals {
        now_ms: now,
        window_start_ms: now,
        ..Signals::default()
    };
    let switches = Switches::default();
    let mut d = weights::decide(policy, &switches, &signals, &Decision::default());
    for _ in 0..100 {
        let next = weights::decide(policy, &switches, &signals, &d);
        if !next.routes_differ(&d) {
            break;
        }
        d = next;
    }
    d
}

/// Static weights never expire: nothing would come to refresh them.
fn table_of(publisher: &Publisher) -> Option<pb::RoutingTable> {
    let mut t = publisher.current().update.table.clone()?;
    t.weights_ttl_ms = 0;
    Some(t)
}

/// Loads `path` (an invalid policy fails the start) and returns the feed
/// that applies it and every valid edit.
pub fn feed(path: &Path, reload_every: Duration) -> anyhow::Result<Feed> {
    let (mut publisher, _tables) = Publisher::load(path, 0, static_decision)?;
    Ok(Box::new(move |applier: Applier| {
        Box::pin(async move {
            apply(&applier, &publisher).await;
            let mut tick = tokio::time::interval(reload_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match publisher.reload() {
                    Ok(None) => {}
                    Ok(Some(policy)) => {
                        let decision = static_decision(&policy);
                        publisher.publish(policy, decision);
                        apply(&applier, &publisher).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "policy change rejected; keeping the table in force");
                    }
                }
            }
        })
    }))
}

async fn apply(applier: &Applier, publisher: &Publisher) {
    let Some(t) = table_of(publisher) else {
        return;
    };
    match applier.apply(&t, Source::Policy).await {
        Ok(()) => tracing::info!(version = t.version, "policy applied"),
        Err(e) => {
            tracing::error!(version = t.version, error = %e, "policy cannot be applied; keeping the table in force")
        }
    }
}
