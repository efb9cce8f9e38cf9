//! A pool of idle upstream connections, so a new client session does not pay for TCP setup, greeting and
//! EHLO each time. A borrowed connection is re-introduced as its new client (XCLIENT); connections carrying
//! a PROXY v2 header are bound to one client and never pooled.
//!
//! Every open connection, idle or in use, holds a slot of [`ConnectionLimit`] (`upstream.max_connections`):
//! a new connection waits for one at most `upstream.connection_wait`.
//!
//! The pool also remembers what the upstream offered in its latest EHLO reply ([`Pool::offers`]), so the
//! client sessions advertise DSN and SMTPUTF8 only when the upstream supports them. [`Pool::probe`] learns it
//! at start-up, before the first client; every new or re-introduced connection refreshes it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::limit::{Acquired, ConnectionLimit, ConnectionSlot};
use super::{ClientIdentity, Connection, Extensions, UpstreamError, UpstreamSettings};
use crate::config::Identity;
use crate::metrics::{Readiness, UpstreamErrorKind};
use crate::smtp::session::UpstreamOffers;

/// Bits of [`Pool::offers`], one per pass-through extension.
const OFFERS_DSN: u8 = 1;
const OFFERS_SMTPUTF8: u8 = 2;

/// Idle upstream connections, newest last.
#[derive(Debug)]
pub struct Pool {
    settings: Arc<UpstreamSettings>,
    idle: Mutex<VecDeque<(Instant, Connection)>>,
    /// Where a new connection's outcome is reported (`/readyz`), once set.
    health: OnceLock<Readiness>,
    /// What the latest EHLO reply offered (`OFFERS_*` bits); none until one was seen.
    offers: AtomicU8,
    /// The cap on open connections.
    limit: ConnectionLimit,
}

impl Pool {
    /// An empty pool.
    pub fn new(settings: UpstreamSettings) -> Arc<Pool> {
        let limit = ConnectionLimit::new(settings.max_connections, settings.connection_wait);
        Arc::new(Pool {
            limit,
            settings: Arc::new(settings),
            idle: Mutex::new(VecDeque::new()),
            health: OnceLock::new(),
            offers: AtomicU8::new(0),
        })
    }

    /// What the upstream offered of DSN and SMTPUTF8 in its latest EHLO reply; neither before one was seen
    /// (conservative: a client that was not offered an extension does not use it, so nothing is refused
    /// upstream or silently dropped).
    pub fn offers(&self) -> UpstreamOffers {
        let bits = self.offers.load(Ordering::Relaxed);
        UpstreamOffers { dsn: bits & OFFERS_DSN != 0, smtputf8: bits & OFFERS_SMTPUTF8 != 0 }
    }

    /// Remembers what the upstream offers: pass [`Connection::own_extensions`], the reply to moat's own
    /// EHLO, which is the same for every client. A client the upstream treats differently (fewer keywords
    /// after XCLIENT) gets `455 4.5.4` for parameters its introduced connection lacks.
    pub fn learn(&self, ext: &Extensions) {
        let bits = if ext.dsn { OFFERS_DSN } else { 0 } | if ext.smtputf8 { OFFERS_SMTPUTF8 } else { 0 };
        self.offers.store(bits, Ordering::Relaxed);
    }

    /// Opens one connection to learn the upstream's extensions before the first client says EHLO, and keeps
    /// it in the pool (when pooling) for the first session. With PROXY v2 it sends a `LOCAL` header.
    pub async fn probe(&self) -> Result<UpstreamOffers, UpstreamError> {
        let slot = match self.limit.acquire(|| None::<Connection>).await? {
            Acquired::Slot(s) => s,
            Acquired::Found(c) => return Ok(self.keep_offers(c).await),
        };
        let conn = Connection::connect(self.settings.clone(), None).await;
        self.report(&conn);
        let mut conn = conn?;
        conn.slot = Some(slot);
        Ok(self.keep_offers(conn).await)
    }

    async fn keep_offers(&self, conn: Connection) -> UpstreamOffers {
        self.learn(conn.own_extensions());
        self.checkin(conn).await;
        self.offers()
    }

    /// The upstream settings.
    pub fn settings(&self) -> &Arc<UpstreamSettings> {
        &self.settings
    }

    /// Reports every new connection's outcome to `ready`: unreachable (connect refused, timed out, broken
    /// before EHLO) marks the upstream down at once, a successful connection marks it up. Set once.
    pub fn report_health(&self, ready: Readiness) {
        let _ = self.health.set(ready);
    }

    fn pooling(&self) -> bool {
        self.settings.pool_size > 0 && self.settings.identity != Identity::ProxyV2
    }

    /// A connection ready for a transaction on behalf of `ident`. Returns it and whether it was reused.
    pub async fn checkout(&self, ident: &ClientIdentity) -> Result<(Connection, bool), UpstreamError> {
        while let Some(conn) = self.take_idle() {
            if let Some(conn) = self.reuse(conn, ident).await? {
                return Ok((conn, true));
            }
        }
        let slot = match self.limit.acquire(|| self.take_idle()).await? {
            Acquired::Slot(s) => s,
            Acquired::Found(conn) => match self.reuse(conn, ident).await? {
                Some(conn) => return Ok((conn, true)),
                // It failed its probe and is gone, its slot freed: one more bounded wait for a slot.
                None => self.slot().await?,
            },
        };
        Ok((self.connect_with(slot, ident).await?, false))
    }

    /// Probes a pooled connection for `ident`: `Some` when it can be used, `None` when it was dropped.
    async fn reuse(&self, mut conn: Connection, ident: &ClientIdentity) -> Result<Option<Connection>, UpstreamError> {
        conn.rehome();
        // XCLIENT re-introduces the client and proves the connection alive in one round trip. Without
        // an identity there is nothing to send: a connection that died while pooled fails at MAIL, and
        // the driver retries that once on a fresh connection (`Driver::upstream_mail`).
        let probe = match self.settings.identity {
            Identity::Xclient => conn.introduce(ident).await,
            _ => Ok(()),
        };
        match probe {
            Ok(()) => Ok(Some(conn)),
            // A pooled connection that fails its probe (gone, or answering 421/503) is dropped; only a
            // slow upstream ends the search, since a fresh connection would wait the same.
            Err(UpstreamError::Timeout(p)) => Err(UpstreamError::Timeout(p)),
            Err(_) => Ok(None),
        }
    }

    /// A slot for a new connection, waiting at most `upstream.connection_wait`.
    async fn slot(&self) -> Result<ConnectionSlot, UpstreamError> {
        match self.limit.acquire(|| None::<Connection>).await? {
            Acquired::Slot(s) => Ok(s),
            Acquired::Found(_) => Err(UpstreamError::Busy(self.settings.connection_wait)),
        }
    }

    /// A new connection, introduced as `ident`, once a slot is free (waiting at most
    /// `upstream.connection_wait`, then [`UpstreamError::Busy`]).
    pub async fn connect(&self, ident: &ClientIdentity) -> Result<Connection, UpstreamError> {
        let slot = self.slot().await?;
        self.connect_with(slot, ident).await
    }

    async fn connect_with(&self, slot: ConnectionSlot, ident: &ClientIdentity) -> Result<Connection, UpstreamError> {
        let connected = Connection::connect(self.settings.clone(), Some(ident)).await;
        self.report(&connected);
        let mut conn = connected?;
        conn.slot = Some(slot);
        // A new connection: the upstream may have changed what it offers since the last one.
        self.learn(conn.own_extensions());
        conn.introduce(ident).await?;
        Ok(conn)
    }

    /// Reports a new connection's outcome to `/readyz` (see [`Pool::report_health`]).
    fn report(&self, connected: &Result<Connection, UpstreamError>) {
        if let Some(ready) = self.health.get() {
            use UpstreamErrorKind as K;
            match connected.as_ref().map_err(UpstreamError::kind) {
                Ok(_) => ready.set_upstream_ok(true),
                Err(K::Connect | K::Timeout | K::Io) => ready.set_upstream_ok(false),
                Err(_) => {} // it answered, just not as hoped: reachable, and the error is counted elsewhere
            }
        }
    }

    /// Gives a connection back: an open transaction is reset first; past the pool size, or while a client
    /// waits for a slot (which the closed connection gives back), it is closed.
    pub async fn checkin(&self, mut conn: Connection) {
        if !self.pooling() || self.limit.has_waiters() {
            conn.quit().await;
            return;
        }
        if conn.in_transaction() && conn.reset().await.is_err() {
            return;
        }
        let extra = {
            let mut idle = self.lock();
            // Checked again under the lock a waiter takes to look for idle connections
            // (`ConnectionLimit::acquire`), so a connection is never pooled while someone waits.
            if self.limit.has_waiters() {
                drop(idle);
                conn.quit().await;
                return;
            }
            idle.push_back((Instant::now(), conn));
            let over = idle.len().saturating_sub(self.settings.pool_size);
            idle.drain(..over).map(|(_, c)| c).collect::<Vec<_>>()
        };
        for c in extra {
            c.quit().await;
        }
        crate::metrics::upstream_pool_idle(self.lock().len());
    }

    /// Whether a client waits for a connection slot now: a connection held between transactions should be
    /// given back ([`Pool::checkin`]), which frees its slot for the waiter.
    pub fn has_waiters(&self) -> bool {
        self.limit.has_waiters()
    }

    /// Completes when a client starts waiting for a connection slot (one wake-up per waiter): a session that
    /// holds a connection between transactions gives it back then ([`Pool::checkin`]). Cancel-safe.
    pub async fn connection_wanted(&self) {
        self.limit.wanted().await;
    }

    /// The newest idle connection opened on this thread (with a thread per core: its socket is polled
    /// here), else the newest of all; connections past the idle limit are dropped on the way.
    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.lock();
        let limit = self.settings.pool_idle_timeout;
        // Oldest first: everything in front of the first young one is expired.
        let expired = idle.iter().position(|(since, _)| since.elapsed() < limit).unwrap_or(idle.len());
        idle.drain(..expired);
        let home = crate::cores::home();
        let at = idle.iter().rposition(|(_, c)| c.home == home).or_else(|| idle.len().checked_sub(1));
        let conn = at.and_then(|i| idle.remove(i)).map(|(_, c)| c);
        crate::metrics::upstream_pool_idle(idle.len());
        conn
    }

    /// Closes connections idle for longer than the limit; runs until `shutdown`.
    pub async fn reap(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.settings.pool_idle_timeout / 2).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let expired: Vec<Connection> = {
                let mut idle = self.lock();
                let limit = self.settings.pool_idle_timeout;
                let keep = idle.iter().position(|(t, _)| t.elapsed() < limit).unwrap_or(idle.len());
                idle.drain(..keep).map(|(_, c)| c).collect()
            };
            for c in expired {
                c.quit().await;
            }
            crate::metrics::upstream_pool_idle(self.lock().len());
        }
        let all: Vec<Connection> = self.lock().drain(..).map(|(_, c)| c).collect();
        for c in all {
            c.quit().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Connection)>> {
        // A panic while holding this lock cannot leave the deque inconsistent (push/pop only), so a
        // poisoned lock is still usable.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}
