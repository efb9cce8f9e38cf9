//! Shutdown of the real binary: SIGTERM drains, and the exit code says whether the grace period had to cut
//! sessions off (issue #16, defect 8: it used to exit 0 either way).

mod common;

use std::net::SocketAddr;

use common::fake::{FakeUpstream, Script};
use common::moat::Client;
use common::moat_process::MoatProcess;

/// moat relaying to `upstream` with this shutdown grace period.
async fn start_moat(upstream: SocketAddr, grace: &str) -> MoatProcess {
    let extra = format!("server.reverse_dns = false\nrules.directory = \"\"\nshutdown.grace_period = \"{grace}\"");
    tokio::task::spawn_blocking(move || MoatProcess::start(upstream, &extra)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_drain_exits_zero() {
    let fake = FakeUpstream::start(Script::default()).await;
    let mut moat = start_moat(fake.addr, "5s").await;
    let (mut idle, _) = Client::connect(moat.addr).await;
    idle.expect("EHLO idle.example", 250).await;
    let code = tokio::task::spawn_blocking(move || {
        let code = moat.terminate();
        (code, moat.log())
    });
    let (reply, _) = idle.reply().await;
    assert_eq!(reply, 421, "the idle session is told moat is shutting down");
    let (code, log) = code.await.unwrap();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("a thread per core"), "the default runtime: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cut_off_by_the_grace_period_give_exit_code_3() {
    let fake = FakeUpstream::start(Script::default()).await;
    let mut moat = start_moat(fake.addr, "500ms").await;
    let (mut busy, _) = Client::connect(moat.addr).await;
    busy.expect("EHLO busy.example", 250).await;
    busy.expect("MAIL FROM:<a@example.org>", 250).await;
    busy.expect("RCPT TO:<b@example.test>", 250).await;
    busy.expect("DATA", 354).await;
    busy.send_raw(b"Subject: never finished\r\n\r\n").await;
    let (code, log) = tokio::task::spawn_blocking(move || {
        let code = moat.terminate();
        (code, moat.log())
    })
    .await
    .unwrap();
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("sessions cut off"), "{log}");
    assert!(fake.messages().is_empty(), "nothing half-sent reached the upstream");
}

/// The tests above run a thread per core (the default); with the work-stealing runtime
/// (`server.thread_per_core = false`) SIGTERM drains the same way: the idle session is told, a transaction
/// in flight finishes, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_stealing_runtime_drains_and_exits_zero() {
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = "server.reverse_dns = false\nrules.directory = \"\"\nshutdown.grace_period = \"5s\"\n\
                 server.thread_per_core = false";
    let upstream = fake.addr;
    let mut moat = tokio::task::spawn_blocking(move || MoatProcess::start(upstream, extra)).await.unwrap();
    let (mut idle, _) = Client::connect(moat.addr).await;
    idle.expect("EHLO idle.example", 250).await;
    let (mut busy, _) = Client::connect(moat.addr).await;
    busy.expect("EHLO busy.example", 250).await;
    busy.expect("MAIL FROM:<a@example.org>", 250).await;
    busy.expect("RCPT TO:<b@example.test>", 250).await;
    busy.expect("DATA", 354).await;
    busy.send_raw(b"Subject: in flight\r\n\r\n").await;
    let code = tokio::task::spawn_blocking(move || {
        let code = moat.terminate();
        (code, moat.log())
    });
    let (reply, _) = idle.reply().await;
    assert_eq!(reply, 421, "the idle session is told moat is shutting down");
    busy.send_raw(b"body\r\n.\r\n").await;
    let (reply, text) = busy.reply().await;
    assert_eq!(reply, 250, "the transaction in flight finishes: {text}");
    let (code, log) = code.await.unwrap();
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("a thread per core"), "{log}");
    assert_eq!(fake.messages().len(), 1);
}
