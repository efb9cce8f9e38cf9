//! moat sends messages to a real Postfix (which offers CHUNKING since 3.4) with `BDAT <size> LAST`, raw:
//! lines starting with "." and a 1 MiB message arrive byte for byte, a rewritten Subject (the splice that
//! changes the size) too, and Postfix's own per-session command counts (`bdat=1` in its `disconnect`
//! log line) show BDAT was used; with `upstream.chunking = false` the same counts say `data=1`.
//! Skipped when Postfix is missing, except under CI=true where that is a failure.
// Plain #[test]s polling external processes, off any runtime: `std::thread::sleep` (disallowed in
// clippy.toml for async code) is deliberate here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::moat_process::MoatProcess;
use common::postfix::{crlf_to_lf, require_peer, Postfix};

/// moat without its Received header (so what Postfix stores is exactly what the client sent) and without
/// pooling (so each upstream session ends, and Postfix logs its command counts, when the client's does).
const BASE: &str = "server.reverse_dns = false\ntrace.received_header = false\nupstream.pool_size = 0\n\
                    limits.max_message_size = \"10MiB\"";

/// Reads one (possibly multi-line) reply and checks its code.
fn expect(r: &mut BufReader<TcpStream>, code: &str) -> String {
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with(code), "expected {code}, got {line:?}");
        if line.as_bytes().get(3) != Some(&b'-') {
            return line;
        }
    }
}

/// Sends `messages` (canonical CRLF, unstuffed) over one SMTP session with DATA, dot-stuffing them, and
/// returns the final replies.
fn send(addr: std::net::SocketAddr, messages: &[&[u8]]) -> Vec<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    expect(&mut r, "220");
    s.write_all(b"EHLO chunk.example\r\n").unwrap();
    expect(&mut r, "250");
    let mut replies = Vec::new();
    for msg in messages {
        s.write_all(b"MAIL FROM:<a@example.org>\r\n").unwrap();
        expect(&mut r, "250");
        s.write_all(b"RCPT TO:<b@example.test>\r\n").unwrap();
        expect(&mut r, "250");
        s.write_all(b"DATA\r\n").unwrap();
        expect(&mut r, "354");
        let mut wire = Vec::with_capacity(msg.len() + msg.len() / 50);
        for line in msg.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b".") {
                wire.push(b'.');
            }
            wire.extend_from_slice(line);
        }
        wire.extend_from_slice(b".\r\n");
        s.write_all(&wire).unwrap();
        replies.push(expect(&mut r, "250"));
    }
    s.write_all(b"QUIT\r\n").unwrap();
    expect(&mut r, "221");
    replies
}

/// A message with lines that start with "." (one is a lone "."), for a stuffing mistake to show.
fn dotted() -> Vec<u8> {
    b"From: a@example.org\r\nTo: b@example.test\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n\
      middle . line\r\n. \r\n...\r\nlast\r\n"
        .to_vec()
}

/// A 1 MiB message (plus its header section) whose lines vary in length and every 7th starts with ".".
fn one_mib() -> Vec<u8> {
    let mut m = b"From: a@example.org\r\nTo: b@example.test\r\nSubject: one mebibyte\r\n\r\n".to_vec();
    let body_start = m.len();
    let mut i = 0usize;
    while m.len() - body_start < 1 << 20 {
        if i.is_multiple_of(7) {
            m.push(b'.');
        }
        let width = 20 + (i * 37) % 900;
        m.extend((0..width).map(|k| b"abcdefghijklmnopqrstuvwxyz0123456789 .-"[(i + k) % 39]));
        m.extend_from_slice(b"\r\n");
        i += 1;
    }
    m
}

/// Waits for `n` delivered messages and checks each ends with exactly what was sent (Postfix stores LF
/// line endings and puts only its own trace headers in front).
fn assert_delivered(pf: &Postfix, sent: &[&[u8]]) {
    let got = pf.wait_for_messages(sent.len(), Duration::from_secs(30));
    assert_eq!(got.len(), sent.len(), "{}", pf.log());
    for (delivered, sent) in got.iter().zip(sent) {
        let want = crlf_to_lf(sent);
        assert!(
            delivered.ends_with(&want),
            "delivered message differs from what was sent ({} vs {} bytes):\n{}",
            delivered.len(),
            want.len(),
            String::from_utf8_lossy(&delivered[..delivered.len().min(600)])
        );
        let trace = &delivered[..delivered.len() - want.len()];
        assert!(
            String::from_utf8_lossy(trace).lines().all(|l| {
                ["Return-Path:", "X-Original-To:", "Delivered-To:", "Received:", " ", "\t"]
                    .iter()
                    .any(|p| l.starts_with(p))
            }),
            "only Postfix's trace headers come before the message:\n{}",
            String::from_utf8_lossy(trace)
        );
    }
}

#[test]
fn dotted_and_one_mib_messages_arrive_byte_for_byte_through_bdat() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let moat = MoatProcess::start(pf.addr(), BASE);
    let (dots, big) = (dotted(), one_mib());
    let replies = send(moat.addr, &[&dots, &big]);
    assert!(replies.iter().all(|r| r.contains("queued as")), "{replies:?}");
    assert_delivered(&pf, &[&dots, &big]);
    // Postfix counts the commands of each session: two messages over one upstream session, both BDAT.
    assert!(pf.wait_for_log("bdat=2", Duration::from_secs(10)), "moat did not use BDAT:\n{}", pf.log());
    assert!(!pf.log().contains(" data="), "{}", pf.log());
}

#[test]
fn chunking_off_sends_data_to_postfix() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let moat = MoatProcess::start(pf.addr(), &format!("{BASE}\nupstream.chunking = false"));
    let dots = dotted();
    send(moat.addr, &[&dots]);
    assert_delivered(&pf, &[&dots]);
    assert!(pf.wait_for_log("data=1", Duration::from_secs(10)), "{}", pf.log());
    assert!(!pf.log().contains(" bdat="), "{}", pf.log());
}

/// A tag rule's Subject prefix changes the message's size on the way (the splice): the BDAT count must
/// follow, or Postfix would read the wrong number of bytes and the session would fall apart.
#[test]
fn rewritten_subject_goes_with_the_right_bdat_size() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("50-tag.toml"),
        "[[rule]]\nid = \"suspect\"\nwhen = { mail_from = '@example\\.org$' }\naction = \"tag\"\n\
         subject_prefix = \"[SPAM] \"\n",
    )
    .unwrap();
    let moat = MoatProcess::start(pf.addr(), &format!("{BASE}\nrules.directory = {:?}", rules.path().display()));
    let (dots, big) = (dotted(), one_mib());
    let replies = send(moat.addr, &[&dots, &big]);
    assert!(replies.iter().all(|r| r.contains("queued as")), "{replies:?}");
    let want: Vec<Vec<u8>> = [&dots, &big]
        .iter()
        .map(|m| String::from_utf8_lossy(m).replacen("Subject: ", "Subject: [SPAM] ", 1).into_bytes())
        .collect();
    assert_delivered(&pf, &[&want[0], &want[1]]);
    assert!(pf.wait_for_log("bdat=2", Duration::from_secs(10)), "moat did not use BDAT:\n{}", pf.log());
}
