//! Request intake: any body is either refused with a named reason or read,
//! and what the sidecar then sends (usage asked for, degraded) is still a
//! request that reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_wire::chat;

fuzz_target!(|body: &[u8]| {
    let Ok(r) = chat::parse(body) else {
        return;
    };
    assert!(!r.model.is_empty() && r.messages > 0);
    // The usage chunk asked for on the app's behalf: the request still
    // parses, to the same model, now asking for usage.
    let asked =
        chat::ask_usage(body, r.include_usage.is_some()).expect("a parsed body can ask for usage");
    let again = chat::parse(&asked).expect("asking for usage keeps the request valid");
    assert_eq!(again.model, r.model);
    assert_eq!(again.include_usage, Some(true));
    assert_eq!(again.messages, r.messages);
    // Degraded: another model, capped tokens.
    let degraded =
        chat::rewrite(body, Some("small"), Some(7)).expect("a parsed body can be degraded");
    let d = chat::parse(&degraded).expect("degrading keeps the request valid");
    assert_eq!(d.model, "small");
    assert!(d.max_tokens.is_some_and(|n| n <= 7));
});
