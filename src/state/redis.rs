//! The Redis [`Store`]: the same semantics as [`super::memory::MemoryStore`], shared by a fleet.
//!
//! Every operation is one round trip and atomic: a Lua script (sent as `EVALSHA`, loaded with `EVAL` once
//! after a Redis restart) or a single command. The scripts take the instance's clock (`now_ms`) as an
//! argument instead of Redis' own, so a [`super::ManualClock`] drives them in tests and every expiry is
//! decided exactly as the memory store decides it; Redis' own `PX`/`PEXPIRE` lifetimes, computed from the
//! same numbers, only reclaim the memory.
//!
//! Values are tagged strings `<kind>:<expires ms>:<payload>` (`t` a GCRA TAT, `c` a counter, `v` bytes), so
//! a value of another kind is reported as [`StoreError::WrongKind`] like the memory store does; leases are
//! a sorted set of holder → expiry. Each call waits at most `command_timeout`; the multiplexed
//! [`ConnectionManager`] reconnects by itself in the background, and failures are counted in
//! `moat_state_errors_total`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use tracing::{info, warn};

use super::{Clock, Rate, RateDecision, Store, StoreError, StoreFuture};
use crate::config::StateConfig;

/// Shared by every script: reads a key as (kind, expiry, payload); expired values are deleted and read as
/// absent; a sorted set is `l` (leases); anything else `x`.
const PRELUDE: &str = r"
local function fmt(n) return string.format('%d', n) end
local function px(exp, now) local d = exp - now if d < 1 then d = 1 end return fmt(d) end
local function load(k, now)
  local t = redis.call('TYPE', k).ok
  if t == 'none' then return nil end
  if t == 'zset' then return 'l' end
  if t ~= 'string' then return 'x' end
  local s = redis.call('GET', k)
  local a = string.find(s, ':', 3, true)
  if string.sub(s, 2, 2) ~= ':' or not a then return 'x' end
  local exp = tonumber(string.sub(s, 3, a - 1))
  if not exp then return 'x' end
  if exp <= now then redis.call('DEL', k) return nil end
  return string.sub(s, 1, 1), exp, string.sub(s, a + 1)
end
local function wrong() return redis.error_reply('WRONGKIND value of another kind') end
";

/// GCRA, as [`super::gcra`]: ARGV now, interval × cost, tolerance. Returns {allowed, retry_after_ms}.
const RATE: &str = r"
local now, step, tol = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local kind, _, payload = load(KEYS[1], now)
local tat = now
if kind then
  if kind ~= 't' then return wrong() end
  tat = math.max(tonumber(payload), now)
end
local new = tat + step
local limit = now + tol
if new <= limit then
  local exp = math.max(new, now + 1)
  redis.call('SET', KEYS[1], 't:' .. fmt(exp) .. ':' .. fmt(new), 'PX', px(exp, now))
  return {1, 0}
end
return {0, new - limit}
";

/// Leases: ARGV now, holder, max, expires. Drops expired holders, renews or adds this one if there is room.
const ACQUIRE: &str = r"
local now, holder, max, exp = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local kind = load(KEYS[1], now)
if kind and kind ~= 'l' then return wrong() end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local ok = 0
if redis.call('ZSCORE', KEYS[1], holder) or redis.call('ZCARD', KEYS[1]) < max then
  redis.call('ZADD', KEYS[1], exp, holder)
  ok = 1
end
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if top[2] then redis.call('PEXPIRE', KEYS[1], px(tonumber(top[2]), now)) end
return ok
";

/// ARGV holder.
const RELEASE: &str = r"
if redis.call('TYPE', KEYS[1]).ok == 'zset' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
end
return 0
";

/// A fixed-window counter: ARGV now, by, ttl. The window starts with the key.
const INCR: &str = r"
local now, by, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local kind, exp, payload = load(KEYS[1], now)
local n = 0
if kind then
  if kind ~= 'c' then return wrong() end
  n = tonumber(payload)
else
  exp = now + ttl
end
n = n + by
redis.call('SET', KEYS[1], 'c:' .. fmt(exp) .. ':' .. fmt(n), 'PX', px(exp, now))
return n
";

/// SET NX with the instance's clock: ARGV now, ttl, value.
const INSERT_NEW: &str = r"
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
if load(KEYS[1], now) then return 0 end
local exp = now + ttl
redis.call('SET', KEYS[1], 'v:' .. fmt(exp) .. ':' .. ARGV[3], 'PX', px(exp, now))
return 1
";

/// ARGV now. Values and counters read as their payload.
const GET: &str = r"
local kind, _, payload = load(KEYS[1], tonumber(ARGV[1]))
if not kind then return false end
if kind == 'v' or kind == 'c' then return payload end
return wrong()
";

struct Scripts {
    rate: Script,
    acquire: Script,
    release: Script,
    incr: Script,
    insert_new: Script,
    get: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            rate: s(RATE),
            acquire: s(ACQUIRE),
            release: Script::new(RELEASE),
            incr: s(INCR),
            insert_new: s(INSERT_NEW),
            get: s(GET),
        }
    }
}

/// The Redis store.
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    clock: Arc<dyn Clock>,
    scripts: Scripts,
    /// Whether the last operation (or probe) got an answer; only changes are logged.
    healthy: AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.prefix).field("timeout", &self.timeout).finish()
    }
}

/// Why the Redis store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("invalid redis settings")]
    Settings(#[source] RedisError),
    #[error("cannot read state.tls_ca_file {}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl RedisStore {
    /// A store for `[state]` (no connection yet: it is made on first use and remade whenever it breaks,
    /// so moat starts and serves while Redis is down). Must be called inside a tokio runtime; reads
    /// `tls_ca_file` (blocking: call it at start-up).
    pub fn new(cfg: &StateConfig, clock: Arc<dyn Clock>) -> Result<RedisStore, RedisSetupError> {
        let mut url = cfg.url.clone();
        if cfg.tls {
            if let Some(rest) = url.strip_prefix("redis://") {
                url = format!("rediss://{rest}");
            }
        }
        let mut info =
            redis::IntoConnectionInfo::into_connection_info(url.as_str()).map_err(RedisSetupError::Settings)?;
        if !cfg.password.is_empty() {
            let settings = info.redis_settings().clone().set_password(&cfg.password);
            info = info.set_redis_settings(settings);
        }
        let client = if cfg.tls_ca_file.as_os_str().is_empty() {
            redis::Client::open(info)
        } else {
            let pem = std::fs::read(&cfg.tls_ca_file)
                .map_err(|source| RedisSetupError::CaFile { path: cfg.tls_ca_file.clone(), source })?;
            redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
        }
        .map_err(RedisSetupError::Settings)?;
        let timeout = cfg.command_timeout.get();
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, manager).map_err(RedisSetupError::Settings)?;
        Ok(RedisStore {
            conn,
            prefix: cfg.key_prefix.clone(),
            timeout,
            clock,
            scripts: Scripts::new(),
            healthy: AtomicBool::new(true),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs one call with the command timeout, classifying and counting its failure.
    async fn call<T>(
        &self,
        key: &str,
        f: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        let out = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if matches!(e.code(), Some("WRONGKIND" | "WRONGTYPE")) => {
                // A bug (two features on one key), not an outage: counted, but the store stays healthy.
                crate::metrics::state_error(crate::metrics::StateError::WrongKind);
                return Err(StoreError::WrongKind(key.to_string()));
            }
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
            Err(_) => Err(StoreError::Timeout),
        };
        self.note(out.as_ref().err());
        out
    }

    fn note(&self, err: Option<&StoreError>) {
        match err {
            None => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    info!(backend = "redis", "state store answering again");
                }
            }
            Some(e) => {
                crate::metrics::state_error(match e {
                    StoreError::Timeout => crate::metrics::StateError::Timeout,
                    StoreError::Unavailable(_) => crate::metrics::StateError::Unavailable,
                    StoreError::WrongKind(_) => crate::metrics::StateError::WrongKind,
                });
                if self.healthy.swap(false, Ordering::Relaxed) {
                    warn!(backend = "redis", error = %e, "state store failing; features follow state.on_error");
                }
            }
        }
    }
}

impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    fn rate<'a>(&'a self, key: &'a str, rate: Rate, cost: u32) -> StoreFuture<'a, RateDecision> {
        Box::pin(async move {
            let now = self.clock.now_ms();
            let step = rate.interval_ms().saturating_mul(u64::from(cost));
            let mut conn = self.conn.clone();
            let mut inv = self.scripts.rate.key(self.key(key));
            inv.arg(now).arg(step).arg(rate.tolerance_ms());
            let (allowed, wait): (i64, i64) = self.call(key, inv.invoke_async(&mut conn)).await?;
            Ok(RateDecision { allowed: allowed == 1, retry_after: Duration::from_millis(wait.max(0) as u64) })
        })
    }

    fn acquire<'a>(&'a self, key: &'a str, holder: &'a str, max: u32, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let now = self.clock.now_ms();
            let mut conn = self.conn.clone();
            let mut inv = self.scripts.acquire.key(self.key(key));
            inv.arg(now).arg(holder).arg(max).arg(now.saturating_add(ms(ttl)));
            let ok: i64 = self.call(key, inv.invoke_async(&mut conn)).await?;
            Ok(ok == 1)
        })
    }

    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut inv = self.scripts.release.key(self.key(key));
            inv.arg(holder);
            let _: i64 = self.call(key, inv.invoke_async(&mut conn)).await?;
            Ok(())
        })
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64, ttl: Duration) -> StoreFuture<'a, i64> {
        Box::pin(async move {
            let now = self.clock.now_ms();
            let mut conn = self.conn.clone();
            let mut inv = self.scripts.incr.key(self.key(key));
            inv.arg(now).arg(by).arg(ms(ttl));
            self.call(key, inv.invoke_async(&mut conn)).await
        })
    }

    fn insert_new<'a>(&'a self, key: &'a str, value: &'a [u8], ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let now = self.clock.now_ms();
            let mut conn = self.conn.clone();
            let mut inv = self.scripts.insert_new.key(self.key(key));
            inv.arg(now).arg(ms(ttl)).arg(value);
            let ok: i64 = self.call(key, inv.invoke_async(&mut conn)).await?;
            Ok(ok == 1)
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let now = self.clock.now_ms();
            let mut conn = self.conn.clone();
            let mut inv = self.scripts.get.key(self.key(key));
            inv.arg(now);
            self.call(key, inv.invoke_async(&mut conn)).await
        })
    }

    fn set<'a>(&'a self, key: &'a str, value: &'a [u8], ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let now = self.clock.now_ms();
            let exp = now.saturating_add(ms(ttl));
            let mut v = format!("v:{exp}:").into_bytes();
            v.extend_from_slice(value);
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("SET").arg(self.key(key)).arg(v).arg("PX").arg(ms(ttl).max(1)).to_owned();
            let _: () = self.call(key, cmd.query_async(&mut conn)).await?;
            Ok(())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("DEL").arg(self.key(key)).to_owned();
            let _: i64 = self.call(key, cmd.query_async(&mut conn)).await?;
            Ok(())
        })
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("PING").to_owned();
            let _: String = self.call("", cmd.query_async(&mut conn)).await?;
            Ok(())
        })
    }
}
