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
}

#[derive(Debug, PartialEq)]
pub struct ChatRequest<'a> {
    pub model: Cow<'a, str>,
    pub stream: bool,
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
        }),
        _ => Err(ClassifyError::MissingModel),
    }
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
