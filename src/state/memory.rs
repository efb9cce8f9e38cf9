//! The in-process [`Store`]: sharded maps with a lifetime on every entry and a cap on their number.
//!
//! Each shard is a `std::sync::Mutex<HashMap>` held only for one map operation (never across an
//! `.await`). A shard that reaches its share of `max_entries` first drops its expired entries; if it is
//! still full it evicts an arbitrary entry (as Redis' `allkeys-random`), so a flood of new keys costs the
//! flooder's oldest state, never memory. Why not `governor`: it keeps one rate per keyed limiter with no
//! way to express leases, counters and values behind the same interface as Redis, and its keyed store
//! has no entry cap of its own; the GCRA step here is ten lines and shared with the Redis script.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{gcra, Clock, Rate, RateDecision, Store, StoreError, StoreFuture};

/// Shards: enough that 2–16 cores rarely wait on one another.
const SHARDS: usize = 16;
/// Sweeps of a full shard look at most this many entries before evicting one (keeps a sweep cheap).
const SWEEP_BUDGET: usize = 4096;

#[derive(Debug)]
enum Value {
    Tat(u64),
    Count(i64),
    Bytes(Vec<u8>),
    /// Lease holders and when each lease expires.
    Leases(Vec<(String, u64)>),
}

#[derive(Debug)]
struct Entry {
    value: Value,
    /// Milliseconds since the epoch.
    expires: u64,
}

type Shard = Mutex<HashMap<String, Entry>>;

/// The in-memory store.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Vec<Shard>,
    hasher: RandomState,
    per_shard: usize,
    clock: Arc<dyn Clock>,
    len: AtomicUsize,
}

impl MemoryStore {
    /// A store of at most `max_entries` keys (at least one per shard).
    pub fn new(max_entries: usize, clock: Arc<dyn Clock>) -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard: (max_entries / SHARDS).max(1),
            clock,
            len: AtomicUsize::new(0),
        }
    }

    /// Keys held now (expired ones included until they are swept).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Runs `f` on the live entry of `key` (expired entries are gone), with room made for a new one.
    fn with<T>(&self, key: &str, f: impl FnOnce(&mut Option<Entry>, u64) -> T) -> T {
        let now = self.clock.now_ms();
        let mut map = self.shard(key).lock().unwrap_or_else(PoisonError::into_inner);
        let mut slot = map.remove(key).filter(|e| e.expires > now);
        let existed = slot.is_some();
        let before = map.len() + usize::from(existed);
        let out = f(&mut slot, now);
        if let Some(e) = slot {
            if !existed && map.len() >= self.per_shard {
                self.make_room(&mut map, now);
            }
            map.insert(key.to_string(), e);
        }
        let after = map.len();
        drop(map);
        if after >= before {
            self.len.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.len.fetch_sub(before - after, Ordering::Relaxed);
        }
        out
    }

    fn make_room(&self, map: &mut HashMap<String, Entry>, now: u64) {
        let expired: Vec<String> =
            map.iter().take(SWEEP_BUDGET).filter(|(_, e)| e.expires <= now).map(|(k, _)| k.clone()).collect();
        for k in &expired {
            map.remove(k);
        }
        if map.len() >= self.per_shard {
            if let Some(k) = map.keys().next().cloned() {
                map.remove(&k);
            }
        }
    }
}

fn ready<'a, T: Send + 'a>(v: Result<T, StoreError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(v))
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    fn rate<'a>(&'a self, key: &'a str, rate: Rate, cost: u32) -> StoreFuture<'a, RateDecision> {
        ready(self.with(key, |slot, now| {
            let tat = match slot.as_ref().map(|e| &e.value) {
                Some(Value::Tat(t)) => Some(*t),
                None => None,
                Some(_) => return Err(StoreError::WrongKind(key.to_string())),
            };
            let (d, new_tat) = gcra(tat, now, rate, cost);
            if d.allowed {
                *slot = Some(Entry { value: Value::Tat(new_tat), expires: new_tat.max(now + 1) });
            }
            Ok(d)
        }))
    }

    fn acquire<'a>(&'a self, key: &'a str, holder: &'a str, max: u32, ttl: Duration) -> StoreFuture<'a, bool> {
        ready(self.with(key, |slot, now| {
            let entry = slot.get_or_insert_with(|| Entry { value: Value::Leases(Vec::new()), expires: now });
            let Value::Leases(leases) = &mut entry.value else {
                return Err(StoreError::WrongKind(key.to_string()));
            };
            leases.retain(|(_, exp)| *exp > now);
            let until = now.saturating_add(ms(ttl));
            let ok = if let Some(l) = leases.iter_mut().find(|(h, _)| h == holder) {
                l.1 = until;
                true
            } else if leases.len() < max as usize {
                leases.push((holder.to_string(), until));
                true
            } else {
                false
            };
            entry.expires = leases.iter().map(|(_, e)| *e).max().unwrap_or(now);
            if leases.is_empty() {
                *slot = None;
            }
            Ok(ok)
        }))
    }

    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> StoreFuture<'a, ()> {
        ready(self.with(key, |slot, _| {
            if let Some(Entry { value: Value::Leases(leases), .. }) = slot.as_mut() {
                leases.retain(|(h, _)| h != holder);
                if leases.is_empty() {
                    *slot = None;
                }
            }
            Ok(())
        }))
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64, ttl: Duration) -> StoreFuture<'a, i64> {
        ready(self.with(key, |slot, now| {
            let entry =
                slot.get_or_insert_with(|| Entry { value: Value::Count(0), expires: now.saturating_add(ms(ttl)) });
            match &mut entry.value {
                Value::Count(c) => {
                    *c = c.saturating_add(by);
                    Ok(*c)
                }
                _ => Err(StoreError::WrongKind(key.to_string())),
            }
        }))
    }

    fn insert_new<'a>(&'a self, key: &'a str, value: &'a [u8], ttl: Duration) -> StoreFuture<'a, bool> {
        ready(self.with(key, |slot, now| {
            if slot.is_some() {
                return Ok(false);
            }
            *slot = Some(Entry { value: Value::Bytes(value.to_vec()), expires: now.saturating_add(ms(ttl)) });
            Ok(true)
        }))
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        ready(self.with(key, |slot, _| match slot.as_ref().map(|e| &e.value) {
            None => Ok(None),
            Some(Value::Bytes(b)) => Ok(Some(b.clone())),
            Some(Value::Count(c)) => Ok(Some(c.to_string().into_bytes())),
            Some(_) => Err(StoreError::WrongKind(key.to_string())),
        }))
    }

    fn set<'a>(&'a self, key: &'a str, value: &'a [u8], ttl: Duration) -> StoreFuture<'a, ()> {
        ready(self.with(key, |slot, now| {
            *slot = Some(Entry { value: Value::Bytes(value.to_vec()), expires: now.saturating_add(ms(ttl)) });
            Ok(())
        }))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        ready(self.with(key, |slot, _| {
            *slot = None;
            Ok(())
        }))
    }

    fn entries(&self) -> Option<usize> {
        Some(self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::ManualClock;
    use super::*;

    fn store(max: usize) -> (MemoryStore, Arc<ManualClock>) {
        let clock = ManualClock::at(1_000_000);
        (MemoryStore::new(max, clock.clone()), clock)
    }

    #[tokio::test]
    async fn rates_leases_counters_and_values() {
        let (s, clock) = store(1000);
        let rate = Rate { count: 2, per: Duration::from_secs(10), burst: 2 };
        assert!(s.rate("r", rate, 1).await.unwrap().allowed);
        assert!(s.rate("r", rate, 1).await.unwrap().allowed);
        let d = s.rate("r", rate, 1).await.unwrap();
        assert!(!d.allowed && d.retry_after == Duration::from_secs(5));
        clock.advance(Duration::from_secs(5));
        assert!(s.rate("r", rate, 1).await.unwrap().allowed);

        let ttl = Duration::from_secs(30);
        assert!(s.acquire("c", "a", 2, ttl).await.unwrap());
        assert!(s.acquire("c", "b", 2, ttl).await.unwrap());
        assert!(!s.acquire("c", "x", 2, ttl).await.unwrap());
        assert!(s.acquire("c", "a", 2, ttl).await.unwrap(), "a holder renews its own lease");
        s.release("c", "a").await.unwrap();
        assert!(s.acquire("c", "x", 2, ttl).await.unwrap());
        // Leases of a holder that never comes back expire.
        clock.advance(Duration::from_secs(31));
        assert!(s.acquire("c", "y", 1, ttl).await.unwrap());

        assert_eq!(s.incr("n", 1, Duration::from_secs(10)).await.unwrap(), 1);
        assert_eq!(s.incr("n", 2, Duration::from_secs(10)).await.unwrap(), 3);
        clock.advance(Duration::from_secs(10));
        assert_eq!(s.incr("n", 1, Duration::from_secs(10)).await.unwrap(), 1, "a fixed window restarts");

        assert!(s.insert_new("v", b"1", ttl).await.unwrap());
        assert!(!s.insert_new("v", b"2", ttl).await.unwrap());
        assert_eq!(s.get("v").await.unwrap().as_deref(), Some(&b"1"[..]));
        s.set("v", b"3", ttl).await.unwrap();
        assert_eq!(s.get("v").await.unwrap().as_deref(), Some(&b"3"[..]));
        s.delete("v").await.unwrap();
        assert_eq!(s.get("v").await.unwrap(), None);
        s.rate("r2", rate, 1).await.unwrap();
        assert!(matches!(s.incr("r2", 1, ttl).await, Err(StoreError::WrongKind(_))));
    }

    #[tokio::test]
    async fn a_flood_of_keys_stays_within_the_cap() {
        let (s, _clock) = store(1_600);
        let rate = Rate { count: 1, per: Duration::from_secs(3600), burst: 1 };
        for i in 0..100_000u32 {
            s.rate(&format!("ip:{i}"), rate, 1).await.unwrap();
        }
        assert!(s.len() <= 1_600, "{}", s.len());
        assert!(s.len() >= 1_500, "{}", s.len());
    }
}
