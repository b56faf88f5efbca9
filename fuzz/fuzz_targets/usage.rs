//! The usage scanner: any answer, JSON or stream, cut anywhere, is passed
//! on (a JSON answer byte for byte; a stream minus at most the usage
//! chunk) and its usage, when found, is what it says.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchyard_wire::usage::UsageScan;

#[derive(Arbitrary, Debug)]
struct Input {
    answer: Vec<u8>,
    cuts: Vec<u16>,
    sse: bool,
    strip: bool,
}

fuzz_target!(|input: Input| {
    let bytes = &input.answer;
    let mut cuts: Vec<usize> = input
        .cuts
        .iter()
        .map(|c| usize::from(*c) % (bytes.len() + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    let mut scan = if input.sse {
        UsageScan::sse(input.strip)
    } else {
        UsageScan::json()
    };
    let mut passed = Vec::new();
    let mut from = 0;
    for at in cuts {
        passed.extend_from_slice(&scan.pass(Bytes::copy_from_slice(&bytes[from..at])));
        from = at;
    }
    passed.extend_from_slice(&scan.end());
    let found = scan.finish();
    if !input.sse || !input.strip {
        assert_eq!(&passed, bytes, "passed on untouched");
    } else {
        assert!(passed.len() <= bytes.len());
    }
    if !input.sse && bytes.len() <= switchyard_wire::usage::MAX_SCANNED {
        assert_eq!(found, switchyard_wire::usage::of_answer(bytes));
        // Whenever a full parse finds usage, the fast read finds the same.
        if let Some(full) = switchyard_wire::usage::of_answer_parsed(bytes) {
            assert_eq!(found, Some(full));
        }
    }
    if let Some(t) = found {
        let p = switchyard_wire::usage::Prices {
            input: 1.0,
            cached_input: 0.5,
            cache_write: 1.25,
            output: 2.0,
        };
        let c = t.cost(&p);
        assert!(c.is_finite() && c >= 0.0);
    }
});
