//! Turns: one password verification at a time per client key (IPv4 address, IPv6 prefix) and per login name.
//!
//! Attempts from one address (or for one name) queue here before the shared verification semaphore, and
//! the lockout is checked again once it is their turn. Without this, N connections from one address that
//! send AUTH at the same moment all pass the lockout check before the first failure is counted, and get N
//! guesses instead of `lockout_threshold`; and they fill the verification queue ahead of every other
//! client. With it, one address or one name has at most one verification queued or running.
//!
//! The table holds an entry only while some attempt holds or waits for that key, so it is bounded by the
//! number of AUTH exchanges in progress (at most one per connection).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client_key::ClientKey;

/// What a turn is taken for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TurnKey {
    /// A client: every address of one IPv6 prefix shares one turn.
    Client(ClientKey),
    /// A login name, lower-cased.
    Name(String),
}

/// The per-key queues.
#[derive(Debug, Default)]
pub struct Turns {
    table: Mutex<HashMap<TurnKey, Arc<Semaphore>>>,
}

/// A held turn; the next attempt for the key goes ahead when it is dropped (also when the waiting
/// future is cancelled, e.g. because the client went away).
#[derive(Debug)]
pub struct Turn<'a> {
    turns: &'a Turns,
    key: TurnKey,
    queue: Option<Arc<Semaphore>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Turns {
    /// Waits for the turn of `key`. `None` only if the queue was closed, which this module never does.
    pub async fn take(&self, key: TurnKey) -> Option<Turn<'_>> {
        let queue = Arc::clone(self.lock().entry(key.clone()).or_insert_with(|| Arc::new(Semaphore::new(1))));
        // Built before waiting, so a cancelled wait still cleans the table up in `Drop`.
        let mut turn = Turn { turns: self, key, queue: Some(Arc::clone(&queue)), permit: None };
        turn.permit = Some(queue.acquire_owned().await.ok()?);
        Some(turn)
    }

    /// Keys with an attempt holding or waiting (for tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no attempt holds or waits for a turn.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TurnKey, Arc<Semaphore>>> {
        // A map of queues: a panic while holding the lock cannot leave it inconsistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        // Every `Turn` drops its reference under the lock, so the last one sees only the table's.
        let mut table = self.turns.lock();
        drop(self.queue.take());
        if table.get(&self.key).is_some_and(|q| Arc::strong_count(q) == 1) {
            table.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn ip() -> ClientKey {
        ClientKey::of("192.0.2.1".parse().unwrap())
    }

    #[tokio::test]
    async fn one_turn_per_key_and_the_table_empties() {
        let turns = Arc::new(Turns::default());
        let first = turns.take(TurnKey::Client(ip())).await.unwrap();
        let other = turns.take(TurnKey::Name("alice".into())).await.unwrap();
        let got = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (turns, got) = (Arc::clone(&turns), Arc::clone(&got));
            tokio::spawn(async move {
                let _t = turns.take(TurnKey::Client(ip())).await.unwrap();
                got.store(true, Ordering::SeqCst);
            })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!got.load(Ordering::SeqCst), "a second turn for the same IP while the first is held");
        assert_eq!(turns.len(), 2);
        drop(first);
        waiter.await.unwrap();
        assert!(got.load(Ordering::SeqCst));
        drop(other);
        assert!(turns.is_empty(), "entries left behind: {}", turns.len());
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_nothing_behind() {
        let turns = Arc::new(Turns::default());
        let held = turns.take(TurnKey::Client(ip())).await.unwrap();
        let waiter = {
            let turns = Arc::clone(&turns);
            tokio::spawn(async move {
                let _t = turns.take(TurnKey::Client(ip())).await;
            })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        drop(held);
        assert!(turns.is_empty(), "entries left behind: {}", turns.len());
    }
}
