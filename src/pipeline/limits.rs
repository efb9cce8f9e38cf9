//! The limits stage: applies the `[[limit]]` tables of the loaded rule set (`rules::limits`) through the
//! shared [`Store`](crate::state::Store), one store call per limit and key.
//!
//! Each kind of count is taken at one hook: connections and concurrent connections at connect, AUTH
//! failures after a failed AUTH, messages and concurrent transactions at MAIL, recipients at RCPT, refused
//! recipients after the RCPT's final reply, bytes at the end of data. Counts of failures (AUTH failures,
//! refused recipients) cannot refuse the attempt that already failed: once over, they leave a block in the
//! store for as long as the rate needs to recover, and the next AUTH (or connection) or RCPT is refused.
//! Concurrency leases live in the connection's or transaction's extensions and are given back when those
//! end. The connection takes a rule-set snapshot at connect (connect and AUTH limits); a transaction takes
//! its own at MAIL and keeps it to its end. A store that does not answer fails open (logged at `debug`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::debug;

use super::{AuthEvent, ConnInfo, EventFuture, HookFuture, MessageView, RcptOutcome, Stage, StageRecord};
use super::{TxnContext, TxnEnd, TxnHook, Verdict};
use crate::rules::eval::Facts;
use crate::rules::limits::{network, Counted, Hook, KeyPart, Limit, LimitAction, Measure};
use crate::rules::{RuleSet, Rules};
use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::Reply;
use crate::state::{SharedStore, StoreError};

/// The stage.
pub struct LimitsStage {
    rules: Arc<Rules>,
    store: SharedStore,
    /// Makes lease holders unique across a fleet sharing one store (connection ids are per process).
    instance: String,
}

impl LimitsStage {
    pub fn new(rules: Arc<Rules>, store: SharedStore) -> LimitsStage {
        let now = crate::state::Clock::now_ms(&crate::state::SystemClock);
        LimitsStage { rules, store, instance: format!("{:x}.{:x}", std::process::id(), now) }
    }
}

/// The connection's snapshot, its leases and the effects of connect/AUTH limits that carry into each
/// transaction (score, headers, audit records).
#[derive(Default)]
struct ConnLimits {
    set: Option<Arc<RuleSet>>,
    leases: Vec<Lease>,
    effects: Mutex<Effects>,
}

#[derive(Clone, Default)]
struct Effects {
    score: f64,
    headers: Vec<String>,
    records: Vec<(&'static str, &'static str, &'static str)>,
}

/// The transaction's snapshot and leases.
struct TxnLimits {
    set: Arc<RuleSet>,
    _leases: Vec<Lease>,
    /// The current RCPT was refused by a refused-recipients block (not counted again).
    rcpt_blocked: bool,
}

/// A concurrency lease, given back when dropped.
struct Lease {
    store: SharedStore,
    key: String,
    holder: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (store, key, holder) =
            (self.store.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.holder));
        // Outside a runtime (a test dropping a context) the lease expires with its ttl instead.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.release(&key, &holder).await {
                    debug!(error = %e, "cannot release a concurrency lease; it expires with its ttl");
                }
            });
        }
    }
}

/// The values a key can be made of, as far as they are known.
#[derive(Clone, Copy, Default)]
struct KeyValues<'a> {
    helo: Option<&'a str>,
    user: Option<&'a str>,
    sender: Option<&'a str>,
    rcpt: Option<&'a str>,
}

fn domain_of(addr: &str) -> Option<&str> {
    addr.rsplit_once('@').map(|(_, d)| d).filter(|d| !d.is_empty())
}

/// The store key of `limit` for these values; `None` when a part has no value (the limit does not apply:
/// no reverse DNS name, no authenticated user, the null sender).
fn key(limit: &Limit, conn: &ConnInfo, v: KeyValues<'_>) -> Option<String> {
    let mut k = format!("rl:{}:", limit.id);
    for (i, part) in limit.key.iter().enumerate() {
        if i > 0 {
            k.push('|');
        }
        let value = match part {
            KeyPart::Ip => conn.peer.ip().to_canonical().to_string(),
            KeyPart::Net => network(conn.peer.ip(), limit.net_v4, limit.net_v6),
            KeyPart::Rdns => conn.name.clone()?,
            KeyPart::Listener => conn.listener.to_string(),
            KeyPart::Helo => v.helo?.to_string(),
            KeyPart::User => v.user?.to_string(),
            KeyPart::Sender => v.sender.filter(|s| !s.is_empty())?.to_string(),
            KeyPart::SenderDomain => domain_of(v.sender?)?.to_string(),
            KeyPart::Rcpt => v.rcpt?.to_string(),
            KeyPart::RcptDomain => domain_of(v.rcpt?)?.to_string(),
        };
        k.push_str(&value.to_lowercase());
    }
    Some(k)
}

/// The key a failure count leaves its block under.
fn block_key(key: &str) -> String {
    format!("{key}:block")
}

/// Whether `limit` applies to this connection and these facts (role, `when`, `unless`).
fn applies(set: &RuleSet, limit: &Limit, conn: &ConnInfo, facts: &Facts<'_>) -> bool {
    limit.role.is_none_or(|r| r == conn.role)
        && limit.when.as_ref().is_none_or(|c| set.holds(c, facts))
        && !limit.unless.as_ref().is_some_and(|c| set.holds(c, facts))
}

fn facts<'a>(conn: &'a ConnInfo, v: KeyValues<'a>, rcpts: &'a [String], size: u64) -> Facts<'a> {
    Facts {
        ip: conn.peer.ip(),
        client_name: conn.name.as_deref(),
        listener: &conn.listener,
        helo: v.helo,
        auth_user: v.user,
        mail_from: v.sender,
        rcpts,
        size,
        content: None,
        auth: None,
    }
}

/// The reply of an exceeded limit that refuses at `hook`.
fn refusal(limit: &Limit, hook: Hook, retry: Option<Duration>) -> Verdict {
    let when = match retry {
        Some(d) => format!("try again in {} s", d.as_secs().max(1)),
        None => "try again later".to_string(),
    };
    let text = |enhanced: &str| match &limit.reply {
        Some(t) => format!("{enhanced} {t}"),
        None => format!("{enhanced} limit {} exceeded, {when}", limit.id),
    };
    match (&limit.action, hook) {
        (LimitAction::Reject, Hook::Connect) => Verdict::Reject(Reply::new(554, text("5.7.1"))),
        (LimitAction::Reject, Hook::Auth) => Verdict::Reject(Reply::new(535, text("5.7.8"))),
        (LimitAction::Reject, _) => Verdict::Reject(Reply::new(550, text("5.7.1"))),
        (_, Hook::Connect) => Verdict::Tempfail(Reply::new(421, text("4.7.0"))),
        (_, Hook::Auth) => Verdict::Tempfail(Reply::new(454, text("4.7.0"))),
        (_, Hook::Rcpt) if limit.counted == Counted::Recipients => Verdict::Tempfail(Reply::new(452, text("4.5.3"))),
        _ => Verdict::Tempfail(Reply::new(451, text("4.7.1"))),
    }
}

/// Why a check gave no answer: logged, and the limit fails open.
fn store_failed(limit: &Limit, e: &StoreError) {
    debug!(limit = %limit.id, error = %e, "state store failed; limit not applied");
}

// === impl LimitsStage ===

impl LimitsStage {
    /// Takes `cost` from the limit's counter at `key`: `Some(retry)` when it is exceeded.
    async fn take(&self, limit: &Limit, key: &str, cost: u32) -> Result<Option<Option<Duration>>, StoreError> {
        match limit.measure {
            Measure::Rate(rate) => {
                let d = self.store.rate(key, rate, cost).await?;
                Ok((!d.allowed).then_some(Some(d.retry_after)))
            }
            Measure::Fixed { count, per } => {
                let n = self.store.incr(key, i64::from(cost), per).await?;
                Ok((n > i64::from(count)).then_some(None))
            }
            // Concurrency limits go through `lease`.
            Measure::Concurrency { .. } => Ok(None),
        }
    }

    /// Takes a lease; `Ok(None)` when all are taken.
    async fn lease(&self, limit: &Limit, key: String, holder: &str) -> Result<Option<Lease>, StoreError> {
        let Measure::Concurrency { max, ttl } = limit.measure else { return Ok(None) };
        let holder = format!("{}:{holder}", self.instance);
        if self.store.acquire(&key, &holder, max, ttl).await? {
            Ok(Some(Lease { store: self.store.clone(), key, holder }))
        } else {
            Ok(None)
        }
    }

    /// Whether a failure count left a block at `key`.
    async fn blocked(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.store.get(&block_key(key)).await?.is_some())
    }

    /// Counts one failure; over the limit, leaves a block for as long as the rate needs to recover.
    async fn fail(&self, limit: &Limit, key: &str) -> Result<bool, StoreError> {
        let Some(retry) = self.take(limit, key, 1).await? else { return Ok(false) };
        let ttl = match (retry, limit.measure) {
            (Some(d), _) => d.max(Duration::from_secs(1)),
            (None, Measure::Fixed { per, .. }) => per,
            (None, _) => Duration::from_secs(60),
        };
        self.store.set(&block_key(key), b"1", ttl).await?;
        Ok(true)
    }
}

/// Applies an exceeded limit: counts and records it, and returns the verdict (score and tag effects are
/// added to `effects`; a delay sleeps here, bounded by the rules' `MAX_DELAY`).
async fn exceeded(limit: &Limit, hook: Hook, retry: Option<Duration>, effects: &mut Effects, log_key: &str) -> Verdict {
    crate::metrics::limit_exceeded(&limit.id);
    debug!(limit = %limit.id, key = log_key, action = limit.action.as_str(), "limit exceeded");
    effects.records.push((StageRecord::label("limit", &limit.id), hook.as_str(), limit.action.as_str()));
    match &limit.action {
        LimitAction::Tempfail | LimitAction::Reject => refusal(limit, hook, retry),
        LimitAction::Score(s) => {
            effects.score += s;
            Verdict::Continue
        }
        LimitAction::Tag(h) => {
            effects.headers.extend(h.iter().cloned());
            Verdict::Continue
        }
        LimitAction::Delay(d) => {
            tokio::time::sleep(*d).await;
            Verdict::Continue
        }
    }
}

/// Moves effects into the transaction.
fn apply(txn: &mut TxnContext, e: Effects) {
    txn.score += e.score;
    txn.add_headers.extend(e.headers);
    for (stage, phase, verdict) in e.records {
        txn.records.push(StageRecord { stage, phase, verdict, micros: 0 });
    }
}

mod hooks;

impl Stage for LimitsStage {
    fn name(&self) -> &'static str {
        "limits"
    }

    /// Limits count at MAIL, RCPT and the end of data, never on the header section.
    fn wants(&self, hook: TxnHook, _conn: &ConnInfo, _txn: &TxnContext) -> bool {
        hook != TxnHook::Headers
    }

    fn on_connect<'a>(&'a self, conn: &'a ConnInfo) -> HookFuture<'a> {
        Box::pin(self.connect(conn))
    }

    fn on_auth<'a>(&'a self, conn: &'a ConnInfo, auth: AuthEvent<'a>) -> HookFuture<'a> {
        Box::pin(self.auth(conn, auth))
    }

    fn on_mail<'a>(&'a self, conn: &'a ConnInfo, txn: &'a mut TxnContext, mail: &'a MailFrom) -> HookFuture<'a> {
        Box::pin(self.mail(conn, txn, mail))
    }

    fn on_rcpt<'a>(&'a self, conn: &'a ConnInfo, txn: &'a mut TxnContext, rcpt: &'a RcptTo) -> HookFuture<'a> {
        Box::pin(self.rcpt(conn, txn, rcpt))
    }

    fn on_rcpt_done<'a>(
        &'a self,
        conn: &'a ConnInfo,
        txn: &'a mut TxnContext,
        outcome: RcptOutcome<'a>,
    ) -> EventFuture<'a> {
        Box::pin(self.rcpt_done(conn, txn, outcome))
    }

    fn on_end_of_data<'a>(
        &'a self,
        conn: &'a ConnInfo,
        txn: &'a mut TxnContext,
        msg: &'a MessageView<'a>,
    ) -> HookFuture<'a> {
        Box::pin(self.end_of_data(conn, txn, msg.size))
    }

    fn on_txn_end<'a>(&'a self, _conn: &'a ConnInfo, txn: &'a mut TxnContext, _end: TxnEnd<'a>) -> EventFuture<'a> {
        // The transaction's leases go back now (they would with the context too, later).
        txn.ext.remove::<TxnLimits>();
        super::stage::nothing()
    }
}

/// Keeps the store's entry count in the `moat_state_entries` gauge (every 5 s, until `shutdown`).
pub fn spawn_size_gauge(store: SharedStore, shutdown: tokio_util::sync::CancellationToken) {
    if store.entries().is_none() {
        return;
    }
    tokio::spawn(async move {
        loop {
            if let Some(n) = store.entries() {
                crate::metrics::state_entries(n);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}

#[cfg(test)]
pub(crate) mod tests;
