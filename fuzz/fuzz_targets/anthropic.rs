//! The Anthropic translation: no input panics any of it; a stream cut
//! anywhere translates as it does whole; what it writes is whole SSE
//! events of JSON (or `[DONE]`), and a request it accepts is JSON.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchyard_wire::anthropic::{answer, error_body, request, Stream};

#[derive(Arbitrary, Debug)]
struct Input {
    body: Vec<u8>,
    cuts: Vec<u16>,
    status: u16,
}

fuzz_target!(|input: Input| {
    let bytes = &input.body;
    if let Ok(out) = request(bytes, "claude", 16) {
        serde_json::from_slice::<serde_json::Value>(&out).expect("a translated request is JSON");
    }
    if let Ok((out, _)) = answer(bytes, 0) {
        serde_json::from_slice::<serde_json::Value>(&out).expect("a translated answer is JSON");
    }
    serde_json::from_slice::<serde_json::Value>(&error_body(input.status, bytes))
        .expect("an error body is JSON");

    let mut whole = Stream::new(0);
    let mut expected = whole.push(Bytes::copy_from_slice(bytes)).to_vec();
    expected.extend_from_slice(&whole.end());
    let mut cuts: Vec<usize> = input
        .cuts
        .iter()
        .map(|c| usize::from(*c) % (bytes.len() + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    let mut s = Stream::new(0);
    let mut got = Vec::new();
    let mut from = 0;
    for at in cuts {
        got.extend_from_slice(&s.push(Bytes::copy_from_slice(&bytes[from..at])));
        from = at;
    }
    got.extend_from_slice(&s.end());
    assert_eq!(got, expected, "cut reads translate as the whole");
    assert_eq!(
        (s.tokens(), s.failed(), s.complete()),
        (whole.tokens(), whole.failed(), whole.complete())
    );
    let text = std::str::from_utf8(&got).expect("UTF-8 out");
    for event in text.split_terminator("\n\n") {
        if event.starts_with(':') {
            continue;
        }
        let data = event.strip_prefix("data: ").expect("one data line");
        assert!(
            data == "[DONE]" || serde_json::from_str::<serde_json::Value>(data).is_ok(),
            "{data}"
        );
    }
});
