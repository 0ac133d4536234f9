//! The cost of routing a key: `Ring::partition_of` for plain and hash-tagged keys at
//! 16 and 256 partitions, and building a 256-partition ring (what a client pays when
//! a cluster map with a new shape arrives).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use raftcache_client::ring::{Ring, DEFAULT_VNODES};
use std::hint::black_box;

/// Keys cycled through so that the lookups do not all hit the same cache lines.
const KEYS: usize = 1024;

fn partition_of(c: &mut Criterion) {
    let short: Vec<String> = (0..KEYS).map(|i| format!("user:{i}")).collect();
    let tagged: Vec<String> = (0..KEYS)
        .map(|i| format!("{{user:{i}}}:profile:avatar"))
        .collect();
    let mut group = c.benchmark_group("partition_of");
    for partitions in [16, 256] {
        let ring = Ring::new(partitions, DEFAULT_VNODES);
        for (name, keys) in [("short", &short), ("hash_tagged", &tagged)] {
            group.bench_with_input(BenchmarkId::new(name, partitions), keys, |b, keys| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % keys.len();
                    ring.partition_of(black_box(&keys[i]))
                })
            });
        }
    }
    group.finish();
}

fn ring_new(c: &mut Criterion) {
    c.bench_function("ring_new/256", |b| {
        b.iter(|| Ring::new(black_box(256), black_box(DEFAULT_VNODES)))
    });
}

criterion_group!(benches, partition_of, ring_new);
criterion_main!(benches);
