//! API kinds, end to end: the app speaks OpenAI's API only; the table sends
//! it to an `openai`, an `azure` or an `anthropic` endpoint (each a mock
//! speaking that protocol), and the same independent client code
//! (async-openai) gets equivalent answers, streamed and not, tool calls
//! included; usage and cost are what each provider reported; completions
//! and embeddings go only where the API offers them; a failing on-prem
//! endpoint falls back to a hosted Anthropic one under load.

mod common;

use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::types::{
    ChatCompletionMessageToolCall, ChatCompletionRequestAssistantMessageArgs,
    ChatCompletionRequestMessage, ChatCompletionRequestToolMessageArgs,
    ChatCompletionRequestUserMessageArgs, ChatCompletionToolArgs, ChatCompletionToolType,
    CreateChatCompletionRequest, CreateChatCompletionRequestArgs, FinishReason, FunctionObjectArgs,
};
use common::{Mock, Stack, MODEL};
use futures::StreamExt;
use serde_json::{json, Value};

/// Each endpoint's own name for the model.
const AZURE_DEPLOYMENT: &str = "chat-deploy";
const CLAUDE: &str = "claude-test-1";

/// Three mocks, one per API, each answering 40 tokens; a class per API
/// (`via-openai`, `via-azure`, `via-anthropic`, one tier each) and a
/// default class that prefers on-prem and falls back to the others.
async fn three_apis(label: &str, extra: &[&str]) -> Stack {
    three_apis_with(label, extra, &[], |p| p).await
}

/// Like `three_apis`, with more arguments for the Anthropic mock and the
/// policy edited by `edit`.
async fn three_apis_with(
    label: &str,
    extra: &[&str],
    anthropic_extra: &[&str],
    edit: impl FnOnce(String) -> String,
) -> Stack {
    let tokens: &[&str] = &["--output-tokens", "40"];
    let with = |api: &'static str| -> Vec<&str> {
        let mut a = vec!["--api", api];
        a.extend_from_slice(tokens);
        a.extend_from_slice(extra);
        a
    };
    let (o, az) = (with("openai"), with("azure"));
    let mut an = with("anthropic");
    an.extend_from_slice(anthropic_extra);
    let mocks: [(&str, &str, &[&str]); 3] = [
        ("onprem-openai", "onprem", &o),
        ("burst-azure", "burst", &az),
        ("hosted-anthropic", "fallback", &an),
    ];
    let label = format!("apis-{label}");
    Stack::start_with(&label, &mocks, |m| edit(policy(m)), &[]).await
}

fn policy(m: &[Mock]) -> String {
    format!(
        "\
default_class: standard
endpoints:
  - name: onprem-openai
    url: http://{o}
    tier: onprem
    models: [{MODEL}]
    price: {{ input_per_mtok: 0.1, output_per_mtok: 0.2 }}
  - name: burst-azure
    url: http://{az}
    api: azure
    api_version: 2024-10-21
    tier: burst
    models: {{ {MODEL}: {AZURE_DEPLOYMENT} }}
    price: {{ input_per_mtok: 1, output_per_mtok: 2 }}
  - name: hosted-anthropic
    url: http://{an}
    api: anthropic
    tier: fallback
    models: {{ {MODEL}: {CLAUDE} }}
    price: {{ input_per_mtok: 3, output_per_mtok: 15, cached_input_per_mtok: 0.3, cache_write_input_per_mtok: 3.75 }}
classes:
  - name: standard
    ttft_timeout_ms: 5000
    deadline_ms: 30000
    weights: {{ onprem-openai: 1 }}
  - name: via-openai
    tiers: [onprem]
    ttft_timeout_ms: 5000
    deadline_ms: 30000
  - name: via-azure
    tiers: [burst]
    ttft_timeout_ms: 5000
    deadline_ms: 30000
  - name: via-anthropic
    tiers: [fallback]
    ttft_timeout_ms: 5000
    deadline_ms: 30000
    default_max_tokens: 1024
",
        o = m[0].addr,
        az = m[1].addr,
        an = m[2].addr,
    )
}

/// An async-openai client of the sidecar whose requests go to `class`.
fn client(stack: &Stack, class: &str) -> async_openai::Client<OpenAIConfig> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-switchyard-class", class.parse().unwrap());
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    async_openai::Client::with_config(
        OpenAIConfig::new()
            .with_api_base(stack.url("/v1"))
            .with_api_key("app-key-not-for-providers"),
    )
    .with_http_client(http)
}

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .unwrap()
        .into()
}

fn ask(messages: Vec<ChatCompletionRequestMessage>) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(messages)
        .build()
        .unwrap()
}

/// The `(class, mock)` pairs: one per API.
const KINDS: [(&str, usize); 3] = [("via-openai", 0), ("via-azure", 1), ("via-anthropic", 2)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_openai_client_gets_equivalent_answers_from_every_api() {
    let stack = three_apis("answers", &[]).await;
    for (class, i) in KINDS {
        let mock = &stack.mocks[i];
        let c = client(&stack, class);
        let r = c
            .chat()
            .create(ask(vec![user("Say something")]))
            .await
            .unwrap_or_else(|e| panic!("{class}: {e}\n{}", stack.sidecar.log_text()));
        let content = r.choices[0].message.content.clone().expect("content");
        assert_eq!(
            content,
            common::mock_content(&stack.http, mock, &r.id).await
        );
        assert_eq!(content.split(' ').count(), 40, "{class}");
        assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(r.usage.expect("usage").completion_tokens, 40, "{class}");
        // The answer names what served it.
        let served = [MODEL, AZURE_DEPLOYMENT, CLAUDE][i];
        assert_eq!(r.model, served, "{class}");

        let mut stream = c
            .chat()
            .create_stream(ask(vec![user("Say something")]))
            .await
            .expect("stream opens");
        let (mut text, mut id, mut chunks, mut finish) = (String::new(), String::new(), 0, None);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap_or_else(|e| panic!("{class}: {e}"));
            id = chunk.id.clone();
            chunks += 1;
            if let Some(choice) = chunk.choices.first() {
                text.push_str(choice.delta.content.as_deref().unwrap_or_default());
                finish = finish.or(choice.finish_reason);
            }
        }
        assert!(
            chunks > 40,
            "{class}: streamed chunk by chunk, got {chunks}"
        );
        assert_eq!(text, common::mock_content(&stack.http, mock, &id).await);
        assert_eq!(finish, Some(FinishReason::Stop), "{class}");
    }
    // Each mock saw only its own protocol: a request in another shape would
    // have been refused by it (4xx), and none was.
    for (class, i) in KINDS {
        let stats = stack.mocks[i].stats(&stack.http).await;
        assert_eq!(stats["completed"], 2, "{class}: {stats}");
        assert_eq!(stats["unauthorized"], 0, "{class}: {stats}");
    }
}

fn weather_tool() -> async_openai::types::ChatCompletionTool {
    ChatCompletionToolArgs::default()
        .r#type(ChatCompletionToolType::Function)
        .function(
            FunctionObjectArgs::default()
                .name("get_weather")
                .description("The weather in a city")
                .parameters(json!({
                    "type": "object",
                    "properties": {"location": {"type": "string"}},
                    "required": ["location"],
                }))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
}

/// Tool calls round-trip through every API: the model asks for a tool, the
/// app answers it, the model answers in text; streamed, the call arrives
/// as deltas that add up to the same call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_round_trip_through_every_api() {
    let stack = three_apis("tools", &[]).await;
    for (class, _) in KINDS {
        let c = client(&stack, class);
        let mut request = ask(vec![user("What is the weather in Paris?")]);
        request.tools = Some(vec![weather_tool()]);

        let r = c.chat().create(request.clone()).await.unwrap();
        let choice = &r.choices[0];
        assert_eq!(
            choice.finish_reason,
            Some(FinishReason::ToolCalls),
            "{class}"
        );
        let calls = choice.message.tool_calls.clone().expect("tool calls");
        assert_eq!(calls.len(), 1, "{class}");
        assert_eq!(calls[0].function.name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
        assert!(args["location"].is_string(), "{class}: {args}");

        // Streamed: deltas of one call, by index, add up to the same.
        let mut stream = c.chat().create_stream(request.clone()).await.unwrap();
        let (mut name, mut arguments, mut call_id, mut finish) =
            (String::new(), String::new(), String::new(), None);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap_or_else(|e| panic!("{class}: {e}"));
            let Some(choice) = chunk.choices.first() else {
                continue;
            };
            finish = finish.or(choice.finish_reason);
            for d in choice.delta.tool_calls.iter().flatten() {
                assert_eq!(d.index, 0, "{class}: one call");
                if let Some(id) = &d.id {
                    call_id.push_str(id);
                }
                if let Some(f) = &d.function {
                    name.push_str(f.name.as_deref().unwrap_or_default());
                    arguments.push_str(f.arguments.as_deref().unwrap_or_default());
                }
            }
        }
        assert_eq!(finish, Some(FinishReason::ToolCalls), "{class}");
        assert_eq!(name, "get_weather", "{class}");
        assert!(!call_id.is_empty(), "{class}");
        let streamed: Value = serde_json::from_str(&arguments)
            .unwrap_or_else(|e| panic!("{class}: arguments {arguments:?}: {e}"));
        assert_eq!(streamed, args, "{class}");

        // The app runs the tool and sends its result back.
        let call: ChatCompletionMessageToolCall = calls[0].clone();
        let mut follow = ask(vec![
            user("What is the weather in Paris?"),
            ChatCompletionRequestAssistantMessageArgs::default()
                .tool_calls(vec![call.clone()])
                .build()
                .unwrap()
                .into(),
            ChatCompletionRequestToolMessageArgs::default()
                .tool_call_id(call.id.clone())
                .content("18 degrees and sunny")
                .build()
                .unwrap()
                .into(),
        ]);
        follow.tools = Some(vec![weather_tool()]);
        let r = c
            .chat()
            .create(follow)
            .await
            .unwrap_or_else(|e| panic!("{class}: {e}\n{}", stack.sidecar.log_text()));
        assert_eq!(
            r.choices[0].finish_reason,
            Some(FinishReason::Stop),
            "{class}"
        );
        assert!(r.choices[0]
            .message
            .content
            .as_deref()
            .is_some_and(|t| !t.is_empty()));
    }
}

/// What the control plane has recorded as `endpoint`'s spend, once it
/// reaches `want` (within a rounding error); fails after 20 s.
async fn spend_reaches(stack: &Stack, endpoint: &str, want: f64) {
    stack
        .eventually(
            &format!("{endpoint} spend reaches {want}"),
            Duration::from_secs(20),
            |s| {
                let e = common::endpoint(s, endpoint);
                ((e.spend_usd - want).abs() < 1e-9).then_some(())
            },
        )
        .await;
}

/// Usage and cost, for every API: what the control plane records for an
/// endpoint is what its provider reported, priced by the policy; for
/// Anthropic that includes cache reads and writes (which OpenAI's usage
/// shape cannot show the app), and holds for a stream whose usage the app
/// never asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_cost_are_what_each_provider_reported() {
    let stack = three_apis("usage", &[]).await;
    stack.mocks[2]
        .configure(
            &stack.http,
            json!({"cached_tokens": 3, "cache_write_tokens": 4}),
        )
        .await;
    let prompt = "Count the words in this prompt, which is long enough to have cached parts";
    // (class, endpoint, input, output, cached input, cache write) prices,
    // and the cache writes the mock reports.
    let priced = [
        ("via-openai", "onprem-openai", 0.1, 0.2, 0.1, 0.1, 0.0),
        ("via-azure", "burst-azure", 1.0, 2.0, 1.0, 1.0, 0.0),
        (
            "via-anthropic",
            "hosted-anthropic",
            3.0,
            15.0,
            0.3,
            3.75,
            4.0,
        ),
    ];
    for (class, endpoint, pin, pout, pcached, pwrite, written) in priced {
        let r = client(&stack, class)
            .chat()
            .create(ask(vec![user(prompt)]))
            .await
            .unwrap();
        let u = r.usage.expect("usage");
        let cached = u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0) as f64;
        // prompt_tokens holds every input token: fresh, read from the
        // cache, written to it.
        let (input, output) = (u.prompt_tokens as f64, u.completion_tokens as f64);
        assert!(input >= cached + written, "{class}: {input}");
        let each = ((input - cached - written) * pin
            + cached * pcached
            + written * pwrite
            + output * pout)
            / 1e6;
        assert!(each > 0.0);
        spend_reaches(&stack, endpoint, each).await;

        // A stream that did not ask for usage is priced the same, and does
        // not see the usage chunk.
        let body = json!({"model": MODEL, "stream": true,
            "messages": [{"role": "user", "content": prompt}]});
        let text = stack
            .http
            .post(stack.url("/v1/chat/completions"))
            .header("x-switchyard-class", class)
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!text.contains("\"usage\""), "{class}: {text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{class}: {text}");
        spend_reaches(&stack, endpoint, 2.0 * each).await;
    }
    assert_eq!(stack.mocks[2].stats(&stack.http).await["completed"], 2);
}

/// Anthropic's errors become OpenAI's: a refusal keeps its status with
/// OpenAI's error shape; what cannot be said in Anthropic's API is a clear
/// 400; an overloaded (529) endpoint is failed over like any 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_errors_are_openai_errors_and_overload_fails_over() {
    // The sidecar holds a key the provider does not take.
    let key = std::env::temp_dir().join(format!("switchyard-apis-key-{}", std::process::id()));
    std::fs::write(&key, "sk-ant-wrong\n").unwrap();
    let credential = format!("    credential: file:{}\n", key.display());
    let stack = three_apis_with("errors", &[], &["--api-key", "sk-ant-right"], |p| {
        p.replace(
            "    api: anthropic\n",
            &format!("    api: anthropic\n{credential}"),
        )
    })
    .await;
    let anthropic = &stack.mocks[2];
    let chat = |class: &str, body: Value| {
        stack
            .http
            .post(stack.url("/v1/chat/completions"))
            .header("x-switchyard-class", class)
            .json(&body)
            .send()
    };

    let r = chat(
        "via-anthropic",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        common::header(&r, "x-switchyard-endpoint"),
        "hosted-anthropic"
    );
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["type"].is_string(), "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{e}"
    );
    assert_eq!(anthropic.stats(&stack.http).await["unauthorized"], 1);

    // What Anthropic's API cannot do is refused, naming the parameter.
    let r = chat(
        "via-anthropic",
        json!({"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "untranslatable_request", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("'n'"),
        "{e}"
    );
    std::fs::write(&key, "sk-ant-right\n").unwrap();

    // Overloaded: the on-prem endpoint takes the request instead.
    anthropic
        .configure(&stack.http, json!({"overloaded_ratio": 1.0}))
        .await;
    let policy = std::fs::read_to_string(&stack.policy).unwrap();
    let fallback = policy.replace(
        "  - name: via-anthropic\n    tiers: [fallback]\n",
        "  - name: via-anthropic\n    weights: { hosted-anthropic: 1 }\n",
    );
    assert_ne!(fallback, policy);
    // The new table makes the sidecar read the key file again.
    let version = stack.wait_acked_above(0).await;
    switchyard::cluster::write_atomic(&stack.policy, &fallback).unwrap();
    stack.wait_acked_above(version).await;
    for stream in [false, true] {
        let r = stack
            .http
            .post(stack.url("/v1/chat/completions"))
            .header("x-switchyard-class", "via-anthropic")
            .json(&json!({"model": MODEL, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let endpoint = common::header(&r, "x-switchyard-endpoint");
        assert_ne!(endpoint, "hosted-anthropic", "stream {stream}");
        assert_eq!(common::header(&r, "x-switchyard-attempts"), "2");
    }
    let stats = anthropic.stats(&stack.http).await;
    assert!(stats["faults"]["overloaded"].as_u64() >= Some(2), "{stats}");

    // Overloaded after its 200, as Anthropic often is: `message_start`,
    // then an error event. Nothing of the answer had begun, so the request
    // still fails over, and the app sees one whole stream from the other
    // endpoint.
    anthropic
        .configure(
            &stack.http,
            json!({"overloaded_ratio": 0.0, "overloaded_mid_stream_ratio": 1.0}),
        )
        .await;
    let r = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .header("x-switchyard-class", "via-anthropic")
        .json(&json!({"model": MODEL, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(
        common::header(&r, "x-switchyard-endpoint"),
        "hosted-anthropic"
    );
    assert_eq!(common::header(&r, "x-switchyard-attempts"), "2");
    let text = r.text().await.unwrap();
    assert!(!text.contains("error"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(
        text.matches("\"role\":\"assistant\"").count(),
        1,
        "one answer's start: {text}"
    );
    let stats = anthropic.stats(&stack.http).await;
    assert_eq!(stats["faults"]["overloaded_mid_stream"], 1, "{stats}");
    let _ = std::fs::remove_file(&key);
}

/// A class whose chain goes from an on-prem `openai` endpoint to a hosted
/// `anthropic` one: the on-prem endpoint starts failing in the middle of a
/// load of concurrent requests, streamed and not, and no request fails;
/// the app sees only OpenAI's format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_openai_endpoint_falls_back_to_anthropic_under_load() {
    let stack = three_apis("fallback", &["--inter-token-ms", "1"]).await;
    let policy = std::fs::read_to_string(&stack.policy).unwrap();
    // The default class: on-prem, then Anthropic only (no azure tier).
    let chain = policy.replace(
        "    weights: { onprem-openai: 1 }\n",
        "    weights: { onprem-openai: 1 }\n    tiers: [onprem, fallback]\n",
    );
    assert_ne!(chain, policy);
    let version = stack.wait_acked_above(0).await;
    switchyard::cluster::write_atomic(&stack.policy, &chain).unwrap();
    stack.wait_acked_above(version).await;

    const REQUESTS: usize = 240;
    const CONCURRENCY: usize = 12;
    let onprem = &stack.mocks[0];
    let results = futures::stream::iter(0..REQUESTS)
        .map(|i| {
            let http = stack.http.clone();
            let url = stack.url("/v1/chat/completions");
            // A third of the way in, the on-prem endpoint starts failing.
            let turn_bad = (i == REQUESTS / 3).then(|| onprem.url("/admin/config"));
            async move {
                if let Some(admin) = turn_bad {
                    let r = http
                        .post(admin)
                        .json(&json!({"error_500_ratio": 1.0}))
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success());
                }
                let stream = i % 2 == 0;
                let r = http
                    .post(url)
                    .json(&json!({"model": MODEL, "stream": stream,
                        "messages": [{"role": "user", "content": format!("request {i}")}]}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let endpoint = common::header(&r, "x-switchyard-endpoint");
                let text = r.text().await.unwrap();
                (status, endpoint, stream, text)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let mut by_endpoint = std::collections::BTreeMap::<String, usize>::new();
    for (status, endpoint, stream, text) in &results {
        assert_eq!(*status, 200, "{endpoint}: {text}");
        assert!(!text.contains("\"error\""), "{endpoint}: {text}");
        // OpenAI's shapes only, whoever served.
        if *stream {
            assert!(
                text.trim_end().ends_with("data: [DONE]"),
                "{endpoint}: {text}"
            );
            for data in text
                .split("\n\n")
                .filter_map(|e| e.trim().strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
            {
                let v: Value = serde_json::from_str(data).unwrap();
                assert_eq!(v["object"], "chat.completion.chunk", "{data}");
            }
        } else {
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["object"], "chat.completion", "{text}");
            let words = v["choices"][0]["message"]["content"].as_str().unwrap();
            assert_eq!(words.split(' ').count(), 40, "{text}");
        }
        *by_endpoint.entry(endpoint.clone()).or_default() += 1;
    }
    assert_eq!(by_endpoint.values().sum::<usize>(), REQUESTS);
    assert!(
        by_endpoint
            .get("onprem-openai")
            .is_some_and(|n| *n >= REQUESTS / 4)
            && by_endpoint
                .get("hosted-anthropic")
                .is_some_and(|n| *n >= REQUESTS / 4),
        "{by_endpoint:?}"
    );
    assert!(!by_endpoint.contains_key("burst-azure"), "{by_endpoint:?}");
}

/// Completions and embeddings go through the same classes to the APIs that
/// offer them, with the endpoint's own model id (an Azure deployment); a
/// class that can only reach Anthropic's API gets a clear 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_embeddings_go_only_where_the_api_offers_them() {
    let stack = three_apis("ops", &[]).await;
    let post = |path: &str, class: &str, body: Value| {
        let req = stack
            .http
            .post(stack.url(path))
            .header("x-switchyard-class", class)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let endpoint = common::header(&r, "x-switchyard-endpoint");
            (status, endpoint, r.text().await.unwrap())
        }
    };
    for (class, endpoint, model) in [
        ("via-openai", "onprem-openai", MODEL),
        ("via-azure", "burst-azure", AZURE_DEPLOYMENT),
    ] {
        let (status, served, text) = post(
            "/v1/embeddings",
            class,
            json!({"model": MODEL, "input": ["one", "two"]}),
        )
        .await;
        assert_eq!((status, served.as_str()), (200, endpoint), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["data"].as_array().map(Vec::len), Some(2), "{v}");
        assert_eq!(v["model"], model, "{v}");

        let (status, served, text) = post(
            "/v1/completions",
            class,
            json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5}),
        )
        .await;
        assert_eq!((status, served.as_str()), (200, endpoint), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "text_completion", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");

        // Streamed, with the usage chunk taken out again for an app that
        // did not ask for it.
        let (status, _, text) = post(
            "/v1/completions",
            class,
            json!({"model": MODEL, "prompt": "Once", "max_tokens": 5, "stream": true}),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        assert!(!text.contains("\"usage\""), "{text}");
    }
    // Through the async-openai client too.
    let c = client(&stack, "via-azure");
    let e = c
        .embeddings()
        .create(
            async_openai::types::CreateEmbeddingRequestArgs::default()
                .model(MODEL)
                .input("hello")
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(e.data.len(), 1);
    assert!(e.usage.prompt_tokens > 0);

    for path in ["/v1/embeddings", "/v1/completions"] {
        let (status, _, text) = post(
            path,
            "via-anthropic",
            json!({"model": MODEL, "input": "x", "prompt": "x"}),
        )
        .await;
        assert_eq!(status, 400, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "operation_not_offered", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(MODEL),
            "{v}"
        );
    }
    // A body missing what the operation needs is refused before routing.
    let (status, _, text) = post("/v1/embeddings", "via-openai", json!({"model": MODEL})).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("'input'"), "{text}");
    // Anthropic's mock never saw any of these.
    assert_eq!(stack.mocks[2].requests(&stack.http).await, 0);
}
