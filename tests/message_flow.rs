//! The message flow under the rules, over real TCP: a verdict at the end of the header section stops
//! spooling (the rest of DATA is read and dropped), and the content scan's memory counts against the spool's
//! global budget (a scan that finds no room is tempfailed, and passes once memory is back).

mod common;

use std::path::Path;

use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};
use moat::server::Running;

/// A rules directory holding `rules` as its one file.
fn rules_dir(rules: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("50-test.toml"), rules).unwrap();
    dir
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// `n` bytes of message body in 100-byte lines.
fn body(n: usize) -> String {
    let line = format!("{}\r\n", "b".repeat(98));
    line.repeat(n / line.len())
}

async fn envelope(c: &mut Client) {
    c.expect("MAIL FROM:<alice@example.org>", 250).await;
    c.expect("RCPT TO:<bob@example.test>", 250).await;
}

/// Sends a whole message with DATA and returns the reply to its final dot.
async fn data(c: &mut Client, message: &str) -> (u16, String) {
    c.expect("DATA", 354).await;
    c.send_raw(message.as_bytes()).await;
    c.send_raw(b".\r\n").await;
    c.reply().await
}

/// Spilling past the memory threshold needs the spool directory, which is removed once moat runs: a
/// message that is spooled past the threshold fails with `452 4.3.1`. A message refused by its headers
/// gets the rule's reply instead, however large its body: moat stopped spooling it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_verdict_stops_spooling() {
    let rules = rules_dir(
        "[[rule]]\nid = \"bulk\"\nwhen = { header = { name = \"X-Mailer\", regex = '(?i)bulkmailer' } }\n\
         action = \"reject\"\nreply = \"554 5.7.1 bulk mail refused\"\n",
    );
    let spool = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!(
        "rules.directory = {}\nspool.directory = {}\nspool.memory_threshold = \"64KiB\"",
        toml_path(rules.path()),
        toml_path(spool.path())
    );
    let running = start(&test_config(fake.addr, &extra)).await;
    std::fs::remove_dir(spool.path()).unwrap();
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    let big = body(4 << 20);

    envelope(&mut c).await;
    let (code, text) = data(&mut c, &format!("Subject: a\r\nX-Mailer: BulkMailer 2\r\n\r\n{big}")).await;
    assert_eq!(code, 554, "the rule's reply, not a spool failure: {text}");

    // The same body after harmless headers is spooled, needs a spill file, and cannot have one.
    envelope(&mut c).await;
    let (code, text) = data(&mut c, &format!("Subject: b\r\nX-Mailer: Thunderbird\r\n\r\n{big}")).await;
    assert_eq!((code, text.get(4..9)), (452, Some("4.3.1")), "{text}");

    // A small message still fits in memory and goes through: the session went on normally.
    envelope(&mut c).await;
    let (code, text) = data(&mut c, "Subject: c\r\nX-Mailer: Thunderbird\r\n\r\nsmall\r\n").await;
    assert_eq!(code, 250, "{text}");
    let msgs = fake.wait_for(1).await;
    assert_eq!(msgs.len(), 1);
    assert!(String::from_utf8_lossy(&msgs[0].data).contains("Subject: c\r\n"));
    let _ = running.stop().await;
}

/// moat with one body rule (so every message is scanned) and a 1 MiB memory budget, any message held in memory.
async fn with_a_body_rule_and_1mib_budget() -> (tempfile::TempDir, FakeUpstream, Running) {
    let rules = rules_dir("[[rule]]\nid = \"body\"\nwhen = { body = 'never-matches-xyz' }\naction = \"reject\"\n");
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!(
        "rules.directory = {}\nspool.memory_budget = \"1MiB\"\nspool.memory_threshold = \"1MiB\"",
        toml_path(rules.path())
    );
    let running = start(&test_config(fake.addr, &extra)).await;
    (rules, fake, running)
}

/// One session holds most of a 1 MiB budget in its spool (a BDAT chunk, answered once spooled); another
/// session's message then cannot reserve memory for its scan and gets `451 4.3.1`, nothing relayed. When
/// the first session lets go (RSET), the same message is scanned and relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_memory_counts_against_the_spool_budget() {
    let (_rules, fake, running) = with_a_body_rule_and_1mib_budget().await;
    let addr = running.addr("smtp").unwrap();

    let (mut holder, _) = Client::connect(addr).await;
    holder.expect("EHLO client.example", 250).await;
    envelope(&mut holder).await;
    let chunk = format!("Subject: holder\r\n\r\n{}", body(900_000));
    holder.send_raw(format!("BDAT {}\r\n{chunk}", chunk.len()).as_bytes()).await;
    let (code, text) = holder.reply().await;
    assert_eq!(code, 250, "{text}");

    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO client.example", 250).await;
    let message = format!("Subject: scanned\r\n\r\n{}", body(150_000));
    envelope(&mut c).await;
    let (code, text) = data(&mut c, &message).await;
    assert_eq!((code, text.get(4..9)), (451, Some("4.3.1")), "{text}");
    assert!(fake.messages().is_empty(), "a message that could not be scanned is not relayed");

    holder.expect("RSET", 250).await;
    envelope(&mut c).await;
    let (code, text) = data(&mut c, &message).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(fake.wait_for(1).await.len(), 1);
    let _ = running.stop().await;
}

/// A message the budget can hold is scanned on an idle server, even when its own in-memory spool already
/// holds a large part of the budget (the scan's reservation counts that copy).
#[tokio::test]
async fn a_large_message_is_scanned_on_an_idle_server() {
    let (_rules, fake, running) = with_a_body_rule_and_1mib_budget().await;
    let addr = running.addr("smtp").unwrap();
    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO client.example", 250).await;
    let message = format!("Subject: alone\r\n\r\n{}", body(400_000));
    for _ in 0..2 {
        envelope(&mut c).await;
        let (code, text) = data(&mut c, &message).await;
        assert_eq!(code, 250, "{text}");
    }
    assert_eq!(fake.wait_for(2).await.len(), 2, "both relayed");
    let _ = running.stop().await;
}

/// `spool.disk_budget` bounds the spill files of all sessions together: a message that would pass it gets
/// `452 4.3.1` and is not relayed, and once the other session's message is gone the same message passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_files_have_a_disk_budget() {
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = "spool.memory_threshold = \"64KiB\"\nspool.disk_budget = \"3MiB\"";
    let running = start(&test_config(fake.addr, extra)).await;
    let addr = running.addr("smtp").unwrap();
    // One session holds 2 MiB in a spill file, its message not yet ended.
    let (mut holder, _) = Client::connect(addr).await;
    holder.expect("EHLO holder.example", 250).await;
    envelope(&mut holder).await;
    // A BDAT chunk is answered once it is spooled, and the message stays open.
    let chunk = format!("Subject: held\r\n\r\n{}", body(2 << 20));
    holder.send_raw(format!("BDAT {}\r\n{chunk}", chunk.len()).as_bytes()).await;
    assert_eq!(holder.reply().await.0, 250);
    // Another 2 MiB message does not fit in what is left.
    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO client.example", 250).await;
    envelope(&mut c).await;
    let (code, text) = data(&mut c, &format!("Subject: second\r\n\r\n{}", body(2 << 20))).await;
    assert_eq!((code, text.get(4..9)), (452, Some("4.3.1")), "{text}");
    assert!(fake.messages().is_empty(), "the refused message was not relayed");
    // The first message ends and is relayed; its spill file goes, and the second one now fits.
    holder.send_raw(b"BDAT 0 LAST\r\n").await;
    assert_eq!(holder.reply().await.0, 250);
    envelope(&mut c).await;
    let (code, text) = data(&mut c, &format!("Subject: second\r\n\r\n{}", body(2 << 20))).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(fake.wait_for(2).await.len(), 2);
    let _ = running.stop().await;
}

/// Dot-stuffs `message` for the wire, as a client does.
fn stuffed(message: &str) -> String {
    let s = message.replace("\r\n.", "\r\n..");
    if s.starts_with('.') {
        format!(".{s}")
    } else {
        s
    }
}

/// The relay sends spooled bytes with no line starting with a dot as they are (one vectored write) and
/// stuffs the rest: messages in memory and spilled to disk, with dotted lines in none, some or all of their
/// blocks, arrive upstream byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_bytes_are_identical_with_and_without_stuffing() {
    let spool = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!("spool.directory = {}\nspool.memory_threshold = \"64KiB\"", toml_path(spool.path()));
    let running = start(&test_config(fake.addr, &extra)).await;
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    let messages = [
        "Subject: clean\r\n\r\nhello\r\n".to_string(),
        "Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n".to_string(),
        format!("Subject: spilled clean\r\n\r\n{}", body(1 << 20)),
        format!("Subject: spilled, dots late\r\n\r\n{}.dot\r\n{}..x\r\n", body(600 << 10), body(300 << 10)),
        format!("Subject: spilled, dots early\r\n\r\n.first\r\n{}", body(700 << 10)),
    ];
    for m in &messages {
        envelope(&mut c).await;
        let (code, text) = data(&mut c, &stuffed(m)).await;
        assert_eq!(code, 250, "{text}");
    }
    let got = fake.wait_for(messages.len()).await;
    for (m, g) in messages.iter().zip(&got) {
        assert!(g.data.ends_with(m.as_bytes()), "message {:?} changed on the way", &m[..30.min(m.len())]);
        assert!(g.data.starts_with(b"Received: "), "moat's Received header comes first");
    }
    let _ = running.stop().await;
}
