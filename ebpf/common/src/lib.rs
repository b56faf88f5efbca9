//! What the sock_ops RTT program and the sidecar's loader must agree on: the
//! names of the program and its map, and the map's key and value layout.
//! Both sides compile this crate, so they agree by construction.
//!
//! The program's decision logic lives here too ([`sockops`]), written over
//! plain integers rather than the kernel context, so that plain `cargo test`
//! on the host covers what the BPF target cannot run.
//!
//! # Map layout
//!
//! `SWITCHYARD_RTT` is a `BPF_MAP_TYPE_LRU_HASH` of [`MAX_ENDPOINTS`] entries,
//! [`RttKey`] (20 bytes) → [`RttValue`] (24 bytes). One entry per remote
//! address and port; IPv4 peers are stored as IPv4-mapped IPv6 addresses
//! (`::ffff:a.b.c.d`), so a dual-stack socket talking to an IPv4 peer and a
//! plain IPv4 socket land on the same entry. LRU because the program also
//! sees passive (inbound) connections, whose remote ports are ephemeral:
//! old ones are evicted instead of filling the map.
#![no_std]
#![deny(unsafe_code)]

pub mod sockops;

/// Name of the sock_ops program in the object file (its function name).
pub const PROGRAM_NAME: &str = "switchyard_rtt";
/// Name of the map in the object file (its static's name).
pub const MAP_NAME: &str = "SWITCHYARD_RTT";
/// Capacity of the map. Endpoints a sidecar talks to are few; the rest of
/// the room absorbs inbound connections' ephemeral ports until LRU evicts them.
pub const MAX_ENDPOINTS: u32 = 4096;

/// A remote endpoint: address and port.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RttKey {
    /// IPv6 address in network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Port in host byte order.
    pub port: u16,
    /// Always zero. Explicit so no key byte is left uninitialised: the map
    /// hashes all 20 bytes, and the verifier refuses uninitialised stack.
    pub pad: u16,
}

impl RttKey {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self { addr, port, pad: 0 }
    }

    /// The key for an IPv4 peer (`addr` in network byte order, i.e. the
    /// octets as written): its IPv4-mapped IPv6 form.
    pub const fn ipv4(octets: [u8; 4], port: u16) -> Self {
        let [a, b, c, d] = octets;
        Self::new([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d], port)
    }
}

/// What the kernel measured towards one endpoint.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RttValue {
    /// Smoothed RTT in microseconds of the socket that reported last
    /// (the kernel's `srtt_us >> 3`, the same figure as TCP_INFO `tcpi_rtt`).
    pub srtt_us: u32,
    /// Lowest windowed minimum RTT (`tcpi_min_rtt`) seen on any socket to
    /// the endpoint, in microseconds.
    pub min_rtt_us: u32,
    /// RTT callbacks counted, i.e. RTT samples the kernel took.
    pub samples: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last update.
    pub updated_ns: u64,
}

// SAFETY: both types are `#[repr(C)]`, hold only integers (every bit
// pattern is valid) and have no implicit padding: RttKey is 16 + 2 + 2 = 20
// bytes with alignment 2, RttValue 4 + 4 + 8 + 8 = 24 bytes with alignment 8
// (checked by the size tests below).
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for RttKey {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for RttValue {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<RttKey>(), 20);
        assert_eq!(core::mem::align_of::<RttKey>(), 2);
        assert_eq!(core::mem::size_of::<RttValue>(), 24);
        assert_eq!(core::mem::align_of::<RttValue>(), 8);
    }

    #[test]
    fn ipv4_keys_are_ipv4_mapped() {
        let k = RttKey::ipv4([127, 0, 0, 1], 8080);
        assert_eq!(
            k.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
        assert_eq!((k.port, k.pad), (8080, 0));
    }
}
