//! The async driver of one client connection: reads bytes, feeds the pure [`Session`], writes replies, and
//! carries out what the session asks for (STARTTLS, pipeline checks, upstream MAIL/RCPT, reading DATA and
//! BDAT into the spool, relaying at end of data). Every read has a deadline; shutdown is honoured between
//! transactions.
//!
//! Replies are buffered and flushed only when no further complete command is waiting in the input
//! (RFC 2920 3.1), so a pipelining client gets its replies in one write.

mod auth;
mod copies;
mod deferred;
mod message;
mod pipelined;
mod reverse_dns;

pub use reverse_dns::ReverseDns;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::audit::AuditSink;
use crate::config::BareLineEndings;
use crate::pipeline::{ConnInfo, Pipeline, TxnContext, Verdict};
use crate::smtp::codec::{DataDecoder, Framed, Framing, LineReader};
use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::session::{CloseReason, Session, SessionConfig, Step};
use crate::smtp::Reply;
use crate::spool::{Spool, SpoolBudget};
use crate::tls::TlsInfo;
use crate::upstream::{ClientIdentity, Connection, Pool, Stream, UpstreamError};

/// Bytes read from the client at a time; the read buffer never holds more than this plus one command line.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes read at a time while message data flows faster than it is read (the last read filled the
/// buffer): four times fewer reads per MiB than [`READ_CHUNK`]. The buffer goes back to the small size when
/// the message is done; small messages never grow it.
const DATA_READ_CHUNK: usize = 64 * 1024;
/// Most of a message's header section kept for the pipeline and audit (the rest is only spooled).
const MAX_HEAD: usize = 64 * 1024;

/// Everything a connection on one listener shares with the others.
pub struct ListenerContext {
    pub name: Arc<str>,
    /// The metric handles of this listener's per-message families.
    pub metrics: crate::metrics::ListenerMetrics,
    pub session: Arc<SessionConfig>,
    pub max_command_line: usize,
    pub max_text_line: usize,
    pub bare_line_endings: BareLineEndings,
    pub idle_timeout: Duration,
    pub data_timeout: Duration,
    pub session_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub implicit_tls: bool,
    pub received_header: bool,
    /// How clients are counted by the per-client bounds (IPv6 per `limits.ipv6_client_prefix`).
    pub client_keys: crate::client_key::ClientKeys,
    /// Reverse DNS of clients (bounded, shared by all listeners); `None` with `server.reverse_dns = false`.
    pub reverse_dns: Option<ReverseDns>,
    pub pool: Arc<Pool>,
    pub spool: SpoolBudget,
    pub pipeline: Pipeline,
    pub audit: AuditSink,
    pub shutdown: CancellationToken,
    /// The credential checker; `None` when AUTH is off.
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    /// Where `quarantine` rules keep messages; `None` when rules are off.
    pub quarantine: Option<Arc<crate::quarantine::Store>>,
    /// Copies of accepted mail; `None` when `archive.mode = "off"`.
    pub archive: Option<Arc<crate::archive::Archive>>,
}

/// One open transaction's data-side state.
struct Txn {
    id: String,
    started: std::time::SystemTime,
    ctx: TxnContext,
    mail: MailFrom,
    /// MAIL was answered but not yet sent upstream (`upstream.defer_mail`): it goes with the first RCPT.
    mail_pending: bool,
    rcpts: Vec<(String, Reply)>,
    decoder: Option<DataDecoder>,
    spool: Spool,
    /// The start of the message, up to the end of its header section (or [`MAX_HEAD`]).
    head: Vec<u8>,
    head_done: bool,
    size: u64,
    too_big: bool,
    /// Writing to the spool failed (disk full): answered `452 4.3.1` at the end.
    spool_failed: bool,
    /// A final verdict at the end of the header section (refusal, discard): nothing more is spooled, the
    /// reply waits for the end of the data.
    early: Option<Verdict>,
}

impl Txn {
    /// A transaction whose MAIL was accepted.
    fn new(ctx: TxnContext, mail: MailFrom, spool: Spool) -> Txn {
        Txn {
            id: ctx.id.clone(),
            started: std::time::SystemTime::now(),
            ctx,
            mail,
            mail_pending: false,
            rcpts: Vec::new(),
            decoder: None,
            spool,
            head: Vec::new(),
            head_done: false,
            size: 0,
            too_big: false,
            spool_failed: false,
            early: None,
        }
    }
}

/// Why the read loop stopped.
enum Stop {
    Close(CloseReason),
}

/// The driver of one connection.
struct Driver {
    ctx: Arc<ListenerContext>,
    conn_id: String,
    session: Session,
    io: Box<dyn Stream>,
    rbuf: BytesMut,
    /// Decoded message bytes on their way to the spool when they cannot be decoded straight into it.
    scratch: Vec<u8>,
    wbuf: Vec<u8>,
    lines: LineReader,
    info: ConnInfo,
    ident: ClientIdentity,
    tls: Option<TlsInfo>,
    upstream: Option<Connection>,
    txn: Option<Txn>,
    deadline: Instant,
    txn_seq: u32,
    /// The client's identity changed (a new EHLO/HELO, STARTTLS) since the held upstream connection was
    /// introduced: the next MAIL re-introduces it, or the upstream would log and check the old HELO.
    ident_stale: bool,
    /// The HELO name the stages were last told about ([`Pipeline::helo`]).
    helo_seen: Option<String>,
    /// The last read filled all the room in `rbuf`: more is waiting, a larger read is worth it.
    rbuf_filled: bool,
    /// The session's part of moat's Received header, rendered at the first message and rebuilt when the
    /// session's facts change.
    received: Option<crate::trace::ReceivedStem>,
}

/// Serves one accepted connection to its end. `io` is the raw TCP stream (TLS is layered here).
pub async fn serve(
    ctx: Arc<ListenerContext>,
    io: tokio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    conn_id: String,
) -> CloseReason {
    let _ = io.set_nodelay(true);
    let (name, name_temporarily_unavailable) = match &ctx.reverse_dns {
        Some(rdns) => match rdns.name(peer.ip()).await {
            Ok(name) => (name, false),
            Err(()) => (None, true),
        },
        None => (None, false),
    };
    let mut info = ConnInfo::new(&conn_id, ctx.name.clone(), ctx.session.role, peer, local);
    info.name.clone_from(&name);
    let mut d = Driver {
        session: Session::new(ctx.session.clone(), ctx.implicit_tls),
        io: Box::new(io),
        rbuf: BytesMut::with_capacity(1024),
        scratch: Vec::new(),
        wbuf: Vec::with_capacity(512),
        lines: LineReader::new(ctx.max_command_line),
        ident: ClientIdentity {
            peer,
            local,
            name,
            name_temporarily_unavailable,
            helo: None,
            esmtp: false,
            login: None,
        },
        info,
        tls: None,
        upstream: None,
        txn: None,
        deadline: Instant::now() + ctx.session_timeout,
        txn_seq: 0,
        ident_stale: false,
        helo_seen: None,
        rbuf_filled: false,
        received: None,
        conn_id,
        ctx,
    };
    let reason = d.run().await;
    d.finish().await;
    reason
}

// === impl Driver ===

impl Driver {
    async fn run(&mut self) -> CloseReason {
        if self.ctx.implicit_tls {
            if let Err(reason) = self.handshake().await {
                return reason;
            }
        }
        if let Verdict::Reject(r) | Verdict::Tempfail(r) = self.ctx.pipeline.connect(&self.info).await {
            let r = Reply { code: if r.is_transient() { 421 } else { 554 }, lines: r.lines };
            let _ = self.send_now(&r).await;
            return CloseReason::Rejected;
        }
        let greeting = self.session.greeting();
        if self.send_now(&greeting).await.is_err() {
            return CloseReason::Io;
        }
        match self.command_loop().await {
            Ok(()) => CloseReason::Quit,
            Err(Stop::Close(r)) => r,
        }
    }

    /// Reads and answers commands until the session ends.
    async fn command_loop(&mut self) -> Result<(), Stop> {
        loop {
            if self.txn.is_none() && self.ctx.shutdown.is_cancelled() {
                // Draining: the transaction in flight has ended, so whatever the client pipelined after it
                // (a new MAIL after the final dot) must not start another one.
                return Err(self.close_for_shutdown().await);
            }
            let (n, framed) = self.lines.frame(&self.rbuf);
            let line = match framed {
                Some(Framed::Line(len)) => Some(self.rbuf[..len].to_vec()),
                Some(Framed::TooLong) => None,
                None => {
                    self.rbuf.advance(n);
                    self.flush().await?;
                    self.read_command_input().await?;
                    continue;
                }
            };
            self.rbuf.advance(n);
            let step = match line {
                Some(line) => {
                    crate::metrics::command(crate::metrics::Verb::from_line(&line));
                    // What an EHLO reply may advertise follows what the upstream last offered.
                    self.session.set_upstream_offers(self.ctx.pool.offers());
                    self.session.command(&line)
                }
                None => {
                    crate::metrics::limit_hit(crate::metrics::Limit::MaxCommandLine);
                    match self.lines.broken_limit() {
                        crate::smtp::codec::MAX_AUTH_LINE => self.session.auth_failed(Reply::auth_line_too_long()),
                        limit => self.session.line_too_long(limit),
                    }
                }
            };
            let closing = self.step(step).await?;
            self.notify_helo().await;
            if let Some(reason) = closing {
                self.flush().await?;
                return match reason {
                    CloseReason::Quit => Ok(()),
                    r => Err(Stop::Close(r)),
                };
            }
            if self.txn.is_some() && self.session.envelope().is_none() {
                // RSET, EHLO or a failed chunk ended the transaction: abort it upstream too.
                self.abort_txn("reset").await;
            }
            if self.session.error_limit_reached() {
                crate::metrics::limit_hit(crate::metrics::Limit::MaxErrors);
                self.queue(&Reply::too_many_errors(&self.ctx.session.hostname));
                self.flush().await?;
                return Err(Stop::Close(CloseReason::TooManyErrors));
            }
        }
    }

    /// Carries out one step; `Some(reason)` ends the session after flushing.
    async fn step(&mut self, step: Step) -> Result<Option<CloseReason>, Stop> {
        match step {
            Step::Reply(r) => self.queue(&r),
            Step::Close(r, reason) => {
                if reason == CloseReason::TooManyErrors {
                    crate::metrics::limit_hit(crate::metrics::Limit::MaxErrors);
                }
                self.queue(&r);
                return Ok(Some(reason));
            }
            Step::StartTls => self.starttls().await?,
            Step::Mail(m) => self.mail(m).await,
            Step::Rcpt(r) => self.rcpt(r).await,
            Step::Data => {
                self.queue(&Reply::start_data());
                self.flush().await?;
                self.start_body(Framing::Dot);
                self.read_dot_data().await?;
                self.end_of_message().await;
            }
            Step::Bdat { size, last, refusal } => self.bdat(size, last, refusal).await?,
            Step::Auth { mechanism, initial } => return self.auth(mechanism, initial).await,
        }
        Ok(None)
    }

    async fn starttls(&mut self) -> Result<(), Stop> {
        self.queue(&Reply::ready_for_tls());
        self.flush().await?;
        // RFC 3207 4.2 / CVE-2011-0411: anything pipelined after STARTTLS was sent in plaintext; drop it.
        self.rbuf.clear();
        self.lines = LineReader::new(self.ctx.max_command_line);
        self.handshake().await.map_err(Stop::Close)?;
        self.session.tls_started();
        // RFC 3207 4.2: nothing learnt before TLS carries over, including a login; a held upstream connection
        // still carries the old introduction.
        self.ident.helo = None;
        self.ident.login = None;
        self.ident_stale = true;
        Ok(())
    }

    /// Runs the TLS handshake on the current stream, within the handshake timeout.
    async fn handshake(&mut self) -> Result<(), CloseReason> {
        let Some(acceptor) = self.ctx.tls.clone() else {
            return Err(CloseReason::TlsFailed);
        };
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()) as Box<dyn Stream>);
        let listener = self.ctx.name.clone();
        match tokio::time::timeout(self.ctx.tls_handshake_timeout, acceptor.accept(plain)).await {
            Ok(Ok(tls)) => {
                let info = TlsInfo::from_server(tls.get_ref().1);
                crate::metrics::tls_handshake(
                    &listener,
                    crate::metrics::TlsVersion::from_name(info.version),
                    crate::metrics::TlsResult::Ok,
                );
                debug!(tls.version = info.version, tls.cipher = %info.cipher, "tls established");
                self.tls = Some(info);
                self.io = Box::new(tls);
                Ok(())
            }
            Ok(Err(e)) => {
                crate::metrics::tls_handshake(
                    &listener,
                    crate::metrics::TlsVersion::None,
                    crate::metrics::TlsResult::Error,
                );
                debug!(error = %e, "tls handshake failed");
                Err(CloseReason::TlsFailed)
            }
            Err(_) => {
                crate::metrics::tls_handshake(
                    &listener,
                    crate::metrics::TlsVersion::None,
                    crate::metrics::TlsResult::Timeout,
                );
                Err(CloseReason::TlsFailed)
            }
        }
    }

    // --- MAIL / RCPT ---

    async fn mail(&mut self, mail: MailFrom) {
        if let Some(reply) = self.sender_refusal(&mail.address) {
            self.session.mail_done(mail, &reply);
            self.queue(&reply);
            return;
        }
        let mut ctx = TxnContext {
            id: format!("{}.{}", self.conn_id, self.txn_seq + 1),
            mail_from: mail.address.clone(),
            helo: self.session.helo().map(|h| h.name.clone()),
            auth_user: self.session.user().map(str::to_string),
            ..TxnContext::default()
        };
        let verdict = self.ctx.pipeline.mail(&self.info, &mut ctx, &mail).await;
        if verdict.refusal().is_none() && self.rcpt_buffered() {
            return self.mail_pipelined(mail, ctx).await;
        }
        let deferred = verdict.refusal().is_none() && self.ctx.pool.settings().defer_mail;
        let reply = match verdict.refusal() {
            Some(r) => r.clone(),
            None if deferred => self.defer_mail(&mail).await,
            None => self.upstream_mail(&mail).await,
        };
        self.session.mail_done(mail.clone(), &reply);
        if reply.is_positive() {
            self.txn_seq += 1;
            let mut txn = Txn::new(ctx, mail, self.ctx.spool.spool());
            txn.mail_pending = deferred;
            self.txn = Some(txn);
        }
        self.queue(&reply);
    }

    /// Borrows an upstream connection if needed and sends MAIL; a connection that went stale while the
    /// client idled is replaced once.
    async fn upstream_mail(&mut self, mail: &MailFrom) -> Reply {
        for attempt in 0..2 {
            let reused = match self.acquire_upstream().await {
                Ok(reused) => reused,
                Err(reply) => return reply,
            };
            let Some(conn) = self.upstream.as_mut() else { break };
            match conn.mail(mail, None).await {
                // 421 from a connection we held or reused: the upstream closed it (smtpd_timeout); retry fresh.
                Ok(r) if r.code == 421 && attempt == 0 && reused => {
                    debug!("held upstream connection was closed by the upstream; reconnecting");
                    self.upstream = None;
                }
                Ok(r) => return r,
                Err(e) if attempt == 0 && reused && e.is_stale_connection() => {
                    debug!(error = %e, "pooled upstream connection was stale; reconnecting");
                    self.upstream = None;
                }
                Err(e) => {
                    self.upstream = None;
                    return self.upstream_failure(e, Reply::upstream_unavailable());
                }
            }
        }
        Reply::upstream_unavailable()
    }

    /// Makes sure an upstream connection is held for a new transaction (re-introducing the held one when
    /// the client's identity changed, else borrowing one from the pool). Returns whether it was held or
    /// pooled before (and so may have gone stale); `Err` is the reply for the client, already logged.
    async fn acquire_upstream(&mut self) -> Result<bool, Reply> {
        self.sync_helo();
        if self.ident_stale {
            self.reintroduce_held().await;
        }
        if self.upstream.is_some() {
            return Ok(true);
        }
        match self.ctx.pool.checkout(&self.ident).await {
            Ok((c, reused)) => {
                self.upstream = Some(c);
                Ok(reused)
            }
            Err(e) => Err(self.upstream_failure(e, Reply::upstream_unavailable())),
        }
    }

    /// Tells the stages about a HELO name they have not seen yet (after EHLO/HELO, once per new name).
    async fn notify_helo(&mut self) {
        let Some(h) = self.session.helo() else { return };
        if self.helo_seen.as_deref() == Some(h.name.as_str()) {
            return;
        }
        let name = h.name.clone();
        self.ctx.pipeline.helo(&self.info, &name).await;
        self.helo_seen = Some(name);
    }

    /// Copies the client's current EHLO/HELO into the identity; a change marks the identity stale.
    fn sync_helo(&mut self) {
        let Some(h) = self.session.helo() else { return };
        if self.ident.helo.as_deref() != Some(h.name.as_str()) || self.ident.esmtp != h.extended {
            self.ident.helo = Some(h.name.clone());
            self.ident.esmtp = h.extended;
            self.ident_stale = true;
        }
    }

    /// Introduces the client again on the held upstream connection (XCLIENT, then EHLO with the new HELO).
    /// A connection that refuses is dropped; the checkout that follows introduces a fresh one. Either way
    /// every connection used from here on carries the current identity.
    async fn reintroduce_held(&mut self) {
        if let Some(conn) = self.upstream.as_mut() {
            debug!("client identity changed; re-introducing it to the held upstream connection");
            if let Err(e) = conn.introduce(&self.ident).await {
                debug!(error = %e, "held upstream connection refused the new introduction; replacing it");
                self.upstream = None;
            }
        }
        self.ident_stale = false;
    }

    fn upstream_failure(&self, e: UpstreamError, reply: Reply) -> Reply {
        if let UpstreamError::Busy(wait) = e {
            // Not an upstream fault: moat's own cap (counted in moat_upstream_connection_wait_timeouts_total).
            debug!(?wait, "all upstream connections in use");
            return Reply::upstream_busy();
        }
        crate::metrics::upstream_error(e.kind());
        warn!(error = %e, source = ?std::error::Error::source(&e), upstream.addr = %self.ctx.pool.settings().address, "upstream failure");
        reply
    }

    async fn rcpt(&mut self, rcpt: RcptTo) {
        let Some(txn) = self.txn.as_mut() else {
            self.queue(&Reply::bad_sequence("need MAIL before RCPT"));
            return;
        };
        if txn.mail_pending {
            return self.rcpt_with_pending_mail(rcpt).await;
        }
        let mark = txn.ctx.mark();
        let verdict = self.ctx.pipeline.rcpt(&self.info, &mut txn.ctx, &rcpt).await;
        let reply = match verdict.refusal() {
            Some(r) => r.clone(),
            None => match self.upstream_for_txn().await {
                Err(r) => r,
                Ok(conn) => match conn.rcpt(&rcpt).await {
                    Ok(r) => r,
                    Err(e) => {
                        // Only this recipient gets the 4xx; the transaction stays open and the next command
                        // replays it on a fresh connection (a 5xx later would bounce accepted recipients).
                        self.upstream = None;
                        self.upstream_failure(e, Reply::upstream_failed())
                    }
                },
            },
        };
        self.rcpt_finished(rcpt, mark, reply).await;
    }

    /// The upstream connection carrying the open transaction. If it was lost (an error, or the upstream
    /// closed it while the client was slow), a fresh connection gets the transaction's MAIL and accepted
    /// RCPTs replayed first (which also sends a MAIL still pending). `Err` is the reply for the client,
    /// already logged.
    pub(super) async fn upstream_for_txn(&mut self) -> Result<&mut Connection, Reply> {
        if self.upstream.is_none() {
            let conn = self.replay_transaction().await?;
            self.upstream = Some(conn);
            if let Some(txn) = self.txn.as_mut() {
                txn.mail_pending = false;
            }
        }
        self.upstream.as_mut().ok_or_else(Reply::upstream_failed)
    }

    async fn replay_transaction(&mut self) -> Result<Connection, Reply> {
        let Some(env) = self.session.envelope() else {
            return Err(Reply::upstream_failed());
        };
        let (mail, rcpts) = (env.mail.clone(), env.rcpts.clone());
        let mut conn = match self.ctx.pool.connect(&self.ident).await {
            Ok(c) => c,
            Err(e) => return Err(self.upstream_failure(e, Reply::upstream_failed())),
        };
        debug!(rcpt.count = rcpts.len(), "replaying the transaction on a fresh upstream connection");
        let mut replies = vec![conn.mail(&mail, None).await];
        for r in &rcpts {
            if !matches!(replies.last(), Some(Ok(r)) if r.is_positive()) {
                break;
            }
            replies.push(conn.rcpt(r).await);
        }
        match replies.pop() {
            Some(Ok(r)) if r.is_positive() => Ok(conn),
            Some(Err(e)) => Err(self.upstream_failure(e, Reply::upstream_failed())),
            _ => {
                // The upstream now answers differently for this envelope: try again later, whole.
                let _ = conn.reset().await;
                self.ctx.pool.checkin(conn).await;
                Err(Reply::upstream_failed())
            }
        }
    }

    // --- reading from the client ---

    /// Reads more command input, within the idle timeout; honours shutdown between transactions.
    async fn read_command_input(&mut self) -> Result<(), Stop> {
        let idle = self.ctx.idle_timeout;
        let shutdown = self.ctx.shutdown.clone();
        let pool = Arc::clone(&self.ctx.pool);
        let holding = self.txn.is_none() && self.upstream.is_some();
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if self.txn.is_none() => Err(self.close_for_shutdown().await),
            // Another client waits for an upstream connection (all `upstream.max_connections` open): the one
            // held here between transactions goes back (closed, its slot to the waiter).
            _ = pool.connection_wanted(), if holding => {
                if let Some(conn) = self.upstream.take() {
                    debug!("giving the idle upstream connection back to a waiting client");
                    self.ctx.pool.checkin(conn).await;
                }
                Ok(())
            }
            r = self.read_some(idle, crate::metrics::Limit::IdleTimeout) => r,
        }
    }

    /// `421 4.3.2` and the end of the session: moat is shutting down and no transaction is open.
    async fn close_for_shutdown(&mut self) -> Stop {
        self.queue(&Reply::shutting_down(&self.ctx.session.hostname));
        match self.flush().await {
            Ok(()) => Stop::Close(CloseReason::Shutdown),
            Err(stop) => stop,
        }
    }

    /// One read into the buffer, bounded by `limit` and the session deadline.
    async fn read_some(&mut self, limit: Duration, limit_name: crate::metrics::Limit) -> Result<(), Stop> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let (wait, reason, name) = if left < limit {
            (left, CloseReason::SessionTimeout, crate::metrics::Limit::SessionTimeout)
        } else {
            (limit, CloseReason::Idle, limit_name)
        };
        let in_data = matches!(limit_name, crate::metrics::Limit::DataTimeout);
        self.rbuf.reserve(if in_data && self.rbuf_filled { DATA_READ_CHUNK } else { READ_CHUNK });
        let room = self.rbuf.capacity() - self.rbuf.len();
        match tokio::time::timeout(wait, self.io.read_buf(&mut self.rbuf)).await {
            Ok(Ok(0)) => Err(Stop::Close(CloseReason::PeerClosed)),
            Ok(Ok(n)) => {
                self.rbuf_filled = n == room;
                Ok(())
            }
            Ok(Err(e)) => {
                debug!(error = %e, "read failed");
                Err(Stop::Close(CloseReason::Io))
            }
            Err(_) => {
                crate::metrics::limit_hit(name);
                self.queue(&Reply::timeout(&self.ctx.session.hostname));
                let _ = self.flush().await;
                Err(Stop::Close(reason))
            }
        }
    }

    // --- writing to the client ---

    fn queue(&mut self, r: &Reply) {
        r.render_into(&mut self.wbuf);
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let res = tokio::time::timeout(self.ctx.idle_timeout, async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        })
        .await;
        self.wbuf.clear();
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Stop::Close(CloseReason::Io)),
        }
    }

    async fn send_now(&mut self, r: &Reply) -> Result<(), Stop> {
        self.queue(r);
        self.flush().await
    }

    /// Ends the connection: an open transaction is aborted, the upstream connection goes back to the pool.
    async fn finish(&mut self) {
        if self.txn.is_some() {
            self.abort_txn("aborted").await;
        }
        if let Some(conn) = self.upstream.take() {
            self.ctx.pool.checkin(conn).await;
        }
        // TLS: send close_notify, bounded (it can wait forever on a peer that stopped reading). Plain TCP:
        // nothing to send; dropping the stream closes it, which sends the same FIN a shutdown(2) would
        // (one system call less per connection).
        if self.tls.is_some() {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.io.shutdown()).await;
        }
    }
}
