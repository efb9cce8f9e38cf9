//! `moat user resume NAME [--config FILE]`: asks the running moat (its metrics listener, with the
//! credentials from the same config file) to lift a suspension. The memory store lives in the server
//! process, so the command cannot edit it directly; with a shared store it goes the same way.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;

use crate::config::Config;
use crate::metrics::HttpAuth;

/// How long the command waits for the server.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (the server's are one line).
const MAX_ANSWER: u64 = 64 * 1024;

/// Usage of the command.
pub const USAGE: &str = "usage: moat user resume NAME [--config FILE]   (default FILE: config/moat.toml)\n\
  lifts the suspension of an account (compromised-account detection, docs/limits.md) in the running moat";

/// Runs the command; `Ok` is what to print.
pub fn run(args: &[String]) -> Result<String, String> {
    let mut config = PathBuf::from("config/moat.toml");
    let mut name = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" => config = it.next().ok_or("--config needs a file")?.into(),
            "--help" | "-h" => return Ok(format!("{USAGE}\n")),
            s if name.is_none() && !s.starts_with('-') => name = Some(s.to_string()),
            s => return Err(format!("unexpected argument {s:?}")),
        }
    }
    let name = name.ok_or("expected a user name")?;
    let config = Config::load(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    if config.metrics.address.is_empty() {
        return Err("metrics.address is empty: the running moat has no admin endpoint".into());
    }
    let addr: std::net::SocketAddr = config
        .metrics
        .address
        .parse()
        .map_err(|_| format!("metrics.address {:?} is not ip:port", config.metrics.address))?;
    let auth = crate::metrics::http_auth(&config.metrics).map_err(|e| e.to_string())?.ok_or(
        "the metrics listener has no credentials (metrics.bearer_token or basic auth); the admin endpoint needs them",
    )?;
    let authorization = match auth {
        HttpAuth::Bearer(t) => format!("Bearer {t}"),
        HttpAuth::Basic { user, password } => {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
        }
    };
    let request = format!(
        "POST /admin/users/{name}/resume HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {authorization}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("cannot reach moat at {addr}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT)).and_then(|()| s.set_write_timeout(Some(TIMEOUT))).map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes()).map_err(|e| format!("cannot send to {addr}: {e}"))?;
    let mut answer = String::new();
    s.take(MAX_ANSWER).read_to_string(&mut answer).map_err(|e| format!("no answer from {addr}: {e}"))?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or("");
    if status.split(' ').nth(1) == Some("200") {
        Ok(body.to_string())
    } else {
        Err(format!("{status}: {}", body.trim_end()))
    }
}
