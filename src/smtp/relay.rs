//! Relay policy: which recipients an unauthenticated client may send to. An `mx` listener takes mail only
//! for the local domains; everything else needs AUTH (the session applies this at RCPT, RFC 5321 §3.6.2:
//! never an open relay).

/// Whether `rcpt` is in one of the local domains (exact, or `.parent` for subdomains), with no
/// sender-specified routing (`%`, `!`, or a second `@` in the local part) that could relay past them.
pub fn is_local_recipient(rcpt: &str, local_domains: &[String]) -> bool {
    let Some((local, domain)) = rcpt.rsplit_once('@') else {
        // RFC 5321 4.5.1: a bare "postmaster" is always local.
        return rcpt.eq_ignore_ascii_case("postmaster");
    };
    if local.is_empty() || local.contains(['@', '%', '!']) {
        return false;
    }
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    local_domains.iter().any(|d| {
        let d = d.to_ascii_lowercase();
        match d.strip_prefix('.') {
            Some(parent) => domain.len() > parent.len() + 1 && domain.ends_with(&d),
            None => domain == d,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_recipients() {
        let domains = vec!["example.test".to_string(), ".corp.example".to_string()];
        for (rcpt, want) in [
            ("a@example.test", true),
            ("a@EXAMPLE.TEST", true),
            ("a@example.test.", true),
            ("a@sub.example.test", false),
            ("a@evil.example", false),
            ("a@corp.example", false),
            ("a@mail.corp.example", true),
            ("a@xcorp.example", false),
            ("a%evil.example@example.test", false),
            ("evil.example!a@example.test", false),
            ("\"a@evil.example\"@example.test", false),
            ("Postmaster", true),
            ("root", false),
            ("@example.test", false),
            ("a@[127.0.0.1]", false),
        ] {
            assert_eq!(is_local_recipient(rcpt, &domains), want, "{rcpt}");
        }
        assert!(!is_local_recipient("a@example.test", &[]), "empty list: nothing is local");
    }
}
