//! The PROXY protocol (HAProxy's `send-proxy` v1 and `send-proxy-v2`), inbound: a load balancer in front of
//! moat sends one header at the start of each connection naming the real client. [`parse`] is pure (bytes
//! in, header or "need more" out) and bounded, so it is table-tested and fuzz-friendly; [`read_header`]
//! reads exactly one header from a stream, never a byte past it (TLS or SMTP follow it), within a deadline.
//!
//! Spec: <https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The twelve bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
pub const V1_MAX: usize = 107;
/// The largest v2 header accepted (addresses plus TLVs such as HAProxy's SSL and unique-id ones); the
/// format allows 64 KiB, which no balancer in front of SMTP needs.
pub const V2_MAX: usize = 16 + 1024;

/// Which versions a listener accepts (`proxy_protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    V1,
    V2,
    Any,
}

/// What a header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u8,
    /// The real client, or `None` for a v2 `LOCAL` header or v1 `UNKNOWN` (the balancer's own health
    /// check): the connection is then taken as coming from the balancer itself.
    pub source: Option<SocketAddr>,
    /// The address the client connected to on the balancer.
    pub destination: Option<SocketAddr>,
}

/// Why a header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The connection does not start with a PROXY header at all.
    #[error("no PROXY protocol header")]
    Missing,
    /// A header of a version this listener does not accept.
    #[error("PROXY protocol v{0} not accepted on this listener")]
    Version(u8),
    /// The header breaks the format.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// Longer than [`V1_MAX`] / [`V2_MAX`].
    #[error("PROXY protocol header too long")]
    TooLong,
}

/// Parses the header at the start of `buf`: `Ok(None)` when more bytes are needed, else the header and
/// its length in bytes. Never looks past [`V1_MAX`] or [`V2_MAX`] bytes.
pub fn parse(buf: &[u8], accept: Accept) -> Result<Option<(Header, usize)>, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        if n < V2_SIGNATURE.len() {
            return Ok(None);
        }
        if accept == Accept::V1 {
            return Err(ProxyError::Version(2));
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        if n < 6 {
            return Ok(None);
        }
        if accept == Accept::V2 {
            return Err(ProxyError::Version(1));
        }
        return parse_v1(buf);
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX { Err(ProxyError::TooLong) } else { Ok(None) };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(ProxyError::Malformed("v1 line does not end with CRLF"));
    }
    let line = std::str::from_utf8(&window[6..lf - 1]).map_err(|_| ProxyError::Malformed("v1 line is not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let header = match parts.as_slice() {
        ["UNKNOWN", ..] => Header { version: 1, source: None, destination: None },
        [family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v6 = *family == "TCP6";
            let ip = |s: &str| -> Result<IpAddr, ProxyError> {
                let ip: IpAddr = if v6 {
                    IpAddr::V6(s.parse::<Ipv6Addr>().map_err(|_| ProxyError::Malformed("v1 bad IPv6 address"))?)
                } else {
                    IpAddr::V4(s.parse::<Ipv4Addr>().map_err(|_| ProxyError::Malformed("v1 bad IPv4 address"))?)
                };
                Ok(ip)
            };
            let port = |s: &str| -> Result<u16, ProxyError> {
                // No sign, no leading zeros (the spec's grammar), at most 5 digits.
                if s.is_empty()
                    || s.len() > 5
                    || !s.bytes().all(|b| b.is_ascii_digit())
                    || (s.len() > 1 && s.starts_with('0'))
                {
                    return Err(ProxyError::Malformed("v1 bad port"));
                }
                s.parse().map_err(|_| ProxyError::Malformed("v1 bad port"))
            };
            Header {
                version: 1,
                source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
                destination: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
            }
        }
        _ => return Err(ProxyError::Malformed("v1 line has the wrong fields")),
    };
    Ok(Some((header, lf + 1)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version nibble is not 2"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > V2_MAX {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ProxyError::Malformed("v2 unknown command")),
    };
    let fam = buf[13];
    let addrs = match fam {
        // TCP over IPv4 / IPv6; anything else (UNSPEC, UDP, unix sockets) carries no client we can use.
        0x11 => {
            if body.len() < 12 {
                return Err(ProxyError::Malformed("v2 IPv4 block too short"));
            }
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(body[o], body[o + 1], body[o + 2], body[o + 3]));
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10))))
        }
        0x21 => {
            if body.len() < 36 {
                return Err(ProxyError::Malformed("v2 IPv6 block too short"));
            }
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Some((SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34))))
        }
        _ if local => None,
        0x00 => None,
        _ => return Err(ProxyError::Malformed("v2 address family is not TCP")),
    };
    let (source, destination) = match (local, addrs) {
        (false, Some((s, d))) => (Some(s), Some(d)),
        _ => (None, None),
    };
    Ok(Some((Header { version: 2, source, destination }, 16 + len)))
}

/// Why [`read_header`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("connection failed before the PROXY protocol header ended")]
    Io(#[source] std::io::Error),
}

/// Reads exactly one header from `io` within `timeout`: never a byte more, so what follows (a TLS
/// ClientHello, SMTP) stays in the stream.
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
    accept: Accept,
    timeout: Duration,
) -> Result<Header, ReadError> {
    match tokio::time::timeout(timeout, read_exactly_one(io, accept)).await {
        Ok(r) => r,
        Err(_) => Err(ReadError::Timeout(timeout)),
    }
}

async fn read_exactly_one<R: AsyncRead + Unpin>(io: &mut R, accept: Accept) -> Result<Header, ReadError> {
    // Both versions are at least this long ("PROXY UNKNOWN\r\n" is 15), so this read never overshoots.
    let mut buf = vec![0u8; 12];
    io.read_exact(&mut buf).await.map_err(ReadError::Io)?;
    loop {
        if let Some((h, _)) = parse(&buf, accept)? {
            return Ok(h);
        }
        // How much more is certainly part of the header: v2 knows its length after 16 bytes; v1 is read
        // one byte at a time up to its LF (at most 95 more).
        let want = if buf.starts_with(&V2_SIGNATURE) {
            if buf.len() < 16 {
                16 - buf.len()
            } else {
                16 + usize::from(u16::from_be_bytes([buf[14], buf[15]])) - buf.len()
            }
        } else {
            1
        };
        let start = buf.len();
        buf.resize(start + want, 0);
        io.read_exact(&mut buf[start..]).await.map_err(ReadError::Io)?;
    }
}

#[cfg(test)]
mod tests;
