//! Cross-connection state: rate counters, concurrency leases, counters, and small values with a lifetime.
//!
//! Everything that outlives one connection and must hold across a fleet of moat instances goes through
//! the [`Store`] trait: the rate limits, greylisting, account baselines and suspensions, AUTH lockouts and
//! the TOTP replay guard. [`memory::MemoryStore`] (the default) keeps it in this process, bounded; a Redis
//! store keeps the same semantics in Redis so that several instances share them. Every operation is one
//! atomic step on one key (in Redis: one round trip, a Lua script where it reads and writes), and every
//! key has a lifetime, so neither side grows without bound.
//!
//! Time comes from a [`Clock`] given to the store, so tests can move it ([`ManualClock`]); a fleet's
//! instances pass their own wall clocks (kept in step by NTP), which is what makes a rate the same
//! wherever a client lands.

pub mod ids;
pub mod lease;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A boxed store result (trait objects cannot have `async fn` yet).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a store operation gave no answer. Callers choose per feature whether that fails open or closed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer within its command timeout.
    #[error("state store timed out")]
    Timeout,
    /// The store cannot be reached or refused the command.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A key holds a value of another kind (a bug, or two features sharing a key prefix).
    #[error("state key {0:?} holds another kind of value")]
    WrongKind(String),
}

/// A rate: `count` events per `per`, of which up to `burst` may come at once.
///
/// Kept as GCRA (the generic cell rate algorithm, a token bucket stored as one timestamp): each event
/// moves the key's "theoretical arrival time" (TAT) forward by `per / count`; an event is allowed while
/// the TAT stays within `burst` intervals of now. One number per key makes it atomic in Redis with one
/// small script, and the same arithmetic runs in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
    /// Events allowed at once from rest (at least 1; usually `count`).
    pub burst: u32,
}

impl Rate {
    /// The time one event costs, in milliseconds (at least 1).
    pub fn interval_ms(&self) -> u64 {
        (self.per.as_millis() as u64 / u64::from(self.count.max(1))).max(1)
    }

    /// How far ahead of now the TAT may run: `burst` intervals.
    pub fn tolerance_ms(&self) -> u64 {
        self.interval_ms().saturating_mul(u64::from(self.burst.max(1)))
    }
}

/// The GCRA step, shared by every store: given the stored TAT (`None`: a fresh key), returns the
/// decision and the TAT to store (unchanged when refused). `cost` events are taken at once.
pub fn gcra(tat: Option<u64>, now_ms: u64, rate: Rate, cost: u32) -> (RateDecision, u64) {
    let tat = tat.unwrap_or(now_ms).max(now_ms);
    let new_tat = tat.saturating_add(rate.interval_ms().saturating_mul(u64::from(cost)));
    let allowed_until = now_ms.saturating_add(rate.tolerance_ms());
    if new_tat <= allowed_until {
        (RateDecision { allowed: true, retry_after: Duration::ZERO }, new_tat)
    } else {
        let wait = new_tat - allowed_until;
        (RateDecision { allowed: false, retry_after: Duration::from_millis(wait) }, tat)
    }
}

/// The answer of a rate check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// When refused: how long until the same event would be allowed.
    pub retry_after: Duration,
}

/// Where time comes from.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// A clock that tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock showing `ms` since the epoch.
    pub fn at(ms: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicU64::new(ms)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The shared state behind moat's cross-connection checks. Keys are plain strings chosen by the feature
/// (with its own prefix, e.g. `rl:<limit id>:<key>`); the store adds its own prefix where it needs one.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// `"memory"` or `"redis"` (logs, metrics).
    fn backend(&self) -> &'static str;

    /// The store's clock (the same one its lifetimes are measured with).
    fn clock(&self) -> &dyn Clock;

    /// Takes `cost` events from the rate of `key`; the key lives as long as its TAT is in the future.
    fn rate<'a>(&'a self, key: &'a str, rate: Rate, cost: u32) -> StoreFuture<'a, RateDecision>;

    /// Takes one of at most `max` concurrent leases on `key` for `holder` (unique per connection or
    /// transaction, across the fleet), valid for `ttl` unless renewed. `false`: all are taken. A holder
    /// that already holds a lease gets it renewed. Leases of an instance that died expire with their ttl.
    fn acquire<'a>(&'a self, key: &'a str, holder: &'a str, max: u32, ttl: Duration) -> StoreFuture<'a, bool>;

    /// Gives a lease back (nothing if `holder` has none).
    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> StoreFuture<'a, ()>;

    /// Adds `by` to the counter at `key` and returns the new value; a new key starts at 0 and lives for
    /// `ttl` from its creation (a fixed window).
    fn incr<'a>(&'a self, key: &'a str, by: i64, ttl: Duration) -> StoreFuture<'a, i64>;

    /// Stores `value` at `key` for `ttl` only if the key does not exist; `true` when it was stored.
    fn insert_new<'a>(&'a self, key: &'a str, value: &'a [u8], ttl: Duration) -> StoreFuture<'a, bool>;

    /// The value at `key`, if it exists and has not expired.
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>>;

    /// Stores `value` at `key` for `ttl`, replacing what was there.
    fn set<'a>(&'a self, key: &'a str, value: &'a [u8], ttl: Duration) -> StoreFuture<'a, ()>;

    /// Removes `key`.
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;

    /// Checks that the store answers (the readiness probe); the memory store always does.
    fn probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// How many keys the store holds, when it can tell cheaply (the `moat_state_entries` gauge); `None`
    /// for a store whose size is watched elsewhere (Redis' own `INFO keyspace`).
    fn entries(&self) -> Option<usize> {
        None
    }
}

/// A shared handle to the configured store.
pub type SharedStore = Arc<dyn Store>;

/// Opens the configured store. A Redis store connects lazily (and reconnects by itself), so this only
/// fails on settings Redis' client refuses; it must run inside a tokio runtime.
pub fn open(cfg: &crate::config::StateConfig) -> Result<SharedStore, redis::RedisSetupError> {
    Ok(match cfg.backend {
        crate::config::StateBackend::Memory => {
            Arc::new(memory::MemoryStore::new(cfg.max_entries, Arc::new(SystemClock)))
        }
        crate::config::StateBackend::Redis => Arc::new(redis::RedisStore::new(cfg, Arc::new(SystemClock))?),
    })
}

/// What a feature does with a store failure ([`crate::config::state::Failure`]): `Ok(v)` passes the
/// store's answer on; a failure becomes `Ok(open)` when the feature fails open, else the error.
pub fn or_open<T>(r: Result<T, StoreError>, choice: crate::config::state::Failure, open: T) -> Result<T, StoreError> {
    match (r, choice) {
        (Ok(v), _) => Ok(v),
        (Err(_), crate::config::state::Failure::Open) => Ok(open),
        (Err(e), crate::config::state::Failure::Closed) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_the_burst_then_one_per_interval() {
        let rate = Rate { count: 10, per: Duration::from_secs(60), burst: 10 };
        let mut tat = None;
        for i in 0..10 {
            let (d, t) = gcra(tat, 1_000, rate, 1);
            assert!(d.allowed, "event {i}");
            tat = Some(t);
        }
        let (d, t) = gcra(tat, 1_000, rate, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_secs(6));
        assert_eq!(Some(t), tat, "a refusal does not move the TAT");
        // Six seconds later one more is allowed, and only one.
        let (d, t) = gcra(tat, 7_000, rate, 1);
        assert!(d.allowed);
        assert!(!gcra(Some(t), 7_000, rate, 1).0.allowed);
        // A cost larger than the burst is never allowed.
        assert!(!gcra(None, 0, rate, 11).0.allowed);
    }
}
