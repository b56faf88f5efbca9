//! Load shedding: when every endpoint a request may use is at capacity, the
//! request waits in one bounded queue, highest priority first. Each class may
//! fill only its share of the queue (the lowest priority the least), so when
//! the queue fills, the lowest classes are refused first and the higher ones
//! keep flowing.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    #[error("the queue for this priority is full")]
    QueueFull,
    #[error("no capacity freed up in time")]
    TimedOut,
    #[error("a higher-priority request took its place in the queue")]
    Evicted,
}

struct Waiter {
    priority: u32,
    seq: u64,
    /// `true`: go; `false`: shed.
    wake: oneshot::Sender<bool>,
}

impl PartialEq for Waiter {
    fn eq(&self, o: &Self) -> bool {
        (self.priority, self.seq) == (o.priority, o.seq)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiter {
    /// Higher priority first, then first come.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.priority
            .cmp(&o.priority)
            .then_with(|| o.seq.cmp(&self.seq))
    }
}

pub struct Admission {
    limit: usize,
    waiting: AtomicUsize,
    queue: Mutex<(BinaryHeap<Waiter>, u64)>,
}

/// The queue places a class may hold: its share of `limit`, growing with
/// priority, at least one.
pub fn share(limit: usize, priority: u32, max_priority: u32) -> usize {
    let p = u64::from(priority.min(max_priority)) + 1;
    let m = u64::from(max_priority) + 1;
    ((limit as u64 * p).div_ceil(m) as usize).max(1)
}

impl Admission {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            waiting: AtomicUsize::new(0),
            queue: Mutex::new((BinaryHeap::new(), 0)),
        }
    }

    /// Waits for a freed slot until `until`. Refused at once when the
    /// class's share of the queue is taken.
    pub async fn wait(&self, priority: u32, max_priority: u32, until: Instant) -> Result<(), Shed> {
        let rx = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.0.len() >= share(self.limit, priority, max_priority) {
                // Full for this priority: take the place of the newest
                // waiter of a lower priority, if there is one.
                let victim =
                    q.0.iter()
                        .filter(|w| w.priority < priority)
                        .min()
                        .map(|w| (w.priority, w.seq));
                let Some(victim) = victim else {
                    return Err(Shed::QueueFull);
                };
                let rest: Vec<Waiter> = std::mem::take(&mut q.0).into_vec();
                for w in rest {
                    if (w.priority, w.seq) == victim {
                        let _ = w.wake.send(false);
                    } else {
                        q.0.push(w);
                    }
                }
            }
            let (tx, rx) = oneshot::channel();
            q.1 += 1;
            let seq = q.1;
            q.0.push(Waiter {
                priority,
                seq,
                wake: tx,
            });
            self.waiting.store(q.0.len(), Ordering::Release);
            rx
        };
        match tokio::time::timeout_at(until, rx).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(Shed::Evicted),
            // Timed out: our entry stays until popped, and a wake sent to
            // it then is passed on (see `freed`).
            _ => Err(Shed::TimedOut),
        }
    }

    /// A slot freed somewhere: wake the first waiter still waiting.
    pub fn freed(&self) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(w) = q.0.pop() {
            if w.wake.send(true).is_ok() {
                break;
            }
        }
        self.waiting.store(q.0.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn shares_grow_with_priority() {
        assert_eq!(share(8, 0, 1), 4);
        assert_eq!(share(8, 1, 1), 8);
        assert_eq!(share(10, 0, 2), 4);
        assert_eq!(share(1, 0, 5), 1);
        assert_eq!(share(8, 9, 1), 8);
    }

    #[tokio::test]
    async fn low_priority_is_refused_first_and_high_is_woken_first() {
        let a = Arc::new(Admission::new(4));
        let far = Instant::now() + Duration::from_secs(30);
        let low: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.wait(0, 1, far).await })
            })
            .collect();
        tokio::task::yield_now().await;
        while a.waiting.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a.wait(0, 1, far).await, Err(Shed::QueueFull));
        let a2 = a.clone();
        let high = tokio::spawn(async move { a2.wait(1, 1, far).await });
        while a.waiting.load(Ordering::Acquire) < 3 {
            tokio::task::yield_now().await;
        }
        a.freed();
        assert_eq!(high.await.unwrap(), Ok(()));
        a.freed();
        a.freed();
        for l in low {
            assert_eq!(l.await.unwrap(), Ok(()));
        }
    }

    #[tokio::test]
    async fn a_higher_priority_evicts_a_lower_waiter() {
        let a = Arc::new(Admission::new(2));
        let far = Instant::now() + Duration::from_secs(30);
        let lows: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.wait(0, 1, far).await })
            })
            .collect();
        while a.waiting.load(Ordering::Acquire) < 1 {
            tokio::task::yield_now().await;
        }
        // The low share of a queue of 2 is 1: the second low is refused.
        let a2 = a.clone();
        let high = tokio::spawn(async move { a2.wait(1, 1, far).await });
        while !high.is_finished() && a.waiting.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        let a3 = a.clone();
        let high2 = tokio::spawn(async move { a3.wait(1, 1, far).await });
        let mut lows_out = Vec::new();
        for l in lows {
            lows_out.push(l.await.unwrap());
        }
        lows_out.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(lows_out, [Err(Shed::Evicted), Err(Shed::QueueFull)]);
        a.freed();
        a.freed();
        assert_eq!(high.await.unwrap(), Ok(()));
        assert_eq!(high2.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_passes_its_wake_on() {
        let a = Arc::new(Admission::new(4));
        let soon = Instant::now() + Duration::from_millis(1);
        assert_eq!(a.wait(0, 0, soon).await, Err(Shed::TimedOut));
        let a2 = a.clone();
        let far = Instant::now() + Duration::from_secs(30);
        let w = tokio::spawn(async move { a2.wait(0, 0, far).await });
        while a.waiting.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        a.freed();
        assert_eq!(w.await.unwrap(), Ok(()));
    }
}
