use super::*;
use proptest::prelude::*;

fn ok(line: &str) -> Command {
    parse(line.as_bytes()).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn err(line: &str) -> SyntaxError {
    parse(line.as_bytes()).expect_err(line)
}

#[test]
fn simple_verbs() {
    for (line, cmd) in [
        ("DATA", Command::Data),
        ("data", Command::Data),
        ("RSET", Command::Rset),
        ("NOOP", Command::Noop),
        ("NOOP anything", Command::Noop),
        ("QUIT", Command::Quit),
        ("STARTTLS", Command::StartTls),
        ("VRFY postmaster", Command::Vrfy),
        ("HELP", Command::Help),
    ] {
        assert_eq!(ok(line), cmd, "{line}");
    }
}

#[test]
fn helo_ehlo() {
    assert_eq!(ok("EHLO client.example"), Command::Ehlo("client.example".into()));
    assert_eq!(ok("helo [192.0.2.1]"), Command::Helo("[192.0.2.1]".into()));
    assert_eq!(ok("EHLO [IPv6:2001:db8::1]"), Command::Ehlo("[IPv6:2001:db8::1]".into()));
    assert!(matches!(err("EHLO"), SyntaxError::Arguments(_)));
    assert!(matches!(err("EHLO a b"), SyntaxError::Arguments(_)));
    assert!(matches!(err("EHLO bad<name>"), SyntaxError::Arguments(_)));
}

#[test]
fn mail_from() {
    let Command::Mail(m) = ok("MAIL FROM:<a@example.org> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=x+2Dy") else {
        panic!()
    };
    assert_eq!(m.address, "a@example.org");
    assert_eq!(m.size, Some(1000));
    assert_eq!(m.body, Some(Body::EightBitMime));
    assert_eq!(m.dsn.len(), 2);
    assert_eq!(m.dsn[1].to_string(), "ENVID=x+2Dy");

    let Command::Mail(m) = ok("mail from:<>") else { panic!() };
    assert_eq!(m.address, "");
    let Command::Mail(m) = ok("MAIL FROM: <a@b.example>") else { panic!() };
    assert_eq!(m.address, "a@b.example");
    let Command::Mail(m) = ok("MAIL FROM:<@relay.example:a@b.example>") else { panic!() };
    assert_eq!(m.address, "a@b.example");
    let Command::Mail(m) = ok("MAIL FROM:<\"odd >name\"@b.example> SMTPUTF8") else { panic!() };
    assert_eq!(m.address, "\"odd >name\"@b.example");
    assert!(m.smtputf8);
    let Command::Mail(m) = ok("MAIL FROM:<用户@例子.广告> SMTPUTF8") else { panic!() };
    assert_eq!(m.address, "用户@例子.广告");
}

#[test]
fn mail_from_errors() {
    for line in [
        "MAIL",
        "MAIL TO:<a@b.example>",
        "MAIL FROM:a@b.example",
        "MAIL FROM:<a@b.example",
        "MAIL FROM:<a@b.example>x",
        "MAIL FROM:<a b@c.example>",
        "MAIL FROM:<ab.example>",
        "MAIL FROM:<a@>",
        "MAIL FROM:<a@b.example> SIZE=big",
    ] {
        assert!(matches!(err(line), SyntaxError::Arguments(_)), "{line}");
    }
    assert!(matches!(err("MAIL FROM:<a@b.example> BODY=BINARYMIME"), SyntaxError::Parameter(_)));
    assert!(matches!(err("MAIL FROM:<a@b.example> XYZ=1"), SyntaxError::Parameter(_)));
    let long = format!("MAIL FROM:<{}@b.example>", "x".repeat(65));
    assert!(matches!(err(&long), SyntaxError::Arguments(_)));
}

/// RFC 1870: `size-value ::= 1*20DIGIT`. Digits only (no sign, no space), at most 20 of them; a value that
/// does not fit a u64 is still a size, just too big for any limit (the session answers `552`).
#[test]
fn mail_from_size_is_strict() {
    let size = |line: &str| match ok(line) {
        Command::Mail(m) => m.size,
        other => panic!("{other:?}"),
    };
    assert_eq!(size("MAIL FROM:<a@example.org> SIZE=0"), Some(0));
    assert_eq!(size("MAIL FROM:<a@example.org> SIZE=00000000000000000005"), Some(5));
    assert_eq!(size("MAIL FROM:<a@example.org> SIZE=18446744073709551615"), Some(u64::MAX));
    assert_eq!(size("MAIL FROM:<a@example.org> SIZE=18446744073709551616"), Some(u64::MAX));
    assert_eq!(size("MAIL FROM:<a@example.org> SIZE=99999999999999999999"), Some(u64::MAX));
    for line in [
        "MAIL FROM:<a@example.org> SIZE=+5",
        "MAIL FROM:<a@example.org> SIZE=-5",
        "MAIL FROM:<a@example.org> SIZE=",
        "MAIL FROM:<a@example.org> SIZE",
        "MAIL FROM:<a@example.org> SIZE=5x",
        "MAIL FROM:<a@example.org> SIZE=\u{0665}",
        "MAIL FROM:<a@example.org> SIZE=000000000000000000000005",
        "MAIL FROM:<a@example.org> SIZE=123456789012345678901",
    ] {
        assert!(matches!(err(line), SyntaxError::Arguments(_)), "{line}");
    }
}

#[test]
fn rcpt_to() {
    let Command::Rcpt(r) = ok("RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.test") else {
        panic!()
    };
    assert_eq!(r.address, "b@example.test");
    assert_eq!(r.dsn.len(), 2);
    assert!(matches!(err("RCPT TO:<>"), SyntaxError::Arguments(_)));
    assert!(matches!(err("RCPT TO:<b@example.test> SIZE=1"), SyntaxError::Parameter(_)));
}

#[test]
fn bdat() {
    assert_eq!(ok("BDAT 100"), Command::Bdat { size: 100, last: false });
    assert_eq!(ok("BDAT 0 LAST"), Command::Bdat { size: 0, last: true });
    assert!(matches!(err("BDAT"), SyntaxError::Arguments(_)));
    assert!(matches!(err("BDAT -1"), SyntaxError::Arguments(_)));
    assert!(matches!(err("BDAT 10 FIRST"), SyntaxError::Arguments(_)));
    assert!(matches!(err("BDAT 99999999999999999999999"), SyntaxError::Arguments(_)));
    for line in ["BDAT +5", "BDAT +5 LAST", "BDAT \u{0665}", "BDAT 5\u{a0}LAST", "BDAT 0x10"] {
        assert!(matches!(err(line), SyntaxError::Arguments(_)), "{line}");
    }
}

#[test]
fn hostile_lines() {
    assert_eq!(err("FOO"), SyntaxError::Unknown);
    assert_eq!(err(""), SyntaxError::Unknown);
    assert_eq!(err("MAILFROM:<a@b.example>"), SyntaxError::Unknown);
    assert!(matches!(parse(b"NOOP\0"), Err(SyntaxError::Arguments(_))));
    assert!(matches!(parse(b"RSET\rQUIT"), Err(SyntaxError::Arguments(_))));
    assert!(matches!(parse(b"EHLO \xff\xfe"), Err(SyntaxError::Arguments(_))));
    assert!(matches!(err("DATA now"), SyntaxError::Arguments(_)));
}

proptest! {
    #[test]
    fn never_panics(line in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse(&line);
    }

    #[test]
    fn never_panics_on_mail_like(s in "(MAIL FROM:|RCPT TO:)<[ -~]{0,80}>( [A-Z=0-9]{0,20}){0,4}") {
        let _ = parse(s.as_bytes());
    }
}
