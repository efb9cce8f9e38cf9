//! `[[listener]]`: where moat listens, in which TLS mode and role.

use std::net::SocketAddr;

use serde::Deserialize;

/// How a listener speaks TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerMode {
    /// Plaintext, STARTTLS offered (RFC 3207).
    Starttls,
    /// TLS from the first byte (RFC 8314).
    ImplicitTls,
    /// Plaintext only; for loopback tests.
    Plain,
}

/// What kind of mail a listener takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Mail from the internet to local domains; AUTH optional.
    Mx,
    /// Mail from the organisation's users; AUTH required before MAIL.
    Submission,
}

/// One `[[listener]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    #[serde(default = "default_mode")]
    pub mode: ListenerMode,
    #[serde(default = "default_role")]
    pub role: Role,
    /// Refuse MAIL before TLS with `530 5.7.0`.
    #[serde(default)]
    pub require_tls: bool,
    /// Offer AUTH before TLS too (loopback tests only: the password would cross the network in clear).
    #[serde(default)]
    pub auth_without_tls: bool,
    /// Connections start with a PROXY protocol header from a load balancer (docs/fleet.md).
    #[serde(default)]
    pub proxy_protocol: super::proxy::ProxyProtocol,
    /// The balancers' networks (CIDRs): the only sources whose header is believed.
    #[serde(default)]
    pub proxy_trusted: Vec<String>,
}

fn default_mode() -> ListenerMode {
    ListenerMode::Starttls
}
fn default_role() -> Role {
    Role::Mx
}

/// Problems with the listeners, as `(key, message)`.
pub fn problems(listeners: &[ListenerConfig]) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if listeners.is_empty() {
        out.push(("listener", "at least one [[listener]] is required".into()));
    }
    for (i, l) in listeners.iter().enumerate() {
        if l.name.is_empty() || !l.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            out.push((
                "name",
                format!("listener #{} name {:?} must be non-empty letters, digits, '-' or '_'", i + 1, l.name),
            ));
        }
        if listeners[..i].iter().any(|o| o.name == l.name) {
            out.push(("name", format!("listener name {:?} is used twice", l.name)));
        }
        if l.address.port() != 0 && listeners[..i].iter().any(|o| o.address == l.address) {
            out.push(("address", format!("listener address {} is used twice", l.address)));
        }
        for message in super::proxy::problems(&l.name, l.proxy_protocol, &l.proxy_trusted) {
            out.push(("proxy_trusted", message));
        }
        if l.mode == ListenerMode::Plain && l.require_tls {
            out.push((
                "require_tls",
                format!("listener {:?} has mode \"plain\" but require_tls = true: no client could send", l.name),
            ));
        }
    }
    out
}
