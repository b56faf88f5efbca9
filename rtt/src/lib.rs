//! Kernel TCP round-trip time per remote endpoint, for the sidecar's
//! telemetry and metrics.
//!
//! One trait, [`RttSource`], and two ways to fill it:
//! - [`EbpfRtt`]: a sock_ops program attached to a cgroup v2 records the
//!   kernel's smoothed RTT of every TCP connection made or accepted by the
//!   processes in it, per remote address and port. Needs root (or
//!   CAP_BPF + CAP_NET_ADMIN), Linux 5.7+ and a build with the BPF toolchain.
//! - [`TcpInfoRtt`]: `TCP_INFO` read from the sockets the sidecar hands
//!   over. Works anywhere, sees only those sockets.
//!
//! For tests and simulations only, [`FileRtt`] takes the figures from a
//! file instead of the kernel, so RTT differences that loopback cannot
//! produce can still drive the whole loop.
//!
//! [`open`] picks one by [`RttMode`]; `auto` tries eBPF and falls back to
//! TCP_INFO with one log line saying why.
#![deny(unsafe_code)]

pub mod cgroup;
mod ebpf;
mod file;
mod sys;
mod tcpinfo;

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use ebpf::{built as ebpf_built, EbpfRtt};
pub use file::{FileError, FileRtt, REREAD as FILE_REREAD};
pub use switchyard_ebpf_common::{RttKey, RttValue};
pub use sys::{tcp_info, TcpRtt};
pub use tcpinfo::{TcpInfoRtt, DEFAULT_INTERVAL};

/// [`RttSource::source`] of [`EbpfRtt`].
pub const SOURCE_EBPF: &str = "ebpf";
/// [`RttSource::source`] of [`TcpInfoRtt`].
pub const SOURCE_TCP_INFO: &str = "tcp-info";
/// [`RttSource::source`] of [`FileRtt`]: simulated figures.
pub const SOURCE_FILE: &str = "file";

/// What is known of the RTT to one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttSample {
    /// The kernel's smoothed RTT (`srtt`, as `tcpi_rtt`).
    pub srtt: Duration,
    /// The kernel's windowed minimum RTT (as `tcpi_min_rtt`).
    pub min_rtt: Duration,
    /// eBPF: RTT samples the kernel took; TCP_INFO: sockets read.
    pub samples: u64,
    /// Time since the figure was last updated.
    pub age: Duration,
}

/// A source of per-endpoint RTT.
pub trait RttSource: Send + Sync {
    /// The latest RTT to `peer`, if any connection to it was measured.
    fn rtt(&self, peer: SocketAddr) -> Option<RttSample>;

    /// `"ebpf"`, `"tcp-info"` or (simulated) `"file"`, for metrics labels
    /// and telemetry.
    fn source(&self) -> &'static str;

    /// Shows the source a connected TCP socket to `peer`; `fresh` when the
    /// connection was just opened. Sources that read sockets themselves
    /// (TCP_INFO) use it; the eBPF source already sees every socket in its
    /// cgroup and ignores it. Cheap enough to call on every request: pooled
    /// connections are only read again once per interval.
    fn observe(&self, fd: RawFd, peer: SocketAddr, fresh: bool) {
        let _ = (fd, peer, fresh);
    }
}

/// Which source [`open`] builds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RttMode {
    /// eBPF, or an error.
    Ebpf,
    /// TCP_INFO only: no program is loaded.
    TcpInfo,
    /// eBPF when it loads, else TCP_INFO.
    #[default]
    Auto,
    /// Simulated figures read from this file (`file:PATH`), for tests and
    /// simulations: nothing is measured.
    File(PathBuf),
}

impl std::str::FromStr for RttMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ebpf" => Ok(Self::Ebpf),
            "tcp-info" => Ok(Self::TcpInfo),
            "auto" => Ok(Self::Auto),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                Some(_) => Err("file: needs a path, as in file:/run/rtt.txt".to_string()),
                None => Err(format!(
                    "unknown RTT source {s:?}: expected ebpf, tcp-info or auto"
                )),
            },
        }
    }
}

impl std::fmt::Display for RttMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ebpf => f.write_str("ebpf"),
            Self::TcpInfo => f.write_str("tcp-info"),
            Self::Auto => f.write_str("auto"),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RttError {
    #[error("this build has no eBPF RTT program ({0})")]
    NotBuilt(&'static str),
    #[error("the kernel is older than 5.7 (or its version is unreadable): cgroup programs could only be attached in a way that outlives the sidecar")]
    OldKernel,
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error("opening cgroup {path:?}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("querying the programs attached to {path:?}: {source}")]
    Query {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("{0}")]
    File(#[from] FileError),
}

/// Builds the RTT source `mode` asks for. `cgroup` is where the eBPF
/// program attaches; `None` is this process's own cgroup.
pub fn open(mode: RttMode, cgroup: Option<&Path>) -> Result<Arc<dyn RttSource>, RttError> {
    match mode {
        RttMode::TcpInfo => Ok(Arc::new(TcpInfoRtt::default())),
        RttMode::Ebpf => Ok(Arc::new(attach_logged(cgroup)?)),
        RttMode::Auto => match attach_logged(cgroup) {
            Ok(e) => Ok(Arc::new(e)),
            Err(e) => {
                tracing::warn!(reason = %e, "eBPF RTT unavailable; measuring RTT with TCP_INFO on the sidecar's own upstream connections");
                Ok(Arc::new(TcpInfoRtt::default()))
            }
        },
        RttMode::File(path) => {
            let f = FileRtt::open(&path)?;
            tracing::warn!(path = %f.path().display(),
                "RTT figures are simulated, read from a file: for tests and simulations only");
            Ok(Arc::new(f))
        }
    }
}

fn attach_logged(cgroup: Option<&Path>) -> Result<EbpfRtt, RttError> {
    let e = EbpfRtt::attach(cgroup)?;
    tracing::info!(cgroup = %e.cgroup().display(), program_id = e.program_id(), "eBPF RTT program attached");
    if !cgroup::own_is_within(e.cgroup()) {
        tracing::warn!(cgroup = %e.cgroup().display(),
            "this process is not in that cgroup: its own connections will not be measured");
    }
    Ok(e)
}

/// Why this process cannot load and attach the eBPF program here, if it
/// cannot: a build without the object, no cgroup v2 mount, an old kernel,
/// or missing privileges (CAP_SYS_ADMIN, or CAP_BPF with CAP_NET_ADMIN).
/// `None` means attaching should work, so a failure is a real error.
pub fn ebpf_unavailable() -> Option<String> {
    if let Err(e) = ebpf_built() {
        return Some(e.to_string());
    }
    if let Err(e) = cgroup::mount_point() {
        return Some(e.to_string());
    }
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN))) {
        return Some(
            "missing privileges: CAP_SYS_ADMIN, or CAP_BPF and CAP_NET_ADMIN, are needed".into(),
        );
    }
    use aya::util::KernelVersion;
    if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0)) {
        return Some(RttError::OldKernel.to_string());
    }
    None
}

/// The map key for a peer; IPv4 and IPv4-mapped IPv6 give the same key.
pub fn key_for(peer: SocketAddr) -> RttKey {
    match normalise(peer) {
        SocketAddr::V4(a) => RttKey::ipv4(a.ip().octets(), a.port()),
        SocketAddr::V6(a) => RttKey::new(a.ip().octets(), a.port()),
    }
}

/// The peer a map key names.
pub fn peer_of(key: &RttKey) -> SocketAddr {
    let ip = std::net::Ipv6Addr::from(key.addr);
    match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), key.port),
        None => SocketAddr::new(IpAddr::V6(ip), key.port),
    }
}

/// IPv4-mapped IPv6 peers as the IPv4 peers they are, so lookups agree
/// whichever way a socket was opened.
pub(crate) fn normalise(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
            None => peer,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_ipv4_mapped_meets_ipv4() {
        for s in ["127.0.0.1:8080", "[::1]:443", "[2001:db8::7]:65535"] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(peer_of(&key_for(a)), a);
        }
        let v4: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(key_for(v4), key_for(mapped));
    }

    #[test]
    fn modes_parse_from_their_flag_spelling() {
        for m in [
            RttMode::Ebpf,
            RttMode::TcpInfo,
            RttMode::Auto,
            RttMode::File("/run/rtt.txt".into()),
        ] {
            assert_eq!(m.to_string().parse::<RttMode>(), Ok(m));
        }
        assert!("bpf".parse::<RttMode>().is_err());
        assert!("file:".parse::<RttMode>().is_err());
    }

    #[test]
    fn tcp_info_mode_loads_nothing() {
        let s = open(RttMode::TcpInfo, None).unwrap();
        assert_eq!(s.source(), SOURCE_TCP_INFO);
    }
}
