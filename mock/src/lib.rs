//! A fake provider for tests, demos and incident drills, speaking OpenAI's
//! API, Azure OpenAI's or Anthropic's Messages API ([`Api`]).
//!
//! It answers chat completions (streamed and not) with deterministic text
//! (or, when the request offers tools, a call of the first one), legacy
//! completions and embeddings, reports `usage`, and can be made slow or
//! faulty at run time through a small admin API (`GET/POST /admin/config`),
//! so a test can degrade a provider while traffic flows. Every completion it produced is kept (bounded) under
//! `/admin/completions/{id}` so tests can compare what the app received with
//! what the provider sent. It serves plain HTTP, or TLS (`tls`), with an
//! optional client certificate check.
#![forbid(unsafe_code)]

mod behaviour;
mod server;
mod tls;

pub use behaviour::{answer_tokens, Api, Behaviour, Fault, LineEnding};
pub use server::{serve, MockConfig, MockError};
pub use tls::{serve_tls, server_config, TlsError, TlsFiles};
