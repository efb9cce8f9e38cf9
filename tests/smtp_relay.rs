//! Relay behaviour over real TCP against the in-process fake upstream: byte-exact relay, failures on each
//! side, limits, pooling, timeouts and graceful shutdown.

mod common;

use std::time::Duration;

use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

async fn envelope(c: &mut Client) {
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
}

/// Dot-stuffs canonical text for the wire (independent of moat's own implementation).
fn stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in msg.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_messages_arrive_byte_identical() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "trace.received_header = false\nlimits.max_text_line = 0")).await;
    let addr = running.addr("smtp").unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 40, ..Default::default() });
    let strategy = proptest::collection::vec(
        proptest::collection::vec(prop_oneof![Just(b'.'), Just(b' '), 0x21u8..0x7f, 0x80u8..=0xff], 0..200),
        0..50,
    );
    let mut sent = 0;
    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO client.example", 250).await;
    let cases: Vec<Vec<Vec<u8>>> = (0..40).map(|_| strategy.new_tree(&mut runner).unwrap().current()).collect();
    for lines in cases {
        let mut msg = Vec::new();
        for l in &lines {
            msg.extend_from_slice(l);
            msg.extend_from_slice(b"\r\n");
        }
        c.expect("MAIL FROM:<a@example.org>", 250).await;
        c.expect("RCPT TO:<b@example.test>", 250).await;
        c.expect("DATA", 354).await;
        let mut wire = stuff(&msg);
        wire.extend_from_slice(b".\r\n");
        c.send_raw(&wire).await;
        let (code, text) = c.reply().await;
        assert_eq!(code, 250, "{text}");
        sent += 1;
        let got = fake.wait_for(sent).await;
        assert_eq!(got[sent - 1].data, msg, "message {sent} differs");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_data_queues_nothing() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "")).await;
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    envelope(&mut c).await;
    c.expect("DATA", 354).await;
    c.send_raw(b"Subject: half\r\n\r\nonly part of the body").await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fake.messages().is_empty());
    let cmds = fake.commands.lock().unwrap().clone();
    assert!(!cmds.iter().any(|c| c == "DATA"), "DATA must not reach the upstream: {cmds:?}");
    assert!(cmds.iter().any(|c| c == "RSET"), "the upstream transaction is reset: {cmds:?}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_unreachable_is_a_tempfail() {
    // a port that was free a moment ago: nothing listens there
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let running = start(&test_config(dead, "upstream.connect_timeout = \"2s\"")).await;
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    let text = c.expect("MAIL FROM:<a@example.org>", 451).await;
    assert!(text.starts_with("451 4.4.1"), "{text}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_silent_after_data_is_a_tempfail() {
    let fake = FakeUpstream::start(Script { hang_at_end: true, ..Default::default() }).await;
    let running = start(&test_config(fake.addr, "upstream.data_timeout = \"300ms\"")).await;
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    envelope(&mut c).await;
    c.expect("DATA", 354).await;
    let text = c.expect("Subject: t\r\n\r\nbody\r\n.", 451).await;
    assert!(text.starts_with("451 4.4.2"), "{text}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_is_reused_and_reintroduced() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "")).await;
    let addr = running.addr("smtp").unwrap();
    for i in 0..3 {
        let (mut c, _) = Client::connect(addr).await;
        c.expect(&format!("EHLO client{i}.example"), 250).await;
        c.expect("MAIL FROM:<a@example.org>", 250).await;
        c.expect("RCPT TO:<b@example.test>", 250).await;
        c.expect("DATA", 354).await;
        c.expect("x\r\n.", 250).await;
        c.expect("QUIT", 221).await;
        tokio::time::sleep(Duration::from_millis(100)).await; // let the connection go back to the pool
    }
    assert_eq!(*fake.connections.lock().unwrap(), 1, "one upstream connection served three sessions");
    let msgs = fake.wait_for(3).await;
    for (i, m) in msgs.iter().enumerate() {
        assert!(m.xclient.as_deref().unwrap().contains(&format!("HELO=client{i}.example")), "{:?}", m.xclient);
        assert_eq!(m.helo, format!("client{i}.example"));
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_connection_limit() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "limits.max_connections_per_ip = 2")).await;
    let addr = running.addr("smtp").unwrap();
    let (_a, ca) = Client::connect(addr).await;
    let (_b, cb) = Client::connect(addr).await;
    let (mut third, cc) = Client::connect(addr).await;
    assert_eq!((ca, cb, cc), (220, 220, 421));
    assert_eq!(third.reply().await.0, 0, "closed after 421");
    drop(_a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_d, cd) = Client::connect(addr).await;
    assert_eq!(cd, 220, "a slot is free again");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_connection_limit() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "limits.max_connections = 1")).await;
    let addr = running.addr("smtp").unwrap();
    let (_a, ca) = Client::connect(addr).await;
    let (_b, cb) = Client::connect(addr).await;
    assert_eq!((ca, cb), (220, 421));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_with_421() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "limits.idle_timeout = \"300ms\"")).await;
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("4.4.2"), "{text}");
    assert_eq!(c.reply().await.0, 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_transactions_finish_and_closes_idle_sessions() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "")).await;
    let addr = running.addr("smtp").unwrap();
    let (mut idle, _) = Client::connect(addr).await;
    idle.expect("EHLO idle.example", 250).await;
    let (mut busy, _) = Client::connect(addr).await;
    envelope(&mut busy).await;
    busy.expect("DATA", 354).await;
    busy.send_raw(b"Subject: in flight\r\n\r\n").await;
    let stopper = tokio::spawn(running.stop());
    let (code, text) = idle.reply().await;
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("4.3.2"), "{text}");
    // the transaction in flight still completes and is relayed
    busy.send_raw(b"body\r\n.\r\n").await;
    let (code, text) = busy.reply().await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(busy.reply().await.0, 421, "then the busy session is closed too");
    stopper.await.unwrap();
    assert_eq!(fake.messages().len(), 1);
    // no new connections once stopped
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Without an identity to send, a pooled connection is not probed; one that died while pooled fails at MAIL
/// and the MAIL is retried once on a fresh connection, invisibly to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pooled_connection_is_replaced_at_mail() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "upstream.identity = \"none\"")).await;
    let addr = running.addr("smtp").unwrap();
    let (mut c, _) = Client::connect(addr).await;
    envelope(&mut c).await;
    c.expect("DATA", 354).await;
    c.expect("x\r\n.", 250).await;
    c.expect("QUIT", 221).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // back in the pool
    fake.set_script(Script { drop_at: Some("MAIL".into()), ..Default::default() });
    let (mut c, _) = Client::connect(addr).await;
    envelope(&mut c).await;
    c.expect("DATA", 354).await;
    c.expect("y\r\n.", 250).await;
    assert_eq!(*fake.connections.lock().unwrap(), 2, "the dead pooled connection was replaced");
    assert_eq!(fake.wait_for(2).await.len(), 2);
    running.stop().await;
}
