//! `[[listener]]` keys for a listener behind a load balancer: `proxy_protocol` and `proxy_trusted`
//! (docs/fleet.md).

use serde::Deserialize;

/// `listener.proxy_protocol`: whether connections start with a PROXY protocol header, and which versions.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyProtocol {
    /// No header: the TCP peer is the client.
    #[default]
    Off,
    /// HAProxy `send-proxy` (text).
    V1,
    /// HAProxy `send-proxy-v2` (binary).
    V2,
    /// Either.
    Any,
}

impl ProxyProtocol {
    /// The versions to accept, or `None` when off.
    pub fn accept(self) -> Option<crate::proxy_protocol::Accept> {
        use crate::proxy_protocol::Accept;
        match self {
            ProxyProtocol::Off => None,
            ProxyProtocol::V1 => Some(Accept::V1),
            ProxyProtocol::V2 => Some(Accept::V2),
            ProxyProtocol::Any => Some(Accept::Any),
        }
    }
}

/// Problems with a listener's proxy keys, as messages.
pub fn problems(name: &str, mode: ProxyProtocol, trusted: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for t in trusted {
        if let Err(e) = crate::rules::lists::parse_cidr(t) {
            out.push(format!("listener {name:?} proxy_trusted: {e}"));
        }
    }
    if mode != ProxyProtocol::Off && trusted.is_empty() {
        out.push(format!(
            "listener {name:?} has proxy_protocol but no proxy_trusted networks: every connection would be refused"
        ));
    }
    out
}

/// The trusted networks as a set (entries that do not parse are left out; `validate` reports them).
pub fn trusted_set(trusted: &[String]) -> crate::rules::lists::CidrSet {
    crate::rules::lists::CidrSet::new(trusted.iter().filter_map(|t| crate::rules::lists::parse_cidr(t).ok()).collect())
}
