use super::*;
use proptest::prelude::*;

const MSG: &str = r#"[{"role":"user","content":"hi"}]"#;

fn body(fields: &str) -> Vec<u8> {
    format!("{{{fields}}}").into_bytes()
}

/// Parses and keeps what the assertions need, so the body may be a temporary.
fn owned(b: &[u8]) -> ChatRequest<'static> {
    let r = parse(b).unwrap();
    ChatRequest {
        model: Cow::Owned(r.model.into_owned()),
        ..r
    }
}

fn refused(fields: &str) -> Invalid {
    parse(&body(fields)).unwrap_err()
}

#[test]
fn reads_model_stream_and_limits_wherever_they_are() {
    let b = body(&format!(
        r#""messages":{MSG},"stream":true,"max_tokens":5,"temperature":0.2,"model":"m""#
    ));
    let r = parse(&b).unwrap();
    assert_eq!(
        r,
        ChatRequest {
            model: Cow::Borrowed("m"),
            stream: true,
            include_usage: None,
            max_tokens: Some(5),
            messages: 1,
        }
    );
    assert!(matches!(r.model, Cow::Borrowed(_)), "no copy of the model");
    let r = owned(&body(&format!(r#""model":"a\"b","messages":{MSG}"#)));
    assert_eq!(r.model, "a\"b");
    assert!(!r.stream);
    let r = owned(&body(&format!(
        r#""model":"m","messages":{MSG},"stream":null,"max_tokens":null,"max_completion_tokens":0,"stream_options":{{}}"#
    )));
    assert_eq!(
        (r.stream, r.max_tokens, r.include_usage),
        (false, Some(0), Some(false))
    );
}

#[test]
fn what_is_not_json_or_not_an_object_is_malformed() {
    for b in [
        &b"{\"model\":"[..],
        b"[1]",
        b"{\"model\":\"m\"} x",
        b"",
        b"\"s\"",
        b"nul",
    ] {
        let e = parse(b).unwrap_err();
        assert_eq!(e.param, None, "{b:?}");
        assert!(e.message.contains("not valid JSON"), "{e}");
    }
}

#[test]
fn the_model_must_be_a_non_empty_string() {
    let e = refused(&format!(r#""messages":{MSG}"#));
    assert_eq!(
        (e.param.as_deref(), e.code, e.message.as_str()),
        (
            Some("model"),
            Some("missing_required_parameter"),
            "Missing required parameter: 'model'."
        )
    );
    assert_eq!(
        refused(&format!(r#""model":"","messages":{MSG}"#)).code,
        Some("invalid_value")
    );
    let e = refused(&format!(r#""model":5,"messages":{MSG}"#));
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("model"), Some("invalid_type"))
    );
    assert!(e.message.contains("got an integer"), "{e}");
}

#[test]
fn messages_must_be_a_non_empty_list_of_objects_with_a_role() {
    let e = refused(r#""model":"m""#);
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("messages"), Some("missing_required_parameter"))
    );
    let e = refused(r#""model":"m","messages":[]"#);
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("messages"), Some("empty_array"))
    );
    let e = refused(r#""model":"m","messages":{"role":"user"}"#);
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("messages"), Some("invalid_type"))
    );
    let e = refused(r#""model":"m","messages":[{"role":"user","content":"a"},"text"]"#);
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("messages[1]"), Some("invalid_type"))
    );
    let e = refused(r#""model":"m","messages":[{"role":"user"},{"content":"no role"},{"x":1}]"#);
    assert_eq!(
        (e.param.as_deref(), e.code, e.message.as_str()),
        (
            Some("messages[1].role"),
            Some("missing_required_parameter"),
            "Missing required parameter: 'messages[1].role'."
        )
    );
    let e = refused(r#""model":"m","messages":[{"role":7}]"#);
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("messages[0].role"), Some("invalid_type"))
    );
    let e = refused(r#""model":"m","messages":[{"role":""}]"#);
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("messages[0].role"), Some("invalid_value"))
    );
    // Deeply nested content is skipped, not kept.
    let r = owned(&body(
        r#""model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}}]},{"role":"assistant","tool_calls":[]}]"#,
    ));
    assert_eq!(r.messages, 2);
}

#[test]
fn token_limits_must_be_non_negative_integers() {
    for (field, value, code) in [
        ("max_tokens", "-1", "integer_below_min_value"),
        ("max_tokens", "\"100\"", "invalid_type"),
        ("max_tokens", "1.5", "invalid_type"),
        ("max_completion_tokens", "-20", "integer_below_min_value"),
        ("max_completion_tokens", "true", "invalid_type"),
    ] {
        let e = refused(&format!(
            r#""model":"m","messages":{MSG},"{field}":{value}"#
        ));
        assert_eq!(
            (e.param.as_deref(), e.code),
            (Some(field), Some(code)),
            "{field}={value}"
        );
    }
}

#[test]
fn stream_and_its_options_must_have_their_types() {
    let e = refused(&format!(r#""model":"m","messages":{MSG},"stream":"yes""#));
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("stream"), Some("invalid_type"))
    );
    let e = refused(&format!(
        r#""model":"m","messages":{MSG},"stream_options":[]"#
    ));
    assert_eq!(e.param.as_deref(), Some("stream_options"));
    let e = refused(&format!(
        r#""model":"m","messages":{MSG},"stream_options":{{"include_usage":1}}"#
    ));
    assert_eq!(e.param.as_deref(), Some("stream_options.include_usage"));
}

#[test]
fn a_parameter_given_twice_is_refused() {
    // A proxy and a provider reading different copies of `model` would
    // route one model and run another.
    let e = refused(&format!(r#""model":"a","messages":{MSG},"model":"b""#));
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("model"), Some("duplicate_parameter"))
    );
}

#[test]
fn usage_is_asked_for_without_disturbing_the_request() {
    let ask = |b: &[u8]| {
        let r = parse(b).unwrap();
        let out = ask_usage(b, r.include_usage.is_some()).unwrap();
        serde_json::from_slice::<serde_json::Value>(&out).unwrap()
    };
    let v = ask(br#"  {"model":"m","stream":true,"messages":[{"role":"user","content":"{x}"}]}"#);
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["messages"][0]["content"], "{x}");
    let v = ask(
        br#"{"model":"m","stream":true,"messages":[{"role":"user"}],"stream_options":{"include_usage":false,"k":1}}"#,
    );
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["stream_options"]["k"], 1);
    // Present but null: replaced, not given twice.
    let b = br#"{"model":"m","stream":true,"stream_options":null,"messages":[{"role":"user"}]}"#;
    let v = ask(b);
    assert_eq!(v["stream_options"]["include_usage"], true);
    let asked = ask_usage(b, parse(b).unwrap().include_usage.is_some()).unwrap();
    assert_eq!(
        parse(&asked).unwrap().include_usage,
        Some(true),
        "no duplicate key"
    );
    let out = ask_usage(b"{ }", false).unwrap();
    assert_eq!(&out[..], br#"{"stream_options":{"include_usage":true} }"#);
}

#[test]
fn degradation_rewrites_model_and_caps_tokens() {
    let v = |b: bytes::Bytes| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
    let b = v(rewrite(
        br#"{"model":"big","max_tokens":900,"messages":[]}"#,
        Some("small"),
        Some(100),
    )
    .unwrap());
    assert_eq!(
        (b["model"].as_str(), b["max_tokens"].as_u64()),
        (Some("small"), Some(100))
    );
    let b = v(rewrite(br#"{"model":"m","max_tokens":50}"#, None, Some(100)).unwrap());
    assert_eq!(b["max_tokens"], 50);
    let b = v(rewrite(br#"{"model":"m"}"#, None, Some(100)).unwrap());
    assert_eq!(b["max_tokens"], 100);
    assert!(b.get("max_completion_tokens").is_none());
    let b = v(rewrite(
        br#"{"model":"m","max_completion_tokens":500}"#,
        None,
        Some(100),
    )
    .unwrap());
    assert_eq!(
        (
            b["max_tokens"].as_u64(),
            b["max_completion_tokens"].as_u64()
        ),
        (Some(100), Some(100))
    );
}

#[test]
fn a_mapped_model_is_spliced_in_and_everything_else_kept_byte_for_byte() {
    let ids = |m: &str| (m == "chat-large").then_some("meta-llama/Llama-3.1-70B \"x\"");
    let body = br#"{ "messages":[{"role":"user","content":"model"}], "model" : "chat-large", "stream":true}"#;
    let out = map_model(body, ids).unwrap();
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{ "messages":[{"role":"user","content":"model"}], "model" : "meta-llama/Llama-3.1-70B \"x\"", "stream":true}"#
    );
    // Not mapped: nothing to do.
    assert!(map_model(br#"{"model":"other","messages":[{"role":"user"}]}"#, ids).is_none());
    // A model spelled with an escape is rewritten whole.
    let out = map_model(
        br#"{"model":"chat\u002dlarge","messages":[{"role":"user"}]}"#,
        ids,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["model"], "meta-llama/Llama-3.1-70B \"x\"");
    assert_eq!(v["messages"][0]["role"], "user");
}

proptest! {
    /// Whatever the id, the mapped body is the same request with only its
    /// model changed.
    #[test]
    fn mapping_changes_the_model_and_nothing_else(id in "\\PC{0,40}", content in "\\PC{0,40}") {
        let req = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0.5});
        let body = serde_json::to_vec(&req).unwrap();
        let out = map_model(&body, |_| Some(id.as_str())).unwrap();
        let mut got: serde_json::Value = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(got["model"].as_str(), Some(id.as_str()));
        got["model"] = "m".into();
        prop_assert_eq!(got, req);
    }
}

#[test]
fn completions_need_a_prompt_and_embeddings_an_input() {
    let c = parse_for(
        Operation::Completions,
        br#"{"model":"m","prompt":"Say hi","stream":true,"max_tokens":5}"#,
    )
    .unwrap();
    assert_eq!(
        (c.model.as_ref(), c.stream, c.max_tokens, c.messages),
        ("m", true, Some(5), 0)
    );
    assert!(parse_for(
        Operation::Completions,
        br#"{"model":"m","prompt":["a","b"]}"#
    )
    .is_ok());
    let e = parse_for(Operation::Completions, br#"{"model":"m"}"#).unwrap_err();
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("prompt"), Some("missing_required_parameter"))
    );
    let e = parse_for(Operation::Completions, br#"{"model":"m","prompt":7}"#).unwrap_err();
    assert_eq!(
        (e.param.as_deref(), e.code),
        (Some("prompt"), Some("invalid_type"))
    );

    let e = parse_for(
        Operation::Embeddings,
        br#"{"model":"m","input":["a"],"stream":true}"#,
    )
    .unwrap();
    assert!(!e.stream, "embeddings never stream");
    let err = parse_for(Operation::Embeddings, br#"{"model":"m","input":null}"#).unwrap_err();
    assert_eq!(err.param.as_deref(), Some("input"));
    let err = parse_for(Operation::Embeddings, br#"{"input":"x"}"#).unwrap_err();
    assert_eq!(err.param.as_deref(), Some("model"));
    // A chat body needs messages, the others do not.
    assert!(parse_for(Operation::Chat, br#"{"model":"m","prompt":"x"}"#).is_err());
}

#[test]
fn a_model_is_mapped_in_the_body_of_every_operation() {
    let ids = |m: &str| (m == "small").then_some("org/Small-v2");
    let out = map_model(br#"{"model":"small","input":"x"}"#, ids).unwrap();
    assert_eq!(&out[..], br#"{"model":"org/Small-v2","input":"x"}"#);
    let out = map_model(br#"{"prompt":"x","model":"small"}"#, ids).unwrap();
    assert_eq!(&out[..], br#"{"prompt":"x","model":"org/Small-v2"}"#);
}
