//! Compiles parsed rule files into a [`RuleSet`]: one `RegexSet` per field for all rules, so evaluation
//! runs each field through one automaton whatever the rule count; lists into their lookup structures.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use toml::Spanned;

use super::lists::{parse_cidr, CidrSet, DomainSet, List, DEFAULT_FP_RATE};
use super::parse::{ActionKind, CondSpec, FileSpec, InListSpec, ListKind, RuleError, RuleSpec, StrOrList};
use super::sniff::TypePatterns;
use super::words::{self, WordSet};
use super::{field, Action, Cond, Leaf, ListField, Rule, RuleSet, WordField};
use crate::smtp::Reply;

/// Where a spanned item came from, to report errors.
pub(super) struct Src<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

/// Regexes collected per field before compilation: the pattern and where its rule's id is; likewise the
/// literal words per [`WordField`], each distinct word (ASCII case aside) once.
#[derive(Default)]
pub(super) struct Pool {
    patterns: Vec<Vec<(String, usize)>>,
    header_names: Vec<String>,
    words: [Vec<String>; 2],
    word_ids: [HashMap<String, usize>; 2],
}

impl Pool {
    fn add(&mut self, field: usize, pattern: &str, origin: usize) -> usize {
        if self.patterns.len() <= field {
            self.patterns.resize_with(field + 1, Vec::new);
        }
        self.patterns[field].push((pattern.to_string(), origin));
        self.patterns[field].len() - 1
    }

    /// The pattern id of a normalized word in the field's automaton.
    fn word(&mut self, f: WordField, word: String) -> usize {
        let (words, ids) = (&mut self.words[f as usize], &mut self.word_ids[f as usize]);
        *ids.entry(word.to_ascii_lowercase()).or_insert_with(|| {
            words.push(word);
            words.len() - 1
        })
    }

    fn header_field(&mut self, name: &str) -> usize {
        let name = name.to_ascii_lowercase();
        let i = match self.header_names.iter().position(|n| *n == name) {
            Some(i) => i,
            None => {
                self.header_names.push(name);
                self.header_names.len() - 1
            }
        };
        field::HEADER_BASE + i
    }
}

/// Everything read from the files, compiled. `files` are (path, text) in load order; `lists` maps a list
/// file path to its text (read by the caller).
pub fn compile(
    files: &[(std::path::PathBuf, String)],
    read_list: &mut dyn FnMut(&Path) -> Result<String, String>,
    local_domains: &[String],
) -> Result<RuleSet, Vec<RuleError>> {
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    for (path, text) in files {
        match super::parse::parse_file(path, text) {
            Ok(f) => parsed.push((path.as_path(), text.as_str(), f)),
            Err(e) => errors.push(e),
        }
    }
    let mut set = RuleSet { local_domains: DomainSet::new(local_domains.iter().cloned()), ..RuleSet::default() };
    let mut list_index: HashMap<String, (usize, ListKind)> = HashMap::new();
    for (path, text, f) in &parsed {
        load_lists(Src { path, text }, f, read_list, &mut set, &mut list_index, &mut errors);
        if let Some(s) = &f.scores {
            set.tag_at = s.tag_at.unwrap_or(set.tag_at);
            set.reject_at = s.reject_at.unwrap_or(set.reject_at);
            match s.subject_prefix.as_ref().map(|p| subject_prefix(p).map_err(|m| err(&Src { path, text }, p, m))) {
                Some(Ok(p)) => set.tag_subject_prefix = Some(p),
                Some(Err(e)) => errors.push(e),
                None => {}
            }
        }
    }
    let mut pool = Pool::default();
    let mut ids: HashSet<String> = HashSet::new();
    let mut origins = Vec::new();
    for (path, text, f) in &parsed {
        let src = Src { path, text };
        for r in &f.rules {
            if !ids.insert(r.id.get_ref().clone()) {
                errors.push(err(&src, &r.id, format!("duplicate rule id {:?}", r.id.get_ref())));
                continue;
            }
            origins.push((*path, *text, r.id.span().start));
            match rule(&src, r, &mut pool, &list_index, origins.len() - 1) {
                Ok(rule) => set.rules.push(rule),
                Err(e) => errors.push(e),
            }
        }
    }
    for (path, text, f) in &parsed {
        let src = Src { path, text };
        behaviour(&src, f, &mut pool, &list_index, &mut origins, &mut ids, &mut set, &mut errors);
    }
    build_sets(&mut set, pool, &origins, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    set.order();
    Ok(set)
}

pub(super) fn err<T>(src: &Src<'_>, at: &Spanned<T>, message: impl Into<String>) -> RuleError {
    RuleError::at(src.path, src.text, at.span().start, message)
}

/// The file's `[[limit]]` tables and `[greylist]` (`super::limits`); limit ids share the rules' namespace.
#[allow(clippy::too_many_arguments)]
fn behaviour<'a>(
    src: &Src<'a>,
    f: &FileSpec,
    pool: &mut Pool,
    lists: &HashMap<String, (usize, ListKind)>,
    origins: &mut Vec<(&'a Path, &'a str, usize)>,
    ids: &mut HashSet<String>,
    set: &mut RuleSet,
    errors: &mut Vec<RuleError>,
) {
    for l in &f.limits {
        if !ids.insert(l.id.get_ref().clone()) {
            errors.push(err(src, &l.id, format!("duplicate rule or limit id {:?}", l.id.get_ref())));
            continue;
        }
        origins.push((src.path, src.text, l.id.span().start));
        match super::limits::limit(src, l, pool, lists, origins.len() - 1) {
            Ok(limit) => set.limits.push(limit),
            Err(e) => errors.push(e),
        }
    }
    if let Some(g) = &f.greylist {
        if set.greylist.is_some() {
            errors.push(err(src, g, "a second [greylist] table (only one file may have one)"));
            return;
        }
        origins.push((src.path, src.text, g.span().start));
        match super::limits::greylist(src, g, pool, lists, origins.len() - 1) {
            Ok(gl) => set.greylist = Some(gl),
            Err(e) => errors.push(e),
        }
    }
}

fn load_lists(
    src: Src<'_>,
    f: &FileSpec,
    read_list: &mut dyn FnMut(&Path) -> Result<String, String>,
    set: &mut RuleSet,
    index: &mut HashMap<String, (usize, ListKind)>,
    errors: &mut Vec<RuleError>,
) {
    for l in &f.lists {
        let spec = l.get_ref();
        if index.contains_key(&spec.name) {
            errors.push(err(&src, l, format!("duplicate list name {:?}", spec.name)));
            continue;
        }
        let text = match read_list(&spec.file) {
            Ok(t) => t,
            Err(m) => {
                errors.push(err(&src, l, format!("list {:?}: cannot read {}: {m}", spec.name, spec.file.display())));
                continue;
            }
        };
        let bloom = spec.bloom.then(|| spec.fp_rate.unwrap_or(DEFAULT_FP_RATE));
        match List::load(spec.kind, &text, bloom) {
            Ok(list) => {
                index.insert(spec.name.clone(), (set.lists.len(), spec.kind));
                set.lists.push(list);
            }
            Err((0, m)) => errors.push(err(&src, l, format!("list {:?}: {m}", spec.name))),
            Err((line, m)) => errors.push(RuleError { file: spec.file.clone(), line, col: 1, message: m }),
        }
    }
}

fn rule(
    src: &Src<'_>,
    r: &RuleSpec,
    pool: &mut Pool,
    lists: &HashMap<String, (usize, ListKind)>,
    origin: usize,
) -> Result<Rule, RuleError> {
    let cond = cond(src, &r.when, pool, lists, origin)?;
    let kind = match (&r.action, r.score) {
        (Some(a), _) => *a.get_ref(),
        (None, Some(_)) => ActionKind::Score,
        (None, None) => return Err(err(src, &r.id, "rule needs an action (or a score)")),
    };
    let reply = match &r.reply {
        Some(text) => Some(parse_reply(text.get_ref(), kind).map_err(|m| err(src, text, m))?),
        None => None,
    };
    let headers: Vec<String> = r.headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    for (k, v) in &r.headers {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic() && b != b':') || v.contains(['\r', '\n']) {
            return Err(err(src, &r.id, format!("invalid header {k:?}")));
        }
    }
    let action = match kind {
        ActionKind::Accept => Action::Accept,
        ActionKind::Reject => Action::Reject(reply),
        ActionKind::Tempfail => Action::Tempfail(reply),
        ActionKind::Discard => Action::Discard,
        ActionKind::Tag => Action::Tag { headers, subject_prefix: None },
        ActionKind::Score => match r.score {
            Some(s) if s.is_finite() => Action::Score(s),
            _ => return Err(err(src, &r.id, "action \"score\" needs a finite score = N")),
        },
        ActionKind::Quarantine => Action::Quarantine { deliver: r.deliver, headers },
    };
    let action = match (action, &r.subject_prefix) {
        (Action::Tag { headers, .. }, Some(p)) => {
            Action::Tag { headers, subject_prefix: Some(subject_prefix(p).map_err(|m| err(src, p, m))?) }
        }
        (_, Some(p)) => return Err(err(src, p, "subject_prefix applies to action \"tag\" only")),
        (action, None) => action,
    };
    let phase = cond.phase();
    Ok(Rule { id: r.id.get_ref().as_str().into(), description: r.description.clone(), phase, cond, action })
}

/// Longest Subject prefix accepted: a tag, not a sentence.
const MAX_SUBJECT_PREFIX: usize = 64;

/// A Subject prefix goes into a header as is, so it must be printable ASCII on one line (non-ASCII would
/// need RFC 2047 encoding).
fn subject_prefix(p: &Spanned<String>) -> Result<String, String> {
    let p = p.get_ref();
    if p.trim().is_empty() || p.len() > MAX_SUBJECT_PREFIX || !p.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!(
            "subject_prefix {p:?} must be 1 to {MAX_SUBJECT_PREFIX} printable ASCII characters on one line"
        ));
    }
    Ok(p.clone())
}

/// `"550 5.7.1 text"`: the code must suit the action.
fn parse_reply(text: &str, kind: ActionKind) -> Result<Reply, String> {
    let (code, rest) = text.split_once(' ').unwrap_or((text, ""));
    let code: u16 = Some(code)
        .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("reply {text:?} must start with a 3-digit code"))?;
    let ok = match kind {
        ActionKind::Reject => (500..600).contains(&code),
        ActionKind::Tempfail => (400..500).contains(&code),
        _ => false,
    };
    if !ok {
        return Err(format!("reply code {code} does not suit action {:?}", kind.as_str()));
    }
    if rest.contains(['\r', '\n']) {
        return Err("reply text must be one line".into());
    }
    Ok(Reply::new(code, if rest.is_empty() { "5.7.1 refused by policy" } else { rest }))
}

pub(super) fn cond(
    src: &Src<'_>,
    spec: &Spanned<CondSpec>,
    pool: &mut Pool,
    lists: &HashMap<String, (usize, ListKind)>,
    origin: usize,
) -> Result<Cond, RuleError> {
    let c = spec.get_ref();
    let mut out: Vec<Cond> = Vec::new();
    let rx = |pool: &mut Pool, f: usize, p: &str| Cond::Leaf(Leaf::Regex { field: f, idx: pool.add(f, p, origin) });
    if let Some(v) = &c.all {
        out.push(Cond::All(v.iter().map(|s| cond(src, s, pool, lists, origin)).collect::<Result<_, _>>()?));
    }
    if let Some(v) = &c.any {
        out.push(Cond::Any(v.iter().map(|s| cond(src, s, pool, lists, origin)).collect::<Result<_, _>>()?));
    }
    if let Some(v) = &c.not {
        out.push(Cond::Not(Box::new(cond(src, v, pool, lists, origin)?)));
    }
    if let Some(v) = &c.client_ip {
        let ranges = v.iter().map(|s| parse_cidr(s)).collect::<Result<Vec<_>, _>>().map_err(|m| err(src, spec, m))?;
        out.push(Cond::Leaf(Leaf::Ip(CidrSet::new(ranges))));
    }
    if let Some(p) = &c.client_name {
        out.push(rx(pool, field::CLIENT_NAME, p));
    }
    if let Some(p) = &c.helo {
        out.push(rx(pool, field::HELO, p));
    }
    for (f, v) in [(field::MAIL_FROM, &c.mail_from), (field::RCPT_TO, &c.rcpt_to), (field::AUTH_USER, &c.auth_user)] {
        match v {
            Some(StrOrList::One(p)) => out.push(rx(pool, f, p)),
            Some(StrOrList::Many(l)) => {
                let (addrs, domains): (Vec<_>, Vec<_>) = l.iter().partition(|e| e.find('@').is_some_and(|i| i > 0));
                out.push(Cond::Leaf(Leaf::Exact {
                    field: f,
                    addrs: addrs.iter().map(|a| a.to_lowercase()).collect(),
                    domains: DomainSet::new(domains.into_iter().cloned()),
                }));
            }
            None => {}
        }
    }
    if let Some(v) = &c.listener {
        out.push(Cond::Leaf(Leaf::Listener(v.clone())));
    }
    if let Some(n) = c.size_over {
        out.push(Cond::Leaf(Leaf::SizeOver(n)));
    }
    if let Some(h) = &c.header {
        let f = pool.header_field(&h.name);
        out.push(rx(pool, f, &h.regex));
    }
    if let Some(p) = &c.subject {
        out.push(rx(pool, field::SUBJECT, p));
    }
    if let Some(b) = c.from_display_spoof {
        let leaf = Cond::Leaf(Leaf::FromSpoof);
        out.push(if b { leaf } else { Cond::Not(Box::new(leaf)) });
    }
    if let Some(p) = &c.body {
        out.push(rx(pool, field::BODY, p));
    }
    match &c.url_domain {
        Some(StrOrList::One(p)) => out.push(rx(pool, field::URL_DOMAIN, p)),
        Some(StrOrList::Many(l)) => out.push(Cond::Leaf(Leaf::UrlDomains(DomainSet::new(l.iter().cloned())))),
        None => {}
    }
    if let Some(p) = &c.attachment_name {
        out.push(rx(pool, field::ATTACHMENT_NAME, p));
    }
    if let Some(v) = &c.attachment_ext {
        let exts = v.iter().map(|e| e.trim_start_matches('.').to_lowercase()).collect();
        out.push(Cond::Leaf(Leaf::AttachmentExt(exts)));
    }
    if let Some(n) = c.mime_parts_over {
        out.push(Cond::Leaf(Leaf::MimePartsOver(n)));
    }
    attachment_leaves(c, &mut out).map_err(|m| err(src, spec, m))?;
    for (f, list) in [(WordField::Subject, &c.subject_words), (WordField::Body, &c.body_words)] {
        if let Some(list) = list {
            out.push(words_leaf(pool, f, list).map_err(|m| err(src, spec, m))?);
        }
    }
    if let Some(h) = &c.missing_header {
        out.push(Cond::Leaf(Leaf::MissingHeader(h.to_ascii_lowercase())));
    }
    if let Some(l) = &c.in_list {
        out.push(in_list(l, lists).map_err(|m| err(src, spec, m))?);
    }
    auth_leaves(c, &mut out).map_err(|m| err(src, spec, m))?;
    match out.len() {
        1 => Ok(out.remove(0)),
        0 => Err(err(src, spec, "empty condition: set one of all, any, not or a condition key")),
        _ => Err(err(src, spec, "a condition table has exactly one key; combine several with all = [...]")),
    }
}

/// The leaves on attachments' types, sizes and archives, and on the MIME structure's depth.
fn attachment_leaves(c: &CondSpec, out: &mut Vec<Cond>) -> Result<(), String> {
    if let Some(v) = &c.attachment_type {
        out.push(Cond::Leaf(Leaf::AttachmentType(TypePatterns::parse(v)?)));
    }
    if let Some(n) = c.attachment_size_over {
        out.push(Cond::Leaf(Leaf::AttachmentSizeOver(n)));
    }
    if let Some(n) = c.mime_depth_over {
        out.push(Cond::Leaf(Leaf::MimeDepthOver(n)));
    }
    let flags = [
        (c.archive_unreadable, Leaf::ArchiveUnreadable),
        (c.archive_encrypted, Leaf::ArchiveEncrypted),
        (c.mime_malformed, Leaf::MimeMalformed),
    ];
    for (flag, leaf) in flags {
        match flag {
            Some(true) => out.push(Cond::Leaf(leaf)),
            Some(false) => out.push(Cond::Not(Box::new(Cond::Leaf(leaf)))),
            None => {}
        }
    }
    Ok(())
}

/// `body_words = [...]`: the words go into the field's shared automaton; the leaf keeps their ids.
fn words_leaf(pool: &mut Pool, f: WordField, list: &[String]) -> Result<Cond, String> {
    if list.is_empty() {
        return Err("a word list needs at least one entry".into());
    }
    let mut ids = Vec::with_capacity(list.len());
    for w in list {
        ids.push(pool.word(f, words::normalize(w)?));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(Cond::Leaf(Leaf::Words { field: f, ids }))
}

fn in_list(spec: &InListSpec, lists: &HashMap<String, (usize, ListKind)>) -> Result<Cond, String> {
    let (name, field) = match spec {
        InListSpec::Name(n) => (n, None),
        InListSpec::Full { list, field } => (list, field.as_deref()),
    };
    let &(list, kind) = lists.get(name).ok_or_else(|| format!("unknown list {name:?} (declare it with [[list]])"))?;
    let field = match (field, kind) {
        (Some(f), _) => ListField::parse(f).ok_or_else(|| format!("unknown list field {f:?}"))?,
        (None, ListKind::Ip) => ListField::ClientIp,
        (None, ListKind::Domain) => ListField::MailFromDomain,
        (None, ListKind::Address) => ListField::MailFrom,
        (None, ListKind::Hash) => ListField::AttachmentSha256,
    };
    Ok(Cond::Leaf(Leaf::InList { list, field }))
}

/// Compiles every field's patterns into one `RegexSet`. On failure, the bad patterns are found one by one
/// (only then) so each error names its rule.
fn build_sets(set: &mut RuleSet, pool: Pool, origins: &[(&Path, &str, usize)], errors: &mut Vec<RuleError>) {
    set.header_names = pool.header_names;
    for (slot, words) in set.words.iter_mut().zip(&pool.words) {
        if words.is_empty() {
            continue;
        }
        match WordSet::new(words) {
            Ok(w) => *slot = Some(w),
            Err(m) => errors.push(RuleError::file(Path::new("<rules>"), m)),
        }
    }
    for pats in pool.patterns {
        if pats.is_empty() {
            set.sets.push(None);
            continue;
        }
        let built = field_regex(pats.iter().map(|(p, _)| p.as_str()).collect());
        match built {
            Ok(s) => set.sets.push(Some(s)),
            Err(e) => {
                let mut found = false;
                for (p, o) in &pats {
                    if let Err(e) = regex::Regex::new(p) {
                        let (path, text, at) = &origins[*o];
                        errors.push(RuleError::at(path, text, *at, format!("invalid regex {p:?}: {e}")));
                        found = true;
                    }
                }
                if !found {
                    errors.push(RuleError::file(Path::new("<rules>"), format!("regex set too large: {e}")));
                }
                set.sets.push(None);
            }
        }
    }
}

/// Patterns up to which a literal prefilter is built. Building it is superlinear in the pattern count (3,334
/// case-insensitive patterns took 14 s with it, 0.15 s without); past this many patterns the lazy DFA alone
/// is fast enough.
const PREFILTER_MAX_PATTERNS: usize = 64;

/// One multi-pattern regex for a field: `MatchKind::All` so every matching pattern is reported, as
/// `regex::RegexSet` does, with the same syntax as the `regex` crate.
fn field_regex(patterns: Vec<&str>) -> Result<regex_automata::meta::Regex, Box<regex_automata::meta::BuildError>> {
    let config = regex_automata::meta::Config::new()
        .match_kind(regex_automata::MatchKind::All)
        .auto_prefilter(patterns.len() <= PREFILTER_MAX_PATTERNS)
        .which_captures(regex_automata::nfa::thompson::WhichCaptures::None)
        // Generous limits: thousands of rules compile into one program; the defaults suit one regex.
        .nfa_size_limit(Some(1 << 30))
        .hybrid_cache_capacity(64 << 20);
    regex_automata::meta::Regex::builder().configure(config).build_many(&patterns).map_err(Box::new)
}

/// The DNS list and sender-authentication conditions (`dnsbl`, `spf`, `dmarc_policy`, ...).
fn auth_leaves(c: &CondSpec, out: &mut Vec<Cond>) -> Result<(), String> {
    use super::auth_facts::AuthKey;
    let keys = [
        (AuthKey::Dnsbl, &c.dnsbl),
        (AuthKey::Uribl, &c.uribl),
        (AuthKey::Spf, &c.spf),
        (AuthKey::SpfHelo, &c.spf_helo),
        (AuthKey::Dkim, &c.dkim),
        (AuthKey::Dmarc, &c.dmarc),
        (AuthKey::DmarcPolicy, &c.dmarc_policy),
        (AuthKey::Arc, &c.arc),
    ];
    for (key, spec) in keys {
        let values = match spec {
            Some(StrOrList::One(v)) => vec![v.clone()],
            Some(StrOrList::Many(v)) => v.clone(),
            None => continue,
        };
        key.check(&values)?;
        out.push(Cond::Leaf(Leaf::Auth { key, values }));
    }
    Ok(())
}
