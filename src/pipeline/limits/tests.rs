//! The limits stage against the in-memory store with a hand-moved clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::LimitsStage;
use crate::config::Role;
use crate::pipeline::{AuthEvent, ConnInfo, RcptOutcome, Stage, TxnContext, Verdict};
use crate::rules::Rules;
use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::Reply;
use crate::state::memory::MemoryStore;
use crate::state::{ManualClock, SharedStore};

pub(crate) struct Fixture {
    pub stage: LimitsStage,
    pub clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

pub(crate) fn fixture(rules: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("limits.toml"), rules).unwrap();
    let rules = Rules::load(dir.path(), &[]).unwrap_or_else(|e| panic!("{}", crate::rules::format_errors(&e)));
    let clock = ManualClock::at(1_000_000_000);
    let store: SharedStore = Arc::new(MemoryStore::new(10_000, clock.clone()));
    Fixture { stage: LimitsStage::new(Arc::new(rules), store), clock, _dir: dir }
}

pub(crate) fn conn(ip: &str, role: Role) -> ConnInfo {
    let peer: SocketAddr = format!("{ip}:40000").parse().unwrap();
    ConnInfo::new("c1", "smtp".into(), role, peer, "127.0.0.1:25".parse().unwrap())
}

fn mail(addr: &str) -> MailFrom {
    MailFrom { address: addr.into(), size: None, body: None, smtputf8: false, dsn: Vec::new() }
}

fn rcpt(addr: &str) -> RcptTo {
    RcptTo { address: addr.into(), dsn: Vec::new() }
}

async fn send(stage: &LimitsStage, c: &ConnInfo, user: Option<&str>) -> (Verdict, TxnContext) {
    let mut txn = TxnContext { id: "t".into(), auth_user: user.map(Into::into), ..TxnContext::default() };
    txn.mail_from = "a@sender.example".into();
    let v = stage.on_mail(c, &mut txn, &mail("a@sender.example")).await;
    (v, txn)
}

fn code(v: &Verdict) -> u16 {
    v.refusal().map_or(250, |r| r.code)
}

const PER_IP: &str = r#"
[[limit]]
id = "ip-msgs"
key = ["ip"]
count = "messages"
rate = "10/1m"
algorithm = "fixed"
role = "mx"
unless = { auth_user = "." }
"#;

#[tokio::test]
async fn the_eleventh_message_of_an_ip_within_a_minute_is_deferred() {
    let f = fixture(PER_IP);
    let a = conn("192.0.2.1", Role::Mx);
    for i in 0..10 {
        assert_eq!(code(&send(&f.stage, &a, None).await.0), 250, "message {i}");
    }
    let (v, txn) = send(&f.stage, &a, None).await;
    let r = v.refusal().expect("refused");
    assert_eq!((r.code, r.to_string().contains("4.7.1 limit ip-msgs exceeded")), (451, true), "{r:?}");
    assert!(txn.records.iter().any(|r| r.stage == "limit:ip-msgs" && r.verdict == "tempfail"), "{:?}", txn.records);
    // Another address, an authenticated user and another role are not limited.
    assert_eq!(code(&send(&f.stage, &conn("192.0.2.2", Role::Mx), None).await.0), 250);
    assert_eq!(code(&send(&f.stage, &a, Some("alice")).await.0), 250);
    assert_eq!(code(&send(&f.stage, &conn("192.0.2.1", Role::Submission), None).await.0), 250);
    // A minute after the first, the window starts again.
    f.clock.advance(Duration::from_secs(61));
    assert_eq!(code(&send(&f.stage, &a, None).await.0), 250);
}

#[tokio::test]
async fn recipients_get_452_and_scores_and_tags_apply() {
    let f = fixture(
        r#"
[[limit]]
id = "rcpts"
key = ["user", "rcpt_domain"]
count = "recipients"
rate = "2/1h"
[[limit]]
id = "score-net"
key = ["net"]
count = "messages"
rate = "1/1h"
action = "score"
score = 2.5
[[limit]]
id = "tag-sender"
key = ["sender_domain"]
count = "messages"
rate = "1/1h"
action = "tag"
"#,
    );
    let c = conn("198.51.100.9", Role::Submission);
    let (_, mut txn) = send(&f.stage, &c, Some("bob")).await;
    for (i, want) in [250, 250, 452].into_iter().enumerate() {
        let v = f.stage.on_rcpt(&c, &mut txn, &rcpt(&format!("r{i}@dest.example"))).await;
        assert_eq!(code(&v), want, "{v:?}");
    }
    // Another domain has its own counter.
    assert_eq!(code(&f.stage.on_rcpt(&c, &mut txn, &rcpt("x@other.example")).await), 250);
    let (v, txn) = send(&f.stage, &conn("198.51.100.200", Role::Submission), Some("bob")).await;
    assert_eq!(code(&v), 250);
    assert_eq!(txn.score, 2.5);
    assert_eq!(txn.add_headers, vec!["X-Moat-Limit: tag-sender\r\n".to_string()]);
}

#[tokio::test]
async fn concurrent_connections_hold_a_lease_until_the_connection_ends() {
    let f = fixture("[[limit]]\nid = \"conc\"\nkey = [\"ip\"]\ncount = \"concurrent_connections\"\nmax = 1\n");
    let a = conn("192.0.2.1", Role::Mx);
    assert_eq!(f.stage.on_connect(&a).await, Verdict::Continue);
    let mut b = conn("192.0.2.1", Role::Mx);
    b.id = "c2".into();
    assert_eq!(code(&f.stage.on_connect(&b).await), 421);
    drop(a); // the lease is given back by a spawned task
    let mut c = conn("192.0.2.1", Role::Mx);
    c.id = "c3".into();
    let mut ok = false;
    for _ in 0..100 {
        tokio::task::yield_now().await;
        if f.stage.on_connect(&c).await == Verdict::Continue {
            ok = true;
            break;
        }
    }
    assert!(ok, "the lease came back");
}

#[tokio::test]
async fn failures_block_the_next_attempt() {
    let f = fixture(
        r#"
[[limit]]
id = "auth-fail"
key = ["ip"]
count = "auth_failures"
rate = "2/10m"
[[limit]]
id = "harvest"
key = ["ip"]
count = "refused_recipients"
rate = "2/10m"
"#,
    );
    let c = conn("203.0.113.5", Role::Mx);
    assert_eq!(f.stage.on_connect(&c).await, Verdict::Continue);
    for _ in 0..3 {
        f.stage.on_auth(&c, AuthEvent { login: "x", success: false }).await;
    }
    assert_eq!(code(&f.stage.on_auth(&c, AuthEvent { login: "x", success: true }).await), 454);
    assert_eq!(code(&f.stage.on_connect(&conn("203.0.113.5", Role::Mx)).await), 421);
    assert_eq!(f.stage.on_connect(&conn("203.0.113.6", Role::Mx)).await, Verdict::Continue);
    // Refused recipients: the third refusal leaves a block; the next RCPT is refused by moat.
    let c = conn("203.0.113.9", Role::Mx);
    let (_, mut txn) = send(&f.stage, &c, None).await;
    let no = Reply::new(550, "5.1.1 no such user");
    let later = Reply::new(451, "4.7.1 greylisted");
    for i in 0..5 {
        let r = rcpt(&format!("g{i}@example.test"));
        f.stage.on_rcpt_done(&c, &mut txn, RcptOutcome { rcpt: &r, reply: &later }).await;
    }
    for i in 0..3 {
        let r = rcpt(&format!("u{i}@example.test"));
        assert_eq!(code(&f.stage.on_rcpt(&c, &mut txn, &r).await), 250);
        f.stage.on_rcpt_done(&c, &mut txn, RcptOutcome { rcpt: &r, reply: &no }).await;
    }
    assert_eq!(code(&f.stage.on_rcpt(&c, &mut txn, &rcpt("real@example.test")).await), 451);
    // The block lasts as long as the rate needs to recover.
    f.clock.advance(Duration::from_secs(10 * 60));
    assert_eq!(code(&f.stage.on_rcpt(&c, &mut txn, &rcpt("real@example.test")).await), 250);
}

#[tokio::test]
async fn bytes_are_counted_at_end_of_data() {
    let f = fixture(
        "[[limit]]\nid = \"bytes\"\nkey = [\"ip\"]\ncount = \"bytes\"\nrate = \"1MiB/1h\"\naction = \"reject\"\n",
    );
    let c = conn("192.0.2.1", Role::Mx);
    let view = |size| crate::pipeline::MessageView { head: b"", data: None, size };
    let (_, mut txn) = send(&f.stage, &c, None).await;
    assert_eq!(code(&f.stage.on_end_of_data(&c, &mut txn, &view(600_000)).await), 250);
    assert_eq!(code(&f.stage.on_end_of_data(&c, &mut txn, &view(600_000)).await), 550);
}

#[test]
fn bad_limits_are_refused_with_their_line() {
    let errors = |text: &str| {
        crate::rules::RuleSet::from_texts(&[("l.toml".into(), text.to_string())], std::path::Path::new("."), &[])
            .expect_err("refused")
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let e = errors("[[limit]]\nid = \"a\"\nkey = [\"rcpt\"]\ncount = \"messages\"\nrate = \"1/1m\"\n");
    assert!(e.starts_with("l.toml:3:") && e.contains("not known"), "{e}");
    let e = errors("[[limit]]\nid = \"a\"\nkey = [\"ip\"]\ncount = \"messages\"\nrate = \"1 per minute\"\n");
    assert!(e.starts_with("l.toml:5:"), "{e}");
    let e = errors("[[limit]]\nid = \"a\"\nkey = [\"ip\"]\ncount = \"mesages\"\nrate = \"1/1m\"\n");
    assert!(e.starts_with("l.toml:4:"), "{e}");
    let e = errors(
        "[[limit]]\nid = \"a\"\nkey = [\"ip\"]\ncount = \"connections\"\nrate = \"1/1m\"\nwhen = { helo = \"x\" }\n",
    );
    assert!(e.starts_with("l.toml:6:") && e.contains("mail phase"), "{e}");
    let e = errors("[[limit]]\nid = \"a\"\nkey = [\"ip\"]\ncount = \"concurrent_connections\"\n");
    assert!(e.contains("max = N"), "{e}");
    let e = errors("[[limit]]\nid = \"a\"\nkey = [\"ip\"]\ncount = \"messages\"\nrate = \"1/1m\"\naction = \"delay\"\ndelay = \"5m\"\n");
    assert!(e.contains("at most 60s"), "{e}");
}

/// 100,000 distinct client addresses through a per-IP limit: the store stays within its cap (evicting the
/// oldest state), and the limit keeps working for a client that comes back.
#[tokio::test]
async fn memory_is_bounded_under_100k_distinct_clients() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("l.toml"), PER_IP).unwrap();
    let rules = Arc::new(Rules::load(dir.path(), &[]).unwrap());
    let clock = ManualClock::at(1_000_000_000);
    let store = Arc::new(MemoryStore::new(10_000, clock.clone()));
    let stage = LimitsStage::new(rules, store.clone());
    for i in 0..100_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        let (v, _) = send(&stage, &conn(&ip.to_string(), Role::Mx), None).await;
        assert_eq!(code(&v), 250);
    }
    let n = crate::state::Store::entries(&*store).unwrap();
    assert!(n <= 10_000, "{n} entries");
    let a = conn("192.0.2.1", Role::Mx);
    for _ in 0..10 {
        assert_eq!(code(&send(&stage, &a, None).await.0), 250);
    }
    assert_eq!(code(&send(&stage, &a, None).await.0), 451);
}
