//! The TLS files an https endpoint may name: `ca_file` (PEM certificates,
//! the endpoint's only trust anchors, for servers behind an internal CA),
//! and `client_cert` with `client_key` (PEM, for mutual TLS).
//!
//! One loader for both sides, as for credentials: each sidecar reads the
//! files with [`load`] when it applies a table (NACKing it, with the
//! endpoint and the file named, when it cannot), and the control plane
//! reads them at policy load when the same paths exist on its host, so a
//! bad file is refused before any sidecar sees it. [`load`] checks
//! everything the proxy's TLS layer would otherwise trip over later: every
//! certificate parses as X.509 (pingora panics on one that does not), each
//! CA certificate makes a trust anchor, and the key is one rustls can sign
//! with and belongs to the certificate.

use std::io::ErrorKind;
use std::sync::Arc;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The paths an endpoint names; `None` (or empty) for a file it does not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsPaths<'a> {
    pub ca_file: Option<&'a str>,
    pub client_cert: Option<&'a str>,
    pub client_key: Option<&'a str>,
}

impl TlsPaths<'_> {
    /// Whether any file is named.
    pub fn any(&self) -> bool {
        [self.ca_file, self.client_cert, self.client_key]
            .iter()
            .any(|p| p.is_some_and(|p| !p.is_empty()))
    }
}

/// Why a TLS file cannot be used. Names the field and the path; never a
/// key's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFileError {
    #[error("{field} {path:?} cannot be read: {reason}")]
    Read {
        field: &'static str,
        path: String,
        kind: ErrorKind,
        reason: String,
    },
    #[error("{field} {path:?}: {reason}")]
    Invalid {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Pairing(String),
}

impl TlsFileError {
    /// The policy field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            TlsFileError::Read { field, .. } | TlsFileError::Invalid { field, .. } => field,
            TlsFileError::Pairing(_) => "client_key",
        }
    }

    /// The file is absent or not readable by this process: on the control
    /// plane, a file that lives beside the sidecars only.
    pub fn unreadable_here(&self) -> bool {
        matches!(
            self,
            TlsFileError::Read {
                kind: ErrorKind::NotFound | ErrorKind::PermissionDenied,
                ..
            }
        )
    }
}

/// A client certificate chain (leaf first) and its key. `Debug` does not
/// show the key.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientIdentity({} certificates)", self.chain.len())
    }
}

/// What an endpoint's TLS files hold, checked.
#[derive(Debug, Default)]
pub struct TlsMaterial {
    /// The `ca_file`'s certificates: the endpoint's only trust anchors.
    /// `None`: the system's roots.
    pub ca: Option<Vec<CertificateDer<'static>>>,
    pub client: Option<ClientIdentity>,
    /// Every file's bytes, in order, for a caller that must tell one set
    /// of files from another (pooled connections must not outlive a CA
    /// change).
    pub fingerprint: Vec<u8>,
}

/// Reads and checks the files `paths` names.
pub fn load(paths: &TlsPaths<'_>) -> Result<TlsMaterial, TlsFileError> {
    let named = |p: Option<&str>| p.filter(|p| !p.is_empty()).map(str::to_string);
    let mut out = TlsMaterial::default();
    if let Some(path) = named(paths.ca_file) {
        let bytes = read("ca_file", &path)?;
        let certs = certificates("ca_file", &path, &bytes)?;
        let mut store = rustls::RootCertStore::empty();
        for (i, c) in certs.iter().enumerate() {
            store.add(c.clone()).map_err(|e| TlsFileError::Invalid {
                field: "ca_file",
                path: path.clone(),
                reason: format!("certificate {} cannot be a trust anchor: {e}", i + 1),
            })?;
        }
        out.fingerprint.extend_from_slice(&bytes);
        out.ca = Some(certs);
    }
    match (named(paths.client_cert), named(paths.client_key)) {
        (None, None) => {}
        (Some(_), None) => {
            return Err(TlsFileError::Pairing(
                "client_cert needs client_key: mutual TLS takes both".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(TlsFileError::Pairing(
                "client_key needs client_cert: mutual TLS takes both".into(),
            ))
        }
        (Some(cert_path), Some(key_path)) => {
            let cert_bytes = read("client_cert", &cert_path)?;
            let chain = certificates("client_cert", &cert_path, &cert_bytes)?;
            let key_bytes = read("client_key", &key_path)?;
            let key = private_key(&key_path, &key_bytes)?;
            let invalid_key = |reason: String| TlsFileError::Invalid {
                field: "client_key",
                path: key_path.clone(),
                reason,
            };
            let signer = any_supported_type(&key)
                .map_err(|e| invalid_key(format!("not a key TLS can sign with: {e}")))?;
            match CertifiedKey::new(chain.clone(), Arc::clone(&signer)).keys_match() {
                Ok(()) => {}
                // A key that cannot say its public half: rustls takes it too.
                Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
                Err(e) => {
                    return Err(invalid_key(format!(
                        "does not belong to the client_cert {cert_path:?}: {e}"
                    )))
                }
            }
            out.fingerprint.extend_from_slice(&cert_bytes);
            out.fingerprint.extend_from_slice(&key_bytes);
            out.client = Some(ClientIdentity { chain, key });
        }
    }
    Ok(out)
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|e| TlsFileError::Read {
        field,
        path: path.to_string(),
        kind: e.kind(),
        reason: e.kind().to_string(),
    })
}

/// The PEM certificates in `bytes`; at least one, each one X.509 that
/// x509-parser (pingora's certificate parser) reads.
fn certificates(
    field: &'static str,
    path: &str,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let invalid = |reason: String| TlsFileError::Invalid {
        field,
        path: path.to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("holds no PEM certificate".into()));
    }
    for (i, c) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c.as_ref()) {
            return Err(invalid(format!(
                "certificate {} is not valid X.509: {e}",
                i + 1
            )));
        }
    }
    Ok(certs)
}

/// The first private key in `bytes`, in the form the proxy re-reads it
/// from bare DER (it tells PKCS#1, PKCS#8 and SEC1 apart by their
/// structure, and panics on DER it cannot place).
fn private_key(path: &str, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let invalid = |reason: String| TlsFileError::Invalid {
        field: "client_key",
        path: path.to_string(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => invalid("holds no PEM private key".into()),
        e => invalid(format!("not PEM: {e}")),
    })?;
    PrivateKeyDer::try_from(key.secret_der().to_vec())
        .map_err(|e| invalid(format!("the key's DER is not a known form: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("switchyard-tls-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn file(name: &str, text: &str) -> String {
        let p = dir().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn nothing_named_is_nothing_loaded() {
        let m = load(&TlsPaths::default()).unwrap();
        assert!(m.ca.is_none() && m.client.is_none() && m.fingerprint.is_empty());
        assert!(!TlsPaths::default().any());
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named() {
        let missing = dir().join("absent.pem");
        let e = load(&TlsPaths {
            ca_file: missing.to_str(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.unreadable_here() && e.field() == "ca_file", "{e}");
        assert!(e.to_string().contains("absent.pem"), "{e}");

        let junk = file("junk.pem", "hello\n");
        let e = load(&TlsPaths {
            ca_file: Some(&junk),
            ..Default::default()
        })
        .unwrap_err();
        assert!(!e.unreadable_here(), "{e}");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");

        let broken = file(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = load(&TlsPaths {
            ca_file: Some(&broken),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("not valid X.509"), "{e}");

        let e = load(&TlsPaths {
            client_cert: Some(&broken),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field(), "client_key", "{e}");

        let e = load(&TlsPaths {
            client_key: Some(&junk),
            client_cert: Some(&broken),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field(), "client_cert", "{e}");
    }

    /// A CA, and a leaf it signed with its key, as PEM.
    fn issued() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (ca.pem(), leaf.pem(), key.serialize_pem())
    }

    #[test]
    fn a_ca_bundle_and_a_matching_client_pair_load() {
        let (ca, leaf, key) = issued();
        let (ca, leaf, key) = (
            file("ca.pem", &format!("# a comment\n{ca}")),
            file("leaf.pem", &leaf),
            file("leaf.key", &key),
        );
        let m = load(&TlsPaths {
            ca_file: Some(&ca),
            client_cert: Some(&leaf),
            client_key: Some(&key),
        })
        .unwrap();
        assert_eq!(m.ca.as_ref().map(Vec::len), Some(1));
        let id = m.client.unwrap();
        assert_eq!(id.chain.len(), 1);
        assert!(!format!("{id:?}").contains("BEGIN"));
        assert!(!m.fingerprint.is_empty());

        // A key that is not the certificate's.
        let (_, _, other_key) = issued();
        let other_key = file("other.key", &other_key);
        let e = load(&TlsPaths {
            client_cert: Some(&leaf),
            client_key: Some(&other_key),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field(), "client_key");
        assert!(e.to_string().contains("does not belong"), "{e}");
        // A certificate where the key belongs.
        let e = load(&TlsPaths {
            client_cert: Some(&leaf),
            client_key: Some(&leaf),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("no PEM private key"), "{e}");
    }
}
