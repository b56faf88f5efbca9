//! The gRPC link over TLS, end to end with real processes and a throwaway
//! PKI: a sidecar watches a TLS control plane when it trusts the CA and
//! cannot with another CA or in plain text; with mutual TLS, only a sidecar
//! presenting a certificate the control plane's client CA signed gets a
//! table; `switchyard admin` speaks TLS too.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{bin, pki, Mock};
use switchyard::cluster::{self, Proc};
use tokio::time::Instant;

struct Control {
    _mock: Mock,
    _proc: Proc,
    addr: SocketAddr,
}

async fn control(dir: &Path, tls: &[&str]) -> Control {
    let mock = Mock::start(dir, "onprem-a", "onprem", &[]).await;
    let policy = dir.join("policy.yaml");
    cluster::write_atomic(
        &policy,
        &common::policy_text(std::slice::from_ref(&mock), &[]),
    )
    .unwrap();
    let (proc, addr) = cluster::start_control(bin(), dir, &policy, "127.0.0.1:0", tls)
        .await
        .unwrap();
    Control {
        _mock: mock,
        _proc: proc,
        addr,
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A sidecar that must not get a table: it stays up, `/readyz` says not
/// ready, and its log names why (`reason`) within the deadline.
async fn refused(dir: &Path, name: &str, control: SocketAddr, tls: &[&str], reason: &str) {
    let http = reqwest::Client::new();
    let addr: SocketAddr = ([127, 0, 0, 1], cluster::free_port().unwrap()).into();
    let mut a = common::args(&[
        "sidecar",
        "--control",
        &control.to_string(),
        "--listen",
        &addr.to_string(),
    ]);
    a.extend(common::args(tls));
    let mut p = Proc::spawn(bin(), &a, dir, name).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while !p.log_text().contains(reason) {
        assert!(
            Instant::now() < end && !p.exited(),
            "{name}: no {reason:?} in its log:\n{}",
            common::log_tail(&p.log_text())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The control thread may log before the proxy listens: wait for it.
    let status = loop {
        match http.get(format!("http://{addr}/readyz")).send().await {
            Ok(r) => break r.status(),
            Err(e) => assert!(
                Instant::now() < end && !p.exited(),
                "{name}: no /readyz: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{name} got a table it should not have");
    p.kill().await.unwrap();
}

async fn admin_status(control: SocketAddr, tls: &[&str]) -> Result<String, String> {
    let mut a = common::args(&["admin", "status", "--control", &control.to_string()]);
    a.extend(common::args(tls));
    let out = tokio::process::Command::new(bin())
        .args(&a)
        .output()
        .await
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_watches_over_tls_only_when_it_trusts_the_control_planes_ca() {
    let dir = cluster::run_dir("tls-link").unwrap();
    let good = pki::issue(&dir, "good");
    let other = pki::issue(&dir, "other");
    let c = control(
        &dir,
        &[
            "--tls-cert",
            &s(&good.server_cert),
            "--tls-key",
            &s(&good.server_key),
        ],
    )
    .await;
    let http = reqwest::Client::new();

    let (_sidecar, addr) =
        cluster::start_sidecar(bin(), &dir, c.addr, &["--control-ca", &s(&good.ca)], &http)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let r = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": common::MODEL,
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    refused(
        &dir,
        "sidecar-other-ca",
        c.addr,
        &["--control-ca", &s(&other.ca)],
        "invalid peer certificate",
    )
    .await;
    refused(
        &dir,
        "sidecar-plain",
        c.addr,
        &[],
        "control plane unavailable",
    )
    .await;

    let status = admin_status(c.addr, &["--control-ca", &s(&good.ca)]).await;
    assert!(status.is_ok_and(|t| t.contains("onprem-a")));
    let e = admin_status(c.addr, &["--control-ca", &s(&other.ca)])
        .await
        .expect_err("an untrusted control plane");
    assert!(e.contains("invalid peer certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_only_a_sidecar_with_a_trusted_certificate_gets_a_table() {
    let dir = cluster::run_dir("mtls-link").unwrap();
    let good = pki::issue(&dir, "good");
    let other = pki::issue(&dir, "other");
    let c = control(
        &dir,
        &[
            "--tls-cert",
            &s(&good.server_cert),
            "--tls-key",
            &s(&good.server_key),
            "--client-ca",
            &s(&good.ca),
        ],
    )
    .await;
    let http = reqwest::Client::new();

    cluster::start_sidecar(
        bin(),
        &dir,
        c.addr,
        &[
            "--control-ca",
            &s(&good.ca),
            "--cert",
            &s(&good.client_cert),
            "--key",
            &s(&good.client_key),
        ],
        &http,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // No certificate, or one another CA signed: no table.
    refused(
        &dir,
        "sidecar-no-cert",
        c.addr,
        &["--control-ca", &s(&good.ca)],
        "control plane unavailable",
    )
    .await;
    refused(
        &dir,
        "sidecar-foreign-cert",
        c.addr,
        &[
            "--control-ca",
            &s(&good.ca),
            "--cert",
            &s(&other.client_cert),
            "--key",
            &s(&other.client_key),
        ],
        "control plane unavailable",
    )
    .await;
}
