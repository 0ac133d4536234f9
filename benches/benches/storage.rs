//! Criterion micro-benchmarks of the storage engine: get / set / incr on an engine
//! pre-filled with 1M keys (16 partitions, 100-byte values), and set under `allkeys-lru`
//! / `allkeys-lfu` at a limit that forces an eviction on every write.
//!
//! Run: `cargo bench -p raftcache-benches --bench storage`.

use std::hint::black_box;
use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use raftcache_node::storage::{
    Condition, Engine, EvictionPolicy, PartitionId, StorageConfig, SystemClock, WriteRequest,
    ENTRY_OVERHEAD,
};

const KEYS: u64 = 1_000_000;
const PARTITIONS: u32 = 16;
const VALUE_LEN: usize = 100;

/// A tiny deterministic PRNG (xorshift64*), so the bench needs no extra dependency.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("key:{i:010}"))
}

fn partition(i: u64) -> PartitionId {
    PartitionId((i % u64::from(PARTITIONS)) as u32)
}

fn set(key: Bytes, value: Bytes) -> WriteRequest {
    WriteRequest::Set {
        key,
        value,
        ttl_ms: None,
        keep_ttl: false,
        condition: Condition::Always,
        source_lsn: 0,
        source_snapshot: None,
    }
}

fn filled(policy: EvictionPolicy, max_memory: u64, keys: u64) -> Engine {
    let config = StorageConfig {
        partitions: PARTITIONS,
        max_memory,
        policy,
        ..StorageConfig::default()
    };
    let engine = Engine::new(config, Arc::new(SystemClock));
    let value = Bytes::from(vec![b'v'; VALUE_LEN]);
    for i in 0..keys {
        if let Err(err) = engine.write(partition(i), set(key(i), value.clone())) {
            panic!("pre-fill failed at key {i}: {err}");
        }
    }
    engine
}

/// Writes `key:{i:010}` into `buf` (a request's key, hot in cache, as after decoding).
fn key_into(buf: &mut Vec<u8>, i: u64) -> &[u8] {
    buf.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(buf, "key:{i:010}");
    buf
}

fn bench_basic(c: &mut Criterion) {
    let engine = filled(EvictionPolicy::NoEviction, 0, KEYS);
    let value = Bytes::from(vec![b'w'; VALUE_LEN]);
    let mut group = c.benchmark_group("storage_1m");
    group.throughput(Throughput::Elements(1));
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut buf = Vec::with_capacity(32);

    group.bench_function("get_hit", |b| {
        b.iter(|| {
            let i = rng.next() % KEYS;
            black_box(engine.get(partition(i), key_into(&mut buf, i)))
        })
    });
    group.bench_function("get_hit_hot_1k", |b| {
        b.iter(|| {
            let i = rng.next() % 1_000;
            black_box(engine.get(partition(i), key_into(&mut buf, i)))
        })
    });
    group.bench_function("get_miss", |b| {
        b.iter(|| {
            let i = KEYS + rng.next() % KEYS;
            black_box(engine.get(partition(i), key_into(&mut buf, i)))
        })
    });
    group.bench_function("set_overwrite", |b| {
        b.iter(|| {
            let i = rng.next() % KEYS;
            let key = Bytes::copy_from_slice(key_into(&mut buf, i));
            black_box(engine.write(partition(i), set(key, value.clone())))
        })
    });
    group.bench_function("incr", |b| {
        b.iter(|| {
            let i = rng.next() % 10_000;
            buf.clear();
            let _ = write!(buf, "counter:{i}");
            let key = Bytes::copy_from_slice(&buf);
            black_box(engine.write(partition(i), WriteRequest::Incr { key, delta: 1 }))
        })
    });
    group.finish();
}

fn bench_evicting(c: &mut Criterion) {
    // Room for ~200k entries: every new key has to evict one.
    let per_entry = 14 + VALUE_LEN as u64 + ENTRY_OVERHEAD;
    let limit = 200_000 * per_entry;
    let mut group = c.benchmark_group("storage_evicting");
    group.throughput(Throughput::Elements(1));
    for policy in [EvictionPolicy::AllKeysLru, EvictionPolicy::AllKeysLfu] {
        let engine = filled(policy, limit, 200_000);
        let value = Bytes::from(vec![b'n'; VALUE_LEN]);
        let mut next = 1_000_000_000u64;
        group.bench_function(format!("set_new_key_{policy}"), |b| {
            b.iter(|| {
                next += 1;
                black_box(engine.write(partition(next), set(key(next), value.clone())))
            })
        });
        let stats = engine.stats();
        assert!(stats.memory_used <= limit);
        eprintln!("{policy}: {} writes, {stats:?}", next - 1_000_000_000);
    }
    group.finish();
}

criterion_group!(benches, bench_basic, bench_evicting);
criterion_main!(benches);
