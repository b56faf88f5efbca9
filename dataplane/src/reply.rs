//! Responses the sidecar writes itself: errors in OpenAI's JSON shape (so
//! every OpenAI client surfaces them properly) and SSE error events for
//! streams that fail after they started.

use bytes::Bytes;
use serde_json::json;

/// An error answered to the app, shaped as OpenAI answers errors.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
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

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn body(&self) -> Bytes {
        let v = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        Bytes::from(v.to_string())
    }

    /// The same error as a terminating SSE event, for streams already begun.
    pub fn sse_event(&self) -> Bytes {
        let mut out = Vec::with_capacity(96 + self.message.len());
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&self.body());
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
        let ev = e.sse_event();
        assert!(ev.starts_with(b"data: {") && ev.ends_with(b"}\n\n"));
    }
}
