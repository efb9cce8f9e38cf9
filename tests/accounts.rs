//! Compromised-account detection end to end: an authenticated user breaking out of its baseline (tight
//! floors, no warm-up) is suspended with `451 4.7.1` at the end of data and at MAIL, the audit record and
//! the counter say so, and `moat user resume NAME` (the real binary, through the metrics listener's admin
//! endpoint) lifts it. Postfix is the upstream; skipped when it is missing, except under CI=true.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::moat::{config_from, start, Client};
use common::postfix::{require_peer, Postfix};
use common::process::{args, run};
use moat::auth::store::hash_password;

const ALICE: &str = "alice@example.test";
const TOKEN: &str = "admin-token-for-tests";

async fn message(c: &mut Client, n: u32) -> (u16, String) {
    let (code, text) = c.cmd(&format!("MAIL FROM:<{ALICE}>")).await;
    if code != 250 {
        return (code, text);
    }
    c.expect(&format!("RCPT TO:<friend{n}@example.test>"), 250).await;
    c.expect("DATA", 354).await;
    c.send_raw(format!("From: <{ALICE}>\r\nSubject: n{n}\r\n\r\nhello\r\n.\r\n").as_bytes()).await;
    c.reply().await
}

async fn http(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_out_of_its_baseline_is_suspended_until_resumed() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let hash = hash_password("pw").unwrap();
    std::fs::write(&users, format!("[users.\"{ALICE}\"]\npassword = \"{hash}\"\nsenders = [\"{ALICE}\"]\n")).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let extra = format!(
        "auth.users_file = {:?}\naccounts.floor_messages = 3\naccounts.factor = 1.0\naccounts.warmup = \"0s\"",
        users.display().to_string(),
    );
    let listeners =
        "[[listener]]\nname = \"sub\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\nrole = \"submission\"\nauth_without_tls = true\n";
    let mut config = config_from(pf.addr(), &extra, listeners);
    config.audit.destination = audit.display().to_string();
    config.metrics.address = "127.0.0.1:0".into();
    config.metrics.bearer_token = TOKEN.into();
    let running = start(&config).await;
    let addr = running.addr("sub").unwrap();
    let metrics = running.metrics.unwrap();

    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO laptop.example", 250).await;
    c.expect(&format!("AUTH PLAIN {}", STANDARD.encode(format!("\0{ALICE}\0pw"))), 235).await;
    for n in 0..3 {
        let (code, text) = message(&mut c, n).await;
        assert_eq!(code, 250, "message {n}: {text}");
    }
    // The fourth message in the hour breaks the (tight) baseline: deferred, and so is the next MAIL.
    let (code, text) = message(&mut c, 3).await;
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("451 4.7.1 account suspended"), "{text}");
    let (code, text) = message(&mut c, 4).await;
    assert_eq!(code, 451, "{text}");
    assert_eq!(pf.wait_for_messages(3, Duration::from_secs(20)).len(), 3);

    // The admin endpoint needs the token; the CLI reads it from the config file it is given.
    let denied = http(metrics, &format!("POST /admin/users/{ALICE}/resume HTTP/1.1\r\n\r\n")).await;
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let cli_config = dir.path().join("moat.toml");
    std::fs::write(
        &cli_config,
        format!(
            "rules.directory = \"\"\nmetrics.address = \"{metrics}\"\nmetrics.bearer_token = \"{TOKEN}\"\n\
             [[listener]]\nname = \"sub\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\n"
        ),
    )
    .unwrap();
    let cfg = cli_config.display().to_string();
    let ran = run(env!("CARGO_BIN_EXE_moat"), &args(&["user", "resume", ALICE, "--config", &cfg]), b"").await;
    ran.assert_success("moat user resume");
    assert!(ran.output().contains(&format!("resumed {ALICE}")), "{}", ran.output());
    let (code, text) = message(&mut c, 5).await;
    assert_eq!(code, 250, "after resume: {text}");
    c.expect("QUIT", 221).await;
    running.stop().await;

    let records = std::fs::read_to_string(&audit).unwrap();
    assert!(records.contains("accounts:suspended"), "{records}");
    let rendered = moat::metrics::install().unwrap().render();
    assert!(rendered.contains("moat_account_suspensions_total 1"), "{rendered}");
}

/// AUTH failures and concurrent transactions per user, over TCP (limits that need AUTH).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failure_and_per_user_transaction_limits() {
    if !require_peer("postfix") {
        return;
    }
    let pf = Postfix::start();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let hash = hash_password("pw").unwrap();
    std::fs::write(&users, format!("[users.\"{ALICE}\"]\npassword = \"{hash}\"\nsenders = [\"{ALICE}\"]\n")).unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("limits.toml"),
        "[[limit]]\nid = \"guessing\"\nkey = [\"ip\"]\ncount = \"auth_failures\"\nrate = \"2/1h\"\n\
         [[limit]]\nid = \"one-txn-per-user\"\nkey = [\"user\"]\ncount = \"concurrent_transactions\"\nmax = 1\n",
    )
    .unwrap();
    let extra = format!(
        "auth.users_file = {:?}\nauth.failure_delay = \"1ms\"\nrules.directory = {:?}",
        users.display().to_string(),
        rules.display().to_string()
    );
    let listeners =
        "[[listener]]\nname = \"sub\"\naddress = \"127.0.0.1:0\"\nmode = \"plain\"\nrole = \"submission\"\nauth_without_tls = true\n";
    let running = start(&config_from(pf.addr(), &extra, listeners)).await;
    let addr = running.addr("sub").unwrap();
    let login = |pw: &str| format!("AUTH PLAIN {}", STANDARD.encode(format!("\0{ALICE}\0{pw}")));

    // Two transactions of one user at once: the second MAIL waits for the first to end.
    let (mut a, _) = Client::connect(addr).await;
    a.expect("EHLO a.example", 250).await;
    a.expect(&login("pw"), 235).await;
    let (mut b, _) = Client::connect(addr).await;
    b.expect("EHLO b.example", 250).await;
    b.expect(&login("pw"), 235).await;
    a.expect(&format!("MAIL FROM:<{ALICE}>"), 250).await;
    let text = b.expect(&format!("MAIL FROM:<{ALICE}>"), 451).await;
    assert!(text.contains("limit one-txn-per-user exceeded"), "{text}");
    a.expect("RSET", 250).await;
    let mut freed = false;
    for _ in 0..50 {
        if b.cmd(&format!("MAIL FROM:<{ALICE}>")).await.0 == 250 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "the transaction lease was given back");
    b.expect("RSET", 250).await;

    // AUTH failures from one address: past two, even the right password is refused, and so are new
    // connections from that address.
    let (mut c, _) = Client::connect(addr).await;
    c.expect("EHLO c.example", 250).await;
    for _ in 0..3 {
        c.expect(&login("wrong"), 535).await;
    }
    let (code, text) = c.cmd(&login("pw")).await;
    assert_eq!(code, 454, "{text}");
    assert!(text.contains("limit guessing exceeded"), "{text}");
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut d = Client::new(s);
    let (code, text) = d.reply().await;
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("limit guessing exceeded"), "{text}");
    running.stop().await;
}
