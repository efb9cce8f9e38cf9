//! Header fields removed from the relayed message: an incoming `Authentication-Results:` that claims
//! moat's own authserv-id is a forgery (RFC 8601 §5) and goes before moat adds its own.
//!
//! Removals are byte ranges of the header section; [`merge`] folds them and the Subject edit (if any)
//! into the one [`Splice`] the relay applies while streaming, so the message is still never buffered whole.

use crate::upstream::Splice;

/// Ranges of the header section (offsets from the message's start) to drop; stage state in
/// [`super::TxnContext::ext`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoveFields(pub Vec<(usize, usize)>);

/// Each header field of `head` as (start, end, name), continuation lines included, up to the empty line.
fn fields(head: &[u8]) -> Vec<(usize, usize, &[u8])> {
    let mut out: Vec<(usize, usize, &[u8])> = Vec::new();
    let mut pos = 0;
    while pos < head.len() {
        let end = memchr::memchr(b'\n', &head[pos..]).map_or(head.len(), |i| pos + i + 1);
        let line = &head[pos..end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        match (line.first(), out.last_mut()) {
            (Some(b' ' | b'\t'), Some(last)) => last.1 = end,
            _ => {
                let name = line.split(|&b| b == b':').next().unwrap_or_default();
                out.push((pos, end, name));
            }
        }
        pos = end;
    }
    out
}

/// The `Authentication-Results` fields of `head` whose authserv-id is `id` (ASCII case-insensitive).
pub fn forged_auth_results(head: &[u8], id: &str) -> Vec<(usize, usize)> {
    fields(head)
        .into_iter()
        .filter(|(_, _, name)| name.trim_ascii().eq_ignore_ascii_case(b"authentication-results"))
        .filter(|&(s, e, name)| {
            let value = &head[s + name.len() + 1..e];
            let value = String::from_utf8_lossy(value);
            let first = value.split(';').next().unwrap_or("");
            // The authserv-id is the first token (an optional version number may follow).
            first.split_whitespace().next().is_some_and(|t| t.eq_ignore_ascii_case(id))
        })
        .map(|(s, e, _)| (s, e))
        .collect()
}

/// One splice doing `subject` (a replacement within `head`) and dropping `remove`: it covers the span
/// from the first edit to the last, rewritten. `None` when there is nothing to change.
pub fn merge(head: &[u8], subject: Option<Splice>, remove: &[(usize, usize)]) -> Option<Splice> {
    if remove.is_empty() {
        return subject;
    }
    let mut edits: Vec<(usize, usize, &[u8])> = remove.iter().map(|&(s, e)| (s, e, &b""[..])).collect();
    if let Some(s) = &subject {
        edits.push((s.start as usize, s.end as usize, &s.with));
    }
    edits.sort_by_key(|e| e.0);
    let lo = edits.first()?.0;
    let hi = edits.iter().map(|e| e.1).max()?.min(head.len());
    let mut with = Vec::with_capacity(hi - lo);
    let mut pos = lo;
    for (s, e, w) in edits {
        if s < pos || e > head.len() {
            continue; // overlapping or outside the kept header section: skip that edit
        }
        with.extend_from_slice(&head[pos..s]);
        with.extend_from_slice(w);
        pos = e;
    }
    with.extend_from_slice(&head[pos.min(hi)..hi]);
    Some(Splice { start: lo as u64, end: hi as u64, with })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"Authentication-Results: mx.test; spf=pass\r\n\tdkim=pass\r\nSubject: hi\r\n\
        Authentication-Results: other.example; dmarc=pass\r\nauthentication-results:MX.TEST 1; none\r\n\r\n";

    fn apply(head: &[u8], s: &Splice) -> Vec<u8> {
        let mut out = Vec::new();
        s.apply(head, 0, |b| out.extend_from_slice(b));
        out
    }

    #[test]
    fn forged_results_are_removed_others_kept() {
        let r = forged_auth_results(HEAD, "mx.test");
        assert_eq!(r.len(), 2, "{r:?}");
        let s = merge(HEAD, None, &r).unwrap();
        let out = String::from_utf8(apply(HEAD, &s)).unwrap();
        assert_eq!(out, "Subject: hi\r\nAuthentication-Results: other.example; dmarc=pass\r\n\r\n");
    }

    #[test]
    fn combined_with_the_subject_edit() {
        let r = forged_auth_results(HEAD, "mx.test");
        let start = HEAD.windows(8).position(|w| w == b"Subject:").unwrap();
        let subj = Splice { start: start as u64, end: start as u64 + 13, with: b"Subject: [X] hi\r\n".to_vec() };
        let out = String::from_utf8(apply(HEAD, &merge(HEAD, Some(subj), &r).unwrap())).unwrap();
        assert_eq!(out, "Subject: [X] hi\r\nAuthentication-Results: other.example; dmarc=pass\r\n\r\n");
        assert_eq!(merge(HEAD, None, &[]), None);
    }
}
