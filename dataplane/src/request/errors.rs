//! Every way a request can end without an answer from a provider, as one
//! type, and its one mapping to what the app sees: an HTTP status and
//! OpenAI's error JSON (or, once a stream began, a terminating SSE event).

use std::sync::Arc;
use std::time::Duration;

use switchyard_wire::chat::Invalid;
use switchyard_wire::error::ApiError;
use switchyard_wire::operation::Operation;

use super::admit::Why;
use super::attempt::AttemptError;
use super::pick::StopReason;
use crate::shed::Shed;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request body exceeds the {limit} byte limit")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive within {} ms", after.as_millis())]
    BodyTimeout { after: Duration },
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("header {name}: {message}")]
    Header { name: &'static str, message: String },
    #[error("the sidecar has no routing table yet")]
    NotReady,
    #[error("unknown request class `{0}`")]
    UnknownClass(String),
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    UnknownModel(String),
    #[error("no endpoint allowed for this request class serves `{0}`")]
    NoRoute(String),
    #[error("no endpoint this request class may use for `{model}` offers {}: their APIs do not have it", op.label())]
    NotOffered { op: Operation, model: String },
    #[error(
        "every endpoint class `{class}` may use now is over its spend budget for the last hour"
    )]
    OverSpendBudget { class: Arc<str> },
    #[error("the preferred endpoints of class `{class}` are {why}: {reason}")]
    Rejected {
        class: Arc<str>,
        why: Why,
        reason: String,
    },
    #[error("every endpoint for class `{class}` is at capacity: {why}")]
    Shed { class: Arc<str>, why: Shed },
    #[error("{} (after {attempts} attempts; {ended})", upstream_message(last))]
    Upstream {
        last: AttemptError,
        attempts: u8,
        /// Why no further attempt was made: the real cause, when the last
        /// error alone would blame one endpoint.
        ended: StopReason,
    },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("Invalid URL ({method} {path})")]
    UnknownUrl { method: String, path: String },
}

fn upstream_message(e: &AttemptError) -> String {
    match e {
        AttemptError::Timeout(d) => format!("no first token within {} ms", d.as_millis()),
        AttemptError::Status { status: 429, .. } => "every endpoint tried is rate limited".into(),
        AttemptError::Connect(reason) => format!("no endpoint could be reached: {reason}"),
        e => format!("upstream failed: {e}"),
    }
}

impl RequestError {
    /// The answer the app gets.
    pub fn to_api(&self) -> ApiError {
        let message = self.to_string();
        let invalid = |status| ApiError::new(status, "invalid_request_error", message.clone());
        let server = |status| ApiError::new(status, "server_error", message.clone());
        match self {
            RequestError::BodyTooLarge { .. } => invalid(413).code("request_too_large"),
            RequestError::BodyTimeout { .. } => invalid(408).code("request_timeout"),
            RequestError::Invalid(i) => {
                let mut e = invalid(400);
                e.code = i.code;
                e.param = i.param.clone();
                e
            }
            RequestError::Header { name, .. } => invalid(400).code("invalid_header").param(*name),
            RequestError::NotReady => server(503).code("not_ready"),
            RequestError::UnknownClass(_) => invalid(400).code("unknown_class"),
            RequestError::UnknownModel(_) => invalid(404).code("model_not_found").param("model"),
            RequestError::NoRoute(_) => server(503).code("no_route"),
            RequestError::NotOffered { .. } => invalid(400).code("operation_not_offered"),
            RequestError::OverSpendBudget { .. } => server(503).code("over_budget"),
            RequestError::Rejected { .. } => server(503).code("degraded_reject"),
            RequestError::Shed { .. } => ApiError::new(429, "rate_limit_error", message)
                .code("overloaded")
                .retry_after(1),
            RequestError::Upstream { last, .. } => match last {
                AttemptError::Timeout(_) => server(504).code("upstream_timeout"),
                AttemptError::Status {
                    status: 429,
                    retry_after,
                } => ApiError::new(429, "rate_limit_error", message)
                    .code("upstream_rate_limited")
                    .retry_after(retry_after.map_or(1, |d| d.as_secs().max(1))),
                AttemptError::Connect(_) => server(503).code("upstream_unavailable"),
                AttemptError::Untranslatable(_) => invalid(400).code("untranslatable_request"),
                _ => server(502).code("upstream_error"),
            },
            RequestError::MethodNotAllowed { .. } => invalid(405),
            RequestError::UnknownUrl { .. } => invalid(404).code("unknown_url"),
        }
    }

    /// Whether the app's connection must close after the answer: the body
    /// was not read to its end, so what follows on the connection is not a
    /// request.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            RequestError::BodyTooLarge { .. } | RequestError::BodyTimeout { .. }
        )
    }
}

/// The error event that ends a stream broken after its first byte.
pub fn stream_interrupted(reason: &str) -> ApiError {
    ApiError::new(502, "server_error", reason).code("stream_interrupted")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(e: RequestError) -> (u16, &'static str, Option<&'static str>, String, Option<u64>) {
        let a = e.to_api();
        (a.status, a.kind, a.code, a.message, a.retry_after)
    }

    #[test]
    fn every_failure_maps_to_one_status_type_and_code() {
        let class: Arc<str> = Arc::from("std");
        let cases: Vec<(RequestError, u16, &str, Option<&str>)> = vec![
            (
                RequestError::BodyTooLarge { limit: 10 },
                413,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            (
                RequestError::BodyTimeout {
                    after: Duration::from_secs(1),
                },
                408,
                "invalid_request_error",
                Some("request_timeout"),
            ),
            (
                RequestError::Header {
                    name: "x-switchyard-timeout-ms",
                    message: "x".into(),
                },
                400,
                "invalid_request_error",
                Some("invalid_header"),
            ),
            (
                RequestError::NotReady,
                503,
                "server_error",
                Some("not_ready"),
            ),
            (
                RequestError::UnknownClass("x".into()),
                400,
                "invalid_request_error",
                Some("unknown_class"),
            ),
            (
                RequestError::UnknownModel("m".into()),
                404,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (
                RequestError::NoRoute("m".into()),
                503,
                "server_error",
                Some("no_route"),
            ),
            (
                RequestError::OverSpendBudget {
                    class: class.clone(),
                },
                503,
                "server_error",
                Some("over_budget"),
            ),
            (
                RequestError::Rejected {
                    class: class.clone(),
                    why: Why::OverSpendBudget,
                    reason: "paused".into(),
                },
                503,
                "server_error",
                Some("degraded_reject"),
            ),
            (
                RequestError::Shed {
                    class: class.clone(),
                    why: Shed::QueueFull,
                },
                429,
                "rate_limit_error",
                Some("overloaded"),
            ),
            (
                RequestError::Upstream {
                    last: AttemptError::Timeout(Duration::from_millis(50)),
                    attempts: 2,
                    ended: StopReason::Exhausted,
                },
                504,
                "server_error",
                Some("upstream_timeout"),
            ),
            (
                RequestError::Upstream {
                    last: AttemptError::Status {
                        status: 429,
                        retry_after: Some(Duration::from_secs(7)),
                    },
                    attempts: 1,
                    ended: StopReason::Exhausted,
                },
                429,
                "rate_limit_error",
                Some("upstream_rate_limited"),
            ),
            (
                RequestError::Upstream {
                    last: AttemptError::Connect("refused".into()),
                    attempts: 3,
                    ended: StopReason::Exhausted,
                },
                503,
                "server_error",
                Some("upstream_unavailable"),
            ),
            (
                RequestError::Upstream {
                    last: AttemptError::Status {
                        status: 500,
                        retry_after: None,
                    },
                    attempts: 1,
                    ended: StopReason::Exhausted,
                },
                502,
                "server_error",
                Some("upstream_error"),
            ),
            (
                RequestError::Upstream {
                    last: AttemptError::Broken {
                        reason: "reset".into(),
                        stale: false,
                    },
                    attempts: 1,
                    ended: StopReason::Exhausted,
                },
                502,
                "server_error",
                Some("upstream_error"),
            ),
            (
                RequestError::MethodNotAllowed {
                    method: "PUT".into(),
                    path: "/readyz".into(),
                },
                405,
                "invalid_request_error",
                None,
            ),
            (
                RequestError::UnknownUrl {
                    method: "GET".into(),
                    path: "/x".into(),
                },
                404,
                "invalid_request_error",
                Some("unknown_url"),
            ),
        ];
        for (e, status, kind, code) in cases {
            let shown = format!("{e:?}");
            let (s, k, c, message, _) = api(e);
            assert_eq!((s, k, c), (status, kind, code), "{shown}");
            assert!(!message.is_empty(), "{shown}");
        }
    }

    #[test]
    fn messages_say_what_happened() {
        let (_, _, _, m, retry) = api(RequestError::Upstream {
            last: AttemptError::Status {
                status: 429,
                retry_after: Some(Duration::from_secs(7)),
            },
            attempts: 2,
            ended: StopReason::Exhausted,
        });
        assert_eq!(
            m,
            "every endpoint tried is rate limited (after 2 attempts; no other endpoint is up)"
        );
        assert_eq!(retry, Some(7));
        let (_, _, _, m, retry) = api(RequestError::Shed {
            class: Arc::from("low"),
            why: Shed::TimedOut,
        });
        assert_eq!(
            m,
            "every endpoint for class `low` is at capacity: no capacity freed up in time"
        );
        assert_eq!(retry, Some(1));
        let (_, _, _, m, _) = api(RequestError::Rejected {
            class: Arc::from("strict"),
            why: Why::OverSpendBudget,
            reason: "cloud spend is paused".into(),
        });
        assert!(
            m.contains("over budget") && m.contains("cloud spend is paused"),
            "{m}"
        );
        let (_, _, _, m, _) = api(RequestError::Upstream {
            last: AttemptError::Timeout(Duration::from_millis(250)),
            attempts: 1,
            ended: StopReason::Exhausted,
        });
        assert_eq!(
            m,
            "no first token within 250 ms (after 1 attempts; no other endpoint is up)"
        );
    }

    #[test]
    fn a_parameter_error_names_the_parameter() {
        let e = RequestError::from(
            switchyard_wire::chat::parse(br#"{"model":"m","messages":[{"content":"x"}]}"#)
                .unwrap_err(),
        );
        let a = e.to_api();
        assert_eq!(
            (a.status, a.param.as_deref(), a.code),
            (
                400,
                Some("messages[0].role"),
                Some("missing_required_parameter")
            )
        );
        let body: serde_json::Value = serde_json::from_slice(&a.body()).unwrap();
        assert_eq!(body["error"]["param"], "messages[0].role");
    }

    #[test]
    fn only_an_unread_body_closes_the_connection() {
        assert!(RequestError::BodyTooLarge { limit: 1 }.closes_connection());
        assert!(RequestError::BodyTimeout {
            after: Duration::ZERO
        }
        .closes_connection());
        assert!(!RequestError::NotReady.closes_connection());
        assert!(!RequestError::UnknownModel("m".into()).closes_connection());
    }
}
