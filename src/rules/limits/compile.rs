//! Compiling `[[limit]]` and `[greylist]` tables (the parent module has the format and the compiled types).

use std::time::Duration;

use toml::Spanned;

use super::super::compile::{cond, err, Pool, Src};
use super::super::parse::{CondSpec, ListKind, RuleError};
use super::super::Cond;
use super::*;
use crate::config::{ByteSize, Span};
use crate::state::Rate;

type Lists<'a> = &'a std::collections::HashMap<String, (usize, ListKind)>;

/// Compiles one `[[limit]]`; `origin` indexes the caller's origins (for regex errors).
pub(in crate::rules) fn limit(
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
pub(in crate::rules) fn greylist(
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
