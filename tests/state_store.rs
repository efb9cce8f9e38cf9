//! The state stores: one conformance suite run against the memory store and a real Redis (same
//! assertions, same manual clock), plus what only Redis has: key prefixes and lifetimes, two instances
//! sharing state, and Redis dying or hanging (a bounded wait, an error, recovery on its own).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::conformance;
use common::redis::{require_redis, Redis};
use moat::config::{StateBackend, StateConfig};
use moat::state::memory::MemoryStore;
use moat::state::redis::RedisStore;
use moat::state::{ManualClock, Rate, Store, StoreError};

fn redis_config(redis: &Redis, extra: &str) -> StateConfig {
    let text = format!("backend = \"redis\"\nurl = \"{}\"\n{extra}", redis.url());
    let c: StateConfig = toml::from_str(&text).unwrap();
    assert_eq!(c.backend, StateBackend::Redis);
    c
}

#[tokio::test]
async fn memory_store_conforms() {
    let clock = ManualClock::at(1_700_000_000_000);
    conformance::run(Arc::new(MemoryStore::new(100_000, clock.clone())), clock).await;
}

#[tokio::test]
async fn redis_store_conforms() {
    if !require_redis() {
        return;
    }
    let redis = Redis::start();
    let clock = ManualClock::at(1_700_000_000_000);
    let store = RedisStore::new(&redis_config(&redis, ""), clock.clone()).unwrap();
    conformance::run(Arc::new(store), clock).await;
}

#[tokio::test]
async fn redis_keys_carry_the_prefix_and_a_lifetime() {
    if !require_redis() {
        return;
    }
    let redis = Redis::start();
    let clock = ManualClock::at(1_700_000_000_000);
    let store = RedisStore::new(&redis_config(&redis, "key_prefix = \"fleet7:\""), clock).unwrap();
    let ttl = Duration::from_secs(600);
    store.rate("r", Rate { count: 1, per: Duration::from_secs(60), burst: 1 }, 1).await.unwrap();
    store.acquire("l", "h", 3, ttl).await.unwrap();
    store.incr("c", 1, ttl).await.unwrap();
    store.insert_new("i", b"x", ttl).await.unwrap();
    store.set("s", b"x", ttl).await.unwrap();
    let mut con = redis.client();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    keys.sort();
    assert_eq!(keys, ["fleet7:c", "fleet7:i", "fleet7:l", "fleet7:r", "fleet7:s"]);
    for k in &keys {
        let pttl: i64 = redis::cmd("PTTL").arg(k).query(&mut con).unwrap();
        assert!(pttl > 0 && pttl <= 600_000, "{k}: pttl {pttl}");
    }
    // The stored formats (scripts/bench-redis-memory.sh writes the same to measure memory per key).
    let raw = |k: &str| -> String { redis::cmd("GET").arg(k).query::<String>(&mut redis.client()).unwrap() };
    assert!(raw("fleet7:r").starts_with("t:1700000060000:1700000060000"), "{}", raw("fleet7:r"));
    assert_eq!(raw("fleet7:c"), "c:1700000600000:1");
    assert_eq!(raw("fleet7:i"), "v:1700000600000:x");
    let t: String = redis::cmd("TYPE").arg("fleet7:l").query(&mut con).unwrap();
    assert_eq!(t, "zset");
}

#[tokio::test]
async fn two_instances_share_one_redis() {
    if !require_redis() {
        return;
    }
    let redis = Redis::start();
    let clock = ManualClock::at(1_700_000_000_000);
    let a = RedisStore::new(&redis_config(&redis, ""), clock.clone()).unwrap();
    let b = RedisStore::new(&redis_config(&redis, ""), clock.clone()).unwrap();
    let rate = Rate { count: 10, per: Duration::from_secs(60), burst: 10 };
    for i in 0..10 {
        let s = if i % 2 == 0 { &a } else { &b };
        assert!(s.rate("ip:192.0.2.7", rate, 1).await.unwrap().allowed);
    }
    assert!(!a.rate("ip:192.0.2.7", rate, 1).await.unwrap().allowed);
    assert!(!b.rate("ip:192.0.2.7", rate, 1).await.unwrap().allowed);
    assert!(a.insert_new("totp:alice:1", b"", Duration::from_secs(90)).await.unwrap());
    assert!(!b.insert_new("totp:alice:1", b"", Duration::from_secs(90)).await.unwrap());
}

/// Redis killed: every call fails within the command timeout (never hangs), and the store reconnects by
/// itself once Redis is back. Frozen (accepts, never answers): the same bound.
#[tokio::test]
async fn redis_down_or_frozen_fails_fast_and_recovers() {
    if !require_redis() {
        return;
    }
    let mut redis = Redis::start();
    let cfg = redis_config(&redis, "command_timeout = \"200ms\"");
    let store = RedisStore::new(&cfg, Arc::new(moat::state::SystemClock)).unwrap();
    let ttl = Duration::from_secs(60);
    assert_eq!(store.incr("n", 1, ttl).await.unwrap(), 1);
    store.probe().await.unwrap();

    // A bound for one failing call: the timeout plus scheduling slack on a loaded machine.
    let bound = Duration::from_millis(200) + Duration::from_secs(2);
    redis.kill();
    for _ in 0..5 {
        let t = Instant::now();
        let r = store.incr("n", 1, ttl).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_) | StoreError::Timeout)), "{r:?}");
        assert!(t.elapsed() < bound, "took {:?}", t.elapsed());
    }
    assert!(store.probe().await.is_err());

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.incr("n", 1, ttl).await {
            Ok(n) => {
                assert_eq!(n, 1, "a restarted Redis without persistence starts empty");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no reconnect within 15 s: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    redis.freeze(true);
    let t = Instant::now();
    let r = store.get("n").await;
    assert!(matches!(r, Err(StoreError::Timeout | StoreError::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < bound, "frozen Redis: took {:?}", t.elapsed());
    redis.freeze(false);
    let deadline = Instant::now() + Duration::from_secs(15);
    while store.get("n").await.is_err() {
        assert!(Instant::now() < deadline, "no recovery after the freeze");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `rediss://` with the test CA: the store talks TLS to a real `redis-server --tls-port`.
#[tokio::test]
async fn redis_over_tls() {
    if !require_redis() {
        return;
    }
    let fixture = |f: &str| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(f);
    let redis = Redis::start_tls(&fixture("server.pem"), &fixture("server.key"));
    let text = format!(
        "backend = \"redis\"\nurl = \"redis://127.0.0.1:{}/0\"\ntls = true\ntls_ca_file = \"{}\"\n",
        redis.port,
        fixture("ca.pem").display()
    );
    let cfg: StateConfig = toml::from_str(&text).unwrap();
    let store = RedisStore::new(&cfg, Arc::new(moat::state::SystemClock)).unwrap();
    assert_eq!(store.incr("n", 2, Duration::from_secs(60)).await.unwrap(), 2);
    store.probe().await.unwrap();
    // Without the CA the server is not trusted.
    let untrusted: StateConfig = toml::from_str(&text.replace("tls_ca_file", "key_prefix")).unwrap();
    let store = RedisStore::new(&untrusted, Arc::new(moat::state::SystemClock)).unwrap();
    assert!(store.incr("n", 1, Duration::from_secs(60)).await.is_err());
}
