//! `[metrics]`, `[audit]` and `[log]`: what moat tells operators (docs/metrics.md, docs/audit.md).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::units::secs;
use super::Span;

/// `[audit]`: where the per-transaction audit records go.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `"stdout"`, `"off"`, or a file path (reopened on SIGUSR1 for log rotation).
    pub destination: String,
    /// Records waiting to be written; past this they are dropped and counted, never blocking a session.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { destination: "stdout".into(), queue: 4096 }
    }
}

/// `[metrics]`: the Prometheus and health listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Empty disables the listener.
    pub address: String,
    /// How often the upstream is checked for `/readyz` (connect, greeting, QUIT).
    pub upstream_check_interval: Span,
    /// `Authorization: Bearer` token the listener requires (all but `/healthz`); empty: none.
    pub bearer_token: String,
    /// A file holding the bearer token (trailing newline ignored); instead of `bearer_token`.
    pub bearer_token_file: PathBuf,
    /// Basic auth user name; needs `basic_password` or `basic_password_file`.
    pub basic_user: String,
    pub basic_password: String,
    /// A file holding the basic auth password (trailing newline ignored); instead of `basic_password`.
    pub basic_password_file: PathBuf,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Human,
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: "127.0.0.1:9925".into(),
            upstream_check_interval: secs(10),
            bearer_token: String::new(),
            bearer_token_file: PathBuf::new(),
            basic_user: String::new(),
            basic_password: String::new(),
            basic_password_file: PathBuf::new(),
        }
    }
}

impl MetricsConfig {
    /// Problems with this section, as `(key, message)`: the address, and the listener's credentials: at most one way to give each secret,
    /// not bearer and basic at once, a basic user with a password and no password without a user, files that
    /// exist, and a positive check interval.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !self.address.is_empty() && self.address.parse::<SocketAddr>().is_err() {
            out.push(("address", format!("metrics.address {:?} is not an address:port", self.address)));
        }
        let token_file = !self.bearer_token_file.as_os_str().is_empty();
        let password_file = !self.basic_password_file.as_os_str().is_empty();
        let bearer = !self.bearer_token.is_empty() || token_file;
        let password = !self.basic_password.is_empty() || password_file;
        if !self.bearer_token.is_empty() && token_file {
            out.push(("bearer_token_file", "metrics.bearer_token and metrics.bearer_token_file are both set".into()));
        }
        if !self.basic_password.is_empty() && password_file {
            out.push((
                "basic_password_file",
                "metrics.basic_password and metrics.basic_password_file are both set".into(),
            ));
        }
        if !self.basic_user.is_empty() && !password {
            out.push(("basic_user", "metrics.basic_user needs metrics.basic_password or basic_password_file".into()));
        }
        if self.basic_user.is_empty() && password {
            out.push(("basic_user", "metrics.basic_password is set but metrics.basic_user is empty".into()));
        }
        if self.basic_user.contains(':') {
            out.push(("basic_user", "metrics.basic_user must not contain ':'".into()));
        }
        if bearer && (password || !self.basic_user.is_empty()) {
            out.push(("bearer_token", "metrics: set either a bearer token or basic auth, not both".into()));
        }
        for (key, path) in
            [("bearer_token_file", &self.bearer_token_file), ("basic_password_file", &self.basic_password_file)]
        {
            if !path.as_os_str().is_empty() && !path.is_file() {
                out.push((key, format!("metrics.{key} {} does not exist", path.display())));
            }
        }
        if self.upstream_check_interval.get().is_zero() {
            out.push(("upstream_check_interval", "metrics.upstream_check_interval must be positive".into()));
        }
        out
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Human, level: "info".into() }
    }
}

impl LogConfig {
    /// Problems with this section, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            out.push(("level", format!("log.level {:?} is not a valid filter", self.level)));
        }
        out
    }
}
