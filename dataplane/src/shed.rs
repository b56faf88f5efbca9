//! Load shedding: when every endpoint a request may use is at capacity, the
//! request waits in one bounded queue, highest priority first. Each class may
//! fill only its share of the queue (the lowest priority the least), so when
//! the queue fills, the lowest classes are refused first and the higher ones
//! keep flowing.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::health::EndpointState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    #[error("the queue for this priority is full")]
    QueueFull,
    #[error("no capacity freed up in time")]
    TimedOut,
    #[error("a higher-priority request took its place in the queue")]
    Evicted,
}

/// An endpoint a queued request could use, and its capacity (0: none).
#[derive(Clone)]
pub struct Candidate {
    pub state: Arc<EndpointState>,
    pub capacity: u32,
}

fn room(candidates: &[Candidate]) -> bool {
    candidates
        .iter()
        .any(|c| c.capacity == 0 || c.state.in_flight.load(Ordering::SeqCst) < c.capacity)
}

struct Waiter {
    priority: u32,
    seq: u64,
    /// `true`: go; `false`: shed.
    wake: oneshot::Sender<bool>,
    candidates: Vec<Candidate>,
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

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Waiter>,
    seq: u64,
}

impl Queue {
    fn remove(&mut self, seq: u64) -> Option<Waiter> {
        let mut all = std::mem::take(&mut self.heap).into_vec();
        let found = all
            .iter()
            .position(|w| w.seq == seq)
            .map(|i| all.swap_remove(i));
        self.heap = all.into();
        found
    }
}

pub struct Admission {
    limit: usize,
    waiting: AtomicUsize,
    queue: Mutex<Queue>,
}

/// The queue places a class may hold: its share of `limit`, growing with
/// priority, at least one.
pub fn share(limit: usize, priority: u32, max_priority: u32) -> usize {
    let p = u64::from(priority.min(max_priority)) + 1;
    let m = u64::from(max_priority) + 1;
    ((limit as u64 * p).div_ceil(m) as usize).max(1)
}

/// Takes a waiter's entry out of the queue however its wait ends (timeout,
/// or the request being dropped), so stale entries never hold places.
struct Leave<'a> {
    admission: &'a Admission,
    seq: u64,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut q = self.admission.lock();
        q.remove(self.seq);
        self.admission.waiting.store(q.heap.len(), Ordering::SeqCst);
    }
}

impl Admission {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            waiting: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock()
    }

    /// Waits until one of `candidates` has room, or until `until`. Refused
    /// at once when the class's share of the queue is taken and no lower
    /// priority waiter can be evicted.
    pub async fn wait(
        &self,
        priority: u32,
        max_priority: u32,
        until: Instant,
        candidates: Vec<Candidate>,
    ) -> Result<(), Shed> {
        let (rx, seq) = {
            let mut q = self.lock();
            if q.heap.len() >= share(self.limit, priority, max_priority) {
                // Full for this priority: take the place of the newest
                // waiter of a lower priority, if there is one.
                let victim = q
                    .heap
                    .iter()
                    .filter(|w| w.priority < priority)
                    .min()
                    .map(|w| w.seq);
                let Some(victim) = victim else {
                    return Err(Shed::QueueFull);
                };
                if let Some(w) = q.remove(victim) {
                    let _ = w.wake.send(false);
                }
            }
            let (tx, rx) = oneshot::channel();
            q.seq += 1;
            let seq = q.seq;
            q.heap.push(Waiter {
                priority,
                seq,
                wake: tx,
                candidates,
            });
            self.waiting.store(q.heap.len(), Ordering::SeqCst);
            // Published first, checked second: a slot freed between the
            // caller's check and now either shows here or sees us waiting.
            let ours = q.heap.iter().find(|w| w.seq == seq);
            if ours.is_some_and(|w| room(&w.candidates)) {
                q.remove(seq);
                self.waiting.store(q.heap.len(), Ordering::SeqCst);
                return Ok(());
            }
            (rx, seq)
        };
        let _leave = Leave {
            admission: self,
            seq,
        };
        match tokio::time::timeout_at(until, rx).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(Shed::Evicted),
            _ => Err(Shed::TimedOut),
        }
    }

    /// A slot freed somewhere: wake the highest-priority waiter that has
    /// room now. Call after decrementing the in-flight count.
    pub fn freed(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut q = self.lock();
        let mut order = std::mem::take(&mut q.heap).into_sorted_vec();
        // Ascending: the best waiter is last.
        if let Some(i) = order.iter().rposition(|w| room(&w.candidates)) {
            let w = order.remove(i);
            let _ = w.wake.send(true);
        }
        q.heap = order.into();
        self.waiting.store(q.heap.len(), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Endpoints;
    use std::time::Duration;

    #[test]
    fn shares_grow_with_priority() {
        assert_eq!(share(8, 0, 1), 4);
        assert_eq!(share(8, 1, 1), 8);
        assert_eq!(share(10, 0, 2), 4);
        assert_eq!(share(1, 0, 5), 1);
        assert_eq!(share(8, 9, 1), 8);
    }

    /// An endpoint with capacity 1, already full.
    fn full(live: &Endpoints, name: &str) -> Candidate {
        let state = live.get(name);
        state.in_flight.store(1, Ordering::SeqCst);
        Candidate { state, capacity: 1 }
    }

    fn release(c: &Candidate, a: &Admission) {
        c.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        a.freed();
    }

    async fn queued(a: &Admission, n: usize) {
        while a.waiting.load(Ordering::SeqCst) < n {
            tokio::task::yield_now().await;
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[tokio::test]
    async fn low_priority_is_refused_first_and_high_is_woken_first() {
        let live = Endpoints::default();
        let e = full(&live, "e");
        let a = Arc::new(Admission::new(4));
        let lows: Vec<_> = (0..2)
            .map(|_| {
                let (a, e) = (a.clone(), e.clone());
                tokio::spawn(async move { a.wait(0, 1, far(), vec![e]).await })
            })
            .collect();
        queued(&a, 2).await;
        // The low share of 4 places is 2.
        assert_eq!(
            a.wait(0, 1, far(), vec![e.clone()]).await,
            Err(Shed::QueueFull)
        );
        let (a2, e2) = (a.clone(), e.clone());
        let high = tokio::spawn(async move { a2.wait(1, 1, far(), vec![e2]).await });
        queued(&a, 3).await;
        release(&e, &a);
        assert_eq!(high.await.unwrap(), Ok(()));
        for l in lows {
            e.state.in_flight.store(1, Ordering::SeqCst);
            release(&e, &a);
            assert_eq!(l.await.unwrap(), Ok(()));
        }
        assert_eq!(a.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_higher_priority_evicts_the_newest_lower_waiter() {
        let live = Endpoints::default();
        let e = full(&live, "e");
        let a = Arc::new(Admission::new(2));
        let (a1, e1) = (a.clone(), e.clone());
        let older = tokio::spawn(async move { a1.wait(0, 0, far(), vec![e1]).await });
        queued(&a, 1).await;
        let (a2, e2) = (a.clone(), e.clone());
        let newer = tokio::spawn(async move { a2.wait(0, 0, far(), vec![e2]).await });
        queued(&a, 2).await;
        let (a3, e3) = (a.clone(), e.clone());
        let high = tokio::spawn(async move { a3.wait(1, 0, far(), vec![e3]).await });
        assert_eq!(newer.await.unwrap(), Err(Shed::Evicted));
        queued(&a, 2).await;
        release(&e, &a);
        assert_eq!(high.await.unwrap(), Ok(()));
        e.state.in_flight.store(1, Ordering::SeqCst);
        release(&e, &a);
        assert_eq!(older.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_leaves_no_entry_behind() {
        let live = Endpoints::default();
        let e = full(&live, "e");
        let a = Admission::new(1);
        let soon = Instant::now() + Duration::from_millis(1);
        assert_eq!(
            a.wait(0, 0, soon, vec![e.clone()]).await,
            Err(Shed::TimedOut)
        );
        assert_eq!(a.waiting.load(Ordering::SeqCst), 0);
        // Its place is free again.
        let soon = Instant::now() + Duration::from_millis(1);
        assert_eq!(a.wait(0, 0, soon, vec![e]).await, Err(Shed::TimedOut));
    }

    #[tokio::test]
    async fn room_at_enqueue_time_is_not_missed() {
        let live = Endpoints::default();
        let e = full(&live, "e");
        e.state.in_flight.store(0, Ordering::SeqCst);
        let a = Admission::new(4);
        assert_eq!(a.wait(0, 0, far(), vec![e]).await, Ok(()));
        assert_eq!(a.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_a_waiter_that_can_use_it() {
        let live = Endpoints::default();
        let (x, y) = (full(&live, "x"), full(&live, "y"));
        let a = Arc::new(Admission::new(4));
        let (a1, x1) = (a.clone(), x.clone());
        let high_on_x = tokio::spawn(async move { a1.wait(1, 1, far(), vec![x1]).await });
        queued(&a, 1).await;
        let (a2, y2) = (a.clone(), y.clone());
        let low_on_y = tokio::spawn(async move { a2.wait(0, 1, far(), vec![y2]).await });
        queued(&a, 2).await;
        release(&y, &a);
        assert_eq!(low_on_y.await.unwrap(), Ok(()));
        assert!(!high_on_x.is_finished());
        release(&x, &a);
        assert_eq!(high_on_x.await.unwrap(), Ok(()));
    }
}
