//! `[dns]` and `[[dns.zone]]`: the resolver every DNS lookup goes through, and the DNS blocklists and
//! allowlists moat queries (docs/dns.md).

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use super::units::Span;
use crate::dns::zone::Codes;

/// `[dns]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers, `"ip"` or `"ip:port"` (UDP, then TCP for truncated answers); empty: the system's
    /// (`/etc/resolv.conf`).
    pub servers: Vec<String>,
    /// How long one query to one server may take.
    pub timeout: Span,
    /// Tries per query (the servers in turn).
    pub attempts: usize,
    /// Answers kept in moat's cache (each for its TTL, at most `max_ttl`).
    pub cache_size: usize,
    /// The longest an answer is cached, whatever its TTL.
    pub max_ttl: Span,
    /// How long a stage waits for its lookups in all (a lookup past it counts as a timeout).
    pub deadline: Span,
    /// What a failed or timed-out blocklist lookup does: `"continue"` (no listing) or `"tempfail"` (`451`).
    pub on_error: OnDnsError,
    /// The blocklists and allowlists.
    #[serde(rename = "zone")]
    pub zones: Vec<ZoneConfig>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout: Span(std::time::Duration::from_secs(2)),
            attempts: 2,
            cache_size: 10_000,
            max_ttl: Span(std::time::Duration::from_secs(3600)),
            deadline: Span(std::time::Duration::from_secs(5)),
            on_error: OnDnsError::Continue,
            zones: Vec::new(),
        }
    }
}

/// `dns.on_error`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnDnsError {
    /// A lookup that failed is no listing.
    #[default]
    Continue,
    /// A lookup that failed answers the message `451 4.7.1` (try again later).
    Tempfail,
}

/// What a zone is queried with.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ZoneKind {
    /// The client's IP address (reversed octets or nibbles): a blocklist.
    #[default]
    Dnsbl,
    /// The client's IP address: an allowlist (give it a negative weight).
    Dnswl,
    /// Domain names: the HELO name, the MAIL FROM domain and the From header's domain.
    Rhsbl,
    /// The registered domains of the URLs in the message body.
    Uribl,
}

/// Which names an `rhsbl` zone is asked about.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RhsTarget {
    Helo,
    MailFrom,
    From,
}

/// `[[dns.zone]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// The name rules use (`dnsbl = "zen"`) and the metrics label.
    pub name: String,
    /// The DNS zone queried, e.g. `"zen.spamhaus.org"`.
    pub zone: String,
    #[serde(default)]
    pub kind: ZoneKind,
    /// Which answers mean "listed", postscreen style: `"127.0.0.2"`, `"127.0.0.[2..11]"`,
    /// `"127.0.[0;1].[2..99]"`, or `"&4"` (any answer with bit 4 set in its last octet). Empty: any
    /// answer in 127.0.0.0/8 except 127.0.0.1. Answers in 127.255.255.0/24 are always errors.
    #[serde(default)]
    pub codes: Vec<String>,
    /// Added to the transaction's score when listed (negative for allowlists).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// For `rhsbl`: which names (default: all three).
    #[serde(default = "default_targets")]
    pub targets: Vec<RhsTarget>,
}

fn default_weight() -> f64 {
    1.0
}

fn default_targets() -> Vec<RhsTarget> {
    vec![RhsTarget::Helo, RhsTarget::MailFrom, RhsTarget::From]
}

impl DnsConfig {
    /// The configured name servers as socket addresses (port 53 when none is given).
    pub fn server_addrs(&self) -> Result<Vec<SocketAddr>, String> {
        self.servers
            .iter()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| format!("dns.servers entry {s:?} is not an IP address or ip:port"))
            })
            .collect()
    }

    /// Problems with this section, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Err(m) = self.server_addrs() {
            out.push(("servers", m));
        }
        if self.timeout.get().is_zero() || self.deadline.get().is_zero() {
            out.push(("timeout", "dns.timeout and dns.deadline must be above 0".to_string()));
        }
        if !(1..=5).contains(&self.attempts) {
            out.push(("attempts", format!("dns.attempts = {} must be 1..=5", self.attempts)));
        }
        if !(16..=10_000_000).contains(&self.cache_size) {
            out.push(("cache_size", format!("dns.cache_size = {} must be 16..=10000000", self.cache_size)));
        }
        for (i, z) in self.zones.iter().enumerate() {
            if z.name.is_empty() || !z.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                out.push((
                    "name",
                    format!("dns.zone #{} name {:?} must be letters, digits, '-' or '_'", i + 1, z.name),
                ));
            }
            if self.zones[..i].iter().any(|o| o.name == z.name) {
                out.push(("name", format!("dns.zone name {:?} is used twice", z.name)));
            }
            if z.zone.is_empty() || z.zone.starts_with('.') || z.zone.contains(' ') {
                out.push(("zone", format!("dns.zone {:?}: zone {:?} is not a domain name", z.name, z.zone)));
            }
            if let Err(m) = Codes::parse(&z.codes) {
                out.push(("codes", format!("dns.zone {:?}: {m}", z.name)));
            }
            if !z.weight.is_finite() {
                out.push(("weight", format!("dns.zone {:?}: weight must be a number", z.name)));
            }
        }
        out
    }
}
