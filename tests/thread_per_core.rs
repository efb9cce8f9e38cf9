//! `server.thread_per_core`: a runtime and a listening socket per core thread (src/cores.rs), and the
//! work-stealing runtime it replaces by default, over real TCP. One test function, so the thread and socket
//! counts it reads from /proc are those of one moat at a time.

mod common;

use std::net::SocketAddr;

use common::fake::{FakeUpstream, Script};
use common::moat::{config_from, start, test_config, Client};

/// Listening sockets on `port` (IPv4, /proc/net/tcp state 0A).
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        })
        .count()
}

/// Threads of this process named `moat-core-*`, once that number is `want` (a new thread names itself when
/// it starts; an ended one goes away when joined), or after 5 s.
async fn core_threads(want: usize) -> usize {
    let mut n = count_core_threads();
    for _ in 0..500 {
        if n == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        n = count_core_threads();
    }
    n
}

fn count_core_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("moat-core-"))
        .count()
}

async fn send_one(addr: SocketAddr, n: usize) {
    let (mut c, code) = Client::connect(addr).await;
    assert_eq!(code, 220);
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(format!("Subject: {n}\r\n\r\nmessage {n}\r\n.\r\n").as_bytes()).await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "message {n}: {text}");
    c.expect("QUIT", 221).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_served_and_drained_with_either_runtime() {
    relay_and_drain(true).await;
    relay_and_drain(false).await;
    a_second_moat_cannot_share_the_address().await;
}

async fn relay_and_drain(per_core: bool) {
    let cores = if per_core { moat::cores::count() } else { 0 };
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!("server.thread_per_core = {per_core}\nlimits.max_connections_per_ip = 100");
    let running = start(&test_config(fake.addr, &extra)).await;
    let addr = running.addr("smtp").unwrap();
    assert_eq!(listening_sockets(addr.port()), cores.max(1), "listening sockets on {addr}");
    assert_eq!(core_threads(cores).await, cores, "threads per core");

    // 60 clients, 20 in parallel at a time, a new connection each: the pooled upstream connections are opened on one
    // core thread and taken by sessions on another.
    for wave in 0..3 {
        let sends: Vec<_> = (wave * 20..wave * 20 + 20).map(|n| tokio::spawn(send_one(addr, n))).collect();
        for s in sends {
            s.await.unwrap();
        }
    }
    let got = fake.wait_for(60).await;
    assert_eq!(got.len(), 60, "every message relayed once");
    let mut subjects: Vec<String> = got
        .iter()
        .map(|d| {
            let text = String::from_utf8_lossy(&d.data).into_owned();
            text.lines().find_map(|l| l.strip_prefix("Subject: ").map(str::to_string)).unwrap()
        })
        .collect();
    subjects.sort_by_key(|s| s.parse::<usize>().unwrap());
    assert_eq!(subjects, (0..60).map(|n| n.to_string()).collect::<Vec<_>>());
    let upstream_connections = *fake.connections.lock().unwrap();
    assert!(upstream_connections < 60, "upstream connections were pooled ({upstream_connections} for 60 messages)");

    // A transaction in flight when shutdown starts is finished on its core thread during the drain.
    let (mut busy, _) = Client::connect(addr).await;
    busy.expect("EHLO busy.example", 250).await;
    busy.expect("MAIL FROM:<a@example.org>", 250).await;
    busy.expect("RCPT TO:<b@example.test>", 250).await;
    busy.expect("DATA", 354).await;
    busy.send_raw(b"Subject: in flight\r\n\r\nfirst half\r\n").await;
    let stop = tokio::spawn(running.stop());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no socket accepts once shutdown started");
    busy.send_raw(b"second half\r\n.\r\n").await;
    let (code, text) = busy.reply().await;
    assert_eq!(code, 250, "{text}");
    let stopped = stop.await.unwrap();
    assert_eq!(stopped.cut_off, 0);
    assert_eq!(fake.wait_for(61).await.len(), 61);
    assert_eq!(count_core_threads(), 0, "the core threads (if any) ended with the stop");
    assert_eq!(listening_sockets(addr.port()), 0, "every listening socket closed");
}

/// With `SO_REUSEPORT` a second process could join the address and take a share of the connections; moat
/// refuses to start there instead, as a plain bind would.
async fn a_second_moat_cannot_share_the_address() {
    let fake = FakeUpstream::start(Script::default()).await;
    let first = start(&test_config(fake.addr, "server.thread_per_core = true")).await;
    let addr = first.addr("smtp").unwrap();
    let listener = format!("[[listener]]\nname = \"smtp\"\naddress = \"{addr}\"\nmode = \"plain\"\n");
    for per_core in [true, false] {
        let second = config_from(fake.addr, &format!("server.thread_per_core = {per_core}"), &listener);
        match moat::server::start(&second).await {
            Err(e) => assert!(e.to_string().contains("cannot listen"), "{e}"),
            Ok(_) => panic!("a second moat (thread_per_core = {per_core}) bound {addr} beside the first"),
        }
    }
    assert_eq!(listening_sockets(addr.port()), moat::cores::count(), "the first moat's sockets only");
    first.stop().await;
}
