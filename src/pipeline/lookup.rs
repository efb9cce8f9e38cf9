//! Answers from the network that a stage starts early and reads later.
//!
//! A stage starts a [`Lookup`] as soon as its input is known (the client's blocklist queries at connect,
//! the sender domain's at MAIL, URL domains while the body streams) and keeps it in the connection's or
//! the transaction's extensions; the hook that needs the answer waits for it, never past its deadline.
//! The latency of the lookup then overlaps the greeting and the client's own round trips instead of
//! adding to them. The lookup runs as its own task, bounded by its deadline, and is aborted when the last
//! handle to it is dropped (the client went away).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// How a lookup ended, as seen by the hook that reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer<T> {
    /// The lookup finished with this value.
    Ready(T),
    /// The lookup's own deadline passed before it finished.
    TimedOut,
    /// The reader stopped waiting (its own wait bound) while the lookup was still running.
    NotYet,
}

impl<T> Answer<T> {
    /// The value, if the lookup finished.
    pub fn ready(self) -> Option<T> {
        match self {
            Answer::Ready(v) => Some(v),
            _ => None,
        }
    }
}

/// Aborts the lookup's task when the last handle goes.
#[derive(Debug)]
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running lookup whose answer several hooks may read; cheap to clone.
#[derive(Clone, Debug)]
pub struct Lookup<T> {
    rx: watch::Receiver<Option<Answer<T>>>,
    _task: Arc<AbortOnDrop>,
}

impl<T: Clone + Send + Sync + 'static> Lookup<T> {
    /// Starts `fut` now, on its own task, allowed to run for at most `deadline`.
    pub fn start<F>(deadline: Duration, fut: F) -> Lookup<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(async move {
            let answer = match tokio::time::timeout(deadline, fut).await {
                Ok(v) => Answer::Ready(v),
                Err(_) => Answer::TimedOut,
            };
            let _ = tx.send(Some(answer));
        });
        Lookup { rx, _task: Arc::new(AbortOnDrop(task.abort_handle())) }
    }

    /// A lookup that is already answered (a cache hit, or a value known without the network).
    pub fn ready(value: T) -> Lookup<T> {
        let (_tx, rx) = watch::channel(Some(Answer::Ready(value)));
        let task = tokio::spawn(async {});
        Lookup { rx, _task: Arc::new(AbortOnDrop(task.abort_handle())) }
    }

    /// The answer, waiting for it until `until` at the latest.
    pub async fn get(&self, until: Instant) -> Answer<T> {
        let mut rx = self.rx.clone();
        let waited = tokio::time::timeout_at(until, async {
            match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().unwrap_or(Answer::NotYet),
                // The sender went away without an answer: the task was aborted or panicked.
                Err(_) => Answer::TimedOut,
            }
        })
        .await;
        waited.unwrap_or(Answer::NotYet)
    }

    /// The answer if it is already there, without waiting.
    pub fn now(&self) -> Answer<T> {
        self.rx.borrow().clone().unwrap_or(Answer::NotYet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn answers_within_deadlines() {
        let fast = Lookup::start(Duration::from_secs(1), async { 7 });
        let slow = Lookup::start(Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            9
        });
        let never = Lookup::start(Duration::from_secs(2), std::future::pending::<u8>());
        assert_eq!(fast.get(Instant::now() + Duration::from_secs(1)).await, Answer::Ready(7));
        // The reader's own bound ends the wait, the lookup goes on.
        assert_eq!(slow.get(Instant::now() + Duration::from_secs(1)).await, Answer::NotYet);
        assert_eq!(slow.get(Instant::now() + Duration::from_secs(10)).await, Answer::Ready(9));
        assert_eq!(never.get(Instant::now() + Duration::from_secs(60)).await, Answer::TimedOut);
        assert_eq!(Lookup::ready(1u8).now(), Answer::Ready(1));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_last_handle_aborts_the_task() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let l = Lookup::start(Duration::from_secs(60), async move {
            let _keep = tx;
            std::future::pending::<()>().await
        });
        let l2 = l.clone();
        drop(l);
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "still running while a handle is held");
        drop(l2);
        assert_eq!(rx.recv().await, None, "the task ended with its last handle");
    }
}
