//! The `directory` archive with moat in-process and a fake upstream: a copy of every accepted message,
//! gzip, with its envelope, on disk before the client's `250`; removed when the upstream refuses; a full
//! disk (a tiny tmpfs) answers `451` and relays nothing, and `required = false` relays anyway.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};

async fn send(client: &mut Client, rcpt: &str, body: &[u8]) -> (u16, String) {
    client.expect("MAIL FROM:<alice@example.org>", 250).await;
    client.expect(&format!("RCPT TO:<{rcpt}>"), 250).await;
    client.expect("DATA", 354).await;
    let mut msg = b"Subject: archived\r\n\r\n".to_vec();
    msg.extend_from_slice(body);
    msg.extend_from_slice(b".\r\n");
    client.send_raw(&msg).await;
    client.reply().await
}

/// Every `<id>.json` under the archive's day folders, with its `.eml.gz`.
fn copies(root: &Path) -> Vec<(serde_json::Value, PathBuf)> {
    let mut out = Vec::new();
    for day in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if day.file_name() == "tmp" {
            continue;
        }
        for f in std::fs::read_dir(day.path()).into_iter().flatten().flatten() {
            let p = f.path();
            if p.extension().is_some_and(|x| x == "json") {
                let env = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                out.push((env, p.with_extension("eml.gz")));
            }
        }
    }
    out
}

/// The value of a series in moat's metrics (process-wide: tests in this binary add up).
fn metric(series: &str) -> f64 {
    let text = moat::metrics::install().expect("metrics recorder").render();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
}

const DIR_OK: &str = "moat_archive_copies_total{mode=\"directory\",result=\"ok\"}";
const DIR_ERROR: &str = "moat_archive_copies_total{mode=\"directory\",result=\"error\"}";

fn gunzip(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap()).read_to_end(&mut out).unwrap();
    out
}

/// Bytes that do not compress, so a small disk fills.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(n + n / 76 * 2);
    while out.len() < n {
        for _ in 0..76 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[(x % 64) as usize]);
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_archive_keeps_accepted_mail_and_drops_refused() {
    let ok_before = metric(DIR_OK);
    let root = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start(Script::default()).await;
    let extra = format!("archive.mode = \"directory\"\narchive.directory = {:?}", root.path().display().to_string());
    let running = start(&test_config(fake.addr, &extra)).await;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    // On the wire a leading dot is doubled; the message (and its copy) has one.
    let (wire, body) = (b"line one\r\n..leading dot\r\n".repeat(1000), b"line one\r\n.leading dot\r\n".repeat(1000));
    let (code, text) = send(&mut client, "bob@example.test", &wire).await;
    assert_eq!(code, 250, "{text}");
    let found = copies(root.path());
    assert_eq!(found.len(), 1);
    let (env, gz) = &found[0];
    let mut want = b"Subject: archived\r\n\r\n".to_vec();
    want.extend_from_slice(&body);
    assert!(gunzip(gz) == want, "the archived message is the message");
    assert!(fake.messages()[0].data.ends_with(&want), "the relayed one is the same message (after moat's Received:)");
    assert_eq!(env["mail_from"], "alice@example.org");
    assert_eq!(env["rcpts"], serde_json::json!(["bob@example.test"]));
    assert_eq!(env["verdict"], "accepted");
    assert_eq!(env["client"]["listener"], "smtp");
    assert!(metric(DIR_OK) > ok_before, "the copy is counted");

    // The upstream refuses the message after its data: the client is told so, and no copy stays.
    fake.set_script(Script { end: Some("554 5.7.1 no thanks".into()), ..Script::default() });
    let (code, text) = send(&mut client, "bob@example.test", b"refused\r\n").await;
    assert_eq!(code, 554, "{text}");
    assert_eq!(copies(root.path()).len(), 1, "the refused message's copy was removed");
    drop(client);
    running.stop().await;
}

/// A tiny tmpfs as the archive directory (we run as root); where mounting is not allowed, the archive
/// directory is a path that cannot be created (a file in its place), which fails the same write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_archive_disk_answers_451_and_loses_nothing() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("archive");
    std::fs::create_dir(&root).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&root)
        .status()
        .is_ok_and(|s| s.success());
    // Unmounted however the test ends (a panic included), before the temporary directory goes.
    let _unmount = mounted.then(|| Unmount(root.clone()));
    let dir = if mounted {
        eprintln!("archive on a 256 KiB tmpfs");
        root.clone()
    } else {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI=true: mount -t tmpfs must work (run as root)");
        eprintln!("mount not allowed: archive directory blocked by a file instead of a full disk");
        std::fs::write(base.path().join("blocked"), "").unwrap();
        base.path().join("blocked").join("archive")
    };
    let fake = FakeUpstream::start(Script::default()).await;
    let config = |required: bool| {
        format!(
            "archive.mode = \"directory\"\narchive.required = {required}\narchive.directory = {:?}\nlimits.max_message_size = \"4MiB\"",
            dir.display().to_string()
        )
    };
    let errors_before = metric(DIR_ERROR);
    let running = start(&test_config(fake.addr, &config(true))).await;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    let (code, text) = send(&mut client, "bob@example.test", &noise(1 << 20)).await;
    assert_eq!(code, 451, "{text}");
    assert_eq!(fake.messages().len(), 0, "nothing relayed without its archive copy");
    assert!(metric(DIR_ERROR) > errors_before, "the failed copy is counted");
    if mounted {
        let left: Vec<_> = std::fs::read_dir(root.join("tmp")).unwrap().collect();
        assert!(left.is_empty(), "the partial copy was removed");
        // Room is left for a small message: archived and relayed.
        let (code, text) = send(&mut client, "bob@example.test", b"small\r\n").await;
        assert_eq!(code, 250, "{text}");
        assert_eq!(copies(&root).len(), 1);
        assert_eq!(fake.wait_for(1).await.len(), 1);
    }
    drop(client);
    running.stop().await;

    // Not required: the message is relayed although its copy failed.
    let running = start(&test_config(fake.addr, &config(false))).await;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    let before = fake.messages().len();
    let (code, text) = send(&mut client, "bob@example.test", &noise(1 << 20)).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(fake.wait_for(before + 1).await.len(), before + 1);
    drop(client);
    running.stop().await;
}

/// `bcc`: the archive address is an extra upstream recipient; when the upstream refuses it, a required
/// archive answers `451` and nothing is queued, an optional one relays without the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bcc_recipient_refused_by_the_upstream() {
    let fake = FakeUpstream::start(Script::default()).await;
    let config = |required: bool| {
        format!("archive.mode = \"bcc\"\narchive.address = \"journal@archive.test\"\narchive.required = {required}")
    };
    let running = start(&test_config(fake.addr, &config(true))).await;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    let (code, text) = send(&mut client, "bob@example.test", b"copied\r\n").await;
    assert_eq!(code, 250, "{text}");
    assert!(!text.contains("journal"), "{text}");
    let got = fake.wait_for(1).await;
    assert_eq!(got[0].rcpts, ["RCPT TO:<bob@example.test>", "RCPT TO:<journal@archive.test>"]);
    assert!(!String::from_utf8_lossy(&got[0].data).contains("journal"), "no header names the archive");

    fake.set_script(Script { rcpt: Some(("journal".into(), "550 5.1.1 no such user".into())), ..Script::default() });
    let (code, text) = send(&mut client, "bob@example.test", b"refused copy\r\n").await;
    assert_eq!(code, 451, "{text}");
    assert_eq!(fake.messages().len(), 1, "nothing queued without its copy");
    drop(client);
    running.stop().await;

    let running = start(&test_config(fake.addr, &config(false))).await;
    let (mut client, _) = Client::connect(running.addr("smtp").unwrap()).await;
    client.expect("EHLO client.example", 250).await;
    let (code, text) = send(&mut client, "bob@example.test", b"optional copy\r\n").await;
    assert_eq!(code, 250, "{text}");
    let got = fake.wait_for(2).await;
    assert_eq!(got[1].rcpts, ["RCPT TO:<bob@example.test>"]);
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
