//! Evaluation: the facts a phase knows ([`Facts`]), the message content extracted once with mail-parser
//! ([`Content`]), and the rules of a phase that hit ([`RuleSet::hits`]).
//!
//! Each regex field is run once through its `RegexSet` (lazily, on the first leaf that asks), so the cost
//! of a phase is one automaton pass per field used plus a cheap walk of the condition trees.

use std::cell::OnceCell;
use std::net::IpAddr;

use mail_parser::{HeaderValue, MessageParser, MimeHeaders};

use super::{field, Cond, Leaf, ListField, Phase, RuleSet};

/// The most URLs taken from one message (bounds the work on hostile bodies).
const MAX_URLS: usize = 1000;

/// What the content rules see of a message, decoded.
#[derive(Debug, Default)]
pub struct Content {
    /// (lower-case name, decoded value), in order.
    pub headers: Vec<(String, String)>,
    pub subject: Option<String>,
    /// The first From address: (display name, address).
    pub from: Option<(Option<String>, Option<String>)>,
    /// Decoded text/plain and text/html parts.
    pub texts: Vec<String>,
    pub urls: Vec<String>,
    pub url_domains: Vec<String>,
    /// Attachment file names (possibly empty) and their SHA-256 (hex).
    pub attachments: Vec<(String, String)>,
    pub parts: usize,
}

impl Content {
    /// Parses a message (or the scanned part of it).
    pub fn parse(raw: &[u8]) -> Content {
        let mut c = Content::default();
        // A non-empty header map makes mail-parser use the default (RFC 2047-decoding text) parser for every
        // other header; with an empty map it keeps unknown headers raw.
        let parser = MessageParser::new().with_minimal_headers().with_address_headers().with_message_ids();
        let Some(msg) = parser.default_header_text().parse(raw) else { return c };
        for h in msg.headers() {
            c.headers.push((h.name.as_str().to_ascii_lowercase(), header_text(&h.value)));
        }
        c.subject = msg.subject().map(str::to_string);
        c.from =
            msg.from().and_then(|a| a.first()).map(|a| (a.name().map(str::to_string), a.address().map(str::to_string)));
        for i in 0.. {
            let Some(t) = msg.body_text(i) else { break };
            c.texts.push(t.into_owned());
        }
        for i in 0.. {
            let Some(t) = msg.body_html(i) else { break };
            c.texts.push(t.into_owned());
        }
        for a in msg.attachments() {
            let name = a.attachment_name().unwrap_or("").to_string();
            let hash = ring::digest::digest(&ring::digest::SHA256, a.contents());
            c.attachments.push((name, hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()));
        }
        c.parts = msg.parts.len();
        c.extract_urls();
        c
    }

    fn extract_urls(&mut self) {
        for t in &self.texts {
            for (i, _) in t.match_indices("://") {
                if self.urls.len() >= MAX_URLS {
                    return;
                }
                let scheme_start = t[..i].rfind(|ch: char| !ch.is_ascii_alphanumeric()).map_or(0, |p| p + 1);
                let scheme = t[scheme_start..i].to_ascii_lowercase();
                if scheme != "http" && scheme != "https" {
                    continue;
                }
                let rest = &t[i + 3..];
                let end = rest.find(|ch: char| ch.is_whitespace() || "\"'<>()[]{}".contains(ch)).unwrap_or(rest.len());
                let url = &rest[..end];
                let host = url.split(['/', '?', '#']).next().unwrap_or("");
                let host = host.rsplit('@').next().unwrap_or(host);
                let host = host.split(':').next().unwrap_or(host).trim_end_matches('.').to_ascii_lowercase();
                if !host.is_empty() {
                    self.urls.push(format!("{scheme}://{url}"));
                    self.url_domains.push(host);
                }
            }
        }
    }

    fn header<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn header_text(v: &HeaderValue<'_>) -> String {
    match v {
        HeaderValue::Text(t) => t.to_string(),
        HeaderValue::TextList(l) => l.join(", "),
        HeaderValue::Address(a) => a
            .iter()
            .map(|x| match (x.name(), x.address()) {
                (Some(n), Some(a)) => format!("{n} <{a}>"),
                (None, Some(a)) => a.to_string(),
                (Some(n), None) => n.to_string(),
                (None, None) => String::new(),
            })
            .collect::<Vec<_>>()
            .join(", "),
        HeaderValue::DateTime(d) => d.to_rfc3339(),
        HeaderValue::ContentType(ct) => match ct.subtype() {
            Some(s) => format!("{}/{s}", ct.ctype()),
            None => ct.ctype().to_string(),
        },
        _ => String::new(),
    }
}

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
        let ev = Eval { set: self, facts, cache };
        self.by_phase[phase as usize].iter().copied().filter(|&i| ev.cond(&self.rules[i].cond)).collect()
    }
}

struct Eval<'a, 'f> {
    set: &'a RuleSet,
    facts: &'a Facts<'f>,
    cache: Vec<OnceCell<Vec<bool>>>,
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
            field::ATTACHMENT_NAME => {
                content.map(|c| c.attachments.iter().map(|(n, _)| n.as_str()).collect()).unwrap_or_default()
            }
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
                c.attachments.iter().any(|(n, _)| {
                    let n = n.trim().trim_end_matches('.').to_lowercase();
                    n.rsplit_once('.').is_some_and(|(_, e)| exts.contains(e))
                })
            }),
            Leaf::MimePartsOver(n) => content.is_some_and(|c| c.parts > *n),
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
            ListField::AttachmentSha256 => c.is_some_and(|c| c.attachments.iter().any(|(_, h)| check(h))),
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
