//! The detector with a hand-moved clock and synthetic sending histories.

use std::sync::Arc;
use std::time::Duration;

use super::Accounts;
use crate::config::{AccountsConfig, Role, Span};
use crate::pipeline::limits::tests::conn;
use crate::pipeline::{ConnInfo, MessageView, RcptOutcome, Stage, TxnContext, Verdict};
use crate::smtp::command::{MailFrom, RcptTo};
use crate::smtp::Reply;
use crate::state::memory::MemoryStore;
use crate::state::ManualClock;

fn detector(cfg: AccountsConfig) -> (Accounts, Arc<ManualClock>) {
    let clock = ManualClock::at(1_700_000_000_000);
    (Accounts::new(Arc::new(MemoryStore::new(100_000, clock.clone())), &cfg), clock)
}

/// One message of `user` from `c`: the reply code (MAIL's refusal, or the end of data's verdict).
async fn send(a: &Accounts, c: &ConnInfo, user: &str, rcpt: &str) -> u16 {
    let mut txn = TxnContext { id: "t".into(), auth_user: Some(user.into()), ..TxnContext::default() };
    let mail =
        MailFrom { address: format!("{user}@example.test"), size: None, body: None, smtputf8: false, dsn: vec![] };
    if let Verdict::Tempfail(r) = a.on_mail(c, &mut txn, &mail).await {
        return r.code;
    }
    let r = RcptTo { address: rcpt.into(), dsn: vec![] };
    a.on_rcpt_done(c, &mut txn, RcptOutcome { rcpt: &r, reply: &Reply::new(250, "2.1.5 ok") }).await;
    let view = MessageView { head: b"", data: None, size: 100 };
    a.on_end_of_data(c, &mut txn, &view).await.refusal().map_or(250, |r| r.code)
}

/// Sends `n` messages spread evenly over `over`; returns the index of the first refused one.
async fn steady(a: &Accounts, clock: &ManualClock, c: &ConnInfo, n: u32, over: Duration) -> Option<u32> {
    let step = over / n;
    for i in 0..n {
        if send(a, c, "alice", &format!("r{}@dest{}.example", i % 7, i % 3)).await != 250 {
            return Some(i);
        }
        clock.advance(step);
    }
    None
}

#[tokio::test]
async fn a_burst_far_above_a_quiet_week_suspends_the_account() {
    let (a, clock) = detector(AccountsConfig::default());
    let c = conn("192.0.2.10", Role::Submission);
    assert_eq!(steady(&a, &clock, &c, 20 * 24 * 7, Duration::from_secs(7 * 86_400)).await, None, "a quiet week");
    let refused = steady(&a, &clock, &c, 500, Duration::from_secs(600)).await.expect("the burst is stopped");
    // Not before the floor, and well before the burst ends: 10 x the ~20/hour baseline.
    assert!((100..=250).contains(&refused), "refused at message {refused}");
    assert_eq!(send(&a, &c, "alice", "x@dest.example").await, 451, "later mail is deferred too");
    assert_eq!(send(&a, &c, "bob", "x@dest.example").await, 250, "other users are not");
    // An administrator lifts it; the burst is forgotten.
    assert!(a.resume("alice").await.unwrap());
    assert_eq!(send(&a, &c, "alice", "x@dest.example").await, 250);
    assert!(!a.resume("alice").await.unwrap(), "nothing left to resume");
}

#[tokio::test]
async fn a_steady_heavy_sender_is_never_suspended() {
    let (a, clock) = detector(AccountsConfig::default());
    let c = conn("192.0.2.10", Role::Submission);
    // From its first message on: the warm-up allows 10 x the floor, then its own baseline takes over.
    assert_eq!(steady(&a, &clock, &c, 300 * 24 * 8, Duration::from_secs(8 * 86_400)).await, None);
}

#[tokio::test]
async fn a_burst_from_a_new_network_suspends_and_suspensions_expire() {
    let cfg = AccountsConfig { suspend_for: Span(Duration::from_secs(3600)), ..AccountsConfig::default() };
    let (a, clock) = detector(cfg);
    let home = conn("192.0.2.10", Role::Submission);
    assert_eq!(steady(&a, &clock, &home, 40 * 48, Duration::from_secs(2 * 86_400)).await, None);
    // 60 messages in half an hour is within the rate baseline (40/hour), but not from a never-seen network.
    let away = conn("203.0.113.7", Role::Submission);
    let refused = steady(&a, &clock, &away, 60, Duration::from_secs(1800)).await.expect("suspended");
    assert_eq!(refused, 50, "the 51st message from the new network");
    assert_eq!(send(&a, &home, "alice", "x@dest.example").await, 451);
    clock.advance(Duration::from_secs(3601));
    assert_eq!(send(&a, &home, "alice", "x@dest.example").await, 250, "the suspension expired");
}

#[test]
fn config_problems() {
    assert!(AccountsConfig::default().problems().is_empty());
    let bad = AccountsConfig { factor: 0.5, floor_messages: 0, ..AccountsConfig::default() };
    assert_eq!(bad.problems().len(), 2);
}
