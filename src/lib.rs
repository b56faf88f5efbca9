//! The `switchyard` package's library half: process orchestration shared by
//! the demo, the end-to-end tests and the load bench.
#![deny(unsafe_code)]

pub mod cluster;
