//! The metrics listener: a deliberately small HTTP/1.1 server (no hyper) for `/metrics`, `/healthz` and
//! `/readyz`, and the administrator's `POST /admin/users/NAME/resume` (`moat user resume NAME`; only when
//! the listener has credentials configured).
//!
//! It answers one request per connection and closes (`Connection: close`), reads at most [`MAX_HEAD`] bytes of
//! request head within [`READ_TIMEOUT`], ignores any body, and serves at most [`MAX_CONNECTIONS`] clients at
//! once. The routing is a pure function ([`respond`]) so it is tested without sockets as well as with them.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Readiness;

/// Largest request head accepted; a scraper's GET is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// Time allowed to send the whole request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed to take the whole response; a large registry renders to a few hundred KiB.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP clients; a handful of scrapers and probes is normal, more is a misbehaving client.
const MAX_CONNECTIONS: usize = 64;

/// The Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Credentials the listener requires for everything but `/healthz`.
#[derive(Clone)]
pub enum HttpAuth {
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// `Authorization: Basic base64(user:password)`.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for HttpAuth {
    // Never print the secret, even in a debug dump of the configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            HttpAuth::Basic { user, .. } => {
                write!(f, "Basic {{ user: {user:?}, password: <redacted> }}")
            }
        }
    }
}

impl HttpAuth {
    /// Whether an `Authorization` header value carries these credentials. An empty configured secret never
    /// matches (fail closed).
    pub(super) fn allows(&self, header: Option<&str>) -> bool {
        let Some((scheme, credentials)) = header.and_then(|h| h.trim().split_once(' ')) else {
            return false;
        };
        let credentials = credentials.trim();
        match self {
            HttpAuth::Bearer(token) => {
                !token.is_empty()
                    && scheme.eq_ignore_ascii_case("bearer")
                    && same(credentials.as_bytes(), token.as_bytes())
            }
            HttpAuth::Basic { user, password } => {
                let Ok(given) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
                    return false;
                };
                let expected = format!("{user}:{password}");
                !password.is_empty() && scheme.eq_ignore_ascii_case("basic") && same(&given, expected.as_bytes())
            }
        }
    }

    fn challenge(&self) -> &'static str {
        match self {
            HttpAuth::Bearer(_) => "Bearer realm=\"moat\"",
            HttpAuth::Basic { .. } => "Basic realm=\"moat\", charset=\"UTF-8\"",
        }
    }
}

/// Constant-time equality: both sides are hashed first, so neither the length nor the position of the first
/// difference shows in the timing, and the digests are compared without early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a);
    let db = ring::digest::digest(&ring::digest::SHA256, b);
    da.as_ref().iter().zip(db.as_ref()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the connection tasks share.
struct Shared {
    handle: PrometheusHandle,
    ready: Readiness,
    auth: Option<HttpAuth>,
    admin: Option<crate::pipeline::accounts::SharedAdmin>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` fires.
///
/// `GET /metrics` renders the registry (Prometheus text format 0.0.4); `/healthz` answers `200 ok` while the
/// process runs and is never behind `auth`; `/readyz` answers `200 ready`, or `503` listing what is not ready.
/// Other paths get `404`, methods other than GET and HEAD `405`. Connections in progress when shutdown fires
/// finish on their own (each is bounded by the read and write timeouts).
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    ready: Readiness,
    auth: Option<HttpAuth>,
    shutdown: CancellationToken,
) {
    serve_with_admin(listener, handle, ready, auth, None, shutdown).await;
}

/// [`serve`], also answering `POST /admin/users/NAME/resume` with `admin` (credentials required).
pub async fn serve_with_admin(
    listener: TcpListener,
    handle: PrometheusHandle,
    ready: Readiness,
    auth: Option<HttpAuth>,
    admin: Option<crate::pipeline::accounts::SharedAdmin>,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared { handle, ready, auth, admin });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("too many metrics clients; connection dropped");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            answer(stream, &shared).await;
        });
    }
    debug!("metrics listener closed");
}

/// Reads one request head, writes one response, closes.
async fn answer(mut stream: TcpStream, shared: &Shared) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Head::Complete(head))) => match admin(&head, shared).await {
            Some(r) => r,
            None => respond(&head, shared),
        },
        Ok(Ok(Head::TooLarge)) => Response::text(431, "Request Header Fields Too Large", "request head too large\n"),
        Ok(Ok(Head::Closed)) | Ok(Err(_)) => return,
        Err(_) => Response::text(408, "Request Timeout", "request timeout\n"),
    };
    let bytes = response.render();
    let write = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    if let Err(e) =
        tokio::time::timeout(WRITE_TIMEOUT, write).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        debug!(error = %e, "metrics response not sent");
    }
}

/// The outcome of reading a request head.
enum Head {
    Complete(Vec<u8>),
    TooLarge,
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        // The head ends at the blank line, or (not found yet) at least at what was read so far.
        let end = head_end(&buf[scan_from..]).map(|e| scan_from + e);
        if end.unwrap_or(buf.len()) > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
        if let Some(end) = end {
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
    }
}

/// Where the blank line that ends a head is (CRLF CRLF, or bare LF LF from lenient clients).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A response, rendered with `Content-Length` and `Connection: close`.
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    extra: Option<(&'static str, &'static str)>,
    body: Vec<u8>,
    head_only: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response { status, reason, content_type: TEXT, extra: None, body: body.into(), head_only: false }
    }

    fn render(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if let Some((name, value)) = self.extra {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// The parts of a request head that matter here.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    authorization: Option<&'a str>,
}

fn parse(head: &[u8]) -> Option<Request<'_>> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let mut authorization = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("authorization") && authorization.is_none() {
            authorization = Some(value.trim());
        }
    }
    Some(Request { method, path, authorization })
}

/// Routes one request head to its response.
fn respond(head: &[u8], shared: &Shared) -> Response {
    let Some(req) = parse(head) else {
        return Response::text(400, "Bad Request", "bad request\n");
    };
    let head_only = req.method == "HEAD";
    if req.method != "GET" && !head_only {
        let mut r = Response::text(405, "Method Not Allowed", "method not allowed\n");
        r.extra = Some(("Allow", "GET, HEAD"));
        return r;
    }
    let mut response = route(&req, shared);
    response.head_only = head_only;
    response
}

/// The admin route (`/admin/users/NAME/resume`), or `None` for other paths. It changes state, so it takes
/// POST only and always needs credentials: with none configured it is refused (`403`), never open.
async fn admin(head: &[u8], shared: &Shared) -> Option<Response> {
    let req = parse(head)?;
    let name = req.path.strip_prefix("/admin/users/")?.strip_suffix("/resume")?;
    if req.method != "POST" {
        let mut r = Response::text(405, "Method Not Allowed", "method not allowed\n");
        r.extra = Some(("Allow", "POST"));
        return Some(r);
    }
    let Some(auth) = &shared.auth else {
        return Some(Response::text(
            403,
            "Forbidden",
            "admin endpoints need metrics credentials (bearer_token or basic auth)\n",
        ));
    };
    if !auth.allows(req.authorization) {
        let mut r = Response::text(401, "Unauthorized", "unauthorized\n");
        r.extra = Some(("WWW-Authenticate", auth.challenge()));
        return Some(r);
    }
    let Some(admin) = &shared.admin else {
        return Some(Response::text(404, "Not Found", "account detection is off ([accounts] enabled = false)\n"));
    };
    let name = name.replace("%40", "@");
    let valid = |c: char| c.is_ascii_alphanumeric() || "@._+-".contains(c);
    if name.is_empty() || name.len() > 256 || !name.chars().all(valid) {
        return Some(Response::text(400, "Bad Request", "bad user name\n"));
    }
    Some(match admin.resume(&name).await {
        Ok(true) => Response::text(200, "OK", format!("resumed {name}\n")),
        Ok(false) => Response::text(200, "OK", format!("{name} was not suspended\n")),
        Err(e) => Response::text(503, "Service Unavailable", format!("state store: {e}\n")),
    })
}

fn route(req: &Request<'_>, shared: &Shared) -> Response {
    if req.path == "/healthz" {
        return Response::text(200, "OK", "ok\n");
    }
    if let Some(auth) = &shared.auth {
        if !auth.allows(req.authorization) {
            let mut r = Response::text(401, "Unauthorized", "unauthorized\n");
            r.extra = Some(("WWW-Authenticate", auth.challenge()));
            return r;
        }
    }
    match req.path {
        "/metrics" => {
            let mut r = Response::text(200, "OK", shared.handle.render());
            r.content_type = METRICS_CONTENT_TYPE;
            r
        }
        "/readyz" => {
            let reasons = shared.ready.reasons();
            let degraded = shared.ready.degraded();
            if reasons.is_empty() && !degraded.is_empty() {
                Response::text(200, "OK", format!("ready, degraded: {}\n", degraded.join(", ")))
            } else if reasons.is_empty() {
                Response::text(200, "OK", "ready\n")
            } else {
                Response::text(503, "Service Unavailable", format!("not ready: {}\n", reasons.join(", ")))
            }
        }
        _ => Response::text(404, "Not Found", "not found\n"),
    }
}
