//! SMTP AUTH end to end (issue #4): swaks and Python smtplib over STARTTLS with the test PKI, the SASL
//! exchange on the wire, lockout across connections and client addresses, TOTP, the mx relay rule, sender
//! binding (envelope and From header), the audit trail, and LOGIN reaching a real Postfix via XCLIENT.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::fake::{FakeUpstream, Script};
use common::moat::{config_from, start, Client};
use common::postfix::{require_peer, Postfix};
use moat::auth::{store::hash_password, totp};
use moat::server::Running;
use tokio::io::BufReader;
use tokio::net::TcpSocket;

const ALICE: &str = "alice@example.test";
const ALICE_PW: &str = "correct horse battery";
const CAROL_TOTP: &[u8] = b"12345678901234567890";

fn fixture(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel).to_str().unwrap().to_string()
}

/// A users file: alice (password, owns her address), carol (password + TOTP), both in a temp dir.
fn users_file(dir: &Path) -> PathBuf {
    let path = dir.join("users.toml");
    let text = format!(
        "[users.\"{ALICE}\"]\npassword = \"{}\"\nsenders = [\"{ALICE}\"]\n\
         [users.carol]\npassword = \"{}\"\nsenders = [\"carol@example.test\"]\ntotp_secret = \"{}\"\n",
        hash_password(ALICE_PW).unwrap(),
        hash_password("carolpw").unwrap(),
        totp::encode_secret(CAROL_TOTP),
    );
    std::fs::write(&path, text).unwrap();
    path
}

struct Setup {
    running: Running,
    fake: FakeUpstream,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

/// Moat with a plain mx listener offering AUTH without TLS ("mx", 127.0.0.1) and a STARTTLS submission
/// listener ("sub", 127.0.0.2); `extra` adds dotted keys (auth.*).
async fn setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let fake = FakeUpstream::start(Script::default()).await;
    let listeners = format!(
        "[[listener]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\nrole = \"mx\"\nauth_without_tls = true\n\
         [[listener]]\nname = \"sub\"\naddress = \"127.0.0.2:0\"\nmode = \"starttls\"\nrole = \"submission\"\n\
         [tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        fixture("tls/server.pem"),
        fixture("tls/server.key"),
    );
    let extra = format!("auth.users_file = \"{}\"\nauth.failure_delay = \"1ms\"\n{extra}", users.display());
    let mut cfg = config_from(fake.addr, &extra, &listeners);
    let audit = dir.path().join("audit.jsonl");
    cfg.audit.destination = audit.to_str().unwrap().to_string();
    let running = start(&cfg).await;
    Setup { running, fake, audit, _dir: dir }
}

fn plain(user: &str, pw: &str) -> String {
    STANDARD.encode(format!("\0{user}\0{pw}"))
}

/// Connects to `to` from loopback address `from` (127.0.0.x) and reads the greeting.
async fn connect_from(from: &str, to: SocketAddr) -> Client {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(to).await.unwrap();
    let mut c = Client { io: BufReader::new(stream) };
    assert_eq!(c.reply().await.0, 220);
    c
}

async fn ehlo(s: &Setup, from: &str) -> Client {
    let mut c = connect_from(from, s.running.addr("mx").unwrap()).await;
    let text = c.expect("EHLO client.example", 250).await;
    assert!(text.contains("AUTH PLAIN LOGIN"), "{text}");
    c
}

#[tokio::test]
async fn sasl_exchange_on_the_wire() {
    let s = setup("").await;
    let mut c = ehlo(&s, "127.0.0.1").await;
    c.expect("AUTH PLAIN", 334).await;
    assert!(c.expect("*", 501).await.contains("5.7.0 Authentication cancelled"));
    c.expect("AUTH LOGIN", 334).await;
    assert!(c.expect("!!!notbase64", 501).await.contains("5.5.2"));
    c.expect("AUTH CRAM-MD5", 504).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PW)), 503).await;
    c.expect("RSET", 250).await;
    // LOGIN, step by step.
    assert!(c.expect("AUTH LOGIN", 334).await.contains("VXNlcm5hbWU6"));
    assert!(c.expect(&STANDARD.encode(ALICE), 334).await.contains("UGFzc3dvcmQ6"));
    assert!(c.expect(&STANDARD.encode(ALICE_PW), 235).await.contains("2.7.0"));
    c.expect(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PW)), 503).await;
    s.running.stop().await;
}

#[tokio::test]
async fn auth_before_tls_is_refused_on_submission() {
    let s = setup("").await;
    let mut c = Client::connect(s.running.addr("sub").unwrap()).await.0;
    let text = c.expect("EHLO client.example", 250).await;
    assert!(!text.contains("AUTH"), "AUTH offered in plaintext: {text}");
    assert!(c.expect(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PW)), 538).await.contains("5.7.11"));
    c.expect("MAIL FROM:<alice@example.test>", 530).await;
    s.running.stop().await;
}

#[tokio::test]
async fn mx_is_not_an_open_relay_and_auth_relays_with_login() {
    let s = setup("").await;
    let mut c = ehlo(&s, "127.0.0.1").await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    assert!(c.expect("RCPT TO:<victim@elsewhere.example>", 554).await.contains("Relay access denied"));
    c.expect("RCPT TO:<v%elsewhere.example@example.test>", 554).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("RSET", 250).await;
    c.expect(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PW)), 235).await;
    c.expect(&format!("MAIL FROM:<{ALICE}>"), 250).await;
    c.expect("RCPT TO:<victim@elsewhere.example>", 250).await;
    c.expect("DATA", 354).await;
    c.expect(&format!("From: Alice <{ALICE}>\r\nSubject: t\r\n\r\nhi\r\n."), 250).await;
    c.expect("QUIT", 221).await;
    let d = s.fake.wait_for(1).await;
    let x = d[0].xclient.as_deref().unwrap();
    assert!(x.ends_with(&format!("LOGIN={ALICE}")), "{x}");
    let text = String::from_utf8_lossy(&d[0].data);
    assert!(text.contains(" with ESMTPA id "), "{text}");
    s.running.stop().await;
}

#[tokio::test]
async fn pooled_connection_does_not_inherit_a_login() {
    let s = setup("").await;
    for (user, from) in [(Some((ALICE, ALICE_PW)), ALICE), (None, "x@example.org")] {
        let mut c = ehlo(&s, "127.0.0.1").await;
        if let Some((u, p)) = user {
            c.expect(&format!("AUTH PLAIN {}", plain(u, p)), 235).await;
        }
        c.expect(&format!("MAIL FROM:<{from}>"), 250).await;
        c.expect("RCPT TO:<b@example.test>", 250).await;
        c.expect("DATA", 354).await;
        c.expect("Subject: t\r\n\r\nhi\r\n.", 250).await;
        c.expect("QUIT", 221).await;
    }
    let d = s.fake.wait_for(2).await;
    assert!(d[1].xclient.as_deref().unwrap().ends_with("LOGIN=[UNAVAILABLE]"), "{:?}", d[1].xclient);
    s.running.stop().await;
}

#[tokio::test]
async fn sender_forgery_is_refused() {
    let s = setup("").await;
    let mut c = ehlo(&s, "127.0.0.1").await;
    c.expect(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PW)), 235).await;
    let text = c.expect("MAIL FROM:<ceo@example.test>", 553).await;
    assert!(text.contains("5.7.1 Sender address rejected: not owned by user alice@example.test"), "{text}");
    c.expect(&format!("MAIL FROM:<{ALICE}>"), 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("DATA", 354).await;
    let text = c.expect("From: The CEO <ceo@example.test>\r\nSubject: pay\r\n\r\nwire it\r\n.", 550).await;
    assert!(text.contains("5.7.1"), "{text}");
    c.expect(&format!("MAIL FROM:<{ALICE}>"), 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.expect(&format!("From: {ALICE}\r\nFrom: ceo@example.test\r\n\r\nx\r\n."), 550).await;
    c.expect("QUIT", 221).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(s.fake.messages().is_empty(), "a forged message reached the upstream");
    s.running.stop().await;
}

#[tokio::test]
async fn lockout_per_ip_across_connections_and_expiry() {
    let s = setup("auth.lockout_threshold = 3\nauth.lockout_duration = \"1500ms\"").await;
    for i in 0..3 {
        let mut c = ehlo(&s, "127.0.0.5").await;
        c.expect(&format!("AUTH PLAIN {}", plain(&format!("user{i}"), "guess")), 535).await;
    }
    // Locked: even the right password gets a clean 454, and persisting closes with 421.
    let mut c = ehlo(&s, "127.0.0.5").await;
    let good = format!("AUTH PLAIN {}", plain(ALICE, ALICE_PW));
    assert!(c.expect(&good, 454).await.contains("4.7.0 Too many authentication failures"));
    c.expect(&good, 454).await;
    c.expect(&good, 421).await;
    assert_eq!(c.reply().await.0, 0, "closed after 421");
    // Another address is not affected.
    let mut other = ehlo(&s, "127.0.0.6").await;
    other.expect(&good, 235).await;
    // The lock expires.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut c = ehlo(&s, "127.0.0.5").await;
    c.expect(&good, 235).await;
    s.running.stop().await;
}

#[tokio::test]
async fn lockout_per_name_from_many_addresses() {
    let s = setup("auth.lockout_threshold = 3").await;
    for i in 1..=3 {
        let mut c = ehlo(&s, &format!("127.0.1.{i}")).await;
        c.expect(&format!("AUTH PLAIN {}", plain(ALICE, "guess")), 535).await;
    }
    let mut c = ehlo(&s, "127.0.1.9").await;
    c.expect(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PW)), 454).await;
    // The address itself is fine for other names.
    let code = totp::code_now(CAROL_TOTP, now());
    c.expect(&format!("AUTH PLAIN {}", plain("carol", &format!("carolpw{code}"))), 235).await;
    s.running.stop().await;
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn totp_current_old_and_reused_codes() {
    let s = setup("auth.lockout_threshold = 100").await;
    let t = now();
    let old = totp::code_now(CAROL_TOTP, t - 120);
    let mut c = ehlo(&s, "127.0.0.7").await;
    c.expect(&format!("AUTH PLAIN {}", plain("carol", &format!("carolpw{old}"))), 535).await;
    c.expect(&format!("AUTH PLAIN {}", plain("carol", "carolpw")), 535).await;
    let code = totp::code_now(CAROL_TOTP, now());
    c.expect(&format!("AUTH PLAIN {}", plain("carol", &format!("carolpw{code}"))), 235).await;
    let mut again = ehlo(&s, "127.0.0.7").await;
    again.expect(&format!("AUTH PLAIN {}", plain("carol", &format!("carolpw{code}"))), 535).await;
    s.running.stop().await;
}

#[tokio::test]
async fn audit_has_no_secrets() {
    let s = setup("").await;
    let mut c = ehlo(&s, "127.0.0.1").await;
    let wrong = "Sup3rSecretWrong";
    let payload = plain(ALICE, wrong);
    c.expect(&format!("AUTH PLAIN {payload}"), 535).await;
    c.expect("AUTH LOGIN", 334).await;
    c.expect(&STANDARD.encode(ALICE), 334).await;
    c.expect(&STANDARD.encode(ALICE_PW), 235).await;
    c.expect("QUIT", 221).await;
    let path = s.audit.clone();
    s.running.stop().await;
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("\"type\":\"auth\""), "{text}");
    assert!(text.contains("\"result\":\"failure\"") && text.contains("\"result\":\"success\""), "{text}");
    for secret in [wrong, payload.as_str(), ALICE_PW, &STANDARD.encode(ALICE_PW)] {
        assert!(!text.contains(secret), "audit holds a secret {secret:?}:\n{text}");
    }
}

// ---- real clients over STARTTLS ----

fn run(program: &str, args: &[String], stdin: &str) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

async fn swaks(server: SocketAddr, mech: &str, pw: &str) -> (bool, String) {
    let a: Vec<String> = [
        "--server",
        &server.to_string(),
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        &fixture("tls/ca.pem"),
        "--tls-sni",
        "mx.test",
        "--auth",
        mech,
        "--auth-user",
        ALICE,
        "--auth-password",
        pw,
        "--from",
        ALICE,
        "--to",
        "someone@elsewhere.example",
        "--ehlo",
        "client.example",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    tokio::task::spawn_blocking(move || run("swaks", &a, "")).await.unwrap()
}

#[tokio::test]
async fn swaks_auth_plain_and_login_over_starttls() {
    if !require_peer("swaks") {
        return;
    }
    let s = setup("auth.lockout_threshold = 100").await;
    let sub = s.running.addr("sub").unwrap();
    for mech in ["PLAIN", "LOGIN"] {
        let (ok, out) = swaks(sub, mech, ALICE_PW).await;
        assert!(ok && out.contains("235 2.7.0"), "swaks --auth {mech}:\n{out}");
        let (ok, out) = swaks(sub, mech, "wrong").await;
        assert!(!ok && out.contains("535 5.7.8"), "swaks --auth {mech} with a bad password:\n{out}");
    }
    let d = s.fake.wait_for(2).await;
    assert_eq!(d.len(), 2);
    let text = String::from_utf8_lossy(&d[0].data);
    assert!(text.contains(" with ESMTPSA id "), "{text}");
    assert!(d[0].xclient.as_deref().unwrap().contains(&format!("LOGIN={ALICE}")));
    s.running.stop().await;
}

#[tokio::test]
async fn smtplib_login() {
    if !require_peer("python3") {
        return;
    }
    let s = setup("auth.lockout_threshold = 100").await;
    let sub = s.running.addr("sub").unwrap();
    let script = r#"
import smtplib, ssl, sys
host, port, ca, user, good = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP(host, int(port), local_hostname="client.example")
s._host = "mx.test"  # the name the certificate is checked against (SNI too)
s.starttls(context=ctx)
try:
    s.login(user, "wrong")
    print("BAD accepted a wrong password")
except smtplib.SMTPAuthenticationError as e:
    print("refused", e.smtp_code)
s.login(user, good)
s.sendmail(user, ["x@elsewhere.example"], "From: " + user + "\r\nSubject: smtplib\r\n\r\nhi\r\n")
s.quit()
print("OK")
"#;
    let a: Vec<String> = ["-c", script, "127.0.0.2", &sub.port().to_string(), &fixture("tls/ca.pem"), ALICE, ALICE_PW]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (ok, out) = tokio::task::spawn_blocking(move || run("python3", &a, "")).await.unwrap();
    assert!(ok && out.contains("refused 535") && out.contains("OK"), "{out}");
    assert_eq!(s.fake.wait_for(1).await.len(), 1);
    s.running.stop().await;
}

#[tokio::test]
async fn postfix_receives_login_via_xclient() {
    if !require_peer("postfix") {
        return;
    }
    let pf = tokio::task::spawn_blocking(|| Postfix::start_with(&["smtpd_sasl_auth_enable=yes"])).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let listeners =
        "[[listener]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\nrole = \"mx\"\nauth_without_tls = true\n";
    let cfg = config_from(pf.addr(), &format!("auth.users_file = \"{}\"", users.display()), listeners);
    let running = start(&cfg).await;
    let mut c = Client::connect(running.addr("mx").unwrap()).await.0;
    c.expect("EHLO client.example", 250).await;
    c.expect(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PW)), 235).await;
    c.expect(&format!("MAIL FROM:<{ALICE}>"), 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.expect(&format!("From: {ALICE}\r\nSubject: x\r\n\r\nhi\r\n."), 250).await;
    c.expect("QUIT", 221).await;
    let found = tokio::task::spawn_blocking(move || {
        (pf.wait_for_log(&format!("sasl_username={ALICE}"), Duration::from_secs(10)), pf)
    })
    .await
    .unwrap();
    assert!(found.0, "postfix log lacks sasl_username:\n{}", found.1.log());
    running.stop().await;
}
