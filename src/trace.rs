//! What moat adds to a relayed message: its `Received:` trace header (RFC 5321 4.4, protocol names from
//! RFC 3848), and small readers of the header section for logs and audit (Message-ID, Subject).
//!
//! Nothing the client sends can break out of the header: every client-supplied value is reduced to a safe
//! character set before it is written, and the header is folded with CRLF + TAB.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::SystemTime;

use crate::timefmt;
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
    let mut h = String::new();
    push_received(&mut None, r, now, &mut h);
    h
}

/// Appends the header field for `r` to `out`, CRLF-terminated, reusing `stem` when it was built for the same
/// session facts (and rebuilding it when not): per message, only the id, the recipient and the date are
/// written.
pub fn push_received(stem: &mut Option<ReceivedStem>, r: &ReceivedInfo<'_>, now: SystemTime, out: &mut String) {
    let stem = match stem {
        Some(s) if s.matches(r) => s,
        _ => stem.insert(ReceivedStem::new(r)),
    };
    stem.push(r, now, out);
}

// === impl ReceivedStem ===

/// The parts of a Received header that depend only on the session (HELO, client, TLS, AUTH), rendered once
/// and kept with the facts they were rendered from; [`push_received`] checks those facts against each
/// message's, so a new EHLO, STARTTLS or AUTH rebuilds it without the session having to say so.
#[derive(Debug)]
pub struct ReceivedStem {
    helo: Option<String>,
    client_name: Option<String>,
    peer: SocketAddr,
    hostname: String,
    esmtp: bool,
    tls: Option<(&'static str, String)>,
    authenticated: bool,
    /// `Received: from ... with ESMTPS id ` (up to the id).
    head: String,
    /// The TLS comment after the id, or empty.
    tail: String,
}

impl ReceivedStem {
    /// Renders the session's part of the header for `r` (its id and recipient are not used).
    pub fn new(r: &ReceivedInfo<'_>) -> ReceivedStem {
        let proto = match (r.esmtp, r.tls.is_some(), r.authenticated) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let mut head = String::with_capacity(160);
        head.push_str("Received: from ");
        push_safe(&mut head, r.helo.unwrap_or("unknown"));
        head.push_str(" (");
        push_safe(&mut head, r.client_name.unwrap_or("unknown"));
        // Writing into a String cannot fail.
        let _ = write!(head, " [{}]:{})\r\n\tby ", r.peer.ip(), r.peer.port());
        push_safe(&mut head, r.hostname);
        head.push_str(" (moat) with ");
        head.push_str(proto);
        head.push_str(" id ");
        let mut tail = String::new();
        if let Some(t) = r.tls {
            tail.push_str("\r\n\t(using ");
            push_safe(&mut tail, t.version);
            tail.push_str(" with cipher ");
            push_safe(&mut tail, &t.cipher);
            tail.push(')');
        }
        ReceivedStem {
            helo: r.helo.map(str::to_string),
            client_name: r.client_name.map(str::to_string),
            peer: r.peer,
            hostname: r.hostname.to_string(),
            esmtp: r.esmtp,
            tls: r.tls.map(|t| (t.version, t.cipher.clone())),
            authenticated: r.authenticated,
            head,
            tail,
        }
    }

    /// Whether this stem was rendered from the same session facts as `r`.
    pub fn matches(&self, r: &ReceivedInfo<'_>) -> bool {
        self.helo.as_deref() == r.helo
            && self.client_name.as_deref() == r.client_name
            && self.peer == r.peer
            && self.hostname == r.hostname
            && self.esmtp == r.esmtp
            && self.tls.as_ref().map(|(v, c)| (*v, c.as_str())) == r.tls.map(|t| (t.version, t.cipher.as_str()))
            && self.authenticated == r.authenticated
    }

    /// Appends the whole header field with `r`'s id and recipient, dated `now`.
    fn push(&self, r: &ReceivedInfo<'_>, now: SystemTime, out: &mut String) {
        out.reserve(self.head.len() + self.tail.len() + 128);
        out.push_str(&self.head);
        push_safe(out, r.id);
        out.push_str(&self.tail);
        if let Some(rcpt) = r.single_rcpt {
            out.push_str("\r\n\tfor <");
            push_safe_addr(out, rcpt);
            out.push('>');
        }
        out.push_str(";\r\n\t");
        timefmt::push_rfc5322(out, now);
        out.push_str("\r\n");
    }
}

/// Appends `s` keeping letters, digits and `-._:[]`; anything else becomes `_` (at most 255 characters).
fn push_safe(out: &mut String, s: &str) {
    for c in s.chars().take(255) {
        out.push(if c.is_ascii_alphanumeric() || "-._:[]".contains(c) { c } else { '_' });
    }
}

/// Appends an address for inside `<>`: printable ASCII without `<>`, `;`, `(`, `)` or spaces (at most 256
/// characters).
fn push_safe_addr(out: &mut String, s: &str) {
    for c in s.chars().take(256) {
        out.push(if c.is_ascii_graphic() && !"<>;()".contains(c) { c } else { '_' });
    }
}

/// `Sun, 29 Nov 2026 05:13:21 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let mut s = String::with_capacity(31);
    timefmt::push_rfc5322(&mut s, t);
    s
}

/// The unfolded value of the first header field `name` in a header section (case-insensitive). Values are
/// read as UTF-8, with invalid bytes replaced (U+FFFD), and trimmed.
pub fn header_value(head: &[u8], name: &str) -> Option<String> {
    let mut lines = CrlfLines(Some(head)).peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            return None; // end of the header section
        }
        let Some(colon) = memchr::memchr(b':', line) else { continue };
        if !field_is(&line[..colon], name) {
            continue;
        }
        let mut v = String::from(String::from_utf8_lossy(&line[colon + 1..]).trim());
        while let Some(next) = lines.next_if(|l| l.first().is_some_and(|b| matches!(b, b' ' | b'\t'))) {
            v.push(' ');
            v.push_str(String::from_utf8_lossy(next).trim());
        }
        return Some(v);
    }
    None
}

/// Whether a field name (the bytes before the colon) is `name`, ignoring ASCII case and trailing white
/// space. An ASCII `name` is compared on the bytes; invalid UTF-8 never matches it (it would read as U+FFFD).
fn field_is(field: &[u8], name: &str) -> bool {
    if !name.is_ascii() {
        return String::from_utf8_lossy(field).trim_end().eq_ignore_ascii_case(name);
    }
    let n = name.len();
    field.len() >= n
        && field[..n].eq_ignore_ascii_case(name.as_bytes())
        && std::str::from_utf8(&field[n..]).is_ok_and(|rest| rest.chars().all(char::is_whitespace))
}

/// The pieces of `text` between CRLFs, the last one after the final CRLF included (as `str::split` does).
struct CrlfLines<'a>(Option<&'a [u8]>);

impl<'a> Iterator for CrlfLines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.0?;
        match memchr::memmem::find(rest, b"\r\n") {
            Some(i) => {
                self.0 = Some(&rest[i + 2..]);
                Some(&rest[..i])
            }
            None => self.0.take(),
        }
    }
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
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// The `format!`-based header writer that [`ReceivedStem`] replaced, kept as the oracle.
    fn old_received_header(r: &ReceivedInfo<'_>, now: SystemTime) -> String {
        fn safe(s: &str) -> String {
            s.chars()
                .take(255)
                .map(|c| if c.is_ascii_alphanumeric() || "-._:[]".contains(c) { c } else { '_' })
                .collect()
        }
        fn safe_addr(s: &str) -> String {
            s.chars().take(256).map(|c| if c.is_ascii_graphic() && !"<>;()".contains(c) { c } else { '_' }).collect()
        }
        fn rfc5322_date(t: SystemTime) -> String {
            let s = httpdate::fmt_http_date(t);
            s.strip_suffix(" GMT").map(|d| format!("{d} +0000")).unwrap_or(s)
        }
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

    /// The `from_utf8_lossy`-based reader that [`header_value`] replaced, kept as the oracle.
    fn old_header_value(head: &[u8], name: &str) -> Option<String> {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n").peekable();
        while let Some(line) = lines.next() {
            if line.is_empty() {
                return None;
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

    /// Client-controlled text: safe characters, everything `safe()` rewrites, multi-byte characters, long runs.
    fn odd_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9.-]{0,20}",
            "[ -~\r\n\t\x00\x7f]{0,20}",
            any::<String>(),
            "[a-z\u{e9}\u{3000}<>;()\\[\\]:_]{250,260}",
        ]
    }

    /// A session's facts; the message's id and recipient come separately.
    #[derive(Clone, Debug)]
    struct Facts {
        helo: Option<String>,
        client_name: Option<String>,
        peer: SocketAddr,
        hostname: String,
        esmtp: bool,
        tls: Option<TlsInfo>,
        authenticated: bool,
    }

    prop_compose! {
        fn facts()(
            helo in proptest::option::of(odd_text()),
            client_name in proptest::option::of(odd_text()),
            peer in prop_oneof![
                any::<(std::net::Ipv4Addr, u16)>().prop_map(SocketAddr::from),
                any::<(std::net::Ipv6Addr, u16)>().prop_map(SocketAddr::from),
            ],
            hostname in odd_text(),
            esmtp in any::<bool>(),
            tls in proptest::option::of((prop_oneof![Just("TLSv1.3"), Just("TLSv1.2"), Just("un known")], odd_text())),
            authenticated in any::<bool>(),
        ) -> Facts {
            let tls = tls.map(|(version, cipher)| TlsInfo { version, cipher, sni: None });
            Facts { helo, client_name, peer, hostname, esmtp, tls, authenticated }
        }
    }

    impl Facts {
        fn info<'a>(&'a self, id: &'a str, single_rcpt: Option<&'a str>) -> ReceivedInfo<'a> {
            ReceivedInfo {
                helo: self.helo.as_deref(),
                client_name: self.client_name.as_deref(),
                peer: self.peer,
                hostname: &self.hostname,
                esmtp: self.esmtp,
                tls: self.tls.as_ref(),
                authenticated: self.authenticated,
                id,
                single_rcpt,
            }
        }
    }

    /// Header sections: fields in any case, folded lines, colons, empty lines, bare CR/LF and invalid UTF-8.
    fn head() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"Subject:".to_vec()),
            Just(b"sUbJeCt :".to_vec()),
            Just(b"Message-ID:".to_vec()),
            Just(b"message-id\t:".to_vec()),
            Just("Subject\u{a0}:".as_bytes().to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\r\n ".to_vec()),
            Just(b"\r\n\t".to_vec()),
            Just(b" ".to_vec()),
            Just(b":".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\n".to_vec()),
            Just(vec![0xff]),
            Just(vec![0xc3]),
            Just(vec![0xe2, 0x80]),
            Just("\u{3000}\u{e9}".as_bytes().to_vec()),
            "[a-zA-Z0-9 <>@.-]{1,8}".prop_map(String::into_bytes),
            vec(any::<u8>(), 1..4),
        ];
        vec(piece, 0..24).prop_map(|p| p.concat())
    }

    proptest! {
        #[test]
        fn received_matches_the_format_version(
            f in facts(),
            id in odd_text(),
            rcpt in proptest::option::of(odd_text()),
            secs in 0u64..253_402_300_800,
        ) {
            let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let info = f.info(&id, rcpt.as_deref());
            prop_assert_eq!(received_header(&info, now), old_received_header(&info, now));
        }

        /// One stem across a session whose facts change between messages (EHLO again, STARTTLS, AUTH):
        /// every header is still the one built from scratch.
        #[test]
        fn stem_follows_the_session(
            sessions in vec((facts(), vec((odd_text(), proptest::option::of(odd_text())), 1..4)), 1..4),
            flips in vec(0u8..4, 1..4),
        ) {
            let mut stem = None;
            let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_015_601);
            for ((mut f, messages), flip) in sessions.into_iter().zip(flips.into_iter().cycle()) {
                for (i, (id, rcpt)) in messages.iter().enumerate() {
                    if i == 1 {
                        match flip {
                            0 => f.authenticated = !f.authenticated,
                            1 => f.esmtp = !f.esmtp,
                            2 => f.tls = Some(TlsInfo { version: "TLSv1.3", cipher: "X".into(), sni: None }),
                            _ => f.helo = Some("again.example".into()),
                        }
                    }
                    let info = f.info(id, rcpt.as_deref());
                    let before = "X-Before: 1\r\n";
                    let mut out = String::from(before);
                    push_received(&mut stem, &info, now, &mut out);
                    prop_assert_eq!(&out[before.len()..], old_received_header(&info, now));
                }
            }
        }

        #[test]
        fn header_value_matches_the_lossy_version(
            head in head(),
            name in prop_oneof![Just("Subject"), Just("Message-ID"), Just("subject"), Just("X"), Just("\u{e9}t\u{e9}")],
        ) {
            prop_assert_eq!(header_value(&head, name), old_header_value(&head, name));
        }
    }

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
