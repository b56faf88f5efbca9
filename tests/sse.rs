//! Server-sent events end to end: a provider framing its stream with CRLF,
//! CR or LF, with or without comment keep-alives, reaches the app event by
//! event, byte for byte, as the provider sends it, whether or not the
//! sidecar takes out the usage chunk it asked for, and however the
//! provider cuts its events into writes. A provider that stalls mid-stream
//! past the class's inter-token timeout gets the stream ended with the
//! sidecar's error event, and counted as a failure.

mod common;

use std::time::Duration;

use common::{endpoint, Stack, MODEL};
use futures::StreamExt;
use switchyard::cluster;

const TOKENS: usize = 8;

/// One streamed answer as the app read it.
struct Reads {
    reads: Vec<Vec<u8>>,
}

impl Reads {
    fn body(&self) -> Vec<u8> {
        self.reads.concat()
    }
}

async fn stream(stack: &Stack, include_usage: bool) -> Reads {
    let mut body = serde_json::json!({
        "model": MODEL,
        "stream": true,
        "messages": [{"role": "user", "content": "hello there"}],
    });
    if include_usage {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    let r = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut reads = Vec::new();
    let mut s = r.bytes_stream();
    while let Some(c) = s.next().await {
        reads.push(c.expect("the stream ends cleanly").to_vec());
    }
    Reads { reads }
}

/// What a client decodes: (event type, data) of each dispatched event.
fn decode(body: &[u8]) -> Vec<(String, String)> {
    use eventsource_stream::Eventsource;
    let s = futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes::Bytes::from(
        body.to_vec(),
    ))]);
    futures::executor::block_on(s.eventsource().collect::<Vec<_>>())
        .into_iter()
        .map(|e| {
            let e = e.expect("a valid event");
            (e.event, e.data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_framing_reaches_the_app_event_by_event_in_every_mode() {
    let stack = Stack::start(
        "sse",
        &[(
            "onprem-a",
            "onprem",
            &["--output-tokens", "8", "--inter-token-ms", "40"],
        )],
        &[],
        &[],
    )
    .await;
    for eol in ["crlf", "cr", "lf"] {
        let ending = match eol {
            "crlf" => "\r\n",
            "cr" => "\r",
            _ => "\n",
        };
        for (keep_alive, split) in [(true, false), (false, false), (false, true), (true, true)] {
            stack.mocks[0]
                .configure(
                    &stack.http,
                    serde_json::json!({
                        "sse_line_ending": eol,
                        "sse_keep_alive": keep_alive,
                        "sse_split_events": split,
                    }),
                )
                .await;
            for include_usage in [false, true] {
                let what = format!(
                    "{eol}, keep-alive {keep_alive}, events split {split}, include_usage {include_usage}"
                );
                let got = stream(&stack, include_usage).await;
                let body = got.body();
                let text = String::from_utf8(body.clone()).unwrap();
                let blank = format!("{ending}{ending}");

                // Relayed as the provider framed it, comments included.
                assert!(
                    text.ends_with(&format!("data: [DONE]{blank}")),
                    "{what}: {text:?}"
                );
                let keep_alives = text.matches(&format!(": keep-alive{blank}")).count();
                assert_eq!(keep_alives, if keep_alive { TOKENS } else { 0 }, "{what}");
                if eol != "lf" {
                    assert!(!text.contains("}\n\n"), "{what}: LF framing appeared");
                }

                // Chunks arrive as the provider sends them, not at the end,
                // and each read the app gets holds whole events only.
                assert!(
                    got.reads.len() > TOKENS / 2,
                    "{what}: {} reads for {TOKENS} tokens 40 ms apart",
                    got.reads.len()
                );
                assert!(
                    !String::from_utf8_lossy(&got.reads[0]).contains("[DONE]"),
                    "{what}: the first read held the whole stream"
                );
                for (i, r) in got.reads.iter().enumerate() {
                    assert!(
                        r.ends_with(blank.as_bytes()),
                        "{what}: read {i} ends inside an event: {:?}",
                        String::from_utf8_lossy(r)
                    );
                }

                // A client decodes the tokens, and the usage chunk exactly
                // when it asked for it.
                let events = decode(&body);
                let data: Vec<serde_json::Value> = events
                    .iter()
                    .filter(|(_, d)| d != "[DONE]")
                    .map(|(_, d)| serde_json::from_str(d).unwrap())
                    .collect();
                let content: String = data
                    .iter()
                    .filter_map(|v| v["choices"][0]["delta"]["content"].as_str())
                    .collect();
                assert_eq!(
                    content.split(' ').filter(|w| !w.is_empty()).count(),
                    TOKENS,
                    "{what}: {content}"
                );
                let usage = data.iter().filter(|v| v["usage"].is_object()).count();
                assert_eq!(usage, usize::from(include_usage), "{what}");
            }
        }
    }
}

/// Tokens the stalling mock sends before it goes silent, 150 ms apart:
/// 600 ms in all, longer than the inter-token timeout, so they all arriving
/// shows the timeout is per gap, not per stream.
const BEFORE_STALL: u32 = 5;
const INTER_TOKEN_TIMEOUT_MS: u32 = 400;

/// A provider that goes silent mid-stream (connection open) for longer
/// than the class's `inter_token_timeout_ms`: the app gets every token sent
/// before the stall, then the sidecar's error event (`stream_interrupted`,
/// naming the gap), and its stream ends, with no `[DONE]`; the sidecar
/// lets go of the upstream connection. The stall counts as a failure: in
/// the telemetry the control plane totals (an error per stalled stream)
/// and in the sidecar's own outlier detection (with `--eject-after 2`, the
/// second stall ejects the endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stalled_past_the_inter_token_timeout_ends_with_an_error_event_and_counts_as_a_failure(
) {
    let class = format!(
        "  - name: standard\n    ttft_timeout_ms: 5000\n    deadline_ms: 30000\n    inter_token_timeout_ms: {INTER_TOKEN_TIMEOUT_MS}\n"
    );
    let stall_after = BEFORE_STALL.to_string();
    let stack = Stack::start_with(
        "stall",
        &[(
            "stall",
            "onprem",
            &[
                "--output-tokens",
                "8",
                "--inter-token-ms",
                "150",
                "--stall-after-tokens",
                &stall_after,
            ],
        )],
        |m| {
            let eps = common::endpoints_of(m, MODEL, |_| (1.0, 2.0));
            cluster::policy_with_classes(&eps, "standard", &class)
        },
        &["--eject-after", "2"],
    )
    .await;

    for n in 1..=2u64 {
        let r = stack
            .http
            .post(stack.url("/v1/chat/completions"))
            .json(&stack.chat_body(true))
            .send()
            .await
            .expect("the sidecar answers");
        assert_eq!(r.status(), 200, "stall {n}: the first byte went out");
        assert_eq!(common::header(&r, "x-switchyard-endpoint"), "stall");
        // Bounded only so a stream the sidecar never ends fails the test
        // instead of hanging it.
        let body = tokio::time::timeout(Duration::from_secs(20), async {
            let mut body = Vec::new();
            let mut s = r.bytes_stream();
            while let Some(c) = s.next().await {
                body.extend_from_slice(&c.expect("the stream ends cleanly"));
            }
            body
        })
        .await
        .unwrap_or_else(|_| panic!("stall {n}: the sidecar did not end the stalled stream"));

        let text = String::from_utf8_lossy(&body).to_string();
        let events: Vec<serde_json::Value> = decode(&body)
            .into_iter()
            .map(|(_, d)| {
                assert_ne!(
                    d, "[DONE]",
                    "stall {n}: a stalled stream is not done: {text}"
                );
                serde_json::from_str(&d).unwrap_or_else(|e| panic!("{e}: {d}"))
            })
            .collect();
        let (last, tokens) = events.split_last().expect("events");
        let content: String = tokens
            .iter()
            .map(|v| {
                assert!(
                    v["choices"][0]["finish_reason"].is_null(),
                    "stall {n}: no finish before the stall: {text}"
                );
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default()
            })
            .collect();
        let sent: String = switchyard_mock::answer_tokens("stall", BEFORE_STALL).concat();
        assert_eq!(
            content, sent,
            "stall {n}: every token before the stall: {text}"
        );
        assert_eq!(
            last["error"],
            serde_json::json!({
                "message": format!("no data for {INTER_TOKEN_TIMEOUT_MS} ms mid-stream"),
                "type": "server_error",
                "param": null,
                "code": "stream_interrupted",
            }),
            "stall {n}: the stream ends with the sidecar's error event: {text}"
        );

        // The mock's stalled answer ends when the sidecar drops its
        // connection.
        let mock = &stack.mocks[0];
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let st = mock.stats(&stack.http).await;
            assert_eq!(st["faults"]["stall"], n, "{st}");
            if st["in_flight"] == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "stall {n}: the sidecar still holds the stalled upstream: {st}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A failure in the telemetry: the control plane totals an error
        // for each stalled stream.
        stack
            .eventually(
                &format!("stall {n} reported as an error"),
                Duration::from_secs(10),
                |s| {
                    let e = endpoint(s, "stall");
                    (e.requests == n && e.errors == n).then_some(())
                },
            )
            .await;

        // And a failure to the sidecar's outlier detection: the second in
        // a row ejects.
        let ejections = stack
            .metric("switchyard_ejections_total", &[("endpoint", "stall")])
            .await;
        let ejected = stack
            .metric("switchyard_endpoint_ejected", &[("endpoint", "stall")])
            .await;
        let expected = if n == 1 { 0.0 } else { 1.0 };
        assert_eq!(
            (ejections, ejected),
            (expected, expected),
            "after stall {n}"
        );
    }
}
