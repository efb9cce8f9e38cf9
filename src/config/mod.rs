//! The configuration file (`config/moat.toml`): typed sections with defaults, loading, and validation.
//!
//! Every key has a default, so an empty file is a valid configuration. Unknown keys are refused (a typo
//! must not silently fall back to a default). [`Config::validate`] reports every problem at once, each
//! with the file and line it came from when known, as `moat check` prints them.

pub mod accounts;
pub mod archive;
pub mod auth;
pub mod dkim;
pub mod dns;
pub mod limits;
pub mod listener;
pub mod observability;
pub mod proxy;
pub mod quarantine;
pub mod rules;
pub mod sender_auth;
pub mod server;
pub mod spool;
pub mod state;
pub mod tls;
pub mod units;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use units::secs;

pub use accounts::AccountsConfig;
pub use auth::AuthConfig;
pub use dkim::{DkimConfig, DkimSignConfig};
pub use dns::{DnsConfig, OnDnsError, RhsTarget, ZoneConfig, ZoneKind};
pub use limits::{BareLineEndings, Limits, MAX_COMMAND_LINE_CAP};
pub use listener::{ListenerConfig, ListenerMode, Role};
pub use observability::{AuditConfig, LogConfig, LogFormat, MetricsConfig};
pub use rules::{OversizePolicy, RulesConfig};
pub use sender_auth::SenderAuthConfig;
pub use server::{ServerConfig, MAX_REVERSE_DNS_LOOKUPS_CAP};
pub use spool::SpoolConfig;
pub use state::{StateBackend, StateConfig};
pub use tls::{CertificateConfig, TlsConfig, TlsVersion};
pub use units::{ByteSize, Span};
pub use upstream::{Identity, UpstreamConfig, UpstreamTlsMode, UpstreamTlsVerify};

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
    pub quarantine: quarantine::QuarantineConfig,
    pub archive: archive::ArchiveConfig,
    pub accounts: AccountsConfig,
    pub dns: DnsConfig,
    pub sender_auth: SenderAuthConfig,
    pub dkim: DkimConfig,
}

/// `[relay]`: where unauthenticated mail may go.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Domains an `mx` listener takes unauthenticated mail for: exact names, or `.example.org` for every
    /// subdomain of example.org (as Postfix writes it). Empty: unauthenticated RCPT is always refused.
    pub local_domains: Vec<String>,
}

impl RelayConfig {
    /// Problems with this section, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for d in &self.local_domains {
            let name = d.strip_prefix('.').unwrap_or(d);
            if name.is_empty() || name.contains(['@', ' ', '[']) || name.starts_with('.') {
                out.push(("local_domains", format!("relay.local_domains entry {d:?} is not a domain or .domain")));
            }
        }
        out
    }
}

/// `[trace]`: what moat adds to relayed messages.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    pub received_header: bool,
}

/// `[shutdown]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub grace_period: Span,
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
            quarantine: Default::default(),
            archive: Default::default(),
            accounts: AccountsConfig::default(),
            dns: DnsConfig::default(),
            sender_auth: SenderAuthConfig::default(),
            dkim: DkimConfig::default(),
        }
    }
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig { received_header: true }
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
        let mut sections: Vec<(&str, Vec<(&'static str, String)>)> = vec![
            ("listener", listener::problems(&self.listeners)),
            ("server", self.server.problems()),
            ("limits", self.limits.problems()),
            ("spool", self.spool.problems()),
            ("upstream", self.upstream.problems()),
            ("tls", self.tls.problems()),
            ("metrics", self.metrics.problems()),
            ("log", self.log.problems()),
            ("auth", self.auth.problems()),
            ("relay", self.relay.problems()),
            ("state", self.state.problems()),
            ("quarantine", self.quarantine.problems()),
            ("archive", self.archive.problems()),
            ("accounts", self.accounts.problems()),
            ("dns", self.dns.problems()),
            ("sender_auth", self.sender_auth.problems()),
            ("dkim", self.dkim.problems()),
        ];
        // Across sections.
        if self.listeners.iter().any(|l| l.address == self.upstream.address) {
            let message = format!(
                "upstream.address {} is also a listener address: moat would relay to itself",
                self.upstream.address
            );
            sections.push(("upstream", vec![("address", message)]));
        }
        let mut out = Vec::new();
        for (section, problems) in sections {
            for (key, message) in problems {
                out.push(ConfigProblem { file: path.to_owned(), line: find_key(text, section, key), message });
            }
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

/// Best-effort line of `key` in `section`, for pointing at a problem: `key =` inside the section's table
/// (`[section]` or `[[section]]`), or `section.key =` at the top; `key == section` finds the table itself.
/// Falls back to the first uncommented `key =` anywhere.
fn find_key(text: &str, section: &str, key: &str) -> Option<usize> {
    let assigns = |l: &str, k: &str| l.strip_prefix(k).is_some_and(|r| r.trim_start().starts_with('='));
    let mut current = "";
    let mut fallback = None;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim_start();
        if l.starts_with('#') {
            continue;
        }
        if l.starts_with('[') {
            current = l.trim_start_matches('[').split(']').next().unwrap_or("").trim();
            if key == section && current == section {
                return Some(i + 1);
            }
            continue;
        }
        let dotted = format!("{section}.{key}");
        if (current == section && assigns(l, key)) || (current.is_empty() && assigns(l, &dotted)) {
            return Some(i + 1);
        }
        if fallback.is_none() && assigns(l, key) {
            fallback = Some(i + 1);
        }
    }
    fallback
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    #[test]
    fn problems_point_at_the_key_in_its_own_section() {
        let text = "[limits]\nmax_connections = 10\n[upstream]\naddress = \"127.0.0.1:10025\"\nmax_connections = 0\n";
        let e = parse(text).unwrap_err();
        let p = &e.problems()[0];
        assert!(p.message.contains("upstream.max_connections"), "{p}");
        assert_eq!(p.line, Some(5), "{p}");
        let e = parse("limits.max_recipients = 0\nupstream.max_connections = 0\n").unwrap_err();
        let lines: Vec<_> = e.problems().iter().map(|p| p.line).collect();
        assert_eq!(lines, [Some(1), Some(2)]);
    }
}
