//! The AUTH lockout counters of a fleet, in the shared state store: failures of a client (and, from
//! clients not known for it, of a login name) counted across every instance, and the locks they leave.
//! The instance's own [`super::lockout::Lockout`] keeps deciding the answer (its growing delay, the names'
//! known clients); this adds what the other instances saw, so failures split over A and B lock the client.
//!
//! Failures are counted in a fixed window (`incr` with the window as its lifetime: one round trip); once a
//! count reaches the threshold the client (or name) is locked for the lock duration (a value with that
//! lifetime; one more round trip, only then). A check is one round trip per key. A store that fails makes
//! the attempt fail closed (`454 4.7.0`) unless `state.on_error.auth_lockout = "open"`.

use std::time::Duration;

use tracing::debug;

use crate::config::state::Failure;
use crate::state::{SharedStore, StoreError};

/// The shared counters.
#[derive(Debug)]
pub struct SharedLockout {
    store: SharedStore,
    threshold: u32,
    window: Duration,
    duration: Duration,
    failure_delay: Duration,
    on_error: Failure,
}

/// The store failed and the lockout fails closed: answer `454 4.7.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// What one failure counted across the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counted {
    /// The client's failures in the current window, fleet-wide.
    pub client: i64,
    /// This failure locked the client or the name.
    pub locked: bool,
    /// The delay before answering, from the fleet-wide count (as the instance's own lockout computes it).
    pub delay: Duration,
}

impl SharedLockout {
    /// From `[auth]` (threshold, window, lock duration, failure delay) and the store's failure choice.
    pub fn new(store: SharedStore, auth: &crate::config::AuthConfig, on_error: Failure) -> Self {
        SharedLockout {
            store,
            threshold: auth.lockout_threshold,
            window: auth.lockout_window.get(),
            duration: auth.lockout_duration.get(),
            failure_delay: auth.failure_delay.get(),
            on_error,
        }
    }

    fn or_open<T>(&self, r: Result<T, StoreError>, open: T) -> Result<T, Unavailable> {
        crate::state::or_open(r, self.on_error, open).map_err(|e| {
            debug!(error = %e, "shared AUTH lockout unavailable; attempt refused for now");
            Unavailable
        })
    }

    /// Whether `client` is locked anywhere in the fleet.
    pub async fn client_locked(&self, client: &str) -> Result<bool, Unavailable> {
        let r = self.store.get(&format!("auth:lc:{client}")).await.map(|v| v.is_some());
        self.or_open(r, false)
    }

    /// Whether `name` is locked for clients not known for it (the caller checks that).
    pub async fn name_locked(&self, name: &str) -> Result<bool, Unavailable> {
        let r = self.store.get(&format!("auth:ln:{}", name.to_lowercase())).await.map(|v| v.is_some());
        self.or_open(r, false)
    }

    /// Counts a failure of `client`, and of `name` when given (a name the client is not known for).
    pub async fn failure(&self, client: &str, name: Option<&str>) -> Result<Counted, Unavailable> {
        let mut out = Counted::default();
        let name = name.map(str::to_lowercase);
        let keys = std::iter::once(("c", client.to_string())).chain(name.map(|n| ("n", n)));
        for (kind, who) in keys {
            let r = self.store.incr(&format!("auth:{kind}:{who}"), 1, self.window).await;
            let n = self.or_open(r, 0)?;
            if kind == "c" {
                out.client = n;
                let exp = u32::try_from(n.saturating_sub(1)).unwrap_or(0).min(16);
                out.delay = self.failure_delay.saturating_mul(1 << exp).min(super::lockout::MAX_DELAY);
            }
            // Exactly at the threshold: the failure that reaches it locks, later ones find the lock.
            if n == i64::from(self.threshold.max(1)) {
                let r = self.store.set(&format!("auth:l{kind}:{who}"), b"1", self.duration).await;
                self.or_open(r, ())?;
                out.locked = true;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::memory::MemoryStore;
    use crate::state::ManualClock;

    #[tokio::test]
    async fn failures_lock_the_client_and_the_name_then_expire() {
        let clock = ManualClock::at(1_000_000);
        let store: SharedStore = Arc::new(MemoryStore::new(1000, clock.clone()));
        let auth: crate::config::AuthConfig = toml::from_str(
            "lockout_threshold = 3\nlockout_window = \"60s\"\nlockout_duration = \"300s\"\nfailure_delay = \"1s\"\n",
        )
        .unwrap();
        let l = SharedLockout::new(store, &auth, Failure::Closed);
        assert!(!l.client_locked("192.0.2.7").await.unwrap());
        let first = l.failure("192.0.2.7", Some("Alice")).await.unwrap();
        assert_eq!((first.client, first.locked, first.delay), (1, false, Duration::from_secs(1)));
        assert_eq!(l.failure("192.0.2.7", None).await.unwrap().client, 2);
        let third = l.failure("192.0.2.7", Some("alice")).await.unwrap();
        assert_eq!((third.client, third.locked, third.delay), (3, true, Duration::from_secs(4)));
        assert!(l.client_locked("192.0.2.7").await.unwrap());
        assert!(!l.name_locked("alice").await.unwrap(), "the name has two failures");
        assert!(l.failure("198.51.100.1", Some("ALICE")).await.unwrap().locked, "the third for the name");
        assert!(l.name_locked("Alice").await.unwrap());
        assert!(!l.client_locked("198.51.100.1").await.unwrap());
        clock.advance(Duration::from_secs(301));
        assert!(!l.client_locked("192.0.2.7").await.unwrap(), "the lock ends");
        assert_eq!(l.failure("192.0.2.7", None).await.unwrap().client, 1, "a new window");
    }
}
