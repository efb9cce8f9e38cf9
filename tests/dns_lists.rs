//! DNS blocklists against a real DNS server (dnsmasq on loopback): a listed client, sender domain, HELO
//! name and URL domain are found and scored or refused by a rule; an unlisted one passes; a "refused"
//! answer (127.255.255.x), a SERVFAIL and a server that never answers are no listing, or `451` with
//! `dns.on_error = "tempfail"`.

mod common;

use std::path::Path;

use common::dnsmasq::{Dnsmasq, Records, Silent};
use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};

/// Rules refusing mail whose client or names a zone listed, and one for URIBL.
const RULES: &str = "[[rule]]\nid = \"dnsbl\"\nwhen = { dnsbl = [\"bl\", \"rhs\"] }\naction = \"reject\"\n\
    reply = \"550 5.7.1 listed\"\n\n[[rule]]\nid = \"uribl\"\nwhen = { uribl = \"uri\" }\naction = \"reject\"\n\
    reply = \"550 5.7.1 url listed\"\n";

fn records() -> Records {
    Records {
        zones: vec!["bl.test".into(), "wl.test".into(), "rhs.test".into(), "uri.test".into(), "quota.test".into()],
        a: vec![
            ("1.0.0.127.quota.test".into(), "127.255.255.254".into()),
            ("spam.example.rhs.test".into(), "127.0.1.2".into()),
            ("bad-helo.example.rhs.test".into(), "127.0.1.2".into()),
            ("evil-shop.example.uri.test".into(), "127.0.1.2".into()),
        ],
        txt: vec![],
        servfail_zones: vec!["broken.test".into()],
    }
}

fn zone(name: &str, zone: &str, kind: &str) -> String {
    format!("[[dns.zone]]\nname = \"{name}\"\nzone = \"{zone}\"\nkind = \"{kind}\"\nweight = 2.5\n")
}

struct Setup {
    _rules: tempfile::TempDir,
    fake: FakeUpstream,
    running: moat::server::Running,
}

async fn setup(server: std::net::SocketAddr, extra: &str, zones: &str) -> Setup {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("50-dns.toml"), RULES).unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let text = format!(
        "rules.directory = {:?}\ndns.servers = [\"{server}\"]\ndns.timeout = \"300ms\"\ndns.attempts = 1\n{extra}\n{zones}",
        rules.path().display().to_string()
    );
    let running = start(&test_config(fake.addr, &text)).await;
    Setup { _rules: rules, fake, running }
}

/// Sends one message; returns the reply to the final dot.
async fn send(s: &Setup, helo: &str, from: &str, body: &str) -> (u16, String) {
    let (mut c, _) = Client::connect(s.running.addr("smtp").unwrap()).await;
    c.expect(&format!("EHLO {helo}"), 250).await;
    c.expect(&format!("MAIL FROM:<{from}>"), 250).await;
    c.expect("RCPT TO:<bob@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(format!("From: <{from}>\r\nSubject: t\r\n\r\n{body}\r\n.\r\n").as_bytes()).await;
    c.reply().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_client_and_names_are_refused_unlisted_pass() {
    let Some(dns) = Dnsmasq::start(&records()) else { return };
    // The client is 127.0.0.1: listed in bl.test only for the first setup.
    let mut listed = records();
    listed.a.push(("1.0.0.127.bl.test".into(), "127.0.0.2".into()));
    let Some(dns_listed) = Dnsmasq::start(&listed) else { return };
    let zones =
        [zone("bl", "bl.test", "dnsbl"), zone("rhs", "rhs.test", "rhsbl"), zone("uri", "uri.test", "uribl")].concat();

    let s = setup(dns_listed.addr, "", &zones).await;
    let (code, text) = send(&s, "client.example", "alice@example.org", "hello").await;
    assert_eq!(code, 550, "client IP listed: {text}");
    s.running.stop().await;

    let s = setup(dns.addr, "", &zones).await;
    let (code, text) = send(&s, "client.example", "alice@example.org", "hello").await;
    assert_eq!(code, 250, "nothing listed: {text}");
    let (code, text) = send(&s, "client.example", "alice@spam.example", "hello").await;
    assert_eq!(code, 550, "sender domain listed: {text}");
    let (code, text) = send(&s, "bad-helo.example", "alice@example.org", "hello").await;
    assert_eq!(code, 550, "HELO listed: {text}");
    let (code, text) = send(&s, "client.example", "alice@example.org", "see https://www.evil-shop.example/x").await;
    assert_eq!(code, 550, "URL's registered domain listed: {text}");
    assert!(text.contains("url listed"), "{text}");
    let (code, text) = send(&s, "client.example", "alice@example.org", "see https://www.good.example/x").await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(s.fake.wait_for(2).await.len(), 2);
    s.running.stop().await;
}

/// The listing weight goes to the score: two listings of weight 2.5 pass a tag threshold of 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_weights_add_to_the_score() {
    let mut r = records();
    r.a.push(("1.0.0.127.bl.test".into(), "127.0.0.2".into()));
    let Some(dns) = Dnsmasq::start(&r) else { return };
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("50.toml"), "[scores]\ntag_at = 4.0\nreject_at = 100.0\n").unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let text = format!(
        "rules.directory = {:?}\ndns.servers = [\"{}\"]\n{}{}",
        rules.path().display().to_string(),
        dns.addr,
        zone("bl", "bl.test", "dnsbl"),
        zone("rhs", "rhs.test", "rhsbl"),
    );
    let running = start(&test_config(fake.addr, &text)).await;
    let s = Setup { _rules: rules, fake, running };
    let (code, text) = send(&s, "client.example", "alice@example.org", "hello").await;
    assert_eq!(code, 250, "{text}");
    let (code, text) = send(&s, "client.example", "alice@spam.example", "hello").await;
    assert_eq!(code, 250, "{text}");
    let msgs = s.fake.wait_for(2).await;
    let first = String::from_utf8_lossy(&msgs[0].data).to_string();
    let second = String::from_utf8_lossy(&msgs[1].data).to_string();
    assert!(!first.contains("X-Spam-Flag"), "one listing (2.5) is under 4: {first}");
    assert!(second.contains("X-Spam-Flag: YES"), "two listings (5.0) tag: {second}");
    s.running.stop().await;
}

/// 127.255.255.254 (over quota), SERVFAIL and a server that never answers are no listing, and `451` when
/// `dns.on_error = "tempfail"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_trouble_is_no_listing_or_tempfail() {
    let Some(dns) = Dnsmasq::start(&records()) else { return };
    let silent = Silent::start();
    let cases = [
        (dns.addr, zone("bl", "quota.test", "dnsbl"), "refused code"),
        (dns.addr, zone("bl", "broken.test", "dnsbl"), "SERVFAIL"),
        (silent.addr, zone("bl", "bl.test", "dnsbl"), "timeout"),
    ];
    for (server, zones, what) in cases {
        let s = setup(server, "dns.deadline = \"2s\"", &zones).await;
        let (code, text) = send(&s, "client.example", "alice@example.org", "hello").await;
        assert_eq!(code, 250, "{what} is no listing: {text}");
        s.running.stop().await;
        let s = setup(server, "dns.deadline = \"2s\"\ndns.on_error = \"tempfail\"", &zones).await;
        let (code, text) = send(&s, "client.example", "alice@example.org", "hello").await;
        assert_eq!(code, 451, "{what} tempfails when configured: {text}");
        s.running.stop().await;
    }
}

#[test]
fn bad_zone_config_is_refused_with_its_line() {
    let text = "[[dns.zone]]\nname = \"zen\"\nzone = \"zen.example\"\ncodes = [\"127.0.0.[9..2]\"]\n";
    let e = moat::config::Config::parse(text, Path::new("t.toml")).unwrap_err().to_string();
    assert!(e.contains("empty range"), "{e}");
}
