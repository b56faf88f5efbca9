//! TLS from the sidecar to https endpoints, end to end with real
//! processes and a throwaway PKI: a mock serving a certificate from a test
//! CA answers through the sidecar when the endpoint's `ca_file` names that
//! CA (streamed and not, over reused connections) and fails, with the
//! endpoint and the verification failure named, without it or when the
//! certificate is for another name; mutual TLS works with the client pair
//! and fails without; the control plane probes https endpoints with the
//! same files; and a policy naming TLS files a sidecar could not use is
//! refused at load, with field and line, so it is never pushed.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pki::{self, Pki};
use common::{bin, ControlConfig, Mock, Stack, MODEL};
use switchyard::cluster::{self, Proc};
use tokio::time::Instant;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A policy with one https endpoint on `mock` at `host` (the mock's port),
/// with `tls` (indented endpoint lines such as `    ca_file: ...\n`).
fn policy(mock: &Mock, host: &str, tls: &str) -> String {
    format!(
        "default_class: standard
endpoints:
  - name: {name}
    url: https://{host}:{port}
    tier: onprem
    models: [{MODEL}]
    price: {{ input_per_mtok: 1, output_per_mtok: 2 }}
{tls}classes:
  - name: standard
    ttft_timeout_ms: 5000
    deadline_ms: 30000
",
        name = mock.name,
        port = mock.addr.port(),
    )
}

fn ca_line(p: &Pki) -> String {
    format!("    ca_file: {}\n", s(&p.ca))
}

fn client_lines(p: &Pki) -> String {
    format!(
        "    client_cert: {}\n    client_key: {}\n",
        s(&p.client_cert),
        s(&p.client_key)
    )
}

/// Probes off: the sidecar's connections are then the only ones the mock
/// counts besides the test's own.
fn no_probes() -> ControlConfig {
    ControlConfig {
        extra: common::args(&["--probe-ms", "0"]),
        ..Default::default()
    }
}

/// A mock serving TLS with `p`'s server certificate (and requiring a
/// client certificate `p`'s CA signed, when `mtls`).
fn mock_args(p: &Pki, mtls: bool) -> Vec<String> {
    let mut a = common::args(&[
        "--tls-cert",
        &s(&p.server_cert),
        "--tls-key",
        &s(&p.server_key),
    ]);
    if mtls {
        a.extend(common::args(&["--client-ca", &s(&p.ca)]));
    }
    a
}

/// The test's own client for the mock's admin routes: trusts `p`'s CA and
/// presents its client certificate.
fn admin_client(p: &Pki) -> reqwest::Client {
    let ca = std::fs::read(&p.ca).unwrap();
    let mut id = std::fs::read(&p.client_cert).unwrap();
    id.extend(std::fs::read(&p.client_key).unwrap());
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(&id).unwrap())
        .build()
        .unwrap()
}

async fn start(label: &str, p: &Pki, mtls: bool, policy: impl FnOnce(&Mock) -> String) -> Stack {
    let args = mock_args(p, mtls);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Stack::start_with_control(
        label,
        &[("gpu", "onprem", args.as_slice())],
        |m| policy(&m[0]),
        &no_probes(),
        &[],
    )
    .await
}

/// The app's answer for a request that must fail: its status, and the
/// OpenAI-shaped error's message.
async fn failed(stack: &Stack) -> (u16, String) {
    let (status, _, body) = stack.chat(false).await;
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("not OpenAI-shaped error JSON ({e}): {body}"));
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {body}"))
        .to_string();
    (status, message)
}

/// Waits until the sidecar's log holds every one of `parts` on one line.
async fn logged(p: &Proc, parts: &[&str]) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let log = p.log_text();
        if log.lines().any(|l| parts.iter().all(|x| l.contains(x))) {
            return;
        }
        assert!(
            Instant::now() < end,
            "no line with {parts:?} in {}:\n{}",
            p.name,
            common::log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_ca_file_an_https_endpoint_answers_streamed_and_not_over_reused_connections() {
    let keys = cluster::run_dir("tls-endpoint-pki").unwrap();
    let p = pki::issue(&keys, "ep");
    let stack = start("tls-endpoint-ok", &p, false, |m| {
        policy(m, "127.0.0.1", &ca_line(&p))
    })
    .await;
    let mock = stack.mock("gpu");
    let admin = admin_client(&p);

    let (status, endpoint, body) = stack.chat(false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(endpoint, "gpu");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        common::mock_content(&admin, mock, id).await
    );
    let (status, _, body) = stack.chat(true).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chat.completion.chunk") && body.contains("data: [DONE]"));

    // Sequential requests reuse the sidecar's pooled TLS connection: the
    // mock completes far fewer handshakes than it serves requests (the
    // test's own admin client makes one more).
    for _ in 0..10 {
        let (status, _, body) = stack.chat(false).await;
        assert_eq!(status, 200, "{body}");
        let (status, _, body) = stack.chat(true).await;
        assert_eq!(status, 200, "{body}");
    }
    let stats = mock.stats(&admin).await;
    let (requests, handshakes) = (
        stats["requests"].as_u64().unwrap(),
        stats["tls_connections"].as_u64().unwrap(),
    );
    assert_eq!(requests, 22);
    assert!(
        handshakes <= 3,
        "{handshakes} TLS connections for {requests} requests: not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_ca_file_or_for_another_name_verification_fails_naming_endpoint_and_cause() {
    let keys = cluster::run_dir("tls-endpoint-pki").unwrap();
    let p = pki::issue(&keys, "ep");
    // Trusted by the system's roots? No: the test CA is in no store.
    let stack = start("tls-endpoint-unknown-ca", &p, false, |m| {
        policy(m, "127.0.0.1", "")
    })
    .await;
    let (status, message) = failed(&stack).await;
    assert_eq!(status, 503, "{message}");
    assert!(
        message.contains("\"gpu\"") && message.contains("UnknownIssuer"),
        "the app's error names the endpoint and the cause: {message}"
    );
    logged(
        &stack.sidecar,
        &[
            "TLS handshake with the endpoint failed",
            "gpu",
            "UnknownIssuer",
        ],
    )
    .await;
    assert_eq!(stack.mock("gpu").requests(&admin_client(&p)).await, 0);
    drop(stack);

    // The CA is trusted, but the certificate names another host.
    let other = pki::issue_for(&keys, "other-name", &["other.example"]);
    let stack = start("tls-endpoint-wrong-name", &other, false, |m| {
        policy(m, "127.0.0.1", &ca_line(&other))
    })
    .await;
    let (status, message) = failed(&stack).await;
    assert_eq!(status, 503, "{message}");
    assert!(
        message.contains("\"gpu\"") && message.contains("not valid for name"),
        "the app's error names the endpoint and the cause: {message}"
    );
    logged(
        &stack.sidecar,
        &[
            "TLS handshake with the endpoint failed",
            "gpu",
            "not valid for name",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_with_the_client_pair_and_fails_without() {
    let keys = cluster::run_dir("tls-endpoint-pki").unwrap();
    let p = pki::issue(&keys, "mtls");
    let tls = format!("{}{}", ca_line(&p), client_lines(&p));
    let stack = start("tls-endpoint-mtls", &p, true, |m| {
        policy(m, "localhost", &tls)
    })
    .await;
    for stream in [false, true] {
        let (status, endpoint, body) = stack.chat(stream).await;
        assert_eq!((status, endpoint.as_str()), (200, "gpu"), "{body}");
    }
    drop(stack);

    let stack = start("tls-endpoint-mtls-none", &p, true, |m| {
        policy(m, "localhost", &ca_line(&p))
    })
    .await;
    let (status, message) = failed(&stack).await;
    // TLS 1.3 finishes the client's side of the handshake before the server
    // judges its certificate: the refusal arrives as an alert on the first
    // read.
    assert_eq!(status, 502, "{message}");
    assert!(
        message.contains("CertificateRequired") && message.contains("endpoint \"gpu\""),
        "the app's error says which endpoint wanted a certificate: {message}"
    );
    assert_eq!(stack.mock("gpu").requests(&admin_client(&p)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_probes_https_endpoints_with_their_tls_files() {
    let keys = cluster::run_dir("tls-endpoint-pki").unwrap();
    let p = pki::issue(&keys, "probe");
    let args = mock_args(&p, true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tls = format!("{}{}", ca_line(&p), client_lines(&p));
    let stack = Stack::start_with_control(
        "tls-endpoint-probe",
        &[("gpu", "onprem", args.as_slice())],
        |m| policy(&m[0], "127.0.0.1", &tls),
        &ControlConfig {
            extra: common::args(&["--probe-ms", "200"]),
            ..Default::default()
        },
        &[],
    )
    .await;
    stack
        .eventually("an https probe passes", Duration::from_secs(20), |s| {
            (common::endpoint(s, "gpu").probe == "ok").then_some(())
        })
        .await;
    let models = stack.mock("gpu").stats(&admin_client(&p)).await["models"]
        .as_u64()
        .unwrap();
    assert!(models > 0, "the probes went to the mock");
}

/// Runs `switchyard control` on `policy`; it must exit non-zero at load,
/// before listening, with every one of `says` in its log.
async fn refused_at_load(dir: &Path, label: &str, policy: &str, says: &[&str]) {
    let file = dir.join(format!("{label}.yaml"));
    cluster::write_atomic(&file, policy).unwrap();
    let a = common::args(&[
        "control",
        "--policy",
        &s(&file),
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &s(&dir.join(format!("{label}-state"))),
    ]);
    let mut p = Proc::spawn(bin(), &a, dir, label).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), p.wait())
        .await
        .expect("the control plane exits at load")
        .unwrap();
    let log = p.log_text();
    assert!(!status.success(), "{label}: accepted:\n{log}");
    for x in says {
        assert!(log.contains(x), "{label}: no {x:?} in:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_a_sidecar_could_not_use_are_refused_at_load_with_field_and_line() {
    let dir = cluster::run_dir("tls-endpoint-refused").unwrap();
    let p = pki::issue(&dir, "ep");
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let endpoint = |url: &str, tls: &str| {
        format!(
            "default_class: standard
endpoints:
  - name: gpu
    url: {url}
    tier: onprem
    models: [{MODEL}]
    price: {{ input_per_mtok: 1, output_per_mtok: 2 }}
{tls}classes:
  - name: standard
"
        )
    };
    // Line 8 is the first line after `price`.
    refused_at_load(
        &dir,
        "ca-file-on-http",
        &endpoint("http://127.0.0.1:1", &ca_line(&p)),
        &["line 8", "endpoints[0].ca_file", "https"],
    )
    .await;
    refused_at_load(
        &dir,
        "cert-without-key",
        &endpoint(
            "https://127.0.0.1:1",
            &format!("    client_cert: {}\n", s(&p.client_cert)),
        ),
        &["line 8", "endpoints[0].client_cert", "client_key"],
    )
    .await;
    refused_at_load(
        &dir,
        "unreadable-ca-file",
        &endpoint(
            "https://127.0.0.1:1",
            &format!("    ca_file: {}\n", s(&junk)),
        ),
        &["line 8", "endpoints[0].ca_file", "no PEM certificate"],
    )
    .await;
    refused_at_load(
        &dir,
        "key-of-another-cert",
        &endpoint(
            "https://127.0.0.1:1",
            &format!(
                "    client_cert: {}\n    client_key: {}\n",
                s(&p.client_cert),
                s(&p.server_key)
            ),
        ),
        &["line 9", "endpoints[0].client_key", "does not belong"],
    )
    .await;
    refused_at_load(
        &dir,
        "credentials-in-url",
        &endpoint("https://user:pw@127.0.0.1:1", ""),
        &["line 4", "endpoints[0].url"],
    )
    .await;
}
