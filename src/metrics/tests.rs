use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;

// The recorder is process-wide and shared by every test in this binary: each test uses label values
// (listener names, stage names) nobody else uses, and asserts on whole sample lines.

fn assert_line(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "missing line {line:?} in:\n{text}");
}

#[test]
fn install_is_idempotent() {
    let a = install().unwrap();
    let b = install().unwrap();
    connection("idem", ConnResult::Accepted);
    assert_line(&a.render(), "moat_connections_total{listener=\"idem\",result=\"accepted\"} 1");
    assert_line(&b.render(), "moat_connections_total{listener=\"idem\",result=\"accepted\"} 1");
}

#[test]
fn helpers_render_exact_lines() {
    let h = install().unwrap();
    connection("smtp-t1", ConnResult::Accepted);
    connection("smtp-t1", ConnResult::Accepted);
    connection("smtp-t1", ConnResult::RejectedLimit);
    session_closed("smtp-t1", CloseReason::TooManyErrors);
    tls_handshake("smtp-t1", TlsVersion::from_name("TLSv1.3"), TlsResult::Ok);
    tls_handshake("smtp-t1", TlsVersion::None, TlsResult::Timeout);
    message("smtp-t1", MessageVerdict::Discarded, 2048);
    received_bytes("smtp-t1", 2048);
    received_bytes("smtp-t1", 10);
    recipient("smtp-t1", RcptResult::Rejected);
    tls_certificate_expiry("t1.example", 1_900_000_000);
    let text = h.render();
    for line in [
        "moat_connections_total{listener=\"smtp-t1\",result=\"accepted\"} 2",
        "moat_connections_total{listener=\"smtp-t1\",result=\"rejected_limit\"} 1",
        "moat_sessions_closed_total{listener=\"smtp-t1\",reason=\"too_many_errors\"} 1",
        "moat_tls_handshakes_total{listener=\"smtp-t1\",version=\"TLSv1.3\",result=\"ok\"} 1",
        "moat_tls_handshakes_total{listener=\"smtp-t1\",version=\"none\",result=\"timeout\"} 1",
        "moat_messages_total{listener=\"smtp-t1\",verdict=\"discarded\"} 1",
        "moat_received_bytes_total{listener=\"smtp-t1\"} 2058",
        "moat_recipients_total{listener=\"smtp-t1\",result=\"rejected\"} 1",
        "moat_tls_certificate_expiry_timestamp_seconds{name=\"t1.example\"} 1900000000",
        "# TYPE moat_connections_total counter",
    ] {
        assert_line(&text, line);
    }
    assert!(text.contains("# HELP moat_connections_total "), "{text}");
    let build = format!("moat_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    assert_line(&text, &build);
}

#[test]
fn active_gauge_follows_the_guard() {
    let h = install().unwrap();
    let a = connection_active("smtp-active");
    let b = connection_active("smtp-active");
    assert_line(&h.render(), "moat_connections_active{listener=\"smtp-active\"} 2");
    drop(a);
    drop(b);
    assert_line(&h.render(), "moat_connections_active{listener=\"smtp-active\"} 0");
}

#[test]
fn stage_histogram_uses_second_buckets() {
    let h = install().unwrap();
    stage_seconds("test_stage_hist", Duration::from_millis(3));
    let text = h.render();
    assert_line(&text, "# TYPE moat_stage_seconds histogram");
    assert_line(&text, "moat_stage_seconds_bucket{stage=\"test_stage_hist\",le=\"0.0025\"} 0");
    assert_line(&text, "moat_stage_seconds_bucket{stage=\"test_stage_hist\",le=\"0.005\"} 1");
    assert_line(&text, "moat_stage_seconds_bucket{stage=\"test_stage_hist\",le=\"60\"} 1");
    assert_line(&text, "moat_stage_seconds_count{stage=\"test_stage_hist\"} 1");
}

#[test]
fn verbs_and_classes() {
    assert_eq!(Verb::from_line(b"mail FROM:<a@b>"), Verb::Mail);
    assert_eq!(Verb::from_line(b"STARTTLS"), Verb::Starttls);
    assert_eq!(Verb::from_line(b"ehlo\r\n"), Verb::Ehlo);
    assert_eq!(Verb::from_line(b"MAILX FROM:<a@b>"), Verb::Unknown);
    assert_eq!(Verb::from_line(b"unknown"), Verb::Unknown);
    assert_eq!(Verb::from_line(b""), Verb::Unknown);
    assert_eq!(Verb::ALL.len(), 15);
    assert_eq!(Limit::ALL.len(), 13);
    assert_eq!(TlsVersion::from_name("unknown"), TlsVersion::None);
}

#[test]
fn readiness_reasons() {
    let r = Readiness::new();
    assert!(!r.is_ready());
    assert_eq!(r.reasons(), vec!["listeners not bound"]);
    let clone = r.clone();
    clone.set_listeners_bound(true);
    assert!(r.is_ready());
    r.set_upstream_ok(false);
    r.set_rules_loaded(false);
    assert_eq!(clone.reasons(), vec!["rules not loaded", "upstream unreachable"]);
}

#[test]
fn auth_is_redacted_in_debug() {
    let a = HttpAuth::Basic { user: "prom".into(), password: "s3cret".into() };
    let b = HttpAuth::Bearer("t0ken".into());
    let shown = format!("{a:?} {b:?}");
    assert!(!shown.contains("s3cret") && !shown.contains("t0ken"), "{shown}");
}

// --- over real sockets ---

struct Server {
    addr: std::net::SocketAddr,
    ready: Readiness,
    stop: CancellationToken,
}

async fn start(auth: Option<HttpAuth>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ready = Readiness::new();
    ready.set_listeners_bound(true);
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, install().unwrap(), ready.clone(), auth, stop.clone()));
    Server { addr, ready, stop }
}

/// Sends `request` verbatim and returns (status, whole response text).
async fn send(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.unwrap().unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

async fn get(addr: std::net::SocketAddr, path: &str, extra: &str) -> (u16, String) {
    send(addr, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n")).await
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[tokio::test]
async fn endpoints_over_http() {
    let srv = start(None).await;
    connection("smtp-http", ConnResult::RejectedIp);

    let (code, r) = get(srv.addr, "/metrics", "").await;
    assert_eq!(code, 200, "{r}");
    assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
    assert!(r.contains("Connection: close\r\n"), "{r}");
    assert_line(body(&r), "moat_connections_total{listener=\"smtp-http\",result=\"rejected_ip\"} 1");
    let len: usize = r.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().parse().unwrap();
    assert_eq!(len, body(&r).len());

    let (code, r) = get(srv.addr, "/healthz", "").await;
    assert_eq!((code, body(&r)), (200, "ok\n"));

    let (code, r) = get(srv.addr, "/readyz", "").await;
    assert_eq!((code, body(&r)), (200, "ready\n"));
    srv.ready.set_upstream_ok(false);
    let (code, r) = get(srv.addr, "/readyz", "").await;
    assert_eq!((code, body(&r)), (503, "not ready: upstream unreachable\n"));

    let (code, _) = get(srv.addr, "/nope", "").await;
    assert_eq!(code, 404);
    let (code, r) = send(srv.addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(code, 405);
    assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");
    let (code, r) = send(srv.addr, "HEAD /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!((code, body(&r)), (200, ""));
    let (code, _) = send(srv.addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
    assert_eq!(code, 200);
    let (code, _) = send(srv.addr, "garbage\r\n\r\n").await;
    assert_eq!(code, 400);
    srv.stop.cancel();
}

#[tokio::test]
async fn oversized_head_is_refused() {
    let srv = start(None).await;
    let huge = format!("GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(9000));
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    // The server may close while we still write; only the status line matters.
    let _ = s.write_all(huge.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap();
    assert!(out.starts_with(b"HTTP/1.1 431 "), "{}", String::from_utf8_lossy(&out));
    srv.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn slow_head_times_out() {
    let srv = start(None).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    let mut out = String::new();
    // With the clock paused, the runtime jumps to the server's 5 s deadline once everything is idle.
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
    srv.stop.cancel();
}

#[tokio::test]
async fn bearer_auth() {
    let srv = start(Some(HttpAuth::Bearer("s3cret".into()))).await;
    let (code, r) = get(srv.addr, "/metrics", "").await;
    assert_eq!(code, 401);
    assert!(r.contains("WWW-Authenticate: Bearer realm=\"moat\"\r\n"), "{r}");
    let (code, _) = get(srv.addr, "/metrics", "Authorization: Bearer wrong\r\n").await;
    assert_eq!(code, 401);
    let (code, _) = get(srv.addr, "/readyz", "Authorization: Bearer s3cret\r\n").await;
    assert_eq!(code, 200);
    let (code, _) = get(srv.addr, "/metrics", "authorization: bearer s3cret\r\n").await;
    assert_eq!(code, 200);
    let (code, _) = get(srv.addr, "/healthz", "").await;
    assert_eq!(code, 200, "healthz stays open");
    srv.stop.cancel();
}

#[tokio::test]
async fn basic_auth() {
    let srv = start(Some(HttpAuth::Basic { user: "prom".into(), password: "pw:1".into() })).await;
    let (code, r) = get(srv.addr, "/metrics", "").await;
    assert_eq!(code, 401);
    assert!(r.contains("WWW-Authenticate: Basic realm=\"moat\""), "{r}");
    // base64("prom:pw:1") = cHJvbTpwdzox; base64("prom:pw:2") = cHJvbTpwdzoy
    let (code, _) = get(srv.addr, "/metrics", "Authorization: Basic cHJvbTpwdzoy\r\n").await;
    assert_eq!(code, 401);
    let (code, _) = get(srv.addr, "/metrics", "Authorization: Basic !!!\r\n").await;
    assert_eq!(code, 401);
    let (code, _) = get(srv.addr, "/metrics", "Authorization: Basic cHJvbTpwdzox\r\n").await;
    assert_eq!(code, 200);
    srv.stop.cancel();
}

#[test]
fn empty_secrets_never_match() {
    assert!(!HttpAuth::Bearer(String::new()).allows(Some("Bearer ")));
    assert!(!HttpAuth::Basic { user: "u".into(), password: String::new() }.allows(Some("Basic dTo=")));
    assert!(!HttpAuth::Bearer("x".into()).allows(None));
}

#[tokio::test]
async fn stops_accepting_on_shutdown() {
    let srv = start(None).await;
    srv.stop.cancel();
    // Once the accept loop has returned, the listener is closed and connecting fails.
    for _ in 0..100 {
        if TcpStream::connect(srv.addr).await.is_err() {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("listener still open after shutdown");
}

#[test]
fn every_family_is_documented() {
    let doc = include_str!("../../docs/metrics.md");
    for (name, ..) in FAMILIES {
        assert!(doc.contains(&format!("`{name}`")), "{name} missing from docs/metrics.md");
    }
    assert_eq!(FAMILIES.len(), 49);
}

#[test]
fn http_auth_from_config() {
    use crate::config::MetricsConfig;
    assert!(http_auth(&MetricsConfig::default()).unwrap().is_none());
    let c = MetricsConfig { bearer_token: "t0k".into(), ..MetricsConfig::default() };
    assert!(matches!(http_auth(&c).unwrap(), Some(HttpAuth::Bearer(t)) if t == "t0k"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, "pa55\r\n").unwrap();
    let c = MetricsConfig { basic_user: "prom".into(), basic_password_file: file, ..MetricsConfig::default() };
    assert!(
        matches!(http_auth(&c).unwrap(), Some(HttpAuth::Basic { user, password }) if user == "prom" && password == "pa55")
    );
    // A configured but empty token file locks the listener rather than opening it.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let c = MetricsConfig { bearer_token_file: empty, ..MetricsConfig::default() };
    let auth = http_auth(&c).unwrap().expect("credentials are still required");
    assert!(!auth.allows(Some("Bearer ")));
    let c = MetricsConfig { bearer_token_file: dir.path().join("missing"), ..MetricsConfig::default() };
    assert!(matches!(http_auth(&c), Err(MetricsError::Secret { .. })));
}

#[test]
fn auth_series_start_at_zero_and_unknown_mechanisms_are_ignored() {
    let h = install().unwrap();
    auth_attempt("XOAUTH2", AuthResult::Failure);
    let text = h.render();
    assert!(text.lines().any(|l| l.starts_with("moat_auth_attempts_total{mechanism=\"LOGIN\",result=\"cancelled\"} ")));
    assert!(text.lines().any(|l| l.starts_with("moat_auth_lockouts_total ")));
    assert!(text.lines().any(|l| l.starts_with("moat_rules_reload_total{result=\"error\"} ")));
    assert!(!text.contains("XOAUTH2"));
}
