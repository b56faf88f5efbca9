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
}
