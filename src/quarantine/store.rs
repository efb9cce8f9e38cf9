//! The quarantine store on disk: `<id>.eml` (the message exactly as the client sent it, canonical CRLF)
//! and `<id>.json` (its [`Meta`] sidecar), both written under `tmp/` first, fsynced, then linked into place
//! (a link never replaces an existing file) and the directory fsynced. The sidecar goes last: an item is
//! listed only once both files are complete, and a crash leaves at most an orphan that the sweep removes.
//!
//! Several processes may use one directory at once (two moat instances, the `moat quarantine` command):
//! ids never collide, creation needs no lock, and whoever removes or releases an item holds an exclusive
//! `flock` on its sidecar, which the sweep honours (it skips items someone holds).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::id;
use super::retention::{self, Entry, Limits};
use crate::metrics::ExpiryReason;
use crate::spool::Spool;

/// Leftovers of an interrupted write (`tmp/` files, a message without its sidecar) older than this are
/// removed by the sweep; younger ones may still be being written.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no quarantined item {0:?}")]
    NotFound(String),
    #[error("invalid item id {0:?}")]
    BadId(String),
    #[error("quarantine item {id:?}: cannot read its sidecar")]
    Sidecar {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("quarantine directory {}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Who sent the message, as moat saw the client.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientFacts {
    pub listener: String,
    pub ip: String,
    pub port: u16,
    /// Forward-confirmed reverse DNS name.
    pub name: Option<String>,
    pub helo: Option<String>,
    /// EHLO rather than HELO.
    pub esmtp: bool,
    /// TLS version and cipher, when the session used TLS.
    pub tls: Option<String>,
    /// The SASL login, when the client authenticated.
    pub auth_user: Option<String>,
}

/// The sidecar: everything about a quarantined message but its bytes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub id: String,
    /// When it was stored, Unix seconds, and the same as RFC 3339 UTC.
    pub time: u64,
    pub date: String,
    /// Nanoseconds within `time`'s second: orders items stored in one second.
    #[serde(default)]
    pub nanos: u32,
    /// The moat instance (host name) that stored it.
    pub instance: String,
    pub client: ClientFacts,
    /// The envelope: MAIL FROM (empty for the null sender), its `BODY=` and `SMTPUTF8`, and the recipients
    /// the upstream had accepted.
    pub mail_from: String,
    pub body: Option<String>,
    pub smtputf8: bool,
    pub rcpts: Vec<String>,
    /// Ids of the rules that hit, in order.
    pub rules: Vec<String>,
    /// `quarantine` (held, not delivered) or `quarantine-deliver` (held and relayed).
    pub verdict: String,
    pub score: f64,
    /// Message size in bytes and its SHA-256 (hex), as stored.
    pub size: u64,
    pub sha256: String,
    pub message_id: Option<String>,
    pub subject: Option<String>,
}

/// The store.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
    instance: String,
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub items: usize,
    pub bytes: u64,
    pub expired_age: u64,
    pub expired_budget: u64,
}

impl Store {
    /// The store in `dir`, writing ids for `instance` (the host name).
    pub fn new(dir: impl Into<PathBuf>, instance: &str) -> Store {
        Store { dir: dir.into(), instance: instance.to_string() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, source: io::Error) -> StoreError {
        StoreError::Io { dir: self.dir.clone(), source }
    }

    /// The message file of `id`.
    pub fn message_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.eml"))
    }

    fn sidecar_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Stores the whole spooled message with `meta` (its `id`, `time`, `date`, `instance`, `size` and
    /// `sha256` are filled in here). Returns the new id once both files and the directory are on disk.
    pub async fn put(&self, mut meta: Meta, spool: &mut Spool) -> Result<String, StoreError> {
        let now = SystemTime::now();
        meta.id = id::new_id(&self.instance, now);
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        (meta.time, meta.nanos) = (since.as_secs(), since.subsec_nanos());
        meta.date = id::rfc3339(meta.time);
        meta.instance.clone_from(&self.instance);
        let (dir, id) = (self.dir.clone(), meta.id.clone());
        let tmp = dir.join("tmp").join(format!("{id}.eml"));
        let tmp2 = tmp.clone();
        let file = blocking(move || {
            private_dirs(tmp2.parent().unwrap_or(Path::new(".")))?;
            new_file(&tmp2)
        })
        .await
        .map_err(|e| self.io(e))?;
        let mut file = io::BufWriter::with_capacity(crate::spool::FILE_CHUNK, file);
        let written = copy_spool(spool, &mut file).await;
        let file = written.and_then(|(size, digest)| {
            meta.size = size;
            meta.sha256 = digest;
            file.into_inner().map_err(io::IntoInnerError::into_error)
        });
        let json = serde_json::to_vec_pretty(&meta).map_err(io::Error::other);
        let me = self.clone();
        let committed = blocking(move || match (file, json) {
            (Ok(file), Ok(json)) => me.commit(&id, file, &json, &tmp),
            (Err(e), _) | (_, Err(e)) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        });
        committed.await.map_err(|e| self.io(e))?;
        Ok(meta.id)
    }

    /// Syncs the message, links both files into place and syncs the directory (blocking). On failure
    /// nothing of the item stays.
    fn commit(&self, id: &str, file: File, json: &[u8], tmp: &Path) -> io::Result<()> {
        let (eml, side) = (self.message_path(id), self.sidecar_path(id));
        let tmp_json = tmp.with_extension("json");
        let result = (|| {
            file.sync_all()?;
            fs::hard_link(tmp, &eml)?;
            let mut j = new_file(&tmp_json)?;
            j.write_all(json)?;
            j.sync_all()?;
            fs::hard_link(&tmp_json, &side)?;
            sync_dir(&self.dir)
        })();
        let _ = fs::remove_file(tmp);
        let _ = fs::remove_file(&tmp_json);
        if result.is_err() {
            let _ = fs::remove_file(&side);
            let _ = fs::remove_file(&eml);
        }
        result
    }

    /// Every item's sidecar, oldest first (blocking). Unreadable sidecars are skipped with a warning.
    pub fn list(&self) -> Result<Vec<Meta>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else { continue };
            match self.get(id) {
                Ok(m) => out.push(m),
                Err(StoreError::NotFound(_)) => {} // removed meanwhile
                Err(e) => tracing::warn!(error = %e, "skipping unreadable quarantine item"),
            }
        }
        out.sort_by(|a, b| (a.time, a.nanos, &a.id).cmp(&(b.time, b.nanos, &b.id)));
        Ok(out)
    }

    /// The sidecar of `id` (blocking).
    pub fn get(&self, id: &str) -> Result<Meta, StoreError> {
        if !id::is_valid(id) {
            return Err(StoreError::BadId(id.to_string()));
        }
        let text = match fs::read(self.sidecar_path(id)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound(id.to_string())),
            Err(e) => return Err(self.io(e)),
        };
        serde_json::from_slice(&text).map_err(|source| StoreError::Sidecar { id: id.to_string(), source })
    }

    /// Takes the exclusive lock on `id` (blocking, waits for another holder). `None`: the item is gone.
    pub fn lock(&self, id: &str) -> Result<Option<File>, StoreError> {
        if !id::is_valid(id) {
            return Err(StoreError::BadId(id.to_string()));
        }
        let path = self.sidecar_path(id);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        f.lock().map_err(|e| self.io(e))?;
        // Whoever held it before may have removed the item: still the same file at the path?
        Ok(same_file(&f, &path).then_some(f))
    }

    /// Removes `id` (blocking): sidecar first, so it stops being listed, then the message. The caller
    /// holds its lock ([`Store::lock`]). Returns the bytes freed.
    pub fn remove_locked(&self, id: &str) -> Result<u64, StoreError> {
        let (side, eml) = (self.sidecar_path(id), self.message_path(id));
        let bytes = file_len(&side) + file_len(&eml);
        for p in [&side, &eml] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        sync_dir(&self.dir).map_err(|e| self.io(e))?;
        Ok(bytes)
    }

    /// Removes `id` under its lock (blocking). False when there was no such item.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        match self.lock(id)? {
            Some(_guard) => self.remove_locked(id).map(|_| true),
            None => Ok(false),
        }
    }

    /// Expires items by `limits` at `now` (blocking), skipping items someone holds, and removes leftovers
    /// of interrupted writes. Counts and logs what it removed; sets the size gauges.
    pub fn sweep(&self, now: u64, limits: Limits) -> Result<Swept, StoreError> {
        let items = self.list()?;
        let entries: Vec<Entry> = items
            .iter()
            .map(|m| Entry {
                time: m.time,
                nanos: m.nanos,
                bytes: file_len(&self.sidecar_path(&m.id)) + file_len(&self.message_path(&m.id)),
            })
            .collect();
        let mut swept = Swept { items: items.len(), bytes: entries.iter().map(|e| e.bytes).sum(), ..Swept::default() };
        for (i, reason) in retention::plan(&entries, now, limits) {
            let id = &items[i].id;
            let Ok(f) = File::open(self.sidecar_path(id)) else { continue };
            if f.try_lock().is_err() {
                continue; // someone is releasing or deleting it
            }
            let freed = self.remove_locked(id)?;
            swept.items -= 1;
            swept.bytes = swept.bytes.saturating_sub(freed);
            match reason {
                ExpiryReason::Age => swept.expired_age += 1,
                ExpiryReason::Budget => swept.expired_budget += 1,
            }
        }
        self.remove_orphans(now);
        crate::metrics::quarantine_expired(ExpiryReason::Age, swept.expired_age);
        crate::metrics::quarantine_expired(ExpiryReason::Budget, swept.expired_budget);
        crate::metrics::quarantine_size(swept.items, swept.bytes);
        if swept.expired_age + swept.expired_budget > 0 {
            tracing::info!(
                expired_age = swept.expired_age,
                expired_budget = swept.expired_budget,
                items = swept.items,
                bytes = swept.bytes,
                "quarantine items expired"
            );
        }
        Ok(swept)
    }

    /// Removes `tmp/` files and messages without a sidecar older than [`ORPHAN_AGE`] (best effort).
    fn remove_orphans(&self, now: u64) {
        let old = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .is_some_and(|t| now.saturating_sub(t.as_secs()) > ORPHAN_AGE.as_secs())
        };
        for (dir, orphan_only) in [(self.dir.join("tmp"), false), (self.dir.clone(), true)] {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let p = e.path();
                let orphan = p.extension().is_some_and(|x| x == "eml") && !p.with_extension("json").exists();
                if orphan_only && !orphan {
                    continue;
                }
                if old(&p) && fs::metadata(&p).is_ok_and(|m| m.is_file()) {
                    let _ = fs::remove_file(&p);
                }
            }
        }
    }
}

/// Writes the whole spooled message to `out`; returns its size and SHA-256 (hex). Writes go through the
/// page cache on the session's thread, as the spool's own do (src/spool.rs).
pub async fn copy_spool(spool: &mut Spool, out: &mut impl Write) -> io::Result<(u64, String)> {
    spool.rewind().await?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let (mut buf, mut pos, mut size) = (Vec::new(), 0u64, 0u64);
    while let Some(chunk) = spool.next_chunk(&mut buf, &mut pos).await? {
        ctx.update(chunk);
        out.write_all(chunk)?;
        size += chunk.len() as u64;
    }
    out.flush()?;
    Ok((size, data_encoding::HEXLOWER.encode(ctx.finish().as_ref())))
}

/// Runs blocking file work off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

/// Quarantined and archived mail is private: files `0640`, directories `0750` (the group can be given
/// to reviewers; others get nothing).
const FILE_MODE: u32 = 0o640;
const DIR_MODE: u32 = 0o750;

/// Creates a new file (never an existing one) readable by owner and group only.
pub fn new_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options().write(true).create_new(true).mode(FILE_MODE).open(path)
}

/// Creates `dir` and its missing parents, readable by owner and group only.
pub fn private_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// fsync of a directory, so a link or an unlink in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}
