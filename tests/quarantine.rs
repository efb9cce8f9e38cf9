//! The quarantine store with moat in-process and a fake upstream: the whole message is kept (not the scan
//! window), a store that cannot be written answers `451`, and quarantining never makes the rules reload
//! (issue #16, defect 1: the store used to live in the rules directory, which the watcher fingerprinted).

mod common;

use std::path::Path;
use std::time::Duration;

use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};

const HOLD_RULE: &str = "[[rule]]\nid = \"hold\"\nwhen = { subject = 'hold me' }\naction = \"quarantine\"\n";

/// The value of a series in moat's metrics (the recorder is process-wide: tests in this binary add up).
fn metric(series: &str) -> f64 {
    let text = moat::metrics::install().expect("metrics recorder").render();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
}

fn items(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "json")).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn send(client: &mut Client, subject: &str, body: &[u8]) -> (u16, String) {
    client.expect("MAIL FROM:<alice@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.test>", 250).await;
    client.expect("DATA", 354).await;
    let mut msg = format!("Subject: {subject}\r\nMessage-ID: <q@example.org>\r\n\r\n").into_bytes();
    msg.extend_from_slice(body);
    msg.extend_from_slice(b".\r\n");
    client.send_raw(&msg).await;
    client.reply().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantining_does_not_reload_rules_and_edits_still_apply() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("10-hold.toml"), HOLD_RULE).unwrap();
    let store = rules.path().join("quarantine"); // the old default: inside the rules directory
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!(
        "rules.directory = {:?}\nrules.watch_interval = \"100ms\"\nquarantine.directory = {:?}",
        rules.path().display().to_string(),
        store.display().to_string()
    );
    let running = start(&test_config(fake.addr, &extra)).await;
    let handle = running.rules.clone().expect("rules loaded");
    let v0 = handle.snapshot().version;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    for i in 0..5 {
        let (code, text) = send(&mut client, "hold me", format!("message {i}\r\n").as_bytes()).await;
        assert_eq!(code, 250, "{text}");
        // Several watcher polls after each write: time for a reload, if the store caused one.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(items(&store).len(), 5);
    assert_eq!(handle.snapshot().version, v0, "5 quarantined messages made the rules reload");
    assert_eq!(fake.messages().len(), 0, "held messages are not delivered");

    // A rule edit during a steady stream of quarantines (back to back, many per watcher interval) applies during the stream; before the fix every write moved the fingerprint, so the edit
    // never held still for an interval.
    let tmp = rules.path().join(".20-tag.toml.tmp");
    std::fs::write(&tmp, "[[rule]]\nid = \"tag\"\nwhen = { subject = 'x' }\naction = \"tag\"\n").unwrap();
    std::fs::rename(&tmp, rules.path().join("20-tag.toml")).unwrap();
    let mut applied = false;
    for _ in 0..300 {
        let (code, text) = send(&mut client, "hold me", b"stream\r\n").await;
        assert_eq!(code, 250, "{text}");
        if handle.snapshot().rules.iter().any(|r| &*r.id == "tag") {
            applied = true;
            break;
        }
    }
    assert!(applied, "the rule edit did not apply during the stream of quarantines");
    drop(client);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_message_is_kept_beyond_the_scan_window() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("10-hold.toml"), HOLD_RULE).unwrap();
    let store = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!(
        "rules.directory = {:?}\nrules.scan_window = \"64KiB\"\nquarantine.directory = {:?}",
        rules.path().display().to_string(),
        store.path().display().to_string()
    );
    let running = start(&test_config(fake.addr, &extra)).await;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    let body: Vec<u8> = (0..100_000).flat_map(|i| format!("body line {i:06}\r\n").into_bytes()).collect();
    let written = metric("moat_quarantine_writes_total{result=\"ok\"}");
    let (code, text) = send(&mut client, "hold me", &body).await;
    assert_eq!(code, 250, "{text}");
    assert!(metric("moat_quarantine_writes_total{result=\"ok\"}") > written, "the write is counted");
    let found = items(store.path());
    assert_eq!(found.len(), 1);
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&found[0]).unwrap()).unwrap();
    let eml = std::fs::read(found[0].with_extension("eml")).unwrap();
    let mut want = b"Subject: hold me\r\nMessage-ID: <q@example.org>\r\n\r\n".to_vec();
    want.extend_from_slice(&body);
    assert!(want.len() > 1_800_000);
    assert!(eml == want, "stored {} bytes, sent {}", eml.len(), want.len());
    assert_eq!(meta["size"], want.len());
    assert_eq!(meta["mail_from"], "alice@example.org");
    assert_eq!(meta["rcpts"], serde_json::json!(["bob@example.test"]));
    assert_eq!(meta["rules"], serde_json::json!(["hold"]));
    assert_eq!(meta["verdict"], "quarantine");
    assert_eq!(meta["client"]["ip"], "127.0.0.1");
    assert_eq!(meta["client"]["helo"], "client.example");
    assert_eq!(meta["message_id"], "<q@example.org>");
    drop(client);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_written_answers_451_and_relays_nothing() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("10-hold.toml"),
        HOLD_RULE.replace("\"quarantine\"", "\"quarantine\"\ndeliver = true"),
    )
    .unwrap();
    let not_a_dir = rules.path().join("plain-file");
    std::fs::write(&not_a_dir, "").unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!(
        "rules.directory = {:?}\nquarantine.directory = {:?}",
        rules.path().display().to_string(),
        not_a_dir.display().to_string()
    );
    let running = start(&test_config(fake.addr, &extra)).await;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    let (code, text) = send(&mut client, "hold me", b"x\r\n").await;
    assert_eq!(code, 451, "{text}");
    // The session goes on: an ordinary message still passes.
    let (code, text) = send(&mut client, "fine", b"y\r\n").await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(fake.wait_for(1).await.len(), 1);
    drop(client);
    running.stop().await;
}

/// The disk budget expires the oldest items (the running moat's sweeper), and `moat quarantine purge`
/// removes items older than asked, while moat runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_expiry_and_purge() {
    let expired = metric("moat_quarantine_expired_total{reason=\"budget\"}");
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("10-hold.toml"), HOLD_RULE).unwrap();
    let store = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!(
        "rules.directory = {:?}\nquarantine.directory = {:?}\nquarantine.max_size = \"250KiB\"\nquarantine.sweep_interval = \"1s\"\n\
         quarantine.retention = \"0s\"",
        rules.path().display().to_string(),
        store.path().display().to_string()
    );
    let running = start(&test_config(fake.addr, &extra)).await;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    let body = format!("{}\r\n", "x".repeat(998)).repeat(100); // about 100 KB each
    for i in 0..5 {
        let (code, text) = send(&mut client, &format!("hold me {i}"), body.as_bytes()).await;
        assert_eq!(code, 250, "{text}");
    }
    let subjects = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = items(dir)
            .iter()
            // The sweeper may remove an item between the listing and the read.
            .filter_map(|p| std::fs::read(p).ok())
            .map(|b| {
                let m: serde_json::Value = serde_json::from_slice(&b).unwrap();
                m["subject"].as_str().unwrap().to_string()
            })
            .collect();
        v.sort();
        v
    };
    let mut left = subjects(store.path());
    for _ in 0..100 {
        if left.len() <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = subjects(store.path());
    }
    assert_eq!(left, ["hold me 3", "hold me 4"], "the oldest expire first, down to the budget");
    assert!(metric("moat_quarantine_expired_total{reason=\"budget\"}") >= expired + 3.0, "expiries are counted");

    // Back-date one item by 31 days; purge --older-than 30d removes exactly it. (The running sweeper has no
    // age limit here, `retention = "0s"`, so it does not race the command for that item.)
    let old =
        items(store.path()).into_iter().find(|p| std::fs::read_to_string(p).unwrap().contains("hold me 3")).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&old).unwrap()).unwrap();
    m["time"] = serde_json::json!(m["time"].as_u64().unwrap() - 31 * 86_400);
    std::fs::write(&old, serde_json::to_vec(&m).unwrap()).unwrap();
    let config = store.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "quarantine.directory = {:?}\n[[listener]]\nname = \"x\"\naddress = \"127.0.0.1:0\"\n",
            store.path().display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["quarantine", "purge", "--older-than", "30d", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("purged 1 items"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(items(store.path()).len(), 1);
    assert!(!old.exists() && !old.with_extension("eml").exists());
    drop(client);
    running.stop().await;
}

/// A quarantine store on a full disk (a 256 KiB tmpfs; we run as root): `451`, nothing relayed, no partial
/// item or temporary file left; a message that fits is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_disk_answers_451_and_leaves_nothing() {
    let base = tempfile::tempdir().unwrap();
    let store = base.path().join("q");
    std::fs::create_dir(&store).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&store)
        .status()
        .is_ok_and(|s| s.success());
    // Unmounted however the test ends (a panic included), before the temporary directory goes.
    let _unmount = mounted.then(|| Unmount(store.clone()));
    if !mounted {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI=true: mount -t tmpfs must work (run as root)");
        eprintln!("skipping: mount -t tmpfs not allowed");
        return;
    }
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("10-hold.toml"), HOLD_RULE).unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!(
        "rules.directory = {:?}\nquarantine.directory = {:?}",
        rules.path().display().to_string(),
        store.display().to_string()
    );
    let running = start(&test_config(fake.addr, &extra)).await;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    let big = format!("{}\r\n", "y".repeat(998)).repeat(1024);
    let (code, text) = send(&mut client, "hold me", big.as_bytes()).await;
    assert_eq!(code, 451, "{text}");
    assert!(items(&store).is_empty());
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0, "no partial file left");
    let (code, text) = send(&mut client, "hold me", b"small\r\n").await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(items(&store).len(), 1);
    assert_eq!(fake.messages().len(), 0);
    drop(client);
    running.stop().await;
}

/// Unmounts a test's tmpfs when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
