//! Reverse DNS with parallel connections from one address, over real TCP: every connection reaches the
//! upstream with the client's name (`XCLIENT NAME=`), none with `[TEMPUNAVAIL]`. The name comes from the
//! system resolver: 127.0.0.1 is `localhost` in /etc/hosts, which also resolves back to it.

mod common;

use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};

/// The forward-confirmed name of 127.0.0.1 on this machine, as moat's resolver would find it.
#[allow(clippy::disallowed_methods)] // once, before the server starts, to know what to expect
fn loopback_name() -> Option<String> {
    let ip = "127.0.0.1".parse().unwrap();
    let name = dns_lookup::lookup_addr(&ip).ok()?;
    dns_lookup::lookup_host(&name).ok()?.contains(&ip).then_some(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_parallel_connections_from_one_address_all_get_the_name() {
    let Some(name) = loopback_name() else {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "127.0.0.1 has no forward-confirmed name");
        eprintln!("skipped: 127.0.0.1 has no forward-confirmed name here");
        return;
    };
    let fake = FakeUpstream::start(Script::default()).await;
    let mut cfg = test_config(fake.addr, "upstream.pool_size = 0");
    cfg.server.reverse_dns = true;
    let running = start(&cfg).await;
    let addr = running.addr("smtp").unwrap();
    // All twenty connect before any sends a command: their lookups overlap as far as the accept loop allows.
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(tokio::spawn(async move { Client::connect(addr).await }));
    }
    let mut tasks = Vec::new();
    for c in clients {
        let (mut c, code) = c.await.unwrap();
        assert_eq!(code, 220);
        tasks.push(tokio::spawn(async move {
            c.expect("EHLO client.example", 250).await;
            c.expect("MAIL FROM:<a@example.org>", 250).await;
            c.expect("RCPT TO:<b@example.test>", 250).await;
            c.expect("DATA", 354).await;
            c.send_raw(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
            assert_eq!(c.reply().await.0, 250);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let delivered = fake.wait_for(20).await;
    for d in &delivered {
        let x = d.xclient.as_deref().unwrap_or_default();
        assert!(x.contains(&format!("NAME={name}")), "{x}");
    }
    running.stop().await;
}
