//! The filtering pipeline: stages that give a [`Verdict`] at each phase of a connection.
//!
//! Stages run in order; the first decisive verdict (accept, reject, tempfail) ends the phase. Each stage's
//! verdict and time are recorded in the transaction's [`StageRecord`]s for the audit trail. Per-transaction
//! state lives in [`TxnContext`], owned by the session, never in a stage. The one stage today is [`rules`]
//! (the rule files, their lists and content conditions); other checks plug in as further stages.
//!
//! The phases of a message: MAIL, each RCPT (whose effects are undone when that recipient ends up refused,
//! see [`TxnContext::mark`]), the end of the header section during DATA/BDAT ([`Stage::on_headers`]: a
//! refusal there stops spooling), and the end of data ([`Stage::on_end_of_data`]). [`subject`] rewrites the
//! Subject of a relayed message when a verdict asked for a prefix.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::Reply;

pub mod rules;
pub mod subject;

/// A boxed future returned by stage hooks (trait objects cannot have `async fn` yet).
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

/// What a stage decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No opinion; the next stage runs.
    Continue,
    /// Accept: later stages of this phase are skipped.
    Accept,
    /// Refuse permanently with this `5xx` reply.
    Reject(Reply),
    /// Refuse for now with this `4xx` reply.
    Tempfail(Reply),
    /// At end of data: answer `250` but do not relay (audited as "discarded").
    Discard,
}

impl Verdict {
    /// A stable label for metrics and audit.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Continue => "continue",
            Verdict::Accept => "accept",
            Verdict::Reject(_) => "reject",
            Verdict::Tempfail(_) => "tempfail",
            Verdict::Discard => "discard",
        }
    }

    /// The refusal reply, if this verdict refuses.
    pub fn refusal(&self) -> Option<&Reply> {
        match self {
            Verdict::Reject(r) | Verdict::Tempfail(r) => Some(r),
            _ => None,
        }
    }
}

/// The connection facts every stage may read.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub name: Option<String>,
}

/// One stage's verdict and duration, for the audit record.
#[derive(Clone, Debug)]
pub struct StageRecord {
    pub stage: &'static str,
    pub phase: &'static str,
    pub verdict: &'static str,
    pub micros: u64,
}

/// Per-transaction state owned by the session.
#[derive(Debug, Default)]
pub struct TxnContext {
    /// Verdicts so far, in order.
    pub records: Vec<StageRecord>,
    /// Header lines (canonical CRLF) that accepted verdicts ask to add to the message.
    pub add_headers: Vec<String>,
    /// The prefix a verdict asked for on the relayed message's Subject (the first one asked wins).
    pub subject_prefix: Option<String>,
    /// The HELO/EHLO name when MAIL was given.
    pub helo: Option<String>,
    /// The authenticated user when MAIL was given.
    pub auth_user: Option<String>,
    /// The rules stage's state: the one rule-set snapshot this transaction is judged by, and its score.
    pub rules: Option<rules::TxnRules>,
}

/// Where a transaction's effects stood before a RCPT ran through the pipeline, to undo them when that
/// recipient ends up refused (by a stage or by the upstream): a refused recipient adds no header, score or
/// flag to the message. The audit records of the hits stay.
#[derive(Clone, Debug)]
pub struct TxnMark {
    add_headers: usize,
    subject_prefix: bool,
    rules: Option<rules::RulesMark>,
}

impl TxnContext {
    /// The current state of the effects, for [`TxnContext::rollback`].
    pub fn mark(&self) -> TxnMark {
        TxnMark {
            add_headers: self.add_headers.len(),
            subject_prefix: self.subject_prefix.is_some(),
            rules: self.rules.as_ref().map(rules::TxnRules::mark),
        }
    }

    /// Undoes every effect since `mark` (effects only ever accumulate, so truncating is enough).
    pub fn rollback(&mut self, mark: TxnMark) {
        self.add_headers.truncate(mark.add_headers);
        if !mark.subject_prefix {
            self.subject_prefix = None;
        }
        if let (Some(state), Some(m)) = (self.rules.as_mut(), mark.rules) {
            state.rollback(m);
        }
    }
}

/// The message at end of data, as far as it is held for the stages.
#[derive(Clone, Debug)]
pub struct MessageView<'a> {
    /// The header section (canonical CRLF, up to 64 KiB).
    pub head: &'a [u8],
    /// The message from its start, up to the largest [`Stage::scan_window`]; `None` when no stage asked.
    /// Shared, so a stage can hand it to a blocking task without copying it.
    pub data: Option<bytes::Bytes>,
    /// The whole message's size; larger than `data` when the message exceeds the window.
    pub size: u64,
}

/// One check in the pipeline. Every hook has a default that continues.
pub trait Stage: Send + Sync {
    /// A short, stable name (metrics label).
    fn name(&self) -> &'static str;

    /// After accept, before the greeting. A refusal becomes the `554` banner and the connection closes.
    fn on_connect<'a>(&'a self, _conn: &'a ConnInfo) -> HookFuture<'a> {
        Box::pin(async { Verdict::Continue })
    }

    /// On MAIL FROM, before the upstream sees it. A refusal is the reply to MAIL.
    fn on_mail<'a>(&'a self, _conn: &'a ConnInfo, _txn: &'a mut TxnContext, _mail: &'a MailFrom) -> HookFuture<'a> {
        Box::pin(async { Verdict::Continue })
    }

    /// On RCPT TO, before the upstream sees it. A refusal is the reply to that RCPT.
    fn on_rcpt<'a>(&'a self, _conn: &'a ConnInfo, _txn: &'a mut TxnContext, _rcpt: &'a RcptTo) -> HookFuture<'a> {
        Box::pin(async { Verdict::Continue })
    }

    /// When the header section is complete during DATA/BDAT (its empty line arrived), with the section
    /// (canonical CRLF, at most 64 KiB; a longer section never comes here and is judged at end of data).
    /// A refusal or [`Verdict::Discard`] is final: moat stops spooling, reads on to the end of the data,
    /// and answers then (the upstream never sees the message); other effects carry into end of data.
    fn on_headers<'a>(&'a self, _conn: &'a ConnInfo, _txn: &'a mut TxnContext, _head: &'a [u8]) -> HookFuture<'a> {
        Box::pin(async { Verdict::Continue })
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
        Box::pin(async { Verdict::Continue })
    }

    /// How many bytes of the message this stage wants to read at end of data for this transaction; `None`:
    /// the header section is enough.
    fn scan_window(&self, _txn: &TxnContext) -> Option<u64> {
        None
    }
}

/// The ordered list of stages.
#[derive(Clone, Default)]
pub struct Pipeline {
    stages: Vec<Arc<dyn Stage>>,
}

impl Pipeline {
    /// A pipeline of these stages, in order.
    pub fn new(stages: Vec<Arc<dyn Stage>>) -> Pipeline {
        Pipeline { stages }
    }

    /// Runs `on_connect` of every stage.
    pub async fn connect(&self, conn: &ConnInfo) -> Verdict {
        for s in &self.stages {
            let v = s.on_connect(conn).await;
            if v != Verdict::Continue {
                return v;
            }
        }
        Verdict::Continue
    }

    /// Runs `on_mail`.
    pub async fn mail(&self, conn: &ConnInfo, txn: &mut TxnContext, mail: &MailFrom) -> Verdict {
        self.run(conn, txn, Hook::Mail(mail)).await
    }

    /// Runs `on_rcpt`.
    pub async fn rcpt(&self, conn: &ConnInfo, txn: &mut TxnContext, rcpt: &RcptTo) -> Verdict {
        self.run(conn, txn, Hook::Rcpt(rcpt)).await
    }

    /// Runs `on_headers`.
    pub async fn headers(&self, conn: &ConnInfo, txn: &mut TxnContext, head: &[u8]) -> Verdict {
        self.run(conn, txn, Hook::Headers(head)).await
    }

    /// Runs `on_end_of_data`.
    pub async fn end_of_data(&self, conn: &ConnInfo, txn: &mut TxnContext, msg: &MessageView<'_>) -> Verdict {
        self.run(conn, txn, Hook::EndOfData(msg)).await
    }

    /// The largest scan window any stage asked for this transaction.
    pub fn scan_window(&self, txn: &TxnContext) -> Option<u64> {
        self.stages.iter().filter_map(|s| s.scan_window(txn)).max()
    }

    async fn run(&self, conn: &ConnInfo, txn: &mut TxnContext, hook: Hook<'_>) -> Verdict {
        for s in &self.stages {
            let start = Instant::now();
            let v = match hook {
                Hook::Mail(m) => s.on_mail(conn, txn, m).await,
                Hook::Rcpt(r) => s.on_rcpt(conn, txn, r).await,
                Hook::Headers(h) => s.on_headers(conn, txn, h).await,
                Hook::EndOfData(h) => s.on_end_of_data(conn, txn, h).await,
            };
            crate::metrics::stage_seconds(s.name(), start.elapsed());
            txn.records.push(StageRecord {
                stage: s.name(),
                phase: hook.phase(),
                verdict: v.as_str(),
                micros: start.elapsed().as_micros() as u64,
            });
            if v != Verdict::Continue {
                return v;
            }
        }
        Verdict::Continue
    }
}

/// Which hook a pipeline run calls, with its argument.
#[derive(Clone, Copy)]
enum Hook<'a> {
    Mail(&'a MailFrom),
    Rcpt(&'a RcptTo),
    Headers(&'a [u8]),
    EndOfData(&'a MessageView<'a>),
}

impl Hook<'_> {
    fn phase(&self) -> &'static str {
        match self {
            Hook::Mail(_) => "mail",
            Hook::Rcpt(_) => "rcpt",
            Hook::Headers(_) => "headers",
            Hook::EndOfData(_) => "data",
        }
    }
}
