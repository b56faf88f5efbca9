//! The admin API in process, over a real socket: the token, validation of
//! each call, and that every change lands in the audit log and a new table.

// clippy.toml's in-test allowances cover `#[test]` functions only, not the
// helpers of an integration test crate; a test may fail loudly anywhere.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use switchyard_controlplane::{run, ControlConfig};
use switchyard_proto::v1 as pb;
use tonic::Code;

const POLICY: &str = "\
default_class: standard
endpoints:
  - { name: a, url: 'http://127.0.0.1:1', tier: onprem, models: [m], provider: lab, price: { input_per_mtok: 0, output_per_mtok: 0 } }
  - { name: b, url: 'http://127.0.0.1:2', tier: burst, models: [m], provider: cloud, price: { input_per_mtok: 1, output_per_mtok: 1 } }
classes:
  - { name: standard }
  - { name: local, tiers: [onprem] }
";

struct Token(Option<&'static str>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = self.0 {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(r)
    }
}

type Client = pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Token>,
>;

/// Starts a control plane on a free port; returns its address.
async fn start(token: Option<&str>) -> String {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-admin-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = ControlConfig {
        policy,
        reload_every: Duration::from_millis(100),
        interval: Duration::from_millis(100),
        db: Some(dir.join("state.db")),
        admin_token: token.map(str::to_string),
        tls: None,
        // The policy's endpoints are not running: probes would judge them
        // all down, which is not what these tests are about.
        probe: None,
    };
    tokio::spawn(async move {
        run(config, listener, std::future::pending()).await.unwrap();
    });
    addr
}

async fn client(addr: &str, token: Option<&'static str>) -> Client {
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    pb::admin_client::AdminClient::with_interceptor(channel, Token(token))
}

fn kill(endpoint: &str, reason: &str) -> pb::SwitchRequest {
    pb::SwitchRequest {
        target: Some(pb::switch_request::Target::Endpoint(endpoint.into())),
        actor: "tester".into(),
        reason: reason.into(),
    }
}

#[tokio::test]
async fn the_token_guards_every_call() {
    let addr = start(Some("s3cret")).await;
    for token in [None, Some("wrong")] {
        let mut c = client(&addr, token).await;
        let e = c.status(pb::StatusRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        let e = c.kill(kill("a", "x")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = c.audit(pb::AuditRequest { limit: 0 }).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let mut c = client(&addr, Some("s3cret")).await;
    assert!(c.status(pb::StatusRequest {}).await.is_ok());
    assert!(c
        .audit(pb::AuditRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .entries
        .is_empty());

    // Without a token configured: status for anyone, changes for no one.
    let open = start(None).await;
    let mut c = client(&open, Some("anything")).await;
    assert!(c.status(pb::StatusRequest {}).await.is_ok());
    let e = c.kill(kill("a", "x")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("no admin token"), "{e}");
}

#[tokio::test]
async fn calls_are_validated_logged_and_pushed() {
    let addr = start(Some("t")).await;
    let mut c = client(&addr, Some("t")).await;
    let v0 = c
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .table_version;

    let bad = [
        (kill("ghost", "x"), Code::NotFound),
        (kill("a", "  "), Code::InvalidArgument),
        (
            pb::SwitchRequest {
                target: Some(pb::switch_request::Target::Provider("nobody".into())),
                actor: String::new(),
                reason: "x".into(),
            },
            Code::NotFound,
        ),
        (
            pb::SwitchRequest {
                target: None,
                actor: String::new(),
                reason: "x".into(),
            },
            Code::InvalidArgument,
        ),
    ];
    for (req, code) in bad {
        assert_eq!(c.kill(req).await.unwrap_err().code(), code);
    }
    let over = |class: &str, weight: f64, ttl_ms: u64| pb::OverrideRequest {
        endpoint: "b".into(),
        class: class.into(),
        weight,
        ttl_ms,
        clear: false,
        actor: "tester".into(),
        reason: "canary".into(),
    };
    assert_eq!(
        c.r#override(over("", 1.5, 1000)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.r#override(over("", 0.5, 0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.r#override(over("nope", 0.5, 1000))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        c.r#override(over("local", 0.5, 1000))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition,
        "the class may not use a burst endpoint"
    );

    let r = c
        .r#override(over("standard", 0.5, 60_000))
        .await
        .unwrap()
        .into_inner();
    assert!(r.table_version > v0, "pushed at once: {r:?}");
    let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let b = s.endpoints.iter().find(|e| e.name == "b").unwrap();
    assert_eq!(b.weights[0].weight, 0.5);
    assert_eq!(s.overrides.len(), 1);

    let r = c
        .kill(pb::SwitchRequest {
            target: Some(pb::switch_request::Target::Provider("cloud".into())),
            actor: "tester".into(),
            reason: "bill".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.table_version, r.table_version);
    let b = s.endpoints.iter().find(|e| e.name == "b").unwrap();
    assert!(
        b.killed && b.weights.is_empty(),
        "a kill beats an override: {b:?}"
    );

    let d = c
        .drain(kill("a", "maintenance"))
        .await
        .unwrap()
        .into_inner();
    let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert!(d.table_version >= r.table_version);
    let std = s.classes.iter().find(|c| c.name == "standard").unwrap();
    assert!(std.unroutable_reason.contains("a drained"), "{std:?}");
    assert!(std.unroutable_reason.contains("b killed"), "{std:?}");

    let log = c
        .audit(pb::AuditRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<_> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["override", "kill", "drain"],
        "refused calls are not logged"
    );
    assert!(log
        .iter()
        .all(|e| e.actor == "tester" && !e.reason.is_empty()));
}
