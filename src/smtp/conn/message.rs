//! The message side of a connection: reading DATA and BDAT into the spool, the end-of-data verdict, the
//! relay upstream, and the audit record. Split from `conn.rs` to keep each file about one phase.

use std::time::SystemTime;

use bytes::Buf;
use tracing::{debug, info};

use super::{Driver, Stop, Txn, MAX_HEAD};
use crate::audit::{RcptRecord, ReplyRecord, StageRecord, TransactionRecord, UpstreamRecord};
use crate::metrics::MessageVerdict;
use crate::pipeline::{MessageView, Verdict};
use crate::smtp::codec::{DataDecoder, Framing};
use crate::smtp::Reply;
use crate::trace::{header_section, header_value, received_header, ReceivedInfo};

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
    async fn decode_input(&mut self, max: usize) -> Result<(usize, bool), Stop> {
        let Some(txn) = self.txn.as_mut() else { return Ok((self.rbuf.len().min(max), false)) };
        let Some(decoder) = txn.decoder.as_mut() else { return Ok((self.rbuf.len().min(max), false)) };
        let take = self.rbuf.len().min(max);
        let mut out = Vec::with_capacity(take + 64);
        let (n, end) = decoder.decode(&self.rbuf[..take], &mut out);
        txn.size += out.len() as u64;
        let limit = self.ctx.session.max_message_size;
        if txn.size > limit && !txn.too_big {
            txn.too_big = true;
            crate::metrics::limit_hit(crate::metrics::Limit::MaxMessageSize);
        }
        let refused = txn.too_big || txn.spool_failed || decoder.refusal().is_some();
        if !txn.head_done {
            let room = MAX_HEAD - txn.head.len();
            txn.head.extend_from_slice(&out[..out.len().min(room)]);
            txn.head_done = txn.head.len() >= MAX_HEAD || header_section(&txn.head).len() < txn.head.len();
        }
        if !refused {
            // A message already refused is not spooled any further: its bytes are read and dropped.
            if let Err(e) = txn.spool.write(&out).await {
                tracing::warn!(error = %e, "cannot spool message");
                txn.spool_failed = true;
            }
        }
        Ok((n, end))
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
                if !txn.too_big && !txn.spool_failed && txn.decoder.as_ref().and_then(DataDecoder::refusal).is_none() {
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
        crate::metrics::message(&self.ctx.name, verdict, txn.size);
        crate::metrics::received_bytes(&self.ctx.name, txn.size);
        info!(txn.id = %txn.id, size = txn.size, rcpt.count = txn.rcpts.len(), verdict = verdict.as_str(), reply.code = reply.code, "message");
        self.audit(&txn, verdict.as_str(), &reply, upstream);
        self.queue(&reply);
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
        let head = header_section(&txn.head).to_vec();
        let data = match self.ctx.pipeline.scan_window() {
            Some(window) => scan_window(&mut txn.spool, window).await,
            None => None,
        };
        let view = MessageView { head: &head, data: data.as_deref(), size: txn.size };
        match self.ctx.pipeline.end_of_data(&self.info, &mut txn.ctx, &view).await {
            Verdict::Reject(r) => {
                self.reset_upstream().await;
                return (r, MessageVerdict::Rejected, None);
            }
            Verdict::Tempfail(r) => {
                self.reset_upstream().await;
                return (r, MessageVerdict::Tempfailed, None);
            }
            Verdict::Discard => {
                // Acknowledged but never relayed (DESIGN.md invariant 2); the audit record says "discarded".
                self.reset_upstream().await;
                return (Reply::new(250, "2.0.0 Ok"), MessageVerdict::Discarded, None);
            }
            Verdict::Accept | Verdict::Continue => {}
        }
        let prefix = self.prefix(txn);
        let reply = match self.relay(prefix.as_bytes(), txn).await {
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

    /// Sends the message upstream and returns the upstream's reply. A connection the upstream dropped
    /// while the client was still sending (Postfix's `smtpd_timeout`, a restart) shows at the DATA command,
    /// before any message byte went out; then the transaction is replayed once on a fresh connection.
    /// `Err` is moat's own reply for the client, already logged.
    async fn relay(&mut self, prefix: &[u8], txn: &mut Txn) -> Result<Reply, Reply> {
        for attempt in 0..2 {
            let conn = self.upstream_for_txn().await?;
            match conn.send_message(prefix, &mut txn.spool).await {
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
    fn prefix(&self, txn: &Txn) -> String {
        let mut out = String::new();
        if self.ctx.received_header {
            let helo = self.session.helo();
            let accepted: Vec<&str> =
                txn.rcpts.iter().filter(|(_, r)| r.is_positive()).map(|(a, _)| a.as_str()).collect();
            let info = ReceivedInfo {
                helo: helo.map(|h| h.name.as_str()),
                client_name: self.info.name.as_deref(),
                peer: self.info.peer,
                hostname: &self.ctx.session.hostname,
                esmtp: helo.is_some_and(|h| h.extended),
                tls: self.tls.as_ref(),
                authenticated: self.session.user().is_some(),
                id: &txn.id,
                single_rcpt: (accepted.len() == 1).then(|| accepted[0]),
            };
            out.push_str(&received_header(&info, SystemTime::now()));
        }
        for h in &txn.ctx.add_headers {
            out.push_str(h);
        }
        out
    }

    /// Aborts the upstream side of a transaction that will not be sent (nothing gets queued).
    async fn reset_upstream(&mut self) {
        if let Some(conn) = self.upstream.as_mut() {
            if conn.in_transaction() && conn.reset().await.is_err() {
                self.upstream = None;
            }
        }
    }

    /// Drops the open transaction (RSET, EHLO, client gone) and resets the upstream.
    pub(super) async fn abort_txn(&mut self, why: &'static str) {
        if let Some(txn) = self.txn.take() {
            debug!(txn.id = %txn.id, why, "transaction aborted");
            crate::metrics::message(&self.ctx.name, crate::metrics::MessageVerdict::Aborted, txn.size);
            let reply = Reply::new(0, why);
            self.audit(&txn, "aborted", &reply, None);
        }
        self.reset_upstream().await;
    }

    fn audit(&self, txn: &Txn, verdict: &'static str, reply: &Reply, upstream: Option<Reply>) {
        let head = header_section(&txn.head);
        let rec = TransactionRecord {
            conn_id: self.conn_id.clone(),
            txn_id: txn.id.clone(),
            listener: self.ctx.name.to_string(),
            client_ip: self.info.peer.ip().to_string(),
            client_port: self.info.peer.port(),
            client_name: self.info.name.clone(),
            helo: self.session.helo().map(|h| h.name.clone()),
            tls: self
                .tls
                .as_ref()
                .map(|t| crate::audit::TlsRecord { version: t.version.to_string(), cipher: t.cipher.clone() }),
            auth_user: self.session.user().map(str::to_string),
            mail_from: txn.mail.address.clone(),
            rcpts: txn
                .rcpts
                .iter()
                .map(|(a, r)| RcptRecord { address: a.clone(), reply_code: r.code, reply_text: r.lines.join(" ") })
                .collect(),
            size: txn.size,
            message_id: header_value(head, "Message-ID"),
            subject_digest: header_value(head, "Subject").map(|s| crate::audit::digest(&s)),
            stages: txn
                .ctx
                .records
                .iter()
                .map(|s| StageRecord {
                    stage: s.stage.to_string(),
                    phase: s.phase.to_string(),
                    verdict: s.verdict.to_string(),
                    micros: s.micros,
                })
                .collect(),
            verdict: verdict.to_string(),
            reply: ReplyRecord { code: reply.code, text: reply.lines.join(" ") },
            upstream: upstream.map(|u| UpstreamRecord {
                code: u.code,
                queue_id: crate::audit::queue_id_from_reply(&u.lines.join(" ")),
                text: u.lines.join(" "),
            }),
            ..TransactionRecord::new(txn.started)
        };
        self.ctx.audit.record(&rec);
    }
}
