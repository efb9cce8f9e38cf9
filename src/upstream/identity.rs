//! Passing the original client's identity to the upstream MTA, so it logs and restricts as if it faced the
//! client: Postfix `XCLIENT` (<https://www.postfix.org/XCLIENT_README.html>) or the HAProxy PROXY protocol v2.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

/// The PROXY protocol v2 header with the LOCAL command ("a connection from the proxy itself", no addresses),
/// for connections made on no client's behalf: an upstream expecting PROXY v2 waits for a header before it
/// greets.
pub const PROXY_V2_LOCAL: &[u8; 16] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// Who the client is, as far as the upstream needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The client's address and port.
    pub peer: SocketAddr,
    /// The address and port the client connected to (moat's listener).
    pub local: SocketAddr,
    /// Forward-confirmed reverse DNS name, if any.
    pub name: Option<String>,
    /// No name because the lookup was skipped (all lookup slots busy) or timed out: the upstream is told
    /// `NAME=[TEMPUNAVAIL]`, so Postfix's `reject_unknown_client_hostname` defers (4xx) rather than treating
    /// the client as permanently nameless.
    pub name_temporarily_unavailable: bool,
    /// The EHLO/HELO argument.
    pub helo: Option<String>,
    /// Whether the client used EHLO (ESMTP) rather than HELO.
    pub esmtp: bool,
    /// The SASL login name, after a successful AUTH.
    pub login: Option<String>,
}

impl ClientIdentity {
    /// The `XCLIENT` command line (without CRLF). Values are xtext-encoded (RFC 3461 4); unknown ones are
    /// `[UNAVAILABLE]` as Postfix expects.
    pub fn xclient_command(&self) -> String {
        self.xclient_line(self.login.is_some())
    }

    /// The `XCLIENT` line; with `with_login` (the upstream offers the LOGIN attribute) it always carries
    /// `LOGIN=`, `[UNAVAILABLE]` for an unauthenticated client, so a pooled connection re-introduced for a new
    /// client never keeps the previous client's login.
    pub fn xclient_line(&self, with_login: bool) -> String {
        let mut cmd = String::from("XCLIENT");
        let addr = match self.peer.ip() {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("IPV6:{a}"),
        };
        let _ = write!(cmd, " ADDR={} PORT={}", addr, self.peer.port());
        let name = match (&self.name, self.name_temporarily_unavailable) {
            (Some(n), _) => xtext(n),
            (None, true) => "[TEMPUNAVAIL]".into(),
            (None, false) => "[UNAVAILABLE]".into(),
        };
        let _ = write!(cmd, " NAME={name}");
        if let Some(h) = &self.helo {
            let _ = write!(cmd, " HELO={}", xtext(h));
        }
        let _ = write!(cmd, " PROTO={}", if self.esmtp { "ESMTP" } else { "SMTP" });
        if with_login {
            let login = self.login.as_deref().map(xtext).unwrap_or_else(|| "[UNAVAILABLE]".into());
            let _ = write!(cmd, " LOGIN={login}");
        }
        cmd
    }

    /// The PROXY protocol v2 header for a TCP connection from the client to moat's listener.
    pub fn proxy_v2_header(&self) -> Vec<u8> {
        const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
        let mut out = SIGNATURE.to_vec();
        out.push(0x21); // version 2, command PROXY
        match (self.peer, self.local) {
            (SocketAddr::V4(src), SocketAddr::V4(dst)) => {
                out.push(0x11); // TCP over IPv4
                out.extend_from_slice(&12u16.to_be_bytes());
                out.extend_from_slice(&src.ip().octets());
                out.extend_from_slice(&dst.ip().octets());
                out.extend_from_slice(&src.port().to_be_bytes());
                out.extend_from_slice(&dst.port().to_be_bytes());
            }
            (src, dst) => {
                out.push(0x21); // TCP over IPv6 (v4 addresses mapped)
                out.extend_from_slice(&36u16.to_be_bytes());
                out.extend_from_slice(&v6(src.ip()).octets());
                out.extend_from_slice(&v6(dst.ip()).octets());
                out.extend_from_slice(&src.port().to_be_bytes());
                out.extend_from_slice(&dst.port().to_be_bytes());
            }
        }
        out
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// RFC 3461 4 xtext: `+`, `=`, controls, space and non-ASCII become `+XX`.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident() -> ClientIdentity {
        ClientIdentity {
            peer: "192.0.2.7:40000".parse().unwrap(),
            local: "127.0.0.1:25".parse().unwrap(),
            name: Some("client.example".into()),
            name_temporarily_unavailable: false,
            helo: Some("helo+name".into()),
            esmtp: true,
            login: None,
        }
    }

    #[test]
    fn a_skipped_lookup_is_a_temporary_unknown() {
        let id = ClientIdentity { name: None, name_temporarily_unavailable: true, ..ident() };
        assert!(id.xclient_command().contains(" NAME=[TEMPUNAVAIL] "), "{}", id.xclient_command());
        let id = ClientIdentity { name: None, ..ident() };
        assert!(id.xclient_command().contains(" NAME=[UNAVAILABLE] "), "{}", id.xclient_command());
    }

    #[test]
    fn xclient_line() {
        assert_eq!(
            ident().xclient_command(),
            "XCLIENT ADDR=192.0.2.7 PORT=40000 NAME=client.example HELO=helo+2Bname PROTO=ESMTP"
        );
        let mut i = ident();
        i.peer = "[2001:db8::1]:25".parse().unwrap();
        i.name = None;
        assert!(i.xclient_command().contains("ADDR=IPV6:2001:db8::1 PORT=25 NAME=[UNAVAILABLE]"));
    }

    #[test]
    fn xclient_login() {
        let mut i = ident();
        assert!(i.xclient_line(true).ends_with(" PROTO=ESMTP LOGIN=[UNAVAILABLE]"));
        i.login = Some("al ice".into());
        assert!(i.xclient_line(true).ends_with(" LOGIN=al+20ice"));
        assert!(!i.xclient_line(false).contains("LOGIN"), "not offered by the upstream");
    }

    #[test]
    fn xtext_encoding() {
        assert_eq!(xtext("a=b c+é"), "a+3Db+20c+2B+C3+A9");
    }

    #[test]
    fn proxy_v2_local() {
        // Same signature as a PROXY header, version 2 with command LOCAL (0x20), family UNSPEC, no payload.
        assert_eq!(&PROXY_V2_LOCAL[..12], &ident().proxy_v2_header()[..12]);
        assert_eq!(&PROXY_V2_LOCAL[12..], &[0x20, 0x00, 0x00, 0x00]);
    }

    #[test]
    fn proxy_v2() {
        let h = ident().proxy_v2_header();
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(&h[14..16], &[0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 7]);
        assert_eq!(&h[24..26], &40000u16.to_be_bytes());
        assert_eq!(h.len(), 28);
    }
}
