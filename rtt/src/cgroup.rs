//! Finding cgroup v2 directories and asking which sock_ops programs are
//! attached to one. The sidecar attaches by default to the cgroup it runs
//! in; tests use the query to prove nothing stays attached after a sidecar
//! is gone.
#![forbid(unsafe_code)]

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::{sys, RttError};

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`:
/// `/sys/fs/cgroup` on unified-only systems, `/sys/fs/cgroup/unified` on
/// hybrid ones such as this project's CI machine.
pub fn mount_point() -> Result<PathBuf, RttError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| RttError::Cgroup(format!("reading /proc/self/mountinfo: {e}")))?;
    parse_mount_point(&info)
        .ok_or_else(|| RttError::Cgroup("no cgroup2 file system is mounted".into()))
}

/// The cgroup2 mount point in a mountinfo text: field 5 is the mount
/// point, and the file system type follows the ` - ` separator.
fn parse_mount_point(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// The calling process's cgroup v2 directory: its `0::` line of
/// `/proc/self/cgroup` under the cgroup2 mount point.
pub fn own() -> Result<PathBuf, RttError> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| RttError::Cgroup(format!("reading /proc/self/cgroup: {e}")))?;
    let rel = parse_own(&text)
        .ok_or_else(|| RttError::Cgroup("/proc/self/cgroup has no cgroup v2 (0::) line".into()))?;
    let mount = mount_point()?;
    // Joining "" would leave a trailing slash on the root cgroup.
    Ok(if rel.is_empty() {
        mount
    } else {
        mount.join(rel)
    })
}

/// The cgroup v2 path relative to the mount point, from `/proc/self/cgroup`.
fn parse_own(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/'))
}

/// Creates the cgroup `name` under `parent` (a cgroup v2 directory), or
/// returns it if it exists.
pub fn create(parent: &Path, name: &str) -> Result<PathBuf, RttError> {
    let path = parent.join(name);
    match std::fs::create_dir(&path) {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(RttError::Cgroup(format!("creating {path:?}: {e}"))),
    }
}

/// Moves process `pid` (0: the caller) and all its threads into the cgroup
/// at `path`. Sockets it opens from then on belong to that cgroup.
pub fn join(path: &Path, pid: u32) -> Result<(), RttError> {
    std::fs::write(path.join("cgroup.procs"), pid.to_string())
        .map_err(|e| RttError::Cgroup(format!("moving process {pid} into {path:?}: {e}")))
}

/// Removes an empty cgroup directory. Fails while processes are in it.
pub fn remove(path: &Path) -> Result<(), RttError> {
    std::fs::remove_dir(path).map_err(|e| RttError::Cgroup(format!("removing {path:?}: {e}")))
}

/// Opens a cgroup directory, as attaching and querying need.
pub(crate) fn open(path: &Path) -> Result<File, RttError> {
    File::open(path).map_err(|source| RttError::OpenCgroup {
        path: path.to_path_buf(),
        source,
    })
}

/// IDs of the sock_ops programs attached directly to the cgroup at `path`.
pub fn attached_sock_ops(path: &Path) -> Result<Vec<u32>, RttError> {
    let dir = open(path)?;
    sys::prog_query(dir.as_fd(), sys::BPF_CGROUP_SOCK_OPS).map_err(|source| RttError::Query {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether sockets made by the calling process are subject to programs
/// attached at `target`: true when the process's cgroup is `target` or
/// below it.
pub fn own_is_within(target: &Path) -> bool {
    match (own(), target.canonicalize()) {
        (Ok(own), Ok(target)) => own.canonicalize().is_ok_and(|own| own.starts_with(target)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_ones() {
        let info = "\
33 25 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:14 - cgroup cgroup rw,cpu
34 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:15 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_mount_point(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_mount_point("33 25 0:29 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn reads_the_v2_line_of_proc_self_cgroup() {
        let text = "4:memory:/a/b\n0::/system.slice/sidecar.service\n";
        assert_eq!(parse_own(text), Some("system.slice/sidecar.service"));
        assert_eq!(parse_own("0::/\n"), Some(""));
        assert_eq!(parse_own("4:memory:/a\n"), None);
    }
}
