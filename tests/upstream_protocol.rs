//! HTTP edge cases of providers, played by a raw TCP fake that answers
//! exactly the bytes a test scripts: interim 1xx answers, and chunked
//! answers that break off.

mod common;

use std::net::SocketAddr;

use common::{Stack, MODEL};
use switchyard::cluster::{self, PolicyEndpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves every connection: reads one request (headers and a
/// Content-Length body), writes `answer`, then closes.
async fn fake_provider(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = sock.write_all(answer).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

async fn stack_for(label: &str, provider: SocketAddr) -> Stack {
    Stack::start_with(
        label,
        &[],
        |_| {
            let ep = PolicyEndpoint {
                name: "raw",
                addr: provider,
                tier: "onprem",
                model: MODEL,
                price_in: 0.0,
                price_out: 0.0,
            };
            cluster::policy_with_classes(
                &[ep],
                "standard",
                "  - name: standard\n    ttft_timeout_ms: 5000\n    deadline_ms: 10000\n",
            )
        },
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_1xx_answers_are_skipped() {
    let provider = fake_provider(
        b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n\
          HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 25\r\n\r\n\
          {\"id\":\"raw-1\",\"usage\":{}}",
    )
    .await;
    let stack = stack_for("interim", provider).await;
    let r = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .header("expect", "100-continue")
        .json(&stack.chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "{\"id\":\"raw-1\",\"usage\":{}}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_is_relayed_framed_and_a_cut_one_is_never_a_clean_200() {
    let whole = fake_provider(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\n{\"id\"\r\n9\r\n:\"whole\"}\r\n0\r\n\r\n",
    )
    .await;
    let stack = stack_for("chunked-whole", whole).await;
    let r = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .json(&stack.chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["transfer-encoding"], "chunked");
    assert_eq!(r.text().await.unwrap(), "{\"id\":\"whole\"}");

    let cut = fake_provider(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\n{\"id\"\r\n",
    )
    .await;
    let stack = stack_for("chunked-cut", cut).await;
    let r = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .json(&stack.chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the header was already sent");
    let body = r.text().await;
    assert!(
        body.is_err(),
        "a cut answer must not read as complete: {body:?}"
    );
}

/// An SSE answer with events, the usage chunk the sidecar asked for on the
/// app's behalf, and the end.
const EVENTS: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\r\n\r\n\
    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\r\n\r\n\
    data: [DONE]\r\n\r\n";

async fn stream_through(label: &str, answer: &'static [u8]) -> (Stack, reqwest::Response) {
    let provider = fake_provider(answer).await;
    let stack = stack_for(label, provider).await;
    let r = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .json(&stack.chat_body(true))
        .send()
        .await
        .expect("the sidecar answers with a valid HTTP/1.1 message");
    (stack, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_stream_ended_by_close_reaches_the_app_as_http_1_1_chunked() {
    let answer: &'static [u8] = Box::leak(
        format!("HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n{EVENTS}")
            .into_bytes()
            .into_boxed_slice(),
    );
    let (_stack, r) = stream_through("http10", answer).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.headers()["transfer-encoding"], "chunked");
    let body = r.text().await.expect("a complete body");
    assert!(body.ends_with("data: [DONE]\r\n\r\n"), "{body:?}");
    assert!(
        !body.contains("usage"),
        "the usage chunk the app did not ask for: {body:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_a_content_length_keeps_a_true_length_when_its_usage_chunk_is_taken_out() {
    let answer: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{EVENTS}",
            EVENTS.len()
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let (_stack, r) = stream_through("sse-length", answer).await;
    assert_eq!(r.status(), 200);
    let declared: Option<usize> = r
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = r.text().await.expect("a complete body, not one cut short");
    assert!(
        body.ends_with("data: [DONE]\r\n\r\n") && !body.contains("usage"),
        "{body:?}"
    );
    if let Some(n) = declared {
        assert_eq!(n, body.len());
    }
}
