//! Observability seen from outside: real SMTP traffic through a moat listener, then `/metrics`, `/healthz` and
//! `/readyz` scraped over HTTP; the listener's credentials from `[metrics]`; `/readyz` following the
//! upstream as it goes away and comes back; the audit trail written to a file; and the shipped Prometheus
//! alert rules and Grafana dashboard checked against promtool and against the names moat really exports.
//!
//! The metrics recorder is process-wide, shared by every test in this binary, so each test uses listener
//! names of its own and asserts whole sample lines of its own series; global series (histograms without
//! labels, limits) are only checked for presence or a lower bound.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::fake::{FakeUpstream, Script};
use common::moat::{start, Client};
use moat::config::Config;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

// === helpers ===

/// Like `common::moat::config_from`, but with the metrics listener on a free loopback port and `extra` free
/// to set any `metrics.*` or `audit.*` key (TOML refuses a key given twice, so the defaults here step aside
/// for keys `extra` sets).
fn config_from(upstream: SocketAddr, extra: &str, listeners: &str) -> Config {
    let mut text = format!(
        "server.hostname = \"mx.test\"\nserver.reverse_dns = false\nupstream.address = \"{upstream}\"\n\
         shutdown.grace_period = \"5s\"\n{extra}\n"
    );
    if !extra.contains("metrics.address") {
        text.push_str("metrics.address = \"127.0.0.1:0\"\n");
    }
    if !extra.contains("relay.local_domains") {
        text.push_str("relay.local_domains = [\"example.net\"]\n");
    }
    if !extra.contains("audit.destination") {
        text.push_str("audit.destination = \"off\"\n");
    }
    text.push_str(listeners);
    Config::parse(&text, Path::new("observability.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A plain listener called `name`.
fn listener(name: &str) -> String {
    format!("[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\n")
}

/// One HTTP/1.1 GET; returns the status, the head and the body.
async fn http_get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: moat\r\n{auth}\r\n").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.expect("response").unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, _, body) = http_get(addr, "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// Scrapes until every line is there (sessions are counted when their task ends, just after the last
/// reply), or fails showing what is missing.
async fn wait_for_lines(addr: SocketAddr, lines: &[&str]) -> String {
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(addr).await;
        if lines.iter().all(|l| has_line(&text, l)) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing: Vec<_> = lines.iter().filter(|l| !has_line(&text, l)).collect();
    let ours: Vec<_> = text.lines().filter(|l| l.contains("obs")).collect();
    panic!("missing lines {missing:#?}\namong the lines of this test:\n{}", ours.join("\n"));
}

/// The value of the sample whose line starts with `series` (name and labels), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `/readyz` until it answers `status`, or fails with the last answer.
async fn wait_ready(addr: SocketAddr, status: u16) -> String {
    let mut last = (0, String::new());
    for _ in 0..200 {
        let (s, _, body) = http_get(addr, "/readyz", None).await;
        if s == status {
            return body;
        }
        last = (s, body);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("/readyz never answered {status}; last {} {:?}", last.0, last.1);
}

/// A message of exactly the given header lines and body, CRLF, without the final dot.
fn message(subject: &str, message_id: &str, body: &str) -> String {
    format!(
        "From: a@example.org\r\nTo: b@example.net\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n\r\n{body}\r\n"
    )
}

/// EHLO (once), MAIL, the RCPTs with their expected codes, DATA, the message and the final dot; returns the
/// final reply.
async fn transaction(c: &mut Client, rcpts: &[(&str, u16)], msg: &str) -> (u16, String) {
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    for (rcpt, code) in rcpts {
        c.expect(&format!("RCPT TO:<{rcpt}>"), *code).await;
    }
    c.expect("DATA", 354).await;
    c.send_raw(msg.as_bytes()).await;
    c.cmd(".").await
}

fn rejecting_script() -> Script {
    Script { rcpt: Some(("nobody".into(), "550 5.1.1 <nobody@example.net>: user unknown".into())), ..Script::default() }
}

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

// === /metrics after real traffic ===

#[tokio::test]
async fn metrics_after_real_traffic() {
    let fake = FakeUpstream::start(rejecting_script()).await;
    let config = config_from(fake.addr, "limits.max_message_size = \"2KiB\"", &listener("obs_traffic"));
    let running = start(&config).await;
    let metrics = running.metrics.expect("metrics listener");
    let addr = running.addr("obs_traffic").unwrap();

    // A delivered message with one recipient refused by the upstream.
    let (mut c, code) = Client::connect(addr).await;
    assert_eq!(code, 220);
    c.expect("EHLO client.example", 250).await;
    let delivered = message("traffic", "<obs-traffic-1@example.org>", "hello");
    let (code, text) = transaction(&mut c, &[("b@example.net", 250), ("nobody@example.net", 550)], &delivered).await;
    assert_eq!(code, 250, "{text}");
    assert!(text.contains("FAKE123"), "{text}");
    c.expect("QUIT", 221).await;

    // A message over the size limit: read to the end, refused, never relayed.
    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO client.example", 250).await;
    let too_big = message("big", "<obs-traffic-2@example.org>", &format!("{}\r\n", "x".repeat(76)).repeat(40));
    let (code, text) = transaction(&mut c, &[("c@example.net", 250)], &too_big).await;
    assert_eq!(code, 552, "{text}");
    c.expect("QUIT", 221).await;
    assert_eq!(fake.wait_for(1).await.len(), 1);

    let received = delivered.len() + too_big.len();
    let text = wait_for_lines(
        metrics,
        &[
            "moat_connections_total{listener=\"obs_traffic\",result=\"accepted\"} 2",
            "moat_connections_total{listener=\"obs_traffic\",result=\"rejected_limit\"} 0",
            "moat_connections_active{listener=\"obs_traffic\"} 0",
            "moat_sessions_closed_total{listener=\"obs_traffic\",reason=\"quit\"} 2",
            "moat_messages_total{listener=\"obs_traffic\",verdict=\"accepted\"} 1",
            "moat_messages_total{listener=\"obs_traffic\",verdict=\"rejected\"} 1",
            "moat_messages_total{listener=\"obs_traffic\",verdict=\"tempfailed\"} 0",
            "moat_messages_total{listener=\"obs_traffic\",verdict=\"aborted\"} 0",
            "moat_recipients_total{listener=\"obs_traffic\",result=\"accepted\"} 2",
            "moat_recipients_total{listener=\"obs_traffic\",result=\"rejected\"} 1",
            &format!("moat_received_bytes_total{{listener=\"obs_traffic\"}} {received}"),
            "# TYPE moat_message_bytes histogram",
            "# TYPE moat_upstream_transaction_seconds histogram",
            "# TYPE moat_connections_total counter",
            "moat_auth_lockouts_total 0",
        ],
    )
    .await;
    // Global series: at least this test's share.
    assert!(sample(&text, "moat_limit_hits_total{limit=\"max_message_size\"}").unwrap() >= 1.0, "{text}");
    assert!(sample(&text, "moat_upstream_replies_total{phase=\"rcpt\",class=\"5xx\"}").unwrap() >= 1.0, "{text}");
    assert!(sample(&text, "moat_upstream_replies_total{phase=\"data\",class=\"2xx\"}").unwrap() >= 1.0, "{text}");
    assert!(sample(&text, "moat_commands_total{command=\"RCPT\"}").unwrap() >= 3.0, "{text}");
    assert!(sample(&text, "moat_upstream_connect_seconds_count").unwrap() >= 1.0, "{text}");
    assert!(sample(&text, "moat_message_bytes_count").unwrap() >= 2.0, "{text}");
    // Process-wide (other tests here stop their upstreams), so only its presence is certain.
    assert!(sample(&text, "moat_upstream_up").is_some(), "{text}");
    // Closed label sets start at zero; a client-supplied mechanism never becomes a label.
    for mechanism in ["PLAIN", "LOGIN"] {
        for result in ["success", "failure", "locked", "cancelled"] {
            let series = format!("moat_auth_attempts_total{{mechanism=\"{mechanism}\",result=\"{result}\"}}");
            assert!(sample(&text, &series).is_some(), "{series} missing");
        }
    }
    moat::metrics::auth_attempt("XOAUTH2", moat::metrics::AuthResult::Failure);
    assert!(!scrape(metrics).await.contains("XOAUTH2"));
    // No client address, sender or recipient ever appears in a label.
    for needle in ["127.0.0.1", "example.org", "example.net", "client.example"] {
        assert!(!text.lines().any(|l| !l.starts_with('#') && l.contains(needle)), "{needle} leaked into:\n{text}");
    }
    let _ = running.stop().await;
}

// === /healthz and /readyz ===

/// A minimal upstream that greets, answers QUIT, and can be stopped and started again on the same port.
struct Greeter {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Greeter {
    async fn start_on(addr: SocketAddr) -> Greeter {
        // The port was ours a moment ago; tokio sets SO_REUSEADDR, so TIME_WAIT does not block the bind.
        let mut last = None;
        for _ in 0..50 {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    let addr = l.local_addr().unwrap();
                    return Greeter { addr, task: Some(tokio::spawn(greet(l))) };
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot bind {addr} again: {last:?}");
    }

    /// Closes the listening socket (and the connections it serves).
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

async fn greet(l: TcpListener) {
    let mut sessions = tokio::task::JoinSet::new();
    while let Ok((s, _)) = l.accept().await {
        sessions.spawn(async move {
            let mut io = BufReader::new(s);
            let _ = io.get_mut().write_all(b"220 greeter ESMTP\r\n").await;
            let mut line = String::new();
            while io.read_line(&mut line).await.unwrap_or(0) > 0 {
                let reply: &[u8] = match line.trim_end().to_ascii_uppercase().as_str() {
                    "QUIT" => b"221 2.0.0 Bye\r\n",
                    l if l.starts_with("EHLO") => {
                        b"250-greeter\r\n250-XCLIENT ADDR PORT NAME HELO PROTO LOGIN\r\n250 8BITMIME\r\n"
                    }
                    l if l.starts_with("XCLIENT") => b"220 greeter ESMTP\r\n",
                    _ => b"250 2.0.0 Ok\r\n",
                };
                let _ = io.get_mut().write_all(reply).await;
                line.clear();
            }
        });
    }
}

#[tokio::test]
async fn readyz_follows_the_upstream_check() {
    let mut upstream = Greeter::start_on("127.0.0.1:0".parse().unwrap()).await;
    let extra = "metrics.upstream_check_interval = \"100ms\"\nupstream.connect_timeout = \"1s\"";
    let running = start(&config_from(upstream.addr, extra, &listener("obs_ready"))).await;
    let metrics = running.metrics.unwrap();

    let (status, head, body) = http_get(metrics, "/healthz", None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"), "{head}");
    assert_eq!(wait_ready(metrics, 200).await, "ready\n");

    upstream.stop().await;
    assert_eq!(wait_ready(metrics, 503).await, "not ready: upstream unreachable\n");
    // Liveness does not depend on the upstream.
    assert_eq!(http_get(metrics, "/healthz", None).await.0, 200);

    let _upstream = Greeter::start_on(upstream.addr).await;
    assert_eq!(wait_ready(metrics, 200).await, "ready\n");
    let _ = running.stop().await;
}

#[tokio::test]
async fn a_relay_that_cannot_connect_marks_the_upstream_down_at_once() {
    let mut upstream = Greeter::start_on("127.0.0.1:0".parse().unwrap()).await;
    // The periodic check runs once at start and then not for an hour: only the relay can change the state.
    let extra = "metrics.upstream_check_interval = \"1h\"\nupstream.pool_size = 0\nupstream.connect_timeout = \"1s\"";
    let running = start(&config_from(upstream.addr, extra, &listener("obs_relay_down"))).await;
    let metrics = running.metrics.unwrap();
    let addr = running.addr("obs_relay_down").unwrap();
    assert_eq!(wait_ready(metrics, 200).await, "ready\n");

    upstream.stop().await;
    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO client.example", 250).await;
    let (code, text) = c.cmd("MAIL FROM:<a@example.org>").await;
    assert_eq!(code / 100, 4, "{text}");
    let (status, _, body) = http_get(metrics, "/readyz", None).await;
    assert_eq!((status, body.as_str()), (503, "not ready: upstream unreachable\n"));

    // Back again: the next relay that connects marks it up, without waiting for the check.
    let _upstream = Greeter::start_on(upstream.addr).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    let (status, _, body) = http_get(metrics, "/readyz", None).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    c.expect("QUIT", 221).await;
    let _ = running.stop().await;
}

// === credentials from [metrics] ===

#[tokio::test]
async fn bearer_token_from_config() {
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = "metrics.bearer_token = \"obs-token-7f3a\"";
    let running = start(&config_from(fake.addr, extra, &listener("obs_bearer"))).await;
    let metrics = running.metrics.unwrap();

    let (status, head, _) = http_get(metrics, "/metrics", None).await;
    assert_eq!(status, 401);
    assert!(head.contains("WWW-Authenticate: Bearer realm=\"moat\""), "{head}");
    assert_eq!(http_get(metrics, "/metrics", Some("Bearer obs-token-wrong")).await.0, 401);
    assert_eq!(http_get(metrics, "/readyz", None).await.0, 401);
    let (status, _, body) = http_get(metrics, "/metrics", Some("Bearer obs-token-7f3a")).await;
    assert_eq!(status, 200);
    assert!(body.contains("moat_connections_total{listener=\"obs_bearer\",result=\"accepted\"} 0"), "{body}");
    assert_eq!(http_get(metrics, "/readyz", Some("Bearer obs-token-7f3a")).await.0, 200);
    // Liveness probes need no secret.
    assert_eq!(http_get(metrics, "/healthz", None).await.0, 200);
    let _ = running.stop().await;
}

#[tokio::test]
async fn basic_auth_from_config_with_a_password_file() {
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.password");
    std::fs::write(&file, "obs-s3cret\n").unwrap();
    let extra = format!("metrics.basic_user = \"prometheus\"\nmetrics.basic_password_file = \"{}\"", file.display());
    let running = start(&config_from(fake.addr, &extra, &listener("obs_basic"))).await;
    let metrics = running.metrics.unwrap();
    let basic = |creds: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds));

    let (status, head, _) = http_get(metrics, "/metrics", None).await;
    assert_eq!(status, 401);
    assert!(head.contains("WWW-Authenticate: Basic realm=\"moat\""), "{head}");
    // The file's trailing newline is not part of the password.
    assert_eq!(http_get(metrics, "/metrics", Some(&basic("prometheus:obs-s3cret\n"))).await.0, 401);
    assert_eq!(http_get(metrics, "/metrics", Some(&basic("prometheus:wrong"))).await.0, 401);
    assert_eq!(http_get(metrics, "/metrics", Some(&basic("someone:obs-s3cret"))).await.0, 401);
    assert_eq!(http_get(metrics, "/metrics", Some(&basic("prometheus:obs-s3cret"))).await.0, 200);
    assert_eq!(http_get(metrics, "/healthz", None).await.0, 200);
    let _ = running.stop().await;
}

// === the audit trail ===

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

fn audit_config(fake: SocketAddr, dir: &Path, name: &str) -> (Config, PathBuf) {
    let path = dir.join("audit.log");
    let extra = format!("audit.destination = \"{}\"", path.display());
    (config_from(fake, &extra, &listener(name)), path)
}

#[tokio::test]
async fn audit_record_matches_the_transaction() {
    let fake = FakeUpstream::start(rejecting_script()).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, path) = audit_config(fake.addr, dir.path(), "obs_audit");
    let running = start(&config).await;
    let addr = running.addr("obs_audit").unwrap();

    let subject = "Quarterly numbers, obs audit";
    let msg = message(subject, "<obs-audit-1@example.org>", "the body stays out of the audit trail");
    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO client.example", 250).await;
    let (code, text) = transaction(&mut c, &[("b@example.net", 250), ("nobody@example.net", 550)], &msg).await;
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221).await;

    let records = audit_lines(&path, 1).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r["v"], 1);
    assert_eq!(r["type"], "transaction");
    assert_eq!(r["listener"], "obs_audit");
    assert_eq!(r["client_ip"], "127.0.0.1");
    assert_eq!(r["helo"], "client.example");
    assert_eq!(r["tls"], serde_json::Value::Null);
    assert_eq!(r["auth_user"], serde_json::Value::Null);
    assert_eq!(r["mail_from"], "a@example.org");
    let rcpts = r["rcpts"].as_array().unwrap();
    assert_eq!(rcpts.len(), 2, "{r}");
    assert_eq!(rcpts[0]["address"], "b@example.net");
    assert_eq!(rcpts[0]["reply_code"], 250);
    assert_eq!(rcpts[1]["address"], "nobody@example.net");
    assert_eq!(rcpts[1]["reply_code"], 550);
    assert!(rcpts[1]["reply_text"].as_str().unwrap().contains("user unknown"), "{r}");
    assert_eq!(r["size"], msg.len() as u64);
    assert_eq!(r["verdict"], "accepted");
    assert_eq!(r["reply"]["code"], 250);
    assert_eq!(r["upstream"]["code"], 250);
    assert_eq!(r["upstream"]["queue_id"], "FAKE123");
    assert_eq!(r["message_id"], "<obs-audit-1@example.org>");
    assert_eq!(r["subject_digest"], sha256_hex(subject));
    assert!(r["conn_id"].is_string() && r["txn_id"].as_str().unwrap().starts_with(r["conn_id"].as_str().unwrap()));
    assert!(r["duration_ms"].is_u64(), "{r}");
    // Neither the subject nor the body is in the file, only the digest.
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(!raw.contains("Quarterly") && !raw.contains("the body stays out"), "{raw}");
    let _ = running.stop().await;
}

#[tokio::test]
async fn disconnect_mid_data_is_audited_as_aborted() {
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, path) = audit_config(fake.addr, dir.path(), "obs_abort");
    let running = start(&config).await;
    let addr = running.addr("obs_abort").unwrap();

    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<gone@example.org>", 250).await;
    c.expect("RCPT TO:<b@example.net>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(b"Subject: never finished\r\n\r\nhalf a message\r\n").await;
    drop(c);

    let records = audit_lines(&path, 1).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r["verdict"], "aborted");
    assert_eq!(r["mail_from"], "gone@example.org");
    assert_eq!(r["reply"]["code"], 0);
    assert_eq!(r["upstream"], serde_json::Value::Null);
    assert_eq!(r["rcpts"][0]["reply_code"], 250);
    assert!(fake.messages().iter().all(|m| !m.mail_from.contains("gone@")), "an aborted message leaked upstream");
    wait_for_lines(
        running.metrics.unwrap(),
        &[
            "moat_messages_total{listener=\"obs_abort\",verdict=\"aborted\"} 1",
            "moat_messages_total{listener=\"obs_abort\",verdict=\"accepted\"} 0",
            "moat_sessions_closed_total{listener=\"obs_abort\",reason=\"peer_closed\"} 1",
        ],
    )
    .await;
    let _ = running.stop().await;
}

// === alert rules and dashboard ===

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str]) {
    let out = std::process::Command::new("promtool").args(args).output().expect("promtool runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
}

#[test]
fn alert_rules_pass_promtool() {
    if !common::postfix::require_peer("promtool") {
        return;
    }
    let rules = repo("config/prometheus/alerts.yml");
    let tests = repo("config/prometheus/alerts.test.yml");
    promtool(&["check", "rules", rules.to_str().unwrap()]);
    promtool(&["test", "rules", tests.to_str().unwrap()]);
}

#[test]
fn every_alert_has_a_promtool_test() {
    let rules = std::fs::read_to_string(repo("config/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo("config/prometheus/alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for a in alerts {
        let cases = tests.lines().filter(|l| l.trim() == format!("alertname: {a}")).count();
        assert!(cases >= 2, "alert {a} needs a firing and a quiet case in alerts.test.yml, has {cases}");
    }
}

/// Metric family names in a text: `moat_...`, with the histogram suffixes stripped.
fn families(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"moat_[a-z0-9_]+").unwrap();
    re.find_iter(text)
        .map(|m| {
            let name = m.as_str();
            ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name).to_owned()
        })
        .collect()
}

/// A CA and a leaf for `obs.test` that expires at the start of 2040, as PEM (cert, key), and the CA's DER.
fn certificate() -> (String, String, rustls::pki_types::CertificateDer<'static>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "observability test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(vec!["obs.test".to_owned()]).unwrap();
    leaf.not_after = rcgen::date_time_ymd(2040, 1, 1);
    let key = KeyPair::generate().unwrap();
    let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    (leaf.pem(), key.serialize_pem(), ca.der().clone())
}

/// STARTTLS on `addr` and one EHLO over TLS, trusting `ca`.
async fn starttls_once(addr: SocketAddr, ca: rustls::pki_types::CertificateDer<'static>) {
    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("STARTTLS", 220).await;
    let connector = common::moat::tls_connector(ca);
    let name = rustls::pki_types::ServerName::try_from("obs.test").unwrap();
    let mut tls = connector.connect(name, c.io.into_inner()).await.expect("tls handshake");
    tls.write_all(b"EHLO client.example\r\nQUIT\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(String::from_utf8_lossy(&rest).contains("221"), "{}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn alerts_and_dashboard_use_only_exported_metrics() {
    let rules = std::fs::read_to_string(repo("config/prometheus/alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(repo("config/grafana/moat.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let used = families(&format!("{rules}\n{dashboard}"));
    assert!(used.len() >= 15, "{used:?}");

    // Real traffic: a delivered message and a STARTTLS handshake with a configured certificate.
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = certificate();
    let (cert_path, key_path) = (dir.path().join("obs.pem"), dir.path().join("obs.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let listeners = format!(
        "{}[[listener]]\nname = \"obs_cover_tls\"\naddress = \"127.0.0.1:0\"\nmode = \"starttls\"\n\
         [tls]\ncertificates = [ {{ cert = \"{}\", key = \"{}\" }} ]\n",
        listener("obs_cover"),
        cert_path.display(),
        key_path.display()
    );
    let running = start(&config_from(fake.addr, "", &listeners)).await;
    let metrics = running.metrics.unwrap();
    let (mut c, _) = Client::connect(running.addr("obs_cover").unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    let msg = message("cover", "<obs-cover@example.org>", "hello");
    assert_eq!(transaction(&mut c, &[("b@example.net", 250)], &msg).await.0, 250);
    c.expect("QUIT", 221).await;
    starttls_once(running.addr("obs_cover_tls").unwrap(), ca).await;

    let text = wait_for_lines(
        metrics,
        &[
            "moat_tls_handshakes_total{listener=\"obs_cover_tls\",version=\"TLSv1.3\",result=\"ok\"} 1",
            "moat_tls_certificate_expiry_timestamp_seconds{name=\"obs.test\"} 2208988800",
            "moat_sessions_closed_total{listener=\"obs_cover\",reason=\"quit\"} 1",
        ],
    )
    .await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .flat_map(families)
        .collect();
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "used by alerts.yml or moat.json but not exported: {missing:?}\n{text}");
    let _ = running.stop().await;
}
