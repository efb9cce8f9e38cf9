//! The cap on upstream connections (`upstream.max_connections`) over real TCP against the fake upstream:
//! slow senders inside DATA hold every connection, the next client waits `upstream.connection_wait` and
//! gets `451 4.3.2`, and a connection given back goes to the next client.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The metrics are one registry per process: tests that change the upstream gauges run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn client(addr: SocketAddr) -> Client {
    let (mut c, code) = Client::connect(addr).await;
    assert_eq!(code, 220);
    c.expect("EHLO client.example", 250).await;
    c
}

/// A client inside DATA, part of its message sent.
async fn in_data(addr: SocketAddr) -> Client {
    let mut c = client(addr).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(b"Subject: slow\r\n\r\nfirst line\r\n").await;
    c
}

async fn finish(c: &mut Client) {
    c.send_raw(b"last line\r\n.\r\n").await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");
}

async fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: moat\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.expect("response").unwrap();
    String::from_utf8(raw).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_hold_at_most_max_connections_and_the_next_client_gets_451_4_3_2() {
    let _serial = SERIAL.lock().await;
    let fake = FakeUpstream::start(Script::default()).await;
    let mut cfg = test_config(fake.addr, "upstream.max_connections = 2\nupstream.connection_wait = \"1s\"");
    cfg.metrics.address = "127.0.0.1:0".into();
    let running = start(&cfg).await;
    let addr = running.addr("smtp").unwrap();
    // Two slow senders inside DATA hold both upstream connections.
    let mut a = in_data(addr).await;
    let mut b = in_data(addr).await;
    // The third waits for a connection, then is told to come back later.
    let mut c = client(addr).await;
    let (code, text) = c.cmd("MAIL FROM:<c@example.org>").await;
    assert_eq!((code, text.contains("4.3.2")), (451, true), "{code} {text}");
    let m = metrics(running.metrics.unwrap()).await;
    assert!(m.lines().any(|l| l == "moat_upstream_connections 2"), "{m}");
    assert!(m.lines().any(|l| l == "moat_upstream_connection_wait_timeouts_total 1"), "{m}");
    // The same client tries again while a finishes and leaves: it gets the freed connection.
    finish(&mut a).await;
    a.expect("QUIT", 221).await;
    c.expect("MAIL FROM:<c@example.org>", 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("DATA", 354).await;
    finish(&mut c).await;
    finish(&mut b).await;
    assert_eq!(fake.wait_for(3).await.len(), 3);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_held_between_transactions_goes_to_a_waiting_client() {
    let _serial = SERIAL.lock().await;
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = "upstream.max_connections = 1\nupstream.connection_wait = \"30s\"";
    let running = start(&test_config(fake.addr, extra)).await;
    let addr = running.addr("smtp").unwrap();
    let mut a = in_data(addr).await;
    // b waits for the one connection (its MAIL reply comes once it has one).
    let mut b = client(addr).await;
    b.send_raw(b"MAIL FROM:<b@example.org>\r\n").await;
    // a's message ends while b waits; a stays connected, but does not keep the idle connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    finish(&mut a).await;
    let (code, text) = b.reply().await;
    assert_eq!(code, 250, "{text}");
    b.expect("RCPT TO:<b@example.test>", 250).await;
    b.expect("DATA", 354).await;
    finish(&mut b).await;
    // a's next transaction waits for the connection b now holds between transactions: b, idle, gives it
    // back.
    a.expect("MAIL FROM:<a@example.org>", 250).await;
    a.expect("RCPT TO:<b@example.test>", 250).await;
    a.expect("DATA", 354).await;
    finish(&mut a).await;
    assert_eq!(fake.wait_for(3).await.len(), 3);
    running.stop().await;
}
