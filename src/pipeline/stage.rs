//! The [`Stage`] trait: one check, with a hook per phase of a connection.
//!
//! Every hook has a default that does nothing, so a stage implements the phases it cares about. Hooks
//! that give a [`Verdict`] run in stage order and the first decisive verdict ends the phase; events
//! ([`Stage::on_helo`], [`Stage::on_rcpt_done`], [`Stage::on_txn_end`]) reach every stage. Each hook runs
//! under the stage's [`Stage::deadline`]; past it the runner records `timeout` and applies
//! [`Stage::on_deadline`] (fail open by default). Per-connection state goes in [`ConnInfo::ext`],
//! per-transaction state in [`TxnContext::ext`]; the stage itself holds only what all connections share.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::{AuthEvent, ConnInfo, MessageView, RcptOutcome, TxnContext, TxnEnd, Verdict};
use crate::smtp::command::{MailFrom, RcptTo};

/// A boxed future returned by verdict hooks (trait objects cannot have `async fn` yet).
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;
/// A boxed future returned by event hooks.
pub type EventFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A verdict future that continues at once.
pub fn proceed<'a>() -> HookFuture<'a> {
    Box::pin(std::future::ready(Verdict::Continue))
}

/// An event future that does nothing.
pub fn nothing<'a>() -> EventFuture<'a> {
    Box::pin(std::future::ready(()))
}

/// A verdict hook of a transaction, for [`Stage::wants`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnHook {
    /// [`Stage::on_mail`].
    Mail,
    /// [`Stage::on_rcpt`].
    Rcpt,
    /// [`Stage::on_headers`].
    Headers,
    /// [`Stage::on_end_of_data`].
    EndOfData,
}

/// One check in the pipeline.
pub trait Stage: Send + Sync {
    /// A short, stable name (metrics label, audit).
    fn name(&self) -> &'static str;

    /// How long one hook may take; `None`: no bound of its own (the session's timeouts still apply).
    fn deadline(&self) -> Option<Duration> {
        None
    }

    /// The verdict when a hook overran [`Stage::deadline`] (`phase` is the audit phase name). Continues
    /// (fail open) unless the stage says otherwise.
    fn on_deadline(&self, _phase: &'static str) -> Verdict {
        Verdict::Continue
    }

    /// Whether the verdict hook `hook` has anything to do for this transaction. When `false` the runner does
    /// not call it: it records the stage as having continued at once (verdict `continue`, 0 µs, a zero sample
    /// in `moat_stage_seconds`), which saves building and bounding a future that would do nothing. So answer
    /// `false` only where the hook would return [`Verdict::Continue`] at once without any effect. All hooks
    /// by default.
    fn wants(&self, _hook: TxnHook, _conn: &ConnInfo, _txn: &TxnContext) -> bool {
        true
    }

    /// After accept (and the PROXY header, and implicit TLS), before the greeting. A refusal becomes the
    /// banner (`554`, or `421` for a temporary one) and the connection closes.
    fn on_connect<'a>(&'a self, _conn: &'a ConnInfo) -> HookFuture<'a> {
        proceed()
    }

    /// After a successful EHLO/HELO with a new name: an event, for stages that start lookups on the name.
    fn on_helo<'a>(&'a self, _conn: &'a ConnInfo, _helo: &'a str) -> EventFuture<'a> {
        nothing()
    }

    /// After AUTH credentials were checked (a success or a wrong password; not a lockout). After a
    /// success, a refusal replaces the `235` and the session stays unauthenticated.
    fn on_auth<'a>(&'a self, _conn: &'a ConnInfo, _auth: AuthEvent<'a>) -> HookFuture<'a> {
        proceed()
    }

    /// On MAIL FROM, before the upstream sees it. A refusal is the reply to MAIL.
    fn on_mail<'a>(&'a self, _conn: &'a ConnInfo, _txn: &'a mut TxnContext, _mail: &'a MailFrom) -> HookFuture<'a> {
        proceed()
    }

    /// On RCPT TO, before the upstream sees it. A refusal is the reply to that RCPT.
    fn on_rcpt<'a>(&'a self, _conn: &'a ConnInfo, _txn: &'a mut TxnContext, _rcpt: &'a RcptTo) -> HookFuture<'a> {
        proceed()
    }

    /// After a RCPT got its final reply (from a stage or from the upstream): an event, for stages that
    /// count refused recipients. When the client pipelined several RCPTs, `on_rcpt` runs for each of a
    /// group before the group goes upstream, and the group's `on_rcpt_done` events follow in order.
    fn on_rcpt_done<'a>(
        &'a self,
        _conn: &'a ConnInfo,
        _txn: &'a mut TxnContext,
        _outcome: RcptOutcome<'a>,
    ) -> EventFuture<'a> {
        nothing()
    }

    /// When the header section is complete during DATA/BDAT (its empty line arrived), with the section
    /// (canonical CRLF, at most 64 KiB; a longer section never comes here and is judged at end of data).
    /// A refusal or [`Verdict::Discard`] is final: moat stops spooling, reads on to the end of the data,
    /// and answers then (the upstream never sees the message); other effects carry into end of data.
    fn on_headers<'a>(&'a self, _conn: &'a ConnInfo, _txn: &'a mut TxnContext, _head: &'a [u8]) -> HookFuture<'a> {
        proceed()
    }

    /// At the end of data, before anything goes upstream, with the message (its header section, and its
    /// first [`Stage::scan_window`] bytes when a stage asked). A refusal is the reply to the end of data;
    /// [`Verdict::Discard`] answers `250` without relaying.
    fn on_end_of_data<'a>(
        &'a self,
        _conn: &'a ConnInfo,
        _txn: &'a mut TxnContext,
        _msg: &'a MessageView<'a>,
    ) -> HookFuture<'a> {
        proceed()
    }

    /// When a transaction ended (relayed, refused, discarded or abandoned): an event, for stages that
    /// count messages and bytes.
    fn on_txn_end<'a>(&'a self, _conn: &'a ConnInfo, _txn: &'a mut TxnContext, _end: TxnEnd<'a>) -> EventFuture<'a> {
        nothing()
    }

    /// How many bytes of the message this stage wants to read at end of data for this transaction; `None`:
    /// the header section is enough.
    fn scan_window(&self, _txn: &TxnContext) -> Option<u64> {
        None
    }
}
