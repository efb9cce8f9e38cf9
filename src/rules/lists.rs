//! List files (`rules/lists/*.txt`): IP/CIDR with longest-prefix match, domains that cover their
//! subdomains, addresses, and hashes/URLs, optionally in a bloom filter for very large lists ([`bloom`]).

mod bloom;

use std::collections::HashSet;
use std::net::IpAddr;

pub use bloom::BlockedBloom;

use super::parse::ListKind;

/// The default false-positive rate of a bloom list.
pub const DEFAULT_FP_RATE: f64 = 0.0001;

/// A set of CIDR ranges, as sorted, merged `[start, end]` intervals over the 128-bit address space (IPv4 is
/// mapped into `::ffff:0:0/96`). Membership is a binary search, so a million ranges cost ~20 comparisons;
/// for a yes/no answer, the longest-prefix match and any-range match agree.
#[derive(Clone, Debug, Default)]
pub struct CidrSet {
    ranges: Vec<(u128, u128)>,
}

/// Parses `a.b.c.d`, `a.b.c.d/n`, `v6` or `v6/n` into an inclusive range.
pub fn parse_cidr(s: &str) -> Result<(u128, u128), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(prefix_len(l).ok_or_else(|| format!("invalid prefix length in {s:?}"))?)),
        None => (s, None),
    };
    let ip: IpAddr = addr.trim().parse().map_err(|_| format!("invalid IP address {addr:?}"))?;
    let (base, max, offset) = match ip {
        IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), 32, 96),
        IpAddr::V6(v6) => (u128::from(v6), 128, 0),
    };
    let len = len.unwrap_or(max);
    if len > max {
        return Err(format!("prefix length {len} too long in {s:?}"));
    }
    let host_bits = max - len;
    let mask = if host_bits + (128 - max - offset) >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    Ok((base & !mask, base | mask))
}

/// A prefix length: 1 to 3 ASCII digits (`str::parse` alone would also take `+8`).
fn prefix_len(l: &str) -> Option<u32> {
    (!l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit())).then(|| l.parse().ok()).flatten()
}

fn ip_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(u128::from(v6), |v4| u128::from(v4.to_ipv6_mapped())),
    }
}

impl CidrSet {
    /// Builds the set from inclusive ranges (any order, overlaps allowed).
    pub fn new(mut ranges: Vec<(u128, u128)>) -> CidrSet {
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        CidrSet { ranges: merged }
    }

    /// Whether `ip` is inside one of the ranges.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let k = ip_key(ip);
        let i = self.ranges.partition_point(|r| r.0 <= k);
        i > 0 && self.ranges[i - 1].1 >= k
    }
}

/// Domains: a listed domain covers itself and every subdomain.
#[derive(Clone, Debug, Default)]
pub struct DomainSet {
    set: HashSet<String>,
}

/// The one normalisation of a domain, for list entries (exact or bloom) and looked-up names alike: without
/// a leading `@` or `.` (`@example.org` and `.example.org` are written for "the domain"), without the
/// trailing root dot, lower-case.
pub fn domain_key(d: &str) -> String {
    let mut out = String::new();
    push_domain_key(&mut out, d);
    out
}

/// [`domain_key`] into a reused buffer: a bloom list of millions of domains loads without an allocation
/// per ASCII entry.
fn push_domain_key(out: &mut String, d: &str) {
    let d = d.trim().trim_start_matches(['@', '.']).trim_end_matches('.');
    out.clear();
    if d.is_ascii() {
        out.push_str(d);
        out.make_ascii_lowercase();
    } else {
        out.push_str(&d.to_lowercase());
    }
}

impl DomainSet {
    pub fn new<I: IntoIterator<Item = String>>(items: I) -> DomainSet {
        DomainSet { set: items.into_iter().map(|d| domain_key(&d)).collect() }
    }

    /// Whether `domain` or one of its parents is listed.
    pub fn contains(&self, domain: &str) -> bool {
        let d = domain_key(domain);
        let hit = suffixes(&d).any(|s| self.set.contains(s));
        hit
    }
}

/// `a.b.c`, `b.c`, `c`.
pub fn suffixes(d: &str) -> impl Iterator<Item = &str> + '_ {
    std::iter::once(d).chain(d.match_indices('.').map(move |(i, _)| &d[i + 1..]))
}

/// A loaded list.
pub enum List {
    Ip(CidrSet),
    Domain(DomainSet),
    /// Addresses or hashes/URLs, lower-case, exact.
    Exact(HashSet<String>),
    /// Any kind, probabilistic: domains are looked up by each suffix, everything else exactly. In an `ip`
    /// list, single addresses are in the filter (as their 16-byte v4-mapped key) and ranges in `ranges`.
    Bloom {
        kind: ListKind,
        bloom: Box<BlockedBloom>,
        ranges: CidrSet,
    },
}

impl std::fmt::Debug for List {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            List::Ip(s) => write!(f, "Ip({} ranges)", s.ranges.len()),
            List::Domain(s) => write!(f, "Domain({})", s.set.len()),
            List::Exact(s) => write!(f, "Exact({})", s.len()),
            List::Bloom { kind, bloom, ranges } => {
                write!(f, "Bloom({kind:?}, {} bytes, {} ranges)", bloom.bytes(), ranges.ranges.len())
            }
        }
    }
}

impl List {
    /// Builds a list from its file's text. Errors name the 1-based line.
    pub fn load(kind: ListKind, text: &str, bloom: Option<f64>) -> Result<List, (usize, String)> {
        let entries = text.lines().enumerate().filter_map(|(n, l)| {
            let l = l.split('#').next().unwrap_or("").trim();
            (!l.is_empty()).then_some((n + 1, l))
        });
        if let Some(fp) = bloom {
            return load_bloom(kind, text, fp);
        }
        Ok(match kind {
            ListKind::Ip => {
                let mut ranges = Vec::new();
                for (n, e) in entries {
                    ranges.push(parse_cidr(e).map_err(|m| (n, m))?);
                }
                List::Ip(CidrSet::new(ranges))
            }
            ListKind::Domain => List::Domain(DomainSet::new(entries.map(|(_, e)| e.to_string()))),
            ListKind::Address | ListKind::Hash => List::Exact(entries.map(|(_, e)| e.to_lowercase()).collect()),
        })
    }

    /// Whether `value` (an IP, a domain, an address or a hash, per the list's kind) is listed.
    /// A bloom list normalizes `value` as [`load_bloom`] normalized its entries.
    pub fn contains(&self, value: &str) -> bool {
        match self {
            List::Ip(s) => value.parse::<IpAddr>().is_ok_and(|ip| s.contains(ip)),
            List::Domain(s) => s.contains(value),
            List::Exact(s) => s.contains(&value.to_lowercase()),
            List::Bloom { kind: ListKind::Ip, bloom, ranges } => {
                value.parse::<IpAddr>().is_ok_and(|ip| ranges.contains(ip) || bloom.check(&ip_key(ip).to_be_bytes()))
            }
            List::Bloom { kind: ListKind::Domain, bloom, .. } => {
                suffixes(&domain_key(value)).any(|s| bloom.check(s.as_bytes()))
            }
            List::Bloom { bloom, .. } => bloom.check(value.to_lowercase().as_bytes()),
        }
    }
}

/// Loads a bloom list: one pass over the text, each entry normalized as the exact kinds are and hashed once.
/// Domains go through [`domain_key`]; addresses and hashes are lower-cased (in one reused buffer when ASCII,
/// to spare an allocation per entry); IP entries are parsed, so a bad one is refused with its line, a single
/// address is hashed as its 16-byte key and a range goes to an exact [`CidrSet`] beside the filter (a
/// string compare would never match an address inside a CIDR).
fn load_bloom(kind: ListKind, text: &str, fp: f64) -> Result<List, (usize, String)> {
    if !(fp > 0.0 && fp < 1.0) {
        return Err((0, format!("fp_rate {fp} must be between 0 and 1")));
    }
    // Comment and blank lines are counted too: a slightly larger filter, one cheap pass.
    let count = memchr::memchr_iter(b'\n', text.as_bytes()).count() + 1;
    let Some(b) = BlockedBloom::new(count, fp) else {
        return Err((0, format!("fp_rate {fp} is too small for a bloom list")));
    };
    let mut b = b.builder();
    let mut ranges = Vec::new();
    let mut lower = String::new();
    for (n, l) in text.split('\n').enumerate() {
        let l = l.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        match kind {
            ListKind::Ip => {
                let (start, end) = parse_cidr(l).map_err(|m| (n + 1, m))?;
                if start == end {
                    b.add(&start.to_be_bytes());
                } else {
                    ranges.push((start, end));
                }
            }
            ListKind::Domain => {
                push_domain_key(&mut lower, l);
                b.add(lower.as_bytes());
            }
            ListKind::Address | ListKind::Hash if l.is_ascii() => {
                lower.clear();
                lower.push_str(l);
                lower.make_ascii_lowercase();
                b.add(lower.as_bytes());
            }
            ListKind::Address | ListKind::Hash => b.add(l.to_lowercase().as_bytes()),
        }
    }
    Ok(List::Bloom { kind, bloom: Box::new(b.finish()), ranges: CidrSet::new(ranges) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_v4_v6_and_mapped() {
        let s = CidrSet::new(vec![
            parse_cidr("192.0.2.0/24").unwrap(),
            parse_cidr("2001:db8::/32").unwrap(),
            parse_cidr("10.0.0.1").unwrap(),
        ]);
        assert!(s.contains("192.0.2.77".parse().unwrap()));
        assert!(!s.contains("192.0.3.1".parse().unwrap()));
        assert!(s.contains("10.0.0.1".parse().unwrap()));
        assert!(!s.contains("10.0.0.2".parse().unwrap()));
        assert!(s.contains("2001:db8:1::5".parse().unwrap()));
        assert!(s.contains("::ffff:192.0.2.1".parse().unwrap()));
        assert!(!s.contains("2001:db9::1".parse().unwrap()));
        assert!(parse_cidr("1.2.3.4/33").is_err());
        let all = CidrSet::new(vec![parse_cidr("::/0").unwrap()]);
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn domains_cover_subdomains() {
        let d = DomainSet::new(["Spam.Example".to_string()]);
        assert!(d.contains("spam.example"));
        assert!(d.contains("a.b.spam.example."));
        assert!(!d.contains("notspam.example"));
    }

    #[test]
    fn bloom_list() {
        let l = List::load(ListKind::Domain, "# c\nbad.example\nevil.test # x\n", Some(0.001)).unwrap();
        assert!(l.contains("www.bad.example"));
        assert!(l.contains("EVIL.test"));
        assert!(!l.contains("good.example"));
    }

    /// A bloom `ip` list answers as the exact one: CIDR ranges match the addresses inside them, v4-mapped
    /// v6 is the v4 address, and a bad entry is refused with its line, not hashed as a string.
    #[test]
    fn bloom_ip_list_matches_ranges_and_refuses_bad_entries() {
        let text = "# c\n127.0.0.0/8\n192.0.2.7 # one host\n2001:db8::/32\n::ffff:198.51.100.1\n2001:db8:ffff::1/128\n";
        for bloom in [None, Some(0.001)] {
            let l = List::load(ListKind::Ip, text, bloom).unwrap();
            for hit in ["127.0.0.1", "127.255.0.9", "192.0.2.7", "::ffff:192.0.2.7", "2001:db8:1::5", "198.51.100.1"] {
                assert!(l.contains(hit), "{bloom:?} {hit}");
            }
            for miss in ["128.0.0.1", "192.0.2.8", "2001:db9::1", "not an ip", ""] {
                assert!(!l.contains(miss), "{bloom:?} {miss}");
            }
            for bad in ["not-an-ip!!", "1.2.3.4/33", "1.2.3.4/+8", "1.2.3.4/ 8", "10.0.0.0/-1"] {
                let e = List::load(ListKind::Ip, &format!("1.2.3.4\n\n{bad}\n"), bloom).unwrap_err();
                assert_eq!(e.0, 3, "{bloom:?} {bad}: {e:?}");
            }
        }
    }

    /// One normalisation for domains, bloom or not: case, a trailing root dot and a leading `@`/`.` do not
    /// matter on either side.
    #[test]
    fn bloom_and_exact_domain_lists_normalise_alike() {
        for bloom in [None, Some(0.001)] {
            let l = List::load(ListKind::Domain, "Bad.Example.\n@evil.test\n.dot.test\n", bloom).unwrap();
            for hit in ["bad.example", "www.BAD.example.", "evil.test", "x.dot.test"] {
                assert!(l.contains(hit), "{bloom:?} {hit}");
            }
            assert!(!l.contains("good.example"), "{bloom:?}");
            let l = List::load(ListKind::Address, "Alice@Example.ORG\n", bloom).unwrap();
            assert!(l.contains("alice@example.org") && l.contains("ALICE@example.org"), "{bloom:?}");
            assert!(!l.contains("bob@example.org"), "{bloom:?}");
        }
    }

    #[test]
    fn list_error_names_line() {
        let e = List::load(ListKind::Ip, "1.2.3.4\n\nnot-an-ip\n", None).unwrap_err();
        assert_eq!(e.0, 3);
    }
}
