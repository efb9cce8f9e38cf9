//! Metric handles kept after their first use, so that the per-message helpers do no registry lookup (a
//! hash of the name and labels, and a label allocation) for label values they have already seen (#15).
//!
//! A handle is registered lazily, the first time its label set is used, exactly as the `counter!` macro
//! would: a series absent before still appears only once something happened, so `/metrics` is unchanged.
//! Before the recorder is installed nothing is cached (the macro's no-op handle would stick otherwise).

use std::sync::{Arc, OnceLock};

use metrics::{counter, gauge, Counter, Gauge, Histogram};

use super::{
    ActiveConnection, ConnResult, MessageVerdict, RcptResult, CONNECTIONS_ACTIVE, CONNECTIONS_TOTAL, MESSAGES_TOTAL,
    RECEIVED_BYTES_TOTAL, RECIPIENTS_TOTAL, SESSIONS_CLOSED_TOTAL,
};
use crate::smtp::session::CloseReason;

/// Close reasons cached per listener: those up to [`CloseReason::AuthLocked`] in declaration order (a reason
/// added after it is counted through the registry, uncached).
const CLOSE_REASONS: usize = CloseReason::AuthLocked as usize + 1;

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

impl<T: Clone> Slot<T> {
    /// A clone of the cached handle (registered on first use, as in [`Slot::with`]).
    pub fn handle(&self, register: impl FnOnce() -> T) -> T {
        match self.0.get() {
            Some(h) => h.clone(),
            None if super::installed() => self.0.get_or_init(register).clone(),
            None => register(),
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

/// The per-listener families a connection and a message touch, cached per listener (the listener name is a
/// label).
pub struct ListenerMetrics {
    listener: Arc<str>,
    connections: [Slot<Counter>; ConnResult::COUNT],
    active: Slot<Gauge>,
    closed: [Slot<Counter>; CLOSE_REASONS],
    messages: [Slot<Counter>; MessageVerdict::COUNT],
    received: Slot<Counter>,
    recipients: [Slot<Counter>; RcptResult::COUNT],
}

impl ListenerMetrics {
    /// The handles of the listener `listener` (none registered yet).
    pub fn new(listener: Arc<str>) -> ListenerMetrics {
        ListenerMetrics {
            listener,
            connections: [const { Slot::new() }; ConnResult::COUNT],
            active: Slot::new(),
            closed: [const { Slot::new() }; CLOSE_REASONS],
            messages: [const { Slot::new() }; MessageVerdict::COUNT],
            received: Slot::new(),
            recipients: [const { Slot::new() }; RcptResult::COUNT],
        }
    }

    /// As [`super::connection`], for this listener.
    pub fn connection(&self, result: ConnResult) {
        self.connections[result.index()].with(
            || counter!(CONNECTIONS_TOTAL, "listener" => self.listener.to_string(), "result" => result.as_str()),
            |c| c.increment(1),
        );
    }

    /// As [`super::connection_active`], for this listener.
    pub fn connection_active(&self) -> ActiveConnection {
        let gauge = self.active.handle(|| gauge!(CONNECTIONS_ACTIVE, "listener" => self.listener.to_string()));
        gauge.increment(1.0);
        ActiveConnection { gauge }
    }

    /// As [`super::session_closed`], for this listener.
    pub fn session_closed(&self, reason: CloseReason) {
        match self.closed.get(reason as usize) {
            Some(slot) => slot.with(
                || counter!(SESSIONS_CLOSED_TOTAL, "listener" => self.listener.to_string(), "reason" => reason.as_str()),
                |c| c.increment(1),
            ),
            None => super::session_closed(&self.listener, reason),
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
