//! Rule evaluation and list lookups. Evaluation: the shipped rules, plus 1,000 and 10,000 generated regex
//! rules, on a realistic ~12 KiB multipart message (MIME parse + every data-phase rule), reported as bytes
//! and messages per second. Lists: a 1M-entry CIDR list and a 1M-entry bloom domain list (lookups per
//! second; the bloom load time and a 10M-entry load are printed). Reload: compiling 10,000 rules.
//! Inputs are generated from fixed seeds, so runs compare.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moat::rules::eval::{Content, Facts};
use moat::rules::lists::{CidrSet, List};
use moat::rules::parse::ListKind;
use moat::rules::{Phase, RuleSet};

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs each bench once without it, unoptimized,
/// so the largest inputs (10M bloom entries, 10,000 rules) are left to real bench runs.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn xorshift(x: &mut u32) -> u32 {
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    *x
}

/// A multipart message: headers, ~10 KiB of text, an HTML part with links, a small attachment.
fn message() -> Vec<u8> {
    let mut x = 0x1234_5678;
    let words = ["the", "meeting", "report", "invoice", "quarterly", "please", "review", "attached", "numbers", "team"];
    let mut text = String::new();
    while text.len() < 10 * 1024 {
        let w = words[(xorshift(&mut x) % 10) as usize];
        text.push_str(w);
        text.push(if xorshift(&mut x).is_multiple_of(12) { '\n' } else { ' ' });
    }
    let text = text.replace('\n', "\r\n");
    format!(
        "From: \"Alice Example\" <alice@example.org>\r\nTo: bob@example.test\r\nSubject: Quarterly report\r\n\
         Date: Mon, 2 Nov 2026 10:00:00 +0000\r\nMessage-ID: <abc@example.org>\r\nX-Mailer: Thunderbird\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n--b1\r\nContent-Type: text/html\r\n\r\n\
         <p>See <a href=\"https://intranet.example.org/q3\">Q3</a> and https://www.example.com/x?y=1</p>\r\n\
         --b1\r\nContent-Type: application/pdf; name=\"q3.pdf\"\r\nContent-Disposition: attachment; filename=\"q3.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K\r\n--b1--\r\n"
    )
    .into_bytes()
}

fn shipped() -> Vec<(PathBuf, String)> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/00-defaults.toml");
    vec![(p.clone(), std::fs::read_to_string(&p).unwrap())]
}

/// `n` regex rules spread over body, subject and a header; none matches the bench message.
fn generated(n: usize) -> (PathBuf, String) {
    let mut s = String::new();
    for i in 0..n {
        let when = match i % 3 {
            0 => format!("{{ body = '(?i)buy-cheap-{i}-now' }}"),
            1 => format!("{{ subject = '^offer {i}:' }}"),
            _ => format!("{{ header = {{ name = \"X-Mailer\", regex = 'massmailer-{i}' }} }}"),
        };
        s.push_str(&format!("[[rule]]\nid = \"gen-{i}\"\nwhen = {when}\nscore = 1.0\n"));
    }
    (PathBuf::from("gen.toml"), s)
}

fn set_with(n: usize) -> RuleSet {
    let mut files = shipped();
    if n > 0 {
        files.push(generated(n));
    }
    RuleSet::from_texts(&files, Path::new("."), &["example.test".into()]).unwrap()
}

fn evaluate(c: &mut Criterion) {
    let msg = message();
    let mut g = c.benchmark_group("evaluate");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    let sizes: &[usize] = if full_run() { &[0, 1_000, 10_000] } else { &[0, 100] };
    for &n in sizes {
        let set = set_with(n);
        let rcpts = vec!["bob@example.test".to_string()];
        g.bench_with_input(BenchmarkId::new("shipped_plus", n), &set, |b, set| {
            b.iter(|| {
                let content = Content::parse(black_box(&msg));
                let facts = Facts {
                    ip: IpAddr::from([192, 0, 2, 1]),
                    client_name: Some("mail.example.org"),
                    listener: "smtp",
                    helo: Some("client.example"),
                    auth_user: None,
                    mail_from: Some("alice@example.org"),
                    rcpts: &rcpts,
                    size: msg.len() as u64,
                    content: Some(&content),
                    auth: None,
                };
                black_box(set.hits(Phase::Data, &facts))
            })
        });
    }
    g.finish();
}

fn cidr(c: &mut Criterion) {
    let mut x = 0xDEAD_BEEF;
    let ranges: Vec<(u128, u128)> = (0..1_000_000)
        .map(|_| {
            let ip = xorshift(&mut x);
            let len = 24 + xorshift(&mut x) % 9;
            moat::rules::lists::parse_cidr(&format!("{}/{len}", std::net::Ipv4Addr::from(ip))).unwrap()
        })
        .collect();
    let set = CidrSet::new(ranges);
    let probes: Vec<IpAddr> = (0..1024).map(|_| IpAddr::from(xorshift(&mut x).to_be_bytes())).collect();
    let mut g = c.benchmark_group("cidr_1m");
    g.throughput(Throughput::Elements(probes.len() as u64));
    g.bench_function("lookup", |b| b.iter(|| probes.iter().filter(|ip| set.contains(**ip)).count()));
    g.finish();
}

fn domain_list(n: usize) -> String {
    let mut s = String::with_capacity(n * 24);
    for i in 0..n {
        s.push_str(&format!("spam-{i:08}.example\n"));
    }
    s
}

fn bloom(c: &mut Criterion) {
    let sizes: &[usize] = if full_run() { &[1_000_000, 10_000_000] } else { &[1_000_000] };
    for &n in sizes {
        let text = domain_list(n);
        let start = Instant::now();
        let list = List::load(ListKind::Domain, &text, Some(0.0001)).unwrap();
        eprintln!("bloom: {n} entries loaded in {:.2?} (fp_rate 0.0001)", start.elapsed());
        // The reference: the `bloomfilter` crate's classic layout (k bits anywhere in the array), with the same
        // entries and rate; docs/rules.md explains why moat's lists use a cache-blocked filter instead.
        let start = Instant::now();
        let mut classic = bloomfilter::Bloom::new_for_fp_rate(n, 0.0001).expect("valid bloom parameters");
        for line in text.lines() {
            classic.set(line);
        }
        eprintln!("bloom: {n} entries into the bloomfilter crate in {:.2?} (reference)", start.elapsed());
        if n == 1_000_000 {
            let probes: Vec<String> = (0..1024).map(|i| format!("www.host-{i}.spam-{:08}.example", i * 977)).collect();
            let mut g = c.benchmark_group("bloom_1m");
            g.throughput(Throughput::Elements(probes.len() as u64));
            g.bench_function("lookup", |b| b.iter(|| probes.iter().filter(|p| list.contains(p)).count()));
            g.finish();
        }
    }
}

fn reload(c: &mut Criterion) {
    let files = {
        let mut f = shipped();
        f.push(generated(if full_run() { 10_000 } else { 100 }));
        f
    };
    let mut g = c.benchmark_group("reload");
    g.sample_size(10);
    g.bench_function("compile_10000_rules", |b| {
        b.iter(|| RuleSet::from_texts(black_box(&files), Path::new("."), &[]).unwrap())
    });
    g.finish();
}

criterion_group!(benches, evaluate, cidr, bloom, reload);
criterion_main!(benches);
