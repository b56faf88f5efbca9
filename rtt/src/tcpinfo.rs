//! The fallback RTT source: `TCP_INFO` read from sockets the sidecar hands
//! over, keeping the latest reading per peer. Works without privileges or a
//! BPF toolchain, but only sees the sidecar's own connections, and only
//! when it is shown them.
#![forbid(unsafe_code)]

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::{normalise, sys, RttSample, RttSource};

/// How often a pooled connection to the same peer is read again; fresh
/// connections are always read.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Reading {
    srtt_us: u32,
    min_rtt_us: u32,
    reads: u64,
    at: Instant,
}

/// Latest `TCP_INFO` RTT per peer.
#[derive(Debug)]
pub struct TcpInfoRtt {
    peers: Mutex<HashMap<SocketAddr, Reading>>,
    interval: Duration,
}

impl Default for TcpInfoRtt {
    fn default() -> Self {
        Self::new(DEFAULT_INTERVAL)
    }
}

impl TcpInfoRtt {
    /// A source that re-reads a pooled connection to a peer at most once
    /// per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            peers: Mutex::new(HashMap::new()),
            interval,
        }
    }

    /// Reads `TCP_INFO` from `fd`, a connected TCP socket to `peer`, now,
    /// and keeps it as the peer's latest reading. A socket with no RTT
    /// estimate yet (0) is not a reading.
    pub fn read(&self, fd: RawFd, peer: SocketAddr) -> std::io::Result<()> {
        let info = sys::tcp_info(fd)?;
        if info.rtt_us == 0 {
            return Ok(());
        }
        let peer = normalise(peer);
        let mut peers = self.peers.lock();
        let reads = peers.get(&peer).map_or(0, |r| r.reads) + 1;
        let min_rtt_us = match (info.min_rtt_us, peers.get(&peer)) {
            // The kernel's own windowed minimum, for this socket.
            (Some(m), _) if m != 0 && m != u32::MAX => m,
            // Older kernels: the lowest smoothed RTT seen.
            (_, Some(r)) => r.min_rtt_us.min(info.rtt_us),
            _ => info.rtt_us,
        };
        peers.insert(
            peer,
            Reading {
                srtt_us: info.rtt_us,
                min_rtt_us,
                reads,
                at: Instant::now(),
            },
        );
        Ok(())
    }

    /// Whether a pooled connection to `peer` is due for a read.
    fn due(&self, peer: SocketAddr) -> bool {
        let peers = self.peers.lock();
        peers
            .get(&normalise(peer))
            .is_none_or(|r| r.at.elapsed() >= self.interval)
    }
}

impl RttSource for TcpInfoRtt {
    fn rtt(&self, peer: SocketAddr) -> Option<RttSample> {
        let peers = self.peers.lock();
        peers.get(&normalise(peer)).map(|r| RttSample {
            srtt: Duration::from_micros(r.srtt_us.into()),
            min_rtt: Duration::from_micros(r.min_rtt_us.into()),
            samples: r.reads,
            age: r.at.elapsed(),
        })
    }

    fn source(&self) -> &'static str {
        crate::SOURCE_TCP_INFO
    }

    fn observe(&self, fd: RawFd, peer: SocketAddr, fresh: bool) {
        if fresh || self.due(peer) {
            if let Err(e) = self.read(fd, peer) {
                tracing::debug!(%peer, error = %e, "reading TCP_INFO failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// A connected pair on loopback after `rounds` request/response
    /// exchanges, so the client socket has RTT samples.
    fn exchanged(addr: &str, rounds: usize) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind(addr).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut b = [0u8; 1];
        for _ in 0..rounds {
            client.write_all(b"?").unwrap();
            server.read_exact(&mut b).unwrap();
            server.write_all(b"!").unwrap();
            client.read_exact(&mut b).unwrap();
        }
        (client, server)
    }

    #[test]
    fn reads_rtt_for_a_loopback_connection() {
        let (client, _server) = exchanged("127.0.0.1:0", 5);
        let peer = client.peer_addr().unwrap();
        let src = TcpInfoRtt::default();
        assert!(src.rtt(peer).is_none());
        src.observe(client.as_raw_fd(), peer, true);
        let s = src.rtt(peer).expect("a reading");
        assert!(
            s.srtt > Duration::ZERO && s.srtt < Duration::from_secs(1),
            "{s:?}"
        );
        assert!(
            s.min_rtt > Duration::ZERO && s.min_rtt < Duration::from_secs(1),
            "{s:?}"
        );
        assert_eq!(s.samples, 1);
        assert_eq!(src.source(), "tcp-info");
        // The same socket, read straight: the stored figure is the kernel's.
        assert_eq!(
            u128::from(sys::tcp_info(client.as_raw_fd()).unwrap().rtt_us),
            s.srtt.as_micros()
        );
    }

    #[test]
    fn pooled_connections_are_reread_only_when_due() {
        let (client, _server) = exchanged("[::1]:0", 2);
        let peer = client.peer_addr().unwrap();
        let src = TcpInfoRtt::new(Duration::from_secs(3600));
        src.observe(client.as_raw_fd(), peer, false);
        src.observe(client.as_raw_fd(), peer, false);
        assert_eq!(
            src.rtt(peer).unwrap().samples,
            1,
            "not due again within the interval"
        );
        src.observe(client.as_raw_fd(), peer, true);
        assert_eq!(
            src.rtt(peer).unwrap().samples,
            2,
            "fresh connections are always read"
        );
    }

    #[test]
    fn ipv4_mapped_peers_are_the_ipv4_peer() {
        let (client, _server) = exchanged("127.0.0.1:0", 1);
        let peer = client.peer_addr().unwrap();
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", peer.port())
            .parse()
            .unwrap();
        let src = TcpInfoRtt::default();
        src.observe(client.as_raw_fd(), mapped, true);
        assert!(src.rtt(peer).is_some());
    }

    #[test]
    fn a_non_socket_leaves_no_reading() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let src = TcpInfoRtt::default();
        src.observe(f.as_raw_fd(), peer, true);
        assert!(src.rtt(peer).is_none());
    }
}
