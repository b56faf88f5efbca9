//! The gRPC contract between sidecars and the control plane. The stream
//! semantics are written in the `.proto` comments; this crate only carries the
//! generated code.
#![forbid(unsafe_code)]

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}
