//! The session state machine driven by random command sequences, with a driver that answers its requests
//! (MAIL, RCPT, DATA, BDAT, AUTH, STARTTLS) the way the async driver would, with random outcomes.

use std::sync::Arc;

use bolero::{check, generator::TypeGenerator};
use moat::config::{ListenerMode, Role};
use moat::smtp::session::{CloseReason, Session, SessionConfig, Step, UpstreamOffers};
use moat::smtp::Reply;

use crate::smtp::Line;

/// One thing the client does, with the random outcome of whatever the driver must decide for it.
#[derive(Clone, Debug, TypeGenerator)]
enum Op {
    Ehlo,
    Helo,
    Mail { local: bool, size: u16, params: u8 },
    Rcpt { local: bool },
    Data,
    Bdat { size: u8, last: bool },
    Rset,
    StartTls,
    Auth,
    Quit,
    TooLong,
    Line(Line),
}

impl Op {
    fn line(&self) -> Option<Vec<u8>> {
        let params = ["", " BODY=8BITMIME", " SMTPUTF8", " RET=HDRS", " SIZE=+1", " BODY=BINARYMIME"];
        let text = match self {
            Op::Ehlo => "EHLO client.example".to_string(),
            Op::Helo => "HELO client.example".to_string(),
            Op::Mail { local, size, params: p } => format!(
                "MAIL FROM:<{}> SIZE={size}{}",
                if *local { "a@example.test" } else { "a@remote.example" },
                params[usize::from(*p) % params.len()]
            ),
            Op::Rcpt { local } => {
                format!("RCPT TO:<{}>", if *local { "b@example.test" } else { "b@remote.example" })
            }
            Op::Data => "DATA".into(),
            Op::Bdat { size, last } => format!("BDAT {size}{}", if *last { " LAST" } else { "" }),
            Op::Rset => "RSET".into(),
            Op::StartTls => "STARTTLS".into(),
            Op::Auth => "AUTH PLAIN".into(),
            Op::Quit => "QUIT".into(),
            Op::TooLong => return None,
            Op::Line(l) => return Some(l.render()),
        };
        Some(text.into_bytes())
    }
}

/// How the driver's side goes: the upstream's (or the pipeline's) answer, and AUTH's outcome.
#[derive(Clone, Copy, Debug, TypeGenerator)]
enum Outcome {
    Accept,
    Tempfail,
    Refuse,
    Locked,
}

impl Outcome {
    fn reply(self) -> Reply {
        match self {
            Outcome::Accept => Reply::new(250, "2.0.0 ok"),
            Outcome::Tempfail | Outcome::Locked => Reply::new(451, "4.3.0 later"),
            Outcome::Refuse => Reply::new(550, "5.7.1 no"),
        }
    }
}

fn config(role: bool, auth: bool, max_errors: u8) -> SessionConfig {
    SessionConfig {
        hostname: "mx.test".into(),
        greeting: "ESMTP moat".into(),
        role: if role { Role::Submission } else { Role::Mx },
        mode: ListenerMode::Starttls,
        starttls: true,
        require_tls: false,
        max_message_size: 1000,
        max_recipients: 3,
        max_errors: u32::from(max_errors % 10) + 1,
        auth,
        auth_without_tls: true,
        local_domains: vec!["example.test".to_string()].into(),
    }
}

/// Any command sequence: no panic; DATA and BDAT chunks only with a recipient; no recipient outside the
/// local domains without AUTH; replies are well-formed; permanent failures close the session by the error
/// limit; the session ends by QUIT or the limits, never by a command it could not handle.
#[test]
fn session_sequences() {
    check!().with_iterations(5_000).with_type::<(bool, bool, u8, Vec<(Op, Outcome)>)>().for_each(
        |(submission, auth, max_errors, ops)| {
            let cfg = config(*submission, *auth, *max_errors);
            let max = cfg.max_errors;
            let mut s = Session::new(Arc::new(cfg), false);
            s.set_upstream_offers(UpstreamOffers { dsn: true, smtputf8: true });
            let mut permanent = 0u32;
            for (op, outcome) in ops {
                let step = match op.line() {
                    Some(l) => s.command(&l),
                    None => s.line_too_long(512),
                };
                let closed = drive(&mut s, step, *outcome, &mut permanent);
                assert!(permanent <= max, "{permanent} permanent failures with max_errors {max}");
                if closed {
                    return;
                }
            }
        },
    );
}

/// Carries out one step as the driver would; true when the session closed.
fn drive(s: &mut Session, step: Step, outcome: Outcome, permanent: &mut u32) -> bool {
    // Only what the session itself counts: its own permanent replies and refused MAIL/RCPT (a refused
    // message or BDAT chunk is counted, or not, by the driver).
    let mut count = |r: &Reply| {
        well_formed(r);
        *permanent += u32::from(r.is_permanent());
    };
    match step {
        Step::Reply(r) => count(&r),
        Step::Close(r, reason) => {
            count(&r);
            assert!(matches!(reason, CloseReason::Quit | CloseReason::TooManyErrors | CloseReason::AuthLocked));
            return true;
        }
        Step::StartTls => s.tls_started(),
        Step::Mail(m) => {
            assert!(s.envelope().is_none() && s.helo().is_some(), "MAIL requested out of sequence");
            let r = outcome.reply();
            count(&r);
            s.mail_done(m, &r);
        }
        Step::Rcpt(r) => {
            assert!(s.envelope().is_some(), "RCPT requested without MAIL");
            let domain = r.address.rsplit('@').next().unwrap_or("");
            assert!(s.user().is_some() || domain.eq_ignore_ascii_case("example.test"), "open relay: {r:?}");
            let reply = outcome.reply();
            count(&reply);
            s.rcpt_done(r, &reply);
        }
        Step::Data => {
            assert!(s.in_data() && s.envelope().is_some_and(|e| !e.rcpts.is_empty()), "DATA without recipients");
            finish_message(s);
        }
        Step::Bdat { refusal: Some(r), .. } => well_formed(&r),
        Step::Bdat { last, .. } => {
            assert!(s.envelope().is_some_and(|e| !e.rcpts.is_empty()), "BDAT chunk without recipients");
            match outcome {
                Outcome::Refuse => s.abort_transaction(),
                _ if last => finish_message(s),
                _ => {}
            }
        }
        Step::Auth { .. } => match outcome {
            Outcome::Accept => s.auth_done("alice".into()),
            Outcome::Locked => {
                let step = s.auth_locked();
                return drive(s, step, Outcome::Accept, permanent);
            }
            _ => {
                let step = s.auth_failed(Reply::new(535, "5.7.8 no"));
                return drive(s, step, Outcome::Accept, permanent);
            }
        },
    }
    if s.error_limit_reached() {
        // The driver answers 421 and closes.
        return true;
    }
    false
}

fn well_formed(r: &Reply) {
    assert!((200..600).contains(&r.code), "{r:?}");
    assert!(!r.lines.iter().any(|l| l.contains(['\r', '\n'])), "{r:?}");
}

fn finish_message(s: &mut Session) {
    s.message_done();
    assert!(s.envelope().is_none() && !s.in_data());
}
