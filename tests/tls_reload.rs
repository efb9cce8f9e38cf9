//! Certificate reload seen through a real listener: moat with a STARTTLS listener whose certificate and key
//! live in a temporary directory. The files are replaced the way deploy tools do it (write a new file,
//! rename it into place); then a reload (explicit, as SIGHUP does, or by the file watcher) must leave open
//! sessions working, give the next handshake the new certificate, and refuse a corrupt file while the
//! previous certificate stays in service. Certificates are compared by the SHA-256 of the leaf's DER.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake::{FakeUpstream, Script};
use common::moat::{config_from, start};
use moat::server::Running;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A CA made per test; it issues P-256 leaves for `mx.test`.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and key as PEM text, and the SHA-256 of the certificate's DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    fingerprint: Vec<u8>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "tls_reload test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        TestCa { cert: params.self_signed(&key).unwrap(), key }
    }

    fn issue(&self) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["mx.test".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), fingerprint: fingerprint(cert.der()) }
    }

    /// A client that trusts only this CA (ring provider, TLS 1.2 and 1.3).
    fn connector(&self) -> TlsConnector {
        common::moat::tls_connector(self.cert.der().clone())
    }
}

fn fingerprint(der: &CertificateDer<'_>) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, der.as_ref()).as_ref().to_vec()
}

/// Replaces `path` atomically: write a sibling, then rename it over the original.
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Where the served pair lives.
struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new(leaf: &Leaf) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let files = Files { cert: dir.path().join("mx.pem"), key: dir.path().join("mx.key"), _dir: dir };
        files.install(leaf);
        files
    }

    /// The certificate first, then its key, each renamed into place.
    fn install(&self, leaf: &Leaf) {
        replace(&self.cert, leaf.cert_pem.as_bytes());
        replace(&self.key, leaf.key_pem.as_bytes());
    }
}

/// moat with one STARTTLS listener serving the pair in `files`, relaying to `fake`.
async fn start_moat(fake: &FakeUpstream, files: &Files) -> Running {
    let listeners = format!(
        "[[listener]]\nname = \"smtp\"\naddress = \"127.0.0.1:0\"\nmode = \"starttls\"\n\
         [tls]\ncertificates = [ {{ cert = \"{}\", key = \"{}\" }} ]\n",
        files.cert.display(),
        files.key.display()
    );
    start(&config_from(fake.addr, "", &listeners)).await
}

/// The shared test client (`tests/common/moat.rs`), over TCP or TLS.
type Lines<S> = common::moat::Client<S>;

/// One message over an open session, expecting 250.
async fn send_message<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Lines<S>, subject: &str) {
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<b@example.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes()).await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");
}

/// An established TLS session on the listener (greeting, EHLO, STARTTLS, handshake with SNI mx.test, EHLO)
/// and the SHA-256 of the leaf certificate moat presented.
async fn tls_session(running: &Running, ca: &TestCa) -> (Lines<TlsStream<TcpStream>>, Vec<u8>) {
    let tcp = TcpStream::connect(running.addr("smtp").unwrap()).await.unwrap();
    let mut plain = Lines::new(tcp);
    assert_eq!(plain.reply().await.0, 220);
    plain.expect("EHLO client.example", 250).await;
    plain.expect("STARTTLS", 220).await;
    assert!(plain.io.buffer().is_empty());
    let tcp = plain.io.into_inner();
    let name = ServerName::try_from("mx.test").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(10), ca.connector().connect(name, tcp))
        .await
        .expect("handshake within 10 s")
        .expect("handshake succeeds");
    let leaf = fingerprint(&tls.get_ref().1.peer_certificates().expect("a certificate")[0]);
    let mut session = Lines::new(tls);
    session.expect("EHLO client.example", 250).await;
    (session, leaf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_for_new_handshakes_keeps_open_sessions_and_refuses_corrupt_files() {
    let fake = FakeUpstream::start(Script::default()).await;
    let ca = TestCa::new();
    let (old, new) = (ca.issue(), ca.issue());
    let files = Files::new(&old);
    let running = start_moat(&fake, &files).await;
    let tls = Arc::clone(running.tls.as_ref().expect("a tls listener loads certificates"));

    let (mut open, presented) = tls_session(&running, &ca).await;
    assert_eq!(presented, old.fingerprint);

    files.install(&new);
    // Ok(false) only if the 5 s watcher got there first; either way the new pair must now be served.
    tls.reload().expect("the new pair loads");
    let (mut fresh, presented) = tls_session(&running, &ca).await;
    assert_eq!(presented, new.fingerprint, "the next handshake presents the new certificate");
    assert_ne!(new.fingerprint, old.fingerprint);

    // The session opened before the swap is untouched and still relays.
    send_message(&mut open, "through the session opened before the reload").await;
    send_message(&mut fresh, "through a session opened after the reload").await;
    assert_eq!(fake.wait_for(2).await.len(), 2);

    // A corrupt certificate is refused, with the file named; the previous one stays in service.
    let corrupt = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    replace(&files.cert, corrupt.as_bytes());
    let err = tls.reload().expect_err("a corrupt certificate is refused");
    assert!(err.to_string().contains(&files.cert.display().to_string()), "{err}");
    let (mut after, presented) = tls_session(&running, &ca).await;
    assert_eq!(presented, new.fingerprint, "the previous certificate is still served");
    send_message(&mut after, "after a refused reload").await;

    // A key that does not belong to the certificate is refused too.
    replace(&files.cert, new.cert_pem.as_bytes());
    replace(&files.key, old.key_pem.as_bytes());
    assert!(tls.reload().is_err(), "mismatched key and certificate");
    assert_eq!(tls_session(&running, &ca).await.1, new.fingerprint);

    // Every session still works after all that.
    for s in [&mut open, &mut fresh, &mut after] {
        s.expect("NOOP", 250).await;
        s.expect("QUIT", 221).await;
    }
    assert_eq!(fake.wait_for(3).await.len(), 3);
    let _ = running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_watcher_picks_up_a_replaced_certificate() {
    let fake = FakeUpstream::start(Script::default()).await;
    let ca = TestCa::new();
    let (old, new) = (ca.issue(), ca.issue());
    let files = Files::new(&old);
    let running = start_moat(&fake, &files).await;
    let (mut open, presented) = tls_session(&running, &ca).await;
    assert_eq!(presented, old.fingerprint);

    // No explicit reload: the server's watcher polls every 5 s and reloads once the files held still for
    // one poll, so the change shows within about 10 s.
    files.install(&new);
    let start = Instant::now();
    loop {
        let (mut s, presented) = tls_session(&running, &ca).await;
        s.expect("QUIT", 221).await;
        if presented == new.fingerprint {
            break;
        }
        assert_eq!(presented, old.fingerprint);
        assert!(start.elapsed() < Duration::from_secs(15), "the watcher did not reload within 15 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    send_message(&mut open, "opened before the watcher's reload").await;
    assert_eq!(fake.wait_for(1).await.len(), 1);
    let _ = running.stop().await;
}

/// TLS session resumption: a client that keeps its session cache resumes on its next connection (TLS 1.3
/// tickets), so it skips the certificate signature; the resumed session works like a full one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_client_resumes_its_tls_session() {
    let fake = FakeUpstream::start(Script::default()).await;
    let ca = TestCa::new();
    let files = Files::new(&ca.issue());
    let running = start_moat(&fake, &files).await;
    // One connector for both connections: its client config holds the session cache.
    let connector = ca.connector();
    let mut kinds = Vec::new();
    for n in 0..2 {
        let tcp = TcpStream::connect(running.addr("smtp").unwrap()).await.unwrap();
        let mut plain = Lines::new(tcp);
        assert_eq!(plain.reply().await.0, 220);
        plain.expect("EHLO client.example", 250).await;
        plain.expect("STARTTLS", 220).await;
        let name = ServerName::try_from("mx.test").unwrap();
        let tls = connector.connect(name, plain.io.into_inner()).await.expect("handshake succeeds");
        let mut session = Lines::new(tls);
        // The greeting-less EHLO also makes the client read the server's NewSessionTicket messages.
        session.expect("EHLO client.example", 250).await;
        kinds.push(session.io.get_ref().get_ref().1.handshake_kind());
        send_message(&mut session, &format!("resumption {n}")).await;
        session.expect("QUIT", 221).await;
    }
    assert_eq!(kinds, [Some(rustls::HandshakeKind::Full), Some(rustls::HandshakeKind::Resumed)]);
    assert_eq!(fake.wait_for(2).await.len(), 2);
    running.stop().await;
}
