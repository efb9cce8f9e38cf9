//! Golden SMTP dialogues: every file in `tests/transcripts/` is one conversation with moat over real TCP,
//! relaying to the in-process fake upstream. On failure the whole actual dialogue is printed.
//!
//! Format (one directive a line; `#` first line is the title):
//! - `config: KEY = VALUE` adds a dotted TOML key to the test config (`limits.max_recipients = 1`).
//! - `script: FIELD = VALUE` scripts the fake upstream (`rcpt = reject.test 550 5.1.1 No such user`,
//!   `mail = 451 4.3.0 busy`, `data = 554 no`, `end = 452 4.3.1 full`, `drop = RCPT` (closes the connection at that command, once; `drop_repeat = N`: N more times), `no_xclient`, `no_dsn`, `no_smtputf8`, `no_pipelining`, `chunking` (offer
//!   CHUNKING; `data` then answers BDAT), `hangup_after = RCPT [reply]` (close after replying to that
//!   command, once, sending the reply line first if one is given)).
//! - `C: text` sends text + CRLF; `R: text` sends text with no CRLF added. Both decode `\r`, `\n`, `\\`.
//! - `S: prefix` expects the next reply to start with prefix (multi-line replies are matched whole).
//! - `S: closed` expects the server to have closed the connection.
//! - `upstream: none` / `upstream: N` checks how many messages the upstream received.
//! - `upstream-data: text` checks the last delivered message contains text (escapes decoded).
//! - `upstream-data-lacks: text` checks the last delivered message does not contain text.
//! - `upstream-cmd: text` checks some upstream command line contained text.
//! - `upstream-cmd-none: text` checks no upstream command line so far contained text.
//! - `upstream-pipelined: yes` / `no`: whether any upstream command arrived with another already behind it.
//! - `wait: MS` sleeps.
//! - `rules: TOML line` adds a line to a rule file written into a fresh temporary rules directory, which
//!   the test config then uses (`rules.directory`); without `rules:` lines a transcript runs with no rules.
//!   `rules-file: lists/x.txt = text` writes another file there (escapes decoded), e.g. a list file.
//! - `greeting: CODE` checks the greeting's code (a connect-phase rule answers `554` instead of `220`).
//! - `quarantined: N` checks how many items the quarantine store (`quarantine.directory`, set to `<rules dir>/quarantine`)
//!   holds.

mod common;

use std::path::Path;
use std::time::Duration;

use common::fake::{FakeUpstream, Script};
use common::moat::{start, test_config, Client};

fn unescape(s: &str) -> String {
    s.replace("\\r", "\r").replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")
}

fn script_from(lines: &[&str]) -> Script {
    let mut s = Script::default();
    for l in lines {
        let (k, v) = l.split_once('=').map(|(k, v)| (k.trim(), v.trim())).unwrap_or((l.trim(), ""));
        match k {
            "mail" => s.mail = Some(v.into()),
            "rcpt" => {
                let (needle, reply) = v.split_once(' ').unwrap();
                s.rcpt = Some((needle.into(), reply.into()));
            }
            "data" => s.data = Some(v.into()),
            "end" => s.end = Some(v.into()),
            "drop" => s.drop_at = Some(v.into()),
            "drop_repeat" => s.drop_repeat = v.parse().unwrap(),
            "no_xclient" => s.no_xclient = true,
            "no_dsn" => s.no_dsn = true,
            "no_smtputf8" => s.no_smtputf8 = true,
            "no_pipelining" => s.no_pipelining = true,
            "chunking" => s.chunking = true,
            "hangup_after" => s.hangup_after = Some(v.into()),
            other => panic!("unknown script key {other}"),
        }
    }
    s
}

/// Writes the `rules:` lines (and `rules-file:` files) into a temporary rules directory.
fn write_rules(lines: &[&str]) -> Option<tempfile::TempDir> {
    let rules: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("rules:")).map(str::trim).collect();
    if rules.is_empty() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("50-test.toml"), rules.join("\n") + "\n").unwrap();
    for f in lines.iter().filter_map(|l| l.strip_prefix("rules-file:")) {
        let (name, text) = f.split_once('=').unwrap();
        let path = dir.path().join(name.trim());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, unescape(text.trim())).unwrap();
    }
    Some(dir)
}

async fn run_transcript(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut config: Vec<String> =
        lines.iter().filter_map(|l| l.strip_prefix("config:")).map(|s| s.trim().to_string()).collect();
    let rules_dir = write_rules(&lines);
    if let Some(d) = &rules_dir {
        config.push(format!("rules.directory = {:?}", d.path().display().to_string()));
        // Under the rules directory on purpose: the store must not make the rules reload (issue #16).
        config.push(format!("quarantine.directory = {:?}", d.path().join("quarantine").display().to_string()));
    }
    let script: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("script:")).collect();
    let fake = FakeUpstream::start(script_from(&script)).await;
    let cfg = test_config(fake.addr, &config.join("\n"));
    let running = start(&cfg).await;
    let addr = running.addr("smtp").unwrap();
    let mut log = String::new();
    let (mut client, code) = Client::connect(addr).await;
    log.push_str(&format!("S: {code} (greeting)\n"));
    let mut result = Ok(());
    for (n, line) in lines.iter().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        if let Some(c) = line.strip_prefix("C: ") {
            log.push_str(&format!("C: {c}\n"));
            client.send_raw(format!("{}\r\n", unescape(c)).as_bytes()).await;
        } else if let Some(c) = line.strip_prefix("R: ") {
            log.push_str(&format!("R: {c}\n"));
            client.send_raw(unescape(c).as_bytes()).await;
        } else if let Some(want) = line.strip_prefix("S: ") {
            let (code, got) = client.reply().await;
            log.push_str(&format!("S: {}", if code == 0 { format!("closed {got}\n") } else { got.clone() }));
            let ok = if want.trim() == "closed" {
                code == 0 && got.is_empty()
            } else {
                code != 0 && got.starts_with(want.trim())
            };
            if !ok {
                result = Err(format!("{at}: expected {want:?}, got {got:?}"));
                break;
            }
        } else if let Some(want) = line.strip_prefix("upstream:") {
            let want = want.trim();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let n_msgs = fake.messages().len();
            let expect = if want == "none" { 0 } else { want.parse().unwrap() };
            if n_msgs != expect {
                result = Err(format!("{at}: upstream has {n_msgs} messages, expected {expect}"));
                break;
            }
        } else if let Some(want) = line.strip_prefix("upstream-data:") {
            let want = unescape(want.trim_start());
            let msgs = fake.wait_for(1).await;
            let last = msgs.last().map(|m| String::from_utf8_lossy(&m.data).into_owned()).unwrap_or_default();
            if !last.contains(&want) {
                result = Err(format!("{at}: upstream message lacks {want:?}:\n{last}"));
                break;
            }
        } else if let Some(unwanted) = line.strip_prefix("upstream-data-lacks:") {
            let unwanted = unescape(unwanted.trim_start());
            let msgs = fake.wait_for(1).await;
            let last = msgs.last().map(|m| String::from_utf8_lossy(&m.data).into_owned()).unwrap_or_default();
            if last.contains(&unwanted) {
                result = Err(format!("{at}: upstream message contains {unwanted:?}:\n{last}"));
                break;
            }
        } else if let Some(want) = line.strip_prefix("upstream-cmd:") {
            let want = want.trim();
            let cmds = fake.commands.lock().unwrap().clone();
            if !cmds.iter().any(|c| c.contains(want)) {
                result = Err(format!("{at}: no upstream command contains {want:?}: {cmds:#?}"));
                break;
            }
        } else if let Some(unwanted) = line.strip_prefix("upstream-cmd-none:") {
            let unwanted = unwanted.trim();
            let cmds = fake.commands.lock().unwrap().clone();
            if cmds.iter().any(|c| c.contains(unwanted)) {
                result = Err(format!("{at}: an upstream command contains {unwanted:?}: {cmds:#?}"));
                break;
            }
        } else if let Some(want) = line.strip_prefix("upstream-pipelined:") {
            // Whether moat sent the upstream commands in one write ("yes") or never did ("no").
            let n_grouped = *fake.pipelined.lock().unwrap();
            if (want.trim() == "yes") != (n_grouped > 0) {
                result = Err(format!("{at}: {n_grouped} upstream commands arrived pipelined, expected {want}"));
                break;
            }
        } else if let Some(want) = line.strip_prefix("greeting:") {
            if code.to_string() != want.trim() {
                result = Err(format!("{at}: greeting code {code}, expected {}", want.trim()));
                break;
            }
        } else if let Some(want) = line.strip_prefix("quarantined:") {
            let dir = rules_dir.as_ref().map(|d| d.path().join("quarantine")).unwrap();
            let n_files = std::fs::read_dir(&dir)
                .map(|d| {
                    d.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))).count()
                })
                .unwrap_or(0);
            if n_files != want.trim().parse::<usize>().unwrap() {
                result = Err(format!("{at}: quarantine holds {n_files} messages, expected {}", want.trim()));
                break;
            }
        } else if let Some(ms) = line.strip_prefix("wait:") {
            tokio::time::sleep(Duration::from_millis(ms.trim().parse().unwrap())).await;
        }
    }
    drop(client);
    let _ = running.stop().await;
    result.map_err(|e| format!("{e}\n--- dialogue ---\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transcripts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "transcripts missing");
    let mut failures = Vec::new();
    for f in &files {
        if let Err(e) = run_transcript(f).await {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} transcripts failed:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}
