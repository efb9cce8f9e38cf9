//! `[auth]`: SMTP AUTH, the users file and the lockout (docs/auth.md).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::secs;
use super::Span;

/// `[auth]`: SMTP AUTH (docs/auth.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The users file; empty disables AUTH (submission listeners then refuse MAIL with `530`).
    pub users_file: PathBuf,
    /// Password verifications running at once; 0 means the number of cores.
    pub max_concurrent_verifications: usize,
    /// Failures per client key within `lockout_window` that lock it; failures per login name from unknown
    /// clients that throttle the name for them (`auth::lockout`).
    pub lockout_threshold: u32,
    pub lockout_window: Span,
    pub lockout_duration: Span,
    /// Delay before answering a failed attempt; doubles with each failure in the window (at most 8 s).
    pub failure_delay: Span,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users_file: PathBuf::new(),
            max_concurrent_verifications: 0,
            lockout_threshold: 5,
            lockout_window: secs(600),
            lockout_duration: secs(900),
            failure_delay: Span(Duration::from_millis(500)),
        }
    }
}

impl AuthConfig {
    /// Problems with this section, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !self.users_file.as_os_str().is_empty() && !self.users_file.is_file() {
            out.push(("users_file", format!("auth.users_file {} does not exist", self.users_file.display())));
        }
        if self.lockout_threshold == 0 {
            out.push(("lockout_threshold", "auth.lockout_threshold must be at least 1".into()));
        }
        out
    }
}
