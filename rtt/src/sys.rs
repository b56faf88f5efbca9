//! The crate's only unsafe code: three system calls with no safe wrapper in
//! the crates we use. `TCP_INFO` through `getsockopt` (libc's `tcp_info`
//! for glibc stops before `tcpi_min_rtt`, and neither nix nor socket2
//! exposes it), `CLOCK_MONOTONIC` as raw nanoseconds (the clock
//! `bpf_ktime_get_ns` uses, which `std::time::Instant` does not expose), and
//! `BPF_PROG_QUERY` on a cgroup (aya only queries a few attach types, not
//! sock_ops).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

/// The RTT figures of one socket's `struct tcp_info`, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpRtt {
    /// `tcpi_rtt`: smoothed RTT.
    pub rtt_us: u32,
    /// `tcpi_rttvar`: RTT variation.
    pub rttvar_us: u32,
    /// `tcpi_min_rtt`: windowed minimum RTT; `None` on kernels older than
    /// 4.6, whose `tcp_info` ends before it.
    pub min_rtt_us: Option<u32>,
}

// Offsets in the kernel's `struct tcp_info` (include/uapi/linux/tcp.h):
// eight single-byte fields, then 32-bit fields from `tcpi_rto` at 8, so
// `tcpi_rtt` is the 16th of them (8 + 15 * 4), then four 64-bit counters
// from 104, two 32-bit segment counters, `tcpi_notsent_bytes` at 144 and
// `tcpi_min_rtt` at 148. The uapi layout only ever grows at the end.
const TCPI_RTT: usize = 68;
const TCPI_RTTVAR: usize = 72;
const TCPI_MIN_RTT: usize = 148;
/// Room for the whole struct as of Linux 6.x (under 300 bytes); the kernel
/// copies at most what we offer and says how much it wrote.
const TCP_INFO_ROOM: usize = 512;

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes([
        buf[offset],
        buf[offset + 1],
        buf[offset + 2],
        buf[offset + 3],
    ])
}

/// Reads `TCP_INFO` from a TCP socket.
pub fn tcp_info(fd: RawFd) -> io::Result<TcpRtt> {
    // The kernel copies bytes, so the buffer needs no particular alignment.
    let mut buf = [0u8; TCP_INFO_ROOM];
    let mut len = TCP_INFO_ROOM as libc::socklen_t;
    // SAFETY: `buf` is a live, writable buffer of `len` bytes and `len` is a
    // valid socklen_t the kernel updates; getsockopt writes at most `len`
    // bytes. An fd that is not a TCP socket only yields an error.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let written = (len as usize).min(TCP_INFO_ROOM);
    if written < TCPI_RTTVAR + 4 {
        return Err(io::Error::other(format!(
            "TCP_INFO too short: {written} bytes"
        )));
    }
    Ok(TcpRtt {
        rtt_us: u32_at(&buf, TCPI_RTT),
        rttvar_us: u32_at(&buf, TCPI_RTTVAR),
        min_rtt_us: (written >= TCPI_MIN_RTT + 4).then(|| u32_at(&buf, TCPI_MIN_RTT)),
    })
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// `BPF_PROG_QUERY`'s part of `union bpf_attr` (include/uapi/linux/bpf.h).
/// Fields after `prog_cnt` exist since Linux 6.4 and stay zero: the kernel
/// then fills none of them.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

const BPF_PROG_QUERY: libc::c_long = 16;
/// `BPF_CGROUP_SOCK_OPS` in `enum bpf_attach_type`.
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;

/// IDs of the programs attached directly to the cgroup open at `cgroup`
/// with `attach_type` (not those inherited from ancestors).
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut room = 16usize;
    loop {
        let mut ids = vec![0u32; room];
        let mut attr = ProgQueryAttr {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: room as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a fully initialised BPF_PROG_QUERY attribute of
        // the size passed; `prog_ids` points at `prog_cnt` writable u32s
        // that outlive the call, and the kernel writes at most that many.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut ProgQueryAttr,
                std::mem::size_of::<ProgQueryAttr>() as libc::c_uint,
            )
        };
        if rc == 0 {
            ids.truncate(attr.prog_cnt as usize);
            return Ok(ids);
        }
        let err = io::Error::last_os_error();
        // ENOSPC: more programs than room; the kernel said how many.
        if err.raw_os_error() == Some(libc::ENOSPC) && (attr.prog_cnt as usize) > room {
            room = attr.prog_cnt as usize;
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_agree_with_libc_where_libc_has_the_field() {
        assert_eq!(std::mem::offset_of!(libc::tcp_info, tcpi_rtt), TCPI_RTT);
        assert_eq!(
            std::mem::offset_of!(libc::tcp_info, tcpi_rttvar),
            TCPI_RTTVAR
        );
    }

    #[test]
    fn query_attr_matches_the_kernel_size() {
        // 6.4+ `query` member of union bpf_attr: 64 bytes.
        assert_eq!(std::mem::size_of::<ProgQueryAttr>(), 64);
    }

    #[test]
    fn tcp_info_on_a_non_socket_is_an_error() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(tcp_info(f.as_raw_fd()).is_err());
    }

    #[test]
    fn monotonic_ns_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
