//! A real HAProxy in front of moat instances for tests: TCP mode, round robin, `send-proxy-v2`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `haproxy -db`; killed when dropped.
pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts HAProxy on 127.0.0.1:`front`, spreading connections over `backends` with a PROXY v2 header.
pub fn start(front: u16, backends: &[SocketAddr]) -> Haproxy {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = format!(
        "global\n  maxconn 200\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend smtp\n  bind 127.0.0.1:{front}\n  default_backend moat\n\
         backend moat\n  balance roundrobin\n"
    );
    for (i, b) in backends.iter().enumerate() {
        cfg.push_str(&format!("  server m{i} {b} send-proxy-v2\n"));
    }
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("haproxy.log")).unwrap())
        .spawn()
        .expect("haproxy starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", front)).is_err() {
        assert!(Instant::now() < deadline, "haproxy did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Haproxy { child, _dir: dir }
}
