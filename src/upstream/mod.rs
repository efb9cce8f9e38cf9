//! The SMTP client side: moat's connection to the upstream MTA (Postfix's smtpd on loopback).
//!
//! A client session borrows an [`Connection`] from the [`Pool`] when its first transaction starts, re-sends
//! the client's identity (XCLIENT, which Postfix accepts between transactions), relays MAIL and RCPT and
//! passes the upstream's replies back, and sends the message only after moat's verdict accepted it. Every
//! wait has a deadline; every failure is an [`UpstreamError`] that the session turns into a `4xx`.
//!
//! With `upstream.tls` set, [`Connection::connect`] upgrades the connection with STARTTLS right after the
//! first EHLO (RFC 3207), verifies the upstream's certificate with the client configuration built once
//! per [`Pool`], and says EHLO again over TLS; everything after that, XCLIENT included, is encrypted.

mod chunking;
mod identity;
pub mod limit;
mod pipelining;
mod pool;
mod splice;
#[cfg(test)]
mod tests;

pub use identity::{xtext, ClientIdentity};
pub use pipelining::GroupReplies;
pub use pool::Pool;
pub use splice::Splice;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::debug;

use crate::config::{Identity, UpstreamConfig, UpstreamTlsMode, UpstreamTlsVerify};
use crate::smtp::command::{Body, MailFrom, RcptTo};
use crate::smtp::Reply;
use crate::spool::Spool;
use crate::tls::{TlsError, UpstreamVerify};

/// Longest reply line accepted from the upstream (RFC 5321 4.5.3.1.5 says 512; be generous).
const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line reply.
const MAX_REPLY_LINES: usize = 64;

/// The stage of the upstream conversation an error happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Greeting,
    Ehlo,
    Xclient,
    Mail,
    Rcpt,
    Data,
    Message,
    Rset,
    Starttls,
}

/// Why the upstream could not do what was asked. Replies the upstream actually sent are not errors.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to upstream {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream timed out during {0:?}")]
    Timeout(Phase),
    #[error("upstream connection failed during {phase:?}")]
    Io {
        phase: Phase,
        #[source]
        source: io::Error,
    },
    #[error("upstream protocol error during {phase:?}: {what}")]
    Protocol { phase: Phase, what: String },
    #[error("upstream refused during {phase:?}: {reply}")]
    Refused { phase: Phase, reply: Reply },
    #[error(
        "upstream does not offer XCLIENT to moat (add moat's address to Postfix's smtpd_authorized_xclient_hosts)"
    )]
    NoXclient,
    /// `upstream.tls = "required"` and the upstream's EHLO reply has no STARTTLS.
    #[error("upstream does not offer STARTTLS and upstream.tls = \"required\"")]
    TlsNotOffered,
    /// Every upstream connection was in use (`upstream.max_connections`) for the whole wait.
    #[error("all upstream connections in use; waited {0:?}")]
    Busy(Duration),
    /// The TLS handshake failed, the upstream's certificate among other things (chain, name, expiry).
    #[error("tls handshake with upstream {server_name} failed")]
    Tls {
        server_name: String,
        #[source]
        source: io::Error,
    },
}

impl UpstreamError {
    /// The metric label for this error.
    pub fn kind(&self) -> crate::metrics::UpstreamErrorKind {
        use crate::metrics::UpstreamErrorKind as K;
        match self {
            UpstreamError::Connect { .. } => K::Connect,
            // A wait that ran out (counted on its own too, `moat_upstream_connection_wait_timeouts_total`).
            UpstreamError::Timeout(_) | UpstreamError::Busy(_) => K::Timeout,
            UpstreamError::Io { .. } => K::Io,
            UpstreamError::Tls { .. }
            | UpstreamError::TlsNotOffered
            | UpstreamError::Refused { phase: Phase::Starttls, .. }
            | UpstreamError::Protocol { phase: Phase::Starttls, .. } => K::Tls,
            UpstreamError::Protocol { .. } | UpstreamError::Refused { .. } | UpstreamError::NoXclient => K::Protocol,
        }
    }

    /// Whether the connection was found gone at the DATA command, before any message byte was sent, so the
    /// transaction can be replayed elsewhere without risk of a duplicate.
    pub fn is_lost_before_message(&self) -> bool {
        matches!(self, UpstreamError::Io { phase: Phase::Data, .. })
    }

    /// Whether the connection is simply gone (worth one retry on a fresh connection before anything was sent).
    pub fn is_stale_connection(&self) -> bool {
        matches!(self, UpstreamError::Io { .. })
    }
}

/// Settings for the upstream side, derived from `[upstream]`.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    pub address: SocketAddr,
    pub identity: Identity,
    pub helo_name: String,
    pub pool_size: usize,
    pub pool_idle_timeout: Duration,
    /// Most upstream connections open at once, pooled ones included ([`limit`]).
    pub max_connections: usize,
    /// How long a client waits for a connection when all are in use.
    pub connection_wait: Duration,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// STARTTLS towards the upstream; `None` with `upstream.tls = "off"`.
    pub tls: Option<UpstreamTls>,
    /// `upstream.defer_mail`: a lone MAIL goes upstream with the first RCPT.
    pub defer_mail: bool,
    /// Whether the message may go with BDAT when the upstream offers CHUNKING (`upstream.chunking`).
    pub chunking: bool,
}

/// What upstream STARTTLS needs, built once (per [`Pool`]) from `[upstream]`.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    /// Whether an upstream without STARTTLS is a failure (`"required"`) or relayed to in plaintext
    /// (`"opportunistic"`).
    pub required: bool,
    /// The rustls client configuration (roots or the loopback verifier), shared by all connections.
    pub config: Arc<ClientConfig>,
    /// The name the certificate must be valid for, sent as SNI when it is a DNS name.
    pub server_name: ServerName<'static>,
}

impl UpstreamTls {
    /// From `[upstream]`; `None` when `tls = "off"`. Reads the CA file or the system trust store, so call it
    /// at start-up.
    pub fn from_config(c: &UpstreamConfig) -> Result<Option<UpstreamTls>, TlsError> {
        let required = match c.tls {
            UpstreamTlsMode::Off => return Ok(None),
            UpstreamTlsMode::Opportunistic => false,
            UpstreamTlsMode::Required => true,
        };
        let verify = match c.tls_verify {
            UpstreamTlsVerify::System => UpstreamVerify::SystemRoots,
            UpstreamTlsVerify::CaFile => UpstreamVerify::CaFile(c.tls_ca_file.clone()),
            UpstreamTlsVerify::InsecureLoopback => UpstreamVerify::InsecureLoopback,
        };
        let server_name = if c.tls_server_name.is_empty() {
            ServerName::from(c.address.ip())
        } else {
            let bad = |_| TlsError::ServerName { name: c.tls_server_name.clone() };
            ServerName::try_from(c.tls_server_name.clone()).map_err(bad)?
        };
        let config = crate::tls::client_config(&verify)?;
        Ok(Some(UpstreamTls { required, config, server_name }))
    }
}

impl UpstreamSettings {
    /// From the config section; `hostname` is used when `helo_name` is empty. Builds the TLS client
    /// configuration when upstream TLS is on (blocking file reads: call it at start-up).
    pub fn from_config(c: &UpstreamConfig, hostname: &str) -> Result<UpstreamSettings, TlsError> {
        Ok(UpstreamSettings {
            address: c.address,
            identity: c.identity,
            helo_name: if c.helo_name.is_empty() { hostname.to_string() } else { c.helo_name.clone() },
            pool_size: c.pool_size,
            pool_idle_timeout: c.pool_idle_timeout.get(),
            max_connections: c.max_connections,
            connection_wait: c.connection_wait.get(),
            connect_timeout: c.connect_timeout.get(),
            command_timeout: c.command_timeout.get(),
            data_timeout: c.data_timeout.get(),
            tls: UpstreamTls::from_config(c)?,
            defer_mail: c.defer_mail,
            chunking: c.chunking,
        })
    }
}

/// What the upstream offered in its EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    pub size: bool,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub xclient: bool,
    /// XCLIENT offers the LOGIN attribute.
    pub xclient_login: bool,
    pub starttls: bool,
    /// Command pipelining (RFC 2920): MAIL and RCPTs may go in one write.
    pub pipelining: bool,
    /// BDAT (RFC 3030 CHUNKING): the message may go as counted chunks instead of DATA.
    pub chunking: bool,
}

impl Extensions {
    fn parse(reply: &Reply) -> Extensions {
        let mut e = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let kw = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
            match kw.as_str() {
                "SIZE" => e.size = true,
                "8BITMIME" => e.eight_bit = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "DSN" => e.dsn = true,
                "XCLIENT" => {
                    e.xclient = true;
                    e.xclient_login = line.split(' ').skip(1).any(|a| a.eq_ignore_ascii_case("LOGIN"));
                }
                "STARTTLS" => e.starttls = true,
                "PIPELINING" => e.pipelining = true,
                "CHUNKING" => e.chunking = true,
                _ => {}
            }
        }
        e
    }
}

/// A byte stream to the upstream: plain TCP, or TLS after STARTTLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The TCP socket underneath, if there is one (see [`Connection::rehome`]).
    fn tcp(&mut self) -> Option<&mut TcpStream> {
        None
    }
}

impl Stream for TcpStream {
    fn tcp(&mut self) -> Option<&mut TcpStream> {
        Some(self)
    }
}

impl Stream for tokio_rustls::client::TlsStream<Box<dyn Stream>> {
    fn tcp(&mut self) -> Option<&mut TcpStream> {
        self.get_mut().0.tcp()
    }
}

// A client connection (`conn`) is never moved between threads: it stays where it was accepted.
impl Stream for tokio_rustls::server::TlsStream<Box<dyn Stream>> {}
impl Stream for tokio::io::Empty {}

/// One SMTP connection to the upstream.
pub struct Connection {
    io: BufReader<BufWriter<Box<dyn Stream>>>,
    ext: Extensions,
    /// `ext` as it was before the first introduction (moat's own EHLO).
    own_ext: Extensions,
    settings: std::sync::Arc<UpstreamSettings>,
    /// Whether MAIL was sent and the transaction not yet finished or reset.
    in_transaction: bool,
    /// Whether STARTTLS succeeded.
    tls: bool,
    line: Vec<u8>,
    /// Its slot under `upstream.max_connections`, given back when the connection is dropped.
    slot: Option<limit::ConnectionSlot>,
    /// The per-core thread whose runtime polls its socket ([`crate::cores::home`]).
    home: u32,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("ext", &self.ext).field("tls", &self.tls).finish_non_exhaustive()
    }
}

// === impl Connection ===

impl Connection {
    /// Connects, reads the greeting, sends EHLO; with PROXY v2 the header goes first. With upstream TLS on,
    /// upgrades with STARTTLS and says EHLO again.
    pub async fn connect(
        settings: std::sync::Arc<UpstreamSettings>,
        ident: Option<&ClientIdentity>,
    ) -> Result<Connection, UpstreamError> {
        let start = std::time::Instant::now();
        let addr = settings.address;
        let tcp = timeout(settings.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::Timeout(Phase::Connect))?
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        // Without TCP_NODELAY each command/reply round trip waits on Nagle + delayed ACK (~40 ms).
        let _ = tcp.set_nodelay(true);
        let mut conn = Connection {
            io: BufReader::new(BufWriter::new(Box::new(tcp) as Box<dyn Stream>)),
            ext: Extensions::default(),
            own_ext: Extensions::default(),
            settings,
            in_transaction: false,
            tls: false,
            line: Vec::with_capacity(256),
            slot: None,
            home: crate::cores::home(),
        };
        if conn.settings.identity == Identity::ProxyV2 {
            // Without a client (the start-up probe, `Pool::probe`) a LOCAL header: "the proxy itself".
            let header = ident.map_or_else(|| identity::PROXY_V2_LOCAL.to_vec(), ClientIdentity::proxy_v2_header);
            conn.write(&header, Phase::Connect).await?;
            // The upstream sends nothing before it has the header: it must leave our buffer now.
            conn.flush(Phase::Connect).await?;
        }
        let greeting = conn.read_reply(Phase::Greeting, conn.settings.command_timeout).await?;
        if greeting.code != 220 {
            return Err(UpstreamError::Refused { phase: Phase::Greeting, reply: greeting });
        }
        let name = conn.settings.helo_name.clone();
        conn.ehlo(&name).await?;
        if let Some(tls) = conn.settings.tls.clone() {
            conn.starttls(&tls, &name).await?;
        }
        conn.own_ext = conn.ext.clone();
        crate::metrics::upstream_connect_seconds(start.elapsed());
        Ok(conn)
    }

    /// Moves the socket's registration to the runtime this runs on, when that is another per-core thread's
    /// than the one that opened or last moved it ([`crate::cores`]): otherwise every reply would be noticed
    /// by that other thread and passed over with a wake-up. A duplicate of the socket is registered here
    /// and the old one dropped (dup, epoll_ctl twice, close); nothing is buffered then (between
    /// transactions). On failure the connection stays as it was and works as before.
    pub fn rehome(&mut self) {
        let here = crate::cores::home();
        if self.home == here || here == 0 {
            return;
        }
        let Some(tcp) = self.io.get_mut().get_mut().tcp() else { return };
        let moved = std::os::fd::AsFd::as_fd(&*tcp).try_clone_to_owned().and_then(|fd| {
            let dup = std::net::TcpStream::from(fd);
            dup.set_nonblocking(true)?;
            TcpStream::from_std(dup)
        });
        match moved {
            Ok(dup) => {
                *tcp = dup;
                self.home = here;
            }
            Err(e) => debug!(error = %e, "cannot move an upstream connection to this thread's runtime"),
        }
    }

    /// The extensions the upstream offered.
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// What the upstream offered moat itself, before any client was introduced: the same for every client,
    /// so the view sessions advertise from ([`pool::Pool::learn`]) does not flip with whichever client
    /// connected last when the upstream answers some clients differently (Postfix's
    /// `smtpd_discard_ehlo_keyword_address_maps`).
    pub fn own_extensions(&self) -> &Extensions {
        &self.own_ext
    }

    async fn ehlo(&mut self, name: &str) -> Result<(), UpstreamError> {
        let reply = self.command(&format!("EHLO {name}"), Phase::Ehlo).await?;
        if reply.code != 250 {
            return Err(UpstreamError::Refused { phase: Phase::Ehlo, reply });
        }
        self.ext = Extensions::parse(&reply);
        Ok(())
    }

    /// STARTTLS after the first EHLO: handshake, verify, EHLO again (RFC 3207 4.2: forget what was learnt
    /// before TLS). An upstream that does not offer STARTTLS, or refuses it, is relayed to in plaintext only
    /// in opportunistic mode; a failed handshake is always an error (the connection is unusable, and
    /// reconnecting in plaintext would let anyone who can break handshakes force a downgrade).
    async fn starttls(&mut self, tls: &UpstreamTls, helo: &str) -> Result<(), UpstreamError> {
        if !self.ext.starttls {
            if tls.required {
                return Err(UpstreamError::TlsNotOffered);
            }
            debug!(upstream.addr = %self.settings.address, "upstream does not offer STARTTLS; relaying in plaintext");
            return Ok(());
        }
        let reply = self.command("STARTTLS", Phase::Starttls).await?;
        if reply.code != 220 {
            if tls.required {
                return Err(UpstreamError::Refused { phase: Phase::Starttls, reply });
            }
            debug!(reply.code = reply.code, "upstream refused STARTTLS; relaying in plaintext");
            return Ok(());
        }
        // Anything the upstream sent after its 220 would be read as if it came over TLS (the upstream-side
        // twin of the STARTTLS injection attack).
        if !self.io.buffer().is_empty() {
            let what = "upstream sent data after its STARTTLS reply".into();
            return Err(UpstreamError::Protocol { phase: Phase::Starttls, what });
        }
        // The write buffer is empty: `command` flushed it. Take the stream out, leaving an inert placeholder.
        let placeholder: Box<dyn Stream> = Box::new(tokio::io::empty());
        let io = std::mem::replace(&mut self.io, BufReader::new(BufWriter::new(placeholder)));
        let tcp = io.into_inner().into_inner();
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
        let handshake = connector.connect(tls.server_name.clone(), tcp);
        let stream = timeout(self.settings.command_timeout, handshake)
            .await
            .map_err(|_| UpstreamError::Timeout(Phase::Starttls))?
            .map_err(|source| UpstreamError::Tls { server_name: tls.server_name.to_str().into_owned(), source })?;
        let session = stream.get_ref().1;
        debug!(
            upstream.addr = %self.settings.address,
            tls.version = ?session.protocol_version(),
            tls.cipher = ?session.negotiated_cipher_suite().map(|s| s.suite()),
            "upstream tls established"
        );
        self.io = BufReader::new(BufWriter::new(Box::new(stream)));
        self.tls = true;
        self.ext = Extensions::default();
        self.ehlo(helo).await
    }

    /// Whether the connection runs over TLS (STARTTLS succeeded).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Introduces the client with XCLIENT (when configured), then EHLO again as the client's name.
    pub async fn introduce(&mut self, ident: &ClientIdentity) -> Result<(), UpstreamError> {
        if self.settings.identity != Identity::Xclient {
            return Ok(());
        }
        if !self.ext.xclient {
            return Err(UpstreamError::NoXclient);
        }
        let reply = self.command(&ident.xclient_line(self.ext.xclient_login), Phase::Xclient).await?;
        if reply.code != 220 {
            return Err(UpstreamError::Refused { phase: Phase::Xclient, reply });
        }
        // XCLIENT resets the upstream session to just after the greeting; EHLO with the client's own name,
        // which is what the upstream then logs and checks as the HELO name.
        let name = ident.helo.clone().unwrap_or_else(|| self.settings.helo_name.clone());
        self.ehlo(&name).await
    }

    /// Sends MAIL FROM with the parameters the upstream supports. Returns the upstream's reply.
    pub async fn mail(&mut self, mail: &MailFrom, size_hint: Option<u64>) -> Result<Reply, UpstreamError> {
        let line = match self.mail_line(mail, size_hint) {
            Ok(line) => line,
            Err(refusal) => return Ok(refusal),
        };
        let reply = self.command(&line, Phase::Mail).await?;
        crate::metrics::upstream_reply(crate::metrics::UpstreamPhase::Mail, reply.code);
        self.in_transaction = reply.is_positive();
        Ok(reply)
    }

    /// The MAIL FROM line for this upstream, or moat's own refusal (see [`Connection::unsupported`]).
    fn mail_line(&self, mail: &MailFrom, size_hint: Option<u64>) -> Result<String, Reply> {
        use std::fmt::Write as _;
        let mut line = String::with_capacity(mail.address.len() + 48);
        line.push_str("MAIL FROM:<");
        line.push_str(&mail.address);
        line.push('>');
        if let (true, Some(size)) = (self.ext.size, mail.size.or(size_hint)) {
            let _ = write!(line, " SIZE={size}");
        }
        if self.ext.eight_bit {
            match mail.body {
                Some(Body::EightBitMime) => line.push_str(" BODY=8BITMIME"),
                Some(Body::SevenBit) => line.push_str(" BODY=7BIT"),
                None => {}
            }
        }
        if let Some(refusal) = self.unsupported(mail.smtputf8, !mail.dsn.is_empty()) {
            return Err(refusal);
        }
        if mail.smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        for p in &mail.dsn {
            let _ = write!(line, " {p}");
        }
        Ok(line)
    }

    /// `455 4.5.4` when the client uses SMTPUTF8 or DSN parameters this connection's upstream does not offer.
    /// The session refuses parameters it did not advertise, and advertises what the upstream offers moat
    /// itself; so this is an upstream that changed in between (the next session is not offered them) or
    /// one that offers them to some clients only (Postfix's `smtpd_discard_ehlo_keyword_address_maps`: such
    /// a client keeps getting 455 and should be sent without them). Dropping them instead would lose
    /// a NOTIFY the client relies on (RFC 3461 5.2 wants a "relayed" DSN then, which moat cannot send).
    fn unsupported(&self, smtputf8: bool, dsn: bool) -> Option<Reply> {
        let missing = match (smtputf8 && !self.ext.smtputf8, dsn && !self.ext.dsn) {
            (true, _) => "SMTPUTF8",
            (false, true) => "DSN",
            (false, false) => return None,
        };
        Some(Reply::new(455, format!("4.5.4 The upstream does not offer {missing} now; try again later")))
    }

    /// Sends RCPT TO; returns the upstream's reply.
    pub async fn rcpt(&mut self, rcpt: &RcptTo) -> Result<Reply, UpstreamError> {
        let line = match self.rcpt_line(rcpt) {
            Ok(line) => line,
            Err(refusal) => return Ok(refusal),
        };
        let reply = self.command(&line, Phase::Rcpt).await?;
        crate::metrics::upstream_reply(crate::metrics::UpstreamPhase::Rcpt, reply.code);
        Ok(reply)
    }

    /// The RCPT TO line for this upstream, or moat's own refusal (see [`Connection::unsupported`]).
    fn rcpt_line(&self, rcpt: &RcptTo) -> Result<String, Reply> {
        use std::fmt::Write as _;
        if let Some(refusal) = self.unsupported(false, !rcpt.dsn.is_empty()) {
            return Err(refusal);
        }
        let mut line = String::with_capacity(rcpt.address.len() + 16);
        line.push_str("RCPT TO:<");
        line.push_str(&rcpt.address);
        line.push('>');
        for p in &rcpt.dsn {
            let _ = write!(line, " {p}");
        }
        Ok(line)
    }

    /// Sends the message: DATA, then `prefix` (headers moat adds, canonical CRLF) and the spooled message,
    /// dot-stuffed, then the end marker. `splice` replaces one range of the spooled message on the way (a
    /// rewritten Subject); the rest goes byte for byte. Returns the upstream's final reply (or its refusal
    /// of DATA). When the upstream offers CHUNKING (and `upstream.chunking` is on) the same message goes
    /// with one `BDAT <size> LAST` instead ([`chunking`]), with the same replies and errors.
    pub async fn send_message(
        &mut self,
        prefix: &[u8],
        spool: &mut Spool,
        splice: Option<&Splice>,
    ) -> Result<Reply, UpstreamError> {
        if self.use_bdat() {
            return self.send_message_bdat(prefix, spool, splice).await;
        }
        let start = std::time::Instant::now();
        let reply = self.command("DATA", Phase::Data).await?;
        if reply.code != 354 {
            crate::metrics::upstream_reply(crate::metrics::UpstreamPhase::Data, reply.code);
            if reply.is_positive() {
                // Never report a message as accepted that was not sent.
                return Err(UpstreamError::Protocol {
                    phase: Phase::Data,
                    what: format!("{} in reply to DATA", reply.code),
                });
            }
            // in_transaction stays set: Postfix keeps MAIL/RCPT after refusing DATA, so it must be reset.
            return Ok(reply);
        }
        let io_err = |source| UpstreamError::Io { phase: Phase::Message, source };
        spool.rewind().await.map_err(io_err)?;
        let total = spool.len();
        let mut wire = Vec::with_capacity(crate::spool::FILE_CHUNK + 1024);
        let mut at_line_start = true;
        crate::smtp::codec::stuff(prefix, &mut at_line_start, &mut wire);
        let (mut buf, mut pos, mut at) = (Vec::new(), 0u64, 0u64);
        while let Some(chunk) = spool.next_chunk(&mut buf, &mut pos).await.map_err(io_err)? {
            let last = pos >= total;
            if splice.is_none() && !crate::smtp::codec::needs_stuffing(chunk, at_line_start) {
                // Nothing to stuff (the usual case): the spooled bytes go out as they are, with what is
                // pending before them and, for the last chunk, the end marker after them, in one vectored
                // write and without a copy.
                if let Some(&b) = chunk.last() {
                    at_line_start = b == b'\n';
                }
                at += chunk.len() as u64;
                let end = if !last {
                    &b""[..]
                } else if at_line_start {
                    &b".\r\n"[..]
                } else {
                    &b"\r\n.\r\n"[..] // the spool always ends lines; this only guards the invariant
                };
                self.write_vectored(&mut [IoSlice::new(&wire), IoSlice::new(chunk), IoSlice::new(end)], Phase::Message)
                    .await?;
                wire.clear();
                if last {
                    break;
                }
                continue;
            }
            for piece in chunk.chunks(crate::spool::FILE_CHUNK) {
                match splice {
                    Some(s) => s.apply(piece, at, |b| crate::smtp::codec::stuff(b, &mut at_line_start, &mut wire)),
                    None => crate::smtp::codec::stuff(piece, &mut at_line_start, &mut wire),
                }
                at += piece.len() as u64;
                // Hold back the last piece so the end marker goes out in the same write (one syscall less
                // per message; most messages are one piece).
                if wire.len() >= crate::spool::FILE_CHUNK {
                    self.write(&wire, Phase::Message).await?;
                    wire.clear();
                }
            }
            if last {
                if !at_line_start {
                    wire.extend_from_slice(b"\r\n"); // the spool always ends lines; this only guards the invariant
                }
                wire.extend_from_slice(b".\r\n");
                self.write(&wire, Phase::Message).await?;
                break;
            }
        }
        if total == 0 {
            if !at_line_start {
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b".\r\n");
            self.write(&wire, Phase::Message).await?;
        }
        self.flush(Phase::Message).await?;
        let reply = self.read_reply(Phase::Message, self.settings.data_timeout).await?;
        self.in_transaction = false;
        crate::metrics::upstream_reply(crate::metrics::UpstreamPhase::Data, reply.code);
        crate::metrics::upstream_transaction_seconds(start.elapsed());
        Ok(reply)
    }

    /// Aborts any open transaction with RSET (nothing is queued by an unfinished transaction).
    pub async fn reset(&mut self) -> Result<(), UpstreamError> {
        let reply = self.command("RSET", Phase::Rset).await?;
        self.in_transaction = false;
        if reply.code != 250 {
            return Err(UpstreamError::Refused { phase: Phase::Rset, reply });
        }
        Ok(())
    }

    /// Whether a MAIL transaction is open upstream.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Says QUIT and closes, best effort.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(2), self.command("QUIT", Phase::Rset)).await;
    }

    /// Sends one command line and reads its reply.
    async fn command(&mut self, line: &str, phase: Phase) -> Result<Reply, UpstreamError> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes, phase).await?;
        self.flush(phase).await?;
        self.read_reply(phase, self.settings.command_timeout).await
    }

    async fn write(&mut self, bytes: &[u8], phase: Phase) -> Result<(), UpstreamError> {
        let t = self.settings.command_timeout;
        match timeout(t, self.io.get_mut().write_all(bytes)).await {
            Err(_) => Err(UpstreamError::Timeout(phase)),
            Ok(r) => r.map_err(|source| UpstreamError::Io { phase, source }),
        }
    }

    /// Writes all of `bufs` with as few (vectored) system calls as the stream takes.
    async fn write_vectored(&mut self, mut bufs: &mut [IoSlice<'_>], phase: Phase) -> Result<(), UpstreamError> {
        let t = self.settings.command_timeout;
        let io = self.io.get_mut();
        let all = async {
            IoSlice::advance_slices(&mut bufs, 0); // skips empty slices
            while !bufs.is_empty() {
                let n = io.write_vectored(bufs).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
                }
                IoSlice::advance_slices(&mut bufs, n);
            }
            Ok(())
        };
        match timeout(t, all).await {
            Err(_) => Err(UpstreamError::Timeout(phase)),
            Ok(r) => r.map_err(|source| UpstreamError::Io { phase, source }),
        }
    }

    async fn flush(&mut self, phase: Phase) -> Result<(), UpstreamError> {
        let t = self.settings.command_timeout;
        match timeout(t, self.io.get_mut().flush()).await {
            Err(_) => Err(UpstreamError::Timeout(phase)),
            Ok(r) => r.map_err(|source| UpstreamError::Io { phase, source }),
        }
    }

    /// Reads one (possibly multi-line) reply within `limit`.
    async fn read_reply(&mut self, phase: Phase, limit: Duration) -> Result<Reply, UpstreamError> {
        match timeout(limit, self.read_reply_inner(phase)).await {
            Err(_) => Err(UpstreamError::Timeout(phase)),
            Ok(r) => r,
        }
    }

    async fn read_reply_inner(&mut self, phase: Phase) -> Result<Reply, UpstreamError> {
        let mut reply = Reply { code: 0, lines: Vec::new() };
        loop {
            self.read_line(phase).await?;
            let line = &self.line;
            let bad = |what: &str| UpstreamError::Protocol { phase, what: what.into() };
            if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                return Err(bad("reply line without a code"));
            }
            let code = (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
            if reply.code != 0 && code != reply.code {
                return Err(bad("reply code changed within a multi-line reply"));
            }
            reply.code = code;
            let text = String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned();
            reply.lines.push(text);
            match line.get(3) {
                Some(b'-') if reply.lines.len() < MAX_REPLY_LINES => continue,
                Some(b'-') => return Err(bad("too many reply lines")),
                Some(b' ') | None => return Ok(reply),
                Some(_) => return Err(bad("malformed reply line")),
            }
        }
    }

    /// Reads one line into `self.line` without CRLF, refusing lines over [`MAX_REPLY_LINE`].
    async fn read_line(&mut self, phase: Phase) -> Result<(), UpstreamError> {
        self.line.clear();
        loop {
            let buf = self.io.fill_buf().await.map_err(|source| UpstreamError::Io { phase, source })?;
            if buf.is_empty() {
                let source = io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed the connection");
                return Err(UpstreamError::Io { phase, source });
            }
            let (take, done) = match memchr::memchr(b'\n', buf) {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            self.line.extend_from_slice(&buf[..take]);
            self.io.consume(take);
            if self.line.len() > MAX_REPLY_LINE {
                return Err(UpstreamError::Protocol { phase, what: "reply line too long".into() });
            }
            if done {
                while matches!(self.line.last(), Some(b'\n' | b'\r')) {
                    self.line.pop();
                }
                return Ok(());
            }
        }
    }
}
