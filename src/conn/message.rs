//! The message side of a connection: reading DATA and BDAT into the spool, the verdict at the end of the
//! header section and at the end of data, the relay upstream (with a rewritten Subject when a verdict asked
//! for one), and the audit record. Split from `conn.rs` to keep each file about one phase.
//!
//! Memory: the spool holds a message within `spool.memory_budget` (spilling past it); the content scan's
//! copy of the message, and its parse, are reserved against the same budget before they are made, so all
//! sessions together stay within it. A scan that finds no room within [`SCAN_BUDGET_WAIT`] is answered
//! `451 4.3.1` (the client retries later) rather than relayed unscanned.

use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes};
use tracing::{debug, info, warn};

use super::{Driver, Stop, Txn, MAX_HEAD};
use crate::audit::{RcptRecord, ReplyRecord, StageRecord, TransactionRecord, UpstreamRecord};
use crate::metrics::MessageVerdict;
use crate::pipeline::subject::{self, SubjectEdit};
use crate::pipeline::{MessageView, TxnEnd, Verdict};
use crate::smtp::codec::{DataDecoder, Framing};
use crate::smtp::Reply;
use crate::trace::{header_section, header_value, push_received, ReceivedInfo};
use crate::upstream::Splice;

/// How long a content scan waits for room in the memory budget. Scans in progress give memory back within
/// milliseconds (about a second for a 25 MiB message), so waiting this long absorbs bursts; past it the
/// machine is short of memory for messages and the sender is better told to retry (it has 10 minutes for
/// the reply to its final dot, RFC 5321 4.5.3.2.6).
const SCAN_BUDGET_WAIT: Duration = Duration::from_secs(2);

/// The scan's reservation per byte scanned: the copy of the message, and mail-parser's decoded parts,
/// which are at most about as large.
const SCAN_MEMORY_FACTOR: u64 = 2;

/// Whether `head` (the start of the message) holds its whole header section: the empty line that ends it
/// was read (a message may also start with it: no headers at all). The bytes before `from` are known not to
/// hold the end (searched on an earlier read), so only the rest is searched.
fn head_complete(head: &[u8], from: usize) -> bool {
    head.starts_with(b"\r\n") || memchr::memmem::find(&head[from.min(head.len())..], b"\r\n\r\n").is_some()
}

/// Where in `out` (the bytes that follow `head`) the header section ends: the length of `out` up to and
/// including the empty line, or `None` if it does not end in `out`. A message may start with the empty
/// line (no header section at all). `head` is known not to hold the end, so only its last three bytes
/// can be part of it: the search never goes back over what an earlier read searched (which would cost
/// quadratic time for a client that sends tiny segments).
fn header_end(head: &[u8], out: &[u8]) -> Option<usize> {
    if head.len() < 2 {
        let want = 2 - head.len();
        if out.len() >= want && [head, &out[..want]].concat() == b"\r\n" {
            return Some(want);
        }
    }
    let tail = &head[head.len().saturating_sub(3)..];
    let mut seam = [0u8; 6];
    let n = tail.len() + out.len().min(3);
    seam[..tail.len()].copy_from_slice(tail);
    seam[tail.len()..n].copy_from_slice(&out[..n - tail.len()]);
    // A match in the seam straddles the two (each side holds at most three bytes of it).
    if let Some(i) = memchr::memmem::find(&seam[..n], b"\r\n\r\n") {
        return Some(i + 4 - tail.len());
    }
    memchr::memmem::find(out, b"\r\n\r\n").map(|i| i + 4)
}

/// The reply when the memory budget has no room for a content scan.
fn scan_budget_exhausted() -> Reply {
    Reply::new(451, "4.3.1 insufficient system resources, try again later")
}

/// The first `window` bytes of the spooled message, for the content stages; `None` if the spool cannot be
/// read (the stages then see the header section only).
async fn scan_window(spool: &mut crate::spool::Spool, window: u64) -> Option<Vec<u8>> {
    let want = usize::try_from(spool.len().min(window)).unwrap_or(usize::MAX);
    if let Some(mem) = spool.memory() {
        return Some(mem[..want.min(mem.len())].to_vec());
    }
    if let Err(e) = spool.rewind().await {
        tracing::warn!(error = %e, "cannot read spooled message for scanning");
        return None;
    }
    let mut out = Vec::with_capacity(want);
    let (mut buf, mut pos) = (Vec::new(), 0u64);
    while out.len() < want {
        match spool.next_chunk(&mut buf, &mut pos).await {
            Ok(Some(chunk)) => out.extend_from_slice(&chunk[..chunk.len().min(want - out.len())]),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read spooled message for scanning");
                return None;
            }
        }
    }
    Some(out)
}

impl Driver {
    /// Prepares the transaction for message bytes.
    pub(super) fn start_body(&mut self, framing: Framing) {
        if let Some(txn) = self.txn.as_mut() {
            if txn.decoder.is_none() {
                txn.decoder = Some(DataDecoder::new(framing, self.ctx.bare_line_endings, self.ctx.max_text_line));
            }
        }
    }

    /// Reads dot-terminated data until `<CRLF>.<CRLF>`, spooling it.
    pub(super) async fn read_dot_data(&mut self) -> Result<(), Stop> {
        loop {
            let (n, end) = self.decode_input(usize::MAX).await?;
            self.rbuf.advance(n);
            if end {
                return Ok(());
            }
            self.read_some(self.ctx.data_timeout, crate::metrics::Limit::DataTimeout).await?;
        }
    }

    /// Feeds up to `max` buffered bytes through the decoder into the spool. Returns (consumed, end seen).
    /// The decoder keeps running on a refused message (it finds the end and enforces the line limits), but
    /// its bytes are dropped.
    async fn decode_input(&mut self, max: usize) -> Result<(usize, bool), Stop> {
        let Some(txn) = self.txn.as_mut() else { return Ok((self.rbuf.len().min(max), false)) };
        let Some(decoder) = txn.decoder.as_mut() else { return Ok((self.rbuf.len().min(max), false)) };
        let take = self.rbuf.len().min(max);
        let input = &self.rbuf[..take];
        let refused_before = txn.too_big || txn.spool_failed || txn.early.is_some() || decoder.refusal().is_some();
        let (head, head_done) = (&mut txn.head, &mut txn.head_done);
        let mut headers_ended = false;
        let mut decode = |out: &mut Vec<u8>| {
            let from = out.len();
            let r = decoder.decode(input, out);
            if !*head_done {
                headers_ended = Self::track_head(head, head_done, &out[from..]);
            }
            (r, out.len() - from)
        };
        // Straight into the spool's buffer when it has room (one copy of the bytes, not two); decoded bytes
        // are at most twice the input (a bare line ending becomes CRLF). A message already refused is not
        // spooled any further: its bytes are decoded into scratch space and dropped.
        let direct = if refused_before { None } else { txn.spool.append_direct(take.saturating_mul(2), &mut decode) };
        let spooled = direct.is_some();
        let ((n, end), produced) = match direct {
            Some(r) => r,
            None => {
                self.scratch.clear();
                decode(&mut self.scratch)
            }
        };
        txn.size += produced as u64;
        let limit = self.ctx.session.max_message_size;
        if txn.size > limit && !txn.too_big {
            txn.too_big = true;
            crate::metrics::limit_hit(crate::metrics::Limit::MaxMessageSize);
        }
        let refused = txn.too_big || txn.spool_failed || txn.decoder.as_ref().and_then(DataDecoder::refusal).is_some();
        if refused && spooled {
            // Refused with this read: what it spooled is never relayed; give the memory back now.
            txn.spool = self.ctx.spool.spool();
        }
        if headers_ended && !refused {
            self.header_verdict().await;
        }
        let Some(txn) = self.txn.as_mut() else { return Ok((n, end)) };
        let stored = if spooled || refused || txn.early.is_some() {
            txn.spool.settle().await
        } else {
            txn.spool.write(&self.scratch).await
        };
        if let Err(e) = stored {
            warn!(error = %e, "cannot spool message");
            txn.spool_failed = true;
        }
        if self.scratch.capacity() > 2 * super::READ_CHUNK {
            self.scratch = Vec::new();
        }
        Ok((n, end))
    }

    /// Keeps the start of the message up to the end of its header section, within [`MAX_HEAD`]. Returns
    /// whether the header section just ended within that bound (a longer one is judged at end of data).
    /// Only the header section is copied, not the body bytes that arrive in the same read.
    fn track_head(head: &mut Vec<u8>, head_done: &mut bool, out: &[u8]) -> bool {
        let room = MAX_HEAD - head.len();
        let end = header_end(head, out);
        head.extend_from_slice(&out[..end.unwrap_or(out.len()).min(room)]);
        let complete = end.is_some_and(|n| n <= room);
        *head_done = complete || head.len() >= MAX_HEAD;
        complete
    }

    /// The header section just ended: the pipeline's header-phase verdict. A final one (refusal, discard)
    /// stops spooling and gives back what was spooled; the client still sends the rest, which is read and
    /// dropped, and gets the reply at the end of the data (RFC 5321 4.1.1.4: DATA is answered after the
    /// final dot). The upstream never sees the message.
    async fn header_verdict(&mut self) {
        let Some(txn) = self.txn.as_mut() else { return };
        let head = header_section(&txn.head);
        let verdict = self.ctx.pipeline.headers(&self.info, &mut txn.ctx, head).await;
        if matches!(verdict, Verdict::Reject(_) | Verdict::Tempfail(_) | Verdict::Discard) {
            debug!(txn.id = %txn.id, verdict = verdict.as_str(), "decided on the headers; dropping the rest");
            txn.spool = self.ctx.spool.spool();
            txn.early = Some(verdict);
        }
    }

    /// Handles `BDAT size [LAST]`: reads exactly `size` octets, then answers.
    pub(super) async fn bdat(&mut self, size: u64, last: bool, refusal: Option<Reply>) -> Result<(), Stop> {
        if refusal.is_none() {
            self.start_body(Framing::Chunked);
        }
        let mut left = size;
        while left > 0 {
            if self.rbuf.is_empty() {
                self.read_some(self.ctx.data_timeout, crate::metrics::Limit::DataTimeout).await?;
            }
            let take = self.rbuf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = if refusal.is_some() { take } else { self.decode_input(take).await?.0 };
            self.rbuf.advance(n);
            left -= n as u64;
        }
        if let Some(r) = refusal {
            self.queue(&r);
            return Ok(());
        }
        let early_refusal = self.txn.as_ref().is_some_and(|t| t.early.as_ref().is_some_and(|v| v.refusal().is_some()));
        if early_refusal && !last {
            // RFC 3030 2: a chunk may be refused, which ends the transaction; no need to take more chunks.
            self.end_of_message().await;
            self.session.abort_transaction();
            return Ok(());
        }
        let too_big = self.txn.as_ref().is_some_and(|t| t.too_big);
        if too_big && !last {
            // RFC 3030 2: a failed chunk ends the transaction; later chunks get 503.
            self.queue(&Reply::too_big(self.ctx.session.max_message_size));
            self.session.abort_transaction();
            return Ok(());
        }
        if last {
            if let Some(txn) = self.txn.as_mut() {
                let mut out = Vec::new();
                if let Some(d) = txn.decoder.as_mut() {
                    d.finish(&mut out);
                }
                txn.size += out.len() as u64;
                let refused = txn.too_big || txn.spool_failed || txn.early.is_some();
                if !refused && txn.decoder.as_ref().and_then(DataDecoder::refusal).is_none() {
                    let _ = txn.spool.write(&out).await;
                }
            }
            self.end_of_message().await;
        } else {
            self.queue(&Reply::chunk_ok(size));
        }
        Ok(())
    }

    /// The message is complete: verdict, relay, reply, audit.
    pub(super) async fn end_of_message(&mut self) {
        let Some(mut txn) = self.txn.take() else {
            self.session.message_done();
            return;
        };
        let (reply, verdict, upstream) = self.judge_and_relay(&mut txn).await;
        self.session.message_done();
        self.ctx.metrics.message(verdict, txn.size);
        self.ctx.metrics.received_bytes(txn.size);
        info!(txn.id = %txn.id, size = txn.size, rcpt.count = txn.rcpts.len(), verdict = verdict.as_str(), reply.code = reply.code, "message");
        self.audit(&txn, verdict.as_str(), &reply, upstream);
        let rcpts: Vec<String> = txn.rcpts.iter().filter(|(_, r)| r.is_positive()).map(|(a, _)| a.clone()).collect();
        let end =
            TxnEnd { reply: Some(&reply), relayed: verdict == MessageVerdict::Accepted, size: txn.size, rcpts: &rcpts };
        self.ctx.pipeline.txn_end(&self.info, &mut txn.ctx, end).await;
        self.queue(&reply);
        if self.ctx.pool.has_waiters() {
            // Someone waits for an upstream connection (all `upstream.max_connections` open): give this one
            // back between transactions (closed, its slot to the waiter) rather than hold it while idle.
            if let Some(conn) = self.upstream.take() {
                self.ctx.pool.checkin(conn).await;
            }
        }
        self.shrink_read_buffer();
    }

    /// After a message, a read buffer grown for its data goes back to the command-phase size, so an idle
    /// connection does not keep it.
    fn shrink_read_buffer(&mut self) {
        if self.rbuf.capacity() > 2 * super::READ_CHUNK && self.rbuf.len() <= super::READ_CHUNK {
            let mut small = bytes::BytesMut::with_capacity(super::READ_CHUNK);
            small.extend_from_slice(&self.rbuf);
            self.rbuf = small;
        }
    }

    /// Decides and, if accepted, relays. Returns the client's reply, the verdict label and the upstream reply.
    async fn judge_and_relay(&mut self, txn: &mut Txn) -> (Reply, MessageVerdict, Option<Reply>) {
        let refusal = match txn.decoder.as_ref().and_then(DataDecoder::refusal) {
            Some(r) => Some(r),
            None if txn.spool_failed => Some(Reply::insufficient_storage()),
            None if txn.too_big => Some(Reply::too_big(self.ctx.session.max_message_size)),
            None => None,
        };
        if let Some(r) = refusal.or_else(|| self.header_from_refusal(header_section(&txn.head))) {
            self.reset_upstream().await;
            return (r, MessageVerdict::Rejected, None);
        }
        let verdict = match txn.early.take() {
            Some(v) => v,
            None => match self.end_of_data_verdict(txn).await {
                Ok(v) => v,
                Err(r) => return (r, MessageVerdict::Tempfailed, None),
            },
        };
        if let Err(r) = self.quarantine_copy(txn, &verdict).await {
            return (r, MessageVerdict::Tempfailed, None);
        }
        if let Some((reply, label)) = self.final_reply(verdict).await {
            return (reply, label, None);
        }
        let mut prefix = self.prefix(txn);
        if let Some(req) = txn.ctx.ext.remove::<crate::dkim::SignRequest>() {
            prefix.push_str(&crate::dkim::sign_spool(&req, &mut txn.spool).await.unwrap_or_default());
        }
        let splice = match Self::subject_edit(txn) {
            SubjectEdit::Replace(s) => Some(s),
            SubjectEdit::Add(line) => {
                prefix.push_str(&line);
                None
            }
            SubjectEdit::Keep => None,
        };
        let removals = txn.ctx.ext.get::<crate::pipeline::header_edit::RemoveFields>().map(|r| r.0.as_slice());
        let splice = crate::pipeline::header_edit::merge(header_section(&txn.head), splice, removals.unwrap_or(&[]));
        let archived = match self.archive_copy(txn).await {
            Ok(a) => a,
            Err(r) => return (r, MessageVerdict::Tempfailed, None),
        };
        let relayed = self.relay(prefix.as_bytes(), splice.as_ref(), archived.bcc.as_ref(), txn).await;
        if !relayed.as_ref().is_ok_and(Reply::is_positive) {
            super::copies::archive_undo(archived).await;
        }
        let reply = match relayed {
            Ok(r) => r,
            Err(ours) => return (ours, MessageVerdict::Tempfailed, None),
        };
        if !reply.is_positive() {
            // A refused DATA leaves MAIL/RCPT open upstream (Postfix keeps them): reset before reuse.
            self.reset_upstream().await;
        }
        let verdict = match &reply {
            r if r.is_positive() => MessageVerdict::Accepted,
            r if r.is_permanent() => MessageVerdict::Rejected,
            _ => MessageVerdict::Tempfailed,
        };
        (reply.clone(), verdict, Some(reply))
    }

    /// The pipeline's end-of-data verdict on the message: its header section, and the scan window when a
    /// stage asked for one. The scan's memory is reserved against the spool budget first and given back
    /// before the relay; `Err` is the reply when there is no room (the upstream transaction is reset).
    async fn end_of_data_verdict(&mut self, txn: &mut Txn) -> Result<Verdict, Reply> {
        // Capped so that one scan always fits in an otherwise idle budget.
        let budget = &self.ctx.spool;
        let window = self.ctx.pipeline.scan_window(&txn.ctx).map(|w| w.min(budget.capacity() / SCAN_MEMORY_FACTOR));
        let (data, reservation) = match window {
            Some(window) => {
                // The message's own in-memory spool already holds budget for about one copy: count it, or
                // a message above a third of the budget could never be scanned even on an idle server.
                let want = (txn.spool.len().min(window) * SCAN_MEMORY_FACTOR).saturating_sub(txn.spool.reserved());
                let Some(r) = budget.reserve(want, SCAN_BUDGET_WAIT).await else {
                    let in_use = budget.in_use();
                    warn!(txn.id = %txn.id, size = txn.size, in_use, "spool.memory_budget full, cannot scan");
                    self.reset_upstream().await;
                    return Err(scan_budget_exhausted());
                };
                (scan_window(&mut txn.spool, window).await.map(Bytes::from), Some(r))
            }
            None => (None, None),
        };
        let head = header_section(&txn.head);
        let view = MessageView { head, data, size: txn.size };
        let verdict = self.ctx.pipeline.end_of_data(&self.info, &mut txn.ctx, &view).await;
        // The scanned copy and its reservation go before the (possibly slow) relay.
        drop(view);
        drop(reservation);
        Ok(verdict)
    }

    /// The client's reply for a verdict that stops the message (the upstream transaction is reset), with its
    /// label; `None` when the message goes on to the upstream.
    async fn final_reply(&mut self, verdict: Verdict) -> Option<(Reply, MessageVerdict)> {
        let out = match verdict {
            Verdict::Reject(r) => (r, MessageVerdict::Rejected),
            Verdict::Tempfail(r) => (r, MessageVerdict::Tempfailed),
            // Acknowledged but never relayed (DESIGN.md invariant 2); the audit record says "discarded".
            Verdict::Discard => (Reply::new(250, "2.0.0 Ok"), MessageVerdict::Discarded),
            Verdict::Accept | Verdict::Continue => return None,
        };
        self.reset_upstream().await;
        Some(out)
    }

    /// How the Subject changes on the way upstream: only when a verdict asked for a prefix.
    fn subject_edit(txn: &Txn) -> SubjectEdit {
        let Some(prefix) = txn.ctx.subject_prefix.as_deref() else { return SubjectEdit::Keep };
        let head = header_section(&txn.head);
        let whole_message = txn.head.len() as u64 == txn.size;
        subject::plan(head, whole_message || head_complete(head, 0), prefix)
    }

    /// Sends the message upstream and returns the upstream's reply. A connection the upstream dropped
    /// while the client was still sending (Postfix's `smtpd_timeout`, a restart) shows at the DATA command,
    /// before any message byte went out; then the transaction is replayed once on a fresh connection.
    /// `Err` is moat's own reply for the client, already logged.
    /// `bcc`: the archive recipient to add first, and whether it must be accepted.
    async fn relay(
        &mut self,
        prefix: &[u8],
        splice: Option<&Splice>,
        bcc: Option<&(String, bool)>,
        txn: &mut Txn,
    ) -> Result<Reply, Reply> {
        for attempt in 0..2 {
            let conn = self.upstream_for_txn().await?;
            if let Some((addr, required)) = bcc {
                if let Err((reply, drop_conn)) = super::copies::add_bcc(conn, addr, *required).await {
                    if drop_conn {
                        self.upstream = None;
                    }
                    return Err(reply);
                }
            }
            match conn.send_message(prefix, &mut txn.spool, splice).await {
                Ok(r) if r.code == 421 && attempt == 0 => self.upstream = None,
                Err(e) if attempt == 0 && e.is_lost_before_message() => self.upstream = None,
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.upstream = None;
                    return Err(self.upstream_failure(e, Reply::upstream_failed()));
                }
            }
            tracing::debug!("upstream connection lost before the message; replaying the transaction");
        }
        Err(Reply::upstream_failed())
    }

    /// The header lines moat prepends: its Received header and whatever the verdicts added.
    fn prefix(&mut self, txn: &Txn) -> String {
        let mut out = String::new();
        if self.ctx.received_header {
            let helo = self.session.helo();
            let mut accepted = txn.rcpts.iter().filter(|(_, r)| r.is_positive()).map(|(a, _)| a.as_str());
            let info = ReceivedInfo {
                helo: helo.map(|h| h.name.as_str()),
                client_name: self.info.name.as_deref(),
                peer: self.info.peer,
                hostname: &self.ctx.session.hostname,
                esmtp: helo.is_some_and(|h| h.extended),
                tls: self.tls.as_ref(),
                authenticated: self.session.user().is_some(),
                id: &txn.id,
                single_rcpt: match (accepted.next(), accepted.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                },
            };
            push_received(&mut self.received, &info, SystemTime::now(), &mut out);
        }
        for h in &txn.ctx.add_headers {
            out.push_str(h);
        }
        out
    }

    /// Aborts the upstream side of a transaction that will not be sent (nothing gets queued).
    pub(super) async fn reset_upstream(&mut self) {
        if let Some(conn) = self.upstream.as_mut() {
            if conn.in_transaction() && conn.reset().await.is_err() {
                self.upstream = None;
            }
        }
    }

    /// Drops the open transaction (RSET, EHLO, client gone) and resets the upstream.
    pub(super) async fn abort_txn(&mut self, why: &'static str) {
        if let Some(mut txn) = self.txn.take() {
            debug!(txn.id = %txn.id, why, "transaction aborted");
            self.ctx.metrics.message(crate::metrics::MessageVerdict::Aborted, txn.size);
            let reply = Reply::new(0, why);
            self.audit(&txn, "aborted", &reply, None);
            let end = TxnEnd { reply: None, relayed: false, size: txn.size, rcpts: &[] };
            self.ctx.pipeline.txn_end(&self.info, &mut txn.ctx, end).await;
        }
        self.reset_upstream().await;
    }

    fn audit(&self, txn: &Txn, verdict: &'static str, reply: &Reply, upstream: Option<Reply>) {
        let head = header_section(&txn.head);
        let rec = TransactionRecord {
            conn_id: self.conn_id.as_str().into(),
            txn_id: txn.id.as_str().into(),
            listener: (*self.ctx.name).into(),
            client_ip: self.info.peer.ip().to_string(),
            client_port: self.info.peer.port(),
            client_name: self.info.name.as_deref().map(Into::into),
            helo: self.session.helo().map(|h| h.name.as_str().into()),
            tls: self
                .tls
                .as_ref()
                .map(|t| crate::audit::TlsRecord { version: t.version.to_string(), cipher: t.cipher.clone() }),
            auth_user: self.session.user().map(Into::into),
            mail_from: txn.mail.address.as_str().into(),
            rcpts: txn
                .rcpts
                .iter()
                .map(|(a, r)| RcptRecord {
                    address: a.as_str().into(),
                    reply_code: r.code,
                    reply_text: r.lines.join(" "),
                })
                .collect(),
            size: txn.size,
            message_id: header_value(head, "Message-ID"),
            subject_digest: header_value(head, "Subject").map(|s| crate::audit::digest(&s)),
            stages: txn
                .ctx
                .records
                .iter()
                .map(|s| StageRecord {
                    stage: s.stage.into(),
                    phase: s.phase.into(),
                    verdict: s.verdict.into(),
                    micros: s.micros,
                })
                .collect(),
            verdict: verdict.into(),
            reply: ReplyRecord { code: reply.code, text: reply.lines.join(" ") },
            upstream: upstream.map(|u| {
                let text = u.lines.join(" ");
                UpstreamRecord { code: u.code, queue_id: crate::audit::queue_id_from_reply(&text), text }
            }),
            ..TransactionRecord::new(txn.started)
        };
        self.ctx.audit.record(&rec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_end_across_reads() {
        assert_eq!(header_end(b"", b"\r\nbody"), Some(2), "no header section at all");
        assert_eq!(header_end(b"\r", b"\nbody"), Some(1));
        assert_eq!(header_end(b"Subject: a\r", b"\n\r\nbody"), Some(3));
        assert_eq!(header_end(b"Subject: a\r\n\r", b"\nbody"), Some(1));
        assert_eq!(header_end(b"Subject: a\r\n", b"To: b\r\n\r\nbody"), Some(9));
        assert_eq!(header_end(b"Subject: a\r\n", b"To: b\r\n"), None);
        assert_eq!(header_end(b"Subject: a", b""), None);
    }

    proptest! {
        /// Read by read, the kept head is the header section of the whole message (no body bytes), and it
        /// completes exactly when the empty line has arrived.
        #[test]
        fn track_head_keeps_the_header_section(
            lines in proptest::collection::vec(prop_oneof![Just("A: b\r\n"), Just("\r\n"), Just("x\r\n"), Just("\r")], 0..12),
            cuts in proptest::collection::vec(0usize..40, 0..6),
        ) {
            let msg: Vec<u8> = lines.concat().into_bytes();
            let (mut head, mut done, mut completed_at) = (Vec::new(), false, None);
            let mut at = 0;
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(msg.len())).collect();
            bounds.push(msg.len());
            bounds.sort_unstable();
            for b in bounds {
                if b < at || done {
                    continue;
                }
                if Driver::track_head(&mut head, &mut done, &msg[at..b]) {
                    completed_at = Some(b);
                }
                at = b;
            }
            let whole = header_section(&msg);
            let ends = msg.starts_with(b"\r\n") || memchr::memmem::find(&msg, b"\r\n\r\n").is_some();
            prop_assert_eq!(completed_at.is_some(), ends);
            if ends {
                prop_assert_eq!(&head[..], whole);
                prop_assert!(completed_at.unwrap() >= whole.len());
            } else {
                prop_assert_eq!(&head[..], &msg[..]);
            }
        }
    }
}
