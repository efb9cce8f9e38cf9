//! The operator's files: rule files (parse, compile, evaluate), list files (exact and bloom), and the
//! users file. Bad input must give an error with a line inside the file, never a panic.

use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use bolero::{check, generator::TypeGenerator};
use moat::auth::store::UserStore;
use moat::rules::content::Content;
use moat::rules::eval::Facts;
use moat::rules::lists::List;
use moat::rules::parse::ListKind;
use moat::rules::{Phase, RuleSet};

const RULE_LINES: &[&str] = &[
    "[[rule]]",
    "[[list]]",
    "[scores]",
    "tag_at = 5.0",
    "reject_at = 10",
    "subject_prefix = \"[SPAM] \"",
    "id = \"r\"",
    "id = \"s\"",
    "description = \"d\"",
    "action = \"reject\"",
    "action = \"tempfail\"",
    "action = \"tag\"",
    "action = \"accept\"",
    "action = \"discard\"",
    "action = \"quarantine\"",
    "deliver = true",
    "score = 2.5",
    "score = -1",
    "reply = \"550 5.7.1 no\"",
    "reply = \"+550 no\"",
    "reply = \"451 4.7.1 later\"",
    "name = \"nets\"",
    "name = \"doms\"",
    "kind = \"ip\"",
    "kind = \"domain\"",
    "kind = \"address\"",
    "kind = \"hash\"",
    "file = \"lists/ips.txt\"",
    "file = \"lists/domains.txt\"",
    "file = \"lists/bad.txt\"",
    "file = \"../outside.txt\"",
    "bloom = true",
    "fp_rate = 0.001",
    "fp_rate = 0",
];
const KEYS: &[&str] = &[
    "client_ip",
    "client_name",
    "helo",
    "mail_from",
    "rcpt_to",
    "auth_user",
    "listener",
    "size_over",
    "header",
    "subject",
    "from_display_spoof",
    "body",
    "url_domain",
    "attachment_name",
    "attachment_ext",
    "attachment_type",
    "attachment_size_over",
    "archive_unreadable",
    "archive_encrypted",
    "mime_parts_over",
    "mime_depth_over",
    "subject_words",
    "body_words",
    "missing_header",
    "in_list",
    "hello",
];
const VALUES: &[&str] = &[
    "\"x\"",
    "'(?i)^spam'",
    "'('",
    "'a{99999}'",
    "[\"192.0.2.0/24\", \"2001:db8::/32\"]",
    "[\"not-an-ip\"]",
    "[\"exe\", \"js\"]",
    "[\"application/zip\", \"text/*\"]",
    "[\"zip\"]",
    "[]",
    "[\"\"]",
    "true",
    "false",
    "100",
    "-1",
    "1.5",
    "{ name = \"X-A\", value = \"b\" }",
    "{ list = \"nets\", field = \"client_ip\" }",
    "{ list = \"doms\", field = \"url_domain\" }",
    "\"nets\"",
    "\"doms\"",
    "\"nope\"",
];

/// A line of a rule file.
#[derive(Clone, Debug, TypeGenerator)]
enum RuleLine {
    Fixed(u8),
    When(Vec<(u8, u8, u8)>),
    Text(String),
}

fn rule_text(lines: &[RuleLine]) -> String {
    let leaf =
        |k: u8, v: u8| format!("{} = {}", KEYS[usize::from(k) % KEYS.len()], VALUES[usize::from(v) % VALUES.len()]);
    let mut out = String::new();
    for l in lines {
        match l {
            RuleLine::Fixed(i) => out.push_str(RULE_LINES[usize::from(*i) % RULE_LINES.len()]),
            RuleLine::When(leaves) => {
                // (key, value, shape): a leaf, or the leaf wrapped in all/any/not.
                let parts: Vec<String> = leaves
                    .iter()
                    .map(|&(k, v, shape)| match shape % 4 {
                        0 => leaf(k, v),
                        1 => format!("all = [ {{ {} }}, {{ {} }} ]", leaf(k, v), leaf(v, k)),
                        2 => format!("any = [ {{ {} }} ]", leaf(k, v)),
                        _ => format!("not = {{ {} }}", leaf(k, v)),
                    })
                    .collect();
                out.push_str(&format!("when = {{ {} }}", parts.join(", ")));
            }
            RuleLine::Text(t) => out.push_str(t),
        }
        out.push('\n');
    }
    out
}

fn list_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("lists")).unwrap();
    std::fs::write(dir.path().join("lists/ips.txt"), "127.0.0.0/8\n192.0.2.7\n2001:db8::/32\n").unwrap();
    std::fs::write(dir.path().join("lists/domains.txt"), "Spam.Example.\n@evil.test\n").unwrap();
    std::fs::write(dir.path().join("lists/bad.txt"), "1.2.3.4\nnot-an-ip!!\n").unwrap();
    dir
}

/// Rule files: any text is compiled or refused with positions inside the file (or the list file named);
/// a compiled set evaluates every phase on a message without a panic.
#[test]
fn rule_files() {
    let dir = list_dir();
    let msg = b"From: \"Bank\" <a@evil.test>\r\nSubject: spam offer\r\n\r\nvisit http://www.spam.example/x\r\n";
    let content = Content::parse(msg);
    check!().with_iterations(500).with_type::<Vec<RuleLine>>().for_each(|lines| {
        let text = rule_text(lines);
        let file = dir.path().join("t.toml");
        match RuleSet::from_texts(&[(file.clone(), text.clone())], dir.path(), &["example.test".into()]) {
            Ok(set) => {
                let rcpts = ["b@example.test".to_string()];
                let facts = Facts {
                    ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
                    client_name: Some("mail.example"),
                    listener: "smtp",
                    helo: Some("spam"),
                    auth_user: None,
                    mail_from: Some("a@evil.test"),
                    rcpts: &rcpts,
                    size: msg.len() as u64,
                    content: Some(&content),
                };
                for phase in [Phase::Connect, Phase::Mail, Phase::Rcpt, Phase::Headers, Phase::Data] {
                    let _ = set.hits(phase, &facts);
                }
            }
            Err(errors) => {
                assert!(!errors.is_empty());
                for e in errors {
                    let lines = if e.file == file {
                        text.lines().count()
                    } else {
                        std::fs::read_to_string(&e.file).map_or(0, |t| t.lines().count())
                    };
                    assert!(e.line <= lines + 1, "{e} is past the end ({lines} lines)\n{text}");
                    assert!(e.line > 0 || e.file != file || e.message.contains("list"), "{e} has no line\n{text}");
                }
            }
        }
    });
}

/// An entry of a list file.
#[derive(Clone, Debug, TypeGenerator)]
enum ListEntry {
    V4([u8; 4], Option<u8>),
    V6([u16; 8], Option<u8>),
    Domain(Vec<u8>, bool),
    Text(String),
}

fn entry(e: &ListEntry) -> String {
    let labels = ["example", "Spam", "org", "test", "xn--p1ai", "a-b", ""];
    match e {
        ListEntry::V4(a, p) => {
            format!("{}{}", std::net::Ipv4Addr::from(*a), p.map(|p| format!("/{}", p % 40)).unwrap_or_default())
        }
        ListEntry::V6(a, p) => {
            format!("{}{}", Ipv6Addr::from(*a), p.map(|p| format!("/{}", p % 140)).unwrap_or_default())
        }
        ListEntry::Domain(ls, dot) => {
            let name: Vec<&str> = ls.iter().map(|&i| labels[usize::from(i) % labels.len()]).collect();
            format!("{}{}", name.join("."), if *dot { "." } else { "" })
        }
        ListEntry::Text(t) => t.clone(),
    }
}

/// List files: exact and bloom lists accept and refuse the same entries (at the same line), and a bloom
/// list never misses what the exact list holds (a bloom filter has false positives, never negatives).
#[test]
fn list_files() {
    check!().with_iterations(1_000).with_type::<(u8, Vec<ListEntry>, Vec<ListEntry>)>().for_each(
        |(kind, entries, probes)| {
            let kind = [ListKind::Ip, ListKind::Domain, ListKind::Address, ListKind::Hash][usize::from(*kind) % 4];
            let text: String = entries.iter().map(|e| entry(e) + "\n").collect();
            let exact = List::load(kind, &text, None);
            let bloom = List::load(kind, &text, Some(0.01));
            match (&exact, &bloom) {
                (Ok(exact), Ok(bloom)) => {
                    for p in probes.iter().chain(entries.iter()) {
                        let v = entry(p);
                        let v = v.split('/').next().unwrap_or("");
                        assert!(!exact.contains(v) || bloom.contains(v), "{kind:?} bloom misses {v:?}\n{text}");
                    }
                }
                (Err(a), Err(b)) => assert_eq!(a.0, b.0, "{kind:?} refused at different lines\n{text}"),
                _ => panic!("{kind:?}: exact {:?} but bloom {:?}\n{text}", exact.as_ref().err(), bloom.as_ref().err()),
            }
        },
    );
}

const USER_LINES: &[&str] = &[
    "[users.alice]",
    "[users.\"Bob Smith\"]",
    "[users.ALICE]",
    "[users.\"\"]",
    "[[users.alice.app_passwords]]",
    "name = \"phone\"",
    "listeners = [\"submission\"]",
    "senders = [\"alice@example.org\", \"@example.org\"]",
    "senders = [\"bad\"]",
    "senders = [\"x@\"]",
    "disabled = true",
    "totp_secret = \"JBSWY3DPEHPK3PXPJBSWY3DP\"",
    "totp_secret = \"short\"",
    "password = \"$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaA\"",
    "password = \"plain text\"",
    "hash = \"$argon2id$v=19$m=19456,t=2,p=1$\"",
    "unknown = 1",
];

/// A line of a users file; `Password`/`Hash` use a real argon2id PHC string.
#[derive(Clone, Debug, TypeGenerator)]
enum UserLine {
    Fixed(u8),
    Password,
    Hash,
    Text(String),
}

/// The users file: any text loads or is refused with a line inside the file; a loaded store answers
/// sender checks without a panic.
#[test]
fn users_files() {
    let phc = moat::auth::store::hash_password("secret").unwrap();
    check!().with_iterations(2_000).with_type::<(Vec<UserLine>, String)>().for_each(|(lines, sender)| {
        let mut text = String::new();
        for l in lines {
            match l {
                UserLine::Fixed(i) => text.push_str(USER_LINES[usize::from(*i) % USER_LINES.len()]),
                UserLine::Password => text.push_str(&format!("password = {phc:?}")),
                UserLine::Hash => text.push_str(&format!("hash = {phc:?}")),
                UserLine::Text(t) => text.push_str(t),
            }
            text.push('\n');
        }
        match UserStore::parse(&text, &PathBuf::from("users.toml")) {
            Ok(store) => {
                assert!(
                    store.len()
                        <= text.matches("[users.").count()
                            + text.matches("users =").count()
                            + text.matches('{').count()
                );
                for user in ["alice", "ALICE", "Bob Smith", ""] {
                    let _ = store.sender_allowed(user, sender);
                    let _ = store.has_totp(user);
                }
            }
            Err(e) => {
                assert_eq!(e.file, Path::new("users.toml"));
                if let Some(line) = e.line {
                    assert!(line >= 1 && line <= text.lines().count() + 1, "{e} is past the end\n{text}");
                }
            }
        }
    });
}
