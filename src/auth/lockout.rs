//! Brute-force protection, in two parts that answer differently:
//!
//! - **The client** (its [`ClientKey`]: the IPv4 address, or the IPv6 prefix) is locked hard once it
//!   collects `threshold` failures in the window, whatever names it tried. A locked client is refused with
//!   `454`/`421` before anything is verified; that says nothing about any name.
//! - **A login name** counts only failures from clients that never authenticated as it ([`known`]). Past
//!   `threshold` of those in the window, the name is throttled for such clients: their attempts are verified
//!   against the dummy hash (whatever the password) and answered as a wrong password. Known good clients
//!   are not affected, so a stranger who knows a login name cannot lock its owner out, while a distributed
//!   guesser gets at most `threshold` guesses per name per lock. Names are counted the same way whether the
//!   user exists or not, so the throttle, its reply and its delay tell nothing about which names exist.
//!
//! Every failure is answered after a delay that grows with the failures in the window (of the client, and
//! for unknown clients of the name too). In memory and bounded: past [`MAX_ENTRIES`] keys the oldest is
//! evicted, and [`known`] has its own bounds.
//!
//! [`known`]: super::known

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::known::KnownClients;
use crate::client_key::ClientKey;

/// Most keys (clients plus names) tracked at once.
pub const MAX_ENTRIES: usize = 65_536;
/// The growing delay never exceeds this.
pub const MAX_DELAY: Duration = Duration::from_secs(8);

/// What is counted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A client (IPv6 per prefix, [`ClientKey`]).
    Client(ClientKey),
    /// A login name, lower-cased: failures from clients not known for it.
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
    /// Failures within `window` that lock a client, or throttle a name for unknown clients.
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
    /// Clients that authenticated as a name lately.
    known: KnownClients,
}

/// Whether a client may attempt at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Allowed,
    /// Locked until then.
    Locked(Instant),
}

/// What a counted failure means for its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// How long to wait before answering.
    pub delay: Duration,
    /// This failure locked the client, or throttled the name.
    pub locked: bool,
}

// === impl Lockout ===

impl Lockout {
    pub fn new(settings: LockoutSettings) -> Lockout {
        Lockout { settings, inner: Mutex::new(Table::default()) }
    }

    /// Whether `client` may attempt now (a locked client gets `454`, nothing is verified).
    pub fn check(&self, client: ClientKey, now: Instant) -> Check {
        let t = self.lock();
        match t.entries.get(&Key::Client(client)).and_then(|e| e.locked_until) {
            Some(until) if until > now => Check::Locked(until),
            _ => Check::Allowed,
        }
    }

    /// Whether attempts for `name` from `client` are throttled: the name is locked for unknown clients and
    /// `client` did not authenticate as it lately. A throttled attempt is verified against the dummy hash
    /// and answered exactly as a wrong password for an unknown name.
    pub fn name_throttled(&self, client: ClientKey, name: &str, now: Instant) -> bool {
        let name = normalize(name);
        let t = self.lock();
        let locked = t.entries.get(&Key::Name(name.clone())).and_then(|e| e.locked_until).is_some_and(|u| u > now);
        locked && !t.known.is_known(&name, client, now)
    }

    /// Records a failure of `client` (for `name`, when one was given).
    pub fn failure(&self, client: ClientKey, name: Option<&str>, now: Instant) -> Failure {
        let s = self.settings;
        let mut t = self.lock();
        let mut keys = vec![Key::Client(client)];
        if let Some(n) = name.map(normalize) {
            // A known good client's typo does not count against the name: only the client is counted.
            if !t.known.is_known(&n, client, now) {
                keys.push(Key::Name(n));
            }
        }
        let (mut worst, mut locked) = (0usize, false);
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
            // Failures stay counted through the lock: further ones keep the delay at its height, and one
            // more within the window after the lock ends locks again.
            if e.failures.len() >= s.threshold as usize && e.locked_until.is_none_or(|u| u <= now) {
                e.locked_until = Some(now + s.duration);
                locked = true;
            }
        }
        let exp = u32::try_from(worst.saturating_sub(1)).unwrap_or(u32::MAX).min(16);
        Failure { delay: s.failure_delay.saturating_mul(1 << exp).min(MAX_DELAY), locked }
    }

    /// Records a success of `client` as `name`: the client becomes known good for the name. The failures of
    /// the client and of the name stay counted (a guesser that also holds one account is still counted).
    pub fn success(&self, client: ClientKey, name: &str, now: Instant) {
        self.lock().known.remember(&normalize(name), client, now);
    }

    /// Whether `client` authenticated as `name` lately (its failures then do not count against the name).
    pub fn is_known(&self, client: ClientKey, name: &str, now: Instant) -> bool {
        self.lock().known.is_known(&normalize(name), client, now)
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

    fn fail(l: &Lockout, client: ClientKey, name: Option<&str>, at: Instant) -> (Duration, bool) {
        let f = l.failure(client, name, at);
        (f.delay, f.locked)
    }

    #[test]
    fn a_client_locks_after_threshold_and_expires() {
        let l = lockout();
        let t0 = Instant::now();
        assert_eq!(fail(&l, ip(), Some("a"), t0), (Duration::from_millis(100), false));
        assert_eq!(fail(&l, ip(), Some("b"), t0), (Duration::from_millis(200), false));
        assert_eq!(l.check(ip(), t0), Check::Allowed);
        assert!(fail(&l, ip(), Some("c"), t0).1);
        assert!(matches!(l.check(ip(), t0), Check::Locked(_)));
        assert_eq!(l.check(k("192.0.2.9"), t0), Check::Allowed, "another client");
        assert_eq!(l.check(ip(), t0 + Duration::from_secs(301)), Check::Allowed);
    }

    #[test]
    fn window_slides() {
        let l = lockout();
        let t0 = Instant::now();
        fail(&l, ip(), Some("a"), t0);
        fail(&l, ip(), Some("b"), t0);
        assert!(!fail(&l, ip(), Some("c"), t0 + Duration::from_secs(61)).1, "the first two fell out of the window");
    }

    #[test]
    fn success_keeps_the_client_count() {
        let l = lockout();
        let t0 = Instant::now();
        fail(&l, ip(), Some("a"), t0);
        fail(&l, ip(), Some("b"), t0);
        l.success(ip(), "c", t0);
        assert!(fail(&l, ip(), Some("d"), t0).1, "a success for another name did not reset the client");
    }

    #[test]
    fn a_name_is_throttled_for_unknown_clients_only() {
        let l = lockout();
        let t0 = Instant::now();
        l.success(k("127.0.0.2"), "Bob", t0);
        for i in 3..=5u8 {
            fail(&l, k(&format!("127.0.0.{i}")), Some("bob"), t0);
        }
        assert!(l.name_throttled(k("127.0.0.9"), "BOB", t0), "a distributed guesser is stopped");
        assert!(!l.name_throttled(k("127.0.0.2"), "bob", t0), "the known good client is not");
        assert!(!l.name_throttled(k("127.0.0.9"), "carol", t0), "other names are not");
        assert_eq!(l.check(k("127.0.0.9"), t0), Check::Allowed, "no client reached its own threshold");
        assert!(!l.name_throttled(k("127.0.0.9"), "bob", t0 + Duration::from_secs(301)), "the throttle expires");
    }

    #[test]
    fn a_known_clients_typos_do_not_count_against_the_name() {
        let l = lockout();
        let t0 = Instant::now();
        l.success(ip(), "bob", t0);
        for _ in 0..5 {
            fail(&l, ip(), Some("bob"), t0);
        }
        assert!(matches!(l.check(ip(), t0), Check::Locked(_)), "the client itself is still counted");
        assert!(!l.name_throttled(k("127.0.0.9"), "bob", t0));
    }

    #[test]
    fn a_throttled_name_and_an_unknown_name_get_the_same_delays() {
        // "alice" exists (someone authenticated as her), "nobody" does not: the counters and so the
        // delays and the throttle do not depend on that.
        let l = lockout();
        let t0 = Instant::now();
        l.success(k("10.0.0.1"), "alice", t0);
        for i in 1..=6u8 {
            let a = fail(&l, k(&format!("127.0.1.{i}")), Some("alice"), t0);
            let b = fail(&l, k(&format!("127.0.2.{i}")), Some("nobody"), t0);
            assert_eq!(a, b, "attempt {i}");
            let (ta, tb) = (k(&format!("127.0.3.{i}")), k(&format!("127.0.4.{i}")));
            assert_eq!(l.name_throttled(ta, "alice", t0), l.name_throttled(tb, "nobody", t0), "attempt {i}");
        }
        assert!(l.name_throttled(k("127.0.9.9"), "nobody", t0));
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
            last = fail(&l, ip(), None, t0).0;
        }
        assert_eq!(last, MAX_DELAY);
        for i in 0..(MAX_ENTRIES + 10) {
            fail(&l, ip(), Some(&format!("user{i}")), t0);
        }
        assert!(l.len() <= MAX_ENTRIES);
    }

    #[test]
    fn a_flood_of_new_keys_does_not_evict_a_lock_in_force() {
        let l = lockout();
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&l, ip(), Some("victim"), t0);
        }
        assert!(matches!(l.check(ip(), t0), Check::Locked(_)));
        // Fill the table with single failures of other addresses (no name), past its bound.
        for i in 0..(MAX_ENTRIES as u32 + 10) {
            let v6 = std::net::Ipv6Addr::from((0x2001_0db8_u128 << 96) | (u128::from(i) << 64));
            fail(&l, ClientKey::of(v6.into()), None, t0);
        }
        assert!(l.len() <= MAX_ENTRIES);
        assert!(matches!(l.check(ip(), t0), Check::Locked(_)), "the locked address survived the flood");
        assert!(l.name_throttled(k("127.0.0.1"), "victim", t0), "so did the name's");
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let l = lockout();
        let t0 = Instant::now();
        for host in 1..=3u16 {
            fail(&l, k(&format!("2001:db8:1:2::{host:x}")), None, t0);
        }
        assert!(matches!(l.check(k("2001:db8:1:2::ffff"), t0), Check::Locked(_)));
        assert_eq!(l.check(k("2001:db8:1:3::1"), t0), Check::Allowed, "another /64");
    }
}
