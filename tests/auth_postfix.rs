//! Sender authentication in front of a real Postfix: the delivered message carries exactly one
//! Authentication-Results header with moat's authserv-id (a forged one was removed on the way), and a
//! DMARC p=reject failure is refused before anything reaches Postfix. DNS is a local dnsmasq.

mod common;

use std::time::Duration;

use common::dnsmasq::{Dnsmasq, Records};
use common::moat::{start, test_config, Client};
use common::postfix::{require_peer, Postfix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_header_reaches_postfix_and_dmarc_reject_never_does() {
    if !require_peer("postfix") {
        return;
    }
    let records = Records {
        zones: vec!["example".into()],
        txt: vec![
            ("spf.example".into(), "v=spf1 ip4:127.0.0.1 -all".into()),
            ("_dmarc.rej.example".into(), "v=DMARC1; p=reject".into()),
        ],
        ..Default::default()
    };
    let Some(dns) = Dnsmasq::start(&records) else { return };
    let pf = tokio::task::spawn_blocking(Postfix::start).await.unwrap();
    let extra = format!("dns.servers = [\"{}\"]\nsender_auth.enabled = true\nrules.directory = {:?}\n", dns.addr, {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        p.display().to_string()
    });
    let running = start(&test_config(pf.addr(), &extra)).await;
    let (mut c, _) = Client::connect(running.addr("smtp").unwrap()).await;
    c.expect("EHLO mail.spf.example", 250).await;

    c.expect("MAIL FROM:<ceo@spf.example>", 250).await;
    c.expect("RCPT TO:<bob@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(b"From: <ceo@rej.example>\r\nSubject: pay now\r\n\r\nwire it\r\n.\r\n").await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 550, "DMARC p=reject without alignment: {text}");

    c.expect("MAIL FROM:<alice@spf.example>", 250).await;
    c.expect("RCPT TO:<bob@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(
        b"Authentication-Results: mx.test; dmarc=pass header.from=bank.example\r\n\
          From: <alice@spf.example>\r\nSubject: hello\r\n\r\nhi\r\n.\r\n",
    )
    .await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");
    let msgs = tokio::task::spawn_blocking(move || {
        let m = pf.wait_for_messages(1, Duration::from_secs(20));
        (m, pf)
    })
    .await
    .unwrap();
    let (msgs, pf) = msgs;
    assert_eq!(msgs.len(), 1, "only the second message reached Postfix: {}", pf.log());
    let text = String::from_utf8_lossy(&msgs[0]).to_string();
    assert_eq!(text.matches("Authentication-Results: mx.test").count(), 1, "{text}");
    assert!(!text.contains("bank.example"), "the forged header is gone: {text}");
    assert!(text.contains("smtp.mailfrom=alice@spf.example") && text.contains("spf=pass"), "{text}");
    assert!(text.contains("dmarc=none"), "{text}");
    running.stop().await;
}
