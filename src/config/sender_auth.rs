//! `[sender_auth]`: SPF, DKIM, DMARC and ARC checks of mail from the internet (docs/authentication.md).

use serde::Deserialize;

use super::units::ByteSize;

/// `[sender_auth]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SenderAuthConfig {
    /// Checks senders on `mx` listeners (off by default: it needs DNS).
    pub enabled: bool,
    /// The authserv-id of the `Authentication-Results:` header moat adds; empty: the server's hostname.
    /// Incoming headers claiming it are removed.
    pub authserv_id: String,
    /// SPF for the MAIL FROM and HELO identities.
    pub spf: bool,
    /// DKIM verification of every signature.
    pub dkim: bool,
    /// DMARC with alignment, from the SPF and DKIM results.
    pub dmarc: bool,
    /// ARC chain verification.
    pub arc: bool,
    /// The largest message whose DKIM signatures are verified (it is read into memory once, shared with
    /// the content scan); larger messages get `dkim=policy`.
    pub max_message_size: ByteSize,
}

impl Default for SenderAuthConfig {
    fn default() -> Self {
        SenderAuthConfig {
            enabled: false,
            authserv_id: String::new(),
            spf: true,
            dkim: true,
            dmarc: true,
            arc: true,
            max_message_size: ByteSize(16 * 1024 * 1024),
        }
    }
}

impl SenderAuthConfig {
    /// Problems with this section, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let id = &self.authserv_id;
        if id.len() > 253 || id.bytes().any(|b| !(b.is_ascii_alphanumeric() || b == b'.' || b == b'-')) {
            out.push(("authserv_id", format!("sender_auth.authserv_id {id:?} must be a host name")));
        }
        if self.max_message_size.bytes() < 64 * 1024 {
            out.push(("max_message_size", "sender_auth.max_message_size must be at least 64KiB".to_string()));
        }
        out
    }
}
