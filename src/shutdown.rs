//! Graceful shutdown: a token every task watches, and the bookkeeping to wait for sessions to drain.
//!
//! Order (STYLE.md 5): stop accepting; idle sessions answer `421 4.3.2` and close; sessions in a transaction
//! finish it, relay included; after the grace period the rest are cut off (`hard` fires), which drops their
//! upstream connection mid-transaction so nothing half-sent is queued.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared shutdown state.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Fires when shutdown starts: listeners stop, idle sessions close.
    pub soft: CancellationToken,
    /// Fires when the grace period is over: remaining sessions are dropped.
    pub hard: CancellationToken,
    /// Every connection task.
    pub tasks: TaskTracker,
}

impl Shutdown {
    /// A fresh, untriggered shutdown.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts shutdown and waits up to `grace` for sessions to finish; returns how many were cut off.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.soft.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_ok() {
            return 0;
        }
        let left = self.tasks.len();
        self.hard.cancel();
        // Cut-off tasks end at their next await point; give them a moment to run their drop code.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        left
    }
}
