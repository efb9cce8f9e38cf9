//! DKIM signing of authenticated submissions: the signature moat adds verifies with moat's own verifier
//! (mail-auth through moat's resolver, against dnsmasq serving the key) and with an independent one
//! (Python dkimpy); unauthenticated mail is not signed; a replaced key file is picked up by the watcher.

mod common;

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::dnsmasq::{Dnsmasq, Records};
use common::fake::{FakeUpstream, Script};
use common::moat::{config_from, start, Client};
use common::postfix::require_peer;
use common::process::run;
use moat::auth::store::hash_password;
use moat::dkim::keygen::{generate, Algorithm};

const ALICE: &str = "alice@example.test";
const PW: &str = "pw-alice";

struct Setup {
    _dir: tempfile::TempDir,
    fake: FakeUpstream,
    running: moat::server::Running,
}

async fn setup(dir: tempfile::TempDir, key_file: &Path) -> Setup {
    let users = dir.path().join("users.toml");
    let text = format!("[users.\"{ALICE}\"]\npassword = \"{}\"\nsenders = [\"{ALICE}\"]\n", hash_password(PW).unwrap());
    std::fs::write(&users, text).unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let listeners = format!(
        "[[listener]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\nrole = \"mx\"\nauth_without_tls = true\n\
         [dkim]\nwatch_interval = \"100ms\"\n[[dkim.sign]]\ndomain = \"example.test\"\nselector = \"s1\"\nkey_file = {:?}\n",
        key_file.display().to_string()
    );
    let extra = format!("auth.users_file = {:?}\nauth.failure_delay = \"1ms\"", users.display().to_string());
    let running = start(&config_from(fake.addr, &extra, &listeners)).await;
    Setup { _dir: dir, fake, running }
}

/// Sends a message (authenticated or not) and returns what the upstream got.
async fn send(s: &Setup, auth: bool, body: &str) -> String {
    let before = s.fake.messages().len();
    let (mut c, _) = Client::connect(s.running.addr("mx").unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    if auth {
        c.expect(&format!("AUTH PLAIN {}", STANDARD.encode(format!("\0{ALICE}\0{PW}"))), 235).await;
    }
    c.expect(&format!("MAIL FROM:<{ALICE}>"), 250).await;
    c.expect("RCPT TO:<bob@example.test>", 250).await;
    c.expect("DATA", 354).await;
    let msg = format!(
        "From: Alice <{ALICE}>\r\nTo: <bob@example.test>\r\nSubject: signed\r\nDate: Fri, 4 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <1@example.test>\r\n\r\n{body}\r\n.\r\n"
    );
    c.send_raw(msg.as_bytes()).await;
    assert_eq!(c.reply().await.0, 250);
    let all = s.fake.wait_for(before + 1).await;
    String::from_utf8_lossy(&all[before].data).to_string()
}

/// moat's verifier: mail-auth through moat's resolver, the key served by dnsmasq.
async fn verify_with_moat(dns: &Dnsmasq, msg: &str) -> Vec<String> {
    let cfg = moat::config::DnsConfig { servers: vec![dns.addr.to_string()], ..Default::default() };
    let resolver = moat::dns::Dns::new(&cfg).unwrap();
    let am = mail_auth::AuthenticatedMessage::parse(msg.as_bytes()).unwrap();
    let out = resolver.authenticator().verify_dkim(resolver.params(&am)).await;
    out.iter().map(|o| format!("{:?}", o.result())).collect()
}

/// dkimpy, with the record given directly (no DNS); `None` when it is not installed (outside CI).
async fn verify_with_dkimpy(record: &str, msg: &str) -> Option<bool> {
    if !require_peer("python3") {
        return None;
    }
    // Debian's python3-dkim lives in the system interpreter's dist-packages (a pyenv python3 first in
    // PATH would not see it).
    let py = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let probe = run(py, &["-c".into(), "import dkim".into()], b"").await;
    if !probe.status.success() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but python3-dkim is missing (see .ci/run)");
        }
        eprintln!("skipping dkimpy: python3-dkim not installed");
        return None;
    }
    let script = format!(
        "import sys, dkim\nrec = {record:?}.encode()\nmsg = sys.stdin.buffer.read()\n\
         ok = dkim.verify(msg, dnsfunc=lambda name, timeout=5: rec)\nprint('PASS' if ok else 'FAIL')\n"
    );
    let out = run(py, &["-c".into(), script], msg.as_bytes()).await;
    Some(out.output().contains("PASS"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_are_signed_and_verify_independently() {
    for algorithm in [Algorithm::Rsa2048, Algorithm::Ed25519] {
        let dir = tempfile::tempdir().unwrap();
        let key = generate("example.test", "s1", algorithm, dir.path()).unwrap();
        let records = Records {
            zones: vec!["example.test".into()],
            txt: vec![("s1._domainkey.example.test".into(), key.record.clone())],
            ..Default::default()
        };
        let Some(dns) = Dnsmasq::start(&records) else { return };
        let s = setup(dir, &key.key_file).await;

        let plain = send(&s, false, "not authenticated").await;
        assert!(!plain.contains("DKIM-Signature"), "unauthenticated mail is not signed: {plain}");

        let signed = send(&s, true, "hello\r\n\r\n\r\n").await;
        assert!(signed.contains("DKIM-Signature:") && signed.contains("d=example.test"), "{signed}");
        let h = signed.split("DKIM-Signature:").nth(1).unwrap();
        assert!(h[..h.find("b=").unwrap()].to_ascii_lowercase().matches("from").count() >= 2, "From oversigned: {h}");
        assert_eq!(verify_with_moat(&dns, &signed).await, ["Pass"], "{algorithm:?}: {signed}");
        let tampered = signed.replace("hello", "HELLO");
        assert_ne!(verify_with_moat(&dns, &tampered).await, ["Pass"]);
        if algorithm == Algorithm::Rsa2048 {
            // dkimpy verifies Ed25519 only with PyNaCl installed; RSA always.
            if let Some(ok) = verify_with_dkimpy(&key.record, &signed).await {
                assert!(ok, "dkimpy verifies moat's signature: {signed}");
                assert_eq!(verify_with_dkimpy(&key.record, &tampered).await, Some(false));
            }
        }
        s.running.stop().await;
    }
}

/// A new key written over the key file is used without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_key_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let first = generate("example.test", "s1", Algorithm::Ed25519, dir.path()).unwrap();
    let other = tempfile::tempdir().unwrap();
    let second = generate("example.test", "s1", Algorithm::Ed25519, other.path()).unwrap();
    let records = |rec: &str| Records {
        zones: vec!["example.test".into()],
        txt: vec![("s1._domainkey.example.test".into(), rec.to_string())],
        ..Default::default()
    };
    let Some(dns1) = Dnsmasq::start(&records(&first.record)) else { return };
    let Some(dns2) = Dnsmasq::start(&records(&second.record)) else { return };
    let key_file = first.key_file.clone();
    let s = setup(dir, &key_file).await;
    let msg = send(&s, true, "one").await;
    assert_eq!(verify_with_moat(&dns1, &msg).await, ["Pass"]);
    let tmp = key_file.with_extension("new");
    std::fs::copy(&second.key_file, &tmp).unwrap();
    std::fs::rename(&tmp, &key_file).unwrap();
    let mut switched = false;
    for _ in 0..100 {
        let msg = send(&s, true, "two").await;
        if verify_with_moat(&dns2, &msg).await == ["Pass"] {
            switched = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(switched, "the new key signs after the reload");
    s.running.stop().await;
}
