//! Throughput of the pure protocol core: DATA decoding (end detection, unstuffing, line-ending policy),
//! dot-stuffing for the relay, and command parsing. Inputs are fixed and generated from a seed, so runs
//! compare. Reported as bytes per second (MiB/s) and commands per second.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moat::config::BareLineEndings;
use moat::smtp::codec::{stuff, DataDecoder, Framing, LineReader};
use moat::smtp::command::parse;

/// A message of about `size` bytes: mail-like lines of 20..=78 characters, some starting with a dot.
fn message(size: usize) -> Vec<u8> {
    let mut x: u32 = 0x2545_F491; // xorshift seed: fixed input between runs
    let mut out = Vec::with_capacity(size + 100);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let len = 20 + (x % 59) as usize;
        if x.is_multiple_of(50) {
            out.push(b'.');
        }
        out.extend((0..len).map(|i| b'a' + ((x as usize + i) % 26) as u8));
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn wire(msg: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(msg.len() + 1024);
    let mut start = true;
    stuff(msg, &mut start, &mut w);
    w.extend_from_slice(b".\r\n");
    w
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_decode");
    for size in [10 << 10, 1 << 20] {
        let w = wire(&message(size));
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_with_input(BenchmarkId::new("dot_16k_reads", size), &w, |b, w| {
            let mut out = Vec::with_capacity(w.len());
            b.iter(|| {
                out.clear();
                let mut d = DataDecoder::new(Framing::Dot, BareLineEndings::Reject, 1000);
                let mut done = false;
                for chunk in w.chunks(16 * 1024) {
                    done = d.decode(black_box(chunk), &mut out).1;
                }
                assert!(done);
            })
        });
        // naive baseline: a byte-at-a-time copy with the same end check, to show what the fast path buys
        g.bench_with_input(BenchmarkId::new("naive_bytewise_baseline", size), &w, |b, w| {
            let mut out = Vec::with_capacity(w.len());
            b.iter(|| {
                out.clear();
                let mut last = [0u8; 4];
                for &byte in black_box(w.as_slice()) {
                    out.push(byte);
                    last = [last[1], last[2], last[3], byte];
                    if &last[1..] == b".\r\n" && last[0] == b'\n' {
                        break;
                    }
                }
            })
        });
    }
    g.finish();
}

fn stuffing(c: &mut Criterion) {
    let msg = message(1 << 20);
    let mut g = c.benchmark_group("dot_stuff");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    g.bench_function("1MiB", |b| {
        let mut out = Vec::with_capacity(msg.len() + 1024);
        b.iter(|| {
            out.clear();
            let mut start = true;
            stuff(black_box(&msg), &mut start, &mut out);
        })
    });
    g.finish();
}

fn commands(c: &mut Criterion) {
    let lines: Vec<&[u8]> = vec![
        b"EHLO client.example.org",
        b"MAIL FROM:<alice@example.org> SIZE=10240 BODY=8BITMIME",
        b"RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE",
        b"RCPT TO:<carol@example.test>",
        b"DATA",
        b"RSET",
        b"QUIT",
    ];
    let bytes: usize = lines.iter().map(|l| l.len() + 2).sum();
    let mut g = c.benchmark_group("command_parse");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("envelope", |b| {
        b.iter(|| {
            for l in &lines {
                let _ = black_box(parse(black_box(l)));
            }
        })
    });
    let mut buf = Vec::new();
    for l in &lines {
        buf.extend_from_slice(l);
        buf.extend_from_slice(b"\r\n");
    }
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("frame_and_parse", |b| {
        b.iter(|| {
            let mut r = LineReader::new(512);
            let mut rest = &buf[..];
            while let (n, Some(moat::smtp::codec::Framed::Line(len))) = r.frame(rest) {
                let _ = black_box(parse(&rest[..len]));
                rest = &rest[n..];
            }
        })
    });
    g.finish();
}

criterion_group!(benches, decode, stuffing, commands);
criterion_main!(benches);
