//! `upstream.defer_mail` over real TCP against the fake upstream, for what a transcript cannot show: a
//! script changed in the middle of a session, the audit record and metrics of a transaction whose MAIL the
//! upstream refused at first, and two clients competing for one upstream connection.
//! (The single-client cases are transcripts 72–79 and 82.)

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::fake::{FakeUpstream, Script};
use common::moat::{config_from, start, test_config, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REFUSAL: &str = "451 4.7.1 <a@example.org>: Sender address rejected: try again later";

async fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: moat\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.expect("response").unwrap();
    String::from_utf8(raw).unwrap()
}

/// Waits until the file has `n` lines and parses each as JSON.
async fn audit_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let mut text = String::new();
    for _ in 0..200 {
        text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// The upstream refuses the deferred MAIL at the first RCPT: that recipient gets the upstream's reply to
/// MAIL, the MAIL stays pending, and once the upstream accepts the sender the next RCPT opens the
/// transaction there. The message goes to that recipient only; the audit record and the recipient metrics
/// show both recipients with the replies they got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_deferred_mail_is_tried_again_at_the_next_rcpt() {
    let fake = FakeUpstream::start(Script { mail: Some(REFUSAL.into()), ..Default::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let listener = "[[listener]]\nname = \"deferred\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\n";
    let mut cfg = config_from(fake.addr, "upstream.defer_mail = true", listener);
    cfg.metrics.address = "127.0.0.1:0".into();
    cfg.audit.destination = audit.display().to_string();
    let running = start(&cfg).await;
    let (mut c, _) = Client::connect(running.addr("deferred").unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    let text = c.expect("RCPT TO:<b@example.test>", 451).await;
    assert_eq!(text.trim_end(), REFUSAL, "the upstream's reply to MAIL, code and text");
    fake.set_script(Script::default());
    c.expect("RCPT TO:<c@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.expect("Subject: second try\r\n\r\nbody\r\n.", 250).await;
    c.expect("QUIT", 221).await;

    let msgs = fake.wait_for(1).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].rcpts, ["RCPT TO:<c@example.test>"]);
    let cmds = fake.commands.lock().unwrap().clone();
    let mails = cmds.iter().filter(|c| c.starts_with("MAIL")).count();
    assert_eq!(mails, 2, "the MAIL went once with each RCPT: {cmds:?}");
    assert!(*fake.pipelined.lock().unwrap() >= 2, "each MAIL had its RCPT behind it: {cmds:?}");

    let records = audit_lines(&audit, 1).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r["verdict"], "accepted");
    assert_eq!(r["mail_from"], "a@example.org");
    let rcpts = r["rcpts"].as_array().unwrap();
    assert_eq!(rcpts.len(), 2, "{r}");
    assert_eq!((&rcpts[0]["address"], &rcpts[0]["reply_code"]), (&"b@example.test".into(), &451.into()));
    assert!(rcpts[0]["reply_text"].as_str().unwrap().contains("Sender address rejected"), "{r}");
    assert_eq!((&rcpts[1]["address"], &rcpts[1]["reply_code"]), (&"c@example.test".into(), &250.into()));
    assert_eq!(r["upstream"]["queue_id"], "FAKE123");

    let m = metrics(running.metrics.unwrap()).await;
    for line in [
        "moat_recipients_total{listener=\"deferred\",result=\"accepted\"} 1",
        "moat_recipients_total{listener=\"deferred\",result=\"rejected\"} 1",
        "moat_messages_total{listener=\"deferred\",verdict=\"accepted\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing:\n{m}");
    }
    let _ = running.stop().await;
}

/// The upstream connection is still taken at a deferred MAIL: when all of them are in use, the client is
/// told `451 4.3.2` at MAIL, and gets `250` there once one is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_upstream_connections_are_still_reported_at_mail() {
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = "upstream.defer_mail = true\nupstream.max_connections = 1\nupstream.connection_wait = \"1s\"";
    let running = start(&test_config(fake.addr, extra)).await;
    let addr = running.addr("smtp").unwrap();
    // a holds the one upstream connection inside DATA.
    let (mut a, _) = Client::connect(addr).await;
    a.expect("EHLO a.example", 250).await;
    a.expect("MAIL FROM:<a@example.org>", 250).await;
    a.expect("RCPT TO:<b@example.test>", 250).await;
    a.expect("DATA", 354).await;
    a.send_raw(b"Subject: slow\r\n\r\nfirst line\r\n").await;
    let (mut b, _) = Client::connect(addr).await;
    b.expect("EHLO b.example", 250).await;
    let text = b.expect("MAIL FROM:<b@example.org>", 451).await;
    assert!(text.starts_with("451 4.3.2"), "{text}");
    a.expect("last line\r\n.", 250).await;
    a.expect("QUIT", 221).await;
    b.expect("MAIL FROM:<b@example.org>", 250).await;
    b.expect("RCPT TO:<c@example.test>", 250).await;
    b.expect("DATA", 354).await;
    b.expect("Subject: b\r\n\r\nbody\r\n.", 250).await;
    assert_eq!(fake.wait_for(2).await.len(), 2);
    let _ = running.stop().await;
}
