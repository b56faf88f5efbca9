//! Token usage as providers report it, and what it costs.
//!
//! OpenAI reports `usage` at the end of a JSON answer, and in a stream, when
//! the request set `stream_options.include_usage`, as one last chunk with
//! empty `choices`. [`UsageScan`] reads it from an answer as it passes
//! through; for a stream whose usage chunk the app did not ask for (the
//! sidecar asked on its behalf), it also takes that chunk out, so the app
//! sees the stream it asked for.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::{Finder, FinderRev};
use serde::Deserialize;

use crate::sse::{self, EventStream, Verdict};

/// Tokens as the provider's `usage` reports them. `cached_input` is the
/// part of `input` served from the provider's prompt cache; `cache_write`
/// the part of `input` written to it (Anthropic bills those above the input
/// price; OpenAI caches without charging, and reports none). Reasoning
/// tokens are part of `output` already (OpenAI counts them in
/// `completion_tokens` and bills them as output), so they are neither added
/// nor priced apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_write: u64,
}

/// An endpoint's prices, in USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prices {
    pub input: f64,
    pub cached_input: f64,
    /// Prompt tokens written to the provider's prompt cache.
    pub cache_write: f64,
    pub output: f64,
}

impl Tokens {
    /// Cost at `p`: cached input at the cached price, cache writes at the
    /// cache write price, the rest of the input at the input price, output
    /// at the output price. A provider claiming more cached or written
    /// tokens than prompt tokens is believed up to the prompt (reads
    /// first: they are what the provider says it served).
    pub fn cost(&self, p: &Prices) -> f64 {
        let cached = self.cached_input.min(self.input);
        let written = self.cache_write.min(self.input - cached);
        ((self.input - cached - written) as f64 * p.input
            + cached as f64 * p.cached_input
            + written as f64 * p.cache_write
            + self.output as f64 * p.output)
            / 1e6
    }
}

#[derive(Deserialize)]
struct UsageJson {
    prompt_tokens: u64,
    /// Absent from embeddings' usage.
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
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
            cache_write: 0,
        }
    }
}

/// The `usage` of a whole JSON answer.
pub fn of_answer(json: &[u8]) -> Option<Tokens> {
    match last_member(json) {
        Some(found) => found,
        None => of_answer_parsed(json),
    }
}

/// `usage` when it is the root object's last member, as OpenAI-compatible
/// servers put it: found from the end and parsed alone, without reading
/// the whole answer. `None` when the answer is not laid out that way (then
/// it is parsed whole). The key is the root's own: the value is followed
/// only by the closing brace that ends the document, and the key follows
/// `{` or `,`, so it is no string's content.
/// The key searched for, with searchers built once (building one costs
/// more than searching a typical chunk).
const KEY: &[u8] = b"\"usage\"";
static FIND_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(KEY));
static RFIND_KEY: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(KEY));

fn last_member(json: &[u8]) -> Option<Option<Tokens>> {
    let at = RFIND_KEY.rfind(json)?;
    let before = json.get(..at)?.trim_ascii_end();
    if !matches!(before.last(), Some(b'{' | b',')) {
        return None;
    }
    let after = json.get(at + KEY.len()..)?.trim_ascii_start();
    // The root's closing brace ends the document; what is between the
    // colon and it is the value, whole.
    let value = after
        .strip_prefix(b":")?
        .trim_ascii_end()
        .strip_suffix(b"}")?
        .trim_ascii();
    if value == b"null" {
        return Some(None);
    }
    match scan(value) {
        Some(t) => Some(Some(t)),
        // Not the plain shape `scan` reads: let serde judge the value.
        None => Some(
            serde_json::from_slice::<Option<UsageJson>>(value)
                .ok()?
                .map(Tokens::from),
        ),
    }
}

/// Reads a usage object of the usual shape (unsigned integer counts, the
/// cached count inside `prompt_tokens_details`) in one pass, without
/// building anything. `None` for anything else, which is then parsed.
fn scan(v: &[u8]) -> Option<Tokens> {
    if v.first() != Some(&b'{') {
        return None;
    }
    let mut t = Tokens::default();
    let (mut prompt, mut completion) = (false, false);
    let mut depth = 0usize;
    // The key just read at each of the first two depths.
    let mut key1: &[u8] = b"";
    let mut key2: &[u8] = b"";
    let mut i = 0;
    let mut expect_value = false;
    while let Some(&c) = v.get(i) {
        match c {
            b'{' => {
                depth += 1;
                expect_value = false;
                i += 1;
            }
            b'}' => {
                depth = depth.checked_sub(1)?;
                i += 1;
                // The object ended: it must be the whole value.
                if depth == 0 && !v.get(i..)?.trim_ascii().is_empty() {
                    return None;
                }
            }
            b'"' => {
                let start = i + 1;
                let len = memchr::memchr2(b'"', b'\\', v.get(start..)?)?;
                // An escape in a key or string: not the plain shape.
                if v.get(start + len) != Some(&b'"') {
                    return None;
                }
                let text = v.get(start..start + len)?;
                i = start + len + 1;
                if !expect_value {
                    match depth {
                        1 => key1 = text,
                        2 => key2 = text,
                        _ => {}
                    }
                }
                expect_value = false;
            }
            b':' => {
                expect_value = true;
                i += 1;
            }
            b'0'..=b'9' if expect_value => {
                let len = v
                    .get(i..)?
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                let n: u64 = std::str::from_utf8(v.get(i..i + len)?).ok()?.parse().ok()?;
                i += len;
                if matches!(v.get(i), Some(b'.' | b'e' | b'E')) {
                    return None;
                }
                match (depth, key1, key2) {
                    (1, b"prompt_tokens", _) => (t.input, prompt) = (n, true),
                    (1, b"completion_tokens", _) => (t.output, completion) = (n, true),
                    (2, b"prompt_tokens_details", b"cached_tokens") => t.cached_input = n,
                    _ => {}
                }
                expect_value = false;
            }
            b',' | b' ' | b'\n' | b'\r' | b'\t' => i += 1,
            // Negative numbers, null, true, false, arrays: the plain
            // shape has none where they matter; serde decides.
            _ => return None,
        }
    }
    (depth == 0 && prompt && completion).then_some(t)
}

/// The `usage` of a whole JSON answer by a full parse (what [`of_answer`]
/// falls back to, and what it is checked against).
pub fn of_answer_parsed(json: &[u8]) -> Option<Tokens> {
    #[derive(Deserialize)]
    struct Answer {
        usage: Option<UsageJson>,
    }
    let a: Answer = serde_json::from_slice(json).ok()?;
    a.usage.map(Tokens::from)
}

/// The usage one stream chunk (an event's data) carries, and whether it is
/// the usage-only chunk (no choices). Chunks that cannot mention usage are
/// not parsed.
pub fn of_chunk(data: &[u8]) -> Option<(Tokens, bool)> {
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<serde::de::IgnoredAny>,
        usage: Option<UsageJson>,
    }
    FIND_KEY.find(data)?;
    let c: Chunk = serde_json::from_slice(data).ok()?;
    let only = c.choices.is_empty();
    c.usage.map(|u| (u.into(), only))
}

/// A JSON answer larger than this is not held whole: its usage is read from
/// its last [`TAIL`] bytes (an SSE event larger than this is passed on
/// without its usage being read).
pub const MAX_SCANNED: usize = 1 << 20;

/// What is kept of a JSON answer past [`MAX_SCANNED`]: room for a usage
/// object many times over.
pub const TAIL: usize = 64 << 10;

/// Reads the usage of an answer as it passes (see the module docs).
#[derive(Debug)]
pub struct UsageScan {
    kind: Kind,
    found: Option<Tokens>,
}

#[derive(Debug)]
enum Kind {
    /// A JSON answer: its reads, kept (one without a copy) until the end;
    /// past [`MAX_SCANNED`], only its last [`TAIL`] bytes (`tail`), where
    /// `usage` is when it is the last member (a large embeddings answer
    /// must still be accounted).
    Json {
        first: Option<Bytes>,
        rest: Option<BytesMut>,
        tail: Option<BytesMut>,
    },
    Sse {
        events: EventStream,
        strip: bool,
    },
}

impl UsageScan {
    /// For a JSON answer.
    pub fn json() -> Self {
        Self {
            kind: Kind::Json {
                first: None,
                rest: None,
                tail: None,
            },
            found: None,
        }
    }

    /// For an event stream; `strip`: the sidecar asked for the usage chunk,
    /// the app did not, so it is taken out.
    pub fn sse(strip: bool) -> Self {
        Self {
            kind: Kind::Sse {
                events: EventStream::new(),
                strip,
            },
            found: None,
        }
    }

    /// Takes a read of the answer; returns what to pass on to the app
    /// (for a stream: whole events only, see [`EventStream`]).
    pub fn pass(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.kind {
            Kind::Json { first, rest, tail } => {
                if let Some(t) = tail {
                    t.extend_from_slice(&chunk);
                    if t.len() > 2 * TAIL {
                        let _ = t.split_to(t.len() - TAIL);
                    }
                    return chunk;
                }
                let held =
                    first.as_ref().map_or(0, Bytes::len) + rest.as_ref().map_or(0, BytesMut::len);
                if held + chunk.len() > MAX_SCANNED {
                    let mut t = BytesMut::with_capacity(2 * TAIL);
                    for part in [
                        first.take().as_deref(),
                        rest.take().as_deref(),
                        Some(&chunk[..]),
                    ]
                    .into_iter()
                    .flatten()
                    {
                        t.extend_from_slice(part);
                        if t.len() > 2 * TAIL {
                            let _ = t.split_to(t.len() - TAIL);
                        }
                    }
                    *tail = Some(t);
                } else if let Some(r) = rest {
                    r.extend_from_slice(&chunk);
                } else if let Some(f) = first.take() {
                    let mut r = BytesMut::with_capacity((f.len() + chunk.len()) * 2);
                    r.extend_from_slice(&f);
                    r.extend_from_slice(&chunk);
                    *rest = Some(r);
                } else {
                    *first = Some(chunk.clone());
                }
                chunk
            }
            Kind::Sse { events, strip } => {
                let strip = *strip;
                let found = &mut self.found;
                events.push(chunk, &mut |event| {
                    // Most events are tokens: an event whose bytes do not
                    // mention usage has none, in its data or anywhere.
                    if FIND_KEY.find(event).is_none() {
                        return Verdict::Pass;
                    }
                    let Some(data) = sse::data(event) else {
                        return Verdict::Pass;
                    };
                    match of_chunk(&data) {
                        Some((t, only)) => {
                            *found = Some(t);
                            if strip && only {
                                Verdict::Drop
                            } else {
                                Verdict::Pass
                            }
                        }
                        None => Verdict::Pass,
                    }
                })
            }
        }
    }

    /// At the answer's clean end: what is still held (an event that never
    /// ended), to pass on.
    pub fn end(&mut self) -> Bytes {
        match &mut self.kind {
            Kind::Json { .. } => Bytes::new(),
            Kind::Sse { events, .. } => events.finish(),
        }
    }

    /// At a broken answer: drops what is held, so the app's stream ends on
    /// an event boundary.
    pub fn abandon(&mut self) {
        if let Kind::Sse { events, .. } = &mut self.kind {
            events.abandon();
        }
    }

    /// The usage found, once the answer is over.
    pub fn finish(self) -> Option<Tokens> {
        match self.kind {
            Kind::Json { tail: Some(t), .. } => last_member(&t).flatten(),
            Kind::Json { first, rest, .. } => match (rest, first) {
                (Some(r), _) => of_answer(&r),
                (None, Some(f)) => of_answer(&f),
                (None, None) => None,
            },
            Kind::Sse { .. } => self.found,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(input: u64, output: u64, cached_input: u64) -> Tokens {
        Tokens {
            input,
            output,
            cached_input,
            cache_write: 0,
        }
    }

    /// One member of a generated answer: a key and its JSON text.
    fn member() -> impl Strategy<Value = (String, String)> {
        let count = || any::<u32>().prop_map(|n| n.to_string());
        let usage_like = (count(), count(), proptest::option::of(count())).prop_map(|(p, c, k)| {
            let details = k.map_or(String::new(), |k| {
                format!(r#","prompt_tokens_details":{{"cached_tokens":{k},"audio_tokens":0}}"#)
            });
            format!(r#"{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":1{details}}}"#)
        });
        prop_oneof![
            ("[a-z_]{1,10}", usage_like.clone()),
            (
                "[a-z_]{1,10}",
                "[a-z \\\\\"{}:,]{0,20}".prop_map(|t| serde_json::to_string(&t).unwrap())
            ),
            ("[a-z_]{1,10}", any::<i64>().prop_map(|n| n.to_string())),
            (
                "[a-z_]{1,10}",
                usage_like.prop_map(|u| format!(r#"{{"usage":{u}}}"#))
            ),
        ]
    }

    proptest! {
        /// Wherever `usage` stands among the root's members, whatever
        /// follows it (objects with token counts of their own, strings that
        /// mention usage), and however the answer is laid out, reading it
        /// fast gives what a full parse gives.
        #[test]
        fn the_fast_read_agrees_with_a_full_parse(
            before in proptest::collection::vec(member(), 0..3),
            usage in proptest::option::of(member()),
            after in proptest::collection::vec(member(), 0..3),
            spaced in any::<bool>(),
        ) {
            let mut members: Vec<(String, String)> = before;
            if let Some((_, v)) = usage {
                members.push(("usage".into(), v));
            }
            members.extend(after);
            let sep = if spaced { ", \n  " } else { "," };
            let colon = if spaced { " : " } else { ":" };
            let body = members
                .iter()
                .map(|(k, v)| format!("\"{k}\"{colon}{v}"))
                .collect::<Vec<_>>()
                .join(sep);
            let text = format!("{{{body}}}");
            prop_assert_eq!(of_answer(text.as_bytes()), of_answer_parsed(text.as_bytes()), "{}", text);
        }
    }

    #[test]
    fn usage_is_found_in_json_answers_split_across_reads() {
        let mut j = UsageScan::json();
        j.pass(Bytes::from_static(
            br#"{"id":"x","usage":{"prompt_tokens":12,"#,
        ));
        j.pass(Bytes::from_static(
            br#""completion_tokens":30,"total_tokens":42}}"#,
        ));
        assert_eq!(j.finish(), Some(t(12, 30, 0)));
        // OpenAI's details: cached prompt tokens are read; reasoning tokens
        // are already inside completion_tokens.
        let mut d = UsageScan::json();
        d.pass(Bytes::from_static(
            br#"{"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":80,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":40}}}"#,
        ));
        assert_eq!(d.finish(), Some(t(100, 50, 80)));
        let mut none = UsageScan::json();
        none.pass(Bytes::from_static(br#"{"id":"x"}"#));
        assert_eq!(none.finish(), None);
    }

    #[test]
    fn usage_as_the_last_member_is_read_without_parsing_the_answer_and_agrees_with_a_full_parse() {
        let cases: [&[u8]; 11] = [
            br#"{"id":"x","choices":[{"message":{"content":"a \"usage\": {} b"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
            br#"{"id":"x", "usage" : {"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":2}} }"#,
            br#"{"usage":null}"#,
            // Not the root's member: nested, or the root goes on after it.
            br#"{"a":{"usage":{"prompt_tokens":9,"completion_tokens":9}}}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"id":"x"}"#,
            br#"{"a":"\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":5}}"}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}}"#,
            br#"[{"usage":{"prompt_tokens":1,"completion_tokens":1}}]"#,
            br#"{"usage":{"prompt_tokens":-1,"completion_tokens":1}}"#,
            // Members after usage, with counts of their own.
            br#"{"id":"x","usage":{"prompt_tokens":10,"completion_tokens":5},"billing":{"prompt_tokens":0,"completion_tokens":0}}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":1}},"x":{"prompt_tokens_details":{"cached_tokens":9}}}"#,
        ];
        for c in cases {
            assert_eq!(
                of_answer(c),
                of_answer_parsed(c),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
        assert_eq!(of_answer(cases[0]), Some(t(3, 4, 0)));
        assert_eq!(
            last_member(cases[0]),
            Some(Some(t(3, 4, 0))),
            "the fast path took it"
        );
        assert_eq!(last_member(cases[1]), Some(Some(t(3, 4, 2))));
        assert_eq!(last_member(cases[3]), None, "nested: parsed whole");
        assert_eq!(of_answer(cases[3]), None);
        assert_eq!(last_member(cases[5]), None, "inside a string");
        assert_eq!(of_answer(cases[9]), Some(t(10, 5, 0)));
        assert_eq!(of_answer(cases[10]), Some(t(1, 1, 1)));
        // The one-pass reader and serde agree on the usual shapes.
        for u in [
            &br#"{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}"#[..],
            br#"{ "prompt_tokens" : 100, "completion_tokens": 50, "total_tokens": 150, "prompt_tokens_details": {"cached_tokens": 80, "audio_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 40, "cached_tokens": 9}}"#,
            br#"{"completion_tokens":7,"prompt_tokens":5}"#,
        ] {
            let serde = serde_json::from_slice::<UsageJson>(u).ok().map(Tokens::from);
            assert_eq!(scan(u), serde, "{}", String::from_utf8_lossy(u));
        }
        assert_eq!(
            scan(br#"{"prompt_tokens":1.5,"completion_tokens":2}"#),
            None
        );
        assert_eq!(scan(br#"{"prompt_tokens":1}"#), None, "a count missing");
        assert_eq!(scan(br#"{"prompt_tokens":-1,"completion_tokens":2}"#), None);
    }

    #[test]
    fn a_json_answer_too_large_to_hold_is_read_from_its_tail() {
        // A large embeddings answer: megabytes of vectors, usage last.
        let vectors = format!("[{}0.5]", "0.25,".repeat(MAX_SCANNED / 4));
        let answer = format!(
            r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":{vectors}}}],"model":"e","usage":{{"prompt_tokens":9,"total_tokens":9}}}}"#
        );
        let want = Tokens {
            input: 9,
            ..Tokens::default()
        };
        for step in [7_919, 65_536, answer.len()] {
            let mut j = UsageScan::json();
            let mut out = Vec::new();
            for piece in answer.as_bytes().chunks(step) {
                out.extend_from_slice(&j.pass(Bytes::copy_from_slice(piece)));
            }
            assert_eq!(out, answer.as_bytes(), "passed on whole");
            assert_eq!(j.finish(), Some(want), "reads of {step}");
        }
        // Without usage as its last member, a large answer has none found.
        let mut j = UsageScan::json();
        let _ = j.pass(Bytes::from(vec![b' '; MAX_SCANNED]));
        let _ = j.pass(Bytes::from_static(
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"x":1}"#,
        ));
        assert_eq!(j.finish(), None);
    }

    #[test]
    fn usage_is_found_in_stream_events_with_any_line_ending() {
        for eol in ["\n", "\r\n", "\r"] {
            let stream = format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"hi\"}}}}],\"usage\":null}}{eol}{eol}\
                 : keep-alive{eol}{eol}\
                 data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":7}}}}{eol}{eol}\
                 data: [DONE]{eol}{eol}"
            );
            let mut s = UsageScan::sse(false);
            let out = s.pass(Bytes::from(stream.clone()));
            assert_eq!(out, stream.as_bytes(), "passed untouched ({eol:?})");
            assert_eq!(s.finish(), Some(t(5, 7, 0)), "{eol:?}");
        }
    }

    #[test]
    fn a_usage_chunk_the_app_did_not_ask_for_is_taken_out_whole() {
        for eol in ["\n", "\r\n", "\r"] {
            let ev = |s: &str| format!("{s}{eol}{eol}");
            let stream = [
                ev("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}"),
                ev(": keep-alive"),
                ev("data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}"),
                ev("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}"),
                ev("data: [DONE]"),
            ]
            .concat();
            let expected: String = stream.replace(
                &ev("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}"),
                "",
            );
            let bytes = stream.as_bytes();
            // Every way of cutting the stream into two reads.
            for at in 0..bytes.len() {
                let mut s = UsageScan::sse(true);
                let mut seen = Vec::new();
                seen.extend_from_slice(&s.pass(Bytes::copy_from_slice(&bytes[..at])));
                seen.extend_from_slice(&s.pass(Bytes::copy_from_slice(&bytes[at..])));
                seen.extend_from_slice(&s.end());
                assert_eq!(
                    String::from_utf8_lossy(&seen),
                    expected,
                    "cut at {at} ({eol:?})"
                );
                assert_eq!(s.finish(), Some(t(3, 4, 0)));
            }
        }
    }

    #[test]
    fn a_stream_chunk_with_data_on_several_lines_is_read() {
        let mut s = UsageScan::sse(true);
        let out = s.pass(Bytes::from_static(
            b"data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":2,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(&out[..], b"data: [DONE]\n\n");
        assert_eq!(s.finish(), Some(t(2, 9, 0)));
    }

    #[test]
    fn an_embeddings_usage_has_no_completion_tokens() {
        let answer = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}],"model":"e","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let want = Tokens {
            input: 8,
            ..Tokens::default()
        };
        assert_eq!(of_answer(answer), Some(want));
        assert_eq!(of_answer_parsed(answer), Some(want));
    }

    #[test]
    fn cached_input_is_priced_apart_and_never_more_than_the_input() {
        let p = Prices {
            input: 1.0,
            cached_input: 0.25,
            cache_write: 1.25,
            output: 4.0,
        };
        assert!((t(1_000_000, 500_000, 0).cost(&p) - 3.0).abs() < 1e-9);
        // 200k uncached at 1, 800k cached at 0.25, 500k out at 4.
        assert!((t(1_000_000, 500_000, 800_000).cost(&p) - 2.4).abs() < 1e-9);
        assert!((t(1_000_000, 0, 2_000_000).cost(&p) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn cache_writes_are_priced_apart_and_bounded_by_what_is_not_read() {
        let p = Prices {
            input: 1.0,
            cached_input: 0.25,
            cache_write: 1.25,
            output: 4.0,
        };
        let w = |input, cached_input, cache_write| Tokens {
            input,
            output: 0,
            cached_input,
            cache_write,
        };
        // 500k written at 1.25, 500k plain at 1.
        assert!((w(1_000_000, 0, 500_000).cost(&p) - 1.125).abs() < 1e-9);
        // 200k read at 0.25, 300k written at 1.25, 500k plain at 1.
        assert!((w(1_000_000, 200_000, 300_000).cost(&p) - 0.925).abs() < 1e-9);
        // Reads and writes claiming more than the prompt: reads first, the
        // writes get what is left, nothing is priced at the input price.
        assert!((w(1_000_000, 600_000, 900_000).cost(&p) - 0.65).abs() < 1e-9);
        assert!((w(1_000_000, 0, 5_000_000).cost(&p) - 1.25).abs() < 1e-9);
        // Without a cache write price of its own (zero), writes cost nothing.
        let free = Prices {
            cache_write: 0.0,
            ..p
        };
        assert!((w(1_000_000, 0, 1_000_000).cost(&free)).abs() < 1e-9);
    }
}
