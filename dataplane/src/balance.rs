//! Weighted choice among endpoints. Pure: the caller supplies the random
//! draw, so tests can drive it and the hot path does no allocation.

/// Endpoints with positive weight and their cumulative weights, built once
/// per table and shared by every request routed on it.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedChoice {
    endpoints: Vec<usize>,
    cumulative: Vec<f64>,
}

impl WeightedChoice {
    /// Keeps only finite, positive weights. `None` when none is left.
    pub fn new(weights: impl IntoIterator<Item = (usize, f64)>) -> Option<Self> {
        let mut endpoints = Vec::new();
        let mut cumulative = Vec::new();
        let mut total = 0.0;
        for (endpoint, w) in weights {
            if w.is_finite() && w > 0.0 {
                total += w;
                endpoints.push(endpoint);
                cumulative.push(total);
            }
        }
        (!endpoints.is_empty()).then_some(Self {
            endpoints,
            cumulative,
        })
    }

    /// Picks for a draw `u` in `[0, 1)`: endpoint `i` for a share of draws
    /// equal to its share of the total weight.
    pub fn pick(&self, u: f64) -> usize {
        let total = self.cumulative[self.cumulative.len() - 1];
        let target = u.clamp(0.0, 1.0) * total;
        let i = self.cumulative.partition_point(|c| *c <= target);
        self.endpoints[i.min(self.endpoints.len() - 1)]
    }

    pub fn endpoints(&self) -> &[usize] {
        &self.endpoints
    }
}

/// Power of two choices over the weighted set: draw two endpoints by weight
/// (draws `u1`, `u2`), skip unavailable ones, keep the one that costs less
/// (peak-EWMA latency × pending). When both draws are unavailable, the
/// cheapest available endpoint of the set; `None` when none is.
pub fn pick_p2c(
    choice: &WeightedChoice,
    u1: f64,
    u2: f64,
    available: impl Fn(usize) -> bool,
    cost: impl Fn(usize) -> f64,
) -> Option<usize> {
    let a = choice.pick(u1);
    let b = choice.pick(u2);
    match (available(a), available(b)) {
        (true, true) if a == b => Some(a),
        (true, true) => Some(if cost(b) < cost(a) { b } else { a }),
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => choice
            .endpoints()
            .iter()
            .copied()
            .filter(|i| available(*i))
            .min_by(|x, y| cost(*x).total_cmp(&cost(*y))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_invalid_weights_are_never_picked() {
        let c =
            WeightedChoice::new([(0, 0.0), (1, 2.0), (2, f64::NAN), (3, -1.0), (4, 1.0)]).unwrap();
        assert_eq!(c.endpoints(), [1, 4]);
        for i in 0..1000 {
            let p = c.pick(i as f64 / 1000.0);
            assert!(p == 1 || p == 4);
        }
    }

    #[test]
    fn shares_follow_weights() {
        let c = WeightedChoice::new([(7, 3.0), (9, 1.0)]).unwrap();
        let n = 10_000;
        let sevens = (0..n).filter(|i| c.pick(*i as f64 / n as f64) == 7).count();
        assert_eq!(sevens, 7_500);
        assert_eq!(c.pick(0.999_999), 9);
        assert_eq!(c.pick(1.0), 9);
        assert_eq!(c.pick(0.0), 7);
    }

    #[test]
    fn nothing_positive_means_no_choice() {
        assert!(WeightedChoice::new([(0, 0.0)]).is_none());
        assert!(WeightedChoice::new(std::iter::empty()).is_none());
    }

    #[test]
    fn p2c_keeps_the_cheaper_of_two_and_skips_the_unavailable() {
        let c = WeightedChoice::new([(0, 1.0), (1, 1.0), (2, 1.0)]).unwrap();
        let cost = |i: usize| [30.0, 10.0, 20.0][i];
        assert_eq!(pick_p2c(&c, 0.1, 0.5, |_| true, cost), Some(1));
        assert_eq!(pick_p2c(&c, 0.1, 0.9, |_| true, cost), Some(2));
        assert_eq!(pick_p2c(&c, 0.1, 0.5, |i| i != 1, cost), Some(0));
        assert_eq!(pick_p2c(&c, 0.4, 0.5, |i| i == 2, cost), Some(2));
        assert_eq!(pick_p2c(&c, 0.4, 0.5, |_| false, cost), None);
    }

    #[test]
    fn p2c_never_picks_a_zero_weight_endpoint() {
        let c = WeightedChoice::new([(0, 0.0), (1, 1.0), (2, 3.0)]).unwrap();
        for i in 0..100 {
            for j in 0..100 {
                let p = pick_p2c(
                    &c,
                    i as f64 / 100.0,
                    j as f64 / 100.0,
                    |_| true,
                    |k| k as f64,
                );
                assert_ne!(p, Some(0));
            }
        }
    }
}
