//! Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param",
//! "code"}}`, so every OpenAI client surfaces them as it surfaces
//! OpenAI's own; and the same error as a terminating SSE event for streams
//! that already began.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;

/// An error answered to the app.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    pub code: Option<&'static str>,
    /// The request parameter at fault, as OpenAI names it
    /// (`messages[0].role`).
    pub param: Option<Cow<'static, str>>,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    fn json(&self) -> Vec<u8> {
        let body = Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Serialising strings and options into a Vec cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(self.json())
    }

    /// The same error as a terminating SSE event, for streams already begun.
    pub fn sse_event(&self) -> Bytes {
        let json = self.json();
        let mut out = Vec::with_capacity(json.len() + 8);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_openais_shape() {
        let e = ApiError::new(404, "invalid_request_error", "The model `x` does not exist")
            .code("model_not_found")
            .param("model");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["message"], "The model `x` does not exist");
        let bare: serde_json::Value =
            serde_json::from_slice(&ApiError::invalid("x").body()).unwrap();
        assert!(bare["error"]["param"].is_null() && bare["error"]["code"].is_null());
        let ev = e.sse_event();
        assert!(ev.starts_with(b"data: {") && ev.ends_with(b"}\n\n"));
    }
}
