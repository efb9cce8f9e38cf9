//! A client that pipelines (RFC 2920) sends MAIL and its RCPTs in one go; moat then sends them upstream in
//! one write too, instead of one round trip per command, and passes each of the upstream's replies back in
//! order. Every recipient still gets the upstream's own verdict, and every stage still sees every RCPT
//! before the upstream does.
//!
//! How: when MAIL passed the stages and the next buffered command line is a RCPT, the session is advanced
//! as if the upstream had accepted MAIL, and the RCPT lines already buffered behind it are taken one by one
//! (each checked by the session and the stages, as the one-at-a-time path would). The group goes upstream
//! ([`Connection::envelope`]: one write with PIPELINING, one command at a time without), and the replies are
//! applied in order. If the upstream refuses MAIL, the session is put back as it was and the RCPT lines go
//! back into the input, so they get exactly the replies they would have got one at a time (`503`).
//!
//! Limits kept: a group holds at most `max_recipients` recipients (the session counts accepted ones only when
//! their reply is known), stops at the first line that is not a RCPT the session would pass on, and ends
//! after a recipient whose stage verdict changed the transaction (a tag, a score): refusing it must undo
//! only its own effects, which is only possible for the last one. Stages see `on_rcpt` for each recipient
//! of a group before the `on_rcpt_done` events of the group.
//!
//! The same group (planned by [`Driver::take_buffered_rcpts`], sent by [`Driver::upstream_envelope`],
//! answered by [`Driver::finish_group`]) also carries a deferred MAIL with the first RCPT
//! (`upstream.defer_mail`, `deferred.rs`).

use bytes::{Buf, BytesMut};
use tracing::debug;

use super::{Driver, Txn};
use crate::pipeline::{RcptOutcome, TxnContext, TxnMark};
use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::session::Step;
use crate::smtp::Reply;
use crate::upstream::{GroupReplies, UpstreamError};

/// One recipient of a group.
pub(super) struct Planned {
    rcpt: RcptTo,
    /// The effects before its stages ran.
    mark: TxnMark,
    /// A stage's refusal: not sent upstream.
    refusal: Option<Reply>,
}

/// The recipients of a group, in order, and the input lines taken for them.
#[derive(Default)]
pub(super) struct Group {
    pub(super) planned: Vec<Planned>,
    /// The RCPT lines taken from the input (put back when the upstream refuses a pipelined MAIL).
    taken: BytesMut,
}

impl Group {
    /// The recipients no stage refused: the ones that go upstream.
    pub(super) fn to_send(&self) -> Vec<&RcptTo> {
        self.planned.iter().filter(|p| p.refusal.is_none()).map(|p| &p.rcpt).collect()
    }
}

impl Driver {
    /// Whether the buffered input starts with a complete RCPT line (the client pipelined it behind MAIL).
    pub(super) fn rcpt_buffered(&self) -> bool {
        self.next_line().is_some_and(|(line, _)| line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"RCPT "))
    }

    /// The complete command line at the start of the input, without its line end, and its length with it.
    fn next_line(&self) -> Option<(&[u8], usize)> {
        let window = &self.rbuf[..self.rbuf.len().min(self.ctx.max_command_line)];
        let i = memchr::memchr(b'\n', window)?;
        let len = if i > 0 && window[i - 1] == b'\r' { i - 1 } else { i };
        Some((&window[..len], i + 1))
    }

    /// MAIL passed the stages and RCPTs are buffered behind it: relays the group upstream and queues every
    /// reply. `mail`'s reply and the recipients' replies are the upstream's, as in the one-at-a-time path.
    pub(super) async fn mail_pipelined(&mut self, mail: MailFrom, mut ctx: TxnContext) {
        let before = self.session.clone();
        // As if the upstream accepted MAIL; undone below if it did not.
        self.session.mail_done(mail.clone(), &Reply::ok());
        let mut group = Group::default();
        self.take_buffered_rcpts(&mut ctx, &mut group).await;
        let replies = self.upstream_envelope(&mail, &group.to_send()).await;
        let mut upstream = replies.replies.into_iter();
        let mail_reply = upstream.next().unwrap_or_else(Reply::upstream_unavailable);
        if !mail_reply.is_positive() {
            // Back to before MAIL; the RCPT lines are read again and get what they would have got.
            self.session = before;
            self.session.mail_done(mail, &mail_reply);
            self.queue(&mail_reply);
            group.taken.extend_from_slice(&self.rbuf);
            self.rbuf = group.taken;
            return;
        }
        self.txn_seq += 1;
        self.txn = Some(Txn::new(ctx, mail, self.ctx.spool.spool()));
        self.queue(&mail_reply);
        self.finish_group(group.planned, upstream, replies.failed).await;
    }

    /// Adds the RCPT lines buffered at the start of the input to `group`, each checked by the session and
    /// the stages as the one-at-a-time path would, within the limits in the module docs.
    pub(super) async fn take_buffered_rcpts(&mut self, ctx: &mut TxnContext, group: &mut Group) {
        while group.planned.len() < self.ctx.session.max_recipients && self.rcpt_buffered() {
            let Some((line, n)) = self.next_line() else { break };
            let mut probe = self.session.clone();
            let Step::Rcpt(rcpt) = probe.command(line) else { break };
            crate::metrics::command(crate::metrics::Verb::from_line(line));
            self.session = probe;
            group.taken.extend_from_slice(&self.rbuf[..n]);
            self.rbuf.advance(n);
            if self.plan_rcpt(ctx, rcpt, group).await {
                break;
            }
        }
    }

    /// Runs the stages on one recipient and adds it to `group`. Returns whether its verdict changed the
    /// transaction (the group must end after it).
    pub(super) async fn plan_rcpt(&mut self, ctx: &mut TxnContext, rcpt: RcptTo, group: &mut Group) -> bool {
        let mark = ctx.mark();
        let verdict = self.ctx.pipeline.rcpt(&self.info, ctx, &rcpt).await;
        let refusal = verdict.refusal().cloned();
        let changed = ctx.mark() != mark;
        group.planned.push(Planned { rcpt, mark, refusal });
        changed
    }

    /// Gives each recipient of a group its reply, in order: its stage's refusal, else the next of the
    /// upstream's `replies`. When those run out, the connection failed within the group (`failed`): the
    /// rest get 4xx, the transaction stays open and the next command replays it on a fresh connection.
    pub(super) async fn finish_group(
        &mut self,
        planned: Vec<Planned>,
        mut replies: impl Iterator<Item = Reply>,
        mut failed: Option<UpstreamError>,
    ) {
        for p in planned {
            let reply = match p.refusal {
                Some(r) => r,
                None => match replies.next() {
                    Some(r) => r,
                    None => {
                        self.upstream = None;
                        match failed.take() {
                            Some(e) => self.upstream_failure(e, Reply::upstream_failed()),
                            None => Reply::upstream_failed(),
                        }
                    }
                },
            };
            self.rcpt_finished(p.rcpt, p.mark, reply).await;
            if self.session.error_limit_reached() {
                // The command loop answers 421 and closes, as it would after this RCPT one at a time.
                break;
            }
        }
    }

    /// Sends MAIL and `rcpts` upstream as one group on the held or a pooled connection; a pooled or held
    /// connection found gone (or answering `421`) before MAIL's reply is replaced once, as in
    /// [`Driver::upstream_mail`]. A failure before MAIL's reply gives moat's `451` as MAIL's reply.
    pub(super) async fn upstream_envelope(&mut self, mail: &MailFrom, rcpts: &[&RcptTo]) -> GroupReplies {
        let unavailable = |reply| GroupReplies { replies: vec![reply], failed: None };
        for attempt in 0..2 {
            let reused = match self.acquire_upstream().await {
                Ok(reused) => reused,
                Err(reply) => return unavailable(reply),
            };
            let Some(conn) = self.upstream.as_mut() else { break };
            let mut group = conn.envelope(mail, rcpts).await;
            let stale = match (group.replies.first(), &group.failed) {
                (Some(r), _) => r.code == 421,
                (None, Some(e)) => e.is_stale_connection(),
                (None, None) => false,
            };
            if stale && attempt == 0 && reused {
                debug!("held or pooled upstream connection was closed by the upstream; reconnecting");
                self.upstream = None;
                continue;
            }
            if group.replies.is_empty() {
                self.upstream = None;
                let reply = match group.failed.take() {
                    Some(e) => self.upstream_failure(e, Reply::upstream_unavailable()),
                    None => Reply::upstream_unavailable(),
                };
                return unavailable(reply);
            }
            return group;
        }
        unavailable(Reply::upstream_unavailable())
    }

    /// A recipient's reply is known (from a stage or the upstream): undoes a refused one's effects, tells
    /// the stages and the session, and queues the reply.
    pub(super) async fn rcpt_finished(&mut self, rcpt: RcptTo, mark: TxnMark, reply: Reply) {
        self.ctx.metrics.recipient(if reply.is_positive() {
            crate::metrics::RcptResult::Accepted
        } else {
            crate::metrics::RcptResult::Rejected
        });
        if let Some(txn) = self.txn.as_mut() {
            if !reply.is_positive() {
                // A refused recipient (by a stage or by the upstream) leaves no tag or score on the message.
                txn.ctx.rollback(mark);
            }
            txn.rcpts.push((rcpt.address.clone(), reply.clone()));
            let outcome = RcptOutcome { rcpt: &rcpt, reply: &reply };
            self.ctx.pipeline.rcpt_done(&self.info, &mut txn.ctx, outcome).await;
        } else {
            debug!("recipient finished without a transaction");
        }
        self.session.rcpt_done(rcpt, &reply);
        self.queue(&reply);
    }
}
