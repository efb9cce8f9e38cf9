//! Releasing a quarantined message: the stored message and envelope go to the upstream from the
//! configuration, as the original client (XCLIENT or PROXY v2 with its address, HELO and login) or as moat
//! itself, and the outcome is recorded in the item's sidecar and in `releases.log` (one JSON line each, the
//! release audit trail).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::store::{blocking, sync_dir};
use super::{id, Meta, Store, StoreError};
use crate::config::Config;
use crate::smtp::command::{Body, MailFrom, RcptTo};
use crate::spool::SpoolBudget;
use crate::upstream::{ClientIdentity, Connection, UpstreamSettings};

/// The spool used to send a released message: small memory, the rest spills to a temporary file.
const RELEASE_MEMORY: u64 = 1024 * 1024;

/// One release, as recorded.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Released {
    pub id: String,
    pub date: String,
    /// Who ran the command (`$SUDO_USER`, `$USER`, or the uid).
    pub by: String,
    pub to: Vec<String>,
    /// Whether the upstream saw the original client (XCLIENT/PROXY) or moat.
    pub as_client: bool,
    /// The upstream's final reply (or why it failed), and the queue id it named.
    pub code: u16,
    pub reply: String,
    pub queue_id: Option<String>,
}

/// Releasing failed before the upstream accepted.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the quarantined message")]
    Read(#[source] std::io::Error),
    #[error("upstream")]
    Upstream(#[source] crate::upstream::UpstreamError),
    #[error("upstream settings")]
    Settings(#[source] crate::tls::TlsError),
    #[error("the upstream refused: {0}")]
    Refused(String),
    #[error("item {0:?} was already released; use --again to send it once more")]
    AlreadyReleased(String),
}

/// Who the upstream is told the client is.
fn identity(meta: &Meta) -> Option<ClientIdentity> {
    let ip = meta.client.ip.parse().ok()?;
    Some(ClientIdentity {
        peer: SocketAddr::new(ip, meta.client.port),
        local: SocketAddr::new(ip, 0),
        name: meta.client.name.clone(),
        name_temporarily_unavailable: false,
        helo: meta.client.helo.clone(),
        esmtp: meta.client.esmtp,
        login: meta.client.auth_user.clone(),
    })
}

/// Sends item `id` to the upstream of `config`, to `to` (or its original recipients), as the original
/// client unless `as_moat`. Holds the item's lock throughout, so a concurrent release, delete or expiry
/// waits. Records the outcome and returns it; `Err` when nothing was accepted.
pub async fn release(
    config: &Config,
    store: &Arc<Store>,
    item: &str,
    to: Option<&str>,
    as_moat: bool,
    again: bool,
) -> Result<Released, ReleaseError> {
    let (s, i) = (Arc::clone(store), item.to_string());
    let lock = blocking(move || s.lock(&i).map_err(std::io::Error::other)).await.map_err(ReleaseError::Read)?;
    let Some(_lock) = lock else { return Err(StoreError::NotFound(item.to_string()).into()) };
    let meta = store.get(item)?;
    let history = read_history(store, item);
    if !again && !history.is_empty() {
        return Err(ReleaseError::AlreadyReleased(item.to_string()));
    }
    let hostname = config.hostname();
    let settings = UpstreamSettings::from_config(&config.upstream, &hostname).map_err(ReleaseError::Settings)?;
    let ident = if as_moat { None } else { identity(&meta) };
    let rcpts: Vec<String> = to.map_or_else(|| meta.rcpts.clone(), |t| vec![t.to_string()]);
    let mut record = Released {
        id: item.to_string(),
        date: id::rfc3339(super::now_secs()),
        by: operator(),
        to: rcpts.clone(),
        as_client: ident.is_some(),
        ..Released::default()
    };
    let outcome = send(Arc::new(settings), ident.as_ref(), store, &meta, &rcpts).await;
    match &outcome {
        Ok(reply) => {
            record.code = reply.code;
            record.reply = reply.lines.join(" ");
            record.queue_id = crate::audit::queue_id_from_reply(&record.reply);
        }
        Err(e) => record.reply = crate::quarantine::cli::error_chain(e),
    }
    append_log(store, &record).map_err(ReleaseError::Read)?;
    match outcome {
        Ok(r) if r.is_positive() => Ok(record),
        Ok(r) => Err(ReleaseError::Refused(format!("{} {}", r.code, r.lines.join(" ")))),
        Err(e) => Err(e),
    }
}

/// The SMTP transaction of a release.
async fn send(
    settings: Arc<UpstreamSettings>,
    ident: Option<&ClientIdentity>,
    store: &Store,
    meta: &Meta,
    rcpts: &[String],
) -> Result<crate::smtp::Reply, ReleaseError> {
    let mut spool = SpoolBudget::new(RELEASE_MEMORY, RELEASE_MEMORY / 4, None).spool();
    let path = store.message_path(&meta.id);
    let mut file = tokio::fs::File::open(&path).await.map_err(ReleaseError::Read)?;
    let mut buf = vec![0u8; crate::spool::FILE_CHUNK];
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf).await.map_err(ReleaseError::Read)?;
        if n == 0 {
            break;
        }
        spool.write(&buf[..n]).await.map_err(ReleaseError::Read)?;
    }
    let up = ReleaseError::Upstream;
    let mut conn = Connection::connect(settings, ident).await.map_err(up)?;
    if let Some(ident) = ident {
        conn.introduce(ident).await.map_err(up)?;
    }
    let mail = MailFrom {
        address: meta.mail_from.clone(),
        size: Some(spool.len()),
        body: match meta.body.as_deref() {
            Some("8BITMIME") => Some(Body::EightBitMime),
            Some("7BIT") => Some(Body::SevenBit),
            _ => None,
        },
        smtputf8: meta.smtputf8,
        dsn: Vec::new(),
    };
    let reply = conn.mail(&mail, None).await.map_err(up)?;
    if !reply.is_positive() {
        return Ok(reply);
    }
    let mut accepted = 0;
    let mut last = reply;
    for r in rcpts {
        last = conn.rcpt(&RcptTo { address: r.clone(), dsn: Vec::new() }).await.map_err(up)?;
        accepted += usize::from(last.is_positive());
    }
    if accepted == 0 {
        let _ = conn.reset().await;
        return Ok(last);
    }
    let reply = conn.send_message(b"", &mut spool, None).await.map_err(up)?;
    conn.quit().await;
    Ok(reply)
}

/// The releases of `item` recorded so far.
pub fn read_history(store: &Store, item: &str) -> Vec<Released> {
    let Ok(text) = std::fs::read_to_string(store.dir().join("releases.log")) else { return Vec::new() };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Released>(l).ok())
        .filter(|r| r.id == item && (200..300).contains(&r.code))
        .collect()
}

/// Appends `record` to `releases.log` and syncs it.
fn append_log(store: &Store, record: &Released) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let path = store.dir().join("releases.log");
    let mut f = std::os::unix::fs::OpenOptionsExt::mode(std::fs::File::options().create(true).append(true), 0o640)
        .open(&path)?;
    f.write_all(&line)?;
    f.sync_all()?;
    sync_dir(store.dir())
}

/// Who runs the command: `$SUDO_USER`, `$USER`, else `uid N`.
fn operator() -> String {
    std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next());
        format!("uid {}", uid.unwrap_or("?"))
    })
}
