//! The quarantine store: messages a `quarantine` rule held, kept whole with their envelope, client facts,
//! the rules that hit and the verdict, until an operator releases or deletes them or they expire
//! (docs/quarantine.md).
//!
//! Where it sits: the rules stage decides (a `quarantine` action leaves a [`Hold`] in the transaction's
//! typed state); at the end of data the connection driver streams the whole spooled message into the
//! [`Store`] before the client gets its reply (a failed write is `451`, never a silent loss). The sweeper
//! ([`spawn_sweeper`]) expires old items and keeps the store within its disk budget; `moat quarantine`
//! ([`cli`]) lists, shows, releases, deletes and purges, also while moat runs.

pub mod cli;
pub mod id;
pub mod release;

pub mod retention;
pub mod store;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

pub use store::{ClientFacts, Meta, Store, StoreError, Swept};

use crate::config::quarantine::QuarantineConfig;

/// Left in `TxnContext::ext` by the rules stage when a `quarantine` rule hit: the driver keeps a copy of
/// the whole message, then relays it (`deliver`) or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub deliver: bool,
}

/// The store the configuration describes, with its sweeper running until `shutdown`; `instance` names
/// this moat in item ids (the host name). The deprecated `rules.quarantine_dir`, when set, still names the
/// directory.
pub fn start(config: &crate::config::Config, instance: &str, shutdown: CancellationToken) -> Arc<Store> {
    if !config.rules.quarantine_dir.as_os_str().is_empty() {
        tracing::warn!("rules.quarantine_dir is deprecated; use quarantine.directory");
    }
    let store = Arc::new(Store::new(directory(config), instance));
    spawn_sweeper(Arc::clone(&store), &config.quarantine, shutdown);
    store
}

/// The store's directory: `quarantine.directory`, or the deprecated `rules.quarantine_dir` when set.
pub fn directory(config: &crate::config::Config) -> std::path::PathBuf {
    if config.rules.quarantine_dir.as_os_str().is_empty() {
        config.quarantine.directory.clone()
    } else {
        config.rules.quarantine_dir.clone()
    }
}

/// The retention limits of `config`.
pub fn limits(config: &QuarantineConfig) -> retention::Limits {
    retention::Limits { max_age: config.retention.get().as_secs(), max_bytes: config.max_size.bytes() }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Sweeps the store every `sweep_interval` until `shutdown`, off the async threads.
pub fn spawn_sweeper(store: Arc<Store>, config: &QuarantineConfig, shutdown: CancellationToken) {
    let limits = limits(config);
    crate::watch::spawn_sweep("quarantine", config.sweep_interval.get(), shutdown, move || {
        store.sweep(now_secs(), limits)
    });
}

#[cfg(test)]
mod tests;
