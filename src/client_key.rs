//! The one notion of "a client" that every per-client bound counts by: the per-IP connection cap
//! (`server`), the AUTH turns and the lockout (`auth`), and the reverse DNS claims (`smtp::conn`).
//!
//! An IPv4 client is its address. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) is that IPv4 address.
//! Any other IPv6 client is the prefix of `limits.ipv6_client_prefix` bits (default /64, the block one host
//! or subscriber usually holds): an attacker with one /64 has 2^64 addresses, and counting those one by one
//! would give it 2^64 budgets.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// The default IPv6 prefix length a client is counted by.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// A client as counted by the limits: the IPv4 address, or the IPv6 address with every bit past the
/// configured prefix cleared (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    /// The (masked) address.
    addr: IpAddr,
    /// The prefix length the address was masked to (32 for IPv4).
    prefix: u8,
}

/// Turns addresses into [`ClientKey`]s with the configured IPv6 prefix; cheap to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientKeys {
    ipv6_prefix: u8,
}

// === impl ClientKeys ===

impl ClientKeys {
    /// Keys with IPv6 clients counted per `/ipv6_prefix` (clamped to 1..=128; config validation refuses
    /// anything outside it).
    pub fn new(ipv6_prefix: u8) -> ClientKeys {
        ClientKeys { ipv6_prefix: ipv6_prefix.clamp(1, 128) }
    }

    /// The key of a client at `ip`.
    pub fn key(&self, ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey { addr: IpAddr::V4(v4), prefix: 32 },
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey { addr: IpAddr::V4(v4), prefix: 32 },
                None => {
                    let bits = u128::from(v6);
                    let mask = u128::MAX.checked_shl(128 - u32::from(self.ipv6_prefix)).unwrap_or(0);
                    ClientKey { addr: IpAddr::V6(Ipv6Addr::from(bits & mask)), prefix: self.ipv6_prefix }
                }
            },
        }
    }
}

impl Default for ClientKeys {
    fn default() -> ClientKeys {
        ClientKeys::new(DEFAULT_IPV6_PREFIX)
    }
}

// === impl ClientKey ===

impl ClientKey {
    /// The key of `ip` with the default IPv6 prefix (/64); for tests and callers without a config.
    pub fn of(ip: IpAddr) -> ClientKey {
        ClientKeys::default().key(ip)
    }

    /// The masked address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/{}", self.prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_is_the_address_and_mapped_ipv6_is_ipv4() {
        let keys = ClientKeys::default();
        assert_eq!(keys.key(ip("192.0.2.1")), keys.key(ip("::ffff:192.0.2.1")));
        assert_ne!(keys.key(ip("192.0.2.1")), keys.key(ip("192.0.2.2")));
        assert_eq!(keys.key(ip("::ffff:192.0.2.1")).to_string(), "192.0.2.1");
    }

    #[test]
    fn ipv6_is_counted_per_prefix() {
        let keys = ClientKeys::default();
        let a = keys.key(ip("2001:db8:1:2::1"));
        for host in ["2001:db8:1:2::ffff", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::"] {
            assert_eq!(keys.key(ip(host)), a, "{host}");
        }
        assert_ne!(keys.key(ip("2001:db8:1:3::1")), a, "another /64");
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        let k48 = ClientKeys::new(48);
        assert_eq!(k48.key(ip("2001:db8:1:2::1")), k48.key(ip("2001:db8:1:ffff::1")));
        assert_ne!(k48.key(ip("2001:db8:1:2::1")), k48.key(ip("2001:db8:2::1")));
        let k128 = ClientKeys::new(128);
        assert_ne!(k128.key(ip("2001:db8::1")), k128.key(ip("2001:db8::2")));
        assert_eq!(k128.key(ip("2001:db8::1")).addr(), ip("2001:db8::1"));
        // Out-of-range prefixes are clamped rather than panicking on the shift.
        assert_eq!(ClientKeys::new(0).key(ip("2001:db8::1")).to_string(), "::/1");
        assert_eq!(ClientKeys::new(200).key(ip("2001:db8::1")).addr(), ip("2001:db8::1"));
    }

    #[test]
    fn the_same_address_masked_to_different_prefixes_differs() {
        assert_ne!(ClientKeys::new(64).key(ip("2001:db8::")), ClientKeys::new(48).key(ip("2001:db8::")));
    }
}
