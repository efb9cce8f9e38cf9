//! SMTP AUTH: SASL decoding ([`sasl`]), the users file ([`store`]), brute-force lockout ([`lockout`]) and
//! TOTP ([`totp`]). [`Authenticator`] ties them together for the SMTP driver: it verifies credentials off
//! the async threads, behind a semaphore, and answers which senders a user owns.
//!
//! Nothing in this module logs a password, a code or an AUTH payload.

pub mod cli;
pub mod gate;
pub mod known;
pub mod lockout;
pub mod sasl;
pub mod shared_lockout;
pub mod store;
pub mod totp;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::gate::{TurnKey, Turns};
use self::lockout::{Check, Lockout, LockoutSettings};
use self::sasl::Credentials;
use self::store::{Matched, StoreError, UserStore};
use crate::client_key::ClientKey;
use crate::config::AuthConfig;

/// Why a verification did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Wrong credentials, or an unknown or disabled user, or a name throttled for this client (see
    /// [`lockout`]; `throttled`, for the audit trail only: the client must get the same answer). The failure
    /// is already counted: answer after `delay`; `locked` says this failure locked the client or the name.
    #[error("invalid credentials")]
    Invalid { delay: Duration, locked: bool, throttled: bool },
    /// The client was locked (found once it was this attempt's turn): nothing was verified.
    #[error("locked out")]
    Locked,
    #[error("verification failed internally")]
    Internal,
}

/// The credential checker shared by every listener.
pub struct Authenticator {
    path: PathBuf,
    users: ArcSwap<UserStore>,
    /// The users file's stamp when last loaded (shared with the watcher).
    stamp: Arc<Mutex<Option<crate::watch::Stamp>>>,
    permits: Arc<Semaphore>,
    /// One verification at a time per client IP and per name, ahead of `permits`.
    turns: Turns,
    lockout: Lockout,
    /// Last TOTP step used per user (lower-cased), so a code works once.
    totp_used: Mutex<HashMap<String, u64>>,
    /// The shared store (a fleet): TOTP steps used anywhere in the fleet ([`Authenticator::use_state`]).
    state: OnceLock<SharedState>,
    reloads_ok: AtomicU64,
    reloads_refused: AtomicU64,
}

/// How many users-file reloads (watcher or SIGHUP) took effect, and how many were refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReloadCounts {
    pub ok: u64,
    pub refused: u64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("path", &self.path).finish_non_exhaustive()
    }
}

/// A hash of a random password with the default parameters: what an unknown user is verified against.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut pw = [0u8; 16];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut pw);
        store::hash_password(&data_encoding::HEXLOWER.encode(&pw)).unwrap_or_default()
    })
}

// === impl Authenticator ===

impl Authenticator {
    /// Loads the users file named in `[auth]`; `Ok(None)` when AUTH is off. Blocking (reads the file and
    /// computes the dummy hash): call it at start-up.
    pub fn load(cfg: &AuthConfig) -> Result<Option<Arc<Authenticator>>, StoreError> {
        if cfg.users_file.as_os_str().is_empty() {
            return Ok(None);
        }
        let users = UserStore::load(&cfg.users_file)?;
        let stamp = crate::watch::stamp(&cfg.users_file);
        let _ = dummy_hash();
        let permits = match cfg.max_concurrent_verifications {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        info!(users = users.len(), file = %cfg.users_file.display(), "users loaded");
        Ok(Some(Arc::new(Authenticator {
            path: cfg.users_file.clone(),
            users: ArcSwap::from_pointee(users),
            stamp: Arc::new(Mutex::new(Some(stamp))),
            permits: Arc::new(Semaphore::new(permits)),
            turns: Turns::default(),
            lockout: Lockout::new(LockoutSettings {
                threshold: cfg.lockout_threshold,
                window: cfg.lockout_window.get(),
                duration: cfg.lockout_duration.get(),
                failure_delay: cfg.failure_delay.get(),
            }),
            totp_used: Mutex::new(HashMap::new()),
            state: OnceLock::new(),
            reloads_ok: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
        })))
    }

    /// Keeps the cross-connection AUTH state in `store` too (a fleet's Redis): with it a TOTP code used on
    /// one instance is refused on every other, and failures on every instance count towards the lockout
    /// of a client or name. `state.on_error` says what a store failure does to an attempt.
    pub fn use_state(&self, store: crate::state::SharedStore, cfg: &crate::config::StateConfig, auth: &AuthConfig) {
        let lockout = (store.backend() != "memory")
            .then(|| shared_lockout::SharedLockout::new(store.clone(), auth, cfg.on_error.auth_lockout));
        let _ = self.state.set(SharedState { store, totp_replay: cfg.on_error.totp_replay, lockout });
    }

    /// The brute-force counters.
    pub fn lockout(&self) -> &Lockout {
        &self.lockout
    }

    /// Verifies the credentials of `client` and counts the outcome in the lockout. Attempts wait their turn
    /// per client key and per name ([`gate`]), then the lockout is checked again, then the password is
    /// verified on the blocking pool, at most `max_concurrent_verifications` at once. A name throttled for
    /// this client costs the same verification (against the dummy hash, as an unknown name does) and fails.
    /// Returns the user's canonical name.
    pub async fn verify(&self, creds: Credentials, listener: &str, client: ClientKey) -> Result<String, AuthError> {
        let name = creds.user.clone();
        let _client_turn = self.turns.take(TurnKey::Client(client)).await.ok_or(AuthError::Internal)?;
        let _name_turn = self.turns.take(TurnKey::Name(name.to_lowercase())).await.ok_or(AuthError::Internal)?;
        if let Check::Locked(_) = self.lockout.check(client, Instant::now()) {
            return Err(AuthError::Locked);
        }
        let shared = self.state.get().and_then(|s| s.lockout.as_ref());
        let client_id = client.to_string();
        // The fleet's view: a store that fails makes the attempt fail closed (454) unless configured open.
        if let Some(sh) = shared {
            if sh.client_locked(&client_id).await.map_err(|_| AuthError::Internal)? {
                return Err(AuthError::Locked);
            }
        }
        let known = self.lockout.is_known(client, &name, Instant::now());
        let mut throttled = self.lockout.name_throttled(client, &name, Instant::now());
        if let (Some(sh), false, false) = (shared, throttled, known) {
            throttled = sh.name_locked(&name).await.map_err(|_| AuthError::Internal)?;
        }
        let verified = if throttled { self.check_dummy(creds).await? } else { self.check(creds, listener).await? };
        // Counted while the turns are held, so the next attempt of this client or name sees this outcome.
        match verified {
            Some(user) => {
                self.lockout.success(client, &name, Instant::now());
                Ok(user)
            }
            None => {
                let mut f = self.lockout.failure(client, Some(&name), Instant::now());
                if let Some(sh) = shared {
                    let counted = sh
                        .failure(&client_id, (!known).then_some(name.as_str()))
                        .await
                        .map_err(|_| AuthError::Internal)?;
                    f.locked |= counted.locked;
                    f.delay = f.delay.max(counted.delay);
                }
                Err(AuthError::Invalid { delay: f.delay, locked: f.locked, throttled })
            }
        }
    }

    /// What an unknown name costs: one verification against the dummy hash, behind the semaphore. Always
    /// `None`.
    async fn check_dummy(&self, creds: Credentials) -> Result<Option<String>, AuthError> {
        let _permit = self.permits.acquire().await.map_err(|_| AuthError::Internal)?;
        tokio::task::spawn_blocking(move || store::check_password(dummy_hash(), &creds.password))
            .await
            .map_err(|_| AuthError::Internal)?;
        Ok(None)
    }

    /// The password check itself, behind the verification semaphore; `None` for invalid credentials.
    async fn check(&self, creds: Credentials, listener: &str) -> Result<Option<String>, AuthError> {
        let _permit = self.permits.acquire().await.map_err(|_| AuthError::Internal)?;
        let users = self.users.load_full();
        let key = creds.user.to_lowercase();
        let last = self.totp_used.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let listener = listener.to_string();
        let verified = tokio::task::spawn_blocking(move || users.verify(&creds, &listener, now, last, dummy_hash()))
            .await
            .map_err(|_| AuthError::Internal)?;
        let Some(verified) = verified else { return Ok(None) };
        if let Matched::Password { totp_step: Some(step) } = verified.matched {
            if let Some(state) = self.state.get() {
                if !state.totp_first_use(&key, step).await? {
                    return Ok(None);
                }
            }
            // Check and set under one lock: two sessions racing with the same code cannot both pass.
            let mut used = self.totp_used.lock().unwrap_or_else(|p| p.into_inner());
            if used.get(&key).is_some_and(|l| *l >= step) {
                return Ok(None);
            }
            used.insert(key, step);
        }
        Ok(Some(verified.user))
    }

    /// Attempts holding or waiting for a turn, by key (for tests: it drops to 0 when AUTH is idle).
    pub fn turns_in_use(&self) -> usize {
        self.turns.len()
    }

    /// Whether `user` may send as `address` (MAIL FROM or a From header address).
    pub fn sender_allowed(&self, user: &str, address: &str) -> bool {
        self.users.load().sender_allowed(user, address)
    }

    /// Re-reads the users file; on any problem the store in force stays. Returns whether it changed. Blocking.
    /// The file's stamp is remembered either way, so the watcher does not report a refused file again.
    pub fn reload(&self) -> Result<bool, StoreError> {
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = Some(crate::watch::stamp(&self.path));
        let users = match UserStore::load(&self.path) {
            Ok(u) => u,
            Err(e) => {
                self.reloads_refused.fetch_add(1, Ordering::Relaxed);
                crate::metrics::users_reload(crate::metrics::ReloadResult::Error);
                return Err(e);
            }
        };
        info!(users = users.len(), "users file reloaded");
        self.users.store(Arc::new(users));
        self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        crate::metrics::users_reload(crate::metrics::ReloadResult::Ok);
        Ok(true)
    }

    /// Reloads so far, by outcome (refused ones are also logged at warn).
    pub fn reload_counts(&self) -> ReloadCounts {
        ReloadCounts {
            ok: self.reloads_ok.load(Ordering::Relaxed),
            refused: self.reloads_refused.load(Ordering::Relaxed),
        }
    }

    /// [`Authenticator::reload`] on the blocking pool, with the outcome logged.
    pub async fn reload_logged(self: &Arc<Self>) {
        let me = Arc::clone(self);
        match tokio::task::spawn_blocking(move || me.reload()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "users file reload refused; the old users stay"),
            Err(e) => warn!(error = %e, "users file reload task failed"),
        }
    }

    /// Reloads when the users file changed and then held still for one `interval` (`crate::watch`), until
    /// `shutdown`.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let path = self.path.clone();
        let me = Arc::clone(self);
        crate::watch::spawn(
            interval,
            shutdown,
            Arc::clone(&self.stamp),
            move || crate::watch::stamp(&path),
            move || {
                let me = Arc::clone(&me);
                async move {
                    debug!("users file changed");
                    me.reload_logged().await;
                }
            },
        );
    }
}

/// The fleet's shared AUTH state.
struct SharedState {
    store: crate::state::SharedStore,
    totp_replay: crate::config::state::Failure,
    /// The fleet's lockout counters; `None` with the memory store (the instance's own lockout is the
    /// whole story then).
    lockout: Option<shared_lockout::SharedLockout>,
}

/// How long a used TOTP step is remembered: a code is accepted up to one step late, so after three steps
/// it cannot match any more.
const TOTP_USED_TTL: Duration = Duration::from_secs(3 * totp::STEP);

impl SharedState {
    /// Marks `step` used by `user` across the fleet: `false` if it already was. The step before is marked
    /// too, so an older code is not accepted after a newer one (two different codes racing on two
    /// instances in the same instant can both pass; the same code cannot). A store failure follows
    /// `state.on_error.totp_replay`: open passes (the instance's own guard still applies), closed is a
    /// temporary failure (`454 4.7.0`).
    async fn totp_first_use(&self, user: &str, step: u64) -> Result<bool, AuthError> {
        let key = |s: u64| format!("totp:{user}:{s}");
        let first = self.store.insert_new(&key(step), b"", TOTP_USED_TTL).await;
        let first = crate::state::or_open(first, self.totp_replay, true).map_err(|e| {
            debug!(error = %e, "TOTP replay guard unavailable; attempt refused for now");
            AuthError::Internal
        })?;
        if first && step > 0 {
            let _ = self.store.insert_new(&key(step - 1), b"", TOTP_USED_TTL).await;
        }
        Ok(first)
    }
}

#[cfg(test)]
mod verify_tests;
