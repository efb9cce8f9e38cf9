//! A real `redis-server` for tests: started on a free loopback port with no persistence, killed (and
//! restartable on the same port) by the test. Call [`require_redis`] first: without the program the test
//! skips, except under `CI=true` where it fails.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `redis-server` can run here (see [`super::postfix::require_peer`]).
pub fn require_redis() -> bool {
    let found = Command::new("redis-server").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if found.map(|s| s.success()).unwrap_or(false) {
        return true;
    }
    super::postfix::require_peer("redis-server")
}

/// A running `redis-server`; killed when dropped.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// `--tls-port` with this certificate and key (no plain port).
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Redis {
    /// Starts one on a free port and waits until it answers.
    pub fn start() -> Redis {
        let mut r = Redis { port: free_port(), child: None, tls: None };
        r.restart();
        r
    }

    /// Starts one that speaks only TLS, with `cert` and `key` (PEM); clients need not present certificates.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Redis {
        let mut r = Redis { port: free_port(), child: None, tls: Some((cert.to_owned(), key.to_owned())) };
        r.restart();
        r
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it (SIGKILL: as a crash, nothing flushed).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: there is no persistence) and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let up = match self.tls {
                None => self.ping(),
                Some(_) => std::net::TcpStream::connect(self.addr()).is_ok(),
            };
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer within 10 s", self.port);
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) it: a Redis that accepts but never answers.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// A synchronous client for inspecting the server (INFO, DBSIZE, ...).
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.freeze(false);
        self.kill();
    }
}

/// A TCP relay in front of Redis that counts the commands (round trips) clients send, by name. Commands a
/// script runs inside Redis never cross it, so this counts exactly what a client pays for.
#[derive(Clone)]
pub struct CountingRelay {
    pub addr: SocketAddr,
    pub commands: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl CountingRelay {
    /// Relays 127.0.0.1:<free port> to `redis`.
    pub async fn start(redis: SocketAddr) -> CountingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = CountingRelay { addr: listener.local_addr().unwrap(), commands: Default::default() };
        let commands = relay.commands.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(redis).await else { continue };
                let commands = commands.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    });
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 16384];
                    loop {
                        let n = match cr.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some((name, used)) = parse_command(&buf) {
                            commands.lock().unwrap().push(name);
                            buf.drain(..used);
                        }
                        if sw.write_all(&chunk[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        relay
    }

    /// Commands seen so far, other than `PING` (the readiness probe), and forgets them.
    pub fn take(&self) -> Vec<String> {
        let mut c = self.commands.lock().unwrap();
        std::mem::take(&mut *c).into_iter().filter(|n| n != "PING").collect()
    }
}

/// One RESP command (an array of bulk strings) at the start of `buf`: its upper-cased name and length.
fn parse_command(buf: &[u8]) -> Option<(String, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    }
    let (head, mut at) = line(buf, 0)?;
    let n: usize = std::str::from_utf8(head.strip_prefix(b"*")?).ok()?.parse().ok()?;
    let mut name = String::new();
    for i in 0..n {
        let (len, next) = line(buf, at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?).ok()?.parse().ok()?;
        if buf.len() < next + len + 2 {
            return None;
        }
        if i == 0 {
            name = String::from_utf8_lossy(&buf[next..next + len]).to_uppercase();
        }
        at = next + len + 2;
    }
    Some((name, at))
}
