//! Where the table in force came from (the control plane, the file a
//! previous run saved, or a local policy file) and whether its weights are
//! still trusted. The control thread writes it; the request path reads one
//! relaxed atomic per request, and `/readyz` and `/metrics` show it.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, SystemTime};

/// Where the table in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Source {
    /// No table yet.
    None = 0,
    /// Pushed by the control plane over the Watch stream.
    Control = 1,
    /// Read at start from the table a previous run saved: the control
    /// plane has not answered yet.
    Persisted = 2,
    /// Compiled from a local policy file (standalone mode).
    Policy = 3,
}

impl Source {
    pub const ALL: [Source; 4] = [
        Source::None,
        Source::Control,
        Source::Persisted,
        Source::Policy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Control => "control-plane",
            Source::Persisted => "persisted",
            Source::Policy => "policy-file",
        }
    }

    fn from_u8(v: u8) -> Source {
        match v {
            1 => Source::Control,
            2 => Source::Persisted,
            3 => Source::Policy,
            _ => Source::None,
        }
    }
}

#[derive(Debug, Default)]
pub struct Origin {
    source: AtomicU8,
    weights_expired: AtomicBool,
    control_connected: AtomicBool,
}

impl Origin {
    pub fn source(&self) -> Source {
        Source::from_u8(self.source.load(Ordering::Relaxed))
    }

    pub fn set_source(&self, s: Source) {
        self.source.store(s as u8, Ordering::Relaxed);
    }

    /// Past the table's weight TTL without the control plane: balance by
    /// local signals alone.
    pub fn weights_expired(&self) -> bool {
        self.weights_expired.load(Ordering::Relaxed)
    }

    pub fn set_weights_expired(&self, v: bool) -> bool {
        self.weights_expired.swap(v, Ordering::Relaxed)
    }

    pub fn control_connected(&self) -> bool {
        self.control_connected.load(Ordering::Relaxed)
    }

    pub fn set_control_connected(&self, v: bool) {
        self.control_connected.store(v, Ordering::Relaxed);
    }
}

/// Whether weights last vouched for at `confirmed` have outlived `ttl`
/// (`None`: they never expire) at `now`. While the Watch stream is up the
/// control plane vouches continuously. Pure.
pub fn expired(
    ttl: Option<Duration>,
    connected: bool,
    confirmed: SystemTime,
    now: SystemTime,
) -> bool {
    match ttl {
        None => false,
        Some(_) if connected => false,
        // A clock stepped back makes the age negative: not expired.
        Some(ttl) => now.duration_since(confirmed).is_ok_and(|age| age > ttl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_expire_only_past_the_ttl_without_the_control_plane() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ttl = Some(Duration::from_secs(60));
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!expired(ttl, false, t0, at(60)));
        assert!(expired(ttl, false, t0, at(61)));
        // Connected: the control plane stands behind them, however old.
        assert!(!expired(ttl, true, t0, at(10_000)));
        // No TTL: never.
        assert!(!expired(None, false, t0, at(10_000_000)));
        // The clock went back.
        assert!(!expired(ttl, false, at(100), t0));
    }

    #[test]
    fn the_source_round_trips_through_its_atomic() {
        let o = Origin::default();
        assert_eq!(o.source(), Source::None);
        for s in Source::ALL {
            o.set_source(s);
            assert_eq!(o.source(), s);
        }
        assert!(!o.set_weights_expired(true));
        assert!(o.weights_expired());
    }
}
