//! The client's reverse DNS name, forward-confirmed as Postfix does it (the PTR name counts only if it
//! resolves back to the client's address). Used for the Received header, XCLIENT NAME and `client_name` rules.
//!
//! The system resolver (`getnameinfo`, `getaddrinfo`) blocks, so a lookup runs on tokio's blocking pool, and
//! a blocking task cannot be cancelled: it keeps its thread after moat stopped waiting for it. During a DNS
//! outage a connection flood would otherwise pile up blocking threads without bound (and starve the spool
//! and rule reloads, which share that pool). So a semaphore caps the lookups in flight; the permit moves into
//! the blocking task and is given back only when the resolver returns.
//!
//! Parallel connections from one address share one lookup: a connection that finds a lookup in flight for
//! its address waits for that lookup's answer (within its own timeout) instead of starting another, and a
//! finished lookup is cached briefly ([`POSITIVE_TTL`], [`NEGATIVE_TTL`], at most [`MAX_CACHED`]
//! addresses), so a big sender's parallel connections all reach the upstream with their name. One client
//! key (an IPv6 prefix: many addresses) has at most one lookup in flight, so a client whose PTR zone hangs
//! cannot take every permit by reconnecting from new addresses. A connection that finds no free permit, or
//! another address of its client key being looked up, or whose wait outlives the timeout, goes on at once
//! without a name; each is counted in `moat_reverse_dns_skipped_total`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::client_key::{ClientKey, ClientKeys};
use crate::metrics::ReverseDnsSkip;

/// How long a found name is reused: parallel and quickly repeated connections of one sender, not a DNS
/// cache (the system resolver or a local one does that).
pub const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// How long "no name" is reused; shorter, so a fixed PTR record shows soon.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Addresses cached at once (about 100 bytes each).
pub const MAX_CACHED: usize = 4096;

/// The outcome of a lookup as its sharers see it: `None` until it is known.
type Outcome = Option<Option<String>>;

/// Bounded reverse lookups; one per server, shared by every listener.
#[derive(Clone, Debug)]
pub struct ReverseDns {
    /// How long a connection waits for its lookup before going on without a name.
    timeout: Duration,
    /// One permit per lookup running on the blocking pool (`server.max_reverse_dns_lookups`).
    lookups: Arc<Semaphore>,
    /// How addresses map to clients (IPv6 per prefix).
    keys: ClientKeys,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Lookups in flight, by address: each connection from that address waits on the same answer.
    in_flight: HashMap<IpAddr, watch::Receiver<Outcome>>,
    /// Client keys with a lookup in flight (at most one each).
    keys: HashSet<ClientKey>,
    /// Finished lookups: when, and the name (or none).
    cache: HashMap<IpAddr, (Instant, Option<String>)>,
    /// Cache insertions, oldest first, for expiry and eviction; may name entries already replaced.
    order: VecDeque<(IpAddr, Instant)>,
}

/// A lookup's registration; when dropped (the resolver returned, or panicked) it leaves the in-flight
/// tables, caches the answer and tells every waiting connection.
struct Flight {
    state: Arc<Mutex<State>>,
    ip: IpAddr,
    key: ClientKey,
    tx: watch::Sender<Outcome>,
    name: Option<String>,
}

impl Flight {
    /// The resolver answered: publish it (in `drop`).
    fn land(mut self, name: Option<String>) {
        self.name = name;
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        let name = self.name.take();
        {
            let mut st = lock(&self.state);
            st.in_flight.remove(&self.ip);
            st.keys.remove(&self.key);
            st.insert(self.ip, name.clone(), Instant::now());
        }
        self.tx.send_replace(Some(name));
    }
}

/// What a connection does for its name.
enum Plan {
    Cached(Option<String>),
    Wait(watch::Receiver<Outcome>),
    Skip,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Maps of plain values: a panic while holding the lock cannot leave them inconsistent.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl State ===

impl State {
    fn cached(&self, ip: IpAddr, now: Instant) -> Option<Option<String>> {
        let (at, name) = self.cache.get(&ip)?;
        let ttl = if name.is_some() { POSITIVE_TTL } else { NEGATIVE_TTL };
        (now.saturating_duration_since(*at) < ttl).then(|| name.clone())
    }

    fn insert(&mut self, ip: IpAddr, name: Option<String>, now: Instant) {
        // Expired entries go first (the longest TTL bounds every entry's life), then the oldest past the cap.
        while let Some(&(old, at)) = self.order.front() {
            let expired = now.saturating_duration_since(at) >= POSITIVE_TTL;
            if !expired && self.cache.len() < MAX_CACHED && self.order.len() < 2 * MAX_CACHED {
                break;
            }
            self.order.pop_front();
            if self.cache.get(&old).is_some_and(|(t, _)| *t == at) {
                self.cache.remove(&old);
            }
        }
        self.cache.insert(ip, (now, name));
        self.order.push_back((ip, now));
    }
}

// === impl ReverseDns ===

impl ReverseDns {
    /// At most `max_lookups` resolver calls at once, each awaited for at most `timeout`; at most one in
    /// flight per client key of `keys`.
    pub fn new(timeout: Duration, max_lookups: usize, keys: ClientKeys) -> ReverseDns {
        ReverseDns { timeout, lookups: Arc::new(Semaphore::new(max_lookups)), keys, state: Arc::default() }
    }

    /// The client's forward-confirmed name: `Ok(None)` when it has none (or the lookup failed), `Err(())`
    /// when the lookup was skipped (busy) or timed out, which is temporary.
    pub async fn name(&self, ip: IpAddr) -> Result<Option<String>, ()> {
        self.name_with(ip, confirmed_name).await
    }

    /// [`ReverseDns::name`] with the resolver call given, for tests.
    async fn name_with(&self, ip: IpAddr, resolve: fn(IpAddr) -> Option<String>) -> Result<Option<String>, ()> {
        let rx = match self.plan(ip, resolve) {
            Plan::Cached(name) => return Ok(name),
            Plan::Wait(rx) => rx,
            Plan::Skip => {
                crate::metrics::reverse_dns_skipped(ReverseDnsSkip::Busy);
                return Err(());
            }
        };
        self.wait(rx).await
    }

    /// Under the lock: the cached answer, or the lookup in flight to wait on (started here if none is and
    /// a permit is free), or skip.
    fn plan(&self, ip: IpAddr, resolve: fn(IpAddr) -> Option<String>) -> Plan {
        let key = self.keys.key(ip);
        let mut st = lock(&self.state);
        if let Some(name) = st.cached(ip, Instant::now()) {
            return Plan::Cached(name);
        }
        if let Some(rx) = st.in_flight.get(&ip) {
            return Plan::Wait(rx.clone());
        }
        if st.keys.contains(&key) {
            return Plan::Skip; // another address of this client key is being looked up
        }
        let Ok(permit) = Arc::clone(&self.lookups).try_acquire_owned() else {
            return Plan::Skip;
        };
        let (tx, rx) = watch::channel(None);
        st.in_flight.insert(ip, rx.clone());
        st.keys.insert(key);
        drop(st);
        let flight = Flight { state: Arc::clone(&self.state), ip, key, tx, name: None };
        // The permit and the registration are held until the resolver returns, however long after every
        // connection stopped waiting for it.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            flight.land(resolve(ip));
        });
        Plan::Wait(rx)
    }

    /// Waits for a lookup's answer, at most the timeout.
    async fn wait(&self, mut rx: watch::Receiver<Outcome>) -> Result<Option<String>, ()> {
        match tokio::time::timeout(self.timeout, rx.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => Ok(outcome.clone().flatten()),
            // The sender always answers before it goes (`Flight::drop`); a lost one means no name.
            Ok(Err(_)) => Ok(None),
            Err(_) => {
                crate::metrics::reverse_dns_skipped(ReverseDnsSkip::Timeout);
                Err(())
            }
        }
    }
}

/// PTR lookup, then the name's addresses must include `ip`. Blocking: only ever called on the blocking pool
/// under a permit ([`ReverseDns::plan`]).
#[allow(clippy::disallowed_methods)] // the blocking resolver, on the blocking pool under a permit
fn confirmed_name(ip: IpAddr) -> Option<String> {
    let name = dns_lookup::lookup_addr(&ip).ok()?;
    if name.parse::<IpAddr>().is_ok() {
        return None; // a numeric "name" is no name
    }
    let addrs = dns_lookup::lookup_host(&name).ok()?;
    addrs.contains(&ip).then_some(name)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use super::*;

    /// A resolver that blocks its thread until the test lets it go, like one during a DNS outage. Each test
    /// has its own statics (tests run in parallel), so this is a macro.
    macro_rules! stuck_resolver {
        ($name:ident, $started:ident, $release:ident, $answer:expr) => {
            static $started: AtomicUsize = AtomicUsize::new(0);
            static $release: std::sync::Mutex<Option<mpsc::Receiver<()>>> = std::sync::Mutex::new(None);
            fn $name(_: IpAddr) -> Option<String> {
                $started.fetch_add(1, Ordering::SeqCst);
                // One receiver shared by every stuck lookup: each waits for one message in turn.
                loop {
                    let got = match $release.lock().unwrap().as_ref() {
                        Some(rx) => rx.try_recv(),
                        None => Err(mpsc::TryRecvError::Disconnected),
                    };
                    match got {
                        Ok(()) | Err(mpsc::TryRecvError::Disconnected) => break,
                        Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
                    }
                }
                $answer
            }
        };
    }

    async fn until(what: impl Fn() -> bool) {
        for _ in 0..1000 {
            if what() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("condition not reached");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dns_outage_occupies_at_most_the_permitted_threads() {
        stuck_resolver!(stuck, STARTED, RELEASE, Some("late.example".into()));
        let (tx, rx) = mpsc::channel();
        *RELEASE.lock().unwrap() = Some(rx);
        let rdns = ReverseDns::new(Duration::from_millis(20), 2, ClientKeys::default());
        // A flood of ten clients while every lookup hangs: each goes on at once, its name temporarily
        // unavailable (timed out or skipped), which the upstream hears as NAME=[TEMPUNAVAIL].
        for i in 1..=10 {
            assert_eq!(rdns.name_with(ip(&format!("192.0.2.{i}")), stuck).await, Err(()));
        }
        // Only two lookups ever reached the resolver; the other eight were skipped without waiting.
        until(|| STARTED.load(Ordering::SeqCst) == 2).await;
        assert_eq!(rdns.lookups.available_permits(), 0, "the stuck lookups still hold their permits");
        // DNS comes back: the stuck lookups return, their permits are free again, a new lookup runs.
        for _ in 0..2 {
            tx.send(()).unwrap();
        }
        until(|| rdns.lookups.available_permits() == 2).await;
        let rdns = ReverseDns { timeout: Duration::from_secs(30), ..rdns };
        assert_eq!(
            rdns.name_with(ip("192.0.2.50"), |_| Some("mail.example".into())).await,
            Ok(Some("mail.example".into()))
        );
        assert_eq!(rdns.name_with(ip("192.0.2.51"), |_| None).await, Ok(None), "no name: a permanent answer");
        // The late answers were cached for their addresses.
        assert_eq!(rdns.name_with(ip("192.0.2.1"), |_| None).await, Ok(Some("late.example".into())));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_address_has_at_most_one_lookup_in_flight() {
        stuck_resolver!(hanging, STARTED, RELEASE, None);
        let (tx, rx) = mpsc::channel();
        *RELEASE.lock().unwrap() = Some(rx);
        let rdns = ReverseDns::new(Duration::from_millis(20), 8, ClientKeys::default());
        let addr = ip("192.0.2.66");
        // The first lookup hangs (timed out for its connection); the address's reconnections wait for the
        // same lookup (and time out too) without taking more permits, while another address still gets
        // its lookup.
        assert_eq!(rdns.name_with(addr, hanging).await, Err(()));
        for _ in 0..5 {
            assert_eq!(rdns.name_with(addr, hanging).await, Err(()));
        }
        assert_eq!(STARTED.load(Ordering::SeqCst), 1);
        assert_eq!(rdns.lookups.available_permits(), 7);
        assert_eq!(
            rdns.name_with(ip("192.0.2.67"), |_| Some("ok.example".into())).await,
            Ok(Some("ok.example".into()))
        );
        // The resolver returns "no name": cached for a short while, then the address is looked up again.
        tx.send(()).unwrap();
        until(|| lock(&rdns.state).in_flight.is_empty()).await;
        assert_eq!(rdns.name_with(addr, |_| Some("back.example".into())).await, Ok(None), "negative cache");
        lock(&rdns.state).cache.clear();
        assert_eq!(rdns.name_with(addr, |_| Some("back.example".into())).await, Ok(Some("back.example".into())));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_ipv6_64_has_at_most_one_lookup_in_flight() {
        stuck_resolver!(hanging, STARTED, RELEASE, None);
        let (tx, rx) = mpsc::channel();
        *RELEASE.lock().unwrap() = Some(rx);
        let rdns = ReverseDns::new(Duration::from_millis(20), 8, ClientKeys::default());
        // Many addresses of one /64, one after the other while the first lookup hangs: one client key, one
        // lookup, one permit.
        for host in 1..=6u16 {
            assert_eq!(rdns.name_with(ip(&format!("2001:db8:1:2::{host:x}")), hanging).await, Err(()));
        }
        assert_eq!(STARTED.load(Ordering::SeqCst), 1);
        assert_eq!(rdns.lookups.available_permits(), 7);
        tx.send(()).unwrap();
    }

    #[test]
    fn the_cache_expires_and_is_bounded() {
        let mut st = State::default();
        let t0 = Instant::now();
        st.insert(ip("192.0.2.1"), Some("a.example".into()), t0);
        st.insert(ip("192.0.2.2"), None, t0);
        assert_eq!(st.cached(ip("192.0.2.1"), t0 + NEGATIVE_TTL), Some(Some("a.example".into())));
        assert_eq!(st.cached(ip("192.0.2.2"), t0 + NEGATIVE_TTL), None, "no name is kept for less long");
        assert_eq!(st.cached(ip("192.0.2.1"), t0 + POSITIVE_TTL), None);
        for i in 0..(MAX_CACHED as u32 + 100) {
            st.insert(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), None, t0);
        }
        assert!(st.cache.len() <= MAX_CACHED, "{}", st.cache.len());
        assert!(st.order.len() <= 2 * MAX_CACHED);
        // Re-inserting one address over and over does not grow the order queue without bound either.
        for _ in 0..(3 * MAX_CACHED) {
            st.insert(ip("192.0.2.9"), None, t0);
        }
        assert!(st.order.len() <= 2 * MAX_CACHED, "{}", st.order.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_connections_from_one_address_share_the_lookup() {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        #[allow(clippy::disallowed_methods)] // a slow resolver, on the blocking pool
        fn slow(_: IpAddr) -> Option<String> {
            STARTED.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            Some("mx.example".into())
        }
        let rdns = Arc::new(ReverseDns::new(Duration::from_secs(10), 4, ClientKeys::default()));
        let ip: IpAddr = "192.0.2.80".parse().unwrap();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let rdns = Arc::clone(&rdns);
            tasks.push(tokio::spawn(async move { rdns.name_with(ip, slow).await }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(Some("mx.example".into())));
        }
        assert_eq!(STARTED.load(Ordering::SeqCst), 1, "one lookup, shared");
        assert_eq!(rdns.lookups.available_permits(), 4);
        // Right after, a new connection gets the cached name without a lookup.
        assert_eq!(rdns.name_with(ip, slow).await, Ok(Some("mx.example".into())));
        assert_eq!(STARTED.load(Ordering::SeqCst), 1, "cached");
    }
}
