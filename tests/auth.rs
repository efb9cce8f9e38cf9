//! SMTP AUTH end to end (issue #4): swaks and Python smtplib over STARTTLS with the test PKI, the SASL
//! exchange on the wire (long responses up to RFC 4954's 12,288 octets), lockout across connections and
//! client addresses (also with simultaneous attempts), TOTP, the mx relay rule, sender binding (envelope and
//! From header), the audit trail, LOGIN reaching a real Postfix via XCLIENT, users-file reloads (watcher and
//! reload entry point), and the `moat user` CLI run as the real binary.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::fake::{FakeUpstream, Script};
use common::moat::{config_from, start, Client};
use common::postfix::{require_peer, Postfix};
use common::process::{args, run, run_blocking, Ran};
use moat::auth::sasl::Credentials;
use moat::auth::store::{hash_password, Matched, UserStore};
use moat::auth::totp;
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
    users: PathBuf,
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
    Setup { running, fake, audit, users, _dir: dir }
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

/// One AUTH PLAIN from `from` on a fresh connection: the reply code and text.
async fn auth_from(s: &Setup, from: &str, user: &str, pw: &str) -> (u16, String) {
    let mut c = ehlo(s, from).await;
    c.cmd(&format!("AUTH PLAIN {}", plain(user, pw))).await
}

#[tokio::test]
async fn a_stranger_cannot_lock_the_owner_out_and_a_name_lock_looks_like_an_unknown_name() {
    let s = setup("auth.lockout_threshold = 5").await;
    // Alice has authenticated from 127.0.0.2 before: a known good client for her name.
    assert_eq!(auth_from(&s, "127.0.0.2", ALICE, ALICE_PW).await.0, 235);
    // A stranger at 127.0.0.3 guesses five times: that address is locked hard...
    let mut c = ehlo(&s, "127.0.0.3").await;
    for _ in 0..5 {
        c.expect(&format!("AUTH PLAIN {}", plain(ALICE, "guess")), 535).await;
    }
    assert_eq!(auth_from(&s, "127.0.0.3", ALICE, ALICE_PW).await.0, 454);
    // ...but alice from her known address still gets in.
    assert_eq!(auth_from(&s, "127.0.0.2", ALICE, ALICE_PW).await.0, 235);
    // A never-seen address gets, for alice's right password during the name lock, exactly what an unknown
    // name gets: nothing tells that alice exists or is locked.
    let throttled = auth_from(&s, "127.0.0.4", ALICE, ALICE_PW).await;
    let unknown = auth_from(&s, "127.0.0.5", "nobody@example.test", "guess").await;
    assert_eq!(throttled, unknown);
    assert_eq!(throttled.0, 535);
    assert!(throttled.1.contains("5.7.8"), "{}", throttled.1);
    s.running.stop().await;
}

#[tokio::test]
async fn a_distributed_guesser_is_stopped_after_the_per_name_cap() {
    let s = setup("auth.lockout_threshold = 3").await;
    assert_eq!(auth_from(&s, "127.0.1.100", ALICE, ALICE_PW).await.0, 235);
    // One guess each from many addresses: no address reaches its own threshold.
    for i in 1..=3 {
        assert_eq!(auth_from(&s, &format!("127.0.1.{i}"), ALICE, "guess").await.0, 535);
    }
    // Past the per-name cap, even the right password from a new address is refused, as a wrong one.
    for i in 4..=8 {
        assert_eq!(auth_from(&s, &format!("127.0.1.{i}"), ALICE, ALICE_PW).await.0, 535, "127.0.1.{i}");
    }
    // The owner from the address she used before is not affected.
    assert_eq!(auth_from(&s, "127.0.1.100", ALICE, ALICE_PW).await.0, 235);
    // Those addresses are not locked for other names.
    let code = totp::code_now(CAROL_TOTP, now());
    assert_eq!(auth_from(&s, "127.0.1.9", "carol", &format!("carolpw{code}")).await.0, 235);
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

async fn swaks(server: SocketAddr, mech: &str, pw: &str) -> Ran {
    let a = args(&[
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
    ]);
    run("swaks", &a, b"").await
}

#[tokio::test]
async fn swaks_auth_plain_and_login_over_starttls() {
    if !require_peer("swaks") {
        return;
    }
    let s = setup("auth.lockout_threshold = 100").await;
    let sub = s.running.addr("sub").unwrap();
    for mech in ["PLAIN", "LOGIN"] {
        let r = swaks(sub, mech, ALICE_PW).await;
        assert!(r.status.success() && r.output().contains("235 2.7.0"), "swaks --auth {mech}:\n{}", r.output());
        let r = swaks(sub, mech, "wrong").await;
        let out = r.output();
        assert!(!r.status.success() && out.contains("535 5.7.8"), "swaks --auth {mech} with a bad password:\n{out}");
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
    let a = args(&["-c", script, "127.0.0.2", &sub.port().to_string(), &fixture("tls/ca.pem"), ALICE, ALICE_PW]);
    let r = run("python3", &a, b"").await;
    let out = r.output();
    assert!(r.status.success() && out.contains("refused 535") && out.contains("OK"), "{out}");
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

// ---- long SASL responses (RFC 4954 4) ----

/// Longest SASL line moat takes, CRLF included: RFC 4954's figure, written out here so that a change of
/// `moat::smtp::codec::MAX_AUTH_LINE` shows in this test.
const MAX_AUTH_LINE: usize = 12_288;

/// `AUTH PLAIN ` followed by `A`s, `total` octets long with the CRLF `cmd` adds.
fn auth_line_of(total: usize) -> String {
    let verb = "AUTH PLAIN ";
    format!("{verb}{}", "A".repeat(total - 2 - verb.len()))
}

#[tokio::test]
async fn long_sasl_responses_are_parsed_up_to_12288_octets() {
    assert_eq!(moat::smtp::codec::MAX_AUTH_LINE, MAX_AUTH_LINE);
    let s = setup("auth.lockout_threshold = 100\nlimits.max_errors = 50").await;
    let mut c = ehlo(&s, "127.0.0.1").await;
    // Over the 512-octet command line, within the SASL limits: verified, and refused as wrong (535).
    let long_name = format!("{}@example.test", "u".repeat(240));
    let ir = STANDARD.encode(format!("{long_name}\0{long_name}\0{}", "p".repeat(1000)));
    assert!(ir.len() > 2000);
    assert!(c.expect(&format!("AUTH PLAIN {ir}"), 535).await.contains("5.7.8"));
    // A 4 KiB initial response is read and decoded; the SASL rules refuse it (the authzid is not the user).
    let big = STANDARD.encode(format!("{}\0{ALICE}\0{ALICE_PW}", "z".repeat(3100)));
    assert!(big.len() >= 4096);
    let text = c.expect(&format!("AUTH PLAIN {big}"), 501).await;
    assert!(text.contains("5.5.2 Malformed authentication data"), "{text}");
    // The same two as responses to the 334 challenge.
    c.expect("AUTH PLAIN", 334).await;
    c.expect(&ir, 535).await;
    c.expect("AUTH PLAIN", 334).await;
    assert!(c.expect(&big, 501).await.contains("5.5.2 Malformed"));
    // Exactly at the limit: parsed (the As are not base64 of anything: 501 5.5.2, not 500).
    assert!(c.expect(&auth_line_of(MAX_AUTH_LINE), 501).await.contains("5.5.2 Cannot decode"));
    // One octet more: a clean 500, and the session goes on.
    let text = c.expect(&auth_line_of(MAX_AUTH_LINE + 1), 500).await;
    assert!(text.contains("5.5.6 Authentication Exchange line is too long"), "{text}");
    c.expect("NOOP", 250).await;
    c.expect("AUTH LOGIN", 334).await;
    let text = c.expect(&"A".repeat(MAX_AUTH_LINE - 1), 500).await;
    assert!(text.contains("5.5.6 Authentication Exchange line is too long"), "{text}");
    c.expect("NOOP", 250).await;
    // Other commands keep the command-line limit.
    let text = c.expect(&format!("NOOP {}", "x".repeat(600)), 500).await;
    assert!(text.contains("limit 512 octets"), "{text}");
    c.expect(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PW)), 235).await;
    s.running.stop().await;
}

// ---- lockout with simultaneous attempts ----

/// Sends one wrong AUTH on every connection before reading any reply, so all of them pass the lockout
/// check at the start of the exchange together; returns the reply codes.
async fn simultaneous_failures(clients: &mut [Client], name: impl Fn(usize) -> String) -> Vec<u16> {
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_raw(format!("AUTH PLAIN {}\r\n", plain(&name(i), "guess")).as_bytes()).await;
    }
    let mut codes = Vec::new();
    for c in clients.iter_mut() {
        codes.push(c.reply().await.0);
    }
    codes
}

#[tokio::test]
async fn simultaneous_attempts_get_no_more_guesses_than_the_threshold() {
    let s = setup("auth.lockout_threshold = 3").await;
    // Twelve connections from one address, twelve names.
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(ehlo(&s, "127.0.0.8").await);
    }
    let codes = simultaneous_failures(&mut clients, |i| format!("user{i}")).await;
    assert_eq!(codes.iter().filter(|&&c| c == 535).count(), 3, "verified past the IP threshold: {codes:?}");
    assert!(codes.iter().all(|&c| c == 535 || c == 454), "{codes:?}");
    // Twelve addresses, one name.
    let mut clients = Vec::new();
    for i in 1..=12 {
        clients.push(ehlo(&s, &format!("127.0.2.{i}")).await);
    }
    let codes = simultaneous_failures(&mut clients, |_| "carol".to_string()).await;
    // A name is never answered 454 (that would tell it exists); past its threshold it is throttled: even
    // the right password from a new address fails, as a wrong one.
    assert!(codes.iter().all(|&c| c == 535), "{codes:?}");
    let code = totp::code_now(CAROL_TOTP, now());
    assert_eq!(auth_from(&s, "127.0.2.13", "carol", &format!("carolpw{code}")).await.0, 535);
    let auth = s.running.auth.as_ref().unwrap();
    assert_eq!(auth.turns_in_use(), 0, "turns left held after every attempt was answered");
    s.running.stop().await;
}

// ---- users file reload ----

/// Replaces a file the way editors and `moat user` do (write beside it, rename over it).
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One AUTH PLAIN on a fresh connection from 127.0.0.9; its reply code.
async fn auth_code(s: &Setup, user: &str, pw: &str) -> u16 {
    let mut c = ehlo(s, "127.0.0.9").await;
    c.cmd(&format!("AUTH PLAIN {}", plain(user, pw))).await.0
}

/// Waits until the users file's reload counts satisfy `done`; fails after 30 s (the watcher polls every 5 s).
async fn wait_for_reload(s: &Setup, done: impl Fn(moat::auth::ReloadCounts) -> bool) {
    let auth = s.running.auth.as_ref().unwrap();
    for _ in 0..600 {
        if done(auth.reload_counts()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the users file watcher did not react: {:?}", auth.reload_counts());
}

#[tokio::test]
async fn users_file_reloads_through_the_watcher_and_the_reload_entry_point() {
    let s = setup("auth.lockout_threshold = 100").await;
    assert_eq!(auth_code(&s, ALICE, ALICE_PW).await, 235);
    assert_eq!(auth_code(&s, "dave", "davepw").await, 535);
    // Alice's password changed, dave added, carol disabled: picked up by the watcher.
    let v2 = format!(
        "[users.\"{ALICE}\"]\npassword = \"{}\"\nsenders = [\"{ALICE}\"]\n\
         [users.carol]\npassword = \"{}\"\ntotp_secret = \"{}\"\ndisabled = true\n\
         [users.dave]\npassword = \"{}\"\n",
        hash_password("new horse").unwrap(),
        hash_password("carolpw").unwrap(),
        totp::encode_secret(CAROL_TOTP),
        hash_password("davepw").unwrap(),
    );
    replace_file(&s.users, &v2);
    wait_for_reload(&s, |n| n.ok >= 1).await;
    assert_eq!(auth_code(&s, ALICE, ALICE_PW).await, 535, "the old password still works");
    assert_eq!(auth_code(&s, ALICE, "new horse").await, 235);
    assert_eq!(auth_code(&s, "dave", "davepw").await, 235);
    let code = totp::code_now(CAROL_TOTP, now());
    assert_eq!(auth_code(&s, "carol", &format!("carolpw{code}")).await, 535, "a disabled user authenticated");
    // A broken file is refused and counted; the users in force stay.
    replace_file(&s.users, "[users.\"broken\"\npassword = \"x\"\n");
    wait_for_reload(&s, |n| n.refused >= 1).await;
    assert_eq!(auth_code(&s, ALICE, "new horse").await, 235);
    assert_eq!(auth_code(&s, "dave", "davepw").await, 235);
    // The entry point SIGHUP uses: reloads at once.
    let auth = s.running.auth.clone().unwrap();
    let before = auth.reload_counts();
    users_file(s.users.parent().unwrap());
    auth.reload_logged().await;
    assert!(auth.reload_counts().ok > before.ok, "{:?} -> {:?}", before, auth.reload_counts());
    assert_eq!(auth_code(&s, "dave", "davepw").await, 535, "a removed user authenticated");
    assert_eq!(auth_code(&s, ALICE, ALICE_PW).await, 235);
    // And a broken file through it too.
    let before = auth.reload_counts();
    replace_file(&s.users, "[users.a]\npassword = \"plaintext\"\n");
    auth.reload_logged().await;
    assert!(auth.reload_counts().refused > before.refused);
    assert_eq!(auth_code(&s, ALICE, ALICE_PW).await, 235);
    s.running.stop().await;
}

// ---- the `moat user` CLI, as the real binary ----

/// Runs `moat user CMD... --users FILE` with `stdin`.
fn moat_user(users: &Path, cmd: &[&str], stdin: &str) -> Ran {
    let mut a = args(&["user"]);
    a.extend(args(cmd));
    a.extend(args(&["--users", users.to_str().unwrap()]));
    run_blocking(env!("CARGO_BIN_EXE_moat"), &a, stdin.as_bytes().to_vec())
}

/// How `user`/`pw` matches in the file as written (as moat would verify it), `None` if it does not.
fn matched(users: &Path, user: &str, pw: &str, listener: &str, now: u64) -> Option<Matched> {
    let store = UserStore::load(users).unwrap_or_else(|e| panic!("moat wrote an invalid file: {e}"));
    let creds = Credentials { user: user.into(), password: pw.into() };
    // Not a PHC string: an unknown user's check fails fast (no user here is unknown).
    store.verify(&creds, listener, now, None, "-").map(|v| v.matched)
}

/// Exit status 2, the message and the usage on stderr.
fn assert_usage_error(r: &Ran, want: &str) {
    assert_eq!(r.status.code(), Some(2), "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(want), "stderr lacks {want:?}:\n{}", r.stderr);
    assert!(r.stderr.contains("usage: moat user"), "{}", r.stderr);
}

#[test]
fn moat_user_cli_writes_argon2id_hashes_and_refuses_bad_usage() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let name = "alice@example.test";
    let t = now();
    let secrets = ["first pw", "second pw"];
    let no_plaintext = |extra: &[&str]| {
        let text = std::fs::read_to_string(&users).unwrap();
        for s in secrets.iter().chain(extra) {
            assert!(!text.contains(s), "{s:?} in the users file:\n{text}");
        }
        text
    };

    let r = moat_user(&users, &["add", "Alice@Example.Test"], "first pw\n");
    r.assert_success("moat user add");
    assert!(r.stdout.contains("added"), "{}", r.stdout);
    let text = no_plaintext(&[]);
    assert!(text.contains("password = \"$argon2id$v=19$m="), "{text}");
    assert!(text.contains("senders = [\"alice@example.test\"]"), "{text}");
    assert_eq!(matched(&users, name, "first pw", "smtp", t), Some(Matched::Password { totp_step: None }));
    assert_usage_error(&moat_user(&users, &["add", name], "x\n"), "already exists");

    moat_user(&users, &["passwd", name], "second pw\n").assert_success("moat user passwd");
    assert_eq!(matched(&users, name, "first pw", "smtp", t), None);
    assert!(matched(&users, name, "second pw", "smtp", t).is_some());

    let r = moat_user(&users, &["totp", name], "");
    r.assert_success("moat user totp");
    let uri = r.stdout.lines().find(|l| l.starts_with("otpauth://totp/")).expect("otpauth URI").to_string();
    let secret = uri.split("secret=").nth(1).and_then(|s| s.split('&').next()).expect("secret in the URI");
    let secret = totp::decode_secret(secret).expect("base32 secret");
    let code = totp::code_now(&secret, t);
    assert_eq!(matched(&users, name, "second pw", "smtp", t), None, "TOTP user without a code");
    let with_code = format!("second pw{code}");
    assert_eq!(matched(&users, name, &with_code, "smtp", t), Some(Matched::Password { totp_step: Some(t / 30) }));

    let r = moat_user(&users, &["app-password", name, "phone"], "");
    r.assert_success("moat user app-password");
    let app = r.stdout.split("(shown once): ").nth(1).expect("the app password").trim().to_string();
    assert!(app.len() >= 16, "{app:?}");
    no_plaintext(&[&app]);
    assert_eq!(matched(&users, name, &app, "submission", t), Some(Matched::App("phone".into())));
    moat_user(&users, &["revoke", name, "phone"], "").assert_success("moat user revoke");
    assert_eq!(matched(&users, name, &app, "submission", t), None, "a revoked app password works");
    assert_usage_error(&moat_user(&users, &["revoke", name, "phone"], ""), "no app password");

    moat_user(&users, &["disable", name], "").assert_success("moat user disable");
    assert_eq!(matched(&users, name, &with_code, "smtp", t), None, "a disabled user authenticates");
    moat_user(&users, &["enable", name], "").assert_success("moat user enable");
    assert!(matched(&users, name, &with_code, "smtp", t).is_some());
    no_plaintext(&[&app]);

    let long = format!("{}\n", "x".repeat(2000));
    for (cmd, stdin, want) in [
        (&[][..], "", "expected a command and a user name"),
        (&["add"][..], "", "expected a command and a user name"),
        (&["frobnicate", name][..], "", "unknown command or wrong arguments: frobnicate"),
        (&["app-password", name][..], "", "unknown command or wrong arguments"),
        (&["passwd", "nobody@example.test"][..], "pw\n", "no user \"nobody@example.test\""),
        (&["add", "bob"][..], "\n", "empty password"),
        (&["add", "bob"][..], "", "empty password"),
        (&["add", "bob"][..], &long, "password longer than 1024 bytes"),
        (&["add", "bad\tname"][..], "pw\n", "invalid user name"),
    ] {
        assert_usage_error(&moat_user(&users, cmd, stdin), want);
    }
    let r = run_blocking(env!("CARGO_BIN_EXE_moat"), &args(&["user", "add", "bob", "--users"]), b"pw\n".to_vec());
    assert_usage_error(&r, "--users needs a file");
    let r = run_blocking(env!("CARGO_BIN_EXE_moat"), &args(&["user", "--help"]), Vec::new());
    r.assert_success("moat user --help");
    assert!(r.stdout.contains("usage: moat user") && r.stdout.contains("app-password"), "{}", r.stdout);
    assert!(UserStore::load(&users).unwrap().len() == 1, "a refused command changed the file");

    // A broken file is refused with file:line and left as it was.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[users.a]\npassword = \"plaintext\"\n").unwrap();
    let r = moat_user(&broken, &["add", "bob"], "pw\n");
    assert_usage_error(&r, &format!("{}:1: ", broken.display()));
    assert_eq!(std::fs::read_to_string(&broken).unwrap(), "[users.a]\npassword = \"plaintext\"\n");
}

#[tokio::test]
async fn a_user_written_by_the_cli_authenticates_through_moat() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let moat = env!("CARGO_BIN_EXE_moat");
    let users_arg = users.to_str().unwrap();
    run(moat, &args(&["user", "add", "bob@example.test", "--users", users_arg]), b"bob's pw\n")
        .await
        .assert_success("moat user add");
    let r = run(moat, &args(&["user", "app-password", "bob@example.test", "mua", "--users", users_arg]), b"").await;
    r.assert_success("moat user app-password");
    let app = r.stdout.split("(shown once): ").nth(1).expect("the app password").trim().to_string();
    let fake = FakeUpstream::start(Script::default()).await;
    let listeners =
        "[[listener]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\nrole = \"mx\"\nauth_without_tls = true\n";
    let extra = format!("auth.users_file = \"{users_arg}\"\nauth.failure_delay = \"1ms\"");
    let running = start(&config_from(fake.addr, &extra, listeners)).await;
    let mut c = Client::connect(running.addr("mx").unwrap()).await.0;
    c.expect("EHLO client.example", 250).await;
    c.expect(&format!("AUTH PLAIN {}", plain("bob@example.test", "wrong")), 535).await;
    c.expect(&format!("AUTH PLAIN {}", plain("bob@example.test", "bob's pw")), 235).await;
    c.expect("MAIL FROM:<bob@example.test>", 250).await;
    c.expect("RCPT TO:<someone@elsewhere.example>", 250).await;
    c.expect("DATA", 354).await;
    c.expect("From: Bob <bob@example.test>\r\nSubject: cli\r\n\r\nhi\r\n.", 250).await;
    c.expect("QUIT", 221).await;
    let d = fake.wait_for(1).await;
    assert!(d[0].xclient.as_deref().unwrap().ends_with("LOGIN=bob@example.test"), "{:?}", d[0].xclient);
    // The app password, through LOGIN.
    let mut c = Client::connect(running.addr("mx").unwrap()).await.0;
    c.expect("EHLO client.example", 250).await;
    c.expect("AUTH LOGIN", 334).await;
    c.expect(&STANDARD.encode("bob@example.test"), 334).await;
    c.expect(&STANDARD.encode(&app), 235).await;
    running.stop().await;
}
