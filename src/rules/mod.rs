//! Rule files (`rules/*.toml`) and their lists: parsing ([`parse`]), compilation ([`compile`]), lookup
//! structures ([`lists`], [`words`]), the message content ([`content`], with [`sniff`] and [`zip`] for
//! attachments), evaluation ([`eval`]) and the reloadable handle ([`Rules`]).
//!
//! A [`RuleSet`] is immutable. The server holds it in an `ArcSwap`; a transaction takes one snapshot at
//! MAIL and is judged by it to the end, whatever reloads happen meanwhile (DESIGN.md invariant 6). The
//! pipeline stage that applies it is `pipeline::rules`. The format is documented in `docs/rules.md`.

pub mod auth_facts;
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
use std::time::Duration;

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
    /// Parts were lost to malformed MIME ([`content::Content::mime_malformed`]).
    MimeMalformed,
    ArchiveEncrypted,
    MissingHeader(String),
    InList {
        list: usize,
        field: ListField,
    },
    /// A DNS list or sender-authentication fact has one of the values (see [`auth_facts`]).
    Auth {
        key: auth_facts::AuthKey,
        values: Vec<String>,
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
    /// The list files the rule files named (relative to the rules directory), for the watcher.
    pub list_files: Vec<PathBuf>,
}

/// `[scores] tag_at` and `reject_at` when no rule file sets them.
pub const DEFAULT_TAG_AT: f64 = 5.0;
pub const DEFAULT_REJECT_AT: f64 = 10.0;

impl Default for RuleSet {
    /// No rules, and the default score thresholds: a set without a `[scores]` table (a missing rules
    /// directory included) must not refuse a message for its score of 0.
    fn default() -> Self {
        RuleSet {
            rules: Vec::new(),
            by_phase: Default::default(),
            sets: Vec::new(),
            words: Default::default(),
            header_names: Vec::new(),
            lists: Vec::new(),
            local_domains: DomainSet::default(),
            tag_at: DEFAULT_TAG_AT,
            reject_at: DEFAULT_REJECT_AT,
            tag_subject_prefix: None,
            limits: Vec::new(),
            greylist: None,
            version: 0,
            list_files: Vec::new(),
        }
    }
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
        let mut list_files = Vec::new();
        let mut read_list = |f: &Path| {
            list_files.push(f.to_path_buf());
            std::fs::read_to_string(dir.join(f)).map_err(|e| e.to_string())
        };
        let set = compile::compile(&files, &mut read_list, local_domains);
        match (set, errors.is_empty()) {
            (Ok(mut s), true) => {
                s.list_files = list_files;
                Ok(s)
            }
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
    /// The rule files' [`Fingerprint`] when last loaded (shared with the watcher).
    stamp: Arc<Mutex<Option<Fingerprint>>>,
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
        if !dir.exists() {
            tracing::warn!(dir = %dir.display(), "the rules directory does not exist: no rules until it is created");
        }
        let set = RuleSet::load_dir(dir, local_domains)?;
        Ok(Rules {
            stamp: Arc::new(Mutex::new(Some(fingerprint(dir, &set.list_files)))),
            current: ArcSwap::from_pointee(set),
            dir: dir.to_owned(),
            local_domains: local_domains.to_vec(),
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
            *me.stamp.lock().unwrap_or_else(|p| p.into_inner()) = Some(fingerprint(&me.dir, &me.snapshot().list_files));
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

    /// Reloads when the rule files' [`Fingerprint`] changed and then held still for one more
    /// `interval` (`crate::watch`: an editor writing several files is picked up once); `0s` disables it.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        if interval.is_zero() {
            return;
        }
        let dir = self.dir.clone();
        let (me, me_files) = (Arc::clone(self), Arc::clone(self));
        crate::watch::spawn(
            interval,
            shutdown,
            Arc::clone(&self.stamp),
            move || fingerprint(&dir, &me_files.snapshot().list_files),
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

/// What the watcher compares to see whether the rules changed: the [`crate::watch::Stamp`] of every rule
/// file (`*.toml` directly in the directory), every file in `lists/` and every list file the loaded rules
/// name, by name (blocking).
///
/// Only those files count. Directories do not, nor does the rules directory's own modification time: a
/// quarantine store, an editor's lock file directory or anything else written below the rules directory
/// must not make the rules reload (a steady stream of quarantined messages used to keep a real edit from
/// ever holding still long enough to apply). A deleted or renamed file changes the list of names.
pub type Fingerprint = Vec<(std::ffi::OsString, crate::watch::Stamp)>;

/// The [`Fingerprint`] of `dir` now, with `list_files` (relative to `dir`) besides `lists/` (blocking).
pub fn fingerprint(dir: &Path, list_files: &[PathBuf]) -> Fingerprint {
    let mut out = Vec::new();
    for (sub, only_toml) in [("", true), ("lists", false)] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            // `metadata` follows symbolic links: a linked rule file counts as the file it points to.
            let is_file = std::fs::metadata(&path).is_ok_and(|m| m.is_file());
            if is_file && (!only_toml || path.extension().is_some_and(|x| x == "toml")) {
                out.push((Path::new(sub).join(e.file_name()).into_os_string(), crate::watch::stamp(&path)));
            }
        }
    }
    for f in list_files {
        out.push((f.as_os_str().to_owned(), crate::watch::stamp(&dir.join(f))));
    }
    out.sort();
    out.dedup_by(|a, b| Path::new(&a.0) == Path::new(&b.0));
    out
}

#[cfg(test)]
mod tests;
