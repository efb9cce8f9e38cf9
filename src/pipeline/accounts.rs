//! Compromised-account detection (`[accounts]` in moat.toml): for each authenticated user a compact
//! sending baseline ([`profile::Profile`]) in the shared store, updated at each message's end of data;
//! when the last hour breaks far out of it (with floors for new and quiet users), or a burst comes from a
//! network the user never used, the account is suspended.
//!
//! A suspension is one store key, `acct:s:<user>`, checked at MAIL: the user's mail gets `451 4.7.1`
//! (never a silent drop) until it expires (`suspend_for`) or an administrator lifts it with `moat user
//! resume NAME` (an authenticated POST to the metrics listener, [`Accounts::resume`]). Suspending writes a
//! `warn` log line with the numbers, counts `moat_account_suspensions_total` and adds an `accounts:suspended`
//! record to the message's audit record; the message that crossed the line is deferred too.
//!
//! The baseline (`acct:p:<user>`) is read and written once per message: two messages of one user ending at
//! the same instant may count as one (the estimate is not an invoice), which a Redis store can avoid with a
//! script. The store failing lets mail through (fail open).

pub mod profile;
pub mod resume;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::{
    ConnInfo, EventFuture, HookFuture, MessageView, RcptOutcome, Stage, StageRecord, TxnContext, TxnHook, Verdict,
};
use crate::config::AccountsConfig;
use crate::smtp::command::MailFrom;
use crate::smtp::Reply;
use crate::state::{SharedStore, StoreError};
use profile::{Breach, Profile};

/// How long a suspension lasts when `suspend_for` is 0 ("until resumed"): a store key needs a lifetime.
const UNTIL_RESUMED: Duration = Duration::from_secs(365 * 86_400);
/// Recipients remembered per transaction for the baseline (more count, but are not looked at).
const MAX_TXN_RCPTS: usize = 1000;

/// The detector: the stage, and the administrator's `resume`.
pub struct Accounts {
    store: SharedStore,
    cfg: AccountsConfig,
}

/// Recipients the upstream accepted in this transaction.
#[derive(Default)]
struct TxnRcpts {
    rcpts: Vec<String>,
    count: usize,
}

fn suspension_key(user: &str) -> String {
    format!("acct:s:{}", user.to_lowercase())
}

fn profile_key(user: &str) -> String {
    format!("acct:p:{}", user.to_lowercase())
}

fn suspended_reply() -> Reply {
    Reply::new(451, "4.7.1 account suspended for unusual sending, contact your administrator")
}

impl Accounts {
    pub fn new(store: SharedStore, cfg: &AccountsConfig) -> Accounts {
        Accounts { store, cfg: cfg.clone() }
    }

    /// Lifts a suspension (and forgets the current burst, so the next message does not suspend the account
    /// again at once). `Ok(false)`: the user was not suspended.
    pub async fn resume(&self, user: &str) -> Result<bool, StoreError> {
        let key = suspension_key(user);
        let was = self.store.get(&key).await?.is_some();
        self.store.delete(&key).await?;
        let pkey = profile_key(user);
        if let Some(mut p) = self.store.get(&pkey).await?.as_deref().and_then(Profile::decode) {
            p.forgive();
            self.store.set(&pkey, &p.encode(), self.cfg.keep_for.get()).await?;
        }
        if was {
            warn!(user = %user, "account resumed by an administrator");
        }
        Ok(was)
    }

    /// Counts one message of `user`; suspends the account when it breaks out of its baseline.
    async fn record(&self, conn: &ConnInfo, user: &str, rcpts: &[String]) -> Result<Option<Breach>, StoreError> {
        let now = self.store.clock().now_ms();
        let key = profile_key(user);
        let mut p =
            self.store.get(&key).await?.as_deref().and_then(Profile::decode).unwrap_or_else(|| Profile::new(now));
        let breach = p.record(now, conn.peer.ip(), rcpts, &self.cfg);
        self.store.set(&key, &p.encode(), self.cfg.keep_for.get()).await?;
        if let Some(b) = &breach {
            let ttl = if self.cfg.suspend_for.get().is_zero() { UNTIL_RESUMED } else { self.cfg.suspend_for.get() };
            self.store.set(&suspension_key(user), b.to_string().as_bytes(), ttl).await?;
            crate::metrics::account_suspended();
            warn!(user = %user, client.addr = %conn.peer.ip(), reason = %b, "account suspended: sending far out of its baseline");
        }
        Ok(breach)
    }
}

impl Stage for Accounts {
    fn name(&self) -> &'static str {
        "accounts"
    }

    /// Only authenticated mail is counted: MAIL and the end of data do nothing for the rest.
    fn wants(&self, hook: TxnHook, _conn: &ConnInfo, txn: &TxnContext) -> bool {
        matches!(hook, TxnHook::Mail | TxnHook::EndOfData) && txn.auth_user.is_some()
    }

    fn on_mail<'a>(&'a self, _conn: &'a ConnInfo, txn: &'a mut TxnContext, _mail: &'a MailFrom) -> HookFuture<'a> {
        Box::pin(async move {
            let Some(user) = txn.auth_user.as_deref() else { return Verdict::Continue };
            txn.ext.insert(TxnRcpts::default());
            match self.store.get(&suspension_key(user)).await {
                Ok(Some(_)) => {
                    debug!(user = %user, "mail from a suspended account deferred");
                    Verdict::Tempfail(suspended_reply())
                }
                Ok(None) => Verdict::Continue,
                Err(e) => {
                    debug!(error = %e, "state store failed; account check skipped");
                    Verdict::Continue
                }
            }
        })
    }

    fn on_rcpt_done<'a>(
        &'a self,
        _conn: &'a ConnInfo,
        txn: &'a mut TxnContext,
        outcome: RcptOutcome<'a>,
    ) -> EventFuture<'a> {
        if let (true, Some(t)) = (outcome.reply.is_positive(), txn.ext.get_mut::<TxnRcpts>()) {
            t.count += 1;
            if t.rcpts.len() < MAX_TXN_RCPTS {
                t.rcpts.push(outcome.rcpt.address.clone());
            }
        }
        super::stage::nothing()
    }

    fn on_end_of_data<'a>(
        &'a self,
        conn: &'a ConnInfo,
        txn: &'a mut TxnContext,
        _msg: &'a MessageView<'a>,
    ) -> HookFuture<'a> {
        Box::pin(async move {
            let Some(user) = txn.auth_user.clone() else { return Verdict::Continue };
            let rcpts = txn.ext.remove::<TxnRcpts>().unwrap_or_default();
            match self.record(conn, &user, &rcpts.rcpts).await {
                Ok(Some(_)) => {
                    txn.records.push(StageRecord {
                        stage: "accounts:suspended",
                        phase: "data",
                        verdict: "tempfail",
                        micros: 0,
                    });
                    Verdict::Tempfail(suspended_reply())
                }
                Ok(None) => Verdict::Continue,
                Err(e) => {
                    debug!(error = %e, "state store failed; account baseline not updated");
                    Verdict::Continue
                }
            }
        })
    }
}

/// What the metrics listener's admin endpoint may ask of the running server.
pub trait Admin: Send + Sync {
    /// Lifts the suspension of `user`: `Ok(true)` when there was one.
    fn resume<'a>(&'a self, user: &'a str) -> Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;
}

impl Admin for Accounts {
    fn resume<'a>(&'a self, user: &'a str) -> Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>> {
        Box::pin(async move { Accounts::resume(self, user).await.map_err(|e| e.to_string()) })
    }
}

/// A shared handle for the metrics listener.
pub type SharedAdmin = Arc<dyn Admin>;

#[cfg(test)]
mod tests;
