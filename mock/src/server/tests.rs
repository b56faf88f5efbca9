//! Each API's shapes, over HTTP, against a mock on a free port.

use super::*;
use crate::behaviour::LineEnding;
use switchyard_wire::anthropic as wire;

/// The `anthropic-version` every request to Anthropic's API carries.
const ANTHROPIC_VERSION: &str = "2023-06-01";

struct Mock {
    base: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn mock(api: Api, key: Option<&str>, behaviour: Behaviour) -> Mock {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = MockConfig {
        name: "m".into(),
        tier: "onprem".into(),
        models: vec!["chat-large".into()],
        behaviour,
        capacity: None,
        api_key: key.map(str::to_owned),
        api,
    };
    tokio::spawn(serve(listener, config, async move {
        let _ = stopped.await;
    }));
    Mock {
        base,
        http: reqwest::Client::new(),
        _stop: stop,
    }
}

impl Mock {
    async fn post(&self, path: &str, headers: &[(&str, &str)], body: Value) -> (u16, Vec<u8>) {
        let mut r = self.http.post(format!("{}{path}", self.base)).json(&body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.bytes().await.unwrap().to_vec())
    }

    async fn json(&self, path: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
        let (status, b) = self.post(path, headers, body).await;
        (status, serde_json::from_slice(&b).unwrap())
    }

    async fn get(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.base)).send().await;
        r.unwrap().json().await.unwrap()
    }

    async fn anthropic(&self, body: Value) -> (u16, Vec<u8>) {
        self.post(
            "/v1/messages",
            &[("x-api-key", "k"), ("anthropic-version", ANTHROPIC_VERSION)],
            body,
        )
        .await
    }
}

const WEATHER_TOOL: &str =
    r#"{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}"#;

/// The data of each event of a stream, comments left out.
fn sse_data(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8(body.to_vec())
        .unwrap()
        .replace("\r\n", "\n")
        .replace('\r', "\n");
    text.split("\n\n")
        .filter_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
        })
        .collect()
}

/// What an OpenAI stream says: its text, its tool call arguments, its
/// finish reason and its usage.
fn read_openai_stream(body: &[u8]) -> (String, String, String, Option<Value>) {
    let (mut text, mut args, mut finish, mut usage) =
        (String::new(), String::new(), String::new(), None);
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        if let Some(a) = c["delta"]["tool_calls"][0]["function"]["arguments"].as_str() {
            args.push_str(a);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    (text, args, finish, usage)
}

fn chat_request(stream: bool, tools: bool) -> Value {
    let mut r = json!({
        "model": "chat-large",
        "max_tokens": 5,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "What is the weather like in Paris today?"}]},
        ],
    });
    if stream {
        r["stream_options"] = json!({"include_usage": true});
    }
    if tools {
        r["tools"] = json!([serde_json::from_str::<Value>(WEATHER_TOOL).unwrap()]);
    }
    r
}

#[tokio::test]
async fn openai_chat_answers_text_or_calls_the_first_tool() {
    let m = mock(Api::OpenAi, None, Behaviour::default()).await;
    let (status, v) = m
        .json("/v1/chat/completions", &[], chat_request(false, false))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        v["choices"][0]["message"]["content"],
        answer_tokens("m", 5).concat()
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // System text and text parts both count: 28 + 40 characters.
    assert_eq!(v["usage"]["prompt_tokens"], 17);

    let (_, v) = m
        .json("/v1/chat/completions", &[], chat_request(false, true))
        .await;
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], TOOL_INPUT);
    let recorded = m
        .get(&format!("/admin/completions/{}", v["id"].as_str().unwrap()))
        .await;
    assert_eq!(recorded["content"], TOOL_INPUT);

    let (_, body) = m
        .post("/v1/chat/completions", &[], chat_request(true, true))
        .await;
    let (text, args, finish, usage) = read_openai_stream(&body);
    assert_eq!(
        (text.as_str(), args.as_str(), finish.as_str()),
        ("", TOOL_INPUT, "tool_calls")
    );
    assert_eq!(usage.unwrap()["completion_tokens"], 3);

    // With the tool's result last, the answer is text again.
    let mut r = chat_request(false, true);
    r["messages"].as_array_mut().unwrap().extend([
        json!({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": TOOL_INPUT}}]}),
        json!({"role": "tool", "tool_call_id": "c", "content": "sunny"}),
    ]);
    let (_, v) = m.json("/v1/chat/completions", &[], r).await;
    assert_eq!(
        v["choices"][0]["message"]["content"],
        answer_tokens("m", 5).concat()
    );
}

#[tokio::test]
async fn anthropic_wants_its_headers_and_max_tokens() {
    let m = mock(Api::Anthropic, Some("k"), Behaviour::default()).await;
    let body =
        json!({"model": "c", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let (status, v) = m
        .json(
            "/v1/messages",
            &[
                ("x-api-key", "nope"),
                ("anthropic-version", ANTHROPIC_VERSION),
            ],
            body.clone(),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let (status, v) = m
        .json("/v1/messages", &[("x-api-key", "k")], body.clone())
        .await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    let (status, v) = m
        .json(
            "/v1/messages",
            &[("x-api-key", "k"), ("anthropic-version", ANTHROPIC_VERSION)],
            json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    let (status, _) = m.anthropic(body).await;
    assert_eq!(status, 200);
    // Not the OpenAI routes.
    let (status, _) = m
        .post("/v1/chat/completions", &[], chat_request(false, false))
        .await;
    assert_eq!(status, 404);
    let stats = m.get("/admin/stats").await;
    assert_eq!(
        (stats["messages"].as_u64(), stats["unauthorized"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(stats["api"], "anthropic");
}

#[tokio::test]
async fn anthropic_answers_in_its_shape_with_cache_usage() {
    let b = Behaviour {
        cached_tokens: 5,
        cache_write_tokens: 4,
        ..Behaviour::default()
    };
    let m = mock(Api::Anthropic, None, b).await;
    let req = wire::request(
        &serde_json::to_vec(&chat_request(false, false)).unwrap(),
        "claude",
        64,
    )
    .unwrap();
    let (status, body) = m.anthropic(serde_json::from_slice(&req).unwrap()).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": answer_tokens("m", 5).concat()}])
    );
    assert_eq!(v["stop_reason"], "max_tokens");
    // 17 prompt tokens, as the OpenAI route counts them: 5 read, 4 written, 8 plain.
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 8, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 4, "output_tokens": 5})
    );
    let (openai, tokens) = wire::answer(&body, 0).unwrap();
    let o: Value = serde_json::from_slice(&openai).unwrap();
    assert_eq!(o["usage"]["prompt_tokens"], 17);
    assert_eq!((tokens.cached_input, tokens.cache_write), (5, 4));
    let recorded = m
        .get(&format!("/admin/completions/{}", v["id"].as_str().unwrap()))
        .await;
    assert_eq!(recorded["content"], answer_tokens("m", 5).concat());
}

/// The same OpenAI request, sent to an OpenAI mock as it is and to an
/// Anthropic mock translated, says the same once translated back:
/// streamed and not, text and tool calls.
#[tokio::test]
async fn translated_anthropic_answers_equal_openai_ones() {
    let b = Behaviour {
        sse_line_ending: LineEnding::Crlf,
        sse_keep_alive: true,
        ..Behaviour::default()
    };
    let o = mock(Api::OpenAi, None, b.clone()).await;
    let a = mock(Api::Anthropic, None, b).await;
    for tools in [false, true] {
        let req = chat_request(false, tools);
        let (_, native) = o.json("/v1/chat/completions", &[], req.clone()).await;
        let sent = wire::request(&serde_json::to_vec(&req).unwrap(), "claude", 64).unwrap();
        let (_, body) = a.anthropic(serde_json::from_slice(&sent).unwrap()).await;
        let (translated, _) = wire::answer(&body, 0).unwrap();
        let translated: Value = serde_json::from_slice(&translated).unwrap();
        let (n, t) = (&native["choices"][0], &translated["choices"][0]);
        assert_eq!(n["finish_reason"], t["finish_reason"], "tools {tools}");
        assert_eq!(n["message"]["content"], t["message"]["content"]);
        assert_eq!(
            n["message"]["tool_calls"][0]["function"],
            t["message"]["tool_calls"][0]["function"]
        );
        assert_eq!(
            native["usage"]["prompt_tokens"],
            translated["usage"]["prompt_tokens"]
        );
        assert_eq!(
            native["usage"]["completion_tokens"],
            translated["usage"]["completion_tokens"]
        );

        let req = chat_request(true, tools);
        let (_, native) = o.post("/v1/chat/completions", &[], req.clone()).await;
        let sent = wire::request(&serde_json::to_vec(&req).unwrap(), "claude", 64).unwrap();
        let (_, body) = a.anthropic(serde_json::from_slice(&sent).unwrap()).await;
        assert!(body.windows(2).any(|w| w == b"\r\n"), "CRLF as configured");
        let mut s = wire::Stream::new(0);
        let mut translated = s.push(Bytes::from(body)).to_vec();
        translated.extend_from_slice(&s.end());
        assert!(s.complete());
        let (nt, na, nf, nu) = read_openai_stream(&native);
        let (tt, ta, tf, tu) = read_openai_stream(&translated);
        assert_eq!((nt, na, nf), (tt, ta, tf), "tools {tools}");
        let (nu, tu) = (nu.unwrap(), tu.unwrap());
        assert_eq!(nu["prompt_tokens"], tu["prompt_tokens"]);
        assert_eq!(nu["completion_tokens"], tu["completion_tokens"]);
    }
}

#[tokio::test]
async fn anthropic_streams_its_events_in_order() {
    let m = mock(Api::Anthropic, None, Behaviour::default()).await;
    let (_, body) = m
        .anthropic(json!({"model": "c", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    let text = String::from_utf8(body).unwrap();
    let kinds: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("event: ")))
        .collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", 16));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(kinds, expected);
    let data = sse_data(text.as_bytes());
    let delta: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 16);

    // A tool call's input arrives in pieces; a tool result gets text.
    let tools = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let (_, body) = m
        .anthropic(
            json!({"model": "c", "max_tokens": 100, "stream": true, "tools": tools,
            "messages": [{"role": "user", "content": "weather?"}]}),
        )
        .await;
    let pieces: String = sse_data(&body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["delta"]["partial_json"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(pieces, TOOL_INPUT);
    let (_, body) = m
        .anthropic(json!({"model": "c", "max_tokens": 100, "tools": tools, "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "sunny"}]},
        ]}))
        .await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["content"][0]["type"], "text");
}

#[tokio::test]
async fn anthropic_faults_take_its_error_shape() {
    let m = mock(
        Api::Anthropic,
        None,
        Behaviour {
            overloaded_ratio: 1.0,
            ..Behaviour::default()
        },
    )
    .await;
    let body =
        json!({"model": "c", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let (status, b) = m.anthropic(body.clone()).await;
    assert_eq!(status, 529);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    let e: Value = serde_json::from_slice(&wire::error_body(status, &b)).unwrap();
    assert_eq!(e["error"]["type"], "overloaded_error");
    let m = mock(
        Api::Anthropic,
        None,
        Behaviour {
            error_429_ratio: 1.0,
            ..Behaviour::default()
        },
    )
    .await;
    let resp = m
        .http
        .post(format!("{}/v1/messages", m.base))
        .header("anthropic-version", ANTHROPIC_VERSION)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let stats = m.get("/admin/stats").await;
    assert_eq!(stats["faults"]["429"], 1);
}

#[tokio::test]
async fn azure_speaks_deployments_api_versions_and_api_keys() {
    let m = mock(Api::Azure, Some("k"), Behaviour::default()).await;
    let path = "/openai/deployments/gpt-4o-prod/chat/completions";
    let (status, v) = m
        .json(path, &[("api-key", "k")], chat_request(false, false))
        .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "MissingApiVersionParameter");
    let versioned = format!("{path}?api-version=2024-10-21");
    let (status, _) = m
        .json(
            &versioned,
            &[("authorization", "Bearer k")],
            chat_request(false, false),
        )
        .await;
    assert_eq!(status, 401, "Azure wants api-key");
    let (status, v) = m
        .json(&versioned, &[("api-key", "k")], chat_request(false, false))
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["model"], "gpt-4o-prod");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        answer_tokens("m", 5).concat()
    );
    let (_, body) = m
        .post(&versioned, &[("api-key", "k")], chat_request(true, false))
        .await;
    let (text, _, finish, usage) = read_openai_stream(&body);
    assert_eq!(
        (text, finish.as_str()),
        (answer_tokens("m", 5).concat(), "length")
    );
    assert!(usage.is_some());
    let (status, v) = m
        .json(
            "/openai/deployments/emb/embeddings?api-version=2024-10-21",
            &[("api-key", "k")],
            json!({"model": "x", "input": "hello"}),
        )
        .await;
    assert_eq!((status, v["model"].as_str()), (200, Some("emb")));
    let (status, v) = m
        .json(
            "/openai/deployments/inst/completions?api-version=2024-10-21",
            &[("api-key", "k")],
            json!({"model": "x", "prompt": "Say"}),
        )
        .await;
    assert_eq!((status, v["model"].as_str()), (200, Some("inst")));
    // The probe's route takes the Azure header too.
    let r = m
        .http
        .get(format!("{}/v1/models", m.base))
        .header("api-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn embeddings_have_openais_shape() {
    let m = mock(Api::OpenAi, None, Behaviour::default()).await;
    let (status, v) = m
        .json(
            "/v1/embeddings",
            &[],
            json!({"model": "e", "input": ["hello world!", "bye", [1, 2, 3]]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "e");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(
            (d["object"].as_str(), d["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
        assert_eq!(
            d["embedding"].as_array().unwrap().len(),
            embeddings::DIMENSIONS
        );
    }
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    // 3 + 1 + 3 tokens.
    assert_eq!(v["usage"], json!({"prompt_tokens": 7, "total_tokens": 7}));
    let (_, again) = m
        .json(
            "/v1/embeddings",
            &[],
            json!({"model": "e", "input": "hello world!"}),
        )
        .await;
    assert_eq!(
        again["data"][0]["embedding"], data[0]["embedding"],
        "deterministic"
    );
    let (_, b64) = m
        .json(
            "/v1/embeddings",
            &[],
            json!({"model": "e", "input": "x", "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(
        b64["data"][0]["embedding"].as_str().unwrap().len(),
        44,
        "32 bytes"
    );
    let (status, _) = m
        .json("/v1/embeddings", &[], json!({"model": "e", "input": []}))
        .await;
    assert_eq!(status, 400);
    let m = mock(
        Api::OpenAi,
        None,
        Behaviour {
            error_500_ratio: 1.0,
            ..Behaviour::default()
        },
    )
    .await;
    let (status, _) = m
        .json("/v1/embeddings", &[], json!({"model": "e", "input": "x"}))
        .await;
    assert_eq!(status, 500);
    assert_eq!(m.get("/admin/stats").await["embeddings"], 1);
}

#[tokio::test]
async fn legacy_completions_answer_the_chat_tokens_streamed_or_not() {
    let m = mock(Api::OpenAi, None, Behaviour::default()).await;
    let (status, v) = m
        .json(
            "/v1/completions",
            &[],
            json!({"model": "i", "prompt": "Once upon a time"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let c = &v["choices"][0];
    assert_eq!(c["text"], answer_tokens("m", 16).concat());
    assert_eq!(
        (c["index"].as_u64(), c["finish_reason"].as_str()),
        (Some(0), Some("stop"))
    );
    assert!(c["logprobs"].is_null());
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20})
    );
    let recorded = m
        .get(&format!("/admin/completions/{}", v["id"].as_str().unwrap()))
        .await;
    assert_eq!(recorded["content"], answer_tokens("m", 16).concat());

    let (_, body) = m
        .post(
            "/v1/completions",
            &[],
            json!({"model": "i", "prompt": ["a", "b"], "max_tokens": 3,
            "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, answer_tokens("m", 3).concat());
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 3);
    assert_eq!(m.get("/admin/stats").await["completions"], 2);
}
