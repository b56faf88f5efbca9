//! The eBPF RTT source against the real kernel: the program attaches to a
//! cgroup v2 this test binary creates and moves itself into, loopback
//! connections made from it land in the map under the right address and
//! port with the RTT TCP_INFO reports for the same socket, and the program
//! is gone from the cgroup after a drop and after an attaching process is
//! killed.
//!
//! Where this machine cannot load eBPF (no object built, no cgroup v2, no
//! privileges) each test prints `SKIPPED` with its name and the reason and
//! returns; `SWITCHYARD_REQUIRE_EBPF=1` (set by CI) turns that into a
//! failure, so CI cannot pass without running them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use switchyard_rtt::{cgroup, EbpfRtt, RttSource, TcpInfoRtt};

/// How far the map's smoothed RTT may be from `tcpi_rtt` of the same
/// socket, in microseconds. Both are `tp->srtt_us >> 3`: the program copies
/// it in the RTT callback that follows every update, and after the last
/// round trip nothing the client sends is left to be acknowledged, so they
/// should be equal. The slack covers one stray sample landing between the
/// two reads (a loopback sample moves srtt by an eighth of the difference
/// to a ~10-100 µs RTT), while a missed `>> 3` (8x) or a reading from the
/// wrong socket would still be far outside it.
const TOLERANCE_US: u32 = 5;
/// Request/response exchanges per connection, so the kernel has taken
/// RTT samples after the handshake (the first one, from the SYN-ACK, comes
/// before the program asks for callbacks).
const ROUNDS: usize = 20;

/// The cgroup these tests run in, created and joined once per test binary.
fn test_cgroup() -> Result<PathBuf, String> {
    static CGROUP: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CGROUP
        .get_or_init(|| {
            let mount = cgroup::mount_point().map_err(|e| e.to_string())?;
            // Earlier runs' cgroups are empty once their test binary
            // exited; remove them. Busy ones (a run in progress) stay.
            if let Ok(entries) = std::fs::read_dir(&mount) {
                for e in entries.flatten() {
                    if e.file_name()
                        .to_string_lossy()
                        .starts_with("switchyard-rtt-test-")
                    {
                        let _ = cgroup::remove(&e.path());
                    }
                }
            }
            let name = format!("switchyard-rtt-test-{}", std::process::id());
            let path = cgroup::create(&mount, &name).map_err(|e| e.to_string())?;
            cgroup::join(&path, 0).map_err(|e| e.to_string())?;
            Ok(path)
        })
        .clone()
}

/// The test cgroup, or `None` after saying the test is skipped and why.
fn ebpf_env(test: &str) -> Option<PathBuf> {
    let reason = match switchyard_rtt::ebpf_unavailable() {
        Some(r) => r,
        None => match test_cgroup() {
            Ok(p) => return Some(p),
            Err(e) => e,
        },
    };
    if std::env::var_os("SWITCHYARD_REQUIRE_EBPF").is_some_and(|v| v == "1") {
        panic!("{test}: SWITCHYARD_REQUIRE_EBPF=1 but eBPF is unavailable: {reason}");
    }
    // Straight to stderr: the harness captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "test {test} ... SKIPPED: eBPF unavailable: {reason}"
    );
    None
}

/// A loopback connection to a fresh listener on `bind`, connected to
/// `connect_to` (the listener's address unless given), after `ROUNDS`
/// request/response exchanges.
struct Exchange {
    listener: SocketAddr,
    client: TcpStream,
    server: TcpStream,
}

fn exchange(bind: &str, connect_to: Option<&dyn Fn(u16) -> SocketAddr>) -> Exchange {
    let listener = TcpListener::bind(bind).unwrap();
    let addr = listener.local_addr().unwrap();
    let target = connect_to.map_or(addr, |f| f(addr.port()));
    let mut client = TcpStream::connect(target).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..ROUNDS {
        client.write_all(&[b'?'; 64]).unwrap();
        server.read_exact(&mut buf).unwrap();
        server.write_all(&[b'!'; 64]).unwrap();
        client.read_exact(&mut buf).unwrap();
    }
    Exchange {
        listener: addr,
        client,
        server,
    }
}

fn assert_agrees_with_tcp_info(rtt: &EbpfRtt, peer: SocketAddr, client: &TcpStream) {
    let info = switchyard_rtt::tcp_info(client.as_raw_fd()).unwrap();
    let entry = rtt
        .entry(peer)
        .unwrap()
        .unwrap_or_else(|| panic!("no map entry for {peer}; map holds {:?}", rtt.snapshot()));
    let _ = writeln!(
        std::io::stderr(),
        "{peer}: map srtt {} µs min {} µs samples {}; TCP_INFO rtt {} µs min {:?} µs",
        entry.srtt_us,
        entry.min_rtt_us,
        entry.samples,
        info.rtt_us,
        info.min_rtt_us
    );
    assert!(entry.samples >= 1, "{entry:?}");
    assert!(
        entry.srtt_us.abs_diff(info.rtt_us) <= TOLERANCE_US,
        "map srtt {} µs vs TCP_INFO {} µs for {peer} (tolerance {TOLERANCE_US} µs)",
        entry.srtt_us,
        info.rtt_us
    );
    if let Some(min) = info.min_rtt_us {
        assert!(
            entry.min_rtt_us.abs_diff(min) <= TOLERANCE_US,
            "map min {} µs vs TCP_INFO {min} µs",
            entry.min_rtt_us
        );
    }
    // The trait view says the same, labelled as eBPF.
    let s = rtt.rtt(peer).unwrap();
    assert_eq!(s.srtt.as_micros(), u128::from(entry.srtt_us));
    assert_eq!(rtt.source(), "ebpf");
    // And the TCP_INFO source, shown the same socket, reads the kernel's figure.
    let tcp = TcpInfoRtt::default();
    tcp.observe(client.as_raw_fd(), peer, true);
    let t = tcp.rtt(peer).unwrap();
    assert!(t.srtt.as_micros().abs_diff(u128::from(info.rtt_us)) <= u128::from(TOLERANCE_US));
}

#[test]
fn ebpf_ipv4_loopback_entry_matches_tcp_info() {
    let Some(cg) = ebpf_env("ebpf_ipv4_loopback_entry_matches_tcp_info") else {
        return;
    };
    let rtt = EbpfRtt::attach(Some(&cg)).unwrap();
    assert!(cgroup::attached_sock_ops(&cg)
        .unwrap()
        .contains(&rtt.program_id()));
    let x = exchange("127.0.0.1:0", None);
    assert_agrees_with_tcp_info(&rtt, x.listener, &x.client);
    // Exactly that port: not its byte-swapped twin.
    let swapped = SocketAddr::new(x.listener.ip(), x.listener.port().swap_bytes());
    if swapped != x.listener {
        assert_eq!(rtt.entry(swapped).unwrap(), None);
    }
    // The accepted side is measured too, under the client's port.
    let client_port = x.client.local_addr().unwrap();
    assert!(
        rtt.entry(client_port).unwrap().is_some(),
        "passive side of {client_port}"
    );
    // Closing the connection keeps the endpoint's entry: the last RTT stays
    // known until the next connection or LRU eviction. (On loopback the
    // FIN exchange runs within the close calls, so this mostly sees the
    // sockets already closed; it guards against deleting on close.)
    drop(x.server);
    drop(x.client);
    assert!(rtt.entry(x.listener).unwrap().is_some());
}

#[test]
fn ebpf_ipv6_loopback_entry_is_keyed_by_the_ipv6_address() {
    let Some(cg) = ebpf_env("ebpf_ipv6_loopback_entry_is_keyed_by_the_ipv6_address") else {
        return;
    };
    let rtt = EbpfRtt::attach(Some(&cg)).unwrap();
    let x = exchange("[::1]:0", None);
    assert!(x.listener.is_ipv6());
    assert_agrees_with_tcp_info(&rtt, x.listener, &x.client);
    let found: Vec<SocketAddr> = rtt.snapshot().into_iter().map(|(a, _)| a).collect();
    assert!(found.contains(&x.listener), "{found:?}");
}

#[test]
fn ebpf_ipv6_socket_to_an_ipv4_peer_lands_on_the_ipv4_entry() {
    let Some(cg) = ebpf_env("ebpf_ipv6_socket_to_an_ipv4_peer_lands_on_the_ipv4_entry") else {
        return;
    };
    let rtt = EbpfRtt::attach(Some(&cg)).unwrap();
    let mapped =
        |port: u16| -> SocketAddr { format!("[::ffff:127.0.0.1]:{port}").parse().unwrap() };
    let x = exchange("127.0.0.1:0", Some(&mapped));
    assert!(
        x.client.peer_addr().unwrap().is_ipv6(),
        "an AF_INET6 client socket"
    );
    assert_agrees_with_tcp_info(&rtt, x.listener, &x.client);
}

#[test]
fn ebpf_program_is_detached_on_drop() {
    let Some(cg) = ebpf_env("ebpf_program_is_detached_on_drop") else {
        return;
    };
    let a = EbpfRtt::attach(Some(&cg)).unwrap();
    let b = EbpfRtt::attach(Some(&cg)).unwrap();
    let (ida, idb) = (a.program_id(), b.program_id());
    let attached = cgroup::attached_sock_ops(&cg).unwrap();
    assert!(
        attached.contains(&ida) && attached.contains(&idb),
        "{attached:?}"
    );
    drop(a);
    let attached = cgroup::attached_sock_ops(&cg).unwrap();
    assert!(
        !attached.contains(&ida) && attached.contains(&idb),
        "{attached:?}"
    );
    b.detach().unwrap();
    assert!(!cgroup::attached_sock_ops(&cg).unwrap().contains(&idb));
}

#[test]
fn ebpf_program_is_detached_when_the_attaching_process_is_killed() {
    let Some(cg) = ebpf_env("ebpf_program_is_detached_when_the_attaching_process_is_killed") else {
        return;
    };
    // This test binary again, running only the helper below, which attaches
    // and then waits on its stdin forever.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_hold_attachment",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLD_ENV, &cg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let id: u32 = loop {
        let line = lines
            .next()
            .expect("the helper exited before attaching")
            .unwrap();
        // The harness prints `test helper_hold_attachment ... ` on the
        // same line before the helper's own output.
        if let Some((_, id)) = line.split_once("attached program ") {
            break id.trim().parse().unwrap();
        }
        assert!(
            !line.contains("FAILED") && !line.contains("panicked"),
            "helper: {line}"
        );
    };
    assert!(cgroup::attached_sock_ops(&cg).unwrap().contains(&id));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    // The kernel closed the helper's descriptors before reporting it dead,
    // and the link went with the last one.
    let attached = cgroup::attached_sock_ops(&cg).unwrap();
    assert!(
        !attached.contains(&id),
        "program {id} still attached: {attached:?}"
    );
}

const HOLD_ENV: &str = "SWITCHYARD_RTT_TEST_HOLD_CGROUP";

/// Not a test: the child process of the test above. Attaches to the cgroup
/// in `HOLD_ENV`, reports the program's ID, and blocks until killed.
#[test]
#[ignore = "helper process for ebpf_program_is_detached_when_the_attaching_process_is_killed"]
fn helper_hold_attachment() {
    let Some(cg) = std::env::var_os(HOLD_ENV) else {
        return;
    };
    let rtt = EbpfRtt::attach(Some(PathBuf::from(cg).as_path())).unwrap();
    println!("attached program {}", rtt.program_id());
    std::io::stdout().flush().unwrap();
    // Blocks until the parent kills us; it never writes or closes stdin.
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    panic!("stdin closed before the parent killed this helper");
}

#[test]
fn this_process_runs_in_the_test_cgroup() {
    let Some(cg) = ebpf_env("this_process_runs_in_the_test_cgroup") else {
        return;
    };
    assert_eq!(cgroup::own().unwrap(), cg);
    assert!(cgroup::own_is_within(&cg));
    assert!(cgroup::own_is_within(&cgroup::mount_point().unwrap()));
}
