//! The server side: the certificate set behind an `ArcSwap` that the rustls resolver reads per handshake.
//! A reload swaps the whole set at once, so a new handshake sees either the old set or the new one, never
//! a mix, and established sessions keep what they negotiated.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::InconsistentKeys;
use rustls::ServerConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::config::{CertificateConfig, TlsConfig, TlsVersion};

use super::{read_chain, TlsError, TLS12_AND_LATER, TLS13_ONLY};

/// Host name put in the generated certificate when the caller has none.
const FALLBACK_HOSTNAME: &str = "localhost";

// === certificate set ===

/// One servable certificate and what SNI selection and metrics need to know about it.
#[derive(Debug)]
struct Entry {
    key: Arc<CertifiedKey>,
    /// The SAN DNS names, lower-cased, `*.` prefixes kept. The subject CN is not used (RFC 6125
    /// §6.4.4).
    names: Vec<String>,
    /// The first DNS name, else the subject: how logs and metrics name the certificate.
    label: String,
    /// notAfter, unix seconds.
    not_after: i64,
}

/// The certificates served at one moment; the first one is the default.
#[derive(Debug)]
struct CertSet {
    entries: Vec<Entry>,
}

impl CertSet {
    /// Reads and checks every pair; blocking.
    fn load(pairs: &[CertificateConfig], provider: &CryptoProvider) -> Result<CertSet, TlsError> {
        let entries = pairs.iter().map(|pair| load_pair(pair, provider));
        let set = CertSet { entries: entries.collect::<Result<_, _>>()? };
        set.warn_expired();
        Ok(set)
    }

    /// The certificate for `sni`: an exact SAN match first, then a wildcard one, then the default.
    fn select(&self, sni: Option<&str>) -> Option<&Entry> {
        let matching = |sni: &str| {
            let exact = |e: &&Entry| e.names.iter().any(|n| n.eq_ignore_ascii_case(sni));
            let wildcard = |e: &&Entry| e.names.iter().any(|n| wildcard_matches(n, sni));
            let mut entries = self.entries.iter();
            entries.clone().find(exact).or_else(|| entries.find(wildcard))
        };
        sni.and_then(matching).or_else(|| self.entries.first())
    }

    /// Whether both sets serve the same chains in the same order. (A key cannot change alone: it
    /// must match its certificate.)
    fn same_chains(&self, other: &CertSet) -> bool {
        let mine = self.entries.iter().map(|e| &e.key.cert);
        mine.eq(other.entries.iter().map(|e| &e.key.cert))
    }

    fn warn_expired(&self) {
        let now = UnixTime::now().as_secs();
        for entry in &self.entries {
            if u64::try_from(entry.not_after).is_ok_and(|t| t < now) {
                warn!(certificate = %entry.label, "tls certificate has expired");
            }
        }
    }
}

/// Whether `pattern` is `*.suffix` and `name` is one non-empty label followed by `.suffix`: the
/// wildcard stands for exactly the left-most label (RFC 6125 §6.4.3).
pub(super) fn wildcard_matches(pattern: &str, name: &str) -> bool {
    let Some(suffix) = pattern.strip_prefix("*.") else {
        return false;
    };
    match name.split_once('.') {
        Some((label, rest)) => !label.is_empty() && rest.eq_ignore_ascii_case(suffix),
        None => false,
    }
}

/// Reads one certificate chain and its key, and checks that they belong together.
fn load_pair(pair: &CertificateConfig, provider: &CryptoProvider) -> Result<Entry, TlsError> {
    let chain = read_chain(&pair.cert)?;
    let key = read_key(&pair.key)?;
    let bad_key = |source| TlsError::BadKey { path: pair.key.clone(), source };
    let signer = provider.key_provider.load_private_key(key).map_err(bad_key)?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        // Unknown: the key cannot tell its public half; rustls's own `with_single_cert` accepts
        // that too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            let (cert, key) = (pair.cert.clone(), pair.key.clone());
            return Err(TlsError::KeyMismatch { cert, key });
        }
        Err(other) => return Err(TlsError::bad_certificate(&pair.cert)(other)),
    }
    Entry::new(certified, &pair.cert)
}

impl Entry {
    /// Reads the names and expiry from the end-entity certificate.
    fn new(key: CertifiedKey, path: &Path) -> Result<Entry, TlsError> {
        let Some(leaf) = key.cert.first() else {
            return Err(TlsError::NoCertificate { path: path.into() });
        };
        let parsed = x509_parser::parse_x509_certificate(leaf);
        let (_, x509) = parsed.map_err(TlsError::bad_certificate(path))?;
        let names = dns_names(&x509).map_err(TlsError::bad_certificate(path))?;
        let label = names.first().cloned();
        let label = label.unwrap_or_else(|| x509.subject().to_string());
        let not_after = x509.validity().not_after.timestamp();
        let key = Arc::new(key);
        Ok(Entry { key, names, label, not_after })
    }
}

/// The subjectAltName DNS names of a certificate, lower-cased.
pub(super) fn dns_names(cert: &X509Certificate<'_>) -> Result<Vec<String>, x509_parser::error::X509Error> {
    let Some(san) = cert.subject_alternative_name()? else {
        return Ok(Vec::new());
    };
    let dns = |name: &GeneralName<'_>| match name {
        GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
        _ => None,
    };
    Ok(san.value.general_names.iter().filter_map(dns).collect())
}

/// The first private key in a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(TlsError::read(path))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice()).map_err(TlsError::pem(path))?;
    key.ok_or_else(|| TlsError::NoKey { path: path.into() })
}

/// A certificate for `hostname` signed by its own fresh ECDSA P-256 key.
fn self_signed(hostname: &str, provider: &CryptoProvider) -> Result<Entry, TlsError> {
    let names = vec![hostname.to_owned()];
    let generated = rcgen::generate_simple_self_signed(names).map_err(TlsError::self_signed(hostname))?;
    let key = PrivateKeyDer::Pkcs8(generated.key_pair.serialize_der().into());
    let signer = provider.key_provider.load_private_key(key);
    let signer = signer.map_err(TlsError::self_signed(hostname))?;
    let chain = vec![generated.cert.der().clone()];
    Entry::new(CertifiedKey::new(chain, signer), Path::new("<self-signed>"))
}

// === impl CertStore ===

/// The resolver rustls asks on every handshake; holds the current [`CertSet`].
#[derive(Debug)]
struct CertStore {
    current: ArcSwap<CertSet>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.load();
        set.select(hello.server_name()).map(|entry| Arc::clone(&entry.key))
    }
}

// === impl ServerTls ===

/// The server side of TLS: the reloadable certificates and the rustls configuration that serves
/// them. Share it through an `Arc`.
#[derive(Debug)]
pub struct ServerTls {
    /// The configured pairs; empty when the generated self-signed certificate is served.
    pairs: Vec<CertificateConfig>,
    store: Arc<CertStore>,
    config: Arc<ServerConfig>,
    provider: Arc<CryptoProvider>,
}

impl ServerTls {
    /// Loads every configured pair (blocking file reads: call at start-up or in
    /// `spawn_blocking`). With no certificates configured, generates a self-signed one for
    /// `hostname` and logs a warning.
    pub fn load(cfg: &TlsConfig, hostname: &str) -> Result<ServerTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let set = if cfg.certificates.is_empty() {
            let hostname = if hostname.is_empty() { FALLBACK_HOSTNAME } else { hostname };
            warn!(hostname, "no tls certificate configured, serving a generated self-signed one");
            CertSet { entries: vec![self_signed(hostname, &provider)?] }
        } else {
            CertSet::load(&cfg.certificates, &provider)?
        };
        let store = Arc::new(CertStore { current: ArcSwap::from_pointee(set) });
        let config = server_config(cfg.min_version, Arc::clone(&provider), Arc::clone(&store))?;
        let pairs = cfg.certificates.clone();
        let tls = ServerTls { pairs, store, config, provider };
        tls.publish_expiries();
        Ok(tls)
    }

    /// A tokio-rustls acceptor whose configuration resolves certificates through the reloadable
    /// store. Bounding the handshake with `tls.handshake_timeout` is the caller's job.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }

    /// Re-reads all files (blocking). If every pair parses and each key matches its certificate,
    /// swaps the new set in atomically and returns `Ok(true)` when any chain changed, `Ok(false)`
    /// when none did (or the certificate is the generated one). On any error the current set stays
    /// and the error is returned.
    ///
    /// Every caller (the watcher, SIGHUP) gets the metrics from here: `moat_tls_reload_total` counts a
    /// swap as `ok` and a refused set as `error` (an unchanged set is no reload), and a swap updates
    /// `moat_tls_certificate_expiry_timestamp_seconds`.
    pub fn reload(&self) -> Result<bool, TlsError> {
        if self.pairs.is_empty() {
            return Ok(false);
        }
        let fresh = match CertSet::load(&self.pairs, &self.provider) {
            Ok(fresh) => fresh,
            Err(err) => {
                crate::metrics::tls_reload(crate::metrics::ReloadResult::Error);
                return Err(err);
            }
        };
        if fresh.same_chains(&self.store.current.load()) {
            return Ok(false);
        }
        self.store.current.store(Arc::new(fresh));
        crate::metrics::tls_reload(crate::metrics::ReloadResult::Ok);
        self.publish_expiries();
        Ok(true)
    }

    /// Sets the expiry gauge of every served certificate.
    fn publish_expiries(&self) {
        for (name, not_after) in self.expiries() {
            crate::metrics::tls_certificate_expiry(&name, not_after);
        }
    }

    /// Spawns a task that polls the files' (mtime, length, inode) every `interval` and reloads
    /// (in `spawn_blocking`) once a change has held still for one interval; logs `info` on success
    /// and `warn` naming the file on failure. It stops when `shutdown` is cancelled.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) -> JoinHandle<()> {
        let paths: Vec<PathBuf> = self.pairs.iter().flat_map(|p| [p.cert.clone(), p.key.clone()]).collect();
        let tls = Arc::clone(self);
        // No baseline: the first settled poll reloads once, which catches a change made between `load` and
        // the start of the watcher (the reload is a no-op when nothing changed).
        crate::watch::spawn(
            interval,
            shutdown,
            Default::default(),
            move || paths.iter().map(|p| crate::watch::stamp(p)).collect::<Vec<_>>(),
            move || {
                let tls = Arc::clone(&tls);
                async move { tls.reload_logged().await }
            },
        )
    }

    /// Whether the served certificate was generated at start.
    pub fn is_self_signed(&self) -> bool {
        self.pairs.is_empty()
    }

    /// For each served certificate, in configuration order: its first DNS name (or subject) and
    /// notAfter as unix seconds.
    pub fn expiries(&self) -> Vec<(String, i64)> {
        let set = self.store.current.load();
        set.entries.iter().map(|e| (e.label.clone(), e.not_after)).collect()
    }

    async fn reload_logged(self: &Arc<Self>) {
        let tls = Arc::clone(self);
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(Ok(true)) => info!("tls certificates reloaded"),
            Ok(Ok(false)) => debug!("tls certificate files touched, certificates unchanged"),
            Ok(Err(err)) => {
                warn!(error = %err.chain(), "tls certificate reload rejected, keeping the old ones")
            }
            Err(err) => warn!(error = %err, "tls certificate reload task failed"),
        }
    }
}

fn server_config(
    min_version: TlsVersion,
    provider: Arc<CryptoProvider>,
    store: Arc<CertStore>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let versions = match min_version {
        TlsVersion::V1_2 => TLS12_AND_LATER,
        TlsVersion::V1_3 => TLS13_ONLY,
    };
    let builder = ServerConfig::builder_with_provider(provider).with_protocol_versions(versions);
    let config = builder.map_err(TlsError::config)?.with_no_client_auth();
    let mut config = config.with_cert_resolver(store);
    // Session resumption without server-side state: tickets sealed with a key that rustls' ring Ticketer
    // rotates every 6 hours. A returning client skips the certificate signature (the costly part of a
    // handshake); the in-memory session cache (256 entries) stays for clients that do not take tickets.
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::config)?;
    Ok(Arc::new(config))
}
