//! DNS blocklists and allowlists (docs/dns.md): the client's IP address (`dnsbl`, `dnswl`), its HELO
//! name, the envelope sender's and the From header's domains (`rhsbl`), and the registered domains of
//! the URLs in the body (`uribl`).
//!
//! Each lookup starts as soon as its input is known, as a [`Lookup`] of its own: the client's at connect
//! (overlapping the banner and EHLO), the HELO name's at EHLO, the sender domain's at MAIL, the From
//! domain's when the header section is complete. At end of data the stage collects every answer (never
//! waiting past `dns.deadline`), adds each listing zone's weight to the transaction's score once, and
//! leaves the zone names in [`AuthFacts`] for rules (`dnsbl = "zen"`). A failed or timed-out lookup is no
//! listing (or `451` with `dns.on_error = "tempfail"`).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::lookup::{Answer, Lookup};
use super::stage::{nothing, proceed, EventFuture, HookFuture, Stage};
use super::{ConnInfo, MessageView, TxnContext, Verdict};
use crate::config::{DnsConfig, OnDnsError, RhsTarget, Role, ZoneKind};
use crate::dns::zone::{self, Codes};
use crate::dns::{Dns, DnsError};
use crate::metrics::DnsResult;
use crate::rules::auth_facts::AuthFacts;
use crate::smtp::command::MailFrom;
use crate::smtp::Reply;

/// How much of the body is read for URL domains.
const URIBL_WINDOW: u64 = 1024 * 1024;
/// The most URL domains asked about per message.
const MAX_URL_DOMAINS: usize = 20;

/// One configured zone.
#[derive(Clone, Debug)]
struct Zone {
    name: Arc<str>,
    zone: String,
    kind: ZoneKind,
    codes: Codes,
    weight: f64,
    targets: Vec<RhsTarget>,
}

/// The zones that listed something, and how many lookups failed.
#[derive(Clone, Debug, Default)]
pub struct ListResults {
    /// Indices into the stage's zones.
    listed: Vec<usize>,
    errors: usize,
}

impl ListResults {
    fn merge(&mut self, other: ListResults) {
        self.listed.extend(other.listed);
        self.errors += other.errors;
    }
}

/// The client's lookups (connection state).
struct ClientLists(Lookup<ListResults>);
/// The HELO name's lookups (connection state; a new EHLO replaces them).
struct HeloLists(Lookup<ListResults>);
/// The envelope sender domain's lookups (transaction state).
struct SenderLists(Lookup<ListResults>);
/// The From domain's lookups (transaction state).
struct FromLists(Lookup<ListResults>);

/// The DNS list stage.
pub struct DnsblStage {
    dns: Arc<Dns>,
    zones: Arc<[Zone]>,
    deadline: Duration,
    on_error: OnDnsError,
}

impl DnsblStage {
    /// A stage for the zones of `[dns]`; `None` when none is configured. Codes were checked by validate.
    pub fn new(dns: Arc<Dns>, config: &DnsConfig) -> Option<DnsblStage> {
        let zones: Vec<Zone> = config
            .zones
            .iter()
            .map(|z| Zone {
                name: z.name.as_str().into(),
                zone: z.zone.clone(),
                kind: z.kind,
                codes: Codes::parse(&z.codes).unwrap_or_default(),
                weight: z.weight,
                targets: z.targets.clone(),
            })
            .collect();
        (!zones.is_empty()).then(|| DnsblStage {
            dns,
            zones: zones.into(),
            deadline: config.deadline.get(),
            on_error: config.on_error,
        })
    }

    /// Starts the queries `names` (zone index, query name) as one lookup; `None` when there are none.
    fn start(&self, names: Vec<(usize, String)>) -> Option<Lookup<ListResults>> {
        if names.is_empty() {
            return None;
        }
        let (dns, zones) = (self.dns.clone(), self.zones.clone());
        Some(Lookup::start(self.deadline, query_all(dns, zones, names)))
    }

    /// Query names for the domain `domain` in the `rhsbl` zones that check `target`.
    fn domain_names(&self, domain: &str, target: RhsTarget) -> Vec<(usize, String)> {
        self.zones
            .iter()
            .enumerate()
            .filter(|(_, z)| z.kind == ZoneKind::Rhsbl && z.targets.contains(&target))
            .filter_map(|(i, z)| zone::domain_query(domain, &z.zone).map(|q| (i, q)))
            .collect()
    }

    async fn end_of_data(&self, conn: &ConnInfo, txn: &mut TxnContext, msg: &MessageView<'_>) -> Verdict {
        let mut pending: Vec<Lookup<ListResults>> = Vec::new();
        pending.extend(conn.ext.get::<ClientLists>().map(|l| l.0.clone()));
        pending.extend(conn.ext.get::<HeloLists>().map(|l| l.0.clone()));
        pending.extend(txn.ext.remove::<SenderLists>().map(|l| l.0));
        pending.extend(txn.ext.remove::<FromLists>().map(|l| l.0));
        if let Some(data) = &msg.data {
            pending.extend(self.start(self.url_names(data)));
        }
        let until = Instant::now() + self.deadline;
        let mut all = ListResults::default();
        for l in pending {
            match l.get(until).await {
                Answer::Ready(r) => all.merge(r),
                Answer::TimedOut | Answer::NotYet => all.errors += 1,
            }
        }
        if all.errors > 0 && self.on_error == OnDnsError::Tempfail {
            return Verdict::Tempfail(Reply::new(451, "4.7.1 DNS list lookup failed, try again later"));
        }
        all.listed.sort_unstable();
        all.listed.dedup();
        let facts = txn.ext.get_or_insert_with(AuthFacts::default);
        let mut score = 0.0;
        for i in all.listed {
            let Some(z) = self.zones.get(i) else { continue };
            let names = if z.kind == ZoneKind::Uribl { &mut facts.uribl } else { &mut facts.dnsbl };
            names.push(z.name.to_string());
            score += z.weight;
        }
        txn.score += score;
        Verdict::Continue
    }

    /// Query names for the registered domains of the URLs in the scanned message.
    fn url_names(&self, data: &[u8]) -> Vec<(usize, String)> {
        if !self.zones.iter().any(|z| z.kind == ZoneKind::Uribl) {
            return Vec::new();
        }
        let content = crate::rules::content::Content::parse(data);
        let mut domains: Vec<String> = content.url_domains.iter().filter_map(|h| zone::registered_domain(h)).collect();
        domains.sort_unstable();
        domains.dedup();
        domains.truncate(MAX_URL_DOMAINS);
        let mut out = Vec::new();
        for (i, z) in self.zones.iter().enumerate().filter(|(_, z)| z.kind == ZoneKind::Uribl) {
            out.extend(domains.iter().filter_map(|d| zone::domain_query(d, &z.zone)).map(|q| (i, q)));
        }
        out
    }
}

/// Runs the queries concurrently (aborted together when the lookup is dropped).
async fn query_all(dns: Arc<Dns>, zones: Arc<[Zone]>, names: Vec<(usize, String)>) -> ListResults {
    let mut set = JoinSet::new();
    for (i, name) in names {
        let (dns, zones) = (dns.clone(), zones.clone());
        set.spawn(async move {
            let Some(z) = zones.get(i) else { return ListResults::default() };
            let (result, out) = match dns.zone_a(&name).await {
                Ok(ips) => match zone::classify(&ips, &z.codes) {
                    zone::Verdict::Listed(_) => (DnsResult::Listed, ListResults { listed: vec![i], errors: 0 }),
                    zone::Verdict::NotListed => (DnsResult::NotListed, ListResults::default()),
                    zone::Verdict::Refused => (DnsResult::Refused, ListResults { listed: vec![], errors: 1 }),
                },
                Err(DnsError::Timeout) => (DnsResult::Timeout, ListResults { listed: vec![], errors: 1 }),
                Err(e) => {
                    tracing::debug!(zone = %z.name, error = %e, "dns list lookup failed");
                    (DnsResult::Error, ListResults { listed: vec![], errors: 1 })
                }
            };
            crate::metrics::dns_query(&z.name, result);
            out
        });
    }
    let mut all = ListResults::default();
    while let Some(r) = set.join_next().await {
        all.merge(r.unwrap_or(ListResults { listed: vec![], errors: 1 }));
    }
    all
}

fn domain_of(addr: &str) -> Option<&str> {
    addr.rsplit_once('@').map(|(_, d)| d).filter(|d| !d.is_empty())
}

/// The From header's address domain, from the header section.
fn from_domain(head: &[u8]) -> Option<String> {
    let msg = mail_parser::MessageParser::new().parse_headers(head)?;
    let addr = msg.from()?.first()?.address()?;
    domain_of(addr).map(str::to_ascii_lowercase)
}

impl Stage for DnsblStage {
    fn name(&self) -> &'static str {
        "dnsbl"
    }

    fn scan_window(&self, _txn: &TxnContext) -> Option<u64> {
        self.zones.iter().any(|z| z.kind == ZoneKind::Uribl).then_some(URIBL_WINDOW)
    }

    fn on_connect<'a>(&'a self, conn: &'a ConnInfo) -> HookFuture<'a> {
        if conn.role == Role::Mx {
            let ip = conn.peer.ip();
            let names: Vec<(usize, String)> = self
                .zones
                .iter()
                .enumerate()
                .filter(|(_, z)| matches!(z.kind, ZoneKind::Dnsbl | ZoneKind::Dnswl))
                .map(|(i, z)| (i, zone::ip_query(ip, &z.zone)))
                .collect();
            if let Some(l) = self.start(names) {
                conn.ext.insert(ClientLists(l));
            }
        }
        proceed()
    }

    fn on_helo<'a>(&'a self, conn: &'a ConnInfo, helo: &'a str) -> EventFuture<'a> {
        if conn.role == Role::Mx {
            match self.start(self.domain_names(helo, RhsTarget::Helo)) {
                Some(l) => conn.ext.insert(HeloLists(l)),
                None => drop(conn.ext.remove::<HeloLists>()),
            }
        }
        nothing()
    }

    fn on_mail<'a>(&'a self, conn: &'a ConnInfo, txn: &'a mut TxnContext, mail: &'a MailFrom) -> HookFuture<'a> {
        if conn.role == Role::Mx {
            if let Some(d) = domain_of(&mail.address) {
                if let Some(l) = self.start(self.domain_names(d, RhsTarget::MailFrom)) {
                    txn.ext.insert(SenderLists(l));
                }
            }
        }
        proceed()
    }

    fn on_headers<'a>(&'a self, conn: &'a ConnInfo, txn: &'a mut TxnContext, head: &'a [u8]) -> HookFuture<'a> {
        if conn.role == Role::Mx && self.zones.iter().any(|z| z.targets.contains(&RhsTarget::From)) {
            if let Some(d) = from_domain(head) {
                if let Some(l) = self.start(self.domain_names(&d, RhsTarget::From)) {
                    txn.ext.insert(FromLists(l));
                }
            }
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
