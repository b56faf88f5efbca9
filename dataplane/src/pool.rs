//! Idle upstream connections, kept per endpoint for the next request.
//!
//! pingora's connector pool spawns a task per released connection to watch
//! it while idle, and checks a reused one's peer with a `getpeername`; at a
//! request per connection use that is a task, a lock handoff and a system
//! call per request. Here an idle connection waits in its endpoint's list;
//! taking it checks, without blocking and usually without a system call
//! (tokio knows the socket has not become readable), that the provider did
//! not close it meanwhile. Connecting is still pingora's `TransportConnector`
//! (timeouts, socket options, TLS).

use std::time::{Duration, Instant};

use futures::FutureExt;
use parking_lot::Mutex;
use pingora::connectors::TransportConnector;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use tokio::io::AsyncReadExt;

/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per endpoint; more are closed when released.
pub const MAX_IDLE: usize = 64;

/// One endpoint's idle connections, newest last.
#[derive(Default)]
pub struct Idle {
    conns: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Idle({})", self.len())
    }
}

struct Conn {
    /// The peer it is connected to (address, TLS settings): a table can
    /// move an endpoint's name to another address.
    key: u64,
    since: Instant,
    stream: Stream,
}

impl Idle {
    /// Idle connections held now.
    pub fn len(&self) -> usize {
        self.conns.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most recently used idle connection to `peer` still open, if any.
    fn take(&self, key: u64, now: Instant) -> Option<Stream> {
        loop {
            let conn = {
                let mut c = self.conns.lock();
                let i = c.iter().rposition(|c| c.key == key)?;
                c.swap_remove(i)
            };
            let mut stream = conn.stream;
            if now.saturating_duration_since(conn.since) < IDLE_TIMEOUT && still_open(&mut stream) {
                return Some(stream);
            }
        }
    }

    fn put(&self, key: u64, stream: Stream, now: Instant) {
        let mut c = self.conns.lock();
        c.retain(|c| now.saturating_duration_since(c.since) < IDLE_TIMEOUT);
        if c.len() < MAX_IDLE {
            c.push(Conn {
                key,
                since: now,
                stream,
            });
        }
    }

    /// Closes connections idle for longer than [`IDLE_TIMEOUT`].
    pub fn sweep(&self, now: Instant) {
        let expired: Vec<Conn> = {
            let mut c = self.conns.lock();
            let (keep, expired) = std::mem::take(&mut *c)
                .into_iter()
                .partition(|c| now.saturating_duration_since(c.since) < IDLE_TIMEOUT);
            *c = keep;
            expired
        };
        drop(expired);
    }
}

/// Whether an idle connection is still open and quiet: a provider that
/// closed it (or, wrongly, sent something) makes it unusable. Over TLS the
/// read goes through rustls: messages that carry no data (TLS 1.3 session
/// tickets) are consumed and leave it quiet; a close_notify or a bare FIN
/// ends the read at once, so the connection is dropped.
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    // A read that is not ready at once means open and quiet; `unconstrained`
    // so tokio's cooperative budget cannot make a ready read look pending.
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

/// Connects to endpoints, reusing idle connections.
pub struct Connections {
    connector: TransportConnector,
}

impl Connections {
    pub fn new(connector: TransportConnector) -> Self {
        Self { connector }
    }

    /// A connection to `peer`: an idle one from `idle`, else a new one.
    /// The flag says whether it was reused.
    pub async fn get(&self, idle: &Idle, peer: &HttpPeer) -> pingora::Result<(Stream, bool)> {
        if let Some(s) = idle.take(peer.reuse_hash(), Instant::now()) {
            return Ok((s, true));
        }
        self.connector.new_stream(peer).await.map(|s| (s, false))
    }

    /// Keeps `stream` (whose last exchange ended cleanly) for reuse.
    pub fn release(&self, idle: &Idle, peer: &HttpPeer, stream: Stream) {
        idle.put(peer.reuse_hash(), stream, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    /// A connected client and server on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), l.accept());
        (client.unwrap(), server.unwrap().0)
    }

    fn stream(c: TcpStream) -> Stream {
        Box::new(pingora::protocols::l4::stream::Stream::from(c))
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_newest_first_and_only_for_its_peer() {
        let idle = Idle::default();
        let now = Instant::now();
        let ((a, _sa), (b, _sb)) = (pair().await, pair().await);
        let (a, b) = (stream(a), stream(b));
        let (a_id, b_id) = (a.id(), b.id());
        idle.put(1, a, now);
        idle.put(1, b, now);
        assert!(idle.take(2, now).is_none(), "another peer's connection");
        assert_eq!(idle.take(1, now).map(|s| s.id()), Some(b_id));
        assert_eq!(idle.take(1, now).map(|s| s.id()), Some(a_id));
        assert!(idle.take(1, now).is_none() && idle.is_empty());
    }

    #[tokio::test]
    async fn closed_chatty_or_expired_connections_are_never_handed_out() {
        let idle = Idle::default();
        let now = Instant::now();
        // Closed by the provider: once the FIN is in, the socket is readable.
        let (closed, server) = pair().await;
        drop(server);
        closed.readable().await.unwrap();
        idle.put(1, stream(closed), now);
        assert!(idle.take(1, now).is_none(), "closed by the provider");
        // Data on an idle connection: not a clean HTTP/1.1 exchange.
        let (chatty, mut server) = pair().await;
        server.write_all(b"x").await.unwrap();
        chatty.readable().await.unwrap();
        idle.put(1, stream(chatty), now);
        assert!(idle.take(1, now).is_none(), "sent data while idle");
        // Kept past the idle timeout.
        let (old, _server) = pair().await;
        idle.put(1, stream(old), now);
        assert!(idle.take(1, now + IDLE_TIMEOUT).is_none(), "idle too long");
        // A quiet open one is handed out.
        let (quiet, _server) = pair().await;
        idle.put(1, stream(quiet), now);
        assert!(idle.take(1, now).is_some());
    }

    /// A TLS connection from the pool, its TLS 1.3 session tickets
    /// received while idle, is quiet and reused; once the provider closes
    /// it (close_notify, then FIN) and that is seen, it is never handed
    /// out.
    #[tokio::test]
    async fn pooled_tls_connections_are_reused_until_the_provider_closes_them() {
        use pingora::upstreams::peer::HttpPeer;
        use pingora::utils::tls::{parse_x509, WrappedX509};
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        use std::sync::Arc;
        use tokio::io::AsyncReadExt;

        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        let mut peer = HttpPeer::new(addr, true, "127.0.0.1".to_string());
        let ca: Vec<WrappedX509> = vec![WrappedX509::new(ca.der().to_vec(), parse_x509)];
        peer.options.ca = Some(Arc::from(ca));
        let connections = Connections::new(TransportConnector::new(None));
        let idle = Idle::default();
        let (client, server) = tokio::join!(connections.get(&idle, &peer), async {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await
        });
        let (mut client, reused) = client.unwrap();
        let mut server = server.unwrap();
        assert!(!reused);
        // One exchange: the server's post-handshake messages (session
        // tickets) come before its answer, so the client has them now.
        let mut buf = [0u8; 4];
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");

        connections.release(&idle, &peer, client);
        let (client, reused) = connections.get(&idle, &peer).await.unwrap();
        assert!(reused, "a quiet TLS connection is reused");
        connections.release(&idle, &peer, client);

        server.shutdown().await.unwrap();
        drop(server);
        // Until tokio has seen the socket readable the connection looks
        // quiet; from then on it is refused.
        let end = Instant::now() + Duration::from_secs(10);
        while let Some(s) = idle.take(peer.reuse_hash(), Instant::now()) {
            assert!(Instant::now() < end, "a closed TLS connection handed out");
            idle.put(peer.reuse_hash(), s, Instant::now());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(idle.is_empty());
    }

    #[tokio::test]
    async fn the_list_is_bounded_and_swept() {
        let idle = Idle::default();
        let now = Instant::now();
        let mut servers = Vec::new();
        for _ in 0..MAX_IDLE + 3 {
            let (c, s) = pair().await;
            servers.push(s);
            idle.put(1, stream(c), now);
        }
        assert_eq!(idle.len(), MAX_IDLE);
        idle.sweep(now + IDLE_TIMEOUT);
        assert!(idle.is_empty());
    }
}
