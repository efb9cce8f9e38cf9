//! A deferred MAIL (`upstream.defer_mail`, on by default): a client that sends MAIL alone and waits for its
//! reply (smtp-source, many MTAs) gets `250` once moat's own stages accepted the sender, and the MAIL goes
//! upstream with the first RCPT, as one group ([`Driver::upstream_envelope`]: one write when the upstream
//! offers PIPELINING, MAIL then RCPT one at a time when it does not). That saves one upstream round trip
//! per message. Postfix's default `smtpd_delay_reject = yes` reports sender refusals at RCPT in the same way.
//!
//! What stays as it was:
//! - The upstream connection is still taken at MAIL, so `451 4.3.2` (all upstream connections busy) and an
//!   unreachable upstream are still MAIL's reply, and so is moat's own `455` for a parameter the
//!   connection's upstream does not offer.
//! - Every recipient still gets the upstream's verdict. If the upstream refuses the MAIL, every recipient
//!   of that group gets the upstream's reply to MAIL (code and text), the MAIL stays pending, and the next
//!   RCPT tries again. A recipient refused by a stage keeps its own refusal and is not sent.
//! - Nothing is sent upstream for a pending MAIL that ends without a recipient the stages let through
//!   (RSET, QUIT, EHLO, every recipient refused by a stage): no transaction is open upstream.
//! - A held or pooled connection found gone at the deferred MAIL is replaced once, as at MAIL; a connection
//!   lost before MAIL's reply leaves the MAIL pending (the next RCPT takes a fresh connection); one lost after
//!   MAIL was accepted is replayed by [`Driver::upstream_for_txn`] as before.

use tracing::debug;

use super::pipelined::Group;
use super::Driver;
use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::Reply;

impl Driver {
    /// MAIL passed the stages and arrived alone: takes the upstream connection (its failure is MAIL's reply)
    /// and answers `250` without sending MAIL, which waits for the first RCPT.
    pub(super) async fn defer_mail(&mut self, mail: &MailFrom) -> Reply {
        if let Err(reply) = self.acquire_upstream().await {
            return reply;
        }
        match self.upstream.as_ref().and_then(|conn| conn.mail_refusal(mail)) {
            Some(refusal) => refusal,
            None => Reply::sender_ok(),
        }
    }

    /// A RCPT while the transaction's MAIL is pending: this recipient and those buffered behind it go
    /// upstream with the MAIL as one group, and each gets its reply (see the module docs).
    pub(super) async fn rcpt_with_pending_mail(&mut self, rcpt: RcptTo) {
        let Some(mut txn) = self.txn.take() else {
            self.queue(&Reply::bad_sequence("need MAIL before RCPT"));
            return;
        };
        let mut group = Group::default();
        if !self.plan_rcpt(&mut txn.ctx, rcpt, &mut group).await {
            self.take_buffered_rcpts(&mut txn.ctx, &mut group).await;
        }
        let mail = txn.mail.clone();
        self.txn = Some(txn);
        let to_send = group.to_send();
        if to_send.is_empty() {
            // Every recipient was refused by a stage: nothing for the upstream, the MAIL stays pending.
            return self.finish_group(group.planned, std::iter::empty(), None).await;
        }
        let replies = self.upstream_envelope(&mail, &to_send).await;
        let mut upstream = replies.replies.into_iter();
        let mail_reply = upstream.next().unwrap_or_else(Reply::upstream_unavailable);
        if !mail_reply.is_positive() {
            debug!(reply.code = mail_reply.code, "upstream refused the deferred MAIL; its recipients get that reply");
            if replies.failed.is_some() {
                // Gone after refusing MAIL (a 421): the next RCPT takes a fresh connection.
                self.upstream = None;
            }
            return self.finish_group(group.planned, std::iter::repeat(mail_reply), None).await;
        }
        if let Some(txn) = self.txn.as_mut() {
            txn.mail_pending = false;
        }
        self.finish_group(group.planned, upstream, replies.failed).await;
    }
}
