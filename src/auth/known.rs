//! Known good clients: which client keys authenticated successfully as which login name lately. A name
//! under attack is throttled only for clients not in its list, so a stranger who knows a login name cannot
//! lock its owner out (the owner's usual addresses keep working).
//!
//! Bounded: at most [`MAX_PER_NAME`] clients per name (the least recently successful goes), at most
//! [`MAX_NAMES`] names (the least recently successful goes), and an entry counts for [`KNOWN_TTL`] after its
//! last success. Entries are only made by successful verifications, so only real users fill it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::client_key::ClientKey;

/// Clients remembered per name: a user's home, office, phone network and a few more.
pub const MAX_PER_NAME: usize = 8;
/// Names remembered at once.
pub const MAX_NAMES: usize = 65_536;
/// How long a client stays known after its last success (a month of not logging in from somewhere).
pub const KNOWN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Per name (lower-cased), its known clients with their last success, oldest first.
#[derive(Debug, Default)]
pub struct KnownClients {
    names: HashMap<String, VecDeque<(ClientKey, Instant)>>,
    /// Names by insertion, for eviction; may hold names already gone (compacted when it grows).
    order: VecDeque<String>,
}

impl KnownClients {
    /// Whether `client` authenticated as `name` within [`KNOWN_TTL`] of `now`.
    pub fn is_known(&self, name: &str, client: ClientKey, now: Instant) -> bool {
        self.names.get(name).is_some_and(|list| {
            list.iter().any(|(k, at)| *k == client && now.saturating_duration_since(*at) < KNOWN_TTL)
        })
    }

    /// Remembers a success of `client` as `name`.
    pub fn remember(&mut self, name: &str, client: ClientKey, now: Instant) {
        if !self.names.contains_key(name) {
            while self.names.len() >= MAX_NAMES {
                let Some(old) = self.order.pop_front() else { break };
                self.names.remove(&old);
            }
            if self.order.len() >= 2 * MAX_NAMES {
                let names = &self.names;
                self.order.retain(|n| names.contains_key(n));
            }
            self.order.push_back(name.to_string());
        }
        let list = self.names.entry(name.to_string()).or_default();
        list.retain(|(k, at)| *k != client && now.saturating_duration_since(*at) < KNOWN_TTL);
        list.push_back((client, now));
        while list.len() > MAX_PER_NAME {
            list.pop_front();
        }
    }

    /// Names remembered (for tests).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no name is remembered.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u32) -> ClientKey {
        ClientKey::of(std::net::Ipv4Addr::from(0xC000_0200 + i).into())
    }

    #[test]
    fn remembers_per_name_with_a_ttl_and_bounds() {
        let mut known = KnownClients::default();
        let t0 = Instant::now();
        known.remember("alice", k(1), t0);
        assert!(known.is_known("alice", k(1), t0));
        assert!(!known.is_known("alice", k(2), t0));
        assert!(!known.is_known("bob", k(1), t0), "known for alice only");
        assert!(!known.is_known("alice", k(1), t0 + KNOWN_TTL), "expired");
        for i in 2..=(MAX_PER_NAME as u32 + 1) {
            known.remember("alice", k(i), t0);
        }
        assert!(!known.is_known("alice", k(1), t0), "the oldest of too many went");
        assert!(known.is_known("alice", k(MAX_PER_NAME as u32 + 1), t0));
        // A renewed success moves a client to the back.
        known.remember("alice", k(2), t0);
        known.remember("alice", k(100), t0);
        assert!(known.is_known("alice", k(2), t0));
        assert!(!known.is_known("alice", k(3), t0));
    }

    #[test]
    fn the_name_table_is_bounded() {
        let mut known = KnownClients::default();
        let t0 = Instant::now();
        for i in 0..(MAX_NAMES + 10) {
            known.remember(&format!("user{i}"), k(1), t0);
        }
        assert_eq!(known.len(), MAX_NAMES);
        assert!(!known.is_known("user0", k(1), t0));
        assert!(known.is_known(&format!("user{}", MAX_NAMES + 9), k(1), t0));
    }
}
