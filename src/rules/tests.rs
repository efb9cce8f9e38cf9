//! Unit tests of parsing, compilation and evaluation.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::eval::{Content, Facts};
use super::{Phase, RuleSet};

fn set(text: &str) -> RuleSet {
    RuleSet::from_texts(&[(PathBuf::from("t.toml"), text.to_string())], Path::new("."), &["example.test".into()])
        .unwrap_or_else(|e| panic!("{}", super::format_errors(&e)))
}

fn errors(text: &str) -> Vec<String> {
    RuleSet::from_texts(&[(PathBuf::from("t.toml"), text.to_string())], Path::new("."), &[])
        .expect_err("refused")
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn facts<'a>(content: Option<&'a Content>, rcpts: &'a [String]) -> Facts<'a> {
    Facts {
        ip: "192.0.2.7".parse::<IpAddr>().unwrap(),
        client_name: Some("mail.dynamic-pool.example"),
        listener: "smtp",
        helo: Some("bad.helo"),
        auth_user: None,
        mail_from: Some("a@spam.example"),
        rcpts,
        size: 100,
        content,
    }
}

fn ids(set: &RuleSet, phase: Phase, f: &Facts<'_>) -> Vec<String> {
    set.hits(phase, f).into_iter().map(|i| set.rules[i].id.to_string()).collect()
}

#[test]
fn phases_follow_conditions() {
    let s = set(r#"
[[rule]]
id = "ip"
when = { client_ip = ["192.0.2.0/24"] }
action = "reject"
[[rule]]
id = "mix"
when = { all = [ { client_ip = ["192.0.2.0/24"] }, { body = "viagra" } ] }
score = 3
[[rule]]
id = "dynamic"
when = { client_name = 'dynamic-pool' }
action = "reject"
[[rule]]
id = "helo"
when = { helo = "^bad\\." }
action = "tempfail"
reply = "450 4.7.1 go away"
"#);
    let phases: Vec<Phase> = s.rules.iter().map(|r| r.phase).collect();
    assert_eq!(phases, [Phase::Connect, Phase::Data, Phase::Connect, Phase::Mail]);
    let mut f = facts(None, &[]);
    assert_eq!(ids(&s, Phase::Connect, &f), ["ip", "dynamic"]);
    f.client_name = None;
    assert_eq!(ids(&s, Phase::Connect, &f), ["ip"]);
    assert_eq!(ids(&s, Phase::Mail, &f), ["helo"]);
}

#[test]
fn content_leaves() {
    let s = set(r#"
[[rule]]
id = "subj"
when = { subject = "(?i)free money" }
score = 1
[[rule]]
id = "hdr"
when = { header = { name = "X-Mailer", regex = "BulkMailer" } }
score = 1
[[rule]]
id = "body"
when = { body = "click here" }
score = 1
[[rule]]
id = "url"
when = { url_domain = ["phish.example"] }
score = 1
[[rule]]
id = "exe"
when = { attachment_ext = ["exe"] }
action = "reject"
[[rule]]
id = "spoof"
when = { from_display_spoof = true }
score = 1
[[rule]]
id = "nomsgid"
when = { missing_header = "Message-ID" }
score = 1
[[rule]]
id = "accept-never"
when = { not = { size_over = 0 } }
action = "accept"
"#);
    let raw = b"From: \"example.test support\" <x@evil.example>\r\nSubject: =?utf-8?q?FREE_money?=\r\nX-Mailer: BulkMailer 2\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nclick here: https://www.phish.example/x\r\n\
--b\r\nContent-Type: application/octet-stream; name=\"a.pdf.exe\"\r\nContent-Disposition: attachment; filename=\"a.pdf.exe\"\r\n\r\nMZ\r\n--b--\r\n";
    let c = Content::parse(raw);
    let f = facts(Some(&c), &[]);
    assert_eq!(ids(&s, Phase::Headers, &f), ["subj", "hdr", "spoof", "nomsgid"]);
    assert_eq!(ids(&s, Phase::Data, &f), ["body", "url", "exe"]);
}

#[test]
fn lists_of_addresses_and_domains() {
    let s = set(r#"
[[rule]]
id = "from"
when = { mail_from = ["spam.example", "x@y.test"] }
action = "reject"
[[rule]]
id = "rcpt"
when = { rcpt_to = "^abuse@" }
action = "reject"
"#);
    let r = vec!["abuse@example.test".to_string()];
    let f = facts(None, &r);
    assert_eq!(ids(&s, Phase::Mail, &f), ["from"]);
    assert_eq!(ids(&s, Phase::Rcpt, &f), ["rcpt"]);
}

#[test]
fn errors_carry_positions() {
    let e = errors("[[rule]]\nid = \"a\"\nwhen = { helo = \"(\" }\naction = \"reject\"\n");
    assert!(e[0].starts_with("t.toml:2:"), "{e:?}");
    assert!(e[0].contains("invalid regex"), "{e:?}");
    let e = errors("[[rule]]\nid = \"a\"\nwhen = { helo = \"x\", body = \"y\" }\naction = \"reject\"\n");
    assert!(e[0].starts_with("t.toml:3:"), "{e:?}");
    let e = errors("[[rule]]\nid = \"a\"\nwhen = { helo = \"x\" }\naction = \"reject\"\n[[rule]]\nid = \"a\"\nwhen = { helo = \"y\" }\naction = \"accept\"\n");
    assert!(e[0].starts_with("t.toml:6:") && e[0].contains("duplicate"), "{e:?}");
    let e = errors("[[rule]]\nid = \"a\"\nwhen = { helo = \"x\" }\naction = \"reject\"\nreply = \"250 ok\"\n");
    assert!(e[0].starts_with("t.toml:5:"), "{e:?}");
    // A reply code is exactly three digits: `str::parse` alone would take `+550` and `0550`.
    for code in ["+550", "0550", " 550"] {
        let e = errors(&format!(
            "[[rule]]\nid = \"a\"\nwhen = {{ helo = \"x\" }}\naction = \"reject\"\nreply = \"{code} 5.7.1 no\"\n"
        ));
        assert!(e[0].starts_with("t.toml:5:") && e[0].contains("3-digit"), "{code}: {e:?}");
    }
    let e = errors("[[rule]]\nid = \"a\"\nwhen = { in_list = \"nope\" }\naction = \"reject\"\n");
    assert!(e[0].contains("unknown list"), "{e:?}");
}

/// Every shipped rule file (defaults and examples) parses and compiles.
#[test]
fn shipped_rules_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let set =
        RuleSet::load_dir(&root, &["example.test".into()]).unwrap_or_else(|e| panic!("{}", super::format_errors(&e)));
    assert!(set.rules.len() >= 5);
    let examples = root.join("examples");
    let set = RuleSet::load_dir(&examples, &["example.test".into()])
        .unwrap_or_else(|e| panic!("{}", super::format_errors(&e)));
    assert!(set.rules.len() >= 15, "{}", set.rules.len());
}

#[test]
fn headers_are_rfc2047_decoded() {
    let c = Content::parse(b"X-Mailer: =?utf-8?q?Bulk_M=C3=A4iler?= 1.0\r\nSubject: offer\r\n\r\nbody\r\n");
    assert!(c.headers.iter().any(|(n, v)| n == "x-mailer" && v.contains("Bulk M\u{e4}iler")), "{:?}", c.headers);
}

#[test]
fn auth_user_and_listener_leaves() {
    let s = set(r#"
[[rule]]
id = "intern"
when = { all = [ { auth_user = ["intern@example.test"] }, { listener = ["submission"] } ] }
action = "reject"
[[rule]]
id = "any-auth"
when = { auth_user = '.' }
score = 1
"#);
    let mut f = facts(None, &[]);
    assert!(ids(&s, Phase::Mail, &f).is_empty());
    f.auth_user = Some("Intern@Example.test");
    assert_eq!(ids(&s, Phase::Mail, &f), ["any-auth"]);
    f.listener = "submission";
    assert_eq!(ids(&s, Phase::Mail, &f), ["intern", "any-auth"]);
}

// === attachments, archives, MIME depth, word lists ===

/// A multipart/mixed message with a text part and one base64 part per `(content type, file name, data)`.
fn with_attachments(parts: &[(&str, &str, &[u8])]) -> Vec<u8> {
    use base64::Engine as _;
    let mut m = String::from(
        "From: a@example.org\r\nSubject: files\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n",
    );
    for (ctype, name, data) in parts {
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        let lines: Vec<&str> = b64.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap()).collect();
        m.push_str(&format!(
            "--b\r\nContent-Type: {ctype}; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}\r\n",
            lines.join("\r\n")
        ));
    }
    m.push_str("--b--\r\n");
    m.into_bytes()
}

/// Rule ids of `rules` that hit the message: the header phase's, then the end of data's.
fn data_hits(s: &RuleSet, raw: &[u8]) -> Vec<String> {
    let c = Content::parse(raw);
    let f = facts(Some(&c), &[]);
    let mut got = ids(s, Phase::Headers, &f);
    got.extend(ids(s, Phase::Data, &f));
    got
}

/// A minimal Windows PE file (`MZ`, `e_lfanew` pointing at `PE\0\0`).
fn pe_file() -> Vec<u8> {
    let mut b = vec![0u8; 0x80];
    b[..2].copy_from_slice(b"MZ");
    b[0x3c] = 0x40;
    b[0x40..0x44].copy_from_slice(b"PE\0\0");
    b
}

fn zip_of(names: &[&str]) -> Vec<u8> {
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (*n, &b"data"[..])).collect();
    super::zip::tests::archive(&files)
}

#[test]
fn attachment_type_matches_declared_and_sniffed() {
    let s = set(r#"
[[rule]]
id = "pe"
when = { attachment_type = ["application/x-msdownload"] }
action = "reject"
[[rule]]
id = "images"
when = { attachment_type = ["image/*"] }
score = 1
[[rule]]
id = "zip"
when = { attachment_type = ["application/zip"] }
score = 1
"#);
    // A program named and declared as a PDF is found by its bytes.
    let disguised = with_attachments(&[("application/pdf", "report.pdf", &pe_file())]);
    assert_eq!(data_hits(&s, &disguised), ["pe"]);
    let real_pdf = with_attachments(&[("application/pdf", "report.pdf", b"%PDF-1.7\n%...")]);
    assert!(data_hits(&s, &real_pdf).is_empty());
    // Declared types match by family, and Outlook's zip alias is the zip type.
    let png = with_attachments(&[("image/png", "a.png", b"\x89PNG\r\n\x1a\n")]);
    assert_eq!(data_hits(&s, &png), ["images"]);
    let outlook_zip = with_attachments(&[("application/x-zip-compressed", "a.zip", b"not really a zip")]);
    assert_eq!(data_hits(&s, &outlook_zip), ["zip"]);
    // A .docx is a zip file, but its sniffed type is the Office one, so a zip rule does not hit it.
    let docx = super::zip::tests::archive(&[("[Content_Types].xml", b"<x/>"), ("word/document.xml", b"<w/>")]);
    let ooxml = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";
    assert!(data_hits(&s, &with_attachments(&[(ooxml, "a.docx", &docx)])).is_empty());
}

#[test]
fn attachment_size_over_uses_the_decoded_size() {
    let s = set("[[rule]]\nid = \"big\"\nwhen = { attachment_size_over = 100 }\nscore = 1\n");
    // 101 decoded bytes are about 136 in base64: the decoded size counts.
    assert_eq!(data_hits(&s, &with_attachments(&[("application/octet-stream", "a.bin", &[7u8; 101])])), ["big"]);
    assert!(data_hits(&s, &with_attachments(&[("application/octet-stream", "a.bin", &[7u8; 100])])).is_empty());
}

#[test]
fn names_inside_zip_attachments_are_checked() {
    let s = set(r#"
[[rule]]
id = "exe"
when = { attachment_ext = ["exe"] }
action = "reject"
[[rule]]
id = "setup-name"
when = { attachment_name = '(?i)^setup\.' }
score = 1
"#);
    let inside = zip_of(&["docs/", "docs/Setup.EXE", "readme.txt"]);
    assert_eq!(data_hits(&s, &with_attachments(&[("application/zip", "files.zip", &inside)])), ["exe", "setup-name"]);
    // Also when the zip is declared as text: mail-parser turns a text part into UTF-8, which would mangle
    // this archive (its sizes are not valid UTF-8), so the bytes are decoded again from the base64.
    let bulky = super::zip::tests::archive(&[("readme.txt", &[b'x'; 200]), ("Setup.exe", b"MZ")]);
    assert!(std::str::from_utf8(&bulky).is_err());
    assert_eq!(data_hits(&s, &with_attachments(&[("text/plain", "files.txt", &bulky)])), ["exe", "setup-name"]);
    let harmless = zip_of(&["readme.txt", "photo.jpg"]);
    assert!(data_hits(&s, &with_attachments(&[("application/zip", "files.zip", &harmless)])).is_empty());
}

#[test]
fn unreadable_and_encrypted_archives() {
    let s = set(r#"
[[rule]]
id = "unreadable"
when = { archive_unreadable = true }
score = 1
[[rule]]
id = "encrypted"
when = { archive_encrypted = true }
score = 1
"#);
    let z = zip_of(&["a.txt", "b.txt"]);
    assert!(data_hits(&s, &with_attachments(&[("application/zip", "a.zip", &z)])).is_empty());
    let cut = &z[..z.len() - 10];
    assert_eq!(data_hits(&s, &with_attachments(&[("application/zip", "a.zip", cut)])), ["unreadable"]);
    // A declared zip that is not one at all.
    assert_eq!(data_hits(&s, &with_attachments(&[("application/zip", "a.zip", b"garbage")])), ["unreadable"]);
    let locked = super::zip::tests::archive_with(&[("invoice.js", b"x")], b"", b"", 1);
    assert_eq!(data_hits(&s, &with_attachments(&[("application/zip", "a.zip", &locked)])), ["encrypted"]);
    // Not zip at all: neither.
    assert!(data_hits(&s, &with_attachments(&[("application/pdf", "a.pdf", b"%PDF-1.4")])).is_empty());
}

#[test]
fn mime_depth_over_counts_nested_containers() {
    let s = set("[[rule]]\nid = \"deep\"\nwhen = { mime_depth_over = 1 }\naction = \"reject\"\n");
    let flat = with_attachments(&[("application/pdf", "a.pdf", b"%PDF-1.4")]);
    assert_eq!(Content::parse(&flat).depth, 1);
    assert!(data_hits(&s, &flat).is_empty());
    let nested = b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n\
Content-Type: multipart/alternative; boundary=i\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\nhi\r\n--i\r\n\
Content-Type: text/html\r\n\r\n<p>hi</p>\r\n--i--\r\n--o--\r\n";
    assert_eq!(Content::parse(nested).depth, 2);
    assert_eq!(data_hits(&s, nested), ["deep"]);
    let forwarded = b"Subject: fwd\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n\
Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nbody\r\n--o--\r\n";
    assert_eq!(Content::parse(forwarded).depth, 2);
    assert_eq!(Content::parse(b"Subject: x\r\n\r\nplain\r\n").depth, 0);
}

#[test]
fn word_lists_share_one_automaton_per_field() {
    let s = set(r#"
[[rule]]
id = "meds"
when = { body_words = ["cheap meds", "Wire Transfer"] }
score = 3
[[rule]]
id = "wire"
when = { body_words = ["wire transfer"] }
score = 1
[[rule]]
id = "subj"
when = { subject_words = ["urgent"] }
score = 1
"#);
    // "Wire Transfer" and "wire transfer" are one pattern; subject words have their own automaton.
    assert_eq!(s.words[super::WordField::Body as usize].as_ref().map(|w| w.len()), Some(2));
    assert_eq!(s.words[super::WordField::Subject as usize].as_ref().map(|w| w.len()), Some(1));
    let raw = b"Subject: URGENT: payment\r\n\r\nplease arrange the WIRE\r\n transfer today\r\n";
    assert_eq!(data_hits(&s, raw), ["subj", "meds", "wire"]);
    let raw = b"Subject: urgently\r\n\r\nwiretransfer and cheap medsX are not whole words\r\n";
    assert!(data_hits(&s, raw).is_empty());
}

#[test]
fn new_leaves_refuse_bad_values() {
    let e = errors("[[rule]]\nid = \"a\"\nwhen = { attachment_type = [\"zip\"] }\naction = \"reject\"\n");
    assert!(e[0].starts_with("t.toml:3:") && e[0].contains("type/subtype"), "{e:?}");
    let e = errors("[[rule]]\nid = \"a\"\nwhen = { body_words = [] }\naction = \"reject\"\n");
    assert!(e[0].starts_with("t.toml:3:") && e[0].contains("at least one"), "{e:?}");
    let e = errors("[[rule]]\nid = \"a\"\nwhen = { subject_words = [\" \"] }\naction = \"reject\"\n");
    assert!(e[0].contains("empty"), "{e:?}");
}

/// The shipped defaults refuse a program inside a zip attachment (by the extension rule, which now reads
/// archive directories) and a program whatever its name (by its bytes); an ordinary zip passes.
#[test]
fn shipped_rules_refuse_programs_in_archives_and_disguised() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let s =
        RuleSet::load_dir(&root, &["example.test".into()]).unwrap_or_else(|e| panic!("{}", super::format_errors(&e)));
    let attachment_hits = |raw: &[u8]| -> Vec<String> {
        data_hits(&s, raw).into_iter().filter(|id| id.starts_with("attachment")).collect()
    };
    let msg = with_attachments(&[("application/zip", "invoice.zip", &zip_of(&["invoice/Invoice_2291.exe"]))]);
    assert_eq!(attachment_hits(&msg), ["attachment-executable"]);
    let hit = s.hits(Phase::Data, &facts(Some(&Content::parse(&msg)), &[]))[0];
    assert!(matches!(s.rules[hit].action, super::Action::Reject(_)));
    let msg = with_attachments(&[("application/octet-stream", "invoice.pdf", &pe_file())]);
    assert_eq!(attachment_hits(&msg), ["attachment-executable-content"]);
    let docm = super::zip::tests::archive(&[
        ("[Content_Types].xml", b"<x/>"),
        ("word/document.xml", b"<w/>"),
        ("word/vbaProject.bin", b"macro"),
    ]);
    let msg = with_attachments(&[("application/octet-stream", "report.docx", &docm)]);
    assert_eq!(attachment_hits(&msg), ["attachment-office-macro"]);
    let msg = with_attachments(&[("application/zip", "photos.zip", &zip_of(&["a.jpg", "b.jpg"]))]);
    assert!(attachment_hits(&msg).is_empty(), "{:?}", attachment_hits(&msg));
}

#[test]
fn body_texts_are_each_part_once_as_sent() {
    // A plain message is scanned as its text, once, not also as generated HTML.
    let plain = Content::parse(b"Subject: x\r\nContent-Type: text/plain\r\n\r\nhello there\r\n");
    assert_eq!(plain.texts.len(), 1);
    assert!(plain.texts[0].contains("hello there") && !plain.texts[0].contains('<'));
    // An HTML-only message is scanned as its source (tags included), once.
    let html =
        Content::parse(b"Subject: x\r\nContent-Type: text/html\r\n\r\n<p><a href=\"http://x.example/\">hi</a></p>\r\n");
    assert_eq!(html.texts.len(), 1);
    assert!(html.texts[0].contains("<a href="));
    assert_eq!(html.url_domains, vec!["x.example".to_string()]);
    // multipart/alternative: both alternatives, each once.
    let alt = b"Subject: x\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nplain part\r\n--b\r\nContent-Type: text/html\r\n\r\n<b>html part</b>\r\n--b--\r\n";
    let alt = Content::parse(alt);
    assert_eq!(alt.texts.len(), 2, "{:?}", alt.texts);
    assert!(
        alt.texts.iter().any(|t| t.contains("plain part")) && alt.texts.iter().any(|t| t.contains("<b>html part</b>"))
    );
}

/// A program behind 1,000 other entries is not waved through: the shipped rules refuse an archive moat
/// could not list to the end, and directory entries (or entries without a name) do not use up the limit.
#[test]
fn shipped_rules_refuse_programs_hidden_behind_many_entries() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let s =
        RuleSet::load_dir(&root, &["example.test".into()]).unwrap_or_else(|e| panic!("{}", super::format_errors(&e)));
    let refused = |zip: &[u8]| -> Vec<String> {
        let msg = with_attachments(&[("application/zip", "invoice.zip", zip)]);
        let content = Content::parse(&msg);
        let f = facts(Some(&content), &[]);
        let mut hits = s.hits(Phase::Headers, &f);
        hits.extend(s.hits(Phase::Data, &f));
        hits.into_iter()
            .filter(|&i| matches!(s.rules[i].action, super::Action::Reject(_)))
            .map(|i| s.rules[i].id.to_string())
            .collect()
    };
    let exe = ("invoice.exe", &b"MZ"[..]);
    let files: Vec<String> = (0..1000).map(|i| format!("f{i}.txt")).collect();
    let mut entries: Vec<(&str, &[u8])> = files.iter().map(|n| (n.as_str(), &b""[..])).collect();
    entries.push(exe);
    assert_eq!(refused(&super::zip::tests::archive(&entries)), ["archive-unreadable"]);
    let dirs: Vec<String> = (0..1000).map(|i| format!("d{i}/")).collect();
    let mut entries: Vec<(&str, &[u8])> = dirs.iter().map(|n| (n.as_str(), &b""[..])).collect();
    entries.extend((0..1000).map(|_| ("", &b""[..])));
    entries.push(exe);
    assert_eq!(refused(&super::zip::tests::archive(&entries)), ["attachment-executable"]);
    // Many ordinary files within the limit pass.
    let entries: Vec<(&str, &[u8])> = files.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    assert!(refused(&super::zip::tests::archive(&entries[..999])).is_empty());
}

/// mail-parser issue #120: an attached message that is not a message leaves a sub-message without parts,
/// on which several mail-parser accessors index `parts[0]`. The scan must not touch those.
#[test]
fn corrupted_attached_message_does_not_panic() {
    let raw =
        b"From: Test <test@example.org>\r\nSubject: test\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
--b\r\nContent-Type: text/plain; charset=\"UTF-8\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nbla\r\n\r\n\
--b\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment; filename=\"corrupted.eml\"\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\nthis attachment is not a valid eml, sorry!\r\n--b--\r\n";
    let c = Content::parse(raw);
    assert_eq!(c.attachments.len(), 1, "{c:?}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let s = RuleSet::load_dir(&root, &["example.test".into()]).unwrap();
    let _ = data_hits(&s, raw);
}

/// A message/rfc822 part whose body is another message/rfc822 header, inside a multipart: mail-parser
/// 0.11.9 recovers, but trips its own `debug_assert!` on the way (found by `tests/fuzz.rs`
/// `content::message_scan`; Cargo.toml turns mail-parser's debug assertions off so that tests see what
/// release builds do). The scan must finish and see the structure it can.
#[test]
fn nested_attached_message_headers_only() {
    let raw = b"Content-Type: multipart/alternative; boundary=a\r\n\r\n--a\r\nContent-Type: message/rfc822\r\n\r\n\
Content-Type: message/rfc822\r\n\r\n\r\n--a--\r\n";
    let c = Content::parse(raw);
    assert!(c.parts >= 2, "{c:?}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let s = RuleSet::load_dir(&root, &["example.test".into()]).unwrap();
    let _ = data_hits(&s, raw);
}

/// An empty multipart (its close delimiter right after its headers) makes mail-parser 0.11.9 lose the
/// boundary: the parts after it come back as raw text with their base64 undecoded, so a zip attachment
/// there was neither sniffed nor listed and a program inside it passed (found by `tests/fuzz.rs`
/// `content::message_scan`). The declared transfer encoding is honoured now.
#[test]
fn attachment_after_an_empty_multipart_is_still_decoded() {
    use base64::Engine as _;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let s = RuleSet::load_dir(&root, &["example.test".into()]).unwrap();
    let zip = base64::engine::general_purpose::STANDARD.encode(zip_of(&["invoice.exe"]));
    for declared in ["application/zip", "application/octet-stream"] {
        let raw = format!(
            "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
             Content-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n--b2--\r\n--b1\r\n\
             Content-Type: {declared}; name=\"invoice.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{zip}\r\n--b1--\r\n"
        );
        let c = Content::parse(raw.as_bytes());
        assert_eq!(c.archive_names, ["invoice.exe"], "{declared}: {c:?}");
        assert!(data_hits(&s, raw.as_bytes()).contains(&"attachment-executable".to_string()), "{declared}");
    }
}

/// Parts mail-parser folds into another after malformed MIME are invisible to every content rule; the
/// surplus of delimiter lines gives them away, and the shipped rules refuse the message.
#[test]
fn parts_lost_to_malformed_mime_are_refused() {
    use base64::Engine as _;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let s = RuleSet::load_dir(&root, &["example.test".into()]).unwrap();
    let zip = base64::engine::general_purpose::STANDARD.encode(zip_of(&["invoice.exe"]));
    let part = |name: &str| {
        format!(
            "Content-Type: application/octet-stream; name=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{zip}\r\n"
        )
    };
    let head = "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n";
    // An empty multipart, then two parts: the second is folded into the first.
    let empty = format!(
        "{head}--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n--b2--\r\n--b1\r\n{}--b1\r\n{}--b1--\r\n",
        part("a.pdf"),
        part("b.pdf")
    );
    // A message/rfc822 part whose body is not a header block swallows the part after it.
    let swallowed = format!(
        "{head}--b1\r\nContent-Type: message/rfc822\r\n\r\nnot a header line\r\n--b1\r\n{}--b1--\r\n",
        part("b.pdf")
    );
    for raw in [empty, swallowed] {
        assert!(Content::parse(raw.as_bytes()).mime_malformed, "{raw}");
        assert!(data_hits(&s, raw.as_bytes()).contains(&"mime-malformed".to_string()), "{raw}");
    }
    // Well-formed multiparts, nested ones included, are not.
    let nested = b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n\
Content-Type: multipart/alternative; boundary=i\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\nhi\r\n--i\r\n\
Content-Type: text/html\r\n\r\n<p>hi</p>\r\n--i--\r\n--o\r\nContent-Type: text/plain\r\n\r\nx\r\n--o--\r\n";
    assert!(!Content::parse(nested).mime_malformed);
    let msg =
        with_attachments(&[("application/zip", "a.zip", &zip_of(&["a.txt"])), ("application/pdf", "b.pdf", b"%PDF")]);
    assert!(!Content::parse(&msg).mime_malformed);
}

/// Issue #16 defect 1: files written below the rules directory (a quarantine store) are not rule edits;
/// rule files, list files, deletions and renames are.
#[test]
fn fingerprint_covers_rule_and_list_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("10-a.toml"), "").unwrap();
    std::fs::create_dir(d.join("lists")).unwrap();
    std::fs::write(d.join("lists/bad.txt"), "x\n").unwrap();
    let before = super::fingerprint(d, &[]);
    assert_eq!(before.len(), 2, "{before:?}");
    let q = d.join("quarantine");
    for i in 0..5 {
        std::fs::create_dir_all(q.join("tmp")).unwrap();
        std::fs::write(q.join(format!("{i}.eml")), "message").unwrap();
        std::fs::write(d.join("README"), "").unwrap_or(());
        std::fs::remove_file(d.join("README")).unwrap();
    }
    assert_eq!(super::fingerprint(d, &[]), before, "quarantined messages are not rule edits");
    std::fs::write(d.join("lists/bad.txt"), "x\ny\n").unwrap();
    let list_edit = super::fingerprint(d, &[]);
    assert_ne!(list_edit, before, "a list edit counts");
    std::fs::rename(d.join("10-a.toml"), d.join("20-a.toml")).unwrap();
    assert_ne!(super::fingerprint(d, &[]), list_edit, "a rename counts");
    std::fs::remove_file(d.join("20-a.toml")).unwrap();
    assert_eq!(super::fingerprint(d, &[]).len(), 1, "a deletion counts");
    // A list file the rules name outside lists/ counts too (named once, even if also under lists/).
    std::fs::write(d.join("extra.txt"), "a\n").unwrap();
    let named = [std::path::PathBuf::from("extra.txt"), std::path::PathBuf::from("lists/bad.txt")];
    let before = super::fingerprint(d, &named);
    assert_eq!(before.len(), 2, "{before:?}");
    std::fs::write(d.join("extra.txt"), "a\nb\n").unwrap();
    assert_ne!(super::fingerprint(d, &named), before);
}
