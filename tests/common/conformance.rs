//! One set of assertions run against every [`Store`]: the memory store and the Redis store must answer the
//! same, step for step, on the same [`ManualClock`].

use std::sync::Arc;
use std::time::Duration;

use moat::state::{ManualClock, Rate, Store, StoreError};

fn wrong<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    assert!(matches!(r, Err(StoreError::WrongKind(_))), "{what}: {r:?}");
}

/// Runs every check; `store` must use `clock`, and be empty.
pub async fn run(store: Arc<dyn Store>, clock: Arc<ManualClock>) {
    let s = store.as_ref();
    let sec = Duration::from_secs;

    // GCRA: the burst, then one per interval; a refusal says how long and does not move the TAT.
    let rate = Rate { count: 10, per: sec(60), burst: 10 };
    for i in 0..10 {
        assert!(s.rate("r", rate, 1).await.unwrap().allowed, "event {i}");
    }
    let d = s.rate("r", rate, 1).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after, sec(6));
    clock.advance(Duration::from_millis(5_999));
    let d = s.rate("r", rate, 1).await.unwrap();
    assert_eq!((d.allowed, d.retry_after), (false, Duration::from_millis(1)));
    clock.advance(Duration::from_millis(1));
    assert!(s.rate("r", rate, 1).await.unwrap().allowed);
    assert!(!s.rate("r", rate, 1).await.unwrap().allowed);
    assert!(!s.rate("r-cost", rate, 11).await.unwrap().allowed, "a cost above the burst");
    let d = s.rate("r-cost2", rate, 4).await.unwrap();
    assert!(d.allowed);
    let d = s.rate("r-cost2", rate, 7).await.unwrap();
    assert_eq!((d.allowed, d.retry_after), (false, sec(6)), "4 + 7 is one over the burst");
    // After a full idle period the bucket is full again.
    clock.advance(sec(60));
    for _ in 0..10 {
        assert!(s.rate("r", rate, 1).await.unwrap().allowed);
    }
    let burst1 = Rate { count: 2, per: sec(10), burst: 1 };
    assert!(s.rate("b1", burst1, 1).await.unwrap().allowed);
    assert_eq!(s.rate("b1", burst1, 1).await.unwrap().retry_after, sec(5));

    // Leases: at most max, renewals, release, expiry of an absent holder.
    let ttl = sec(30);
    assert!(s.acquire("c", "a", 2, ttl).await.unwrap());
    assert!(s.acquire("c", "b", 2, ttl).await.unwrap());
    assert!(!s.acquire("c", "x", 2, ttl).await.unwrap());
    clock.advance(sec(20));
    assert!(s.acquire("c", "a", 2, ttl).await.unwrap(), "a holder renews its own lease");
    clock.advance(sec(11));
    // b expired (31 s), a was renewed 11 s ago.
    assert!(s.acquire("c", "y", 2, ttl).await.unwrap(), "the lease nobody renewed expired");
    assert!(!s.acquire("c", "z", 2, ttl).await.unwrap());
    s.release("c", "a").await.unwrap();
    s.release("c", "nobody").await.unwrap();
    assert!(s.acquire("c", "z", 2, ttl).await.unwrap());
    assert!(!s.acquire("zero", "a", 0, ttl).await.unwrap(), "max 0");
    s.release("never-held", "a").await.unwrap();
    clock.advance(sec(31));
    assert!(s.acquire("c", "q", 1, ttl).await.unwrap(), "all expired");

    // Fixed-window counters.
    assert_eq!(s.incr("n", 1, sec(10)).await.unwrap(), 1);
    clock.advance(sec(9));
    assert_eq!(s.incr("n", 2, sec(10)).await.unwrap(), 3);
    assert_eq!(s.incr("n", -5, sec(10)).await.unwrap(), -2);
    assert_eq!(s.get("n").await.unwrap().as_deref(), Some(&b"-2"[..]), "a counter reads as its number");
    clock.advance(sec(1));
    assert_eq!(s.incr("n", 1, sec(10)).await.unwrap(), 1, "the window restarts");
    assert_eq!(s.incr("n0", 5, Duration::ZERO).await.unwrap(), 5);
    assert_eq!(s.incr("n0", 5, Duration::ZERO).await.unwrap(), 5, "a zero ttl never accumulates");

    // Values: insert-if-new, get, set, delete, lifetimes; binary safe.
    assert!(s.insert_new("v", b"1", ttl).await.unwrap());
    assert!(!s.insert_new("v", b"2", ttl).await.unwrap());
    assert_eq!(s.get("v").await.unwrap().as_deref(), Some(&b"1"[..]));
    s.set("v", b"3", ttl).await.unwrap();
    assert_eq!(s.get("v").await.unwrap().as_deref(), Some(&b"3"[..]));
    s.delete("v").await.unwrap();
    assert_eq!(s.get("v").await.unwrap(), None);
    s.delete("v").await.unwrap();
    let odd = b"a:b\0\xff\r\n:";
    s.set("bin", odd, ttl).await.unwrap();
    assert_eq!(s.get("bin").await.unwrap().as_deref(), Some(&odd[..]));
    assert!(s.insert_new("empty", b"", ttl).await.unwrap());
    assert_eq!(s.get("empty").await.unwrap().as_deref(), Some(&b""[..]));
    assert!(s.insert_new("short", b"x", sec(5)).await.unwrap());
    clock.advance(Duration::from_millis(4_999));
    assert!(s.get("short").await.unwrap().is_some());
    clock.advance(Duration::from_millis(1));
    assert_eq!(s.get("short").await.unwrap(), None, "expired at its ttl");
    assert!(s.insert_new("short", b"y", sec(5)).await.unwrap(), "an expired key is new again");
    s.set("gone", b"x", Duration::ZERO).await.unwrap();
    assert_eq!(s.get("gone").await.unwrap(), None);
    assert_eq!(s.get("missing").await.unwrap(), None);

    // Kinds do not mix; `set` replaces whatever was there; an expired key of any kind is free.
    s.rate("k-rate", rate, 1).await.unwrap();
    s.acquire("k-lease", "a", 1, ttl).await.unwrap();
    s.incr("k-count", 1, ttl).await.unwrap();
    s.set("k-value", b"x", ttl).await.unwrap();
    wrong(s.incr("k-rate", 1, ttl).await, "incr on a rate");
    wrong(s.get("k-rate").await, "get on a rate");
    wrong(s.acquire("k-rate", "a", 1, ttl).await, "acquire on a rate");
    wrong(s.rate("k-lease", rate, 1).await, "rate on leases");
    wrong(s.incr("k-lease", 1, ttl).await, "incr on leases");
    wrong(s.get("k-lease").await, "get on leases");
    wrong(s.rate("k-count", rate, 1).await, "rate on a counter");
    wrong(s.acquire("k-value", "a", 1, ttl).await, "acquire on a value");
    wrong(s.incr("k-value", 1, ttl).await, "incr on a value");
    assert!(!s.insert_new("k-lease", b"x", ttl).await.unwrap(), "insert_new on any live key");
    s.release("k-value", "a").await.unwrap();
    assert!(s.get("k-value").await.unwrap().is_some(), "release leaves other kinds alone");
    s.set("k-lease", b"v", ttl).await.unwrap();
    assert_eq!(s.get("k-lease").await.unwrap().as_deref(), Some(&b"v"[..]));
    clock.advance(sec(3600));
    assert_eq!(s.incr("k-rate", 1, ttl).await.unwrap(), 1, "the old rate expired");

    // Atomic under concurrency: exactly `max` leases and exactly `burst` events.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let st = store.clone();
        tasks.push(tokio::spawn(async move {
            let lease = st.acquire("race-lease", &format!("h{i}"), 7, sec(30)).await.unwrap();
            let rate = st.rate("race-rate", Rate { count: 5, per: sec(60), burst: 5 }, 1).await.unwrap();
            let fresh = st.insert_new("race-once", format!("{i}").as_bytes(), sec(30)).await.unwrap();
            let n = st.incr("race-count", 1, sec(30)).await.unwrap();
            (lease, rate.allowed, fresh, n)
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    assert_eq!(got.iter().filter(|g| g.0).count(), 7, "leases");
    assert_eq!(got.iter().filter(|g| g.1).count(), 5, "rate");
    assert_eq!(got.iter().filter(|g| g.2).count(), 1, "insert_new");
    let mut counts: Vec<i64> = got.iter().map(|g| g.3).collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=40).collect::<Vec<i64>>(), "every increment counted once");
}
