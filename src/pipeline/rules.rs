//! The rules stage: applies the loaded [`RuleSet`] at connect, MAIL, RCPT, the end of the header section
//! and the end of data.
//!
//! The transaction takes one snapshot of the rule set at MAIL and keeps it in [`TxnRules`] until its end,
//! so a reload mid-transaction never mixes versions. Connect-phase rules that refuse run before the
//! greeting (`554` banner); the other connect-phase rules run at MAIL with the envelope rules. Header rules
//! run as soon as the header section is complete (or at end of data when it is longer than moat keeps);
//! body rules run at end of data on the scanned part of the message. Parsing and matching run off the async
//! threads.

use std::sync::Arc;

use bytes::Bytes;
use tracing::{debug, warn};

use super::{ConnInfo, HookFuture, MessageView, Stage, StageRecord, TxnContext, Verdict};
use crate::config::OversizePolicy;
use crate::quarantine::Hold;
use crate::rules::eval::{Content, Facts};
use crate::rules::{Action, Phase, RuleSet, Rules};
use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::Reply;

/// The header added to a message relayed although it was larger than the scan window.
pub const PARTIAL_SCAN_HEADER: &str = "X-Moat-Scan: partial\r\n";

/// Per-transaction rule state, kept in [`TxnContext::rules`].
#[derive(Clone)]
pub struct TxnRules {
    /// The snapshot this transaction is judged by.
    pub set: Arc<RuleSet>,
    /// An `accept` rule hit: no further rule applies to this transaction.
    pub accepted: bool,
    /// A `discard` rule hit before end of data.
    pub discard: bool,
    /// A `quarantine` rule hit: whether to deliver after keeping the copy.
    pub quarantine: Option<bool>,
    pub mail_from: String,
    /// Recipients the rules let through (and, once the RCPT is over, the upstream accepted).
    pub rcpts: Vec<String>,
    /// The header-phase rules ran when the header section ended; end of data does not run them again.
    pub headers_done: bool,
}

/// The effects in [`TxnRules`] at one point, to undo those of a refused recipient ([`super::TxnMark`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulesMark {
    accepted: bool,
    discard: bool,
    quarantine: Option<bool>,
    rcpts: usize,
}

impl TxnRules {
    /// The current effects.
    pub fn mark(&self) -> RulesMark {
        RulesMark {
            accepted: self.accepted,
            discard: self.discard,
            quarantine: self.quarantine,
            rcpts: self.rcpts.len(),
        }
    }

    /// Back to the effects of `m`.
    pub fn rollback(&mut self, m: RulesMark) {
        self.accepted = m.accepted;
        self.discard = m.discard;
        self.quarantine = m.quarantine;
        self.rcpts.truncate(m.rcpts);
    }
}

impl std::fmt::Debug for TxnRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnRules").field("version", &self.set.version).finish()
    }
}

/// The stage.
pub struct RulesStage {
    rules: Arc<Rules>,
    scan_window: u64,
    oversize: OversizePolicy,
}

impl RulesStage {
    pub fn new(rules: Arc<Rules>, config: &crate::config::RulesConfig) -> RulesStage {
        RulesStage { rules, scan_window: config.scan_window.bytes(), oversize: config.oversize_policy }
    }
}

/// Records and counts the hits of one phase and turns them into a verdict.
fn apply(set: &RuleSet, hits: &[usize], txn: &mut TxnContext, phase: Phase) -> Verdict {
    for &i in hits {
        let rule = &set.rules[i];
        crate::metrics::rule_hit(&rule.id);
        txn.records.push(StageRecord {
            stage: StageRecord::label("rule", &rule.id),
            phase: phase.as_str(),
            verdict: rule.action.as_str(),
            micros: 0,
        });
        debug!(rule = %rule.id, action = rule.action.as_str(), "rule hit");
        let Some(state) = txn.rules.as_mut() else { return Verdict::Continue };
        match &rule.action {
            Action::Accept => {
                state.accepted = true;
                return Verdict::Accept;
            }
            Action::Reject(r) => return Verdict::Reject(r.clone().unwrap_or_else(default_reject)),
            Action::Tempfail(r) => return Verdict::Tempfail(r.clone().unwrap_or_else(default_tempfail)),
            // From the header section on, a discard is final (moat stops spooling); before, the message
            // may still be refused at end of data.
            Action::Discard if phase >= Phase::Headers => return Verdict::Discard,
            Action::Discard => state.discard = true,
            Action::Tag { headers, subject_prefix } => {
                txn.add_headers.extend(headers.iter().cloned());
                if txn.subject_prefix.is_none() {
                    txn.subject_prefix.clone_from(subject_prefix);
                }
            }
            Action::Score(s) => txn.score += s,
            Action::Quarantine { deliver, headers } => {
                state.quarantine = Some(state.quarantine.unwrap_or(true) && *deliver);
                txn.add_headers.extend(headers.iter().cloned());
            }
        }
    }
    Verdict::Continue
}

fn default_reject() -> Reply {
    Reply::new(550, "5.7.1 refused by policy")
}

fn default_tempfail() -> Reply {
    Reply::new(451, "4.7.1 try again later")
}

impl Stage for RulesStage {
    fn name(&self) -> &'static str {
        "rules"
    }

    /// The window, when a rule still needs the message: body rules, or header rules that could not run
    /// when the header section ended. (A quarantine copy is taken from the spool, whole, by the driver.)
    fn scan_window(&self, txn: &TxnContext) -> Option<u64> {
        let state = txn.rules.as_ref()?;
        let set = &state.set;
        let wanted = set.has_phase(Phase::Data) || (!state.headers_done && set.has_phase(Phase::Headers));
        (wanted && !state.accepted).then_some(self.scan_window)
    }

    fn on_connect<'a>(&'a self, conn: &'a ConnInfo) -> HookFuture<'a> {
        Box::pin(async move {
            let set = self.rules.snapshot();
            let facts = facts(conn, None, &[], 0, None);
            for i in set.hits(Phase::Connect, &facts) {
                let rule = &set.rules[i];
                let verdict = match &rule.action {
                    Action::Accept => return Verdict::Continue,
                    Action::Reject(r) => {
                        Verdict::Reject(r.clone().unwrap_or_else(|| Reply::new(554, "5.7.1 access denied")))
                    }
                    Action::Tempfail(r) => {
                        Verdict::Tempfail(r.clone().unwrap_or_else(|| Reply::new(421, "4.7.0 try again later")))
                    }
                    _ => continue,
                };
                crate::metrics::rule_hit(&rule.id);
                debug!(rule = %rule.id, "connection refused by rule");
                return verdict;
            }
            Verdict::Continue
        })
    }

    fn on_mail<'a>(&'a self, conn: &'a ConnInfo, txn: &'a mut TxnContext, mail: &'a MailFrom) -> HookFuture<'a> {
        Box::pin(async move {
            let set = self.rules.snapshot();
            let state = TxnRules {
                set: set.clone(),
                accepted: false,
                discard: false,
                quarantine: None,
                mail_from: mail.address.clone(),
                rcpts: Vec::new(),
                headers_done: false,
            };
            txn.rules = Some(state);
            let mut f = facts(conn, Some(txn), &[], 0, None);
            f.mail_from = Some(&mail.address);
            // Connect-phase rules that do not refuse (score, tag, accept...) apply to the transaction.
            let mut hits: Vec<usize> = set
                .hits(Phase::Connect, &f)
                .into_iter()
                .filter(|&i| !matches!(set.rules[i].action, Action::Reject(_) | Action::Tempfail(_)))
                .collect();
            hits.extend(set.hits(Phase::Mail, &f));
            apply(&set, &hits, txn, Phase::Mail)
        })
    }

    fn on_rcpt<'a>(&'a self, conn: &'a ConnInfo, txn: &'a mut TxnContext, rcpt: &'a RcptTo) -> HookFuture<'a> {
        Box::pin(async move {
            let Some(state) = txn.rules.as_ref() else { return Verdict::Continue };
            if state.accepted {
                return Verdict::Continue;
            }
            let set = state.set.clone();
            let one = [rcpt.address.clone()];
            let mut f = facts(conn, Some(txn), &one, 0, None);
            f.mail_from = Some(&state.mail_from);
            let hits = set.hits(Phase::Rcpt, &f);
            let v = apply(&set, &hits, txn, Phase::Rcpt);
            if v.refusal().is_none() {
                if let Some(s) = txn.rules.as_mut() {
                    s.rcpts.push(rcpt.address.clone());
                }
            }
            v
        })
    }

    fn on_headers<'a>(&'a self, conn: &'a ConnInfo, txn: &'a mut TxnContext, head: &'a [u8]) -> HookFuture<'a> {
        Box::pin(async move { self.headers(conn, txn, head).await })
    }

    fn on_end_of_data<'a>(
        &'a self,
        conn: &'a ConnInfo,
        txn: &'a mut TxnContext,
        msg: &'a MessageView<'a>,
    ) -> HookFuture<'a> {
        Box::pin(async move { self.end_of_data(conn, txn, msg).await })
    }
}

impl RulesStage {
    /// The header-phase rules, on the complete header section.
    async fn headers(&self, conn: &ConnInfo, txn: &mut TxnContext, head: &[u8]) -> Verdict {
        let Some(state) = txn.rules.clone() else { return Verdict::Continue };
        if state.accepted || state.headers_done {
            return Verdict::Continue;
        }
        let hits = if state.set.has_phase(Phase::Headers) {
            let raw = Bytes::copy_from_slice(head);
            match evaluate(conn, txn, &state, raw, 0, vec![Phase::Headers]).await {
                Ok(mut h) => h.pop().map(|(_, h)| h).unwrap_or_default(),
                Err(v) => return v,
            }
        } else {
            Vec::new()
        };
        if let Some(s) = txn.rules.as_mut() {
            s.headers_done = true;
        }
        apply(&state.set, &hits, txn, Phase::Headers)
    }

    async fn end_of_data(&self, conn: &ConnInfo, txn: &mut TxnContext, msg: &MessageView<'_>) -> Verdict {
        let Some(state) = txn.rules.clone() else { return Verdict::Continue };
        if state.accepted {
            return Verdict::Continue;
        }
        let set = state.set.clone();
        let data = msg.data.clone().unwrap_or_else(|| Bytes::copy_from_slice(msg.head));
        let mut phases = Vec::new();
        if !state.headers_done && set.has_phase(Phase::Headers) {
            phases.push(Phase::Headers);
        }
        if set.has_phase(Phase::Data) {
            if (data.len() as u64) < msg.size {
                match self.oversize {
                    OversizePolicy::Tempfail => {
                        return Verdict::Tempfail(Reply::new(451, "4.7.1 message too large to scan"))
                    }
                    OversizePolicy::Reject => {
                        return Verdict::Reject(Reply::new(552, "5.3.4 message too large to scan"))
                    }
                    OversizePolicy::PassWithHeader => txn.add_headers.push(PARTIAL_SCAN_HEADER.to_string()),
                }
            }
            phases.push(Phase::Data);
        }
        if !phases.is_empty() {
            let hits = match evaluate(conn, txn, &state, data.clone(), msg.size, phases).await {
                Ok(h) => h,
                Err(v) => return v,
            };
            for (phase, hits) in hits {
                let v = apply(&set, &hits, txn, phase);
                if v != Verdict::Continue {
                    return v;
                }
            }
        }
        self.finish(txn, &set)
    }

    /// Score thresholds, an earlier discard, and quarantine: a [`Hold`] for the driver, which keeps the
    /// whole message in the quarantine store before the client's reply (`451` if it cannot).
    fn finish(&self, txn: &mut TxnContext, set: &RuleSet) -> Verdict {
        let Some(state) = txn.rules.as_ref() else { return Verdict::Continue };
        if state.accepted {
            return Verdict::Continue;
        }
        let score = txn.score;
        if score >= set.reject_at {
            return Verdict::Reject(Reply::new(550, format!("5.7.1 message refused (score {score:.1})")));
        }
        if score >= set.tag_at {
            txn.add_headers.push("X-Spam-Flag: YES\r\n".into());
            txn.add_headers.push(format!("X-Spam-Score: {score:.1}\r\n"));
            if txn.subject_prefix.is_none() {
                txn.subject_prefix.clone_from(&set.tag_subject_prefix);
            }
        }
        let (discard, quarantine) = (state.discard, state.quarantine);
        if let Some(deliver) = quarantine {
            txn.ext.insert(Hold { deliver });
            if !deliver {
                return Verdict::Discard;
            }
        }
        if discard {
            return Verdict::Discard;
        }
        Verdict::Continue
    }
}

/// Up to this many bytes, parsing and matching run on the session's own thread: with the shipped rules a
/// 12 KiB message takes about 70 µs (`cargo bench --bench rules`), within the ~100 µs a task may run between
/// awaits, while a round trip through the blocking pool costs two thread wake-ups and a context switch,
/// more than the work itself. Larger messages go to the blocking pool.
const INLINE_EVAL_MAX: usize = 32 * 1024;

/// Parses `raw` (the header section, or the scanned part of the message) and runs the rules of each of
/// `phases` on it: inline when small, else off the async threads, since parsing and matching a large
/// message is CPU work. A failed task is moat's own failure (`451 4.3.0`).
async fn evaluate(
    conn: &ConnInfo,
    txn: &TxnContext,
    state: &TxnRules,
    raw: Bytes,
    size: u64,
    phases: Vec<Phase>,
) -> Result<Vec<(Phase, Vec<usize>)>, Verdict> {
    let owned = OwnedFacts::new(conn, txn, state, size);
    let set = state.set.clone();
    let inline = raw.len() <= INLINE_EVAL_MAX;
    let job = move || {
        let content = Content::parse(&raw);
        phases.into_iter().map(|p| (p, owned.hits(&set, &content, p))).collect()
    };
    if inline {
        // As on the blocking pool, a panic in the parser or a rule is moat's own failure, answered 451,
        // not a dropped connection.
        return std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).map_err(|_| {
            warn!("rule evaluation panicked");
            Verdict::Tempfail(Reply::local_error())
        });
    }
    tokio::task::spawn_blocking(job).await.map_err(|e| {
        warn!(error = %e, "rule evaluation failed");
        Verdict::Tempfail(Reply::local_error())
    })
}

fn facts<'a>(
    conn: &'a ConnInfo,
    txn: Option<&'a TxnContext>,
    rcpts: &'a [String],
    size: u64,
    content: Option<&'a Content>,
) -> Facts<'a> {
    Facts {
        ip: conn.peer.ip(),
        client_name: conn.name.as_deref(),
        listener: &conn.listener,
        helo: txn.and_then(|t| t.helo.as_deref()),
        auth_user: txn.and_then(|t| t.auth_user.as_deref()),
        mail_from: None,
        rcpts,
        size,
        content,
        auth: None,
    }
}

/// Facts copied for the blocking evaluation task.
struct OwnedFacts {
    ip: std::net::IpAddr,
    client_name: Option<String>,
    listener: String,
    helo: Option<String>,
    auth_user: Option<String>,
    mail_from: String,
    rcpts: Vec<String>,
    size: u64,
    auth: Option<crate::rules::auth_facts::AuthFacts>,
}

impl OwnedFacts {
    fn new(conn: &ConnInfo, txn: &TxnContext, state: &TxnRules, size: u64) -> OwnedFacts {
        OwnedFacts {
            ip: conn.peer.ip(),
            client_name: conn.name.clone(),
            listener: conn.listener.to_string(),
            helo: txn.helo.clone(),
            auth_user: txn.auth_user.clone(),
            mail_from: state.mail_from.clone(),
            rcpts: state.rcpts.clone(),
            size,
            auth: txn.ext.get::<crate::rules::auth_facts::AuthFacts>().cloned(),
        }
    }

    fn hits(&self, set: &RuleSet, content: &Content, phase: Phase) -> Vec<usize> {
        let f = Facts {
            ip: self.ip,
            client_name: self.client_name.as_deref(),
            listener: &self.listener,
            helo: self.helo.as_deref(),
            auth_user: self.auth_user.as_deref(),
            mail_from: Some(&self.mail_from),
            rcpts: &self.rcpts,
            size: self.size,
            content: Some(content),
            auth: self.auth.as_ref(),
        };
        set.hits(phase, &f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn compile(text: &str) -> Result<RuleSet, Vec<String>> {
        RuleSet::from_texts(&[(PathBuf::from("t.toml"), text.to_string())], Path::new("."), &[])
            .map_err(|e| e.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn subject_prefix_is_checked_where_it_is_written() {
        let s = compile(
            "[scores]\nsubject_prefix = \"[S] \"\n[[rule]]\nid = \"t\"\nwhen = { subject = 'x' }\naction = \"tag\"\n\
             subject_prefix = \"[SPAM] \"\n",
        )
        .unwrap();
        assert!(matches!(&s.rules[0].action, Action::Tag { subject_prefix: Some(p), .. } if p == "[SPAM] "));
        assert_eq!(s.tag_subject_prefix.as_deref(), Some("[S] "));
        assert_eq!(s.rules[0].phase, Phase::Headers);
        let bad = [
            ("action = \"reject\"\nsubject_prefix = \"[X] \"", "t.toml:5:", "tag"),
            ("action = \"tag\"\nsubject_prefix = \"[é] \"", "t.toml:5:", "printable ASCII"),
            ("action = \"tag\"\nsubject_prefix = \"  \"", "t.toml:5:", "printable ASCII"),
            ("action = \"tag\"\nsubject_prefix = \"[X]\\r\\nBcc: x\"", "t.toml:5:", "printable ASCII"),
        ];
        for (tail, at, what) in bad {
            let e = compile(&format!("[[rule]]\nid = \"t\"\nwhen = {{ subject = 'x' }}\n{tail}\n")).unwrap_err();
            assert!(e[0].starts_with(at) && e[0].contains(what), "{tail}: {e:?}");
        }
        let e = compile(&format!("[scores]\nsubject_prefix = \"{}\"\n", "x".repeat(65))).unwrap_err();
        assert!(e[0].starts_with("t.toml:2:"), "{e:?}");
    }

    #[test]
    fn rollback_undoes_the_effects_of_a_refused_recipient() {
        let set = Arc::new(compile("").unwrap());
        let mut txn = TxnContext {
            rules: Some(TxnRules {
                set,
                accepted: false,
                discard: false,
                quarantine: None,
                mail_from: "a@example.org".into(),
                rcpts: vec!["b@example.test".into()],
                headers_done: false,
            }),
            score: 1.0,
            ..TxnContext::default()
        };
        txn.add_headers.push("X-Mail: 1\r\n".into());
        let mark = txn.mark();
        txn.add_headers.push("X-Rcpt: 1\r\n".into());
        txn.subject_prefix = Some("[R] ".into());
        txn.score += 5.0;
        if let Some(s) = txn.rules.as_mut() {
            s.accepted = true;
            s.discard = true;
            s.quarantine = Some(false);
            s.rcpts.push("c@example.test".into());
        }
        txn.rollback(mark);
        assert_eq!(txn.add_headers, ["X-Mail: 1\r\n"]);
        assert_eq!(txn.subject_prefix, None);
        let s = txn.rules.as_ref().unwrap();
        assert_eq!((txn.score, s.accepted, s.discard, s.quarantine), (1.0, false, false, None));
        assert_eq!(s.rcpts, ["b@example.test"]);
    }
}
