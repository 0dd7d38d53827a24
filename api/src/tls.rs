//! Mutual TLS between the controller and the node agents (rustls with the aws-lc-rs provider,
//! the only provider in the workspace).
//!
//! Identities are certificate subject alternative names (DNS or URI), never the common name:
//! * the agent accepts a client only if its chain ends at the configured CA **and** it carries
//!   the controller identity (default [`CONTROLLER_IDENTITY`]);
//! * the controller accepts an agent only if its chain ends at the CA **and** it carries the
//!   node identity `node:<node-name>` ([`node_identity`]) of the node it meant to reach. The
//!   address it dialled plays no part, so pod IPs need not be in certificates.
//!
//! Both checks run inside the handshake: a peer with the wrong identity never gets a request
//! through.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// The identity the agent requires of its clients unless configured otherwise.
pub const CONTROLLER_IDENTITY: &str = "hoard-controller";

/// The identity an agent's certificate carries (as a URI SAN) for node `name`.
pub fn node_identity(name: &str) -> String {
    format!("node:{name}")
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The process-wide crypto provider (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain and its private key. `Debug` never shows the key.
pub struct KeyPair {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({} certificates, key redacted)", self.chain.len())
    }
}

/// Everything one side of the connection needs: its own key pair and the CA it trusts.
#[derive(Debug)]
pub struct TlsMaterial {
    pub own: KeyPair,
    pub roots: Arc<RootCertStore>,
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.display().to_string(), reason: reason.to_string() }
}

impl TlsMaterial {
    /// Loads PEM files: the CA bundle to trust, the own certificate chain, and its key.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| file_err(p, e));
        TlsMaterial::from_pem(&read(ca)?, &read(cert)?, &read(key)?).map_err(|e| match e {
            TlsError::Config(m) => file_err(cert, m),
            other => other,
        })
    }

    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<TlsMaterial, TlsError> {
        let bad = |what: &str, e: rustls::pki_types::pem::Error| TlsError::Config(format!("{what}: {e}"));
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            roots.add(c.map_err(|e| bad("CA bundle", e))?).map_err(|e| TlsError::Config(format!("CA bundle: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Config("CA bundle holds no certificate".into()));
        }
        let chain =
            CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>().map_err(|e| bad("certificate", e))?;
        if chain.is_empty() {
            return Err(TlsError::Config("certificate file holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("private key", e))?;
        Ok(TlsMaterial { own: KeyPair { chain, key }, roots: Arc::new(roots) })
    }
}

/// Subject alternative names of a DER certificate: DNS names and URIs, as written.
pub fn identities(cert: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(s) | GeneralName::URI(s) => Some((*s).to_string()),
            _ => None,
        })
        .collect()
}

fn require_identity(cert: &CertificateDer<'_>, want: &str) -> Result<(), rustls::Error> {
    if identities(cert).iter().any(|i| i == want) {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
    }
}

/// Server side (the agent): the controller's certificate, signed directly by a trusted CA
/// (client-auth usage), carrying the required identity.
#[derive(Debug)]
struct ControllerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    identity: String,
}

impl ClientCertVerifier for ControllerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Pinned issuer: the controller certificate must be signed directly by a trusted CA.
        // With cert-manager one issuer signs it and the agent CA, an intermediate whose key is
        // on every node; any intermediate the client sends is therefore ignored, so nothing
        // that key signs reaches a trust anchor (separate roots are impossible with one
        // issuer, URI name constraints cannot express `node:` identities, and EKUs on
        // intermediates are not enforced by webpki).
        self.inner.verify_client_cert(end_entity, &[], now)?;
        require_identity(end_entity, &self.identity)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: CA chain (server-auth usage) plus the node identity; the dialled name is ignored.
#[derive(Debug)]
struct NodeVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    identity: String,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        require_identity(end_entity, &self.identity)?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn cfg_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// The agent's server configuration: client certificates are mandatory, must chain to
/// `material.roots` and carry `client_identity`.
pub fn server_config(material: TlsMaterial, client_identity: &str) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::clone(&material.roots), Arc::clone(&provider))
        .build()
        .map_err(cfg_err)?;
    let verifier = Arc::new(ControllerVerifier { inner, identity: client_identity.to_string() });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.own.chain, material.own.key)
        .map_err(cfg_err)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The verifier of an agent's certificate: chains to `roots` and carries `node:<node_name>`.
pub fn node_verifier(roots: Arc<RootCertStore>, node_name: &str) -> Arc<dyn ServerCertVerifier> {
    Arc::new(NodeVerifier {
        roots,
        algs: provider().signature_verification_algorithms,
        identity: node_identity(node_name),
    })
}

/// The controller's client configuration for talking to the agent on `node_name`.
pub fn client_config(material: TlsMaterial, node_name: &str) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = node_verifier(material.roots, node_name);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(material.own.chain, material.own.key)
        .map_err(cfg_err)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
