//! The gRPC contract between sidecars and the control plane. The stream
//! semantics are written in the `.proto` comments; this crate carries the
//! generated code and the syntax of the string fields whose format is part
//! of the contract (`credential`).
#![forbid(unsafe_code)]

pub mod credential;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}
