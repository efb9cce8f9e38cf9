//! Metric handles kept after their first use, so that the per-message helpers do no registry lookup (a
//! hash of the name and labels, and a label allocation) for label values they have already seen (#15).
//!
//! A handle is registered lazily, the first time its label set is used, exactly as the `counter!` macro
//! would: a series absent before still appears only once something happened, so `/metrics` is unchanged.
//! Before the recorder is installed nothing is cached (the macro's no-op handle would stick otherwise).

use std::sync::{Arc, OnceLock};

use metrics::{counter, Counter, Histogram};

use super::{MessageVerdict, RcptResult, MESSAGES_TOTAL, RECEIVED_BYTES_TOTAL, RECIPIENTS_TOTAL};

/// One lazily registered handle.
pub struct Slot<T>(OnceLock<T>);

impl<T> Slot<T> {
    /// An empty slot.
    pub const fn new() -> Slot<T> {
        Slot(OnceLock::new())
    }

    /// Calls `f` with the cached handle, registering it with `register` on first use once the recorder is
    /// installed; before that, with a handle registered for this call only.
    pub fn with(&self, register: impl FnOnce() -> T, f: impl FnOnce(&T)) {
        match self.0.get() {
            Some(h) => f(h),
            None if super::installed() => f(self.0.get_or_init(register)),
            None => f(&register()),
        }
    }
}

impl<T> Default for Slot<T> {
    fn default() -> Slot<T> {
        Slot::new()
    }
}

/// A stage's [`super::STAGE_SECONDS`] histogram, cached by the pipeline per stage.
pub type StageTimer = Slot<Histogram>;

/// The per-listener families a message touches, cached per listener (the listener name is a label).
pub struct ListenerMetrics {
    listener: Arc<str>,
    messages: [Slot<Counter>; MessageVerdict::COUNT],
    received: Slot<Counter>,
    recipients: [Slot<Counter>; RcptResult::COUNT],
}

impl ListenerMetrics {
    /// The handles of the listener `listener` (none registered yet).
    pub fn new(listener: Arc<str>) -> ListenerMetrics {
        ListenerMetrics {
            listener,
            messages: [const { Slot::new() }; MessageVerdict::COUNT],
            received: Slot::new(),
            recipients: [const { Slot::new() }; RcptResult::COUNT],
        }
    }

    /// As [`super::message`], for this listener.
    pub fn message(&self, verdict: MessageVerdict, size: u64) {
        self.messages[verdict.index()].with(
            || counter!(MESSAGES_TOTAL, "listener" => self.listener.to_string(), "verdict" => verdict.as_str()),
            |c| c.increment(1),
        );
        super::message_bytes(verdict, size);
    }

    /// As [`super::received_bytes`], for this listener.
    pub fn received_bytes(&self, bytes: u64) {
        self.received
            .with(|| counter!(RECEIVED_BYTES_TOTAL, "listener" => self.listener.to_string()), |c| c.increment(bytes));
    }

    /// As [`super::recipient`], for this listener.
    pub fn recipient(&self, result: RcptResult) {
        self.recipients[result.index()].with(
            || counter!(RECIPIENTS_TOTAL, "listener" => self.listener.to_string(), "result" => result.as_str()),
            |c| c.increment(1),
        );
    }
}

impl std::fmt::Debug for ListenerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerMetrics").field("listener", &self.listener).finish_non_exhaustive()
    }
}
