//! Admission, the second stage: whether the request goes now, goes
//! degraded, waits for capacity, or is refused. [`admit`] decides from
//! plain facts; [`enter`] gathers the facts, applies a degradation (another
//! model, capped `max_tokens`) and waits in the load-shedding queue.
//!
//! Tenant limits (rate, spend reservations) will decide here too, before
//! any capacity is taken.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use switchyard_wire::operation::Operation;

use super::errors::RequestError;
use super::intake::route_error;
use crate::shed::{Admission, Candidate};
use crate::table::{Class, Degrade, Endpoint, Route, Table};

/// What a route's preferred endpoints look like right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preferred {
    /// One is neither ejected nor throttled.
    pub available: bool,
    /// One is available and within its spend budget.
    pub within_spend: bool,
}

/// Why a class's preferred endpoints cannot take the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Unhealthy,
    OverSpendBudget,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Why::Unhealthy => "unhealthy",
            Why::OverSpendBudget => "over budget",
        })
    }
}

/// The admission decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Admit<'c> {
    Go,
    /// Every endpoint the request may use is at capacity: wait for one.
    Queue,
    /// Serve it degraded as the class says, then decide again.
    Degrade {
        action: &'c Degrade,
        why: Why,
    },
    Refuse(Refusal<'c>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Refusal<'c> {
    /// Only endpoints over their spend budget are left, and the class has
    /// no degradation that would make going over acceptable.
    OverSpendBudget,
    /// The class's degradation is to refuse.
    Rejected { why: Why, reason: &'c str },
}

/// Decides admission. `degraded`: the request was degraded already (a
/// request degrades once); `room`: some endpoint it may use is below
/// capacity.
pub fn admit(
    preferred: Preferred,
    degrade: Option<&Degrade>,
    degraded: bool,
    room: bool,
) -> Admit<'_> {
    if !preferred.within_spend && !degraded {
        let why = if preferred.available {
            Why::OverSpendBudget
        } else {
            Why::Unhealthy
        };
        match degrade {
            Some(Degrade::Reject(reason)) => {
                return Admit::Refuse(Refusal::Rejected { why, reason });
            }
            Some(action) => return Admit::Degrade { action, why },
            // Without a degradation, unhealthy endpoints are still tried
            // (the chain may recover); spend past a budget is not.
            None if why == Why::OverSpendBudget => {
                return Admit::Refuse(Refusal::OverSpendBudget);
            }
            None => {}
        }
    }
    if room {
        Admit::Go
    } else {
        Admit::Queue
    }
}

/// The facts about `route`'s preferred endpoints at `now`.
pub fn preferred(route: &Route, now: Instant) -> Preferred {
    let mut p = Preferred {
        available: false,
        within_spend: false,
    };
    for e in route.preferred() {
        if e.state.available(now) {
            p.available = true;
            p.within_spend |= !e.over_spend_budget;
        }
    }
    p
}

/// The endpoints a request on `route` may wait for: those available now
/// (not ejected, not throttled); only when none is, all of them (the
/// request is then tried anyway, since the chain may have recovered).
/// Waiting for a busy healthy endpoint beats an attempt on one the sidecar
/// itself ejected, which would fail with a connection error.
pub fn waitable(route: &Route, now: Instant) -> impl Iterator<Item = &Arc<Endpoint>> {
    let any_available = route.candidates().any(|e| e.state.available(now));
    route
        .candidates()
        .filter(move |e| !any_available || e.state.available(now))
}

/// Whether an endpoint the request may wait for is below capacity.
pub fn room(route: &Route, now: Instant) -> bool {
    waitable(route, now).any(|e| !e.at_capacity())
}

/// A request admitted: where it goes and what it sends.
pub struct Admitted<'t> {
    pub route: &'t Route,
    pub body: Bytes,
    /// The model the body asks for: the app's, or the one a degradation
    /// chose.
    pub model: &'t str,
    /// Only a request whose `max_tokens` was capped for it may go to an
    /// endpoint over its spend budget: that is what capping is for.
    pub may_exceed_spend: bool,
    /// The degradation applied, as `x-switchyard-degraded` names it.
    pub degraded: Option<&'static str>,
}

/// Runs admission for a request of `class` on `route`: decides, degrades
/// at most once, and waits in `queue` (until `queue_until`) while every
/// endpoint is at capacity.
#[allow(clippy::too_many_arguments)]
pub async fn enter<'t>(
    table: &'t Table,
    class: &'t Class,
    op: Operation,
    route: &'t Route,
    model: &'t str,
    body: Bytes,
    queue: &Admission,
    queue_until: tokio::time::Instant,
) -> Result<Admitted<'t>, RequestError> {
    let mut a = Admitted {
        route,
        body,
        model,
        may_exceed_spend: false,
        degraded: None,
    };
    // Embeddings are never served by another model (its vectors would not
    // compare with the app's others) nor capped (they produce no tokens):
    // only a refusal degrades them.
    let degrade = class
        .degrade
        .as_ref()
        .filter(|d| op != Operation::Embeddings || matches!(d, Degrade::Reject(_)));
    loop {
        let now = Instant::now();
        let decision = admit(
            preferred(a.route, now),
            degrade,
            a.degraded.is_some(),
            room(a.route, now),
        );
        match decision {
            Admit::Go => return Ok(a),
            Admit::Refuse(Refusal::OverSpendBudget) => {
                class.counters.over_spend_budget.inc();
                return Err(RequestError::OverSpendBudget {
                    class: class.name.clone(),
                });
            }
            Admit::Refuse(Refusal::Rejected { why, reason }) => {
                count_degraded(class);
                return Err(RequestError::Rejected {
                    class: class.name.clone(),
                    why,
                    reason: reason.to_string(),
                });
            }
            Admit::Degrade { action, .. } => {
                count_degraded(class);
                a.degraded = Some(action.label());
                match action {
                    Degrade::Model(m) => {
                        a.route = table
                            .route(Some(&class.name), m, op)
                            .map_err(|e| route_error(e, m, op))?
                            .1;
                        a.model = m;
                        a.body = switchyard_wire::chat::rewrite(&a.body, Some(m), None)?;
                    }
                    Degrade::MaxTokens(n) => {
                        a.may_exceed_spend = true;
                        a.body = switchyard_wire::chat::rewrite(&a.body, None, Some(*n))?;
                    }
                    Degrade::Reject(_) => {}
                }
            }
            Admit::Queue => {
                let waiting_for = waitable(a.route, now)
                    .map(|e| Candidate {
                        state: Arc::clone(&e.state),
                        capacity: e.capacity,
                    })
                    .collect();
                if let Err(why) = queue
                    .wait(class.priority, table.max_priority, queue_until, waiting_for)
                    .await
                {
                    class.counters.sheds.inc();
                    return Err(RequestError::Shed {
                        class: class.name.clone(),
                        why,
                    });
                }
            }
        }
    }
}

fn count_degraded(class: &Class) {
    if let Some(c) = &class.counters.degraded {
        c.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: Preferred = Preferred {
        available: true,
        within_spend: true,
    };
    const DOWN: Preferred = Preferred {
        available: false,
        within_spend: false,
    };
    const SPENT: Preferred = Preferred {
        available: true,
        within_spend: false,
    };

    #[test]
    fn healthy_preferred_endpoints_go_or_queue_by_capacity() {
        let d = Degrade::Model("small".into());
        assert_eq!(admit(UP, None, false, true), Admit::Go);
        assert_eq!(admit(UP, Some(&d), false, true), Admit::Go);
        assert_eq!(admit(UP, None, false, false), Admit::Queue);
    }

    #[test]
    fn unhealthy_preferred_endpoints_degrade_or_are_tried_anyway() {
        let d = Degrade::MaxTokens(64);
        assert_eq!(
            admit(DOWN, Some(&d), false, true),
            Admit::Degrade {
                action: &d,
                why: Why::Unhealthy
            }
        );
        // Without a degradation the chain is tried: endpoints recover.
        assert_eq!(admit(DOWN, None, false, true), Admit::Go);
        assert_eq!(admit(DOWN, None, false, false), Admit::Queue);
    }

    #[test]
    fn spent_preferred_endpoints_degrade_or_refuse() {
        let d = Degrade::Model("small".into());
        assert_eq!(
            admit(SPENT, Some(&d), false, true),
            Admit::Degrade {
                action: &d,
                why: Why::OverSpendBudget
            }
        );
        assert_eq!(
            admit(SPENT, None, false, true),
            Admit::Refuse(Refusal::OverSpendBudget)
        );
        let r = Degrade::Reject("paused".into());
        assert_eq!(
            admit(SPENT, Some(&r), false, true),
            Admit::Refuse(Refusal::Rejected {
                why: Why::OverSpendBudget,
                reason: "paused"
            })
        );
        assert_eq!(
            admit(DOWN, Some(&r), false, false),
            Admit::Refuse(Refusal::Rejected {
                why: Why::Unhealthy,
                reason: "paused"
            })
        );
    }

    #[test]
    fn a_request_degrades_once() {
        let d = Degrade::Model("small".into());
        assert_eq!(admit(DOWN, Some(&d), true, true), Admit::Go);
        assert_eq!(admit(SPENT, None, true, false), Admit::Queue);
    }
}
