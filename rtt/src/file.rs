//! A simulated RTT source, for tests and simulations only: the figures come
//! from a file someone else writes, not from the kernel. It exists because
//! an RTT difference between two endpoints on one machine cannot be made
//! real everywhere (loopback has no delay, and not every kernel has the
//! `netem` qdisc), yet the whole loop (sidecar telemetry, the control
//! plane's RTT ordering, the table) must be testable end to end.
//!
//! The file holds one endpoint a line, its address and its smoothed RTT in
//! microseconds: `127.0.0.1:8001 5000`. Blank lines and lines starting with
//! `#` are ignored. It is read again at most every [`REREAD`], so a writer
//! changes the figures by rewriting it (atomically, by renaming a sibling
//! into place, so no reader sees half of it). A file that cannot be read
//! or parsed later on keeps the last good figures and is reported once per
//! distinct problem; at start it is an error, so a typo does not run a
//! simulation on no figures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::{normalise, RttSample, RttSource};

/// How long figures read from the file are used before it is read again.
pub const REREAD: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading RTT file {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("RTT file {path:?}, line {line}: {reason}; expected `ADDRESS:PORT RTT_MICROSECONDS`")]
    Line {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
}

#[derive(Debug, Default)]
struct Figures {
    rtt: HashMap<SocketAddr, Duration>,
    /// The file's modification time: how old the figures are.
    modified: Option<SystemTime>,
    read_at: Option<Instant>,
    /// The last problem reported, so a lasting one is logged once.
    complaint: Option<String>,
}

/// Per-endpoint RTT read from a file; see the module docs.
#[derive(Debug)]
pub struct FileRtt {
    path: PathBuf,
    figures: Mutex<Figures>,
}

impl FileRtt {
    /// Reads `path` once, so a missing or malformed file fails the start.
    pub fn open(path: &Path) -> Result<Self, FileError> {
        let (rtt, modified) = read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            figures: Mutex::new(Figures {
                rtt,
                modified,
                read_at: Some(Instant::now()),
                complaint: None,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

type Parsed = (HashMap<SocketAddr, Duration>, Option<SystemTime>);

fn read(path: &Path) -> Result<Parsed, FileError> {
    let read_err = |source| FileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((parse(path, &text)?, modified))
}

fn parse(path: &Path, text: &str) -> Result<HashMap<SocketAddr, Duration>, FileError> {
    let mut rtt = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason| FileError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let mut fields = line.split_whitespace();
        let (Some(addr), Some(us), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad("not two fields"));
        };
        let addr: SocketAddr = addr.parse().map_err(|_| bad("not an address and port"))?;
        let us: u64 = us
            .parse()
            .map_err(|_| bad("not a whole number of microseconds"))?;
        if us == 0 {
            // Telemetry reads 0 as "no figure".
            return Err(bad("an RTT of 0"));
        }
        rtt.insert(normalise(addr), Duration::from_micros(us));
    }
    Ok(rtt)
}

impl RttSource for FileRtt {
    fn rtt(&self, peer: SocketAddr) -> Option<RttSample> {
        let mut f = self.figures.lock();
        if f.read_at.is_none_or(|at| at.elapsed() >= REREAD) {
            f.read_at = Some(Instant::now());
            match read(&self.path) {
                Ok((rtt, modified)) => {
                    f.rtt = rtt;
                    f.modified = modified;
                    f.complaint = None;
                }
                Err(e) => {
                    let e = e.to_string();
                    if f.complaint.as_ref() != Some(&e) {
                        tracing::warn!(error = %e, "keeping the last RTT figures read");
                        f.complaint = Some(e);
                    }
                }
            }
        }
        let srtt = *f.rtt.get(&normalise(peer))?;
        let age = f
            .modified
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or_default();
        Some(RttSample {
            srtt,
            min_rtt: srtt,
            samples: 1,
            age,
        })
    }

    fn source(&self) -> &'static str {
        crate::SOURCE_FILE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("switchyard-rtt-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn figures_follow_the_file_and_survive_a_bad_rewrite() {
        let p = temp(
            "follow",
            "# near and far\n127.0.0.1:9001 250\n\n[::ffff:127.0.0.1]:9002 40000\n",
        );
        let s = FileRtt::open(&p).unwrap();
        let near: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let far: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        assert_eq!(s.rtt(near).unwrap().srtt, Duration::from_micros(250));
        assert_eq!(s.rtt(far).unwrap().srtt, Duration::from_millis(40));
        assert!(s.rtt("127.0.0.1:9003".parse().unwrap()).is_none());
        assert_eq!(s.source(), crate::SOURCE_FILE);

        std::fs::write(&p, "127.0.0.1:9001 40000\n127.0.0.1:9002 250\n").unwrap();
        s.figures.lock().read_at = None;
        assert_eq!(s.rtt(near).unwrap().srtt, Duration::from_millis(40));
        assert_eq!(s.rtt(far).unwrap().srtt, Duration::from_micros(250));

        std::fs::write(&p, "127.0.0.1:9001 soon\n").unwrap();
        s.figures.lock().read_at = None;
        assert_eq!(
            s.rtt(near).unwrap().srtt,
            Duration::from_millis(40),
            "the last good figures are kept"
        );
        assert!(s.figures.lock().complaint.is_some());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_missing_or_malformed_file_fails_the_start() {
        let missing = std::env::temp_dir().join("switchyard-rtt-no-such-file");
        assert!(matches!(
            FileRtt::open(&missing),
            Err(FileError::Read { .. })
        ));
        for (i, bad) in [
            "127.0.0.1:1",
            "127.0.0.1 5",
            "127.0.0.1:1 -5",
            "127.0.0.1:1 0",
            "127.0.0.1:1 5 6",
        ]
        .into_iter()
        .enumerate()
        {
            let p = temp(&format!("bad{i}"), &format!("# ok\n{bad}\n"));
            match FileRtt::open(&p) {
                Err(FileError::Line { line, .. }) => assert_eq!(line, 2, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
            std::fs::remove_file(&p).unwrap();
        }
    }
}
