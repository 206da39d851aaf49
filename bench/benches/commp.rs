//! CommP throughput against its bound: the piece tree costs two SHA-256 compressions per
//! 32-byte node (≈ 4× the payload's bytes), so plain SHA-256 over the same payload, in the same
//! run, is the bound no CommP can beat on one core.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use shale_provisioner::piece::PieceHasher;

/// 64 MiB: many chunks, and large enough that setup is noise.
const PAYLOAD: usize = 64 << 20;
/// What a file read hands over at a time.
const READ: usize = 1 << 20;

fn commp(c: &mut Criterion) {
    let mut payload = vec![0u8; PAYLOAD];
    rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut payload);
    let mut group = c.benchmark_group("commp");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(PAYLOAD as u64));
    group.bench_function(BenchmarkId::new("sha256_bound", "64MiB"), |b| {
        b.iter(|| {
            let mut h = Sha256::new();
            for part in payload.chunks(READ) {
                h.update(part);
            }
            black_box(h.finalize())
        })
    });
    group.bench_function(BenchmarkId::new("commp", "64MiB"), |b| {
        b.iter(|| {
            let mut h = PieceHasher::new();
            for part in payload.chunks(READ) {
                h.update(part);
            }
            black_box(h.finish().unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, commp);
criterion_main!(benches);
