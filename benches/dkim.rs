//! DKIM verification cost per message: parse + verify of one signature (RSA-2048 and Ed25519) through
//! moat's verifier, the key answered from moat's DNS cache (so this is the CPU cost, no network), for a
//! 4 KiB and a 1 MiB message (the body hash dominates large ones). Also the signing cost (streaming).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::DkimSigner;
use mail_auth::{AuthenticatedMessage, DkimResult, Txt};
use moat::config::DnsConfig;
use moat::dns::Dns;
use rustls::pki_types::PrivateKeyDer;

fn message(body_bytes: usize) -> String {
    let line = format!("{}\r\n", "lorem ipsum dolor sit amet ".repeat(3));
    let body = line.repeat(body_bytes / line.len() + 1);
    format!(
        "From: Alice <alice@bench.example>\r\nTo: <bob@example.org>\r\nSubject: bench\r\n\
         Date: Fri, 4 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@bench.example>\r\n\r\n{body}"
    )
}

fn verify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let cfg = DnsConfig { servers: vec!["127.0.0.1:9".into()], ..Default::default() };
    let dns = rt.block_on(async { Dns::new(&cfg) }).expect("resolver");
    let until = Instant::now() + Duration::from_secs(86400);

    let rsa = mail_auth::dkim::generate::DkimKeyPair::generate_rsa(2048).expect("rsa");
    let ed = mail_auth::dkim::generate::DkimKeyPair::generate_ed25519().expect("ed25519");
    let rsa_rec = format!("v=DKIM1; k=rsa; p={}", rsa.encoded_public_key());
    let ed_rec = format!("v=DKIM1; k=ed25519; p={}", ed.encoded_public_key());
    for (sel, rec) in [("rsa", &rsa_rec), ("ed", &ed_rec)] {
        let key = DomainKey::parse(rec.as_bytes()).expect("record");
        let name: Box<str> = format!("{sel}._domainkey.bench.example.").into();
        dns.caches().txt.insert_at(name, Txt::DomainKey(Arc::new(key)), until, Instant::now());
    }
    let rsa_key =
        || RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(rsa.private_key().to_vec().into())).expect("rsa key");
    let ed_key = || Ed25519Key::from_pkcs8_der(ed.private_key()).expect("ed key");
    let headers = ["From", "To", "Subject", "Date", "Message-ID", "From"];

    for (label, size) in [("4KiB", 4 * 1024), ("1MiB", 1024 * 1024)] {
        let msg = message(size);
        let signed_rsa = {
            let s = DkimSigner::from_key(rsa_key()).domain("bench.example").selector("rsa").headers(headers);
            format!("{}{msg}", s.sign(msg.as_bytes()).expect("sign").to_header())
        };
        let signed_ed = {
            let s = DkimSigner::from_key(ed_key()).domain("bench.example").selector("ed").headers(headers);
            format!("{}{msg}", s.sign(msg.as_bytes()).expect("sign").to_header())
        };
        let mut g = c.benchmark_group(format!("dkim_verify_{label}"));
        g.throughput(Throughput::Elements(1));
        g.sample_size(20);
        for (alg, signed) in [("rsa2048", &signed_rsa), ("ed25519", &signed_ed)] {
            g.bench_function(alg, |b| {
                b.iter(|| {
                    let am = AuthenticatedMessage::parse(black_box(signed.as_bytes())).expect("parse");
                    let out = rt.block_on(dns.authenticator().verify_dkim(dns.params(&am)));
                    assert_eq!(out.first().map(|o| o.result()), Some(&DkimResult::Pass));
                })
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("dkim_sign_{label}"));
        g.throughput(Throughput::Elements(1));
        g.sample_size(20);
        let rsa_signer = DkimSigner::from_key(rsa_key()).domain("bench.example").selector("rsa").headers(headers);
        g.bench_function("rsa2048_streaming", |b| {
            b.iter(|| {
                let mut s = rsa_signer.sign_streaming();
                for chunk in msg.as_bytes().chunks(256 * 1024) {
                    s.write(chunk);
                }
                black_box(s.finish().expect("sign"))
            })
        });
        g.finish();
    }
}

criterion_group!(benches, verify);
criterion_main!(benches);
