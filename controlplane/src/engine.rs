//! The loop that decides: every interval it takes a snapshot of the
//! signals and the switches in force, runs the pure weight computation, and
//! publishes a new table version only when the routes moved (the
//! computation's hysteresis decides what counts as a move). A policy edit or
//! an admin action is computed and pushed at once instead of waiting for the
//! next tick.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_policy::Policy;
use tokio::sync::{mpsc, oneshot, watch};

use crate::publish::{now_ms, LoadError, Published, Publisher};
use crate::signals::Aggregator;
use crate::spend;
use crate::store::Store;
use crate::weights::{self, Decision, Switches};

/// Asks the engine to compute now; answers with the version in force after.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<oneshot::Sender<u64>>,
}

impl EngineHandle {
    /// `None` when the engine has stopped.
    pub async fn recompute(&self) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).await.ok()?;
        rx.await.ok()
    }
}

pub struct Engine {
    publisher: Publisher,
    policy: Policy,
    aggregator: Arc<Mutex<Aggregator>>,
    store: Arc<Store>,
    /// The last switches read, kept for when the store cannot be read.
    switches: Switches,
    interval: Duration,
    reload_every: Duration,
    requests: mpsc::Receiver<oneshot::Sender<u64>>,
}

/// Books the spend reported since the last call into the durable ledger and
/// says which endpoints are over their spend budget. When the ledger cannot be written
/// the spend waits in memory for the next call; when it cannot be read, the
/// answer is `None` and the caller keeps what it last knew.
fn spend_guard(
    policy: &Policy,
    store: &Store,
    aggregator: &Mutex<Aggregator>,
    now: u64,
) -> Option<std::collections::BTreeMap<String, String>> {
    let unbooked = aggregator.lock().take_unbooked();
    if let Err(e) = store.book_spend(now, &unbooked) {
        tracing::error!(error = %e, "cannot book spend; it waits for the next computation");
        aggregator.lock().unbook(unbooked);
    }
    match store.spend_last_hour(now) {
        Ok(spent) => Some(spend::over_spend_budget(policy, &spent)),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the spend ledger; budget standing unchanged");
            None
        }
    }
}

impl Engine {
    /// Loads the policy, resumes from the stored decision and version, and
    /// publishes the first table.
    pub fn start(
        policy_path: &std::path::Path,
        interval: Duration,
        reload_every: Duration,
        store: Arc<Store>,
        aggregator: Arc<Mutex<Aggregator>>,
    ) -> Result<(Engine, EngineHandle, watch::Receiver<Arc<Published>>), LoadError> {
        let (last_version, prev) = match store.load_decision() {
            Ok(Some((v, d))) => {
                tracing::info!(version = v, "resuming from the stored decision");
                (v, d)
            }
            Ok(None) => (0, Decision::default()),
            Err(e) => {
                tracing::warn!(error = %e, "stored decision unreadable; starting cold");
                (0, Decision::default())
            }
        };
        let now = now_ms();
        let mut switches = store.switches(now).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the switches; starting with none");
            Switches::default()
        });
        let (publisher, tables) = Publisher::load(policy_path, last_version, |policy| {
            // The ledger outlives restarts, so a spend budget once spent stays
            // spent.
            switches.over_spend_budget =
                spend_guard(policy, &store, &aggregator, now).unwrap_or_default();
            let mut agg = aggregator.lock();
            agg.set_window(u64::from(policy.routing.window_ms));
            weights::decide(policy, &switches, &agg.snapshot(now), &prev)
        })?;
        let policy = publisher.current().policy.clone();
        let (tx, requests) = mpsc::channel(64);
        Ok((
            Engine {
                publisher,
                policy,
                aggregator,
                store,
                switches,
                interval,
                reload_every,
                requests,
            },
            EngineHandle { tx },
            tables,
        ))
    }

    /// Runs until every handle is dropped and the process ends.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reload = tokio::time::interval(self.reload_every);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.step();
                }
                _ = reload.tick() => match self.publisher.reload() {
                    Ok(Some(policy)) => {
                        self.aggregator.lock().set_window(u64::from(policy.routing.window_ms));
                        self.policy = policy;
                        let v = self.step();
                        tracing::info!(version = v, "policy reloaded; new table published");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "policy change rejected; keeping the table in force")
                    }
                },
                req = self.requests.recv() => match req {
                    Some(reply) => {
                        let v = self.step();
                        let _ = reply.send(v);
                    }
                    None => break,
                },
            }
        }
    }

    /// One computation; publishes if the routes moved or the policy changed.
    /// Returns the version in force after it.
    fn step(&mut self) -> u64 {
        let now = now_ms();
        let over_spend_budget = spend_guard(&self.policy, &self.store, &self.aggregator, now);
        let signals = self.aggregator.lock().snapshot(now);
        let was = std::mem::take(&mut self.switches.over_spend_budget);
        match self.store.switches(now) {
            Ok(s) => self.switches = s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the switches; keeping the last ones")
            }
        }
        let over_spend_budget = over_spend_budget.unwrap_or_else(|| was.clone());
        for (endpoint, why) in &over_spend_budget {
            if !was.contains_key(endpoint) {
                tracing::warn!(%endpoint, reason = %why, "endpoint over budget");
            }
        }
        for endpoint in was.keys() {
            if !over_spend_budget.contains_key(endpoint) {
                tracing::info!(%endpoint, "endpoint back within budget");
            }
        }
        self.switches.over_spend_budget = over_spend_budget;
        let current = self.publisher.current();
        let decision = weights::decide(&self.policy, &self.switches, &signals, &current.decision);
        for (endpoint, why) in &decision.down {
            if !current.decision.down.contains_key(endpoint) {
                tracing::warn!(%endpoint, reason = %why, "endpoint down; weight 0");
            }
        }
        for endpoint in current.decision.down.keys() {
            if !decision.down.contains_key(endpoint) {
                tracing::info!(%endpoint, "endpoint up again; back on probation");
            }
        }
        for (class, standing) in &decision.standing {
            for (endpoint, s) in standing {
                let was = current
                    .decision
                    .standing
                    .get(class)
                    .and_then(|c| c.get(endpoint));
                if s.ejected(now) && was.is_none_or(|w| w.ejected_until_ms != s.ejected_until_ms) {
                    tracing::warn!(%class, %endpoint, reason = %s.reason,
                        for_ms = s.ejected_until_ms - now, "endpoint ejected");
                }
            }
        }
        if self.policy != current.policy || decision.routes_differ(&current.decision) {
            let v = self
                .publisher
                .publish(self.policy.clone(), decision.clone());
            tracing::debug!(version = v, "routes moved; new table published");
            if let Err(e) = self.store.save_decision(v, &decision) {
                tracing::warn!(error = %e, "could not save the decision; a restart would start cold");
            }
            v
        } else {
            let v = self.publisher.version();
            // Standing (ejections) moved without moving routes: keep it
            // durable too, so a restart resumes the ejection.
            if decision != current.decision {
                if let Err(e) = self.store.save_decision(v, &decision) {
                    tracing::warn!(error = %e, "could not save the decision");
                }
            }
            self.publisher.refresh(decision);
            v
        }
    }
}
