//! PROXY protocol in (issue #12): a header from a trusted balancer names the client, which then drives the
//! Received header, XCLIENT to the upstream, the audit record and the per-client limit; TLS starts after
//! it; untrusted sources and malformed headers are closed. A real HAProxy with `send-proxy-v2` in front of
//! two instances.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fake::{FakeUpstream, Script};
use common::fleet::{connect_from, free_port};
use common::moat::{config_from, start, tls_connector, Client};
use common::postfix::require_peer;
use moat::server::Running;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;

fn fixture(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel).to_str().unwrap().to_string()
}

/// One instance with a PROXY listener "mx" (plain, `version`), an implicit-TLS one "tls" (v2), both
/// trusting 127.0.0.1 only, auditing to `audit`.
async fn instance(fake: &FakeUpstream, audit: &Path, version: &str, extra: &str) -> Running {
    let listeners = format!(
        "[[listener]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\nproxy_protocol = \"{version}\"\n\
         proxy_trusted = [\"127.0.0.1/32\"]\n\
         [[listener]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\nmode = \"implicit-tls\"\nproxy_protocol = \"v2\"\n\
         proxy_trusted = [\"127.0.0.1\"]\n\
         [tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        fixture("tls/server.pem"),
        fixture("tls/server.key"),
    );
    let mut cfg = config_from(fake.addr, extra, &listeners);
    cfg.audit.destination = audit.to_str().unwrap().to_string();
    start(&cfg).await
}

fn v2_tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut b = moat::proxy_protocol::V2_SIGNATURE.to_vec();
    b.extend_from_slice(&[0x21, 0x11, 0, 12]);
    b.extend_from_slice(&src);
    b.extend_from_slice(&dst);
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    b
}

/// Connects from `from`, sends `header`, and reads the greeting (0: closed).
async fn with_header(from: &str, to: SocketAddr, header: &[u8]) -> (Client, u16, String) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = sock.connect(to).await.unwrap();
    stream.write_all(header).await.unwrap();
    let mut c = Client { io: BufReader::new(stream) };
    let (code, text) = c.reply().await;
    (c, code, text)
}

async fn send_message<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(c: &mut Client<S>) {
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<s@example.org>", 250).await;
    c.expect("RCPT TO:<x@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.expect("Subject: t\r\n\r\nhi\r\n.", 250).await;
    c.expect("QUIT", 221).await;
}

/// Audit lines (JSON) with a `txn_id`, waiting until there are `n`.
async fn audit_records(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r.get("txn_id").is_some())
            .collect();
        if recs.len() >= n || Instant::now() > deadline {
            return recs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_real_client_drives_received_xclient_and_audit() {
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let r = instance(&fake, &audit, "any", "").await;
    let mx = r.addr("mx").unwrap();

    let (mut c, code, _) = with_header("127.0.0.1", mx, b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n").await;
    assert_eq!(code, 220);
    send_message(&mut c).await;
    let (mut c, code, _) = with_header("127.0.0.1", mx, &v2_tcp4([203, 0, 113, 9], 40000, [198, 51, 100, 1], 25)).await;
    assert_eq!(code, 220);
    send_message(&mut c).await;
    let got = fake.wait_for(2).await;
    let x0 = got[0].xclient.clone().unwrap_or_default();
    assert!(x0.contains("ADDR=192.0.2.7 PORT=56324"), "{x0}");
    assert!(String::from_utf8_lossy(&got[0].data).contains("[192.0.2.7]:56324"), "Received names the client");
    let x1 = got[1].xclient.clone().unwrap_or_default();
    assert!(x1.contains("ADDR=203.0.113.9 PORT=40000"), "{x1}");
    let recs = audit_records(&audit, 2).await;
    let ips: Vec<&str> = recs.iter().filter_map(|r| r["client_ip"].as_str()).collect();
    assert_eq!(ips, ["192.0.2.7", "203.0.113.9"]);

    // A LOCAL header (the balancer's own health check): the balancer is the client.
    let mut local = moat::proxy_protocol::V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let (mut c, code, _) = with_header("127.0.0.1", mx, &local).await;
    assert_eq!(code, 220);
    c.expect("QUIT", 221).await;
    r.stop().await;
}

#[tokio::test]
async fn untrusted_sources_and_bad_headers_are_closed() {
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let r = instance(&fake, &dir.path().join("a.jsonl"), "v1", "").await;
    let mx = r.addr("mx").unwrap();
    let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n";
    for (from, bytes, what) in [
        ("127.0.0.3", &header[..], "untrusted source"),
        ("127.0.0.1", &b"EHLO client.example\r\n"[..], "no header"),
        ("127.0.0.1", &b"PROXY TCP4 192.0.2.7 nope 1 25\r\n"[..], "malformed"),
        ("127.0.0.1", &v2_tcp4([192, 0, 2, 7], 1, [10, 0, 0, 1], 25)[..], "v2 on a v1 listener"),
    ] {
        let (_c, code, text) = with_header(from, mx, bytes).await;
        assert_eq!((code, text.as_str()), (0, ""), "{what}: closed without a greeting");
    }
    assert!(fake.messages().is_empty());
    r.stop().await;
}

#[tokio::test]
async fn tls_starts_after_the_header() {
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let r = instance(&fake, &dir.path().join("a.jsonl"), "v1", "").await;
    let mut s = tokio::net::TcpStream::connect(r.addr("tls").unwrap()).await.unwrap();
    s.write_all(&v2_tcp4([192, 0, 2, 8], 5555, [10, 0, 0, 1], 465)).await.unwrap();
    let pem = std::fs::read(fixture("tls/ca.pem")).unwrap();
    let ca = rustls_pemfile::certs(&mut &pem[..]).next().unwrap().unwrap();
    let name = rustls::pki_types::ServerName::try_from("mx.test").unwrap();
    let tls = tls_connector(ca).connect(name, s).await.expect("handshake after the header");
    let mut c = Client::new(tls);
    assert_eq!(c.reply().await.0, 220);
    send_message(&mut c).await;
    let got = fake.wait_for(1).await;
    assert!(got[0].xclient.clone().unwrap_or_default().contains("ADDR=192.0.2.8"));
    r.stop().await;
}

#[tokio::test]
async fn the_per_client_limit_counts_real_clients_not_the_balancer() {
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let r = instance(&fake, &dir.path().join("a.jsonl"), "v1", "limits.max_connections_per_ip = 1").await;
    let mx = r.addr("mx").unwrap();
    let h = |ip: &str| format!("PROXY TCP4 {ip} 198.51.100.1 1000 25\r\n").into_bytes();
    let (_a, code_a, _) = with_header("127.0.0.1", mx, &h("192.0.2.1")).await;
    let (_b, code_b, _) = with_header("127.0.0.1", mx, &h("192.0.2.2")).await;
    let (_c, code_c, _) = with_header("127.0.0.1", mx, &h("192.0.2.1")).await;
    assert_eq!((code_a, code_b, code_c), (220, 220, 421));
    r.stop().await;
}

/// HAProxy with `send-proxy-v2` spreads connections over two instances (round robin); a client on 127.0.0.2 (HAProxy itself
/// connects from 127.0.0.1) is the client the upstream's XCLIENT and both audit trails see.
#[tokio::test]
async fn haproxy_send_proxy_v2_in_front_of_two_instances() {
    if !require_peer("haproxy") {
        return;
    }
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (audit_a, audit_b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let a = instance(&fake, &audit_a, "v2", "state.instance_id = \"a\"").await;
    let b = instance(&fake, &audit_b, "v2", "state.instance_id = \"b\"").await;
    let front = free_port();
    let _h = common::haproxy::start(front, &[a.addr("mx").unwrap(), b.addr("mx").unwrap()]);
    let front: SocketAddr = ([127, 0, 0, 1], front).into();
    for _ in 0..4 {
        let (mut c, code) = connect_from("127.0.0.2", front).await;
        assert_eq!(code, 220);
        send_message(&mut c).await;
    }
    let got = fake.wait_for(4).await;
    for m in &got {
        let x = m.xclient.clone().unwrap_or_default();
        assert!(x.contains("ADDR=127.0.0.2 "), "{x}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let (ra, rb) = loop {
        let (ra, rb) = (audit_records(&audit_a, 0).await, audit_records(&audit_b, 0).await);
        if ra.len() + rb.len() >= 4 || Instant::now() > deadline {
            break (ra, rb);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ra.len() + rb.len(), 4);
    assert!(!ra.is_empty() && !rb.is_empty(), "round robin reached both: {} and {}", ra.len(), rb.len());
    for rec in ra.iter().chain(&rb) {
        assert_eq!(rec["client_ip"], "127.0.0.2", "{rec}");
    }
    assert!(ra.iter().all(|r| r["conn_id"].as_str().unwrap().starts_with("a-")));
    assert!(rb.iter().all(|r| r["conn_id"].as_str().unwrap().starts_with("b-")));
    a.stop().await;
    b.stop().await;
}
