//! Copies of a message taken at the end of data, before the client's reply: the quarantine copy a
//! `quarantine` rule asked for ([`crate::quarantine`]) and the archive copy ([`crate::archive`]). A copy
//! is the whole message streamed from the spool, as the relay sends it; a copy that cannot be made is
//! moat's own failure, `451 4.3.0` (for the archive: when it is `required`).

use tracing::{info, warn};

use super::{Driver, Txn};
use crate::archive::dir::Written;
use crate::archive::Selection;
use crate::metrics::{ArchiveMode, CopyResult};
use crate::pipeline::Verdict;
use crate::quarantine::{ClientFacts, Hold, Meta};
use crate::smtp::command::Body;
use crate::smtp::command::RcptTo;
use crate::smtp::Reply;
use crate::trace::{header_section, header_value};
use crate::upstream::Connection;

impl Driver {
    /// Writes the quarantine copy when the rules asked for one and `verdict` still lets the message pass
    /// or discards it (a refusal wins: nothing is held for a message the client is told was refused).
    /// `Err` is the client's reply when the copy failed.
    pub(super) async fn quarantine_copy(&mut self, txn: &mut Txn, verdict: &Verdict) -> Result<(), Reply> {
        let Some(hold) = txn.ctx.ext.remove::<Hold>() else { return Ok(()) };
        if matches!(verdict, Verdict::Reject(_) | Verdict::Tempfail(_)) {
            return Ok(());
        }
        let Some(store) = self.ctx.quarantine.clone() else { return Ok(()) };
        let verdict = if hold.deliver { "quarantine-deliver" } else { "quarantine" };
        let meta = self.copy_meta(txn, verdict);
        match store.put(meta, &mut txn.spool).await {
            Ok(id) => {
                crate::metrics::quarantine_write(CopyResult::Ok);
                info!(txn.id = %txn.id, quarantine.id = %id, size = txn.size, deliver = hold.deliver, "message quarantined");
                Ok(())
            }
            Err(e) => {
                crate::metrics::quarantine_write(CopyResult::Error);
                warn!(txn.id = %txn.id, error = %e, source = ?std::error::Error::source(&e), "cannot quarantine message");
                self.reset_upstream().await;
                Err(Reply::local_error())
            }
        }
    }

    /// The envelope, client and verdict facts of a copy.
    fn copy_meta(&self, txn: &Txn, verdict: &str) -> Meta {
        let head = header_section(&txn.head);
        let helo = self.session.helo();
        Meta {
            client: ClientFacts {
                listener: self.ctx.name.to_string(),
                ip: self.info.peer.ip().to_string(),
                port: self.info.peer.port(),
                name: self.info.name.clone(),
                helo: helo.map(|h| h.name.clone()),
                esmtp: helo.is_some_and(|h| h.extended),
                tls: self.tls.as_ref().map(|t| format!("{} {}", t.version, t.cipher)),
                auth_user: self.session.user().map(str::to_string),
            },
            mail_from: txn.mail.address.clone(),
            body: txn.mail.body.map(|b| match b {
                Body::SevenBit => "7BIT".to_string(),
                Body::EightBitMime => "8BITMIME".to_string(),
            }),
            smtputf8: txn.mail.smtputf8,
            rcpts: txn.rcpts.iter().filter(|(_, r)| r.is_positive()).map(|(a, _)| a.clone()).collect(),
            rules: txn.ctx.records.iter().filter_map(|r| r.stage.strip_prefix("rule:")).map(str::to_string).collect(),
            verdict: verdict.to_string(),
            score: txn.ctx.score,
            message_id: header_value(head, "Message-ID"),
            subject: header_value(head, "Subject"),
            ..Meta::default()
        }
    }
}

/// The archive copy of a message on its way upstream.
#[derive(Debug, Default)]
pub(super) struct ArchiveCopy {
    /// `bcc` mode: the recipient to add to the upstream transaction, and whether it must be accepted.
    pub bcc: Option<(String, bool)>,
    /// `directory` mode: the files written, removed again if the upstream refuses the message.
    written: Option<Written>,
}

impl Driver {
    /// The archive copy for a message about to be relayed, when the archive selects it: in `directory`
    /// mode written and synced now, before anything goes upstream. `Err` is the client's reply when a
    /// required copy failed.
    pub(super) async fn archive_copy(&mut self, txn: &mut Txn) -> Result<ArchiveCopy, Reply> {
        let Some(archive) = self.ctx.archive.clone() else { return Ok(ArchiveCopy::default()) };
        let rcpts: Vec<String> = txn.rcpts.iter().filter(|(_, r)| r.is_positive()).map(|(a, _)| a.clone()).collect();
        let rules: Vec<&str> = txn.ctx.records.iter().filter_map(|r| r.stage.strip_prefix("rule:")).collect();
        let selection = Selection {
            listener: &self.ctx.name,
            authenticated: self.session.user().is_some(),
            rcpts: &rcpts,
            rules: &rules,
        };
        if !archive.selects(&selection) {
            return Ok(ArchiveCopy::default());
        }
        if let Some(addr) = archive.bcc() {
            return Ok(ArchiveCopy { bcc: Some((addr.to_string(), archive.required())), written: None });
        }
        let Some(dir) = archive.dir() else { return Ok(ArchiveCopy::default()) };
        match dir.write(self.copy_meta(txn, "accepted"), &mut txn.spool).await {
            Ok(w) => {
                crate::metrics::archive_copy(ArchiveMode::Directory, CopyResult::Ok);
                Ok(ArchiveCopy { bcc: None, written: Some(w) })
            }
            Err(e) => {
                crate::metrics::archive_copy(ArchiveMode::Directory, CopyResult::Error);
                warn!(txn.id = %txn.id, error = %e, required = archive.required(), "cannot write archive copy");
                if !archive.required() {
                    return Ok(ArchiveCopy::default());
                }
                self.reset_upstream().await;
                Err(Reply::local_error())
            }
        }
    }
}

/// The upstream did not take the message: its archive file goes too (the client will retry).
pub(super) async fn archive_undo(copy: ArchiveCopy) {
    if let Some(w) = copy.written {
        crate::archive::dir::remove(w).await;
    }
}

/// `bcc` mode: adds the archive address as one more recipient of the open upstream transaction, just
/// before DATA. Its reply never reaches the client. `Err` is the client's reply, and whether the connection
/// must be dropped, when a required archive recipient was refused or the upstream failed.
pub(super) async fn add_bcc(conn: &mut Connection, addr: &str, required: bool) -> Result<(), (Reply, bool)> {
    match conn.rcpt(&RcptTo { address: addr.to_string(), dsn: Vec::new() }).await {
        Ok(r) if r.is_positive() => {
            crate::metrics::archive_copy(ArchiveMode::Bcc, CopyResult::Ok);
            Ok(())
        }
        Ok(r) => {
            crate::metrics::archive_copy(ArchiveMode::Bcc, CopyResult::Error);
            warn!(reply.code = r.code, required, "upstream refused the archive recipient");
            if !required {
                return Ok(());
            }
            let reset = conn.reset().await;
            Err((Reply::local_error(), reset.is_err()))
        }
        Err(e) => {
            crate::metrics::archive_copy(ArchiveMode::Bcc, CopyResult::Error);
            warn!(error = %e, "upstream failed at the archive recipient");
            Err((Reply::upstream_failed(), true))
        }
    }
}
