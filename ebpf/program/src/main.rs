//! The sock_ops program behind the sidecar's eBPF RTT source. Attached to a
//! cgroup v2, it sees every TCP socket of the processes in it: on each
//! established connection (outgoing or accepted) it asks the kernel for RTT
//! callbacks, and on each callback it stores the socket's smoothed and
//! minimum RTT under the remote address and port in `SWITCHYARD_RTT`.
//!
//! All decisions are in `switchyard_ebpf_common::sockops`, which the host
//! tests; this file only moves fields between the kernel and that logic.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB,
    BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_TCP_CLOSE,
};
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{map, sock_ops};
use aya_ebpf::maps::LruHashMap;
use aya_ebpf::programs::SockOpsContext;
use switchyard_ebpf_common::sockops::{self, Action};
use switchyard_ebpf_common::{RttKey, RttValue, MAX_ENDPOINTS};

// The host-tested constants must be the kernel's.
const _: () = {
    assert!(sockops::ACTIVE_ESTABLISHED_CB == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB);
    assert!(sockops::PASSIVE_ESTABLISHED_CB == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB);
    assert!(sockops::STATE_CB == BPF_SOCK_OPS_STATE_CB);
    assert!(sockops::RTT_CB == BPF_SOCK_OPS_RTT_CB);
    assert!(sockops::RTT_CB_FLAG == BPF_SOCK_OPS_RTT_CB_FLAG);
    assert!(sockops::TCP_CLOSE == BPF_TCP_CLOSE);
};

#[map]
static SWITCHYARD_RTT: LruHashMap<RttKey, RttValue> =
    LruHashMap::with_max_entries(MAX_ENDPOINTS, 0);

#[sock_ops]
pub fn switchyard_rtt(ctx: SockOpsContext) -> u32 {
    match sockops::action(ctx.op(), ctx.cb_flags()) {
        // A refusal (an old kernel without the flag) leaves the socket
        // unmeasured; there is nothing better to do from here.
        Action::EnableRtt { flags } => {
            let _ = ctx.set_cb_flags(flags as i32);
        }
        Action::Record => record(&ctx),
        Action::Ignore => {}
    }
    // sock_ops programs answer 1 for "carry on"; the value is unused for
    // the callbacks handled here.
    1
}

#[inline(always)]
fn record(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // Every context field is read once, up front, with a volatile load.
    // The verifier only accepts context loads at a constant offset from the
    // context pointer itself; plain reads let LLVM merge the IPv4 and IPv6
    // address loads of the two branches into one load through a computed
    // pointer ("dereference of modified ctx ptr"), which volatile forbids.
    //
    // SAFETY: `ops` is the context pointer the kernel passed in, valid for
    // the whole call; each field is an aligned u32 of `bpf_sock_ops`, and
    // srtt_us and rtt_min read as the socket's values on full sockets,
    // which every socket reaching an RTT callback is.
    let (family, ip4, ip6, port, ctx_srtt, arg_srtt, rtt_min) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).remote_port)),
            read_volatile(addr_of!((*ops).srtt_us)),
            read_volatile(addr_of!((*ops).__bindgen_anon_1.args[1])),
            read_volatile(addr_of!((*ops).rtt_min)),
        )
    };
    let Some(key) = sockops::key(family, ip4, ip6, port) else {
        return;
    };
    // SAFETY: the value is copied out at once; a concurrent update of the
    // same entry can at worst make this read a mix of two updates of it,
    // which `update` turns into one plausible entry.
    let prev = unsafe { SWITCHYARD_RTT.get(key) }.copied();
    // SAFETY: a BPF helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let srtt_raw = sockops::updated_srtt(ctx_srtt, arg_srtt);
    if let Some(next) = sockops::update(prev.as_ref(), srtt_raw, rtt_min, now) {
        // A full map evicts its least recently used entry, so this only
        // fails on memory pressure; the next callback tries again.
        let _ = SWITCHYARD_RTT.insert(key, next, 0);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The kernel only lets programs with a GPL-compatible licence call
// GPL-only helpers; none is used today, but the object is dual-licensed as
// aya-template does so adding one does not fail at load time.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
