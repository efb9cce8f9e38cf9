//! The audit record types (schema version 1, `docs/audit.md`) and the small formatters they need.

use std::borrow::Cow;
use std::time::SystemTime;

use serde::Serialize;

use crate::timefmt;

/// The version every record carries in `v`; bumped on any incompatible change of the schema.
pub const SCHEMA_VERSION: u32 = 1;

/// The length of an RFC 3339 timestamp with milliseconds (until the year 9999).
const RFC3339_LEN: usize = 24;

/// One SMTP transaction (MAIL FROM to end of data, or to its abort). Fill it progressively: start from
/// [`TransactionRecord::new`] and set what is known. The strings the session already holds (ids, names,
/// addresses) are borrowed for the time it takes to write the record (`'a`), not copied.
#[derive(Clone, Debug, Serialize)]
pub struct TransactionRecord<'a> {
    /// Schema version, always [`SCHEMA_VERSION`].
    pub v: u32,
    /// Always `"transaction"`.
    #[serde(rename = "type")]
    pub record_type: &'static str,
    /// When the transaction ended (RFC 3339, UTC).
    pub ts: String,
    /// When the transaction started, at MAIL FROM (RFC 3339, UTC).
    pub start: String,
    /// The connection's id, as in the logs.
    pub conn_id: Cow<'a, str>,
    /// The transaction's id (also in moat's `Received` header).
    pub txn_id: Cow<'a, str>,
    /// The configured name of the listener.
    pub listener: Cow<'a, str>,
    /// The client's address.
    pub client_ip: String,
    /// The client's port.
    pub client_port: u16,
    /// The client's verified reverse DNS name, if looked up and found.
    pub client_name: Option<Cow<'a, str>>,
    /// The EHLO/HELO argument.
    pub helo: Option<Cow<'a, str>>,
    /// The TLS session with the client, if any.
    pub tls: Option<TlsRecord>,
    /// The authenticated user, if the client authenticated.
    pub auth_user: Option<Cow<'a, str>>,
    /// The MAIL FROM address (empty for the null sender `<>`).
    pub mail_from: Cow<'a, str>,
    /// Every RCPT TO, accepted or not, with moat's reply to it.
    pub rcpts: Vec<RcptRecord<'a>>,
    /// Message size in bytes as received (after dot-unstuffing), 0 when no data came.
    pub size: u64,
    /// The `Message-ID` header, if present.
    pub message_id: Option<String>,
    /// Hex SHA-256 of the `Subject` header (see [`digest`]); never the subject itself.
    pub subject_digest: Option<String>,
    /// Each pipeline stage that ran, in order.
    pub stages: Vec<StageRecord>,
    /// `"accepted"`, `"rejected"`, `"tempfailed"`, `"discarded"` or `"aborted"`.
    pub verdict: Cow<'static, str>,
    /// What moat told the client at the end of data (code 0 when the transaction was aborted).
    pub reply: ReplyRecord,
    /// The upstream's final reply to the message, when it was relayed.
    pub upstream: Option<UpstreamRecord>,
    /// From `start` to `ts`, in milliseconds.
    pub duration_ms: u64,
}

/// The TLS parameters of the client connection.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TlsRecord {
    /// `"TLSv1.2"` or `"TLSv1.3"`.
    pub version: String,
    /// The cipher suite, e.g. `"TLS13_AES_256_GCM_SHA384"`.
    pub cipher: String,
}

/// One recipient and moat's reply to its RCPT TO.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RcptRecord<'a> {
    /// The address as given in RCPT TO.
    pub address: Cow<'a, str>,
    /// The reply code the client got.
    pub reply_code: u16,
    /// The reply text (multi-line replies joined with a space).
    pub reply_text: String,
}

/// One stage's part in the verdict.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageRecord {
    /// The stage's name. Stage names, hooks and verdicts are `&'static str` in the pipeline, so a record
    /// borrows them instead of allocating three strings per stage and message.
    pub stage: Cow<'static, str>,
    /// The hook that ran (`"connect"`, `"mail"`, `"rcpt"`, `"data"`, ...).
    pub phase: Cow<'static, str>,
    /// Its verdict (`"continue"`, `"accept"`, `"reject"`, `"tempfail"`, ...).
    pub verdict: Cow<'static, str>,
    /// How long it took, in microseconds.
    pub micros: u64,
}

/// An SMTP reply.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplyRecord {
    /// The three-digit code.
    pub code: u16,
    /// The text, enhanced status code included (multi-line replies joined with a space).
    pub text: String,
}

/// The upstream's final reply to a relayed message.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UpstreamRecord {
    /// The three-digit code.
    pub code: u16,
    /// The text (multi-line replies joined with a space).
    pub text: String,
    /// The upstream's queue id, when its reply names one (see [`queue_id_from_reply`]).
    pub queue_id: Option<String>,
}

/// One AUTH attempt. Holds who tried and how it ended, never a password or any part of the SASL exchange.
#[derive(Clone, Debug, Serialize)]
pub struct AuthRecord {
    /// Schema version, always [`SCHEMA_VERSION`].
    pub v: u32,
    /// Always `"auth"`.
    #[serde(rename = "type")]
    pub record_type: &'static str,
    /// When the attempt ended (RFC 3339, UTC).
    pub ts: String,
    /// The connection's id, as in the logs.
    pub conn_id: String,
    /// The configured name of the listener.
    pub listener: String,
    /// The client's address.
    pub client_ip: String,
    /// The user name the client gave (empty if it gave none).
    pub user: String,
    /// The SASL mechanism, e.g. `"PLAIN"`.
    pub mechanism: String,
    /// `"success"`, `"failure"`, `"locked"` (refused by the brute-force lockout) or `"cancelled"`.
    pub result: String,
}

impl TransactionRecord<'_> {
    /// A record for a transaction that started at `start` and ends now: versioned, timestamped, the rest empty.
    pub fn new(start: SystemTime) -> Self {
        let now = SystemTime::now();
        TransactionRecord {
            v: SCHEMA_VERSION,
            record_type: "transaction",
            ts: rfc3339(now),
            start: rfc3339(start),
            conn_id: Cow::Borrowed(""),
            txn_id: Cow::Borrowed(""),
            listener: Cow::Borrowed(""),
            client_ip: String::new(),
            client_port: 0,
            client_name: None,
            helo: None,
            tls: None,
            auth_user: None,
            mail_from: Cow::Borrowed(""),
            rcpts: Vec::new(),
            size: 0,
            message_id: None,
            subject_digest: None,
            stages: Vec::new(),
            verdict: Cow::Borrowed(""),
            reply: ReplyRecord::default(),
            upstream: None,
            duration_ms: now.duration_since(start).unwrap_or_default().as_millis() as u64,
        }
    }
}

impl Default for TransactionRecord<'_> {
    /// A record that starts and ends now.
    fn default() -> Self {
        TransactionRecord::new(SystemTime::now())
    }
}

impl AuthRecord {
    /// A record for an attempt that ends now: versioned, timestamped, the rest empty.
    pub fn new() -> AuthRecord {
        AuthRecord {
            v: SCHEMA_VERSION,
            record_type: "auth",
            ts: rfc3339(SystemTime::now()),
            conn_id: String::new(),
            listener: String::new(),
            client_ip: String::new(),
            user: String::new(),
            mechanism: String::new(),
            result: String::new(),
        }
    }
}

impl Default for AuthRecord {
    fn default() -> Self {
        AuthRecord::new()
    }
}

// === helpers ===

/// Formats a time as RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T09:03:07.250Z`. Times before 1970
/// are clamped to the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    let mut s = String::with_capacity(RFC3339_LEN);
    timefmt::push_rfc3339(&mut s, t);
    s
}

/// Hex SHA-256 of `text` (lower-case, 64 characters): how a subject appears in the audit trail.
pub fn digest(text: &str) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * hash.as_ref().len());
    for b in hash.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// The queue id in an upstream's reply to the end of data: Postfix's `250 2.0.0 Ok: queued as 4XyZ123`,
/// and Exim's `250 OK id=1uAbCd-000123-Xy`. `None` when the reply names none.
pub fn queue_id_from_reply(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    ["queued as ", "id="].iter().find_map(|marker| {
        let at = lower.find(marker)? + marker.len();
        let id: String =
            text[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')).collect();
        (!id.is_empty() && id.len() <= 64).then_some(id)
    })
}
