//! [`Authenticator::verify`] end to end without sockets: turns, lockout and verification together, with
//! client keys (IPv6 per prefix) and simultaneous attempts.

use std::net::IpAddr;
use std::sync::Arc;

use super::sasl::Credentials;
use super::{AuthError, Authenticator};
use crate::client_key::ClientKey;
use crate::config::{AuthConfig, Span};

pub(super) const ALICE_PW: &str = "alice-pw";

/// An authenticator with one user, alice, and a lockout at `threshold` failures.
pub(super) fn authenticator(threshold: u32) -> (Arc<Authenticator>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.toml");
    let text = format!("[users.alice]\npassword = \"{}\"\n", super::store::hash_password(ALICE_PW).unwrap());
    std::fs::write(&path, text).unwrap();
    let cfg = AuthConfig {
        users_file: path,
        lockout_threshold: threshold,
        failure_delay: Span(std::time::Duration::from_millis(1)),
        ..AuthConfig::default()
    };
    (Authenticator::load(&cfg).unwrap().unwrap(), dir)
}

pub(super) fn creds(user: &str, pw: &str) -> Credentials {
    Credentials { user: user.into(), password: pw.into() }
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_attempts_from_one_64_get_no_more_guesses_than_the_threshold() {
    let (auth, _dir) = authenticator(3);
    // Twelve addresses of one /64, twelve names, all at once: every attempt would pass a lockout check made
    // before its turn; counted per /64 and checked once it is their turn, only three are verified.
    let mut tasks = Vec::new();
    for i in 1..=12u16 {
        let auth = Arc::clone(&auth);
        let from = ip(&format!("2001:db8:1:2::{i:x}"));
        tasks.push(tokio::spawn(async move {
            auth.verify(creds(&format!("user{i}"), "guess"), "mx", ClientKey::of(from)).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let verified = results.iter().filter(|r| matches!(r, Err(AuthError::Invalid { .. }))).count();
    assert_eq!(verified, 3, "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Err(AuthError::Invalid { .. } | AuthError::Locked))), "{results:?}");
    assert!(auth.turns.is_empty());
}
