//! The pure part of DNS lists: query names (reversed IPv4 octets, IPv6 nibbles, domains under a zone),
//! which answers mean "listed" (postscreen-style return-code patterns and bitmasks), and the answers that
//! mean an error rather than a listing (`127.255.255.x`, anything outside 127.0.0.0/8).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

/// One octet pattern: a value, a range, or a `;`-separated choice of values and ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Octet(Vec<(u8, u8)>);

impl Octet {
    fn parse(s: &str) -> Result<Octet, String> {
        let inner = match s.strip_prefix('[') {
            Some(rest) => rest.strip_suffix(']').ok_or_else(|| format!("unclosed '[' in {s:?}"))?,
            None => s,
        };
        let mut out = Vec::new();
        for part in inner.split(';') {
            let (lo, hi) = match part.split_once("..") {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let num = |v: &str| v.trim().parse::<u8>().map_err(|_| format!("bad octet {v:?} in {s:?}"));
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return Err(format!("empty range {part:?}"));
            }
            out.push((lo, hi));
        }
        Ok(Octet(out))
    }

    fn matches(&self, v: u8) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&v))
    }
}

/// One "listed" pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Code {
    /// Four octet patterns.
    Pattern([Octet; 4]),
    /// Any bit of the mask set in the answer's last octet (`&4`).
    Mask(u8),
}

/// Which answers of a zone mean "listed".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Codes(Vec<Code>);

impl Codes {
    /// Parses a zone's `codes`; empty: any 127.0.0.0/8 answer but 127.0.0.1.
    pub fn parse(list: &[String]) -> Result<Codes, String> {
        let mut out = Vec::new();
        for s in list {
            let s = s.trim();
            if let Some(m) = s.strip_prefix('&') {
                let m = m.trim();
                let v = match m.strip_prefix("0x") {
                    Some(h) => u8::from_str_radix(h, 16),
                    None => m.parse::<u8>(),
                };
                match v {
                    Ok(v) if v != 0 => out.push(Code::Mask(v)),
                    _ => return Err(format!("bad bitmask {s:?}: use &N with N in 1..=255")),
                }
                continue;
            }
            let parts = split_octets(s);
            let [a, b, c, d] = parts[..] else { return Err(format!("code {s:?} must have four octets")) };
            out.push(Code::Pattern([Octet::parse(a)?, Octet::parse(b)?, Octet::parse(c)?, Octet::parse(d)?]));
        }
        Ok(Codes(out))
    }

    /// Whether `ip` (already known not to be an error answer) means "listed".
    pub fn matches(&self, ip: Ipv4Addr) -> bool {
        let o = ip.octets();
        if self.0.is_empty() {
            return o[0] == 127 && ip != Ipv4Addr::LOCALHOST;
        }
        self.0.iter().any(|c| match c {
            Code::Pattern(p) => p.iter().zip(o).all(|(p, v)| p.matches(v)),
            Code::Mask(m) => o[0] == 127 && o[3] & m != 0,
        })
    }
}

/// Splits `a.b.c.d` at the dots outside `[...]` (a range `[2..11]` has dots of its own).
fn split_octets(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, ch) in s.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => depth -= 1,
            '.' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// What a zone's answer to one query means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No record (NXDOMAIN/NODATA), or only answers that match no code.
    NotListed,
    /// Listed, with the answers that matched.
    Listed(Vec<Ipv4Addr>),
    /// The list refused the query (`127.255.255.x`: over quota, public resolver, ...) or answered outside
    /// 127.0.0.0/8 (a hijacking resolver): an error, never a listing.
    Refused,
}

/// Classifies a zone's A answers.
pub fn classify(answers: &[Ipv4Addr], codes: &Codes) -> Verdict {
    let refused = |ip: &Ipv4Addr| {
        let o = ip.octets();
        o[0] != 127 || (o[1] == 255 && o[2] == 255)
    };
    if answers.iter().any(refused) {
        return Verdict::Refused;
    }
    let hits: Vec<Ipv4Addr> = answers.iter().copied().filter(|ip| codes.matches(*ip)).collect();
    if hits.is_empty() {
        Verdict::NotListed
    } else {
        Verdict::Listed(hits)
    }
}

/// The query name for an IP address under `zone`: `4.3.2.1.zone` for 1.2.3.4, 32 nibbles for IPv6.
pub fn ip_query(ip: IpAddr, zone: &str) -> String {
    let mut out = String::with_capacity(80);
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let _ = write!(out, "{}.{}.{}.{}.", o[3], o[2], o[1], o[0]);
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => return ip_query(IpAddr::V4(v4), zone),
            None => {
                for b in v6.octets().iter().rev() {
                    let _ = write!(out, "{:x}.{:x}.", b & 0xf, b >> 4);
                }
            }
        },
    }
    out.push_str(zone.trim_end_matches('.'));
    out.push('.');
    out
}

/// The query name for a domain under `zone`, or `None` for something that is not a plausible domain
/// name (an IP literal, an empty or over-long name, a name with characters DNS labels cannot carry).
pub fn domain_query(domain: &str, zone: &str) -> Option<String> {
    let d = domain.trim().trim_matches('.').trim_start_matches('[').to_ascii_lowercase();
    let plausible = !d.is_empty()
        && d.len() <= 200
        && d.contains('.')
        && d.parse::<IpAddr>().is_err()
        && d.split('.').all(|l| !l.is_empty() && l.len() <= 63)
        && d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    plausible.then(|| format!("{d}.{}.", zone.trim_end_matches('.')))
}

/// The registered domain (public suffix plus one label) of a host name, from the public suffix list.
pub fn registered_domain(host: &str) -> Option<String> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    let d = psl::domain(host.as_bytes())?;
    std::str::from_utf8(d.as_bytes()).ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(v: &[&str]) -> Codes {
        Codes::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn query_names() {
        assert_eq!(ip_query("192.0.2.99".parse().unwrap(), "zen.example"), "99.2.0.192.zen.example.");
        assert_eq!(ip_query("::ffff:192.0.2.1".parse().unwrap(), "z"), "1.2.0.192.z.");
        let v6 = ip_query("2001:db8::1".parse().unwrap(), "z.");
        assert_eq!(v6, "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.z.");
        assert_eq!(domain_query("Mail.Example.COM.", "dbl").as_deref(), Some("mail.example.com.dbl."));
        assert_eq!(domain_query("[192.0.2.1]", "dbl"), None);
        assert_eq!(domain_query("localhost", "dbl"), None);
        assert_eq!(domain_query("a b.com", "dbl"), None);
    }

    #[test]
    fn postscreen_style_codes() {
        let c = codes(&["127.0.0.[2..11]", "127.0.1.[2;4;6]", "127.0.[2..3].[1..2;9]"]);
        assert!(c.matches(Ipv4Addr::new(127, 0, 3, 9)) && !c.matches(Ipv4Addr::new(127, 0, 3, 5)));
        assert!(c.matches(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(c.matches(Ipv4Addr::new(127, 0, 0, 11)));
        assert!(!c.matches(Ipv4Addr::new(127, 0, 0, 12)));
        assert!(c.matches(Ipv4Addr::new(127, 0, 1, 4)));
        assert!(!c.matches(Ipv4Addr::new(127, 0, 1, 5)));
        let m = codes(&["&0x04"]);
        assert!(m.matches(Ipv4Addr::new(127, 0, 0, 6)) && !m.matches(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(Codes::parse(&["127.0.0".into()]).is_err());
        assert!(Codes::parse(&["127.0.0.[5..2]".into()]).is_err());
        assert!(Codes::parse(&["&0".into()]).is_err());
        assert!(Codes::parse(&["127.0.0.[2..3".into()]).is_err());
    }

    #[test]
    fn refused_and_foreign_answers_are_errors() {
        let any = Codes::default();
        assert_eq!(classify(&[Ipv4Addr::new(127, 255, 255, 254)], &any), Verdict::Refused);
        assert_eq!(classify(&[Ipv4Addr::new(10, 0, 0, 1)], &any), Verdict::Refused);
        assert_eq!(classify(&[], &any), Verdict::NotListed);
        assert_eq!(classify(&[Ipv4Addr::LOCALHOST], &any), Verdict::NotListed);
        let two = Ipv4Addr::new(127, 0, 0, 2);
        assert_eq!(classify(&[two], &any), Verdict::Listed(vec![two]));
        assert_eq!(classify(&[two], &codes(&["127.0.0.3"])), Verdict::NotListed);
    }

    #[test]
    fn registered_domains_come_from_the_suffix_list() {
        assert_eq!(registered_domain("www.shop.example.co.uk").as_deref(), Some("example.co.uk"));
        assert_eq!(registered_domain("a.b.example.com.").as_deref(), Some("example.com"));
        assert_eq!(registered_domain("com"), None);
    }
}
