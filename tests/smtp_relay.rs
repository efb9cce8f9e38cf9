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
    let _ = running.stop().await;
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
    let _ = running.stop().await;
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
    let _ = running.stop().await;
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
    let _ = running.stop().await;
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
    let _ = running.stop().await;
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
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_connection_limit() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "limits.max_connections = 1")).await;
    let addr = running.addr("smtp").unwrap();
    let (_a, ca) = Client::connect(addr).await;
    let (_b, cb) = Client::connect(addr).await;
    assert_eq!((ca, cb), (220, 421));
    let _ = running.stop().await;
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
    let _ = running.stop().await;
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
    assert_eq!(stopper.await.unwrap().cut_off, 0, "every session finished within the grace period");
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
    let _ = running.stop().await;
}

/// Sends one message on an open session (after EHLO/HELO) and expects the upstream's `250`.
async fn send_one(c: &mut Client, body: &str) {
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.expect(&format!("{body}\r\n."), 250).await;
}

/// A new EHLO/HELO mid-session re-introduces the upstream connection the session holds, so the upstream logs
/// and checks the name the client gave last; also when the EHLO came in the middle of a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ehlo_reintroduces_the_held_upstream_connection() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "")).await;
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    c.expect("EHLO first.example", 250).await;
    send_one(&mut c, "one").await;
    c.expect("EHLO second.example", 250).await;
    send_one(&mut c, "two").await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("HELO third.example", 250).await; // resets the transaction (RFC 5321 4.1.4)
    send_one(&mut c, "three").await;
    c.expect("QUIT", 221).await;
    let msgs = fake.wait_for(3).await;
    let helos: Vec<&str> = msgs.iter().map(|m| m.helo.as_str()).collect();
    assert_eq!(helos, ["first.example", "second.example", "third.example"]);
    let xclient = msgs[2].xclient.as_deref().unwrap_or_default();
    assert!(xclient.contains("HELO=third.example PROTO=SMTP"), "{xclient}");
    assert_eq!(*fake.connections.lock().unwrap(), 1, "one upstream connection, introduced three times");
    let _ = running.stop().await;
}

/// While draining, a transaction that ends lets its reply out, but a new one pipelined behind the final dot
/// is answered `421 4.3.2` and never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_a_transaction_pipelined_after_the_final_dot() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start(&test_config(fake.addr, "")).await;
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    envelope(&mut c).await;
    c.expect("DATA", 354).await;
    c.send_raw(b"Subject: last\r\n\r\nbody\r\n").await;
    let shutdown = running.shutdown.clone();
    let stopper = tokio::spawn(running.stop());
    shutdown.soft.cancelled().await;
    // The end of the message and a whole new transaction in one write (RFC 2920).
    c.send_raw(b".\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n").await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "the transaction in flight completes: {text}");
    let (code, text) = c.reply().await;
    assert!(code == 421 && text.starts_with("421 4.3.2"), "{text}");
    assert_eq!(c.reply().await.0, 0, "closed after 421");
    let _ = stopper.await.unwrap();
    assert_eq!(fake.messages().len(), 1);
    let mails = fake.commands.lock().unwrap().iter().filter(|c| c.starts_with("MAIL")).count();
    assert_eq!(mails, 1, "the pipelined MAIL never reached the upstream");
}

/// DSN and SMTPUTF8 are offered to clients only as the upstream offers them: learnt at start-up and from the
/// upstream's answer to moat's own EHLO on every new upstream connection (never from an introduced client's
/// EHLO, which may differ per client). A parameter moat did not offer is refused (`555`); one it offered but
/// the upstream stopped offering meanwhile gets `455` (never dropped silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_and_smtputf8_are_offered_as_the_upstream_offers_them() {
    let fake = FakeUpstream::start(Script { no_dsn: true, no_smtputf8: true, ..Default::default() }).await;
    // No pooling: every session's first MAIL opens (and learns from) a new upstream connection.
    let running = start(&test_config(fake.addr, "upstream.pool_size = 0")).await;
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(!ehlo.contains("DSN") && !ehlo.contains("SMTPUTF8"), "learnt at start-up:\n{ehlo}");
    let text = c.expect("MAIL FROM:<a@example.org> RET=HDRS", 555).await;
    assert!(text.starts_with("555 5.5.4"), "{text}");
    // The upstream now offers both; moat learns it from the next new connection (this MAIL's).
    fake.set_script(Script::default());
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RSET", 250).await;
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("DSN") && ehlo.contains("SMTPUTF8"), "{ehlo}");
    c.expect("MAIL FROM:<a@example.org> RET=HDRS", 250).await;
    c.expect("RCPT TO:<b@example.test> NOTIFY=SUCCESS", 250).await;
    c.expect("RSET", 250).await;
    // The upstream stops offering DSN after this session's EHLO advertised it: the held connection,
    // re-introduced after the new EHLO, lacks it, so the parameter gets 455.
    fake.set_script(Script { no_dsn: true, ..Default::default() });
    let ehlo = c.expect("EHLO other.example", 250).await;
    assert!(ehlo.contains("DSN"), "not learnt yet:\n{ehlo}");
    let text = c.expect("MAIL FROM:<a@example.org> RET=FULL", 455).await;
    assert!(text.starts_with("455 4.5.4"), "{text}");
    c.expect("QUIT", 221).await;
    // The next session's new upstream connection teaches moat that DSN is gone.
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RSET", 250).await;
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(!ehlo.contains("DSN"), "learnt from the new connection:\n{ehlo}");
    c.expect("QUIT", 221).await;
    let cmds = fake.commands.lock().unwrap().clone();
    assert!(cmds.iter().any(|c| c.contains("RET=HDRS")), "{cmds:?}");
    assert!(!cmds.iter().any(|c| c.contains("RET=FULL")), "{cmds:?}");
    let _ = running.stop().await;
}
