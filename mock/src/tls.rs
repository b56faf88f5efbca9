//! The mock over TLS (`switchyard mock --tls-cert FILE --tls-key FILE
//! [--client-ca FILE]`), so the sidecar's TLS to endpoints is tested
//! against a real handshake: a rustls acceptor in front of the same routes
//! as in plain text, served by hyper over each accepted stream. With a
//! client CA, only a client presenting a certificate that CA signed gets
//! through (mutual TLS). `/admin/stats` counts the handshakes completed
//! (`tls_connections`), so a test can see connections being reused.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::server::{router, MockConfig};

/// How long open connections may finish their answers after shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// The PEM files the mock serves TLS with.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Its certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, a client certificate this CA signed is required.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Config(#[from] rustls::Error),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The server's TLS configuration: its certificate and key, HTTP/1.1 by
/// ALPN, and the client CA's verifier when one is given.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err(&files.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca)? {
                roots.add(c).map_err(|e| file_err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the mock's routes over TLS until `shutdown` resolves; then lets
/// open connections finish for a few seconds.
pub async fn serve_tls(
    listener: TcpListener,
    config: MockConfig,
    tls: &TlsFiles,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TlsError> {
    let acceptor = TlsAcceptor::from(server_config(tls)?);
    let name = config.name.clone();
    let (app, handshakes) = router(config);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(mock = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // As in plain text: streamed tokens must not wait on delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, handshakes, name) = (
            acceptor.clone(),
            app.clone(),
            Arc::clone(&handshakes),
            name.clone(),
        );
        let watcher = graceful.watcher();
        // The handshake runs in the connection's task, so a slow or
        // refused client never holds up the accept loop.
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(mock = %name, error = %e, "TLS handshake refused");
                    return;
                }
            };
            handshakes.fetch_add(1, Ordering::Relaxed);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(mock = %name, error = %e, "connection ended with an error");
            }
        });
    }
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
    Ok(())
}
