//! Running an external program (swaks, smtplib, openssl, the moat binary) from a test: stdin fed on a
//! thread, stdout and stderr collected, a deadline. `std::process` on a blocking thread, because the
//! crate's tokio has no `process` feature.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long one external program may run.
pub const PROGRAM_TIMEOUT: Duration = Duration::from_secs(30);

/// What an external program did.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Panics with the program's output unless it exited with status 0.
    pub fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what} failed: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }

    /// stdout then stderr, for assertions that do not care which.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `program args` with `stdin` fed to it, on a blocking thread; panics (with the output so far) if it
/// has not exited within [`PROGRAM_TIMEOUT`].
pub async fn run(program: &str, args: &[String], stdin: &[u8]) -> Ran {
    let (program, args, input) = (program.to_string(), args.to_vec(), stdin.to_vec());
    tokio::task::spawn_blocking(move || run_blocking(&program, &args, input)).await.expect("runner thread")
}

/// [`run`] on the calling thread.
pub fn run_blocking(program: &str, args: &[String], input: Vec<u8>) -> Ran {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut sin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let _ = sin.write_all(&input);
        // Dropping `sin` closes the pipe: the program sees EOF.
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + PROGRAM_TIMEOUT;
    let (status, timed_out) = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break (s, false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break (child.wait().expect("wait after kill"), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    assert!(
        !timed_out,
        "{program} {args:?} still running after {PROGRAM_TIMEOUT:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    Ran { status, stdout, stderr }
}

/// Owned argument strings.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}
