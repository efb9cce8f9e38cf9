//! moat as its own process (the built `moat serve` binary) with a config file of its own; killed on drop.
//! Blocking: call from plain `#[test]`s or `spawn_blocking`.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `moat serve` child.
pub struct MoatProcess {
    pub child: Child,
    /// The address of its one plain listener, `smtp`.
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl MoatProcess {
    /// Starts moat relaying to `upstream`, with `extra` (TOML with dotted keys) before its listener, and
    /// waits until it listens.
    pub fn start(upstream: SocketAddr, extra: &str) -> MoatProcess {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("moat-proc-{}-{}-{seq}", std::process::id(), upstream.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.join("moat.toml");
        std::fs::write(
            &config,
            format!(
                "server.hostname = \"moat.test\"\nmetrics.address = \"\"\naudit.destination = \"off\"\n\
                 upstream.address = \"{upstream}\"\nrelay.local_domains = [\"example.test\", \"reject.test\"]\n{extra}\n\
                 [[listener]]\nname = \"smtp\"\naddress = \"127.0.0.1:{port}\"\nmode = \"plain\"\n"
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("moat.log")).unwrap())
            .spawn()
            .expect("moat starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let p = MoatProcess { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "moat did not listen: {}", p.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// What moat logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("moat.log")).unwrap_or_default()
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// SIGTERM, then waits (at most 30 s) for the exit code.
    pub fn terminate(&mut self) -> i32 {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "moat did not exit: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MoatProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
