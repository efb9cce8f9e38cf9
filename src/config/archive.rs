//! `[archive]`: copies of accepted mail (docs/archive.md): an extra upstream recipient (`bcc`) or
//! compressed files in day folders (`directory`), for the mail a selection picks.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ByteSize, Span};

/// `[archive]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// `"off"`, `"bcc"` or `"directory"`.
    pub mode: ArchiveMode,
    /// `bcc`: the archive address added as an extra recipient of the upstream transaction.
    pub address: String,
    /// `directory`: where day folders (`YYYY-MM-DD/`) of compressed messages go.
    pub directory: PathBuf,
    /// When true, a copy that cannot be made means `451 4.3.0` for the message (never an unarchived
    /// `250`); when false, the message is relayed anyway and the failure logged and counted.
    pub required: bool,
    /// Listener names whose mail is archived; empty: every listener.
    pub listeners: Vec<String>,
    /// Which mail: `"all"`, `"submission"` (authenticated senders) or `"inbound"` (unauthenticated).
    pub direction: ArchiveDirection,
    /// Archive only messages with a recipient in one of these domains (exact, or `.example.org` for
    /// subdomains); empty: any recipient.
    pub rcpt_domains: Vec<String>,
    /// Archive only messages one of these rule ids hit; empty: regardless of rules.
    pub rules: Vec<String>,
    /// `directory`: files older than this expire; `0s` keeps them until the disk budget needs the room.
    pub retention: Span,
    /// `directory`: the most bytes kept; past it the oldest files expire. `0`: no limit.
    pub max_size: ByteSize,
    /// `directory`: how often expiry runs.
    pub sweep_interval: Span,
}

/// `archive.mode`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ArchiveMode {
    /// No archive.
    #[default]
    Off,
    /// An extra recipient of the same upstream transaction.
    Bcc,
    /// Compressed files written before the client gets its reply.
    Directory,
}

/// `archive.direction`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ArchiveDirection {
    /// Every message.
    #[default]
    All,
    /// Messages from authenticated senders.
    Submission,
    /// Messages from unauthenticated senders (mail arriving from the internet).
    Inbound,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            mode: ArchiveMode::Off,
            address: String::new(),
            directory: PathBuf::from("/var/lib/moat/archive"),
            required: true,
            listeners: Vec::new(),
            direction: ArchiveDirection::All,
            rcpt_domains: Vec::new(),
            rules: Vec::new(),
            retention: Span(Duration::ZERO),
            max_size: ByteSize(0),
            sweep_interval: Span(Duration::from_secs(60)),
        }
    }
}

impl ArchiveConfig {
    /// Problems with this section, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let address_ok = self.address.split_once('@').is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
            && self.address.bytes().all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>');
        if self.mode == ArchiveMode::Bcc && !address_ok {
            out.push(("address", format!("archive.address {:?} must be an address (local@domain)", self.address)));
        }
        if self.mode == ArchiveMode::Directory && self.directory.as_os_str().is_empty() {
            out.push(("directory", "archive.directory must not be empty".to_string()));
        }
        if self.sweep_interval.get() < Duration::from_secs(1) {
            out.push(("sweep_interval", "archive.sweep_interval must be at least 1s".to_string()));
        }
        out
    }
}
