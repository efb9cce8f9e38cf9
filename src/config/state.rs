//! `[state]`: where cross-connection state lives (docs/limits.md, docs/fleet.md).

use serde::Deserialize;

/// `[state]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `"memory"` (one instance) or another backend shared by a fleet.
    pub backend: StateBackend,
    /// The most keys the in-memory store holds (rate counters, leases, greylist entries, ...); past it the
    /// oldest state is evicted, never memory grown.
    pub max_entries: usize,
}

/// `state.backend`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StateBackend {
    /// In this process.
    #[default]
    Memory,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig { backend: StateBackend::Memory, max_entries: 1_000_000 }
    }
}

impl StateConfig {
    /// Problems with this section, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(1_000..=100_000_000).contains(&self.max_entries) {
            out.push(("max_entries", format!("state.max_entries = {} must be 1000..=100000000", self.max_entries)));
        }
        out
    }
}
