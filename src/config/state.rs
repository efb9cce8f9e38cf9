//! `[state]`: where cross-connection state lives (docs/limits.md, docs/fleet.md).

use serde::Deserialize;

use super::units::Span;

/// `[state]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `"memory"` (one instance) or `"redis"` (shared by a fleet).
    pub backend: StateBackend,
    /// The most keys the in-memory store holds (rate counters, leases, greylist entries, ...); past it the
    /// oldest state is evicted, never memory grown.
    pub max_entries: usize,
    /// `redis://host:port/db` or `rediss://...` (TLS); a password in the URL works too.
    pub url: String,
    /// The Redis password (AUTH); empty: none, or the one in `url`.
    pub password: String,
    /// TLS to Redis (the same as a `rediss://` URL); the server certificate is checked against the system roots.
    pub tls: bool,
    /// With TLS: a PEM file of the CA(s) that sign Redis' certificate, instead of the system roots.
    pub tls_ca_file: std::path::PathBuf,
    /// Put in front of every key, so several applications (or fleets) can share one Redis.
    pub key_prefix: String,
    /// The longest a single store operation may take before it counts as failed (then the feature's
    /// `on_error` choice applies).
    pub command_timeout: Span,
    /// Lifetime of a per-client concurrency lease; a live connection renews it every third of it, so
    /// the leases of an instance that died are free again at most this long after.
    pub lease_ttl: Span,
    /// This instance's name in connection and transaction ids; empty: a random one per start.
    pub instance_id: String,
    /// What each feature does when the store fails.
    pub on_error: OnError,
}

/// `state.backend`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StateBackend {
    /// In this process.
    #[default]
    Memory,
    /// A Redis server (or a Sentinel-managed or managed one behind one address) shared by the fleet.
    Redis,
}

/// What a check does when the store gives no answer in time.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// Go on as if the check passed.
    Open,
    /// Refuse for now (a `4xx` reply).
    Closed,
}

/// `[state.on_error]`: per feature, fail open or closed when the store fails.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnError {
    /// The per-client concurrency limit across the fleet (`limits.max_connections_per_ip`); closed:
    /// `421 4.7.0`.
    pub concurrency: Failure,
    /// The TOTP replay guard; closed: the AUTH attempt gets `454 4.7.0`.
    pub totp_replay: Failure,
    /// AUTH lockout counters; closed: `454 4.7.0`.
    pub auth_lockout: Failure,
}

impl Default for OnError {
    fn default() -> Self {
        OnError { concurrency: Failure::Open, totp_replay: Failure::Closed, auth_lockout: Failure::Closed }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Memory,
            max_entries: 1_000_000,
            url: "redis://127.0.0.1:6379/0".into(),
            password: String::new(),
            tls: false,
            tls_ca_file: std::path::PathBuf::new(),
            key_prefix: "moat:".into(),
            command_timeout: Span(std::time::Duration::from_millis(250)),
            lease_ttl: Span(std::time::Duration::from_secs(60)),
            instance_id: String::new(),
            on_error: OnError::default(),
        }
    }
}

impl StateConfig {
    /// Problems with this section, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(1_000..=100_000_000).contains(&self.max_entries) {
            out.push(("max_entries", format!("state.max_entries = {} must be 1000..=100000000", self.max_entries)));
        }
        if self.backend == StateBackend::Redis
            && !(self.url.starts_with("redis://") || self.url.starts_with("rediss://"))
        {
            out.push(("url", format!("state.url {:?} must start with redis:// or rediss://", self.url)));
        }
        let t = self.command_timeout.get();
        if t.is_zero() || t > std::time::Duration::from_secs(10) {
            out.push(("command_timeout", format!("state.command_timeout = {t:?} must be 1ms..=10s")));
        }
        let l = self.lease_ttl.get();
        if l < std::time::Duration::from_secs(3) || l > std::time::Duration::from_secs(3600) {
            out.push(("lease_ttl", format!("state.lease_ttl = {l:?} must be 3s..=1h")));
        }
        if self.key_prefix.len() > 64 {
            out.push(("key_prefix", "state.key_prefix must be at most 64 bytes".into()));
        }
        if self.instance_id.len() > 32 || !self.instance_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            out.push(("instance_id", "state.instance_id must be at most 32 letters, digits or '-'".into()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_section_parses_and_validates() {
        let c: StateConfig = toml::from_str(
            "backend = \"redis\"\nurl = \"rediss://r.example:6380/2\"\ncommand_timeout = \"100ms\"\n\
             [on_error]\nconcurrency = \"closed\"\n",
        )
        .unwrap();
        assert_eq!(c.backend, StateBackend::Redis);
        assert_eq!(c.on_error.concurrency, Failure::Closed);
        assert_eq!(c.on_error.auth_lockout, Failure::Closed);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let bad: StateConfig = toml::from_str(
            "backend = \"redis\"\nurl = \"http://x\"\ncommand_timeout = \"0ms\"\ninstance_id = \"a b\"\n",
        )
        .unwrap();
        let keys: Vec<_> = bad.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["url", "command_timeout", "instance_id"]);
        assert!(toml::from_str::<StateConfig>("bogus = 1").is_err());
    }
}
