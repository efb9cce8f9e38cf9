//! moat in front of a real Postfix (Debian's package), driven by real clients (swaks, Python smtplib).
//! moat runs as its own process here (the built `moat` binary), so its memory can be measured.
//! Skipped when a peer is missing, except under CI=true where that is a failure.
// Plain #[test]s polling external processes, off any runtime: `std::thread::sleep` (disallowed in
// clippy.toml for async code) is deliberate here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::moat_process::MoatProcess;
use common::postfix::{require_peer, split_message, Postfix};

fn swaks(args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks").args(args).stdin(Stdio::null()).output().expect("swaks runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn swaks_through_moat_reaches_postfix_with_the_client_identity() {
    if !require_peer("postfix") || !require_peer("swaks") {
        return;
    }
    let pf = Postfix::start();
    let moat = MoatProcess::start(pf.addr(), "server.reverse_dns = false");
    let server = moat.addr.to_string();
    // The client connects from 127.0.0.2 so its address differs from moat's own (127.0.0.1).
    let (ok, out) = swaks(&[
        "--server",
        &server,
        "--local-interface",
        "127.0.0.2",
        "--helo",
        "client.example",
        "--from",
        "alice@example.org",
        "--to",
        "bob@example.test",
        "--header",
        "Subject: through moat",
        "--body",
        "hello from swaks",
    ]);
    assert!(ok, "{out}");
    // Postfix's reply to BDAT (moat's default towards it) says "Ok: 411 bytes queued as ID", to DATA
    // "Ok: queued as ID".
    assert!(
        out.contains("<-  250 2.0.0 Ok: ") && out.contains(" queued as "),
        "the upstream's queue id reaches the client:\n{out}"
    );
    let msgs = pf.wait_for_messages(1, Duration::from_secs(20));
    assert_eq!(msgs.len(), 1, "{}", pf.log());
    let text = String::from_utf8_lossy(&msgs[0]);
    assert!(text.contains("Subject: through moat"), "{text}");
    assert!(text.contains("by moat.test (moat) with ESMTP"), "moat's Received header: {text}");
    // Postfix logged the real client, not moat: XCLIENT ADDR/HELO were honoured.
    assert!(pf.wait_for_log("client=unknown[127.0.0.2]", Duration::from_secs(10)), "{}", pf.log());
    assert!(pf.log().contains("helo=<client.example>") || text.contains("from client.example"), "{}", pf.log());
}

#[test]
fn postfix_recipient_rejection_passes_through_and_nothing_is_queued() {
    if !require_peer("postfix") || !require_peer("swaks") {
        return;
    }
    let pf = Postfix::start();
    let moat = MoatProcess::start(pf.addr(), "server.reverse_dns = false");
    let (ok, out) =
        swaks(&["--server", &moat.addr.to_string(), "--from", "a@example.org", "--to", "nobody@reject.test"]);
    assert!(!ok);
    assert!(
        out.contains("<** 550 5.1.1 <nobody@reject.test>: Recipient address rejected"),
        "Postfix's 550 reaches the client unchanged:\n{out}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(pf.messages().is_empty());
}

#[test]
fn python_smtplib_through_moat() {
    if !require_peer("postfix") || !require_peer("python3") {
        return;
    }
    let pf = Postfix::start();
    let moat = MoatProcess::start(pf.addr(), "server.reverse_dns = false");
    let script = format!(
        "import smtplib\n\
         from email.message import EmailMessage\n\
         m = EmailMessage()\n\
         m['From'] = 'a@example.org'\nm['To'] = 'b@example.test, c@example.test'\nm['Subject'] = 'smtplib'\n\
         m.set_content('grüße aus python\\n.leading dot\\n')\n\
         with smtplib.SMTP('127.0.0.1', {}, source_address=('127.0.0.3', 0)) as s:\n\
         \x20   s.ehlo('py.example')\n\
         \x20   r = s.send_message(m)\n\
         \x20   assert r == {{}}, r\n\
         print('sent')\n",
        moat.addr.port()
    );
    let out = Command::new("python3").arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let msgs = pf.wait_for_messages(2, Duration::from_secs(20));
    assert_eq!(msgs.len(), 2, "one copy per recipient mailbox");
    let (_, body) = split_message(&msgs[0]);
    let body = String::from_utf8_lossy(body);
    assert!(body.contains("grüße aus python") || body.contains("gr=C3=BC=C3=9Fe"), "{body}");
    assert!(body.contains("\n.leading dot") || body.contains(".leading dot"), "{body}");
    assert!(pf.wait_for_log("client=unknown[127.0.0.3]", Duration::from_secs(10)), "{}", pf.log());
}

/// A 50 MiB message passes, and moat's peak memory stays far below the message size (the spool spills
/// to an unlinked temporary file past its memory threshold).
#[test]
fn fifty_mib_message_with_flat_memory() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let moat = MoatProcess::start(
        pf.addr(),
        // Without content rules: this measures the spool. Rules read up to `rules.scan_window` into memory.
        "server.reverse_dns = false\nlimits.max_message_size = \"60MiB\"\nrules.directory = \"\"",
    );
    let before = moat.peak_rss_kib();
    let mut s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let expect = |r: &mut std::io::BufReader<TcpStream>, code: &str| {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with(code), "expected {code}, got {line:?}");
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    };
    expect(&mut r, "220");
    s.write_all(b"EHLO big.example\r\n").unwrap();
    expect(&mut r, "250");
    s.write_all(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n").unwrap();
    expect(&mut r, "250");
    expect(&mut r, "250");
    expect(&mut r, "354");
    s.write_all(b"Subject: fifty\r\n\r\n").unwrap();
    let line =
        [b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd".as_slice(), b"\r\n"].concat();
    let block: Vec<u8> = line.iter().copied().cycle().take(line.len() * 1000).collect();
    let total = 50usize << 20;
    let mut sent = 0;
    while sent < total {
        s.write_all(&block).unwrap();
        sent += block.len();
    }
    s.write_all(b".\r\n").unwrap();
    let reply = expect(&mut r, "250");
    s.write_all(b"QUIT\r\n").unwrap();
    let peak = moat.peak_rss_kib();
    let msgs = pf.wait_for_messages(1, Duration::from_secs(60));
    assert_eq!(msgs.len(), 1, "{reply}");
    // Postfix stores LF line endings: one byte less per line than the CRLF sent.
    let expect_min = sent - sent / line.len();
    assert!(msgs[0].len() >= expect_min, "delivered {} bytes, sent {sent}", msgs[0].len());
    eprintln!("moat peak RSS: before {before} KiB, after a 50 MiB message {peak} KiB");
    // What must hold is that memory does not follow the message: the peak grows by little over the
    // baseline (which now includes the resolver, rules and state of an idle moat).
    assert!(peak.saturating_sub(before) < 8 * 1024, "RSS grew from {before} to {peak} KiB for a 50 MiB message");
    assert!(peak < 40 * 1024, "peak RSS {peak} KiB is not far below the 50 MiB message");
}

/// With `upstream.identity = "proxy-v2"` and Postfix's `smtpd_upstream_proxy_protocol = haproxy`, Postfix
/// logs the real client address from the PROXY v2 header.
#[test]
fn proxy_v2_identity_reaches_postfix() {
    if !require_peer("postfix") || !require_peer("swaks") {
        return;
    }
    let pf = Postfix::start_with(&["smtpd_upstream_proxy_protocol=haproxy"]);
    let moat = MoatProcess::start(pf.addr(), "server.reverse_dns = false\nupstream.identity = \"proxy-v2\"");
    let (ok, out) = swaks(&[
        "--server",
        &moat.addr.to_string(),
        "--local-interface",
        "127.0.0.4",
        "--from",
        "a@example.org",
        "--to",
        "b@example.test",
    ]);
    assert!(ok, "{out}");
    assert_eq!(pf.wait_for_messages(1, Duration::from_secs(20)).len(), 1, "{}", pf.log());
    assert!(pf.wait_for_log("client=unknown[127.0.0.4]", Duration::from_secs(10)), "{}", pf.log());
}

/// The shipped default rules in front of Postfix: a message with an `.exe` attachment (sent by swaks) is
/// refused at end of data and never reaches Postfix; a clean one arrives.
#[test]
fn shipped_rules_refuse_an_exe_attachment_and_pass_a_clean_message() {
    if !require_peer("postfix") || !require_peer("swaks") {
        return;
    }
    let pf = Postfix::start();
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let moat = MoatProcess::start(pf.addr(), &format!("server.reverse_dns = false\nrules.directory = {rules:?}"));
    let server = moat.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("setup.exe");
    std::fs::write(&exe, b"MZ\x90\x00 not really a program").unwrap();
    let attach = format!("@{}", exe.display());
    let base = ["--server", &server, "--from", "alice@example.org", "--to", "bob@example.test"];
    let (ok, out) =
        swaks(&[&base[..], &["--header", "Subject: tool", "--body", "see attached", "--attach", &attach]].concat());
    assert!(!ok, "{out}");
    assert!(out.contains("<** 550 5.7.1 executable attachments are not accepted"), "{out}");
    let (ok, out) = swaks(&[&base[..], &["--header", "Subject: clean one", "--body", "no attachment"]].concat());
    assert!(ok, "{out}");
    let msgs = pf.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(msgs.len(), 1, "only the clean message arrives");
    assert!(String::from_utf8_lossy(&msgs[0]).contains("Subject: clean one"));
}

/// Postfix refuses a sender at MAIL (`smtpd_sender_restrictions` with `smtpd_delay_reject = no`). With
/// `upstream.defer_mail` (the default) moat answers MAIL itself and sends it upstream with the first RCPT,
/// so swaks sees Postfix's refusal at RCPT, as it would from a Postfix with its default
/// `smtpd_delay_reject = yes`; with `defer_mail = false`, at MAIL. Nothing is queued for the refused sender,
/// and another sender's message still arrives.
#[test]
fn postfix_sender_refusal_reaches_the_client_at_rcpt_with_defer_mail() {
    if !require_peer("postfix") || !require_peer("swaks") {
        return;
    }
    let pf = Postfix::start_with(&[
        "smtpd_delay_reject=no",
        "smtpd_sender_restrictions=check_sender_access inline:{{blocked@example.org=REJECT sender refused by the test instance}}",
    ]);
    let refusal = "554 5.7.1 <blocked@example.org>: Sender address rejected: sender refused by the test instance";
    let deferred = MoatProcess::start(pf.addr(), "server.reverse_dns = false");
    let at_once = MoatProcess::start(pf.addr(), "server.reverse_dns = false\nupstream.defer_mail = false");
    // The refusal follows the command it answers in swaks' transcript (`->` sent, `<-`/`<**` received).
    let answered_at = |out: &str, command: &str| {
        let sent = out.find(command).unwrap_or_else(|| panic!("{command} not sent:\n{out}"));
        let refused = out.find(&format!("<** {refusal}")).unwrap_or_else(|| panic!("no refusal:\n{out}"));
        assert!(sent < refused, "{out}");
        assert!(!out[sent..refused].contains("\n -> "), "the refusal answers {command}:\n{out}");
    };
    let blocked = ["--from", "blocked@example.org", "--to", "b@example.test"];
    let (ok, out) = swaks(&[&["--server", &deferred.addr.to_string()][..], &blocked[..]].concat());
    assert!(!ok, "{out}");
    assert!(out.contains("<-  250 2.1.0"), "MAIL was answered by moat:\n{out}");
    answered_at(&out, "-> RCPT TO:<b@example.test>");
    let (ok, out) = swaks(&[&["--server", &at_once.addr.to_string()][..], &blocked[..]].concat());
    assert!(!ok, "{out}");
    answered_at(&out, "-> MAIL FROM:<blocked@example.org>");
    let (ok, out) = swaks(&[
        "--server",
        &deferred.addr.to_string(),
        "--from",
        "alice@example.org",
        "--to",
        "b@example.test",
        "--header",
        "Subject: allowed sender",
    ]);
    assert!(ok, "{out}");
    // Through BDAT Postfix says "Ok: N bytes queued as ID", through DATA "Ok: queued as ID".
    assert!(out.lines().any(|l| l.starts_with("<-  250 2.0.0 Ok: ") && l.contains("queued as")), "{out}");
    let msgs = pf.wait_for_messages(1, Duration::from_secs(20));
    assert_eq!(msgs.len(), 1, "{}", pf.log());
    assert!(String::from_utf8_lossy(&msgs[0]).contains("Subject: allowed sender"));
}
