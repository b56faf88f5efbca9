//! Fan-out bench: one control plane process, 1,000 watching sidecar streams
//! (light in-process tonic clients, one TCP connection each, ACKing every
//! table as a sidecar does). Measures the time from a change (an admin kill
//! or revive, pushed at once; a policy file edit, picked up by the reload
//! poll) to the last ACK, both as the clients saw it and as the control
//! plane's registry records it, and the control plane's memory (VmRSS).
//!
//! Run: `cargo bench --bench fanout` (optionally `-- --sidecars N --rounds R`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use switchyard::cluster::{self, Proc};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::watch_request::Kind;
use tokio::sync::mpsc;

const TOKEN: &str = "fanout-bench";

/// Per client: the last version ACKed and when.
struct Acks {
    last: Vec<Mutex<(u64, Instant)>>,
    connected: AtomicUsize,
}

async fn sidecar(
    addr: String,
    i: usize,
    acks: Arc<Acks>,
) -> Result<(), Box<dyn std::error::Error>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = pb::routing_discovery_client::RoutingDiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::WatchRequest {
        kind: Some(Kind::Hello(pb::Hello {
            sidecar_id: format!("bench-{i:04}"),
            applied_version: 0,
        })),
    })
    .await?;
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut updates = client.watch(outbound).await?.into_inner();
    let mut first = true;
    while let Some(u) = updates.message().await? {
        let version = u.table.as_ref().map_or(0, |t| t.version);
        tx.send(pb::WatchRequest {
            kind: Some(Kind::Ack(pb::Ack {
                version,
                nonce: u.nonce,
            })),
        })
        .await?;
        *acks.last[i].lock() = (version, Instant::now());
        if first {
            first = false;
            acks.connected.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Adds the admin token to every call.
#[derive(Clone)]
struct Bearer;

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        Ok(r)
    }
}

type Admin = pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

async fn admin(addr: &str) -> Admin {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("admin connects");
    pb::admin_client::AdminClient::with_interceptor(channel, Bearer)
}

fn policy(mock_port: u16, deadline_ms: u32) -> String {
    format!(
        "\
default_class: standard
endpoints:
  - {{ name: a, url: 'http://127.0.0.1:{mock_port}', tier: onprem, models: [m], price: {{ input_per_mtok: 0, output_per_mtok: 0 }} }}
  - {{ name: b, url: 'http://127.0.0.1:{mock_port}', tier: burst, models: [m], price: {{ input_per_mtok: 1, output_per_mtok: 1 }} }}
classes:
  - {{ name: standard, deadline_ms: {deadline_ms} }}
"
    )
}

struct Round {
    to_last_ack: Duration,
    to_registry: Duration,
}

/// Waits until every client ACKed `version` or later; returns the latest
/// ACK instant and when the registry showed them all.
async fn settle(
    acks: &Acks,
    version: impl Fn() -> Option<u64>,
    start: Instant,
    admin: &mut Admin,
) -> Round {
    let deadline = start + Duration::from_secs(60);
    let v = loop {
        if let Some(v) = version() {
            break v;
        }
        assert!(Instant::now() < deadline, "no new version");
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    let last = loop {
        let mut last = start;
        let mut all = true;
        for a in &acks.last {
            let (av, at) = *a.lock();
            if av < v {
                all = false;
                break;
            }
            last = last.max(at);
        }
        if all {
            break last;
        }
        assert!(Instant::now() < deadline, "not all ACKed {v}");
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    let to_last_ack = last - start;
    loop {
        let s = admin
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        let n = s.sidecars.iter().filter(|c| c.acked_version >= v).count();
        if n >= acks.last.len() {
            break;
        }
        assert!(Instant::now() < deadline, "registry never saw all ACKs");
    }
    Round {
        to_last_ack,
        to_registry: start.elapsed(),
    }
}

fn summary(label: &str, rounds: &[Round]) {
    let mut a: Vec<_> = rounds.iter().map(|r| r.to_last_ack).collect();
    let mut b: Vec<_> = rounds.iter().map(|r| r.to_registry).collect();
    a.sort();
    b.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label:<34} last ACK: min {:>7.1} ms  median {:>7.1} ms  max {:>7.1} ms | all in registry: median {:>7.1} ms  max {:>7.1} ms",
        ms(a[0]),
        ms(a[a.len() / 2]),
        ms(a[a.len() - 1]),
        ms(b[b.len() / 2]),
        ms(b[b.len() - 1]),
    );
}

fn main() {
    let mut sidecars = 1000usize;
    let mut rounds = 5usize;
    let argv: Vec<String> = std::env::args().collect();
    for w in argv.windows(2) {
        match w[0].as_str() {
            "--sidecars" => sidecars = w[1].parse().expect("--sidecars N"),
            "--rounds" => rounds = w[1].parse().expect("--rounds N"),
            _ => {}
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(sidecars, rounds));
}

async fn run(n: usize, rounds: usize) {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_switchyard"));
    let dir = cluster::run_dir("fanout").expect("run dir");
    let policy_path = dir.join("policy.yaml");
    let mock_port = cluster::free_port().unwrap();
    cluster::write_atomic(&policy_path, &policy(mock_port, 30_000)).unwrap();
    let args: Vec<String> = [
        "control",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        policy_path.to_str().unwrap(),
        "--reload-ms",
        "100",
        "--interval-ms",
        "1000",
        "--state-dir",
        dir.join("state").to_str().unwrap(),
        "--admin-token",
        TOKEN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (control, addr) = Proc::spawn_announced(bin, &args, &dir, "control")
        .await
        .expect("control plane starts");
    let pid = control.pid().expect("pid");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = rss_kib(pid);

    let acks = Arc::new(Acks {
        last: (0..n).map(|_| Mutex::new((0, Instant::now()))).collect(),
        connected: AtomicUsize::new(0),
    });
    let t = Instant::now();
    for i in 0..n {
        let (addr, acks) = (addr.to_string(), acks.clone());
        tokio::spawn(async move {
            if let Err(e) = sidecar(addr, i, acks).await {
                eprintln!("sidecar {i}: {e}");
            }
        });
    }
    while acks.connected.load(Ordering::SeqCst) < n {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "clients did not all connect"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let connect_time = t.elapsed();
    let mut admin = admin(&addr.to_string()).await;
    // The registry sees every stream before the first change.
    loop {
        let s = admin
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.sidecars.iter().filter(|c| c.connected).count() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rss_connected = rss_kib(pid);

    let mut poller = admin.clone();

    let mut admin_rounds = vec![];
    for r in 0..rounds * 2 {
        let start = Instant::now();
        let req = pb::SwitchRequest {
            target: Some(pb::switch_request::Target::Endpoint("b".into())),
            actor: "bench".into(),
            reason: "fan-out bench".into(),
        };
        let reply = if r % 2 == 0 {
            admin.kill(req).await
        } else {
            admin.revive(req).await
        }
        .expect("admin call")
        .into_inner();
        let v = reply.table_version;
        admin_rounds.push(settle(&acks, || Some(v), start, &mut poller).await);
    }

    let mut edit_rounds = vec![];
    for r in 0..rounds {
        let before = acks.last[0].lock().0;
        let start = Instant::now();
        cluster::write_atomic(&policy_path, &policy(mock_port, 31_000 + r as u32)).unwrap();
        let acks2 = acks.clone();
        let version = move || {
            let v = acks2.last[0].lock().0;
            (v > before).then_some(v)
        };
        edit_rounds.push(settle(&acks, version, start, &mut poller).await);
    }
    let rss_after = rss_kib(pid);

    println!("\nfan-out: {n} watching sidecar streams on one control plane (pid {pid})");
    println!(
        "connect + first table ACKed by all: {:.0} ms",
        connect_time.as_secs_f64() * 1000.0
    );
    summary("admin kill/revive (pushed at once)", &admin_rounds);
    summary("policy file edit (100 ms poll)", &edit_rounds);
    println!(
        "control plane VmRSS: idle {:.1} MiB, {n} streams {:.1} MiB, after {} pushes {:.1} MiB ({:.1} KiB per stream)",
        rss_idle as f64 / 1024.0,
        rss_connected as f64 / 1024.0,
        admin_rounds.len() + edit_rounds.len(),
        rss_after as f64 / 1024.0,
        (rss_connected.saturating_sub(rss_idle)) as f64 / n as f64,
    );
    let _ = std::fs::remove_dir_all(&dir);
    drop(control);
}
