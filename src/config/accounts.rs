//! `[accounts]`: compromised-account detection (docs/limits.md, `pipeline::accounts`).

use serde::Deserialize;

use super::Span;

/// `[accounts]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsConfig {
    /// Keep a sending baseline per authenticated user and suspend accounts that break far out of it.
    pub enabled: bool,
    /// Suspend when the last hour's messages, recipients or recipient domains exceed `factor` times the
    /// user's hourly average (and the floor).
    pub factor: f64,
    /// Messages in an hour never flagged, whatever the baseline (new and quiet users).
    pub floor_messages: u32,
    /// Recipients in an hour never flagged.
    pub floor_recipients: u32,
    /// Distinct recipient domains in an hour never flagged.
    pub floor_domains: u32,
    /// How long a new user is learned before its own baseline counts; meanwhile the limit is `factor` times
    /// the floors.
    pub warmup: Span,
    /// How fast the averages follow a change of habit: the weight of an hour halves after this long.
    pub half_life: Span,
    /// Messages within an hour from a client network the user never used (once past the warm-up) that
    /// suspend the account; 0 disables this check.
    pub new_network_messages: u32,
    /// How long a suspension lasts unless `moat user resume NAME` lifts it first; 0s: until resumed.
    pub suspend_for: Span,
    /// How long a baseline is kept after the user's last message.
    pub keep_for: Span,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        let span = |s: u64| Span(std::time::Duration::from_secs(s));
        AccountsConfig {
            enabled: true,
            factor: 10.0,
            floor_messages: 100,
            floor_recipients: 300,
            floor_domains: 30,
            warmup: span(24 * 3600),
            half_life: span(7 * 86_400),
            new_network_messages: 50,
            suspend_for: span(0),
            keep_for: span(60 * 86_400),
        }
    }
}

impl AccountsConfig {
    /// Problems with this section, as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            out.push(("factor", format!("accounts.factor = {} must be at least 1", self.factor)));
        }
        if self.floor_messages == 0 || self.floor_recipients == 0 || self.floor_domains == 0 {
            out.push(("floor_messages", "accounts floors must be at least 1".to_string()));
        }
        if self.half_life.get().as_secs() < 3600 {
            out.push(("half_life", "accounts.half_life must be at least 1h".to_string()));
        }
        if self.keep_for.get() < self.half_life.get() {
            out.push(("keep_for", "accounts.keep_for must be at least half_life".to_string()));
        }
        out
    }
}
