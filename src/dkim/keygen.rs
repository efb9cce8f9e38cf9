//! `moat dkim keygen DOMAIN SELECTOR [--ed25519] [--dir DIR]`: writes a new private key (PEM, mode 0600)
//! and prints the TXT record to publish at `SELECTOR._domainkey.DOMAIN`.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use mail_auth::dkim::generate::DkimKeyPair;

/// Which kind of key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// RSA 2048 bits (every verifier knows it).
    Rsa2048,
    /// Ed25519 (RFC 8463; short records, not yet verified everywhere).
    Ed25519,
}

/// A generated key: where it was written and the TXT record's text.
#[derive(Debug)]
pub struct Generated {
    pub key_file: PathBuf,
    pub record_name: String,
    pub record: String,
}

fn der_len(n: usize, out: &mut Vec<u8>) {
    match n {
        0..=127 => out.push(n as u8),
        128..=255 => out.extend_from_slice(&[0x81, n as u8]),
        _ => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
    }
}

/// An RSAPublicKey (PKCS#1) wrapped as a SubjectPublicKeyInfo, the form DKIM records carry.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    const ALG: &[u8] = &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let mut bits = vec![0x03];
    der_len(pkcs1.len() + 1, &mut bits);
    bits.push(0);
    bits.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_len(ALG.len() + bits.len(), &mut out);
    out.extend_from_slice(ALG);
    out.extend_from_slice(&bits);
    out
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Generates a key for `domain`/`selector` into `dir` (refusing to overwrite a file).
pub fn generate(domain: &str, selector: &str, algorithm: Algorithm, dir: &Path) -> Result<Generated, String> {
    let label_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !label_ok(domain) || !domain.contains('.') || !label_ok(selector) {
        return Err(format!("{domain:?} / {selector:?}: give a domain name and a selector (letters, digits, '-')"));
    }
    let (private_pem, record) = match algorithm {
        Algorithm::Rsa2048 => {
            let pair = DkimKeyPair::generate_rsa(2048).map_err(|e| format!("cannot generate an RSA key: {e}"))?;
            let p = base64::engine::general_purpose::STANDARD.encode(rsa_spki(pair.public_key()));
            (pem("RSA PRIVATE KEY", pair.private_key()), format!("v=DKIM1; k=rsa; p={p}"))
        }
        Algorithm::Ed25519 => {
            let pair = DkimKeyPair::generate_ed25519().map_err(|e| format!("cannot generate an Ed25519 key: {e}"))?;
            (pem("PRIVATE KEY", pair.private_key()), format!("v=DKIM1; k=ed25519; p={}", pair.encoded_public_key()))
        }
    };
    let key_file = dir.join(format!("{}.{}.pem", domain.to_ascii_lowercase(), selector));
    let mut f = std::fs::OpenOptions::new();
    f.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
    let mut file = f.open(&key_file).map_err(|e| format!("cannot create {}: {e}", key_file.display()))?;
    file.write_all(private_pem.as_bytes()).map_err(|e| format!("cannot write {}: {e}", key_file.display()))?;
    Ok(Generated { key_file, record_name: format!("{selector}._domainkey.{domain}"), record })
}

/// The TXT record as a zone-file line (split into 255-byte strings).
pub fn zone_line(g: &Generated) -> String {
    let parts: Vec<String> =
        g.record.as_bytes().chunks(255).map(|c| format!("\"{}\"", String::from_utf8_lossy(c))).collect();
    format!("{}. IN TXT ( {} )", g.record_name, parts.join(" "))
}

/// `moat dkim ...`: returns the process exit status.
pub fn run(args: &[String]) -> i32 {
    let usage = "usage: moat dkim keygen DOMAIN SELECTOR [--ed25519] [--dir DIR]";
    let [cmd, domain, selector, rest @ ..] = args else {
        eprintln!("{usage}");
        return 2;
    };
    if cmd != "keygen" {
        eprintln!("{usage}");
        return 2;
    }
    let (mut algorithm, mut dir) = (Algorithm::Rsa2048, PathBuf::from("."));
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.clone().next()) {
            ("--ed25519", _) => algorithm = Algorithm::Ed25519,
            ("--dir", Some(d)) => {
                dir = PathBuf::from(d);
                it.next();
            }
            _ => {
                eprintln!("{usage}");
                return 2;
            }
        }
    }
    match generate(domain, selector, algorithm, &dir) {
        Ok(g) => {
            eprintln!("wrote {} (key_file for [[dkim.sign]]); publish this TXT record:", g.key_file.display());
            println!("{}", zone_line(&g));
            0
        }
        Err(e) => {
            eprintln!("moat dkim keygen: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_load_back_and_records_are_published_form() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate("example.com", "s1", Algorithm::Ed25519, dir.path()).unwrap();
        assert!(g.record.starts_with("v=DKIM1; k=ed25519; p="), "{}", g.record);
        super::super::check_key_file(&g.key_file, "example.com", "s1").unwrap();
        assert!(generate("example.com", "s1", Algorithm::Ed25519, dir.path()).is_err(), "never overwrites");
        let r = generate("example.com", "rsa", Algorithm::Rsa2048, dir.path()).unwrap();
        assert!(r.record.starts_with("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A"), "SPKI: {}", r.record);
        super::super::check_key_file(&r.key_file, "example.com", "rsa").unwrap();
        assert!(zone_line(&r).starts_with("rsa._domainkey.example.com. IN TXT ( \""));
        assert!(generate("bad domain", "s", Algorithm::Ed25519, dir.path()).is_err());
    }
}
