//! Connection ids unique across a fleet and across restarts: `<instance>-<start>-<sequence>`, where the
//! instance is `state.instance_id` (or six random base32 characters chosen at start-up), the start is the
//! process' start time in Unix seconds (hex), and the sequence counts connections. They appear in
//! `Received:` headers, logs and audit records; a transaction id is the connection id plus `.<n>`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Hands out connection ids.
#[derive(Debug)]
pub struct ConnIds {
    prefix: String,
    next: AtomicU64,
}

impl ConnIds {
    /// Ids for this process: `instance` if given (letters, digits, `-`), else a random one.
    pub fn new(instance: &str) -> ConnIds {
        let instance = if instance.is_empty() { random_instance() } else { instance.to_string() };
        let start = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        ConnIds { prefix: format!("{instance}-{start:X}"), next: AtomicU64::new(1) }
    }

    /// The part every id of this process starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The next connection id.
    pub fn next_id(&self) -> String {
        format!("{}-{:06X}", self.prefix, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

fn random_instance() -> String {
    let mut b = [0u8; 4];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        // No system randomness (never seen on Linux): the process id still tells instances on one host apart.
        b = std::process::id().to_be_bytes();
    }
    data_encoding::BASE32_NOPAD.encode(&b)[..6].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_between_instances_and_carry_a_sequence() {
        let a = ConnIds::new("");
        let b = ConnIds::new("");
        assert_ne!(a.prefix(), b.prefix(), "two random instances");
        let first = a.next_id();
        assert!(first.starts_with(a.prefix()) && first.ends_with("-000001"), "{first}");
        assert_ne!(a.next_id(), first);
        let named = ConnIds::new("mx-a");
        assert!(named.next_id().starts_with("mx-a-"));
        assert!(first.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'), "{first}");
    }
}
