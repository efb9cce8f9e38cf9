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

/// The limit and greylist examples work as documented when copied next to the shipped rules.
#[test]
fn behaviour_examples_compile_next_to_the_shipped_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let dir = tempfile::tempdir().unwrap();
    let copy = |from: &Path, to: &Path| std::fs::copy(from, to).unwrap();
    copy(&root.join("00-defaults.toml"), &dir.path().join("00-defaults.toml"));
    std::fs::create_dir(dir.path().join("lists")).unwrap();
    for e in std::fs::read_dir(root.join("lists")).unwrap() {
        let e = e.unwrap();
        copy(&e.path(), &dir.path().join("lists").join(e.file_name()));
    }
    copy(&root.join("examples/rate-limits.toml"), &dir.path().join("rate-limits.toml"));
    copy(&root.join("examples/greylist.toml"), &dir.path().join("greylist.toml"));
    let set = RuleSet::load_dir(dir.path(), &["example.test".into()])
        .unwrap_or_else(|e| panic!("{}", super::format_errors(&e)));
    let l = &set.limits[0];
    assert_eq!(&*l.id, "mx-messages-per-ip");
    assert_eq!(l.measure, super::limits::Measure::Fixed { count: 10, per: std::time::Duration::from_secs(60) });
    let g = set.greylist.as_ref().expect("greylist");
    assert_eq!(g.delay, std::time::Duration::from_secs(60));
    assert_eq!(g.role, Some(crate::config::Role::Mx));
}
