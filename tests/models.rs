//! Model mapping, end to end: the app names a logical model; each endpoint
//! gets its own id for it; `/v1/models` lists logical names; the answer's
//! `model` says what served it and `x-switchyard-endpoint` where.

mod common;

use common::Stack;
use futures::StreamExt;
use switchyard::cluster;

const LOGICAL: &str = "chat-large";
const VLLM_ID: &str = "meta-llama/Llama-3.1-70B-Instruct";

async fn ask(stack: &Stack, stream: bool) -> (u16, String, Vec<String>) {
    let r = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": LOGICAL,
            "stream": stream,
            "messages": [{"role": "user", "content": "hello"}],
        }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let endpoint = common::header(&r, "x-switchyard-endpoint");
    let mut body = String::new();
    let mut s = r.bytes_stream();
    while let Some(c) = s.next().await {
        body.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    // Every `model` the answer states: one for JSON, one per chunk.
    let models = if stream {
        body.split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| v["model"].as_str().map(str::to_string))
            .collect()
    } else {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        vec![v["model"].as_str().unwrap_or_default().to_string()]
    };
    assert!(!models.is_empty(), "{body}");
    (status, endpoint, models)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_gets_its_own_id_for_the_logical_model() {
    let mocks: [(&str, &str, &[&str]); 2] = [
        ("onprem-vllm", "onprem", &["--model", VLLM_ID]),
        ("burst-b", "burst", &["--model", LOGICAL]),
    ];
    let mut stack = Stack::start_with(
        "models",
        &mocks,
        |m| {
            let eps = common::endpoints_of(m, LOGICAL, |i| (i as f64, i as f64));
            let class = "  - name: standard\n    ttft_timeout_ms: 5000\n    deadline_ms: 20000\n    weights: { onprem-vllm: 1 }\n";
            let p = cluster::policy_with_classes(&eps, "standard", class);
            // The on-prem server knows the model by its Hugging Face id.
            let first = format!("    models: [{LOGICAL}]\n");
            let at = p.find(&first).expect("the first endpoint's models");
            format!(
                "{}    models: {{ {LOGICAL}: {VLLM_ID} }}\n{}",
                &p[..at],
                &p[at + first.len()..]
            )
        },
        &[],
    )
    .await;

    assert_eq!(
        common::listed_models(&stack.http, &stack.url("")).await,
        [LOGICAL]
    );

    for stream in [false, true] {
        let (status, endpoint, models) = ask(&stack, stream).await;
        assert_eq!((status, endpoint.as_str()), (200, "onprem-vllm"));
        assert!(models.iter().all(|m| m == VLLM_ID), "{models:?}");
    }

    // On-prem gone: the burst endpoint gets the logical name it knows.
    stack.mocks[0].proc.kill().await.unwrap();
    for stream in [false, true] {
        let (status, endpoint, models) = ask(&stack, stream).await;
        assert_eq!((status, endpoint.as_str()), (200, "burst-b"));
        assert!(models.iter().all(|m| m == LOGICAL), "{models:?}");
    }
}
