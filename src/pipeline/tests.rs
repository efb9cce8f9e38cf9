use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::*;
use crate::config::Role;
use crate::smtp::command::MailFrom;

fn conn() -> ConnInfo {
    let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
    let local: SocketAddr = "127.0.0.1:25".parse().unwrap();
    ConnInfo::new("c1", "mx".into(), Role::Mx, peer, local)
}

fn mail() -> MailFrom {
    match crate::smtp::command::parse(b"MAIL FROM:<a@example.org>") {
        Ok(crate::smtp::command::Command::Mail(m)) => m,
        other => panic!("{other:?}"),
    }
}

/// Sleeps at MAIL, scores, and counts the events it saw.
struct Slow {
    sleep: Duration,
    fail_closed: bool,
    events: AtomicU32,
}

#[derive(Default)]
struct Seen(u32);

impl Stage for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }
    fn deadline(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }
    fn on_deadline(&self, _phase: &'static str) -> Verdict {
        if self.fail_closed {
            Verdict::Tempfail(Reply::new(451, "4.4.3 lookup timed out"))
        } else {
            Verdict::Continue
        }
    }
    fn on_mail<'a>(&'a self, _c: &'a ConnInfo, txn: &'a mut TxnContext, _m: &'a MailFrom) -> HookFuture<'a> {
        Box::pin(async move {
            tokio::time::sleep(self.sleep).await;
            txn.score += 1.0;
            txn.ext.get_or_insert_with(Seen::default).0 += 1;
            Verdict::Continue
        })
    }
    fn on_helo<'a>(&'a self, _c: &'a ConnInfo, _h: &'a str) -> EventFuture<'a> {
        self.events.fetch_add(1, Ordering::Relaxed);
        Box::pin(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn deadlines_fail_open_or_closed_as_the_stage_says() {
    let open = Arc::new(Slow { sleep: Duration::from_secs(5), fail_closed: false, events: AtomicU32::new(0) });
    let quick = Arc::new(Slow { sleep: Duration::from_millis(10), fail_closed: true, events: AtomicU32::new(0) });
    let p = Pipeline::new(vec![open.clone(), quick.clone()]);
    let (c, m) = (conn(), mail());
    let mut txn = TxnContext::default();
    assert_eq!(p.mail(&c, &mut txn, &m).await, Verdict::Continue);
    // The first stage overran (no score, recorded as timeout), the second ran.
    assert_eq!(txn.score, 1.0);
    assert_eq!(txn.ext.get::<Seen>().map(|s| s.0), Some(1));
    let verdicts: Vec<_> = txn.records.iter().map(|r| r.verdict).collect();
    assert_eq!(verdicts, ["timeout", "continue"]);

    let closed = Arc::new(Slow { sleep: Duration::from_secs(5), fail_closed: true, events: AtomicU32::new(0) });
    let p = Pipeline::new(vec![closed, quick.clone()]);
    let mut txn = TxnContext::default();
    let v = p.mail(&c, &mut txn, &m).await;
    assert_eq!(v.refusal().map(|r| r.code), Some(451));
    assert_eq!(txn.records.len(), 1, "a refusal ends the phase");

    // Events reach every stage and are bounded by the deadline too.
    p.helo(&c, "client.example").await;
    assert_eq!(quick.events.load(Ordering::Relaxed), 1);
    assert_eq!(p.names(), ["slow", "slow"]);
}

/// Refuses at MAIL unless it says it does not want that hook; counts its calls.
struct Picky {
    wants_mail: bool,
    calls: AtomicU32,
}

impl Stage for Picky {
    fn name(&self) -> &'static str {
        "picky"
    }
    fn wants(&self, hook: TxnHook, _conn: &ConnInfo, _txn: &TxnContext) -> bool {
        hook != TxnHook::Mail || self.wants_mail
    }
    fn on_mail<'a>(&'a self, _c: &'a ConnInfo, _t: &'a mut TxnContext, _m: &'a MailFrom) -> HookFuture<'a> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Box::pin(std::future::ready(Verdict::Reject(Reply::new(550, "5.7.1 no"))))
    }
}

#[tokio::test]
async fn a_hook_the_stage_does_not_want_is_skipped_but_recorded() {
    let (c, m) = (conn(), mail());
    let skipping = Arc::new(Picky { wants_mail: false, calls: AtomicU32::new(0) });
    let p = Pipeline::new(vec![skipping.clone(), skipping.clone()]);
    let mut txn = TxnContext::default();
    assert_eq!(p.mail(&c, &mut txn, &m).await, Verdict::Continue);
    assert_eq!(skipping.calls.load(Ordering::Relaxed), 0, "the hook was not called");
    // The audit still lists every stage, as having continued at once.
    let records: Vec<_> = txn.records.iter().map(|r| (r.stage, r.phase, r.verdict, r.micros)).collect();
    assert_eq!(records, [("picky", "mail", "continue", 0), ("picky", "mail", "continue", 0)]);

    let wanting = Arc::new(Picky { wants_mail: true, calls: AtomicU32::new(0) });
    let p = Pipeline::new(vec![wanting.clone()]);
    let mut txn = TxnContext::default();
    assert_eq!(p.mail(&c, &mut txn, &m).await.refusal().map(|r| r.code), Some(550));
    assert_eq!(wanting.calls.load(Ordering::Relaxed), 1);
}
