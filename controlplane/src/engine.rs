//! The loop that decides: every interval it takes a snapshot of the
//! signals and the switches in force, runs the pure weight computation, and
//! publishes a new table version only when the routes moved (the
//! computation's hysteresis decides what counts as a move). A policy edit or
//! an admin action is computed and pushed at once instead of waiting for the
//! next tick.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::policy::Policy;
use crate::publish::{now_ms, LoadError, Published, Publisher};
use crate::signals::Aggregator;
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

pub fn lock(a: &Mutex<Aggregator>) -> std::sync::MutexGuard<'_, Aggregator> {
    // The aggregator holds counters only; a panic mid-update costs at most
    // one report's worth of accuracy, so a poisoned lock is used as is.
    a.lock().unwrap_or_else(|p| p.into_inner())
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
        let switches = store.switches(now).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the switches; starting with none");
            Switches::default()
        });
        let (publisher, tables) = Publisher::load(policy_path, last_version, |policy| {
            let mut agg = lock(&aggregator);
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
                        lock(&self.aggregator).set_window(u64::from(policy.routing.window_ms));
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
        let signals = lock(&self.aggregator).snapshot(now);
        match self.store.switches(now) {
            Ok(s) => self.switches = s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the switches; keeping the last ones")
            }
        }
        let current = self.publisher.current();
        let decision = weights::decide(&self.policy, &self.switches, &signals, &current.decision);
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
