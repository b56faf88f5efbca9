//! Weighted choice among endpoints, and power of two choices over it. Pure:
//! the caller supplies the random draws and what it knows of each endpoint,
//! so tests can drive it and the request path does no allocation.

/// Endpoints with positive weight and their cumulative weights, built once
/// per table and shared by every request routed on it.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedChoice<T> {
    endpoints: Vec<T>,
    cumulative: Vec<f64>,
}

impl<T> WeightedChoice<T> {
    /// Keeps only finite, positive weights. `None` when none is left.
    pub fn new(weights: impl IntoIterator<Item = (T, f64)>) -> Option<Self> {
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

    /// Picks for a draw `u` in `[0, 1)`: each endpoint for a share of draws
    /// equal to its share of the total weight. (Always `Some`: `new` keeps
    /// at least one endpoint.)
    pub fn pick(&self, u: f64) -> Option<&T> {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let target = u.clamp(0.0, 1.0) * total;
        let i = self.cumulative.partition_point(|c| *c <= target);
        // A draw of exactly 1.0 lands past the end: the last endpoint.
        self.endpoints.get(i).or(self.endpoints.last())
    }

    pub fn endpoints(&self) -> &[T] {
        &self.endpoints
    }
}

/// Power of two choices over the weighted set: draw two endpoints by weight
/// (draws `u1`, `u2`), skip unavailable ones, keep the one that costs less
/// (peak-EWMA latency × pending). When both draws are unavailable, the
/// cheapest available endpoint of the set; `None` when none is.
pub fn pick_p2c<T>(
    choice: &WeightedChoice<T>,
    u1: f64,
    u2: f64,
    available: impl Fn(&T) -> bool,
    cost: impl Fn(&T) -> f64,
) -> Option<&T> {
    let a = choice.pick(u1)?;
    let b = choice.pick(u2)?;
    match (available(a), available(b)) {
        (true, true) if std::ptr::eq(a, b) => Some(a),
        (true, true) => Some(if cost(b) < cost(a) { b } else { a }),
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => choice
            .endpoints()
            .iter()
            .filter(|e| available(e))
            .min_by(|x, y| cost(x).total_cmp(&cost(y))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_and_invalid_weights_are_never_picked() {
        let c =
            WeightedChoice::new([(0, 0.0), (1, 2.0), (2, f64::NAN), (3, -1.0), (4, 1.0)]).unwrap();
        assert_eq!(c.endpoints(), [1, 4]);
        for i in 0..1000 {
            let p = *c.pick(i as f64 / 1000.0).unwrap();
            assert!(p == 1 || p == 4);
        }
    }

    #[test]
    fn shares_follow_weights() {
        let c = WeightedChoice::new([(7, 3.0), (9, 1.0)]).unwrap();
        let n = 10_000;
        let sevens = (0..n)
            .filter(|i| *c.pick(*i as f64 / n as f64).unwrap() == 7)
            .count();
        assert_eq!(sevens, 7_500);
        assert_eq!(c.pick(0.999_999), Some(&9));
        assert_eq!(c.pick(1.0), Some(&9));
        assert_eq!(c.pick(0.0), Some(&7));
    }

    #[test]
    fn nothing_positive_means_no_choice() {
        assert!(WeightedChoice::new([(0, 0.0)]).is_none());
        assert!(WeightedChoice::<u8>::new(std::iter::empty()).is_none());
    }

    #[test]
    fn p2c_keeps_the_cheaper_of_two_and_skips_the_unavailable() {
        let c = WeightedChoice::new([(0usize, 1.0), (1, 1.0), (2, 1.0)]).unwrap();
        let cost = |i: &usize| [30.0, 10.0, 20.0][*i];
        let pick =
            |u1, u2, avail: &dyn Fn(&usize) -> bool| pick_p2c(&c, u1, u2, avail, cost).copied();
        assert_eq!(pick(0.1, 0.5, &|_| true), Some(1));
        assert_eq!(pick(0.1, 0.9, &|_| true), Some(2));
        assert_eq!(pick(0.1, 0.5, &|i| *i != 1), Some(0));
        assert_eq!(pick(0.4, 0.5, &|i| *i == 2), Some(2));
        assert_eq!(pick(0.4, 0.5, &|_| false), None);
    }

    proptest! {
        /// Whatever the weights, draws and availability: a pick is an
        /// available endpoint with positive weight, and there is one
        /// whenever such an endpoint exists.
        #[test]
        fn p2c_picks_only_available_weighted_endpoints(
            weights in proptest::collection::vec(prop_oneof![Just(0.0), 0.01f64..10.0], 1..8),
            down in proptest::collection::vec(any::<bool>(), 8),
            u1 in 0.0f64..1.0,
            u2 in 0.0f64..1.0,
        ) {
            let c = WeightedChoice::new(weights.iter().copied().enumerate());
            prop_assume!(c.is_some());
            let c = c.unwrap();
            let available = |i: &usize| !down[*i];
            let picked = pick_p2c(&c, u1, u2, available, |i| *i as f64);
            let any = weights.iter().enumerate().any(|(i, w)| *w > 0.0 && !down[i]);
            prop_assert_eq!(picked.is_some(), any);
            if let Some(&p) = picked {
                prop_assert!(weights[p] > 0.0 && !down[p]);
            }
        }
    }
}
