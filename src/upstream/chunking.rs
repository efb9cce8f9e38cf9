//! Sending the message with BDAT (RFC 3030 CHUNKING) when the upstream offers it and `upstream.chunking`
//! is on (Postfix offers it since 3.4).
//!
//! The size is known before the first byte goes out (moat's prefix, the spooled message, and the
//! [`Splice`] that rewrites a Subject), so the whole message is one `BDAT <size> LAST` chunk: the command
//! and the first bytes of the message in one write, the message raw (no dot-stuffing: BDAT counts
//! octets), and ONE reply, the upstream's final word on the transaction. Compared with DATA that saves the
//! round trip for `354` and the stuffing pass over every byte.
//!
//! Replies and errors are those of the DATA path, so the session cannot tell the two apart: a refused
//! BDAT is reported as a refused DATA would be (counted under `phase="data"`, the reply passed through,
//! the transaction left open for RSET, as RFC 3030 4.1 wants after a failed chunk), a positive reply means
//! the upstream took the whole message, and a connection lost before anything was written is
//! `Io { phase: Data }` (replayed on a fresh connection, [`UpstreamError::is_lost_before_message`]).

use std::pin::Pin;
use std::task::Poll;

use tokio::io::AsyncBufRead;

use super::{Connection, Phase, Splice, UpstreamError};
use crate::metrics::UpstreamPhase;
use crate::smtp::Reply;
use crate::spool::{Spool, FILE_CHUNK};

impl Connection {
    /// Whether the next message goes with BDAT: the upstream offered CHUNKING and it is not turned off.
    pub(super) fn use_bdat(&self) -> bool {
        self.settings.chunking && self.ext.chunking
    }

    /// [`Connection::send_message`] with `BDAT <size> LAST`: `prefix` and the spooled message (with
    /// `splice` applied) go raw, in one write for most messages and in [`FILE_CHUNK`] pieces past that.
    pub(super) async fn send_message_bdat(
        &mut self,
        prefix: &[u8],
        spool: &mut Spool,
        splice: Option<&Splice>,
    ) -> Result<Reply, UpstreamError> {
        let start = std::time::Instant::now();
        if let Some(reply) = self.unsolicited().await? {
            crate::metrics::upstream_reply(UpstreamPhase::Data, reply.code);
            if reply.is_positive() {
                return Err(UpstreamError::Protocol {
                    phase: Phase::Data,
                    what: format!("unsolicited {} before BDAT", reply.code),
                });
            }
            return Ok(reply);
        }
        let io_err = |source| UpstreamError::Io { phase: Phase::Message, source };
        spool.rewind().await.map_err(io_err)?;
        let body = splice.map_or(spool.len(), |s| s.relayed_len(spool.len()));
        let size = prefix.len() as u64 + body;
        let command = format!("BDAT {size} LAST\r\n");
        let mut wire = Vec::with_capacity(command.len() + usize::try_from(size).unwrap_or(usize::MAX).min(FILE_CHUNK));
        wire.extend_from_slice(command.as_bytes());
        wire.extend_from_slice(prefix);
        // Message bytes passed to the wire so far; never more than `size` may be written.
        let mut counted = prefix.len() as u64;
        let (mut buf, mut pos, mut at) = (Vec::new(), 0u64, 0u64);
        while let Some(chunk) = spool.next_chunk(&mut buf, &mut pos).await.map_err(io_err)? {
            for piece in chunk.chunks(FILE_CHUNK) {
                let piece_at = at;
                at += piece.len() as u64;
                if splice.is_none() && wire.is_empty() && piece.len() == FILE_CHUNK {
                    // A whole piece of a large message: straight from the spool, without a copy.
                    counted += piece.len() as u64;
                    check_size(counted, size)?;
                    self.write(piece, Phase::Message).await?;
                    continue;
                }
                let before = wire.len();
                match splice {
                    Some(s) => s.apply(piece, piece_at, |b| wire.extend_from_slice(b)),
                    None => wire.extend_from_slice(piece),
                }
                counted += (wire.len() - before) as u64;
                check_size(counted, size)?;
                if wire.len() >= FILE_CHUNK {
                    self.write(&wire, Phase::Message).await?;
                    wire.clear();
                }
            }
        }
        if counted != size {
            // Nothing more is written: the upstream waits for the missing bytes, and the caller drops the
            // connection with the error, so the short message is never taken.
            return Err(size_mismatch(counted, size));
        }
        self.write(&wire, Phase::Message).await?;
        self.flush(Phase::Message).await?;
        let reply = self.read_reply(Phase::Message, self.settings.data_timeout).await?;
        // A refused chunk leaves the transaction to be reset (RFC 3030 4.1); an accepted one ends it.
        self.in_transaction = !reply.is_positive();
        crate::metrics::upstream_reply(UpstreamPhase::Data, reply.code);
        crate::metrics::upstream_transaction_seconds(start.elapsed());
        Ok(reply)
    }

    /// What the upstream said, or that it hung up, although moat asked nothing since its last reply: the
    /// `421` and close of a Postfix whose `smtpd_timeout` ran out while the client was still sending.
    /// With DATA that shows as the reply to DATA, before any message byte is sent; BDAT sends the message
    /// with the command, so look first. Costs no system call when nothing arrived (the socket is not
    /// readable, and one poll returns at once). A reply is read as the reply to DATA would be; a
    /// connection found gone is `Io { phase: Data }`.
    async fn unsolicited(&mut self) -> Result<Option<Reply>, UpstreamError> {
        let io = &mut self.io;
        let waiting = std::future::poll_fn(|cx| {
            // Ready = bytes buffered or arrived, the end of the stream, or an error: anything but silence.
            Poll::Ready(Pin::new(&mut *io).poll_fill_buf(cx).is_ready())
        })
        .await;
        if !waiting {
            return Ok(None);
        }
        self.read_reply(Phase::Data, self.settings.command_timeout).await.map(Some)
    }
}

fn check_size(counted: u64, size: u64) -> Result<(), UpstreamError> {
    if counted > size {
        return Err(size_mismatch(counted, size));
    }
    Ok(())
}

/// The bytes counted do not match the size announced: a bug, caught before the upstream could take a
/// wrong message.
fn size_mismatch(counted: u64, size: u64) -> UpstreamError {
    UpstreamError::Protocol {
        phase: Phase::Message,
        what: format!("message is {counted} bytes, BDAT announced {size}"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::UpstreamConfig;
    use crate::spool::SpoolBudget;
    use crate::upstream::UpstreamSettings;

    /// A one-connection upstream offering CHUNKING that takes one `BDAT <n> LAST` and its `n` octets,
    /// answers `reply`, and returns the command line and the octets.
    async fn upstream(reply: &'static str) -> (SocketAddr, tokio::task::JoinHandle<(String, Vec<u8>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut io = BufReader::new(tcp);
            io.get_mut().write_all(b"220 fake ESMTP\r\n").await.unwrap();
            let mut line = String::new();
            io.read_line(&mut line).await.unwrap();
            assert!(line.starts_with("EHLO"), "{line}");
            io.get_mut().write_all(b"250-fake\r\n250-PIPELINING\r\n250 CHUNKING\r\n").await.unwrap();
            line.clear();
            io.read_line(&mut line).await.unwrap();
            let n: usize = line.split(' ').nth(1).unwrap().parse().unwrap();
            let mut data = vec![0; n];
            io.read_exact(&mut data).await.unwrap();
            io.get_mut().write_all(reply.as_bytes()).await.unwrap();
            (line.trim_end().to_owned(), data)
        });
        (addr, task)
    }

    async fn connect(addr: SocketAddr) -> Connection {
        let config = UpstreamConfig { address: addr, ..UpstreamConfig::default() };
        let settings = Arc::new(UpstreamSettings::from_config(&config, "moat.test").unwrap());
        let conn = Connection::connect(settings, None).await.unwrap();
        assert!(conn.extensions().chunking && conn.use_bdat());
        conn
    }

    /// A message of `len` bytes of numbered lines, some starting with ".".
    fn message(len: usize) -> Vec<u8> {
        let mut m = b"Subject: hello\r\n\r\n".to_vec();
        let mut i = 0;
        while m.len() < len {
            m.extend_from_slice(format!("{}line {i}\r\n", if i % 3 == 0 { "." } else { "" }).as_bytes());
            i += 1;
        }
        m
    }

    /// In memory and spilled (several spool blocks and FILE_CHUNK pieces), with and without a splice: the
    /// upstream gets exactly prefix + message (splice applied), raw, and the count BDAT announced.
    #[tokio::test]
    async fn the_announced_size_and_the_bytes_match_in_memory_and_spilled() {
        let with = b"Subject: [SPAM] hello\r\n".to_vec();
        for (len, threshold) in [(2_000, 1 << 20), (700_000, 64 * 1024)] {
            for splice in [None, Some(Splice { start: 0, end: 16, with: with.clone() })] {
                let budget = SpoolBudget::new(4 << 20, threshold, None);
                let mut spool = budget.spool();
                let msg = message(len);
                spool.write(&msg).await.unwrap();
                assert_eq!(spool.spilled(), threshold < len as u64);
                let (addr, server) = upstream("250 2.0.0 Ok: queued\r\n").await;
                let mut conn = connect(addr).await;
                let reply = conn.send_message(b"X-Prefix: 1\r\n", &mut spool, splice.as_ref()).await.unwrap();
                assert_eq!(reply.code, 250);
                assert!(!conn.in_transaction());
                let (command, got) = server.await.unwrap();
                let mut want = b"X-Prefix: 1\r\n".to_vec();
                match &splice {
                    Some(s) => s.apply(&msg, 0, |b| want.extend_from_slice(b)),
                    None => want.extend_from_slice(&msg),
                }
                assert_eq!(command, format!("BDAT {} LAST", want.len()));
                assert!(got == want, "{len} bytes, splice {}: the upstream got other bytes", splice.is_some());
            }
        }
    }

    /// A refused BDAT is returned as the reply (like a refused DATA) and leaves the transaction to reset.
    #[tokio::test]
    async fn a_refusal_is_a_reply_and_the_transaction_stays_open() {
        let (addr, server) = upstream("554 5.5.1 Error: no valid recipients\r\n").await;
        let mut conn = connect(addr).await;
        conn.in_transaction = true;
        let budget = SpoolBudget::new(1 << 20, 1 << 20, None);
        let mut spool = budget.spool();
        spool.write(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
        let reply = conn.send_message(b"", &mut spool, None).await.unwrap();
        assert_eq!(reply.code, 554);
        assert!(conn.in_transaction());
        assert_eq!(server.await.unwrap().0, "BDAT 20 LAST");
    }
}
