//! SPF, DKIM and DMARC on mx mail against a real DNS server (dnsmasq on loopback) serving SPF records,
//! DKIM keys and DMARC policies; the results are read from moat's Authentication-Results header on the
//! relayed message, and the shipped rules (rules/20-sender-auth.toml) act on DMARC policies.

mod common;

use common::dnsmasq::{Dnsmasq, Records};
use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;

struct Key {
    pkcs8: Vec<u8>,
    txt: String,
}

fn ed25519_key() -> Key {
    let pair = mail_auth::dkim::generate::DkimKeyPair::generate_ed25519().unwrap();
    let txt = format!("v=DKIM1; k=ed25519; p={}", pair.encoded_public_key());
    Key { pkcs8: pair.private_key().to_vec(), txt }
}

fn sign(key: &Key, domain: &str, selector: &str, msg: &str) -> String {
    let k = Ed25519Key::from_pkcs8_der(&key.pkcs8).unwrap();
    let sig = DkimSigner::from_key(k)
        .domain(domain)
        .selector(selector)
        .headers(["From", "To", "Subject"])
        .sign(msg.as_bytes())
        .unwrap();
    format!("{}{msg}", sig.to_header())
}

fn records(key: &Key) -> Records {
    let txt = |n: &str, t: &str| (n.to_string(), t.to_string());
    Records {
        // The whole .example tree, so DMARC's tree walk up to _dmarc.example gets NXDOMAIN, not REFUSED.
        zones: vec!["example".to_string()],
        a: vec![],
        txt: vec![
            txt("pass.example", "v=spf1 ip4:127.0.0.1 -all"),
            txt("fail.example", "v=spf1 ip4:192.0.2.1 -all"),
            txt("soft.example", "v=spf1 ~all"),
            txt("s1._domainkey.pass.example", &key.txt),
            txt("s1._domainkey.rej.example", &key.txt),
            txt("s1._domainkey.quar.example", &key.txt),
            txt("_dmarc.rej.example", "v=DMARC1; p=reject"),
            txt("_dmarc.quar.example", "v=DMARC1; p=quarantine"),
            txt("client.pass.example", "v=spf1 ip4:127.0.0.1 -all"),
        ],
        servfail_zones: vec![],
    }
}

struct Setup {
    _rules: tempfile::TempDir,
    fake: FakeUpstream,
    running: moat::server::Running,
}

async fn setup(dns: &Dnsmasq) -> Setup {
    let rules = tempfile::tempdir().unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/20-sender-auth.toml");
    std::fs::copy(shipped, rules.path().join("20-sender-auth.toml")).unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let text = format!(
        "rules.directory = {:?}\ndns.servers = [\"{}\"]\ndns.timeout = \"1s\"\nsender_auth.enabled = true\n",
        rules.path().display().to_string(),
        dns.addr
    );
    let running = start(&test_config(fake.addr, &text)).await;
    Setup { _rules: rules, fake, running }
}

/// Sends `msg` from `mail_from`; returns the reply and, when relayed, the relayed message.
async fn send(s: &Setup, mail_from: &str, msg: &str) -> (u16, String, Option<String>) {
    let before = s.fake.messages().len();
    let (mut c, _) = Client::connect(s.running.addr("smtp").unwrap()).await;
    c.expect("EHLO client.pass.example", 250).await;
    c.expect(&format!("MAIL FROM:<{mail_from}>"), 250).await;
    c.expect("RCPT TO:<bob@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(format!("{msg}.\r\n").as_bytes()).await;
    let (code, text) = c.reply().await;
    let relayed = if code == 250 {
        let all = s.fake.wait_for(before + 1).await;
        Some(String::from_utf8_lossy(&all[before].data).to_string())
    } else {
        None
    };
    (code, text, relayed)
}

/// moat's own Authentication-Results header (unfolded).
fn our_results(relayed: &str) -> String {
    let start = relayed.find("Authentication-Results: mx.test").expect("moat's header");
    let rest = &relayed[start..];
    let mut end = rest.find("\r\n").unwrap();
    while rest[end + 2..].starts_with(['\t', ' ']) {
        end = end + 2 + rest[end + 2..].find("\r\n").unwrap();
    }
    rest[..end].replace("\r\n", "")
}

fn message(from: &str, body: &str) -> String {
    format!("From: <{from}>\r\nTo: <bob@example.test>\r\nSubject: hello\r\n\r\n{body}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_results() {
    let key = ed25519_key();
    let Some(dns) = Dnsmasq::start(&records(&key)) else { return };
    let s = setup(&dns).await;
    for (sender, want) in [
        ("a@pass.example", "spf=pass"),
        ("a@fail.example", "spf=fail"),
        ("a@soft.example", "spf=softfail"),
        ("a@none.example", "spf=none"),
    ] {
        let (code, text, relayed) = send(&s, sender, &message(sender, "hi")).await;
        assert_eq!(code, 250, "{sender}: {text}");
        let ar = our_results(&relayed.unwrap());
        assert!(ar.contains(want), "{sender}: want {want} in {ar}");
        assert!(ar.contains("smtp.helo=client.pass.example"), "{ar}");
    }
    s.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_pass_modified_body_and_missing_key() {
    let key = ed25519_key();
    let Some(dns) = Dnsmasq::start(&records(&key)) else { return };
    let s = setup(&dns).await;
    let signed = sign(&key, "pass.example", "s1", &message("a@pass.example", "the body"));
    let (code, _, relayed) = send(&s, "a@pass.example", &signed).await;
    assert_eq!(code, 250);
    let ar = our_results(&relayed.unwrap());
    assert!(ar.contains("dkim=pass") && ar.contains("header.d=pass.example"), "{ar}");
    assert!(ar.contains("dmarc=none"), "no DMARC record: {ar}");

    let tampered = signed.replace("the body", "the b0dy");
    let (code, _, relayed) = send(&s, "a@pass.example", &tampered).await;
    assert_eq!(code, 250);
    let ar = our_results(&relayed.unwrap());
    assert!(!ar.contains("dkim=pass") && (ar.contains("dkim=fail") || ar.contains("dkim=neutral")), "{ar}");

    let no_key = sign(&key, "pass.example", "missing", &message("a@pass.example", "x"));
    let (code, _, relayed) = send(&s, "a@pass.example", &no_key).await;
    assert_eq!(code, 250);
    let ar = our_results(&relayed.unwrap());
    assert!(!ar.contains("dkim=pass") && ar.contains("dkim="), "{ar}");
    s.running.stop().await;
}

/// p=reject and p=quarantine: an unaligned message (signed by nobody, SPF for another domain) fails DMARC
/// and is refused or tagged by the shipped rules; an aligned one (DKIM d= the From domain) passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_policies_with_and_without_alignment() {
    let key = ed25519_key();
    let Some(dns) = Dnsmasq::start(&records(&key)) else { return };
    let s = setup(&dns).await;
    let (code, text, relayed) = send(&s, "a@pass.example", &message("ceo@rej.example", "pay")).await;
    assert_eq!(code, 550, "{text} {relayed:?}");
    assert!(text.contains("5.7.1") && text.contains("DMARC"), "{text}");

    let aligned = sign(&key, "rej.example", "s1", &message("ceo@rej.example", "pay"));
    let (code, text, relayed) = send(&s, "a@pass.example", &aligned).await;
    assert_eq!(code, 250, "{text}");
    let ar = our_results(&relayed.unwrap());
    assert!(ar.contains("dmarc=pass") && ar.contains("policy.dmarc=reject"), "{ar}");

    let (code, text, relayed) = send(&s, "a@pass.example", &message("x@quar.example", "hm")).await;
    assert_eq!(code, 250, "{text}");
    let relayed = relayed.unwrap();
    assert!(relayed.contains("X-Moat-DMARC: quarantine"), "{relayed}");
    assert!(our_results(&relayed).contains("dmarc=fail"), "{relayed}");

    let aligned = sign(&key, "quar.example", "s1", &message("x@quar.example", "hm"));
    let (_, _, relayed) = send(&s, "a@pass.example", &aligned).await;
    assert!(!relayed.unwrap().contains("X-Moat-DMARC"), "aligned DKIM passes DMARC");
    s.running.stop().await;
}

/// An incoming Authentication-Results claiming moat's authserv-id is removed; others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_authentication_results_are_removed() {
    let key = ed25519_key();
    let Some(dns) = Dnsmasq::start(&records(&key)) else { return };
    let s = setup(&dns).await;
    let msg = format!(
        "Authentication-Results: mx.test; dkim=pass header.d=bank.example\r\n\
         Authentication-Results: upstream.example; spf=pass\r\n{}",
        message("a@pass.example", "hi")
    );
    let (code, _, relayed) = send(&s, "a@pass.example", &msg).await;
    assert_eq!(code, 250);
    let relayed = relayed.unwrap();
    assert_eq!(relayed.matches("Authentication-Results: mx.test").count(), 1, "{relayed}");
    assert!(!relayed.contains("bank.example"), "{relayed}");
    assert!(relayed.contains("Authentication-Results: upstream.example; spf=pass"), "{relayed}");
    s.running.stop().await;
}
