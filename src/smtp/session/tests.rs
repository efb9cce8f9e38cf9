use super::*;

fn cfg() -> SessionConfig {
    SessionConfig {
        hostname: "mx.test".into(),
        greeting: "ESMTP moat".into(),
        role: Role::Mx,
        mode: ListenerMode::Starttls,
        starttls: true,
        require_tls: false,
        max_message_size: 1000,
        max_recipients: 2,
        max_errors: 5,
        auth: false,
        auth_without_tls: false,
        local_domains: vec!["example.test".to_string(), "example.org".to_string()].into(),
    }
}

struct Harness(Session);

impl Harness {
    /// A session whose upstream offers everything moat passes through (DSN, SMTPUTF8).
    fn new(cfg: SessionConfig) -> Harness {
        let mut s = Session::new(Arc::new(cfg), false);
        s.set_upstream_offers(UpstreamOffers { dsn: true, smtputf8: true });
        Harness(s)
    }

    fn ehlo_lines(&mut self) -> Vec<String> {
        match self.cmd("EHLO client.test", 250) {
            Step::Reply(r) => r.lines,
            other => panic!("EHLO: {other:?}"),
        }
    }

    /// Sends a command and checks the reply code; MAIL/RCPT requests are answered with `250` as an
    /// upstream would.
    fn cmd(&mut self, line: &str, code: u16) -> Step {
        let step = self.0.command(line.as_bytes());
        let got = match &step {
            Step::Reply(r) | Step::Close(r, _) => r.code,
            Step::Mail(m) => {
                self.0.mail_done(m.clone(), &Reply::sender_ok());
                250
            }
            Step::Rcpt(r) => {
                self.0.rcpt_done(r.clone(), &Reply::recipient_ok());
                250
            }
            Step::Data => 354,
            Step::StartTls => 220,
            Step::Bdat { refusal: Some(r), .. } => r.code,
            Step::Bdat { .. } => 250,
            Step::Auth { .. } => 334,
        };
        assert_eq!(got, code, "{line}: {step:?}");
        step
    }
}

#[test]
fn happy_path() {
    let mut h = Harness::new(cfg());
    let Step::Reply(ehlo) = h.cmd("EHLO client.test", 250) else { panic!() };
    for cap in ["PIPELINING", "SIZE 1000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN", "STARTTLS"]
    {
        assert!(ehlo.lines.iter().any(|l| l == cap), "{cap} missing: {ehlo:?}");
    }
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("RCPT TO:<b@example.test>", 250);
    h.cmd("DATA", 354);
    assert!(h.0.in_data());
    h.0.message_done();
    assert!(h.0.envelope().is_none());
    h.cmd("QUIT", 221);
}

#[test]
fn sequence_errors() {
    let mut h = Harness::new(SessionConfig { max_errors: 10, ..cfg() });
    h.cmd("MAIL FROM:<a@example.org>", 503);
    h.cmd("EHLO client.test", 250);
    h.cmd("RCPT TO:<b@example.test>", 503);
    h.cmd("DATA", 503);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("MAIL FROM:<a@example.org>", 503);
    h.cmd("DATA", 554);
    h.cmd("FOO", 500);
}

#[test]
fn limits() {
    let mut h = Harness::new(cfg());
    h.cmd("EHLO client.test", 250);
    h.cmd("MAIL FROM:<a@example.org> SIZE=1001", 552);
    // RFC 1870: 20 digits above 2^64 are a size too big, not a syntax error; a sign is a syntax error.
    h.cmd("MAIL FROM:<a@example.org> SIZE=18446744073709551616", 552);
    h.cmd("MAIL FROM:<a@example.org> SIZE=+5", 501);
    h.cmd("MAIL FROM:<a@example.org> SIZE=000000000000000000000005", 501);
    h.cmd("MAIL FROM:<a@example.org> SIZE=1000", 250);
    h.cmd("RCPT TO:<b@example.test>", 250);
    h.cmd("RCPT TO:<c@example.test>", 250);
    h.cmd("RCPT TO:<d@example.test>", 452);
    h.cmd("RCPT TO:<用户@example.test>", 452);
}

#[test]
fn utf8_needs_smtputf8() {
    let mut h = Harness::new(cfg());
    h.cmd("EHLO client.test", 250);
    h.cmd("MAIL FROM:<用户@example.org>", 553);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("RCPT TO:<用户@example.test>", 553);
    h.cmd("RSET", 250);
    h.cmd("MAIL FROM:<用户@example.org> SMTPUTF8", 250);
    h.cmd("RCPT TO:<用户@example.test>", 250);
}

#[test]
fn dsn_and_smtputf8_are_offered_only_when_the_upstream_offers_them() {
    let mut h = Harness::new(cfg());
    h.0.set_upstream_offers(UpstreamOffers::default());
    let lines = h.ehlo_lines();
    assert!(!lines.iter().any(|l| l == "DSN" || l == "SMTPUTF8"), "{lines:?}");
    // Not advertised: their parameters are refused, never silently dropped.
    h.cmd("MAIL FROM:<a@example.org> RET=HDRS", 555);
    h.cmd("MAIL FROM:<用户@example.org> SMTPUTF8", 555);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("RCPT TO:<b@example.test> NOTIFY=SUCCESS", 555);
    h.cmd("RCPT TO:<b@example.test>", 250);
    h.cmd("RSET", 250);
    // The upstream turns out to offer DSN only: the next EHLO says so.
    h.0.set_upstream_offers(UpstreamOffers { dsn: true, smtputf8: false });
    let lines = h.ehlo_lines();
    assert!(lines.iter().any(|l| l == "DSN") && !lines.iter().any(|l| l == "SMTPUTF8"), "{lines:?}");
    h.cmd("MAIL FROM:<a@example.org> RET=HDRS ENVID=x", 250);
    h.cmd("RCPT TO:<b@example.test> NOTIFY=SUCCESS", 250);
    // What one EHLO advertised holds until the next EHLO, whatever is learnt in between.
    h.0.set_upstream_offers(UpstreamOffers::default());
    h.cmd("RCPT TO:<c@example.test> NOTIFY=NEVER", 250);
    assert_eq!(h.0.offered(), UpstreamOffers { dsn: true, smtputf8: false });
}

#[test]
fn helo_offers_no_extension_parameters() {
    let mut h = Harness::new(cfg());
    h.cmd("HELO client.test", 250);
    assert_eq!(h.0.offered(), UpstreamOffers::default());
    h.cmd("MAIL FROM:<a@example.org> RET=FULL", 555);
    h.cmd("MAIL FROM:<a@example.org>", 250);
}

#[test]
fn too_many_errors_closes() {
    let mut h = Harness::new(cfg());
    for _ in 0..4 {
        h.cmd("FOO", 500);
    }
    assert!(matches!(h.cmd("FOO", 421), Step::Close(_, CloseReason::TooManyErrors)));
}

#[test]
fn starttls_resets_and_is_single() {
    let mut h = Harness::new(cfg());
    h.cmd("EHLO client.test", 250);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("STARTTLS", 503);
    h.cmd("RSET", 250);
    assert_eq!(h.cmd("STARTTLS", 220), Step::StartTls);
    h.0.tls_started();
    assert_eq!(h.0.offered(), UpstreamOffers::default(), "nothing advertised before TLS carries over");
    h.cmd("MAIL FROM:<a@example.org>", 503); // must EHLO again
    let Step::Reply(ehlo) = h.cmd("EHLO client.test", 250) else { panic!() };
    assert!(!ehlo.lines.iter().any(|l| l == "STARTTLS"));
    h.cmd("STARTTLS", 503);
}

#[test]
fn require_tls_and_submission() {
    let mut h = Harness::new(SessionConfig { require_tls: true, ..cfg() });
    h.cmd("EHLO client.test", 250);
    h.cmd("MAIL FROM:<a@example.org>", 530);
    let mut h = Harness::new(SessionConfig { role: Role::Submission, ..cfg() });
    h.cmd("EHLO client.test", 250);
    h.cmd("MAIL FROM:<a@example.org>", 530);
}

#[test]
fn bdat_flow() {
    let mut h = Harness::new(cfg());
    h.cmd("EHLO client.test", 250);
    h.cmd("BDAT 10", 503);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("BDAT 10", 554);
    h.cmd("RCPT TO:<b@example.test>", 250);
    assert_eq!(h.cmd("BDAT 10", 250), Step::Bdat { size: 10, last: false, refusal: None });
    h.cmd("DATA", 503);
    h.cmd("RCPT TO:<c@example.test>", 503);
    assert_eq!(h.cmd("BDAT 0 LAST", 250), Step::Bdat { size: 0, last: true, refusal: None });
    assert!(h.0.in_data());
    h.0.message_done();
    h.cmd("BDAT 5 LAST", 503);
}

#[test]
fn ehlo_resets_transaction() {
    let mut h = Harness::new(cfg());
    h.cmd("EHLO client.test", 250);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("EHLO client.test", 250);
    assert!(h.0.envelope().is_none());
    h.cmd("RCPT TO:<b@example.test>", 503);
}

#[test]
fn misc_commands() {
    let mut h = Harness::new(cfg());
    h.cmd("NOOP", 250);
    h.cmd("VRFY root", 252);
    h.cmd("EXPN list", 502);
    h.cmd("HELP", 214);
    h.cmd("HELO client.test", 250);
    h.cmd("AUTH PLAIN", 503);
}

fn auth_cfg(role: Role) -> SessionConfig {
    SessionConfig { auth: true, role, ..cfg() }
}

#[test]
fn auth_offered_only_after_tls() {
    let mut h = Harness::new(auth_cfg(Role::Submission));
    let Step::Reply(r) = h.cmd("EHLO c", 250) else { panic!() };
    assert!(!r.lines.iter().any(|l| l.starts_with("AUTH")), "{r:?}");
    h.cmd("AUTH PLAIN AGFAYg==", 538);
    h.cmd("MAIL FROM:<a@example.org>", 530);
    h.0.tls_started();
    let Step::Reply(r) = h.cmd("EHLO c", 250) else { panic!() };
    assert!(r.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{r:?}");
    let step = h.cmd("AUTH plain AGFAYg==", 334);
    assert!(matches!(&step, Step::Auth { mechanism: Mechanism::Plain, initial: Some(_) }));
    assert!(!format!("{step:?}").contains("AGFAYg"), "initial response is redacted");
    h.cmd("AUTH CRAM-MD5", 504);
    h.0.auth_done("alice".into());
    assert_eq!(h.0.user(), Some("alice"));
    h.cmd("AUTH LOGIN", 503);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("RCPT TO:<x@elsewhere.example>", 250);
}

#[test]
fn auth_sequence_errors() {
    let mut h = Harness::new(SessionConfig { auth_without_tls: true, ..auth_cfg(Role::Mx) });
    h.cmd("AUTH LOGIN", 503);
    h.cmd("EHLO c", 250);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("AUTH LOGIN", 503);
    h.cmd("RSET", 250);
    assert!(matches!(h.cmd("AUTH LOGIN", 334), Step::Auth { mechanism: Mechanism::Login, initial: None }));
    // Not configured at all: out of sequence, as before.
    let mut h = Harness::new(cfg());
    h.cmd("EHLO c", 250);
    h.cmd("AUTH PLAIN", 503);
}

#[test]
fn mx_is_never_an_open_relay() {
    let mut h = Harness::new(cfg());
    h.cmd("EHLO c", 250);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("RCPT TO:<b@example.test>", 250);
    h.cmd("RCPT TO:<b@elsewhere.example>", 554);
    h.cmd("RCPT TO:<b%elsewhere.example@example.test>", 554);
    let mut h = Harness::new(SessionConfig { local_domains: Vec::new().into(), ..cfg() });
    h.cmd("EHLO c", 250);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("RCPT TO:<b@example.test>", 554);
}

#[test]
fn locked_attempts_close_the_session() {
    let mut h = Harness::new(auth_cfg(Role::Mx));
    assert_eq!(h.0.auth_locked(), Step::Reply(Reply::auth_locked()));
    assert!(matches!(h.0.auth_locked(), Step::Reply(_)));
    assert!(matches!(h.0.auth_locked(), Step::Close(r, CloseReason::AuthLocked) if r.code == 421));
}

#[test]
fn chunks_pipelined_after_a_failed_chunk_are_not_counted_as_errors() {
    let mut h = Harness::new(cfg()); // max_errors 5
    h.cmd("EHLO client.test", 250);
    h.cmd("MAIL FROM:<a@example.org>", 250);
    h.cmd("RCPT TO:<b@example.test>", 250);
    h.cmd("BDAT 10", 250);
    // The driver refused the chunk (too big, or a header rule): the transaction ends.
    h.0.abort_transaction();
    // RFC 3030 2: chunks already in the pipeline are discarded with 503, and cost the client nothing.
    for _ in 0..8 {
        h.cmd("BDAT 10", 503);
    }
    h.cmd("BDAT 10 LAST", 503);
    assert!(!h.0.error_limit_reached());
    // Any other command ends that grace: a later stray BDAT counts again.
    h.cmd("NOOP", 250);
    for _ in 0..5 {
        h.cmd("BDAT 10", 503);
    }
    assert!(h.0.error_limit_reached());
}

#[test]
fn auth_after_helo_is_out_of_sequence() {
    let mut h = Harness::new(SessionConfig { auth_without_tls: true, ..auth_cfg(Role::Mx) });
    h.cmd("HELO c", 250);
    h.cmd("AUTH PLAIN AGFAYg==", 503);
    h.cmd("EHLO c", 250);
    h.cmd("AUTH PLAIN AGFAYg==", 334);
}
