//! A pool of idle upstream connections, so a new client session does not pay for TCP setup, greeting and
//! EHLO each time. A borrowed connection is re-introduced as its new client (XCLIENT); connections carrying
//! a PROXY v2 header are bound to one client and never pooled.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{ClientIdentity, Connection, UpstreamError, UpstreamSettings};
use crate::config::Identity;
use crate::metrics::{Readiness, UpstreamErrorKind};

/// Idle upstream connections, newest last.
#[derive(Debug)]
pub struct Pool {
    settings: Arc<UpstreamSettings>,
    idle: Mutex<VecDeque<(Instant, Connection)>>,
    /// Where a new connection's outcome is reported (`/readyz`), once set.
    health: OnceLock<Readiness>,
}

impl Pool {
    /// An empty pool.
    pub fn new(settings: UpstreamSettings) -> Arc<Pool> {
        Arc::new(Pool { settings: Arc::new(settings), idle: Mutex::new(VecDeque::new()), health: OnceLock::new() })
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
        while let Some(mut conn) = self.take_idle() {
            // XCLIENT re-introduces the client and proves the connection alive in one round trip. Without
            // an identity there is nothing to send: a connection that died while pooled fails at MAIL, and
            // the driver retries that once on a fresh connection (`Driver::upstream_mail`).
            let probe = match self.settings.identity {
                Identity::Xclient => conn.introduce(ident).await,
                _ => Ok(()),
            };
            match probe {
                Ok(()) => return Ok((conn, true)),
                // A pooled connection that fails its probe (gone, or answering 421/503) is dropped; only a
                // slow upstream ends the search, since a fresh connection would wait the same.
                Err(super::UpstreamError::Timeout(p)) => return Err(super::UpstreamError::Timeout(p)),
                Err(_) => continue,
            }
        }
        Ok((self.connect(ident).await?, false))
    }

    /// A new connection, introduced as `ident`.
    pub async fn connect(&self, ident: &ClientIdentity) -> Result<Connection, UpstreamError> {
        let connected = Connection::connect(self.settings.clone(), Some(ident)).await;
        if let Some(ready) = self.health.get() {
            use UpstreamErrorKind as K;
            match connected.as_ref().map_err(UpstreamError::kind) {
                Ok(_) => ready.set_upstream_ok(true),
                Err(K::Connect | K::Timeout | K::Io) => ready.set_upstream_ok(false),
                Err(_) => {} // it answered, just not as hoped: reachable, and the error is counted elsewhere
            }
        }
        let mut conn = connected?;
        conn.introduce(ident).await?;
        Ok(conn)
    }

    /// Gives a connection back: an open transaction is reset first; past the pool size it is closed.
    pub async fn checkin(&self, mut conn: Connection) {
        if !self.pooling() {
            conn.quit().await;
            return;
        }
        if conn.in_transaction() && conn.reset().await.is_err() {
            return;
        }
        let extra = {
            let mut idle = self.lock();
            idle.push_back((Instant::now(), conn));
            let over = idle.len().saturating_sub(self.settings.pool_size);
            idle.drain(..over).map(|(_, c)| c).collect::<Vec<_>>()
        };
        for c in extra {
            c.quit().await;
        }
        crate::metrics::upstream_pool_idle(self.lock().len());
    }

    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.lock();
        let limit = self.settings.pool_idle_timeout;
        while let Some((since, conn)) = idle.pop_back() {
            if since.elapsed() < limit {
                crate::metrics::upstream_pool_idle(idle.len());
                return Some(conn);
            }
            drop(conn); // older than the limit; everything in front of it is older still
            idle.clear();
        }
        None
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
