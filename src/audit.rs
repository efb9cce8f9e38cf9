//! The audit trail: one JSON line per transaction and per AUTH attempt, schema version 1 (`docs/audit.md`).
//!
//! It sits at the end of the connection flow, next to metrics: the SMTP driver fills a [`TransactionRecord`]
//! (or an [`AuthRecord`]) as the transaction goes and hands it to the [`AuditSink`] when it ends. The sink
//! serializes at once and queues the line on a bounded channel; a single writer thread appends the lines to
//! stdout or a file. A full queue drops the record and counts it (`moat_audit_records_dropped_total`): the
//! audit trail never slows a session down.
//!
//! Records never hold secrets (passwords, AUTH exchanges, tokens) nor message content: a subject appears
//! only as its SHA-256 digest.

mod json;
mod record;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::AtomicBool;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::json::JsonLine;
pub use self::record::{
    digest, queue_id_from_reply, rfc3339, AuthRecord, RcptRecord, ReplyRecord, StageRecord, TlsRecord,
    TransactionRecord, UpstreamRecord, SCHEMA_VERSION,
};

/// Lines written before the writer flushes and looks at the stop flag again.
const BATCH: usize = 1024;
/// After a batch the writer lets records gather this long before it looks again, so under load it wakes
/// (and writes) about 100 times a second instead of once per record. A record reaches the file at most this
/// much later; `close` and shutdown do not wait for it.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);
/// The writer's buffer: a batch of typical records (about 1 KiB each) leaves in a few writes.
const WRITE_BUFFER: usize = 64 * 1024;

// === sink ===

/// Where audit records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditDestination {
    /// Standard output, one line per record.
    Stdout,
    /// Appended to this file, created with mode 0640 if missing; reopened on SIGUSR1 (log rotation).
    File(PathBuf),
    /// Nowhere: records are discarded without being serialized.
    Off,
}

/// The handle sessions record through. Cheap to clone; every clone feeds the same writer.
#[derive(Clone, Debug)]
pub struct AuditSink {
    /// `None` for [`AuditDestination::Off`].
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    tx: mpsc::Sender<Msg>,
    control: Arc<Control>,
}

/// What the sink and its writer thread share (the writer does not hold a sender, so the queue closes when the
/// last sink is dropped).
#[derive(Debug, Default)]
struct Control {
    /// Asks the writer to reopen its file before it writes the next record.
    reopen: AtomicBool,
    /// Asks the writer to drain and stop ([`AuditSink::close`], or the shutdown token).
    stop: AtomicBool,
    /// Fires when the writer has flushed and ended.
    done: CancellationToken,
    /// Records dropped by this sink (queue full, writer gone, write failed).
    dropped: AtomicU64,
}

impl Control {
    fn drop_record(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        crate::metrics::audit_record_dropped();
    }
}

/// What travels on the queue: a record, or a nudge that makes an idle writer look at its flags.
#[derive(Debug)]
enum Msg {
    Line(Vec<u8>),
    Wake,
}

impl AuditSink {
    /// Starts the writer thread for `dest` with room for `capacity` queued records. The writer drains what is
    /// queued and ends when `shutdown` fires or [`close`](Self::close) is called; records after that are
    /// dropped. Pass a token that fires after the sessions have finished (not the one that starts the drain),
    /// or rely on `close`. Must be called within a Tokio runtime (it watches SIGUSR1 and the token there).
    pub fn start(dest: AuditDestination, capacity: usize, shutdown: CancellationToken) -> AuditSink {
        let output = match dest {
            AuditDestination::Off => return AuditSink { inner: None },
            AuditDestination::Stdout => Output::Stdout(BufWriter::with_capacity(WRITE_BUFFER, std::io::stdout())),
            AuditDestination::File(path) => Output::File { path, file: None, failing: false },
        };
        let watch_sigusr1 = matches!(output, Output::File { .. });
        let (sink, rx, control) = AuditSink::queue(capacity);
        let spawned = std::thread::Builder::new().name("moat-audit".into()).spawn({
            let control = control.clone();
            move || write_loop(rx, output, &control)
        });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the audit writer thread; audit is off");
            return AuditSink { inner: None };
        }
        // The thread blocks on its queue; these two tasks turn async events into flags plus a nudge.
        let waker = sink.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => waker.request_stop(),
                _ = control.done.cancelled() => {}
            }
        });
        if watch_sigusr1 {
            match signal(SignalKind::user_defined1()) {
                Ok(mut signals) => {
                    let waker = sink.clone();
                    let done = sink.control().map(|c| c.done.clone()).unwrap_or_default();
                    tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                Some(()) = signals.recv() => waker.reopen(),
                                _ = done.cancelled() => break,
                            }
                        }
                    });
                }
                Err(e) => warn!(error = %e, "cannot watch SIGUSR1; the audit file is not reopened on rotation"),
            }
        }
        sink
    }

    /// A sink, the receiving end of its queue and the control block its writer needs; no writer yet.
    fn queue(capacity: usize) -> (AuditSink, mpsc::Receiver<Msg>, Arc<Control>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let control = Arc::new(Control::default());
        let inner = Inner { tx, control: control.clone() };
        (AuditSink { inner: Some(Arc::new(inner)) }, rx, control)
    }

    fn control(&self) -> Option<&Arc<Control>> {
        self.inner.as_ref().map(|i| &i.control)
    }

    /// Queues one record as a JSON line. Never waits: when the queue is full the record is dropped and counted.
    pub fn record(&self, rec: &impl JsonLine) {
        let Some(inner) = &self.inner else { return };
        let mut line = Vec::with_capacity(rec.size_hint() + 1);
        rec.write_json(&mut line);
        line.push(b'\n');
        if inner.tx.try_send(Msg::Line(line)).is_err() {
            inner.control.drop_record();
        }
    }

    /// Wakes an idle writer so it sees a flag. A full queue means the writer is busy and looks at its flags
    /// anyway before the next record, so a failed nudge loses nothing.
    fn nudge(&self) {
        if let Some(inner) = &self.inner {
            let _ = inner.tx.try_send(Msg::Wake);
        }
    }

    /// Asks the writer to reopen its file (what SIGUSR1 does), e.g. after logrotate renamed it. Records queued
    /// after this call go to the new file.
    pub fn reopen(&self) {
        if let Some(c) = self.control() {
            c.reopen.store(true, Ordering::SeqCst);
            self.nudge();
        }
    }

    fn request_stop(&self) {
        if let Some(c) = self.control() {
            c.stop.store(true, Ordering::SeqCst);
            self.nudge();
        }
    }

    /// Stops the writer after it has written and flushed everything queued, and waits for that.
    pub async fn close(&self) {
        if let Some(c) = self.control() {
            self.request_stop();
            c.done.cancelled().await;
        }
    }

    /// Waits until the writer has ended (after `shutdown` fired or `close` was called) and flushed.
    pub async fn closed(&self) {
        if let Some(c) = self.control() {
            c.done.cancelled().await;
        }
    }

    /// How many records this sink has dropped so far.
    pub fn dropped(&self) -> u64 {
        self.control().map_or(0, |c| c.dropped.load(Ordering::Relaxed))
    }
}

/// The writer thread: blocks on the queue, writes what has arrived in one batch, flushes whenever the queue
/// runs empty, reopens when asked (checked before every record, so a record queued after a reopen request
/// goes to the new file).
///
/// A plain thread rather than a Tokio task on `tokio::fs`: every `tokio::fs` write is a round trip through
/// the blocking pool (two futex wake-ups and a context switch per flush), which under load cost more CPU
/// than serializing the records. Here the writer wakes at most about 100 times a second (see [`LINGER`])
/// and takes whole batches off the queue.
fn write_loop(mut rx: mpsc::Receiver<Msg>, mut out: Output, control: &Control) {
    while !control.stop.load(Ordering::SeqCst) {
        let Some(first) = rx.blocking_recv() else { break };
        out.handle(first, control);
        for _ in 1..BATCH {
            let Ok(msg) = rx.try_recv() else { break };
            out.handle(msg, control);
        }
        out.flush();
        if !control.stop.load(Ordering::SeqCst) {
            #[allow(clippy::disallowed_methods)] // the audit writer's own thread, never a runtime thread
            std::thread::sleep(LINGER);
        }
    }
    rx.close();
    while let Some(msg) = rx.blocking_recv() {
        out.handle(msg, control);
    }
    out.flush();
    // Fires `done` only now, so `close` returns after the last flush.
    control.done.cancel();
}

/// The writer's end: stdout, or a file it can reopen.
enum Output {
    Stdout(BufWriter<std::io::Stdout>),
    File {
        path: PathBuf,
        /// `None` until opened, and after a failure (the next record retries).
        file: Option<BufWriter<File>>,
        /// Whether the last open or write failed, so a broken destination is logged once, not per record.
        failing: bool,
    },
}

impl Output {
    fn handle(&mut self, msg: Msg, control: &Control) {
        if control.reopen.swap(false, Ordering::SeqCst) {
            self.reopen();
        }
        if let Msg::Line(line) = msg {
            self.write(&line, control);
        }
    }

    fn write(&mut self, line: &[u8], control: &Control) {
        match self {
            Output::Stdout(w) => {
                if w.write_all(line).is_err() {
                    control.drop_record();
                }
            }
            Output::File { path, file, failing } => {
                if file.is_none() {
                    *file = open(path, failing);
                }
                let Some(w) = file else {
                    control.drop_record();
                    return;
                };
                if let Err(e) = w.write_all(line) {
                    control.drop_record();
                    report(failing, path, "write", &e);
                    *file = None;
                }
            }
        }
    }

    fn flush(&mut self) {
        match self {
            Output::Stdout(w) => {
                let _ = w.flush();
            }
            Output::File { path, file, failing } => {
                if let Some(w) = file {
                    if let Err(e) = w.flush() {
                        report(failing, path, "flush", &e);
                        *file = None;
                    }
                }
            }
        }
    }

    /// Flushes and closes the file, then opens the path again (a new file if logrotate moved the old one).
    fn reopen(&mut self) {
        self.flush();
        if let Output::File { path, file, failing } = self {
            drop(file.take());
            *file = open(path, failing);
            if file.is_some() {
                info!(path = %path.display(), "audit file reopened");
            }
        }
    }
}

fn open(path: &PathBuf, failing: &mut bool) -> Option<BufWriter<File>> {
    // Audit records name senders and recipients: not world-readable.
    let opened = std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path);
    match opened {
        Ok(f) => {
            if std::mem::take(failing) {
                info!(path = %path.display(), "audit file writable again");
            }
            Some(BufWriter::with_capacity(WRITE_BUFFER, f))
        }
        Err(e) => {
            report(failing, path, "open", &e);
            None
        }
    }
}

fn report(failing: &mut bool, path: &std::path::Path, what: &str, e: &std::io::Error) {
    if !std::mem::replace(failing, true) {
        warn!(path = %path.display(), error = %e, "cannot {what} the audit file; records are dropped until it works");
    }
}

#[cfg(test)]
mod tests;
