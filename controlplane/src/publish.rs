//! Holds the table in force and publishes a new version when the policy file
//! changes: a valid edit becomes a new version, an invalid one is logged and
//! the old table stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard_proto::v1 as pb;
use tokio::sync::watch;

use crate::policy::{Policy, PolicyError};
use crate::routing;

/// A published table and the policy it came from.
#[derive(Debug)]
pub struct Published {
    pub policy: Policy,
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn publication(policy: Policy, version: u64) -> Published {
    let table = routing::table(&policy, version);
    Published {
        policy,
        update: pb::TableUpdate {
            nonce: format!("{:016x}", fastrand::u64(..)),
            table: Some(table),
        },
    }
}

pub struct Publisher {
    path: PathBuf,
    last_src: String,
    version: u64,
    tx: watch::Sender<Arc<Published>>,
}

impl Publisher {
    /// Loads the policy once; an invalid file at start is an error, since
    /// there is no old table to keep.
    pub fn load(path: &Path) -> Result<(Self, watch::Receiver<Arc<Published>>), LoadError> {
        let src = read(path)?;
        let policy = Policy::parse(&src).map_err(|source| LoadError::Invalid {
            path: path.to_path_buf(),
            source,
        })?;
        let version = next_version(0, now_ms());
        let (tx, rx) = watch::channel(Arc::new(publication(policy, version)));
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

    /// Re-reads the file; publishes a new version if it changed and is valid.
    /// Returns the new version, `None` when nothing changed.
    pub fn reload(&mut self) -> Result<Option<u64>, LoadError> {
        let src = read(&self.path)?;
        if src == self.last_src {
            return Ok(None);
        }
        // Remember the source even when invalid, so one bad edit is reported
        // once and not on every poll.
        self.last_src = src;
        let policy = Policy::parse(&self.last_src).map_err(|source| LoadError::Invalid {
            path: self.path.clone(),
            source,
        })?;
        if policy == self.tx.borrow().policy {
            return Ok(None);
        }
        self.version = next_version(self.version, now_ms());
        self.tx
            .send_replace(Arc::new(publication(policy, self.version)));
        Ok(Some(self.version))
    }

    /// Polls the file until the process ends. Polling, not inotify: editors
    /// replace files by rename, and a poll sees every such swap the same way.
    pub async fn watch_file(mut self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload() {
                Ok(Some(v)) => tracing::info!(version = v, "policy reloaded; new table published"),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "policy change rejected; keeping the table in force")
                }
            }
        }
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
