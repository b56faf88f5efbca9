//! Whether an endpoint is up, as the control plane judges it: from its own
//! probes (cheap requests that spend no tokens, see `probe`) and from what
//! the sidecars report of their local ejections.
//!
//! Pure: the probe history is a small state machine fed probe results, and
//! the judgement a function of that history and the sidecars' reports, so
//! both are tested without a network or a clock. The weight computation
//! gives a down endpoint weight 0 (`weights::decide`).

use serde::{Deserialize, Serialize};

/// When probes turn an endpoint down and back up. One failed probe may be a
/// blip (a restart, a dropped packet), so it takes a few in a row; coming
/// back takes a few passes in a row too, so an endpoint that answers every
/// other probe stays down instead of flapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeRule {
    /// Failed probes in a row that turn an endpoint down.
    pub down_after: u32,
    /// Passed probes in a row that bring a down endpoint back.
    pub up_after: u32,
}

impl Default for ProbeRule {
    fn default() -> Self {
        Self {
            down_after: 2,
            up_after: 2,
        }
    }
}

/// One endpoint's probe history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeState {
    /// Failed probes in a row; 0 after a pass.
    pub failures: u32,
    /// Passed probes in a row; 0 after a failure.
    pub passes: u32,
    /// Why the last failed probe failed, as an operator should read it
    /// (never a credential, never a response body).
    pub last_error: String,
    /// Down by its probes.
    pub down: bool,
}

/// A change of an endpoint's probe verdict, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    Down,
    Up,
}

impl ProbeState {
    /// Takes in one probe's result; says when the verdict turned.
    pub fn record(&mut self, result: Result<(), String>, rule: &ProbeRule) -> Option<Turn> {
        match result {
            Ok(()) => {
                self.failures = 0;
                self.passes = self.passes.saturating_add(1);
                if self.down && self.passes >= rule.up_after.max(1) {
                    self.down = false;
                    return Some(Turn::Up);
                }
            }
            Err(why) => {
                self.passes = 0;
                self.failures = self.failures.saturating_add(1);
                self.last_error = why;
                if !self.down && self.failures >= rule.down_after.max(1) {
                    self.down = true;
                    return Some(Turn::Down);
                }
            }
        }
        None
    }
}

/// Why an endpoint is down, or `None` when it is up: its probes fail, or
/// most of the sidecars that report on it (`reporting`, of which
/// `ejecting` have it ejected locally) have ejected it. A sidecar that
/// ejected an endpoint sends it nothing, so without the second rule the
/// control plane would see no failures while every sidecar avoids it.
pub fn judge(probe: Option<&ProbeState>, ejecting: u32, reporting: u32) -> Option<String> {
    if let Some(p) = probe.filter(|p| p.down) {
        return Some(format!("probe: {}", p.last_error));
    }
    if ejecting > 0 && u64::from(ejecting) * 2 > u64::from(reporting) {
        return Some(format!(
            "ejected by {ejecting} of {} sidecars",
            reporting.max(ejecting)
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fail() -> Result<(), String> {
        Err("connection refused".into())
    }

    #[test]
    fn failures_in_a_row_turn_down_and_passes_in_a_row_bring_back() {
        let rule = ProbeRule::default();
        let mut p = ProbeState::default();
        assert_eq!(p.record(fail(), &rule), None, "one failure is a blip");
        assert_eq!(p.record(Ok(()), &rule), None);
        assert_eq!(p.record(fail(), &rule), None, "the run started again");
        assert_eq!(p.record(fail(), &rule), Some(Turn::Down));
        assert!(p.down);
        assert_eq!(p.record(fail(), &rule), None, "turns once");
        assert_eq!(p.record(Ok(()), &rule), None, "one pass is not enough");
        assert_eq!(p.record(fail(), &rule), None);
        assert_eq!(p.record(Ok(()), &rule), None);
        assert_eq!(p.record(Ok(()), &rule), Some(Turn::Up));
        assert!(!p.down);
        assert_eq!(p.record(Ok(()), &rule), None);
    }

    #[test]
    fn the_reason_names_the_probe_error_or_the_sidecars() {
        let rule = ProbeRule::default();
        let mut p = ProbeState::default();
        p.record(fail(), &rule);
        assert_eq!(judge(Some(&p), 0, 0), None);
        p.record(Err("HTTP 401".into()), &rule);
        assert_eq!(judge(Some(&p), 0, 3).as_deref(), Some("probe: HTTP 401"));
        assert_eq!(
            judge(None, 2, 3).as_deref(),
            Some("ejected by 2 of 3 sidecars")
        );
        assert_eq!(judge(None, 1, 2), None, "half is not most");
        assert_eq!(judge(None, 0, 0), None, "no reports: no verdict");
        assert_eq!(
            judge(Some(&p), 3, 3).as_deref(),
            Some("probe: HTTP 401"),
            "the probe's reason comes first"
        );
    }

    proptest! {
        /// Down exactly when the last `down_after` probes failed, or it was
        /// down and has not passed `up_after` in a row since.
        #[test]
        fn the_verdict_follows_the_runs(
            results in proptest::collection::vec(any::<bool>(), 0..60),
            down_after in 1u32..5,
            up_after in 1u32..5,
        ) {
            let rule = ProbeRule { down_after, up_after };
            let mut p = ProbeState::default();
            let mut down = false;
            for (i, ok) in results.iter().enumerate() {
                let was = p.down;
                let turn = p.record(if *ok { Ok(()) } else { fail() }, &rule);
                let run = results[..=i].iter().rev().take_while(|r| *r == ok).count() as u32;
                if *ok && down && run >= up_after {
                    down = false;
                } else if !*ok && !down && run >= down_after {
                    down = true;
                }
                prop_assert_eq!(p.down, down);
                let expected = match (was, p.down) {
                    (false, true) => Some(Turn::Down),
                    (true, false) => Some(Turn::Up),
                    _ => None,
                };
                prop_assert_eq!(turn, expected);
            }
        }

        /// The sidecars' rule is a strict majority of those reporting.
        #[test]
        fn most_sidecars_is_a_strict_majority(ejecting in 0u32..50, others in 0u32..50) {
            let reporting = ejecting + others;
            let down = judge(None, ejecting, reporting).is_some();
            prop_assert_eq!(down, ejecting > others);
        }
    }
}
