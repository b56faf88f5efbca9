//! Intake, the first stage: read the app's request body, bounded in size
//! and in time, read the sidecar's own headers, and check the body
//! (`switchyard_wire::chat`, for the operation asked for). Then the
//! request's class and its route for that operation.
//!
//! Nothing here reaches a provider: a request that fails intake is answered
//! 4xx in OpenAI's shape before any endpoint is called.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::time::fast_timeout::fast_timeout;
use switchyard_wire::operation::Operation;

use super::errors::RequestError;
use super::Stop;
use crate::table::{Class, Route, RouteError, Table};

/// What intake accepts.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// The whole body must arrive within this, however it trickles.
    pub body_timeout: Duration,
}

/// The sidecar's own request headers (never forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppHeaders<'h> {
    /// `x-switchyard-class`: the class asked for; the default when absent.
    pub class: Option<&'h str>,
    /// `x-switchyard-timeout-ms`: a tighter deadline than the class's.
    pub timeout: Option<Duration>,
}

pub const CLASS_HEADER: &str = "x-switchyard-class";
pub const TIMEOUT_HEADER: &str = "x-switchyard-timeout-ms";

/// Reads the sidecar's headers. Pure.
pub fn headers(h: &RequestHeader) -> Result<AppHeaders<'_>, RequestError> {
    let class = match h.headers.get(CLASS_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| RequestError::Header {
            name: CLASS_HEADER,
            message: "must be a class name in visible ASCII".into(),
        })?),
    };
    let timeout = h
        .headers
        .get(TIMEOUT_HEADER)
        .map(|v| timeout_ms(v.as_bytes()))
        .transpose()?;
    Ok(AppHeaders { class, timeout })
}

/// `x-switchyard-timeout-ms`: a positive integer of milliseconds.
pub fn timeout_ms(v: &[u8]) -> Result<Duration, RequestError> {
    let bad = || RequestError::Header {
        name: TIMEOUT_HEADER,
        message: format!(
            "must be a positive integer of milliseconds, got {:?}",
            String::from_utf8_lossy(v)
        ),
    };
    let digits = v.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let ms: u64 = std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    if ms == 0 {
        return Err(bad());
    }
    Ok(Duration::from_millis(ms))
}

/// Reads the whole request body: at most `max_body_bytes`, all of it within
/// `body_timeout`. A body cut short of its Content-Length, or trickled,
/// gets 408 instead of holding a connection open forever.
pub async fn read_body(session: &mut Session, limits: &Limits) -> Result<Bytes, Stop> {
    let too_large = || {
        Stop::from(RequestError::BodyTooLarge {
            limit: limits.max_body_bytes,
        })
    };
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        return Err(too_large());
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session
            .write_continue_response()
            .await
            .map_err(Stop::Abort)?;
    }
    let read = async {
        let mut first: Option<Bytes> = None;
        let mut rest: Option<BytesMut> = None;
        while let Some(chunk) = session.read_request_body().await.map_err(Stop::Abort)? {
            let len = first.as_ref().map_or(0, Bytes::len)
                + rest.as_ref().map_or(0, BytesMut::len)
                + chunk.len();
            if len > limits.max_body_bytes {
                return Err(too_large());
            }
            match (&mut first, &mut rest) {
                (None, _) => first = Some(chunk),
                (Some(f), None) => {
                    let mut b = BytesMut::with_capacity(declared.unwrap_or(len * 2).max(len));
                    b.extend_from_slice(f);
                    b.extend_from_slice(&chunk);
                    rest = Some(b);
                }
                (Some(_), Some(b)) => b.extend_from_slice(&chunk),
            }
        }
        Ok(match rest {
            Some(b) => b.freeze(),
            None => first.unwrap_or_default(),
        })
    };
    fast_timeout(limits.body_timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(Stop::from(RequestError::BodyTimeout {
                after: limits.body_timeout,
            }))
        })
}

/// The request's class (the one asked for, else the table's default) and
/// its route for the model's `op`.
pub fn classify<'t>(
    table: &'t Table,
    class: Option<&str>,
    model: &str,
    op: Operation,
) -> Result<(&'t Class, &'t Route), RequestError> {
    table
        .route(class, model, op)
        .map_err(|e| route_error(e, model, op))
}

pub fn route_error(e: RouteError<'_>, model: &str, op: Operation) -> RequestError {
    match e {
        RouteError::UnknownClass(c) => RequestError::UnknownClass(c.to_string()),
        RouteError::UnknownModel => RequestError::UnknownModel(model.to_string()),
        RouteError::NoRoute => RequestError::NoRoute(model.to_string()),
        RouteError::NotOffered => RequestError::NotOffered {
            op,
            model: model.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &[u8])]) -> RequestHeader {
        let mut h = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in headers {
            h.insert_header(k.to_string(), http::HeaderValue::from_bytes(v).unwrap())
                .unwrap();
        }
        h
    }

    #[test]
    fn the_timeout_header_is_a_positive_integer_of_milliseconds() {
        assert_eq!(timeout_ms(b"250").unwrap(), Duration::from_millis(250));
        assert_eq!(timeout_ms(b" 7 ").unwrap(), Duration::from_millis(7));
        for bad in [
            &b"0"[..],
            b"-5",
            b"1.5",
            b"",
            b"10ms",
            b"99999999999999999999999",
            b"+3",
        ] {
            let e = timeout_ms(bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    RequestError::Header {
                        name: TIMEOUT_HEADER,
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn the_sidecars_headers_are_read_and_checked() {
        let h = req(&[(CLASS_HEADER, b"batch"), (TIMEOUT_HEADER, b"1500")]);
        assert_eq!(
            headers(&h).unwrap(),
            AppHeaders {
                class: Some("batch"),
                timeout: Some(Duration::from_millis(1500)),
            }
        );
        let h = req(&[]);
        assert_eq!(
            headers(&h).unwrap(),
            AppHeaders {
                class: None,
                timeout: None
            }
        );
        assert!(headers(&req(&[(TIMEOUT_HEADER, b"soon")])).is_err());
        assert!(headers(&req(&[(CLASS_HEADER, b"caf\xc3\xa9")])).is_err());
    }
}
