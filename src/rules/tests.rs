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
    let got = ids(&s, Phase::Data, &facts(Some(&c), &[]));
    assert_eq!(got, ["subj", "hdr", "body", "url", "exe", "spoof", "nomsgid"]);
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
