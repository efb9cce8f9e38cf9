//! Two (or more) moat instances sharing one Redis, in-process or as child processes (to kill one), and
//! clients connecting from chosen loopback addresses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use moat::auth::store::hash_password;
use moat::auth::totp;
use tokio::io::BufReader;
use tokio::net::TcpSocket;

use super::moat::Client;

pub const CAROL_TOTP: &[u8] = b"12345678901234567890";

/// A users file with carol (password `carolpw` + TOTP `CAROL_TOTP`) and alice (password `alicepw`).
pub fn users_file(dir: &Path) -> PathBuf {
    let path = dir.join("users.toml");
    let text = format!(
        "[users.carol]\npassword = \"{}\"\nsenders = [\"carol@example.test\"]\ntotp_secret = \"{}\"\n\
         [users.alice]\npassword = \"{}\"\nsenders = [\"alice@example.test\"]\n",
        hash_password("carolpw").unwrap(),
        totp::encode_secret(CAROL_TOTP),
        hash_password("alicepw").unwrap(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `AUTH PLAIN` payload.
pub fn plain(user: &str, pw: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pw}"))
}

/// Carol's current TOTP code.
pub fn carol_code() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    totp::code_now(CAROL_TOTP, now)
}

/// Connects from `from` (a 127.x.y.z address) and returns the client and the greeting's code (0: closed
/// or nothing within the client's 10 s).
pub async fn connect_from(from: &str, to: SocketAddr) -> (Client, u16) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(to).await.unwrap();
    let mut c = Client { io: BufReader::new(stream) };
    let code = c.reply().await.0;
    (c, code)
}

/// A free loopback port (bound and released; the caller binds it right away).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// moat as a child process (so a test can kill it like a crash).
pub struct MoatChild {
    pub addr: SocketAddr,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
}

impl MoatChild {
    /// Starts `moat serve` with `toml` (its listener must be `127.0.0.1:{port}`) and waits until it listens.
    pub fn start(toml: &str, port: u16) -> MoatChild {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("moat.toml");
        std::fs::write(&config, toml).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("moat.log")).unwrap())
            .spawn()
            .expect("moat starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "moat did not listen: {}",
                std::fs::read_to_string(dir.path().join("moat.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        MoatChild { addr, child: Some(child), dir }
    }

    /// SIGKILL: no shutdown, nothing released.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for MoatChild {
    fn drop(&mut self) {
        self.kill();
    }
}
