//! `directory` mode: `<directory>/YYYY-MM-DD/<id>.eml.gz` (the whole message, gzip) and `<id>.json` (its
//! envelope, client facts and rules, the quarantine sidecar's format), written under `tmp/`, synced, linked
//! into place and the folders synced before the message goes upstream. Compression runs on the blocking
//! pool, fed through a small bounded channel, so neither memory nor the async threads grow with the size.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use flate2::write::GzEncoder;
use flate2::Compression;
use tokio_util::sync::CancellationToken;

use crate::config::archive::ArchiveConfig;
use crate::metrics::ExpiryReason;
use crate::quarantine::id;
use crate::quarantine::retention::{self, Entry, Limits};
use crate::quarantine::store::{blocking, new_file, private_dirs, sync_dir};
use crate::spool::Spool;

/// The envelope sidecar: the quarantine store's [`crate::quarantine::Meta`] (`verdict` is `accepted`).
pub type Envelope = crate::quarantine::Meta;

/// Chunks in flight between the session and the compressor (each up to the spool's read block).
const CHANNEL_CHUNKS: usize = 4;

/// gzip level: 3 compresses mail text to about a quarter at well over 100 MB/s per core, the same order as
/// the relay itself; higher levels cost several times the CPU for a few percent.
const LEVEL: u32 = 3;

/// The archive directory.
#[derive(Clone, Debug)]
pub struct ArchiveDir {
    root: PathBuf,
    instance: String,
}

/// One written copy, to remove again if the upstream refuses the message.
#[derive(Clone, Debug)]
pub struct Written {
    pub message: PathBuf,
    pub sidecar: PathBuf,
}

impl ArchiveDir {
    /// The archive in `root`; `instance` names this moat in file names.
    pub fn new(root: PathBuf, instance: &str) -> ArchiveDir {
        ArchiveDir { root, instance: instance.to_string() }
    }

    /// Writes the whole spooled message with `env` (its id, time and size are filled in here); returns the
    /// files once they and their folders are on disk.
    pub async fn write(&self, mut env: Envelope, spool: &mut Spool) -> io::Result<Written> {
        let now = SystemTime::now();
        env.id = id::new_id(&self.instance, now);
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        (env.time, env.nanos) = (since.as_secs(), since.subsec_nanos());
        env.date = id::rfc3339(env.time);
        env.instance.clone_from(&self.instance);
        let (y, m, d, ..) = id::utc(env.time);
        let day = self.root.join(format!("{y:04}-{m:02}-{d:02}"));
        let tmp = self.root.join("tmp").join(format!("{}.eml.gz", env.id));
        let written =
            Written { message: day.join(format!("{}.eml.gz", env.id)), sidecar: day.join(format!("{}.json", env.id)) };
        let result = self.write_files(&mut env, spool, &tmp, &written).await;
        let (t1, t2) = (tmp.clone(), tmp.with_extension("json"));
        let _ = blocking(move || {
            let _ = fs::remove_file(t1);
            let _ = fs::remove_file(t2);
            Ok(())
        })
        .await;
        if result.is_err() {
            remove(written.clone()).await;
        }
        result.map(|()| written)
    }

    async fn write_files(&self, env: &mut Envelope, spool: &mut Spool, tmp: &Path, out: &Written) -> io::Result<()> {
        let (tmp2, day) = (tmp.to_path_buf(), out.message.parent().map(Path::to_path_buf).unwrap_or_default());
        let file = blocking(move || {
            private_dirs(tmp2.parent().unwrap_or(Path::new(".")))?;
            private_dirs(&day)?;
            new_file(&tmp2)
        })
        .await?;
        let (size, digest) = compress(file, spool).await?;
        env.size = size;
        env.sha256 = digest;
        let json = serde_json::to_vec_pretty(&*env).map_err(io::Error::other)?;
        let (tmp, out, root) = (tmp.to_path_buf(), out.clone(), self.root.clone());
        blocking(move || {
            fs::hard_link(&tmp, &out.message)?;
            let tmp_json = tmp.with_extension("json");
            let mut j = new_file(&tmp_json)?;
            j.write_all(&json)?;
            j.sync_all()?;
            fs::hard_link(&tmp_json, &out.sidecar)?;
            if let Some(day) = out.message.parent() {
                sync_dir(day)?;
            }
            sync_dir(&root)
        })
        .await
    }

    /// Starts the retention sweep (every `sweep_interval`, until `shutdown`).
    pub fn spawn_sweeper(&self, config: &ArchiveConfig, shutdown: CancellationToken) {
        let limits = Limits { max_age: config.retention.get().as_secs(), max_bytes: config.max_size.bytes() };
        let me = self.clone();
        crate::watch::spawn_sweep("archive", config.sweep_interval.get(), shutdown, move || {
            me.sweep(crate::quarantine::now_secs(), limits)
        });
    }

    /// Expires copies by `limits` at `now` (blocking): oldest first, counted and logged. Returns
    /// (files left, bytes left).
    pub fn sweep(&self, now: u64, limits: Limits) -> io::Result<(usize, u64)> {
        let mut copies = Vec::new();
        for day in read_dir(&self.root)? {
            if day.file_name().is_none_or(|n| n == "tmp") || !day.is_dir() {
                continue;
            }
            for p in read_dir(&day)? {
                if p.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                let Ok(env) = serde_json::from_slice::<Envelope>(&fs::read(&p)?) else { continue };
                let gz = p.with_extension("eml.gz");
                let bytes = file_len(&p) + file_len(&gz);
                copies.push((Entry { time: env.time, nanos: env.nanos, bytes }, p, gz));
            }
        }
        let entries: Vec<Entry> = copies.iter().map(|c| c.0).collect();
        let (mut left, mut bytes) = (copies.len(), entries.iter().map(|e| e.bytes).sum::<u64>());
        let (mut age, mut budget) = (0, 0);
        for (i, reason) in retention::plan(&entries, now, limits) {
            let (e, side, gz) = &copies[i];
            fs::remove_file(side)?;
            let _ = fs::remove_file(gz);
            left -= 1;
            bytes -= e.bytes;
            match reason {
                ExpiryReason::Age => age += 1,
                ExpiryReason::Budget => budget += 1,
            }
        }
        crate::metrics::archive_expired(ExpiryReason::Age, age);
        crate::metrics::archive_expired(ExpiryReason::Budget, budget);
        crate::metrics::archive_size(bytes);
        if age + budget > 0 {
            tracing::info!(expired_age = age, expired_budget = budget, files = left, bytes, "archive copies expired");
        }
        Ok((left, bytes))
    }
}

/// Compresses the spooled message into `file` on the blocking pool and syncs it; returns the message's
/// size and SHA-256 (hex).
async fn compress(file: File, spool: &mut Spool) -> io::Result<(u64, String)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
    let writer = tokio::task::spawn_blocking(move || -> io::Result<(u64, String)> {
        let mut gz = GzEncoder::new(BufWriter::with_capacity(crate::spool::FILE_CHUNK, file), Compression::new(LEVEL));
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut size = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            ctx.update(&chunk);
            gz.write_all(&chunk)?;
            size += chunk.len() as u64;
        }
        let file = gz.finish()?.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        Ok((size, data_encoding::HEXLOWER.encode(ctx.finish().as_ref())))
    });
    let fed = feed(&tx, spool).await;
    drop(tx);
    let written = writer.await.map_err(io::Error::other)?;
    fed?;
    written
}

/// Sends the spooled message to the compressor, chunk by chunk.
async fn feed(tx: &tokio::sync::mpsc::Sender<Vec<u8>>, spool: &mut Spool) -> io::Result<()> {
    spool.rewind().await?;
    let (mut buf, mut pos) = (Vec::new(), 0u64);
    while let Some(chunk) = spool.next_chunk(&mut buf, &mut pos).await? {
        if tx.send(chunk.to_vec()).await.is_err() {
            break; // the writer failed; its error is reported
        }
    }
    Ok(())
}

/// Removes a written copy (the upstream refused the message, or the write failed half-way).
pub async fn remove(w: Written) {
    let _ = blocking(move || {
        let _ = fs::remove_file(&w.sidecar);
        let _ = fs::remove_file(&w.message);
        if let Some(day) = w.message.parent() {
            let _ = sync_dir(day);
        }
        Ok(())
    })
    .await;
}

fn read_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd.filter_map(|e| e.ok().map(|e| e.path())).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolBudget;

    async fn write(dir: &ArchiveDir, text: &str) -> Written {
        let mut spool = SpoolBudget::new(1 << 20, 1 << 20, None).spool();
        spool.write(text.as_bytes()).await.unwrap();
        dir.write(Envelope { mail_from: "a@example.org".into(), ..Envelope::default() }, &mut spool).await.unwrap()
    }

    #[tokio::test]
    async fn copies_expire_by_age_then_budget() {
        let root = tempfile::tempdir().unwrap();
        let dir = ArchiveDir::new(root.path().to_path_buf(), "mx.test");
        let a = write(&dir, "Subject: a\r\n\r\nold\r\n").await;
        let b = write(&dir, "Subject: b\r\n\r\nmiddle\r\n").await;
        let c = write(&dir, "Subject: c\r\n\r\nnew\r\n").await;
        // `a` is 40 days old.
        let mut env: Envelope = serde_json::from_slice(&fs::read(&a.sidecar).unwrap()).unwrap();
        env.time -= 40 * 86_400;
        fs::write(&a.sidecar, serde_json::to_vec(&env).unwrap()).unwrap();
        let now = crate::quarantine::now_secs();
        let (left, _) = dir.sweep(now, Limits { max_age: 30 * 86_400, max_bytes: 0 }).unwrap();
        assert_eq!(left, 2);
        assert!(!a.sidecar.exists() && !a.message.exists() && b.message.exists());
        let one = file_len(&c.sidecar) + file_len(&c.message);
        let (left, bytes) = dir.sweep(now, Limits { max_age: 0, max_bytes: one + one / 2 }).unwrap();
        assert_eq!(left, 1);
        assert!(bytes <= one + one / 2 && !b.message.exists() && c.message.exists(), "the oldest goes first");
    }
}
