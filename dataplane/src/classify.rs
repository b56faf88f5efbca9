//! Reads just enough of a chat completion request to route it: the model and
//! whether the answer streams. The whole body is still checked to be valid
//! JSON, so a malformed request is refused here and not by a provider.

use std::borrow::Cow;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, PartialEq)]
pub struct ChatRequest<'a> {
    pub model: Cow<'a, str>,
    pub stream: bool,
    /// `stream_options.include_usage` as the app sent it: `None` when
    /// there are no stream options at all.
    pub include_usage: Option<bool>,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ClassifyError {
    #[error("the request body is not valid JSON: {0}")]
    Malformed(String),
    #[error("you must provide a model parameter")]
    MissingModel,
}

pub fn parse(body: &[u8]) -> Result<ChatRequest<'_>, ClassifyError> {
    let peek: Peek<'_> =
        serde_json::from_slice(body).map_err(|e| ClassifyError::Malformed(e.to_string()))?;
    match peek.model {
        Some(model) if !model.is_empty() => Ok(ChatRequest {
            model,
            stream: peek.stream.unwrap_or(false),
            include_usage: peek
                .stream_options
                .map(|o| o.include_usage.unwrap_or(false)),
        }),
        _ => Err(ClassifyError::MissingModel),
    }
}

/// Sets `stream_options.include_usage` in a request. Without stream options
/// the field is spliced in after the opening brace, with no parse; with
/// them (rare) the body is rewritten.
pub fn ask_usage(body: &[u8], has_options: bool) -> Result<bytes::Bytes, ClassifyError> {
    if has_options {
        let mut v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| ClassifyError::Malformed(e.to_string()))?;
        v["stream_options"]["include_usage"] = true.into();
        return serde_json::to_vec(&v)
            .map(bytes::Bytes::from)
            .map_err(|e| ClassifyError::Malformed(e.to_string()));
    }
    let open = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .filter(|i| body[*i] == b'{')
        .ok_or_else(|| ClassifyError::Malformed("not a JSON object".into()))?;
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let field: &[u8] = if empty {
        br#""stream_options":{"include_usage":true}"#
    } else {
        br#""stream_options":{"include_usage":true},"#
    };
    let mut out = Vec::with_capacity(body.len() + field.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(field);
    out.extend_from_slice(rest);
    Ok(bytes::Bytes::from(out))
}

/// Rewrites a request for a degradation: another model, or `max_tokens`
/// capped. Only degraded requests pay for this full parse.
pub fn rewrite(
    body: &[u8],
    model: Option<&str>,
    cap: Option<u32>,
) -> Result<bytes::Bytes, ClassifyError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ClassifyError::Malformed(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ClassifyError::Malformed("not a JSON object".into()))?;
    if let Some(m) = model {
        obj.insert("model".into(), m.into());
    }
    if let Some(cap) = cap {
        for key in ["max_tokens", "max_completion_tokens"] {
            let current = obj.get(key).and_then(serde_json::Value::as_u64);
            if key == "max_tokens" || current.is_some() {
                obj.insert(
                    key.into(),
                    current.map_or(cap.into(), |c| c.min(cap.into())).into(),
                );
            }
        }
    }
    serde_json::to_vec(&v)
        .map(bytes::Bytes::from)
        .map_err(|e| ClassifyError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream_wherever_they_are() {
        let r =
            parse(br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"model":"m"}"#)
                .unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream);
        let r = parse(br#"{"model":"a\"b"}"#).unwrap();
        assert_eq!(r.model, "a\"b");
        assert!(!r.stream);
    }

    #[test]
    fn refuses_what_a_provider_would_refuse() {
        assert!(matches!(
            parse(b"{\"model\":"),
            Err(ClassifyError::Malformed(_))
        ));
        assert!(matches!(parse(b"[1]"), Err(ClassifyError::Malformed(_))));
        assert!(matches!(
            parse(b"{\"model\":\"m\"} x"),
            Err(ClassifyError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"{\"model\":5}"),
            Err(ClassifyError::Malformed(_))
        ));
        assert_eq!(parse(b"{}"), Err(ClassifyError::MissingModel));
        assert_eq!(parse(b"{\"model\":\"\"}"), Err(ClassifyError::MissingModel));
    }

    #[test]
    fn usage_is_asked_for_without_disturbing_the_request() {
        let ask = |b: &[u8]| {
            let r = parse(b).unwrap();
            let out = ask_usage(b, r.include_usage.is_some()).unwrap();
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        let v = ask(br#"  {"model":"m","stream":true,"messages":[{"content":"{x}"}]}"#);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["content"], "{x}");
        let v =
            ask(br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"k":1}}"#);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["k"], 1);
        let r = parse(br#"{"model":"m","stream":true,"stream_options":{}}"#).unwrap();
        assert_eq!(r.include_usage, Some(false));
        assert_eq!(parse(br#"{"model":"m"}"#).unwrap().include_usage, None);
        let out = ask_usage(b"{ }", false).unwrap();
        assert_eq!(&out[..], br#"{"stream_options":{"include_usage":true} }"#);
    }

    #[test]
    fn degradation_rewrites_model_and_caps_tokens() {
        let b = rewrite(
            br#"{"model":"big","max_tokens":900,"messages":[]}"#,
            Some("small"),
            Some(100),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            (v["model"].as_str(), v["max_tokens"].as_u64()),
            (Some("small"), Some(100))
        );
        let b = rewrite(br#"{"model":"m","max_tokens":50}"#, None, Some(100)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["max_tokens"], 50);
        let b = rewrite(br#"{"model":"m"}"#, None, Some(100)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["max_tokens"], 100);
        assert!(v.get("max_completion_tokens").is_none());
    }
}
