//! What the stages see: the connection's facts ([`ConnInfo`]), one transaction's state ([`TxnContext`]),
//! the message at the end of data ([`MessageView`]) and the events the driver reports ([`AuthEvent`],
//! [`RcptOutcome`], [`TxnEnd`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use super::ext::{Extensions, SharedExtensions};
use super::rules;
use crate::config::Role;
use crate::smtp::command::RcptTo;
use crate::smtp::Reply;

/// The connection facts every stage may read, and the stages' per-connection state.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The connection id (also in logs, the Received header and audit records).
    pub id: Arc<str>,
    pub listener: Arc<str>,
    /// What the listener is for: mail from the internet or from the organisation's users.
    pub role: Role,
    /// The client's address (after a PROXY header, the address the load balancer reported).
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The client's forward-confirmed reverse DNS name, when looked up and found.
    pub name: Option<String>,
    /// Stage state for this connection, dropped with it (see [`SharedExtensions`]).
    pub ext: SharedExtensions,
}

impl ConnInfo {
    /// Facts for a connection with no stage state yet.
    pub fn new(id: &str, listener: Arc<str>, role: Role, peer: SocketAddr, local: SocketAddr) -> ConnInfo {
        ConnInfo { id: id.into(), listener, role, peer, local, name: None, ext: SharedExtensions::default() }
    }
}

/// One stage's verdict and duration, for the audit record.
#[derive(Clone, Debug)]
pub struct StageRecord {
    pub stage: &'static str,
    pub phase: &'static str,
    pub verdict: &'static str,
    pub micros: u64,
}

impl StageRecord {
    /// `"<kind>:<id>"` as a `&'static str` for [`StageRecord::stage`] (a rule or limit hit recorded under
    /// its own id): each distinct label is leaked once, so memory is bounded by the ids ever loaded, not by
    /// the number of hits or reloads.
    pub fn label(kind: &str, id: &str) -> &'static str {
        static LABELS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let label = format!("{kind}:{id}");
        let mut labels = LABELS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = labels.get(label.as_str()) {
            return s;
        }
        let s: &'static str = Box::leak(label.into_boxed_str());
        labels.insert(s);
        s
    }
}

/// Per-transaction state owned by the session.
#[derive(Debug, Default)]
pub struct TxnContext {
    /// The transaction id (connection id and sequence number).
    pub id: String,
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
    /// The envelope sender (empty for the null sender).
    pub mail_from: String,
    /// The transaction's score: every stage may add to it (rules, DNS list weights, limits with a score
    /// action); the rules stage compares it with its thresholds at the end of data.
    pub score: f64,
    /// The rules stage's state: the one rule-set snapshot this transaction is judged by.
    pub rules: Option<rules::TxnRules>,
    /// Other stages' state for this transaction, keyed by type.
    pub ext: Extensions,
}

/// Where a transaction's effects stood before a RCPT ran through the pipeline, to undo them when that
/// recipient ends up refused (by a stage or by the upstream): a refused recipient adds no header, score or
/// flag to the message. The audit records of the hits stay.
#[derive(Clone, Debug, PartialEq)]
pub struct TxnMark {
    add_headers: usize,
    subject_prefix: bool,
    score: f64,
    rules: Option<rules::RulesMark>,
}

impl TxnContext {
    /// The current state of the effects, for [`TxnContext::rollback`].
    pub fn mark(&self) -> TxnMark {
        TxnMark {
            add_headers: self.add_headers.len(),
            subject_prefix: self.subject_prefix.is_some(),
            score: self.score,
            rules: self.rules.as_ref().map(rules::TxnRules::mark),
        }
    }

    /// Undoes every effect since `mark` (effects only ever accumulate, so truncating is enough).
    pub fn rollback(&mut self, mark: TxnMark) {
        self.add_headers.truncate(mark.add_headers);
        if !mark.subject_prefix {
            self.subject_prefix = None;
        }
        self.score = mark.score;
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
    /// The message from its start, up to the largest [`super::Stage::scan_window`]; `None` when no stage
    /// asked. Shared, so a stage can hand it to a blocking task without copying it.
    pub data: Option<bytes::Bytes>,
    /// The whole message's size; larger than `data` when the message exceeds the window.
    pub size: u64,
}

/// An AUTH attempt that reached a verdict on the credentials.
#[derive(Clone, Copy, Debug)]
pub struct AuthEvent<'a> {
    /// The login name tried (for a success, the user it authenticated as).
    pub login: &'a str,
    pub success: bool,
}

/// The reply a recipient got in the end, from a stage or from the upstream.
#[derive(Clone, Copy, Debug)]
pub struct RcptOutcome<'a> {
    pub rcpt: &'a RcptTo,
    pub reply: &'a Reply,
}

/// How a transaction ended.
#[derive(Clone, Copy, Debug)]
pub struct TxnEnd<'a> {
    /// The reply the client got for the message; `None` when the transaction ended without one (RSET,
    /// disconnect, no DATA).
    pub reply: Option<&'a Reply>,
    /// The upstream queued the message (the client got the upstream's positive reply).
    pub relayed: bool,
    /// The message's size (0 without DATA).
    pub size: u64,
    /// Recipients the message went to.
    pub rcpts: &'a [String],
}
