//! The `moat` command: `serve` runs the proxy, `check` validates a configuration the way `nginx -t` or
//! `postfix check` do. The library does the work; this file parses arguments, sets up logging, handles
//! signals and maps errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use moat::config::{Config, LogFormat};
use tracing::{error, info, warn};

const USAGE: &str = "usage: moat <serve|check> [--config FILE] | moat user ... (see moat user --help)\n\
  | moat quarantine ... (list, show, release, delete, purge; see docs/quarantine.md)\n\
  serve   run the proxy (default config: config/moat.toml)\n\
  check   validate the configuration and everything it points at; print every problem\n\
  --version";

/// The exit code when the shutdown grace period cut sessions off (systemd logs it as a failed stop).
const EXIT_CUT_OFF: u8 = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("user") && args.get(1).map(String::as_str) == Some("resume") {
        return match moat::pipeline::accounts::resume::run(&args[2..]) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(msg) => {
                eprintln!("moat user resume: {msg}\n{}", moat::pipeline::accounts::resume::USAGE);
                ExitCode::FAILURE
            }
        };
    }
    if args.first().map(String::as_str) == Some("dkim") {
        return ExitCode::from(moat::dkim::keygen::run(&args[1..]) as u8);
    }
    if args.first().map(String::as_str) == Some("user") {
        return match moat::auth::cli::run(&args[1..]) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(msg) => {
                eprintln!("moat user: {msg}\n{}", moat::auth::cli::USAGE);
                ExitCode::from(2)
            }
        };
    }
    if args.first().map(String::as_str) == Some("quarantine") {
        return moat::quarantine::cli::main(&args[1..]);
    }
    let (cmd, config) = match parse_args(&args) {
        Ok(x) => x,
        Err(msg) => {
            eprintln!("{msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match cmd.as_str() {
        "--version" | "version" => {
            println!("moat {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        "check" => check(&config),
        "serve" => serve(&config),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn parse_args(args: &[String]) -> Result<(String, PathBuf), String> {
    let mut cmd = None;
    let mut config = PathBuf::from("config/moat.toml");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" => config = it.next().ok_or("--config needs a file")?.into(),
            s if s.starts_with("--config=") => config = s["--config=".len()..].into(),
            s if cmd.is_none() => cmd = Some(s.to_string()),
            s => return Err(format!("unexpected argument {s:?}")),
        }
    }
    Ok((cmd.unwrap_or_else(|| "serve".into()), config))
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => match moat::tls::ServerTls::load(&config.tls, &config.hostname())
            .and_then(|_| moat::upstream::UpstreamTls::from_config(&config.upstream))
        {
            Ok(_) if !config.rules.directory.as_os_str().is_empty() => {
                match moat::rules::RuleSet::load_dir(&config.rules.directory, &config.relay.local_domains) {
                    Ok(set) => {
                        let grey = if set.greylist.is_some() { ", greylisting" } else { "" };
                        let n = (set.rules.len(), set.limits.len());
                        println!("{}: configuration ok, {} rules, {} limits{grey}", path.display(), n.0, n.1);
                        ExitCode::SUCCESS
                    }
                    Err(errors) => {
                        eprintln!("{}", moat::rules::format_errors(&errors));
                        ExitCode::FAILURE
                    }
                }
            }
            Ok(_) => {
                println!("{}: configuration ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: tls: {}", path.display(), error_chain(&e));
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.thread_per_core {
        // Connections run on the per-core threads (src/cores.rs); this runtime keeps the background work.
        builder.worker_threads(1);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let running = match moat::server::start(&config).await {
            Ok(r) => r,
            Err(e) => {
                error!(error = %error_chain(&e), "cannot start");
                return ExitCode::FAILURE;
            }
        };
        info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "moat started");
        signals(&running).await;
        let stopped = running.stop().await;
        if stopped.cut_off > 0 {
            // Distinct from a start-up failure (1): the service ran, but its drain was cut short.
            return ExitCode::from(EXIT_CUT_OFF);
        }
        ExitCode::SUCCESS
    })
}

/// Waits for SIGTERM or SIGINT; SIGHUP reloads what is reloadable meanwhile.
async fn signals(running: &moat::server::Running) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                info!("SIGHUP: reloading");
                if let Some(tls) = running.tls.clone() {
                    match tokio::task::spawn_blocking(move || tls.reload()).await {
                        Ok(Ok(changed)) => info!(changed, "tls certificates reloaded"),
                        Ok(Err(e)) => warn!(error = %error_chain(&e), "tls reload refused; old certificates stay"),
                        Err(e) => warn!(error = %e, "tls reload task failed"),
                    }
                }
                if let Some(auth) = &running.auth {
                    auth.reload_logged().await;
                }
                if let Some(rules) = &running.rules {
                    rules.reload_logged().await;
                }
            }
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal; a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
