//! Mutual TLS for QUIC: a fleet CA, one certificate per node, node ids proven by keys.
//!
//! In development mode a CA is generated on first start in a directory that every local node
//! shares, and each node gets a certificate signed by it. In production the operator supplies
//! the CA certificate and each node's certificate and key; nothing is generated.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ids::NodeId;
use crate::message::ALPN;

/// A TLS setup or certificate problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a key or certificate file failed.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Generating a key or certificate failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(String),
    /// The peer presented no usable certificate.
    #[error("peer certificate: {0}")]
    PeerCertificate(String),
}

/// Where a node's TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    /// The fleet CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The CA's private key (PEM); only needed to generate development certificates.
    pub ca_key: PathBuf,
    /// This node's certificate (PEM).
    pub node_cert: PathBuf,
    /// This node's private key (PEM).
    pub node_key: PathBuf,
}

/// A node's loaded TLS identity.
#[derive(Debug)]
pub struct Identity {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The id derived from this node's public key.
    pub node_id: NodeId,
}

/// Creates the development CA and this node's certificate if they do not exist yet.
///
/// Safe when several nodes start at once: the CA is written to a private temporary
/// directory and renamed into place, so exactly one CA wins and the others load it.
pub fn ensure_dev_certificates(paths: &TlsPaths, names: &[String]) -> Result<(), TlsError> {
    if !paths.ca_cert.exists() {
        create_dev_ca(paths)?;
    }
    if paths.node_cert.exists() && paths.node_key.exists() {
        return Ok(());
    }
    let ca_key = rcgen::KeyPair::from_pem(&read_text(&paths.ca_key)?)?;
    let ca = ca_params().self_signed(&ca_key)?;
    let node_key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "cairn node");
    let cert = params.signed_by(&node_key, &ca, &ca_key)?;
    write_private(&paths.node_key, &node_key.serialize_pem())?;
    write_file(&paths.node_cert, &cert.pem())?;
    Ok(())
}

/// The CA's parameters; re-created identically to sign with a loaded CA key.
fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "cairn development CA");
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    params
}

fn create_dev_ca(paths: &TlsPaths) -> Result<(), TlsError> {
    let dir = paths.ca_cert.parent().unwrap_or(Path::new("."));
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)
        .map_err(|source| TlsError::File { path: parent.to_owned(), source })?;
    let staging = parent.join(format!(".ca-staging-{}", std::process::id()));
    fs::create_dir_all(&staging)
        .map_err(|source| TlsError::File { path: staging.clone(), source })?;
    let key = rcgen::KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    let file_name = |p: &Path| p.file_name().map(|n| n.to_owned()).unwrap_or_default();
    write_private(&staging.join(file_name(&paths.ca_key)), &key.serialize_pem())?;
    write_file(&staging.join(file_name(&paths.ca_cert)), &cert.pem())?;
    if fs::rename(&staging, dir).is_err() {
        // Another node won the race (or the directory already existed): use what is there.
        let _ = fs::remove_dir_all(&staging);
        if !paths.ca_cert.exists() {
            for (from, to) in [(&paths.ca_key, &key.serialize_pem()), (&paths.ca_cert, &cert.pem())]
            {
                write_file(from, to)?;
            }
        }
    }
    Ok(())
}

impl Identity {
    /// Loads the CA certificate and this node's certificate and key.
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let ca = CertificateDer::from_pem_file(&paths.ca_cert)
            .map_err(|e| TlsError::Pem { path: paths.ca_cert.clone(), reason: e.to_string() })?;
        let chain = CertificateDer::pem_file_iter(&paths.node_cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Pem { path: paths.node_cert.clone(), reason: e.to_string() })?;
        let key = PrivateKeyDer::from_pem_file(&paths.node_key)
            .map_err(|e| TlsError::Pem { path: paths.node_key.clone(), reason: e.to_string() })?;
        let leaf = chain.first().ok_or_else(|| TlsError::Pem {
            path: paths.node_cert.clone(),
            reason: "no certificate".into(),
        })?;
        let node_id = node_id_of(leaf)?;
        Ok(Self { ca, chain, key, node_id })
    }

    /// QUIC server configuration: TLS 1.3, client certificates required and checked against the CA.
    pub fn server_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }

    /// QUIC client configuration: TLS 1.3, the server checked against the CA, our certificate offered.
    pub fn client_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(roots)
    }
}

/// The node id proven by a connection's peer certificate (already verified by TLS).
pub fn peer_node_id(connection: &quinn::Connection) -> Result<NodeId, TlsError> {
    let identity = connection
        .peer_identity()
        .ok_or_else(|| TlsError::PeerCertificate("none presented".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::PeerCertificate("unexpected identity type".into()))?;
    let leaf = chain.first().ok_or_else(|| TlsError::PeerCertificate("empty chain".into()))?;
    node_id_of(leaf)
}

fn node_id_of(cert: &CertificateDer<'_>) -> Result<NodeId, TlsError> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| TlsError::PeerCertificate(format!("{e:?}")))?;
    Ok(NodeId::from_public_key(parsed.subject_public_key_info().as_ref()))
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::File { path: path.to_owned(), source })
}

fn write_file(path: &Path, contents: &str) -> Result<(), TlsError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|source| TlsError::File { path: parent.to_owned(), source })?;
    }
    fs::write(path, contents).map_err(|source| TlsError::File { path: path.to_owned(), source })
}

fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    write_file(path, contents)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|source| TlsError::File { path: path.to_owned(), source })?;
    }
    Ok(())
}
