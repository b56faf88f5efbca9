//! What the sidecar counts per endpoint: requests, errors by kind, time to
//! first token and total latency (hdrhistogram, microseconds). Counted in
//! windows that the telemetry reporter takes whole, so each report covers
//! only its own interval.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use switchyard_proto::v1 as pb;

use crate::health::Endpoints;

/// Why an attempt failed; the kinds the control plane weighs differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Status5xx,
    Status429,
    /// The upstream broke the exchange after it began (reset, malformed).
    Broken,
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub error: Option<ErrorKind>,
    pub ttft: Option<Duration>,
    pub latency: Duration,
    /// Tokens the provider reported, when it did.
    pub tokens: Option<Tokens>,
    pub spend_usd: f64,
}

impl Outcome {
    pub fn failed(error: ErrorKind, latency: Duration) -> Self {
        Self {
            error: Some(error),
            ttft: None,
            latency,
            tokens: None,
            spend_usd: 0.0,
        }
    }
}

/// Tokens as the provider's `usage` reports them. `cached_input` is the part
/// of `input` served from the provider's prompt cache; reasoning tokens are
/// part of `output` already (OpenAI counts them in `completion_tokens` and
/// bills them as output), so they are neither added nor priced apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
}

/// An endpoint's prices, in USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prices {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

impl Tokens {
    /// Cost at `p`: cached input at the cached price, the rest of the input
    /// at the input price, output at the output price.
    pub fn cost(&self, p: &Prices) -> f64 {
        let cached = self.cached_input.min(self.input);
        ((self.input - cached) as f64 * p.input
            + cached as f64 * p.cached_input
            + self.output as f64 * p.output)
            / 1e6
    }
}

/// Finds the `usage` a provider reports, in a whole JSON answer or in the
/// SSE events of a stream (the chunk sent when `stream_options.include_usage`
/// is set). Keeps at most one event (or, for a JSON answer, a bounded
/// prefix) buffered.
///
/// When the sidecar asked for the usage chunk on the app's behalf
/// (`stripping`), the chunk is taken out of the stream the app sees: then
/// the stream is passed on in whole events, so an event split across reads
/// waits for its end.
#[derive(Debug, Default)]
pub struct UsageScan {
    sse: bool,
    strip: bool,
    buf: Vec<u8>,
    overflow: bool,
    found: Option<Tokens>,
}

/// A JSON answer (or one SSE event) larger than this is passed on without
/// reading its usage.
const MAX_SCANNED: usize = 1 << 20;

impl UsageScan {
    pub fn new(sse: bool) -> Self {
        Self {
            sse,
            ..Self::default()
        }
    }

    /// A stream whose usage chunk the app did not ask for.
    pub fn stripping() -> Self {
        Self {
            sse: true,
            strip: true,
            ..Self::default()
        }
    }

    /// Takes a chunk of the answer; returns what to pass on to the app.
    pub fn pass(&mut self, chunk: Bytes) -> Bytes {
        if !self.strip || self.overflow {
            self.feed(&chunk);
            return chunk;
        }
        if self.buf.len() + chunk.len() > MAX_SCANNED {
            // Too big to hold: give up stripping, lose nothing.
            self.overflow = true;
            let mut out = std::mem::take(&mut self.buf);
            out.extend_from_slice(&chunk);
            return Bytes::from(out);
        }
        self.buf.extend_from_slice(&chunk);
        let mut out = Vec::with_capacity(self.buf.len());
        let mut start = 0;
        while let Some(end) = find(&self.buf[start..], b"\n\n") {
            let event = &self.buf[start..start + end];
            match usage_event(event) {
                Some((t, true)) => self.found = Some(t),
                found => {
                    if let Some((t, _)) = found {
                        self.found = Some(t);
                    }
                    out.extend_from_slice(&self.buf[start..start + end + 2]);
                }
            }
            start += end + 2;
        }
        self.buf.drain(..start);
        Bytes::from(out)
    }

    /// What a stripping scan still holds when the answer ends.
    pub fn rest(&mut self) -> Bytes {
        if self.strip && !self.overflow {
            Bytes::from(std::mem::take(&mut self.buf))
        } else {
            Bytes::new()
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len() + chunk.len() > MAX_SCANNED {
            self.overflow = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(chunk);
        if !self.sse {
            return;
        }
        // Examine complete events; keep the incomplete tail.
        let mut start = 0;
        while let Some(end) = find(&self.buf[start..], b"\n\n") {
            if let Some((t, _)) = usage_event(&self.buf[start..start + end]) {
                self.found = Some(t);
            }
            start += end + 2;
        }
        self.buf.drain(..start);
    }

    /// Whether the app was sent part of an event (bytes after the last
    /// blank line), so an error event must first close it.
    pub fn mid_event(&self) -> bool {
        self.sse && !self.strip && !self.overflow && !self.buf.is_empty()
    }

    pub fn finish(self) -> Option<Tokens> {
        if self.sse || self.overflow {
            return self.found;
        }
        tokens_of(&self.buf)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(serde::Deserialize)]
struct UsageJson {
    prompt_tokens: u64,
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(serde::Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl From<UsageJson> for Tokens {
    fn from(u: UsageJson) -> Self {
        Tokens {
            input: u.prompt_tokens,
            output: u.completion_tokens,
            cached_input: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
        }
    }
}

fn tokens_of(json: &[u8]) -> Option<Tokens> {
    #[derive(serde::Deserialize)]
    struct Answer {
        usage: Option<UsageJson>,
    }
    let a: Answer = serde_json::from_slice(json).ok()?;
    a.usage.map(Tokens::from)
}

/// The usage an SSE event carries, and whether the event is the usage-only
/// chunk (no choices). Events that cannot mention usage are not parsed.
fn usage_event(event: &[u8]) -> Option<(Tokens, bool)> {
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<serde::de::IgnoredAny>,
        usage: Option<UsageJson>,
    }
    find(event, b"\"usage\"")?;
    let c: Chunk = serde_json::from_slice(event.strip_prefix(b"data: ")?).ok()?;
    let only = c.choices.is_empty();
    c.usage.map(|u| (u.into(), only))
}

struct Window {
    requests: u64,
    errors: [u64; 5],
    tokens: Tokens,
    spend_usd: f64,
    ttft: Histogram<u64>,
    latency: Histogram<u64>,
}

/// Microseconds, 1 µs to 10 minutes, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds")
}

impl Window {
    fn new() -> Self {
        Self {
            requests: 0,
            errors: [0; 5],
            tokens: Tokens::default(),
            spend_usd: 0.0,
            ttft: histogram(),
            latency: histogram(),
        }
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 600_000_000)
}

/// Counters per endpoint name. One short lock per finished attempt; the
/// windows are swapped out, not copied, when reported.
#[derive(Default)]
pub struct Usage {
    windows: Mutex<HashMap<Arc<str>, Window>>,
}

impl Usage {
    pub fn record(&self, endpoint: &Arc<str>, o: Outcome) {
        let mut m = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = match m.get_mut(endpoint) {
            Some(w) => w,
            None => m.entry(endpoint.clone()).or_insert_with(Window::new),
        };
        w.requests += 1;
        if let Some(e) = o.error {
            w.errors[e as usize] += 1;
        }
        if let Some(t) = o.ttft {
            let _ = w.ttft.record(micros(t));
        }
        let _ = w.latency.record(micros(o.latency));
        if let Some(t) = o.tokens {
            w.tokens.input += t.input;
            w.tokens.output += t.output;
        }
        w.spend_usd += o.spend_usd;
    }

    /// Takes the windows counted since the last call, as telemetry.
    /// In-flight counts come from the endpoints' live state.
    pub fn take_report(&self, live: &Endpoints) -> Vec<pb::EndpointWindow> {
        let windows = std::mem::take(&mut *self.windows.lock().unwrap_or_else(|p| p.into_inner()));
        let in_flight: HashMap<String, u32> = live
            .all()
            .into_iter()
            .map(|(k, v)| (k, v.in_flight.load(Ordering::Relaxed)))
            .collect();
        let mut ser = V2Serializer::new();
        let mut encode = |h: &Histogram<u64>| {
            let mut buf = Vec::new();
            ser.serialize(h, &mut buf).map(|_| buf).unwrap_or_default()
        };
        let mut out: Vec<pb::EndpointWindow> = windows
            .into_iter()
            .map(|(name, w)| pb::EndpointWindow {
                in_flight: in_flight.get(&*name).copied().unwrap_or(0),
                endpoint: name.to_string(),
                requests: w.requests,
                errors_connect: w.errors[ErrorKind::Connect as usize],
                errors_timeout: w.errors[ErrorKind::Timeout as usize],
                errors_5xx: w.errors[ErrorKind::Status5xx as usize],
                errors_429: w.errors[ErrorKind::Status429 as usize],
                ttft_histogram: encode(&w.ttft),
                latency_histogram: encode(&w.latency),
                tokens_in: w.tokens.input,
                tokens_out: w.tokens.output,
                spend_usd: w.spend_usd,
                ..Default::default()
            })
            .collect();
        // An endpoint so slow that nothing finished in the window still
        // reports its in-flight gauge: that is when the control plane most
        // needs it.
        for (name, n) in &in_flight {
            if *n > 0 && !out.iter().any(|w| *w.endpoint == **name) {
                out.push(pb::EndpointWindow {
                    endpoint: name.to_string(),
                    in_flight: *n,
                    ..Default::default()
                });
            }
        }
        out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::Deserializer;

    #[test]
    fn usage_is_found_in_json_answers_and_in_split_sse_events() {
        let mut j = UsageScan::new(false);
        j.pass(Bytes::from_static(
            br#"{"id":"x","usage":{"prompt_tokens":12,"#,
        ));
        j.pass(Bytes::from_static(
            br#""completion_tokens":30,"total_tokens":42}}"#,
        ));
        assert_eq!(
            j.finish(),
            Some(Tokens {
                input: 12,
                output: 30,
                cached_input: 0
            })
        );

        let mut s = UsageScan::new(true);
        s.pass(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\nda",
        ));
        s.pass(Bytes::from_static(
            b"ta: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,",
        ));
        s.pass(Bytes::from_static(
            b"\"completion_tokens\":7}}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(
            s.finish(),
            Some(Tokens {
                input: 5,
                output: 7,
                cached_input: 0
            })
        );

        let mut none = UsageScan::new(true);
        none.pass(Bytes::from_static(
            b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(none.finish(), None);

        // OpenAI's details: cached prompt tokens are read; reasoning tokens
        // are already inside completion_tokens.
        let mut d = UsageScan::new(false);
        d.pass(Bytes::from_static(
            br#"{"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":80,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":40}}}"#,
        ));
        assert_eq!(
            d.finish(),
            Some(Tokens {
                input: 100,
                output: 50,
                cached_input: 80
            })
        );
    }

    #[test]
    fn cached_input_is_priced_apart_and_never_more_than_the_input() {
        let p = Prices {
            input: 1.0,
            cached_input: 0.25,
            output: 4.0,
        };
        let cost = |input, cached_input, output| {
            Tokens {
                input,
                output,
                cached_input,
            }
            .cost(&p)
        };
        assert!((cost(1_000_000, 0, 500_000) - 3.0).abs() < 1e-9);
        // 200k uncached at 1, 800k cached at 0.25, 500k out at 4.
        assert!((cost(1_000_000, 800_000, 500_000) - 2.4).abs() < 1e-9);
        // A provider reporting more cached than prompt tokens is not
        // believed past the prompt.
        assert!((cost(1_000_000, 2_000_000, 0) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn a_usage_chunk_the_app_did_not_ask_for_is_taken_out_whole() {
        let stream: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n\
            data: [DONE]\n\n";
        let expected: Vec<u8> = String::from_utf8_lossy(stream)
            .split_inclusive("\n\n")
            .filter(|e| !e.contains("\"choices\":[],"))
            .collect::<String>()
            .into_bytes();
        // Every way of cutting the stream into two reads.
        for at in 0..stream.len() {
            let mut s = UsageScan::stripping();
            let mut seen = Vec::new();
            seen.extend_from_slice(&s.pass(Bytes::copy_from_slice(&stream[..at])));
            seen.extend_from_slice(&s.pass(Bytes::copy_from_slice(&stream[at..])));
            seen.extend_from_slice(&s.rest());
            assert_eq!(seen, expected, "cut at {at}");
            assert_eq!(
                s.finish(),
                Some(Tokens {
                    input: 3,
                    output: 4,
                    cached_input: 0
                })
            );
        }
        // A stream cut off mid-event still passes on what it held.
        let mut s = UsageScan::stripping();
        let mut seen = s
            .pass(Bytes::from_static(b"data: {\"choices\":[{\"del"))
            .to_vec();
        assert!(seen.is_empty() && !s.mid_event());
        seen.extend_from_slice(&s.rest());
        assert_eq!(seen, b"data: {\"choices\":[{\"del");
    }

    #[test]
    fn windows_are_taken_whole_and_histograms_round_trip() {
        let u = Usage::default();
        let live = Endpoints::default();
        let a: Arc<str> = Arc::from("a");
        live.get("a").in_flight.fetch_add(1, Ordering::Relaxed);
        for ms in [10, 20, 30] {
            u.record(
                &a,
                Outcome {
                    error: None,
                    ttft: Some(Duration::from_millis(ms / 2)),
                    latency: Duration::from_millis(ms),
                    tokens: Some(Tokens {
                        input: 10,
                        output: 20,
                        cached_input: 0,
                    }),
                    spend_usd: 0.5,
                },
            );
        }
        u.record(
            &a,
            Outcome::failed(ErrorKind::Status429, Duration::from_millis(1)),
        );
        let r = u.take_report(&live);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].requests, r[0].errors_429, r[0].in_flight), (4, 1, 1));
        assert_eq!((r[0].tokens_in, r[0].tokens_out), (30, 60));
        assert!((r[0].spend_usd - 1.5).abs() < 1e-9);
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut r[0].latency_histogram.as_slice())
            .unwrap();
        assert_eq!(h.len(), 4);
        assert!(h.value_at_quantile(1.0) >= 29_900);
        let r = u.take_report(&live);
        assert_eq!(
            (r.len(), r[0].requests, r[0].in_flight),
            (1, 0, 1),
            "a taken window is not reported twice; the gauge still is"
        );
        live.get("a").in_flight.fetch_sub(1, Ordering::Relaxed);
        assert!(u.take_report(&live).is_empty());
    }
}
