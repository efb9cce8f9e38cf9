//! A concurrency lease held for as long as a connection lives: taken in the [`Store`](super::Store),
//! renewed every third of its ttl by a small task, given back when dropped. If the instance dies, nobody
//! renews it and it expires with its ttl, so the fleet's count recovers by itself.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::{SharedStore, StoreError};

/// A held lease; dropping it stops the renewals and releases it.
#[derive(Debug)]
pub struct Lease {
    store: SharedStore,
    key: String,
    holder: String,
    renewal: JoinHandle<()>,
}

impl Lease {
    /// Takes one of `max` leases on `key` for `holder`; `Ok(None)` when all are taken.
    pub async fn take(
        store: SharedStore,
        key: String,
        holder: String,
        max: u32,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        if !store.acquire(&key, &holder, max, ttl).await? {
            return Ok(None);
        }
        let renewal = tokio::spawn({
            let (store, key, holder) = (store.clone(), key.clone(), holder.clone());
            async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    // A failed renewal is counted by the store; the next one tries again. A connection
                    // already admitted is not cut because the fleet's count is unknown for a while.
                    let _ = store.acquire(&key, &holder, max, ttl).await;
                }
            }
        });
        Ok(Some(Lease { store, key, holder, renewal }))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        let (store, key, holder) =
            (self.store.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.holder));
        // Released off the dropping task (a drop cannot wait); without a runtime (process exit) the lease
        // simply expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.release(&key, &holder).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::memory::MemoryStore;
    use crate::state::{ManualClock, SystemClock};

    #[tokio::test]
    async fn a_lease_is_released_when_dropped() {
        let store: SharedStore = Arc::new(MemoryStore::new(1000, Arc::new(SystemClock)));
        let ttl = Duration::from_secs(30);
        let a = Lease::take(store.clone(), "k".into(), "a".into(), 1, ttl).await.unwrap();
        assert!(a.is_some());
        assert!(Lease::take(store.clone(), "k".into(), "b".into(), 1, ttl).await.unwrap().is_none());
        drop(a);
        // The release runs on its own task.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(Lease::take(store.clone(), "k".into(), "b".into(), 1, ttl).await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_lease_is_renewed() {
        let clock = ManualClock::at(1_000_000);
        let store: SharedStore = Arc::new(MemoryStore::new(1000, clock.clone()));
        let ttl = Duration::from_secs(30);
        let _a = Lease::take(store.clone(), "k".into(), "a".into(), 1, ttl).await.unwrap().unwrap();
        for _ in 0..4 {
            // Store time and timer time move together; each step passes a renewal.
            clock.advance(Duration::from_secs(11));
            tokio::time::sleep(Duration::from_secs(11)).await;
        }
        assert!(!store.acquire("k", "b", 1, ttl).await.unwrap(), "44s later the renewed lease still holds");
    }
}
