//! Retry budget, as linkerd and Finagle keep one: retries may add at most a
//! share of recent requests plus a small floor per second, so a failing
//! provider cannot make the sidecar multiply its own load (or the bill).
//! Pure: time is an argument.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

/// Seconds of history the budget looks at.
const WINDOW_SECS: usize = 10;

#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    /// (requests, retries) per second, a ring over the window.
    buckets: [(u32, u32); WINDOW_SECS],
    epoch: Option<Instant>,
    /// Second (since epoch) of the newest bucket.
    head: u64,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Self {
            ratio: if ratio.is_finite() {
                ratio.max(0.0)
            } else {
                0.0
            },
            min_per_second,
            buckets: [(0, 0); WINDOW_SECS],
            epoch: None,
            head: 0,
        }
    }

    /// Takes new limits from a new table, keeping the counted history.
    pub fn configure(&mut self, ratio: f64, min_per_second: u32) {
        self.ratio = if ratio.is_finite() {
            ratio.max(0.0)
        } else {
            0.0
        };
        self.min_per_second = min_per_second;
    }

    fn advance(&mut self, now: Instant) -> usize {
        let epoch = *self.epoch.get_or_insert(now);
        let sec = now.saturating_duration_since(epoch).as_secs();
        if sec > self.head {
            let gap = (sec - self.head).min(WINDOW_SECS as u64);
            for k in 1..=gap {
                if let Some(b) = self
                    .buckets
                    .get_mut(((self.head + k) % WINDOW_SECS as u64) as usize)
                {
                    *b = (0, 0);
                }
            }
            self.head = sec;
        }
        (self.head % WINDOW_SECS as u64) as usize
    }

    /// Counts a first attempt.
    pub fn request(&mut self, now: Instant) {
        let i = self.advance(now);
        if let Some(b) = self.buckets.get_mut(i) {
            b.0 += 1;
        }
    }

    /// Takes one retry from the budget if there is one left.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        let i = self.advance(now);
        let (requests, retries) = self.buckets.iter().fold((0u64, 0u64), |(a, b), (r, t)| {
            (a + u64::from(*r), b + u64::from(*t))
        });
        let allowed =
            f64::from(self.min_per_second) * WINDOW_SECS as f64 + self.ratio * requests as f64;
        if (retries as f64) + 1.0 > allowed {
            return false;
        }
        match self.buckets.get_mut(i) {
            Some(b) => {
                b.1 += 1;
                true
            }
            None => false,
        }
    }
}

/// Retry budgets by class name; they outlive table swaps.
#[derive(Debug, Default)]
pub struct RetryBudgets {
    map: Mutex<HashMap<String, Arc<Mutex<RetryBudget>>>>,
}

impl RetryBudgets {
    pub fn get(&self, class: &str, ratio: f64, min_per_second: u32) -> Arc<Mutex<RetryBudget>> {
        let mut m = self.map.lock();
        let b = m
            .entry(class.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(RetryBudget::new(ratio, min_per_second))))
            .clone();
        b.lock().configure(ratio, min_per_second);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retries_are_a_share_of_requests_plus_a_floor() {
        let t = Instant::now();
        let mut b = RetryBudget::new(0.2, 1);
        for _ in 0..100 {
            b.request(t);
        }
        // 1/s × 10 s + 20% of 100 = 30 retries.
        let granted = (0..100).filter(|_| b.try_retry(t)).count();
        assert_eq!(granted, 30);
    }

    #[test]
    fn the_window_forgets_old_traffic() {
        let t = Instant::now();
        let mut b = RetryBudget::new(0.5, 0);
        (0..10).for_each(|_| b.request(t));
        assert_eq!((0..10).filter(|_| b.try_retry(t)).count(), 5);
        let later = t + Duration::from_secs(11);
        assert!(
            !b.try_retry(later),
            "nothing left once the requests aged out"
        );
        (0..4).for_each(|_| b.request(later));
        assert_eq!((0..10).filter(|_| b.try_retry(later)).count(), 2);
    }

    #[test]
    fn zero_budget_means_no_retries() {
        let t = Instant::now();
        let mut b = RetryBudget::new(0.0, 0);
        (0..1000).for_each(|_| b.request(t));
        assert!(!b.try_retry(t));
    }
}
