//! A fleet (issue #12): two moat instances sharing one real Redis. A TOTP code used on A is refused on B;
//! the per-client connection limit holds across the fleet and the leases of a killed instance expire;
//! AUTH failures split over A and B lock the client; the shipped example rate limit and greylisting hold
//! across the fleet; Redis killed mid-run: no session hangs, each feature follows its `state.on_error`
//! choice, `/readyz` says degraded, and everything recovers when Redis returns.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::fake::{FakeUpstream, Script};
use common::fleet::{carol_code, connect_from, free_port, plain, users_file, MoatChild};
use common::moat::{config_from, start};
use common::redis::{require_redis, Redis};
use moat::server::Running;

/// One in-process instance on a plain mx listener offering AUTH without TLS, state in `redis`.
async fn instance(redis: &Redis, fake: &FakeUpstream, users: &std::path::Path, name: &str, extra: &str) -> Running {
    let url = if extra.contains("state.url") { String::new() } else { format!("state.url = \"{}\"\n", redis.url()) };
    let extra = format!(
        "auth.users_file = \"{}\"\nauth.failure_delay = \"1ms\"\nstate.backend = \"redis\"\n{url}\
         state.instance_id = \"{name}\"\nstate.command_timeout = \"200ms\"\n{extra}",
        users.display(),
    );
    let listeners =
        "[[listener]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\nauth_without_tls = true\n";
    let mut cfg = config_from(fake.addr, &extra.replace("metrics.address = \"127.0.0.1:0\"", ""), listeners);
    if extra.contains("metrics.address = \"127.0.0.1:0\"") {
        cfg.metrics.address = "127.0.0.1:0".into();
    }
    start(&cfg).await
}

fn mx(r: &Running) -> SocketAddr {
    r.addr("mx").unwrap()
}

#[tokio::test]
async fn a_totp_code_used_on_a_is_refused_on_b() {
    if !require_redis() {
        return;
    }
    let redis = Redis::start();
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let a = instance(&redis, &fake, &users, "a", "").await;
    let b = instance(&redis, &fake, &users, "b", "").await;
    let code = carol_code();
    let auth = format!("AUTH PLAIN {}", plain("carol", &format!("carolpw{code}")));
    let (mut ca, _) = connect_from("127.0.0.21", mx(&a)).await;
    ca.expect("EHLO client.example", 250).await;
    ca.expect(&auth, 235).await;
    let (mut cb, _) = connect_from("127.0.0.21", mx(&b)).await;
    cb.expect("EHLO client.example", 250).await;
    cb.expect(&auth, 535).await;
    // Connection ids name their instance (they appear in Received headers and audit records).
    ca.expect("MAIL FROM:<carol@example.test>", 250).await;
    ca.expect("RCPT TO:<x@example.test>", 250).await;
    ca.expect("DATA", 354).await;
    ca.expect("Subject: t\r\n\r\nhi\r\n.", 250).await;
    let m = fake.wait_for(1).await;
    let data = String::from_utf8_lossy(&m[0].data).to_string();
    assert!(data.contains("id a-"), "{data}");
    a.stop().await;
    b.stop().await;
}

/// `max_connections_per_ip = 2` across the fleet; A runs as a process that is then killed: its leases are
/// not released but expire with `lease_ttl`, and B admits the client again.
#[tokio::test]
async fn the_per_client_limit_spans_the_fleet_and_a_killed_instances_leases_expire() {
    if !require_redis() {
        return;
    }
    let redis = Redis::start();
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let port = free_port();
    let a_toml = format!(
        "server.hostname = \"a.test\"\nserver.reverse_dns = false\nmetrics.address = \"\"\naudit.destination = \"off\"\n\
         rules.directory = \"\"\nupstream.address = \"{}\"\nlimits.max_connections_per_ip = 2\n\
         [state]\nbackend = \"redis\"\nurl = \"{}\"\nlease_ttl = \"3s\"\ninstance_id = \"a\"\n\
         [[listener]]\nname = \"mx\"\naddress = \"127.0.0.1:{port}\"\nmode = \"plain\"\n",
        fake.addr,
        redis.url()
    );
    let mut a = MoatChild::start(&a_toml, port);
    let b = instance(&redis, &fake, &users, "b", "limits.max_connections_per_ip = 2\nstate.lease_ttl = \"3s\"").await;

    let (_c1, code1) = connect_from("127.0.0.22", a.addr).await;
    let (_c2, code2) = connect_from("127.0.0.22", a.addr).await;
    assert_eq!((code1, code2), (220, 220));
    let (_c3, code3) = connect_from("127.0.0.22", mx(&b)).await;
    assert_eq!(code3, 421, "the client's two connections on A count on B");
    let (_other, code) = connect_from("127.0.0.23", mx(&b)).await;
    assert_eq!(code, 220, "another client is not affected");

    a.kill();
    let mut con = redis.client();
    let held: i64 = redis::cmd("ZCARD").arg("moat:conn:127.0.0.22").query(&mut con).unwrap();
    assert_eq!(held, 2, "a killed instance releases nothing");
    // Nobody renews them now: within lease_ttl they expire and B admits the client.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_c, code) = connect_from("127.0.0.22", mx(&b)).await;
        if code == 220 {
            break;
        }
        assert_eq!(code, 421);
        assert!(Instant::now() < deadline, "the dead instance's leases never expired");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    b.stop().await;
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

async fn wait_readyz(addr: SocketAddr, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(addr, "/readyz").await;
        if code == 200 && body == want {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz never said {want:?}; last {code} {body:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Redis killed while sessions run. A fails the fleet connection limit open (the default), B closed; both
/// fail the TOTP replay guard closed (the default). Nothing waits longer than the command timeout (the
/// client gives up on a reply after 10 s, which would show as code 0).
#[tokio::test]
async fn redis_killed_mid_run_follows_the_configured_choices_and_recovers() {
    if !require_redis() {
        return;
    }
    let mut redis = Redis::start();
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let a = instance(&redis, &fake, &users, "a", "metrics.address = \"127.0.0.1:0\"").await;
    let b = instance(&redis, &fake, &users, "b", "state.on_error.concurrency = \"closed\"").await;
    let metrics = a.metrics.unwrap();
    wait_readyz(metrics, "ready\n").await;

    let (mut open, code) = connect_from("127.0.0.24", mx(&a)).await;
    assert_eq!(code, 220);
    open.expect("EHLO client.example", 250).await;
    redis.kill();

    // The session in progress goes on: a message relays.
    open.expect("MAIL FROM:<s@example.org>", 250).await;
    open.expect("RCPT TO:<x@example.test>", 250).await;
    open.expect("DATA", 354).await;
    open.expect("Subject: t\r\n\r\nhi\r\n.", 250).await;
    // New connections: A admits (open), B refuses for now (closed).
    let (mut ca, code) = connect_from("127.0.0.24", mx(&a)).await;
    assert_eq!(code, 220);
    let (_cb, code) = connect_from("127.0.0.24", mx(&b)).await;
    assert_eq!(code, 421);
    // AUTH: the fleet's lockout counters (and the TOTP replay guard) cannot be asked: refused for now.
    ca.expect("EHLO client.example", 250).await;
    let text = ca.expect(&format!("AUTH PLAIN {}", plain("carol", &format!("carolpw{}", carol_code()))), 454).await;
    assert!(text.contains("4.7.0"), "{text}");
    let text = ca.expect(&format!("AUTH PLAIN {}", plain("alice", "alicepw")), 454).await;
    assert!(text.contains("4.7.0"), "{text}");
    wait_readyz(metrics, "ready, degraded: state store unreachable\n").await;
    let (_, m) = http_get(metrics, "/metrics").await;
    let errors: f64 = m
        .lines()
        .filter(|l| l.starts_with("moat_state_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors >= 1.0, "{m}");

    redis.restart();
    wait_readyz(metrics, "ready\n").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_c, code) = connect_from("127.0.0.24", mx(&b)).await;
        if code == 220 {
            break;
        }
        assert!(Instant::now() < deadline, "B never admitted again after Redis returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut c, _) = connect_from("127.0.0.24", mx(&b)).await;
    c.expect("EHLO client.example", 250).await;
    c.expect(&format!("AUTH PLAIN {}", plain("carol", &format!("carolpw{}", carol_code()))), 235).await;
    a.stop().await;
    b.stop().await;
}

/// A rules directory holding only `files` (name, text).
fn rules_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn shipped(rel: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The shipped example limit (10 messages per minute per client IP) holds across the fleet: 12 messages
/// split 6/6 over A and B, the 11th and 12th get 4xx.
#[tokio::test]
async fn the_example_rate_limit_is_shared_by_the_fleet() {
    if !require_redis() {
        return;
    }
    let redis = Redis::start();
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let rules = rules_dir(&[("rate-limits.toml", shipped("rules/examples/rate-limits.toml"))]);
    let extra = format!("rules.directory = \"{}\"", rules.path().display());
    let a = instance(&redis, &fake, &users, "a", &extra).await;
    let b = instance(&redis, &fake, &users, "b", &extra).await;
    let (mut ca, _) = connect_from("127.0.0.31", mx(&a)).await;
    let (mut cb, _) = connect_from("127.0.0.31", mx(&b)).await;
    ca.expect("EHLO client.example", 250).await;
    cb.expect("EHLO client.example", 250).await;
    let mut codes = Vec::new();
    for i in 0..12 {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        let (code, _) = c.cmd("MAIL FROM:<s@example.org>").await;
        codes.push(code);
        if code == 250 {
            c.expect("RCPT TO:<x@example.test>", 250).await;
            c.expect("DATA", 354).await;
            c.expect("Subject: t\r\n\r\nhi\r\n.", 250).await;
        }
    }
    assert!(codes[..10].iter().all(|c| *c == 250), "{codes:?}");
    assert!(codes[10..].iter().all(|c| (400..500).contains(c)), "{codes:?}");
    assert_eq!(fake.wait_for(10).await.len(), 10);
    a.stop().await;
    b.stop().await;
}

/// Greylisted on A, retried through B after the delay: passes at once (B sees A's first attempt). The
/// shipped example's delay is one minute; here it is one second, the rest as shipped.
#[tokio::test]
async fn greylisting_retried_through_the_other_instance_passes() {
    if !require_redis() {
        return;
    }
    let redis = Redis::start();
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let greylist = shipped("rules/examples/greylist.toml").replace("delay = \"1m\"", "delay = \"1s\"");
    assert!(greylist.contains("delay = \"1s\""));
    let rules = rules_dir(&[("greylist.toml", greylist)]);
    let extra = format!("rules.directory = \"{}\"", rules.path().display());
    let a = instance(&redis, &fake, &users, "a", &extra).await;
    let b = instance(&redis, &fake, &users, "b", &extra).await;
    let (mut ca, _) = connect_from("127.0.0.32", mx(&a)).await;
    ca.expect("EHLO client.example", 250).await;
    ca.expect("MAIL FROM:<s@example.org>", 250).await;
    let (code, text) = ca.cmd("RCPT TO:<x@example.test>").await;
    assert_eq!(code, 451, "{text}");
    // Past the delay, the first and only attempt through B passes: a B with its own state would see a
    // new triplet and defer it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut cb, _) = connect_from("127.0.0.32", mx(&b)).await;
    cb.expect("EHLO client.example", 250).await;
    cb.expect("MAIL FROM:<s@example.org>", 250).await;
    cb.expect("RCPT TO:<x@example.test>", 250).await;
    a.stop().await;
    b.stop().await;
}

/// `config/examples/fleet/`: both instance configs load and differ only where they must, their rules load,
/// and HAProxy accepts its config.
#[tokio::test]
async fn the_shipped_fleet_example_parses() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("config/examples/fleet");
    let a = moat::config::Config::load(&dir.join("moat-a.toml")).unwrap();
    let b = moat::config::Config::load(&dir.join("moat-b.toml")).unwrap();
    for (c, id, port) in [(&a, "a", 2625), (&b, "b", 2626)] {
        assert_eq!(c.state.backend, moat::config::StateBackend::Redis);
        assert_eq!(c.state.url, "redis://127.0.0.1:6390/0");
        assert_eq!(c.state.instance_id, id);
        assert_eq!(c.listeners[0].address.port(), port);
        assert_eq!(c.listeners[0].proxy_protocol, moat::config::proxy::ProxyProtocol::V2);
        assert_eq!(c.upstream.address.port(), 10025);
    }
    let rules = moat::rules::Rules::load(&root.join(&a.rules.directory), &a.relay.local_domains).unwrap();
    assert_eq!(rules.snapshot().limits.len(), 1);
    if common::postfix::require_peer("haproxy") {
        let out =
            std::process::Command::new("haproxy").arg("-c").arg("-f").arg(dir.join("haproxy.cfg")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Round trips to Redis, counted on the wire: per connection (the fleet-wide per-client lease, taken and
/// given back) and per message with the shipped fleet example's rate limit. Printed for docs/fleet.md.
#[tokio::test]
async fn redis_round_trips_per_connection_and_message() {
    if !require_redis() {
        return;
    }
    let redis = Redis::start();
    let relay = common::redis::CountingRelay::start(redis.addr()).await;
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let limit = shipped("config/examples/fleet/rules/10-rate-limits.toml").replace("10/1m", "1000/1m");
    let rules = rules_dir(&[("rate-limits.toml", limit)]);
    let extra = format!("rules.directory = \"{}\"\nstate.url = \"redis://{}/0\"", rules.path().display(), relay.addr);
    let a = instance(&redis, &fake, &users, "a", &extra).await;
    let mut con = redis.client();
    let session = |messages: usize| {
        let addr = mx(&a);
        async move {
            let (mut c, code) = connect_from("127.0.0.33", addr).await;
            assert_eq!(code, 220);
            c.expect("EHLO client.example", 250).await;
            for _ in 0..messages {
                c.expect("MAIL FROM:<s@example.org>", 250).await;
                c.expect("RCPT TO:<x@example.test>", 250).await;
                c.expect("DATA", 354).await;
                c.expect("Subject: t\r\n\r\nhi\r\n.", 250).await;
            }
            c.expect("QUIT", 221).await;
        }
    };
    async fn released(con: &mut redis::Connection) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = redis::cmd("EXISTS").arg("moat:conn:127.0.0.33").query(con).unwrap();
            if n == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "the connection lease was never released");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Warm up: the scripts are loaded once (EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA).
    session(1).await;
    released(&mut con).await;
    relay.take();
    session(1).await;
    released(&mut con).await;
    let one = relay.take();
    session(11).await;
    released(&mut con).await;
    let eleven = relay.take();
    let per_message = (eleven.len() - one.len()) as f64 / 10.0;
    let per_connection = one.len() as f64 - per_message;
    println!(
        "redis round trips: {per_connection} per connection, {per_message} per message (example rate limit); \
         1 message: {one:?}; 11 messages: {} commands",
        eleven.len()
    );
    assert!(one.iter().all(|c| c == "EVALSHA"), "{one:?}");
    assert_eq!(per_connection, 2.0, "lease taken and given back");
    assert_eq!(per_message, 1.0, "one counter per message");
    a.stop().await;
}

/// AUTH failures split over A and B lock the client (threshold 4: two on each). With Redis down, AUTH
/// fails closed (`454 4.7.0`): see `redis_killed_mid_run_follows_the_configured_choices_and_recovers`.
#[tokio::test]
async fn auth_failures_split_over_the_fleet_lock_the_client() {
    if !require_redis() {
        return;
    }
    let redis = Redis::start();
    let fake = FakeUpstream::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let extra = "auth.lockout_threshold = 4";
    let a = instance(&redis, &fake, &users, "a", extra).await;
    let b = instance(&redis, &fake, &users, "b", extra).await;
    let wrong = format!("AUTH PLAIN {}", plain("alice", "wrong"));
    for (i, inst) in [&a, &b, &a, &b].into_iter().enumerate() {
        let (mut c, _) = connect_from("127.0.0.41", mx(inst)).await;
        c.expect("EHLO client.example", 250).await;
        let (code, text) = c.cmd(&wrong).await;
        assert_eq!(code, 535, "failure {}: {text}", i + 1);
    }
    // Each instance saw two failures; together four: the client is locked on both.
    for inst in [&a, &b] {
        let (mut c, _) = connect_from("127.0.0.41", mx(inst)).await;
        c.expect("EHLO client.example", 250).await;
        let (code, text) = c.cmd(&format!("AUTH PLAIN {}", plain("alice", "alicepw"))).await;
        assert_eq!(code, 454, "{text}");
    }
    // Another client is not affected.
    let (mut c, _) = connect_from("127.0.0.42", mx(&b)).await;
    c.expect("EHLO client.example", 250).await;
    c.expect(&format!("AUTH PLAIN {}", plain("carol", &format!("carolpw{}", carol_code()))), 235).await;
    a.stop().await;
    b.stop().await;
}
