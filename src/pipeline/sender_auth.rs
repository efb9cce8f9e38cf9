//! Sender authentication on mail from the internet (docs/authentication.md): SPF for the HELO and MAIL
//! FROM identities, started at MAIL as a [`Lookup`] so DNS overlaps the client's RCPTs and DATA; at end of
//! data DKIM verification of every signature, ARC, and DMARC (alignment of SPF and DKIM with the From
//! domain, and its published policy), all through mail-auth on the shared resolver.
//!
//! The results go to [`AuthFacts`] for rules (`spf = "fail"`, `dmarc_policy = "reject"`), to the metrics,
//! and into an `Authentication-Results:` header (RFC 8601) with moat's authserv-id, added to the relayed
//! message after any incoming one claiming that id is removed ([`header_edit`]).
//!
//! DKIM hashes the message body, so it reads the message from the scan window: one in-memory copy, shared
//! with the content rules. A message larger than `sender_auth.max_message_size` is not verified
//! (`dkim=policy`); DMARC then rests on SPF alone.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, SpfOutput, SpfResult};
use tokio::time::Instant;

use super::header_edit::{self, RemoveFields};
use super::lookup::Lookup;
use super::stage::{proceed, HookFuture, Stage};
use super::{ConnInfo, MessageView, TxnContext, Verdict};
use crate::config::{Role, SenderAuthConfig};
use crate::dns::Dns;
use crate::metrics::{AuthMethod, AuthOutcome};
use crate::rules::auth_facts::AuthFacts;
use crate::smtp::command::MailFrom;

/// The SPF results of one transaction.
#[derive(Clone, Debug)]
struct Spf {
    helo: SpfOutput,
    mail: SpfOutput,
}

/// The SPF lookup started at MAIL (transaction state).
struct SpfLookup(Lookup<Arc<Spf>>);

/// The sender-authentication stage.
pub struct SenderAuthStage {
    dns: Arc<Dns>,
    config: SenderAuthConfig,
    authserv_id: String,
    deadline: Duration,
}

impl SenderAuthStage {
    /// A stage for `[sender_auth]`; `authserv_id` already defaulted to the hostname.
    pub fn new(dns: Arc<Dns>, config: &SenderAuthConfig, authserv_id: String, deadline: Duration) -> Self {
        SenderAuthStage { dns, config: config.clone(), authserv_id, deadline }
    }

    async fn end_of_data(&self, conn: &ConnInfo, txn: &mut TxnContext, msg: &MessageView<'_>) -> Verdict {
        let ip = conn.peer.ip();
        let helo = txn.helo.clone().unwrap_or_default();
        let mail_from = txn.mail_from.clone();
        let spf = match txn.ext.remove::<SpfLookup>() {
            Some(l) => l.0.get(Instant::now() + self.deadline).await.ready(),
            None => None,
        };
        // The whole message when the scan window holds it; else the header section only (no DKIM).
        let whole = msg.data.as_ref().filter(|d| d.len() as u64 >= msg.size && msg.size <= self.max_size());
        let raw: &[u8] = whole.map_or(msg.head, |d| &d[..]);
        let Some(am) = AuthenticatedMessage::parse(raw) else {
            return Verdict::Continue;
        };
        let auth = self.dns.authenticator();
        let dkim =
            if self.config.dkim && whole.is_some() { auth.verify_dkim(self.dns.params(&am)).await } else { Vec::new() };
        let arc =
            if self.config.arc && whole.is_some() { Some(auth.verify_arc(self.dns.params(&am)).await) } else { None };
        let from_domain = am.from().rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default();
        let mail_domain = mail_from.rsplit_once('@').map_or(helo.as_str(), |(_, d)| d).to_string();
        let dmarc = match (&spf, self.config.dmarc) {
            (Some(spf), true) => Some(
                auth.verify_dmarc(self.dns.params(DmarcParameters::new(&am, &dkim, &mail_domain, &spf.mail))).await,
            ),
            _ => None,
        };

        let mut ar = AuthenticationResults::new(&self.authserv_id);
        let facts = txn.ext.get_or_insert_with(AuthFacts::default);
        if let Some(spf) = &spf {
            facts.spf = Some(spf_name(spf.mail.result()));
            facts.spf_helo = Some(spf_name(spf.helo.result()));
            crate::metrics::sender_auth(AuthMethod::Spf, AuthOutcome::from_name(spf_name(spf.mail.result())));
            ar = ar
                .with_spf_ehlo_result(&spf.helo, ip, &helo)
                .with_spf_mailfrom_result(&spf.mail, ip, &mail_from, &helo);
        }
        if self.config.dkim {
            if whole.is_none() {
                facts.dkim = vec!["policy"];
                crate::metrics::sender_auth(AuthMethod::Dkim, AuthOutcome::Policy);
            } else if dkim.is_empty() {
                facts.dkim = vec!["none"];
                crate::metrics::sender_auth(AuthMethod::Dkim, AuthOutcome::None);
            } else {
                facts.dkim = dkim.iter().map(|d| dkim_name(d.result())).collect();
                for d in &dkim {
                    crate::metrics::sender_auth(AuthMethod::Dkim, AuthOutcome::from_name(dkim_name(d.result())));
                }
            }
            ar = ar.with_dkim_results(&dkim, &from_domain);
        }
        if let Some(arc) = &arc {
            let name = dkim_name(arc.result());
            facts.arc = Some(name);
            crate::metrics::sender_auth(AuthMethod::Arc, AuthOutcome::from_name(name));
            ar = ar.with_arc_result(arc, ip);
        }
        if let Some(d) = &dmarc {
            let name = dmarc_name(&d.result());
            facts.dmarc = Some(name);
            if name != "none" {
                facts.dmarc_policy = Some(match d.policy() {
                    Policy::Reject => "reject",
                    Policy::Quarantine => "quarantine",
                    Policy::None | Policy::Unspecified => "none",
                });
            }
            crate::metrics::sender_auth(AuthMethod::Dmarc, AuthOutcome::from_name(name));
            ar = ar.with_dmarc_result(d);
        }
        tracing::debug!(
            conn.id = %conn.id,
            spf = facts.spf.unwrap_or("-"),
            dkim = ?facts.dkim,
            dmarc = facts.dmarc.unwrap_or("-"),
            "sender authentication"
        );
        let forged = header_edit::forged_auth_results(msg.head, &self.authserv_id);
        if !forged.is_empty() {
            txn.ext.insert(RemoveFields(forged));
        }
        txn.add_headers.push(ar.to_header());
        Verdict::Continue
    }

    fn max_size(&self) -> u64 {
        self.config.max_message_size.bytes()
    }
}

fn spf_name(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_name(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn dmarc_name(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

/// SPF for both identities (the null sender's MAIL FROM identity is postmaster@HELO, RFC 7208 §2.4).
async fn check_spf(dns: Arc<Dns>, ip: IpAddr, helo: String, host: String, mail_from: String) -> Arc<Spf> {
    let auth = dns.authenticator();
    let helo_out = auth.verify_spf(dns.params(SpfParameters::verify_ehlo(ip, &helo, &host))).await;
    let mail = if mail_from.is_empty() {
        helo_out.clone()
    } else {
        auth.verify_spf(dns.params(SpfParameters::verify_mail_from(ip, &helo, &host, &mail_from))).await
    };
    Arc::new(Spf { helo: helo_out, mail })
}

impl Stage for SenderAuthStage {
    fn name(&self) -> &'static str {
        "sender_auth"
    }

    fn scan_window(&self, _txn: &TxnContext) -> Option<u64> {
        (self.config.dkim || self.config.arc).then(|| self.max_size())
    }

    fn on_mail<'a>(&'a self, conn: &'a ConnInfo, txn: &'a mut TxnContext, mail: &'a MailFrom) -> HookFuture<'a> {
        if conn.role == Role::Mx && (self.config.spf || self.config.dmarc) {
            let helo = txn.helo.clone().unwrap_or_default();
            let fut = check_spf(self.dns.clone(), conn.peer.ip(), helo, self.authserv_id.clone(), mail.address.clone());
            txn.ext.insert(SpfLookup(Lookup::start(self.deadline, fut)));
        }
        proceed()
    }

    fn on_end_of_data<'a>(
        &'a self,
        conn: &'a ConnInfo,
        txn: &'a mut TxnContext,
        msg: &'a MessageView<'a>,
    ) -> HookFuture<'a> {
        if conn.role != Role::Mx {
            return proceed();
        }
        Box::pin(self.end_of_data(conn, txn, msg))
    }
}
