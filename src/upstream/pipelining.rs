//! Command pipelining towards the upstream (RFC 2920): a transaction's MAIL and the recipients the client
//! pipelined behind it go out in one write, and the replies are read back in order. The client still gets
//! the upstream's own reply to each command; only the round trips between them are saved.
//!
//! RFC 2920 3.1 allows MAIL and RCPT anywhere in a group (only commands that change the session's state in
//! other ways, such as DATA, must end it). moat never pipelines DATA: the message goes upstream only after
//! the verdict at the end of data.

use super::{Connection, Phase, UpstreamError};
use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::Reply;

/// The upstream's replies to one pipelined MAIL + RCPT group.
#[derive(Debug)]
pub struct GroupReplies {
    /// The reply to MAIL, then one per recipient, in order, as far as they came. Shorter than the group when
    /// the connection failed (`failed`) or when MAIL was refused before anything was sent (moat's own `455`
    /// for a parameter the upstream does not offer).
    pub replies: Vec<Reply>,
    /// The failure that cut the replies short: the reply at `replies.len()` and all after it are unknown.
    pub failed: Option<UpstreamError>,
}

impl Connection {
    /// Whether the upstream offered PIPELINING.
    pub fn pipelining(&self) -> bool {
        self.ext.pipelining
    }

    /// moat's own refusal of `mail` on this connection (a parameter its upstream does not offer, see
    /// [`Connection::mail`]), known without sending anything: a deferred MAIL gets it as MAIL's reply.
    pub fn mail_refusal(&self, mail: &MailFrom) -> Option<Reply> {
        self.mail_line(mail, None).err()
    }

    /// Sends MAIL and `rcpts` in one write and reads the replies in order. A recipient whose parameters the
    /// upstream does not offer is not sent and gets moat's `455` in its place. Without PIPELINING the
    /// commands go one at a time, and nothing after a refused MAIL.
    pub async fn envelope(&mut self, mail: &MailFrom, rcpts: &[&RcptTo]) -> GroupReplies {
        if !self.ext.pipelining {
            return self.envelope_one_by_one(mail, rcpts).await;
        }
        let mut wire = Vec::with_capacity(64 * (rcpts.len() + 1));
        match self.mail_line(mail, None) {
            Ok(line) => push_line(&mut wire, &line),
            Err(refusal) => return GroupReplies { replies: vec![refusal], failed: None },
        }
        // Local refusals by position; `None` = sent, its reply comes from the upstream.
        let mut local: Vec<Option<Reply>> = Vec::with_capacity(rcpts.len());
        for rcpt in rcpts {
            match self.rcpt_line(rcpt) {
                Ok(line) => {
                    push_line(&mut wire, &line);
                    local.push(None);
                }
                Err(refusal) => local.push(Some(refusal)),
            }
        }
        let mut replies = Vec::with_capacity(rcpts.len() + 1);
        if let Err(e) = self.send(&wire, Phase::Mail).await {
            return GroupReplies { replies, failed: Some(e) };
        }
        let limit = self.settings.command_timeout;
        match self.read_reply(Phase::Mail, limit).await {
            Ok(r) => {
                crate::metrics::upstream_reply(crate::metrics::UpstreamPhase::Mail, r.code);
                self.in_transaction = r.is_positive();
                replies.push(r);
            }
            Err(e) => return GroupReplies { replies, failed: Some(e) },
        }
        for refusal in local {
            let reply = match refusal {
                Some(r) => r,
                None => match self.read_reply(Phase::Rcpt, limit).await {
                    Ok(r) => {
                        crate::metrics::upstream_reply(crate::metrics::UpstreamPhase::Rcpt, r.code);
                        r
                    }
                    Err(e) => return GroupReplies { replies, failed: Some(e) },
                },
            };
            replies.push(reply);
        }
        GroupReplies { replies, failed: None }
    }

    /// [`Connection::envelope`] for an upstream without PIPELINING.
    async fn envelope_one_by_one(&mut self, mail: &MailFrom, rcpts: &[&RcptTo]) -> GroupReplies {
        let mut replies = Vec::with_capacity(rcpts.len() + 1);
        match self.mail(mail, None).await {
            Ok(r) if r.is_positive() => replies.push(r),
            Ok(r) => return GroupReplies { replies: vec![r], failed: None },
            Err(e) => return GroupReplies { replies, failed: Some(e) },
        }
        for rcpt in rcpts {
            match self.rcpt(rcpt).await {
                Ok(r) => replies.push(r),
                Err(e) => return GroupReplies { replies, failed: Some(e) },
            }
        }
        GroupReplies { replies, failed: None }
    }

    /// Writes `wire` and flushes it: one write for the whole group.
    async fn send(&mut self, wire: &[u8], phase: Phase) -> Result<(), UpstreamError> {
        self.write(wire, phase).await?;
        self.flush(phase).await
    }
}

fn push_line(wire: &mut Vec<u8>, line: &str) {
    wire.extend_from_slice(line.as_bytes());
    wire.extend_from_slice(b"\r\n");
}
