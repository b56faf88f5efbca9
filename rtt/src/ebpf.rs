//! The eBPF RTT source: loads the sock_ops program embedded at build time,
//! attaches it to a cgroup v2 and reads its map.
//!
//! The attachment is a BPF link (Linux 5.7+) held by this process's file
//! descriptor: dropping [`EbpfRtt`] detaches it, and so does the process
//! ending in any way (exit, SIGTERM, SIGKILL), because the kernel closes
//! the descriptor and a link that is not pinned dies with its last one.
//! Nothing is pinned, so no program outlives the sidecar. Kernels before
//! 5.7 would get a legacy attachment that does outlive the process; the
//! loader refuses them rather than leave programs behind.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{HashMap, MapData, MapError};
use aya::programs::{CgroupAttachMode, SockOps};
use switchyard_ebpf_common::{RttKey, RttValue, MAP_NAME, PROGRAM_NAME};

use crate::{cgroup, key_for, peer_of, sys, RttError, RttSample, RttSource};

/// The object rtt/build.rs built, or an empty one when the toolchain was
/// missing (then `MISSING` says why).
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switchyard-rtt-ebpf"));
const MISSING: &str = env!("SWITCHYARD_RTT_EBPF_MISSING");

/// Whether this build carries the program; `Err` says why not.
pub fn built() -> Result<(), RttError> {
    if OBJECT.is_empty() {
        Err(RttError::NotBuilt(if MISSING.is_empty() {
            "no object"
        } else {
            MISSING
        }))
    } else {
        Ok(())
    }
}

/// The sock_ops program attached to one cgroup, and its map.
pub struct EbpfRtt {
    map: HashMap<MapData, RttKey, RttValue>,
    /// Owns the program and its link. `Drop` detaches the link explicitly
    /// first; dropping this closes the remaining descriptors.
    ebpf: aya::Ebpf,
    link: Option<aya::programs::sock_ops::SockOpsLinkId>,
    cgroup: PathBuf,
    program_id: u32,
}

impl std::fmt::Debug for EbpfRtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfRtt")
            .field("cgroup", &self.cgroup)
            .field("program_id", &self.program_id)
            .field("attached", &self.link.is_some())
            .finish()
    }
}

impl EbpfRtt {
    /// Loads the program and attaches it to the cgroup v2 directory
    /// `cgroup`, or to this process's own cgroup when `None`.
    ///
    /// Attaches alongside any other sock_ops programs linked there (several
    /// sidecars, or a sidecar and its tests, may share a cgroup).
    pub fn attach(cgroup: Option<&Path>) -> Result<Self, RttError> {
        built()?;
        use aya::util::KernelVersion;
        // aya attaches through a link only when it reads 5.7 or later, and
        // otherwise uses the legacy attachment that outlives the process;
        // an unreadable version is refused for the same reason.
        if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0)) {
            return Err(RttError::OldKernel);
        }
        let cgroup = match cgroup {
            Some(p) => p.to_path_buf(),
            None => cgroup::own()?,
        };
        let dir = cgroup::open(&cgroup)?;
        let mut ebpf = aya::Ebpf::load(OBJECT)?;
        let map = ebpf.take_map(MAP_NAME).ok_or(RttError::Missing("map"))?;
        let map = HashMap::try_from(map)?;
        let prog: &mut SockOps = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(RttError::Missing("program"))?
            .try_into()?;
        prog.load()?;
        let program_id = prog.info()?.id();
        // `Single` means "no attach flags". Through a BPF link that is what
        // the kernel wants (it refuses BPF_F_ALLOW_MULTI with EINVAL) and it
        // still lets links of several programs share the cgroup: cgroup
        // links are always attached as multi.
        let link = prog.attach(&dir, CgroupAttachMode::Single)?;
        Ok(Self {
            map,
            ebpf,
            link: Some(link),
            cgroup,
            program_id,
        })
    }

    /// The cgroup the program is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The kernel's ID for the loaded program, as [`cgroup::attached_sock_ops`]
    /// lists it.
    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    /// Every endpoint in the map.
    pub fn snapshot(&self) -> Vec<(SocketAddr, RttSample)> {
        let now = sys::monotonic_ns();
        self.map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (peer_of(&k), sample(&v, now)))
            .collect()
    }

    /// The raw map entry for `peer`, as the program wrote it.
    pub fn entry(&self, peer: SocketAddr) -> Result<Option<RttValue>, RttError> {
        match self.map.get(&key_for(peer), 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Detaches the program now, reporting failure (dropping detaches too,
    /// but can only log).
    pub fn detach(mut self) -> Result<(), RttError> {
        self.detach_link()
    }

    fn detach_link(&mut self) -> Result<(), RttError> {
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        let prog: &mut SockOps = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(RttError::Missing("program"))?
            .try_into()?;
        prog.detach(link)?;
        tracing::info!(cgroup = %self.cgroup.display(), program_id = self.program_id, "eBPF RTT program detached");
        Ok(())
    }
}

impl Drop for EbpfRtt {
    fn drop(&mut self) {
        if let Err(e) = self.detach_link() {
            // The link's descriptor still closes with `ebpf`, which
            // detaches it in the kernel regardless.
            tracing::warn!(error = %e, "detaching the eBPF RTT program");
        }
    }
}

fn sample(v: &RttValue, now_ns: u64) -> RttSample {
    RttSample {
        srtt: Duration::from_micros(v.srtt_us.into()),
        min_rtt: Duration::from_micros(v.min_rtt_us.into()),
        samples: v.samples,
        age: Duration::from_nanos(now_ns.saturating_sub(v.updated_ns)),
    }
}

impl RttSource for EbpfRtt {
    fn rtt(&self, peer: SocketAddr) -> Option<RttSample> {
        match self.entry(peer) {
            Ok(v) => v.map(|v| sample(&v, sys::monotonic_ns())),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "reading the eBPF RTT map");
                None
            }
        }
    }

    fn source(&self) -> &'static str {
        crate::SOURCE_EBPF
    }
}
