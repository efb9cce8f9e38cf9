//! Metrics: the Prometheus registry, every metric family moat exports, and the `/metrics`, `/healthz` and
//! `/readyz` listener ([`serve`]).
//!
//! Sits at the end of the connection flow: the server, the SMTP driver, the pipeline, the spool and the
//! upstream client call the small helpers below (`connection`, `command`, `message`, ...) so that every metric
//! name and label lives in this one file. Names start with `moat_` and use the `_total`, `_seconds` and
//! `_bytes` suffixes. Label values come only from closed enums or from the configuration (listener and
//! certificate names), never from addresses, senders or domains, so cardinality stays bounded.
//!
//! The recorder is process-wide ([`install`] keeps it in a `OnceLock`); the helpers are no-ops until it is
//! installed, which keeps unit tests of other modules free of metrics set-up.

mod cache;
mod dns;
mod http;
mod labels;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

pub use self::cache::{ListenerMetrics, Slot, StageTimer};
pub use self::dns::{
    dkim_signed, dns_cache, dns_query, sender_auth, AuthMethod, AuthOutcome, DnsCacheKind, DnsResult, SignResult,
    DKIM_SIGNED_TOTAL, DNS_CACHE_TOTAL, DNS_QUERIES_TOTAL, SENDER_AUTH_TOTAL,
};
pub use self::http::{serve, serve_with_admin, HttpAuth};
pub use self::labels::{
    ArchiveMode, AuthMechanism, AuthResult, ConnResult, CopyResult, ExpiryReason, GreylistResult, Limit,
    MessageVerdict, RcptResult, ReloadResult, TlsResult, TlsVersion, UpstreamErrorKind, UpstreamPhase, Verb,
};
pub use self::labels::{ProxyRefusal, StateError};
use crate::smtp::session::CloseReason;

// === names ===

/// Connections seen by a listener, by admission result.
pub const CONNECTIONS_TOTAL: &str = "moat_connections_total";
/// Connections currently open, per listener.
pub const CONNECTIONS_ACTIVE: &str = "moat_connections_active";
/// Sessions that ended, by reason.
pub const SESSIONS_CLOSED_TOTAL: &str = "moat_sessions_closed_total";
/// TLS handshakes (STARTTLS and implicit TLS), by version and result.
pub const TLS_HANDSHAKES_TOTAL: &str = "moat_tls_handshakes_total";
/// SMTP commands received, by verb.
pub const COMMANDS_TOTAL: &str = "moat_commands_total";
/// Messages (transactions) that ended, by verdict.
pub const MESSAGES_TOTAL: &str = "moat_messages_total";
/// Size of messages that reached the end of DATA/BDAT.
pub const MESSAGE_BYTES: &str = "moat_message_bytes";
/// Message bytes received from clients.
pub const RECEIVED_BYTES_TOTAL: &str = "moat_received_bytes_total";
/// RCPT TO commands, by the reply the client got.
pub const RECIPIENTS_TOTAL: &str = "moat_recipients_total";
/// Times a configured limit was reached.
pub const LIMIT_HITS_TOTAL: &str = "moat_limit_hits_total";
/// Times a rule-file `[[limit]]` was exceeded, by limit id (ids come from the loaded rules).
pub const LIMIT_EXCEEDED_TOTAL: &str = "moat_limit_exceeded_total";
/// Keys held by the in-memory state store (rate counters, leases, greylist triplets, account baselines).
pub const STATE_ENTRIES: &str = "moat_state_entries";
/// Greylisting decisions, by result.
pub const GREYLIST_TOTAL: &str = "moat_greylist_total";
/// Accounts whose sending was suspended (compromised-account detection).
pub const ACCOUNT_SUSPENSIONS_TOTAL: &str = "moat_account_suspensions_total";
/// Time to open a connection to the upstream, up to its greeting and EHLO.
pub const UPSTREAM_CONNECT_SECONDS: &str = "moat_upstream_connect_seconds";
/// Time from upstream DATA to its final reply for one message.
pub const UPSTREAM_TRANSACTION_SECONDS: &str = "moat_upstream_transaction_seconds";
/// Upstream failures, by kind.
pub const UPSTREAM_ERRORS_TOTAL: &str = "moat_upstream_errors_total";
/// Upstream replies, by phase and class.
pub const UPSTREAM_REPLIES_TOTAL: &str = "moat_upstream_replies_total";
/// 1 when the last upstream health check (or relay connect) reached the upstream, else 0.
pub const UPSTREAM_UP: &str = "moat_upstream_up";
/// Idle upstream connections in the pool.
pub const UPSTREAM_POOL_IDLE: &str = "moat_upstream_pool_idle";
/// Open upstream connections (in use or idle in the pool), under `upstream.max_connections`.
pub const UPSTREAM_CONNECTIONS: &str = "moat_upstream_connections";
/// Clients that waited `upstream.connection_wait` for an upstream connection and got `451 4.3.2`.
pub const UPSTREAM_CONNECTION_WAIT_TIMEOUTS_TOTAL: &str = "moat_upstream_connection_wait_timeouts_total";
/// AUTH attempts, by mechanism and result.
pub const AUTH_ATTEMPTS_TOTAL: &str = "moat_auth_attempts_total";
/// Clients locked out, or login names throttled for unknown clients, after too many AUTH failures.
pub const AUTH_LOCKOUTS_TOTAL: &str = "moat_auth_lockouts_total";
/// Time each pipeline stage took, per hook call.
pub const STAGE_SECONDS: &str = "moat_stage_seconds";
/// Rule reloads, by result.
pub const RULES_RELOAD_TOTAL: &str = "moat_rules_reload_total";
/// Rule hits, by rule id (a closed set: the ids of the loaded rules).
pub const RULE_HITS_TOTAL: &str = "moat_rule_hits_total";
/// When each configured certificate expires (Unix time).
pub const TLS_CERTIFICATE_EXPIRY: &str = "moat_tls_certificate_expiry_timestamp_seconds";
/// Certificate reloads, by result.
pub const TLS_RELOAD_TOTAL: &str = "moat_tls_reload_total";
/// Users-file reloads, by result.
pub const USERS_RELOAD_TOTAL: &str = "moat_users_reload_total";
/// Message bytes in the spool's spill files.
pub const SPOOL_DISK_BYTES: &str = "moat_spool_disk_bytes";
/// Message bytes the spool holds in memory.
pub const SPOOL_MEMORY_BYTES: &str = "moat_spool_memory_bytes";
/// Messages the spool moved to a temporary file.
pub const SPOOL_SPILLED_TOTAL: &str = "moat_spool_spilled_total";
/// Audit records dropped because the audit queue was full or the destination failed.
pub const AUDIT_RECORDS_DROPPED_TOTAL: &str = "moat_audit_records_dropped_total";
/// Client connections that went on without a reverse DNS name because the lookup was skipped, by reason.
pub const REVERSE_DNS_SKIPPED_TOTAL: &str = "moat_reverse_dns_skipped_total";
/// Items in the quarantine store (as of its last sweep).
pub const QUARANTINE_ITEMS: &str = "moat_quarantine_items";
/// Bytes the quarantine store holds (messages and sidecars).
pub const QUARANTINE_BYTES: &str = "moat_quarantine_bytes";
/// Quarantine writes, by result.
pub const QUARANTINE_WRITES_TOTAL: &str = "moat_quarantine_writes_total";
/// Quarantined items expired, by reason.
pub const QUARANTINE_EXPIRED_TOTAL: &str = "moat_quarantine_expired_total";
/// Archive copies, by mode and result.
pub const ARCHIVE_COPIES_TOTAL: &str = "moat_archive_copies_total";
/// Bytes the archive directory holds.
pub const ARCHIVE_BYTES: &str = "moat_archive_bytes";
/// Archive files expired, by reason.
pub const ARCHIVE_EXPIRED_TOTAL: &str = "moat_archive_expired_total";
/// State store operations that failed, by kind (docs/fleet.md).
pub const STATE_ERRORS_TOTAL: &str = "moat_state_errors_total";
/// PROXY protocol headers refused, by reason.
pub const PROXY_HEADERS_REFUSED_TOTAL: &str = "moat_proxy_headers_refused_total";
/// Always 1; the `version` label carries the build's version.
pub const BUILD_INFO: &str = "moat_build_info";

/// Buckets for every `*_seconds` histogram: from half a millisecond (a local stage) to a minute (a slow upstream
/// at end of data); roughly ×2–×2.5 steps, which keeps the series count at 16 per label set.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Buckets for [`MESSAGE_BYTES`]: ×4 steps from 1 KiB to 64 MiB, which covers plain notes through large
/// attachments up to common size limits.
pub const MESSAGE_BYTES_BUCKETS: &[f64] =
    &[1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0];

/// How often histogram samples are folded into their buckets when nobody scrapes, so memory stays bounded.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Setting up the recorder failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The exporter refused the configuration, or another recorder was installed first.
    #[error("cannot install the metrics recorder")]
    Install(#[source] BuildError),
    /// A `[metrics]` secret file could not be read.
    #[error("cannot read metrics secret file {}", path.display())]
    Secret {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The credentials `[metrics]` asks the listener to require, or `None`. Reads `bearer_token_file` and
/// `basic_password_file` (blocking: call at start-up); their trailing line ending is ignored.
/// `Config::validate` has already refused contradictory settings; bearer wins if both slipped through.
pub fn http_auth(c: &crate::config::MetricsConfig) -> Result<Option<HttpAuth>, MetricsError> {
    let secret = |inline: &str, file: &std::path::Path| -> Result<String, MetricsError> {
        if file.as_os_str().is_empty() {
            return Ok(inline.to_owned());
        }
        let text =
            std::fs::read_to_string(file).map_err(|source| MetricsError::Secret { path: file.to_owned(), source })?;
        Ok(text.trim_end_matches(['\r', '\n']).to_owned())
    };
    // A configured but empty secret file still requires credentials: an empty secret never matches
    // (fail closed), rather than leaving the listener open.
    if !c.bearer_token.is_empty() || !c.bearer_token_file.as_os_str().is_empty() {
        return Ok(Some(HttpAuth::Bearer(secret(&c.bearer_token, &c.bearer_token_file)?)));
    }
    if c.basic_user.is_empty() {
        return Ok(None);
    }
    let password = secret(&c.basic_password, &c.basic_password_file)?;
    Ok(Some(HttpAuth::Basic { user: c.basic_user.clone(), password }))
}

// === install ===

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static INSTALL: Mutex<()> = Mutex::new(());

/// Whether [`install`] has finished: only then are handles cached ([`Slot`]).
fn installed() -> bool {
    HANDLE.get().is_some()
}

/// Installs the process-wide Prometheus recorder and describes every metric. Idempotent: later calls return
/// a handle to the same registry (several servers in one test binary share it).
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let _guard = INSTALL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(MESSAGE_BYTES.into()), MESSAGE_BYTES_BUCKETS))
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(MetricsError::Install)?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    initialise_series();
    spawn_upkeep(handle.clone());
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Counters whose labels are all closed sets exist from the start at 0, so an alert on their `rate` or
/// `increase` sees the first event (a series born at 1 has no increase) and the names are in `/metrics`
/// before anything happened. Per-listener families start in [`listener_started`].
fn initialise_series() {
    dns::initialise();
    counter!(SPOOL_SPILLED_TOTAL).absolute(0);
    counter!(AUDIT_RECORDS_DROPPED_TOTAL).absolute(0);
    counter!(AUTH_LOCKOUTS_TOTAL).absolute(0);
    counter!(UPSTREAM_CONNECTION_WAIT_TIMEOUTS_TOTAL).absolute(0);
    counter!(ACCOUNT_SUSPENSIONS_TOTAL).absolute(0);
    for &result in GreylistResult::ALL {
        counter!(GREYLIST_TOTAL, "result" => result.as_str()).absolute(0);
    }
    for &mechanism in AuthMechanism::ALL {
        for &result in AuthResult::ALL {
            counter!(AUTH_ATTEMPTS_TOTAL, "mechanism" => mechanism.as_str(), "result" => result.as_str()).absolute(0);
        }
    }
    for &result in ReloadResult::ALL {
        counter!(RULES_RELOAD_TOTAL, "result" => result.as_str()).absolute(0);
        counter!(TLS_RELOAD_TOTAL, "result" => result.as_str()).absolute(0);
        counter!(USERS_RELOAD_TOTAL, "result" => result.as_str()).absolute(0);
    }
    for &kind in UpstreamErrorKind::ALL {
        counter!(UPSTREAM_ERRORS_TOTAL, "kind" => kind.as_str()).absolute(0);
    }
    for &limit in Limit::ALL {
        counter!(LIMIT_HITS_TOTAL, "limit" => limit.as_str()).absolute(0);
    }
    for &kind in StateError::ALL {
        counter!(STATE_ERRORS_TOTAL, "kind" => kind.as_str()).absolute(0);
    }
    for &reason in ProxyRefusal::ALL {
        counter!(PROXY_HEADERS_REFUSED_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
    for &reason in ReverseDnsSkip::ALL {
        counter!(REVERSE_DNS_SKIPPED_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
    for &result in CopyResult::ALL {
        counter!(QUARANTINE_WRITES_TOTAL, "result" => result.as_str()).absolute(0);
        for &mode in ArchiveMode::ALL {
            counter!(ARCHIVE_COPIES_TOTAL, "mode" => mode.as_str(), "result" => result.as_str()).absolute(0);
        }
    }
    for &reason in ExpiryReason::ALL {
        counter!(QUARANTINE_EXPIRED_TOTAL, "reason" => reason.as_str()).absolute(0);
        counter!(ARCHIVE_EXPIRED_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
}

/// Starts the per-listener counters at 0 (every admission result and verdict), for the same reason as
/// [`initialise_series`]. Called once per configured listener at start-up; harmless to repeat.
pub fn listener_started(listener: &str) {
    for &result in ConnResult::ALL {
        counter!(CONNECTIONS_TOTAL, "listener" => listener.to_owned(), "result" => result.as_str()).increment(0);
    }
    for &verdict in MessageVerdict::ALL {
        counter!(MESSAGES_TOTAL, "listener" => listener.to_owned(), "verdict" => verdict.as_str()).increment(0);
    }
    counter!(RECEIVED_BYTES_TOTAL, "listener" => listener.to_owned()).increment(0);
}

/// Histogram samples wait in a buffer until a render or an upkeep folds them in; without a scraper that buffer
/// would grow forever. A plain thread (not a task) keeps this independent of which runtime called `install`.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("moat-metrics-upkeep".into()).spawn(move || loop {
        std::thread::park_timeout(UPKEEP_INTERVAL);
        handle.run_upkeep();
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are folded on scrape only");
    }
}

/// The kind of a metric family, for [`FAMILIES`].
#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every family with its help text and unit (the `# HELP` lines of `/metrics`).
const FAMILIES: &[(&str, Kind, Unit, &str)] = &[
    (CONNECTIONS_TOTAL, Kind::Counter, Unit::Count, "Connections seen by a listener, by admission result."),
    (CONNECTIONS_ACTIVE, Kind::Gauge, Unit::Count, "Connections currently open, per listener."),
    (SESSIONS_CLOSED_TOTAL, Kind::Counter, Unit::Count, "Sessions that ended, by reason."),
    (TLS_HANDSHAKES_TOTAL, Kind::Counter, Unit::Count, "TLS handshakes, by protocol version and result."),
    (COMMANDS_TOTAL, Kind::Counter, Unit::Count, "SMTP commands received, by verb."),
    (MESSAGES_TOTAL, Kind::Counter, Unit::Count, "Transactions that ended, by verdict."),
    (MESSAGE_BYTES, Kind::Histogram, Unit::Bytes, "Size of messages that reached the end of data."),
    (RECEIVED_BYTES_TOTAL, Kind::Counter, Unit::Bytes, "Message bytes received from clients."),
    (RECIPIENTS_TOTAL, Kind::Counter, Unit::Count, "RCPT TO commands, by whether the recipient was accepted."),
    (LIMIT_HITS_TOTAL, Kind::Counter, Unit::Count, "Times a configured limit was reached."),
    (
        LIMIT_EXCEEDED_TOTAL,
        Kind::Counter,
        Unit::Count,
        "Times a [[limit]] of the rule files was exceeded, by limit id.",
    ),
    (STATE_ENTRIES, Kind::Gauge, Unit::Count, "Keys held by the in-memory state store."),
    (GREYLIST_TOTAL, Kind::Counter, Unit::Count, "Greylisting decisions on recipients, by result."),
    (
        ACCOUNT_SUSPENSIONS_TOTAL,
        Kind::Counter,
        Unit::Count,
        "Accounts suspended for sending far out of their baseline.",
    ),
    (UPSTREAM_CONNECT_SECONDS, Kind::Histogram, Unit::Seconds, "Time to connect to the upstream and greet it."),
    (UPSTREAM_TRANSACTION_SECONDS, Kind::Histogram, Unit::Seconds, "Time from upstream DATA to its final reply."),
    (UPSTREAM_ERRORS_TOTAL, Kind::Counter, Unit::Count, "Upstream failures, by kind."),
    (UPSTREAM_REPLIES_TOTAL, Kind::Counter, Unit::Count, "Upstream replies, by phase and reply class."),
    (UPSTREAM_UP, Kind::Gauge, Unit::Count, "1 when the upstream answered its last check, else 0."),
    (UPSTREAM_POOL_IDLE, Kind::Gauge, Unit::Count, "Idle upstream connections in the pool."),
    (UPSTREAM_CONNECTIONS, Kind::Gauge, Unit::Count, "Open upstream connections, in use or idle."),
    (
        UPSTREAM_CONNECTION_WAIT_TIMEOUTS_TOTAL,
        Kind::Counter,
        Unit::Count,
        "Clients refused with 451 4.3.2 after waiting for an upstream connection.",
    ),
    (AUTH_ATTEMPTS_TOTAL, Kind::Counter, Unit::Count, "AUTH attempts, by mechanism and result."),
    (AUTH_LOCKOUTS_TOTAL, Kind::Counter, Unit::Count, "Lockouts after too many AUTH failures."),
    (STAGE_SECONDS, Kind::Histogram, Unit::Seconds, "Time a pipeline stage took for one hook call."),
    (RULES_RELOAD_TOTAL, Kind::Counter, Unit::Count, "Rule reloads, by result."),
    (RULE_HITS_TOTAL, Kind::Counter, Unit::Count, "Rule hits, by rule id."),
    (TLS_CERTIFICATE_EXPIRY, Kind::Gauge, Unit::Seconds, "Expiry of each configured certificate, Unix time."),
    (TLS_RELOAD_TOTAL, Kind::Counter, Unit::Count, "Certificate reloads, by result."),
    (USERS_RELOAD_TOTAL, Kind::Counter, Unit::Count, "Users-file reloads, by result."),
    (SPOOL_MEMORY_BYTES, Kind::Gauge, Unit::Bytes, "Message bytes the spool holds in memory."),
    (SPOOL_DISK_BYTES, Kind::Gauge, Unit::Bytes, "Message bytes in the spool's spill files."),
    (SPOOL_SPILLED_TOTAL, Kind::Counter, Unit::Count, "Messages the spool moved to a temporary file."),
    (AUDIT_RECORDS_DROPPED_TOTAL, Kind::Counter, Unit::Count, "Audit records dropped (queue full or write failed)."),
    (REVERSE_DNS_SKIPPED_TOTAL, Kind::Counter, Unit::Count, "Connections left without a reverse DNS name, by reason."),
    (QUARANTINE_ITEMS, Kind::Gauge, Unit::Count, "Items in the quarantine store."),
    (QUARANTINE_BYTES, Kind::Gauge, Unit::Bytes, "Bytes the quarantine store holds."),
    (QUARANTINE_WRITES_TOTAL, Kind::Counter, Unit::Count, "Quarantine writes, by result."),
    (QUARANTINE_EXPIRED_TOTAL, Kind::Counter, Unit::Count, "Quarantined items expired, by reason."),
    (ARCHIVE_COPIES_TOTAL, Kind::Counter, Unit::Count, "Archive copies, by mode and result."),
    (ARCHIVE_BYTES, Kind::Gauge, Unit::Bytes, "Bytes the archive directory holds."),
    (ARCHIVE_EXPIRED_TOTAL, Kind::Counter, Unit::Count, "Archive files expired, by reason."),
    (STATE_ERRORS_TOTAL, Kind::Counter, Unit::Count, "State store operations that failed, by kind."),
    (PROXY_HEADERS_REFUSED_TOTAL, Kind::Counter, Unit::Count, "PROXY protocol headers refused, by reason."),
    (BUILD_INFO, Kind::Gauge, Unit::Count, "Always 1; the version label carries the build version."),
    (DNS_QUERIES_TOTAL, Kind::Counter, Unit::Count, "DNS list queries, by zone and result."),
    (DNS_CACHE_TOTAL, Kind::Counter, Unit::Count, "DNS cache lookups, by cache and hit or miss."),
    (SENDER_AUTH_TOTAL, Kind::Counter, Unit::Count, "SPF, DKIM, DMARC and ARC results, by method and result."),
    (DKIM_SIGNED_TOTAL, Kind::Counter, Unit::Count, "Submissions DKIM-signed, by result."),
];

fn describe() {
    for &(name, kind, unit, help) in FAMILIES {
        match kind {
            Kind::Counter => describe_counter!(name, unit, help),
            Kind::Gauge => describe_gauge!(name, unit, help),
            Kind::Histogram => describe_histogram!(name, unit, help),
        }
    }
}

// === helpers ===

/// Why a client's reverse DNS lookup was skipped (`server.max_reverse_dns_lookups`, `reverse_dns_timeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReverseDnsSkip {
    /// Every lookup permit was taken (lookups hanging, e.g. during a DNS outage): not even started.
    Busy,
    /// The lookup did not answer within `server.reverse_dns_timeout` (it runs on, holding its permit).
    Timeout,
}

impl ReverseDnsSkip {
    /// Every value, for initialising the series.
    pub const ALL: &'static [ReverseDnsSkip] = &[ReverseDnsSkip::Busy, ReverseDnsSkip::Timeout];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReverseDnsSkip::Busy => "busy",
            ReverseDnsSkip::Timeout => "timeout",
        }
    }
}

/// Counts a failed state store operation.
pub fn state_error(kind: StateError) {
    counter!(STATE_ERRORS_TOTAL, "kind" => kind.as_str()).increment(1);
}

/// Counts a connection closed because of its PROXY protocol header.
pub fn proxy_header_refused(reason: ProxyRefusal) {
    counter!(PROXY_HEADERS_REFUSED_TOTAL, "reason" => reason.as_str()).increment(1);
}

/// Counts a connection that went on without a reverse DNS name.
pub fn reverse_dns_skipped(reason: ReverseDnsSkip) {
    counter!(REVERSE_DNS_SKIPPED_TOTAL, "reason" => reason.as_str()).increment(1);
}

/// Counts a connection by admission result.
pub fn connection(listener: &str, result: ConnResult) {
    counter!(CONNECTIONS_TOTAL, "listener" => listener.to_owned(), "result" => result.as_str()).increment(1);
}

/// Marks a connection open on `listener` until the returned guard is dropped.
pub fn connection_active(listener: &str) -> ActiveConnection {
    let gauge = gauge!(CONNECTIONS_ACTIVE, "listener" => listener.to_owned());
    gauge.increment(1.0);
    ActiveConnection { gauge }
}

/// Keeps [`CONNECTIONS_ACTIVE`] raised while alive; dropping it (even when the task is cut off) lowers it.
#[must_use = "the connection counts as active only while the guard lives"]
#[derive(Debug)]
pub struct ActiveConnection {
    gauge: Gauge,
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// Counts a finished session.
pub fn session_closed(listener: &str, reason: CloseReason) {
    counter!(SESSIONS_CLOSED_TOTAL, "listener" => listener.to_owned(), "reason" => reason.as_str()).increment(1);
}

/// Counts a TLS handshake.
pub fn tls_handshake(listener: &str, version: TlsVersion, result: TlsResult) {
    counter!(TLS_HANDSHAKES_TOTAL, "listener" => listener.to_owned(), "version" => version.as_str(), "result" => result.as_str())
        .increment(1);
}

static COMMANDS: [Slot<Counter>; Verb::COUNT] = [const { Slot::new() }; Verb::COUNT];

/// Counts a command by verb.
pub fn command(verb: Verb) {
    COMMANDS[verb.index()].with(|| counter!(COMMANDS_TOTAL, "command" => verb.as_str()), |c| c.increment(1));
}

/// Counts a finished transaction; its size goes into [`MESSAGE_BYTES`] unless it was aborted before the end
/// of data.
pub fn message(listener: &str, verdict: MessageVerdict, size: u64) {
    counter!(MESSAGES_TOTAL, "listener" => listener.to_owned(), "verdict" => verdict.as_str()).increment(1);
    message_bytes(verdict, size);
}

static MESSAGE_BYTES_HISTOGRAM: Slot<Histogram> = Slot::new();

/// The [`MESSAGE_BYTES`] half of [`message`].
fn message_bytes(verdict: MessageVerdict, size: u64) {
    if verdict != MessageVerdict::Aborted {
        MESSAGE_BYTES_HISTOGRAM.with(|| histogram!(MESSAGE_BYTES), |h| h.record(size as f64));
    }
}

/// Adds message bytes received from a client.
pub fn received_bytes(listener: &str, bytes: u64) {
    counter!(RECEIVED_BYTES_TOTAL, "listener" => listener.to_owned()).increment(bytes);
}

/// Counts a RCPT TO by the reply the client got.
pub fn recipient(listener: &str, result: RcptResult) {
    counter!(RECIPIENTS_TOTAL, "listener" => listener.to_owned(), "result" => result.as_str()).increment(1);
}

/// Counts a limit being reached.
pub fn limit_hit(limit: Limit) {
    counter!(LIMIT_HITS_TOTAL, "limit" => limit.as_str()).increment(1);
}

/// Counts a rule-file limit being exceeded (ids come from the loaded rules, never from mail).
pub fn limit_exceeded(id: &str) {
    counter!(LIMIT_EXCEEDED_TOTAL, "limit" => id.to_string()).increment(1);
}

/// Sets the state store's key count.
pub fn state_entries(n: usize) {
    gauge!(STATE_ENTRIES).set(n as f64);
}

/// Counts a greylisting decision.
pub fn greylist(result: GreylistResult) {
    counter!(GREYLIST_TOTAL, "result" => result.as_str()).increment(1);
}

/// Counts an account suspension.
pub fn account_suspended() {
    counter!(ACCOUNT_SUSPENSIONS_TOTAL).increment(1);
}

/// Records how long opening an upstream connection took.
pub fn upstream_connect_seconds(elapsed: Duration) {
    histogram!(UPSTREAM_CONNECT_SECONDS).record(elapsed.as_secs_f64());
}

/// Records how long relaying one message took (DATA to final reply).
pub fn upstream_transaction_seconds(elapsed: Duration) {
    static HISTOGRAM: Slot<Histogram> = Slot::new();
    HISTOGRAM.with(|| histogram!(UPSTREAM_TRANSACTION_SECONDS), |h| h.record(elapsed.as_secs_f64()));
}

/// Counts an upstream failure.
pub fn upstream_error(kind: UpstreamErrorKind) {
    counter!(UPSTREAM_ERRORS_TOTAL, "kind" => kind.as_str()).increment(1);
}

/// Counts an upstream reply by class; codes outside 2xx/4xx/5xx (such as `354`) are not counted.
pub fn upstream_reply(phase: UpstreamPhase, code: u16) {
    const CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];
    static REPLIES: [[Slot<Counter>; CLASSES.len()]; UpstreamPhase::COUNT] =
        [const { [const { Slot::new() }; CLASSES.len()] }; UpstreamPhase::COUNT];
    let class = match code / 100 {
        2 => 0,
        4 => 1,
        5 => 2,
        _ => return,
    };
    REPLIES[phase.index()][class].with(
        || counter!(UPSTREAM_REPLIES_TOTAL, "phase" => phase.as_str(), "class" => CLASSES[class]),
        |c| c.increment(1),
    );
}

/// Sets whether the upstream is reachable (the health check, or a relay connect).
pub fn upstream_up(up: bool) {
    gauge!(UPSTREAM_UP).set(if up { 1.0 } else { 0.0 });
}

/// Counts an AUTH attempt. `mechanism` is the SASL mechanism name (`PLAIN`, `LOGIN`, any case); names
/// outside that closed set are not counted, so a client cannot create series.
pub fn auth_attempt(mechanism: &str, result: AuthResult) {
    let Some(mechanism) = AuthMechanism::from_name(mechanism) else { return };
    counter!(AUTH_ATTEMPTS_TOTAL, "mechanism" => mechanism.as_str(), "result" => result.as_str()).increment(1);
}

/// Counts a lockout (a client locked, or a login name throttled, after too many AUTH failures).
pub fn auth_lockout() {
    counter!(AUTH_LOCKOUTS_TOTAL).increment(1);
}

/// Sets the number of idle pooled upstream connections.
pub fn upstream_pool_idle(idle: usize) {
    gauge!(UPSTREAM_POOL_IDLE).set(idle as f64);
}

/// Sets the number of open upstream connections.
pub fn upstream_connections(open: usize) {
    gauge!(UPSTREAM_CONNECTIONS).set(open as f64);
}

/// Counts a client that waited too long for an upstream connection.
pub fn upstream_connection_wait_timeout() {
    counter!(UPSTREAM_CONNECTION_WAIT_TIMEOUTS_TOTAL).increment(1);
}

/// Records one stage hook's duration. `stage` is the stage's static name (closed by the code, not by input).
pub fn stage_seconds(stage: &'static str, elapsed: Duration) {
    histogram!(STAGE_SECONDS, "stage" => stage).record(elapsed.as_secs_f64());
}

/// As [`stage_seconds`], through the stage's cached handle.
pub fn stage_seconds_cached(timer: &StageTimer, stage: &'static str, elapsed: Duration) {
    timer.with(|| histogram!(STAGE_SECONDS, "stage" => stage), |h| h.record(elapsed.as_secs_f64()));
}

/// Counts a rules reload.
pub fn rules_reload(result: ReloadResult) {
    counter!(RULES_RELOAD_TOTAL, "result" => result.as_str()).increment(1);
}

/// Counts a hit of the rule `id` (ids come from the loaded rule files, never from mail).
pub fn rule_hit(id: &str) {
    counter!(RULE_HITS_TOTAL, "rule" => id.to_string()).increment(1);
}

/// Counts a certificate reload.
pub fn tls_reload(result: ReloadResult) {
    counter!(TLS_RELOAD_TOTAL, "result" => result.as_str()).increment(1);
}

/// Counts a users-file reload.
pub fn users_reload(result: ReloadResult) {
    counter!(USERS_RELOAD_TOTAL, "result" => result.as_str()).increment(1);
}

/// Sets when the certificate `name` (its first configured DNS name) expires, in Unix seconds.
pub fn tls_certificate_expiry(name: &str, not_after_unix: i64) {
    gauge!(TLS_CERTIFICATE_EXPIRY, "name" => name.to_owned()).set(not_after_unix as f64);
}

/// Sets how many message bytes the spool holds in memory.
pub fn spool_memory(bytes: usize) {
    gauge!(SPOOL_MEMORY_BYTES).set(bytes as f64);
}

/// Counts a message spilled from memory to a temporary file.
/// Sets the bytes in spill files.
pub fn spool_disk(bytes: u64) {
    gauge!(SPOOL_DISK_BYTES).set(bytes as f64);
}

/// Counts a message moved to a spill file.
pub fn spool_spilled() {
    counter!(SPOOL_SPILLED_TOTAL).increment(1);
}

/// Counts a quarantine write.
pub fn quarantine_write(result: CopyResult) {
    counter!(QUARANTINE_WRITES_TOTAL, "result" => result.as_str()).increment(1);
}

/// Sets the quarantine store's size.
pub fn quarantine_size(items: usize, bytes: u64) {
    gauge!(QUARANTINE_ITEMS).set(items as f64);
    gauge!(QUARANTINE_BYTES).set(bytes as f64);
}

/// Counts quarantined items that expired.
pub fn quarantine_expired(reason: ExpiryReason, n: u64) {
    counter!(QUARANTINE_EXPIRED_TOTAL, "reason" => reason.as_str()).increment(n);
}

/// Counts an archive copy.
pub fn archive_copy(mode: ArchiveMode, result: CopyResult) {
    counter!(ARCHIVE_COPIES_TOTAL, "mode" => mode.as_str(), "result" => result.as_str()).increment(1);
}

/// Sets the archive directory's size.
pub fn archive_size(bytes: u64) {
    gauge!(ARCHIVE_BYTES).set(bytes as f64);
}

/// Counts archive files that expired.
pub fn archive_expired(reason: ExpiryReason, n: u64) {
    counter!(ARCHIVE_EXPIRED_TOTAL, "reason" => reason.as_str()).increment(n);
}

/// Counts an audit record that was dropped.
pub fn audit_record_dropped() {
    counter!(AUDIT_RECORDS_DROPPED_TOTAL).increment(1);
}

// === readiness ===

/// What `/readyz` reports. Cheap to clone; all clones share the same flags.
///
/// Defaults: listeners not yet bound, rules loaded (there are none to wait for yet), upstream ok (it is marked
/// down when it fails, not probed up front).
#[derive(Clone, Debug)]
pub struct Readiness {
    flags: Arc<Flags>,
}

#[derive(Debug)]
struct Flags {
    listeners_bound: AtomicBool,
    rules_loaded: AtomicBool,
    upstream_ok: AtomicBool,
    /// The shared state store answers; when it does not, moat still serves (each feature follows
    /// `state.on_error`) and `/readyz` says it is degraded.
    state_ok: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            flags: Arc::new(Flags {
                listeners_bound: AtomicBool::new(false),
                rules_loaded: AtomicBool::new(true),
                upstream_ok: AtomicBool::new(true),
                state_ok: AtomicBool::new(true),
            }),
        }
    }
}

impl Readiness {
    /// A fresh set of flags with the defaults above.
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// Whether every SMTP listener is bound.
    pub fn set_listeners_bound(&self, bound: bool) {
        self.flags.listeners_bound.store(bound, Ordering::Relaxed);
    }

    /// Whether a valid rule set is in force.
    pub fn set_rules_loaded(&self, loaded: bool) {
        self.flags.rules_loaded.store(loaded, Ordering::Relaxed);
    }

    /// Whether the upstream answers; also sets [`UPSTREAM_UP`]. Logs when the state changes.
    pub fn set_upstream_ok(&self, ok: bool) {
        let was = self.flags.upstream_ok.swap(ok, Ordering::Relaxed);
        upstream_up(ok);
        match (was, ok) {
            (true, false) => tracing::warn!("upstream unreachable; /readyz reports not ready"),
            (false, true) => tracing::info!("upstream reachable again"),
            _ => {}
        }
    }

    /// Whether the state store answers; logs when that changes.
    pub fn set_state_ok(&self, ok: bool) {
        match (self.flags.state_ok.swap(ok, Ordering::Relaxed), ok) {
            (true, false) => tracing::warn!("state store unreachable; /readyz reports degraded"),
            (false, true) => tracing::info!("state store reachable again"),
            _ => {}
        }
    }

    /// What works less well than configured while moat still serves (empty when nothing).
    pub fn degraded(&self) -> Vec<&'static str> {
        if self.flags.state_ok.load(Ordering::Relaxed) {
            Vec::new()
        } else {
            vec!["state store unreachable"]
        }
    }

    /// True when nothing is missing.
    pub fn is_ready(&self) -> bool {
        self.reasons().is_empty()
    }

    /// What is not ready, one short phrase each (empty when ready).
    pub fn reasons(&self) -> Vec<&'static str> {
        let f = &self.flags;
        [
            (f.listeners_bound.load(Ordering::Relaxed), "listeners not bound"),
            (f.rules_loaded.load(Ordering::Relaxed), "rules not loaded"),
            (f.upstream_ok.load(Ordering::Relaxed), "upstream unreachable"),
        ]
        .into_iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, reason)| reason)
        .collect()
    }
}

#[cfg(test)]
mod tests;
