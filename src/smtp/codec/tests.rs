use super::*;
use crate::config::BareLineEndings::{Normalize, Reject};
use proptest::prelude::*;

/// Decodes all of `wire` in one go: (output, end seen, bytes consumed, bare seen).
fn decode_all(wire: &[u8], policy: BareLineEndings) -> (Vec<u8>, bool, usize, bool) {
    let mut d = DataDecoder::new(Framing::Dot, policy, 1000);
    let mut out = Vec::new();
    let (n, end) = d.decode(wire, &mut out);
    (out, end, n, d.saw_bare_line_ending())
}

/// Decodes byte by byte, to exercise every state boundary between reads.
fn decode_bytewise(wire: &[u8], policy: BareLineEndings) -> (Vec<u8>, bool, usize) {
    let mut d = DataDecoder::new(Framing::Dot, policy, 1000);
    let mut out = Vec::new();
    for (i, b) in wire.iter().enumerate() {
        let (n, end) = d.decode(std::slice::from_ref(b), &mut out);
        assert_eq!(n, 1);
        if end {
            return (out, true, i + 1);
        }
    }
    (out, false, wire.len())
}

#[test]
fn line_reader() {
    let mut r = LineReader::new(16);
    assert_eq!(r.frame(b"EHLO x\r\nQUIT\r\n"), (8, Some(Framed::Line(6))));
    assert_eq!(r.frame(b"QUIT\n"), (5, Some(Framed::Line(4))));
    assert_eq!(r.frame(b"QUI"), (0, None));
}

#[test]
fn line_reader_limits() {
    let mut r = LineReader::new(16);
    assert_eq!(r.frame(b"NOOP 123456789\r\n"), (16, Some(Framed::Line(14))));
    // 17 octets: too long, discarded up to its LF, then one TooLong
    assert_eq!(r.frame(b"NOOP 1234567890\r\n"), (17, Some(Framed::TooLong)));
    assert_eq!(r.frame(b"NOOP 1234567890123456789"), (24, None));
    assert_eq!(r.frame(b"more"), (4, None));
    assert_eq!(r.frame(b"xx\r\nQUIT\r\n"), (4, Some(Framed::TooLong)));
    assert_eq!(r.frame(b"QUIT\r\n"), (6, Some(Framed::Line(4))));
}

/// `AUTH` lines (an initial response) may be up to [`MAX_AUTH_LINE`] octets (RFC 4954 4); other commands
/// keep the command-line limit, and the reader says which limit an over-long line broke.
#[test]
fn line_reader_auth_limit() {
    let mut r = LineReader::new(512);
    let line = |verb: &str, total: usize| {
        let mut l = format!("{verb} ").into_bytes();
        l.resize(total - 2, b'A');
        l.extend_from_slice(b"\r\n");
        l
    };
    for verb in ["AUTH PLAIN", "auth plain", "Auth Login"] {
        let ok = line(verb, MAX_AUTH_LINE);
        assert_eq!(r.frame(&ok), (MAX_AUTH_LINE, Some(Framed::Line(MAX_AUTH_LINE - 2))), "{verb}");
        let long = line(verb, MAX_AUTH_LINE + 1);
        assert_eq!(r.frame(&long), (MAX_AUTH_LINE + 1, Some(Framed::TooLong)), "{verb}");
        assert_eq!(r.broken_limit(), MAX_AUTH_LINE);
    }
    for verb in ["NOOP", "MAIL FROM:<a@b>", "AUTHX", "XAUTH PLAIN"] {
        assert_eq!(r.frame(&line(verb, 512)), (512, Some(Framed::Line(510))), "{verb}");
        assert_eq!(r.frame(&line(verb, 513)), (513, Some(Framed::TooLong)), "{verb}");
        assert_eq!(r.broken_limit(), 512);
    }
    // Arriving in pieces: need more until the LF, then one line; an over-long one is discarded as it comes
    // (the caller drops what `frame` consumed), then reported once.
    let ok = line("AUTH PLAIN", 4096);
    let mut buf = Vec::new();
    for piece in ok.chunks(1000) {
        buf.extend_from_slice(piece);
        match r.frame(&buf) {
            (0, None) => {}
            found => {
                assert_eq!(found, (4096, Some(Framed::Line(4094))));
                buf.clear();
            }
        }
    }
    assert!(buf.is_empty(), "a 4 KiB AUTH line was not framed");
    let long = line("AUTH PLAIN", 3 * MAX_AUTH_LINE);
    let mut results = Vec::new();
    let mut buf = Vec::new();
    for piece in long.chunks(5000) {
        buf.extend_from_slice(piece);
        let (n, found) = r.frame(&buf);
        assert!(buf.len() <= MAX_AUTH_LINE + 5000, "buffer grew to {}", buf.len());
        buf.drain(..n);
        results.extend(found);
    }
    assert_eq!(results, vec![Framed::TooLong]);
    assert_eq!(r.broken_limit(), MAX_AUTH_LINE);
    assert_eq!(r.frame(b"QUIT\r\n"), (6, Some(Framed::Line(4))), "the reader recovers");
}

#[test]
fn data_basic_and_unstuffing() {
    let (out, end, n, bare) = decode_all(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n", Reject);
    assert!(end);
    assert!(!bare);
    assert_eq!(n, 24);
    assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\n");
    let (out, end, n, _) = decode_all(b".\r\n", Reject);
    assert!(end && out.is_empty() && n == 3);
}

/// SMTP smuggling variants: none of these may end DATA (only the final real marker does), and with
/// normalize the smuggled "." line survives as content, which stuffing later protects.
#[test]
fn smuggling_variants_do_not_end_data() {
    let cases: &[&[u8]] = &[
        b"a\n.\nMAIL FROM:<x@evil>\r\n",
        b"a\n.\r\nMAIL FROM:<x@evil>\r\n",
        b"a\r.\rMAIL FROM:<x@evil>\r\n",
        b"a\r.\r\nMAIL FROM:<x@evil>\r\n",
        b"a\r\n.\nMAIL FROM:<x@evil>\r\n",
        b"a\r\n.\rMAIL FROM:<x@evil>\r\n",
        b"a\r\r\n.\r\r\nMAIL FROM:<x@evil>\r\n",
    ];
    for case in cases {
        for policy in [Reject, Normalize] {
            let mut wire = case.to_vec();
            wire.extend_from_slice(b".\r\n");
            let (out, end, n, bare) = decode_all(&wire, policy);
            assert!(end, "{:?}", String::from_utf8_lossy(case));
            assert_eq!(n, wire.len(), "ended early on {:?}", String::from_utf8_lossy(case));
            assert!(bare, "{:?}", String::from_utf8_lossy(case));
            assert!(!out.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "non-canonical output");
            let (out2, end2, n2) = decode_bytewise(&wire, policy);
            assert_eq!((out2, end2, n2), (out, end, n));
        }
    }
}

#[test]
fn normalize_output() {
    let (out, ..) = decode_all(b"a\nb\rc\r\n.\r\n", Normalize);
    assert_eq!(out, b"a\r\nb\r\nc\r\n");
    // after a bare LF the dot is content, not stuffing
    let (out, ..) = decode_all(b"a\n..b\r\n.\r\n", Normalize);
    assert_eq!(out, b"a\r\n..b\r\n");
}

#[test]
fn long_text_line() {
    let mut d = DataDecoder::new(Framing::Dot, Reject, 1000);
    let mut out = Vec::new();
    let mut wire = vec![b'x'; 998];
    wire.extend_from_slice(b"\r\n.\r\n");
    assert!(d.decode(&wire, &mut out).1);
    assert!(!d.saw_long_line());
    let mut d = DataDecoder::new(Framing::Dot, Reject, 1000);
    let mut wire = vec![b'x'; 999];
    wire.extend_from_slice(b"\r\n.\r\n");
    assert!(d.decode(&wire, &mut out).1);
    assert!(d.saw_long_line());
    assert_eq!(d.refusal().unwrap().code, 550);
}

#[test]
fn chunked_has_no_dot_handling() {
    let mut d = DataDecoder::new(Framing::Chunked, Reject, 1000);
    let mut out = Vec::new();
    assert_eq!(d.decode(b"a\r\n.\r\n..b", &mut out), (9, false));
    d.finish(&mut out);
    assert_eq!(out, b"a\r\n.\r\n..b\r\n");
    assert!(!d.saw_bare_line_ending());
    let mut d = DataDecoder::new(Framing::Chunked, Normalize, 1000);
    let mut out = Vec::new();
    d.decode(b"a\r", &mut out);
    d.finish(&mut out);
    assert_eq!(out, b"a\r\n");
    assert!(d.saw_bare_line_ending());
}

#[test]
fn stuffing() {
    let mut out = Vec::new();
    let mut start = true;
    stuff(b".a\r\nb.\r\n", &mut start, &mut out);
    stuff(b".", &mut start, &mut out);
    stuff(b"\r\n.", &mut start, &mut out);
    stuff(b".\r\n", &mut start, &mut out);
    assert_eq!(out, b"..a\r\nb.\r\n..\r\n...\r\n");
}

/// Canonical text: lines of printable bytes and dots, each ended by CRLF.
fn canonical() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        proptest::collection::vec(prop_oneof![Just(b'.'), 0x20u8..0x7f, 0x80u8..=0xff], 0..40),
        0..30,
    )
    .prop_map(|lines| {
        let mut v = Vec::new();
        for l in lines {
            v.extend_from_slice(&l);
            v.extend_from_slice(b"\r\n");
        }
        v
    })
}

proptest! {
    /// unstuff(stuff(b)) == b, across arbitrary chunk boundaries.
    #[test]
    fn stuff_round_trip(msg in canonical(), cut in 0usize..200) {
        let mut wire = Vec::new();
        let mut start = true;
        let cut = cut.min(msg.len());
        stuff(&msg[..cut], &mut start, &mut wire);
        stuff(&msg[cut..], &mut start, &mut wire);
        wire.extend_from_slice(b".\r\n");
        let mut d = DataDecoder::new(Framing::Dot, Reject, 0);
        let mut out = Vec::new();
        let split = cut.min(wire.len());
        let (n1, end1) = d.decode(&wire[..split], &mut out);
        prop_assert!(!end1 || n1 == wire.len());
        let (n2, end2) = if end1 { (0, true) } else { d.decode(&wire[split..], &mut out) };
        prop_assert!(end2);
        prop_assert_eq!(n1 + n2, wire.len());
        prop_assert_eq!(out, msg);
    }

    /// Arbitrary bytes never panic, and output is always canonical CRLF text.
    #[test]
    fn random_bytes(wire in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..300)) {
        let mut d = DataDecoder::new(Framing::Dot, Normalize, 1000);
        let mut out = Vec::new();
        let (_n, end) = d.decode(&wire, &mut out);
        if !end {
            d.finish(&mut out);
        }
        for (i, &b) in out.iter().enumerate() {
            if b == b'\n' { prop_assert!(i > 0 && out[i - 1] == b'\r'); }
            if b == b'\r' { prop_assert!(out.get(i + 1) == Some(&b'\n')); }
        }
    }
}

/// The state machine alone, one byte at a time: the reference that [`DataDecoder::decode`]'s bulk copying
/// of clean lines must match exactly.
fn decode_reference(d: &mut DataDecoder, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
    for (i, &b) in input.iter().enumerate() {
        if d.step(b, out) {
            return (i + 1, true);
        }
    }
    (input.len(), false)
}

/// Wire bytes rich in the cases the fast path must hand over: CR, LF, dots, short and long lines.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![3 => Just(b'\r'), 3 => Just(b'\n'), 2 => Just(b'.'), 6 => Just(b'a'), 1 => any::<u8>()],
        0..400,
    )
}

proptest! {
    /// The fast decoder and the byte-at-a-time reference agree on output, bytes consumed, end of data, the
    /// bare-line-ending and long-line flags and the line length, for any input split into any two reads,
    /// in both framings.
    #[test]
    fn fast_path_matches_reference(wire in wire_bytes(), cut in 0usize..400, chunked in any::<bool>(), max_line in 0usize..12) {
        let framing = if chunked { Framing::Chunked } else { Framing::Dot };
        let mut fast = DataDecoder::new(framing, Normalize, max_line);
        let mut slow = DataDecoder::new(framing, Normalize, max_line);
        let (mut fo, mut so) = (Vec::new(), Vec::new());
        let cut = cut.min(wire.len());
        let (mut fn_, mut sn) = (0, 0);
        let (mut fe, mut se) = (false, false);
        for part in [&wire[..cut], &wire[cut..]] {
            if !fe {
                let (n, e) = fast.decode(part, &mut fo);
                fn_ += n;
                fe = e;
            }
            if !se {
                let (n, e) = decode_reference(&mut slow, part, &mut so);
                sn += n;
                se = e;
            }
        }
        prop_assert_eq!(&fo, &so);
        prop_assert_eq!((fn_, fe), (sn, se));
        prop_assert_eq!(fast.saw_bare_line_ending(), slow.saw_bare_line_ending());
        prop_assert_eq!(fast.saw_long_line(), slow.saw_long_line());
        prop_assert_eq!(fast.line_len, slow.line_len);
        prop_assert_eq!(fast.state, slow.state);
    }

    /// `needs_stuffing` is false exactly when `stuff` leaves the bytes as they are.
    #[test]
    fn needs_stuffing_agrees_with_stuff(msg in canonical(), start in any::<bool>()) {
        let mut out = Vec::new();
        let mut at = start;
        stuff(&msg, &mut at, &mut out);
        prop_assert_eq!(needs_stuffing(&msg, start), out != msg);
    }
}
