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
}
