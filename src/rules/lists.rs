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
        Some((a, l)) => (a, Some(l.parse::<u32>().map_err(|_| format!("invalid prefix length in {s:?}"))?)),
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

impl DomainSet {
    pub fn new<I: IntoIterator<Item = String>>(items: I) -> DomainSet {
        DomainSet {
            set: items
                .into_iter()
                .map(|d| d.trim_start_matches(['@', '.']).trim_end_matches('.').to_lowercase())
                .collect(),
        }
    }

    /// Whether `domain` or one of its parents is listed.
    pub fn contains(&self, domain: &str) -> bool {
        let d = domain.trim_end_matches('.').to_lowercase();
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
    /// Any kind, probabilistic: domains are looked up by each suffix, everything else exactly.
    Bloom {
        kind: ListKind,
        bloom: Box<BlockedBloom>,
    },
}

impl std::fmt::Debug for List {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            List::Ip(s) => write!(f, "Ip({} ranges)", s.ranges.len()),
            List::Domain(s) => write!(f, "Domain({})", s.set.len()),
            List::Exact(s) => write!(f, "Exact({})", s.len()),
            List::Bloom { kind, bloom } => write!(f, "Bloom({kind:?}, {} bytes)", bloom.bytes()),
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
            List::Bloom { kind, bloom } => {
                let v = value.to_lowercase();
                match kind {
                    ListKind::Domain => suffixes(v.trim_end_matches('.')).any(|s| bloom.check(s.as_bytes())),
                    _ => bloom.check(v.as_bytes()),
                }
            }
        }
    }
}

/// Loads a bloom list: one pass over the text without an allocation per entry (ASCII entries are
/// lower-cased in one reused buffer), each normalized entry hashed once. Entries are normalized as the
/// other kinds are: the part before `#`, trimmed, lower-case, without leading `@` or `.`.
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
    let mut lower = String::new();
    for l in text.split('\n') {
        let l = l.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        if l.is_ascii() {
            lower.clear();
            lower.push_str(l);
            lower.make_ascii_lowercase();
        } else {
            lower = l.to_lowercase();
        }
        b.add(lower.trim_start_matches(['@', '.']).as_bytes());
    }
    Ok(List::Bloom { kind, bloom: Box::new(b.finish()) })
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

    #[test]
    fn list_error_names_line() {
        let e = List::load(ListKind::Ip, "1.2.3.4\n\nnot-an-ip\n", None).unwrap_err();
        assert_eq!(e.0, 3);
    }
}
