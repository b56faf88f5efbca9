use super::*;
use proptest::prelude::*;
use serde_json::json;

fn translate(req: Value) -> Value {
    let body = serde_json::to_vec(&req).unwrap();
    let out = request(&body, "claude-x", 1024).unwrap();
    serde_json::from_slice(&out).unwrap()
}

fn refused(req: Value) -> Invalid {
    request(&serde_json::to_vec(&req).unwrap(), "claude-x", 1024).unwrap_err()
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

#[test]
fn a_plain_request_keeps_its_conversation_and_takes_the_callers_model() {
    let v = translate(json!({
        "model": "chat-large",
        "messages": [user("hi"), {"role": "assistant", "content": "hello"}, user("again")],
    }));
    assert_eq!(
        v,
        json!({
            "model": "claude-x",
            "max_tokens": 1024,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"},
            ],
        })
    );
}

#[test]
fn system_and_developer_messages_become_the_system_prompt() {
    let v = translate(json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "kind"}]},
            user("hi"),
            {"role": "system", "content": "late"},
        ],
    }));
    assert_eq!(v["system"], "be brief\n\nbe kind\n\nlate");
    assert_eq!(v["messages"], json!([{"role": "user", "content": "hi"}]));
    // An image in a system message cannot be honoured.
    let e = refused(json!({"model": "m", "messages": [
        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        user("hi"),
    ]}));
    assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
}

#[test]
fn content_parts_become_text_and_image_blocks() {
    let v = translate(
        json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            {"type": "image_url", "image_url": "HTTP://example.com/dog.jpg"},
        ]}]}),
    );
    assert_eq!(
        v["messages"][0]["content"],
        json!([
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            {"type": "image", "source": {"type": "url", "url": "HTTP://example.com/dog.jpg"}},
        ])
    );
    for (url, ok) in [
        ("data:image/jpeg;charset=x;base64,AAAA", true),
        ("data:image/png,AAAA", false),
        ("data:;base64,AAAA", false),
        ("data:image/png;base64", false),
        ("ftp://x/y.png", false),
        ("file:///etc/passwd", false),
        ("", false),
    ] {
        let req = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]});
        match request(&serde_json::to_vec(&req).unwrap(), "c", 1) {
            Ok(b) => {
                assert!(ok, "{url}");
                let v: Value = serde_json::from_slice(&b).unwrap();
                assert_eq!(
                    v["messages"][0]["content"][0]["source"]["media_type"],
                    "image/jpeg"
                );
            }
            Err(e) => {
                assert!(!ok, "{url}");
                assert_eq!(
                    e.param.as_deref(),
                    Some("messages[0].content[0].image_url.url"),
                    "{url}"
                );
            }
        }
    }
    let e = refused(
        json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}),
    );
    assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
    assert_eq!(e.code, Some("unsupported_value"));
}

#[test]
fn tool_calls_and_results_round_trip_and_results_share_one_user_turn() {
    let v = translate(json!({"model": "m", "messages": [
        user("weather in Paris and Rome?"),
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Rome\"}"}},
            {"id": "call_3", "type": "function", "function": {"name": "now", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
        {"role": "tool", "tool_call_id": "call_3", "content": ""},
        user("thanks"),
    ]}));
    assert_eq!(
        v["messages"],
        json!([
            {"role": "user", "content": "weather in Paris and Rome?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"location": "Rome"}},
                {"type": "tool_use", "id": "call_3", "name": "now", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
                {"type": "tool_result", "tool_use_id": "call_3"},
                {"type": "text", "text": "thanks"},
            ]},
        ])
    );
    // Text beside the calls comes first, as the assistant said it.
    let v = translate(json!({"model": "m", "messages": [user("q"),
        {"role": "assistant", "content": "let me look", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}));
    assert_eq!(
        v["messages"][1]["content"][0],
        json!({"type": "text", "text": "let me look"})
    );
    assert_eq!(v["messages"][1]["content"][1]["type"], "tool_use");
}

#[test]
fn unreadable_tool_arguments_are_refused_naming_them() {
    for args in ["{\"location\":", "[1]", "\"s\""] {
        let e = refused(json!({"model": "m", "messages": [user("q"),
            {"role": "assistant", "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "f", "arguments": args}}]}]}));
        assert_eq!(
            e.param.as_deref(),
            Some("messages[1].tool_calls[1].function.arguments"),
            "{args}"
        );
        assert_eq!(e.code, Some("invalid_value"));
    }
}

#[test]
fn consecutive_messages_of_one_role_are_merged() {
    let v = translate(json!({"model": "m", "messages": [
        user("a"), user("b"),
        {"role": "assistant", "content": "c"}, {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "d"},
    ]}));
    assert_eq!(
        v["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
        ])
    );
    // Nothing left for the provider: refused here, not by it.
    let e = refused(json!({"model": "m", "messages": [{"role": "system", "content": "s"}]}));
    assert_eq!(e.param.as_deref(), Some("messages"));
}

#[test]
fn limits_stops_and_sampling_are_carried_over() {
    let base = || json!({"model": "m", "messages": [user("q")]});
    let with = |k: &str, v: Value| {
        let mut r = base();
        r[k] = v;
        translate(r)
    };
    assert_eq!(translate(base())["max_tokens"], 1024);
    assert_eq!(with("max_tokens", json!(7))["max_tokens"], 7);
    assert_eq!(with("max_completion_tokens", json!(9))["max_tokens"], 9);
    assert_eq!(with("max_tokens", Value::Null)["max_tokens"], 1024);
    assert_eq!(with("stop", json!("END"))["stop_sequences"], json!(["END"]));
    assert_eq!(
        with("stop", json!(["a", "", "b"]))["stop_sequences"],
        json!(["a", "b"])
    );
    assert!(with("stop", json!([])).get("stop_sequences").is_none());
    assert_eq!(with("temperature", json!(0.3))["temperature"], 0.3);
    assert_eq!(with("temperature", json!(1.7))["temperature"], 1.0);
    assert_eq!(with("temperature", json!(0))["temperature"], 0.0);
    assert_eq!(with("top_p", json!(0.9))["top_p"], 0.9);
    // Not both: recent models refuse that; the temperature stays.
    let mut both = base();
    both["temperature"] = json!(1.0);
    both["top_p"] = json!(1.0);
    let both = translate(both);
    assert_eq!(both["temperature"], 1.0);
    assert!(both.get("top_p").is_none(), "{both}");
    // A text response format is the default; a JSON one cannot be kept.
    assert!(with("response_format", json!({"type": "text"}))
        .get("response_format")
        .is_none());
    let mut json_format = base();
    json_format["response_format"] = json!({"type": "json_object"});
    assert_eq!(
        refused(json_format).param.as_deref(),
        Some("response_format")
    );
    assert_eq!(with("stream", json!(true))["stream"], true);
    assert_eq!(
        with("user", json!("u-1"))["metadata"],
        json!({"user_id": "u-1"})
    );
    // OpenAI-only fields are dropped.
    let mut r = base();
    for (k, v) in [
        ("stream_options", json!({"include_usage": true})),
        ("n", json!(1)),
        ("logprobs", json!(false)),
        ("seed", json!(4)),
        ("response_format", json!({"type": "text"})),
        ("frequency_penalty", json!(0.5)),
        ("presence_penalty", json!(0.5)),
        ("logit_bias", json!({})),
        ("store", json!(false)),
    ] {
        r[k] = v;
    }
    let v = translate(r);
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["max_tokens", "messages", "model"]);
    // What cannot be honoured, or is not the type it must be.
    for (k, bad, param) in [
        ("n", json!(2), "n"),
        ("max_tokens", json!(-1), "max_tokens"),
        ("max_tokens", json!(1.5), "max_tokens"),
        ("max_completion_tokens", json!("9"), "max_completion_tokens"),
        ("stop", json!(5), "stop"),
        ("stop", json!(["a", 1]), "stop[1]"),
        ("temperature", json!("hot"), "temperature"),
        ("top_p", json!([]), "top_p"),
        ("stream", json!("yes"), "stream"),
        ("user", json!(5), "user"),
        ("messages", json!({}), "messages"),
    ] {
        let mut r = base();
        r[k] = bad;
        assert_eq!(refused(r).param.as_deref(), Some(param), "{k}");
    }
}

#[test]
fn tools_and_tool_choice_are_mapped() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}, "strict": true}},
        {"type": "function", "function": {"name": "now"}},
    ]);
    let with = |choice: Option<Value>, parallel: Option<bool>| {
        let mut r = json!({"model": "m", "messages": [user("q")], "tools": tools});
        if let Some(c) = choice {
            r["tool_choice"] = c;
        }
        if let Some(p) = parallel {
            r["parallel_tool_calls"] = p.into();
        }
        translate(r)
    };
    let v = with(None, None);
    assert_eq!(
        v["tools"],
        json!([
            {"name": "get_weather", "description": "Weather now",
                "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}},
            {"name": "now", "input_schema": {"type": "object"}},
        ])
    );
    assert!(v.get("tool_choice").is_none());
    assert_eq!(
        with(Some(json!("auto")), None)["tool_choice"],
        json!({"type": "auto"})
    );
    assert_eq!(
        with(Some(json!("none")), None)["tool_choice"],
        json!({"type": "none"})
    );
    assert_eq!(
        with(Some(json!("required")), None)["tool_choice"],
        json!({"type": "any"})
    );
    assert_eq!(
        with(
            Some(json!({"type": "function", "function": {"name": "now"}})),
            None
        )["tool_choice"],
        json!({"type": "tool", "name": "now"})
    );
    assert_eq!(
        with(None, Some(false))["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        with(Some(json!("required")), Some(false))["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        with(Some(json!("none")), Some(false))["tool_choice"],
        json!({"type": "none"})
    );
    assert!(with(None, Some(true)).get("tool_choice").is_none());
    // Without tools a choice means nothing, and is not sent.
    let v = translate(
        json!({"model": "m", "messages": [user("q")], "tool_choice": "auto", "parallel_tool_calls": false}),
    );
    assert!(v.get("tool_choice").is_none() && v.get("tools").is_none());
    for (tools, choice, param) in [
        (
            json!([{"type": "code_interpreter"}]),
            json!("auto"),
            "tools[0].type",
        ),
        (
            json!([{"type": "function"}]),
            json!("auto"),
            "tools[0].function",
        ),
        (
            json!([{"type": "function", "function": {}}]),
            json!("auto"),
            "tools[0].function.name",
        ),
        (
            json!([{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
            json!("auto"),
            "tools[0].function.parameters",
        ),
        (json!({}), json!("auto"), "tools"),
        (tools.clone(), json!("sometimes"), "tool_choice"),
        (
            tools.clone(),
            json!({"type": "function"}),
            "tool_choice.function.name",
        ),
        (tools.clone(), json!(3), "tool_choice"),
    ] {
        let r =
            json!({"model": "m", "messages": [user("q")], "tools": tools, "tool_choice": choice});
        assert_eq!(refused(r).param.as_deref(), Some(param));
    }
}

#[test]
fn bad_shapes_are_refused_naming_the_parameter() {
    for (body, param) in [
        (json!({"model": "m"}), Some("messages")),
        (json!({"model": "m", "messages": [5]}), Some("messages[0]")),
        (
            json!({"model": "m", "messages": [{}]}),
            Some("messages[0].role"),
        ),
        (
            json!({"model": "m", "messages": [{"role": 1}]}),
            Some("messages[0].role"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "function", "content": "x"}]}),
            Some("messages[0].role"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
            Some("messages[0].content"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": [5]}]}),
            Some("messages[0].content[0]"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            Some("messages[0].content[0].text"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]}),
            Some("messages[0].content[0].type"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
            Some("messages[0].tool_call_id"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": {}}]}),
            Some("messages[0].tool_calls"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"type": "function"}]}]}),
            Some("messages[0].tool_calls[0].id"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"arguments": "{}"}}]}]}),
            Some("messages[0].tool_calls[0].function.name"),
        ),
        (json!([1]), None),
    ] {
        assert_eq!(refused(body.clone()).param.as_deref(), param, "{body}");
    }
    assert_eq!(request(b"{", "m", 1).unwrap_err().param, None);
}

fn anthropic_answer(content: Value, stop: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 30,
                  "cache_creation_input_tokens": 40, "cache_creation": {"ephemeral_5m_input_tokens": 40}},
    }))
    .unwrap()
}

#[test]
fn an_answer_becomes_a_chat_completion_with_its_usage() {
    let body = anthropic_answer(
        json!([
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Hello"},
            {"type": "text", "text": ", world"},
        ]),
        "end_turn",
    );
    let (out, tokens) = answer(&body, 1_700_000_000).unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v,
        json!({
            "id": "msg_01", "object": "chat.completion", "created": 1_700_000_000u64,
            "model": "claude-sonnet-4-5",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello, world", "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 80, "completion_tokens": 20, "total_tokens": 100,
                      "prompt_tokens_details": {"cached_tokens": 30}},
        })
    );
    assert_eq!(
        tokens,
        Tokens {
            input: 80,
            output: 20,
            cached_input: 30,
            cache_write: 40
        }
    );
    // What the proxy's usage reader finds in the answer is the same.
    let found = crate::usage::of_answer(&out).unwrap();
    assert_eq!(
        (found.input, found.output, found.cached_input),
        (80, 20, 30)
    );
}

#[test]
fn tool_use_blocks_become_tool_calls() {
    let body = anthropic_answer(
        json!([
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
        ]),
        "tool_use",
    );
    let (out, _) = answer(&body, 0).unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], Value::Null);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        m["tool_calls"],
        json!([
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
            {"id": "toolu_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
        ])
    );
}

#[test]
fn stop_reasons_map_to_finish_reasons() {
    for (stop, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ] {
        let (out, _) = answer(&anthropic_answer(json!([]), stop), 0).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], finish, "{stop}");
    }
}

#[test]
fn what_is_not_a_message_is_untranslatable() {
    for body in [
        &b""[..],
        b"{}",
        b"[]",
        br#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
        br#"{"type":"message","content":"x","usage":{}}"#,
        br#"{"type":"message","content":[]}"#,
        br#"{"type":"message","content":[{"type":"text"}],"usage":{}}"#,
        br#"{"type":"message","content":[{"type":"tool_use","name":"f"}],"usage":{}}"#,
    ] {
        let e = answer(body, 0).unwrap_err();
        assert!(!e.to_string().is_empty());
    }
    // The least a Messages answer can be.
    let (out, t) = answer(br#"{"content":[],"usage":{}}"#, 0).unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(t, Tokens::default());
}

#[test]
fn errors_take_openais_shape() {
    let out = error_body(
        529,
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "Overloaded", "type": "overloaded_error", "param": null, "code": null}})
    );
    for (status, kind) in [
        (502, "server_error"),
        (429, "rate_limit_error"),
        (400, "invalid_request_error"),
    ] {
        let v: Value =
            serde_json::from_slice(&error_body(status, b"<html>bad gateway</html>")).unwrap();
        assert_eq!(v["error"]["type"], kind);
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(&status.to_string()), "{m}");
        assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
    }
}

/// A stream as Anthropic sends it: thinking first, then text, then a tool
/// call whose input arrives in pieces.
const RECORDED: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":100,"cache_read_input_tokens":50,"output_tokens":2}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"The user wants the weather."}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Okay"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":", let's check the weather for \"San Francisco\" 🌁:"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":" \"San Francisco, CA\""}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":", \"unit\": \"fahrenheit\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: some_future_event
data: {"type":"some_future_event","x":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"#;

fn whole(stream: &[u8]) -> (Vec<u8>, Stream) {
    let mut s = Stream::new(42);
    let mut out = s.push(Bytes::copy_from_slice(stream)).to_vec();
    out.extend_from_slice(&s.end());
    (out, s)
}

/// The data of every event of an OpenAI stream, comments left out.
fn events(out: &[u8]) -> Vec<String> {
    String::from_utf8(out.to_vec())
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            assert!(!e.contains('\r'), "LF line endings only");
            e.to_owned()
        })
        .collect()
}

#[test]
fn a_recorded_stream_becomes_openai_chunks_one_for_one() {
    let (out, s) = whole(RECORDED.as_bytes());
    let evs = events(&out);
    let data: Vec<Value> = evs
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    for d in &data {
        assert_eq!(d["id"], "msg_014p7gG3wDgGV9EUtLvnow3U");
        assert_eq!(d["object"], "chat.completion.chunk");
        assert_eq!(d["created"], 42);
        assert_eq!(d["model"], "claude-sonnet-4-5-20250929");
    }
    let deltas: Vec<&Value> = data
        .iter()
        .filter_map(|d| d["choices"].as_array().and_then(|c| c.first()))
        .collect();
    assert_eq!(
        deltas
            .iter()
            .map(|c| c["delta"].clone())
            .collect::<Vec<_>>(),
        vec![
            json!({"role": "assistant", "content": ""}),
            json!({"content": "Okay"}),
            json!({"content": ", let's check the weather for \"San Francisco\" 🌁:"}),
            json!({"tool_calls": [{"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\":"}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": " \"San Francisco, CA\""}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": ", \"unit\": \"fahrenheit\"}"}}]}),
            json!({}),
        ]
    );
    let finishes: Vec<&Value> = deltas.iter().map(|c| &c["finish_reason"]).collect();
    assert!(finishes[..8].iter().all(|f| f.is_null()));
    assert_eq!(finishes[8], "tool_calls");
    // The arguments, joined, are the tool's input.
    let args: String = deltas
        .iter()
        .filter_map(|c| c["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"location": "San Francisco, CA", "unit": "fahrenheit"})
    );
    // The ping is a comment; the end is the usage chunk, then [DONE].
    assert!(evs.contains(&": ping".to_owned()));
    let usage = &data.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 622, "completion_tokens": 89, "total_tokens": 711,
               "prompt_tokens_details": {"cached_tokens": 50}})
    );
    assert_eq!(evs.last().unwrap(), "data: [DONE]");
    assert!(s.complete());
    assert_eq!(s.failed(), None);
    assert_eq!(
        s.tokens(),
        Some(Tokens {
            input: 622,
            output: 89,
            cached_input: 50,
            cache_write: 100
        })
    );
}

#[test]
fn a_stream_cut_anywhere_or_with_any_line_ending_translates_the_same() {
    let (expected, _) = whole(RECORDED.as_bytes());
    for eol in ["\n", "\r\n", "\r"] {
        let text = RECORDED.replace('\n', eol);
        let bytes = text.as_bytes();
        let (got, _) = whole(bytes);
        assert_eq!(got, expected, "{eol:?}");
        for at in 0..=bytes.len() {
            let mut s = Stream::new(42);
            let mut out = s.push(Bytes::copy_from_slice(&bytes[..at])).to_vec();
            out.extend_from_slice(&s.push(Bytes::copy_from_slice(&bytes[at..])));
            out.extend_from_slice(&s.end());
            assert_eq!(out, expected, "cut at {at} ({eol:?})");
            assert!(s.complete());
        }
        // Byte by byte: every event comes out as soon as it is whole.
        let mut s = Stream::new(42);
        let mut out = Vec::new();
        for b in bytes {
            out.extend_from_slice(&s.push(Bytes::copy_from_slice(&[*b])));
        }
        out.extend_from_slice(&s.end());
        assert_eq!(out, expected, "byte by byte ({eol:?})");
    }
}

#[test]
fn events_come_out_as_soon_as_they_are_whole() {
    let mut s = Stream::new(0);
    assert_eq!(s.tokens(), None);
    let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"c\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n";
    let (a, b) = start.split_at(30);
    assert!(
        s.push(Bytes::from(a.to_owned())).is_empty(),
        "half an event"
    );
    let out = s.push(Bytes::from(b.to_owned()));
    assert!(out.starts_with(b"data: {") && out.ends_with(b"\n\n"));
    assert_eq!(
        s.tokens(),
        Some(Tokens {
            input: 5,
            output: 1,
            ..Tokens::default()
        })
    );
    assert!(!s.complete());
    // A BOM-free comment and an event without data: nothing.
    assert!(s
        .push(Bytes::from_static(b": hi\n\nevent: x\n\n"))
        .is_empty());
}

#[test]
fn an_error_event_is_passed_on_in_openais_shape_and_ends_the_stream() {
    let mut s = Stream::new(0);
    let out = s.push(Bytes::from_static(
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{\"input_tokens\":3,\"output_tokens\":0}}}\n\n\
          event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n\
          event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"late\"}}\n\n",
    ));
    let evs = events(&out);
    assert_eq!(evs.len(), 2, "{evs:?}");
    let e: Value = serde_json::from_str(evs[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(
        e,
        json!({"error": {"message": "Overloaded", "type": "overloaded_error", "param": null, "code": null}})
    );
    assert_eq!(s.failed(), Some("Overloaded"));
    assert_eq!(s.failure_kind(), Some("overloaded_error"));
    assert_eq!(status_of("overloaded_error"), 529);
    assert_eq!(status_of("rate_limit_error"), 429);
    assert_eq!(status_of("something_new"), 500);
    assert!(!s.begun(), "nothing of the answer went out");
    assert!(!s.complete());
    assert_eq!(s.tokens().map(|t| t.input), Some(3));
    // A second error (or an event too large) adds no second error event.
    let more = s.push(Bytes::from_static(
        b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"again\"}}\n\n",
    ));
    assert!(more.is_empty());
    assert_eq!(s.failure_kind(), Some("overloaded_error"));
}

#[test]
fn the_answer_begins_with_its_first_token_or_tool_call_not_its_start() {
    let start = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{\"input_tokens\":3,\"output_tokens\":0}}}\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\n";
    let mut s = Stream::new(0);
    let _ = s.push(Bytes::from_static(start));
    assert!(!s.begun());
    let _ = s.push(Bytes::from_static(
        b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    ));
    assert!(!s.begun(), "an empty text block says nothing yet");
    let _ = s.push(Bytes::from_static(
        b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
    ));
    assert!(s.begun());
}

/// The arguments a streamed tool call's deltas add up to.
fn streamed_arguments(stream: &str) -> String {
    let (out, _) = whole(stream.as_bytes());
    events(&out)
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .flat_map(|v| {
            v["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|t| t["function"]["arguments"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_streamed_tool_call_always_adds_up_to_json_arguments() {
    let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\"}}\n\n";
    let stop = "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n";
    // A tool without parameters: one empty delta.
    let none = format!(
        "{start}event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"now\",\"input\":{{}}}}}}\n\n\
         event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}}}\n\n{stop}"
    );
    assert_eq!(streamed_arguments(&none), "{}");
    // Arguments given whole at the start, no deltas.
    let given = format!(
        "{start}event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"w\",\"input\":{{\"city\":\"Oslo\"}}}}}}\n\n{stop}"
    );
    let args: Value = serde_json::from_str(&streamed_arguments(&given)).unwrap();
    assert_eq!(args, json!({"city": "Oslo"}));
    // The usual case is untouched: the deltas, nothing added.
    let deltas = format!(
        "{start}event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"w\",\"input\":{{}}}}}}\n\n\
         event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"input_json_delta\",\"partial_json\":\"{{\\\"a\\\": 1}}\"}}}}\n\n{stop}"
    );
    assert_eq!(streamed_arguments(&deltas), "{\"a\": 1}");
}

#[test]
fn a_last_event_left_open_is_still_translated_at_the_end() {
    let mut s = Stream::new(0);
    let out = s.push(Bytes::from_static(b"data: {\"type\":\"message_stop\"}\n"));
    assert!(out.is_empty());
    let end = s.end();
    assert!(end.ends_with(b"data: [DONE]\n\n"));
    assert!(s.complete());
    // Half an event is no event.
    let mut s = Stream::new(0);
    s.push(Bytes::from_static(b"data: {\"type\":\"message_st"));
    assert!(s.end().is_empty());
    assert!(!s.complete());
}

#[test]
fn cumulative_usage_in_message_delta_replaces_what_message_start_said() {
    let (_, s) = whole(
        b"data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
          data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"input_tokens\":4,\"cache_read_input_tokens\":6,\"output_tokens\":9}}\n\n",
    );
    assert_eq!(
        s.tokens(),
        Some(Tokens {
            input: 10,
            output: 9,
            cached_input: 6,
            cache_write: 0
        })
    );
    assert!(!s.complete(), "no message_stop");
}

#[test]
fn the_translated_stream_reads_as_openai_to_the_proxys_usage_scan() {
    let (out, s) = whole(RECORDED.as_bytes());
    let mut scan = crate::usage::UsageScan::sse(true);
    let passed = scan.pass(Bytes::from(out.clone()));
    let t = scan.finish().unwrap();
    let expected = s.tokens().unwrap();
    assert_eq!(
        (t.input, t.output, t.cached_input),
        (expected.input, expected.output, expected.cached_input)
    );
    // Stripped when the app did not ask: everything else is untouched.
    assert!(passed.len() < out.len());
    assert!(!String::from_utf8_lossy(&passed).contains("\"choices\":[]"));
}

proptest! {
    #[test]
    fn nothing_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
        status in any::<u16>(),
    ) {
        let _ = request(&bytes, "m", 16);
        let _ = answer(&bytes, 0);
        let e: Value = serde_json::from_slice(&error_body(status, &bytes)).unwrap();
        prop_assert!(e["error"]["message"].is_string());
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(bytes.len());
        let mut s = Stream::new(0);
        let mut got = Vec::new();
        let mut from = 0;
        for c in cuts {
            got.extend_from_slice(&s.push(Bytes::copy_from_slice(&bytes[from..c])));
            from = c;
        }
        got.extend_from_slice(&s.end());
        // However it is cut, it translates as it does whole.
        let (expected, whole) = whole(&bytes);
        prop_assert_eq!(got, expected);
        prop_assert_eq!(
            (s.tokens(), s.failed(), s.complete()),
            (whole.tokens(), whole.failed(), whole.complete())
        );
    }

    /// Streams of Anthropic-looking events in any order, with any text:
    /// every data line written is JSON (or [DONE]), never half an event.
    #[test]
    fn every_event_written_is_whole_json(
        picks in proptest::collection::vec((0usize..8, "\\PC{0,12}"), 0..20),
    ) {
        let mut stream = String::new();
        for (k, text) in picks {
            let t = serde_json::to_string(&text).unwrap();
            let data = match k {
                0 => r#"{"type":"message_start","message":{"id":"m","model":"c","usage":{"input_tokens":1,"output_tokens":1}}}"#.to_owned(),
                1 => format!(r#"{{"type":"content_block_start","index":1,"content_block":{{"type":"tool_use","id":{t},"name":{t},"input":{{}}}}}}"#),
                2 => format!(r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{t}}}}}"#),
                3 => format!(r#"{{"type":"content_block_delta","index":1,"delta":{{"type":"input_json_delta","partial_json":{t}}}}}"#),
                4 => r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":3}}"#.to_owned(),
                5 => r#"{"type":"ping"}"#.to_owned(),
                6 => format!(r#"{{"type":"error","error":{{"type":"api_error","message":{t}}}}}"#),
                _ => r#"{"type":"message_stop"}"#.to_owned(),
            };
            stream.push_str(&format!("data: {data}\n\n"));
        }
        let (out, _) = whole(stream.as_bytes());
        for e in events(&out) {
            if e.starts_with(':') {
                continue;
            }
            let d = e.strip_prefix("data: ").unwrap();
            prop_assert!(d == "[DONE]" || serde_json::from_str::<Value>(d).is_ok(), "{}", d);
        }
    }
}
