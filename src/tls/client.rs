//! The client side: how moat's connection to the upstream MTA checks the upstream's certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct};
use rustls::{RootCertStore, SignatureScheme};
use tracing::debug;

use super::{read_chain, TlsError, TLS12_AND_LATER};

// === upstream client ===

/// How the connection to the upstream MTA checks the upstream's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamVerify {
    /// Against the operating system's trust store.
    SystemRoots,
    /// Against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Accept any certificate for any name; only for an upstream on loopback, where TLS adds no
    /// trust.
    InsecureLoopback,
}

/// A client configuration for the upstream (TLS 1.2 and 1.3, `ring`). Reads files, so call it at
/// start-up or in `spawn_blocking`.
pub fn client_config(verify: &UpstreamVerify) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(Arc::new(provider));
    let builder = builder.with_protocol_versions(TLS12_AND_LATER).map_err(TlsError::config)?;
    let builder = match verify {
        UpstreamVerify::SystemRoots => builder.with_root_certificates(system_roots()?),
        UpstreamVerify::CaFile(path) => builder.with_root_certificates(ca_roots(path)?),
        UpstreamVerify::InsecureLoopback => {
            let verifier = Arc::new(AcceptAnyCertificate(algorithms));
            builder.dangerous().with_custom_certificate_verifier(verifier)
        }
    };
    Ok(Arc::new(builder.with_no_client_auth()))
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    for err in &found.errors {
        debug!(error = %err, "skipped part of the system trust store");
    }
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let source = found.errors.into_iter().next();
        return Err(TlsError::NoSystemRoots { source });
    }
    Ok(roots)
}

fn ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_chain(path)? {
        roots.add(cert).map_err(TlsError::bad_certificate(path))?;
    }
    Ok(roots)
}

/// The verifier of [`UpstreamVerify::InsecureLoopback`]: any certificate and name pass, but the
/// handshake signature is still checked, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
