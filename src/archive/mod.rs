//! The archive: copies of accepted mail, for journaling and backups (docs/archive.md).
//!
//! Where it sits: at the end of data, once the verdict lets a message go upstream, the connection driver
//! asks [`Archive::selects`] whether this message is archived (listener, direction, recipient domains,
//! rules hit). In `bcc` mode the archive address becomes one more recipient of the same upstream
//! transaction, so the upstream MTA queues the copy atomically with the message; the client never sees it
//! (not in replies, not in headers). In `directory` mode the whole message and its envelope are written,
//! gzip-compressed, into a day folder and synced before the message goes upstream; the file is removed if
//! the upstream then refuses the message. A copy that cannot be made answers `451 4.3.0` when the archive
//! is `required`: never an unarchived `250`.

pub mod dir;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use dir::{ArchiveDir, Envelope};

use crate::config::archive::{ArchiveConfig, ArchiveDirection, ArchiveMode};

/// The configured archive.
#[derive(Debug)]
pub struct Archive {
    config: ArchiveConfig,
    dir: Option<ArchiveDir>,
}

/// What the selection looks at.
#[derive(Clone, Copy, Debug)]
pub struct Selection<'a> {
    pub listener: &'a str,
    /// The client authenticated (a submission).
    pub authenticated: bool,
    /// The recipients the upstream accepted.
    pub rcpts: &'a [String],
    /// Ids of the rules that hit.
    pub rules: &'a [&'a str],
}

impl Archive {
    /// The archive `config` describes, `None` when it is off; in `directory` mode its sweeper runs until
    /// `shutdown`. `instance` names this moat in file names (the host name).
    pub fn start(config: &ArchiveConfig, instance: &str, shutdown: CancellationToken) -> Option<Arc<Archive>> {
        let dir = match config.mode {
            ArchiveMode::Off => return None,
            ArchiveMode::Bcc => None,
            ArchiveMode::Directory => {
                let d = ArchiveDir::new(config.directory.clone(), instance);
                d.spawn_sweeper(config, shutdown);
                Some(d)
            }
        };
        Some(Arc::new(Archive { config: config.clone(), dir }))
    }

    /// Whether a copy must exist before the client may get `250`.
    pub fn required(&self) -> bool {
        self.config.required
    }

    /// The address to add as a recipient (`bcc` mode).
    pub fn bcc(&self) -> Option<&str> {
        (self.config.mode == ArchiveMode::Bcc).then_some(self.config.address.as_str())
    }

    /// The directory to write to (`directory` mode).
    pub fn dir(&self) -> Option<&ArchiveDir> {
        self.dir.as_ref()
    }

    /// Where `directory` mode writes.
    pub fn directory(&self) -> PathBuf {
        self.config.directory.clone()
    }

    /// Whether the message `s` describes is archived.
    pub fn selects(&self, s: &Selection<'_>) -> bool {
        let c = &self.config;
        let listener = c.listeners.is_empty() || c.listeners.iter().any(|l| l == s.listener);
        let direction = match c.direction {
            ArchiveDirection::All => true,
            ArchiveDirection::Submission => s.authenticated,
            ArchiveDirection::Inbound => !s.authenticated,
        };
        let domain =
            c.rcpt_domains.is_empty() || s.rcpts.iter().any(|r| c.rcpt_domains.iter().any(|d| domain_matches(r, d)));
        let rules = c.rules.is_empty() || s.rules.iter().any(|hit| c.rules.iter().any(|r| r == hit));
        listener && direction && domain && rules && !s.rcpts.is_empty()
    }
}

/// `rcpt`'s domain is `want` (exact), or under it when `want` starts with a dot; any case.
fn domain_matches(rcpt: &str, want: &str) -> bool {
    let Some((_, d)) = rcpt.rsplit_once('@') else { return false };
    let (d, want) = (d.to_ascii_lowercase(), want.to_ascii_lowercase());
    match want.strip_prefix('.') {
        Some(parent) => d.ends_with(&want) || d == parent,
        None => d == want,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(extra: &str) -> Archive {
        let config: ArchiveConfig =
            toml::from_str(&format!("mode = \"bcc\"\naddress = \"a@archive.test\"\n{extra}")).unwrap();
        Archive { config, dir: None }
    }

    #[test]
    fn selection() {
        let rcpts = ["bob@Example.test".to_string()];
        let s = Selection { listener: "mx", authenticated: false, rcpts: &rcpts, rules: &["r1"] };
        assert!(archive("").selects(&s));
        assert!(!archive("direction = \"submission\"").selects(&s));
        assert!(archive("direction = \"inbound\"").selects(&s));
        assert!(!archive("listeners = [\"submission\"]").selects(&s));
        assert!(archive("rcpt_domains = [\"example.test\"]").selects(&s));
        assert!(archive("rcpt_domains = [\".test\"]").selects(&s));
        assert!(!archive("rcpt_domains = [\"other.test\"]").selects(&s));
        assert!(archive("rules = [\"r1\"]").selects(&s));
        assert!(!archive("rules = [\"r2\"]").selects(&s));
        assert_eq!(archive("").bcc(), Some("a@archive.test"));
    }
}
