//! Starting moat in-process on loopback, and a small SMTP client for tests.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use moat::config::Config;
use moat::server::Running;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A config for tests: one plain listener on a free port, relaying to `upstream`, no metrics, no audit,
/// no reverse DNS, the test domains local ([`LOCAL_DOMAINS`]); `extra` is TOML with dotted keys
/// (`limits.max_recipients = 1`) appended at the root.
pub fn test_config(upstream: SocketAddr, extra: &str) -> Config {
    let extra = with_rules_off(extra);
    let text = format!(
        "server.hostname = \"mx.test\"\nserver.reverse_dns = false\nmetrics.address = \"\"\naudit.destination = \"off\"\n\
         {LOCAL_DOMAINS}\nupstream.address = \"{upstream}\"\nshutdown.grace_period = \"5s\"\n{extra}\n\
         [[listener]]\nname = \"smtp\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\n"
    );
    Config::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A config for tests with the caller's listeners: `extra` is TOML with dotted keys appended at the root
/// (like [`test_config`]), `listeners` is TOML tables (`[[listener]]`, `[tls]`, ...) appended after it.
/// Same base settings as [`test_config`]: hostname `mx.test`, no metrics, no audit, no reverse DNS.
pub fn config_from(upstream: SocketAddr, extra: &str, listeners: &str) -> Config {
    let extra = with_rules_off(extra);
    let text = format!(
        "server.hostname = \"mx.test\"\nserver.reverse_dns = false\nmetrics.address = \"\"\naudit.destination = \"off\"\n\
         {LOCAL_DOMAINS}\nupstream.address = \"{upstream}\"\nshutdown.grace_period = \"5s\"\n{extra}\n{listeners}\n"
    );
    Config::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Tests run without rules unless they set `rules.directory` themselves (the shipped `rules/` would
/// otherwise load from the crate directory).
fn with_rules_off(extra: &str) -> String {
    if extra.contains("rules.directory") {
        extra.to_string()
    } else {
        format!("rules.directory = \"\"\n{extra}")
    }
}

/// The domains unauthenticated test mail goes to (an `mx` listener refuses every other one with `554`).
pub const LOCAL_DOMAINS: &str = "relay.local_domains = [\"example.test\", \"reject.test\", \"sink.example\"]";

/// Starts moat with `config`.
pub async fn start(config: &Config) -> Running {
    moat::server::start(config).await.expect("moat starts")
}

/// A line-oriented SMTP client over TCP or, after a handshake, TLS.
pub struct Client<S = TcpStream> {
    pub io: BufReader<S>,
}

impl Client {
    /// Connects and reads the greeting; returns the client and the greeting's code.
    pub async fn connect(addr: SocketAddr) -> (Client, u16) {
        let s = TcpStream::connect(addr).await.unwrap();
        let mut c = Client::new(s);
        let (code, _) = c.reply().await;
        (c, code)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client over an established stream (nothing is read).
    pub fn new(s: S) -> Client<S> {
        Client { io: BufReader::new(s) }
    }

    /// The stream, once nothing is left unread in the buffer (e.g. to start TLS on it).
    pub fn into_inner(self) -> S {
        assert!(self.io.buffer().is_empty(), "unread bytes before the handshake: {:?}", self.io.buffer());
        self.io.into_inner()
    }

    /// Sends raw bytes in one write and flushes (a TLS stream holds them back otherwise).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    /// Sends a line with CRLF and returns the reply.
    pub async fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Sends a line and asserts the reply code.
    pub async fn expect(&mut self, line: &str, code: u16) -> String {
        let (got, text) = self.cmd(line).await;
        assert_eq!(got, code, "{line} -> {got} {text}");
        text
    }

    /// Reads one reply (all lines); code 0 means the connection closed.
    pub async fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = match tokio::time::timeout(Duration::from_secs(10), self.io.read_line(&mut line)).await {
                Ok(r) => r.unwrap_or(0),
                Err(_) => return (0, format!("{text}<no reply within 10 s>")),
            };
            if n == 0 {
                return (0, text);
            }
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return (code, text);
            }
        }
    }
}

/// A TLS client that trusts only `ca` (ring provider, TLS 1.2 and 1.3), as the tests' clients use.
pub fn tls_connector(ca: rustls::pki_types::CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}
