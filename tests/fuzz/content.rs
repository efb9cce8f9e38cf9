//! The MIME/attachment/zip scan: zip directories (round trip of what was stored, bounds on what a damaged
//! or hostile archive yields), type sniffing, and whole messages built from random MIME pieces through
//! `Content::parse` and the shipped rules.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use base64::Engine as _;
use bolero::{check, generator::TypeGenerator};
use moat::rules::content::{Content, MAX_ARCHIVE_NAMES};
use moat::rules::eval::Facts;
use moat::rules::{sniff, zip, Phase, RuleSet};

/// One stored zip entry: its name, general-purpose flags and data.
#[derive(Clone, Debug, TypeGenerator)]
pub struct Entry {
    name: String,
    flags: u8,
    data: Vec<u8>,
}

/// A stored (uncompressed) zip archive, as zip tools write it, after `prefix` (a self-extractor stub).
fn archive(entries: &[Entry], prefix: &[u8]) -> Vec<u8> {
    let le16 = |v: usize| (v as u16).to_le_bytes();
    let le32 = |v: usize| (v as u32).to_le_bytes();
    let mut out = prefix.to_vec();
    let mut central = Vec::new();
    for e in entries {
        let name = &e.name.as_bytes()[..e.name.len().min(0xffff)];
        let offset = out.len() - prefix.len();
        let flags = u16::from(e.flags) & 0x1; // encrypted or not; sizes always in the header
        out.extend_from_slice(b"PK\x03\x04\x14\x00");
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(&le32(e.data.len()));
        out.extend_from_slice(&le32(e.data.len()));
        out.extend_from_slice(&le16(name.len()));
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(name);
        out.extend_from_slice(&e.data);
        central.extend_from_slice(b"PK\x01\x02\x14\x00\x14\x00");
        central.extend_from_slice(&flags.to_le_bytes());
        central.extend_from_slice(&[0; 10]);
        central.extend_from_slice(&le32(e.data.len()));
        central.extend_from_slice(&le32(e.data.len()));
        central.extend_from_slice(&le16(name.len()));
        central.extend_from_slice(&[0; 12]);
        central.extend_from_slice(&le32(offset));
        central.extend_from_slice(name);
    }
    let cd_offset = out.len() - prefix.len();
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
    out.extend_from_slice(&le16(entries.len()));
    out.extend_from_slice(&le16(entries.len()));
    out.extend_from_slice(&le32(central.len()));
    out.extend_from_slice(&le32(cd_offset));
    out.extend_from_slice(&[0, 0]);
    out
}

/// A zip archive, possibly damaged: bytes overwritten, or cut short.
#[derive(Clone, Debug, TypeGenerator)]
pub struct Zip {
    entries: Vec<Entry>,
    prefix: Vec<u8>,
    damage: Vec<(u16, u8)>,
    cut: Option<u16>,
}

impl Zip {
    fn bytes(&self) -> Vec<u8> {
        let mut z = archive(&self.entries, &self.prefix);
        for &(at, b) in &self.damage {
            let len = z.len();
            if len > 0 {
                z[usize::from(at) % len] = b;
            }
        }
        if let Some(c) = self.cut {
            z.truncate(usize::from(c));
        }
        z
    }

    fn intact(&self) -> bool {
        self.damage.is_empty() && self.cut.is_none_or(|c| usize::from(c) >= archive(&self.entries, &self.prefix).len())
    }

    /// The paths a reader must list: files, not directories or nameless entries.
    fn files(&self) -> Vec<String> {
        let named = |n: &&str| !n.is_empty() && !n.ends_with('/') && !n.ends_with('\\');
        self.entries.iter().map(|e| e.name.as_str()).filter(named).map(str::to_string).collect()
    }
}

/// Zip listing: an intact archive lists exactly its files (round trip); any archive, damaged or random
/// bytes, yields a bounded listing without a panic.
#[test]
fn zip_listing() {
    check!().with_iterations(3_000).with_type::<(Zip, Vec<u8>)>().for_each(|(zip, raw)| {
        for bytes in [zip.bytes(), raw.clone()] {
            let l = zip::list(&bytes);
            assert!(l.paths.len() <= zip::MAX_ENTRIES);
            let listed: usize = l.paths.iter().map(String::len).sum();
            assert!(listed <= 3 * bytes.len(), "{listed} bytes of names from {} bytes", bytes.len());
            let _ = sniff::sniff(&bytes);
            let _ = sniff::refine_zip(l.paths.iter().map(String::as_str));
        }
        if zip.intact() && zip.entries.iter().all(|e| e.name.len() <= 0xffff) {
            let l = zip::list(&zip.bytes());
            assert!(l.complete, "{zip:?}");
            assert_eq!(l.paths, zip.files());
            assert_eq!(l.encrypted, zip.entries.iter().any(|e| e.flags & 1 == 1));
        }
    });
}

const CTYPES: &[&str] = &[
    "text/plain; charset=utf-8",
    "text/html",
    "text/plain; charset=iso-8859-1",
    "application/zip",
    "application/octet-stream",
    "application/pdf",
    "image/png",
    "message/rfc822",
    "text/plain; charset=\"unknown-8bit\"",
];
const ENCODINGS: &[&str] = &["", "base64", "quoted-printable", "7bit", "8bit", "x-unknown"];

/// A piece of a MIME message; multiparts open and close like brackets.
#[derive(Clone, Debug, TypeGenerator)]
pub enum Piece {
    Open { alternative: bool },
    Close,
    Text { ctype: u8, encoding: u8, body: String },
    Attachment { ctype: u8, name: String, data: Vec<u8> },
    ZipAttachment { name: String, zip: Zip },
    Header { name: u8, value: String },
    Raw(Vec<u8>),
}

/// Builds a message from pieces: a header section, then a multipart tree (bounded by the number of pieces).
fn message(pieces: &[Piece]) -> Vec<u8> {
    let b64 = |d: &[u8]| {
        let s = base64::engine::general_purpose::STANDARD.encode(d);
        s.as_bytes().chunks(76).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("\r\n")
    };
    let mut m = String::from("From: A <a@example.org>\r\nSubject: fuzz\r\nMIME-Version: 1.0\r\n");
    let mut raw: Vec<u8> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    let mut next = 0usize;
    let mut open = |m: &mut String, stack: &mut Vec<usize>, alternative: bool| {
        next += 1;
        let kind = if alternative { "alternative" } else { "mixed" };
        m.push_str(&format!("Content-Type: multipart/{kind}; boundary=\"b{next}\"\r\n\r\n"));
        stack.push(next);
    };
    open(&mut m, &mut stack, false);
    for p in pieces {
        let boundary = |stack: &Vec<usize>| stack.last().map(|b| format!("--b{b}\r\n")).unwrap_or_default();
        match p {
            Piece::Open { alternative } => {
                m.push_str(&boundary(&stack));
                open(&mut m, &mut stack, *alternative);
            }
            // The outermost multipart closes at the end only, so every piece is a part of the message.
            Piece::Close if stack.len() > 1 => {
                if let Some(b) = stack.pop() {
                    m.push_str(&format!("--b{b}--\r\n"));
                }
            }
            Piece::Close => {}
            Piece::Text { ctype, encoding, body } => {
                let enc = ENCODINGS[usize::from(*encoding) % ENCODINGS.len()];
                m.push_str(&boundary(&stack));
                m.push_str(&format!("Content-Type: {}\r\n", CTYPES[usize::from(*ctype) % CTYPES.len()]));
                if !enc.is_empty() {
                    m.push_str(&format!("Content-Transfer-Encoding: {enc}\r\n"));
                }
                let body = if enc == "base64" { b64(body.as_bytes()) } else { body.replace('\n', "\r\n") };
                m.push_str(&format!("\r\n{body}\r\n"));
            }
            Piece::Attachment { ctype, name, data } => {
                let ctype = CTYPES[usize::from(*ctype) % CTYPES.len()];
                attach(&mut m, &boundary(&stack), ctype, name, &b64(data));
            }
            Piece::ZipAttachment { name, zip } => {
                attach(&mut m, &boundary(&stack), "application/zip", name, &b64(&zip.bytes()));
            }
            Piece::Header { name, value } => {
                let names = ["Subject", "From", "Content-Type", "Content-Disposition", "X-Test", "Message-ID"];
                let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
                m.push_str(&format!("{}: {value}\r\n", names[usize::from(*name) % names.len()]));
            }
            Piece::Raw(b) => {
                raw.extend_from_slice(m.as_bytes());
                raw.extend_from_slice(b);
                m.clear();
            }
        }
    }
    while let Some(b) = stack.pop() {
        m.push_str(&format!("--b{b}--\r\n"));
    }
    raw.extend_from_slice(m.as_bytes());
    raw
}

fn attach(m: &mut String, boundary: &str, ctype: &str, name: &str, body: &str) {
    let name: String = name.chars().filter(|c| !c.is_control() && *c != '"').collect();
    m.push_str(boundary);
    m.push_str(&format!(
        "Content-Type: {ctype}; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{body}\r\n"
    ));
}

/// A whole message through the content scan and the shipped rules: no panic, and every list the scan builds
/// bounded by the input or its constant; a zip attachment's files are seen by name.
#[test]
fn message_scan() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let set = RuleSet::load_dir(&rules, &["example.test".into()]).expect("shipped rules load");
    check!().with_iterations(3_000).with_type::<Vec<Piece>>().for_each(|pieces| {
        let raw = message(pieces);
        let c = Content::parse(&raw);
        assert!(c.archive_names.len() <= MAX_ARCHIVE_NAMES);
        assert!(c.attachments.len() <= c.parts, "{} attachments in {} parts", c.attachments.len(), c.parts);
        // `parts` counts the top level only; attached messages nest further, each level costing input bytes.
        assert!(c.depth <= raw.len() / 8 + 1, "depth {} from {} bytes", c.depth, raw.len());
        assert!(c.urls.len() <= 1000 && c.url_domains.len() <= c.urls.len());
        let text: usize = c.texts.iter().map(String::len).sum();
        assert!(text <= 4 * raw.len() + 64, "{text} bytes of text from {} bytes", raw.len());
        let headers: usize = c.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        assert!(headers <= 4 * raw.len() + 64, "{headers} bytes of headers from {} bytes", raw.len());
        // Without raw bytes or stray headers in the way, every intact zip's files are seen, or the scan
        // says it lost parts (`mime_malformed`: an empty multipart, a message/rfc822 part that is not one).
        let clean = !c.mime_malformed && !pieces.iter().any(|p| matches!(p, Piece::Raw(_) | Piece::Header { .. }));
        if clean && c.archive_names.len() < MAX_ARCHIVE_NAMES {
            for p in pieces {
                let Piece::ZipAttachment { zip, .. } = p else { continue };
                if !zip.intact() {
                    continue;
                }
                for f in zip.files() {
                    let last = f.rsplit(['/', '\\']).next().unwrap_or(&f);
                    assert!(
                        c.archive_names.iter().any(|n| n == last),
                        "{last:?} not seen in {:?}; alone the archive lists {:?}; message:\n{}",
                        c.archive_names,
                        zip::list(&zip.bytes()),
                        String::from_utf8_lossy(&raw)
                    );
                }
            }
        }
        let facts = Facts {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            client_name: None,
            listener: "smtp",
            helo: Some("client.example"),
            auth_user: None,
            mail_from: Some("a@example.org"),
            rcpts: &[],
            size: raw.len() as u64,
            content: Some(&c),
        };
        let _ = set.hits(Phase::Headers, &facts);
        let _ = set.hits(Phase::Data, &facts);
    });
}
