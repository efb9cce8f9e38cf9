//! A real DNS server for tests: dnsmasq on a free loopback port, serving the A and TXT records a test
//! gives it (blocklist zones, SPF, DKIM keys, DMARC policies), plus two misbehaving servers: one that
//! answers SERVFAIL and one that never answers.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::postfix::require_peer;

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// What dnsmasq serves.
#[derive(Default, Clone, Debug)]
pub struct Records {
    /// Zones dnsmasq is authoritative for: names without a record there get NXDOMAIN.
    pub zones: Vec<String>,
    /// (name, IPv4) A records.
    pub a: Vec<(String, String)>,
    /// (name, text) TXT records; long texts are split into 255-byte strings.
    pub txt: Vec<(String, String)>,
    /// Zones forwarded to a server that answers SERVFAIL.
    pub servfail_zones: Vec<String>,
}

/// A running dnsmasq; stopped when dropped.
pub struct Dnsmasq {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
    _servfail: Option<ServFail>,
}

impl Dnsmasq {
    /// Starts dnsmasq with `records`; `None` (test skipped) when dnsmasq is not installed and CI is not
    /// "true" (under CI it panics).
    pub fn start(records: &Records) -> Option<Dnsmasq> {
        if !std::path::Path::new(DNSMASQ).exists() && !require_peer("dnsmasq") {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("moat-dnsmasq-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut conf = String::new();
        for z in &records.zones {
            conf.push_str(&format!("local=/{z}/\n"));
        }
        for (name, ip) in &records.a {
            conf.push_str(&format!("host-record={name},{ip}\n"));
        }
        for (name, text) in &records.txt {
            let parts: Vec<String> = text
                .as_bytes()
                .chunks(255)
                .map(|c| format!("\"{}\"", String::from_utf8_lossy(c).replace('"', "\\\"")))
                .collect();
            conf.push_str(&format!("txt-record={name},{}\n", parts.join(",")));
        }
        let servfail = (!records.servfail_zones.is_empty()).then(ServFail::start);
        if let Some(s) = &servfail {
            for z in &records.servfail_zones {
                conf.push_str(&format!("server=/{z}/127.0.0.1#{}\n", s.addr.port()));
            }
        }
        let conf_path = dir.join("dnsmasq.conf");
        std::fs::write(&conf_path, conf).unwrap();
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(DNSMASQ);
            cmd.args(["-k", "--no-resolv", "--no-hosts", "--listen-address=127.0.0.1", "--bind-interfaces"])
                .arg(format!("--port={port}"))
                .arg(format!("--conf-file={}", conf_path.display()))
                .args(["--pid-file=", "--cache-size=0", "--log-facility=-"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if is_root() {
                cmd.arg("--user=root");
            }
            let mut child = cmd.spawn().expect("spawn dnsmasq");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Some(Dnsmasq { addr, child, dir, _servfail: servfail });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("dnsmasq did not start");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A loopback port free for both UDP and TCP right now.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A UDP socket that never answers: a resolver pointed at it times out.
pub struct Silent {
    pub addr: SocketAddr,
    _sock: UdpSocket,
}

impl Silent {
    pub fn start() -> Silent {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        Silent { addr: sock.local_addr().unwrap(), _sock: sock }
    }
}

/// A UDP server that answers every query with SERVFAIL (dnsmasq forwards zones to it).
struct ServFail {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ServFail {
    fn start() -> ServFail {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                if n < 12 {
                    continue;
                }
                // Header and question only (an EDNS record after it is dropped).
                let mut end = 12;
                while end < n && buf[end] != 0 {
                    end += 1 + buf[end] as usize;
                }
                let end = (end + 5).min(n);
                let mut reply = buf[..end].to_vec();
                reply[2] = 0x80 | (buf[2] & 0x01); // QR, keep RD
                reply[3] = 0x80 | 2; // RA, SERVFAIL
                reply[6..12].fill(0); // no answers, authorities, additionals
                let _ = sock.send_to(&reply, from);
            }
        });
        ServFail { addr, stop }
    }
}

impl Drop for ServFail {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
