//! Shutdown of the real binary: SIGTERM drains, and the exit code says whether the grace period had to cut
//! sessions off (issue #16, defect 8: it used to exit 0 either way).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fake::{FakeUpstream, Script};
use common::moat::Client;

struct Moat {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

async fn start_moat(upstream: SocketAddr, grace: &str) -> Moat {
    let dir = std::env::temp_dir().join(format!("moat-shutdown-{}-{}", std::process::id(), upstream.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("moat.toml");
    std::fs::write(
        &config,
        format!(
            "server.hostname = \"moat.test\"\nserver.reverse_dns = false\nmetrics.address = \"\"\n\
             audit.destination = \"off\"\nrules.directory = \"\"\nupstream.address = \"{upstream}\"\n\
             relay.local_domains = [\"example.test\"]\nshutdown.grace_period = \"{grace}\"\n\
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "moat did not listen: {}", log(&dir));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Moat { child, addr, dir }
}

fn log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("moat.log")).unwrap_or_default()
}

impl Moat {
    /// SIGTERM, then waits for the exit code. Blocking: call it from `spawn_blocking`.
    #[allow(clippy::disallowed_methods)]
    fn terminate(&mut self) -> i32 {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "moat did not exit: {}", log(&self.dir));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Moat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_drain_exits_zero() {
    let fake = FakeUpstream::start(Script::default()).await;
    let mut moat = start_moat(fake.addr, "5s").await;
    let (mut idle, _) = Client::connect(moat.addr).await;
    idle.expect("EHLO idle.example", 250).await;
    let code = tokio::task::spawn_blocking(move || {
        let code = moat.terminate();
        (code, log(&moat.dir))
    });
    let (reply, _) = idle.reply().await;
    assert_eq!(reply, 421, "the idle session is told moat is shutting down");
    let (code, log) = code.await.unwrap();
    assert_eq!(code, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cut_off_by_the_grace_period_give_exit_code_3() {
    let fake = FakeUpstream::start(Script::default()).await;
    let mut moat = start_moat(fake.addr, "500ms").await;
    let (mut busy, _) = Client::connect(moat.addr).await;
    busy.expect("EHLO busy.example", 250).await;
    busy.expect("MAIL FROM:<a@example.org>", 250).await;
    busy.expect("RCPT TO:<b@example.test>", 250).await;
    busy.expect("DATA", 354).await;
    busy.send_raw(b"Subject: never finished\r\n\r\n").await;
    let (code, log) = tokio::task::spawn_blocking(move || {
        let code = moat.terminate();
        (code, log(&moat.dir))
    })
    .await
    .unwrap();
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("sessions cut off"), "{log}");
    assert!(fake.messages().is_empty(), "nothing half-sent reached the upstream");
}
