use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio_util::sync::CancellationToken;

use super::server::{dns_names, wildcard_matches};
use super::*;
use crate::config::{CertificateConfig, TlsConfig, TlsVersion};
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
    let tls = ServerTls::load(&tls_config(vec![write_pair(dir.path(), "mx", &leaf)], TlsVersion::V1_2), "x").unwrap();
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
