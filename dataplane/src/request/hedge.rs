//! Hedging, the fourth stage for classes that ask for it: two attempts
//! raced. The first goes out; if it has no first token after its
//! endpoint's recent p95 TTFT, the same request goes to the next endpoint
//! of the chain, and whichever answers first wins. The loser is dropped,
//! which closes its connection, so the provider stops generating.

use std::time::Duration;

use pingora::time::fast_timeout::fast_sleep;

use super::attempt::{Attempt, AttemptResult};
use super::pick::{self, Facts, Tried};
use crate::metrics::Action;
use crate::table::{Class, Endpoint};
use std::sync::Arc;

/// The results of one step of a request: one attempt, or a hedged pair.
pub struct Outcomes<'a> {
    items: [Option<(&'a Arc<Endpoint>, AttemptResult<'a>)>; 2],
}

impl<'a> Outcomes<'a> {
    pub fn one(e: &'a Arc<Endpoint>, r: AttemptResult<'a>) -> Self {
        Self {
            items: [Some((e, r)), None],
        }
    }

    fn two(
        a: (&'a Arc<Endpoint>, AttemptResult<'a>),
        b: (&'a Arc<Endpoint>, AttemptResult<'a>),
    ) -> Self {
        Self {
            items: [Some(a), Some(b)],
        }
    }

    pub fn results(self) -> impl Iterator<Item = (&'a Arc<Endpoint>, AttemptResult<'a>)> {
        self.items.into_iter().flatten()
    }
}

/// How long to wait for the first attempt before hedging: the endpoint's
/// recent p95 TTFT, or half the class's TTFT timeout before it has any;
/// never longer than the timeout itself.
pub fn delay(p95_ttft: Option<Duration>, ttft_timeout: Duration) -> Duration {
    p95_ttft.unwrap_or(ttft_timeout / 2).min(ttft_timeout)
}

/// Runs `first`, hedged. `attempts` counts what was sent.
pub async fn hedged<'a>(
    attempt: &Attempt<'a, '_>,
    class: &Class,
    chain: &'a [Arc<Endpoint>],
    first: &'a Arc<Endpoint>,
    tried: &mut Tried,
    attempts: &mut u8,
    facts: &impl Facts<Arc<Endpoint>>,
) -> Outcomes<'a> {
    tried.push(first.id);
    *attempts += 1;
    let wait = delay(first.state.p95_ttft(), attempt.ttft);
    let primary = attempt.run(first);
    tokio::pin!(primary);
    tokio::select! {
        r = &mut primary => return Outcomes::one(first, r),
        () = fast_sleep(wait) => {}
    }
    // A hedge is a retry: when a provider slows down for everyone, the
    // retry budget keeps hedges from doubling its load.
    let second = pick::next_in_chain(chain, tried, facts)
        .filter(|_| attempt.retry.lock().try_retry(std::time::Instant::now()));
    let Some(second) = second else {
        return Outcomes::one(first, primary.await);
    };
    tried.push(second.id);
    *attempts += 1;
    let m = attempt.metrics;
    if let Some(pair) = class.pair(second) {
        class.counters.action(m, pair, &second.name, Action::Hedge);
    }
    let cancelled = |loser: &Endpoint| {
        if let Some(pair) = class.pair(loser) {
            class
                .counters
                .action(m, pair, &loser.name, Action::HedgeCancelled);
        }
    };
    let hedge = attempt.run(second);
    tokio::pin!(hedge);
    tokio::select! {
        r = &mut primary => match r {
            Ok(_) => { cancelled(second); Outcomes::one(first, r) }
            Err(_) => Outcomes::two((first, r), (second, hedge.await)),
        },
        r = &mut hedge => match r {
            Ok(_) => { cancelled(first); Outcomes::one(second, r) }
            Err(_) => Outcomes::two((second, r), (first, primary.await)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hedge_waits_for_the_recent_p95_within_the_timeout() {
        let t = Duration::from_millis(800);
        assert_eq!(delay(None, t), Duration::from_millis(400));
        assert_eq!(
            delay(Some(Duration::from_millis(90)), t),
            Duration::from_millis(90)
        );
        assert_eq!(delay(Some(Duration::from_secs(5)), t), t);
    }
}
