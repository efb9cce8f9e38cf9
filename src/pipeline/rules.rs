//! The rules stage: applies the loaded [`RuleSet`] at connect, MAIL, RCPT and end of data.
//!
//! The transaction takes one snapshot of the rule set at MAIL and keeps it in [`TxnRules`] until its end,
//! so a reload mid-transaction never mixes versions. Connect-phase rules that refuse run before the
//! greeting (`554` banner); the other connect-phase rules run at MAIL with the envelope rules. Content
//! rules run at end of data on the scanned part of the message, parsed off the async threads.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::{debug, warn};

use super::{ConnInfo, HookFuture, MessageView, Stage, StageRecord, TxnContext, Verdict};
use crate::config::OversizePolicy;
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
    pub score: f64,
    /// An `accept` rule hit: no further rule applies to this transaction.
    pub accepted: bool,
    /// A `discard` rule hit before end of data.
    pub discard: bool,
    /// A `quarantine` rule hit: whether to deliver after keeping the copy.
    pub quarantine: Option<bool>,
    pub mail_from: String,
    /// Recipients the rules let through.
    pub rcpts: Vec<String>,
}

impl std::fmt::Debug for TxnRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnRules").field("version", &self.set.version).field("score", &self.score).finish()
    }
}

/// The stage.
pub struct RulesStage {
    rules: Arc<Rules>,
    scan_window: u64,
    oversize: OversizePolicy,
    quarantine_dir: PathBuf,
}

impl RulesStage {
    pub fn new(rules: Arc<Rules>, config: &crate::config::RulesConfig) -> RulesStage {
        let quarantine_dir = if config.quarantine_dir.as_os_str().is_empty() {
            config.directory.join("quarantine")
        } else {
            config.quarantine_dir.clone()
        };
        RulesStage { rules, scan_window: config.scan_window.bytes(), oversize: config.oversize_policy, quarantine_dir }
    }
}

/// Rule ids as `&'static str` for [`StageRecord`]: each distinct id is leaked once, so memory is bounded by
/// the number of distinct ids ever loaded, not by the number of hits or reloads.
fn intern(id: &str) -> &'static str {
    static IDS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let label = format!("rule:{id}");
    let mut ids = IDS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = ids.get(label.as_str()) {
        return s;
    }
    let s: &'static str = Box::leak(label.into_boxed_str());
    ids.insert(s);
    s
}

/// Records and counts the hits of one phase and turns them into a verdict.
fn apply(set: &RuleSet, hits: &[usize], txn: &mut TxnContext, phase: Phase) -> Verdict {
    for &i in hits {
        let rule = &set.rules[i];
        crate::metrics::rule_hit(&rule.id);
        txn.records.push(StageRecord {
            stage: intern(&rule.id),
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
            Action::Discard if phase == Phase::Data => return Verdict::Discard,
            Action::Discard => state.discard = true,
            Action::Tag(h) => txn.add_headers.extend(h.iter().cloned()),
            Action::Score(s) => state.score += s,
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

    fn scan_window(&self) -> Option<u64> {
        Some(self.scan_window)
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
                score: 0.0,
                accepted: false,
                discard: false,
                quarantine: None,
                mail_from: mail.address.clone(),
                rcpts: Vec::new(),
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
    async fn end_of_data(&self, conn: &ConnInfo, txn: &mut TxnContext, msg: &MessageView<'_>) -> Verdict {
        let Some(state) = txn.rules.clone() else { return Verdict::Continue };
        if state.accepted {
            return Verdict::Continue;
        }
        let set = state.set.clone();
        let data = msg.data.unwrap_or(msg.head);
        if set.needs_content() && (data.len() as u64) < msg.size {
            match self.oversize {
                OversizePolicy::Tempfail => {
                    return Verdict::Tempfail(Reply::new(451, "4.7.1 message too large to scan"))
                }
                OversizePolicy::Reject => return Verdict::Reject(Reply::new(552, "5.3.4 message too large to scan")),
                OversizePolicy::PassWithHeader => txn.add_headers.push(PARTIAL_SCAN_HEADER.to_string()),
            }
        }
        let hits = if set.needs_content() {
            // Parsing and matching a large message is CPU work: off the async threads.
            let owned = OwnedFacts::new(conn, txn, &state, msg.size);
            let raw = data.to_vec();
            let set2 = set.clone();
            let job = move || owned.hits(&set2, &Content::parse(&raw));
            match tokio::task::spawn_blocking(job).await {
                Ok(h) => h,
                Err(e) => {
                    warn!(error = %e, "rule evaluation failed");
                    return Verdict::Tempfail(Reply::local_error());
                }
            }
        } else {
            Vec::new()
        };
        let v = apply(&set, &hits, txn, Phase::Data);
        if v != Verdict::Continue {
            return v;
        }
        self.finish(txn, &set, data).await
    }

    /// Score thresholds, an earlier discard, and quarantine.
    async fn finish(&self, txn: &mut TxnContext, set: &RuleSet, data: &[u8]) -> Verdict {
        let Some(state) = txn.rules.as_ref() else { return Verdict::Continue };
        if state.accepted {
            return Verdict::Continue;
        }
        let score = state.score;
        if score >= set.reject_at {
            return Verdict::Reject(Reply::new(550, format!("5.7.1 message refused (score {score:.1})")));
        }
        if score >= set.tag_at {
            txn.add_headers.push("X-Spam-Flag: YES\r\n".into());
            txn.add_headers.push(format!("X-Spam-Score: {score:.1}\r\n"));
        }
        let (discard, quarantine) = (state.discard, state.quarantine);
        if let Some(deliver) = quarantine {
            if let Err(e) = self.quarantine(data).await {
                warn!(error = %e, dir = %self.quarantine_dir.display(), "cannot quarantine message");
                return Verdict::Tempfail(Reply::local_error());
            }
            if !deliver {
                return Verdict::Discard;
            }
        }
        if discard {
            return Verdict::Discard;
        }
        Verdict::Continue
    }

    async fn quarantine(&self, data: &[u8]) -> std::io::Result<()> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        tokio::fs::create_dir_all(&self.quarantine_dir).await?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.quarantine_dir.join(format!("{}-{}-{seq}.eml", now.as_secs(), std::process::id()));
        tokio::fs::write(path, data).await
    }
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
        }
    }

    fn hits(&self, set: &RuleSet, content: &Content) -> Vec<usize> {
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
        };
        set.hits(Phase::Data, &f)
    }
}
