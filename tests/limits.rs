//! Behaviour limits and greylisting over real TCP, with a real Postfix as the upstream: the shipped examples
//! as documented, each kind of count, greylisting with an injected clock, and a reload of limits while a
//! client keeps sending. Clients connect from several loopback addresses (127.0.0.x) to be distinct IPs.
//! Skipped when Postfix is missing, except under CI=true where that is a failure.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::moat::{start, test_config, Client};
use common::postfix::{require_peer, Postfix};
use moat::state::memory::MemoryStore;
use moat::state::ManualClock;
use tokio::net::TcpSocket;

/// A rules directory holding the shipped defaults (and their lists) plus `files` (name, text).
fn rules_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(root.join("00-defaults.toml"), dir.path().join("00-defaults.toml")).unwrap();
    std::fs::create_dir(dir.path().join("lists")).unwrap();
    for e in std::fs::read_dir(root.join("lists")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join("lists").join(e.file_name())).unwrap();
    }
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn example(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/examples").join(name)).unwrap()
}

fn rules_config(dir: &Path) -> String {
    format!("rules.directory = {:?}\nrules.watch_interval = \"0s\"", dir.display().to_string())
}

/// Connects from the loopback address `ip` and reads the greeting.
async fn connect_from(ip: &str, addr: SocketAddr) -> (Client, u16) {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let stream = s.connect(addr).await.unwrap();
    let mut c = Client::new(stream);
    let (code, _) = c.reply().await;
    (c, code)
}

/// One message; returns the first refusal's code and text, or the final reply's.
async fn message(c: &mut Client, rcpts: &[&str]) -> (u16, String) {
    let (code, text) = c.cmd("MAIL FROM:<sender@remote.example>").await;
    if code != 250 {
        return (code, text);
    }
    let mut any = false;
    let mut last = (0, String::new());
    for r in rcpts {
        last = c.cmd(&format!("RCPT TO:<{r}>")).await;
        any |= last.0 == 250;
    }
    if !any {
        c.expect("RSET", 250).await;
        return last;
    }
    c.expect("DATA", 354).await;
    c.send_raw(b"From: <sender@remote.example>\r\nSubject: limits\r\n\r\nhello\r\n.\r\n").await;
    c.reply().await
}

fn postfix() -> Option<Postfix> {
    require_peer("postfix").then(Postfix::start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_rate_limit_defers_the_eleventh_message_of_one_ip() {
    let Some(pf) = postfix() else { return };
    let dir = rules_dir(&[("rate-limits.toml", example("rate-limits.toml"))]);
    let running = start(&test_config(pf.addr(), &rules_config(dir.path()))).await;
    let addr = running.addr("smtp").unwrap();
    let (mut a, code) = connect_from("127.0.0.1", addr).await;
    assert_eq!(code, 220);
    a.expect("EHLO client.example", 250).await;
    for i in 0..10 {
        let (code, text) = message(&mut a, &["user@example.test"]).await;
        assert_eq!(code, 250, "message {i}: {text}");
    }
    let (code, text) = message(&mut a, &["user@example.test"]).await;
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("451 4.7.1 limit mx-messages-per-ip exceeded"), "{text}");
    // Another client IP is unaffected.
    let (mut b, _) = connect_from("127.0.0.2", addr).await;
    b.expect("EHLO other.example", 250).await;
    assert_eq!(message(&mut b, &["user@example.test"]).await.0, 250);
    assert_eq!(pf.wait_for_messages(11, Duration::from_secs(20)).len(), 11);
    let rendered = moat::metrics::install().unwrap().render();
    assert!(rendered.contains("moat_limit_exceeded_total{limit=\"mx-messages-per-ip\"}"), "{rendered}");
    running.stop().await;
}

const KINDS: &str = r#"
[[limit]]
id = "conc"
key = ["ip"]
count = "concurrent_connections"
max = 1
when = { client_ip = ["127.0.0.3"] }

[[limit]]
id = "conns"
key = ["ip"]
count = "connections"
rate = "2/1h"
when = { client_ip = ["127.0.0.4"] }

[[limit]]
id = "rcpts"
key = ["ip", "rcpt_domain"]
count = "recipients"
rate = "3/1h"
when = { client_ip = ["127.0.0.5"] }

[[limit]]
id = "harvest"
key = ["net"]
count = "refused_recipients"
rate = "2/1h"
when = { client_ip = ["127.0.0.6"] }

[[limit]]
id = "bytes"
key = ["ip"]
count = "bytes"
rate = "1KiB/1h"
when = { client_ip = ["127.0.0.7"] }

[[limit]]
id = "tag"
key = ["sender_domain"]
count = "messages"
rate = "1/1h"
action = "tag"
when = { client_ip = ["127.0.0.8"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_limit_over_tcp() {
    let Some(pf) = postfix() else { return };
    let dir = rules_dir(&[("limits.toml", KINDS.to_string())]);
    let running = start(&test_config(pf.addr(), &rules_config(dir.path()))).await;
    let addr = running.addr("smtp").unwrap();

    // Concurrency: a second connection at once is refused, a later one after the first left is not.
    let (mut first, code) = connect_from("127.0.0.3", addr).await;
    assert_eq!(code, 220);
    let (mut second, _) = connect_from("127.0.0.3", addr).await;
    let (code, text) = second.reply().await;
    assert_eq!(code, 0, "closed after the refusal: {text}");
    first.expect("QUIT", 221).await;
    drop(first);
    let mut came_back = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if connect_from("127.0.0.3", addr).await.1 == 220 {
            came_back = true;
            break;
        }
    }
    assert!(came_back, "the lease was given back");

    // Connections per IP: the third within the hour gets 421.
    assert_eq!(connect_from("127.0.0.4", addr).await.1, 220);
    assert_eq!(connect_from("127.0.0.4", addr).await.1, 220);
    assert_eq!(connect_from("127.0.0.4", addr).await.1, 421);

    // Recipients per IP and domain: the fourth gets 452 4.5.3; the message still goes to the others.
    let (mut c, _) = connect_from("127.0.0.5", addr).await;
    c.expect("EHLO c.example", 250).await;
    c.expect("MAIL FROM:<s@remote.example>", 250).await;
    for i in 0..3 {
        c.expect(&format!("RCPT TO:<u{i}@example.test>"), 250).await;
    }
    let text = c.expect("RCPT TO:<u3@example.test>", 452).await;
    assert!(text.starts_with("452 4.5.3 limit rcpts exceeded, try again in"), "{text}");
    c.expect("RCPT TO:<u3@sink.example>", 250).await;
    c.expect("RSET", 250).await;

    // Refused recipients (Postfix refuses @reject.test): after the third refusal moat refuses the next RCPT.
    let (mut c, _) = connect_from("127.0.0.6", addr).await;
    c.expect("EHLO c.example", 250).await;
    c.expect("MAIL FROM:<s@remote.example>", 250).await;
    for i in 0..3 {
        c.expect(&format!("RCPT TO:<nobody{i}@reject.test>"), 550).await;
    }
    let text = c.expect("RCPT TO:<real@example.test>", 451).await;
    assert!(text.contains("limit harvest exceeded"), "{text}");
    c.expect("RSET", 250).await;

    // Bytes: a message over the KiB rate is deferred at end of data and never relayed.
    let (mut c, _) = connect_from("127.0.0.7", addr).await;
    c.expect("EHLO c.example", 250).await;
    c.expect("MAIL FROM:<s@remote.example>", 250).await;
    c.expect("RCPT TO:<big@example.test>", 250).await;
    c.expect("DATA", 354).await;
    let body = format!("{}\r\n", "x".repeat(100)).repeat(20);
    c.send_raw(format!("From: <s@remote.example>\r\nSubject: big\r\n\r\n{body}.\r\n").as_bytes()).await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 451, "{text}");

    // Tag: the second message of the sender domain carries the header.
    let (mut c, _) = connect_from("127.0.0.8", addr).await;
    c.expect("EHLO c.example", 250).await;
    assert_eq!(message(&mut c, &["tag1@example.test"]).await.0, 250);
    assert_eq!(message(&mut c, &["tag2@example.test"]).await.0, 250);
    let delivered = pf.wait_for_messages(3, Duration::from_secs(20));
    let tagged: Vec<_> = delivered
        .iter()
        .map(|m| String::from_utf8_lossy(m).to_string())
        .filter(|m| m.contains("X-Moat-Limit: tag"))
        .collect();
    assert_eq!(tagged.len(), 1, "{delivered:?}");
    assert!(tagged[0].contains("tag2@example.test"), "{}", tagged[0]);
    assert!(!delivered.iter().any(|m| String::from_utf8_lossy(m).contains("big@example.test")));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_greylist_defers_first_attempt_and_passes_the_retry() {
    let Some(pf) = postfix() else { return };
    let dir = rules_dir(&[("greylist.toml", example("greylist.toml"))]);
    let clock = ManualClock::at(1_700_000_000_000);
    let store = Arc::new(MemoryStore::new(10_000, clock.clone()));
    let config = test_config(pf.addr(), &rules_config(dir.path()));
    let running = moat::server::start_with_store(&config, store).await.unwrap();
    let addr = running.addr("smtp").unwrap();
    let (mut c, _) = connect_from("127.0.0.9", addr).await;
    c.expect("EHLO c.example", 250).await;
    let (code, text) = message(&mut c, &["grey@example.test"]).await;
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("451 4.7.1 greylisted, try again in 60 s"), "{text}");
    clock.advance(Duration::from_secs(30));
    assert_eq!(message(&mut c, &["grey@example.test"]).await.0, 451, "too early");
    clock.advance(Duration::from_secs(31));
    let (code, text) = message(&mut c, &["grey@example.test"]).await;
    assert_eq!(code, 250, "{text}");
    let delivered = pf.wait_for_messages(1, Duration::from_secs(20));
    assert!(String::from_utf8_lossy(&delivered[0]).contains("grey@example.test"));
    running.stop().await;
}

/// A limit file that lets `n` messages per minute through from one IP.
fn per_minute(n: u32) -> String {
    format!(
        "[[limit]]\nid = \"reloaded\"\nkey = [\"ip\"]\ncount = \"messages\"\nrate = \"{n}/1m\"\nalgorithm = \"fixed\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_reload_while_traffic_flows() {
    let Some(pf) = postfix() else { return };
    let dir = rules_dir(&[("limits.toml", per_minute(1000))]);
    let running = start(&test_config(pf.addr(), &rules_config(dir.path()))).await;
    let addr = running.addr("smtp").unwrap();
    let rules = running.rules.clone().unwrap();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    // The client sends until moat defers it (bounded), counting what it sent.
    let sender = tokio::spawn(async move {
        let (mut c, _) = connect_from("127.0.0.10", addr).await;
        c.expect("EHLO c.example", 250).await;
        let mut codes = Vec::new();
        for _ in 0..300 {
            let code = message(&mut c, &["flow@example.test"]).await.0;
            codes.push(code);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if codes.iter().filter(|&&c| c == 451).count() >= 3 {
                break;
            }
        }
        codes
    });
    // Reloads while the client sends: the limit tightens, a broken file is refused and the tight one stays.
    while sent.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::write(dir.path().join("limits.toml"), per_minute(5)).unwrap();
    rules.reload().await.unwrap();
    std::fs::write(dir.path().join("limits.toml"), "[[limit]]\nid = \"reloaded\"\ncount = \"messages\"\n").unwrap();
    assert!(rules.reload().await.is_err());
    let codes = sender.await.unwrap();
    assert!(codes.iter().all(|&c| c == 250 || c == 451), "no session error: {codes:?}");
    let first_refusal = codes.iter().position(|&c| c == 451).expect("the tightened limit applied");
    assert!(codes[first_refusal..].iter().all(|&c| c == 451), "it stays applied: {codes:?}");
    assert!(first_refusal >= 3, "the loose limit let the first messages through: {codes:?}");
    // Another IP still has its five.
    let (mut c, _) = connect_from("127.0.0.11", addr).await;
    c.expect("EHLO c.example", 250).await;
    for _ in 0..5 {
        assert_eq!(message(&mut c, &["other@example.test"]).await.0, 250);
    }
    assert_eq!(message(&mut c, &["other@example.test"]).await.0, 451);
    drop(pf);
    running.stop().await;
}
