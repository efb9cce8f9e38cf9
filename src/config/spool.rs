//! `[spool]`: where message bytes wait for the verdict: memory within a budget, then spill files.

use std::path::PathBuf;

use serde::Deserialize;

use super::ByteSize;

/// `[spool]`: where message data waits for its verdict.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub memory_threshold: ByteSize,
    pub memory_budget: ByteSize,
    /// The most bytes all spill files together may hold; a message that would pass it is answered
    /// `452 4.3.1` (as on a full disk), before the disk itself fills up.
    pub disk_budget: ByteSize,
    pub directory: PathBuf,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            memory_threshold: ByteSize(2 << 20),
            memory_budget: ByteSize(256 << 20),
            disk_budget: ByteSize(4 << 30),
            directory: PathBuf::new(),
        }
    }
}

impl SpoolConfig {
    /// Problems with this section, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.memory_budget.bytes() < 64 * 1024 {
            out.push((
                "memory_budget",
                "spool.memory_budget must be at least 64KiB (a scan or spool needs room)".into(),
            ));
        }
        if self.disk_budget.bytes() < 1 << 20 {
            out.push(("disk_budget", "spool.disk_budget must be at least 1MiB".into()));
        }
        if self.memory_threshold > self.memory_budget {
            out.push(("memory_threshold", "spool.memory_threshold is larger than spool.memory_budget".into()));
        }
        if !self.directory.as_os_str().is_empty() && !self.directory.is_dir() {
            out.push(("directory", format!("spool.directory {} is not a directory", self.directory.display())));
        }
        out
    }
}
