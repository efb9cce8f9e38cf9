//! The quarantine store with moat as its own process in front of a real Postfix: a 30 MiB quarantined
//! message is kept whole and `moat quarantine release` delivers it byte for byte; two moat processes
//! quarantining into one directory at once lose nothing; `bcc` archive copies arrive at the archive address
//! and nowhere show to the client. Skipped when Postfix is missing, except under
//! CI=true where that is a failure.
// Plain #[test]s driving external processes: `std::thread::sleep` is deliberate here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::postfix::{crlf_to_lf, require_peer, Postfix};

const HOLD_RULE: &str = "[[rule]]\nid = \"hold\"\nwhen = { subject = '^hold' }\naction = \"quarantine\"\n";

/// A `moat serve` child with its own config file (and rules directory); killed on drop.
struct Moat {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moat {
    fn start(upstream: SocketAddr, store: &Path, extra: &str) -> Moat {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/10-hold.toml"), HOLD_RULE).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.path().join("moat.toml");
        std::fs::write(
            &config,
            format!(
                "server.hostname = \"moat.test\"\nserver.reverse_dns = false\nmetrics.address = \"\"\n\
                 audit.destination = \"off\"\nupstream.address = \"{upstream}\"\n\
                 relay.local_domains = [\"example.test\", \"other.test\"]\nrules.directory = {:?}\nquarantine.directory = {:?}\n{extra}\n\
                 [[listener]]\nname = \"smtp\"\naddress = \"127.0.0.1:{port}\"\nmode = \"plain\"\n",
                dir.path().join("rules").display().to_string(),
                store.display().to_string()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("moat.log")).unwrap())
            .spawn()
            .expect("moat starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "moat did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moat { child, addr, config, _dir: dir }
    }

    /// `moat quarantine ARGS --config <this config>`: (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_moat"))
            .arg("quarantine")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }
}

impl Drop for Moat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one message (`data` already dot-stuffed, without the final dot) and returns the final reply.
fn send(addr: SocketAddr, rcpt: &str, data: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let reply = |r: &mut BufReader<TcpStream>| loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.as_bytes().get(3) != Some(&b'-') {
            return line;
        }
    };
    assert!(reply(&mut r).starts_with("220"));
    s.write_all(b"EHLO client.example\r\n").unwrap();
    assert!(reply(&mut r).starts_with("250"));
    s.write_all(format!("MAIL FROM:<alice@example.org>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n").as_bytes()).unwrap();
    for want in ["250", "250", "354"] {
        let got = reply(&mut r);
        assert!(got.starts_with(want), "expected {want}, got {got}");
    }
    s.write_all(data).unwrap();
    s.write_all(b".\r\n").unwrap();
    let out = reply(&mut r);
    let _ = s.write_all(b"QUIT\r\n");
    out
}

fn items(store: &Path) -> Vec<serde_json::Value> {
    let mut v: Vec<serde_json::Value> = std::fs::read_dir(store)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|m| m["id"].as_str().unwrap().to_string());
    v
}

/// A 30 MiB message is quarantined whole (far past the scan window) and `release` delivers exactly it;
/// a second release needs `--again`, and `--to` sends it to another recipient.
#[test]
fn thirty_mib_quarantined_whole_and_released_byte_identical() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let store = tempfile::tempdir().unwrap();
    let moat =
        Moat::start(pf.addr(), store.path(), "limits.max_message_size = \"40MiB\"\nrules.scan_window = \"1MiB\"");
    // The message as stored (unstuffed) and as sent (a line starting with a dot is doubled on the wire).
    let mut msg = b"Subject: hold this\r\nMessage-ID: <big@example.org>\r\n\r\n.leading dot\r\n".to_vec();
    let mut i = 0u64;
    while msg.len() < 30 << 20 {
        msg.extend_from_slice(format!("{i:08} {}\r\n", "abcdefghijklmnopqrstuvwxyz0123456789".repeat(2)).as_bytes());
        i += 1;
    }
    let body_at = msg.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let wire = [&msg[..body_at], b".", &msg[body_at..]].concat();
    assert!(wire[body_at..].starts_with(b"..leading dot"));
    let reply = send(moat.addr, "bob@example.test", &wire);
    assert!(reply.starts_with("250"), "{reply}");
    assert!(pf.wait_for_messages(1, Duration::from_millis(500)).is_empty(), "a held message is not delivered");

    let found = items(store.path());
    assert_eq!(found.len(), 1);
    let id = found[0]["id"].as_str().unwrap().to_string();
    let eml = std::fs::read(store.path().join(format!("{id}.eml"))).unwrap();
    assert!(eml == msg, "stored {} bytes, sent {}", eml.len(), msg.len());
    assert_eq!(found[0]["size"], msg.len());

    let (ok, out, err) = moat.cli(&["list", "--rcpt", "example.test", "--rule", "hold"]);
    assert!(ok && out.starts_with(&id) && out.lines().count() == 1, "{out}{err}");
    let (ok, out, _) = moat.cli(&["list", "--rule", "other"]);
    assert!(ok && out.is_empty(), "{out}");
    let (ok, out, err) = moat.cli(&["show", &id]);
    assert!(ok && out.contains("Subject: hold this") && out.contains("\"verdict\": \"quarantine\""), "{out}{err}");

    let (ok, out, err) = moat.cli(&["release", &id]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("250"), "{out}");
    let msgs = pf.wait_for_messages(1, Duration::from_secs(60));
    assert_eq!(msgs.len(), 1);
    // What Postfix stored: its own trace headers, then the message as received (with LF line endings).
    let want = crlf_to_lf(&msg);
    assert!(
        msgs[0].ends_with(&want),
        "delivered {} bytes, expected the {}-byte message at its end",
        msgs[0].len(),
        want.len()
    );
    let prefix = String::from_utf8_lossy(&msgs[0][..msgs[0].len() - want.len()]).into_owned();
    for line in prefix.lines() {
        let known = ["Return-Path:", "X-Original-To:", "Delivered-To:", "Received:", " ", "\t"];
        assert!(known.iter().any(|k| line.starts_with(k)), "unexpected line before the message: {line:?}");
    }
    assert!(prefix.contains("X-Original-To: bob@example.test"), "{prefix}");

    let (ok, _, err) = moat.cli(&["release", &id]);
    assert!(!ok && err.contains("already released"), "{err}");
    let (ok, out, err) = moat.cli(&["release", &id, "--again", "--to", "carol@example.test"]);
    assert!(ok, "{out}{err}");
    let msgs = pf.wait_for_messages(2, Duration::from_secs(60));
    assert_eq!(msgs.len(), 2);
    assert!(msgs.iter().any(
        |m| m.ends_with(&want) && String::from_utf8_lossy(&m[..300]).contains("X-Original-To: carol@example.test")
    ));
    let log = std::fs::read_to_string(store.path().join("releases.log")).unwrap();
    assert_eq!(log.lines().count(), 2, "every release is recorded: {log}");
    assert!(log.contains("\"queue_id\":\""), "{log}");

    let (ok, out, err) = moat.cli(&["delete", &id]);
    assert!(ok, "{out}{err}");
    assert!(items(store.path()).is_empty() && !store.path().join(format!("{id}.eml")).exists());
}

/// Two moat processes quarantining into one directory at the same time: every message is there, whole.
#[test]
fn two_processes_share_one_store_and_lose_nothing() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let store = tempfile::tempdir().unwrap();
    let a = Moat::start(pf.addr(), store.path(), "");
    let b = Moat::start(pf.addr(), store.path(), "");
    const PER_CLIENT: usize = 15;
    let mut threads = Vec::new();
    for (k, addr) in [a.addr, a.addr, b.addr, b.addr].into_iter().enumerate() {
        threads.push(std::thread::spawn(move || {
            for n in 0..PER_CLIENT {
                let body = format!("Subject: hold {k}-{n}\r\n\r\n")
                    + &format!("{}\r\n", format!("{k}-{n} ").repeat(100)).repeat(20);
                let reply = send(addr, "bob@example.test", body.as_bytes());
                assert!(reply.starts_with("250"), "{reply}");
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let found = items(store.path());
    assert_eq!(found.len(), 4 * PER_CLIENT);
    let mut subjects: Vec<String> = found.iter().map(|m| m["subject"].as_str().unwrap().to_string()).collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 4 * PER_CLIENT, "every message once");
    for m in &found {
        let id = m["id"].as_str().unwrap();
        let eml = std::fs::read(store.path().join(format!("{id}.eml"))).unwrap();
        let tag = m["subject"].as_str().unwrap().strip_prefix("hold ").unwrap();
        assert!(eml.ends_with(format!("{tag} \r\n").as_bytes()), "{id}: not its own body");
        assert_eq!(eml.len() as u64, m["size"].as_u64().unwrap(), "{id}");
        assert!(eml.starts_with(format!("Subject: {}", m["subject"].as_str().unwrap()).as_bytes()));
    }
    assert!(pf.messages().is_empty());
}

/// `bcc` archive: the archive address is one more recipient of the upstream transaction for selected mail
/// (here: recipients in example.test); Postfix delivers the copy there. The client's reply and the
/// recipient's copy never mention it; unselected mail gets no copy.
#[test]
fn bcc_archive_copies_arrive_at_the_archive_address() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let store = tempfile::tempdir().unwrap();
    let moat = Moat::start(
        pf.addr(),
        store.path(),
        "archive.mode = \"bcc\"\narchive.address = \"journal@archive.example\"\narchive.rcpt_domains = [\"example.test\"]",
    );
    let reply = send(moat.addr, "bob@example.test", b"Subject: journaled\r\n\r\nkeep a copy\r\n");
    assert!(reply.starts_with("250") && !reply.contains("archive"), "{reply}");
    let reply = send(moat.addr, "carol@other.test", b"Subject: not journaled\r\n\r\nno copy\r\n");
    assert!(reply.starts_with("250"), "{reply}");
    let msgs = pf.wait_for_messages(3, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500)); // a fourth (wrong) delivery would show up by now
    let msgs = if msgs.len() == 3 { pf.messages() } else { msgs };
    assert_eq!(msgs.len(), 3, "bob, the archive copy of bob's message, carol");
    let text: Vec<String> = msgs.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect();
    let journal: Vec<&String> = text.iter().filter(|t| t.contains("X-Original-To: journal@archive.example")).collect();
    assert_eq!(journal.len(), 1, "{text:#?}");
    assert!(journal[0].contains("Subject: journaled") && journal[0].contains("keep a copy"));
    let bob = text.iter().find(|t| t.contains("X-Original-To: bob@example.test")).expect("bob's copy");
    assert!(!bob.contains("archive.example"), "the recipient's copy reveals the archive: {bob}");
    let carol = text.iter().find(|t| t.contains("X-Original-To: carol@other.test")).expect("carol's copy");
    assert!(carol.contains("no copy"));
}
