//! What crosses the wire between an app, the sidecar and a provider, as
//! pure functions over bytes: the operations routed (`operation`), reading
//! and checking their request bodies (`chat`), framing a server-sent event
//! stream (`sse`), finding the token usage a provider reports (`usage`),
//! errors in OpenAI's JSON shape (`error`), and OpenAI's chat spoken to
//! Anthropic's Messages API (`anthropic`).
//!
//! Nothing here does I/O or knows about pingora, so the request path can
//! call it without allocating where it need not, and the fuzz targets can
//! drive it directly.
#![forbid(unsafe_code)]

pub mod anthropic;
pub mod chat;
pub mod error;
pub mod operation;
pub mod sse;
pub mod usage;
