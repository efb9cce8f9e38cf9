//! `[quarantine]`: where messages held by `quarantine` rules are kept, and for how long (docs/quarantine.md).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ByteSize, Span};

/// `[quarantine]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    /// The store's directory. It must not be the rules directory (a store there used to make the rules
    /// reload); the default is moat's state directory, which the shipped systemd unit makes writable.
    pub directory: PathBuf,
    /// Items older than this expire (oldest first); `0s` keeps them until the disk budget needs the room.
    pub retention: Span,
    /// The most bytes (messages and sidecars) the store keeps; past it the oldest items expire. `0`: no limit.
    pub max_size: ByteSize,
    /// How often expiry runs.
    pub sweep_interval: Span,
}

/// The default store directory.
pub const DEFAULT_DIRECTORY: &str = "/var/lib/moat/quarantine";

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            directory: PathBuf::from(DEFAULT_DIRECTORY),
            retention: Span(Duration::from_secs(30 * 86400)),
            max_size: ByteSize(10 * 1024 * 1024 * 1024),
            sweep_interval: Span(Duration::from_secs(60)),
        }
    }
}

impl QuarantineConfig {
    /// Problems with this section, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.directory.as_os_str().is_empty() {
            out.push(("directory", "quarantine.directory must not be empty".to_string()));
        }
        if self.sweep_interval.get() < Duration::from_secs(1) {
            out.push(("sweep_interval", "quarantine.sweep_interval must be at least 1s".to_string()));
        }
        out
    }
}
