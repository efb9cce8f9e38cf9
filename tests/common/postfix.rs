//! A real Postfix for integration tests: a throwaway instance started with `scripts/postfix-instance.sh`
//! in a fresh temporary directory, listening on a free loopback port, accepting XCLIENT from 127.0.0.0/8,
//! delivering every message (any recipient domain) into one Maildir, and rejecting `@reject.test`
//! recipients and the local part `reject@` (any domain) with `550 5.1.1`. Tests that need it call
//! [`require_peer`]`("postfix")` first.
//!
//! Delivered files are what Postfix's virtual(8) writes: `Return-Path:`, `X-Original-To:` and
//! `Delivered-To:` first, then Postfix's own `Received:` header, then the message as received, with LF
//! line endings (Postfix stores text lines, not CRLF). Use [`split_message`] and [`crlf_to_lf`] to compare
//! what a client sent with what was delivered.
//!
//! Only std: no extra crates.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A running throwaway Postfix instance. Dropping it stops every process of the instance and removes
/// its directory.
pub struct Postfix {
    dir: PathBuf,
    addr: SocketAddr,
}

/// Counter that keeps instance directories of one test process apart.
static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Postfix {
    /// Starts an instance on a free port of 127.0.0.1 in a fresh directory under
    /// `std::env::temp_dir()`, and returns once the port accepts connections. Panics (with the script's
    /// output) if Postfix cannot start; call [`require_peer`]`("postfix")` first to skip instead.
    pub fn start() -> Postfix {
        Postfix::start_with(&[])
    }

    /// Like [`Postfix::start`], with extra `name=value` main.cf settings applied last, for example
    /// `["smtpd_upstream_proxy_protocol=haproxy"]` for a PROXY v2 upstream or
    /// `["smtpd_forbid_bare_newline=yes"]`.
    pub fn start_with(params: &[&str]) -> Postfix {
        let script = script_path();
        static REAP: Once = Once::new();
        REAP.call_once(|| reap_stale(&script));
        let mut last_error = String::new();
        // The port is found by binding 127.0.0.1:0 and closing the socket again; another test can grab
        // it before Postfix binds it, so a failed start is retried with a new port and directory.
        for _attempt in 0..4 {
            let dir = fresh_dir();
            let port = free_port();
            let out = Command::new("bash")
                .arg(&script)
                .arg("start")
                .arg(&dir)
                .arg(port.to_string())
                .args(params)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            if out.status.success() {
                return Postfix { dir, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
            }
            last_error = format!(
                "{} start {} {port} failed ({}):\n{}{}",
                script.display(),
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            stop_instance(&script, &dir);
            let _ = fs::remove_dir_all(&dir);
        }
        panic!("Postfix did not start:\n{last_error}");
    }

    /// The address Postfix's smtpd listens on (127.0.0.1 and the chosen port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The instance's directory (`etc/`, `queue/`, `data/`, `mail/`, `maillog`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The Maildir every delivered message lands in (files appear in its `new/` subdirectory).
    pub fn maildir(&self) -> PathBuf {
        self.dir.join("mail")
    }

    /// The messages delivered so far, raw bytes of each Maildir file, oldest first (by file time, then
    /// name). Files appear in `new/` only once complete (virtual(8) writes to `tmp/` and renames).
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let new = self.maildir().join("new");
        let mut files: Vec<(SystemTime, PathBuf)> = match fs::read_dir(&new) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| {
                    let t = e.metadata().and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH);
                    (t, e.path())
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files.into_iter().filter_map(|(_, p)| fs::read(p).ok()).collect()
    }

    /// Waits until at least `n` messages have been delivered or `timeout` has passed, and returns all
    /// delivered messages (raw bytes, oldest first). After a timeout this returns what is there, which
    /// may be fewer than `n`: assert on the length. With `n = 1` and a short timeout it also checks that
    /// nothing was delivered.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n || Instant::now() >= deadline {
                return msgs;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The instance's whole log so far (`maillog_file`): lines such as
    /// `postfix/smtpd[..]: connect from localhost[127.0.0.1]`, `QUEUEID: client=NAME[ADDR]`,
    /// `NOQUEUE: reject: RCPT from ...`, `status=sent (delivered to maildir)`.
    pub fn log(&self) -> String {
        fs::read(self.dir.join("maillog")).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Waits until the log contains `needle` or `timeout` has passed; true if it appeared. Postfix logs
    /// through postlogd, so a line can show up a few milliseconds after the SMTP reply that caused it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postfix {
    /// Stops the instance (no process left behind) and removes its directory. When the test is
    /// panicking, the end of the Postfix log is printed first, to show what Postfix saw.
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- Postfix log ({}), last lines:", self.dir.join("maillog").display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        stop_instance(&script_path(), &self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Returns true if the program `name` (for example "postfix", "swaks", "openssl", "python3") can be run:
/// an executable file of that name in `PATH`, `/usr/sbin` or `/sbin`. "postfix" also needs root,
/// because the Postfix master must start as root. When it is missing and the environment has
/// `CI=true`, this panics (CI must not silently skip); otherwise it prints
/// `skipping: NAME not installed` to stderr and returns false, and the test should return early.
pub fn require_peer(name: &str) -> bool {
    let found = find_program(name).is_some();
    let usable = found && (name != "postfix" || is_root());
    if usable {
        return true;
    }
    let why = if found { format!("{name} needs root to run") } else { format!("{name} not installed") };
    if std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false) {
        panic!("CI=true but {why}: install it (see .ci/run), this test must not be skipped in CI");
    }
    eprintln!("skipping: {why}");
    false
}

/// Splits a raw message at the first empty line: (header section, body). Accepts CRLF or LF line
/// endings; the separator line belongs to neither part. Without an empty line the whole input is the
/// header section and the body is empty.
pub fn split_message(raw: &[u8]) -> (&[u8], &[u8]) {
    for (i, _) in raw.iter().enumerate().filter(|(_, &b)| b == b'\n') {
        let rest = &raw[i + 1..];
        if rest.starts_with(b"\r\n") {
            return (&raw[..i + 1], &rest[2..]);
        }
        if rest.starts_with(b"\n") {
            return (&raw[..i + 1], &rest[1..]);
        }
    }
    (raw, &[])
}

/// Turns every CRLF into LF, for comparing what a client sent (CRLF) with the file Postfix delivered
/// (LF). Lone CR and LF bytes are kept.
pub fn crlf_to_lf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'\r' && data.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

/// `scripts/postfix-instance.sh` of this checkout.
fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join("postfix-instance.sh")
}

/// Runs `postfix-instance.sh stop DIR`, ignoring failures (the instance may not have started).
fn stop_instance(script: &Path, dir: &Path) {
    let _ = Command::new("bash")
        .arg(script)
        .arg("stop")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status();
}

/// A new, empty directory for one instance. Postfix's UNIX socket paths must stay short (sun_path is
/// 108 bytes), so a long `temp_dir()` falls back to /tmp.
fn fresh_dir() -> PathBuf {
    let base = instances_base();
    loop {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name =
            format!("moat-pf-{}-{}-{:x}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed), nanos & 0xffff);
        let dir = base.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("cannot create {}: {e}", dir.display()),
        }
    }
}

/// Stops and removes instances left behind by test processes that no longer exist (killed before their
/// `Drop` ran), so an interrupted `cargo test` does not leave Postfix masters running forever.
fn reap_stale(script: &Path) {
    for base in [instances_base(), PathBuf::from("/tmp")] {
        let Ok(rd) = fs::read_dir(&base) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("moat-pf-").and_then(|r| r.split('-').next()) else { continue };
            if pid.parse::<u32>().is_err() || pid_alive(pid) {
                continue;
            }
            stop_instance(script, &e.path());
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// True if process `pid` exists and is not a zombie (a killed test process can linger as one).
fn pid_alive(pid: &str) -> bool {
    match fs::read_to_string(Path::new("/proc").join(pid).join("stat")) {
        Ok(stat) => !matches!(stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()), Some('Z' | 'X')),
        Err(_) => false,
    }
}

/// The directory instance directories are made in: `temp_dir()`, or /tmp when that path is long.
fn instances_base() -> PathBuf {
    let base = std::env::temp_dir();
    if base.as_os_str().len() > 40 {
        PathBuf::from("/tmp")
    } else {
        base
    }
}

/// A port of 127.0.0.1 that was free a moment ago (bind port 0, read it, close).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// The path of an executable file called `name` in `PATH`, /usr/sbin or /sbin.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// True if this process runs with effective uid 0 (read from /proc/self/status, std only).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
