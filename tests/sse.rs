//! Server-sent events end to end: a provider framing its stream with CRLF,
//! CR or LF, with or without comment keep-alives, reaches the app event by
//! event, byte for byte, as the provider sends it, whether or not the
//! sidecar takes out the usage chunk it asked for, and however the
//! provider cuts its events into writes.

mod common;

use common::{Stack, MODEL};
use futures::StreamExt;

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
