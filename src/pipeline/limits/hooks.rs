//! The limits stage's hooks, one per place a count is taken (see the parent module).

use std::sync::{Arc, PoisonError};

use super::{applies, apply, exceeded, facts, key, store_failed, ConnLimits, Effects, KeyValues, LimitsStage};
use super::{TxnLimits, Verdict};
use crate::pipeline::{AuthEvent, ConnInfo, RcptOutcome, TxnContext};
use crate::rules::limits::{Counted, Hook, Limit};
use crate::smtp::command::{MailFrom, RcptTo};

/// The limits counted at `hook`.
fn at(set: &crate::rules::RuleSet, hook: Hook) -> impl Iterator<Item = &Limit> {
    set.limits.iter().filter(move |l| l.counted.hook() == hook)
}

impl LimitsStage {
    pub(super) async fn connect(&self, conn: &ConnInfo) -> Verdict {
        let set = self.rules.snapshot();
        let mut state = ConnLimits { set: Some(set.clone()), ..ConnLimits::default() };
        let mut effects = Effects::default();
        let v = KeyValues::default();
        let f = facts(conn, v, &[], 0);
        let mut verdict = Verdict::Continue;
        for limit in set.limits.iter() {
            let connect_known = limit.counted.hook() == Hook::Connect
                || (limit.counted == Counted::AuthFailures && key(limit, conn, v).is_some());
            if !connect_known || !applies(&set, limit, conn, &f) {
                continue;
            }
            let Some(k) = key(limit, conn, v) else { continue };
            let over = match limit.counted {
                Counted::ConcurrentConnections => match self.lease(limit, k.clone(), &conn.id).await {
                    Ok(Some(lease)) => {
                        state.leases.push(lease);
                        None
                    }
                    Ok(None) => Some(None),
                    Err(e) => {
                        store_failed(limit, &e);
                        None
                    }
                },
                // An address that failed AUTH too often is refused at once, as a lockout would.
                Counted::AuthFailures => match self.blocked(&k).await {
                    Ok(b) => b.then_some(None),
                    Err(e) => {
                        store_failed(limit, &e);
                        None
                    }
                },
                _ => self.take(limit, &k, 1).await.unwrap_or_else(|e| {
                    store_failed(limit, &e);
                    None
                }),
            };
            if let Some(retry) = over {
                verdict = exceeded(limit, Hook::Connect, retry, &mut effects, &k).await;
                if verdict.refusal().is_some() {
                    break;
                }
            }
        }
        state.effects = std::sync::Mutex::new(effects);
        conn.ext.insert(state);
        verdict
    }

    pub(super) async fn auth(&self, conn: &ConnInfo, auth: AuthEvent<'_>) -> Verdict {
        let Some(state) = conn.ext.get::<ConnLimits>() else { return Verdict::Continue };
        let Some(set) = state.set.clone() else { return Verdict::Continue };
        let v = KeyValues { user: Some(auth.login), ..KeyValues::default() };
        let f = facts(conn, v, &[], 0);
        let mut effects = Effects::default();
        let mut verdict = Verdict::Continue;
        for limit in at(&set, Hook::Auth) {
            if !applies(&set, limit, conn, &f) {
                continue;
            }
            let Some(k) = key(limit, conn, v) else { continue };
            let over = if auth.success { self.blocked(&k).await } else { self.fail(limit, &k).await };
            match over {
                Ok(true) => {
                    verdict = exceeded(limit, Hook::Auth, None, &mut effects, &k).await;
                    if verdict.refusal().is_some() {
                        break;
                    }
                }
                Ok(false) => {}
                Err(e) => store_failed(limit, &e),
            }
        }
        let mut e = state.effects.lock().unwrap_or_else(PoisonError::into_inner);
        e.score += effects.score;
        e.headers.extend(effects.headers);
        e.records.extend(effects.records);
        verdict
    }

    pub(super) async fn mail(&self, conn: &ConnInfo, txn: &mut TxnContext, mail: &MailFrom) -> Verdict {
        let set = self.rules.snapshot();
        if let Some(state) = conn.ext.get::<ConnLimits>() {
            // Connect and AUTH effects count in every transaction of the connection.
            let e = state.effects.lock().unwrap_or_else(PoisonError::into_inner).clone();
            apply(txn, e);
        }
        let v = KeyValues {
            helo: txn.helo.as_deref(),
            user: txn.auth_user.as_deref(),
            sender: Some(&mail.address),
            rcpt: None,
        };
        let mut leases = Vec::new();
        let mut effects = Effects::default();
        let mut verdict = Verdict::Continue;
        {
            let f = facts(conn, v, &[], 0);
            for limit in at(&set, Hook::Mail) {
                if !applies(&set, limit, conn, &f) {
                    continue;
                }
                let Some(k) = key(limit, conn, v) else { continue };
                let over = if limit.counted == Counted::ConcurrentTransactions {
                    match self.lease(limit, k.clone(), &txn.id).await {
                        Ok(Some(l)) => {
                            leases.push(l);
                            None
                        }
                        Ok(None) => Some(None),
                        Err(e) => {
                            store_failed(limit, &e);
                            None
                        }
                    }
                } else {
                    self.take(limit, &k, 1).await.unwrap_or_else(|e| {
                        store_failed(limit, &e);
                        None
                    })
                };
                if let Some(retry) = over {
                    verdict = exceeded(limit, Hook::Mail, retry, &mut effects, &k).await;
                    if verdict.refusal().is_some() {
                        break;
                    }
                }
            }
        }
        apply(txn, effects);
        txn.ext.insert(TxnLimits { set: Arc::clone(&set), _leases: leases, rcpt_blocked: false });
        verdict
    }

    pub(super) async fn rcpt(&self, conn: &ConnInfo, txn: &mut TxnContext, rcpt: &RcptTo) -> Verdict {
        let Some(set) = txn.ext.get::<TxnLimits>().map(|t| t.set.clone()) else { return Verdict::Continue };
        let sender = txn.mail_from.clone();
        let v = KeyValues {
            helo: txn.helo.as_deref(),
            user: txn.auth_user.as_deref(),
            sender: Some(&sender),
            rcpt: Some(&rcpt.address),
        };
        let one = [rcpt.address.clone()];
        let f = facts(conn, v, &one, 0);
        let mut effects = Effects::default();
        let mut verdict = Verdict::Continue;
        let mut blocked = false;
        for limit in at(&set, Hook::Rcpt) {
            if !applies(&set, limit, conn, &f) {
                continue;
            }
            let Some(k) = key(limit, conn, v) else { continue };
            let over = if limit.counted == Counted::RefusedRecipients {
                match self.blocked(&k).await {
                    Ok(b) => {
                        blocked |= b;
                        b.then_some(None)
                    }
                    Err(e) => {
                        store_failed(limit, &e);
                        None
                    }
                }
            } else {
                self.take(limit, &k, 1).await.unwrap_or_else(|e| {
                    store_failed(limit, &e);
                    None
                })
            };
            if let Some(retry) = over {
                verdict = exceeded(limit, Hook::Rcpt, retry, &mut effects, &k).await;
                if verdict.refusal().is_some() {
                    break;
                }
            }
        }
        apply(txn, effects);
        if let Some(t) = txn.ext.get_mut::<TxnLimits>() {
            t.rcpt_blocked = blocked && verdict.refusal().is_some();
        }
        verdict
    }

    pub(super) async fn rcpt_done(&self, conn: &ConnInfo, txn: &mut TxnContext, outcome: RcptOutcome<'_>) {
        let Some(t) = txn.ext.get_mut::<TxnLimits>() else { return };
        let set = t.set.clone();
        let ours = std::mem::take(&mut t.rcpt_blocked);
        // Only permanent refusals ("no such user"): deferrals (greylisting, other limits) are no harvest.
        if !outcome.reply.is_permanent() || ours {
            return;
        }
        let sender = txn.mail_from.clone();
        let v = KeyValues {
            helo: txn.helo.as_deref(),
            user: txn.auth_user.as_deref(),
            sender: Some(&sender),
            rcpt: Some(&outcome.rcpt.address),
        };
        let one = [outcome.rcpt.address.clone()];
        let f = facts(conn, v, &one, 0);
        let mut effects = Effects::default();
        for limit in at(&set, Hook::Rcpt).filter(|l| l.counted == Counted::RefusedRecipients) {
            if !applies(&set, limit, conn, &f) {
                continue;
            }
            let Some(k) = key(limit, conn, v) else { continue };
            match self.fail(limit, &k).await {
                // The refusal itself comes with the next RCPT; score and tag effects apply now.
                Ok(true) => {
                    let _ = exceeded(limit, Hook::Rcpt, None, &mut effects, &k).await;
                }
                Ok(false) => {}
                Err(e) => store_failed(limit, &e),
            }
        }
        apply(txn, effects);
    }

    pub(super) async fn end_of_data(&self, conn: &ConnInfo, txn: &mut TxnContext, size: u64) -> Verdict {
        let Some(set) = txn.ext.get::<TxnLimits>().map(|t| t.set.clone()) else { return Verdict::Continue };
        let sender = txn.mail_from.clone();
        let v =
            KeyValues { helo: txn.helo.as_deref(), user: txn.auth_user.as_deref(), sender: Some(&sender), rcpt: None };
        let f = facts(conn, v, &[], size);
        let mut effects = Effects::default();
        let mut verdict = Verdict::Continue;
        for limit in at(&set, Hook::Data) {
            if !applies(&set, limit, conn, &f) {
                continue;
            }
            let Some(k) = key(limit, conn, v) else { continue };
            let cost = u32::try_from(size).unwrap_or(u32::MAX).max(1);
            let over = self.take(limit, &k, cost).await.unwrap_or_else(|e| {
                store_failed(limit, &e);
                None
            });
            if let Some(retry) = over {
                verdict = exceeded(limit, Hook::Data, retry, &mut effects, &k).await;
                if verdict.refusal().is_some() {
                    break;
                }
            }
        }
        apply(txn, effects);
        verdict
    }
}
