//! The cap on open upstream connections (`upstream.max_connections`). Every open connection, busy or idle
//! in the pool, holds a [`ConnectionSlot`]: each one is an smtpd process on the upstream, and Postfix's
//! process limit (100 by default) is what would run out first. A client that needs a new connection while
//! all slots are taken waits at most `upstream.connection_wait`, then gets `451 4.3.2`. While anyone waits,
//! connections given back are closed rather than pooled, so their slots go to the waiters; and each new
//! waiter wakes one session that holds a connection between transactions ([`ConnectionLimit::wanted`]),
//! which gives it back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::UpstreamError;

/// The slots, shared by every upstream connection of one pool.
#[derive(Debug)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
    /// How long a client waits for a slot.
    wait: Duration,
    /// Clients waiting for a slot now.
    waiters: AtomicUsize,
    /// One notification per client that starts waiting, for the sessions holding an idle connection.
    wanted: Notify,
}

/// One open upstream connection's slot; given back (and the gauge updated) when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    permit: Option<OwnedSemaphorePermit>,
    slots: Arc<Semaphore>,
    max: usize,
}

/// Counts a waiter for as long as it waits (also when the wait is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// === impl ConnectionLimit ===

impl ConnectionLimit {
    /// At most `max` open connections (at least 1); a client waits at most `wait` for one.
    pub fn new(max: usize, wait: Duration) -> ConnectionLimit {
        let max = max.max(1);
        let (waiters, wanted) = (AtomicUsize::new(0), Notify::new());
        ConnectionLimit { slots: Arc::new(Semaphore::new(max)), max, wait, waiters, wanted }
    }

    /// A slot, at once if one is free, else after waiting at most the configured wait; `before_wait` runs
    /// once the caller counts as a waiter and may return a connection that appeared meanwhile (the pool's
    /// idle list), which ends the wait. `Err(UpstreamError::Busy)` when the wait ran out.
    pub async fn acquire<T>(&self, before_wait: impl FnOnce() -> Option<T>) -> Result<Acquired<T>, UpstreamError> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(Acquired::Slot(self.slot(p)));
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiters);
        // Counted as a waiter first: a connection given back from now on is closed, not pooled, so one
        // pooled just before is found here and nothing sits idle while this waits.
        if let Some(found) = before_wait() {
            return Ok(Acquired::Found(found));
        }
        self.wanted.notify_one();
        match tokio::time::timeout(self.wait, Arc::clone(&self.slots).acquire_owned()).await {
            Ok(Ok(p)) => Ok(Acquired::Slot(self.slot(p))),
            // The semaphore is never closed; treat it like a wait that ran out.
            Ok(Err(_)) | Err(_) => {
                crate::metrics::upstream_connection_wait_timeout();
                Err(UpstreamError::Busy(self.wait))
            }
        }
    }

    /// Completes when a client starts waiting for a slot: one waiter wakes one caller (or the next one to
    /// call, if nobody is listening). Cancel-safe.
    pub async fn wanted(&self) {
        self.wanted.notified().await;
    }

    /// Whether some client waits for a slot now.
    pub fn has_waiters(&self) -> bool {
        self.waiters.load(Ordering::SeqCst) > 0
    }

    /// Slots held now (open connections).
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> ConnectionSlot {
        let slot = ConnectionSlot { permit: Some(permit), slots: Arc::clone(&self.slots), max: self.max };
        crate::metrics::upstream_connections(self.in_use());
        slot
    }
}

/// What [`ConnectionLimit::acquire`] got.
#[derive(Debug)]
pub enum Acquired<T> {
    /// A free slot, for a new connection.
    Slot(ConnectionSlot),
    /// Something the `before_wait` check found instead.
    Found(T),
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        crate::metrics::upstream_connections(self.max - self.slots.available_permits());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_then_refuses_and_a_freed_slot_goes_to_the_waiter() {
        let limit = Arc::new(ConnectionLimit::new(2, Duration::from_secs(10)));
        let a = limit.acquire(|| None::<()>).await.unwrap();
        let _b = limit.acquire(|| None::<()>).await.unwrap();
        assert_eq!(limit.in_use(), 2);
        assert!(!limit.has_waiters());
        // The third waits the whole wait, then is refused.
        assert!(matches!(limit.acquire(|| None::<()>).await, Err(UpstreamError::Busy(_))));
        assert!(!limit.has_waiters(), "the waiter is gone");
        // A waiter gets the slot that is given back.
        let waiter = {
            let limit = Arc::clone(&limit);
            tokio::spawn(async move { limit.acquire(|| None::<()>).await })
        };
        while !limit.has_waiters() {
            tokio::task::yield_now().await;
        }
        drop(a);
        let _held = waiter.await.unwrap().unwrap();
        assert_eq!(limit.in_use(), 2);
        // The check before waiting can end it.
        assert!(matches!(limit.acquire(|| Some(7)).await, Ok(Acquired::Found(7))));
    }
}
