//! A throwaway PKI for TLS tests: a CA, a server certificate (for
//! 127.0.0.1 and localhost unless told otherwise), and a client
//! certificate, all signed by it; written as PEM files in a run directory.
//! `benches/load.rs` includes this file too (its `sidecar-tls` path).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).expect("write PEM");
    p
}

/// A new CA named `label` and certificates it signed, under `dir`.
pub fn issue(dir: &Path, label: &str) -> Pki {
    issue_for(dir, label, &["127.0.0.1", "localhost"])
}

/// Like [`issue`], with the server certificate for `names` (DNS names or
/// IP addresses) instead.
pub fn issue_for(dir: &Path, label: &str, names: &[&str]) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("switchyard test CA {label}"));
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
        let mut p = CertificateParams::new(names).unwrap();
        p.extended_key_usages = vec![usage];
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server, server_key) = leaf(
        names.iter().map(|n| n.to_string()).collect(),
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    let (client, client_key) = leaf(
        vec!["sidecar".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        "sidecar",
    );
    Pki {
        ca: write(dir, &format!("{label}-ca.pem"), &ca.pem()),
        server_cert: write(dir, &format!("{label}-server.pem"), &server),
        server_key: write(dir, &format!("{label}-server.key"), &server_key),
        client_cert: write(dir, &format!("{label}-client.pem"), &client),
        client_key: write(dir, &format!("{label}-client.key"), &client_key),
    }
}
