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
    }
}

struct Harness(Session);

impl Harness {
    fn new(cfg: SessionConfig) -> Harness {
        Harness(Session::new(Arc::new(cfg), false))
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
