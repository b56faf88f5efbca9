//! Holds the table in force and publishes new versions: the engine calls
//! `publish` when the policy file changed (a valid edit; an invalid one is
//! logged and the old table stays) or the decision moved.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use switchyard_policy::{Policy, PolicyError};
use switchyard_proto::v1 as pb;
use tokio::sync::watch;

use crate::routing;
use crate::weights::Decision;

/// A published table, the policy it came from, and the latest decision.
/// The decision may be newer than the table: standing (ejections) moves on
/// between publications without waking any Watch stream.
#[derive(Debug)]
pub struct Published {
    pub policy: Policy,
    pub decision: Decision,
    pub update: pb::TableUpdate,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: PolicyError },
}

/// Versions only grow, also across restarts: a version is at least the
/// wall-clock milliseconds at publication, so a restarted control plane
/// publishes above whatever its predecessor did (clocks permitting).
pub fn next_version(previous: u64, now_ms: u64) -> u64 {
    previous.saturating_add(1).max(now_ms)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn publication(policy: Policy, decision: Decision, version: u64) -> Published {
    let table = routing::table(&policy, &decision, version);
    Published {
        policy,
        decision,
        update: pb::TableUpdate {
            nonce: format!("{:016x}", fastrand::u64(..)),
            table: Some(table),
        },
    }
}

/// Parses and validates the policy, and checks the TLS files it names
/// where this host has them: whatever a sidecar could not apply is refused
/// here, so no table naming it is ever pushed.
fn parse(path: &Path, src: &str) -> Result<Policy, LoadError> {
    let invalid = |source| LoadError::Invalid {
        path: path.to_path_buf(),
        source,
    };
    let policy = Policy::parse(src).map_err(invalid)?;
    for u in policy.check_files(src).map_err(invalid)? {
        tracing::warn!(field = %u.field, reason = %u.reason,
            "TLS file not checked here (not on this host?); each sidecar checks it when it applies a table");
    }
    Ok(policy)
}

pub struct Publisher {
    path: PathBuf,
    last_src: String,
    version: u64,
    tx: watch::Sender<Arc<Published>>,
}

impl Publisher {
    /// Loads the policy once and publishes the table `decide` makes of it,
    /// above `last_version` (the last one published before a restart). An
    /// invalid file at start is an error, since there is no old table to keep.
    pub fn load(
        path: &Path,
        last_version: u64,
        decide: impl FnOnce(&Policy) -> Decision,
    ) -> Result<(Self, watch::Receiver<Arc<Published>>), LoadError> {
        let src = read(path)?;
        let policy = parse(path, &src)?;
        let version = next_version(last_version, now_ms());
        let decision = decide(&policy);
        let (tx, rx) = watch::channel(Arc::new(publication(policy, decision, version)));
        Ok((
            Self {
                path: path.to_path_buf(),
                last_src: src,
                version,
                tx,
            },
            rx,
        ))
    }

    /// Re-reads the file; returns the new policy if it changed and is valid.
    /// Publishing it is the caller's job, with a decision made for it.
    pub fn reload(&mut self) -> Result<Option<Policy>, LoadError> {
        let src = read(&self.path)?;
        if src == self.last_src {
            return Ok(None);
        }
        // Remember the source even when invalid, so one bad edit is reported
        // once and not on every poll.
        self.last_src = src;
        let policy = parse(&self.path, &self.last_src)?;
        if policy == self.tx.borrow().policy {
            return Ok(None);
        }
        Ok(Some(policy))
    }

    pub fn current(&self) -> Arc<Published> {
        self.tx.borrow().clone()
    }

    /// Publishes a new version; every Watch stream sends it.
    pub fn publish(&mut self, policy: Policy, decision: Decision) -> u64 {
        self.version = next_version(self.version, now_ms());
        self.tx
            .send_replace(Arc::new(publication(policy, decision, self.version)));
        self.version
    }

    /// Records a decision whose routes equal the published ones, without
    /// waking any Watch stream: status sees the new standing, sidecars see
    /// nothing to apply.
    pub fn refresh(&self, decision: Decision) {
        self.tx.send_if_modified(|p| {
            *p = Arc::new(Published {
                policy: p.policy.clone(),
                decision,
                update: p.update.clone(),
            });
            false
        });
    }

    pub fn version(&self) -> u64 {
        self.version
    }
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_grow_past_both_the_previous_and_the_clock() {
        assert_eq!(next_version(5, 3), 6);
        assert_eq!(next_version(5, 100), 100);
        assert_eq!(next_version(u64::MAX, 0), u64::MAX);
    }
}
