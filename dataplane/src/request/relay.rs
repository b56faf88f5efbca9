//! Relaying, the fifth stage: the winning attempt's answer goes to the app
//! as it arrives. An event stream is passed on in whole events (so the app
//! never holds half of one, whatever the provider's line endings), chunks
//! already readable are joined into one write, the usage is read on the
//! way, and the usage chunk the sidecar asked for is taken out again.
//!
//! A stream from an endpoint of another API (Anthropic's) goes on being
//! translated on the way, event by event as they arrive, so the app only
//! ever sees OpenAI's shapes (the attempt translated a whole answer, and a
//! stream up to its first token).
//!
//! After the first byte a failure cannot move to another endpoint: a
//! stream then ends with an SSE error event, any other body is cut before
//! its declared end, never silently truncated.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use http::header;
use pingora::http::ResponseHeader;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::proxy::Session;
use pingora::time::fast_timeout::fast_timeout;
use pingora::{Error, ErrorType};
use switchyard_wire::anthropic;
use switchyard_wire::usage::{Tokens, UsageScan};
use tokio::time::Instant;

use super::attempt::{connection_lists, is_event_stream, is_hop_header, Head, Opened};
use super::errors::stream_interrupted;
use super::Stop;
use crate::usage::ErrorKind;

/// How an opened answer is relayed.
#[derive(Debug, Clone, Copy)]
pub struct Relay {
    pub deadline: Instant,
    /// Longest gap between two chunks.
    pub inter_token: Duration,
    /// The sidecar asked for the usage chunk; the app must not see it.
    pub strip_usage: bool,
}

/// What the app is sent of each read of the answer: the read itself, or
/// its translation, with the usage read (and its chunk taken out) on the
/// way.
struct Pass {
    from: Option<anthropic::Stream>,
    scan: UsageScan,
    /// Tokens of an answer translated whole (with what OpenAI's usage
    /// cannot say, such as cache writes).
    tokens: Option<Tokens>,
}

impl Pass {
    /// The answer's first read: already translated by the attempt when
    /// `translated`.
    fn first(&mut self, chunk: Bytes, translated: bool) -> Bytes {
        if translated {
            self.scan.pass(chunk)
        } else {
            self.pass(chunk)
        }
    }

    fn pass(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.from {
            Some(t) => {
                let out = t.push(chunk);
                if out.is_empty() {
                    out
                } else {
                    self.scan.pass(out)
                }
            }
            None => self.scan.pass(chunk),
        }
    }

    /// At the answer's clean end: what is left to send, and whether the
    /// answer failed all the same (a translated stream that ended with an
    /// error event, or before its last event, which then gets an error
    /// event of ours: never a silent truncation).
    fn close(&mut self) -> (Bytes, Option<ErrorKind>) {
        let rest = self.end();
        let Some(t) = &self.from else {
            return (rest, None);
        };
        if let Some(kind) = t.failure_kind() {
            // Counted as what the provider said: an overload or a rate
            // limit mid-stream is not a broken connection.
            let error = match anthropic::status_of(kind) {
                429 => ErrorKind::Status429,
                s if s >= 500 => ErrorKind::Status5xx,
                _ => ErrorKind::Broken,
            };
            return (rest, Some(error));
        }
        if t.complete() {
            return (rest, None);
        }
        let mut out = BytesMut::from(&rest[..]);
        out.extend_from_slice(
            &stream_interrupted("the provider ended the stream early").sse_event(),
        );
        (out.freeze(), Some(ErrorKind::Broken))
    }

    fn end(&mut self) -> Bytes {
        let rest = match &mut self.from {
            Some(t) => {
                let rest = t.end();
                if rest.is_empty() {
                    rest
                } else {
                    self.scan.pass(rest)
                }
            }
            None => Bytes::new(),
        };
        let held = self.scan.end();
        match (rest.is_empty(), held.is_empty()) {
            (_, true) => rest,
            (true, false) => held,
            (false, false) => Bytes::from([rest, held].concat()),
        }
    }

    fn finish(self) -> Option<Tokens> {
        let from = self.from.as_ref().and_then(anthropic::Stream::tokens);
        let scanned = self.scan.finish();
        self.tokens.or(from).or(scanned)
    }
}

/// The response headers the sidecar adds.
pub struct Stamp<'a> {
    pub endpoint: &'a http::HeaderValue,
    pub attempts: u8,
    pub table_version: &'a http::HeaderValue,
    pub degraded: Option<&'static str>,
}

/// How the relay ended, for accounting.
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    pub status: u16,
    pub error: Option<ErrorKind>,
    pub ttft: Duration,
    /// From the attempt's start to the answer's end.
    pub latency: Duration,
    pub tokens: Option<Tokens>,
    /// The upstream answer was read to its end, so its connection can be
    /// reused.
    pub done: bool,
}

/// `x-switchyard-attempts` for the usual counts, without formatting.
fn attempts_value(n: u8) -> http::HeaderValue {
    const SMALL: [&str; 6] = ["0", "1", "2", "3", "4", "5"];
    match SMALL.get(usize::from(n)) {
        Some(s) => http::HeaderValue::from_static(s),
        None => http::HeaderValue::from(u16::from(n)),
    }
}

/// The app's response header: the provider's, minus hop-by-hop headers,
/// plus the sidecar's own. Edited in place: most answers carry no
/// hop-by-hop header, and then nothing is copied.
pub fn response_header(
    mut resp: ResponseHeader,
    stamp: &Stamp<'_>,
) -> pingora::Result<ResponseHeader> {
    // The sidecar speaks HTTP/1.1 to the app whatever the provider spoke
    // (an HTTP/1.0 answer relayed chunked must not say HTTP/1.0).
    resp.set_version(http::Version::HTTP_11);
    let has_connection = resp.headers.contains_key(header::CONNECTION);
    let hop = |n: &str| {
        (n != "content-length" && is_hop_header(n))
            || (has_connection && connection_lists(&resp.headers, n))
    };
    if resp.headers.keys().any(|n| hop(n.as_str())) {
        let gone: Vec<http::HeaderName> = resp
            .headers
            .keys()
            .filter(|n| hop(n.as_str()))
            .cloned()
            .collect();
        for n in gone {
            resp.remove_header(&n);
        }
    }
    resp.insert_header("x-switchyard-endpoint", stamp.endpoint.clone())?;
    resp.insert_header("x-switchyard-attempts", attempts_value(stamp.attempts))?;
    resp.insert_header("x-switchyard-table-version", stamp.table_version.clone())?;
    if let Some(d) = stamp.degraded {
        resp.insert_header("x-switchyard-degraded", d)?;
    }
    Ok(resp)
}

/// A write to the app, bounded by the request's deadline: an app that stops
/// reading must not hold the upstream connection and its capacity forever.
async fn write(
    session: &mut Session,
    data: Option<Bytes>,
    end: bool,
    deadline: Instant,
) -> Result<(), Stop> {
    let left = deadline.saturating_duration_since(Instant::now());
    match fast_timeout(left, session.write_response_body(data, end)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Stop::Abort(e)),
        Err(_) => Err(Stop::Abort(Error::explain(
            ErrorType::WriteTimedout,
            "the app did not read the answer before the deadline",
        ))),
    }
}

/// Most upstream chunks joined into one write to the app.
const COALESCE_MAX_CHUNKS: usize = 64;
const COALESCE_MAX_BYTES: usize = 64 * 1024;

/// Appends to `out` every body chunk the upstream has already delivered,
/// without waiting for any. Tokens a provider sends back to back arrive in
/// one read and are parsed out one chunk at a time; writing them to the app
/// one by one would cost a write and a flush each. What is not yet readable
/// is left for the next (waiting) read, so nothing is held back. Returns the
/// joined bytes and, when the last read ended the body or failed, its result.
fn coalesce(
    up: &mut HttpSession,
    pass: &mut Pass,
    out: Bytes,
) -> (Bytes, Option<pingora::Result<Option<Bytes>>>) {
    let mut joined: Option<BytesMut> = None;
    for _ in 0..COALESCE_MAX_CHUNKS {
        if joined.as_ref().map_or(out.len(), BytesMut::len) >= COALESCE_MAX_BYTES {
            break;
        }
        // pingora's body reader keeps its parse state across a dropped
        // read (a pending read has consumed nothing), so polling once and
        // giving up is safe.
        match up.read_body_bytes().now_or_never() {
            None => break,
            Some(Ok(Some(chunk))) => {
                let more = pass.pass(chunk);
                if !more.is_empty() {
                    joined
                        .get_or_insert_with(|| {
                            // Room for a few more chunks, so joining
                            // them does not grow the buffer each time.
                            let mut j = BytesMut::with_capacity((out.len() + more.len()) * 4);
                            j.extend_from_slice(&out);
                            j
                        })
                        .extend_from_slice(&more);
                }
            }
            Some(end_or_error) => {
                return (joined.map_or(out, BytesMut::freeze), Some(end_or_error));
            }
        }
    }
    (joined.map_or(out, BytesMut::freeze), None)
}

/// Streams an opened upstream answer to the app. Returns how the relay
/// ended for the app (`Err`: its connection must close) and, for
/// accounting, how the answer ended; the upstream session is handed back
/// when it can be reused.
pub async fn relay(
    session: &mut Session,
    opened: Opened,
    stamp: &Stamp<'_>,
    how: Relay,
) -> (Result<(), Stop>, Relayed, Option<Box<HttpSession>>) {
    let Opened {
        session: mut up,
        header: up_header,
        head,
        ttft,
    } = opened;
    let attempt_start = Instant::now() - ttft;
    let sse = is_event_stream(&up_header);
    // A stream in another API goes on being translated event by event; what
    // the attempt read of it is translated already.
    let (mut first, tokens, from) = match head {
        Head::Plain(first) => (first, None, None),
        Head::Whole(body, tokens) => (Some(body), tokens, None),
        Head::Stream(read, t) => (Some(read), None, Some(*t)),
    };
    let translated = from.is_some();
    let mut pass = Pass {
        from,
        scan: if sse {
            UsageScan::sse(how.strip_usage)
        } else {
            UsageScan::json()
        },
        tokens,
    };
    let mut done = up.is_body_done();
    let mut error = None;
    let status = up_header.status.as_u16();
    // An answer already whole goes out with its exact length, which is
    // shorter than the provider's when the usage chunk was taken out.
    let whole = done.then(|| {
        let out = first
            .take()
            .map(|c| pass.first(c, translated))
            .unwrap_or_default();
        let (rest, failed) = pass.close();
        error = failed;
        if rest.is_empty() {
            out
        } else {
            Bytes::from([out, rest].concat())
        }
    });
    let result = async {
        let mut resp = response_header(up_header, stamp).map_err(Stop::Abort)?;
        if let Some(w) = &whole {
            resp.insert_header(header::CONTENT_LENGTH, w.len())
                .map_err(Stop::Abort)?;
        } else if (sse && (how.strip_usage || translated))
            || !resp.headers.contains_key(header::CONTENT_LENGTH)
        {
            // Framed, so the app can tell a complete answer from a cut one
            // and keep its connection; a stream losing its usage chunk, or
            // translated, cannot keep the provider's length.
            resp.remove_header(&header::CONTENT_LENGTH);
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")
                .map_err(Stop::Abort)?;
        }
        crate::drain::close_if_draining(session);
        let left = how.deadline.saturating_duration_since(Instant::now());
        match fast_timeout(left, session.write_response_header(Box::new(resp), false)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Stop::Abort(e)),
            Err(_) => {
                return Err(Stop::Abort(Error::explain(
                    ErrorType::WriteTimedout,
                    "the app did not read the answer before the deadline",
                )))
            }
        }
        // A read that was already done when coalescing stopped: it is
        // taken before reading again.
        let mut held = None;
        if let Some(w) = whole {
            write(session, Some(w), true, how.deadline).await?;
        } else if let Some(chunk) = first {
            let out = pass.first(chunk, translated);
            let (out, after) = coalesce(&mut up, &mut pass, out);
            held = after;
            if !out.is_empty() {
                write(session, Some(out), false, how.deadline).await?;
            }
        }
        while !done {
            let now = Instant::now();
            let to_deadline = how.deadline.saturating_duration_since(now);
            let wait = how.inter_token.min(to_deadline);
            let next = match held.take() {
                Some(read) => Ok(read),
                None => fast_timeout(wait, up.read_body_bytes()).await,
            };
            let reason = match next {
                Ok(Ok(Some(chunk))) => {
                    let out = pass.pass(chunk);
                    let (out, after) = coalesce(&mut up, &mut pass, out);
                    held = after;
                    // Never an empty write: in chunked framing that
                    // would end the body.
                    if !out.is_empty() {
                        write(session, Some(out), false, how.deadline).await?;
                    }
                    continue;
                }
                Ok(Ok(None)) => {
                    done = true;
                    let (rest, failed) = pass.close();
                    error = failed;
                    write(
                        session,
                        (!rest.is_empty()).then_some(rest),
                        true,
                        how.deadline,
                    )
                    .await?;
                    break;
                }
                Ok(Err(e)) => {
                    error = Some(ErrorKind::Broken);
                    format!("the provider broke the stream: {e}")
                }
                Err(_) => {
                    error = Some(ErrorKind::Timeout);
                    if wait < how.inter_token {
                        "the request deadline passed mid-stream".to_string()
                    } else {
                        format!("no data for {} ms mid-stream", how.inter_token.as_millis())
                    }
                }
            };
            // Never a silent truncation: a stream ends with an error event
            // after the last whole event; any other body cannot be mended,
            // so the connection is closed before its declared end.
            if sse {
                pass.scan.abandon();
                let event = stream_interrupted(&reason).sse_event();
                write(session, Some(event), true, how.deadline).await?;
                return Ok(());
            }
            return Err(Stop::Abort(Error::explain(ErrorType::ReadError, reason)));
        }
        Ok(())
    }
    .await;
    let relayed = Relayed {
        status,
        error,
        ttft,
        latency: attempt_start.elapsed(),
        tokens: pass.finish(),
        done,
    };
    let reusable = (done && result.is_ok()).then_some(up);
    (result, relayed, reusable)
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
    const END: &str = "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn translating(strip: bool) -> Pass {
        Pass {
            from: Some(anthropic::Stream::new(0)),
            scan: UsageScan::sse(strip),
            tokens: None,
        }
    }

    #[test]
    fn a_translated_stream_is_whole_only_when_the_provider_ended_it() {
        // Ended properly: no error, usage taken out for an app that did not
        // ask, tokens from the provider's own counts.
        let mut p = translating(true);
        let mut out = p.pass(Bytes::from(format!("{START}{END}")));
        let (rest, error) = p.close();
        out = Bytes::from([out, rest].concat());
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(error, None, "{text}");
        assert!(text.contains("\"content\":\"Hi\"") && text.ends_with("data: [DONE]\n\n"));
        assert!(!text.contains("\"usage\""), "{text}");
        let t = p.finish().unwrap();
        assert_eq!((t.input, t.output), (7, 3));

        // Closed before its last event: an error event of ours ends it.
        let mut p = translating(true);
        let out = p.pass(Bytes::from(START));
        let (rest, error) = p.close();
        assert_eq!(error, Some(ErrorKind::Broken));
        assert!(String::from_utf8_lossy(&out).contains("Hi"));
        assert!(String::from_utf8_lossy(&rest).contains("ended the stream early"));

        // The provider's own error event is passed on, and counts.
        let mut p = translating(true);
        let failed = format!("{START}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n");
        let out = p.pass(Bytes::from(failed));
        let (rest, error) = p.close();
        assert_eq!(
            error,
            Some(ErrorKind::Status5xx),
            "an overload, as a 529 is"
        );
        assert!(String::from_utf8_lossy(&out).contains("Overloaded"));
        assert!(!String::from_utf8_lossy(&rest).contains("ended the stream early"));
    }

    #[test]
    fn the_apps_header_is_the_providers_minus_hop_headers_plus_the_sidecars() {
        let mut up = ResponseHeader::build(200, None).unwrap();
        for (k, v) in [
            ("content-type", "text/event-stream"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("keep-alive", "timeout=5"),
            ("x-request-id", "req-1"),
            ("content-length", "12"),
        ] {
            up.append_header(k, v).unwrap();
        }
        let ep = http::HeaderValue::from_static("onprem-a");
        let v = http::HeaderValue::from(42u64);
        let resp = response_header(
            up,
            &Stamp {
                endpoint: &ep,
                attempts: 2,
                table_version: &v,
                degraded: Some("cap-max-tokens"),
            },
        )
        .unwrap();
        let get = |k: &str| resp.headers.get(k).map(|v| v.to_str().unwrap());
        assert_eq!(get("content-type"), Some("text/event-stream"));
        assert_eq!(get("content-length"), Some("12"));
        assert_eq!(get("x-request-id"), Some("req-1"));
        for gone in ["connection", "x-hop", "transfer-encoding", "keep-alive"] {
            assert_eq!(get(gone), None, "{gone}");
        }
        assert_eq!(get("x-switchyard-endpoint"), Some("onprem-a"));
        assert_eq!(get("x-switchyard-attempts"), Some("2"));
        assert_eq!(get("x-switchyard-table-version"), Some("42"));
        assert_eq!(get("x-switchyard-degraded"), Some("cap-max-tokens"));
        assert_eq!(attempts_value(9), "9");
    }
}
