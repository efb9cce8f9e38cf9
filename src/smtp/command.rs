//! SMTP command parsing (RFC 5321 4.1, with ESMTP parameters from RFC 1870, 3030, 3461, 6152, 6531).
//!
//! `parse` takes one command line without its CRLF and returns a [`Command`] or a [`SyntaxError`] that the
//! session turns into a `500`/`501`/`555` reply. It never panics on any input (a property test checks).
//!
//! We evaluated `smtp-proto` (by the mail-parser author) and wrote our own: moat must forward MAIL and RCPT
//! parameters to the upstream exactly as the client sent them (DSN `RET`/`ENVID`/`NOTIFY`/`ORCPT` pass
//! through), reject NUL and stray CR inside a line, and report which argument was wrong; the typed structs of
//! smtp-proto would have to be re-rendered for the upstream, which is where subtle changes creep in.

use std::fmt;

/// RFC 5321 4.5.3.1.1: local-part at most 64 octets.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 4.5.3.1.2: domain at most 255 octets.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 4.5.3.1.3: path at most 256 octets including the angle brackets.
pub const MAX_PATH: usize = 256;

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail(MailFrom),
    Rcpt(RcptTo),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    /// AUTH mechanism and optional initial response; handled once AUTH exists.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

/// `BODY=` values (RFC 6152; BINARYMIME is not offered, so not accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// An ESMTP parameter, kept as the client wrote it (keyword upper-cased) for forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub keyword: String,
    pub value: Option<String>,
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={}", self.keyword, v),
            None => f.write_str(&self.keyword),
        }
    }
}

/// `MAIL FROM:<reverse-path> [params]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailFrom {
    /// The address without brackets; empty for the null reverse-path `<>`.
    pub address: String,
    /// `SIZE=` declared by the client (RFC 1870).
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
    /// DSN parameters (`RET`, `ENVID`), forwarded to the upstream.
    pub dsn: Vec<Param>,
}

/// `RCPT TO:<forward-path> [params]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptTo {
    pub address: String,
    /// DSN parameters (`NOTIFY`, `ORCPT`), forwarded to the upstream.
    pub dsn: Vec<Param>,
}

/// Why a command line could not be parsed; the session picks the reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    /// Not a command we know: `500 5.5.1`.
    #[error("unknown command")]
    Unknown,
    /// Known command, bad arguments: `501 5.5.4`.
    #[error("{0}")]
    Arguments(&'static str),
    /// An ESMTP parameter we do not support: `555 5.5.4`.
    #[error("unsupported parameter {0}")]
    Parameter(String),
}

/// Parses one command line (without the trailing CRLF).
pub fn parse(line: &[u8]) -> Result<Command, SyntaxError> {
    if line.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
        return Err(SyntaxError::Arguments("control character in command line"));
    }
    let line = std::str::from_utf8(line).map_err(|_| SyntaxError::Arguments("command line is not UTF-8"))?;
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    if verb.len() > 8 {
        return Err(SyntaxError::Unknown);
    }
    // Upper-cased on the stack: no allocation per command (#15).
    let mut upper = [0u8; 8];
    let upper = &mut upper[..verb.len()];
    upper.copy_from_slice(verb.as_bytes());
    upper.make_ascii_uppercase();
    match &*upper {
        b"EHLO" => domain_arg(rest).map(Command::Ehlo),
        b"HELO" => domain_arg(rest).map(Command::Helo),
        b"MAIL" => mail(rest).map(Command::Mail),
        b"RCPT" => rcpt(rest).map(Command::Rcpt),
        b"DATA" => no_arg(rest, Command::Data),
        b"BDAT" => bdat(rest),
        b"RSET" => no_arg(rest, Command::Rset),
        b"NOOP" => Ok(Command::Noop), // RFC 5321 4.1.1.9: a parameter is allowed and ignored
        b"QUIT" => no_arg(rest, Command::Quit),
        b"VRFY" => Ok(Command::Vrfy),
        b"EXPN" => Ok(Command::Expn),
        b"HELP" => Ok(Command::Help),
        b"STARTTLS" => no_arg(rest, Command::StartTls),
        b"AUTH" => auth(rest),
        _ => Err(SyntaxError::Unknown),
    }
}

fn no_arg(rest: &str, cmd: Command) -> Result<Command, SyntaxError> {
    if rest.trim().is_empty() {
        Ok(cmd)
    } else {
        Err(SyntaxError::Arguments("no parameters allowed"))
    }
}

/// EHLO/HELO argument: a domain or an address literal. We are lenient (many clients send odd names) but
/// refuse empty names and characters that could break a header the name ends up in.
fn domain_arg(rest: &str) -> Result<String, SyntaxError> {
    let name = rest.trim();
    if name.is_empty() {
        return Err(SyntaxError::Arguments("host name required"));
    }
    if name.len() > MAX_DOMAIN || name.contains(' ') {
        return Err(SyntaxError::Arguments("invalid host name"));
    }
    if !name.chars().all(|c| c.is_alphanumeric() || "-._:[]".contains(c)) {
        return Err(SyntaxError::Arguments("invalid character in host name"));
    }
    Ok(name.to_string())
}

fn mail(rest: &str) -> Result<MailFrom, SyntaxError> {
    let rest = strip_keyword(rest, "FROM:").ok_or(SyntaxError::Arguments("expected MAIL FROM:<address>"))?;
    let (address, params) = path(rest, true)?;
    let mut mail = MailFrom { address, size: None, body: None, smtputf8: false, dsn: Vec::new() };
    for p in params {
        match p.keyword.as_str() {
            "SIZE" => {
                let v = p.value.as_deref().and_then(size_value);
                mail.size = Some(v.ok_or(SyntaxError::Arguments("invalid SIZE value"))?);
            }
            "BODY" => {
                mail.body = Some(match p.value.as_deref().map(str::to_ascii_uppercase).as_deref() {
                    Some("7BIT") => Body::SevenBit,
                    Some("8BITMIME") => Body::EightBitMime,
                    _ => return Err(SyntaxError::Parameter(p.to_string())),
                })
            }
            "SMTPUTF8" if p.value.is_none() => mail.smtputf8 = true,
            "RET" | "ENVID" if p.value.is_some() => mail.dsn.push(p),
            _ => return Err(SyntaxError::Parameter(p.to_string())),
        }
    }
    Ok(mail)
}

/// Largest `SIZE=` value by digit count (RFC 1870 4: `size-value ::= 1*20DIGIT`).
const MAX_SIZE_DIGITS: usize = 20;

/// RFC 1870 `size-value`: ASCII digits only (`str::parse` would also take a leading `+`), 1 to 20 of them. A
/// value above `u64::MAX` (possible with 20 digits) saturates: it is a valid size that no limit admits, so
/// the session answers `552`, not `501`.
fn size_value(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > MAX_SIZE_DIGITS || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.bytes().fold(0u64, |n, b| n.saturating_mul(10).saturating_add(u64::from(b - b'0'))))
}

fn rcpt(rest: &str) -> Result<RcptTo, SyntaxError> {
    let rest = strip_keyword(rest, "TO:").ok_or(SyntaxError::Arguments("expected RCPT TO:<address>"))?;
    let (address, params) = path(rest, false)?;
    if address.is_empty() {
        return Err(SyntaxError::Arguments("empty recipient"));
    }
    let mut dsn = Vec::new();
    for p in params {
        match p.keyword.as_str() {
            "NOTIFY" | "ORCPT" if p.value.is_some() => dsn.push(p),
            _ => return Err(SyntaxError::Parameter(p.to_string())),
        }
    }
    Ok(RcptTo { address, dsn })
}

fn bdat(rest: &str) -> Result<Command, SyntaxError> {
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .filter(|w| w.len() <= 19 && w.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|w| w.parse().ok())
        .ok_or(SyntaxError::Arguments("BDAT needs a chunk size"))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(SyntaxError::Arguments("expected BDAT size [LAST]")),
    };
    if words.next().is_some() {
        return Err(SyntaxError::Arguments("expected BDAT size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

fn auth(rest: &str) -> Result<Command, SyntaxError> {
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let mechanism = words.next().ok_or(SyntaxError::Arguments("AUTH needs a mechanism"))?.to_ascii_uppercase();
    let initial = words.next().map(str::to_string);
    if words.next().is_some() {
        return Err(SyntaxError::Arguments("expected AUTH mechanism [initial-response]"));
    }
    Ok(Command::Auth { mechanism, initial })
}

/// Case-insensitive `FROM:`/`TO:` with optional spaces around it (RFC 5321 forbids the space after the
/// colon, but many clients send it and every major MTA accepts it).
fn strip_keyword<'a>(rest: &'a str, kw: &str) -> Option<&'a str> {
    let rest = rest.trim_start();
    let head = rest.get(..kw.len())?;
    head.eq_ignore_ascii_case(kw).then(|| rest[kw.len()..].trim_start())
}

/// Parses `<path> params...`; returns the address (source route dropped) and the parameters.
fn path(rest: &str, allow_null: bool) -> Result<(String, Vec<Param>), SyntaxError> {
    let rest = rest.strip_prefix('<').ok_or(SyntaxError::Arguments("address must be in <>"))?;
    let end = closing_bracket(rest).ok_or(SyntaxError::Arguments("unterminated address"))?;
    let inner = &rest[..end];
    if inner.len() + 2 > MAX_PATH {
        return Err(SyntaxError::Arguments("address too long"));
    }
    let after = &rest[end + 1..];
    if !after.is_empty() && !after.starts_with(' ') {
        return Err(SyntaxError::Arguments("garbage after address"));
    }
    // RFC 5321 4.1.1.3 / C: a source route `@a,@b:` is accepted and ignored.
    let address = match inner.strip_prefix('@') {
        Some(r) => r.split_once(':').ok_or(SyntaxError::Arguments("bad source route"))?.1,
        None => inner,
    };
    if address.is_empty() {
        if !allow_null {
            return Err(SyntaxError::Arguments("empty address"));
        }
    } else {
        mailbox(address)?;
    }
    Ok((address.to_string(), params(after)?))
}

/// Finds the `>` closing the path, skipping quoted local-part content.
fn closing_bracket(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// A mailbox `local@domain`; the local part may be quoted.
fn mailbox(addr: &str) -> Result<(), SyntaxError> {
    let at = addr.rfind('@').ok_or(SyntaxError::Arguments("address needs a domain"))?;
    let (local, domain) = (&addr[..at], &addr[at + 1..]);
    if local.is_empty() || local.len() > MAX_LOCAL_PART {
        return Err(SyntaxError::Arguments("invalid local part"));
    }
    if !local.starts_with('"') && local.chars().any(|c| c.is_ascii_control() || " <>()[],;:@\\\"".contains(c)) {
        return Err(SyntaxError::Arguments("invalid character in local part"));
    }
    if domain.is_empty() || domain.len() > MAX_DOMAIN {
        return Err(SyntaxError::Arguments("invalid domain"));
    }
    let literal = domain.starts_with('[') && domain.ends_with(']');
    if !literal && !domain.chars().all(|c| c.is_alphanumeric() || c == '-' || c == '.') {
        return Err(SyntaxError::Arguments("invalid character in domain"));
    }
    Ok(())
}

fn params(s: &str) -> Result<Vec<Param>, SyntaxError> {
    let mut out = Vec::new();
    for word in s.split(' ').filter(|w| !w.is_empty()) {
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(SyntaxError::Arguments("invalid parameter"));
        }
        if out.len() >= 16 {
            return Err(SyntaxError::Arguments("too many parameters"));
        }
        out.push(Param { keyword: k.to_ascii_uppercase(), value: v.map(str::to_string) });
    }
    Ok(out)
}

/// A SASL mechanism moat offers (the AUTH command's first argument; the exchange is `auth::sasl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// From the AUTH command's (upper-cased) mechanism name.
    pub fn from_name(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "LOGIN" => Some(Mechanism::Login),
            _ => None,
        }
    }

    /// A stable label (metrics, audit).
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

#[cfg(test)]
mod tests;
