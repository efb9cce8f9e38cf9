//! The cost of behaviour limits per message: the limits stage's MAIL hook with the shipped example limit
//! (rate raised so it never refuses: the cost of checking, not of refusing), the same hook with no limits
//! (the baseline), a GCRA limit over 100,000 distinct client addresses (store growth and eviction), the
//! greylisting check of a passed triplet, and one account-baseline update. Each iteration runs one hook on a
//! current-thread runtime with the in-memory store.

use std::path::Path;
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use moat::config::{AccountsConfig, Role};
use moat::pipeline::limits::LimitsStage;
use moat::pipeline::{ConnInfo, MessageView, Stage, TxnContext};
use moat::rules::Rules;
use moat::smtp::command::{MailFrom, RcptTo};
use moat::state::memory::MemoryStore;
use moat::state::{SharedStore, SystemClock};

fn rules(text: &str) -> (tempfile::TempDir, Arc<Rules>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("l.toml"), text).unwrap();
    let rules = Rules::load(dir.path(), &[]).unwrap();
    (dir, Arc::new(rules))
}

fn example_never_exceeded() -> String {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/examples/rate-limits.toml")).unwrap();
    text.replace("rate = \"10/1m\"", "rate = \"4000000000/1m\"")
}

fn store() -> SharedStore {
    Arc::new(MemoryStore::new(1_000_000, Arc::new(SystemClock)))
}

fn conn(i: u32) -> ConnInfo {
    let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
    ConnInfo::new("c", "bench".into(), Role::Mx, (ip, 40000).into(), "127.0.0.1:25".parse().unwrap())
}

fn mail() -> MailFrom {
    MailFrom { address: "sender@remote.example".into(), size: None, body: None, smtputf8: false, dsn: vec![] }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let m = mail();
    let mut g = c.benchmark_group("limits");
    for (name, text) in [("mail_no_limits", String::new()), ("mail_example_limit", example_never_exceeded())] {
        let (_dir, r) = rules(&text);
        let stage = LimitsStage::new(r, store());
        let one = conn(1);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut txn = TxnContext { id: "t".into(), ..TxnContext::default() };
                black_box(rt.block_on(stage.on_mail(&one, &mut txn, &m)))
            })
        });
    }
    let (_dir, r) = rules("[[limit]]\nid = \"gcra\"\nkey = [\"ip\"]\ncount = \"messages\"\nrate = \"4000000000/1m\"\n");
    let stage = LimitsStage::new(r, store());
    let conns: Vec<ConnInfo> = (0..100_000).map(conn).collect();
    let mut i = 0;
    g.bench_function("mail_gcra_100k_clients", |b| {
        b.iter(|| {
            i = (i + 1) % conns.len();
            let mut txn = TxnContext { id: "t".into(), ..TxnContext::default() };
            black_box(rt.block_on(stage.on_mail(&conns[i], &mut txn, &m)))
        })
    });
    let (_dir, r) = rules("[greylist]\ndelay = \"1s\"\n");
    let clock = moat::state::ManualClock::at(1_700_000_000_000);
    let grey = moat::pipeline::greylist::GreylistStage::new(r, Arc::new(MemoryStore::new(1_000, clock.clone())));
    let one = conn(1);
    let rcpt = RcptTo { address: "user@example.test".into(), dsn: vec![] };
    let mut txn = TxnContext { mail_from: "sender@remote.example".into(), ..TxnContext::default() };
    rt.block_on(grey.on_rcpt(&one, &mut txn, &rcpt));
    clock.advance(std::time::Duration::from_secs(2));
    g.bench_function("greylist_passed_triplet", |b| {
        b.iter(|| black_box(rt.block_on(grey.on_rcpt(&one, &mut txn, &rcpt))))
    });
    let accounts = moat::pipeline::accounts::Accounts::new(store(), &AccountsConfig::default());
    let view = MessageView { head: b"", data: None, size: 1000 };
    g.bench_function("account_baseline_update", |b| {
        b.iter(|| {
            let mut txn = TxnContext { auth_user: Some("alice".into()), ..TxnContext::default() };
            black_box(rt.block_on(accounts.on_end_of_data(&one, &mut txn, &view)))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
