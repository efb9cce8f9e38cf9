//! Copies of a message taken at the end of data, before the client's reply: the quarantine copy a
//! `quarantine` rule asked for ([`crate::quarantine`]). The copy is the whole message streamed from the
//! spool, as the relay sends it; a copy that cannot be written is moat's own failure, `451 4.3.0`.

use tracing::{info, warn};

use super::{Driver, Txn};
use crate::metrics::CopyResult;
use crate::pipeline::Verdict;
use crate::quarantine::{ClientFacts, Hold, Meta};
use crate::smtp::command::Body;
use crate::smtp::Reply;
use crate::trace::{header_section, header_value};

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
        let meta = self.copy_meta(txn, &hold);
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
    fn copy_meta(&self, txn: &Txn, hold: &Hold) -> Meta {
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
            verdict: if hold.deliver { "quarantine-deliver" } else { "quarantine" }.to_string(),
            score: txn.ctx.score,
            message_id: header_value(head, "Message-ID"),
            subject: header_value(head, "Subject"),
            ..Meta::default()
        }
    }
}
