//! The AUTH side of a connection: the SASL exchange (read here with the SASL line limit, RFC 4954's 12,288
//! octets, and the idle timeout, and never logged), the lockout, verification, the audit record, and sender
//! binding.

use std::time::Instant;

use bytes::Buf;
use tracing::debug;

use super::{Driver, Stop};
use crate::audit::AuthRecord;
use crate::auth::lockout::Check;
use crate::auth::sasl::{Exchange, Mechanism, SaslError, SaslStep};
use crate::auth::AuthError;
use crate::metrics::AuthResult;
use crate::pipeline::AuthEvent;
use crate::smtp::codec::{Framed, LineReader, MAX_AUTH_LINE};
use crate::smtp::session::{CloseReason, InitialResponse, Step};
use crate::smtp::Reply;

fn metric_attempt(mechanism: Mechanism, result: &'static str) {
    let result = match result {
        "success" => AuthResult::Success,
        "locked" => AuthResult::Locked,
        "cancelled" => AuthResult::Cancelled,
        _ => AuthResult::Failure,
    };
    crate::metrics::auth_attempt(mechanism.as_str(), result);
}

impl Driver {
    /// Runs one AUTH command to its end. `Some(reason)` closes the session.
    pub(super) async fn auth(
        &mut self,
        mechanism: Mechanism,
        initial: Option<InitialResponse>,
    ) -> Result<Option<CloseReason>, Stop> {
        let Some(auth) = self.ctx.auth.clone() else {
            self.queue(&Reply::bad_sequence("authentication not enabled"));
            return Ok(None);
        };
        let client = self.ctx.client_keys.key(self.info.peer.ip());
        if let Check::Locked(_) = auth.lockout().check(client, Instant::now()) {
            return Ok(self.auth_locked(mechanism, ""));
        }
        let (mut ex, mut step) = Exchange::start(mechanism, initial.as_ref().map(|i| i.0.as_str()));
        let creds = loop {
            match step {
                SaslStep::Done(c) => break c,
                SaslStep::Challenge(r) => {
                    self.queue(&r);
                    self.flush().await?;
                    match self.read_auth_line().await? {
                        Some(line) => step = ex.respond(&line),
                        None => {
                            self.auth_record(mechanism, "", "failure");
                            let s = self.session.auth_failed(Reply::auth_line_too_long());
                            return Ok(self.auth_reply(s));
                        }
                    }
                }
                SaslStep::Failed(e) => {
                    let result = if e == SaslError::Cancelled { "cancelled" } else { "failure" };
                    self.auth_record(mechanism, "", result);
                    let s = self.session.auth_failed(e.reply());
                    return Ok(self.auth_reply(s));
                }
            }
        };
        let name = creds.user.clone();
        // The wait for a turn and a verification permit is bounded like any other wait: behind a flood the
        // client gets 454 (try again) after the idle timeout rather than an unbounded delay.
        let verified = tokio::time::timeout(self.ctx.idle_timeout, auth.verify(creds, &self.ctx.name, client))
            .await
            .unwrap_or_else(|_| {
                debug!(mechanism = mechanism.as_str(), "authentication waited too long for a verification slot");
                Err(AuthError::Internal)
            });
        match verified {
            Ok(user) => {
                let event = AuthEvent { login: &user, success: true };
                if let Some(r) = self.ctx.pipeline.auth(&self.info, event).await.refusal() {
                    // A stage refused the session after all (a suspended account): it stays unauthenticated.
                    self.auth_record(mechanism, &user, "refused");
                    self.queue(r);
                    return Ok(None);
                }
                self.auth_record(mechanism, &user, "success");
                debug!(user = %user, mechanism = mechanism.as_str(), "authenticated");
                self.session.auth_done(user.clone());
                self.ident.login = Some(user);
                // A connection introduced before AUTH carries no LOGIN: give it back, so the next MAIL
                // borrows one and re-introduces the client with its login.
                if let Some(conn) = self.upstream.take() {
                    self.ctx.pool.checkin(conn).await;
                }
                self.queue(&Reply::auth_ok());
                Ok(None)
            }
            Err(AuthError::Locked) => Ok(self.auth_locked(mechanism, &name)),
            Err(AuthError::Internal) => {
                metric_attempt(mechanism, "error");
                self.queue(&Reply::auth_temporary());
                Ok(None)
            }
            Err(AuthError::Invalid { delay, locked, throttled }) => {
                if locked {
                    crate::metrics::auth_lockout();
                }
                // A throttled name is answered exactly as a wrong password for an unknown name (same reply,
                // same verification cost, same delay); only the audit trail tells them apart.
                self.auth_record(mechanism, &name, if throttled { "throttled" } else { "failure" });
                self.ctx.pipeline.auth(&self.info, AuthEvent { login: &name, success: false }).await;
                debug!(mechanism = mechanism.as_str(), delay = ?delay, throttled, "authentication failed");
                tokio::time::sleep(delay).await;
                let s = self.session.auth_failed(Reply::auth_invalid());
                Ok(self.auth_reply(s))
            }
        }
    }

    /// Answers an attempt refused by the lockout.
    fn auth_locked(&mut self, mechanism: Mechanism, user: &str) -> Option<CloseReason> {
        self.auth_record(mechanism, user, "locked");
        let s = self.session.auth_locked();
        self.auth_reply(s)
    }

    fn auth_reply(&mut self, step: Step) -> Option<CloseReason> {
        match step {
            Step::Close(r, reason) => {
                self.queue(&r);
                Some(reason)
            }
            Step::Reply(r) => {
                self.queue(&r);
                None
            }
            _ => None,
        }
    }

    /// Reads one response line of the exchange; `None` when it was over [`MAX_AUTH_LINE`] (then discarded
    /// up to its end, so the session goes on).
    async fn read_auth_line(&mut self) -> Result<Option<Vec<u8>>, Stop> {
        // A response is not a command: it gets the SASL limit, whatever it starts with.
        let mut lines = LineReader::new(MAX_AUTH_LINE);
        loop {
            let (n, framed) = lines.frame(&self.rbuf);
            match framed {
                Some(Framed::Line(len)) => {
                    let line = self.rbuf[..len].to_vec();
                    self.rbuf.advance(n);
                    return Ok(Some(line));
                }
                Some(Framed::TooLong) => {
                    self.rbuf.advance(n);
                    return Ok(None);
                }
                None => {
                    self.rbuf.advance(n);
                    self.read_some(self.ctx.idle_timeout, crate::metrics::Limit::IdleTimeout).await?;
                }
            }
        }
    }

    /// One audit record and one metric per attempt: who and how it ended, never a secret.
    fn auth_record(&self, mechanism: Mechanism, user: &str, result: &'static str) {
        metric_attempt(mechanism, result);
        self.ctx.audit.record(&AuthRecord {
            conn_id: self.conn_id.clone(),
            listener: self.ctx.name.to_string(),
            client_ip: self.info.peer.ip().to_string(),
            user: user.to_string(),
            mechanism: mechanism.as_str().to_string(),
            result: result.to_string(),
            ..AuthRecord::new()
        });
    }

    /// `553` when an authenticated user gives a MAIL FROM address it does not own.
    pub(super) fn sender_refusal(&self, address: &str) -> Option<Reply> {
        let (user, auth) = (self.session.user()?, self.ctx.auth.as_ref()?);
        (!auth.sender_allowed(user, address)).then(|| Reply::sender_not_owned(user))
    }

    /// `550` when an authenticated user's message has a From header address it does not own (or one that
    /// cannot be read).
    pub(super) fn header_from_refusal(&self, head: &[u8]) -> Option<Reply> {
        let (user, auth) = (self.session.user()?, self.ctx.auth.as_ref()?);
        match crate::auth::from_addresses(head) {
            Some(addrs) if addrs.iter().all(|a| !a.is_empty() && auth.sender_allowed(user, a)) => None,
            _ => Some(Reply::from_not_owned(user)),
        }
    }
}
