//! The filtering pipeline: stages that give a [`Verdict`] at each phase of a connection.
//!
//! One file per stage under `pipeline/`, each implementing [`Stage`] ([`stage`] says what every hook is
//! for). Stages run in the order the server builds them (`server::build_pipeline`); the first decisive
//! verdict (accept, reject, tempfail, discard) ends a phase. Each stage's verdict and time go into the
//! transaction's [`StageRecord`]s for the audit trail. Per-connection and per-transaction state lives in
//! [`ConnInfo::ext`] and [`TxnContext::ext`], owned by the session, never in a stage. A stage that needs an
//! answer from the network starts a [`lookup::Lookup`] early and reads it in a later hook.
//!
//! Stages today, in order: [`limits::LimitsStage`] (rate and concurrency limits), [`accounts::Accounts`]
//! (compromised-account detection), [`rules::RulesStage`] (the rule files), [`greylist::GreylistStage`]
//! (docs/limits.md for the three behaviour stages). The phases of a message: MAIL, each RCPT (whose
//! effects are undone when that recipient ends up refused, see [`TxnContext::mark`]), the end of the header
//! section during DATA/BDAT ([`Stage::on_headers`]: a refusal there stops spooling), and the end of data
//! ([`Stage::on_end_of_data`]). [`subject`] rewrites the Subject of a relayed message when a verdict asked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::Reply;

pub mod accounts;
mod context;
pub mod dns_stages;
pub mod dnsbl;
pub mod ext;
pub mod greylist;
pub mod header_edit;
pub mod limits;
pub mod lookup;
pub mod rules;
pub mod sender_auth;
pub mod stage;
pub mod subject;

use crate::metrics::StageTimer;
pub use context::{AuthEvent, ConnInfo, MessageView, RcptOutcome, StageRecord, TxnContext, TxnEnd, TxnMark};
pub use stage::{EventFuture, HookFuture, Stage, TxnHook};

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

/// The ordered list of stages.
#[derive(Clone, Default)]
pub struct Pipeline {
    stages: Vec<Arc<dyn Stage>>,
    /// Each stage's `moat_stage_seconds` handle, by position in `stages`.
    timers: Arc<[StageTimer]>,
}

impl Pipeline {
    /// A pipeline of these stages, in order.
    pub fn new(stages: Vec<Arc<dyn Stage>>) -> Pipeline {
        let timers = stages.iter().map(|_| StageTimer::new()).collect();
        Pipeline { stages, timers }
    }

    /// The stages' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.name()).collect()
    }

    /// Runs `on_connect` of every stage until one decides.
    pub async fn connect(&self, conn: &ConnInfo) -> Verdict {
        for (s, t) in self.stages.iter().zip(self.timers.iter()) {
            let v = bounded(s.as_ref(), t, "connect", s.on_connect(conn)).await.0;
            if v != Verdict::Continue {
                return v;
            }
        }
        Verdict::Continue
    }

    /// Tells every stage about a new HELO name.
    pub async fn helo(&self, conn: &ConnInfo, helo: &str) {
        for s in &self.stages {
            event(s.as_ref(), s.on_helo(conn, helo)).await;
        }
    }

    /// Runs `on_auth` of every stage until one refuses.
    pub async fn auth(&self, conn: &ConnInfo, auth: AuthEvent<'_>) -> Verdict {
        for (s, t) in self.stages.iter().zip(self.timers.iter()) {
            let v = bounded(s.as_ref(), t, "auth", s.on_auth(conn, auth)).await.0;
            if v.refusal().is_some() {
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

    /// Tells every stage the reply a recipient got.
    pub async fn rcpt_done(&self, conn: &ConnInfo, txn: &mut TxnContext, outcome: RcptOutcome<'_>) {
        for s in &self.stages {
            event(s.as_ref(), s.on_rcpt_done(conn, txn, outcome)).await;
        }
    }

    /// Runs `on_headers`.
    pub async fn headers(&self, conn: &ConnInfo, txn: &mut TxnContext, head: &[u8]) -> Verdict {
        self.run(conn, txn, Hook::Headers(head)).await
    }

    /// Runs `on_end_of_data`.
    pub async fn end_of_data(&self, conn: &ConnInfo, txn: &mut TxnContext, msg: &MessageView<'_>) -> Verdict {
        self.run(conn, txn, Hook::EndOfData(msg)).await
    }

    /// Tells every stage how the transaction ended.
    pub async fn txn_end(&self, conn: &ConnInfo, txn: &mut TxnContext, end: TxnEnd<'_>) {
        for s in &self.stages {
            event(s.as_ref(), s.on_txn_end(conn, txn, end)).await;
        }
    }

    /// The largest scan window any stage asked for this transaction.
    pub fn scan_window(&self, txn: &TxnContext) -> Option<u64> {
        self.stages.iter().filter_map(|s| s.scan_window(txn)).max()
    }

    async fn run(&self, conn: &ConnInfo, txn: &mut TxnContext, hook: Hook<'_>) -> Verdict {
        for (s, timer) in self.stages.iter().zip(self.timers.iter()) {
            let s = s.as_ref();
            if !s.wants(hook.kind(), conn, txn) {
                // The hook would continue at once: record it as such without building its future (#15).
                txn.records.push(StageRecord { stage: s.name(), phase: hook.phase(), verdict: "continue", micros: 0 });
                crate::metrics::stage_seconds_cached(timer, s.name(), Duration::ZERO);
                continue;
            }
            let start = Instant::now();
            let fut = match hook {
                Hook::Mail(m) => s.on_mail(conn, txn, m),
                Hook::Rcpt(r) => s.on_rcpt(conn, txn, r),
                Hook::Headers(h) => s.on_headers(conn, txn, h),
                Hook::EndOfData(h) => s.on_end_of_data(conn, txn, h),
            };
            let (v, timed_out) = bounded(s, timer, hook.phase(), fut).await;
            txn.records.push(StageRecord {
                stage: s.name(),
                phase: hook.phase(),
                verdict: if timed_out { "timeout" } else { v.as_str() },
                micros: start.elapsed().as_micros() as u64,
            });
            if v != Verdict::Continue {
                return v;
            }
        }
        Verdict::Continue
    }
}

/// Runs one verdict hook within the stage's deadline; `true` when it overran (the stage's
/// [`Stage::on_deadline`] verdict is returned then).
async fn bounded(s: &dyn Stage, timer: &StageTimer, phase: &'static str, fut: HookFuture<'_>) -> (Verdict, bool) {
    let start = Instant::now();
    let out = match s.deadline() {
        None => (fut.await, false),
        Some(d) => match tokio::time::timeout(d, fut).await {
            Ok(v) => (v, false),
            Err(_) => {
                tracing::debug!(stage = s.name(), phase, "stage overran its deadline");
                (s.on_deadline(phase), true)
            }
        },
    };
    crate::metrics::stage_seconds_cached(timer, s.name(), start.elapsed());
    out
}

/// Runs one event hook within the stage's deadline.
async fn event(s: &dyn Stage, fut: EventFuture<'_>) {
    match s.deadline() {
        None => fut.await,
        Some(d) => {
            if tokio::time::timeout(d, fut).await.is_err() {
                tracing::debug!(stage = s.name(), "stage event overran its deadline");
            }
        }
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
    fn kind(&self) -> TxnHook {
        match self {
            Hook::Mail(_) => TxnHook::Mail,
            Hook::Rcpt(_) => TxnHook::Rcpt,
            Hook::Headers(_) => TxnHook::Headers,
            Hook::EndOfData(_) => TxnHook::EndOfData,
        }
    }

    fn phase(&self) -> &'static str {
        match self {
            Hook::Mail(_) => "mail",
            Hook::Rcpt(_) => "rcpt",
            Hook::Headers(_) => "headers",
            Hook::EndOfData(_) => "data",
        }
    }
}

#[cfg(test)]
mod tests;
