//! HTTPS for the admin API: loading a PEM certificate and key into a
//! rustls server configuration, and the TLS handshake the admin listener
//! runs on each connection (the accept loop, timeouts and cap are
//! [`crate::connections`]'s, shared with the plain listeners).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

use crate::connections::{Handshake, TrackedIo};

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

/// The admin API's TLS handshake, run inside each connection's task (a
/// slow client must not hold up the accept loop) and bounded by the
/// listener's header timeout as well as [`HANDSHAKE_TIMEOUT`].
#[derive(Clone)]
pub(crate) struct Tls(pub(crate) TlsAcceptor);

impl Tls {
    pub(crate) fn new(config: Arc<ServerConfig>) -> Self {
        Self(TlsAcceptor::from(config))
    }
}

impl Handshake for Tls {
    type Io = TlsStream<TrackedIo<TcpStream>>;

    async fn handshake(&self, stream: TrackedIo<TcpStream>) -> std::io::Result<Self::Io> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.0.accept(stream))
            .await
            .map_err(|_| std::io::Error::other("the TLS handshake timed out"))?
    }

    fn plain(&self) -> bool {
        false
    }
}
