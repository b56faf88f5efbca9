//! The gRPC contract between sidecars and the control plane. The stream
//! semantics are written in the `.proto` comments; this crate carries the
//! generated code, and `tls`, how the link is secured. (The syntax of an endpoint's `credential` reference is
//! the policy's: `switchyard_policy::CredentialRef`.)
#![forbid(unsafe_code)]

pub mod tls;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}
