//! Upstream STARTTLS against a real Postfix that has its own certificate (`tests/fixtures/tls/server.pem`:
//! localhost, mx.test, *.example.test, 127.0.0.1, issued by `ca.pem`). moat runs in-process with a plain
//! listener; a message goes through it, and Postfix's own log says whether moat's connection was
//! encrypted. Skipped without Postfix (or root), except under CI=true.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::moat::{start, test_config, Client};
use common::postfix::{require_peer, Postfix};

/// A file of the test PKI.
fn pki(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name);
    path.to_str().expect("UTF-8 path").to_owned()
}

/// Postfix offering STARTTLS with server.pem, logging each TLS session
/// (`Anonymous TLS connection established from ...: TLSv1.3 with cipher ...`).
fn postfix_with_tls() -> Postfix {
    let settings = [
        format!("smtpd_tls_cert_file={}", pki("server.pem")),
        format!("smtpd_tls_key_file={}", pki("server.key")),
        "smtpd_tls_security_level=may".to_owned(),
        "smtpd_tls_loglevel=1".to_owned(),
    ];
    Postfix::start_with(&settings.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `[upstream]` TLS keys as dotted TOML for [`test_config`].
fn upstream_tls(mode: &str, verify: &str, server_name: &str) -> String {
    let ca =
        if verify == "ca-file" { format!("upstream.tls_ca_file = \"{}\"\n", pki("ca.pem")) } else { String::new() };
    format!(
        "upstream.tls = \"{mode}\"\nupstream.tls_verify = \"{verify}\"\nupstream.tls_server_name = \"{server_name}\"\n{ca}"
    )
}

/// Sends one message through moat; returns the reply code to MAIL (the upstream connection is made then)
/// and, when MAIL was accepted, to the end of data.
async fn send_one(moat: SocketAddr, subject: &str) -> (u16, Option<u16>) {
    let (mut c, greeting) = Client::connect(moat).await;
    assert_eq!(greeting, 220);
    c.expect("EHLO client.example", 250).await;
    let (mail, text) = c.cmd("MAIL FROM:<alice@example.org>").await;
    if mail != 250 {
        c.cmd("QUIT").await;
        assert!(text.starts_with("451"), "MAIL -> {text}");
        return (mail, None);
    }
    c.expect("RCPT TO:<bob@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(format!("Subject: {subject}\r\nFrom: alice@example.org\r\n\r\nover tls, we hope\r\n.\r\n").as_bytes())
        .await;
    let (end, text) = c.reply().await;
    assert_eq!(end, 250, "end of data -> {text}");
    c.cmd("QUIT").await;
    (mail, Some(end))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_starttls_verifies_postfix_certificate_and_delivers() {
    if !require_peer("postfix") {
        return;
    }
    let pf = postfix_with_tls();
    // Verified against the test CA, by DNS name; then by the default name (the upstream's IP, an IP SAN).
    for (i, extra) in
        [upstream_tls("required", "ca-file", "mx.test"), upstream_tls("required", "ca-file", "")].iter().enumerate()
    {
        let running = start(&test_config(pf.addr(), extra)).await;
        let subject = format!("upstream tls {i}");
        assert_eq!(send_one(running.addr("smtp").unwrap(), &subject).await, (250, Some(250)));
        let msgs = pf.wait_for_messages(i + 1, Duration::from_secs(20));
        assert_eq!(msgs.len(), i + 1, "delivered");
        assert!(msgs.iter().any(|m| contains(m, &subject)), "the message with {subject:?} arrived");
        let _ = running.stop().await;
    }
    assert!(pf.wait_for_log("TLS connection established from", Duration::from_secs(10)), "{}", pf.log());
    let log = pf.log();
    let established: Vec<&str> = log.lines().filter(|l| l.contains("TLS connection established from")).collect();
    assert_eq!(established.len(), 2, "one TLS session per moat instance:\n{log}");
    for line in established {
        assert!(line.contains("[127.0.0.1]") && line.contains("TLSv1.3"), "{line}");
    }
    // Both messages came in over TLS: Postfix's Received header says ESMTPS (ESMTPSA with AUTH).
    for m in pf.messages() {
        assert!(contains(&m, "with ESMTPS id"), "{}", String::from_utf8_lossy(&m));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_loopback_encrypts_without_checking_the_certificate() {
    if !require_peer("postfix") {
        return;
    }
    let pf = postfix_with_tls();
    // A name the certificate does not carry, and no CA: only insecure-loopback passes.
    let running = start(&test_config(pf.addr(), &upstream_tls("required", "insecure-loopback", "other.test"))).await;
    assert_eq!(send_one(running.addr("smtp").unwrap(), "insecure loopback").await, (250, Some(250)));
    assert_eq!(pf.wait_for_messages(1, Duration::from_secs(20)).len(), 1);
    assert!(pf.wait_for_log("TLS connection established from", Duration::from_secs(10)), "{}", pf.log());
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_name_is_451_and_nothing_is_delivered() {
    if !require_peer("postfix") {
        return;
    }
    let pf = postfix_with_tls();
    // Opportunistic too: a failed verification is never downgraded to plaintext.
    for mode in ["required", "opportunistic"] {
        let running = start(&test_config(pf.addr(), &upstream_tls(mode, "ca-file", "wrong.test"))).await;
        assert_eq!(send_one(running.addr("smtp").unwrap(), mode).await, (451, None), "{mode}");
        let _ = running.stop().await;
    }
    // A certificate from a CA the verifier does not trust (the system roots know nothing of the test CA)
    // fails the same way.
    let running = start(&test_config(pf.addr(), &upstream_tls("required", "system", "mx.test"))).await;
    assert_eq!(send_one(running.addr("smtp").unwrap(), "system roots").await, (451, None));
    let _ = running.stop().await;
    assert!(pf.wait_for_messages(1, Duration::from_secs(3)).is_empty(), "nothing may be delivered");
    assert!(!pf.log().contains("TLS connection established from"), "{}", pf.log());
    assert!(!pf.log().contains("client="), "no transaction reached Postfix:\n{}", pf.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_without_starttls_opportunistic_relays_plaintext_required_refuses() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start(); // smtpd_tls_security_level = none: no STARTTLS offered
    let running = start(&test_config(pf.addr(), &upstream_tls("required", "ca-file", "mx.test"))).await;
    assert_eq!(send_one(running.addr("smtp").unwrap(), "required").await, (451, None));
    let _ = running.stop().await;
    assert!(pf.wait_for_messages(1, Duration::from_secs(2)).is_empty());

    let running = start(&test_config(pf.addr(), &upstream_tls("opportunistic", "ca-file", "mx.test"))).await;
    assert_eq!(send_one(running.addr("smtp").unwrap(), "opportunistic").await, (250, Some(250)));
    let _ = running.stop().await;
    let msgs = pf.wait_for_messages(1, Duration::from_secs(20));
    assert_eq!(msgs.len(), 1);
    assert!(contains(&msgs[0], "opportunistic") && contains(&msgs[0], "with ESMTP id"));
}
