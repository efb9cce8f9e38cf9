//! The command parser (with a parse → print → parse round trip), SASL decoding, command-line framing and
//! the DATA/BDAT decoder.

use base64::Engine as _;
use bolero::{check, generator::TypeGenerator};
use moat::auth::sasl::{Credentials, Exchange, Mechanism, SaslStep, MAX_PASSWORD, MAX_USER};
use moat::config::BareLineEndings;
use moat::smtp::codec::{stuff, DataDecoder, Framed, Framing, LineReader, MAX_AUTH_LINE};
use moat::smtp::command::{self, Body, Command};

const VERBS: &[&str] = &[
    "EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH",
    "mail", "Rcpt", "XCLIENT",
];
const ADDRS: &[&str] = &[
    "a@example.test",
    "b@remote.example",
    "\"x y\"@example.test",
    "\"a>b\\\"c\"@example.test",
    "@relay.example,@b.example:c@example.org",
    "用户@例子.广告",
    "a@[192.0.2.1]",
    "",
    "a@",
    "@",
];
const PARAMS: &[&str] = &[
    "SIZE=",
    "BODY=8BITMIME",
    "BODY=7bit",
    "BODY=BINARYMIME",
    "SMTPUTF8",
    "RET=HDRS",
    "ENVID=x+2Dy",
    "NOTIFY=SUCCESS,FAILURE",
    "ORCPT=rfc822;b@example.test",
    "LAST",
    "PLAIN",
    "LOGIN",
    "SIZE=+5",
    "SIZE=000000000000000000000001",
    "=",
    "AUTH=<>",
];

const PUNCT: &[u8] = b"\"\\@:,=.[]\r\n\0\t";

/// A piece of a command line.
#[derive(Clone, Debug, TypeGenerator)]
pub enum Token {
    Verb(u8),
    Space,
    FromColon,
    ToColon,
    Open,
    Close,
    Addr(u8),
    Param(u8),
    Digits(u64),
    Byte(u8),
    Punct(u8),
    Text(Vec<u8>),
}

/// A command line: tokens of the grammar, or raw bytes.
#[derive(Clone, Debug, TypeGenerator)]
pub enum Line {
    Tokens(Vec<Token>),
    Raw(Vec<u8>),
}

fn pick<'a>(list: &[&'a str], i: u8) -> &'a str {
    list[usize::from(i) % list.len()]
}

impl Line {
    pub fn render(&self) -> Vec<u8> {
        let tokens = match self {
            Line::Raw(b) => return b.clone(),
            Line::Tokens(t) => t,
        };
        let mut out = Vec::new();
        for t in tokens {
            match t {
                Token::Verb(i) => out.extend_from_slice(pick(VERBS, *i).as_bytes()),
                Token::Space => out.push(b' '),
                Token::FromColon => out.extend_from_slice(b"FROM:"),
                Token::ToColon => out.extend_from_slice(b"TO:"),
                Token::Open => out.push(b'<'),
                Token::Close => out.push(b'>'),
                Token::Addr(i) => out.extend_from_slice(pick(ADDRS, *i).as_bytes()),
                Token::Param(i) => out.extend_from_slice(pick(PARAMS, *i).as_bytes()),
                Token::Digits(n) => out.extend_from_slice(n.to_string().as_bytes()),
                Token::Byte(b) => out.push(*b),
                Token::Punct(i) => out.push(PUNCT[usize::from(*i) % PUNCT.len()]),
                Token::Text(b) => out.extend_from_slice(b),
            }
        }
        out
    }
}

/// The canonical line for a parsed command, in the form the upstream client writes MAIL and RCPT
/// (`MAIL FROM:<address> SIZE=n BODY=x SMTPUTF8 dsn...`).
fn print(cmd: &Command) -> String {
    let params = |dsn: &[command::Param]| dsn.iter().map(|p| format!(" {p}")).collect::<String>();
    match cmd {
        Command::Ehlo(n) => format!("EHLO {n}"),
        Command::Helo(n) => format!("HELO {n}"),
        Command::Mail(m) => {
            let mut l = format!("MAIL FROM:<{}>", m.address);
            if let Some(s) = m.size {
                l.push_str(&format!(" SIZE={s}"));
            }
            match m.body {
                Some(Body::SevenBit) => l.push_str(" BODY=7BIT"),
                Some(Body::EightBitMime) => l.push_str(" BODY=8BITMIME"),
                None => {}
            }
            if m.smtputf8 {
                l.push_str(" SMTPUTF8");
            }
            l + &params(&m.dsn)
        }
        Command::Rcpt(r) => format!("RCPT TO:<{}>{}", r.address, params(&r.dsn)),
        Command::Data => "DATA".into(),
        Command::Bdat { size, last } => format!("BDAT {size}{}", if *last { " LAST" } else { "" }),
        Command::Rset => "RSET".into(),
        Command::Noop => "NOOP".into(),
        Command::Quit => "QUIT".into(),
        Command::Vrfy => "VRFY".into(),
        Command::Expn => "EXPN".into(),
        Command::Help => "HELP".into(),
        Command::StartTls => "STARTTLS".into(),
        Command::Auth { mechanism, initial } => match initial {
            Some(i) => format!("AUTH {mechanism} {i}"),
            None => format!("AUTH {mechanism}"),
        },
    }
}

/// Any line: no panic; a parsed command printed canonically parses to the same command.
#[test]
fn command_line() {
    check!().with_iterations(20_000).with_type::<Line>().for_each(|line| {
        let bytes = line.render();
        if let Ok(cmd) = command::parse(&bytes) {
            assert!(!bytes.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n'), "{bytes:?}");
            let printed = print(&cmd);
            assert_eq!(command::parse(printed.as_bytes()).as_ref(), Ok(&cmd), "{:?} printed as {printed:?}", line);
        }
    });
}

/// SASL: PLAIN credentials encoded as a client would are decoded to the same credentials, and any
/// sequence of response lines ends the exchange within two challenges without a panic.
#[test]
fn sasl_exchange() {
    check!().with_iterations(5_000).with_type::<(String, String, bool, Vec<Vec<u8>>)>().for_each(
        |(user, pass, login, lines)| {
            let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
            let valid = !user.is_empty()
                && user.len() <= MAX_USER
                && pass.len() <= MAX_PASSWORD
                && !user.contains('\0')
                && !pass.contains('\0');
            let want = SaslStep::Done(Credentials { user: user.clone(), password: pass.clone() });
            let (_, step) = Exchange::start(Mechanism::Plain, Some(&b64(format!("\0{user}\0{pass}").as_bytes())));
            assert_eq!(step == want, valid, "PLAIN {user:?}");
            if valid && *login {
                let (mut ex, _) = Exchange::start(Mechanism::Login, None);
                assert!(matches!(ex.respond(b64(user.as_bytes()).as_bytes()), SaslStep::Challenge(_)));
                assert_eq!(ex.respond(b64(pass.as_bytes()).as_bytes()), want, "LOGIN {user:?}");
            }
            let mech = if *login { Mechanism::Login } else { Mechanism::Plain };
            let (mut ex, mut step) = Exchange::start(mech, None);
            let mut challenges = 0;
            for l in lines {
                if !matches!(step, SaslStep::Challenge(_)) {
                    break;
                }
                challenges += 1;
                assert!(challenges <= 2, "more than two challenges");
                step = ex.respond(l);
            }
        },
    );
}

/// Command framing as the driver does it: whatever arrives in whatever pieces, lines never exceed their
/// limit, the buffer never holds more than one limit's worth, and every byte is eventually consumed.
#[test]
fn command_framing() {
    check!().with_iterations(5_000).with_type::<(u16, Vec<Vec<u8>>)>().for_each(|(max, chunks)| {
        let max = usize::from(*max % 2048).max(8);
        let limit = max.max(MAX_AUTH_LINE);
        let mut reader = LineReader::new(max);
        let mut buf: Vec<u8> = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                let (n, found) = reader.frame(&buf);
                assert!(n <= buf.len());
                if let Some(Framed::Line(len)) = found {
                    assert!(len < n && n <= limit, "line of {len}/{n} bytes, max {max}");
                    assert!(!buf[..len].contains(&b'\n'));
                }
                buf.drain(..n);
                if n == 0 {
                    assert!(found.is_none());
                    break;
                }
            }
            assert!(buf.len() < limit, "{} bytes buffered, max {max}", buf.len());
        }
    });
}

/// Wire bytes biased towards the characters that matter to the decoder.
#[derive(Clone, Debug, TypeGenerator)]
pub enum WireByte {
    Cr,
    Lf,
    Dot,
    Crlf,
    CrlfDotCrlf,
    Any(u8),
}

fn wire(bytes: &[WireByte]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bytes {
        match b {
            WireByte::Cr => out.push(b'\r'),
            WireByte::Lf => out.push(b'\n'),
            WireByte::Dot => out.push(b'.'),
            WireByte::Crlf => out.extend_from_slice(b"\r\n"),
            WireByte::CrlfDotCrlf => out.extend_from_slice(b"\r\n.\r\n"),
            WireByte::Any(b) => out.push(*b),
        }
    }
    out
}

/// What a decoder made of a wire: (output, consumed, end, bare, long line).
type Decoded = (Vec<u8>, usize, bool, bool, bool);

fn decode(wire: &[u8], cuts: &[u16], framing: Framing, policy: BareLineEndings, max_line: usize) -> Decoded {
    let mut d = DataDecoder::new(framing, policy, max_line);
    let mut out = Vec::new();
    let (mut at, mut end) = (0, false);
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (wire.len() + 1)).collect();
    bounds.sort_unstable();
    bounds.push(wire.len());
    for b in bounds {
        if end || b <= at {
            continue;
        }
        let (n, e) = d.decode(&wire[at..b], &mut out);
        assert!(n <= b - at);
        assert!(e || n == b - at, "a chunk was not consumed without an end");
        at += n;
        end = e;
    }
    if !end && framing == Framing::Chunked {
        d.finish(&mut out);
    }
    (out, at, end, d.saw_bare_line_ending(), d.saw_long_line())
}

/// The DATA/BDAT decoder: the same answer whatever the read boundaries, output bounded by the input,
/// canonical CRLF when normalizing, and the end of DATA only at a wire `<CRLF>.<CRLF>`.
#[test]
fn data_decoder() {
    check!().with_iterations(20_000).with_type::<(Vec<WireByte>, Vec<u16>, bool, bool, u16)>().for_each(
        |(bytes, cuts, chunked, normalize, max_line)| {
            let wire = wire(bytes);
            let framing = if *chunked { Framing::Chunked } else { Framing::Dot };
            let policy = if *normalize { BareLineEndings::Normalize } else { BareLineEndings::Reject };
            let max_line = usize::from(*max_line % 200);
            let whole = decode(&wire, &[], framing, policy, max_line);
            let pieces = decode(&wire, cuts, framing, policy, max_line);
            assert_eq!(whole, pieces, "read boundaries changed the result");
            let (out, consumed, end, _, _) = whole;
            assert!(out.len() <= 2 * consumed + 2, "{} bytes out of {consumed}", out.len());
            if end {
                assert_eq!(framing, Framing::Dot);
                let seen = &wire[..consumed];
                assert!(seen == b".\r\n" || seen.ends_with(b"\r\n.\r\n"), "end without <CRLF>.<CRLF>: {seen:?}");
            }
            if *normalize {
                for (i, &b) in out.iter().enumerate() {
                    assert!(b != b'\n' || (i > 0 && out[i - 1] == b'\r'), "bare LF in output");
                    assert!(b != b'\r' || out.get(i + 1) == Some(&b'\n') || (!end && i + 1 == out.len()), "bare CR");
                }
            }
        },
    );
}

/// Dot-stuffing round trip: any canonical message, stuffed in two pieces and terminated, decodes back to
/// itself, and the decoder stops exactly at the terminator.
#[test]
fn stuff_round_trip() {
    check!().with_iterations(5_000).with_type::<(Vec<Vec<u8>>, u16)>().for_each(|(lines, cut)| {
        let mut msg = Vec::new();
        for l in lines {
            msg.extend(l.iter().copied().filter(|&b| b != b'\r' && b != b'\n'));
            msg.extend_from_slice(b"\r\n");
        }
        let cut = usize::from(*cut) % (msg.len() + 1);
        let (mut wire, mut start) = (Vec::new(), true);
        stuff(&msg[..cut], &mut start, &mut wire);
        stuff(&msg[cut..], &mut start, &mut wire);
        wire.extend_from_slice(b".\r\nNEXT COMMAND\r\n");
        let (out, consumed, end, bare, _) = decode(&wire, &[cut as u16], Framing::Dot, BareLineEndings::Reject, 0);
        assert!(end && !bare);
        assert_eq!(consumed, wire.len() - b"NEXT COMMAND\r\n".len());
        assert_eq!(out, msg);
    });
}
