//! The `switchyard` package's library half: process orchestration and load
//! generation shared by the demo, the end-to-end tests and the benches.
#![deny(unsafe_code)]

pub mod cluster;
pub mod loadgen;
