//! Policy loading: any text is a policy or an error naming what is wrong;
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = switchyard_policy::Policy::parse(text) {
        assert!(!e.to_string().is_empty());
    }
});
