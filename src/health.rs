//! The upstream health check behind `/readyz`: every `metrics.upstream_check_interval`, connect to the
//! upstream, read its `220` greeting and say `QUIT`, all within `upstream.connect_timeout`, and record the
//! outcome in [`Readiness`] (which also sets `moat_upstream_up`).
//!
//! Sits beside the relay, not in it: the relay marks the upstream down at once when it cannot connect (see
//! [`crate::upstream::Pool::report_health`]); this check notices a dead upstream when no mail flows, and
//! notices it coming back.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::Readiness;

/// Longest greeting line accepted; a greeting is one short line, or a few.
const MAX_GREETING: usize = 4096;

/// The PROXY protocol v2 header with the LOCAL command: "a health check from the proxy itself"; an upstream
/// that expects PROXY v2 (Postfix `smtpd_upstream_proxy_protocol = haproxy`) waits for a header before it
/// greets.
const PROXY_V2_LOCAL: &[u8; 16] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// How to reach the upstream.
#[derive(Clone, Debug)]
pub struct UpstreamCheck {
    pub address: SocketAddr,
    /// The whole check (connect, greeting) must finish within this.
    pub timeout: Duration,
    /// Send a PROXY v2 LOCAL header first.
    pub proxy_v2: bool,
}

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no greeting within {0:?}")]
    Timeout(Duration),
    #[error("cannot talk to the upstream")]
    Io(#[source] std::io::Error),
    #[error("upstream greeted with {0:?}")]
    Greeting(String),
}

impl UpstreamCheck {
    /// Connects, reads the greeting (which must be `220`), says `QUIT` without waiting for the answer.
    pub async fn run(&self) -> Result<(), CheckError> {
        tokio::time::timeout(self.timeout, self.talk()).await.map_err(|_| CheckError::Timeout(self.timeout))?
    }

    async fn talk(&self) -> Result<(), CheckError> {
        let mut stream = TcpStream::connect(self.address).await.map_err(CheckError::Io)?;
        if self.proxy_v2 {
            stream.write_all(PROXY_V2_LOCAL).await.map_err(CheckError::Io)?;
        }
        let mut io = BufReader::new(stream);
        let mut line = Vec::with_capacity(128);
        loop {
            line.clear();
            let n = (&mut io).take(MAX_GREETING as u64).read_until(b'\n', &mut line).await.map_err(CheckError::Io)?;
            if n == 0 {
                return Err(CheckError::Greeting("connection closed".into()));
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            if !text.starts_with("220") {
                return Err(CheckError::Greeting(text));
            }
            // "220-" continues a multi-line greeting; "220 " (or a bare "220") ends it.
            if text.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        let _ = io.get_mut().write_all(b"QUIT\r\n").await;
        let _ = io.get_mut().shutdown().await;
        Ok(())
    }
}

/// Runs `check` now and then every `interval` until `shutdown`, recording each outcome in `ready`.
pub fn spawn(
    check: UpstreamCheck,
    interval: Duration,
    ready: Readiness,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let outcome = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                r = check.run() => r,
            };
            if let Err(e) = &outcome {
                debug!(upstream.addr = %check.address, error = %e, "upstream check failed");
            }
            ready.set_upstream_ok(outcome.is_ok());
        }
    })
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn serve_once(greeting: &'static [u8]) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(greeting).await.unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            got
        });
        (addr, h)
    }

    fn check(address: SocketAddr) -> UpstreamCheck {
        UpstreamCheck { address, timeout: Duration::from_secs(2), proxy_v2: false }
    }

    #[tokio::test]
    async fn greeting_then_quit() {
        let (addr, h) = serve_once(b"220-mx.test ESMTP\r\n220 welcome\r\n").await;
        check(addr).run().await.unwrap();
        assert_eq!(h.await.unwrap(), b"QUIT\r\n");
    }

    #[tokio::test]
    async fn refusing_greeting_is_a_failure() {
        let (addr, _h) = serve_once(b"554 go away\r\n").await;
        let e = check(addr).run().await.unwrap_err();
        assert!(matches!(&e, CheckError::Greeting(t) if t == "554 go away"), "{e:?}");
    }

    #[tokio::test]
    async fn nobody_listening_is_a_failure() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert!(matches!(check(addr).run().await, Err(CheckError::Io(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_upstream_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(s);
        });
        assert!(matches!(check(addr).run().await, Err(CheckError::Timeout(_))));
    }

    #[tokio::test]
    async fn proxy_v2_sends_a_local_header_first() {
        let (addr, h) = serve_once(b"220 ok\r\n").await;
        UpstreamCheck { proxy_v2: true, ..check(addr) }.run().await.unwrap();
        let got = h.await.unwrap();
        assert_eq!(&got[..16], PROXY_V2_LOCAL);
        assert_eq!(&got[16..], b"QUIT\r\n");
    }

    #[tokio::test]
    async fn spawn_records_the_outcome() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let ready = Readiness::new();
        let stop = CancellationToken::new();
        let task = spawn(check(addr), Duration::from_millis(20), ready.clone(), stop.clone());
        for _ in 0..200 {
            if ready.reasons() == ["listeners not bound", "upstream unreachable"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ready.reasons(), ["listeners not bound", "upstream unreachable"]);
        stop.cancel();
        task.await.unwrap();
    }
}
