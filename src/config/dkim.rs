//! `[dkim]` and `[[dkim.sign]]`: DKIM signing of authenticated submissions (docs/authentication.md).

use std::path::PathBuf;

use serde::Deserialize;

use super::units::Span;

/// `[dkim]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// How often key files are checked for changes; 0 disables the watcher (SIGHUP still reloads).
    pub watch_interval: Span,
    /// One signing key per sender domain.
    pub sign: Vec<DkimSignConfig>,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig { watch_interval: Span(std::time::Duration::from_secs(30)), sign: Vec::new() }
    }
}

/// `[[dkim.sign]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSignConfig {
    /// The sender domain (the From header's) this key signs for; `d=`.
    pub domain: String,
    /// `s=`: the key's TXT record is at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// A PKCS#8 PEM private key, RSA (2048 bits or more) or Ed25519 (`moat dkim keygen` writes one).
    pub key_file: PathBuf,
    /// The header fields signed.
    #[serde(default = "default_headers")]
    pub headers: Vec<String>,
    /// Header fields signed once more than present, so none can be added later (From by default).
    #[serde(default = "default_oversign")]
    pub oversign: Vec<String>,
}

fn default_headers() -> Vec<String> {
    ["From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To", "References", "MIME-Version"]
        .iter()
        .chain(["Content-Type", "Content-Transfer-Encoding"].iter())
        .map(|s| s.to_string())
        .collect()
}

fn default_oversign() -> Vec<String> {
    vec!["From".to_string()]
}

impl DkimConfig {
    /// Problems with this section, as (key, message). Key files are checked when loaded.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (i, s) in self.sign.iter().enumerate() {
            let label =
                |c: &str| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !label(&s.domain) || !s.domain.contains('.') {
                out.push(("domain", format!("dkim.sign #{}: domain {:?} is not a domain name", i + 1, s.domain)));
            }
            if !label(&s.selector) {
                out.push(("selector", format!("dkim.sign #{}: selector {:?} is not a DNS label", i + 1, s.selector)));
            }
            if self.sign[..i].iter().any(|o| o.domain.eq_ignore_ascii_case(&s.domain)) {
                out.push(("domain", format!("dkim.sign: domain {:?} has two keys", s.domain)));
            }
            if !s.headers.iter().any(|h| h.eq_ignore_ascii_case("from")) {
                out.push(("headers", format!("dkim.sign {:?}: headers must include From", s.domain)));
            }
            if !s.key_file.is_file() {
                out.push((
                    "key_file",
                    format!("dkim.sign {:?}: key_file {} does not exist", s.domain, s.key_file.display()),
                ));
            }
        }
        out
    }
}
