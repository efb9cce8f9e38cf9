//! The SMTP server session as a pure state machine: command lines in, [`Step`]s out. No I/O, no clock.
//!
//! The driver (`crate::conn`) feeds it lines and carries out what a step asks for. Steps that need the outside
//! world (the pipeline's verdict, the upstream's answer to MAIL or RCPT) come back to the driver as requests;
//! the driver reports the outcome with [`Session::mail_done`] / [`Session::rcpt_done`], and only then does the
//! session change state. Message bytes never pass through here: the session only says when DATA or a BDAT
//! chunk starts and learns when the message is done.

use std::sync::Arc;

use crate::config::{ListenerMode, Role};
use crate::smtp::command::{self, Command, MailFrom, Mechanism, RcptTo, SyntaxError};
use crate::smtp::Reply;

/// Per-listener settings the session needs; built once and shared.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub hostname: String,
    pub greeting: String,
    pub role: Role,
    pub mode: ListenerMode,
    /// Whether STARTTLS can be offered (a certificate is loaded and the mode is `starttls`).
    pub starttls: bool,
    pub require_tls: bool,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    /// Whether AUTH is available (a users file is configured).
    pub auth: bool,
    /// Offer AUTH before TLS too (loopback tests).
    pub auth_without_tls: bool,
    /// Domains an `mx` listener takes unauthenticated mail for (see [`crate::smtp::relay::is_local_recipient`]).
    pub local_domains: Arc<[String]>,
}

/// The extensions moat passes through to the upstream instead of implementing them itself (DSN, SMTPUTF8):
/// moat may offer them only when the upstream does, or a client would use parameters the upstream then
/// refuses or, worse, ignores (a NOTIFY=SUCCESS nobody honours). The driver reports what the pool last
/// learnt from the upstream's EHLO reply ([`Session::set_upstream_offers`]); unknown means neither.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamOffers {
    /// The upstream offers DSN (RFC 3461).
    pub dsn: bool,
    /// The upstream offers SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
}

/// Locked-out AUTH attempts answered `454` in one session before it is closed with `421`.
pub const MAX_LOCKED_ATTEMPTS: u32 = 3;

/// Why a session ended (for logs and the `moat_sessions_closed_total{reason}` metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Quit,
    Idle,
    SessionTimeout,
    Shutdown,
    PeerClosed,
    TooManyErrors,
    TlsFailed,
    Rejected,
    Io,
    /// Kept trying AUTH while locked out.
    AuthLocked,
}

impl CloseReason {
    /// A stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Quit => "quit",
            CloseReason::Idle => "idle",
            CloseReason::SessionTimeout => "session_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::TooManyErrors => "too_many_errors",
            CloseReason::TlsFailed => "tls_failed",
            CloseReason::Rejected => "rejected",
            CloseReason::Io => "io",
            CloseReason::AuthLocked => "auth_locked",
        }
    }
}

/// How the client said hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Helo {
    pub name: String,
    pub extended: bool,
}

/// The envelope of the transaction in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub mail: MailFrom,
    /// Recipients the upstream (and the pipeline) accepted.
    pub rcpts: Vec<RcptTo>,
    /// Set once the first BDAT chunk arrived; DATA is then out of order (RFC 3030 2).
    pub chunking: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Before EHLO/HELO, and again after STARTTLS.
    Fresh,
    /// Greeted, no transaction.
    Ready,
    /// MAIL accepted; RCPTs, then DATA or BDAT.
    Mail(Envelope),
    /// The driver is reading message data for this envelope.
    Data(Envelope),
}

/// What the driver must do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this reply and read on.
    Reply(Reply),
    /// Send this reply, then close the connection.
    Close(Reply, CloseReason),
    /// Send `220`, discard buffered input, start TLS, then call [`Session::tls_started`].
    StartTls,
    /// Check this sender (pipeline, upstream MAIL), send the resulting reply, call [`Session::mail_done`].
    Mail(MailFrom),
    /// Check this recipient (pipeline, upstream RCPT), send the reply, call [`Session::rcpt_done`].
    Rcpt(RcptTo),
    /// Send `354` and read dot-terminated data; then call [`Session::message_done`].
    Data,
    /// Read exactly `size` octets. With `refusal`, discard them and send it; otherwise they are the next
    /// chunk of the message (on `last`, the message is complete: call [`Session::message_done`]).
    Bdat { size: u64, last: bool, refusal: Option<Reply> },
    /// Run the SASL exchange (the driver reads the `334` responses itself, never logging them), verify,
    /// then call [`Session::auth_done`], [`Session::auth_failed`] or [`Session::auth_locked`].
    Auth { mechanism: Mechanism, initial: Option<InitialResponse> },
}

/// The AUTH command's initial response: secret, so it never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct InitialResponse(pub String);

impl std::fmt::Debug for InitialResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One client session.
#[derive(Clone, Debug)]
pub struct Session {
    cfg: Arc<SessionConfig>,
    state: State,
    helo: Option<Helo>,
    tls: bool,
    /// The authenticated user, after a successful AUTH.
    user: Option<String>,
    /// AUTH attempts answered `454` because of a lockout.
    locked_attempts: u32,
    errors: u32,
    /// A BDAT chunk was refused and no other command came since: further chunks the client had already
    /// pipelined get 503 but are not counted as errors (RFC 3030 2: they must be accepted and discarded).
    chunk_failed: bool,
    /// What the upstream offers, as last reported by the driver.
    upstream: UpstreamOffers,
    /// What this session's EHLO reply advertised of those; parameters of anything else are refused.
    offered: UpstreamOffers,
}

// === impl Session ===

impl Session {
    /// A session on a fresh connection; `tls` is true for implicit TLS.
    pub fn new(cfg: Arc<SessionConfig>, tls: bool) -> Session {
        Session {
            cfg,
            state: State::Fresh,
            helo: None,
            tls,
            user: None,
            locked_attempts: 0,
            chunk_failed: false,
            errors: 0,
            upstream: UpstreamOffers::default(),
            offered: UpstreamOffers::default(),
        }
    }

    /// What the upstream offers now; the next EHLO reply advertises DSN and SMTPUTF8 accordingly.
    pub fn set_upstream_offers(&mut self, offers: UpstreamOffers) {
        self.upstream = offers;
    }

    /// What this session's EHLO reply advertised of the pass-through extensions (nothing before EHLO or
    /// after HELO).
    pub fn offered(&self) -> UpstreamOffers {
        self.offered
    }

    /// The `220` greeting.
    pub fn greeting(&self) -> Reply {
        Reply::greeting(&self.cfg.hostname, &self.cfg.greeting)
    }

    /// The client's EHLO/HELO, once given.
    pub fn helo(&self) -> Option<&Helo> {
        self.helo.as_ref()
    }

    /// Whether the session is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// AUTH succeeded for `user` (its canonical name).
    pub fn auth_done(&mut self, user: String) {
        self.user = Some(user);
    }

    /// AUTH failed with `reply` (`535`, `501`, ...): counted as an error like any refused command.
    pub fn auth_failed(&mut self, reply: Reply) -> Step {
        self.count_error(Step::Reply(reply))
    }

    /// AUTH refused by the lockout: `454`, and after [`MAX_LOCKED_ATTEMPTS`] the connection closes with `421`.
    pub fn auth_locked(&mut self) -> Step {
        self.locked_attempts += 1;
        if self.locked_attempts >= MAX_LOCKED_ATTEMPTS {
            return Step::Close(Reply::auth_locked_close(&self.cfg.hostname), CloseReason::AuthLocked);
        }
        Step::Reply(Reply::auth_locked())
    }

    /// Whether AUTH is offered now: configured, and over TLS unless the listener allows it in plaintext.
    fn auth_offered(&self) -> bool {
        self.cfg.auth && (self.tls || self.cfg.auth_without_tls)
    }

    /// The current envelope, if a transaction is open.
    pub fn envelope(&self) -> Option<&Envelope> {
        match &self.state {
            State::Mail(e) | State::Data(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the driver is reading message data.
    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data(_))
    }

    /// Handles one command line (CRLF stripped).
    pub fn command(&mut self, line: &[u8]) -> Step {
        let step = match command::parse(line) {
            Ok(cmd) => self.dispatch(cmd),
            Err(SyntaxError::Unknown) => Step::Reply(Reply::unrecognized()),
            Err(SyntaxError::Parameter(p)) => Step::Reply(Reply::bad_parameter(&p)),
            Err(SyntaxError::Arguments(what)) => Step::Reply(Reply::syntax(what)),
        };
        self.count_error(step)
    }

    /// A command line exceeded the limit and was discarded.
    pub fn line_too_long(&mut self, max: usize) -> Step {
        self.count_error(Step::Reply(Reply::line_too_long(max)))
    }

    /// The driver's outcome for a [`Step::Mail`]: the reply it sent.
    pub fn mail_done(&mut self, mail: MailFrom, reply: &Reply) {
        if reply.is_positive() && self.state == State::Ready {
            self.state = State::Mail(Envelope { mail, rcpts: Vec::new(), chunking: false });
        } else if !reply.is_positive() {
            self.errors += u32::from(reply.is_permanent());
        }
    }

    /// The driver's outcome for a [`Step::Rcpt`]: the reply it sent.
    pub fn rcpt_done(&mut self, rcpt: RcptTo, reply: &Reply) {
        if let (true, State::Mail(env)) = (reply.is_positive(), &mut self.state) {
            env.rcpts.push(rcpt);
        } else if reply.is_permanent() {
            // Refused recipients count as errors, so a dictionary attack ends at `max_errors`.
            self.errors += 1;
        }
    }

    /// Whether the client has made `max_errors` errors, counting those only the driver sees (refused MAIL,
    /// RCPT and BDAT): the driver then answers `421` and closes.
    pub fn error_limit_reached(&self) -> bool {
        self.errors >= self.cfg.max_errors
    }

    /// The message (DATA, or the BDAT LAST chunk) has been answered; the transaction is over.
    pub fn message_done(&mut self) {
        if matches!(self.state, State::Data(_) | State::Mail(_)) {
            self.state = State::Ready;
        }
    }

    /// A BDAT chunk failed (e.g. size exceeded, or refused by a header rule): the transaction is aborted.
    pub fn abort_transaction(&mut self) {
        self.chunk_failed = true;
        if self.state != State::Fresh {
            self.state = State::Ready;
        }
    }

    /// TLS is up: forget everything learnt in plaintext (RFC 3207 4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.user = None;
        self.offered = UpstreamOffers::default();
        self.state = State::Fresh;
    }

    fn count_error(&mut self, step: Step) -> Step {
        let failed = matches!(&step, Step::Reply(r) if r.is_permanent());
        if failed {
            self.errors += 1;
            if self.errors >= self.cfg.max_errors {
                return Step::Close(Reply::too_many_errors(&self.cfg.hostname), CloseReason::TooManyErrors);
            }
        }
        step
    }

    fn dispatch(&mut self, cmd: Command) -> Step {
        if !matches!(cmd, Command::Bdat { .. }) {
            self.chunk_failed = false;
        }
        match cmd {
            Command::Ehlo(name) => self.ehlo(name, true),
            Command::Helo(name) => self.ehlo(name, false),
            Command::Mail(m) => self.mail(m),
            Command::Rcpt(r) => self.rcpt(r),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => self.rset(),
            Command::Noop => Step::Reply(Reply::ok()),
            Command::Quit => Step::Close(Reply::bye(&self.cfg.hostname), CloseReason::Quit),
            Command::Vrfy => Step::Reply(Reply::cannot_vrfy()),
            Command::Expn => Step::Reply(Reply::not_implemented()),
            Command::Help => Step::Reply(Reply::help()),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth(&mechanism, initial),
        }
    }

    fn ehlo(&mut self, name: String, extended: bool) -> Step {
        // RFC 5321 4.1.4: EHLO/HELO resets any transaction in progress.
        self.state = State::Ready;
        // HELO announces no extensions (RFC 5321 4.1.1.1), so none of their parameters may follow.
        self.offered = if extended { self.upstream } else { UpstreamOffers::default() };
        let reply = if extended { self.capabilities(&name) } else { Reply::new(250, self.cfg.hostname.clone()) };
        self.helo = Some(Helo { name, extended });
        Step::Reply(reply)
    }

    /// The EHLO reply with the extensions this session offers.
    fn capabilities(&self, name: &str) -> Reply {
        let mut lines = vec![
            format!("{} Hello {name}", self.cfg.hostname),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.offered.smtputf8 {
            lines.push("SMTPUTF8".to_string());
        }
        lines.push("CHUNKING".to_string());
        if self.offered.dsn {
            lines.push("DSN".to_string());
        }
        if self.cfg.starttls && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        Reply { code: 250, lines }
    }

    fn mail(&mut self, mail: MailFrom) -> Step {
        match self.state {
            State::Fresh => return Step::Reply(Reply::bad_sequence("send EHLO/HELO first")),
            State::Mail(_) | State::Data(_) => return Step::Reply(Reply::bad_sequence("nested MAIL command")),
            State::Ready => {}
        }
        if self.cfg.require_tls && !self.tls {
            return Step::Reply(Reply::must_starttls());
        }
        if self.cfg.role == Role::Submission && self.user.is_none() {
            return Step::Reply(Reply::auth_required());
        }
        if let Some(refusal) = self.unoffered_mail_parameter(&mail) {
            return Step::Reply(refusal);
        }
        if !mail.smtputf8 && !mail.address.is_ascii() {
            return Step::Reply(Reply::utf8_without_smtputf8());
        }
        if mail.size.is_some_and(|s| s > self.cfg.max_message_size) {
            return Step::Reply(Reply::too_big(self.cfg.max_message_size));
        }
        Step::Mail(mail)
    }

    /// `555 5.5.4` for a SMTPUTF8 or DSN parameter this session did not advertise (RFC 5321 4.1.1.11): the
    /// upstream may not support it, and dropping it silently would lose what the client asked for.
    fn unoffered_mail_parameter(&self, mail: &MailFrom) -> Option<Reply> {
        if mail.smtputf8 && !self.offered.smtputf8 {
            return Some(Reply::bad_parameter("SMTPUTF8"));
        }
        match mail.dsn.first() {
            Some(p) if !self.offered.dsn => Some(Reply::bad_parameter(&p.keyword)),
            _ => None,
        }
    }

    fn rcpt(&mut self, rcpt: RcptTo) -> Step {
        let State::Mail(env) = &self.state else {
            return Step::Reply(Reply::bad_sequence("need MAIL before RCPT"));
        };
        if let (Some(p), false) = (rcpt.dsn.first(), self.offered.dsn) {
            return Step::Reply(Reply::bad_parameter(&p.keyword));
        }
        if env.chunking {
            return Step::Reply(Reply::bad_sequence("RCPT after BDAT"));
        }
        if env.rcpts.len() >= self.cfg.max_recipients {
            return Step::Reply(Reply::too_many_recipients());
        }
        if !env.mail.smtputf8 && !rcpt.address.is_ascii() {
            return Step::Reply(Reply::utf8_without_smtputf8());
        }
        // Never an open relay, whatever the upstream would allow: unauthenticated mail only to local domains.
        if self.user.is_none() && !crate::smtp::relay::is_local_recipient(&rcpt.address, &self.cfg.local_domains) {
            return Step::Reply(Reply::relay_denied());
        }
        Step::Rcpt(rcpt)
    }

    fn data(&mut self) -> Step {
        let env = match &self.state {
            State::Mail(env) if env.chunking => return Step::Reply(Reply::bad_sequence("DATA after BDAT")),
            State::Mail(env) if env.rcpts.is_empty() => return Step::Reply(Reply::no_valid_recipients()),
            State::Mail(env) => env.clone(),
            _ => return Step::Reply(Reply::bad_sequence("need MAIL and RCPT before DATA")),
        };
        self.state = State::Data(env);
        Step::Data
    }

    fn bdat(&mut self, size: u64, last: bool) -> Step {
        let refusal = match &mut self.state {
            State::Mail(env) if env.rcpts.is_empty() => Some(Reply::no_valid_recipients()),
            State::Mail(env) => {
                env.chunking = true;
                None
            }
            _ => Some(Reply::bad_sequence("need MAIL and RCPT before BDAT")),
        };
        if refusal.is_some() {
            if !self.chunk_failed {
                self.errors += 1;
            }
        } else if last {
            if let State::Mail(env) = std::mem::replace(&mut self.state, State::Ready) {
                self.state = State::Data(env);
            }
        }
        Step::Bdat { size, last, refusal }
    }

    fn rset(&mut self) -> Step {
        if self.state != State::Fresh {
            self.state = State::Ready;
        }
        Step::Reply(Reply::reset())
    }

    fn starttls(&mut self) -> Step {
        if self.tls {
            Step::Reply(Reply::bad_sequence("TLS already active"))
        } else if !self.cfg.starttls {
            Step::Reply(Reply::not_implemented())
        } else if matches!(self.state, State::Mail(_) | State::Data(_)) {
            Step::Reply(Reply::bad_sequence("MAIL transaction in progress"))
        } else {
            Step::StartTls
        }
    }

    fn auth(&mut self, mechanism: &str, initial: Option<String>) -> Step {
        if !self.cfg.auth {
            return Step::Reply(Reply::bad_sequence("authentication not enabled"));
        }
        if !self.auth_offered() {
            return Step::Reply(Reply::auth_needs_tls());
        }
        match self.state {
            State::Fresh => return Step::Reply(Reply::bad_sequence("send EHLO first")),
            State::Mail(_) | State::Data(_) => return Step::Reply(Reply::bad_sequence("MAIL transaction in progress")),
            State::Ready => {}
        }
        // AUTH is an EHLO extension (RFC 4954 3): after HELO nothing was offered.
        if self.helo.as_ref().is_some_and(|h| !h.extended) {
            return Step::Reply(Reply::bad_sequence("send EHLO first"));
        }
        if self.user.is_some() {
            return Step::Reply(Reply::bad_sequence("already authenticated"));
        }
        match Mechanism::from_name(mechanism) {
            Some(mechanism) => Step::Auth { mechanism, initial: initial.map(InitialResponse) },
            None => Step::Reply(Reply::auth_unknown_mechanism()),
        }
    }
}

#[cfg(test)]
mod tests;
