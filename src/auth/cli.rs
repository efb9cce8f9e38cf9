//! `moat user ...`: manages the users file. Passwords are read without echo from a terminal (or one line
//! from stdin when it is not a terminal) and only their argon2id hashes are written. The file is edited
//! in place with its comments kept, and replaced atomically (written next to it, then renamed).

use std::io::{BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};

use toml_edit::{value, Array, ArrayOfTables, DocumentMut, Item, Table};

use super::store::{hash_password, UserStore};
use super::totp;

/// Usage of `moat user`.
pub const USAGE: &str = "usage: moat user <command> NAME [--users FILE]   (default FILE: config/users.toml)\n\
  add NAME                    create a user; reads the password\n\
  passwd NAME                 set a user's password\n\
  totp NAME                   give a user a new TOTP secret; prints the otpauth:// URI\n\
  app-password NAME APPNAME   add (or replace) a named app password; prints it once\n\
  revoke NAME APPNAME         delete a named app password\n\
  disable NAME | enable NAME  refuse (or allow again) a user's AUTH without deleting them";

/// Runs a `moat user` command; returns what to print.
pub fn run(args: &[String]) -> Result<String, String> {
    let mut users = PathBuf::from("config/users.toml");
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--users" | "-u" => users = it.next().ok_or("--users needs a file")?.into(),
            "--help" | "-h" => return Ok(format!("{USAGE}\n")),
            s if s.starts_with("--users=") => users = s["--users=".len()..].into(),
            s => words.push(s.to_string()),
        }
    }
    let (cmd, name) = match words.as_slice() {
        [c, n, ..] => (c.as_str(), n.as_str()),
        _ => return Err("expected a command and a user name".into()),
    };
    if name.is_empty() || name.len() > super::sasl::MAX_USER || name.chars().any(|c| c.is_control()) {
        return Err(format!("invalid user name {name:?}"));
    }
    let mut doc = read_doc(&users)?;
    let out = match (cmd, words.len()) {
        ("add", 2) => {
            if user_table(&mut doc, name, false).is_ok() {
                return Err(format!("user {name:?} already exists (use passwd)"));
            }
            let hash = hash_password(&read_password()?)?;
            let t = user_table(&mut doc, name, true)?;
            t["password"] = value(hash);
            let mut senders = Array::new();
            if name.contains('@') {
                senders.push(name.to_lowercase());
            }
            t["senders"] = value(senders);
            format!("user {name} added to {}\n", users.display())
        }
        ("passwd", 2) => {
            user_table(&mut doc, name, false)?;
            let hash = hash_password(&read_password()?)?;
            user_table(&mut doc, name, false)?["password"] = value(hash);
            format!("password of {name} changed\n")
        }
        ("totp", 2) => {
            let secret = random(20)?;
            user_table(&mut doc, name, false)?["totp_secret"] = value(totp::encode_secret(&secret));
            format!(
                "{}\nFrom now on {name} authenticates with the password followed by the 6-digit code.\n",
                totp::otpauth_uri("moat", name, &secret)
            )
        }
        ("disable" | "enable", 2) => {
            let off = cmd == "disable";
            let t = user_table(&mut doc, name, false)?;
            if off {
                t["disabled"] = value(true);
            } else {
                t.remove("disabled");
            }
            format!("user {name} {cmd}d\n")
        }
        ("revoke", 3) => {
            let app = words[2].as_str();
            let t = user_table(&mut doc, name, false)?;
            let apps = t.get_mut("app_passwords").and_then(Item::as_array_of_tables_mut);
            let before = apps.as_ref().map_or(0, |a| a.len());
            let apps = apps.ok_or_else(|| format!("user {name:?} has no app password {app:?}"))?;
            apps.retain(|a| a.get("name").and_then(Item::as_str) != Some(app));
            if apps.len() == before {
                return Err(format!("user {name:?} has no app password {app:?}"));
            }
            if apps.is_empty() {
                t.remove("app_passwords");
            }
            format!("app password {app:?} of {name} revoked\n")
        }
        ("app-password", 3) => {
            let app = words[2].as_str();
            let password = data_encoding::BASE32_NOPAD.encode(&random(15)?).to_lowercase();
            let hash = hash_password(&password)?;
            let t = user_table(&mut doc, name, false)?;
            let apps = t.entry("app_passwords").or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
            let apps = apps.as_array_of_tables_mut().ok_or("app_passwords is not an array of tables")?;
            apps.retain(|a| a.get("name").and_then(Item::as_str) != Some(app));
            let mut entry = Table::new();
            entry["name"] = value(app);
            entry["hash"] = value(hash);
            apps.push(entry);
            format!("app password {app:?} of {name} (shown once): {password}\n")
        }
        _ => return Err(format!("unknown command or wrong arguments: {}", words.join(" "))),
    };
    write_doc(&users, &doc)?;
    Ok(out)
}

fn read_doc(path: &Path) -> Result<DocumentMut, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    UserStore::parse(&text, path).map_err(|e| e.to_string())?;
    text.parse::<DocumentMut>().map_err(|e| format!("{}: {e}", path.display()))
}

fn write_doc(path: &Path, doc: &DocumentMut) -> Result<(), String> {
    let text = doc.to_string();
    UserStore::parse(&text, path).map_err(|e| format!("refusing to write an invalid file: {e}"))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("cannot write in {}: {e}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(|e| e.to_string())?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(tmp.path(), meta.permissions());
    }
    tmp.persist(path).map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    Ok(())
}

/// The `[users.NAME]` table, found case-insensitively as moat looks users up; created (as `name`) when
/// `create` and absent.
fn user_table<'d>(doc: &'d mut DocumentMut, name: &str, create: bool) -> Result<&'d mut Table, String> {
    let users = doc.entry("users").or_insert_with(|| {
        let mut t = Table::new();
        t.set_implicit(true);
        Item::Table(t)
    });
    let users = users.as_table_mut().ok_or("users is not a table")?;
    let found = users.iter().map(|(k, _)| k).find(|k| k.to_lowercase() == name.to_lowercase()).map(str::to_string);
    let key = match found {
        Some(k) => k,
        None if create => {
            users.insert(name, Item::Table(Table::new()));
            name.to_string()
        }
        None => return Err(format!("no user {name:?}")),
    };
    users.get_mut(&key).and_then(Item::as_table_mut).ok_or_else(|| format!("users.{key} is not a table"))
}

/// The new password: twice without echo from a terminal, or one line from stdin.
fn read_password() -> Result<String, String> {
    let pw = if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        let b = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if a != b {
            return Err("the passwords differ".into());
        }
        a
    } else {
        // Bounded: one line, and never more than a password SASL can carry (plus its line end).
        let mut line = String::new();
        let limit = (super::sasl::MAX_PASSWORD + 2) as u64;
        std::io::stdin()
            .lock()
            .take(limit)
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password: {e}"))?;
        if !line.ends_with('\n') && line.len() as u64 >= limit {
            return Err(format!("password longer than {} bytes", super::sasl::MAX_PASSWORD));
        }
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if pw.is_empty() {
        return Err("empty password".into());
    }
    if pw.len() > super::sasl::MAX_PASSWORD {
        // SASL refuses longer ones, so such a password could never be used.
        return Err(format!("password longer than {} bytes", super::sasl::MAX_PASSWORD));
    }
    Ok(pw)
}

fn random(n: usize) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).map_err(|_| "no randomness")?;
    Ok(b)
}
