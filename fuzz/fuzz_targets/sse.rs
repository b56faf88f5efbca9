//! The SSE framer: however a byte stream is cut into reads and whichever
//! events are dropped, what passes is the stream minus exactly the dropped
//! events, each read ends on an event boundary, and nothing panics.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchyard_wire::sse::{Boundaries, EventStream, Verdict};

#[derive(Arbitrary, Debug)]
struct Input {
    stream: Vec<u8>,
    cuts: Vec<u16>,
    drops: u64,
}

fuzz_target!(|input: Input| {
    let bytes = &input.stream;
    // The events as cut from the whole stream in one piece.
    let mut b = Boundaries::default();
    let mut events = Vec::new();
    let mut pos = 0;
    while let Some(n) = b.find_end(&bytes[pos..]) {
        events.push(&bytes[pos..pos + n]);
        pos += n;
    }
    let complete = pos;
    let mut cuts: Vec<usize> = input
        .cuts
        .iter()
        .map(|c| usize::from(*c) % (bytes.len() + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    let keep = |i: usize| (input.drops >> (i % 64)) & 1 == 0;
    let mut s = EventStream::new();
    let mut judged = 0;
    let mut passed = Vec::new();
    let mut from = 0;
    for at in cuts {
        let read = Bytes::copy_from_slice(&bytes[from..at]);
        from = at;
        let out = s.push(read, &mut |e| {
            let v = if keep(judged) {
                Verdict::Pass
            } else {
                Verdict::Drop
            };
            let _ = switchyard_wire::sse::decode(e);
            judged += 1;
            v
        });
        passed.extend_from_slice(&out);
    }
    passed.extend_from_slice(&s.finish());
    if bytes.len() < switchyard_wire::sse::MAX_HELD {
        assert_eq!(judged, events.len());
        let expected: Vec<u8> = events
            .iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .flat_map(|(_, e)| e.iter().copied())
            .chain(bytes[complete..].iter().copied())
            .collect();
        assert_eq!(passed, expected);
    }
});
