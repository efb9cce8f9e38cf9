//! Rule files (`rules/*.toml`) and their lists: parsing ([`parse`]), compilation ([`compile`]), lookup
//! structures ([`lists`], [`words`]), the message content ([`content`], with [`sniff`] and [`zip`] for
//! attachments), evaluation ([`eval`]) and the reloadable handle ([`Rules`]).
//!
//! A [`RuleSet`] is immutable. The server holds it in an `ArcSwap`; a transaction takes one snapshot at
//! MAIL and is judged by it to the end, whatever reloads happen meanwhile (DESIGN.md invariant 6). The
//! pipeline stage that applies it is `pipeline::rules`. The format is documented in `docs/rules.md`.

pub mod compile;
pub mod content;
pub mod eval;
pub mod limits;
pub mod lists;
pub mod parse;
pub mod sniff;
pub mod words;
pub mod zip;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use parse::RuleError;

use crate::smtp::Reply;
use lists::{CidrSet, DomainSet, List};

/// The phase at which a rule's conditions are all known. Ordered: a rule runs at its latest leaf's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Connect,
    Mail,
    Rcpt,
    /// The header section is complete (its empty line arrived during DATA/BDAT): rules on headers and the
    /// envelope decide before the body is spooled, or at end of data when the section is too long.
    Headers,
    Data,
}

/// Every phase, in order.
const PHASES: [Phase; 5] = [Phase::Connect, Phase::Mail, Phase::Rcpt, Phase::Headers, Phase::Data];

impl Phase {
    /// A stable label for the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Mail => "mail",
            Phase::Rcpt => "rcpt",
            Phase::Headers => "headers",
            Phase::Data => "data",
        }
    }
}

/// Field numbers of the per-field regex sets; header names follow from [`field::HEADER_BASE`].
pub mod field {
    pub const HELO: usize = 0;
    pub const MAIL_FROM: usize = 1;
    pub const RCPT_TO: usize = 2;
    pub const AUTH_USER: usize = 3;
    pub const SUBJECT: usize = 4;
    pub const BODY: usize = 5;
    pub const URL_DOMAIN: usize = 6;
    pub const ATTACHMENT_NAME: usize = 7;
    /// The forward-confirmed reverse DNS name (`server.reverse_dns`).
    pub const CLIENT_NAME: usize = 8;
    pub const HEADER_BASE: usize = 9;
}

/// The fields a literal word list (`subject_words`, `body_words`) can search, one automaton each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WordField {
    Subject = 0,
    Body = 1,
}

/// What a list membership test looks up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListField {
    ClientIp,
    Helo,
    MailFrom,
    MailFromDomain,
    RcptTo,
    RcptDomain,
    FromDomain,
    UrlDomain,
    Url,
    AttachmentSha256,
}

impl ListField {
    fn parse(s: &str) -> Option<ListField> {
        Some(match s {
            "client_ip" => ListField::ClientIp,
            "helo" => ListField::Helo,
            "mail_from" => ListField::MailFrom,
            "mail_from_domain" => ListField::MailFromDomain,
            "rcpt_to" => ListField::RcptTo,
            "rcpt_domain" => ListField::RcptDomain,
            "from_domain" => ListField::FromDomain,
            "url_domain" => ListField::UrlDomain,
            "url" => ListField::Url,
            "attachment_sha256" => ListField::AttachmentSha256,
            _ => return None,
        })
    }

    fn phase(self) -> Phase {
        match self {
            ListField::ClientIp => Phase::Connect,
            ListField::Helo | ListField::MailFrom | ListField::MailFromDomain => Phase::Mail,
            ListField::RcptTo | ListField::RcptDomain => Phase::Rcpt,
            ListField::FromDomain => Phase::Headers,
            _ => Phase::Data,
        }
    }
}

/// A compiled condition.
#[derive(Debug)]
pub enum Cond {
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Not(Box<Cond>),
    Leaf(Leaf),
}

/// A compiled leaf condition.
#[derive(Debug)]
pub enum Leaf {
    Ip(CidrSet),
    /// Pattern `idx` of the regex set of `field` matched.
    Regex {
        field: usize,
        idx: usize,
    },
    /// An address list: exact addresses, or domains covering subdomains.
    Exact {
        field: usize,
        addrs: HashSet<String>,
        domains: DomainSet,
    },
    Listener(Vec<String>),
    SizeOver(u64),
    FromSpoof,
    UrlDomains(DomainSet),
    AttachmentExt(HashSet<String>),
    /// Declared or sniffed type of any attachment.
    AttachmentType(sniff::TypePatterns),
    AttachmentSizeOver(u64),
    MimePartsOver(usize),
    MimeDepthOver(usize),
    /// Any of patterns `ids` of the field's word automaton occurs.
    Words {
        field: WordField,
        ids: Vec<usize>,
    },
    ArchiveUnreadable,
    ArchiveEncrypted,
    MissingHeader(String),
    InList {
        list: usize,
        field: ListField,
    },
}

impl Cond {
    /// The phase by which every leaf is known.
    pub fn phase(&self) -> Phase {
        match self {
            Cond::All(v) | Cond::Any(v) => v.iter().map(Cond::phase).max().unwrap_or(Phase::Connect),
            Cond::Not(c) => c.phase(),
            Cond::Leaf(l) => match l {
                Leaf::Ip(_) | Leaf::Listener(_) => Phase::Connect,
                Leaf::Regex { field, .. } | Leaf::Exact { field, .. } => match *field {
                    field::CLIENT_NAME => Phase::Connect,
                    field::HELO | field::MAIL_FROM | field::AUTH_USER => Phase::Mail,
                    field::RCPT_TO => Phase::Rcpt,
                    field::SUBJECT => Phase::Headers,
                    f if f >= field::HEADER_BASE => Phase::Headers,
                    _ => Phase::Data,
                },
                Leaf::InList { field, .. } => field.phase(),
                Leaf::FromSpoof | Leaf::MissingHeader(_) => Phase::Headers,
                Leaf::Words { field: WordField::Subject, .. } => Phase::Headers,
                _ => Phase::Data,
            },
        }
    }
}

/// What a hit does.
#[derive(Clone, Debug)]
pub enum Action {
    Accept,
    Reject(Option<Reply>),
    Tempfail(Option<Reply>),
    Discard,
    /// Header lines (CRLF-terminated) to add, and a prefix for the Subject.
    Tag {
        headers: Vec<String>,
        subject_prefix: Option<String>,
    },
    Score(f64),
    Quarantine {
        deliver: bool,
        headers: Vec<String>,
    },
}

impl Action {
    /// A stable label for the audit record.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Reject(_) => "reject",
            Action::Tempfail(_) => "tempfail",
            Action::Discard => "discard",
            Action::Tag { .. } => "tag",
            Action::Score(_) => "score",
            Action::Quarantine { .. } => "quarantine",
        }
    }
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub id: Arc<str>,
    pub description: String,
    pub phase: Phase,
    pub cond: Cond,
    pub action: Action,
}

/// An immutable, compiled set of rules and lists.
#[derive(Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// Rule indices per phase, `accept` rules first (allow wins over block), then file order.
    by_phase: [Vec<usize>; PHASES.len()],
    /// One multi-pattern regex per field (see [`field`]); `None` when no rule uses the field.
    sets: Vec<Option<regex_automata::meta::Regex>>,
    /// One word automaton per [`WordField`]; `None` when no rule uses the field.
    words: [Option<words::WordSet>; 2],
    /// Lower-case header names; header `i` is field `HEADER_BASE + i`.
    header_names: Vec<String>,
    lists: Vec<List>,
    /// Domains a From display name must not claim unless the address is in them too.
    local_domains: DomainSet,
    pub tag_at: f64,
    pub reject_at: f64,
    /// `[scores] subject_prefix`: the Subject prefix of a message that reaches `tag_at`.
    pub tag_subject_prefix: Option<String>,
    /// Behaviour limits (`[[limit]]`, in file order) and greylisting (`[greylist]`), see [`limits`].
    pub limits: Vec<limits::Limit>,
    pub greylist: Option<limits::Greylist>,
    /// Increases with every set built in this process, so tests and logs can tell versions apart.
    pub version: u64,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet").field("rules", &self.rules.len()).field("version", &self.version).finish()
    }
}

static VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl RuleSet {
    fn order(&mut self) {
        for p in PHASES {
            let of_phase = || self.rules.iter().enumerate().filter(move |(_, r)| r.phase == p);
            let accept = of_phase().filter(|(_, r)| matches!(r.action, Action::Accept)).map(|(i, _)| i);
            let rest = of_phase().filter(|(_, r)| !matches!(r.action, Action::Accept)).map(|(i, _)| i);
            self.by_phase[p as usize] = accept.chain(rest).collect();
        }
        self.version = VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Rules of `phase`, accept rules first.
    pub fn phase(&self, phase: Phase) -> impl Iterator<Item = &Rule> {
        self.by_phase[phase as usize].iter().map(|&i| &self.rules[i])
    }

    /// Whether any rule needs the message content.
    pub fn needs_content(&self) -> bool {
        !self.by_phase[Phase::Data as usize].is_empty()
    }

    /// Whether any rule runs at `phase`.
    pub fn has_phase(&self, phase: Phase) -> bool {
        !self.by_phase[phase as usize].is_empty()
    }

    /// Reads `dir/*.toml` in file-name order (and the list files they name) and compiles them. A missing
    /// directory is an empty set. Blocking: call it at start-up or from `spawn_blocking`.
    pub fn load_dir(dir: &Path, local_domains: &[String]) -> Result<RuleSet, Vec<RuleError>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut set = RuleSet::default();
                set.order();
                return Ok(set);
            }
            Err(e) => return Err(vec![RuleError::file(dir, format!("cannot read directory: {e}"))]),
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        paths.sort();
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for p in paths {
            match std::fs::read_to_string(&p) {
                Ok(t) => files.push((p, t)),
                Err(e) => errors.push(RuleError::file(&p, format!("cannot read: {e}"))),
            }
        }
        let mut read_list = |f: &Path| std::fs::read_to_string(dir.join(f)).map_err(|e| e.to_string());
        let set = compile::compile(&files, &mut read_list, local_domains);
        match (set, errors.is_empty()) {
            (Ok(s), true) => Ok(s),
            (Ok(_), false) => Err(errors),
            (Err(mut e), _) => {
                errors.append(&mut e);
                Err(errors)
            }
        }
    }

    /// Compiles rule text held in memory (tests, benches); list files are read relative to `dir`.
    pub fn from_texts(files: &[(PathBuf, String)], dir: &Path, local: &[String]) -> Result<RuleSet, Vec<RuleError>> {
        let mut read_list = |f: &Path| std::fs::read_to_string(dir.join(f)).map_err(|e| e.to_string());
        compile::compile(files, &mut read_list, local)
    }
}

/// The running rule set and what is needed to rebuild it.
pub struct Rules {
    current: ArcSwap<RuleSet>,
    dir: PathBuf,
    local_domains: Vec<String>,
    /// The directory's newest modification time when last loaded (shared with the watcher).
    stamp: Arc<Mutex<Option<Option<SystemTime>>>>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// All problems of a refused rule set, one per line.
pub fn format_errors(errors: &[RuleError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

impl Rules {
    /// Loads the directory (blocking; at start-up).
    pub fn load(dir: &Path, local_domains: &[String]) -> Result<Rules, Vec<RuleError>> {
        let set = RuleSet::load_dir(dir, local_domains)?;
        Ok(Rules {
            current: ArcSwap::from_pointee(set),
            dir: dir.to_owned(),
            local_domains: local_domains.to_vec(),
            stamp: Arc::new(Mutex::new(Some(newest_mtime(dir)))),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<RuleSet> {
        self.current.load_full()
    }

    /// Rebuilds the set off the async threads and swaps it in; on error the old set stays.
    pub async fn reload(self: &Arc<Self>) -> Result<usize, Vec<RuleError>> {
        let me = Arc::clone(self);
        let built = tokio::task::spawn_blocking(move || {
            // Stamped before reading, so the watcher does not reload these files again (a change made while
            // they are read shows up as a newer stamp).
            *me.stamp.lock().unwrap_or_else(|p| p.into_inner()) = Some(newest_mtime(&me.dir));
            RuleSet::load_dir(&me.dir, &me.local_domains)
        })
        .await;
        let result = match built {
            Ok(r) => r,
            Err(e) => Err(vec![RuleError::file(&self.dir, format!("reload task failed: {e}"))]),
        };
        match result {
            Ok(set) => {
                let n = set.rules.len();
                self.current.store(Arc::new(set));
                crate::metrics::rules_reload(crate::metrics::ReloadResult::Ok);
                Ok(n)
            }
            Err(e) => {
                crate::metrics::rules_reload(crate::metrics::ReloadResult::Error);
                Err(e)
            }
        }
    }

    /// [`Rules::reload`], logging the outcome.
    pub async fn reload_logged(self: &Arc<Self>) {
        match self.reload().await {
            Ok(n) => info!(rules = n, "rules reloaded"),
            Err(e) => warn!(error = %format_errors(&e), "rules reload refused; old rules stay"),
        }
    }

    /// Reloads when the directory's newest modification time changed and then held still for one more
    /// `interval` (`crate::watch`: an editor writing several files is picked up once); `0s` disables it.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        if interval.is_zero() {
            return;
        }
        let dir = self.dir.clone();
        let me = Arc::clone(self);
        crate::watch::spawn(
            interval,
            shutdown,
            Arc::clone(&self.stamp),
            move || newest_mtime(&dir),
            move || {
                let me = Arc::clone(&me);
                async move {
                    debug!("rules directory changed");
                    me.reload_logged().await;
                }
            },
        );
    }
}

/// The newest modification time of the directory, its files and `lists/` (blocking).
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    for d in [dir.to_path_buf(), dir.join("lists")] {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

#[cfg(test)]
mod tests;
