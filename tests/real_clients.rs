//! Real client programs against moat: swaks, Python's smtplib and `openssl s_client`, plus a rustls client
//! socket for the STARTTLS rules (RFC 3207, CVE-2011-0411). Moat runs in-process with the checked-in test PKI
//! (`tests/fixtures/tls/`) and relays to the in-process fake upstream, so each test asserts on the client's
//! exit status and output and on what the upstream received.
//!
//! External programs run through `common::process::run` (a blocking thread with a deadline). Each such
//! test calls `require_peer` first: skipped when the program is missing, a failure under `CI=true`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::fake::{Delivered, FakeUpstream, Script};
use common::moat::{config_from, start};
use common::postfix::require_peer;
use common::process::{args, run, Ran};
use moat::server::Running;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A file under `tests/fixtures/`.
fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn fixture_str(rel: &str) -> String {
    fixture(rel).to_str().expect("UTF-8 path").to_string()
}

/// One `[[listener]]` on a free port of loopback address `ip`. Moat's config check refuses two listeners with
/// the same address even when the port is 0, so listeners of one instance get different 127.0.0.x addresses.
fn listener(name: &str, ip: &str, mode: &str, require_tls: bool) -> String {
    format!("[[listener]]\nname = \"{name}\"\naddress = \"{ip}:0\"\nmode = \"{mode}\"\nrequire_tls = {require_tls}\n")
}

/// `[tls]` with the default certificate (server.pem: localhost, mx.test, *.example.test, 127.0.0.1) first and
/// the ECDSA one for ec.test second.
fn tls_section() -> String {
    format!(
        "[tls]\ncertificates = [\n  {{ cert = \"{}\", key = \"{}\" }},\n  {{ cert = \"{}\", key = \"{}\" }},\n]\n",
        fixture_str("tls/server.pem"),
        fixture_str("tls/server.key"),
        fixture_str("tls/server-ec.pem"),
        fixture_str("tls/server-ec.key"),
    )
}

/// Moat with a plain "smtp" (127.0.0.1), a "starttls" (127.0.0.2) and an implicit-TLS "smtps" (127.0.0.3)
/// listener, both certificates loaded.
async fn start_moat(fake: &FakeUpstream, extra: &str) -> Running {
    let listeners = format!(
        "{}{}{}{}",
        listener("smtp", "127.0.0.1", "plain", false),
        listener("starttls", "127.0.0.2", "starttls", false),
        listener("smtps", "127.0.0.3", "implicit-tls", false),
        tls_section()
    );
    start(&config_from(fake.addr, extra, &listeners)).await
}

fn addr(running: &Running, name: &str) -> SocketAddr {
    running.addr(name).unwrap_or_else(|| panic!("no listener {name}"))
}

/// The header section of a delivered message (up to the first empty line), as text.
fn head(d: &Delivered) -> String {
    let text = String::from_utf8_lossy(&d.data);
    text.split("\r\n\r\n").next().unwrap_or_default().to_string()
}

/// Moat's own Received header (the first header field), unfolded.
fn received(d: &Delivered) -> String {
    let h = head(d);
    assert!(h.starts_with("Received: "), "message does not start with moat's Received header:\n{h}");
    let mut field = String::new();
    for (i, line) in h.split("\r\n").enumerate() {
        if i > 0 && !line.starts_with([' ', '\t']) {
            break;
        }
        field.push_str(line.trim_start());
        field.push(' ');
    }
    field
}

async fn one_message(fake: &FakeUpstream) -> Delivered {
    let got = fake.wait_for(1).await;
    assert_eq!(got.len(), 1, "upstream received {} messages, expected 1", got.len());
    got.into_iter().next().unwrap()
}

// ---- swaks ----

/// Runs swaks against `server` with `extra` options (TLS ones) and one message from a@example.org to
/// b@example.test with `body`.
async fn swaks(server: SocketAddr, extra: &[&str], body: &str) -> Ran {
    let server = server.to_string();
    let mut a = args(&["--server", &server, "--helo", "client.example", "--from", "a@example.org"]);
    a.extend(args(&["--to", "b@example.test", "--header", "Subject: swaks", "--body", body]));
    a.extend(args(extra));
    run("swaks", &a, b"").await
}

/// swaks options that verify moat's certificate against the test CA, sending SNI mx.test.
fn swaks_verify() -> Vec<String> {
    args(&["--tls-verify", "--tls-ca-path", &fixture_str("tls/ca.pem"), "--tls-sni", "mx.test"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_plain_is_relayed_with_xclient() {
    if !require_peer("swaks") {
        return;
    }
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start_moat(&fake, "").await;
    let ran = swaks(addr(&running, "smtp"), &[], "hello from swaks, plain").await;
    ran.assert_success("swaks");
    assert!(ran.stdout.contains("<-  250 "), "no 250 after the message:\n{}", ran.stdout);
    assert!(!ran.stdout.contains("STARTTLS"), "a plain listener offered STARTTLS:\n{}", ran.stdout);

    let d = one_message(&fake).await;
    let text = String::from_utf8_lossy(&d.data);
    assert!(text.contains("\r\n\r\nhello from swaks, plain\r\n"), "{text}");
    assert!(text.contains("Subject: swaks\r\n"), "{text}");
    let xclient = d.xclient.as_deref().expect("moat sent XCLIENT");
    assert!(xclient.contains(" ADDR=127.0.0.1 "), "{xclient}");
    assert!(xclient.contains(" HELO=client.example"), "{xclient}");
    assert_eq!(d.mail_from, "MAIL FROM:<a@example.org>");
    assert_eq!(d.rcpts, vec!["RCPT TO:<b@example.test>".to_string()]);
    let r = received(&d);
    assert!(r.contains(" with ESMTP id ") && !r.contains("using TLS"), "{r}");
    assert!(r.contains(" for <b@example.test>;"), "{r}");
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_starttls_is_recorded_as_esmtps_tls13() {
    if !require_peer("swaks") {
        return;
    }
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start_moat(&fake, "").await;
    let server = addr(&running, "starttls");
    // --tls-verify is real: without the test CA the handshake fails and nothing is sent.
    let ran = swaks(server, &["--tls", "--tls-verify", "--tls-sni", "mx.test"], "unverified").await;
    assert!(!ran.status.success(), "swaks --tls-verify trusted the test CA without --tls-ca-path:\n{}", ran.stdout);
    assert!(!ran.stdout.contains("-> MAIL FROM"), "{}", ran.stdout);

    let mut opts = vec!["--tls".to_string()];
    opts.extend(swaks_verify());
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let ran = swaks(server, &opts, "hello from swaks over starttls").await;
    ran.assert_success("swaks --tls");
    assert!(ran.stdout.contains("-> STARTTLS"), "{}", ran.stdout);
    assert!(ran.stdout.contains("=== TLS started with cipher TLSv1.3:"), "{}", ran.stdout);

    let d = one_message(&fake).await;
    let r = received(&d);
    assert!(r.contains(" with ESMTPS id "), "{r}");
    assert!(r.contains("(using TLSv1.3 with cipher "), "{r}");
    assert!(String::from_utf8_lossy(&d.data).contains("\r\n\r\nhello from swaks over starttls\r\n"));
    assert!(d.xclient.as_deref().unwrap_or_default().contains(" ADDR=127."), "{:?}", d.xclient);
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_implicit_tls_is_relayed() {
    if !require_peer("swaks") {
        return;
    }
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start_moat(&fake, "").await;
    let mut opts = vec!["--tlsc".to_string()];
    opts.extend(swaks_verify());
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let ran = swaks(addr(&running, "smtps"), &opts, "hello from swaks over implicit tls").await;
    ran.assert_success("swaks --tlsc");
    assert!(ran.stdout.contains("=== TLS started with cipher TLSv1.3:"), "{}", ran.stdout);
    assert!(!ran.stdout.contains("STARTTLS"), "{}", ran.stdout);

    let d = one_message(&fake).await;
    let r = received(&d);
    assert!(r.contains(" with ESMTPS id ") && r.contains("(using TLSv1.3 with cipher "), "{r}");
    assert!(String::from_utf8_lossy(&d.data).contains("\r\n\r\nhello from swaks over implicit tls\r\n"));
    let _ = running.stop().await;
}

// ---- Python smtplib ----

/// Runs `tests/fixtures/clients/smtplib_client.py MODE HOST PORT CA` and checks it printed `OK MODE`.
async fn smtplib(mode: &str, server: SocketAddr) -> Ran {
    let ran = run(
        "python3",
        &args(&[
            &fixture_str("clients/smtplib_client.py"),
            mode,
            &server.ip().to_string(),
            &server.port().to_string(),
            &fixture_str("tls/ca.pem"),
        ]),
        b"",
    )
    .await;
    ran.assert_success(&format!("smtplib_client.py {mode}"));
    assert!(ran.stdout.trim_end().ends_with(&format!("OK {mode}")), "{}", ran.stdout);
    ran
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_starttls_verifies_chain_and_name() {
    if !require_peer("python3") {
        return;
    }
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start_moat(&fake, "").await;
    let ran = smtplib("starttls", addr(&running, "starttls")).await;
    // The same CA with the wrong name fails: verification is real, not switched off.
    assert!(ran.stdout.contains("WRONG-NAME-REJECTED"), "{}", ran.stdout);
    assert!(ran.stdout.contains("CIPHER TLSv1.3 "), "{}", ran.stdout);

    let d = one_message(&fake).await;
    assert!(received(&d).contains(" with ESMTPS id "), "{}", received(&d));
    assert!(String::from_utf8_lossy(&d.data).contains("\r\n\r\nvia starttls\r\n"));
    assert_eq!(d.rcpts, vec!["RCPT TO:<b@example.test>".to_string()]);
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_smtp_ssl_implicit_tls() {
    if !require_peer("python3") {
        return;
    }
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start_moat(&fake, "").await;
    let ran = smtplib("ssl", addr(&running, "smtps")).await;
    assert!(ran.stdout.contains("CIPHER TLSv1.3 "), "{}", ran.stdout);

    let d = one_message(&fake).await;
    let r = received(&d);
    assert!(r.contains(" with ESMTPS id ") && r.contains("(using TLSv1.3 with cipher "), "{r}");
    assert!(String::from_utf8_lossy(&d.data).contains("\r\n\r\nvia implicit tls\r\n"));
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_plain_multiple_recipients() {
    if !require_peer("python3") {
        return;
    }
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start_moat(&fake, "").await;
    smtplib("multi", addr(&running, "smtp")).await;

    let d = one_message(&fake).await;
    assert_eq!(
        d.rcpts,
        ["b@example.test", "c@example.test", "d@example.test"].map(|r| format!("RCPT TO:<{r}>")).to_vec()
    );
    assert!(d.mail_from.starts_with("MAIL FROM:<a@example.org>"), "{}", d.mail_from);
    assert!(String::from_utf8_lossy(&d.data).contains("\r\n\r\nto three recipients\r\n"));
    // With several recipients the Received header names none of them (RFC 5321 7.2).
    assert!(!received(&d).contains(" for <"), "{}", received(&d));
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_utf8_body_with_8bitmime_arrives_byte_identical() {
    if !require_peer("python3") {
        return;
    }
    let fake = FakeUpstream::start(Script::default()).await;
    // Without moat's Received header the upstream must see exactly the bytes smtplib sent.
    let running = start_moat(&fake, "trace.received_header = false").await;
    let ran = smtplib("utf8", addr(&running, "smtp")).await;
    let hex = ran.stdout.lines().find_map(|l| l.strip_prefix("SENT-HEX ")).expect("SENT-HEX line");
    let sent: Vec<u8> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect();
    assert!(std::str::from_utf8(&sent).unwrap().contains("Grüße aus Köln: ½ € ✓ 日本語\r\n"));

    let d = one_message(&fake).await;
    assert!(d.mail_from.contains("BODY=8BITMIME"), "{}", d.mail_from);
    assert_eq!(
        d.data,
        sent,
        "delivered bytes differ:\n--- delivered\n{}\n--- sent\n{}",
        String::from_utf8_lossy(&d.data),
        String::from_utf8_lossy(&sent)
    );
    let _ = running.stop().await;
}

// ---- openssl s_client: SNI picks the certificate ----

/// The first PEM block of `text`, whitespace-normalized.
fn first_pem(text: &str) -> Option<String> {
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text[start..].find("-----END CERTIFICATE-----")? + start + "-----END CERTIFICATE-----".len();
    Some(text[start..end].split_whitespace().collect::<Vec<_>>().join("\n"))
}

/// Runs `openssl s_client` against `server` (`starttls`: with `-starttls smtp`), sending `sni` (None:
/// `-noservername`), verifying the chain against ca.pem and the certificate's names against `verify_name`,
/// with `-verify_return_error` so that a failed verification ends the handshake. Returns the run and the
/// command line (for messages).
async fn s_client_run(server: SocketAddr, starttls: bool, sni: Option<&str>, verify_name: &str) -> (Ran, String) {
    let connect = server.to_string();
    let ca = fixture_str("tls/ca.pem");
    let mut a = args(&["s_client", "-connect", &connect, "-verify_return_error", "-CAfile", &ca]);
    a.extend(args(&["-verify_hostname", verify_name]));
    match sni {
        Some(name) => a.extend(args(&["-servername", name])),
        None => a.push("-noservername".into()),
    }
    if starttls {
        a.extend(args(&["-starttls", "smtp", "-name", "client.example"]));
    }
    // Empty stdin: s_client completes the handshake, prints the session, and closes at EOF.
    let ran = run("openssl", &a, b"").await;
    (ran, format!("openssl {}", a.join(" ")))
}

/// The certificate moat presents, as a verified [`s_client_run`]: checks that verification succeeded (chain to
/// ca.pem, name `verify_name`, which openssl reports as the SAN entry `peername` that matched), that TLS 1.3
/// was negotiated and that the printed subject is `CN=subject_cn`. Returns the leaf certificate as PEM.
async fn s_client(
    server: SocketAddr,
    starttls: bool,
    sni: Option<&str>,
    verify_name: &str,
    peername: &str,
    subject_cn: &str,
) -> String {
    let (ran, what) = s_client_run(server, starttls, sni, verify_name).await;
    ran.assert_success(&what);
    let out = &ran.stdout;
    assert!(out.contains("Verify return code: 0 (ok)"), "{what}:\n{out}\n{}", ran.stderr);
    assert!(out.contains(&format!("Verified peername: {peername}\n")), "{what}:\n{out}");
    assert!(out.contains("New, TLSv1.3,"), "{what}:\n{out}");
    let subject =
        out.lines().find(|l| l.starts_with("subject=")).unwrap_or_else(|| panic!("{what}: no subject:\n{out}"));
    assert_eq!(subject.replace(' ', ""), format!("subject=CN={subject_cn}"), "{what}");
    first_pem(out).unwrap_or_else(|| panic!("{what}: no certificate printed:\n{out}"))
}

/// The leaf certificate of a fixture chain, as [`first_pem`] normalizes it.
fn fixture_leaf(name: &str) -> String {
    first_pem(&std::fs::read_to_string(fixture(&format!("tls/{name}"))).unwrap()).unwrap()
}

async fn sni_selection(listener: &str, starttls: bool) {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start_moat(&fake, "").await;
    let p = addr(&running, listener);
    let default = fixture_leaf("server.pem");
    let ec = fixture_leaf("server-ec.pem");
    assert_ne!(default, ec);

    let got = s_client(p, starttls, Some("ec.test"), "ec.test", "ec.test", "ec.test").await;
    assert_eq!(got, ec, "SNI ec.test must get the ec.test certificate");
    let got = s_client(p, starttls, Some("mx.test"), "mx.test", "mx.test", "localhost").await;
    assert_eq!(got, default, "SNI mx.test must get the default certificate");
    let got = s_client(p, starttls, None, "localhost", "localhost", "localhost").await;
    assert_eq!(got, default, "no SNI must get the default (first) certificate");
    let got = s_client(p, starttls, Some("EC.TEST"), "ec.test", "ec.test", "ec.test").await;
    assert_eq!(got, ec, "SNI is matched case-insensitively");
    let got = s_client(p, starttls, Some("a.example.test"), "a.example.test", "*.example.test", "localhost").await;
    assert_eq!(got, default, "SNI under the wildcard must get the default certificate");
    let got = s_client(p, starttls, Some("unknown.test"), "localhost", "localhost", "localhost").await;
    assert_eq!(got, default, "SNI no certificate covers must fall back to the default certificate");

    // Verification is real: the ec.test certificate does not pass for mx.test, and the client gives up.
    let (ran, what) = s_client_run(p, starttls, Some("ec.test"), "mx.test").await;
    assert!(!ran.status.success(), "{what} succeeded:\n{}", ran.stdout);
    let all = format!("{}{}", ran.stdout, ran.stderr);
    assert!(all.contains("hostname mismatch"), "{what}:\n{all}");
    assert!(fake.messages().is_empty());
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_starttls_sni_selects_certificate() {
    if !require_peer("openssl") {
        return;
    }
    sni_selection("starttls", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_implicit_tls_sni_selects_certificate() {
    if !require_peer("openssl") {
        return;
    }
    sni_selection("smtps", false).await;
}

// ---- STARTTLS rules over a rustls client socket ----

fn client_tls() -> TlsConnector {
    let pem = std::fs::read(fixture("tls/ca.pem")).unwrap();
    let ca = rustls_pemfile::certs(&mut &pem[..]).next().expect("a certificate in ca.pem").unwrap();
    common::moat::tls_connector(ca)
}

/// The shared test client (`tests/common/moat.rs`), over TCP or TLS.
type Lines<S> = common::moat::Client<S>;

/// Completes the TLS handshake on `lines` (after a 220 to STARTTLS), verifying mx.test against ca.pem.
async fn handshake(lines: Lines<TcpStream>) -> Lines<TlsStream<TcpStream>> {
    let tcp = lines.into_inner();
    let name = ServerName::try_from("mx.test").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(10), client_tls().connect(name, tcp))
        .await
        .expect("handshake within 10 s")
        .expect("handshake succeeds");
    Lines::new(tls)
}

async fn send_message<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Lines<S>, body: &str) {
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(format!("Subject: t\r\n\r\n{body}\r\n.\r\n").as_bytes()).await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_discards_commands_pipelined_in_plaintext() {
    let fake = FakeUpstream::start(Script::default()).await;
    let running = start_moat(&fake, "").await;
    let tcp = TcpStream::connect(running.addr("starttls").unwrap()).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut c = Lines::new(tcp);
    assert_eq!(c.reply().await.0, 220);
    let ehlo = c.expect("EHLO attacker.example", 250).await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    // The injection: a command after STARTTLS in the same packet, sent before the handshake.
    c.send_raw(b"STARTTLS\r\nRSET\r\n").await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 220, "{text}");
    let mut c = handshake(c).await;
    c.send_raw(b"EHLO x\r\n").await;
    let (code, first) = c.reply().await;
    assert_eq!(code, 250, "{first}");
    assert!(
        first.starts_with("250-mx.test") && first.contains("PIPELINING"),
        "the first reply inside TLS must be the EHLO reply, not one to the injected RSET:\n{first}"
    );
    assert!(!first.contains("STARTTLS"), "{first}");
    // Nothing else is queued: the next command's reply is its own.
    c.expect("NOOP", 250).await;
    send_message(&mut c, "after injection").await;
    let d = one_message(&fake).await;
    assert!(received(&d).contains("from x ("), "HELO after TLS is the one that counts: {}", received(&d));
    assert!(received(&d).contains(" with ESMTPS id "), "{}", received(&d));
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_tls_refuses_mail_until_starttls() {
    let fake = FakeUpstream::start(Script::default()).await;
    let listeners = format!("{}{}", listener("submission", "127.0.0.1", "starttls", true), tls_section());
    let running = start(&config_from(fake.addr, "", &listeners)).await;
    let tcp = TcpStream::connect(running.addr("submission").unwrap()).await.unwrap();
    let mut c = Lines::new(tcp);
    assert_eq!(c.reply().await.0, 220);
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    let refused = c.expect("MAIL FROM:<a@example.org>", 530).await;
    assert!(refused.starts_with("530 5.7.0 "), "{refused}");
    c.expect("STARTTLS", 220).await;

    let mut c = handshake(c).await;
    // The session starts over inside TLS (RFC 3207 4.2): EHLO first, and STARTTLS is no longer offered.
    let early = c.expect("MAIL FROM:<a@example.org>", 503).await;
    assert!(early.starts_with("503 5.5.1"), "{early}");
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    let again = c.expect("STARTTLS", 503).await;
    assert!(again.starts_with("503 5.5.1"), "{again}");
    send_message(&mut c, "over required tls").await;
    c.expect("QUIT", 221).await;

    let d = one_message(&fake).await;
    assert!(received(&d).contains(" with ESMTPS id "), "{}", received(&d));
    assert!(String::from_utf8_lossy(&d.data).contains("\r\n\r\nover required tls\r\n"));
    let _ = running.stop().await;
}
