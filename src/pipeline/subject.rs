//! The Subject prefix of `tag` rules (`subject_prefix = "[SPAM] "`) and of the score threshold
//! (`[scores] subject_prefix`): how the relayed message's Subject changes, computed from the header section
//! moat kept ([`plan`]) and applied while the spool streams upstream (`upstream::Splice`), so the message is
//! never buffered whole and everything but the Subject goes upstream byte for byte.
//!
//! The Subject field is replaced whole, continuation lines included, by the same field with the prefix in
//! front of its value; a message without a Subject gets one; a Subject that already starts with the prefix
//! (compared with the raw header, ignoring ASCII case and surrounding spaces) is left alone, so a message
//! that passes moat twice is not prefixed twice.

use crate::upstream::Splice;

/// RFC 5322 2.1.1: a line is at most 998 characters; a prefixed first line that would exceed it is folded
/// after the prefix.
const MAX_LINE: usize = 998;

/// What happens to the Subject of the relayed message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectEdit {
    /// Replace the Subject field (these bytes of the message) with the prefixed field.
    Replace(Splice),
    /// No Subject in the header section: add this header line to the ones moat prepends.
    Add(String),
    /// Nothing to change: already prefixed, or the header section was not seen whole (it was longer than
    /// moat keeps), so a Subject may exist beyond it.
    Keep,
}

/// The edit for `prefix` on a message whose header section is `head` (canonical CRLF, starting at offset 0
/// of the message). `complete`: `head` holds the whole header section.
pub fn plan(head: &[u8], complete: bool, prefix: &str) -> SubjectEdit {
    match find_subject(head) {
        Some((start, end)) if end < head.len() || complete => match prefixed(&head[start..end], prefix) {
            Some(with) => SubjectEdit::Replace(Splice { start: start as u64, end: end as u64, with }),
            None => SubjectEdit::Keep,
        },
        None if complete => SubjectEdit::Add(format!("Subject: {}\r\n", prefix.trim_end())),
        _ => SubjectEdit::Keep,
    }
}

/// The byte range of the first Subject field (its first line through its last continuation line).
fn find_subject(head: &[u8]) -> Option<(usize, usize)> {
    let mut pos = 0;
    let mut found: Option<usize> = None;
    while pos < head.len() {
        let end = memchr::memchr(b'\n', &head[pos..]).map_or(head.len(), |i| pos + i + 1);
        let line = &head[pos..end];
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if let Some(start) = found {
            if !continuation {
                return Some((start, pos));
            }
        } else if line == b"\r\n" {
            return None;
        } else if !continuation && is_subject(line) {
            found = Some(pos);
        }
        pos = end;
    }
    found.map(|start| (start, head.len()))
}

/// Whether a field's first line names Subject (RFC 5322 4.5.3 allows spaces before the colon).
fn is_subject(line: &[u8]) -> bool {
    let Some(colon) = memchr::memchr(b':', line) else { return false };
    line[..colon].trim_ascii_end().eq_ignore_ascii_case(b"subject")
}

/// The field with `prefix` in front of its value; `None` if the value already starts with it.
fn prefixed(field: &[u8], prefix: &str) -> Option<Vec<u8>> {
    let colon = memchr::memchr(b':', field)?;
    let value = &field[colon + 1..];
    let rest = &value[value.iter().take_while(|b| matches!(b, b' ' | b'\t')).count()..];
    let unfolded: Vec<u8> = value.iter().copied().filter(|b| !matches!(b, b'\r' | b'\n')).collect();
    let want = prefix.trim().as_bytes();
    let have = unfolded.trim_ascii_start();
    if !want.is_empty() && have.len() >= want.len() && have[..want.len()].eq_ignore_ascii_case(want) {
        return None;
    }
    let mut out = Vec::with_capacity(field.len() + prefix.len() + 3);
    out.extend_from_slice(&field[..=colon]);
    out.push(b' ');
    let first_line = rest.iter().position(|&b| b == b'\r').unwrap_or(rest.len());
    if rest.starts_with(b"\r\n") || colon + 2 + prefix.len() + first_line > MAX_LINE {
        // The value starts on the next line, or the first line would grow too long: fold after the prefix.
        out.extend_from_slice(prefix.trim_end().as_bytes());
        if !rest.starts_with(b"\r\n") {
            out.extend_from_slice(b"\r\n ");
        }
    } else {
        out.extend_from_slice(prefix.as_bytes());
    }
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(head: &str) -> String {
        match plan(head.as_bytes(), true, "[SPAM] ") {
            SubjectEdit::Replace(s) => {
                let mut out = Vec::new();
                s.apply(head.as_bytes(), 0, |b| out.extend_from_slice(b));
                String::from_utf8(out).unwrap()
            }
            SubjectEdit::Add(line) => format!("{line}{head}"),
            SubjectEdit::Keep => head.to_string(),
        }
    }

    #[test]
    fn subject_forms() {
        let cases = [
            ("Subject: hello\r\n\r\n", "Subject: [SPAM] hello\r\n\r\n"),
            ("From: a\r\nsubject:hello\r\nTo: b\r\n\r\n", "From: a\r\nsubject: [SPAM] hello\r\nTo: b\r\n\r\n"),
            ("SUBJECT :  two\r\n\tlines\r\nX: y\r\n\r\n", "SUBJECT : [SPAM] two\r\n\tlines\r\nX: y\r\n\r\n"),
            ("Subject:\r\n folded value\r\n\r\n", "Subject: [SPAM]\r\n folded value\r\n\r\n"),
            ("Subject: \r\n\r\n", "Subject: [SPAM]\r\n\r\n"),
            ("From: a\r\n\r\n", "Subject: [SPAM]\r\nFrom: a\r\n\r\n"),
            ("Subject: [spam]  already\r\n\r\n", "Subject: [spam]  already\r\n\r\n"),
            ("Subject:\r\n [SPAM] folded\r\n\r\n", "Subject:\r\n [SPAM] folded\r\n\r\n"),
            ("X-Subject: no\r\nSubject: yes\r\n\r\n", "X-Subject: no\r\nSubject: [SPAM] yes\r\n\r\n"),
            ("From: a\r\n\r\nSubject: in the body\r\n", "Subject: [SPAM]\r\nFrom: a\r\n\r\nSubject: in the body\r\n"),
            ("Subject: a\r\nSubject: b\r\n\r\n", "Subject: [SPAM] a\r\nSubject: b\r\n\r\n"),
        ];
        for (head, want) in cases {
            assert_eq!(rewrite(head), want, "{head:?}");
        }
    }

    #[test]
    fn long_first_line_is_folded() {
        let head = format!("Subject: {}\r\n\r\n", "x".repeat(990));
        let out = rewrite(&head);
        assert!(out.starts_with("Subject: [SPAM]\r\n xxx"), "{out}");
        assert!(out.split("\r\n").all(|l| l.len() <= MAX_LINE));
    }

    #[test]
    fn incomplete_header_section() {
        // No Subject in the part kept: one may follow, so nothing is added.
        assert_eq!(plan(b"From: a\r\nX: b", false, "[S] "), SubjectEdit::Keep);
        // A Subject that may continue past the part kept is not touched either.
        assert_eq!(plan(b"From: a\r\nSubject: b\r\n", false, "[S] "), SubjectEdit::Keep);
        assert!(matches!(plan(b"Subject: b\r\nFrom: a\r\n", false, "[S] "), SubjectEdit::Replace(_)));
    }
}
