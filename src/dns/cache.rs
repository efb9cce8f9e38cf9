//! A bounded cache of DNS answers, each kept until its TTL runs out, with hit and miss counters.
//!
//! One type serves moat's own blocklist lookups and, through [`mail_auth::ResolverCache`], the TXT, A,
//! AAAA, MX and PTR lookups of SPF, DKIM and DMARC. When full, expired entries go first, then arbitrary
//! ones: the cache never grows past its size.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::metrics::DnsCacheKind;

/// A TTL-respecting cache with at most `capacity` entries.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    map: Mutex<HashMap<K, (V, Instant)>>,
    capacity: usize,
    max_ttl: Duration,
    kind: DnsCacheKind,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    /// An empty cache.
    pub fn new(kind: DnsCacheKind, capacity: usize, max_ttl: Duration) -> TtlCache<K, V> {
        TtlCache { map: Mutex::new(HashMap::new()), capacity: capacity.max(1), max_ttl, kind }
    }

    /// The value for `key` if it is still valid at `now`.
    pub fn get_at<Q>(&self, key: &Q, now: Instant) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = match map.get(key) {
            Some((v, until)) if *until > now => Some(v.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        };
        drop(map);
        crate::metrics::dns_cache(self.kind, hit.is_some());
        hit
    }

    /// Stores `value` until `until` (at most `max_ttl` after `now`).
    pub fn insert_at(&self, key: K, value: V, until: Instant, now: Instant) {
        let until = until.min(now + self.max_ttl);
        if until <= now {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, (_, u)| *u > now);
            // Still full: drop about a sixteenth, whichever entries the map yields first.
            if map.len() >= self.capacity {
                let drop_n = (self.capacity / 16).max(1);
                let mut i = 0;
                map.retain(|_, _| {
                    i += 1;
                    i > drop_n
                });
            }
        }
        map.insert(key, (value, until));
    }

    /// Entries held now (expired ones included until they are looked at or evicted).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq, V: Clone> mail_auth::ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_at(name, Instant::now())
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).remove(name).map(|(v, _)| v)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        self.insert_at(key, value, valid_until, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_size_is_bounded() {
        let c: TtlCache<String, u32> = TtlCache::new(DnsCacheKind::Dnsbl, 32, Duration::from_secs(60));
        let t0 = Instant::now();
        c.insert_at("a".into(), 1, t0 + Duration::from_secs(10), t0);
        assert_eq!(c.get_at("a", t0 + Duration::from_secs(9)), Some(1));
        assert_eq!(c.get_at("a", t0 + Duration::from_secs(10)), None, "expired at its TTL");
        // The max TTL caps a long TTL.
        c.insert_at("b".into(), 2, t0 + Duration::from_secs(86400), t0);
        assert_eq!(c.get_at("b", t0 + Duration::from_secs(61)), None);
        // A zero TTL is not stored.
        c.insert_at("z".into(), 3, t0, t0);
        assert_eq!(c.get_at("z", t0), None);
        for i in 0..1000 {
            c.insert_at(format!("k{i}"), i, t0 + Duration::from_secs(30), t0);
            assert!(c.len() <= 32);
        }
        assert_eq!(c.get_at("k999", t0), Some(999), "the newest entry is kept");
    }
}
