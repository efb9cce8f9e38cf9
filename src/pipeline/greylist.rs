//! Greylisting: the `[greylist]` table of the rule files (`rules::limits::Greylist`), applied at RCPT.
//!
//! The triplet is the client network (`net_v4`/`net_v6` prefix, so a sender's pool of outbound servers
//! retrying from another address of the same network still matches), the envelope sender and the
//! recipient. Its first attempt gets `451 4.7.1` saying when to retry; a retry after `delay` and before
//! `expire` passes, and the triplet then passes at once for `pass_for`. A network whose triplets passed
//! `auto_allow_after` times within `auto_allow_for` is allowed outright for `auto_allow_for` (as postgrey's
//! auto-whitelisting of clients). Never applied to authenticated sessions, to transactions an `accept`
//! rule allowed, or where `unless` holds; with `when` or `min_score`, only to doubtful clients.
//!
//! Store keys (one call per key and RCPT; a first attempt or a pass writes once more):
//! `gl:a:<net>` (auto-allowed), `gl:n:<net>` (passes), `gl:t:<net>|<sender>|<rcpt>` (the triplet: the
//! first attempt's time in ms, or `p` once passed). The store failing lets the mail through (fail open).

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::{ConnInfo, HookFuture, Stage, TxnContext, TxnHook, Verdict};
use crate::metrics::GreylistResult;
use crate::rules::eval::Facts;
use crate::rules::limits::{network, Greylist};
use crate::rules::{RuleSet, Rules};
use crate::smtp::command::RcptTo;
use crate::smtp::Reply;
use crate::state::{SharedStore, StoreError};

/// The stage.
pub struct GreylistStage {
    rules: Arc<Rules>,
    store: SharedStore,
}

impl GreylistStage {
    pub fn new(rules: Arc<Rules>, store: SharedStore) -> GreylistStage {
        GreylistStage { rules, store }
    }
}

/// The value of a passed triplet.
const PASSED: &[u8] = b"p";

fn deferred(wait: Duration) -> Verdict {
    crate::metrics::greylist(GreylistResult::Deferred);
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    Verdict::Tempfail(Reply::new(451, format!("4.7.1 greylisted, try again in {secs} s")))
}

/// Whether greylisting applies to this recipient.
fn applies(set: &RuleSet, g: &Greylist, conn: &ConnInfo, txn: &TxnContext, rcpt: &str) -> bool {
    if txn.auth_user.is_some() || txn.rules.as_ref().is_some_and(|r| r.accepted) {
        return false;
    }
    if g.role.is_some_and(|r| r != conn.role) || g.min_score.is_some_and(|m| txn.score < m) {
        return false;
    }
    let one = [rcpt.to_string()];
    let facts = Facts {
        ip: conn.peer.ip(),
        client_name: conn.name.as_deref(),
        listener: &conn.listener,
        helo: txn.helo.as_deref(),
        auth_user: None,
        mail_from: Some(&txn.mail_from),
        rcpts: &one,
        size: 0,
        content: None,
        auth: None,
    };
    g.when.as_ref().is_none_or(|c| set.holds(c, &facts)) && !g.unless.as_ref().is_some_and(|c| set.holds(c, &facts))
}

impl GreylistStage {
    async fn check(&self, g: &Greylist, conn: &ConnInfo, sender: &str, rcpt: &str) -> Result<Verdict, StoreError> {
        let net = network(conn.peer.ip(), g.net_v4, g.net_v6);
        if self.store.get(&format!("gl:a:{net}")).await?.is_some() {
            crate::metrics::greylist(GreylistResult::AutoAllowed);
            return Ok(Verdict::Continue);
        }
        let sender = if sender.is_empty() { "<>".to_string() } else { sender.to_lowercase() };
        let key = format!("gl:t:{net}|{sender}|{}", rcpt.to_lowercase());
        let now = self.store.clock().now_ms();
        let first = match self.store.get(&key).await? {
            Some(v) if v == PASSED => return Ok(Verdict::Continue),
            Some(v) => std::str::from_utf8(&v).ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(now),
            None => {
                self.store.insert_new(&key, now.to_string().as_bytes(), g.expire).await?;
                debug!(net = %net, "greylisted a new triplet");
                return Ok(deferred(g.delay));
            }
        };
        let ready = first.saturating_add(g.delay.as_millis() as u64);
        if now < ready {
            return Ok(deferred(Duration::from_millis(ready - now)));
        }
        self.store.set(&key, PASSED, g.pass_for).await?;
        crate::metrics::greylist(GreylistResult::Passed);
        if g.auto_allow_after > 0 {
            let passes = self.store.incr(&format!("gl:n:{net}"), 1, g.auto_allow_for).await?;
            if passes >= i64::from(g.auto_allow_after) {
                self.store.set(&format!("gl:a:{net}"), b"1", g.auto_allow_for).await?;
                debug!(net = %net, passes, "client network auto-allowed past greylisting");
            }
        }
        Ok(Verdict::Continue)
    }
}

impl Stage for GreylistStage {
    fn name(&self) -> &'static str {
        "greylist"
    }

    fn wants(&self, hook: TxnHook, _conn: &ConnInfo, _txn: &TxnContext) -> bool {
        hook == TxnHook::Rcpt
    }

    fn on_rcpt<'a>(&'a self, conn: &'a ConnInfo, txn: &'a mut TxnContext, rcpt: &'a RcptTo) -> HookFuture<'a> {
        Box::pin(async move {
            // The transaction's snapshot (taken by the rules stage at MAIL), else the current one.
            let set = txn.rules.as_ref().map_or_else(|| self.rules.snapshot(), |r| r.set.clone());
            let Some(g) = &set.greylist else { return Verdict::Continue };
            if !applies(&set, g, conn, txn, &rcpt.address) {
                return Verdict::Continue;
            }
            match self.check(g, conn, &txn.mail_from, &rcpt.address).await {
                Ok(v) => v,
                Err(e) => {
                    debug!(error = %e, "state store failed; greylisting skipped");
                    Verdict::Continue
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Role;
    use crate::pipeline::limits::tests::conn;
    use crate::state::memory::MemoryStore;
    use crate::state::ManualClock;

    fn rcpt(a: &str) -> RcptTo {
        RcptTo { address: a.into(), dsn: Vec::new() }
    }

    #[tokio::test]
    async fn first_attempt_waits_retry_passes_network_is_auto_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[greylist]\nrole = \"mx\"\ndelay = \"1m\"\nauto_allow_after = 2\nunless = { client_ip = [\"10.0.0.0/8\"] }\n";
        std::fs::write(dir.path().join("g.toml"), text).unwrap();
        let rules = Arc::new(Rules::load(dir.path(), &[]).unwrap());
        let clock = ManualClock::at(1_000_000);
        let stage = GreylistStage::new(rules, Arc::new(MemoryStore::new(10_000, clock.clone())));
        let c = conn("192.0.2.10", Role::Mx);
        let mut txn = TxnContext { mail_from: "s@sender.example".into(), ..TxnContext::default() };
        let code = |v: Verdict| v.refusal().map_or(250, |r| r.code);
        let v = stage.on_rcpt(&c, &mut txn, &rcpt("a@example.test")).await;
        assert_eq!(v.refusal().map(ToString::to_string).as_deref(), Some("451 4.7.1 greylisted, try again in 60 s"));
        clock.advance(Duration::from_secs(30));
        // Too early; another address of the same /24 is the same client network.
        let c2 = conn("192.0.2.99", Role::Mx);
        assert_eq!(code(stage.on_rcpt(&c2, &mut txn, &rcpt("a@example.test")).await), 451);
        clock.advance(Duration::from_secs(31));
        assert_eq!(code(stage.on_rcpt(&c2, &mut txn, &rcpt("a@example.test")).await), 250);
        assert_eq!(code(stage.on_rcpt(&c, &mut txn, &rcpt("a@example.test")).await), 250, "a passed triplet passes");
        // Exempt: another role, an authenticated session, an `unless` address.
        assert_eq!(
            code(stage.on_rcpt(&conn("192.0.2.10", Role::Submission), &mut txn, &rcpt("n@example.test")).await),
            250
        );
        assert_eq!(code(stage.on_rcpt(&conn("10.1.2.3", Role::Mx), &mut txn, &rcpt("n@example.test")).await), 250);
        let mut authed = TxnContext { auth_user: Some("u".into()), ..TxnContext::default() };
        assert_eq!(code(stage.on_rcpt(&c, &mut authed, &rcpt("n@example.test")).await), 250);
        // A second pass auto-allows the network: new triplets pass at once.
        assert_eq!(code(stage.on_rcpt(&c, &mut txn, &rcpt("b@example.test")).await), 451);
        clock.advance(Duration::from_secs(61));
        assert_eq!(code(stage.on_rcpt(&c, &mut txn, &rcpt("b@example.test")).await), 250);
        assert_eq!(code(stage.on_rcpt(&c, &mut txn, &rcpt("c@example.test")).await), 250);
        // A triplet not retried before it expires starts again.
        let other = conn("198.51.100.1", Role::Mx);
        assert_eq!(code(stage.on_rcpt(&other, &mut txn, &rcpt("d@example.test")).await), 451);
        clock.advance(Duration::from_secs(5 * 3600));
        assert_eq!(code(stage.on_rcpt(&other, &mut txn, &rcpt("d@example.test")).await), 451);
    }

    #[tokio::test]
    async fn min_score_greylists_only_doubtful_transactions() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("g.toml"), "[greylist]\nmin_score = 3.0\n").unwrap();
        let rules = Arc::new(Rules::load(dir.path(), &[]).unwrap());
        let clock = ManualClock::at(1_000_000);
        let stage = GreylistStage::new(rules, Arc::new(MemoryStore::new(10_000, clock)));
        let c = conn("192.0.2.10", Role::Mx);
        let mut clean = TxnContext { mail_from: "s@sender.example".into(), score: 1.0, ..TxnContext::default() };
        assert_eq!(stage.on_rcpt(&c, &mut clean, &rcpt("a@example.test")).await, Verdict::Continue);
        let mut doubtful = TxnContext { mail_from: "s@sender.example".into(), score: 3.5, ..TxnContext::default() };
        assert!(stage.on_rcpt(&c, &mut doubtful, &rcpt("a@example.test")).await.refusal().is_some());
    }
}
