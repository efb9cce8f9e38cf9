//! `[limits]`: what one client and one message may use (RFC 5321 §4.5.3), and the line-ending policy.

use serde::Deserialize;

use super::units::secs;
use super::{ByteSize, Span};

/// The hard ceiling for `limits.max_command_line`: no command or reply needs more (smtp-proto caps at 4096 too).
pub const MAX_COMMAND_LINE_CAP: usize = 4096;

/// What to do with bare LF / bare CR inside message data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BareLineEndings {
    /// Answer `550 5.6.0` at end of data.
    Reject,
    /// Turn each into CRLF.
    Normalize,
}

/// `[limits]`: every bound a client can run into.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// IPv6 clients are counted per prefix of this many bits by every per-client bound (`client_key`).
    pub ipv6_client_prefix: u8,
    pub max_message_size: ByteSize,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub max_command_line: usize,
    pub max_text_line: usize,
    pub bare_line_endings: BareLineEndings,
    pub idle_timeout: Span,
    pub data_timeout: Span,
    pub session_timeout: Span,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1000,
            max_connections_per_ip: 50,
            ipv6_client_prefix: crate::client_key::DEFAULT_IPV6_PREFIX,
            max_message_size: ByteSize(50 << 20),
            max_recipients: 100,
            max_errors: 10,
            max_command_line: 512,
            max_text_line: 1000,
            bare_line_endings: BareLineEndings::Reject,
            idle_timeout: secs(300),
            data_timeout: secs(180),
            session_timeout: secs(1800),
        }
    }
}

impl Limits {
    /// Problems with this section, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.max_command_line < 512 || self.max_command_line > MAX_COMMAND_LINE_CAP {
            out.push((
                "max_command_line",
                format!(
                    "limits.max_command_line must be between 512 and {MAX_COMMAND_LINE_CAP} (RFC 5321 4.5.3.1.4), not {}",
                    self.max_command_line
                ),
            ));
        }
        if self.max_text_line != 0 && self.max_text_line < 1000 {
            out.push((
                "max_text_line",
                format!(
                    "limits.max_text_line must be 0 (off) or at least 1000 (RFC 5321 4.5.3.1.6), not {}",
                    self.max_text_line
                ),
            ));
        }
        for (key, v) in [
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_recipients", self.max_recipients),
        ] {
            if v == 0 {
                out.push((key, format!("limits.{key} must be at least 1")));
            }
        }
        if !(32..=128).contains(&self.ipv6_client_prefix) {
            let p = self.ipv6_client_prefix;
            out.push(("ipv6_client_prefix", format!("limits.ipv6_client_prefix must be between 32 and 128, not {p}")));
        }
        if self.max_recipients < 100 {
            // RFC 5321 4.5.3.1.8 asks servers to accept at least 100; allowed, but worth knowing.
            tracing::debug!("limits.max_recipients is below the RFC 5321 minimum of 100");
        }
        if self.max_message_size.bytes() == 0 {
            out.push(("max_message_size", "limits.max_message_size must be positive".into()));
        }
        for (key, d) in [
            ("idle_timeout", self.idle_timeout),
            ("data_timeout", self.data_timeout),
            ("session_timeout", self.session_timeout),
        ] {
            if d.get().is_zero() {
                out.push((key, format!("limits.{key} must be positive")));
            }
        }
        out
    }
}
