//! The Postfix test harness itself (`tests/common/postfix.rs`, `scripts/postfix-instance.sh`): a real
//! Postfix starts, takes a message over plain SMTP, delivers it byte for byte into its Maildir, logs it,
//! rejects `@reject.test`, and honours XCLIENT from loopback. Skipped when Postfix is not installed
//! (unless CI=true).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::postfix::{crlf_to_lf, require_peer, split_message, Postfix};

/// A tiny blocking SMTP client, enough for these tests.
struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    fn connect(pf: &Postfix) -> Smtp {
        let s = TcpStream::connect(pf.addr()).expect("connect to Postfix");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = Smtp { r: BufReader::new(s.try_clone().unwrap()), w: s };
        let (code, text) = c.reply();
        assert_eq!(code, 220, "greeting: {text}");
        c
    }

    /// Reads one (possibly multi-line) reply: its code and all its lines.
    fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).expect("read reply");
            assert!(n > 0, "connection closed; got so far: {all:?}");
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line.get(..3).and_then(|c| c.parse().ok()).expect("reply code");
                return (code, all);
            }
        }
    }

    /// Sends `line` + CRLF and reads the reply.
    fn cmd(&mut self, line: &str) -> (u16, String) {
        self.w.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        self.reply()
    }

    fn expect(&mut self, line: &str, code: u16) -> String {
        let (c, text) = self.cmd(line);
        assert_eq!(c, code, "{line} -> {text}");
        text
    }
}

/// Doubles a leading dot on every line (RFC 5321 4.5.2).
fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

#[test]
fn delivers_a_message_byte_for_byte_and_logs_it() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    // A body with an 8-bit line, a line starting with a dot (sent dot-stuffed), trailing spaces.
    let body: &[u8] = b"first line\r\n.leading dot\r\ncaf\xc3\xa9 8bit   \r\n\r\nlast line\r\n";
    let header: &[u8] = b"From: <a@example.org>\r\nTo: <b@example.test>\r\nSubject: harness\r\n\
                          Message-ID: <harness-1@example.org>\r\n";

    let mut c = Smtp::connect(&pf);
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(ehlo.contains("XCLIENT"), "XCLIENT offered to loopback: {ehlo}");
    c.expect("MAIL FROM:<a@example.org>", 250);
    c.expect("RCPT TO:<b@example.test>", 250);
    c.expect("DATA", 354);
    let mut data = header.to_vec();
    data.extend_from_slice(b"\r\n");
    data.extend_from_slice(body);
    c.w.write_all(&dot_stuff(&data)).unwrap();
    let (code, text) = c.cmd(".");
    assert_eq!(code, 250, "end of data: {text}");
    let queue_id = text.split_whitespace().last().unwrap().trim().to_string();
    c.expect("QUIT", 221);

    let msgs = pf.wait_for_messages(1, Duration::from_secs(20));
    assert_eq!(msgs.len(), 1, "one message delivered");
    let (delivered_header, delivered_body) = split_message(&msgs[0]);
    assert_eq!(delivered_body, crlf_to_lf(body).as_slice(), "body arrives byte for byte (LF endings)");
    let delivered_header = String::from_utf8_lossy(delivered_header);
    assert!(delivered_header.starts_with("Return-Path: <a@example.org>\n"), "{delivered_header}");
    assert!(delivered_header.contains("Delivered-To: b@example.test\n"), "{delivered_header}");
    assert!(
        delivered_header.ends_with(&String::from_utf8_lossy(&crlf_to_lf(header)).into_owned()),
        "original header section kept as sent: {delivered_header}"
    );

    assert!(pf.wait_for_log(&format!("{queue_id}: client=localhost[127.0.0.1]"), Duration::from_secs(10)));
    assert!(pf.wait_for_log("status=sent (delivered to maildir)", Duration::from_secs(10)), "{}", pf.log());
}

#[test]
fn rejects_reject_test_and_honours_xclient() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let mut c = Smtp::connect(&pf);
    c.expect("EHLO moat.test", 250);
    c.expect("XCLIENT ADDR=192.0.2.7 NAME=client.example HELO=helo.client.example", 220);
    c.expect("EHLO moat.test", 250);
    c.expect("MAIL FROM:<a@example.org>", 250);
    let (code, text) = c.cmd("RCPT TO:<nobody@reject.test>");
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.1.1"), "{text}");
    c.expect("RCPT TO:<ok@example.test>", 250);
    c.expect("DATA", 354);
    c.w.write_all(b"Subject: via xclient\r\n\r\nhello\r\n").unwrap();
    c.expect(".", 250);
    c.expect("QUIT", 221);

    let msgs = pf.wait_for_messages(1, Duration::from_secs(20));
    assert_eq!(msgs.len(), 1);
    assert!(String::from_utf8_lossy(&msgs[0]).contains("Delivered-To: ok@example.test\n"));
    assert!(pf.wait_for_log("client=client.example[192.0.2.7]", Duration::from_secs(10)), "{}", pf.log());
    assert!(pf.wait_for_log("NOQUEUE: reject: RCPT from client.example[192.0.2.7]: 550 5.1.1", Duration::from_secs(10)));
    // Nothing else was delivered.
    assert_eq!(pf.wait_for_messages(2, Duration::from_millis(500)).len(), 1);
}
