//! The users file (`[auth] users_file`, TOML): argon2id hashes, allowed senders, the disabled flag, an
//! optional TOTP secret and named app passwords. Parsed and checked as a whole; a file with any problem is
//! refused with file:line and the store in force stays.
//!
//! ```toml
//! [users.alice]
//! password = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! senders = ["alice@example.org", "@example.net"]
//! totp_secret = "JBSWY3DPEHPK3PXP"        # optional; then the password is followed by the 6-digit code
//! [[users.alice.app_passwords]]
//! name = "phone"
//! hash = "$argon2id$..."
//! listeners = ["submission"]               # optional
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::Deserialize;

use super::sasl::Credentials;
use super::totp;

/// Why a users file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{}: {message}", .file.display(), .line.map_or_else(String::new, |l| l.to_string()))]
pub struct StoreError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: BTreeMap<String, UserEntry>,
}

/// One user as written in the file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    password: String,
    #[serde(default)]
    senders: Vec<String>,
    #[serde(default)]
    disabled: bool,
    totp_secret: Option<String>,
    #[serde(default)]
    app_passwords: Vec<AppPassword>,
}

/// A named password for one client (a phone, a scanner), revocable by deleting it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppPassword {
    name: String,
    hash: String,
    /// Listener names it is valid on; absent means all.
    listeners: Option<Vec<String>>,
}

/// A checked user.
#[derive(Clone)]
struct User {
    name: String,
    password: String,
    senders: Vec<String>,
    disabled: bool,
    totp: Option<Vec<u8>>,
    apps: Vec<AppPassword>,
}

/// The parsed users file.
#[derive(Clone, Default)]
pub struct UserStore {
    /// Keyed by the lower-cased name.
    users: BTreeMap<String, User>,
}

impl std::fmt::Debug for UserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserStore").field("users", &self.users.len()).finish()
    }
}

/// How a password matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matched {
    /// The account password (with, for a TOTP user, a code valid at this step).
    Password { totp_step: Option<u64> },
    /// The named app password.
    App(String),
}

/// A successful verification: the user's canonical name and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub user: String,
    pub matched: Matched,
}

// === impl UserStore ===

impl UserStore {
    /// Reads and checks a users file. Blocking.
    pub fn load(path: &Path) -> Result<UserStore, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|e| StoreError {
            file: path.to_owned(),
            line: None,
            message: format!("cannot read users file: {e}"),
        })?;
        UserStore::parse(&text, path)
    }

    /// Parses and checks users file text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<UserStore, StoreError> {
        let err = |line, message: String| StoreError { file: path.to_owned(), line, message };
        let file: UsersFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1);
            err(line, e.message().to_string())
        })?;
        let mut users = BTreeMap::new();
        for (name, e) in file.users {
            let line = user_line(text, &name);
            if name.is_empty() || name.len() > super::sasl::MAX_USER || name.chars().any(|c| c.is_control()) {
                return Err(err(line, format!("invalid user name {name:?}")));
            }
            check_phc(&e.password).map_err(|m| err(line, format!("user {name:?}: password: {m}")))?;
            for a in &e.app_passwords {
                check_phc(&a.hash).map_err(|m| err(line, format!("user {name:?}: app password {:?}: {m}", a.name)))?;
            }
            for s in &e.senders {
                if !s.contains('@') || s.ends_with('@') {
                    return Err(err(line, format!("user {name:?}: sender {s:?} is not an address or @domain")));
                }
            }
            let totp = match &e.totp_secret {
                None => None,
                Some(s) => Some(totp::decode_secret(s).ok_or_else(|| {
                    err(line, format!("user {name:?}: totp_secret is not base32 of at least 80 bits"))
                })?),
            };
            let key = name.to_lowercase();
            if users.contains_key(&key) {
                return Err(err(line, format!("user {name:?} is defined twice (names are case-insensitive)")));
            }
            let senders = e.senders.iter().map(|s| s.to_lowercase()).collect();
            users.insert(
                key,
                User { name, password: e.password, senders, disabled: e.disabled, totp, apps: e.app_passwords },
            );
        }
        Ok(UserStore { users })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The TOTP secret of a user, if any.
    pub fn has_totp(&self, user: &str) -> bool {
        self.users.get(&user.to_lowercase()).is_some_and(|u| u.totp.is_some())
    }

    /// Checks credentials. Blocking and slow by design (argon2): run it off the async threads. An unknown
    /// user costs one verification too, against `dummy`, so timing does not tell which users exist.
    /// `now` is unix time, `totp_last` the last TOTP step this user used.
    pub fn verify(
        &self,
        creds: &Credentials,
        listener: &str,
        now: u64,
        totp_last: Option<u64>,
        dummy: &str,
    ) -> Option<Verified> {
        let Some(u) = self.users.get(&creds.user.to_lowercase()) else {
            let _ = check_password(dummy, &creds.password);
            return None;
        };
        let matched = verify_user(u, &creds.password, listener, now, totp_last);
        if u.disabled {
            return None;
        }
        matched.map(|matched| Verified { user: u.name.clone(), matched })
    }

    /// Whether `user` may use `address` as sender: listed exactly, or its domain listed as `@domain`. The
    /// null sender (empty) is always allowed (it names nobody).
    pub fn sender_allowed(&self, user: &str, address: &str) -> bool {
        if address.is_empty() {
            return true;
        }
        let Some(u) = self.users.get(&user.to_lowercase()) else { return false };
        let addr = address.to_lowercase();
        let domain = addr.rsplit_once('@').map(|(_, d)| d);
        u.senders.iter().any(|s| match s.strip_prefix('@') {
            Some(d) => domain == Some(d),
            None => *s == addr,
        })
    }
}

fn verify_user(u: &User, password: &str, listener: &str, now: u64, totp_last: Option<u64>) -> Option<Matched> {
    let mut matched = None;
    match &u.totp {
        Some(secret) => {
            // password + 6 digits; the code is checked only after the password, and both always run.
            let split = password.len().checked_sub(totp::DIGITS).filter(|&i| password.is_char_boundary(i));
            let (pw, code) = split.map_or((password, ""), |i| password.split_at(i));
            let pw_ok = check_password(&u.password, pw);
            let step = totp::verify(secret, code, now, totp_last);
            if pw_ok && step.is_some() {
                matched = Some(Matched::Password { totp_step: step });
            }
        }
        None => {
            if check_password(&u.password, password) {
                matched = Some(Matched::Password { totp_step: None });
            }
        }
    }
    if matched.is_none() {
        for a in &u.apps {
            let here = a.listeners.as_ref().is_none_or(|ls| ls.iter().any(|l| l == listener));
            if here && check_password(&a.hash, password) {
                matched = Some(Matched::App(a.name.clone()));
                break;
            }
        }
    }
    matched
}

fn check_phc(s: &str) -> Result<(), String> {
    let h = PasswordHash::new(s).map_err(|e| format!("not a PHC hash string ({e})"))?;
    if h.algorithm.as_str() != "argon2id" {
        return Err(format!("algorithm {} is not argon2id", h.algorithm));
    }
    Ok(())
}

/// Verifies `password` against a PHC string (its own parameters). Blocking.
pub fn check_password(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// Hashes a password with argon2id and the default parameters, with a random salt. Blocking.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt).map_err(|_| "no randomness")?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// The line of `[users.NAME]` (or the first mention of the name), for error messages.
fn user_line(text: &str, name: &str) -> Option<usize> {
    let quoted = format!("\"{name}\"");
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with('[') && (l.contains(&format!("users.{name}")) || l.contains(&quoted))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters for tests (argon2id, m=64 KiB, t=1).
    fn quick_hash(pw: &str) -> String {
        let params = argon2::Params::new(64, 1, 1, None).unwrap();
        let a = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        a.hash_password(pw.as_bytes(), &salt).unwrap().to_string()
    }

    fn store(extra: &str) -> UserStore {
        let text = format!(
            "[users.alice]\npassword = \"{}\"\nsenders = [\"alice@example.test\", \"@alice.example\"]\n\
             [[users.alice.app_passwords]]\nname = \"phone\"\nhash = \"{}\"\nlisteners = [\"submission\"]\n\
             [users.bob]\npassword = \"{}\"\ndisabled = true\n{extra}",
            quick_hash("secret"),
            quick_hash("app-pw"),
            quick_hash("bobpw"),
        );
        UserStore::parse(&text, Path::new("users.toml")).unwrap()
    }

    fn creds(u: &str, p: &str) -> Credentials {
        Credentials { user: u.into(), password: p.into() }
    }

    #[test]
    fn verifies_passwords_and_app_passwords() {
        let s = store("");
        let dummy = quick_hash("dummy");
        let v = s.verify(&creds("Alice", "secret"), "smtp", 0, None, &dummy).unwrap();
        assert_eq!(v, Verified { user: "alice".into(), matched: Matched::Password { totp_step: None } });
        assert!(s.verify(&creds("alice", "wrong"), "smtp", 0, None, &dummy).is_none());
        assert!(s.verify(&creds("nobody", "secret"), "smtp", 0, None, &dummy).is_none());
        assert!(s.verify(&creds("bob", "bobpw"), "smtp", 0, None, &dummy).is_none(), "disabled");
        let app = s.verify(&creds("alice", "app-pw"), "submission", 0, None, &dummy).unwrap();
        assert_eq!(app.matched, Matched::App("phone".into()));
        assert!(s.verify(&creds("alice", "app-pw"), "smtp", 0, None, &dummy).is_none(), "not on this listener");
    }

    #[test]
    fn totp_user_needs_the_code() {
        let secret = totp::encode_secret(b"12345678901234567890");
        let text = format!("[users.carol]\npassword = \"{}\"\ntotp_secret = \"{secret}\"\n", quick_hash("pw"));
        let s = UserStore::parse(&text, Path::new("u.toml")).unwrap();
        let now = 1_700_000_000;
        let code = totp::code_now(b"12345678901234567890", now);
        let d = quick_hash("x");
        let v = s.verify(&creds("carol", &format!("pw{code}")), "l", now, None, &d).unwrap();
        assert_eq!(v.matched, Matched::Password { totp_step: Some(now / 30) });
        assert!(s.verify(&creds("carol", "pw"), "l", now, None, &d).is_none());
        assert!(s.verify(&creds("carol", &format!("pw{code}")), "l", now, Some(now / 30), &d).is_none(), "reuse");
        assert!(s.verify(&creds("carol", &format!("pw{code}")), "l", now + 300, None, &d).is_none(), "old");
        assert!(s.verify(&creds("carol", "pé"), "l", now, None, &d).is_none(), "short, non-ASCII");
    }

    #[test]
    fn sender_binding() {
        let s = store("");
        assert!(s.sender_allowed("alice", "Alice@Example.Test"));
        assert!(s.sender_allowed("alice", "anyone@alice.example"));
        assert!(!s.sender_allowed("alice", "anyone@sub.alice.example"));
        assert!(!s.sender_allowed("alice", "bob@example.test"));
        assert!(!s.sender_allowed("alice", "alice@example.test.evil"));
        assert!(s.sender_allowed("alice", ""));
        assert!(!s.sender_allowed("nobody", "alice@example.test"));
    }

    #[test]
    fn bad_files_are_refused_with_line() {
        let e = UserStore::parse("[users.a]\npassword = \"plain\"\n", Path::new("u.toml")).unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
        assert!(e.to_string().starts_with("u.toml:1: "), "{e}");
        let e = UserStore::parse("[users.a]\npasword = \"x\"\n", Path::new("u.toml")).unwrap_err();
        assert!(e.message.contains("pasword"), "{e}");
        let bcrypt = "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW";
        let e = UserStore::parse(&format!("[users.a]\npassword = \"{bcrypt}\"\n"), Path::new("u.toml")).unwrap_err();
        assert!(e.message.contains("password"), "{e}");
        let text = format!("[users.a]\npassword = \"{}\"\ntotp_secret = \"!!\"\n", quick_hash("x"));
        assert!(UserStore::parse(&text, Path::new("u.toml")).unwrap_err().message.contains("totp_secret"));
    }

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/users.toml");
        UserStore::load(&path).unwrap();
    }

    #[test]
    fn hash_round_trip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(check_password(&h, "correct horse"));
        assert!(!check_password(&h, "wrong"));
    }
}
