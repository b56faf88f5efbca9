//! Picking, the third stage: which endpoint the first attempt goes to, and
//! after a failure, whether and where the request tries again. Pure: what
//! the request knows of each endpoint (usable now? how loaded?) comes in
//! as functions, so every order is tested without a clock or a socket.

use std::sync::Arc;
use std::time::Instant;

use crate::balance::{pick_p2c, WeightedChoice};
use crate::table::Endpoint;

/// Attempts per request, hedges and stale-connection retries included.
pub const MAX_ATTEMPTS: usize = 4;

/// Endpoints a request has tried (by endpoint id), without allocating.
#[derive(Debug, Default, Clone)]
pub struct Tried {
    ids: [usize; MAX_ATTEMPTS + 1],
    len: usize,
}

impl Tried {
    pub fn push(&mut self, id: usize) {
        if let Some(slot) = self.ids.get_mut(self.len) {
            *slot = id;
            self.len += 1;
        }
    }

    pub fn contains(&self, id: usize) -> bool {
        self.ids.get(..self.len).is_some_and(|t| t.contains(&id))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What the picker knows of an endpoint `T`.
pub trait Facts<T> {
    /// Its id, unique within the table.
    fn id(&self, e: &T) -> usize;
    /// Whether the request may use it now (not ejected or throttled, below
    /// capacity, within its spend budget unless the request may exceed it).
    fn usable(&self, e: &T) -> bool;
    /// Whether the request could use it but for its capacity: neither
    /// ejected nor throttled, and within its spend budget unless the
    /// request may exceed it.
    fn available(&self, e: &T) -> bool;
    /// Load-weighted latency (lower is better).
    fn cost(&self, e: &T) -> f64;
}

/// What a request knows of a table's endpoints at one moment: the live
/// state, read where the pure functions below ask.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    /// The request may go to endpoints over their spend budget.
    pub may_exceed_spend: bool,
}

impl Facts<Arc<Endpoint>> for Now {
    fn id(&self, e: &Arc<Endpoint>) -> usize {
        e.id
    }
    fn usable(&self, e: &Arc<Endpoint>) -> bool {
        e.usable_for(self.at, self.may_exceed_spend)
    }
    fn available(&self, e: &Arc<Endpoint>) -> bool {
        (self.may_exceed_spend || !e.over_spend_budget) && e.state.available(self.at)
    }
    fn cost(&self, e: &Arc<Endpoint>) -> f64 {
        e.state.cost()
    }
}

/// The first endpoint: two weighted draws (`u[0]`, `u[1]`), the less loaded
/// usable one; with no usable weighted endpoint, the first usable one of
/// the chain; with none usable, the least loaded available one (healthy
/// but at capacity: admission let the request through, so a slot was free
/// a moment ago, and one request over capacity beats a certain connection
/// error from an ejected endpoint); with none available at all, a weighted
/// draw (`u[2]`) or the head of the chain, tried anyway rather than failing
/// without an attempt. `None` only for a route with no endpoint.
pub fn first<'r, T>(
    choice: Option<&'r WeightedChoice<T>>,
    chain: &'r [T],
    u: [f64; 3],
    facts: &impl Facts<T>,
) -> Option<&'r T> {
    choice
        .and_then(|c| pick_p2c(c, u[0], u[1], |e| facts.usable(e), |e| facts.cost(e)))
        .or_else(|| next_in_chain(chain, &Tried::default(), facts))
        .or_else(|| least_loaded_available(chain, facts))
        .or_else(|| choice.and_then(|c| c.pick(u[2])))
        .or_else(|| chain.first())
}

fn least_loaded_available<'r, T>(chain: &'r [T], facts: &impl Facts<T>) -> Option<&'r T> {
    chain
        .iter()
        .filter(|e| facts.available(e))
        .min_by(|a, b| facts.cost(a).total_cmp(&facts.cost(b)))
}

/// The first endpoint of the chain not tried yet and usable now.
pub fn next_in_chain<'r, T>(chain: &'r [T], tried: &Tried, facts: &impl Facts<T>) -> Option<&'r T> {
    chain
        .iter()
        .find(|e| !tried.contains(facts.id(e)) && facts.usable(e))
}

/// What follows a failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'r, T> {
    /// The same endpoint on a fresh connection: the pooled one had been
    /// closed by the provider, which never saw the request. Not charged to
    /// the retry budget.
    Reconnect(&'r T),
    /// Another endpoint, charged to the retry budget.
    Fallback(&'r T),
    /// Another endpoint, healthy but at capacity: wait for a slot on it
    /// (within the deadline), then try it, charged to the retry budget.
    /// Waiting beats giving up while a healthy endpoint is merely busy.
    Wait(&'r T),
    Stop(StopReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Deadline,
    MaxAttempts,
    /// Every endpoint of the chain was tried or is down.
    Exhausted,
    /// The class's retry budget is spent.
    RetryBudget,
    /// The healthy endpoints left stayed at capacity.
    Busy,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Deadline => "the request's deadline passed",
            StopReason::MaxAttempts => "the attempt limit was reached",
            StopReason::Exhausted => "no other endpoint is up",
            StopReason::RetryBudget => "the class's retry budget is spent",
            StopReason::Busy => "the healthy endpoints left stayed at capacity",
        })
    }
}

/// After `failed` failed: `stale` when it failed on a pooled connection
/// the provider had closed; `reconnected` when the request already had
/// its one reconnect.
pub fn next_attempt<'r, T>(
    failed: &'r T,
    stale: bool,
    reconnected: bool,
    tried: &Tried,
    chain: &'r [T],
    deadline_passed: bool,
    facts: &impl Facts<T>,
) -> Next<'r, T> {
    if deadline_passed {
        return Next::Stop(StopReason::Deadline);
    }
    if tried.len() >= MAX_ATTEMPTS {
        return Next::Stop(StopReason::MaxAttempts);
    }
    if stale && !reconnected {
        return Next::Reconnect(failed);
    }
    if let Some(e) = next_in_chain(chain, tried, facts) {
        return Next::Fallback(e);
    }
    match chain
        .iter()
        .find(|e| !tried.contains(facts.id(e)) && facts.available(e))
    {
        Some(e) => Next::Wait(e),
        None => Next::Stop(StopReason::Exhausted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Endpoints are their ids; `down` ones are unusable (ejected), `busy`
    /// ones unusable but available (at capacity); cost is `costs[id]`.
    struct Known {
        down: Vec<usize>,
        busy: Vec<usize>,
        costs: Vec<f64>,
    }

    impl Facts<usize> for Known {
        fn id(&self, e: &usize) -> usize {
            *e
        }
        fn usable(&self, e: &usize) -> bool {
            !self.down.contains(e) && !self.busy.contains(e)
        }
        fn available(&self, e: &usize) -> bool {
            !self.down.contains(e)
        }
        fn cost(&self, e: &usize) -> f64 {
            self.costs.get(*e).copied().unwrap_or(1.0)
        }
    }

    fn known(down: &[usize]) -> Known {
        Known {
            down: down.to_vec(),
            busy: Vec::new(),
            costs: vec![1.0; 8],
        }
    }

    #[test]
    fn after_a_failure_a_busy_healthy_endpoint_is_waited_for_not_given_up() {
        let chain = [0, 1, 2];
        let mut k = known(&[2]);
        k.busy = vec![1];
        assert_eq!(
            next_attempt(&0, false, false, &tried(&[0]), &chain, false, &k),
            Next::Wait(&1)
        );
        k.down = vec![1, 2];
        assert_eq!(
            next_attempt(&0, false, false, &tried(&[0]), &chain, false, &k),
            Next::Stop(StopReason::Exhausted)
        );
    }

    #[test]
    fn a_busy_healthy_endpoint_beats_an_ejected_one() {
        // The on-prem endpoint (0) is ejected, the fallback (1) at capacity:
        // the request goes to the fallback, never to the dead endpoint.
        let choice = WeightedChoice::new([(0, 0.9), (1, 0.1)]).unwrap();
        let chain = [0, 1, 2];
        let mut k = known(&[0]);
        k.busy = vec![1, 2];
        k.costs = vec![1.0, 3.0, 2.0];
        for u in [0.0, 0.3, 0.95] {
            assert_eq!(first(Some(&choice), &chain, [u, u, u], &k), Some(&2));
        }
        k.costs = vec![1.0, 1.0, 2.0];
        assert_eq!(first(Some(&choice), &chain, [0.0; 3], &k), Some(&1));
    }

    fn tried(ids: &[usize]) -> Tried {
        let mut t = Tried::default();
        ids.iter().for_each(|i| t.push(*i));
        t
    }

    #[test]
    fn the_first_pick_prefers_usable_weighted_endpoints_then_the_chain() {
        let choice = WeightedChoice::new([(0, 1.0), (1, 1.0)]).unwrap();
        let chain = [0, 1, 2, 3];
        let mut k = known(&[]);
        k.costs = vec![5.0, 1.0, 1.0, 1.0];
        // Draws land on 0 and 1: the cheaper wins.
        assert_eq!(first(Some(&choice), &chain, [0.1, 0.9, 0.0], &k), Some(&1));
        // Both weighted endpoints out: the chain's first usable one.
        assert_eq!(
            first(Some(&choice), &chain, [0.1, 0.9, 0.0], &known(&[0, 1])),
            Some(&2)
        );
        // Nothing usable: a weighted draw is tried anyway.
        assert_eq!(
            first(
                Some(&choice),
                &chain,
                [0.1, 0.9, 0.9],
                &known(&[0, 1, 2, 3])
            ),
            Some(&1)
        );
        // No weights: the chain leads.
        assert_eq!(first(None, &chain, [0.0; 3], &known(&[0])), Some(&1));
        assert_eq!(
            first(None, &chain, [0.0; 3], &known(&[0, 1, 2, 3])),
            Some(&0)
        );
        assert_eq!(first::<usize>(None, &[], [0.0; 3], &known(&[])), None);
    }

    #[test]
    fn after_a_failure_the_chain_is_followed_in_order_skipping_what_was_tried() {
        let chain = [0, 1, 2];
        let k = known(&[]);
        assert_eq!(
            next_attempt(&0, false, false, &tried(&[0]), &chain, false, &k),
            Next::Fallback(&1)
        );
        assert_eq!(
            next_attempt(&1, false, false, &tried(&[0, 1]), &chain, false, &k),
            Next::Fallback(&2)
        );
        assert_eq!(
            next_attempt(&2, false, false, &tried(&[0, 1, 2]), &chain, false, &k),
            Next::Stop(StopReason::Exhausted)
        );
        // A weighted first choice outside the chain's head: the chain
        // starts from its own head.
        assert_eq!(
            next_attempt(&1, false, false, &tried(&[1]), &chain, false, &k),
            Next::Fallback(&0)
        );
    }

    #[test]
    fn ejected_throttled_full_or_spent_endpoints_are_skipped() {
        let chain = [0, 1, 2, 3];
        let k = known(&[1, 2]);
        assert_eq!(
            next_attempt(&0, false, false, &tried(&[0]), &chain, false, &k),
            Next::Fallback(&3)
        );
        let k = known(&[1, 2, 3]);
        assert_eq!(
            next_attempt(&0, false, false, &tried(&[0]), &chain, false, &k),
            Next::Stop(StopReason::Exhausted)
        );
    }

    #[test]
    fn a_stale_pooled_connection_is_retried_once_on_the_same_endpoint() {
        let chain = [0, 1];
        let k = known(&[]);
        assert_eq!(
            next_attempt(&0, true, false, &tried(&[0]), &chain, false, &k),
            Next::Reconnect(&0)
        );
        assert_eq!(
            next_attempt(&0, true, true, &tried(&[0, 0]), &chain, false, &k),
            Next::Fallback(&1)
        );
    }

    #[test]
    fn the_deadline_and_the_attempt_cap_stop_everything() {
        let chain = [0, 1, 2, 3, 4, 5];
        let k = known(&[]);
        assert_eq!(
            next_attempt(&0, true, false, &tried(&[0]), &chain, true, &k),
            Next::Stop(StopReason::Deadline)
        );
        assert_eq!(
            next_attempt(&3, false, false, &tried(&[0, 1, 2, 3]), &chain, false, &k),
            Next::Stop(StopReason::MaxAttempts)
        );
    }

    #[test]
    fn tried_holds_what_it_was_given_and_no_more_than_fits() {
        let mut t = Tried::default();
        assert!(t.is_empty());
        for i in 0..10 {
            t.push(i);
        }
        assert_eq!(t.len(), MAX_ATTEMPTS + 1);
        assert!(t.contains(0) && t.contains(MAX_ATTEMPTS) && !t.contains(MAX_ATTEMPTS + 1));
    }

    proptest! {
        /// Whatever fails and whatever is down: the request never tries an
        /// endpoint twice (but for the one reconnect), never more than
        /// MAX_ATTEMPTS times, and only moves to usable endpoints.
        #[test]
        fn retries_never_repeat_and_stay_bounded(
            n in 1usize..8,
            down in proptest::collection::vec(any::<bool>(), 8),
            busy in proptest::collection::vec(any::<bool>(), 8),
            stale in proptest::collection::vec(any::<bool>(), 8),
            u in proptest::array::uniform3(0.0f64..1.0),
        ) {
            let chain: Vec<usize> = (0..n).collect();
            let k = Known {
                down: (0..8).filter(|i| down[*i]).collect(),
                busy: (0..8).filter(|i| busy[*i]).collect(),
                costs: vec![1.0; 8],
            };
            let mut t = Tried::default();
            let mut reconnected = false;
            let mut at = *first(None, &chain, u, &k).unwrap();
            let mut attempts = vec![at];
            t.push(at);
            loop {
                match next_attempt(&at, stale[attempts.len() % 8], reconnected, &t, &chain, false, &k) {
                    Next::Reconnect(e) => {
                        prop_assert_eq!(*e, at);
                        reconnected = true;
                    }
                    Next::Fallback(e) => {
                        prop_assert!(!attempts.contains(e), "{e} tried twice: {attempts:?}");
                        prop_assert!(k.usable(e));
                        at = *e;
                    }
                    Next::Wait(e) => {
                        prop_assert!(!attempts.contains(e), "{e} tried twice: {attempts:?}");
                        // Only a busy endpoint is waited for, and only when
                        // no untried one is free.
                        prop_assert!(k.available(e) && !k.usable(e));
                        prop_assert!(next_in_chain(&chain, &t, &k).is_none());
                        at = *e;
                    }
                    Next::Stop(reason) => {
                        // Stopping early leaves nothing untried that is up.
                        if reason == StopReason::Exhausted {
                            prop_assert!(chain.iter().all(|e| t.contains(*e) || !k.available(e)));
                        }
                        break;
                    }
                }
                attempts.push(at);
                t.push(at);
            }
            prop_assert!(attempts.len() <= MAX_ATTEMPTS);
        }
    }
}
