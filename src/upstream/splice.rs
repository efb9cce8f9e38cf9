//! One byte range of the spooled message replaced while it is relayed: how moat rewrites a header (the
//! Subject prefix of `tag` rules) without holding the message in memory. The range lies in the header
//! section, which is bounded; everything else goes upstream byte for byte.

/// Replace bytes `start..end` of the message (offsets in the spooled, unstuffed message) with `with`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splice {
    pub start: u64,
    pub end: u64,
    pub with: Vec<u8>,
}

impl Splice {
    /// Passes `chunk`, which starts at offset `at` of the message, to `emit` with the splice applied: the
    /// bytes before `start`, then `with` (in the chunk that holds byte `start`), then the bytes from `end`.
    pub fn apply(&self, chunk: &[u8], at: u64, mut emit: impl FnMut(&[u8])) {
        let stop = at + chunk.len() as u64;
        let cut = |x: u64| (x.clamp(at, stop) - at) as usize;
        let (s, e) = (cut(self.start), cut(self.end.max(self.start)));
        emit(&chunk[..s]);
        if (at..stop).contains(&self.start) {
            emit(&self.with);
        }
        emit(&chunk[e..]);
    }

    /// How many bytes [`Splice::apply`] emits over a whole message of `len` bytes (what `BDAT` must
    /// announce before the first byte goes out). Clamped like `apply`: a range past the end removes
    /// nothing there, and `with` is emitted only when some chunk holds byte `start`.
    pub fn relayed_len(&self, len: u64) -> u64 {
        let (s, e) = (self.start.min(len), self.end.max(self.start).min(len));
        let with = if self.start < len { self.with.len() as u64 } else { 0 };
        len - (e - s) + with
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message cut into chunks of every size, so the range falls on and across every boundary.
    #[test]
    fn same_result_whatever_the_chunking() {
        let msg = b"From: a\r\nSubject: hi\r\n there\r\nTo: b\r\n\r\nbody\r\n";
        let splice = Splice { start: 9, end: 30, with: b"Subject: [X] hi\r\n there\r\n".to_vec() };
        let want = b"From: a\r\nSubject: [X] hi\r\n there\r\nTo: b\r\n\r\nbody\r\n".to_vec();
        for size in 1..=msg.len() {
            let mut out = Vec::new();
            for (i, chunk) in msg.chunks(size).enumerate() {
                splice.apply(chunk, (i * size) as u64, |b| out.extend_from_slice(b));
            }
            assert_eq!(out, want, "chunks of {size}");
        }
    }

    /// `relayed_len` is what `apply` emits, wherever the range lies (inside, at or past the end, empty).
    #[test]
    fn relayed_len_is_what_apply_emits() {
        let msg = b"Subject: hi\r\n\r\nbody\r\n";
        let len = msg.len() as u64;
        for start in 0..=len + 2 {
            for end in 0..=len + 2 {
                for with in [&b""[..], b"X", b"Subject: [SPAM] hi\r\n"] {
                    let splice = Splice { start, end, with: with.to_vec() };
                    let mut out = Vec::new();
                    for (i, chunk) in msg.chunks(5).enumerate() {
                        splice.apply(chunk, (i * 5) as u64, |b| out.extend_from_slice(b));
                    }
                    assert_eq!(splice.relayed_len(len), out.len() as u64, "{splice:?}");
                }
            }
        }
        assert_eq!(Splice { start: 0, end: 0, with: b"X".to_vec() }.relayed_len(0), 0, "empty message");
    }

    #[test]
    fn pure_insertion() {
        let splice = Splice { start: 3, end: 3, with: b"+".to_vec() };
        let mut out = Vec::new();
        splice.apply(b"abc", 0, |b| out.extend_from_slice(b));
        splice.apply(b"def", 3, |b| out.extend_from_slice(b));
        assert_eq!(out, b"abc+def");
    }
}
