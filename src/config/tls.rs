//! `[tls]`: the server certificates and protocol versions (docs/tls.md).

use std::path::PathBuf;

use serde::Deserialize;

use super::units::secs;
use super::Span;

/// One certificate chain and its key, both PEM files.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Oldest TLS protocol version offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// `[tls]`: the server side of TLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificates chosen by SNI; the first is the default. Empty: a generated self-signed one.
    pub certificates: Vec<CertificateConfig>,
    pub min_version: TlsVersion,
    pub handshake_timeout: Span,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { certificates: Vec::new(), min_version: TlsVersion::V1_2, handshake_timeout: secs(10) }
    }
}

impl TlsConfig {
    /// Problems with this section, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for c in &self.certificates {
            for p in [&c.cert, &c.key] {
                if !p.is_file() {
                    out.push(("certificates", format!("tls certificate file {} does not exist", p.display())));
                }
            }
        }
        out
    }
}
