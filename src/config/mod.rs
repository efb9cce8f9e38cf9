//! The configuration file (`config/moat.toml`): typed sections with defaults, loading, and validation.
//!
//! Every key has a default, so an empty file is a valid configuration. Unknown keys are refused (a typo
//! must not silently fall back to a default). [`Config::validate`] reports every problem at once, each
//! with the file and line it came from when known, as `moat check` prints them.

pub mod accounts;
pub mod proxy;
pub mod state;
pub mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use accounts::AccountsConfig;
pub use state::{StateBackend, StateConfig};
pub use units::{ByteSize, Span};

/// The hard ceiling for `limits.max_command_line`: no command or reply needs more (smtp-proto caps at 4096 too).
pub const MAX_COMMAND_LINE_CAP: usize = 4096;

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    pub tls: TlsConfig,
    pub upstream: UpstreamConfig,
    pub limits: Limits,
    pub spool: SpoolConfig,
    pub trace: TraceConfig,
    pub metrics: MetricsConfig,
    pub audit: AuditConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub auth: AuthConfig,
    pub relay: RelayConfig,
    pub rules: RulesConfig,
    pub state: StateConfig,
    pub accounts: AccountsConfig,
}

/// `[rules]`: the rule files and content scanning (docs/rules.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// The directory of `*.toml` rule files (loaded in file-name order); empty disables rules.
    pub directory: PathBuf,
    /// How much of a message the content rules read; the rest is relayed unscanned.
    pub scan_window: ByteSize,
    /// What happens to a message larger than `scan_window`.
    pub oversize_policy: OversizePolicy,
    /// Where `quarantine` rules write messages; empty: the `quarantine` subdirectory of `directory`.
    pub quarantine_dir: PathBuf,
    /// How often the rules directory is polled for changes; 0 disables the watcher (SIGHUP still works).
    pub watch_interval: Span,
}

/// `rules.oversize_policy`: a message past the scan window.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OversizePolicy {
    /// Relay it with `X-Moat-Scan: partial`.
    #[default]
    PassWithHeader,
    /// `451 4.7.1`.
    Tempfail,
    /// `552 5.3.4`.
    Reject,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            directory: PathBuf::from("rules"),
            scan_window: ByteSize(25 * 1024 * 1024),
            oversize_policy: OversizePolicy::PassWithHeader,
            quarantine_dir: PathBuf::new(),
            watch_interval: secs(2),
        }
    }
}

/// `[auth]`: SMTP AUTH (docs/auth.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The users file; empty disables AUTH (submission listeners then refuse MAIL with `530`).
    pub users_file: PathBuf,
    /// Password verifications running at once; 0 means the number of cores.
    pub max_concurrent_verifications: usize,
    /// Failures per client key within `lockout_window` that lock it; failures per login name from unknown
    /// clients that throttle the name for them (`auth::lockout`).
    pub lockout_threshold: u32,
    pub lockout_window: Span,
    pub lockout_duration: Span,
    /// Delay before answering a failed attempt; doubles with each failure in the window (at most 8 s).
    pub failure_delay: Span,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users_file: PathBuf::new(),
            max_concurrent_verifications: 0,
            lockout_threshold: 5,
            lockout_window: secs(600),
            lockout_duration: secs(900),
            failure_delay: Span(Duration::from_millis(500)),
        }
    }
}

/// `[relay]`: where unauthenticated mail may go.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Domains an `mx` listener takes unauthenticated mail for: exact names, or `.example.org` for every
    /// subdomain of example.org (as Postfix writes it). Empty: unauthenticated RCPT is always refused.
    pub local_domains: Vec<String>,
}

/// `[audit]`: where the per-transaction audit records go.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `"stdout"`, `"off"`, or a file path (reopened on SIGUSR1 for log rotation).
    pub destination: String,
    /// Records waiting to be written; past this they are dropped and counted, never blocking a session.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { destination: "stdout".into(), queue: 4096 }
    }
}

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
}

/// The most `server.max_reverse_dns_lookups` may be: half of tokio's blocking pool (512 threads), so hanging
/// lookups can never starve the spool's file I/O and rule reloads.
pub const MAX_REVERSE_DNS_LOOKUPS_CAP: usize = 256;

/// How a listener speaks TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerMode {
    /// Plaintext, STARTTLS offered (RFC 3207).
    Starttls,
    /// TLS from the first byte (RFC 8314).
    ImplicitTls,
    /// Plaintext only; for loopback tests.
    Plain,
}

/// What kind of mail a listener takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Mail from the internet to local domains; AUTH optional.
    Mx,
    /// Mail from the organisation's users; AUTH required before MAIL.
    Submission,
}

/// One `[[listener]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    #[serde(default = "default_mode")]
    pub mode: ListenerMode,
    #[serde(default = "default_role")]
    pub role: Role,
    /// Refuse MAIL before TLS with `530 5.7.0`.
    #[serde(default)]
    pub require_tls: bool,
    /// Offer AUTH before TLS too (loopback tests only: the password would cross the network in clear).
    #[serde(default)]
    pub auth_without_tls: bool,
    /// Connections start with a PROXY protocol header from a load balancer (docs/fleet.md).
    #[serde(default)]
    pub proxy_protocol: proxy::ProxyProtocol,
    /// The balancers' networks (CIDRs): the only sources whose header is believed.
    #[serde(default)]
    pub proxy_trusted: Vec<String>,
}

fn default_mode() -> ListenerMode {
    ListenerMode::Starttls
}
fn default_role() -> Role {
    Role::Mx
}

/// One certificate chain and its key, both PEM files.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Oldest TLS protocol version offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// `[tls]`: the server side of TLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificates chosen by SNI; the first is the default. Empty: a generated self-signed one.
    pub certificates: Vec<CertificateConfig>,
    pub min_version: TlsVersion,
    pub handshake_timeout: Span,
}

/// How the client's identity is passed to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Identity {
    /// Postfix XCLIENT: NAME, ADDR, PORT, PROTO, HELO (and LOGIN).
    Xclient,
    /// HAProxy PROXY protocol version 2 header at connection start.
    ProxyV2,
    /// Nothing: the upstream sees moat's own address.
    None,
}

/// `[upstream]`: the MTA behind moat.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub address: SocketAddr,
    pub identity: Identity,
    pub helo_name: String,
    pub pool_size: usize,
    pub pool_idle_timeout: Span,
    /// Most upstream connections open at once (pooled ones included); below Postfix's process limit.
    pub max_connections: usize,
    /// How long a client waits for an upstream connection when all are in use (then `451 4.3.2`).
    pub connection_wait: Span,
    pub connect_timeout: Span,
    pub command_timeout: Span,
    pub data_timeout: Span,
    /// STARTTLS to the upstream.
    pub tls: UpstreamTlsMode,
    /// How the upstream's certificate is checked.
    pub tls_verify: UpstreamTlsVerify,
    /// CA certificates (PEM) for `tls_verify = "ca-file"`.
    pub tls_ca_file: PathBuf,
    /// The name the upstream's certificate must carry (and the SNI sent). Empty: the host of `address`.
    pub tls_server_name: String,
}

/// Whether moat uses STARTTLS towards the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    /// Plaintext, even when STARTTLS is offered.
    Off,
    /// STARTTLS when the upstream offers it, plaintext when it does not. A failed handshake or
    /// certificate check is still a failure (no downgrade after a failed handshake).
    Opportunistic,
    /// STARTTLS or no relay: an upstream that does not offer it is a failure.
    Required,
}

/// How the upstream's certificate is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsVerify {
    /// Against the operating system's trust store.
    System,
    /// Against the CA certificates in `tls_ca_file`.
    CaFile,
    /// Not at all (only the handshake signature is checked); allowed only for a loopback upstream.
    InsecureLoopback,
}

/// What to do with bare LF / bare CR inside message data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BareLineEndings {
    /// Answer `550 5.6.0` at end of data.
    Reject,
    /// Turn each into CRLF.
    Normalize,
}

/// `[limits]`: every bound a client can run into.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// IPv6 clients are counted per prefix of this many bits by every per-client bound (`client_key`).
    pub ipv6_client_prefix: u8,
    pub max_message_size: ByteSize,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub max_command_line: usize,
    pub max_text_line: usize,
    pub bare_line_endings: BareLineEndings,
    pub idle_timeout: Span,
    pub data_timeout: Span,
    pub session_timeout: Span,
}

/// `[spool]`: where message data waits for its verdict.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub memory_threshold: ByteSize,
    pub memory_budget: ByteSize,
    pub directory: PathBuf,
}

/// `[trace]`: what moat adds to relayed messages.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    pub received_header: bool,
}

/// `[metrics]`: the Prometheus and health listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Empty disables the listener.
    pub address: String,
    /// How often the upstream is checked for `/readyz` (connect, greeting, QUIT).
    pub upstream_check_interval: Span,
    /// `Authorization: Bearer` token the listener requires (all but `/healthz`); empty: none.
    pub bearer_token: String,
    /// A file holding the bearer token (trailing newline ignored); instead of `bearer_token`.
    pub bearer_token_file: PathBuf,
    /// Basic auth user name; needs `basic_password` or `basic_password_file`.
    pub basic_user: String,
    pub basic_password: String,
    /// A file holding the basic auth password (trailing newline ignored); instead of `basic_password`.
    pub basic_password_file: PathBuf,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Human,
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// `[shutdown]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub grace_period: Span,
}

// === defaults ===

fn secs(n: u64) -> Span {
    Span(Duration::from_secs(n))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            listeners: vec![ListenerConfig {
                name: "smtp".into(),
                address: SocketAddr::from(([127, 0, 0, 1], 2525)),
                mode: ListenerMode::Starttls,
                role: Role::Mx,
                require_tls: false,
                auth_without_tls: false,
                proxy_protocol: proxy::ProxyProtocol::Off,
                proxy_trusted: Vec::new(),
            }],
            tls: TlsConfig::default(),
            upstream: UpstreamConfig::default(),
            limits: Limits::default(),
            spool: SpoolConfig::default(),
            trace: TraceConfig::default(),
            metrics: MetricsConfig::default(),
            audit: AuditConfig::default(),
            log: LogConfig::default(),
            shutdown: ShutdownConfig::default(),
            auth: AuthConfig::default(),
            relay: RelayConfig::default(),
            rules: RulesConfig::default(),
            state: StateConfig::default(),
            accounts: AccountsConfig::default(),
        }
    }
}

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
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { certificates: Vec::new(), min_version: TlsVersion::V1_2, handshake_timeout: secs(10) }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 10025)),
            identity: Identity::Xclient,
            helo_name: String::new(),
            pool_size: 32,
            pool_idle_timeout: secs(30),
            max_connections: 80,
            connection_wait: secs(10),
            connect_timeout: secs(10),
            command_timeout: secs(60),
            data_timeout: secs(300),
            tls: UpstreamTlsMode::Off,
            tls_verify: UpstreamTlsVerify::System,
            tls_ca_file: PathBuf::new(),
            tls_server_name: String::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1000,
            max_connections_per_ip: 50,
            ipv6_client_prefix: crate::client_key::DEFAULT_IPV6_PREFIX,
            max_message_size: ByteSize(50 << 20),
            max_recipients: 100,
            max_errors: 10,
            max_command_line: 512,
            max_text_line: 1000,
            bare_line_endings: BareLineEndings::Reject,
            idle_timeout: secs(300),
            data_timeout: secs(180),
            session_timeout: secs(1800),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            memory_threshold: ByteSize(256 << 10),
            memory_budget: ByteSize(256 << 20),
            directory: PathBuf::new(),
        }
    }
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig { received_header: true }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: "127.0.0.1:9925".into(),
            upstream_check_interval: secs(10),
            bearer_token: String::new(),
            bearer_token_file: PathBuf::new(),
            basic_user: String::new(),
            basic_password: String::new(),
            basic_password_file: PathBuf::new(),
        }
    }
}

impl MetricsConfig {
    /// Problems with the listener's credentials, as `(key, message)`: at most one way to give each secret,
    /// not bearer and basic at once, a basic user with a password and no password without a user, files that
    /// exist, and a positive check interval.
    fn auth_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let token_file = !self.bearer_token_file.as_os_str().is_empty();
        let password_file = !self.basic_password_file.as_os_str().is_empty();
        let bearer = !self.bearer_token.is_empty() || token_file;
        let password = !self.basic_password.is_empty() || password_file;
        if !self.bearer_token.is_empty() && token_file {
            out.push(("bearer_token_file", "metrics.bearer_token and metrics.bearer_token_file are both set".into()));
        }
        if !self.basic_password.is_empty() && password_file {
            out.push((
                "basic_password_file",
                "metrics.basic_password and metrics.basic_password_file are both set".into(),
            ));
        }
        if !self.basic_user.is_empty() && !password {
            out.push(("basic_user", "metrics.basic_user needs metrics.basic_password or basic_password_file".into()));
        }
        if self.basic_user.is_empty() && password {
            out.push(("basic_user", "metrics.basic_password is set but metrics.basic_user is empty".into()));
        }
        if self.basic_user.contains(':') {
            out.push(("basic_user", "metrics.basic_user must not contain ':'".into()));
        }
        if bearer && (password || !self.basic_user.is_empty()) {
            out.push(("bearer_token", "metrics: set either a bearer token or basic auth, not both".into()));
        }
        for (key, path) in
            [("bearer_token_file", &self.bearer_token_file), ("basic_password_file", &self.basic_password_file)]
        {
            if !path.as_os_str().is_empty() && !path.is_file() {
                out.push((key, format!("metrics.{key} {} does not exist", path.display())));
            }
        }
        if self.upstream_check_interval.get().is_zero() {
            out.push(("upstream_check_interval", "metrics.upstream_check_interval must be positive".into()));
        }
        out
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Human, level: "info".into() }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_period: secs(30) }
    }
}

// === errors ===

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", location(.file, .line))]
pub struct ConfigProblem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

fn location(file: &Path, line: &Option<usize>) -> String {
    match line {
        Some(l) => format!("{}:{l}: ", file.display()),
        None => format!("{}: ", file.display()),
    }
}

/// Why a configuration could not be used: every problem found, not only the first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), render(.0))]
    Invalid(Vec<ConfigProblem>),
}

fn render(problems: &[ConfigProblem]) -> String {
    problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n")
}

impl ConfigError {
    /// The individual problems (empty for a read error).
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid(p) => p,
            ConfigError::Read { .. } => &[],
        }
    }
}

// === impl Config ===

impl Config {
    /// Reads and validates a configuration file. Blocking: call it at start-up or from `spawn_blocking`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` names it in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            ConfigError::Invalid(vec![ConfigProblem { file: path.to_owned(), line, message: e.message().to_string() }])
        })?;
        let problems = config.validate(text, path);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Checks what serde cannot: ranges, cross-field consistency, file existence. Returns every problem.
    pub fn validate(&self, text: &str, path: &Path) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, message: String| {
            out.push(ConfigProblem { file: path.to_owned(), line: find_key(text, key), message })
        };
        if self.listeners.is_empty() {
            bad("listener", "at least one [[listener]] is required".into());
        }
        for (key, message) in self.state.problems() {
            bad(key, message);
        }
        for (key, message) in self.accounts.problems() {
            bad(key, message);
        }
        for l in &self.listeners {
            for message in proxy::problems(&l.name, l.proxy_protocol, &l.proxy_trusted) {
                bad("proxy_trusted", message);
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty() || !l.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                bad(
                    "name",
                    format!("listener #{} name {:?} must be non-empty letters, digits, '-' or '_'", i + 1, l.name),
                );
            }
            if self.listeners[..i].iter().any(|o| o.name == l.name) {
                bad("name", format!("listener name {:?} is used twice", l.name));
            }
            if l.address.port() != 0 && self.listeners[..i].iter().any(|o| o.address == l.address) {
                bad("address", format!("listener address {} is used twice", l.address));
            }
            if l.mode == ListenerMode::Plain && l.require_tls {
                bad(
                    "require_tls",
                    format!("listener {:?} has mode \"plain\" but require_tls = true: no client could send", l.name),
                );
            }
        }
        let lookups = self.server.max_reverse_dns_lookups;
        if !(1..=MAX_REVERSE_DNS_LOOKUPS_CAP).contains(&lookups) {
            bad(
                "max_reverse_dns_lookups",
                format!(
                    "server.max_reverse_dns_lookups must be between 1 and {MAX_REVERSE_DNS_LOOKUPS_CAP}, not {lookups} \
                     (set server.reverse_dns = false to turn lookups off)"
                ),
            );
        }
        let lim = &self.limits;
        if lim.max_command_line < 512 || lim.max_command_line > MAX_COMMAND_LINE_CAP {
            bad("max_command_line", format!("limits.max_command_line must be between 512 and {MAX_COMMAND_LINE_CAP} (RFC 5321 4.5.3.1.4), not {}", lim.max_command_line));
        }
        if lim.max_text_line != 0 && lim.max_text_line < 1000 {
            bad(
                "max_text_line",
                format!(
                    "limits.max_text_line must be 0 (off) or at least 1000 (RFC 5321 4.5.3.1.6), not {}",
                    lim.max_text_line
                ),
            );
        }
        for (key, v) in [
            ("max_connections", lim.max_connections),
            ("max_connections_per_ip", lim.max_connections_per_ip),
            ("max_recipients", lim.max_recipients),
        ] {
            if v == 0 {
                bad(key, format!("limits.{key} must be at least 1"));
            }
        }
        if !(32..=128).contains(&lim.ipv6_client_prefix) {
            let p = lim.ipv6_client_prefix;
            bad("ipv6_client_prefix", format!("limits.ipv6_client_prefix must be between 32 and 128, not {p}"));
        }
        if lim.max_recipients < 100 {
            // RFC 5321 4.5.3.1.8 asks servers to accept at least 100; allowed, but worth knowing.
            tracing::debug!("limits.max_recipients is below the RFC 5321 minimum of 100");
        }
        if lim.max_message_size.bytes() == 0 {
            bad("max_message_size", "limits.max_message_size must be positive".into());
        }
        if self.spool.memory_budget.bytes() < 64 * 1024 {
            bad("memory_budget", "spool.memory_budget must be at least 64KiB (a scan or spool needs room)".into());
        }
        if self.spool.memory_threshold > self.spool.memory_budget {
            bad("memory_threshold", "spool.memory_threshold is larger than spool.memory_budget".into());
        }
        for (key, d) in [
            ("idle_timeout", lim.idle_timeout),
            ("data_timeout", lim.data_timeout),
            ("session_timeout", lim.session_timeout),
        ] {
            if d.get().is_zero() {
                bad(key, format!("limits.{key} must be positive"));
            }
        }
        let up = &self.upstream;
        for (key, d) in [
            ("connect_timeout", up.connect_timeout),
            ("command_timeout", up.command_timeout),
            ("data_timeout", up.data_timeout),
        ] {
            if d.get().is_zero() {
                bad(key, format!("upstream.{key} must be positive"));
            }
        }
        if up.max_connections == 0 {
            bad("max_connections", "upstream.max_connections must be at least 1".into());
        }
        if self.listeners.iter().any(|l| l.address == up.address) {
            bad(
                "address",
                format!("upstream.address {} is also a listener address: moat would relay to itself", up.address),
            );
        }
        if up.tls_verify == UpstreamTlsVerify::InsecureLoopback && !up.address.ip().is_loopback() {
            bad(
                "tls_verify",
                format!(
                    "upstream.tls_verify = \"insecure-loopback\" is only allowed for a loopback upstream, not {}",
                    up.address
                ),
            );
        }
        match (up.tls_verify, up.tls_ca_file.as_os_str().is_empty()) {
            (UpstreamTlsVerify::CaFile, true) => {
                bad("tls_verify", "upstream.tls_verify = \"ca-file\" needs upstream.tls_ca_file".into())
            }
            (UpstreamTlsVerify::CaFile, false) if !up.tls_ca_file.is_file() => {
                bad("tls_ca_file", format!("upstream.tls_ca_file {} does not exist", up.tls_ca_file.display()))
            }
            (UpstreamTlsVerify::System | UpstreamTlsVerify::InsecureLoopback, false) => {
                bad("tls_ca_file", "upstream.tls_ca_file is set but upstream.tls_verify is not \"ca-file\"".into())
            }
            _ => {}
        }
        if !up.tls_server_name.is_empty()
            && rustls::pki_types::ServerName::try_from(up.tls_server_name.as_str()).is_err()
        {
            bad(
                "tls_server_name",
                format!("upstream.tls_server_name {:?} is not a DNS name or IP address", up.tls_server_name),
            );
        }
        for c in &self.tls.certificates {
            for p in [&c.cert, &c.key] {
                if !p.is_file() {
                    bad("certificates", format!("tls certificate file {} does not exist", p.display()));
                }
            }
        }
        if !self.metrics.address.is_empty() && self.metrics.address.parse::<SocketAddr>().is_err() {
            bad("address", format!("metrics.address {:?} is not an address:port", self.metrics.address));
        }
        for (key, problem) in self.metrics.auth_problems() {
            bad(key, problem);
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            bad("level", format!("log.level {:?} is not a valid filter", self.log.level));
        }
        let auth = &self.auth;
        if !auth.users_file.as_os_str().is_empty() && !auth.users_file.is_file() {
            bad("users_file", format!("auth.users_file {} does not exist", auth.users_file.display()));
        }
        if auth.lockout_threshold == 0 {
            bad("lockout_threshold", "auth.lockout_threshold must be at least 1".into());
        }
        for d in &self.relay.local_domains {
            let name = d.strip_prefix('.').unwrap_or(d);
            if name.is_empty() || name.contains(['@', ' ', '[']) || name.starts_with('.') {
                bad("local_domains", format!("relay.local_domains entry {d:?} is not a domain or .domain"));
            }
        }
        if !self.spool.directory.as_os_str().is_empty() && !self.spool.directory.is_dir() {
            bad("directory", format!("spool.directory {} is not a directory", self.spool.directory.display()));
        }
        out
    }

    /// The host name moat calls itself.
    pub fn hostname(&self) -> String {
        if !self.server.hostname.is_empty() {
            return self.server.hostname.clone();
        }
        system_hostname()
    }
}

/// The machine's host name from the kernel, or `localhost`.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Best-effort line of the first uncommented `key =` in the text, for pointing at a problem.
fn find_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            !l.starts_with('#')
                && (l.strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('='))
                    || l.trim_start_matches('[').starts_with(key))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_valid() {
        let c = parse("").unwrap();
        assert_eq!(c.limits.max_command_line, 512);
        assert_eq!(c.listeners.len(), 1);
    }

    #[test]
    fn shipped_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/moat.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.listeners.len(), 3);
        assert_eq!(c.listeners[2].mode, ListenerMode::ImplicitTls);
    }

    #[test]
    fn unknown_key_is_refused_with_line() {
        let e = parse("[limits]\nmax_recipients = 10\nmax_recipents = 3\n").unwrap_err();
        let p = &e.problems()[0];
        assert_eq!(p.line, Some(3), "{e}");
        assert!(p.message.contains("max_recipents"), "{e}");
    }

    #[test]
    fn every_problem_is_reported() {
        let e = parse("[limits]\nmax_command_line = 100\nmax_text_line = 10\nmax_recipients = 0\n").unwrap_err();
        assert_eq!(e.problems().len(), 3, "{e}");
        assert_eq!(e.problems()[0].line, Some(2));
        let text = e.to_string();
        assert!(text.contains("test.toml:3: limits.max_text_line"), "{text}");
    }

    #[test]
    fn a_memory_budget_too_small_to_use_is_refused() {
        let e = parse("[spool]\nmemory_budget = \"32KiB\"\nmemory_threshold = \"16KiB\"\n").unwrap_err();
        assert!(e.to_string().contains("at least 64KiB"), "{e}");
        assert!(parse("[spool]\nmemory_budget = \"64KiB\"\nmemory_threshold = \"16KiB\"\n").is_ok());
    }

    #[test]
    fn upstream_tls_defaults_to_off_and_system_roots() {
        let c = parse("").unwrap();
        assert_eq!(c.upstream.tls, UpstreamTlsMode::Off);
        assert_eq!(c.upstream.tls_verify, UpstreamTlsVerify::System);
        let c = parse("[upstream]\ntls = \"required\"\ntls_verify = \"insecure-loopback\"\n").unwrap();
        assert_eq!(c.upstream.tls, UpstreamTlsMode::Required);
    }

    #[test]
    fn upstream_tls_settings_are_checked() {
        let e =
            parse("[upstream]\naddress = \"192.0.2.1:25\"\ntls = \"required\"\ntls_verify = \"insecure-loopback\"\n")
                .unwrap_err();
        assert_eq!(e.problems().len(), 1, "{e}");
        assert_eq!(e.problems()[0].line, Some(4), "{e}");
        assert!(e.problems()[0].message.contains("only allowed for a loopback upstream"), "{e}");

        let e = parse("[upstream]\ntls_verify = \"ca-file\"\n").unwrap_err();
        assert!(e.problems()[0].message.contains("needs upstream.tls_ca_file"), "{e}");
        let e = parse("[upstream]\ntls_verify = \"ca-file\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n").unwrap_err();
        assert!(e.problems()[0].message.contains("does not exist"), "{e}");
        let e = parse("[upstream]\ntls_ca_file = \"/etc/hostname\"\n").unwrap_err();
        assert!(e.problems()[0].message.contains("is not \"ca-file\""), "{e}");
        let e = parse("[upstream]\ntls_server_name = \"not a name\"\n").unwrap_err();
        assert!(e.problems()[0].message.contains("not a DNS name"), "{e}");
        let e = parse("[upstream]\ntls = \"maybe\"\n").unwrap_err();
        assert_eq!(e.problems()[0].line, Some(2), "{e}");
    }

    #[test]
    fn reverse_dns_lookups_are_bounded() {
        assert_eq!(parse("").unwrap().server.max_reverse_dns_lookups, 64);
        for bad in [0, MAX_REVERSE_DNS_LOOKUPS_CAP + 1] {
            let e = parse(&format!("[server]\nreverse_dns = true\nmax_reverse_dns_lookups = {bad}\n")).unwrap_err();
            assert_eq!(e.problems().len(), 1, "{e}");
            assert_eq!(e.problems()[0].line, Some(3), "{e}");
            assert!(e.problems()[0].message.contains("between 1 and 256"), "{e}");
        }
    }

    #[test]
    fn client_prefix_and_upstream_cap_are_checked() {
        let c = parse("").unwrap();
        assert_eq!((c.limits.ipv6_client_prefix, c.upstream.max_connections), (64, 80));
        assert_eq!(c.upstream.connection_wait.get(), Duration::from_secs(10));
        let e = parse("[limits]\nipv6_client_prefix = 16\n[upstream]\nmax_connections = 0\n").unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems().len(), 2, "{text}");
        assert!(text.contains("ipv6_client_prefix must be between 32 and 128"), "{text}");
        assert!(text.contains("upstream.max_connections must be at least 1"), "{text}");
    }

    #[test]
    fn bad_units_are_refused() {
        let e = parse("[limits]\nidle_timeout = \"5 weeks\"\n").unwrap_err();
        assert_eq!(e.problems()[0].line, Some(2));
    }

    #[test]
    fn metrics_auth_settings_are_checked() {
        let c = parse("[metrics]\nbasic_user = \"prom\"\nbasic_password = \"s3cret\"\n").unwrap();
        assert_eq!(c.metrics.upstream_check_interval.get(), Duration::from_secs(10));
        parse("[metrics]\nbearer_token = \"t\"\nupstream_check_interval = \"2s\"\n").unwrap();
        let e = parse("[metrics]\nbasic_user = \"prom\"\n").unwrap_err();
        assert_eq!(e.problems().len(), 1, "{e}");
        assert_eq!(e.problems()[0].line, Some(2), "{e}");
        assert!(e.problems()[0].message.contains("needs metrics.basic_password"), "{e}");
        let e = parse("[metrics]\nbasic_password = \"x\"\n").unwrap_err();
        assert!(e.problems()[0].message.contains("basic_user is empty"), "{e}");
        let e = parse("[metrics]\nbearer_token = \"t\"\nbasic_user = \"u\"\nbasic_password = \"p\"\n").unwrap_err();
        assert!(e.problems()[0].message.contains("not both"), "{e}");
        let e = parse("[metrics]\nbearer_token_file = \"/nonexistent/token\"\n").unwrap_err();
        assert!(e.problems()[0].message.contains("does not exist"), "{e}");
        let e = parse("[metrics]\nupstream_check_interval = \"0s\"\n").unwrap_err();
        assert!(e.problems()[0].message.contains("must be positive"), "{e}");
    }
}
