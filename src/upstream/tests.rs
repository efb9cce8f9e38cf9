//! Upstream STARTTLS decisions against a scripted loopback server (the handshake itself is tested against a
//! real Postfix in `tests/upstream_tls.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::*;
use crate::config::{UpstreamConfig, UpstreamTlsMode, UpstreamTlsVerify};

/// A one-connection server: sends the greeting, then answers each command line with the reply of the
/// first script entry whose command prefix matches. Returns its address and the commands it received.
async fn scripted(
    script: &'static [(&'static str, &'static str)],
) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut io = BufReader::new(tcp);
        io.get_mut().write_all(b"220 fake ESMTP\r\n").await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..10 {
            let mut line = String::new();
            if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                break;
            }
            let line = line.trim_end().to_owned();
            let reply = script.iter().find(|(cmd, _)| line.starts_with(cmd)).map_or("500 what\r\n", |(_, r)| r);
            let upgrade = line.starts_with("STARTTLS") && reply.starts_with("220");
            seen.push(line);
            // After a 220 to STARTTLS this server speaks no TLS: it hangs up, so a handshake fails at once.
            if io.get_mut().write_all(reply.as_bytes()).await.is_err() || upgrade {
                break;
            }
        }
        seen
    });
    (addr, task)
}

fn settings(addr: SocketAddr, mode: UpstreamTlsMode) -> Arc<UpstreamSettings> {
    let config = UpstreamConfig {
        address: addr,
        tls: mode,
        tls_verify: UpstreamTlsVerify::InsecureLoopback,
        ..UpstreamConfig::default()
    };
    Arc::new(UpstreamSettings::from_config(&config, "moat.test").unwrap())
}

const NO_STARTTLS: &[(&str, &str)] = &[("EHLO", "250-fake\r\n250 SIZE 1000\r\n"), ("QUIT", "221 bye\r\n")];

#[tokio::test]
async fn required_without_starttls_offered_is_a_tls_error() {
    let (addr, server) = scripted(NO_STARTTLS).await;
    let err = Connection::connect(settings(addr, UpstreamTlsMode::Required), None).await.unwrap_err();
    assert!(matches!(err, UpstreamError::TlsNotOffered), "{err:?}");
    assert_eq!(err.kind(), crate::metrics::UpstreamErrorKind::Tls);
    drop(err);
    assert_eq!(server.await.unwrap(), ["EHLO moat.test"]);
}

#[tokio::test]
async fn opportunistic_without_starttls_stays_plaintext() {
    let (addr, server) = scripted(NO_STARTTLS).await;
    let conn = Connection::connect(settings(addr, UpstreamTlsMode::Opportunistic), None).await.unwrap();
    assert!(!conn.is_tls());
    assert!(conn.extensions().size);
    conn.quit().await;
    assert_eq!(server.await.unwrap(), ["EHLO moat.test", "QUIT"]);
}

#[tokio::test]
async fn off_never_sends_starttls() {
    const OFFERS: &[(&str, &str)] = &[("EHLO", "250-fake\r\n250 STARTTLS\r\n"), ("QUIT", "221 bye\r\n")];
    let (addr, server) = scripted(OFFERS).await;
    let conn = Connection::connect(settings(addr, UpstreamTlsMode::Off), None).await.unwrap();
    assert!(!conn.is_tls() && conn.extensions().starttls);
    conn.quit().await;
    assert_eq!(server.await.unwrap(), ["EHLO moat.test", "QUIT"]);
}

#[tokio::test]
async fn starttls_refused_fails_required_and_continues_opportunistic() {
    const REFUSES: &[(&str, &str)] = &[
        ("EHLO", "250-fake\r\n250 STARTTLS\r\n"),
        ("STARTTLS", "454 4.7.0 TLS not available\r\n"),
        ("QUIT", "221 bye\r\n"),
    ];
    let (addr, _server) = scripted(REFUSES).await;
    let err = Connection::connect(settings(addr, UpstreamTlsMode::Required), None).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Refused { phase: Phase::Starttls, .. }), "{err:?}");
    assert_eq!(err.kind(), crate::metrics::UpstreamErrorKind::Tls);

    let (addr, server) = scripted(REFUSES).await;
    let conn = Connection::connect(settings(addr, UpstreamTlsMode::Opportunistic), None).await.unwrap();
    assert!(!conn.is_tls());
    conn.quit().await;
    assert_eq!(server.await.unwrap(), ["EHLO moat.test", "STARTTLS", "QUIT"]);
}

#[tokio::test]
async fn bytes_after_the_starttls_reply_are_refused() {
    // The upstream-side twin of the STARTTLS injection: a reply smuggled in before the handshake would be
    // read as if it came over TLS.
    const INJECTS: &[(&str, &str)] =
        &[("EHLO", "250-fake\r\n250 STARTTLS\r\n"), ("STARTTLS", "220 go ahead\r\n250 injected\r\n")];
    let (addr, _server) = scripted(INJECTS).await;
    let err = Connection::connect(settings(addr, UpstreamTlsMode::Opportunistic), None).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol { phase: Phase::Starttls, .. }), "{err:?}");
}

#[tokio::test]
async fn a_failed_handshake_is_an_error_even_when_opportunistic() {
    // The "server" answers 220 and then hangs up instead of a handshake: no fall-back to plaintext.
    const NOT_TLS: &[(&str, &str)] = &[("EHLO", "250-fake\r\n250 STARTTLS\r\n"), ("STARTTLS", "220 go ahead\r\n")];
    let (addr, _server) = scripted(NOT_TLS).await;
    let err = Connection::connect(settings(addr, UpstreamTlsMode::Opportunistic), None).await.unwrap_err();
    assert!(matches!(&err, UpstreamError::Tls { server_name, .. } if server_name == "127.0.0.1"), "{err:?}");
    assert_eq!(err.kind(), crate::metrics::UpstreamErrorKind::Tls);
}
