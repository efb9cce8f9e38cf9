//! TLS for both sides of a connection: the server configuration that implicit-TLS listeners and
//! STARTTLS use (certificate loading, SNI choice among several certificates, reload without a
//! restart), what a session negotiated ([`TlsInfo`]), and the client configuration for the upstream
//! MTA.
//!
//! In the flow it sits between `server`, which accepts the TCP connection, and `smtp`, which speaks
//! over the stream that [`ServerTls::acceptor`] returns. The certificates live in one set behind an
//! `ArcSwap`: a reload swaps the whole set at once, so a new handshake sees either the old set or
//! the new one, never a mix, and established sessions keep what they negotiated.
//!
//! Everything uses the `ring` provider explicitly; nothing here installs a process-wide default
//! provider.

use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, DigitallySignedStruct, InconsistentKeys, ProtocolVersion};
use rustls::{RootCertStore, ServerConfig, SignatureScheme, SupportedProtocolVersion};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::config::{CertificateConfig, TlsConfig, TlsVersion};

/// Protocol versions offered with `min_version = "1.2"`, newest first.
static TLS12_AND_LATER: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];
/// Protocol versions offered with `min_version = "1.3"`.
static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&TLS13];

/// Host name put in the generated certificate when the caller has none.
const FALLBACK_HOSTNAME: &str = "localhost";

/// A boxed cause, for errors whose source comes from more than one library.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

// === errors ===

/// Why TLS could not be set up. Every variant about a file names it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file holds a damaged PEM section.
    #[error("malformed pem in {}", .path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A certificate or CA file holds no certificate.
    #[error("no certificate in {}", .path.display())]
    NoCertificate { path: PathBuf },
    /// A certificate could not be parsed, or a CA certificate cannot be a trust anchor.
    #[error("invalid certificate in {}", .path.display())]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    /// A key file holds no private key (PKCS#8, PKCS#1 or SEC1).
    #[error("no private key in {}", .path.display())]
    NoKey { path: PathBuf },
    /// The private key is malformed or of a type the provider cannot sign with.
    #[error("unusable private key in {}", .path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The private key does not belong to the certificate.
    #[error("private key {} does not match certificate {}", .key.display(), .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The self-signed fallback certificate could not be generated.
    #[error("cannot generate a self-signed certificate for {hostname:?}")]
    SelfSigned {
        hostname: String,
        #[source]
        source: BoxError,
    },
    /// The system trust store yielded no usable root certificate.
    #[error("no usable system root certificates")]
    NoSystemRoots {
        #[source]
        source: Option<rustls_native_certs::Error>,
    },
    /// `upstream.tls_server_name` is neither a DNS name nor an IP address.
    #[error("invalid tls server name {name:?}")]
    ServerName { name: String },
    /// rustls refused the configuration.
    #[error("cannot build the tls configuration")]
    Config {
        #[source]
        source: rustls::Error,
    },
}

/// Constructors for `map_err`.
impl TlsError {
    fn read(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
        |source| TlsError::Read { path: path.into(), source }
    }

    fn pem(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
        |source| TlsError::Pem { path: path.into(), source }
    }

    fn bad_certificate<E: Into<BoxError>>(path: &Path) -> impl FnOnce(E) -> TlsError + '_ {
        |source| TlsError::BadCertificate { path: path.into(), source: source.into() }
    }

    fn self_signed<E: Into<BoxError>>(hostname: &str) -> impl FnOnce(E) -> TlsError + '_ {
        |source| TlsError::SelfSigned { hostname: hostname.into(), source: source.into() }
    }

    fn config(source: rustls::Error) -> TlsError {
        TlsError::Config { source }
    }

    /// The error and its causes as one line, `a: b: c`, for a log field.
    fn chain(&self) -> String {
        let mut line = self.to_string();
        let mut cause = self.source();
        while let Some(c) = cause {
            line = format!("{line}: {c}");
            cause = c.source();
        }
        line
    }
}

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
fn wildcard_matches(pattern: &str, name: &str) -> bool {
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
fn dns_names(cert: &X509Certificate<'_>) -> Result<Vec<String>, x509_parser::error::X509Error> {
    let Some(san) = cert.subject_alternative_name()? else {
        return Ok(Vec::new());
    };
    let dns = |name: &GeneralName<'_>| match name {
        GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
        _ => None,
    };
    Ok(san.value.general_names.iter().filter_map(dns).collect())
}

/// Every certificate in a PEM file, in order; at least one.
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(TlsError::read(path))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>();
    let chain = chain.map_err(TlsError::pem(path))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(chain)
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

// === impl TlsInfo ===

/// What the client session negotiated, for the Received header and audit records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// `"TLSv1.2"` or `"TLSv1.3"` (`"unknown"` before the handshake finished).
    pub version: &'static str,
    /// The cipher suite by its rustls (IANA-style) name, e.g. `"TLS13_AES_256_GCM_SHA384"`.
    pub cipher: String,
    /// The server name the client asked for, if it sent SNI.
    pub sni: Option<String>,
}

impl TlsInfo {
    /// Reads the negotiated parameters of a server connection whose handshake has completed.
    pub fn from_server(conn: &rustls::ServerConnection) -> TlsInfo {
        let version = match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
        let name = |suite: rustls::CipherSuite| suite.as_str().map_or_else(|| format!("{suite:?}"), str::to_owned);
        let cipher = suite.map(name).unwrap_or_default();
        let sni = conn.server_name().map(str::to_owned);
        TlsInfo { version, cipher, sni }
    }
}

// === upstream client ===

/// How the connection to the upstream MTA checks the upstream's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamVerify {
    /// Against the operating system's trust store.
    SystemRoots,
    /// Against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Accept any certificate for any name; only for an upstream on loopback, where TLS adds no
    /// trust.
    InsecureLoopback,
}

/// A client configuration for the upstream (TLS 1.2 and 1.3, `ring`). Reads files, so call it at
/// start-up or in `spawn_blocking`.
pub fn client_config(verify: &UpstreamVerify) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(Arc::new(provider));
    let builder = builder.with_protocol_versions(TLS12_AND_LATER).map_err(TlsError::config)?;
    let builder = match verify {
        UpstreamVerify::SystemRoots => builder.with_root_certificates(system_roots()?),
        UpstreamVerify::CaFile(path) => builder.with_root_certificates(ca_roots(path)?),
        UpstreamVerify::InsecureLoopback => {
            let verifier = Arc::new(AcceptAnyCertificate(algorithms));
            builder.dangerous().with_custom_certificate_verifier(verifier)
        }
    };
    Ok(Arc::new(builder.with_no_client_auth()))
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    for err in &found.errors {
        debug!(error = %err, "skipped part of the system trust store");
    }
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let source = found.errors.into_iter().next();
        return Err(TlsError::NoSystemRoots { source });
    }
    Ok(roots)
}

fn ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_chain(path)? {
        roots.add(cert).map_err(TlsError::bad_certificate(path))?;
    }
    Ok(roots)
}

/// The verifier of [`UpstreamVerify::InsecureLoopback`]: any certificate and name pass, but the
/// handshake signature is still checked, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::{client, server, TlsConnector};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

    /// A CA made per test, issuing P-256 (PKCS#8) leaves unless told otherwise.
    struct TestCa {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    /// A certificate and key as PEM text, and the certificate's DER.
    struct Issued {
        cert_pem: String,
        key_pem: String,
        der: CertificateDer<'static>,
    }

    impl TestCa {
        fn new() -> TestCa {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, "unit test CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            TestCa { cert: params.self_signed(&key).unwrap(), key }
        }

        fn issue(&self, names: &[&str]) -> Issued {
            self.issue_with(names, KeyPair::generate().unwrap(), |_| {})
        }

        fn issue_with(&self, names: &[&str], key: KeyPair, edit: impl FnOnce(&mut CertificateParams)) -> Issued {
            let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, "unit test leaf");
            edit(&mut params);
            let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
            Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
        }

        fn roots(&self) -> RootCertStore {
            let mut roots = RootCertStore::empty();
            roots.add(self.cert.der().clone()).unwrap();
            roots
        }

        fn client(&self) -> Arc<ClientConfig> {
            client_with(self.roots(), TLS12_AND_LATER)
        }
    }

    fn client_with(roots: RootCertStore, versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    fn insecure() -> Arc<ClientConfig> {
        client_config(&UpstreamVerify::InsecureLoopback).unwrap()
    }

    /// Writes the pair as `<stem>.pem` and `<stem>.key` (replacing through a rename, as deploy
    /// tools do).
    fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> CertificateConfig {
        let pair = CertificateConfig { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) };
        replace(&pair.cert, issued.cert_pem.as_bytes());
        replace(&pair.key, issued.key_pem.as_bytes());
        pair
    }

    fn replace(path: &Path, contents: &[u8]) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn tls_config(certificates: Vec<CertificateConfig>, min_version: TlsVersion) -> TlsConfig {
        TlsConfig { certificates, min_version, ..TlsConfig::default() }
    }

    fn fixture(stem: &str) -> CertificateConfig {
        let dir = Path::new(FIXTURES);
        CertificateConfig { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) }
    }

    /// Both ends of one finished handshake over an in-memory pipe.
    struct Session {
        client: client::TlsStream<DuplexStream>,
        server: server::TlsStream<DuplexStream>,
    }

    impl Session {
        /// The end-entity certificate the server presented.
        fn presented(&self) -> CertificateDer<'static> {
            self.client.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
        }

        fn info(&self) -> TlsInfo {
            TlsInfo::from_server(self.server.get_ref().1)
        }
    }

    /// `name` goes into SNI unless it is an IP address (rustls sends no SNI for those).
    async fn handshake(tls: &ServerTls, client: Arc<ClientConfig>, name: &str) -> io::Result<Session> {
        let (client_io, server_io) = duplex(64 * 1024);
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let connect = TlsConnector::from(client).connect(name, client_io);
        let (client, server) = tokio::join!(connect, tls.acceptor().accept(server_io));
        Ok(Session { client: client?, server: server? })
    }

    #[tokio::test]
    async fn handshake_presents_the_loaded_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let leaf = ca.issue(&["mx.test"]);
        let tls =
            ServerTls::load(&tls_config(vec![write_pair(dir.path(), "mx", &leaf)], TlsVersion::V1_2), "x").unwrap();
        assert!(!tls.is_self_signed());

        let mut session = handshake(&tls, ca.client(), "mx.test").await.unwrap();
        assert_eq!(session.presented(), leaf.der);

        session.client.write_all(b"EHLO x\r\n").await.unwrap();
        session.client.flush().await.unwrap();
        let mut line = [0u8; 8];
        session.server.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"EHLO x\r\n");
    }

    #[tokio::test]
    async fn tls_info_reports_version_cipher_and_sni() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let pair = write_pair(dir.path(), "mx", &ca.issue(&["mx.test"]));
        let tls = ServerTls::load(&tls_config(vec![pair], TlsVersion::V1_2), "x").unwrap();

        let info = handshake(&tls, ca.client(), "mx.test").await.unwrap().info();
        assert_eq!(info.version, "TLSv1.3");
        assert!(info.cipher.starts_with("TLS13_"), "{}", info.cipher);
        assert_eq!(info.sni.as_deref(), Some("mx.test"));

        let tls12 = client_with(ca.roots(), &[&TLS12]);
        let info = handshake(&tls, tls12, "mx.test").await.unwrap().info();
        assert_eq!(info.version, "TLSv1.2");
        assert!(info.cipher.starts_with("TLS_ECDHE_ECDSA_WITH_"), "{}", info.cipher);

        let info = handshake(&tls, insecure(), "127.0.0.1").await.unwrap().info();
        assert_eq!(info.sni, None);
    }

    #[tokio::test]
    async fn min_version_13_refuses_a_tls12_only_client() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let pair = write_pair(dir.path(), "mx", &ca.issue(&["mx.test"]));
        let tls = ServerTls::load(&tls_config(vec![pair], TlsVersion::V1_3), "x").unwrap();

        let tls12 = client_with(ca.roots(), &[&TLS12]);
        assert!(handshake(&tls, tls12, "mx.test").await.is_err());
        let info = handshake(&tls, ca.client(), "mx.test").await.unwrap().info();
        assert_eq!(info.version, "TLSv1.3");
    }

    #[tokio::test]
    async fn sni_picks_exact_then_wildcard_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let default = ca.issue(&["default.test"]);
        let mx = ca.issue(&["mx.test", "Mail.Test"]);
        let wildcard = ca.issue(&["*.example.org"]);
        let exact_sub = ca.issue(&["www.example.org"]);
        let pairs = vec![
            write_pair(dir.path(), "default", &default),
            write_pair(dir.path(), "mx", &mx),
            write_pair(dir.path(), "wildcard", &wildcard),
            write_pair(dir.path(), "www", &exact_sub),
        ];
        let tls = ServerTls::load(&tls_config(pairs, TlsVersion::V1_2), "x").unwrap();

        let cases = [
            ("mx.test", &mx),
            ("MX.Test", &mx),
            ("mail.test", &mx),
            ("a.example.org", &wildcard),
            ("www.example.org", &exact_sub),
            ("a.b.example.org", &default),
            ("example.org", &default),
            ("other.test", &default),
            ("default.test", &default),
            ("127.0.0.1", &default),
        ];
        for (name, want) in cases {
            let session = handshake(&tls, insecure(), name).await.unwrap();
            assert!(session.presented() == want.der, "wrong certificate for {name}");
        }
    }

    #[test]
    fn wildcards_cover_exactly_one_label() {
        let cases = [
            ("*.example.org", "a.example.org", true),
            ("*.example.org", "A.EXAMPLE.ORG", true),
            ("*.example.org", "example.org", false),
            ("*.example.org", ".example.org", false),
            ("*.example.org", "a.b.example.org", false),
            ("*.example.org", "aexample.org", false),
            ("example.org", "example.org", false),
            ("a*.example.org", "ab.example.org", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(wildcard_matches(pattern, name), want, "{pattern} vs {name}");
        }
    }

    #[tokio::test]
    async fn reload_swaps_for_new_handshakes_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let old = ca.issue(&["mx.test"]);
        let pair = write_pair(dir.path(), "mx", &old);
        let tls = ServerTls::load(&tls_config(vec![pair], TlsVersion::V1_2), "x").unwrap();
        let mut before = handshake(&tls, ca.client(), "mx.test").await.unwrap();
        assert!(!tls.reload().unwrap(), "unchanged files are no change");

        let new = ca.issue(&["mx.test"]);
        write_pair(dir.path(), "mx", &new);
        assert!(tls.reload().unwrap());
        assert_eq!(handshake(&tls, ca.client(), "mx.test").await.unwrap().presented(), new.der);
        assert!(!tls.reload().unwrap());

        // The session made before the swap still works and keeps its certificate.
        assert_eq!(before.presented(), old.der);
        before.server.write_all(b"250 ok\r\n").await.unwrap();
        before.server.flush().await.unwrap();
        let mut reply = [0u8; 8];
        before.client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"250 ok\r\n");
    }

    #[tokio::test]
    async fn reload_refuses_bad_files_and_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let good = ca.issue(&["mx.test"]);
        let pair = write_pair(dir.path(), "mx", &good);
        let tls = ServerTls::load(&tls_config(vec![pair.clone()], TlsVersion::V1_2), "x").unwrap();

        let corrupt = "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n";
        replace(&pair.cert, corrupt.as_bytes());
        let err = tls.reload().unwrap_err();
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
        assert!(err.to_string().contains(&pair.cert.display().to_string()), "{err}");
        assert_eq!(handshake(&tls, ca.client(), "mx.test").await.unwrap().presented(), good.der);

        let other = ca.issue(&["mx.test"]);
        replace(&pair.cert, other.cert_pem.as_bytes());
        replace(&pair.key, good.key_pem.as_bytes());
        let err = tls.reload().unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        assert_eq!(handshake(&tls, ca.client(), "mx.test").await.unwrap().presented(), good.der);
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let a = write_pair(dir.path(), "a", &ca.issue(&["a.test"]));
        let b = write_pair(dir.path(), "b", &ca.issue(&["b.test"]));
        let load = |pair: CertificateConfig| ServerTls::load(&tls_config(vec![pair], TlsVersion::V1_2), "x");

        let missing = CertificateConfig { cert: dir.path().join("nope.pem"), key: a.key.clone() };
        let err = load(missing).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
        assert!(err.to_string().starts_with("cannot read ") && err.to_string().ends_with("nope.pem"), "{err}");

        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let empty = CertificateConfig { cert: dir.path().join("empty.pem"), key: a.key.clone() };
        let err = load(empty).unwrap_err();
        assert_eq!(err.to_string(), format!("no certificate in {}", dir.path().join("empty.pem").display()));

        let cert_as_key = CertificateConfig { cert: a.cert.clone(), key: a.cert.clone() };
        assert!(matches!(load(cert_as_key).unwrap_err(), TlsError::NoKey { .. }));

        let crossed = CertificateConfig { cert: a.cert.clone(), key: b.key.clone() };
        let err = load(crossed).unwrap_err();
        let want = format!("private key {} does not match certificate {}", b.key.display(), a.cert.display());
        assert_eq!(err.to_string(), want);
    }

    #[tokio::test]
    async fn key_formats_rsa_pkcs1_ec_sec1_and_ed25519_pkcs8() {
        let client = client_config(&UpstreamVerify::CaFile(Path::new(FIXTURES).join("ca.pem"))).unwrap();
        let rsa = ServerTls::load(&tls_config(vec![fixture("server")], TlsVersion::V1_2), "x").unwrap();
        let pem_label = |path: &Path| std::fs::read_to_string(path).unwrap().lines().next().map(str::to_owned);
        assert_eq!(pem_label(&fixture("server").key).as_deref(), Some("-----BEGIN RSA PRIVATE KEY-----"));
        assert_eq!(pem_label(&fixture("server-ec").key).as_deref(), Some("-----BEGIN EC PRIVATE KEY-----"));
        for name in ["localhost", "mx.test", "relay.example.test"] {
            handshake(&rsa, Arc::clone(&client), name).await.unwrap();
        }
        let ec = ServerTls::load(&tls_config(vec![fixture("server-ec")], TlsVersion::V1_2), "x").unwrap();
        handshake(&ec, Arc::clone(&client), "ec.test").await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let leaf = ca.issue_with(&["ed.test"], ed25519, |_| {});
        assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let pair = write_pair(dir.path(), "ed", &leaf);
        let ed = ServerTls::load(&tls_config(vec![pair], TlsVersion::V1_2), "x").unwrap();
        assert_eq!(handshake(&ed, ca.client(), "ed.test").await.unwrap().presented(), leaf.der);
    }

    #[tokio::test]
    async fn self_signed_when_no_certificate_is_configured() {
        let tls = ServerTls::load(&tls_config(Vec::new(), TlsVersion::V1_2), "moat.test").unwrap();
        assert!(tls.is_self_signed());
        assert!(!tls.reload().unwrap());
        let expiries = tls.expiries();
        assert_eq!(expiries.len(), 1);
        assert_eq!(expiries[0].0, "moat.test");

        let presented = handshake(&tls, insecure(), "moat.test").await.unwrap().presented();
        let (_, x509) = x509_parser::parse_x509_certificate(&presented).unwrap();
        assert_eq!(dns_names(&x509).unwrap(), ["moat.test"]);
    }

    #[test]
    fn expiries_name_each_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let named = ca.issue_with(&["MX.test", "b.test"], KeyPair::generate().unwrap(), |p| {
            p.not_after = rcgen::date_time_ymd(2040, 1, 2);
        });
        let ip_only = ca.issue(&["127.0.0.1"]);
        let pairs = vec![write_pair(dir.path(), "named", &named), write_pair(dir.path(), "ip", &ip_only)];
        let tls = ServerTls::load(&tls_config(pairs, TlsVersion::V1_2), "x").unwrap();

        let expiries = tls.expiries();
        assert_eq!(expiries[0], ("mx.test".to_owned(), 2_209_075_200));
        assert_eq!(expiries[1].0, "CN=unit test leaf");
    }

    #[tokio::test]
    async fn watcher_reloads_changed_files_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let pair = write_pair(dir.path(), "mx", &ca.issue(&["a.test"]));
        let tls = Arc::new(ServerTls::load(&tls_config(vec![pair], TlsVersion::V1_2), "x").unwrap());
        let shutdown = CancellationToken::new();
        let watcher = tls.spawn_watcher(Duration::from_millis(10), shutdown.clone());

        write_pair(dir.path(), "mx", &ca.issue(&["b.test"]));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tls.expiries()[0].0 != "b.test" {
            assert!(tokio::time::Instant::now() < deadline, "watcher did not reload");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), watcher).await.unwrap().unwrap();
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = client_config(&UpstreamVerify::CaFile(missing)).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");

        std::fs::write(dir.path().join("empty.pem"), "# nothing here\n").unwrap();
        let err = client_config(&UpstreamVerify::CaFile(dir.path().join("empty.pem"))).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
    }

    #[test]
    fn error_chain_includes_causes() {
        let err = TlsError::Read { path: "/x.pem".into(), source: io::Error::other("gone") };
        assert_eq!(err.chain(), "cannot read /x.pem: gone");
    }
}
