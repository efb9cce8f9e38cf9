//! Reading a message's header section: the addresses of its `From:` headers (which an authenticated
//! sender must own).

/// The addresses of every `From:` header in a header section, or `None` when a From header holds something
/// that is not an address (which then cannot be checked).
pub fn from_addresses(head: &[u8]) -> Option<Vec<String>> {
    let raw_count = head
        .split(|&b| b == b'\n')
        .filter(|l| {
            let name_end = l.iter().position(|&b| b == b':').unwrap_or(0);
            let name = String::from_utf8_lossy(&l[..name_end]);
            !l.starts_with(b" ") && !l.starts_with(b"\t") && name.trim_end().eq_ignore_ascii_case("from")
        })
        .count();
    if raw_count == 0 {
        return Some(Vec::new());
    }
    let msg = mail_parser::MessageParser::default().parse_headers(head)?;
    let mut out = Vec::new();
    let mut headers = 0;
    for v in msg.header_values(mail_parser::HeaderName::From) {
        headers += 1;
        let list = v.as_address()?;
        let before = out.len();
        for a in list.iter() {
            out.push(a.address()?.to_string());
        }
        if out.len() == before {
            return None;
        }
    }
    // A From header the parser did not see would reach the upstream unchecked.
    (headers == raw_count).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_header_addresses() {
        let f = |s: &str| from_addresses(s.as_bytes());
        assert_eq!(f("Subject: x\r\n\r\n"), Some(vec![]));
        assert_eq!(
            f("From: Alice <alice@example.test>\r\nSubject: x\r\n\r\n"),
            Some(vec!["alice@example.test".into()])
        );
        assert_eq!(
            f("From: a@example.test, \"B\" <b@example.org>\r\n\r\n"),
            Some(vec!["a@example.test".into(), "b@example.org".into()])
        );
        assert_eq!(f("From: a@example.test\r\nFROM: b@evil.example\r\n\r\n").map(|v| v.len()), Some(2));
        assert_eq!(f("From: not an address\r\n\r\n"), None);
        assert_eq!(f("From:\r\n\r\n"), None);
        assert_eq!(f("From : spaced@example.test\r\n\r\n").map(|v| v.len()).unwrap_or(1), 1);
    }
}
