//! SASL PLAIN (RFC 4616) and LOGIN decoding for SMTP AUTH (RFC 4954). Pure: lines in, challenges or
//! credentials out; no I/O, no verification.
//!
//! Nothing here logs, and neither [`Credentials`] nor [`Exchange`] prints its secret with `Debug`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::smtp::Reply;

/// Longest user name accepted (bytes); longer ones are refused before any lookup.
pub const MAX_USER: usize = 255;
/// Longest password accepted (bytes), so a huge password cannot make verification expensive.
pub const MAX_PASSWORD: usize = 1024;

pub use crate::smtp::command::Mechanism;

/// What the client claims: a user name and a password (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

/// Why an exchange failed; each maps to the reply the client gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("client cancelled the exchange")]
    Cancelled,
    #[error("response is not valid base64")]
    Base64,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

impl SaslError {
    /// The reply for this failure.
    pub fn reply(self) -> Reply {
        match self {
            SaslError::Cancelled => Reply::new(501, "5.7.0 Authentication cancelled"),
            SaslError::Base64 => Reply::new(501, "5.5.2 Cannot decode response"),
            SaslError::Malformed(what) => Reply::new(501, format!("5.5.2 Malformed authentication data: {what}")),
        }
    }
}

/// The next thing the driver must do.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslStep {
    /// Send this `334` challenge and feed the client's next line to [`Exchange::respond`].
    Challenge(Reply),
    /// The exchange is complete: verify these.
    Done(Credentials),
    /// The exchange failed: send the error's reply.
    Failed(SaslError),
}

/// One exchange in progress.
#[derive(Clone, PartialEq, Eq)]
pub enum Exchange {
    Plain,
    LoginUser,
    LoginPassword(String),
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Exchange::Plain => "Plain",
            Exchange::LoginUser => "LoginUser",
            Exchange::LoginPassword(_) => "LoginPassword",
        })
    }
}

impl Exchange {
    /// Starts an exchange for `AUTH mechanism [initial]`.
    pub fn start(mechanism: Mechanism, initial: Option<&str>) -> (Exchange, SaslStep) {
        let mut ex = match mechanism {
            Mechanism::Plain => Exchange::Plain,
            Mechanism::Login => Exchange::LoginUser,
        };
        let step = match initial {
            Some(line) => ex.respond(line.as_bytes()),
            None => ex.challenge(),
        };
        (ex, step)
    }

    fn challenge(&self) -> SaslStep {
        // RFC 4954 4: PLAIN starts with an empty challenge; LOGIN asks "Username:" then "Password:".
        let text = match self {
            Exchange::Plain => "",
            Exchange::LoginUser => "VXNlcm5hbWU6",
            Exchange::LoginPassword(_) => "UGFzc3dvcmQ6",
        };
        SaslStep::Challenge(Reply::new(334, text))
    }

    /// Feeds the client's response line (CRLF stripped).
    pub fn respond(&mut self, line: &[u8]) -> SaslStep {
        let data = match decode(line) {
            Ok(d) => d,
            Err(e) => return SaslStep::Failed(e),
        };
        match std::mem::replace(self, Exchange::Plain) {
            Exchange::Plain => match plain(&data) {
                Ok(c) => SaslStep::Done(c),
                Err(e) => SaslStep::Failed(e),
            },
            Exchange::LoginUser => match text(data, MAX_USER, "user name") {
                Ok(user) if !user.is_empty() => {
                    *self = Exchange::LoginPassword(user);
                    self.challenge()
                }
                Ok(_) => SaslStep::Failed(SaslError::Malformed("empty user name")),
                Err(e) => SaslStep::Failed(e),
            },
            Exchange::LoginPassword(user) => match text(data, MAX_PASSWORD, "password") {
                Ok(password) => SaslStep::Done(Credentials { user, password }),
                Err(e) => SaslStep::Failed(e),
            },
        }
    }
}

/// Decodes one response: `*` cancels (RFC 4954 4), `=` is an empty initial response.
fn decode(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    match line {
        b"*" => Err(SaslError::Cancelled),
        b"=" => Ok(Vec::new()),
        _ => STANDARD.decode(line).map_err(|_| SaslError::Base64),
    }
}

fn text(data: Vec<u8>, max: usize, what: &'static str) -> Result<String, SaslError> {
    if data.len() > max {
        return Err(SaslError::Malformed(if what == "password" { "password too long" } else { "user name too long" }));
    }
    if data.contains(&0) {
        return Err(SaslError::Malformed("NUL in response"));
    }
    String::from_utf8(data).map_err(|_| SaslError::Malformed("not UTF-8"))
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`; moat acts only as authcid, so an authzid must be empty or
/// the same name.
fn plain(data: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(authz), Some(authc), Some(pass)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed("expected authzid NUL authcid NUL passwd"));
    };
    if pass.contains(&0) {
        return Err(SaslError::Malformed("NUL in password"));
    }
    let user = text(authc.to_vec(), MAX_USER, "user name")?;
    let password = text(pass.to_vec(), MAX_PASSWORD, "password")?;
    if user.is_empty() {
        return Err(SaslError::Malformed("empty user name"));
    }
    if !authz.is_empty() && authz != authc {
        return Err(SaslError::Malformed("authorization identity differs from user"));
    }
    Ok(Credentials { user, password })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> String {
        STANDARD.encode(s)
    }

    fn creds(u: &str, p: &str) -> SaslStep {
        SaslStep::Done(Credentials { user: u.into(), password: p.into() })
    }

    #[test]
    fn plain_table() {
        let long_user = format!("\0{}\0pw", "u".repeat(MAX_USER + 1));
        let long_pass = format!("\0u\0{}", "p".repeat(MAX_PASSWORD + 1));
        let cases: Vec<(Vec<u8>, SaslStep)> = vec![
            (b"\0alice\0secret".to_vec(), creds("alice", "secret")),
            (b"alice\0alice\0secret".to_vec(), creds("alice", "secret")),
            (b"\0alice\0".to_vec(), creds("alice", "")),
            (b"\0alice\0p\xc3\xa4ss".to_vec(), creds("alice", "päss")),
            (
                b"bob\0alice\0secret".to_vec(),
                SaslStep::Failed(SaslError::Malformed("authorization identity differs from user")),
            ),
            (b"\0\0secret".to_vec(), SaslStep::Failed(SaslError::Malformed("empty user name"))),
            (
                b"alice\0secret".to_vec(),
                SaslStep::Failed(SaslError::Malformed("expected authzid NUL authcid NUL passwd")),
            ),
            (b"".to_vec(), SaslStep::Failed(SaslError::Malformed("expected authzid NUL authcid NUL passwd"))),
            (b"\0alice\0se\0cret".to_vec(), SaslStep::Failed(SaslError::Malformed("NUL in password"))),
            (b"\0al\xffice\0secret".to_vec(), SaslStep::Failed(SaslError::Malformed("not UTF-8"))),
            (long_user.into_bytes(), SaslStep::Failed(SaslError::Malformed("user name too long"))),
            (long_pass.into_bytes(), SaslStep::Failed(SaslError::Malformed("password too long"))),
        ];
        for (raw, want) in cases {
            let (_, got) = Exchange::start(Mechanism::Plain, Some(&b64(&raw)));
            assert_eq!(got, want, "{raw:?}");
        }
    }

    #[test]
    fn plain_without_initial_response() {
        let (mut ex, step) = Exchange::start(Mechanism::Plain, None);
        assert_eq!(step, SaslStep::Challenge(Reply::new(334, "")));
        assert_eq!(ex.respond(b64(b"\0a\0b").as_bytes()), creds("a", "b"));
    }

    #[test]
    fn login_exchange() {
        let (mut ex, step) = Exchange::start(Mechanism::Login, None);
        assert_eq!(step, SaslStep::Challenge(Reply::new(334, "VXNlcm5hbWU6")));
        assert_eq!(ex.respond(b64(b"alice").as_bytes()), SaslStep::Challenge(Reply::new(334, "UGFzc3dvcmQ6")));
        assert_eq!(ex.respond(b64(b"secret").as_bytes()), creds("alice", "secret"));
        // With the user name as initial response.
        let (mut ex, step) = Exchange::start(Mechanism::Login, Some(&b64(b"bob")));
        assert_eq!(step, SaslStep::Challenge(Reply::new(334, "UGFzc3dvcmQ6")));
        assert_eq!(ex.respond(b"="), creds("bob", ""));
    }

    #[test]
    fn hostile_and_cancelled() {
        let table: &[(&[u8], SaslError)] = &[
            (b"*", SaslError::Cancelled),
            (b"not base64!", SaslError::Base64),
            (b"AAA", SaslError::Base64),
            (b"\x00\xff", SaslError::Base64),
            (b"YWxp Y2U=", SaslError::Base64),
        ];
        for (line, want) in table {
            for mech in [Mechanism::Plain, Mechanism::Login] {
                let (mut ex, _) = Exchange::start(mech, None);
                assert_eq!(ex.respond(line), SaslStep::Failed(*want), "{mech:?} {line:?}");
            }
        }
        let (mut ex, _) = Exchange::start(Mechanism::Login, None);
        assert_eq!(ex.respond(b"="), SaslStep::Failed(SaslError::Malformed("empty user name")));
        let (mut ex, _) = Exchange::start(Mechanism::Login, None);
        let _ = ex.respond(b64(b"alice").as_bytes());
        assert_eq!(ex.respond(b"*"), SaslStep::Failed(SaslError::Cancelled));
        assert_eq!(SaslError::Cancelled.reply().to_string(), "501 5.7.0 Authentication cancelled");
        assert_eq!(SaslError::Base64.reply().code, 501);
        assert!(SaslError::Base64.reply().to_string().starts_with("501 5.5.2"));
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = Credentials { user: "alice".into(), password: "hunter2".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
        let ex = Exchange::LoginPassword("alice".into());
        assert!(!format!("{ex:?}").contains("alice"));
    }
}
