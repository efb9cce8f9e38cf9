//! Where message data waits for its verdict, with bounded memory.
//!
//! A message is held in memory up to `spool.memory_threshold`; past that (or when the global
//! `spool.memory_budget` shared by all sessions is used up) it spills to a private temporary file that is
//! unlinked from the moment it is created (`O_TMPFILE` / `tempfile::tempfile_in`), so nothing is left on disk
//! if moat dies and no other process can open it. Memory per session therefore stays bounded whatever the
//! message size. The spool stores canonical, unstuffed message bytes; the relay re-stuffs them.
//!
//! Spill files are written and read with plain positioned system calls on the session's own thread, in
//! 256 KiB blocks, rather than through `tokio::fs` (which sends every call through the blocking pool: two
//! thread wake-ups per 64 KiB, measured at about a fifth of moat's CPU time relaying 1 MiB messages). These
//! calls hit the page cache of a private file and return in microseconds, the same trade nginx makes for its
//! proxy temp files; the spill directory (`spool.directory`) belongs on a local disk. Creating the file,
//! which touches the directory, still runs on the blocking pool.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Granularity of memory reservations against the budget, in bytes.
const BUDGET_UNIT: usize = 1024;
/// Memory is reserved in steps of this many units (64 KiB), so the semaphore is not touched per write.
const RESERVE_STEP: u32 = 64;
/// How often a waiting [`SpoolBudget::reserve`] looks for room again.
const RESERVE_POLL: std::time::Duration = std::time::Duration::from_millis(10);
/// The size of the pieces the relay sends upstream (and of its write buffer).
pub const FILE_CHUNK: usize = 64 * 1024;
/// Write buffer in front of a spill file, and the read size when relaying a spilled message: large blocks,
/// few system calls.
const SPILL_BLOCK: usize = 256 * 1024;

/// The global memory budget for spooled messages, shared by all sessions.
#[derive(Clone, Debug)]
pub struct SpoolBudget {
    sem: Arc<Semaphore>,
    /// The whole budget in units, to report what is in use.
    units: usize,
    threshold: usize,
    dir: Option<PathBuf>,
    /// Bytes in spill files now, across all sessions, and the most they may hold.
    disk: Arc<AtomicU64>,
    disk_budget: u64,
}

impl SpoolBudget {
    /// A budget of `budget` bytes; each message keeps at most `threshold` bytes in memory; spill files go to
    /// `dir` (or the system temporary directory).
    pub fn new(budget: u64, threshold: u64, dir: Option<PathBuf>) -> SpoolBudget {
        let units = (budget / BUDGET_UNIT as u64).min(u64::from(u32::MAX >> 3)) as usize;
        SpoolBudget {
            sem: Arc::new(Semaphore::new(units)),
            units,
            threshold: threshold as usize,
            dir,
            disk: Arc::new(AtomicU64::new(0)),
            disk_budget: u64::MAX,
        }
    }

    /// Caps the bytes all spill files together may hold (`spool.disk_budget`): a write past it fails like
    /// a full disk (the message is answered `452 4.3.1`), before the disk itself is full.
    pub fn with_disk_budget(mut self, bytes: u64) -> SpoolBudget {
        self.disk_budget = bytes;
        self
    }

    /// Bytes in spill files now.
    pub fn on_disk(&self) -> u64 {
        self.disk.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes of the disk budget; false (and nothing taken) when that would exceed it.
    fn take_disk(&self, n: u64) -> bool {
        let budget = self.disk_budget;
        let taken = self.disk.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(n).filter(|&total| total <= budget)
        });
        if taken.is_ok() {
            crate::metrics::spool_disk(self.on_disk());
        }
        taken.is_ok()
    }

    fn give_disk(&self, n: u64) {
        self.disk.fetch_sub(n, Ordering::AcqRel);
        crate::metrics::spool_disk(self.on_disk());
    }

    /// Bytes of the budget not reserved right now.
    pub fn available(&self) -> usize {
        self.sem.available_permits() * BUDGET_UNIT
    }

    /// Bytes of the budget reserved right now.
    pub fn in_use(&self) -> usize {
        (self.units - self.sem.available_permits()) * BUDGET_UNIT
    }

    /// An empty spool for one message.
    pub fn spool(&self) -> Spool {
        Spool { budget: self.clone(), mem: Vec::new(), permit: None, file: None, len: 0, on_disk: 0 }
    }
}

/// One message's bytes.
#[derive(Debug)]
pub struct Spool {
    budget: SpoolBudget,
    /// In memory: the whole message. Spilled: the write buffer in front of the file.
    mem: Vec<u8>,
    /// The memory reserved against the budget for `mem`.
    permit: Option<OwnedSemaphorePermit>,
    file: Option<File>,
    len: u64,
    /// Bytes of the disk budget this spool's file holds.
    on_disk: u64,
}

impl Spool {
    /// Total bytes written.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the budget this spool holds now (its in-memory copy of the message; 0 once spilled).
    pub fn reserved(&self) -> u64 {
        (self.permit.as_ref().map_or(0, |p| p.num_permits()) * BUDGET_UNIT) as u64
    }

    /// Whether the message spilled to disk.
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.len += data.len() as u64;
        if self.file.is_some() {
            self.mem.extend_from_slice(data);
            if self.mem.len() >= SPILL_BLOCK {
                self.flush_buffer().await?;
            }
            return Ok(());
        }
        let want = self.mem.len() + data.len();
        if want <= self.budget.threshold && self.reserve(want) {
            self.mem.extend_from_slice(data);
            return Ok(());
        }
        self.spill().await?;
        self.mem.extend_from_slice(data);
        if self.mem.len() >= SPILL_BLOCK {
            self.flush_buffer().await?;
        }
        Ok(())
    }

    /// Lets `fill` append at most `max` bytes straight into the spool's own buffer, saving the copy through
    /// [`Spool::write`]: in memory when `max` more bytes fit under the threshold and the budget, else into a
    /// spill file's write buffer (call [`Spool::settle`] afterwards). Returns `None`, without calling
    /// `fill`, when the bytes might not fit in memory and the spool has not spilled yet: use `write`, which
    /// spills. A `fill` that appends more than `max` is a bug; in memory the extra bytes are still counted.
    pub fn append_direct<R>(&mut self, max: usize, fill: impl FnOnce(&mut Vec<u8>) -> R) -> Option<R> {
        if self.file.is_none() {
            let want = self.mem.len().saturating_add(max);
            if want > self.budget.threshold || !self.reserve(want) {
                return None;
            }
        }
        let before = self.mem.len();
        // Room for the usual case (about as many bytes out as in) in one allocation, not a doubling series.
        self.mem.reserve(max / 2);
        let r = fill(&mut self.mem);
        debug_assert!(self.mem.len() - before <= max, "append_direct: more than announced");
        self.len += (self.mem.len() - before) as u64;
        Some(r)
    }

    /// After [`Spool::append_direct`]: writes a spill file's buffer out once it holds a block.
    pub async fn settle(&mut self) -> io::Result<()> {
        if self.file.is_some() && self.mem.len() >= SPILL_BLOCK {
            self.flush_buffer().await?;
        }
        Ok(())
    }

    /// Makes sure `want` bytes are reserved against the budget; false when the budget is exhausted.
    fn reserve(&mut self, want: usize) -> bool {
        let have = self.reserved() as usize;
        if want <= have {
            return true;
        }
        let missing = (want - have).div_ceil(BUDGET_UNIT) as u32;
        let step = missing.max(RESERVE_STEP);
        match self.budget.sem.clone().try_acquire_many_owned(step) {
            Ok(p) => {
                match &mut self.permit {
                    Some(old) => old.merge(p),
                    None => self.permit = Some(p),
                }
                crate::metrics::spool_memory(self.budget.in_use());
                true
            }
            Err(_) => false,
        }
    }

    /// Moves what is in memory into a fresh unlinked file and gives the memory back to the budget.
    async fn spill(&mut self) -> io::Result<()> {
        let dir = self.budget.dir.clone();
        let file = tokio::task::spawn_blocking(move || match dir {
            Some(d) => tempfile::tempfile_in(d),
            None => tempfile::tempfile(),
        })
        .await
        .map_err(io::Error::other)??;
        self.file = Some(file);
        crate::metrics::spool_spilled();
        self.flush_buffer().await?;
        self.mem = Vec::with_capacity(SPILL_BLOCK);
        self.permit = None;
        Ok(())
    }

    async fn flush_buffer(&mut self) -> io::Result<()> {
        if let Some(f) = &mut self.file {
            let n = self.mem.len() as u64;
            if !self.budget.take_disk(n) {
                crate::metrics::limit_hit(crate::metrics::Limit::SpoolDiskBudget);
                return Err(io::Error::new(io::ErrorKind::StorageFull, "spool.disk_budget is used up"));
            }
            self.on_disk += n;
            // The file is opened for appending only by us; writes go at its end.
            f.write_all(&self.mem)?;
            self.mem.clear();
        }
        Ok(())
    }

    /// Prepares for reading from the start: writes out what a spill file's buffer still holds. Reads are
    /// positioned ([`Spool::next_chunk`] takes the offset), so nothing needs seeking.
    pub async fn rewind(&mut self) -> io::Result<()> {
        self.flush_buffer().await
    }

    /// Reads the next chunk after [`Spool::rewind`]; `Ok(None)` at the end. In memory, the whole message is
    /// one chunk.
    pub async fn next_chunk<'a>(&'a mut self, buf: &'a mut Vec<u8>, pos: &mut u64) -> io::Result<Option<&'a [u8]>> {
        if *pos >= self.len {
            return Ok(None);
        }
        match &mut self.file {
            None => {
                *pos = self.len;
                Ok(Some(&self.mem[..]))
            }
            Some(f) => {
                buf.resize(SPILL_BLOCK, 0);
                let n = f.read_at(buf, *pos)?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "spool file shorter than written"));
                }
                *pos += n as u64;
                Ok(Some(&buf[..n]))
            }
        }
    }

    /// The first bytes of the message held in memory (up to the threshold), e.g. to read its header section
    /// when the message did not spill.
    pub fn memory(&self) -> Option<&[u8]> {
        self.file.is_none().then_some(&self.mem[..])
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if self.on_disk > 0 {
            self.budget.give_disk(self.on_disk);
        }
        if self.permit.take().is_some() {
            // the permit returns itself to the semaphore when dropped; just refresh the gauge
            crate::metrics::spool_memory(self.budget.in_use());
        }
    }
}

// === budget accounting outside a spool ===

/// Memory reserved against the budget for something other than a spool (the content scan's copy of a
/// message and its parse), given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    budget: SpoolBudget,
}

impl SpoolBudget {
    /// The whole budget in bytes.
    pub fn capacity(&self) -> u64 {
        (self.units * BUDGET_UNIT) as u64
    }

    /// Reserves `bytes`, waiting up to `wait` for other messages to give memory back. `None` when the
    /// budget does not free up in time, or `bytes` is more than the whole budget.
    pub async fn reserve(&self, bytes: u64, wait: std::time::Duration) -> Option<Reservation> {
        let units = bytes.div_ceil(BUDGET_UNIT as u64);
        if units > self.units as u64 {
            return None;
        }
        let units = u32::try_from(units).ok()?;
        // Polls instead of queueing in the semaphore: a queued waiter takes every permit released until its
        // whole request fits, so one large scan waiting would starve every small one and make every new
        // spool spill. Polling lets small requests through; a large one gives up after `wait`.
        let deadline = tokio::time::Instant::now() + wait;
        let permit = loop {
            match self.sem.clone().try_acquire_many_owned(units) {
                Ok(p) => break p,
                Err(_) if tokio::time::Instant::now() >= deadline => return None,
                Err(_) => tokio::time::sleep(RESERVE_POLL).await,
            }
        };
        crate::metrics::spool_memory(self.in_use());
        Some(Reservation { permit: Some(permit), budget: self.clone() })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        drop(self.permit.take());
        crate::metrics::spool_memory(self.budget.in_use());
    }
}

#[cfg(test)]
mod reservation_tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn reservations_share_the_budget_with_spools() {
        let b = SpoolBudget::new(256 * 1024, 256 * 1024, None);
        assert_eq!(b.capacity(), 256 * 1024);
        let mut s = b.spool();
        s.write(&[b'a'; 100 * 1024]).await.unwrap();
        assert!(!s.spilled());
        let r = b.reserve(100 * 1024, Duration::ZERO).await.expect("room for 100 KiB");
        assert!(b.reserve(100 * 1024, Duration::ZERO).await.is_none(), "the spool and the first reservation hold it");
        assert!(b.reserve(300 * 1024, Duration::from_secs(60)).await.is_none(), "more than the budget, at once");
        drop(r);
        assert!(b.reserve(100 * 1024, Duration::ZERO).await.is_some());
        drop(s);
        assert_eq!(b.available(), 256 * 1024);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(s: &mut Spool) -> Vec<u8> {
        s.rewind().await.unwrap();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut pos = 0;
        while let Some(c) = s.next_chunk(&mut buf, &mut pos).await.unwrap() {
            out.extend_from_slice(c);
        }
        out
    }

    #[tokio::test]
    async fn small_stays_in_memory() {
        let b = SpoolBudget::new(1 << 20, 4096, None);
        let mut s = b.spool();
        s.write(b"hello ").await.unwrap();
        s.write(b"world").await.unwrap();
        assert!(!s.spilled());
        assert!(b.available() < 1 << 20);
        assert_eq!(read_all(&mut s).await, b"hello world");
        drop(s);
        assert_eq!(b.available(), 1 << 20);
    }

    #[tokio::test]
    async fn large_spills_and_reads_back() {
        let b = SpoolBudget::new(1 << 20, 4096, None);
        let mut s = b.spool();
        let mut expect = Vec::new();
        for i in 0..5000u32 {
            let line = format!("line {i} {}\r\n", "x".repeat((i % 97) as usize));
            s.write(line.as_bytes()).await.unwrap();
            expect.extend_from_slice(line.as_bytes());
        }
        assert!(s.spilled());
        assert_eq!(s.len(), expect.len() as u64);
        assert_eq!(b.available(), 1 << 20, "spilled spool holds no budget");
        assert_eq!(read_all(&mut s).await, expect);
    }

    #[tokio::test]
    async fn spill_files_share_a_disk_budget() {
        let b = SpoolBudget::new(64 * 1024, 4096, None).with_disk_budget(SPILL_BLOCK as u64 * 2);
        let block = vec![b'x'; SPILL_BLOCK];
        let mut first = b.spool();
        first.write(&block).await.unwrap();
        first.rewind().await.unwrap();
        assert!(first.spilled());
        assert_eq!(b.on_disk(), SPILL_BLOCK as u64);
        let mut second = b.spool();
        second.write(&block).await.unwrap();
        let err = second.write(&block).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        assert_eq!(b.on_disk(), 2 * SPILL_BLOCK as u64, "a refused write takes nothing");
        drop(first);
        drop(second);
        assert_eq!(b.on_disk(), 0, "dropped spools give their bytes back");
    }

    #[tokio::test]
    async fn exhausted_budget_spills_at_once() {
        let b = SpoolBudget::new(64 * 1024, 1 << 20, None);
        let mut first = b.spool();
        first.write(&[b'a'; 1000]).await.unwrap();
        assert!(!first.spilled());
        let mut second = b.spool();
        second.write(&[b'b'; 1000]).await.unwrap();
        assert!(second.spilled(), "budget was taken by the first spool");
        assert_eq!(read_all(&mut second).await, vec![b'b'; 1000]);
    }

    #[tokio::test]
    async fn a_large_waiting_reservation_does_not_block_small_ones() {
        let b = SpoolBudget::new(1024 * 1024, 256 * 1024, None);
        let held = b.reserve(600 * 1024, std::time::Duration::ZERO).await.expect("600 KiB");
        let b2 = b.clone();
        let big =
            tokio::spawn(async move { b2.reserve(800 * 1024, std::time::Duration::from_secs(2)).await.is_some() });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // 424 KiB are free: a small reservation and a new spool's memory are not held up by the big waiter.
        assert!(b.reserve(4 * 1024, std::time::Duration::ZERO).await.is_some());
        let mut s = b.spool();
        s.write(&[b'a'; 1000]).await.unwrap();
        assert!(!s.spilled());
        drop(s);
        drop(held);
        assert!(big.await.unwrap(), "the big one gets its room once the holder lets go");
    }

    #[tokio::test]
    async fn a_spool_reports_the_budget_it_holds() {
        let b = SpoolBudget::new(1024 * 1024, 1024 * 1024, None);
        let mut s = b.spool();
        s.write(&vec![b'a'; 400_000]).await.unwrap();
        assert!(s.reserved() >= 400_000 && s.reserved() as usize == b.in_use());
    }
}
