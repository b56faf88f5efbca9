//! A table the sidecar cannot apply is NACKed with its reason and the last
//! good table stays in force. The control plane here is a scripted tonic
//! server, so the test can push what a real control plane never would.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use switchyard::cluster::{self, Proc};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::watch_request::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Hands each Watch stream to the test: what the sidecar sends comes out of
/// `from_sidecar`, what the test sends goes down `to_sidecar`.
struct Scripted {
    streams: mpsc::Sender<WatchPair>,
}

type WatchPair = (
    mpsc::Sender<Result<pb::TableUpdate, Status>>,
    Streaming<pb::WatchRequest>,
);

type Updates = Pin<Box<dyn Stream<Item = Result<pb::TableUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::routing_discovery_server::RoutingDiscovery for Scripted {
    type WatchStream = Updates;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Updates>, Status> {
        let (tx, rx) = mpsc::channel(4);
        self.streams
            .send((tx, req.into_inner()))
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn table(version: u64, mock: SocketAddr, url: Option<&str>) -> pb::TableUpdate {
    pb::TableUpdate {
        nonce: format!("n{version}"),
        table: Some(pb::RoutingTable {
            version,
            endpoints: vec![pb::Endpoint {
                name: "onprem-a".into(),
                url: url.map_or_else(|| format!("http://{mock}"), str::to_string),
                api: pb::ApiKind::Openai as i32,
                tier: pb::Tier::Onprem as i32,
                models: vec![common::MODEL.into()],
                price_input_per_mtok: 0.0,
                price_output_per_mtok: 0.0,
                capacity: 0,
                price_cached_input_per_mtok: None,
                credential: String::new(),
                over_budget: false,
                model_ids: Default::default(),
                ..Default::default()
            }],
            classes: vec![pb::RequestClass {
                name: "standard".into(),
                routes: vec![pb::Route {
                    endpoint: "onprem-a".into(),
                    weight: 1.0,
                }],
                fallback: vec!["onprem-a".into()],
                ttft_timeout_ms: 5000,
                deadline_ms: 30000,
                ..Default::default()
            }],
            default_class: "standard".into(),
            weights_ttl_ms: 0,
        }),
    }
}

async fn next(inbound: &mut Streaming<pb::WatchRequest>) -> Kind {
    tokio::time::timeout(Duration::from_secs(30), inbound.message())
        .await
        .expect("the sidecar answers within 30 s")
        .expect("stream healthy")
        .expect("stream open")
        .kind
        .expect("a message kind")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_cannot_be_applied_is_nacked_and_the_old_one_stays() {
    let dir = cluster::run_dir("nack").unwrap();
    let mock = common::Mock::start(&dir, "onprem-a", "onprem", &[]).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = listener.local_addr().unwrap();
    let (streams_tx, mut streams) = mpsc::channel(1);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::routing_discovery_server::RoutingDiscoveryServer::new(
                Scripted {
                    streams: streams_tx,
                },
            ))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let sidecar: SocketAddr = ([127, 0, 0, 1], cluster::free_port().unwrap()).into();
    let sidecar_proc = Proc::spawn(
        common::bin(),
        &common::args(&[
            "sidecar",
            "--control",
            &control.to_string(),
            "--listen",
            &sidecar.to_string(),
            "--id",
            "nacker",
        ]),
        &dir,
        "sidecar",
    )
    .unwrap();

    let (down, mut up) = tokio::time::timeout(Duration::from_secs(60), streams.recv())
        .await
        .expect("the sidecar connects")
        .unwrap();
    match next(&mut up).await {
        Kind::Hello(h) => assert_eq!((h.sidecar_id.as_str(), h.applied_version), ("nacker", 0)),
        other => panic!("expected hello, got {other:?}"),
    }
    down.send(Ok(table(1, mock.addr, None))).await.unwrap();
    match next(&mut up).await {
        Kind::Ack(a) => assert_eq!((a.version, a.nonce.as_str()), (1, "n1")),
        other => panic!("expected ack, got {other:?}"),
    }

    down.send(Ok(table(2, mock.addr, Some("ht!tp://not a url"))))
        .await
        .unwrap();
    match next(&mut up).await {
        Kind::Nack(n) => {
            assert_eq!((n.version, n.nonce.as_str()), (2, "n2"));
            assert!(
                n.reason.contains("onprem-a") && n.reason.contains("URL"),
                "{}",
                n.reason
            );
        }
        other => panic!("expected nack, got {other:?}"),
    }

    let http = reqwest::Client::new();
    // The control thread can apply tables before the proxy listens (it
    // builds its TLS connector first): wait for the listener.
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    let (status, ready) = loop {
        match common::readyz(&http, sidecar).await {
            (0, e) => assert!(tokio::time::Instant::now() < end, "no /readyz: {e}"),
            answer => break answer,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("version 1"), "{ready}");
    let own = format!("pid {}\n", sidecar_proc.pid().unwrap());
    assert!(
        ready.contains(&own),
        "another sidecar holds the port: {ready}"
    );
    let r = http
        .post(format!("http://{sidecar}/v1/chat/completions"))
        .json(&serde_json::json!({"model": common::MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-switchyard-table-version"], "1");

    // A later good table is applied again.
    down.send(Ok(table(3, mock.addr, None))).await.unwrap();
    assert!(matches!(next(&mut up).await, Kind::Ack(a) if a.version == 3));
}
