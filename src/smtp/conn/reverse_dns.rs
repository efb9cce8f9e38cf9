//! The client's reverse DNS name, forward-confirmed as Postfix does it (the PTR name counts only if it
//! resolves back to the client's address). Used for the Received header, XCLIENT NAME and `client_name` rules.
//!
//! The system resolver (`getnameinfo`, `getaddrinfo`) blocks, so a lookup runs on tokio's blocking pool, and
//! a blocking task cannot be cancelled: it keeps its thread after moat stopped waiting for it. During a DNS
//! outage a connection flood would otherwise pile up blocking threads without bound (and starve the spool
//! and rule reloads, which share that pool). So a semaphore caps the lookups in flight; the permit moves into
//! the blocking task and is given back only when the resolver returns. A connection that finds no free
//! permit, or whose lookup outlives the timeout, goes on at once without a name; both are counted in
//! `moat_reverse_dns_skipped_total`. One address has at most one lookup in flight, so a single client
//! whose PTR zone hangs cannot take every permit by reconnecting.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::client_key::{ClientKey, ClientKeys};
use crate::metrics::ReverseDnsSkip;

/// Bounded reverse lookups; one per server, shared by every listener.
#[derive(Clone, Debug)]
pub struct ReverseDns {
    /// How long a connection waits for its lookup before going on without a name.
    timeout: Duration,
    /// One permit per lookup running on the blocking pool (`server.max_reverse_dns_lookups`).
    lookups: Arc<Semaphore>,
    /// How addresses map to clients (IPv6 per prefix).
    keys: ClientKeys,
    /// Clients with a lookup in flight (at most one each).
    in_flight: Arc<Mutex<HashSet<ClientKey>>>,
}

/// An address's claim on its one lookup; released when the lookup (or the attempt) ends.
struct Claim {
    set: Arc<Mutex<HashSet<ClientKey>>>,
    key: ClientKey,
}

impl Claim {
    fn take(set: &Arc<Mutex<HashSet<ClientKey>>>, key: ClientKey) -> Option<Claim> {
        let fresh = set.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        fresh.then(|| Claim { set: Arc::clone(set), key })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

impl ReverseDns {
    /// At most `max_lookups` resolver calls at once, each awaited for at most `timeout`.
    pub fn new(timeout: Duration, max_lookups: usize, keys: ClientKeys) -> ReverseDns {
        ReverseDns { timeout, lookups: Arc::new(Semaphore::new(max_lookups)), keys, in_flight: Arc::default() }
    }

    /// The client's forward-confirmed name: `Ok(None)` when it has none (or the lookup failed), `Err(())`
    /// when the lookup was skipped (no free permit) or timed out, which is temporary.
    pub async fn name(&self, ip: IpAddr) -> Result<Option<String>, ()> {
        self.name_with(ip, confirmed_name).await
    }

    /// [`ReverseDns::name`] with the resolver call given, for tests.
    async fn name_with(&self, ip: IpAddr, resolve: fn(IpAddr) -> Option<String>) -> Result<Option<String>, ()> {
        let Some(claim) = Claim::take(&self.in_flight, self.keys.key(ip)) else {
            crate::metrics::reverse_dns_skipped(ReverseDnsSkip::Busy);
            return Err(());
        };
        self.bounded(move || {
            // Held, like the permit, until the resolver returns.
            let _claim = claim;
            resolve(ip)
        })
        .await
    }

    /// Runs `lookup` on the blocking pool if a permit is free, waiting for it at most the timeout.
    async fn bounded<F>(&self, lookup: F) -> Result<Option<String>, ()>
    where
        F: FnOnce() -> Option<String> + Send + 'static,
    {
        let Ok(permit) = self.lookups.clone().try_acquire_owned() else {
            crate::metrics::reverse_dns_skipped(ReverseDnsSkip::Busy);
            return Err(());
        };
        let task = tokio::task::spawn_blocking(move || {
            // Held until the resolver returns, however long after the connection stopped waiting.
            let _permit = permit;
            lookup()
        });
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(name)) => Ok(name),
            Ok(Err(_)) => Ok(None), // the lookup panicked: no name
            Err(_) => {
                crate::metrics::reverse_dns_skipped(ReverseDnsSkip::Timeout);
                Err(())
            }
        }
    }
}

/// PTR lookup, then the name's addresses must include `ip`. Blocking: only ever called through
/// [`ReverseDns::bounded`].
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

    /// A lookup that blocks its thread until the test lets it go, like a resolver during a DNS outage.
    fn stuck_lookup(
        started: Arc<AtomicUsize>,
        release: Arc<std::sync::Mutex<mpsc::Receiver<()>>>,
    ) -> impl FnOnce() -> Option<String> + Send + 'static {
        move || {
            started.fetch_add(1, Ordering::SeqCst);
            let _ = release.lock().unwrap().recv();
            Some("late.example".into())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dns_outage_occupies_at_most_the_permitted_threads() {
        let rdns = ReverseDns::new(Duration::from_millis(20), 2, ClientKeys::default());
        let started = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        // A flood of ten connections while every lookup hangs: each goes on at once, its name temporarily
        // unavailable (timed out or skipped), which the upstream hears as NAME=[TEMPUNAVAIL].
        for _ in 0..10 {
            assert_eq!(rdns.bounded(stuck_lookup(started.clone(), rx.clone())).await, Err(()));
        }
        // Only two lookups ever reached the resolver; the other eight were skipped without waiting.
        for _ in 0..500 {
            if started.load(Ordering::SeqCst) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert_eq!(rdns.lookups.available_permits(), 0, "the stuck lookups still hold their permits");
        // DNS comes back: the stuck lookups return, their permits are free again, a new lookup runs.
        for _ in 0..2 {
            tx.send(()).unwrap();
        }
        for _ in 0..500 {
            if rdns.lookups.available_permits() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rdns.lookups.available_permits(), 2);
        let rdns = ReverseDns { timeout: Duration::from_secs(30), ..rdns };
        assert_eq!(rdns.bounded(|| Some("mail.example".into())).await, Ok(Some("mail.example".into())));
        assert_eq!(rdns.bounded(|| None).await, Ok(None), "no name: a permanent answer");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_address_has_at_most_one_lookup_in_flight() {
        static RELEASE: std::sync::Mutex<Option<mpsc::Receiver<()>>> = std::sync::Mutex::new(None);
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        fn hanging(_: IpAddr) -> Option<String> {
            STARTED.fetch_add(1, Ordering::SeqCst);
            let rx = RELEASE.lock().unwrap().take();
            if let Some(rx) = rx {
                let _ = rx.recv();
            }
            None
        }
        let (tx, rx) = mpsc::channel();
        *RELEASE.lock().unwrap() = Some(rx);
        let rdns = ReverseDns::new(Duration::from_millis(20), 8, ClientKeys::default());
        let ip: IpAddr = "192.0.2.66".parse().unwrap();
        // The first lookup hangs (timed out for its connection); the address's reconnections are skipped
        // without taking more permits, while another address still gets its lookup.
        assert_eq!(rdns.name_with(ip, hanging).await, Err(()));
        for _ in 0..5 {
            assert_eq!(rdns.name_with(ip, hanging).await, Err(()));
        }
        assert_eq!(STARTED.load(Ordering::SeqCst), 1);
        assert_eq!(rdns.lookups.available_permits(), 7);
        assert_eq!(
            rdns.name_with("192.0.2.67".parse().unwrap(), |_| Some("ok.example".into())).await,
            Ok(Some("ok.example".into()))
        );
        // The resolver returns: the address may look up again.
        tx.send(()).unwrap();
        for _ in 0..500 {
            if rdns.in_flight.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rdns.name_with(ip, |_| Some("back.example".into())).await, Ok(Some("back.example".into())));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_ipv6_64_has_at_most_one_lookup_in_flight() {
        static RELEASE: std::sync::Mutex<Option<mpsc::Receiver<()>>> = std::sync::Mutex::new(None);
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        fn hanging(_: IpAddr) -> Option<String> {
            STARTED.fetch_add(1, Ordering::SeqCst);
            let rx = RELEASE.lock().unwrap().take();
            if let Some(rx) = rx {
                let _ = rx.recv();
            }
            None
        }
        let (tx, rx) = mpsc::channel();
        *RELEASE.lock().unwrap() = Some(rx);
        let rdns = ReverseDns::new(Duration::from_millis(20), 8, ClientKeys::default());
        // Many addresses of one /64, one after the other while the first lookup hangs: one client key, one
        // lookup, one permit.
        for host in 1..=6u16 {
            let from: IpAddr = format!("2001:db8:1:2::{host:x}").parse().unwrap();
            assert_eq!(rdns.name_with(from, hanging).await, Err(()));
        }
        assert_eq!(STARTED.load(Ordering::SeqCst), 1);
        assert_eq!(rdns.lookups.available_permits(), 7);
        tx.send(()).unwrap();
    }
}
