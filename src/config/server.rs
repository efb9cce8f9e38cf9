//! `[server]`: the host name and the reverse DNS of clients.

use serde::Deserialize;

use super::units::secs;
use super::Span;

/// `[server]`: who moat says it is.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Name in the greeting, EHLO reply and Received header; empty means the machine's host name.
    pub hostname: String,
    /// Text after the host name in the 220 greeting.
    pub greeting: String,
    /// Look up forward-confirmed reverse DNS names of clients.
    pub reverse_dns: bool,
    pub reverse_dns_timeout: Span,
    /// Reverse lookups running at once. The resolver blocks a thread of the blocking pool (512 threads,
    /// shared with the spool and rule loading) until it answers, even after the connection stopped
    /// waiting; past this, connections go on without a name instead of starting another lookup.
    pub max_reverse_dns_lookups: usize,
    /// One thread per core, each with its own runtime and listening sockets (`SO_REUSEPORT`), instead of
    /// one work-stealing runtime (`src/cores.rs`). On by default. Not reloadable.
    pub thread_per_core: bool,
}

/// The most `server.max_reverse_dns_lookups` may be: half of tokio's blocking pool (512 threads), so hanging
/// lookups can never starve the spool's file I/O and rule reloads.
pub const MAX_REVERSE_DNS_LOOKUPS_CAP: usize = 256;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: String::new(),
            greeting: "ESMTP moat".into(),
            reverse_dns: true,
            reverse_dns_timeout: secs(2),
            // A lookup normally takes milliseconds; 64 in flight serve hundreds of new connections a second,
            // and during a DNS outage they hold 64 blocking threads at most.
            max_reverse_dns_lookups: 64,
            thread_per_core: true,
        }
    }
}

impl ServerConfig {
    /// Problems with this section, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let lookups = self.max_reverse_dns_lookups;
        if !(1..=MAX_REVERSE_DNS_LOOKUPS_CAP).contains(&lookups) {
            out.push((
                "max_reverse_dns_lookups",
                format!(
                    "server.max_reverse_dns_lookups must be between 1 and {MAX_REVERSE_DNS_LOOKUPS_CAP}, not {lookups} \
                     (set server.reverse_dns = false to turn lookups off)"
                ),
            ));
        }
        out
    }
}
