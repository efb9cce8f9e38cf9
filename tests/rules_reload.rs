//! Rule reloads under load: a client keeps sending while the rule file changes many times (file watcher and
//! explicit reloads). No session fails, each message is judged by exactly one rule-set version (the header a
//! MAIL-phase rule adds and the one a header-phase rule adds during DATA carry the same version, also when the
//! reload falls between MAIL and DATA), and a broken file keeps the old set.

mod common;

use std::path::Path;
use std::time::Duration;

use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};
use moat::server::Running;

/// A rule file tagging at MAIL and at the header phase (a `subject` rule, run when the header section ends)
/// with version `v`.
fn version_file(v: u32) -> String {
    format!(
        "[[rule]]\nid = \"mail-v\"\nwhen = {{ mail_from = '@' }}\naction = \"tag\"\nheaders = {{ \"X-V-Mail\" = \"{v}\" }}\n\
         [[rule]]\nid = \"data-v\"\nwhen = {{ subject = '.' }}\naction = \"tag\"\nheaders = {{ \"X-V-Data\" = \"{v}\" }}\n"
    )
}

/// Writes atomically (rename), as editors and config managers do.
fn write(dir: &Path, text: &str) {
    let tmp = dir.join(".50-v.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("50-v.toml")).unwrap();
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

/// moat whose rules directory holds `version_file(version)`, polled every `watch_interval` ("0s": not).
async fn serve_version(version: u32, watch_interval: &str) -> (tempfile::TempDir, FakeUpstream, Running) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &version_file(version));
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!(
        "rules.directory = {:?}\nrules.watch_interval = \"{watch_interval}\"",
        dir.path().display().to_string()
    );
    let running = start(&test_config(fake.addr, &extra)).await;
    (dir, fake, running)
}

async fn send(client: &mut Client, n: usize) {
    client.expect("MAIL FROM:<alice@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.test>", 250).await;
    client.expect("DATA", 354).await;
    client.send_raw(format!("Subject: message {n}\r\n\r\nbody\r\n.\r\n").as_bytes()).await;
    let (code, text) = client.reply().await;
    assert_eq!(code, 250, "message {n}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_judges_each_message_by_one_version() {
    let (dir, fake, running) = serve_version(0, "20ms").await;
    let addr = running.addr("smtp").unwrap();
    let rules = running.rules.clone().expect("rules loaded");

    let path = dir.path().to_path_buf();
    let reloader = rules.clone();
    let writer = tokio::spawn(async move {
        for v in 1..=40u32 {
            write(&path, &version_file(v));
            if v % 3 == 0 {
                reloader.reload().await.expect("a valid file reloads");
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    });
    let mut sent = 0;
    for _ in 0..4 {
        let (mut client, code) = Client::connect(addr).await;
        assert_eq!(code, 220);
        client.expect("EHLO client.example", 250).await;
        for _ in 0..15 {
            send(&mut client, sent).await;
            sent += 1;
            // Paced so the 60 messages span the writer's 40 changes.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client.expect("QUIT", 221).await;
    }
    writer.await.unwrap();
    let msgs = fake.wait_for(sent).await;
    assert_eq!(msgs.len(), sent);
    let mut versions = std::collections::BTreeSet::new();
    for m in &msgs {
        let text = String::from_utf8_lossy(&m.data);
        let (a, b) = (header(&text, "X-V-Mail"), header(&text, "X-V-Data"));
        assert!(a.is_some() && a == b, "one message, two rule versions: {a:?} vs {b:?}\n{text}");
        versions.insert(a.unwrap().to_string());
    }
    assert!(versions.len() > 1, "the reloads took effect while sending: {versions:?}");

    // A broken file: refused with file:line, the old set stays in force.
    // Let the watcher catch up with the last change first, so only the broken write is new to it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    rules.reload().await.expect("the last valid file reloads");
    let before = rules.snapshot().version;
    write(dir.path(), "[[rule]]\nid = \"broken\"\nwhen = { helo = '(' }\naction = \"reject\"\n");
    let errors = rules.reload().await.expect_err("a broken file is refused");
    let text = moat::rules::format_errors(&errors);
    assert!(text.contains("50-v.toml:2:") && text.contains("invalid regex"), "{text}");
    tokio::time::sleep(Duration::from_millis(100)).await; // the watcher sees it too, and refuses it too
    assert_eq!(rules.snapshot().version, before);
    let (mut client, _) = Client::connect(addr).await;
    client.expect("EHLO client.example", 250).await;
    send(&mut client, sent).await;
    let msgs = fake.wait_for(sent + 1).await;
    let last = String::from_utf8_lossy(&msgs[sent].data).into_owned();
    assert_eq!(header(&last, "X-V-Data"), Some("40"), "{last}");
    drop(client);
    let _ = running.stop().await;
}

/// A reload between MAIL and DATA does not reach the header phase of the open transaction: the header
/// rules that run when the header section ends are the MAIL snapshot's; the next transaction uses the new set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_phase_uses_the_transaction_snapshot() {
    let (dir, fake, running) = serve_version(1, "0s").await;
    let rules = running.rules.clone().expect("rules loaded");
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    client.expect("MAIL FROM:<alice@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.test>", 250).await;
    write(dir.path(), &version_file(2));
    rules.reload().await.expect("a valid file reloads");
    client.expect("DATA", 354).await;
    client.send_raw(b"Subject: during the reload\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(client.reply().await.0, 250);
    send(&mut client, 1).await;
    let msgs = fake.wait_for(2).await;
    let texts: Vec<String> = msgs.iter().map(|m| String::from_utf8_lossy(&m.data).into_owned()).collect();
    assert_eq!(header(&texts[0], "X-V-Data"), Some("1"), "{}", texts[0]);
    assert_eq!(header(&texts[1], "X-V-Data"), Some("2"), "{}", texts[1]);
    drop(client);
    let _ = running.stop().await;
}

/// `moat check` runs the same validation offline: every problem with file:line, exit status 1.
#[test]
fn moat_check_validates_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("10-a.toml"), "[[rule]]\nid = \"a\"\nwhen = { helo = '(' }\naction = \"reject\"\n")
        .unwrap();
    std::fs::write(rules.join("20-b.toml"), "[[rule]]\nid = \"b\"\nwhen = { hello = 'x' }\naction = \"reject\"\n")
        .unwrap();
    let config = dir.path().join("moat.toml");
    let text = format!(
        "rules.directory = {:?}\n[[listener]]\nname = \"smtp\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\n",
        rules.display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("10-a.toml:2:") && err.contains("invalid regex"), "{err}");
    assert!(err.contains("20-b.toml:3:") && err.contains("hello"), "{err}");
    std::fs::write(rules.join("10-a.toml"), "").unwrap();
    std::fs::remove_file(rules.join("20-b.toml")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok, 0 rules"));
}

/// `moat check` refuses a bad entry in a bloom `ip` list with the list file's line (it used to hash any
/// string), and accepts the list once the entry is fixed.
#[test]
fn moat_check_refuses_bad_entries_in_bloom_ip_lists() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(rules.join("lists")).unwrap();
    std::fs::write(
        rules.join("10-a.toml"),
        "[[list]]\nname = \"nets\"\nkind = \"ip\"\nfile = \"lists/nets.txt\"\nbloom = true\n\
         [[rule]]\nid = \"a\"\nwhen = { in_list = \"nets\" }\naction = \"reject\"\n",
    )
    .unwrap();
    std::fs::write(rules.join("lists/nets.txt"), "127.0.0.0/8\nnot-an-ip!!\n").unwrap();
    let config = dir.path().join("moat.toml");
    let text = format!(
        "rules.directory = {:?}\n[[listener]]\nname = \"smtp\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\n",
        rules.display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
            .arg("check")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("nets.txt:2:") && err.contains("not-an-ip!!"), "{err}");
    std::fs::write(rules.join("lists/nets.txt"), "127.0.0.0/8\n192.0.2.1\n").unwrap();
    let out = check();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A rules directory that does not exist is an empty set (docs/rules.md), and an empty set has the default
/// score thresholds: every message passes. (It once had thresholds of 0, so a message scoring 0 was
/// refused with "550 5.7.1 message refused (score 0.0)": moat started from another directory with the
/// shipped relative `rules.directory = "rules"` refused all mail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_rules_directory_refuses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-rules");
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!("rules.directory = {:?}", missing.display().to_string());
    let running = start(&test_config(fake.addr, &extra)).await;
    let (mut client, code) = Client::connect(running.addr("smtp").unwrap()).await;
    assert_eq!(code, 220);
    client.expect("EHLO client.example", 250).await;
    for n in 0..2 {
        send(&mut client, n).await;
    }
    client.expect("QUIT", 221).await;
    assert_eq!(fake.messages().len(), 2);
    let _ = running.stop().await;
}
