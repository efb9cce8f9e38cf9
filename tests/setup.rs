//! The setup scripts install every peer the tests use (issue #16, defect 0: a green CI on a machine where
//! a package had been installed by hand hid a missing one).
//!
//! Every `require_peer("NAME")` in the tests must map to Debian packages on `.ci/run`'s `apt-get install`
//! line; a new peer without a mapping here fails, so the mapping (and the install) is added with it.

use std::fs;
use std::path::Path;

/// The Debian packages a peer program needs on a machine that has none of them.
fn packages(peer: &str) -> Option<&'static [&'static str]> {
    Some(match peer {
        "postfix" => &["postfix"],
        // swaks --tls needs Net::SSLeay, which is only a "recommends" of swaks.
        "swaks" => &["swaks", "libnet-ssleay-perl"],
        "openssl" => &["openssl"],
        "python3" => &["python3"],
        "redis-server" => &["redis-server"],
        "haproxy" => &["haproxy"],
        "dnsmasq" => &["dnsmasq-base"],
        "promtool" => &["prometheus"],
        _ => return None,
    })
}

fn peers_used(dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            peers_used(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let text = fs::read_to_string(&p).unwrap();
            for part in text.split("require_peer(\"").skip(1) {
                if let Some(name) = part.split('"').next() {
                    if !out.iter().any(|n| n == name) {
                        out.push(name.to_string());
                    }
                }
            }
        }
    }
}

/// The words of the `apt-get install` command in a shell script (with its continuation lines).
fn apt_install_words(script: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut inside = false;
    for line in script.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with("apt-get install") {
            inside = true;
        }
        if inside {
            words.extend(line.trim_end_matches('\\').split_whitespace().map(str::to_string));
            if !line.ends_with('\\') {
                inside = false;
            }
        }
    }
    words
}

#[test]
fn ci_installs_every_peer_the_tests_use() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut peers = Vec::new();
    peers_used(&root.join("tests"), &mut peers);
    assert!(peers.len() >= 4, "found only {peers:?}");
    let words = apt_install_words(&fs::read_to_string(root.join(".ci/run")).unwrap());
    for peer in peers.iter().filter(|p| p.as_str() != "NAME") {
        let pkgs =
            packages(peer).unwrap_or_else(|| panic!("tests use peer {peer:?}: add its packages here and to .ci/run"));
        for pkg in pkgs {
            assert!(words.iter().any(|w| w == pkg), ".ci/run does not install {pkg} (needed by {peer}): {words:?}");
        }
    }
}

#[test]
fn demo_installs_swaks_with_tls_support() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let demo = fs::read_to_string(root.join("scripts/demo.sh")).unwrap();
    assert!(
        demo.contains("libnet-ssleay-perl"),
        "scripts/demo.sh prints a swaks --tls line but does not install Net::SSLeay"
    );
}

#[test]
fn swaks_here_can_do_tls() {
    if !common::postfix::require_peer("swaks") {
        return;
    }
    let out = std::process::Command::new("swaks").arg("--support").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("=== TLS supported"), "swaks lacks TLS (install libnet-ssleay-perl):\n{text}");
}

mod common;
