//! SMTP replies: every reply moat sends is built here, so code, RFC 3463 enhanced code and text live in one
//! place and tests can match on codes. Upstream replies are parsed into the same type and passed through.

use std::fmt;

/// One SMTP reply: a three-digit code and one or more text lines (multi-line replies, RFC 5321 4.2.1).
///
/// The enhanced status code (RFC 3463), when there is one, is the first word of each line's text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply with one line of text (which should start with the enhanced code when it has one).
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply { code, lines: vec![text.into()] }
    }

    /// Whether this is a positive completion (2xx).
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// Whether this is a transient failure (4xx).
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Whether this is a permanent failure (5xx).
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The RFC 3463 enhanced code at the start of the first line, e.g. `"5.5.1"`.
    pub fn enhanced(&self) -> Option<&str> {
        let word = self.lines.first()?.split(' ').next()?;
        let mut parts = word.split('.');
        let ok = parts.next().is_some_and(|c| matches!(c, "2" | "4" | "5"))
            && parts.next().is_some_and(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && parts.next().is_some_and(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && parts.next().is_none();
        ok.then_some(word)
    }

    /// The reply in wire form, CRLF-terminated, with `-` continuation for all but the last line.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.render_into(&mut out);
        out
    }

    /// Appends the wire form to `out`.
    /// Written byte by byte rather than with `format!`: every reply to every command comes through here (#15).
    pub fn render_into(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            push_decimal(out, self.code);
            out.push(if i + 1 == n { b' ' } else { b'-' });
            push_clean(out, text);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Appends `n` in decimal, as `Display` writes it.
fn push_decimal(out: &mut Vec<u8>, n: u16) {
    let mut digits = [0u8; 5];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `text` with each CR and LF turned into a space: replies never carry them inside a line, whatever
/// text reached them (e.g. from an upstream). Both are ASCII, so no UTF-8 sequence is split.
fn push_clean(out: &mut Vec<u8>, text: &str) {
    let start = out.len();
    out.extend_from_slice(text.as_bytes());
    for b in &mut out[start..] {
        if *b == b'\r' || *b == b'\n' {
            *b = b' ';
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

// === named replies ===

impl Reply {
    /// `220` greeting.
    pub fn greeting(host: &str, text: &str) -> Reply {
        Reply::new(220, format!("{host} {text}"))
    }
    /// `221` on QUIT.
    pub fn bye(host: &str) -> Reply {
        Reply::new(221, format!("2.0.0 {host} closing connection"))
    }
    /// `250 2.0.0 OK`.
    pub fn ok() -> Reply {
        Reply::new(250, "2.0.0 OK")
    }
    /// `250` to MAIL.
    pub fn sender_ok() -> Reply {
        Reply::new(250, "2.1.0 Sender OK")
    }
    /// `250` to RCPT.
    pub fn recipient_ok() -> Reply {
        Reply::new(250, "2.1.5 Recipient OK")
    }
    /// `250` to RSET.
    pub fn reset() -> Reply {
        Reply::new(250, "2.0.0 Reset state")
    }
    /// `250` to a non-final BDAT chunk (RFC 3030).
    pub fn chunk_ok(size: u64) -> Reply {
        Reply::new(250, format!("2.0.0 {size} octets received"))
    }
    /// `354` to DATA.
    pub fn start_data() -> Reply {
        Reply::new(354, "Start mail input; end with <CRLF>.<CRLF>")
    }
    /// `220` to STARTTLS.
    pub fn ready_for_tls() -> Reply {
        Reply::new(220, "2.0.0 Ready to start TLS")
    }
    /// `252` to VRFY: moat never confirms addresses (RFC 5321 3.5.3).
    pub fn cannot_vrfy() -> Reply {
        Reply::new(252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
    }
    /// `214` to HELP.
    pub fn help() -> Reply {
        Reply::new(214, "2.0.0 See RFC 5321 (https://www.rfc-editor.org/rfc/rfc5321)")
    }
    /// `500 5.5.1` for an unknown command.
    pub fn unrecognized() -> Reply {
        Reply::new(500, "5.5.1 Command unrecognized")
    }
    /// `500 5.5.6` for an AUTH line or a SASL response over 12,288 octets (RFC 4954 4).
    pub fn auth_line_too_long() -> Reply {
        Reply::new(500, "5.5.6 Authentication Exchange line is too long")
    }

    /// `500 5.5.2` for a command line over the limit.
    pub fn line_too_long(max: usize) -> Reply {
        Reply::new(500, format!("5.5.2 Line too long (limit {max} octets)"))
    }
    /// `501 5.5.4` for a syntax error in arguments.
    pub fn syntax(what: &str) -> Reply {
        Reply::new(501, format!("5.5.4 Syntax error: {what}"))
    }
    /// `502 5.5.1` for a command moat knows but does not implement.
    pub fn not_implemented() -> Reply {
        Reply::new(502, "5.5.1 Command not implemented")
    }
    /// `503 5.5.1` for a command out of sequence.
    pub fn bad_sequence(what: &str) -> Reply {
        Reply::new(503, format!("5.5.1 Bad sequence of commands: {what}"))
    }
    /// `504 5.5.4` / `555 5.5.4` for an unsupported MAIL/RCPT parameter (RFC 5321 4.1.1.11).
    pub fn bad_parameter(name: &str) -> Reply {
        Reply::new(555, format!("5.5.4 Unsupported parameter {name}"))
    }
    /// `552 5.3.4` when the message exceeds the size limit.
    pub fn too_big(max: u64) -> Reply {
        Reply::new(552, format!("5.3.4 Message size exceeds fixed limit of {max} octets"))
    }
    /// `452 4.5.3` past the recipient limit (RFC 5321 4.5.3.1.10).
    pub fn too_many_recipients() -> Reply {
        Reply::new(452, "4.5.3 Too many recipients")
    }
    /// `554 5.5.1` for DATA without any accepted recipient.
    pub fn no_valid_recipients() -> Reply {
        Reply::new(554, "5.5.1 No valid recipients")
    }
    /// `550 5.6.0` for a bare LF or CR under the reject policy.
    pub fn bare_line_ending() -> Reply {
        Reply::new(550, "5.6.0 Message contains bare LF or bare CR; lines must end with CRLF (RFC 5321 2.3.8)")
    }
    /// `550 5.6.0` for a text line over the limit.
    pub fn text_line_too_long(max: usize) -> Reply {
        Reply::new(550, format!("5.6.0 Message has a line longer than {max} octets (RFC 5321 4.5.3.1.6)"))
    }
    /// `553 5.6.7` for a non-ASCII address without SMTPUTF8 (RFC 6531 3.5).
    pub fn utf8_without_smtputf8() -> Reply {
        Reply::new(553, "5.6.7 Non-ASCII address requires SMTPUTF8")
    }
    /// `530 5.7.0` when a listener requires TLS first.
    pub fn must_starttls() -> Reply {
        Reply::new(530, "5.7.0 Must issue a STARTTLS command first")
    }
    /// `454 4.7.0` when TLS is unavailable.
    pub fn tls_unavailable() -> Reply {
        Reply::new(454, "4.7.0 TLS not available")
    }
    /// `421 4.7.0` when a connection limit is reached.
    pub fn too_many_connections(host: &str) -> Reply {
        Reply::new(421, format!("4.7.0 {host} Too many connections, try again later"))
    }
    /// `421 4.7.0` after too many errors.
    pub fn too_many_errors(host: &str) -> Reply {
        Reply::new(421, format!("4.7.0 {host} Too many errors, closing connection"))
    }
    /// `421 4.4.2` on an idle or session timeout.
    pub fn timeout(host: &str) -> Reply {
        Reply::new(421, format!("4.4.2 {host} Timeout exceeded, closing connection"))
    }
    /// `421 4.3.2` during shutdown.
    pub fn shutting_down(host: &str) -> Reply {
        Reply::new(421, format!("4.3.2 {host} Service shutting down, closing connection"))
    }
    /// `451 4.4.1` when the upstream cannot be reached.
    pub fn upstream_unavailable() -> Reply {
        Reply::new(451, "4.4.1 Upstream server unavailable, try again later")
    }
    /// `451 4.3.2` when every upstream connection (`upstream.max_connections`) stayed in use for the whole
    /// `upstream.connection_wait`.
    pub fn upstream_busy() -> Reply {
        Reply::new(451, "4.3.2 Too many connections to the upstream server, try again later")
    }
    /// `451 4.4.2` when the upstream failed during a transaction.
    pub fn upstream_failed() -> Reply {
        Reply::new(451, "4.4.2 Upstream server failed, try again later")
    }
    /// `451 4.3.0` for moat's own failure.
    pub fn local_error() -> Reply {
        Reply::new(451, "4.3.0 Local error in processing, try again later")
    }
    /// `452 4.3.1` when the spool cannot store the message.
    pub fn insufficient_storage() -> Reply {
        Reply::new(452, "4.3.1 Insufficient system storage")
    }
    /// `235 2.7.0` to a successful AUTH.
    pub fn auth_ok() -> Reply {
        Reply::new(235, "2.7.0 Authentication successful")
    }
    /// `535 5.7.8` to wrong credentials (the same whatever was wrong).
    pub fn auth_invalid() -> Reply {
        Reply::new(535, "5.7.8 Authentication credentials invalid")
    }
    /// `538 5.7.11` to AUTH before TLS (RFC 4954 6).
    pub fn auth_needs_tls() -> Reply {
        Reply::new(538, "5.7.11 Encryption required for requested authentication mechanism")
    }
    /// `504 5.5.4` to an unknown SASL mechanism.
    pub fn auth_unknown_mechanism() -> Reply {
        Reply::new(504, "5.5.4 Unrecognized authentication type")
    }
    /// `454 4.7.0` while the client IP or the login name is locked out.
    pub fn auth_locked() -> Reply {
        Reply::new(454, "4.7.0 Too many authentication failures, try later")
    }
    /// `421 4.7.0` closing a connection that keeps trying while locked out.
    pub fn auth_locked_close(host: &str) -> Reply {
        Reply::new(421, format!("4.7.0 {host} Too many authentication failures, closing connection"))
    }
    /// `454 4.7.0` when verification itself failed (moat's side).
    pub fn auth_temporary() -> Reply {
        Reply::new(454, "4.7.0 Temporary authentication failure")
    }
    /// `530 5.7.0` to MAIL on a listener that requires AUTH.
    pub fn auth_required() -> Reply {
        Reply::new(530, "5.7.0 Authentication required")
    }
    /// `554 5.7.1` to an unauthenticated RCPT outside the local domains.
    pub fn relay_denied() -> Reply {
        Reply::new(554, "5.7.1 Relay access denied")
    }
    /// `553 5.7.1` to a MAIL FROM the authenticated user does not own.
    pub fn sender_not_owned(user: &str) -> Reply {
        Reply::new(553, format!("5.7.1 Sender address rejected: not owned by user {user}"))
    }
    /// `550 5.7.1` at end of data to a From header address the authenticated user does not own.
    pub fn from_not_owned(user: &str) -> Reply {
        Reply::new(550, format!("5.7.1 From header address rejected: not owned by user {user}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_single_and_multi_line() {
        assert_eq!(Reply::ok().render(), b"250 2.0.0 OK\r\n");
        let r = Reply { code: 250, lines: vec!["mx.test".into(), "PIPELINING".into(), "SIZE 10".into()] };
        assert_eq!(r.render(), b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    }

    #[test]
    fn enhanced_code() {
        assert_eq!(Reply::unrecognized().enhanced(), Some("5.5.1"));
        assert_eq!(Reply::start_data().enhanced(), None);
        assert_eq!(Reply::new(250, "2.0.0").enhanced(), Some("2.0.0"));
        assert_eq!(Reply::new(250, "2.0").enhanced(), None);
    }

    #[test]
    fn no_line_break_injection() {
        let r = Reply::new(550, "bad\r\n250 ok");
        assert_eq!(r.render(), b"550 bad  250 ok\r\n");
    }

    /// The `format!`-based rendering `render_into` replaced (#15), kept as the reference.
    fn render_with_format(r: &Reply) -> Vec<u8> {
        let mut out = Vec::new();
        let n = r.lines.len().max(1);
        for i in 0..n {
            let text = r.lines.get(i).map(String::as_str).unwrap_or("");
            let sep = if i + 1 == n { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{}{}\r\n", r.code, sep, text.replace(['\r', '\n'], " ")).as_bytes());
        }
        out
    }

    #[test]
    fn renders_edge_codes_like_format() {
        for code in [0, 7, 10, 99, 100, 250, 999, 1000, 65535] {
            let r = Reply { code, lines: vec![] };
            assert_eq!(r.render(), render_with_format(&r), "code {code}");
        }
    }

    proptest::proptest! {
        #[test]
        fn render_matches_format(code: u16, lines in proptest::collection::vec("(?s).{0,40}", 0..4)) {
            let r = Reply { code, lines };
            let mut appended = b"prefix".to_vec();
            r.render_into(&mut appended);
            proptest::prop_assert_eq!(&appended[6..], &render_with_format(&r)[..]);
        }
    }
}
