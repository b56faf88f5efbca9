//! The sock_ops program's decisions, over the plain integers the kernel
//! hands it in `struct bpf_sock_ops`: which callback does what, how a map
//! key is built from the context fields, how the kernel's scaled RTT becomes
//! microseconds, and how a new sample folds into an endpoint's entry.
//!
//! The BPF program is a thin shell around these functions, so the host's
//! `cargo test` checks the logic the BPF target cannot run tests for. The
//! constants are checked against aya-ebpf's kernel bindings at compile time
//! in the program.

use crate::{RttKey, RttValue};

/// `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`: an outgoing connection completed
/// its handshake.
pub const ACTIVE_ESTABLISHED_CB: u32 = 4;
/// `BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`: an accepted connection completed
/// its handshake.
pub const PASSIVE_ESTABLISHED_CB: u32 = 5;
/// `BPF_SOCK_OPS_STATE_CB`: the socket changed TCP state (arg 1 is the new
/// state). Only delivered when `STATE_CB_FLAG` is set, which this program
/// does not ask for.
pub const STATE_CB: u32 = 10;
/// `BPF_SOCK_OPS_RTT_CB`: the kernel took an RTT sample, at most once per
/// round trip (from `tcp_rtt_estimator`). `rtt_min` is already updated;
/// the context's `srtt_us` is not yet (the kernel stores the new value
/// right after the callback), so since Linux 6.10 the new one comes as
/// argument 1 ([`updated_srtt`]).
pub const RTT_CB: u32 = 12;
/// `BPF_SOCK_OPS_RTT_CB_FLAG`, the bit asking for [`RTT_CB`].
pub const RTT_CB_FLAG: u32 = 1 << 3;
/// `BPF_TCP_CLOSE`.
pub const TCP_CLOSE: u32 = 7;
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// What the program does for one callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Call `bpf_sock_ops_cb_flags_set` with these flags: the socket's
    /// current ones plus [`RTT_CB_FLAG`]. The helper replaces the flags
    /// rather than adding to them, so keeping the current ones leaves other
    /// programs' requests on the same socket intact.
    EnableRtt { flags: u32 },
    /// Fold the socket's RTT into its endpoint's entry.
    Record,
    /// Nothing to do.
    Ignore,
}

/// The action for callback `op` on a socket whose callback flags are
/// `cb_flags`.
pub const fn action(op: u32, cb_flags: u32) -> Action {
    match op {
        ACTIVE_ESTABLISHED_CB | PASSIVE_ESTABLISHED_CB => {
            if cb_flags & RTT_CB_FLAG != 0 {
                Action::Ignore
            } else {
                Action::EnableRtt {
                    flags: cb_flags | RTT_CB_FLAG,
                }
            }
        }
        RTT_CB => Action::Record,
        // A close (STATE_CB to TCP_CLOSE) needs nothing: the program keeps
        // no per-socket state to drop, and the endpoint's entry must outlive
        // its connections (the next request may open a new one, and the
        // sidecar still wants the last RTT meanwhile). LRU eviction bounds
        // the map instead.
        _ => Action::Ignore,
    }
}

/// The map key for a socket's remote end, from the context's `family`,
/// `remote_ip4`, `remote_ip6` and `remote_port` exactly as the kernel
/// presents them; `None` for anything but IPv4 and IPv6.
///
/// The addresses are in network byte order in memory, so their in-memory
/// bytes (`to_ne_bytes`) are the address octets on either endianness.
/// IPv4 becomes IPv4-mapped IPv6; an IPv6 socket talking to an IPv4 peer
/// already reports the mapped form, so both meet on one key.
pub const fn key(
    family: u32,
    remote_ip4: u32,
    remote_ip6: [u32; 4],
    remote_port: u32,
) -> Option<RttKey> {
    let port = remote_port_host(remote_port);
    match family {
        AF_INET => Some(RttKey::ipv4(remote_ip4.to_ne_bytes(), port)),
        AF_INET6 => {
            let [a, b, c, d] = remote_ip6;
            let (a, b, c, d) = (
                a.to_ne_bytes(),
                b.to_ne_bytes(),
                c.to_ne_bytes(),
                d.to_ne_bytes(),
            );
            Some(RttKey::new(
                [
                    a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0],
                    d[1], d[2], d[3],
                ],
                port,
            ))
        }
        _ => None,
    }
}

/// The remote port in host byte order. The kernel documents
/// `bpf_sock_ops.remote_port` as a 32-bit value in network byte order (on
/// little-endian machines it loads the 16-bit port and shifts it into the
/// upper half), so a 32-bit byte swap yields the port.
pub const fn remote_port_host(remote_port: u32) -> u16 {
    u32::from_be(remote_port) as u16
}

/// The scaled smoothed RTT after the sample an RTT callback reports: the
/// callback's argument 1 where the kernel passes it (Linux 6.10+), else the
/// context's `srtt_us`, which then lags one sample behind. Older kernels
/// pass no arguments and the slot reads 0; the kernel never stores a
/// smoothed RTT of 0 (it keeps at least 1), so 0 cannot be a real value.
pub const fn updated_srtt(ctx_srtt_us: u32, arg1: u32) -> u32 {
    if arg1 != 0 {
        arg1
    } else {
        ctx_srtt_us
    }
}

/// Microseconds from `bpf_sock_ops.srtt_us`, which holds the smoothed RTT
/// scaled by 8 (the kernel's fixed-point `tp->srtt_us`), exactly as TCP_INFO
/// turns it into `tcpi_rtt`.
pub const fn srtt_us(raw: u32) -> u32 {
    raw >> 3
}

/// The endpoint's entry after one RTT callback: `prev` is its entry so far,
/// `srtt_raw` the scaled smoothed RTT ([`updated_srtt`]), `rtt_min` the
/// context's `rtt_min` (microseconds), `now_ns` the time. `None` when the socket has no RTT
/// estimate yet (the kernel reads 0 for it), which is not a sample.
///
/// Concurrent callbacks for the same endpoint on two CPUs may both read the
/// same `prev`; one sample count is then lost. That is accepted: the count
/// is a liveness hint, and locking would cost every callback.
pub fn update(
    prev: Option<&RttValue>,
    srtt_raw: u32,
    rtt_min: u32,
    now_ns: u64,
) -> Option<RttValue> {
    let srtt = srtt_us(srtt_raw);
    if srtt == 0 {
        return None;
    }
    // The kernel's windowed minimum reads as 0 or all ones before its first
    // sample; fall back to the smoothed RTT then.
    let this_min = if rtt_min == 0 || rtt_min == u32::MAX {
        srtt
    } else {
        rtt_min
    };
    Some(match prev {
        Some(p) => RttValue {
            srtt_us: srtt,
            min_rtt_us: if p.min_rtt_us == 0 || this_min < p.min_rtt_us {
                this_min
            } else {
                p.min_rtt_us
            },
            samples: p.samples.saturating_add(1),
            updated_ns: now_ns,
        },
        None => RttValue {
            srtt_us: srtt,
            min_rtt_us: this_min,
            samples: 1,
            updated_ns: now_ns,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `remote_port` as the kernel presents it on this machine.
    fn kernel_port(port: u16) -> u32 {
        let in_memory = u16::from_ne_bytes(port.to_be_bytes()) as u32;
        if cfg!(target_endian = "little") {
            in_memory << 16
        } else {
            in_memory
        }
    }

    /// An address field as the kernel presents it: the octets loaded as a
    /// native integer.
    fn kernel_word(octets: [u8; 4]) -> u32 {
        u32::from_ne_bytes(octets)
    }

    #[test]
    fn established_sockets_ask_for_rtt_callbacks_and_keep_other_flags() {
        for op in [ACTIVE_ESTABLISHED_CB, PASSIVE_ESTABLISHED_CB] {
            assert_eq!(action(op, 0), Action::EnableRtt { flags: RTT_CB_FLAG });
            // STATE_CB_FLAG (1 << 2), set by someone else, survives.
            assert_eq!(
                action(op, 1 << 2),
                Action::EnableRtt {
                    flags: (1 << 2) | RTT_CB_FLAG
                }
            );
            assert_eq!(action(op, RTT_CB_FLAG), Action::Ignore);
        }
    }

    #[test]
    fn rtt_callbacks_record_and_everything_else_is_ignored() {
        assert_eq!(action(RTT_CB, RTT_CB_FLAG), Action::Record);
        // Closing keeps the endpoint's entry: nothing is removed.
        assert_eq!(action(STATE_CB, RTT_CB_FLAG), Action::Ignore);
        for op in [0, 1, 2, 3, 6, 7, 8, 9, 11, 13, 14, 15] {
            assert_eq!(action(op, 0), Action::Ignore, "op {op}");
        }
    }

    #[test]
    fn ipv4_keys_carry_the_octets_and_host_order_port() {
        let k = key(
            AF_INET,
            kernel_word([10, 1, 2, 3]),
            [0; 4],
            kernel_port(8080),
        )
        .unwrap();
        assert_eq!(k, RttKey::ipv4([10, 1, 2, 3], 8080));
        // A port whose two bytes differ catches a missing or doubled swap.
        let k = key(
            AF_INET,
            kernel_word([127, 0, 0, 1]),
            [0; 4],
            kernel_port(0x1234),
        )
        .unwrap();
        assert_eq!(k.port, 0x1234);
    }

    #[test]
    fn ipv6_keys_carry_all_sixteen_octets() {
        let ip: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef,
        ];
        let words = [
            kernel_word([ip[0], ip[1], ip[2], ip[3]]),
            kernel_word([ip[4], ip[5], ip[6], ip[7]]),
            kernel_word([ip[8], ip[9], ip[10], ip[11]]),
            kernel_word([ip[12], ip[13], ip[14], ip[15]]),
        ];
        let k = key(AF_INET6, 0, words, kernel_port(443)).unwrap();
        assert_eq!(k, RttKey::new(ip, 443));
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        let k = key(
            AF_INET6,
            0,
            [0, 0, 0, kernel_word([0, 0, 0, 1])],
            kernel_port(9),
        )
        .unwrap();
        assert_eq!(k, RttKey::new(loopback, 9));
    }

    #[test]
    fn an_ipv6_socket_to_an_ipv4_peer_shares_the_ipv4_key() {
        let mapped = [
            0,
            0,
            kernel_word([0, 0, 0xff, 0xff]),
            kernel_word([192, 0, 2, 7]),
        ];
        let via_v6 = key(AF_INET6, 0, mapped, kernel_port(8000)).unwrap();
        let via_v4 = key(
            AF_INET,
            kernel_word([192, 0, 2, 7]),
            [0; 4],
            kernel_port(8000),
        )
        .unwrap();
        assert_eq!(via_v6, via_v4);
    }

    #[test]
    fn other_families_have_no_key() {
        assert_eq!(key(1, 0, [0; 4], 0), None);
    }

    #[test]
    fn the_updated_srtt_argument_wins_over_the_lagging_context_field() {
        assert_eq!(updated_srtt(8 * 90, 8 * 80), 8 * 80, "Linux 6.10+");
        assert_eq!(
            updated_srtt(8 * 90, 0),
            8 * 90,
            "older kernels pass no argument"
        );
    }

    #[test]
    fn srtt_is_unscaled_by_eight() {
        assert_eq!(srtt_us(8 * 250), 250);
        assert_eq!(srtt_us(8 * 250 + 7), 250);
    }

    #[test]
    fn samples_fold_into_the_endpoint_entry() {
        assert_eq!(update(None, 0, 0, 1), None, "no estimate yet is no sample");
        let first = update(None, 8 * 100, 90, 1_000).unwrap();
        assert_eq!(
            first,
            RttValue {
                srtt_us: 100,
                min_rtt_us: 90,
                samples: 1,
                updated_ns: 1_000
            }
        );
        // A slower socket to the same endpoint: srtt follows the latest,
        // the minimum keeps the lowest seen.
        let second = update(Some(&first), 8 * 300, 280, 2_000).unwrap();
        assert_eq!(
            (second.srtt_us, second.min_rtt_us, second.samples),
            (300, 90, 2)
        );
        let third = update(Some(&second), 8 * 70, 60, 3_000).unwrap();
        assert_eq!(
            (third.min_rtt_us, third.samples, third.updated_ns),
            (60, 3, 3_000)
        );
    }

    #[test]
    fn a_missing_kernel_minimum_falls_back_to_the_smoothed_rtt() {
        assert_eq!(update(None, 8 * 40, 0, 1).unwrap().min_rtt_us, 40);
        assert_eq!(update(None, 8 * 40, u32::MAX, 1).unwrap().min_rtt_us, 40);
    }
}
