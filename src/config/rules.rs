//! `[rules]`: the rule files and content scanning (docs/rules.md).

use std::path::PathBuf;

use serde::Deserialize;

use super::units::secs;
use super::{ByteSize, Span};

/// `[rules]`: the rule files and content scanning (docs/rules.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// The directory of `*.toml` rule files (loaded in file-name order); empty disables rules.
    pub directory: PathBuf,
    /// How much of a message the content rules read; the rest is relayed unscanned.
    pub scan_window: ByteSize,
    /// What happens to a message larger than `scan_window`.
    pub oversize_policy: OversizePolicy,
    /// Deprecated: `quarantine.directory`. When set, it is used as the quarantine store's directory.
    pub quarantine_dir: PathBuf,
    /// How often the rules directory is polled for changes; 0 disables the watcher (SIGHUP still works).
    pub watch_interval: Span,
}

/// `rules.oversize_policy`: a message past the scan window.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OversizePolicy {
    /// Relay it with `X-Moat-Scan: partial`.
    #[default]
    PassWithHeader,
    /// `451 4.7.1`.
    Tempfail,
    /// `552 5.3.4`.
    Reject,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            directory: PathBuf::from("rules"),
            scan_window: ByteSize(25 * 1024 * 1024),
            oversize_policy: OversizePolicy::PassWithHeader,
            quarantine_dir: PathBuf::new(),
            watch_interval: secs(2),
        }
    }
}
