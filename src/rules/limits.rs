//! Behaviour limits in rule files: `[[limit]]` tables (rates and concurrency per key) and the one
//! `[greylist]` table, parsed with the rules and compiled into the same [`super::RuleSet`], so they reload
//! with the rules (a bad file is refused with file:line, the running set stays) and a transaction keeps
//! the snapshot it started with. Their `when`/`unless` conditions are rule conditions, evaluated by
//! [`super::RuleSet::holds`]. The stages that apply them are `pipeline::limits` and `pipeline::greylist`;
//! the format is documented in `docs/limits.md`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::parse::CondSpec;
use super::{Cond, Phase};
use crate::config::{Role, Span};
use crate::state::Rate;

/// Default prefix lengths of the `net` key part: an IPv4 /24 and an IPv6 /64 (one site's allocation).
pub const DEFAULT_NET_V4: u8 = 24;
pub const DEFAULT_NET_V6: u8 = 64;
/// Longest `delay` (tarpit) a limit may ask for: well under a client's 5-minute command timeout.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// How long a concurrency lease lives unless its holder renews it: past the longest session, so only the
/// leases of an instance that died expire this way.
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3600);

// === file format ===

/// `[[limit]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Unique across all files; a metric label and audit value.
    pub id: Spanned<String>,
    #[serde(default)]
    pub description: String,
    /// What the counter is kept per, e.g. `["ip"]` or `["user", "rcpt_domain"]`.
    pub key: Spanned<Vec<KeyPart>>,
    /// What is counted.
    pub count: Counted,
    /// `"N/window"` (`"10/1m"`, for bytes `"50MiB/1h"`); not for concurrency.
    pub rate: Option<Spanned<String>>,
    /// Events allowed at once from rest (GCRA; default: N of the rate).
    pub burst: Option<u32>,
    /// `"gcra"` (default: a smooth rate with a burst) or `"fixed"` (at most N within `window` of the first).
    #[serde(default)]
    pub algorithm: Algorithm,
    /// For concurrency: how many at once.
    pub max: Option<u32>,
    /// Only on listeners of this role.
    pub role: Option<Role>,
    /// Only when this condition holds (rule condition syntax).
    pub when: Option<Spanned<CondSpec>>,
    /// Not when this condition holds (an exemption: allow lists, authenticated users).
    pub unless: Option<Spanned<CondSpec>>,
    #[serde(default)]
    pub action: LimitActionKind,
    /// The reply text (after the code) for tempfail/reject; default says which limit and when to retry.
    pub reply: Option<Spanned<String>>,
    /// For `action = "score"`.
    pub score: Option<f64>,
    /// For `action = "tag"`: headers to add (default `X-Moat-Limit: <id>`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// For `action = "delay"`: how long to hold the reply (at most 60 s).
    pub delay: Option<Spanned<Span>>,
    /// Prefix lengths of the `net` key part.
    pub net_v4: Option<u8>,
    pub net_v6: Option<u8>,
}

/// `[greylist]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GreylistSpec {
    /// Only on listeners of this role (default: every listener; sessions that authenticated never are).
    pub role: Option<Role>,
    /// How long a new triplet must wait before a retry passes (default 5 minutes).
    pub delay: Option<Span>,
    /// How long a triplet waits for its retry (default 4 hours).
    pub expire: Option<Span>,
    /// How long a passed triplet keeps passing at once (default 35 days).
    pub pass_for: Option<Span>,
    /// Passes after which a client network is allowed outright (0: never; default 5).
    pub auto_allow_after: Option<u32>,
    /// How long such a network stays allowed (default 7 days).
    pub auto_allow_for: Option<Span>,
    /// Only when this condition holds (a doubtful client).
    pub when: Option<Spanned<CondSpec>>,
    /// Not when this condition holds (allow lists).
    pub unless: Option<Spanned<CondSpec>>,
    /// Only when the transaction's score so far is at least this.
    pub min_score: Option<f64>,
    pub net_v4: Option<u8>,
    pub net_v6: Option<u8>,
}

/// One part of a limit's key.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyPart {
    Ip,
    /// The client's network (`net_v4`/`net_v6` prefix).
    Net,
    /// The forward-confirmed reverse DNS name.
    Rdns,
    Helo,
    Listener,
    /// The authenticated user (at AUTH: the login tried).
    User,
    Sender,
    SenderDomain,
    Rcpt,
    RcptDomain,
}

impl KeyPart {
    fn as_str(self) -> &'static str {
        match self {
            KeyPart::Ip => "ip",
            KeyPart::Net => "net",
            KeyPart::Rdns => "rdns",
            KeyPart::Helo => "helo",
            KeyPart::Listener => "listener",
            KeyPart::User => "user",
            KeyPart::Sender => "sender",
            KeyPart::SenderDomain => "sender_domain",
            KeyPart::Rcpt => "rcpt",
            KeyPart::RcptDomain => "rcpt_domain",
        }
    }
}

/// What a limit counts; each kind is counted at one hook.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Counted {
    /// New connections (at connect).
    Connections,
    /// Failed AUTH attempts (at AUTH); once over, AUTH and new connections are refused until it clears.
    AuthFailures,
    /// Transactions started (at MAIL).
    Messages,
    /// Recipients asked for (at RCPT).
    Recipients,
    /// Message bytes (at the end of data).
    Bytes,
    /// Recipients refused permanently (5xx) by moat or the upstream (after RCPT); once over, further RCPTs
    /// are refused.
    RefusedRecipients,
    /// Connections open at once (a lease per connection).
    ConcurrentConnections,
    /// Transactions open at once (a lease per transaction).
    ConcurrentTransactions,
}

impl Counted {
    /// The hook where it is counted.
    pub fn hook(self) -> Hook {
        match self {
            Counted::Connections | Counted::ConcurrentConnections => Hook::Connect,
            Counted::AuthFailures => Hook::Auth,
            Counted::Messages | Counted::ConcurrentTransactions => Hook::Mail,
            Counted::Recipients | Counted::RefusedRecipients => Hook::Rcpt,
            Counted::Bytes => Hook::Data,
        }
    }

    fn is_concurrency(self) -> bool {
        matches!(self, Counted::ConcurrentConnections | Counted::ConcurrentTransactions)
    }
}

/// Where a limit is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Connect,
    Auth,
    Mail,
    Rcpt,
    Data,
}

impl Hook {
    /// Which key parts are known at this hook.
    fn knows(self, part: KeyPart) -> bool {
        match part {
            KeyPart::Ip | KeyPart::Net | KeyPart::Rdns | KeyPart::Listener => true,
            KeyPart::Helo | KeyPart::User => self >= Hook::Auth,
            KeyPart::Sender | KeyPart::SenderDomain => self >= Hook::Mail,
            // Bytes are counted once per message, so a per-recipient key does not apply.
            KeyPart::Rcpt | KeyPart::RcptDomain => self == Hook::Rcpt,
        }
    }

    /// The latest rule phase whose conditions are known here.
    fn phase(self) -> Phase {
        match self {
            Hook::Connect => Phase::Connect,
            Hook::Auth | Hook::Mail => Phase::Mail,
            Hook::Rcpt => Phase::Rcpt,
            Hook::Data => Phase::Headers,
        }
    }

    /// A stable label for the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Auth => "auth",
            Hook::Mail => "mail",
            Hook::Rcpt => "rcpt",
            Hook::Data => "data",
        }
    }
}

/// `algorithm = ...`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    Gcra,
    Fixed,
}

/// `action = ...`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitActionKind {
    #[default]
    Tempfail,
    Reject,
    Score,
    Tag,
    Delay,
}

// === compiled ===

/// How a limit measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// GCRA in the store.
    Rate(Rate),
    /// A counter that lives `per` from its first event.
    Fixed { count: u32, per: Duration },
    /// At most `max` leases at once.
    Concurrency { max: u32, ttl: Duration },
}

/// What an exceeded limit does.
#[derive(Clone, Debug)]
pub enum LimitAction {
    Tempfail,
    Reject,
    Score(f64),
    /// Header lines (CRLF-terminated) to add.
    Tag(Vec<String>),
    Delay(Duration),
}

impl LimitAction {
    /// A stable label for the audit record.
    pub fn as_str(&self) -> &'static str {
        match self {
            LimitAction::Tempfail => "tempfail",
            LimitAction::Reject => "reject",
            LimitAction::Score(_) => "score",
            LimitAction::Tag(_) => "tag",
            LimitAction::Delay(_) => "delay",
        }
    }
}

/// One compiled `[[limit]]`.
#[derive(Debug)]
pub struct Limit {
    pub id: Arc<str>,
    pub description: String,
    pub key: Vec<KeyPart>,
    pub counted: Counted,
    pub measure: Measure,
    pub role: Option<Role>,
    pub when: Option<Cond>,
    pub unless: Option<Cond>,
    pub action: LimitAction,
    /// Custom reply text (after the code).
    pub reply: Option<String>,
    pub net_v4: u8,
    pub net_v6: u8,
}

/// The compiled `[greylist]`.
#[derive(Debug)]
pub struct Greylist {
    pub role: Option<Role>,
    pub delay: Duration,
    pub expire: Duration,
    pub pass_for: Duration,
    pub auto_allow_after: u32,
    pub auto_allow_for: Duration,
    pub when: Option<Cond>,
    pub unless: Option<Cond>,
    pub min_score: Option<f64>,
    pub net_v4: u8,
    pub net_v6: u8,
}

/// The client network of `ip`: the address masked to `v4`/`v6` bits, as `addr/len` (an IPv4-mapped
/// IPv6 address counts as IPv4).
pub fn network(ip: IpAddr, v4: u8, v6: u8) -> String {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let len = v4.min(32);
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let len = v6.min(128);
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

mod compile;
pub use compile::parse_rate;
pub(super) use compile::{greylist, limit};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(network(ip("192.0.2.77"), 24, 64), "192.0.2.0/24");
        assert_eq!(network(ip("::ffff:192.0.2.77"), 24, 64), "192.0.2.0/24");
        assert_eq!(network(ip("2001:db8:1:2:3:4:5:6"), 24, 64), "2001:db8:1:2::/64");
        assert_eq!(network(ip("192.0.2.77"), 32, 64), "192.0.2.77/32");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10/1m", false), Ok((10, Duration::from_secs(60))));
        assert_eq!(parse_rate("1MiB/1h", true), Ok((1 << 20, Duration::from_secs(3600))));
        assert!(parse_rate("10", false).is_err());
        assert!(parse_rate("0/1m", false).is_err());
        assert!(parse_rate("10/2d", false).is_err());
        assert!(parse_rate("10/500ms", false).is_err());
    }
}
