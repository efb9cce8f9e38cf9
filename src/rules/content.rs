//! The message content the end-of-data rules see, extracted once per message with mail-parser: decoded
//! headers and texts, URLs, attachments with their declared and sniffed types, the names inside zip
//! attachments, and the MIME structure's size and depth.
//!
//! Runs on at most `scan_window` bytes: inline for up to 32 KiB, else in `spawn_blocking` (see
//! `pipeline::rules`); every list built here is bounded by that input or by a constant below.

use std::borrow::Cow;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use mail_parser::{Encoding, HeaderValue, Message, MessageParser, MessagePart, MimeHeaders, PartType};

use super::{sniff, zip};

/// The most URLs taken from one message (bounds the work on hostile bodies).
const MAX_URLS: usize = 1000;

/// The most names taken from all the zip attachments of one message together: [`zip::MAX_ENTRIES`] per
/// archive times ten archives. Past it the message counts as `archive_unreadable`.
pub const MAX_ARCHIVE_NAMES: usize = 10 * zip::MAX_ENTRIES;

/// One attachment, as mail-parser lists them (top-level parts; the parts of an attached message are not
/// looked into).
#[derive(Debug, Default, Clone)]
pub struct Attachment {
    /// The file name (possibly empty).
    pub name: String,
    /// SHA-256 (lower-case hex) of the decoded content.
    pub sha256: String,
    /// The declared `Content-Type` (`type/subtype`), canonical (see [`sniff::canonical`]).
    pub declared_type: Option<String>,
    /// The type its first bytes show (see [`sniff::sniff`]), refined for zip archives by their entries.
    pub sniffed_type: Option<&'static str>,
    /// Decoded size in bytes (of the part of it within the scan window).
    pub size: usize,
}

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
    pub attachments: Vec<Attachment>,
    /// File names (last path component) listed inside zip attachments, one level deep.
    pub archive_names: Vec<String>,
    /// A zip attachment (declared or sniffed) whose entries could not all be listed.
    pub archive_unreadable: bool,
    /// A zip attachment with an encrypted entry.
    pub archive_encrypted: bool,
    /// A multipart of the message has more delimiter lines than the parts mail-parser returned for it: on
    /// malformed MIME (an empty multipart, a message/rfc822 part that is not a message) mail-parser 0.11.9
    /// loses the boundaries and folds the parts after it into one, which no content rule then sees.
    pub mime_malformed: bool,
    /// The number of MIME parts (of the top-level message).
    pub parts: usize,
    /// How deeply multiparts and attached messages nest: 0 for a single-part message, 1 for a multipart
    /// of leaf parts, one more for each multipart or message/rfc822 inside another.
    pub depth: usize,
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
        // Each text/plain and text/html body part once, as its decoded text. Not `body_text`/`body_html`:
        // those convert a part that lacks its alternative (html to text, text to html), which doubled the
        // text every body rule scans and cost more than the rest of the parse (perf, 10 KiB plain messages).
        let mut seen = Vec::new();
        for &id in msg.text_body.iter().chain(&msg.html_body) {
            if seen.contains(&id) {
                continue;
            }
            seen.push(id);
            if let Some(t) = msg.parts.get(id as usize).and_then(|p| p.text_contents()) {
                c.texts.push(t.to_string());
            }
        }
        for a in msg.attachments() {
            c.add_attachment(a, raw);
        }
        c.parts = msg.parts.len();
        c.mime_malformed = lost_parts(&msg, raw);
        c.depth = depth(&msg);
        c.extract_urls();
        c
    }

    fn add_attachment(&mut self, part: &MessagePart<'_>, raw: &[u8]) {
        let bytes = attachment_bytes(part, raw);
        let declared_type = part.content_type().map(|ct| match ct.subtype() {
            Some(s) => sniff::canonical(&format!("{}/{s}", ct.ctype())),
            None => sniff::canonical(ct.ctype()),
        });
        let mut sniffed_type = sniff::sniff(&bytes);
        let sniffed_zip = sniffed_type == Some("application/zip");
        if sniffed_zip || declared_type.as_deref().is_some_and(sniff::is_zip) {
            let listing = zip::list(&bytes);
            if sniffed_zip {
                sniffed_type = Some(sniff::refine_zip(listing.paths.iter().map(String::as_str)));
            }
            self.add_archive(listing);
        }
        let hash = ring::digest::digest(&ring::digest::SHA256, &bytes);
        self.attachments.push(Attachment {
            name: part.attachment_name().unwrap_or("").to_string(),
            sha256: hash.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
            declared_type,
            sniffed_type,
            size: bytes.len(),
        });
    }

    /// Keeps the last path component of each listed entry, up to [`MAX_ARCHIVE_NAMES`] per message.
    fn add_archive(&mut self, listing: zip::Listing) {
        self.archive_unreadable |= !listing.complete;
        self.archive_encrypted |= listing.encrypted;
        for path in listing.paths {
            if self.archive_names.len() >= MAX_ARCHIVE_NAMES {
                self.archive_unreadable = true;
                return;
            }
            let name = path.rsplit(['/', '\\']).next().unwrap_or(&path);
            self.archive_names.push(name.to_string());
        }
    }

    fn extract_urls(&mut self) {
        for t in &self.texts {
            for i in memchr::memmem::find_iter(t.as_bytes(), b"://") {
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

    /// The values of every header named `name` (lower-case).
    pub fn header<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Attachment names, then the names listed inside zip attachments.
    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.attachments.iter().map(|a| a.name.as_str()).chain(self.archive_names.iter().map(String::as_str))
    }
}

/// The attachment's content as it was sent. mail-parser converts text/* parts to UTF-8 (lossily, with
/// their charset), which would hide the magic bytes and the zip directory of a binary file declared
/// `text/plain`; for those the transfer encoding is undone again from the raw message. Binary parts are
/// borrowed as they are.
///
/// A part mail-parser left undecoded although it declares base64 is decoded here too, up to the first
/// line that starts a boundary: mail-parser 0.11.9 loses track of the boundaries after an empty multipart
/// (`--inner--` right after its headers) and returns the following parts as raw text, which would hide a
/// zip or a program from every content rule (found by `tests/fuzz.rs`).
fn attachment_bytes<'a>(part: &'a MessagePart<'_>, raw: &'a [u8]) -> Cow<'a, [u8]> {
    if !matches!(part.body, PartType::Text(_) | PartType::Html(_)) {
        return Cow::Borrowed(part.contents());
    }
    let Some(body) = raw.get(part.offset_body as usize..part.offset_end as usize) else {
        return Cow::Borrowed(part.contents());
    };
    let declared_base64 = part.content_transfer_encoding().is_some_and(|e| e.trim().eq_ignore_ascii_case("base64"));
    match part.encoding {
        Encoding::None if declared_base64 => {
            let end = memchr::memmem::find(body, b"\n--").map_or(body.len(), |i| i + 1);
            decode_base64(&body[..end]).map_or(Cow::Borrowed(body), Cow::Owned)
        }
        Encoding::Base64 => decode_base64(body).map_or(Cow::Borrowed(part.contents()), Cow::Owned),
        Encoding::None => Cow::Borrowed(body),
        Encoding::QuotedPrintable => Cow::Borrowed(part.contents()),
    }
}

/// Base64 as mail clients write it: line breaks and stray characters skipped, padding optional.
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(true),
    );
    let mut clean: Vec<u8> = text
        .iter()
        .copied()
        .take_while(|&b| b != b'=')
        .filter(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
        .collect();
    if clean.len() % 4 == 1 {
        clean.pop();
    }
    LENIENT.decode(&clean).ok()
}

/// The nesting depth of containers (multipart, message/rfc822), walked with an explicit stack so a
/// deeply nested message cannot overflow ours. mail-parser numbers a part's children after it, so
/// following only higher ids also rules out a cycle.
fn depth(msg: &Message<'_>) -> usize {
    let mut deepest = 0;
    let mut stack: Vec<(&Message<'_>, u32, usize)> = vec![(msg, 0, 0)];
    while let Some((m, id, level)) = stack.pop() {
        let Some(part) = m.parts.get(id as usize) else { continue };
        match &part.body {
            PartType::Multipart(children) => {
                deepest = deepest.max(level + 1);
                stack.extend(children.iter().filter(|&&c| c > id).map(|&c| (m, c, level + 1)));
            }
            PartType::Message(inner) => {
                deepest = deepest.max(level + 1);
                stack.push((inner, 0, level + 1));
            }
            _ => {}
        }
    }
    deepest
}

/// Whether some multipart of the top-level message has more delimiter lines (`--boundary`, RFC 2046 5.1.1)
/// in its body than mail-parser returned parts for it. Boundaries cannot occur inside parts (that is what
/// makes them boundaries), so a surplus means parts were lost, not that the sender wrote odd text.
fn lost_parts(msg: &Message<'_>, raw: &[u8]) -> bool {
    msg.parts.iter().any(|part| {
        let PartType::Multipart(children) = &part.body else { return false };
        let Some(boundary) = part.content_type().and_then(|c| c.attribute("boundary")) else { return false };
        let Some(body) = raw.get(part.offset_body as usize..part.offset_end as usize) else { return false };
        let delimiters = body
            .split(|&b| b == b'\n')
            .filter(|line| {
                let rest = line.strip_prefix(b"--").and_then(|l| l.strip_prefix(boundary.as_bytes()));
                rest.is_some_and(|r| r.iter().all(|b| b.is_ascii_whitespace()))
            })
            .count();
        delimiters > children.len()
    })
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
