//! HTTPS for the admin API: loading a PEM certificate and key into a
//! rustls server configuration, and an accept loop that serves an axum
//! router over TLS with the same graceful shutdown as the plain listener.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A client gets this long to finish its TLS handshake, so connections that
/// never send a ClientHello do not pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files of a TLS server identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads both files into a rustls server configuration (HTTP/2 and
    /// HTTP/1.1 offered by ALPN). Every error names the file at fault.
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let certs = read_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).with_context(|| {
            format!(
                "cannot read a PEM private key from {} (want -----BEGIN PRIVATE KEY----- or an \
                 RSA/EC key)",
                self.key.display()
            )
        })?;
        // Name the provider rather than rely on the process default: ring is
        // the one already compiled in (through wasmtime-wasi-http), and a
        // second provider enabled elsewhere would make the default ambiguous.
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("the TLS provider supports no safe protocol version")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .with_context(|| {
                format!(
                    "the TLS key {} does not go with the certificate {}",
                    self.key.display(),
                    self.cert.display()
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let context = || format!("cannot read PEM certificates from {}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(context)?
        .collect::<Result<Vec<_>, _>>()
        .with_context(context)?;
    if certs.is_empty() {
        anyhow::bail!(
            "{} holds no certificate: want a PEM file with -----BEGIN CERTIFICATE-----",
            path.display()
        );
    }
    Ok(certs)
}

/// Serves `router` over TLS on `listener` until `shutdown` completes, then
/// stops accepting and waits for open connections, as `axum::serve`'s
/// graceful shutdown does for plain HTTP.
pub(crate) async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let acceptor = TlsAcceptor::from(config);
    let graceful = GracefulShutdown::new();
    // Handshakes still under way when shutdown begins are dropped rather
    // than waited for: they have no request in flight.
    let closing = tokio_util::sync::CancellationToken::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let service = TowerToHyperService::new(router);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off
                    // instead of spinning on the same error.
                    tracing::warn!("admin API accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // The handshake runs in the connection's own task: a slow client
        // must not hold up the accept loop.
        let acceptor = acceptor.clone();
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let closing = closing.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let Some(handshake) = closing.run_until_cancelled(handshake).await else {
                return;
            };
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!("admin API TLS handshake failed: {error}");
                    return;
                }
                Err(_) => {
                    tracing::debug!("admin API TLS handshake timed out");
                    return;
                }
            };
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!("admin API connection ended: {error}");
            }
        });
    }
    drop(listener);
    closing.cancel();
    graceful.shutdown().await;
}
