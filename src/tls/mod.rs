//! TLS for both sides of a connection: [`server`] (the configuration implicit-TLS listeners and STARTTLS
//! use: certificate loading, SNI choice among several certificates, reload without a restart), what a
//! session negotiated ([`TlsInfo`]), and [`client`] (the configuration for the upstream MTA).
//!
//! In the flow it sits between `server`, which accepts the TCP connection, and `conn`, which speaks
//! over the stream that [`ServerTls::acceptor`] returns.
//!
//! Everything uses the `ring` provider explicitly; nothing here installs a process-wide default
//! provider.

mod client;
mod server;

pub use client::{client_config, UpstreamVerify};
pub use server::ServerTls;

use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::version::{TLS12, TLS13};
use rustls::ProtocolVersion;
use rustls::SupportedProtocolVersion;

/// Protocol versions offered with `min_version = "1.2"`, newest first.
pub(crate) static TLS12_AND_LATER: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];
/// Protocol versions offered with `min_version = "1.3"`.
pub(crate) static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&TLS13];

/// A boxed cause, for errors whose source comes from more than one library.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

// === errors ===

/// Why TLS could not be set up. Every variant about a file names it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file holds a damaged PEM section.
    #[error("malformed pem in {}", .path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A certificate or CA file holds no certificate.
    #[error("no certificate in {}", .path.display())]
    NoCertificate { path: PathBuf },
    /// A certificate could not be parsed, or a CA certificate cannot be a trust anchor.
    #[error("invalid certificate in {}", .path.display())]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    /// A key file holds no private key (PKCS#8, PKCS#1 or SEC1).
    #[error("no private key in {}", .path.display())]
    NoKey { path: PathBuf },
    /// The private key is malformed or of a type the provider cannot sign with.
    #[error("unusable private key in {}", .path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The private key does not belong to the certificate.
    #[error("private key {} does not match certificate {}", .key.display(), .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The self-signed fallback certificate could not be generated.
    #[error("cannot generate a self-signed certificate for {hostname:?}")]
    SelfSigned {
        hostname: String,
        #[source]
        source: BoxError,
    },
    /// The system trust store yielded no usable root certificate.
    #[error("no usable system root certificates")]
    NoSystemRoots {
        #[source]
        source: Option<rustls_native_certs::Error>,
    },
    /// `upstream.tls_server_name` is neither a DNS name nor an IP address.
    #[error("invalid tls server name {name:?}")]
    ServerName { name: String },
    /// rustls refused the configuration.
    #[error("cannot build the tls configuration")]
    Config {
        #[source]
        source: rustls::Error,
    },
}

/// Constructors for `map_err`.
impl TlsError {
    fn read(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
        |source| TlsError::Read { path: path.into(), source }
    }

    fn pem(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
        |source| TlsError::Pem { path: path.into(), source }
    }

    fn bad_certificate<E: Into<BoxError>>(path: &Path) -> impl FnOnce(E) -> TlsError + '_ {
        |source| TlsError::BadCertificate { path: path.into(), source: source.into() }
    }

    fn self_signed<E: Into<BoxError>>(hostname: &str) -> impl FnOnce(E) -> TlsError + '_ {
        |source| TlsError::SelfSigned { hostname: hostname.into(), source: source.into() }
    }

    fn config(source: rustls::Error) -> TlsError {
        TlsError::Config { source }
    }

    /// The error and its causes as one line, `a: b: c`, for a log field.
    fn chain(&self) -> String {
        let mut line = self.to_string();
        let mut cause = self.source();
        while let Some(c) = cause {
            line = format!("{line}: {c}");
            cause = c.source();
        }
        line
    }
}

// === impl TlsInfo ===

/// What the client session negotiated, for the Received header and audit records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// `"TLSv1.2"` or `"TLSv1.3"` (`"unknown"` before the handshake finished).
    pub version: &'static str,
    /// The cipher suite by its rustls (IANA-style) name, e.g. `"TLS13_AES_256_GCM_SHA384"`.
    pub cipher: String,
    /// The server name the client asked for, if it sent SNI.
    pub sni: Option<String>,
}

impl TlsInfo {
    /// Reads the negotiated parameters of a server connection whose handshake has completed.
    pub fn from_server(conn: &rustls::ServerConnection) -> TlsInfo {
        let version = match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
        let name = |suite: rustls::CipherSuite| suite.as_str().map_or_else(|| format!("{suite:?}"), str::to_owned);
        let cipher = suite.map(name).unwrap_or_default();
        let sni = conn.server_name().map(str::to_owned);
        TlsInfo { version, cipher, sni }
    }
}

/// Every certificate in a PEM file, in order; at least one.
pub(crate) fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(TlsError::read(path))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>();
    let chain = chain.map_err(TlsError::pem(path))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(chain)
}

#[cfg(test)]
mod tests;
