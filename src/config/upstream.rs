//! `[upstream]`: the MTA moat relays to, how it introduces clients, its TLS and its limits.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::units::secs;
use super::Span;

/// How the client's identity is passed to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Identity {
    /// Postfix XCLIENT: NAME, ADDR, PORT, PROTO, HELO (and LOGIN).
    Xclient,
    /// HAProxy PROXY protocol version 2 header at connection start.
    ProxyV2,
    /// Nothing: the upstream sees moat's own address.
    None,
}

/// `[upstream]`: the MTA behind moat.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub address: SocketAddr,
    pub identity: Identity,
    pub helo_name: String,
    pub pool_size: usize,
    pub pool_idle_timeout: Span,
    /// Most upstream connections open at once (pooled ones included); below Postfix's process limit.
    pub max_connections: usize,
    /// How long a client waits for an upstream connection when all are in use (then `451 4.3.2`).
    pub connection_wait: Span,
    pub connect_timeout: Span,
    pub command_timeout: Span,
    pub data_timeout: Span,
    /// STARTTLS to the upstream.
    pub tls: UpstreamTlsMode,
    /// How the upstream's certificate is checked.
    pub tls_verify: UpstreamTlsVerify,
    /// CA certificates (PEM) for `tls_verify = "ca-file"`.
    pub tls_ca_file: PathBuf,
    /// The name the upstream's certificate must carry (and the SNI sent). Empty: the host of `address`.
    pub tls_server_name: String,
    /// Answer a lone MAIL once moat's own stages accepted it and send it upstream with the first RCPT (one
    /// round trip less per message for clients that do not pipeline); the upstream's verdict on the sender
    /// then reaches the client at RCPT, as Postfix's `smtpd_delay_reject` does.
    pub defer_mail: bool,
    /// Send the message with `BDAT <size> LAST` (RFC 3030 CHUNKING) when the upstream offers it: one
    /// round trip less per message and no dot-stuffing. `false`: always DATA.
    pub chunking: bool,
}

/// Whether moat uses STARTTLS towards the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    /// Plaintext, even when STARTTLS is offered.
    Off,
    /// STARTTLS when the upstream offers it, plaintext when it does not. A failed handshake or
    /// certificate check is still a failure (no downgrade after a failed handshake).
    Opportunistic,
    /// STARTTLS or no relay: an upstream that does not offer it is a failure.
    Required,
}

/// How the upstream's certificate is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsVerify {
    /// Against the operating system's trust store.
    System,
    /// Against the CA certificates in `tls_ca_file`.
    CaFile,
    /// Not at all (only the handshake signature is checked); allowed only for a loopback upstream.
    InsecureLoopback,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 10025)),
            identity: Identity::Xclient,
            helo_name: String::new(),
            pool_size: 32,
            pool_idle_timeout: secs(30),
            max_connections: 80,
            connection_wait: secs(10),
            connect_timeout: secs(10),
            command_timeout: secs(60),
            data_timeout: secs(300),
            tls: UpstreamTlsMode::Off,
            tls_verify: UpstreamTlsVerify::System,
            tls_ca_file: PathBuf::new(),
            tls_server_name: String::new(),
            defer_mail: true,
            chunking: true,
        }
    }
}

impl UpstreamConfig {
    /// Problems with this section, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (key, d) in [
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
            ("data_timeout", self.data_timeout),
        ] {
            if d.get().is_zero() {
                out.push((key, format!("upstream.{key} must be positive")));
            }
        }
        if self.max_connections == 0 {
            out.push(("max_connections", "upstream.max_connections must be at least 1".into()));
        }
        if self.tls_verify == UpstreamTlsVerify::InsecureLoopback && !self.address.ip().is_loopback() {
            out.push((
                "tls_verify",
                format!(
                    "upstream.tls_verify = \"insecure-loopback\" is only allowed for a loopback upstream, not {}",
                    self.address
                ),
            ));
        }
        match (self.tls_verify, self.tls_ca_file.as_os_str().is_empty()) {
            (UpstreamTlsVerify::CaFile, true) => {
                out.push(("tls_verify", "upstream.tls_verify = \"ca-file\" needs upstream.tls_ca_file".into()))
            }
            (UpstreamTlsVerify::CaFile, false) if !self.tls_ca_file.is_file() => {
                out.push(("tls_ca_file", format!("upstream.tls_ca_file {} does not exist", self.tls_ca_file.display())))
            }
            (UpstreamTlsVerify::System | UpstreamTlsVerify::InsecureLoopback, false) => out
                .push(("tls_ca_file", "upstream.tls_ca_file is set but upstream.tls_verify is not \"ca-file\"".into())),
            _ => {}
        }
        if !self.tls_server_name.is_empty()
            && rustls::pki_types::ServerName::try_from(self.tls_server_name.as_str()).is_err()
        {
            out.push((
                "tls_server_name",
                format!("upstream.tls_server_name {:?} is not a DNS name or IP address", self.tls_server_name),
            ));
        }
        out
    }
}
