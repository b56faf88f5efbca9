//! An OpenAI-compatible fake provider for tests, demos and incident drills.
//!
//! It answers chat completions (streamed and not) with deterministic text,
//! reports `usage`, and can be made slow or faulty at run time through a small
//! admin API (`GET/POST /admin/config`), so a test can degrade a provider while
//! traffic flows. Every completion it produced is kept (bounded) under
//! `/admin/completions/{id}` so tests can compare what the app received with
//! what the provider sent.
#![forbid(unsafe_code)]

mod behaviour;
mod server;

pub use behaviour::{answer_tokens, Behaviour, Fault, LineEnding};
pub use server::{serve, MockConfig, MockError};
