//! What moat adds to a relayed message: its `Received:` trace header (RFC 5321 4.4, protocol names from
//! RFC 3848), and small readers of the header section for logs and audit (Message-ID, Subject).
//!
//! Nothing the client sends can break out of the header: every client-supplied value is reduced to a safe
//! character set before it is written, and the header is folded with CRLF + TAB.

use std::net::SocketAddr;
use std::time::SystemTime;

use crate::tls::TlsInfo;

/// The facts a Received header records.
#[derive(Debug)]
pub struct ReceivedInfo<'a> {
    pub helo: Option<&'a str>,
    pub client_name: Option<&'a str>,
    pub peer: SocketAddr,
    pub hostname: &'a str,
    pub esmtp: bool,
    pub tls: Option<&'a TlsInfo>,
    pub authenticated: bool,
    pub id: &'a str,
    /// Named only when the message has exactly one recipient (RFC 5321 7.2 privacy note).
    pub single_rcpt: Option<&'a str>,
}

/// The header field, CRLF-terminated.
pub fn received_header(r: &ReceivedInfo<'_>, now: SystemTime) -> String {
    let proto = match (r.esmtp, r.tls.is_some(), r.authenticated) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    };
    let helo = r.helo.map(safe).unwrap_or_else(|| "unknown".into());
    let name = r.client_name.map(safe).unwrap_or_else(|| "unknown".into());
    let mut h = format!(
        "Received: from {helo} ({name} [{}]:{})\r\n\tby {} (moat) with {proto} id {}",
        r.peer.ip(),
        r.peer.port(),
        safe(r.hostname),
        safe(r.id)
    );
    if let Some(t) = r.tls {
        h.push_str(&format!("\r\n\t(using {} with cipher {})", safe(t.version), safe(&t.cipher)));
    }
    if let Some(rcpt) = r.single_rcpt {
        h.push_str(&format!("\r\n\tfor <{}>", safe_addr(rcpt)));
    }
    h.push_str(&format!(";\r\n\t{}\r\n", rfc5322_date(now)));
    h
}

/// Keeps letters, digits and `-._:[]`; anything else becomes `_`.
fn safe(s: &str) -> String {
    s.chars().take(255).map(|c| if c.is_ascii_alphanumeric() || "-._:[]".contains(c) { c } else { '_' }).collect()
}

/// An address inside `<>`: printable ASCII without `<>`, `;`, `(`, `)` or spaces.
fn safe_addr(s: &str) -> String {
    s.chars().take(256).map(|c| if c.is_ascii_graphic() && !"<>;()".contains(c) { c } else { '_' }).collect()
}

/// `Sun, 29 Nov 2026 05:13:21 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let s = httpdate::fmt_http_date(t);
    s.strip_suffix(" GMT").map(|d| format!("{d} +0000")).unwrap_or(s)
}

/// The unfolded value of the first header field `name` in a header section (case-insensitive).
pub fn header_value(head: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            return None; // end of the header section
        }
        let Some((field, value)) = line.split_once(':') else { continue };
        if !field.trim_end().eq_ignore_ascii_case(name) {
            continue;
        }
        let mut v = value.trim().to_string();
        while let Some(next) = lines.peek().filter(|l| l.starts_with([' ', '\t'])) {
            v.push(' ');
            v.push_str(next.trim());
            lines.next();
        }
        return Some(v);
    }
    None
}

/// The header section: bytes up to and including the empty line (or everything given).
pub fn header_section(msg: &[u8]) -> &[u8] {
    if msg.starts_with(b"\r\n") {
        return &msg[..2];
    }
    match memchr::memmem::find(msg, b"\r\n\r\n") {
        Some(i) => &msg[..i + 4],
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_is_one_safe_header() {
        let info = ReceivedInfo {
            helo: Some("evil\r\nX-Injected: yes"),
            client_name: None,
            peer: "192.0.2.7:4000".parse().unwrap(),
            hostname: "mx.test",
            esmtp: true,
            tls: None,
            authenticated: false,
            id: "abc",
            single_rcpt: Some("b@example.test>\r\nBcc: x"),
        };
        let h = received_header(&info, SystemTime::UNIX_EPOCH);
        assert!(h.starts_with("Received: from evil__X-Injected:_yes (unknown [192.0.2.7]:4000)\r\n\tby mx.test (moat) with ESMTP id abc"), "{h}");
        assert!(h.ends_with("Thu, 01 Jan 1970 00:00:00 +0000\r\n"), "{h}");
        // every line after the first is a continuation
        for line in h.trim_end().split("\r\n").skip(1) {
            assert!(line.starts_with('\t'), "{line:?}");
        }
    }

    #[test]
    fn header_reading() {
        let m = b"Subject: hello\r\n world\r\nMessage-ID: <1@x>\r\n\r\nSubject: body\r\n";
        assert_eq!(header_value(m, "subject").as_deref(), Some("hello world"));
        assert_eq!(header_value(m, "Message-Id").as_deref(), Some("<1@x>"));
        assert_eq!(header_value(m, "To"), None);
        assert_eq!(header_section(m).len(), 45);
    }
}
