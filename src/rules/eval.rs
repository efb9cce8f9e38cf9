//! Evaluation: the facts a phase knows ([`Facts`]), the message content extracted once with mail-parser
//! ([`Content`], in [`super::content`]), and the rules of a phase that hit ([`RuleSet::hits`]).
//!
//! Each regex field is run once through its `RegexSet`, and each word field once through its Aho-Corasick
//! automaton (lazily, on the first leaf that asks), so the cost of a phase is one automaton pass per field
//! used plus a cheap walk of the condition trees.

use std::cell::OnceCell;
use std::net::IpAddr;

pub use super::content::{Attachment, Content};
use super::{field, Cond, Leaf, ListField, Phase, RuleSet, WordField};

/// What is known when a phase runs.
#[derive(Debug)]
pub struct Facts<'a> {
    pub ip: IpAddr,
    /// The forward-confirmed reverse DNS name, if any.
    pub client_name: Option<&'a str>,
    pub listener: &'a str,
    pub helo: Option<&'a str>,
    pub auth_user: Option<&'a str>,
    pub mail_from: Option<&'a str>,
    /// At RCPT: the recipient being decided; at end of data: every accepted one.
    pub rcpts: &'a [String],
    pub size: u64,
    pub content: Option<&'a Content>,
}

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map_or("", |(_, d)| d)
}

impl RuleSet {
    /// The indices (into `rules`) of the rules of `phase` whose conditions hold, accept rules first.
    pub fn hits(&self, phase: Phase, facts: &Facts<'_>) -> Vec<usize> {
        let cache: Vec<OnceCell<Vec<bool>>> = (0..self.sets.len()).map(|_| OnceCell::new()).collect();
        let ev = Eval { set: self, facts, cache, word_cache: Default::default() };
        self.by_phase[phase as usize].iter().copied().filter(|&i| ev.cond(&self.rules[i].cond)).collect()
    }
}

impl RuleSet {
    /// Whether a condition compiled into this set (a limit's `when`/`unless`) holds.
    pub fn holds(&self, cond: &Cond, facts: &Facts<'_>) -> bool {
        let cache: Vec<OnceCell<Vec<bool>>> = (0..self.sets.len()).map(|_| OnceCell::new()).collect();
        Eval { set: self, facts, cache, word_cache: Default::default() }.cond(cond)
    }
}

struct Eval<'a, 'f> {
    set: &'a RuleSet,
    facts: &'a Facts<'f>,
    cache: Vec<OnceCell<Vec<bool>>>,
    /// Per [`WordField`]: which words of its automaton occur.
    word_cache: [OnceCell<Vec<bool>>; 2],
}

impl Eval<'_, '_> {
    fn cond(&self, c: &Cond) -> bool {
        match c {
            Cond::All(v) => v.iter().all(|c| self.cond(c)),
            Cond::Any(v) => v.iter().any(|c| self.cond(c)),
            Cond::Not(c) => !self.cond(c),
            Cond::Leaf(l) => self.leaf(l),
        }
    }

    fn values(&self, f: usize) -> Vec<&str> {
        let facts = self.facts;
        let content = facts.content;
        match f {
            field::HELO => facts.helo.into_iter().collect(),
            field::CLIENT_NAME => facts.client_name.into_iter().collect(),
            field::MAIL_FROM => facts.mail_from.into_iter().collect(),
            field::RCPT_TO => facts.rcpts.iter().map(String::as_str).collect(),
            field::AUTH_USER => facts.auth_user.into_iter().collect(),
            field::SUBJECT => content.and_then(|c| c.subject.as_deref()).into_iter().collect(),
            field::BODY => content.map(|c| c.texts.iter().map(String::as_str).collect()).unwrap_or_default(),
            field::URL_DOMAIN => {
                content.map(|c| c.url_domains.iter().map(String::as_str).collect()).unwrap_or_default()
            }
            field::ATTACHMENT_NAME => content.map(|c| c.file_names().collect()).unwrap_or_default(),
            h => match (content, self.set.header_names.get(h - field::HEADER_BASE)) {
                (Some(c), Some(name)) => c.header(name).collect(),
                _ => Vec::new(),
            },
        }
    }

    fn regex(&self, f: usize, idx: usize) -> bool {
        let Some(Some(set)) = self.set.sets.get(f) else { return false };
        let hits = self.cache[f].get_or_init(|| {
            let mut found = regex_automata::PatternSet::new(set.pattern_len());
            for v in self.values(f) {
                set.which_overlapping_matches(&regex_automata::Input::new(v), &mut found);
            }
            let mut hits = vec![false; set.pattern_len()];
            for p in found.iter() {
                hits[p.as_usize()] = true;
            }
            hits
        });
        hits.get(idx).copied().unwrap_or(false)
    }

    /// Whether any of the words `ids` occurs in the field (one automaton pass per field and phase).
    fn words(&self, f: WordField, ids: &[usize]) -> bool {
        let Some(set) = &self.set.words[f as usize] else { return false };
        let Some(content) = self.facts.content else { return false };
        let found = self.word_cache[f as usize].get_or_init(|| match f {
            WordField::Subject => set.scan(content.subject.as_deref()),
            WordField::Body => set.scan(content.texts.iter().map(String::as_str)),
        });
        ids.iter().any(|&i| found.get(i).copied().unwrap_or(false))
    }

    fn leaf(&self, l: &Leaf) -> bool {
        let facts = self.facts;
        let content = facts.content;
        match l {
            Leaf::Ip(s) => s.contains(facts.ip),
            Leaf::Regex { field, idx } => self.regex(*field, *idx),
            Leaf::Exact { field, addrs, domains } => self.values(*field).iter().any(|v| {
                let v = v.to_lowercase();
                addrs.contains(&v) || domains.contains(domain_of(&v))
            }),
            Leaf::Listener(names) => names.iter().any(|n| n == facts.listener),
            Leaf::SizeOver(n) => facts.size > *n,
            Leaf::FromSpoof => content.is_some_and(|c| self.display_spoof(c)),
            Leaf::UrlDomains(d) => content.is_some_and(|c| c.url_domains.iter().any(|u| d.contains(u))),
            Leaf::AttachmentExt(exts) => content.is_some_and(|c| {
                c.file_names().any(|n| {
                    let n = n.trim().trim_end_matches('.').to_lowercase();
                    n.rsplit_once('.').is_some_and(|(_, e)| exts.contains(e))
                })
            }),
            Leaf::AttachmentType(types) => content.is_some_and(|c| {
                c.attachments.iter().any(|a| {
                    a.declared_type.as_deref().is_some_and(|t| types.matches(t))
                        || a.sniffed_type.is_some_and(|t| types.matches(t))
                })
            }),
            Leaf::AttachmentSizeOver(n) => content.is_some_and(|c| c.attachments.iter().any(|a| a.size as u64 > *n)),
            Leaf::MimePartsOver(n) => content.is_some_and(|c| c.parts > *n),
            Leaf::MimeDepthOver(n) => content.is_some_and(|c| c.depth > *n),
            Leaf::Words { field, ids } => self.words(*field, ids),
            Leaf::ArchiveUnreadable => content.is_some_and(|c| c.archive_unreadable),
            Leaf::ArchiveEncrypted => content.is_some_and(|c| c.archive_encrypted),
            Leaf::MissingHeader(h) => content.is_some_and(|c| c.header(h).all(|v| v.trim().is_empty())),
            Leaf::InList { list, field } => self.in_list(*list, *field),
        }
    }

    fn in_list(&self, list: usize, f: ListField) -> bool {
        let Some(list) = self.set.lists.get(list) else { return false };
        let facts = self.facts;
        let c = facts.content;
        let check = |v: &str| !v.is_empty() && list.contains(v);
        match f {
            ListField::ClientIp => list.contains(&facts.ip.to_string()),
            ListField::Helo => facts.helo.is_some_and(check),
            ListField::MailFrom => facts.mail_from.is_some_and(check),
            ListField::MailFromDomain => facts.mail_from.is_some_and(|a| check(domain_of(a))),
            ListField::RcptTo => facts.rcpts.iter().any(|r| check(r)),
            ListField::RcptDomain => facts.rcpts.iter().any(|r| check(domain_of(r))),
            ListField::FromDomain => {
                c.and_then(|c| c.from.as_ref()).and_then(|f| f.1.as_deref()).is_some_and(|a| check(domain_of(a)))
            }
            ListField::UrlDomain => c.is_some_and(|c| c.url_domains.iter().any(|d| check(d))),
            ListField::Url => c.is_some_and(|c| c.urls.iter().any(|u| check(u))),
            ListField::AttachmentSha256 => c.is_some_and(|c| c.attachments.iter().any(|a| check(&a.sha256))),
        }
    }

    /// The display name claims an address or a local domain that the actual address does not have.
    fn display_spoof(&self, c: &Content) -> bool {
        let Some((Some(name), addr)) = &c.from else { return false };
        let addr = addr.as_deref().unwrap_or("").to_lowercase();
        let name = name.to_lowercase();
        let claimed_other_address = name
            .split(|ch: char| ch.is_whitespace() || "<>()\"',;".contains(ch))
            .filter(|w| w.contains('@') && w.len() > 2)
            .any(|w| w.trim_matches('.') != addr);
        if claimed_other_address {
            return true;
        }
        let addr_local = self.set.local_domains.contains(domain_of(&addr));
        !addr_local
            && name
                .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '.' || ch == '-'))
                .any(|w| w.contains('.') && self.set.local_domains.contains(w.trim_matches('.')))
    }
}
