//! Brute-force protection: failed AUTH attempts counted per client IP and per login name in a sliding
//! window. Past the threshold the key is locked for a while, and every failure is answered after a delay
//! that grows with the failures in the window. In memory and bounded: past [`MAX_ENTRIES`] keys the oldest
//! is evicted.
//!
//! A success clears the failures of the name it authenticated, never those of the IP: an address that
//! tries many names stays counted even if it guesses one right.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::client_key::ClientKey;

/// Most keys (IPs plus names) tracked at once.
pub const MAX_ENTRIES: usize = 65_536;
/// The growing delay never exceeds this.
pub const MAX_DELAY: Duration = Duration::from_secs(8);

/// What is counted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A client (IPv6 per prefix, [`ClientKey`]).
    Client(ClientKey),
    Name(String),
}

#[derive(Debug, Default)]
struct Entry {
    /// Failure times inside the window, oldest first (at most `threshold` kept).
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
    last: Option<Instant>,
}

/// Lockout settings.
#[derive(Clone, Copy, Debug)]
pub struct LockoutSettings {
    /// Failures within `window` that lock a key.
    pub threshold: u32,
    pub window: Duration,
    /// How long a lock lasts.
    pub duration: Duration,
    /// Delay before answering the first failure; doubles with each failure in the window.
    pub failure_delay: Duration,
}

/// The shared failure counters.
#[derive(Debug)]
pub struct Lockout {
    settings: LockoutSettings,
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<Key, Entry>,
    /// Insertion order, for eviction; may hold keys already removed.
    order: VecDeque<Key>,
}

/// Whether an attempt may go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Allowed,
    /// Locked until then.
    Locked(Instant),
}

// === impl Lockout ===

impl Lockout {
    pub fn new(settings: LockoutSettings) -> Lockout {
        Lockout { settings, inner: Mutex::new(Table::default()) }
    }

    /// Whether the client IP (and, when known, the name) may attempt now.
    pub fn check(&self, client: ClientKey, name: Option<&str>, now: Instant) -> Check {
        let t = self.lock();
        let mut keys = vec![Key::Client(client)];
        if let Some(n) = name {
            keys.push(Key::Name(normalize(n)));
        }
        let until =
            keys.iter().filter_map(|k| t.entries.get(k).and_then(|e| e.locked_until)).filter(|u| *u > now).max();
        until.map_or(Check::Allowed, Check::Locked)
    }

    /// Records a failure; returns how long to wait before answering and whether a key just got locked.
    pub fn failure(&self, client: ClientKey, name: Option<&str>, now: Instant) -> (Duration, bool) {
        let s = self.settings;
        let mut t = self.lock();
        let mut worst = 0usize;
        let mut locked = false;
        let mut keys = vec![Key::Client(client)];
        if let Some(n) = name {
            keys.push(Key::Name(normalize(n)));
        }
        for key in keys {
            let e = t.entry(key, now);
            while e.failures.front().is_some_and(|f| now.duration_since(*f) >= s.window) {
                e.failures.pop_front();
            }
            e.failures.push_back(now);
            while e.failures.len() > s.threshold.max(1) as usize {
                e.failures.pop_front();
            }
            e.last = Some(now);
            worst = worst.max(e.failures.len());
            if e.failures.len() >= s.threshold as usize && e.locked_until.is_none_or(|u| u <= now) {
                e.locked_until = Some(now + s.duration);
                e.failures.clear();
                locked = true;
            }
        }
        let exp = u32::try_from(worst.saturating_sub(1)).unwrap_or(u32::MAX).min(16);
        let delay = s.failure_delay.saturating_mul(1 << exp).min(MAX_DELAY);
        (delay, locked)
    }

    /// Records a success for `name`: clears that name's failures (not the IP's).
    pub fn success(&self, name: &str) {
        let mut t = self.lock();
        t.entries.remove(&Key::Name(normalize(name)));
    }

    /// Keys tracked now (for tests).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Plain counters: a panic while holding the lock cannot leave them inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Table {
    fn entry(&mut self, key: Key, now: Instant) -> &mut Entry {
        if !self.entries.contains_key(&key) {
            // Oldest first, but a lock still in force goes to the back once: a flood of new names or
            // addresses must not wipe out the locks it is meant to run into. After one full turn the
            // oldest goes whatever it is, so the table stays bounded. (Entries are created by verified
            // failures, so a flood of them is itself slowed by argon2.)
            let mut spared = self.order.len();
            while self.entries.len() >= MAX_ENTRIES {
                let Some(old) = self.order.pop_front() else { break };
                let locked = self.entries.get(&old).and_then(|e| e.locked_until).is_some_and(|u| u > now);
                if locked && spared > 0 {
                    spared -= 1;
                    self.order.push_back(old);
                    continue;
                }
                self.entries.remove(&old);
            }
            // Bound the order queue too: it may hold keys removed by `success`.
            if self.order.len() >= 2 * MAX_ENTRIES {
                let entries = &self.entries;
                self.order.retain(|k| entries.contains_key(k));
            }
            self.order.push_back(key.clone());
        }
        let e = self.entries.entry(key).or_default();
        e.last.get_or_insert(now);
        e
    }
}

fn normalize(name: &str) -> String {
    name.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lockout() -> Lockout {
        Lockout::new(LockoutSettings {
            threshold: 3,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(300),
            failure_delay: Duration::from_millis(100),
        })
    }

    fn k(s: &str) -> ClientKey {
        ClientKey::of(s.parse().unwrap())
    }

    fn ip() -> ClientKey {
        k("192.0.2.1")
    }

    #[test]
    fn locks_after_threshold_and_expires() {
        let l = lockout();
        let t0 = Instant::now();
        assert_eq!(l.failure(ip(), Some("alice"), t0), (Duration::from_millis(100), false));
        assert_eq!(l.failure(ip(), Some("alice"), t0), (Duration::from_millis(200), false));
        assert_eq!(l.check(ip(), Some("alice"), t0), Check::Allowed);
        let (_, locked) = l.failure(ip(), Some("alice"), t0);
        assert!(locked);
        assert!(matches!(l.check(ip(), None, t0), Check::Locked(_)));
        assert!(matches!(l.check(k("192.0.2.9"), Some("ALICE"), t0), Check::Locked(_)));
        let later = t0 + Duration::from_secs(301);
        assert_eq!(l.check(ip(), Some("alice"), later), Check::Allowed);
    }

    #[test]
    fn window_slides() {
        let l = lockout();
        let t0 = Instant::now();
        l.failure(ip(), Some("a"), t0);
        l.failure(ip(), Some("b"), t0);
        let (_, locked) = l.failure(ip(), Some("c"), t0 + Duration::from_secs(61));
        assert!(!locked, "the first two fell out of the window");
    }

    #[test]
    fn success_keeps_the_ip_count() {
        let l = lockout();
        let t0 = Instant::now();
        l.failure(ip(), Some("a"), t0);
        l.failure(ip(), Some("b"), t0);
        l.success("c");
        let (_, locked) = l.failure(ip(), Some("d"), t0);
        assert!(locked, "a success for another name did not reset the IP");
    }

    #[test]
    fn one_name_from_many_ips() {
        let l = lockout();
        let t0 = Instant::now();
        for i in 1..=3u8 {
            l.failure(k(&format!("127.0.0.{i}")), Some("bob"), t0);
        }
        assert!(matches!(l.check(k("127.0.0.9"), Some("bob"), t0), Check::Locked(_)));
        assert_eq!(l.check(k("127.0.0.9"), Some("carol"), t0), Check::Allowed);
    }

    #[test]
    fn delay_is_capped_and_table_bounded() {
        let l = Lockout::new(LockoutSettings {
            threshold: 1000,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(1),
            failure_delay: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..50 {
            last = l.failure(ip(), None, t0).0;
        }
        assert_eq!(last, MAX_DELAY);
        for i in 0..(MAX_ENTRIES + 10) {
            l.failure(ip(), Some(&format!("user{i}")), t0);
        }
        assert!(l.len() <= MAX_ENTRIES);
    }

    #[test]
    fn a_flood_of_new_keys_does_not_evict_a_lock_in_force() {
        let l = lockout();
        let t0 = Instant::now();
        for _ in 0..3 {
            l.failure(ip(), Some("victim"), t0);
        }
        assert!(matches!(l.check(ip(), Some("victim"), t0), Check::Locked(_)));
        // Fill the table with single failures of other addresses (no name), past its bound.
        for i in 0..(MAX_ENTRIES as u32 + 10) {
            let v6 = std::net::Ipv6Addr::from((0x2001_0db8_u128 << 96) | (u128::from(i) << 64));
            l.failure(ClientKey::of(v6.into()), None, t0);
        }
        assert!(l.len() <= MAX_ENTRIES);
        assert!(matches!(l.check(ip(), None, t0), Check::Locked(_)), "the locked address survived the flood");
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let l = lockout();
        let t0 = Instant::now();
        for host in 1..=3u16 {
            l.failure(k(&format!("2001:db8:1:2::{host:x}")), None, t0);
        }
        assert!(matches!(l.check(k("2001:db8:1:2::ffff"), None, t0), Check::Locked(_)));
        assert_eq!(l.check(k("2001:db8:1:3::1"), None, t0), Check::Allowed, "another /64");
    }
}
