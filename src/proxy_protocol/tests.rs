use super::*;
use proptest::prelude::*;

fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut b = V2_SIGNATURE.to_vec();
    b.push(0x20 | cmd);
    b.push(fam);
    b.extend_from_slice(&(body.len() as u16).to_be_bytes());
    b.extend_from_slice(body);
    b
}

fn v2_tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, tlvs: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&src);
    body.extend_from_slice(&dst);
    body.extend_from_slice(&sport.to_be_bytes());
    body.extend_from_slice(&dport.to_be_bytes());
    body.extend_from_slice(tlvs);
    v2(1, 0x11, &body)
}

fn addr(s: &str) -> Option<SocketAddr> {
    Some(s.parse().unwrap())
}

#[test]
fn v1_table() {
    let ok = |s: &str, src: &str, dst: &str| {
        let (h, n) = parse(s.as_bytes(), Accept::Any).unwrap().unwrap();
        assert_eq!((h.source, h.destination, h.version, n), (addr(src), addr(dst), 1, s.len()), "{s:?}");
    };
    ok("PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n", "192.0.2.7:56324", "198.51.100.1:25");
    ok("PROXY TCP6 2001:db8::7 2001:db8::1 65535 587\r\n", "[2001:db8::7]:65535", "[2001:db8::1]:587");
    let (h, _) = parse(b"PROXY UNKNOWN\r\n", Accept::V1).unwrap().unwrap();
    assert_eq!(h.source, None);
    let (h, n) = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nEHLO", Accept::Any).unwrap().unwrap();
    assert_eq!((h.source, n), (None, 35), "what follows the header is not consumed");

    for (bad, want) in [
        (&b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\n"[..], "CRLF"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n", "fields"),
        (b"PROXY TCP4 2001:db8::1 198.51.100.1 1 25\r\n", "IPv4"),
        (b"PROXY TCP6 192.0.2.7 2001:db8::1 1 25\r\n", "IPv6"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n", "port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n", "port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 025 25\r\n", "port"),
        (b"PROXY TCP4  192.0.2.7 198.51.100.1 1 25\r\n", "fields"),
        (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 25\r\n", "fields"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 25\xff\r\n", "ASCII"),
    ] {
        let e = parse(bad, Accept::Any).unwrap_err();
        assert!(e.to_string().contains(want), "{:?}: {e}", String::from_utf8_lossy(bad));
    }
    assert_eq!(parse(&[b'x'; 3], Accept::Any), Err(ProxyError::Missing));
    assert_eq!(parse(b"EHLO x\r\n", Accept::Any), Err(ProxyError::Missing));
    assert_eq!(parse(b"PROX", Accept::Any), Ok(None));
    assert_eq!(parse(b"PROXY TCP4 1.2.3.4", Accept::Any), Ok(None));
    let long = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
    assert_eq!(parse(long.as_bytes(), Accept::Any), Err(ProxyError::TooLong));
    assert_eq!(parse(b"PROXY UNKNOWN\r\n", Accept::V2), Err(ProxyError::Version(1)));
}

#[test]
fn v2_table() {
    let h = v2_tcp4([192, 0, 2, 7], 56324, [198, 51, 100, 1], 25, &[]);
    let (got, n) = parse(&h, Accept::V2).unwrap().unwrap();
    assert_eq!((got.source, got.destination, n), (addr("192.0.2.7:56324"), addr("198.51.100.1:25"), 28));
    // TLVs (HAProxy adds some) are skipped; bytes after the header stay.
    let mut h = v2_tcp4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2, &[0x04, 0x00, 0x01, 0x00]);
    let len = h.len();
    h.extend_from_slice(b"\x16\x03\x01");
    assert_eq!(parse(&h, Accept::Any).unwrap().unwrap().1, len);
    let mut body6 = vec![0u8; 36];
    body6[15] = 7;
    body6[31] = 1;
    body6[32..34].copy_from_slice(&4000u16.to_be_bytes());
    body6[34..36].copy_from_slice(&25u16.to_be_bytes());
    let (got, _) = parse(&v2(1, 0x21, &body6), Accept::Any).unwrap().unwrap();
    assert_eq!(got.source, addr("[::7]:4000"));
    // LOCAL (a health check): no client.
    let (got, _) = parse(&v2(0, 0x00, &[]), Accept::Any).unwrap().unwrap();
    assert_eq!(got.source, None);
    let (got, _) = parse(&v2(0, 0x11, &[0; 12]), Accept::Any).unwrap().unwrap();
    assert_eq!(got.source, None, "LOCAL ignores its addresses");

    assert_eq!(
        parse(&v2(1, 0x11, &[0; 11]), Accept::Any).unwrap_err(),
        ProxyError::Malformed("v2 IPv4 block too short")
    );
    assert!(matches!(parse(&v2(1, 0x21, &[0; 12]), Accept::Any), Err(ProxyError::Malformed(_))));
    assert!(matches!(parse(&v2(2, 0x11, &[0; 12]), Accept::Any), Err(ProxyError::Malformed(_))));
    assert!(matches!(parse(&v2(1, 0x12, &[0; 12]), Accept::Any), Err(ProxyError::Malformed(_))), "UDP");
    assert!(matches!(parse(&v2(1, 0x31, &[0; 216]), Accept::Any), Err(ProxyError::Malformed(_))), "unix");
    let mut bad_ver = v2_tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2, &[]);
    bad_ver[12] = 0x11;
    assert!(matches!(parse(&bad_ver, Accept::Any), Err(ProxyError::Malformed(_))));
    assert_eq!(parse(&v2(1, 0x11, &vec![0; 2000]), Accept::Any), Err(ProxyError::TooLong));
    assert_eq!(parse(&V2_SIGNATURE[..7], Accept::Any), Ok(None));
    assert_eq!(parse(&h[..20], Accept::Any), Ok(None));
    assert_eq!(parse(&h, Accept::V1), Err(ProxyError::Version(2)));
}

#[tokio::test]
async fn reads_exactly_the_header() {
    for header in [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n".to_vec(),
        v2_tcp4([192, 0, 2, 7], 56324, [198, 51, 100, 1], 25, &[1, 0, 2, b'h', b'2']),
    ] {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let mut sent = header.clone();
        sent.extend_from_slice(b"EHLO client\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut a, &sent).await.unwrap();
        let h = read_header(&mut b, Accept::Any, Duration::from_secs(5)).await.unwrap();
        assert_eq!(h.source, addr("192.0.2.7:56324"));
        let mut rest = [0u8; 13];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"EHLO client\r\n");
    }
}

#[tokio::test(start_paused = true)]
async fn a_partial_header_times_out_and_garbage_is_refused() {
    let (mut a, mut b) = tokio::io::duplex(4096);
    tokio::io::AsyncWriteExt::write_all(&mut a, b"PROXY TCP4 192.0.2.7").await.unwrap();
    let e = read_header(&mut b, Accept::Any, Duration::from_secs(3)).await.unwrap_err();
    assert!(matches!(e, ReadError::Timeout(_)), "{e}");
    let (mut a, mut b) = tokio::io::duplex(4096);
    tokio::io::AsyncWriteExt::write_all(&mut a, b"EHLO client.example\r\n").await.unwrap();
    let e = read_header(&mut b, Accept::Any, Duration::from_secs(3)).await.unwrap_err();
    assert!(matches!(e, ReadError::Proxy(ProxyError::Missing)), "{e}");
    let (mut a, mut b) = tokio::io::duplex(4096);
    tokio::io::AsyncWriteExt::write_all(&mut a, &[b'P'; 5]).await.unwrap();
    drop(a);
    let e = read_header(&mut b, Accept::Any, Duration::from_secs(3)).await.unwrap_err();
    assert!(matches!(e, ReadError::Io(_)), "{e}");
}

proptest! {
    #[test]
    fn parse_never_panics_and_stays_within_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        if let Ok(Some((_, n))) = parse(&bytes, Accept::Any) {
            prop_assert!(n <= bytes.len() && n <= V2_MAX);
        }
    }

    #[test]
    fn v2_round_trips(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sp in any::<u16>(), dp in any::<u16>(),
                      tlvs in proptest::collection::vec(any::<u8>(), 0..200)) {
        let h = v2_tcp4(src, sp, dst, dp, &tlvs);
        let (got, n) = parse(&h, Accept::Any).unwrap().unwrap();
        prop_assert_eq!(n, h.len());
        prop_assert_eq!(got.source, Some(SocketAddr::from((src, sp))));
        prop_assert_eq!(got.destination, Some(SocketAddr::from((dst, dp))));
        // Every prefix asks for more, never errs.
        for cut in 0..h.len() {
            prop_assert_eq!(parse(&h[..cut], Accept::Any), Ok(None));
        }
    }

    #[test]
    fn v1_round_trips(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sp in any::<u16>(), dp in any::<u16>()) {
        let s = format!("PROXY TCP4 {} {} {sp} {dp}\r\n", Ipv4Addr::from(src), Ipv4Addr::from(dst));
        let (got, n) = parse(s.as_bytes(), Accept::V1).unwrap().unwrap();
        prop_assert_eq!(n, s.len());
        prop_assert_eq!(got.source, Some(SocketAddr::from((src, sp))));
    }
}
