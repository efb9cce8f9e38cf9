//! Byte-level framing, no I/O: command lines, DATA decoding (end-of-data detection, dot-unstuffing, line-ending
//! policy) and dot-stuffing for the relay.
//!
//! The DATA decoder is where SMTP smuggling is decided. Only `<CRLF>.<CRLF>` *on the wire* ends DATA
//! (RFC 5321 4.1.1.4). A bare LF or bare CR never starts or ends a line that could end DATA, even when the
//! normalize policy turns it into CRLF in the output: a line start reached through a bare line ending is
//! remembered as "not real", and a dot there is plain content. What the decoder writes out is canonical CRLF
//! text, unstuffed; [`stuff`] re-stuffs it on the way upstream, so the upstream sees exactly the lines moat
//! judged, and the same message boundary.

use crate::config::BareLineEndings;

// === command lines ===

/// Longest SASL line (`AUTH` with an initial response, or a response to a `334` challenge) in octets, CRLF
/// included. RFC 4954 4 asks servers to take the encoded responses of the mechanisms they offer whatever
/// their other line limits, and names 12,288 octets as enough for deployed mechanisms.
pub const MAX_AUTH_LINE: usize = 12_288;

/// Splits command lines off a buffer, refusing lines longer than the limit without dropping the session.
/// A line that starts with `AUTH ` may be up to [`MAX_AUTH_LINE`] long (still bounded).
#[derive(Debug)]
pub struct LineReader {
    /// Longest line in octets, CRLF included.
    max: usize,
    /// Inside an over-long line: discard up to its LF, then report [`Framed::TooLong`].
    discarding: bool,
    /// The limit the last over-long line broke (for the reply).
    broken: usize,
}

/// What [`LineReader::frame`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed {
    /// A complete line of this many bytes at the start of the buffer (CR/LF excluded).
    Line(usize),
    /// An over-long line ended; answer `500 5.5.2`.
    TooLong,
}

impl LineReader {
    /// A reader for lines of at most `max` octets including CRLF (`AUTH` lines: see [`MAX_AUTH_LINE`]).
    pub fn new(max: usize) -> LineReader {
        LineReader { max, discarding: false, broken: max }
    }

    /// The limit (octets, CRLF included) the last [`Framed::TooLong`] line exceeded.
    pub fn broken_limit(&self) -> usize {
        self.broken
    }

    /// The limit for the line at the start of `buf`: longer for `AUTH ` (an initial response), never
    /// shorter than `max`. Fewer than five bytes cannot be over any limit yet, so the plain one is right.
    fn limit(&self, buf: &[u8]) -> usize {
        match buf.get(..5) {
            Some(verb) if verb.eq_ignore_ascii_case(b"AUTH ") => self.max.max(MAX_AUTH_LINE),
            _ => self.max,
        }
    }

    /// Looks at the start of `buf`. Returns how many bytes to drop from the buffer and what was found;
    /// `(0, None)` means "need more bytes".
    pub fn frame(&mut self, buf: &[u8]) -> (usize, Option<Framed>) {
        let max = if self.discarding { self.broken } else { self.limit(buf) };
        let window = if self.discarding { buf.len() } else { buf.len().min(max) };
        match memchr::memchr(b'\n', &buf[..window]) {
            Some(i) if self.discarding => {
                self.discarding = false;
                (i + 1, Some(Framed::TooLong))
            }
            Some(i) => {
                let len = if i > 0 && buf[i - 1] == b'\r' { i - 1 } else { i };
                (i + 1, Some(Framed::Line(len)))
            }
            None if self.discarding => (buf.len(), None),
            None if buf.len() >= max => {
                self.broken = max;
                match memchr::memchr(b'\n', &buf[window..]) {
                    Some(j) => (window + j + 1, Some(Framed::TooLong)),
                    None => {
                        self.discarding = true;
                        (buf.len(), None)
                    }
                }
            }
            None => (0, None),
        }
    }
}

// === DATA / BDAT decoding ===

/// How the message body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// DATA: dot-stuffed, ended by `<CRLF>.<CRLF>`.
    Dot,
    /// BDAT: counted chunks, no stuffing, no terminator.
    Chunked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line; `real` when the previous line ended with a wire CRLF.
    LineStart { real: bool },
    /// Saw `.` at a real line start.
    Dot,
    /// Saw `.` CR at a real line start.
    DotCr,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line.
    Cr,
}

/// Streaming decoder from wire bytes to canonical (CRLF, unstuffed) message bytes.
#[derive(Debug)]
pub struct DataDecoder {
    framing: Framing,
    state: State,
    /// Longest text line in octets including CRLF; 0 means unlimited.
    max_line: usize,
    line_len: usize,
    bare: bool,
    long_line: bool,
    policy: BareLineEndings,
}

impl DataDecoder {
    /// A decoder for one message.
    pub fn new(framing: Framing, policy: BareLineEndings, max_line: usize) -> DataDecoder {
        DataDecoder {
            framing,
            state: State::LineStart { real: true },
            max_line,
            line_len: 0,
            bare: false,
            long_line: false,
            policy,
        }
    }

    /// Whether a bare LF or bare CR was seen.
    pub fn saw_bare_line_ending(&self) -> bool {
        self.bare
    }

    /// Whether a line exceeded the text line limit.
    pub fn saw_long_line(&self) -> bool {
        self.long_line
    }

    /// Whether the message must be refused for its line structure under the configured policy.
    pub fn refusal(&self) -> Option<crate::smtp::Reply> {
        if self.bare && self.policy == BareLineEndings::Reject {
            Some(crate::smtp::Reply::bare_line_ending())
        } else if self.long_line {
            Some(crate::smtp::Reply::text_line_too_long(self.max_line))
        } else {
            None
        }
    }

    /// Decodes `input`, appending canonical bytes to `out`. Returns the bytes consumed and whether the end of
    /// data (`<CRLF>.<CRLF>`, DATA only) was reached; bytes after the end are left unconsumed.
    ///
    /// Well-formed text (lines ended by CRLF that do not start with a dot) is copied in runs of whole lines
    /// by [`DataDecoder::clean_run`]; every other byte goes through the state machine one at a time, so the
    /// result is the same as feeding the bytes one by one (a property test checks exactly that).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Mid {
                i = self.clean_run(input, i, out);
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            if self.step(b, out) {
                return (i, true);
            }
        }
        (i, false)
    }

    /// Inside a line (state `Mid`), copies from `start` up to the first byte the state machine must see: a
    /// CR or LF that is not a wire CRLF followed by an ordinary first byte of the next line (not `.`, CR or
    /// LF), or a CRLF too close to the end of `input` to know what follows. Returns that byte's index (the
    /// end of `input` if there is none), with the line length counted up to it and the state still `Mid`.
    fn clean_run(&mut self, input: &[u8], start: usize, out: &mut Vec<u8>) -> usize {
        let mut i = start;
        let stop = loop {
            let Some(k) = memchr::memchr2(b'\r', b'\n', &input[i..]) else {
                self.count(input.len() - i);
                break input.len();
            };
            self.count(k);
            let p = i + k;
            let next_line_is_plain = input[p] == b'\r'
                && input.get(p + 1) == Some(&b'\n')
                && input.get(p + 2).is_some_and(|&c| !matches!(c, b'.' | b'\r' | b'\n'));
            if !next_line_is_plain {
                break p;
            }
            // A real line end and an ordinary byte after it: the next line starts, still inside the run.
            self.line_len = 0;
            i = p + 2;
        };
        out.extend_from_slice(&input[start..stop]);
        stop
    }

    /// Ends a chunked (BDAT) message: a trailing CR is a bare CR, and the message ends with CRLF.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        match self.state {
            State::Cr => self.bare_end(out),
            State::Mid => self.line_end(out, false),
            State::Dot | State::DotCr => {
                // Only reachable in Dot framing, which ends through `decode`; close the line anyway.
                out.push(b'.');
                self.line_end(out, false);
            }
            State::LineStart { .. } => {}
        }
    }

    /// One byte outside the fast path; returns true at the end of data.
    fn step(&mut self, b: u8, out: &mut Vec<u8>) -> bool {
        match (self.state, b) {
            (State::LineStart { real: true }, b'.') if self.framing == Framing::Dot => self.state = State::Dot,
            (State::LineStart { .. } | State::Mid, b'\r') => self.state = State::Cr,
            (State::LineStart { .. } | State::Mid, b'\n') => self.bare_end(out),
            (State::LineStart { .. } | State::Mid, c) => self.content(c, out),
            (State::Dot, b'\r') => self.state = State::DotCr,
            (State::Dot, b'\n') => {
                // ".<LF>" is not an end marker: the dot is content.
                out.push(b'.');
                self.count(1);
                self.bare_end(out);
            }
            (State::Dot, c) => self.content(c, out), // RFC 5321 4.5.2: drop the stuffed dot
            (State::DotCr, b'\n') => return true,
            (State::DotCr, c) => {
                out.push(b'.');
                self.count(1);
                self.bare_end(out);
                self.reprocess(c, out);
            }
            (State::Cr, b'\n') => self.line_end(out, true),
            (State::Cr, b'\r') => {
                self.bare_end(out);
                self.state = State::Cr;
            }
            (State::Cr, c) => {
                self.bare_end(out);
                self.reprocess(c, out);
            }
        }
        false
    }

    /// Handles a byte after a bare line end has put us at a (non-real) line start.
    fn reprocess(&mut self, c: u8, out: &mut Vec<u8>) {
        match c {
            b'\r' => self.state = State::Cr,
            b'\n' => self.bare_end(out),
            _ => self.content(c, out),
        }
    }

    fn content(&mut self, c: u8, out: &mut Vec<u8>) {
        out.push(c);
        self.count(1);
        self.state = State::Mid;
    }

    fn bare_end(&mut self, out: &mut Vec<u8>) {
        self.bare = true;
        self.line_end(out, false);
    }

    fn line_end(&mut self, out: &mut Vec<u8>, real: bool) {
        out.extend_from_slice(b"\r\n");
        self.line_len = 0;
        self.state = State::LineStart { real };
    }

    fn count(&mut self, n: usize) {
        self.line_len += n;
        if self.max_line != 0 && self.line_len + 2 > self.max_line {
            self.long_line = true;
        }
    }
}

// === relay ===

/// Dot-stuffs canonical message bytes for the wire (RFC 5321 4.5.2), appending to `out`. `at_line_start`
/// carries the line position across chunks; start it `true`. Text with no line starting with a dot is
/// copied in one piece.
pub fn stuff(input: &[u8], at_line_start: &mut bool, out: &mut Vec<u8>) {
    if input.is_empty() {
        return;
    }
    let mut from = 0;
    if *at_line_start && input[0] == b'.' {
        out.push(b'.');
    }
    for i in memchr::memmem::find_iter(input, b"\n.") {
        // Copy through the LF and the dot's line start; the extra dot goes before it.
        out.extend_from_slice(&input[from..=i]);
        out.push(b'.');
        from = i + 1;
    }
    out.extend_from_slice(&input[from..]);
    *at_line_start = input.last() == Some(&b'\n');
}

/// Whether [`stuff`] would change `input` (given the line position it starts at): false means the bytes
/// can go on the wire as they are.
pub fn needs_stuffing(input: &[u8], at_line_start: bool) -> bool {
    (at_line_start && input.first() == Some(&b'.')) || memchr::memmem::find(input, b"\n.").is_some()
}

#[cfg(test)]
mod tests;
