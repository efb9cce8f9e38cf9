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

use super::compile::{cond, err, Pool, Src};
use super::parse::{CondSpec, ListKind, RuleError};
use super::{Cond, Phase};
use crate::config::{ByteSize, Role, Span};
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
    /// Recipients refused by moat or the upstream (after RCPT); once over, further RCPTs are refused.
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

// === compilation ===

type Lists<'a> = &'a std::collections::HashMap<String, (usize, ListKind)>;

/// Compiles one `[[limit]]`; `origin` indexes the caller's origins (for regex errors).
pub(super) fn limit(
    src: &Src<'_>,
    l: &LimitSpec,
    pool: &mut Pool,
    lists: Lists<'_>,
    origin: usize,
) -> Result<Limit, RuleError> {
    let hook = l.count.hook();
    if l.key.get_ref().is_empty() {
        return Err(err(src, &l.key, "key needs at least one part"));
    }
    for part in l.key.get_ref() {
        if !hook.knows(*part) {
            let msg = format!("key part {:?} is not known when {:?} are counted", part.as_str(), count_name(l.count));
            return Err(err(src, &l.key, msg));
        }
    }
    let measure = measure(src, l)?;
    let when = condition(src, l.when.as_ref(), pool, lists, origin, hook)?;
    let unless = condition(src, l.unless.as_ref(), pool, lists, origin, hook)?;
    let action = action(src, l)?;
    if let Some(r) = &l.reply {
        if r.get_ref().contains(['\r', '\n']) || r.get_ref().trim().is_empty() {
            return Err(err(src, r, "reply text must be one non-empty line"));
        }
    }
    Ok(Limit {
        id: l.id.get_ref().as_str().into(),
        description: l.description.clone(),
        key: l.key.get_ref().clone(),
        counted: l.count,
        measure,
        role: l.role,
        when,
        unless,
        action,
        reply: l.reply.as_ref().map(|r| r.get_ref().clone()),
        net_v4: prefix(src, &l.id, l.net_v4, DEFAULT_NET_V4, 32)?,
        net_v6: prefix(src, &l.id, l.net_v6, DEFAULT_NET_V6, 128)?,
    })
}

fn count_name(c: Counted) -> &'static str {
    match c {
        Counted::Connections => "connections",
        Counted::AuthFailures => "auth_failures",
        Counted::Messages => "messages",
        Counted::Recipients => "recipients",
        Counted::Bytes => "bytes",
        Counted::RefusedRecipients => "refused_recipients",
        Counted::ConcurrentConnections => "concurrent_connections",
        Counted::ConcurrentTransactions => "concurrent_transactions",
    }
}

fn prefix(src: &Src<'_>, at: &Spanned<String>, v: Option<u8>, default: u8, max: u8) -> Result<u8, RuleError> {
    match v {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(err(src, at, format!("network prefix {n} must be 1..={max}"))),
    }
}

fn measure(src: &Src<'_>, l: &LimitSpec) -> Result<Measure, RuleError> {
    if l.count.is_concurrency() {
        if l.rate.is_some() || l.burst.is_some() {
            return Err(err(src, &l.id, "a concurrency limit takes max = N, not rate or burst"));
        }
        return match l.max {
            Some(max) if max > 0 => Ok(Measure::Concurrency { max, ttl: DEFAULT_LEASE_TTL }),
            _ => Err(err(src, &l.id, "a concurrency limit needs max = N (at least 1)")),
        };
    }
    if l.max.is_some() {
        return Err(err(src, &l.id, "max applies to concurrent_connections and concurrent_transactions only"));
    }
    let Some(rate) = &l.rate else { return Err(err(src, &l.id, "a limit needs rate = \"N/window\"")) };
    let (count, per) = parse_rate(rate.get_ref(), l.count == Counted::Bytes).map_err(|m| err(src, rate, m))?;
    match l.algorithm {
        Algorithm::Gcra => {
            let burst = l.burst.unwrap_or(count);
            if burst == 0 {
                return Err(err(src, rate, "burst must be at least 1"));
            }
            Ok(Measure::Rate(Rate { count, per, burst }))
        }
        Algorithm::Fixed if l.burst.is_some() => Err(err(src, rate, "burst applies to algorithm \"gcra\" only")),
        Algorithm::Fixed => Ok(Measure::Fixed { count, per }),
    }
}

/// `"10/1m"` (for bytes the number may carry a unit: `"50MiB/1h"`); the window is 1 s to 1 day.
pub fn parse_rate(s: &str, bytes: bool) -> Result<(u32, Duration), String> {
    let (n, w) = s.split_once('/').ok_or_else(|| format!("rate {s:?} must be \"N/window\", e.g. \"10/1m\""))?;
    let n = if bytes {
        ByteSize::parse(n.trim())?.bytes()
    } else {
        n.trim().parse().map_err(|_| format!("invalid count in rate {s:?}"))?
    };
    let count = u32::try_from(n)
        .ok()
        .filter(|&c| c > 0)
        .ok_or_else(|| format!("count in rate {s:?} must be 1..=4294967295"))?;
    let per = Span::parse(w)?.get();
    if per < Duration::from_secs(1) || per > Duration::from_secs(86_400) {
        return Err(format!("window of rate {s:?} must be 1s..=1d"));
    }
    Ok((count, per))
}

fn condition(
    src: &Src<'_>,
    spec: Option<&Spanned<CondSpec>>,
    pool: &mut Pool,
    lists: Lists<'_>,
    origin: usize,
    hook: Hook,
) -> Result<Option<Cond>, RuleError> {
    let Some(spec) = spec else { return Ok(None) };
    let c = cond(src, spec, pool, lists, origin)?;
    if c.phase() > hook.phase() {
        let msg =
            format!("this condition needs the {} phase, later than where the limit is counted", c.phase().as_str());
        return Err(err(src, spec, msg));
    }
    Ok(Some(c))
}

fn action(src: &Src<'_>, l: &LimitSpec) -> Result<LimitAction, RuleError> {
    if l.score.is_some() && l.action != LimitActionKind::Score {
        return Err(err(src, &l.id, "score applies to action \"score\" only"));
    }
    if l.delay.is_some() && l.action != LimitActionKind::Delay {
        return Err(err(src, &l.id, "delay applies to action \"delay\" only"));
    }
    if !l.headers.is_empty() && l.action != LimitActionKind::Tag {
        return Err(err(src, &l.id, "headers apply to action \"tag\" only"));
    }
    Ok(match l.action {
        LimitActionKind::Tempfail => LimitAction::Tempfail,
        LimitActionKind::Reject => LimitAction::Reject,
        LimitActionKind::Score => match l.score {
            Some(s) if s.is_finite() => LimitAction::Score(s),
            _ => return Err(err(src, &l.id, "action \"score\" needs a finite score = N")),
        },
        LimitActionKind::Tag => {
            let mut headers = Vec::new();
            for (k, v) in &l.headers {
                if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic() && b != b':') || v.contains(['\r', '\n']) {
                    return Err(err(src, &l.id, format!("invalid header {k:?}")));
                }
                headers.push(format!("{k}: {v}\r\n"));
            }
            if headers.is_empty() {
                headers.push(format!("X-Moat-Limit: {}\r\n", l.id.get_ref()));
            }
            LimitAction::Tag(headers)
        }
        LimitActionKind::Delay => match &l.delay {
            Some(d) if !d.get_ref().get().is_zero() && d.get_ref().get() <= MAX_DELAY => {
                LimitAction::Delay(d.get_ref().get())
            }
            Some(d) => return Err(err(src, d, "delay must be more than 0 and at most 60s")),
            None => return Err(err(src, &l.id, "action \"delay\" needs delay = \"5s\"")),
        },
    })
}

/// Compiles the `[greylist]` table.
pub(super) fn greylist(
    src: &Src<'_>,
    at: &Spanned<GreylistSpec>,
    pool: &mut Pool,
    lists: Lists<'_>,
    origin: usize,
) -> Result<Greylist, RuleError> {
    let g = at.get_ref();
    let get = |s: Option<Span>, d: u64| s.map_or(Duration::from_secs(d), Span::get);
    let out = Greylist {
        role: g.role,
        delay: get(g.delay, 300),
        expire: get(g.expire, 4 * 3600),
        pass_for: get(g.pass_for, 35 * 86_400),
        auto_allow_after: g.auto_allow_after.unwrap_or(5),
        auto_allow_for: get(g.auto_allow_for, 7 * 86_400),
        when: condition(src, g.when.as_ref(), pool, lists, origin, Hook::Rcpt)?,
        unless: condition(src, g.unless.as_ref(), pool, lists, origin, Hook::Rcpt)?,
        min_score: g.min_score,
        net_v4: g.net_v4.unwrap_or(DEFAULT_NET_V4),
        net_v6: g.net_v6.unwrap_or(DEFAULT_NET_V6),
    };
    if out.delay.is_zero() || out.expire <= out.delay {
        return Err(err(src, at, "greylist delay must be more than 0 and less than expire"));
    }
    if out.pass_for.is_zero() || out.auto_allow_for.is_zero() {
        return Err(err(src, at, "greylist pass_for and auto_allow_for must be more than 0"));
    }
    if !(1..=32).contains(&out.net_v4) || !(1..=128).contains(&out.net_v6) {
        return Err(err(src, at, "greylist net_v4 must be 1..=32 and net_v6 1..=128"));
    }
    if out.min_score.is_some_and(|s| !s.is_finite()) {
        return Err(err(src, at, "greylist min_score must be a finite number"));
    }
    Ok(out)
}

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
