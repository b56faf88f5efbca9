//! End to end, with real processes on loopback: an independent OpenAI client
//! through the sidecar, hot swaps under load, control plane loss, NACKs and
//! bad input.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use common::{Stack, MODEL};
use futures::StreamExt;
use switchyard::cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_client_gets_exactly_what_the_provider_produced() {
    let stack = Stack::start(
        "openai",
        &[(
            "onprem-a",
            "onprem",
            &["--output-tokens", "40", "--inter-token-ms", "1"],
        )],
        &[],
        &[],
    )
    .await;
    common::openai_client_round_trip(&stack.url("/v1"), &stack.mocks[0], &stack.http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chunks_reach_the_app_before_the_answer_is_complete() {
    // 20 tokens 50 ms apart: a buffering proxy would deliver everything
    // after about a second, in one piece.
    let stack = Stack::start(
        "chunked",
        &[(
            "onprem-a",
            "onprem",
            &["--output-tokens", "20", "--inter-token-ms", "50"],
        )],
        &[],
        &[],
    )
    .await;
    let r = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .json(&stack.chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.expect("a first chunk").unwrap();
    let first = String::from_utf8_lossy(&first).to_string();
    assert!(first.starts_with("data: "), "{first}");
    assert!(
        !first.contains("[DONE]"),
        "the first read held the whole stream: {first}"
    );
    let mut rest = String::new();
    while let Some(c) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    assert!(rest.trim_end().ends_with("data: [DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_loses_nothing_and_moves_all_traffic() {
    let stack = Arc::new(
        Stack::start(
            "hotswap",
            &[
                ("old", "onprem", &["--ttft-ms", "20"]),
                ("new", "onprem", &["--ttft-ms", "20"]),
            ],
            &[("old", 1.0), ("new", 0.0)],
            &[],
        )
        .await,
    );
    let first_version = stack.wait_acked_above(0).await;

    // (started after the ACK was seen, endpoint, status)
    let results = Arc::new(Mutex::new(Vec::<(bool, String, u16)>::new()));
    let acked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..64)
        .map(|w: usize| {
            let (stack, results, acked, in_flight, peak, stop) = (
                stack.clone(),
                results.clone(),
                acked.clone(),
                in_flight.clone(),
                peak.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let after = acked.load(Ordering::SeqCst);
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let (status, endpoint, _) = stack.chat((w + n).is_multiple_of(2usize)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    results.lock().push((after, endpoint, status));
                }
            })
        })
        .collect();

    // Let traffic build up, then move all weight.
    while results.lock().len() < 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster::write_atomic(
        &stack.policy,
        &stack.policy_text(&[("old", 0.0), ("new", 1.0)]),
    )
    .unwrap();
    let v = stack.wait_acked_above(first_version).await;
    acked.store(true, Ordering::SeqCst);
    let seen_at_ack = results.lock().len();
    while results.lock().len() < seen_at_ack + 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }

    let results = results.lock();
    assert!(peak.load(Ordering::SeqCst) >= 50, "fewer than 50 in flight");
    let failed: Vec<_> = results.iter().filter(|r| r.2 != 200).collect();
    assert!(
        failed.is_empty(),
        "{} requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        results.iter().any(|r| !r.0 && r.1 == "old"),
        "traffic ran on the old table"
    );
    let after: Vec<_> = results.iter().filter(|r| r.0).collect();
    assert!(after.len() >= 500);
    let strays: Vec<_> = after.iter().filter(|r| r.1 != "new").collect();
    assert!(
        strays.is_empty(),
        "{} requests after the ACK of {v} went elsewhere",
        strays.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_outlives_its_control_plane_and_reconnects() {
    let mut stack = Stack::start("ctlkill", &[("onprem-a", "onprem", &[])], &[], &[]).await;
    let before = stack.wait_acked_above(0).await;

    stack.control.kill().await.unwrap();
    for stream in [false, true, false, true] {
        let (status, endpoint, body) = stack.chat(stream).await;
        assert_eq!((status, endpoint.as_str()), (200, "onprem-a"), "{body}");
    }
    let ready = stack.http.get(stack.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let (control, addr) =
        common::start_control(&stack.dir, &stack.policy, &stack.control_addr.to_string()).await;
    stack.control = control;
    assert_eq!(addr, stack.control_addr);
    let after = stack.wait_acked_above(before).await;
    assert!(after > before);
    let (status, _, _) = stack.chat(false).await;
    assert_eq!(status, 200);
}

/// A port another process holds: the sidecar says which address it could
/// not take and exits at once, rather than retrying with nothing listening
/// while a launcher takes the other process's answers for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_whose_port_is_taken_exits_with_a_clear_error() {
    let dir = cluster::run_dir("taken").unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let mut sidecar = cluster::Proc::spawn(
        common::bin(),
        &common::args(&["sidecar", "--control", "127.0.0.1:1", "--listen", &addr]),
        &dir,
        "sidecar",
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), sidecar.wait())
        .await
        .expect("the sidecar exits instead of waiting for the port")
        .unwrap();
    assert!(!status.success());
    let log = sidecar.log_text();
    assert!(
        log.contains(&format!("cannot listen on {addr}")),
        "the log names the address: {log}"
    );
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_edit_is_refused_and_the_old_table_stays() {
    let stack = Stack::start("badedit", &[("onprem-a", "onprem", &[])], &[], &[]).await;
    let v = stack.wait_acked_above(0).await;
    let broken = stack.policy_text(&[]).replace("tier: onprem", "tier: moon");
    cluster::write_atomic(&stack.policy, &broken).unwrap();
    // The control plane logs the refusal with the field and line; wait for it.
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while !stack.control.log_text().contains("endpoints[0].tier") {
        assert!(
            tokio::time::Instant::now() < end,
            "no refusal logged:\n{}",
            stack.control.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = stack.control.log_text();
    assert!(log.contains("line 5"), "the error names the line: {log}");
    assert_eq!(
        common::status(stack.control_addr)
            .await
            .unwrap()
            .table_version,
        v
    );
    let (status, _, _) = stack.chat(false).await;
    assert_eq!(status, 200);
}

async fn openai_error(r: reqwest::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.expect("an error body in JSON");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_the_proxy_keeps_serving() {
    let stack = Stack::start(
        "badinput",
        &[("onprem-a", "onprem", &[])],
        &[],
        &["--max-body-bytes", "2048"],
    )
    .await;
    let chat = stack.url("/v1/chat/completions");
    let post = |body: Vec<u8>| {
        stack
            .http
            .post(&chat)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let (s, b) = openai_error(post(b"{\"model\": ".to_vec()).await.unwrap()).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["type"], "invalid_request_error");

    let (s, b) = openai_error(post(br#"{"messages": []}"#.to_vec()).await.unwrap()).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (400, Some("model")),
        "{b}"
    );

    let (s, b) = openai_error(
        post(br#"{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}"#.to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{b}"
    );

    let big = format!(
        r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(4096)
    );
    let (s, b) = openai_error(post(big.clone().into_bytes()).await.unwrap()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("request_too_large")),
        "{b}"
    );

    // The same, chunked, with no Content-Length to refuse it up front.
    let chunks = futures::stream::iter(
        big.into_bytes()
            .chunks(512)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = stack
        .http
        .post(&chat)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let (s, _) = openai_error(r).await;
    assert_eq!(s, 413);

    let (s, b) = openai_error(
        stack
            .http
            .post(stack.url("/v1/audio/speech"))
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 404, "{b}");
    // A route the sidecar serves checks its body as the chat route does.
    let (s, b) = openai_error(
        stack
            .http
            .post(stack.url("/v1/embeddings"))
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["param"], "model", "{b}");
    let (s, _) = openai_error(stack.http.get(&chat).send().await.unwrap()).await;
    assert_eq!(s, 405);
    let (s, b) = openai_error(
        stack
            .http
            .post(&chat)
            .header("x-switchyard-class", "nope")
            .json(&stack.chat_body(false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("unknown_class"))
    );

    for stream in [false, true] {
        let (status, endpoint, _) = stack.chat(stream).await;
        assert_eq!((status, endpoint.as_str()), (200, "onprem-a"));
    }
    assert_eq!(
        common::listed_models(&stack.http, &stack.url("")).await,
        [MODEL]
    );
    // Probes that ask with HEAD get GET's status and length, and no body.
    for path in ["/healthz", "/readyz"] {
        let get = stack.http.get(stack.url(path)).send().await.unwrap();
        let (get_status, get_len) = (get.status(), get.text().await.unwrap().len());
        let head = stack.http.head(stack.url(path)).send().await.unwrap();
        assert_eq!(head.status(), get_status, "{path}");
        assert_eq!(
            head.headers()["content-length"].to_str().unwrap(),
            get_len.to_string(),
            "{path}"
        );
        assert!(head.bytes().await.unwrap().is_empty(), "{path}");
    }
    assert_eq!(
        stack.mocks[0].requests(&stack.http).await,
        2,
        "no bad request reached the provider"
    );
}

/// The usage objects of an answer (a JSON body or SSE events).
fn usages(text: &str) -> Vec<serde_json::Value> {
    text.split("\n\n")
        .filter_map(|e| {
            let json = e.trim().strip_prefix("data: ").unwrap_or(e.trim());
            serde_json::from_str::<serde_json::Value>(json).ok()
        })
        .filter_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_carries_tokens_and_spend_to_the_control_plane() {
    // The second mock costs 1 per million input tokens, 0.25 per million
    // cached input tokens and 2 per million output tokens; it reports part of
    // every prompt as cached and adds reasoning tokens to every answer.
    let stack = Stack::start_with(
        "spend",
        &[
            ("free", "onprem", &["--output-tokens", "16"]),
            (
                "paid",
                "burst",
                &[
                    "--output-tokens",
                    "16",
                    "--cached-tokens",
                    "2",
                    "--reasoning-tokens",
                    "5",
                ],
            ),
        ],
        |m| {
            let text = common::policy_text(m, &[("free", 0.0), ("paid", 1.0)]);
            let priced = text.replace(
                "output_per_mtok: 2 }",
                "output_per_mtok: 2, cached_input_per_mtok: 0.25 }",
            );
            assert_ne!(priced, text, "the paid endpoint's price is in the policy");
            priced
        },
        &[],
    )
    .await;
    let ask = |body: serde_json::Value| {
        let req = stack
            .http
            .post(stack.url("/v1/chat/completions"))
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.headers()["x-switchyard-endpoint"], "paid");
            r.text().await.unwrap()
        }
    };
    // Every request is the same, so each costs what the first reports.
    let first = usages(&ask(stack.chat_body(false)).await);
    assert_eq!(first.len(), 1);
    let u = &first[0];
    let (i, c, o) = (
        u["prompt_tokens"].as_f64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_f64()
            .unwrap(),
        u["completion_tokens"].as_f64().unwrap(),
    );
    assert!(c > 0.0 && c <= i, "{u}");
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 5, "{u}");
    // Reasoning tokens are inside completion_tokens and billed as output;
    // cached prompt tokens are billed at their own price.
    let each = ((i - c) * 1.0 + c * 0.25 + o * 2.0) / 1e6;

    // A stream that asked for usage gets it.
    let mut asked = stack.chat_body(true);
    asked["stream_options"] = serde_json::json!({"include_usage": true});
    assert_eq!(usages(&ask(asked).await).len(), 1);
    // A stream that did not ask is accounted all the same, and does not see
    // the usage chunk the sidecar asked for on its behalf.
    for _ in 0..3 {
        let text = ask(stack.chat_body(true)).await;
        assert!(usages(&text).is_empty(), "{text}");
        assert!(!text.contains("\"choices\":[]"), "{text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    }
    let expected = 5.0 * each;
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = stack.status().await.expect("status");
        let paid = s.endpoints.iter().find(|e| e.name == "paid").unwrap();
        if (paid.spend_usd - expected).abs() < 1e-12 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "spend {} never reached {expected}",
            paid.spend_usd
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_key_comes_from_the_sidecars_environment_never_from_the_app() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let key = format!("sk-test-{}-{nanos}", std::process::id());
    let key_file =
        std::env::temp_dir().join(format!("switchyard-key-{}-{nanos}", std::process::id()));
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let reference = format!("credential: file:{}", key_file.display());
    let stack = Stack::start_with(
        "credential",
        &[("keyed", "onprem", &["--api-key", key.as_str()])],
        |m| {
            let text = common::policy_text(m, &[]);
            let keyed = text.replace(
                "    tier: onprem\n",
                &format!("    tier: onprem\n    {reference}\n"),
            );
            assert_ne!(keyed, text, "the credential is in the policy");
            keyed
        },
        &[],
    )
    .await;
    let mock = &stack.mocks[0];

    // The app's own key is dropped; the provider gets the sidecar's.
    for stream in [false, true, false] {
        let r = stack
            .http
            .post(stack.url("/v1/chat/completions"))
            .bearer_auth("app-own-token")
            .json(&stack.chat_body(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-switchyard-endpoint"], "keyed");
        r.text().await.unwrap();
    }
    let stats = mock.stats(&stack.http).await;
    assert_eq!(
        (stats["requests"].as_u64(), stats["unauthorized"].as_u64()),
        (Some(3), Some(0)),
        "{stats}"
    );
    // The mock does check: without the key it refuses.
    let direct = stack
        .http
        .post(format!("http://{}/v1/chat/completions", mock.addr))
        .bearer_auth("app-own-token")
        .json(&stack.chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401);
    assert_eq!(mock.stats(&stack.http).await["unauthorized"], 1);

    // A reference this sidecar cannot resolve is NACKed, named, and the
    // table in force (with its key) stays.
    let unset = "env:SWITCHYARD_TEST_KEY_THAT_IS_NOT_SET";
    let text = std::fs::read_to_string(&stack.policy).unwrap();
    let edited = text.replace(&format!("file:{}", key_file.display()), unset);
    assert_ne!(edited, text);
    cluster::write_atomic(&stack.policy, &edited).unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let s = stack.status().await.expect("status");
        if let Some(r) = s
            .sidecars
            .iter()
            .map(|c| &c.nack_reason)
            .find(|r| !r.is_empty())
        {
            break r.clone();
        }
        assert!(tokio::time::Instant::now() < end, "no NACK: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(reason.contains(unset), "{reason}");
    let (status, endpoint, _) = stack.chat(false).await;
    assert_eq!((status, endpoint.as_str()), (200, "keyed"));
    assert_eq!(mock.stats(&stack.http).await["unauthorized"], 1);

    // The key is in no log and no metric.
    for (what, text) in [
        ("sidecar log", stack.sidecar.log_text()),
        ("control plane log", stack.control.log_text()),
        ("sidecar metrics", stack.metrics_text().await),
    ] {
        assert!(!text.is_empty(), "{what} is empty");
        assert!(!text.contains(&key), "the key leaked into the {what}");
    }
    let _ = std::fs::remove_file(&key_file);
}

/// Sends `request` on a raw connection and reads whatever the sidecar
/// answers until it closes the connection.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_or_trickled_body_gets_408_and_bad_parameters_400_before_any_provider() {
    let stack = Stack::start(
        "intake",
        &[("onprem-a", "onprem", &[])],
        &[],
        &["--body-timeout-ms", "400"],
    )
    .await;
    // A body shorter than its Content-Length: the sidecar waits for the
    // rest only so long, then answers 408 and closes the connection.
    let answer = raw_exchange(
        stack.sidecar_addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 200\r\n\r\n{\"model\":",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");

    // A body trickled a byte at a time, forever: the same.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(stack.sidecar_addr)
        .await
        .unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        loop {
            if wr.write_all(b"1\r\n \r\n").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut out = Vec::new();
    let _ = rd.read_to_end(&mut out).await;
    trickle.abort();
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Parameters a provider must refuse are refused here, naming them.
    let chat = stack.url("/v1/chat/completions");
    for (body, param) in [
        (serde_json::json!({"model": MODEL}), "messages"),
        (
            serde_json::json!({"model": MODEL, "messages": []}),
            "messages",
        ),
        (
            serde_json::json!({"model": MODEL, "messages": ["hi"]}),
            "messages[0]",
        ),
        (
            serde_json::json!({"model": MODEL, "messages": [{"content": "hi"}]}),
            "messages[0].role",
        ),
        (
            serde_json::json!({"model": MODEL, "messages": [{"role": "user"}], "max_tokens": -1}),
            "max_tokens",
        ),
        (
            serde_json::json!({"model": MODEL, "messages": [{"role": "user"}], "max_completion_tokens": "9"}),
            "max_completion_tokens",
        ),
    ] {
        let (s, b) = openai_error(stack.http.post(&chat).json(&body).send().await.unwrap()).await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {b}"
        );
        assert_eq!(b["error"]["type"], "invalid_request_error");
    }
    for bad in ["0", "-3", "soon"] {
        let (s, b) = openai_error(
            stack
                .http
                .post(&chat)
                .header("x-switchyard-timeout-ms", bad)
                .json(&stack.chat_body(false))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (400, Some("x-switchyard-timeout-ms")),
            "{bad}: {b}"
        );
    }
    assert_eq!(
        stack.mocks[0].requests(&stack.http).await,
        0,
        "no refused request reached the provider"
    );
    // And the sidecar still serves.
    let (status, endpoint, _) = stack.chat(false).await;
    assert_eq!((status, endpoint.as_str()), (200, "onprem-a"));
}
