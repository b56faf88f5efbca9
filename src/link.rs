//! The command-line flags that secure a client's gRPC link to the control
//! plane (`switchyard sidecar`, `switchyard admin`); the rules are
//! `switchyard_proto::tls`'s.

use std::path::PathBuf;

use switchyard_proto::tls::ClientTls;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct LinkTls {
    /// CA certificates (PEM) the control plane's certificate must chain
    /// to. Turns TLS on (as an `https://` control address does, which
    /// verifies against the system's roots).
    #[arg(long)]
    pub control_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --key.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name the control plane's certificate must carry, when it is not
    /// the host of the control address.
    #[arg(long)]
    pub control_server_name: Option<String>,
}

impl LinkTls {
    pub fn client(&self) -> ClientTls {
        ClientTls {
            ca: self.control_ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            server_name: self.control_server_name.clone(),
        }
    }
}
