//! Password verification cost with the default argon2id parameters (the hash `moat user add` writes):
//! verifications per second on one core. moat runs them on the blocking pool behind
//! `auth.max_concurrent_verifications`, so this rate times that cap bounds AUTH throughput.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use moat::auth::store::{check_password, hash_password};

fn verify(c: &mut Criterion) {
    let phc = hash_password("correct horse battery staple").expect("hash");
    let mut g = c.benchmark_group("argon2id_default");
    g.sample_size(10);
    g.bench_function("verify_good", |b| {
        b.iter(|| assert!(check_password(black_box(&phc), "correct horse battery staple")))
    });
    g.bench_function("verify_bad", |b| b.iter(|| assert!(!check_password(black_box(&phc), "wrong"))));
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
