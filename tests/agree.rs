//! The control plane and the sidecar agree on what is valid: whatever
//! policy the control plane accepts at load (parsing, validation, and the
//! TLS files it can read) renders a table every sidecar compiles. Checked
//! over generated endpoint URLs and TLS file settings, without processes:
//! the control plane's own parser and renderer, the sidecar's own
//! compiler. (Name resolution is the one check that cannot be known from
//! the policy; the addresses here are given.)

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use switchyard::cluster;
use switchyard_controlplane::routing;
use switchyard_controlplane::weights::Decision;
use switchyard_dataplane::metrics::Metrics;
use switchyard_dataplane::table::{Live, Table};
use switchyard_policy::Policy;

/// Files every case may name: a good PKI, a file that is not PEM, and one
/// of each kind where another belongs.
struct Files {
    pki: common::pki::Pki,
    junk: PathBuf,
}

fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = cluster::run_dir("agree").unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not PEM\n").unwrap();
        Files {
            pki: common::pki::issue(&dir, "agree"),
            junk,
        }
    })
}

/// Mostly `common`, sometimes any of `rare`: valid forms often enough that
/// many cases reach the sidecar, odd ones often enough to find a gap.
fn mostly(common: &'static str, rare: Vec<&'static str>) -> BoxedStrategy<&'static str> {
    prop_oneof![3 => Just(common), 1 => prop::sample::select(rare)].boxed()
}

fn url() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        2 => Just("https"),
        1 => prop::sample::select(vec!["http", "HTTPS", "ftp", "unix", ""]),
    ];
    let userinfo = mostly("", vec!["user@", "user:pw@", ":@"]);
    let host = prop::sample::select(vec![
        "127.0.0.1",
        "localhost",
        "[::1]",
        "api.example.com",
        "Example.COM.",
        "under_score.example",
        "xn--bcher-kva.example",
        "1.2.3",
        "a..b",
        "",
        "%41.example",
        "[fe80::1%25eth0]",
        "256.1.1.1",
    ]);
    let port = prop::sample::select(vec![
        "", ":0", ":1", ":80", ":443", ":8443", ":65535", ":65536", ":x",
    ]);
    let path = prop::sample::select(vec![
        "", "/", "/v1", "/openai/", "/a b", "/%7Euser", "//double",
    ]);
    let tail = mostly("", vec!["?q=1", "#frag", "?"]);
    (scheme, userinfo, host, port, path, tail)
        .prop_map(|(s, u, h, p, path, t)| format!("{s}://{u}{h}{p}{path}{t}"))
}

/// The lines of an endpoint's TLS fields: none, or a mix of the good
/// files, the junk file, a missing one, a relative path, a key where a
/// certificate belongs.
fn tls_lines() -> impl Strategy<Value = String> {
    let f = files();
    let s = |p: &PathBuf| p.display().to_string();
    let choices = |good: String| {
        prop_oneof![
            2 => Just(None),
            2 => Just(Some(good)),
            1 => prop::sample::select(vec![
                Some(s(&f.junk)),
                Some("/nonexistent/switchyard/file.pem".to_string()),
                Some("relative.pem".to_string()),
                Some(s(&f.pki.server_key)),
            ]),
        ]
    };
    let files = (
        choices(s(&f.pki.ca)),
        choices(s(&f.pki.client_cert)),
        choices(s(&f.pki.client_key)),
    )
        .prop_map(|(ca, cert, key)| {
            let mut out = String::new();
            for (field, v) in [("ca_file", ca), ("client_cert", cert), ("client_key", key)] {
                if let Some(v) = v {
                    out.push_str(&format!("    {field}: '{v}'\n"));
                }
            }
            out
        });
    prop_oneof![1 => Just(String::new()), 2 => files]
}

fn policy(url: &str, tls: &str) -> String {
    format!(
        "default_class: standard
endpoints:
  - name: e
    url: '{url}'
    tier: onprem
    models: [m]
    price: {{ input_per_mtok: 1, output_per_mtok: 2 }}
{tls}classes:
  - name: standard
"
    )
}

#[test]
fn a_policy_the_control_plane_accepts_builds_in_the_sidecar() {
    let accepted = AtomicUsize::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let addrs: HashMap<String, SocketAddr> =
        [("e".to_string(), SocketAddr::from(([127, 0, 0, 1], 9)))].into();
    runner
        .run(&(url(), tls_lines()), |(url, tls)| {
            let src = policy(&url, &tls);
            let Ok(p) = Policy::parse(&src) else {
                return Ok(());
            };
            // A file absent here is the sidecars' to judge (they live
            // elsewhere); the files that are here the control plane judged.
            match p.check_files(&src) {
                Ok(unchecked) if unchecked.is_empty() => {}
                _ => return Ok(()),
            }
            accepted.fetch_add(1, Ordering::Relaxed);
            let table = routing::table(&p, &Decision::default(), 1);
            let compiled = Table::compile(&table, &addrs, &Live::default(), &Metrics::new());
            prop_assert!(
                compiled.is_ok(),
                "accepted by the control plane, NACKed by a sidecar: {:?}\n{}",
                compiled.err(),
                src
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // The generators reach the accepted side often enough to test it.
    let accepted = accepted.into_inner();
    assert!(accepted >= 20, "only {accepted} of 512 policies accepted");
}

/// The generators reach both sides of the line: some policies are
/// accepted (https with each file kind among them), some refused.
#[test]
fn the_generated_forms_include_accepted_https_endpoints_with_tls_files() {
    let f = files();
    let s = |p: &PathBuf| p.display().to_string();
    let good = policy(
        "https://localhost:8443/v1x/",
        &format!(
            "    ca_file: '{}'\n    client_cert: '{}'\n    client_key: '{}'\n",
            s(&f.pki.ca),
            s(&f.pki.client_cert),
            s(&f.pki.client_key)
        ),
    );
    let p = Policy::parse(&good).unwrap();
    assert_eq!(p.check_files(&good), Ok(vec![]));
    let table = routing::table(&p, &Decision::default(), 1);
    let addrs = [("e".to_string(), SocketAddr::from(([127, 0, 0, 1], 9)))].into();
    let t = Table::compile(&table, &addrs, &Live::default(), &Metrics::new()).unwrap();
    assert_eq!(t.endpoints[0].authority, "localhost:8443");
    assert!(Policy::parse(&policy("https://u:p@localhost", "")).is_err());
}
