//! How the gRPC link is secured: the same rules for every client of the
//! control plane (sidecars, `switchyard admin`) and for its server. Tables,
//! telemetry and the admin token cross this link, so anything beyond
//! loopback wants TLS (rustls, through tonic), and mutual TLS where the
//! network is shared.
//!
//! A client uses TLS when it is given a CA file or a client certificate,
//! or when the address says `https://`; it then verifies the server's
//! certificate against the CA file (or the system's roots) and the host
//! name of the address (or `server_name`). Plain text stays available for
//! loopback and tests, and every process says in its log which one it uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid control plane address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("TLS settings: {0}")]
    Config(#[from] tonic::transport::Error),
    #[error("a client certificate needs its key, and a key its certificate")]
    HalfIdentity,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    Ok(Identity::from_pem(
        read("certificate", cert)?,
        read("key", key)?,
    ))
}

/// A client's side of the link.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA certificates (PEM) the server's certificate must chain to;
    /// `None`: the system's roots.
    pub ca: Option<PathBuf>,
    /// Certificate and key (PEM) presented for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the
    /// host of the address.
    pub server_name: Option<String>,
}

impl ClientTls {
    fn wanted(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.server_name.is_some()
    }
}

/// Whether a connection to `address` with `tls` is encrypted.
pub fn encrypted(address: &str, tls: &ClientTls) -> bool {
    tls.wanted() || address.starts_with("https://")
}

/// The endpoint for `address` (`host:port`, or a URL with `http://` or
/// `https://`), with TLS set up as [`ClientTls`] says.
pub fn endpoint(address: &str, tls: &ClientTls) -> Result<Endpoint, TlsError> {
    let bad = |reason: String| TlsError::Address {
        address: address.to_string(),
        reason,
    };
    let secure = encrypted(address, tls);
    let bare = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    if address.starts_with("http://") && tls.wanted() {
        return Err(bad(
            "an http:// address with TLS settings; use https:// or host:port".into(),
        ));
    }
    let scheme = if secure { "https" } else { "http" };
    let endpoint =
        Endpoint::from_shared(format!("{scheme}://{bare}")).map_err(|e| bad(e.to_string()))?;
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    if !secure {
        return Ok(endpoint);
    }
    let host = endpoint.uri().host().unwrap_or_default();
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let mut config = ClientTlsConfig::new().domain_name(tls.server_name.clone().unwrap_or(host));
    config = match &tls.ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read("CA file", ca)?)),
        None => config.with_native_roots(),
    };
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => config = config.identity(identity(cert, key)?),
        (None, None) => {}
        _ => return Err(TlsError::HalfIdentity),
    }
    Ok(endpoint.tls_config(config)?)
}

/// The server's side of the link: its certificate and key, and the CA its
/// clients' certificates must chain to (`None`: no client certificate
/// asked for).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    pub fn config(&self) -> Result<ServerTlsConfig, TlsError> {
        let mut c = ServerTlsConfig::new().identity(identity(&self.cert, &self.key)?);
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(Certificate::from_pem(read("client CA file", ca)?));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_only_when_nothing_asks_for_tls() {
        let none = ClientTls::default();
        assert!(!encrypted("127.0.0.1:50051", &none));
        assert!(encrypted("https://cp.example:443", &none));
        let ca = ClientTls {
            ca: Some("/nonexistent/ca.pem".into()),
            ..ClientTls::default()
        };
        assert!(encrypted("127.0.0.1:50051", &ca));
        assert_eq!(
            endpoint("127.0.0.1:50051", &none)
                .unwrap()
                .uri()
                .scheme_str(),
            Some("http")
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let ca = ClientTls {
            ca: Some("/nonexistent/ca.pem".into()),
            ..ClientTls::default()
        };
        let e = endpoint("127.0.0.1:1", &ca).unwrap_err().to_string();
        assert!(e.contains("CA file /nonexistent/ca.pem"), "{e}");
        let e = endpoint("http://127.0.0.1:1", &ca).unwrap_err().to_string();
        assert!(e.contains("use https://"), "{e}");
        let half = ClientTls {
            cert: Some("/x.pem".into()),
            ..ClientTls::default()
        };
        assert!(matches!(
            endpoint("https://127.0.0.1:1", &half),
            Err(TlsError::HalfIdentity)
        ));
    }
}
