//! `moat quarantine`: list, show, release, delete and purge quarantined messages. Safe while moat runs:
//! items are only ever created whole by moat (linked into place), and every removal or release takes the
//! item's lock (docs/quarantine.md).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use super::{release, retention, Meta, Store};
use crate::config::{Config, Span};

/// The command's help.
pub const USAGE: &str = "usage: moat quarantine [--config FILE] COMMAND\n\
  list [--since 2h] [--rule ID] [--rcpt ADDR|DOMAIN] [--json]   items, oldest first\n\
  show ID                                   the sidecar, the releases and the message's header section\n\
  release ID [--to ADDR] [--as-moat] [--again]   re-submit the message to the upstream (audited)\n\
  delete ID                                 remove the item\n\
  purge --older-than 30d                    remove every item older than that";

/// Most of a message's header section `show` prints.
const SHOW_HEAD_MAX: usize = 64 * 1024;

/// Runs the command with `args` (after `quarantine`); prints its output and returns the exit code.
pub fn main(args: &[String]) -> ExitCode {
    match run(args) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("moat quarantine: {msg}");
            if msg.starts_with("usage") || msg.contains("argument") {
                eprintln!("{USAGE}");
            }
            ExitCode::from(2)
        }
    }
}

/// Parsed options.
#[derive(Default)]
struct Opts {
    config: Option<PathBuf>,
    words: Vec<String>,
    since: Option<Span>,
    rule: Option<String>,
    rcpt: Option<String>,
    json: bool,
    to: Option<String>,
    as_moat: bool,
    again: bool,
    older_than: Option<Span>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs an argument"));
        match a.as_str() {
            "--config" | "-c" => o.config = Some(value(a)?.into()),
            "--since" => o.since = Some(Span::parse(&value(a)?)?),
            "--older-than" => o.older_than = Some(Span::parse(&value(a)?)?),
            "--rule" => o.rule = Some(value(a)?),
            "--rcpt" => o.rcpt = Some(value(a)?.to_ascii_lowercase()),
            "--to" => o.to = Some(value(a)?),
            "--json" => o.json = true,
            "--as-moat" => o.as_moat = true,
            "--again" => o.again = true,
            s if s.starts_with('-') => return Err(format!("unknown argument {s:?}")),
            s => o.words.push(s.to_string()),
        }
    }
    Ok(o)
}

/// The command's output, or the message for a failure.
pub fn run(args: &[String]) -> Result<String, String> {
    let o = parse(args)?;
    let path = o.config.clone().unwrap_or_else(|| PathBuf::from("config/moat.toml"));
    let config = Config::load(&path).map_err(|e| error_chain(&e))?;
    let store = Arc::new(Store::new(super::directory(&config), &config.hostname()));
    let words: Vec<&str> = o.words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["list"] => list(&store, &o),
        ["show", id] => show(&store, id),
        ["delete", id] => match store.delete(id).map_err(|e| error_chain(&e))? {
            true => Ok(format!("deleted {id}\n")),
            false => Err(format!("no quarantined item {id:?}")),
        },
        ["purge"] => purge(&store, o.older_than.ok_or("purge needs --older-than (e.g. 30d)")?),
        ["release", id] => release_cmd(&config, &store, id, &o),
        _ => Err(format!("usage: unknown or incomplete command {:?}", o.words.join(" "))),
    }
}

fn list(store: &Store, o: &Opts) -> Result<String, String> {
    let now = super::now_secs();
    let wanted = |m: &Meta| {
        o.since.is_none_or(|s| m.time + s.get().as_secs() >= now)
            && o.rule.as_ref().is_none_or(|r| m.rules.iter().any(|x| x == r))
            && o.rcpt.as_ref().is_none_or(|r| m.rcpts.iter().any(|a| rcpt_matches(a, r)))
    };
    let items: Vec<Meta> = store.list().map_err(|e| error_chain(&e))?.into_iter().filter(wanted).collect();
    let mut out = String::new();
    for m in &items {
        if o.json {
            out.push_str(&serde_json::to_string(m).map_err(|e| e.to_string())?);
        } else {
            out.push_str(&format!(
                "{}  {}  from=<{}> to={} rules={} size={} subject={:?}",
                m.id,
                m.date,
                m.mail_from,
                m.rcpts.join(","),
                m.rules.join(","),
                m.size,
                m.subject.as_deref().unwrap_or("")
            ));
        }
        out.push('\n');
    }
    Ok(out)
}

/// `r` is an address (matched whole) or a domain (matched against the recipient's domain), any case.
fn rcpt_matches(addr: &str, r: &str) -> bool {
    let addr = addr.to_ascii_lowercase();
    if r.contains('@') {
        return addr == r;
    }
    addr.rsplit_once('@').is_some_and(|(_, d)| d == r.trim_start_matches('@'))
}

fn show(store: &Store, id: &str) -> Result<String, String> {
    let meta = store.get(id).map_err(|e| error_chain(&e))?;
    let mut out = serde_json::to_string_pretty(&meta).map_err(|e| e.to_string())?;
    out.push('\n');
    for r in release::read_history(store, id) {
        out.push_str(&format!("released {} by {} to {} ({} {})\n", r.date, r.by, r.to.join(","), r.code, r.reply));
    }
    let mut head = Vec::new();
    let f = std::fs::File::open(store.message_path(id)).map_err(|e| format!("cannot read the message: {e}"))?;
    f.take(SHOW_HEAD_MAX as u64).read_to_end(&mut head).map_err(|e| format!("cannot read the message: {e}"))?;
    let end = memchr::memmem::find(&head, b"\r\n\r\n").map_or(head.len(), |i| i + 2);
    out.push_str("--- headers\n");
    out.push_str(&String::from_utf8_lossy(&head[..end]).replace("\r\n", "\n"));
    Ok(out)
}

fn purge(store: &Store, older_than: Span) -> Result<String, String> {
    let limits = retention::Limits { max_age: older_than.get().as_secs().max(1), max_bytes: 0 };
    let swept = store.sweep(super::now_secs(), limits).map_err(|e| error_chain(&e))?;
    Ok(format!("purged {} items, {} left ({} bytes)\n", swept.expired_age, swept.items, swept.bytes))
}

fn release_cmd(config: &Config, store: &Arc<Store>, id: &str, o: &Opts) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let r = rt
        .block_on(release::release(config, store, id, o.to.as_deref(), o.as_moat, o.again))
        .map_err(|e| error_chain(&e))?;
    Ok(format!(
        "released {id} to {}: {} {}{}\n",
        r.to.join(","),
        r.code,
        r.reply,
        r.queue_id.map(|q| format!(" (queue id {q})")).unwrap_or_default()
    ))
}

/// An error with its causes, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
