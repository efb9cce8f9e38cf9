//! The one polling file watcher behind every hot reload (TLS certificates, the users file, the rules
//! directory), and [`spawn_sweep`], the periodic blocking task behind the retention sweeps of the
//! quarantine store and the archive.
//!
//! It polls rather than using inotify: a poll every few seconds costs nothing, works the same on every
//! filesystem (NFS, bind mounts, configuration management that replaces files by rename), and needs no extra
//! dependency. A change is acted on once it has **held still for one whole interval**, so an editor or a
//! deployment writing several files (a certificate and then its key, a rule file and then its list) is
//! picked up in one reload, not half-way through.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Spawns the watcher. Every `interval` it computes `fingerprint()` (blocking: file metadata; run on the
/// blocking pool) and, when the fingerprint differs from the last one acted on and equals the one of the
/// previous poll, awaits `on_change`. `acted` holds the fingerprint last acted on: what the caller loaded at
/// start (`None`: act on the first stable poll), updated by the watcher, and by the caller when it reloads
/// for another reason (SIGHUP), so the watcher does not reload the same files again. Ends when `shutdown`
/// fires.
pub fn spawn<S, F, G, Fut>(
    interval: Duration,
    shutdown: CancellationToken,
    acted: Arc<Mutex<Option<S>>>,
    fingerprint: F,
    mut on_change: G,
) -> tokio::task::JoinHandle<()>
where
    S: PartialEq + Clone + Send + 'static,
    F: Fn() -> S + Clone + Send + Sync + 'static,
    G: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let poll = || {
            let f = fingerprint.clone();
            async move { tokio::task::spawn_blocking(f).await.ok() }
        };
        let mut previous = poll().await;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let current = poll().await;
            if let Some(now) = current.as_ref().filter(|now| previous.as_ref() == Some(now)) {
                let act = {
                    let mut acted = acted.lock().unwrap_or_else(|p| p.into_inner());
                    let changed = acted.as_ref() != Some(now);
                    if changed {
                        // Remembered even when the reload is refused, so a broken file is reported once.
                        *acted = Some(now.clone());
                    }
                    changed
                };
                if act {
                    on_change().await;
                }
            }
            previous = current;
        }
    })
}

/// Spawns a task that runs `sweep` (blocking: it walks directories; run on the blocking pool) every
/// `interval` until `shutdown` fires. A failure is logged with `what` and the next tick tries again.
pub fn spawn_sweep<F, T, E>(what: &'static str, interval: Duration, shutdown: CancellationToken, sweep: F)
where
    F: Fn() -> Result<T, E> + Clone + Send + 'static,
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match tokio::task::spawn_blocking(sweep.clone()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(sweep = what, error = %e, "sweep failed"),
                Err(e) => tracing::warn!(sweep = what, error = %e, "sweep task failed"),
            }
        }
    });
}

/// A file's identity and version as far as a poll can tell: modification time, length and inode (a
/// replacement by rename changes the inode even when the time does not move). `None`: the file is missing.
pub type Stamp = Option<(std::time::SystemTime, u64, u64)>;

/// The [`Stamp`] of `path` (blocking).
pub fn stamp(path: &std::path::Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A watcher whose fingerprint is `f(n)` at its n-th poll (counting from 1); returns the poll counter and
    /// the poll numbers at which it acted.
    fn watcher(acted: Option<u32>, f: fn(u32) -> u32) -> (Arc<AtomicU32>, Arc<Mutex<Vec<u32>>>, CancellationToken) {
        let polls = Arc::new(AtomicU32::new(0));
        let acts = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let (p, a, p2) = (polls.clone(), acts.clone(), polls.clone());
        spawn(
            Duration::from_millis(5),
            shutdown.clone(),
            Arc::new(Mutex::new(acted)),
            move || f(p.fetch_add(1, Ordering::SeqCst) + 1),
            move || {
                a.lock().unwrap().push(p2.load(Ordering::SeqCst));
                async {}
            },
        );
        (polls, acts, shutdown)
    }

    /// Waits (bounded) until the watcher has polled `n` times.
    async fn until_polled(polls: &AtomicU32, n: u32) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while polls.load(Ordering::SeqCst) < n {
            assert!(tokio::time::Instant::now() < deadline, "the watcher stopped polling");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn acts_once_when_a_change_has_settled() {
        // Changes at every poll up to the 5th, then holds still: one action, at the 6th poll.
        let (polls, acts, shutdown) = watcher(Some(0), |n| n.min(5));
        until_polled(&polls, 15).await;
        assert_eq!(*acts.lock().unwrap(), vec![6]);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn does_nothing_without_a_change() {
        let (polls, acts, shutdown) = watcher(Some(7), |_| 7);
        until_polled(&polls, 10).await;
        assert!(acts.lock().unwrap().is_empty());
        shutdown.cancel();
    }

    #[tokio::test]
    async fn without_a_baseline_acts_on_the_first_stable_poll() {
        let (polls, acts, shutdown) = watcher(None, |_| 7);
        until_polled(&polls, 10).await;
        assert_eq!(*acts.lock().unwrap(), vec![2]);
        shutdown.cancel();
    }
}
