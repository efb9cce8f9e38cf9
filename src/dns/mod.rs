//! DNS for every stage: one async resolver ([`hickory_resolver`]), moat's bounded TTL cache in front of
//! it ([`cache::TtlCache`]), and the metrics of each lookup.
//!
//! The blocklist stage asks [`Dns::zone_a`]; SPF, DKIM and DMARC go through the same resolver via
//! [`Dns::authenticator`] (mail-auth's verifier wraps a clone of it) with caches from [`Dns::caches`].
//! Name servers come from `[dns] servers` or, when empty, `/etc/resolv.conf` (docs/dns.md).

pub mod cache;
pub mod zone;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use mail_auth::{MessageAuthenticator, Parameters, RecordSet, Txt, MX};

use self::cache::TtlCache;
use crate::config::DnsConfig;
use crate::metrics::DnsCacheKind;

/// How long "no such name" is cached when the answer carries no negative TTL.
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// No server answered in time.
    #[error("dns lookup timed out")]
    Timeout,
    /// A server answered with an error (SERVFAIL, REFUSED) or the query could not be sent.
    #[error("dns lookup failed: {0}")]
    Failed(String),
    /// The resolver could not be set up.
    #[error("cannot set up the dns resolver: {0}")]
    Setup(String),
}

/// The caches handed to mail-auth's verifiers.
pub struct AuthCaches {
    pub txt: TtlCache<Box<str>, Txt>,
    pub mx: TtlCache<Box<str>, RecordSet<MX>>,
    pub ipv4: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    pub ipv6: TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    pub ptr: TtlCache<IpAddr, RecordSet<Box<str>>>,
}

/// mail-auth parameters with moat's caches.
pub type CachedParams<'x, P> = Parameters<
    'x,
    P,
    TtlCache<Box<str>, Txt>,
    TtlCache<Box<str>, RecordSet<MX>>,
    TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    TtlCache<IpAddr, RecordSet<Box<str>>>,
>;

/// The shared resolver.
pub struct Dns {
    resolver: TokioResolver,
    auth: MessageAuthenticator,
    /// Blocklist answers by query name: the matching A records, empty for NXDOMAIN/NODATA.
    lists: TtlCache<String, Arc<[Ipv4Addr]>>,
    caches: AuthCaches,
    timeout: Duration,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").field("lists", &self.lists.len()).finish()
    }
}

impl Dns {
    /// A resolver for `[dns]` (must run inside the tokio runtime).
    pub fn new(config: &DnsConfig) -> Result<Dns, DnsError> {
        let servers = config.server_addrs().map_err(DnsError::Setup)?;
        let mut opts = ResolverOpts::default();
        let mut rc = if servers.is_empty() {
            let (rc, sys) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| DnsError::Setup(format!("cannot read /etc/resolv.conf: {e}")))?;
            opts = sys;
            rc
        } else {
            let mut rc = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
            for s in &servers {
                let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                for c in &mut ns.connections {
                    c.port = s.port();
                }
                rc.add_name_server(ns);
            }
            rc
        };
        // Blocklist names are absolute: no search list, no /etc/hosts.
        rc = ResolverConfig::from_parts(None, Vec::new(), rc.name_servers().to_vec());
        opts.timeout = config.timeout.get();
        opts.attempts = config.attempts;
        opts.ndots = 0;
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(config.max_ttl.get());
        opts.negative_max_ttl = Some(config.max_ttl.get());
        let mut builder = TokioResolver::builder_with_config(rc, TokioRuntimeProvider::default());
        *builder.options_mut() = opts;
        let resolver = builder.build().map_err(|e| DnsError::Setup(e.to_string()))?;
        let (n, ttl) = (config.cache_size, config.max_ttl.get());
        Ok(Dns {
            auth: MessageAuthenticator(resolver.clone()),
            resolver,
            lists: TtlCache::new(DnsCacheKind::Dnsbl, n, ttl),
            caches: AuthCaches {
                txt: TtlCache::new(DnsCacheKind::Txt, n, ttl),
                mx: TtlCache::new(DnsCacheKind::Mx, n / 4, ttl),
                ipv4: TtlCache::new(DnsCacheKind::A, n / 4, ttl),
                ipv6: TtlCache::new(DnsCacheKind::Aaaa, n / 4, ttl),
                ptr: TtlCache::new(DnsCacheKind::Ptr, n / 4, ttl),
            },
            timeout: config.timeout.get() * config.attempts.max(1) as u32,
        })
    }

    /// mail-auth's verifier, on the shared resolver.
    pub fn authenticator(&self) -> &MessageAuthenticator {
        &self.auth
    }

    /// moat's caches of SPF/DKIM/DMARC answers (benchmarks and tests pre-fill them).
    pub fn caches(&self) -> &AuthCaches {
        &self.caches
    }

    /// `params` with moat's caches, for the verifiers of [`Dns::authenticator`].
    pub fn params<P>(&self, params: P) -> CachedParams<'_, P> {
        Parameters::new(params)
            .with_txt_cache(&self.caches.txt)
            .with_mx_cache(&self.caches.mx)
            .with_ipv4_cache(&self.caches.ipv4)
            .with_ipv6_cache(&self.caches.ipv6)
            .with_ptr_cache(&self.caches.ptr)
    }

    /// The A records of `name` (absolute, ending in '.'): empty for NXDOMAIN or no A record.
    pub async fn zone_a(&self, name: &str) -> Result<Arc<[Ipv4Addr]>, DnsError> {
        if let Some(hit) = self.lists.get_at(name, Instant::now()) {
            return Ok(hit);
        }
        let looked = tokio::time::timeout(self.timeout + Duration::from_millis(500), self.resolver.ipv4_lookup(name));
        let (value, until): (Arc<[Ipv4Addr]>, Instant) = match looked.await {
            Err(_) => return Err(DnsError::Timeout),
            Ok(Ok(lookup)) => {
                let ips: Vec<Ipv4Addr> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect();
                (ips.into(), lookup.valid_until())
            }
            Ok(Err(e)) => match no_records(&e) {
                Some(ttl) => (Arc::from(Vec::new()), Instant::now() + ttl),
                None if is_timeout(&e) => return Err(DnsError::Timeout),
                None => return Err(DnsError::Failed(e.to_string())),
            },
        };
        self.lists.insert_at(name.to_string(), value.clone(), until, Instant::now());
        Ok(value)
    }
}

/// For "no such name" and "no record of that type": how long to cache it. Other errors: `None`.
fn no_records(e: &hickory_resolver::net::NetError) -> Option<Duration> {
    use hickory_resolver::net::{DnsError as HDns, NetError};
    use hickory_resolver::proto::op::ResponseCode;
    match e {
        NetError::Dns(HDns::NoRecordsFound(nr))
            if matches!(nr.response_code, ResponseCode::NXDomain | ResponseCode::NoError) =>
        {
            Some(nr.negative_ttl.map_or(DEFAULT_NEGATIVE_TTL, |t| Duration::from_secs(u64::from(t))))
        }
        _ => None,
    }
}

fn is_timeout(e: &hickory_resolver::net::NetError) -> bool {
    matches!(e, hickory_resolver::net::NetError::Timeout)
}
