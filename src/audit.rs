//! The audit trail: one JSON line per transaction and per AUTH attempt, schema version 1 (`docs/audit.md`).
//!
//! It sits at the end of the connection flow, next to metrics: the SMTP driver fills a [`TransactionRecord`]
//! (or an [`AuthRecord`]) as the transaction goes and hands it to the [`AuditSink`] when it ends. The sink
//! serializes at once and queues the line on a bounded channel; a single writer task appends the lines to
//! stdout or a file. A full queue drops the record and counts it (`moat_audit_records_dropped_total`): the
//! audit trail never slows a session down.
//!
//! Records never hold secrets (passwords, AUTH exchanges, tokens) nor message content: a subject appears
//! only as its SHA-256 digest.

mod record;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::fs::File;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::record::{
    digest, queue_id_from_reply, rfc3339, AuthRecord, RcptRecord, ReplyRecord, StageRecord, TlsRecord,
    TransactionRecord, UpstreamRecord, SCHEMA_VERSION,
};

/// Lines written before the writer flushes and looks at signals and shutdown again, so a steady stream of
/// records cannot starve a reopen.
const BATCH: usize = 256;

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
    tx: mpsc::Sender<Vec<u8>>,
    control: Arc<Control>,
}

/// What the sink and its writer task share (the writer does not hold a sender, so the queue closes when the
/// last sink is dropped).
#[derive(Debug, Default)]
struct Control {
    /// Asks the writer to reopen its file.
    reopen: Notify,
    /// Asks the writer to drain and stop ([`AuditSink::close`]).
    stop: CancellationToken,
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

impl AuditSink {
    /// Starts the writer task for `dest` with room for `capacity` queued records. The writer drains what is
    /// queued and ends when `shutdown` fires or [`close`](Self::close) is called; records after that are
    /// dropped. Pass a token that fires after the sessions have finished (not the one that starts the drain),
    /// or rely on `close`. Must be called within a Tokio runtime.
    pub fn start(dest: AuditDestination, capacity: usize, shutdown: CancellationToken) -> AuditSink {
        let output = match dest {
            AuditDestination::Off => return AuditSink { inner: None },
            AuditDestination::Stdout => match stdout_file() {
                Ok(f) => Output::Stdout(BufWriter::new(f)),
                Err(e) => {
                    warn!(error = %e, "cannot write audit records to stdout; audit is off");
                    return AuditSink { inner: None };
                }
            },
            AuditDestination::File(path) => Output::File { path, file: None, failing: false },
        };
        let signals = match &output {
            Output::File { .. } => signal(SignalKind::user_defined1())
                .inspect_err(|e| warn!(error = %e, "cannot watch SIGUSR1; the audit file is not reopened on rotation"))
                .ok(),
            Output::Stdout(_) => None,
        };
        let (sink, rx, control) = AuditSink::queue(capacity);
        tokio::spawn(write_loop(rx, output, control, signals, shutdown));
        sink
    }

    /// A sink, the receiving end of its queue and the control block its writer needs; no writer yet.
    fn queue(capacity: usize) -> (AuditSink, mpsc::Receiver<Vec<u8>>, Arc<Control>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let control = Arc::new(Control::default());
        let inner = Inner { tx, control: control.clone() };
        (AuditSink { inner: Some(Arc::new(inner)) }, rx, control)
    }

    fn control(&self) -> Option<&Arc<Control>> {
        self.inner.as_ref().map(|i| &i.control)
    }

    /// Queues one record as a JSON line. Never waits: when the queue is full the record is dropped and counted.
    pub fn record(&self, rec: &impl Serialize) {
        let Some(inner) = &self.inner else { return };
        let mut line = match serde_json::to_vec(rec) {
            Ok(line) => line,
            Err(e) => {
                warn!(error = %e, "cannot serialize audit record");
                inner.control.drop_record();
                return;
            }
        };
        line.push(b'\n');
        if inner.tx.try_send(line).is_err() {
            inner.control.drop_record();
        }
    }

    /// Asks the writer to reopen its file (what SIGUSR1 does), e.g. after logrotate renamed it.
    pub fn reopen(&self) {
        if let Some(c) = self.control() {
            c.reopen.notify_one();
        }
    }

    /// Stops the writer after it has written and flushed everything queued, and waits for that.
    pub async fn close(&self) {
        if let Some(c) = self.control() {
            c.stop.cancel();
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

/// The writer task: writes lines in batches, flushes whenever the queue runs empty, reopens on request.
async fn write_loop(
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut out: Output,
    control: Arc<Control>,
    mut signals: Option<Signal>,
    shutdown: CancellationToken,
) {
    // Fires `done` however this task ends, so `close` never waits forever.
    let _done = control.done.clone().drop_guard();
    loop {
        tokio::select! {
            biased;
            // Reopens come first: a record queued after a reopen request must go to the new file.
            Some(()) = next_signal(&mut signals) => out.reopen().await,
            _ = control.reopen.notified() => out.reopen().await,
            _ = shutdown.cancelled() => break,
            _ = control.stop.cancelled() => break,
            line = rx.recv() => {
                let Some(line) = line else { break };
                out.write(&line, &control).await;
                for _ in 1..BATCH {
                    let Ok(line) = rx.try_recv() else { break };
                    out.write(&line, &control).await;
                }
                out.flush().await;
            }
        }
    }
    rx.close();
    while let Some(line) = rx.recv().await {
        out.write(&line, &control).await;
    }
    out.flush().await;
}

async fn next_signal(signals: &mut Option<Signal>) -> Option<()> {
    match signals {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// The writer's end: stdout, or a file it can reopen.
enum Output {
    Stdout(BufWriter<File>),
    File {
        path: PathBuf,
        /// `None` until opened, and after a failure (the next record retries).
        file: Option<BufWriter<File>>,
        /// Whether the last open or write failed, so a broken destination is logged once, not per record.
        failing: bool,
    },
}

impl Output {
    async fn write(&mut self, line: &[u8], control: &Control) {
        match self {
            Output::Stdout(w) => {
                if w.write_all(line).await.is_err() {
                    control.drop_record();
                }
            }
            Output::File { path, file, failing } => {
                if file.is_none() {
                    *file = open(path, failing).await;
                }
                let Some(w) = file else {
                    control.drop_record();
                    return;
                };
                if let Err(e) = w.write_all(line).await {
                    control.drop_record();
                    report(failing, path, "write", &e);
                    *file = None;
                }
            }
        }
    }

    async fn flush(&mut self) {
        match self {
            Output::Stdout(w) => {
                let _ = w.flush().await;
            }
            Output::File { path, file, failing } => {
                if let Some(w) = file {
                    if let Err(e) = w.flush().await {
                        report(failing, path, "flush", &e);
                        *file = None;
                    }
                }
            }
        }
    }

    /// Flushes and closes the file, then opens the path again (a new file if logrotate moved the old one).
    async fn reopen(&mut self) {
        self.flush().await;
        if let Output::File { path, file, failing } = self {
            if let Some(mut w) = file.take() {
                let _ = w.shutdown().await;
            }
            *file = open(path, failing).await;
            if file.is_some() {
                info!(path = %path.display(), "audit file reopened");
            }
        }
    }
}

/// Standard output as a Tokio file (a duplicate of fd 1), so writes go through the blocking pool and never
/// stall a runtime thread when stdout is a slow pipe.
fn stdout_file() -> std::io::Result<File> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
    Ok(File::from_std(std::fs::File::from(fd)))
}

async fn open(path: &PathBuf, failing: &mut bool) -> Option<BufWriter<File>> {
    // Audit records name senders and recipients: not world-readable.
    let opened = tokio::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path).await;
    match opened {
        Ok(f) => {
            if std::mem::take(failing) {
                info!(path = %path.display(), "audit file writable again");
            }
            Some(BufWriter::new(f))
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
