//! Hot keys: the (partition, key) pairs this node is asked for most, recently.
//!
//! ```text
//! service::kv (every keyed request) ─► HotKeys::record ─► shard = hash % SHARDS
//!                                                          └─► Mutex<SpaceSaving>
//! Stats / metrics scrape ─► HotKeys::top ─► decay every shard to now, merge, sort
//! ```
//!
//! Each shard is a *space-saving* sketch (Metwally, Agrawal, El Abbadi, 2005) of
//! [`TRACKED`] counters: a request for a tracked key adds one to its counter; an
//! untracked key takes over the smallest counter `c_min`, starting at `c_min + 1` with
//! error `c_min`. So a counter overstates its key's count by at most its `error`, which
//! is at most `N / TRACKED` for `N` requests seen by the shard, and every key requested
//! more than that is tracked.
//!
//! Counts decay: every [`HALF_LIFE_MS`] all counts and errors are halved (lazily, when a
//! shard is next touched). A request `a` ms old counts `2^-k` where `k` is the number
//! of halvings since, so the counts are weighted over an *effective window* of
//! `HALF_LIFE + e` (one whole period per halving, `1 + 1/2 + 1/4 + ...`, plus the `e`
//! ms since the last halving): 10 to 20 s with halving every 10 s, 20 s just before a
//! halving. `per_second = count / effective window`, which for a steady rate is exact
//! whatever the phase.
//!
//! The code is synchronous and takes the time as an argument (`*_at`), so tests are
//! deterministic; [`HotKeys::record`] reads a monotonic clock.
//!
//! Cost on the request path: one xxh3 of the key, one uncontended mutex out of
//! [`SHARDS`] (chosen by that hash, so even one hot partition spreads), a scan of
//! [`TRACKED`] hashes, and for an untracked key a scan for the minimum count and a copy
//! of the key into the buffer of the counter it takes over (a request's key is a slice
//! of its HTTP/2 frame: it must not be pinned, and reusing buffers keeps a long tail of
//! keys free of allocations).

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Counters per shard.
pub const TRACKED: usize = 128;
/// Keys reported by [`HotKeys::top`] for `Stats`.
pub const REPORTED: usize = 16;
/// Counts halve this often.
pub const HALF_LIFE_MS: u64 = 10_000;
/// Independent sketches, each behind its own mutex.
pub const SHARDS: usize = 8;

/// One frequently requested key, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct HotKey {
    /// The key's partition.
    pub partition: u32,
    /// The key.
    pub key: Bytes,
    /// Decayed count over the effective window (see the module docs).
    pub per_second: f64,
    /// Decayed count (may overstate by at most `error`).
    pub count: u64,
    /// The most `count` can overstate.
    pub error: u64,
}

/// The key of a counter. A `Vec` rather than `Bytes`: when the counter is taken over by
/// another key its buffer is reused, so a long tail of keys costs no allocation.
#[derive(Debug, Clone)]
struct Slot {
    partition: u32,
    key: Vec<u8>,
    error: u64,
}

/// One space-saving sketch with decay by halving.
///
/// Struct of arrays: the hashes (searched on every request) and the counts (searched
/// for the minimum when an untracked key arrives) are dense arrays of their own.
#[derive(Debug, Clone)]
pub struct SpaceSaving {
    capacity: usize,
    /// Hash of each counter's (partition, key).
    hashes: Vec<u64>,
    /// Each counter's count.
    counts: Vec<u64>,
    /// Each counter's key and error.
    slots: Vec<Slot>,
    /// When the current halving period began.
    period_start_ms: u64,
}

impl SpaceSaving {
    /// An empty sketch of `capacity` counters whose first period starts at `now_ms`.
    pub fn new(capacity: usize, now_ms: u64) -> Self {
        let capacity = capacity.max(1);
        SpaceSaving {
            capacity,
            hashes: Vec::with_capacity(capacity),
            counts: Vec::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            period_start_ms: now_ms,
        }
    }

    /// Counts one request for `key` of `partition` (`hash` = [`key_hash`]) at `now_ms`.
    pub fn record(&mut self, partition: u32, key: &[u8], hash: u64, now_ms: u64) {
        self.decay_to(now_ms);
        let found = self
            .hashes
            .iter()
            .zip(&self.slots)
            .position(|(h, s)| *h == hash && s.partition == partition && s.key == key);
        if let Some(i) = found {
            self.counts[i] += 1;
            return;
        }
        if self.slots.len() < self.capacity {
            self.hashes.push(hash);
            self.counts.push(1);
            self.slots.push(Slot {
                partition,
                key: key.to_vec(),
                error: 0,
            });
            return;
        }
        // Two passes over a dense array: the minimum, then where it is.
        let Some(&min) = self.counts.iter().min() else {
            return;
        };
        let Some(i) = self.counts.iter().position(|c| *c == min) else {
            return;
        };
        self.hashes[i] = hash;
        self.counts[i] = min + 1;
        let slot = &mut self.slots[i];
        slot.partition = partition;
        slot.error = min;
        slot.key.clear();
        slot.key.extend_from_slice(key);
        // A key far shorter than the buffer it inherited gives the excess back.
        if slot.key.capacity() > 4 * slot.key.len().max(64) {
            slot.key.shrink_to_fit();
        }
    }

    /// Applies the halvings due by `now_ms`; counters that reach 0 are freed.
    pub fn decay_to(&mut self, now_ms: u64) {
        let periods = now_ms.saturating_sub(self.period_start_ms) / HALF_LIFE_MS;
        if periods == 0 {
            return;
        }
        self.period_start_ms += periods * HALF_LIFE_MS;
        let shift = u32::try_from(periods.min(63)).unwrap_or(63);
        for c in &mut self.counts {
            *c >>= shift;
        }
        for s in &mut self.slots {
            s.error >>= shift;
        }
        let mut i = 0;
        while i < self.counts.len() {
            if self.counts[i] == 0 {
                self.counts.swap_remove(i);
                self.hashes.swap_remove(i);
                self.slots.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// The effective window at `now_ms`, in seconds (see the module docs).
    fn window_secs(&self, now_ms: u64) -> f64 {
        let into_period = now_ms.saturating_sub(self.period_start_ms);
        (HALF_LIFE_MS + into_period) as f64 / 1000.0
    }

    /// Every tracked key, decayed to `now_ms`, in no particular order.
    pub fn snapshot(&mut self, now_ms: u64) -> Vec<HotKey> {
        self.decay_to(now_ms);
        let window = self.window_secs(now_ms);
        self.slots
            .iter()
            .zip(&self.counts)
            .map(|(s, &count)| HotKey {
                partition: s.partition,
                key: Bytes::copy_from_slice(&s.key),
                per_second: count as f64 / window,
                count,
                error: s.error,
            })
            .collect()
    }
}

/// The prefix of raftcache's internal keys (the CDC worker's lease and slot marker,
/// `__raftcache:cdc:lease:<slot>`, `__raftcache:cdc:slot:<slot>`). They live in the
/// partitions like any key and gRPC reaches them (the worker uses it), but they are no
/// part of the user's keyspace: never reported as hot keys, not counted by RESP
/// `DBSIZE`/`INFO keyspace`, kept by `FLUSHALL`, refused to RESP commands.
pub const INTERNAL_PREFIX: &[u8] = b"__raftcache:";

/// Whether `key` is an internal key ([`INTERNAL_PREFIX`]).
pub fn is_internal(key: &[u8]) -> bool {
    key.starts_with(INTERNAL_PREFIX)
}

/// The hash [`SpaceSaving`] and [`HotKeys`] use for `(partition, key)`.
pub fn key_hash(partition: u32, key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, u64::from(partition))
}

/// The node's hot-key tracker: [`SHARDS`] sketches of [`TRACKED`] counters each, a key
/// always in the same shard (by hash), merged when read.
#[derive(Debug)]
pub struct HotKeys {
    shards: Vec<Mutex<SpaceSaving>>,
    origin: Instant,
}

impl Default for HotKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl HotKeys {
    /// An empty tracker; its clock starts now.
    pub fn new() -> Self {
        HotKeys {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(SpaceSaving::new(TRACKED, 0)))
                .collect(),
            origin: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, SpaceSaving> {
        // SHARDS is a small constant, so the remainder fits any usize.
        let i = usize::try_from(hash % SHARDS as u64).unwrap_or(0);
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one request for `key` of `partition`, now.
    pub fn record(&self, partition: u32, key: &[u8]) {
        self.record_at(partition, key, self.now_ms());
    }

    /// Counts one request at `now_ms` (ms since the tracker was created). Internal
    /// keys ([`is_internal`]) are not counted.
    pub fn record_at(&self, partition: u32, key: &[u8], now_ms: u64) {
        if is_internal(key) {
            return;
        }
        let hash = key_hash(partition, key);
        self.shard(hash).record(partition, key, hash, now_ms);
    }

    /// The `n` hottest keys now, hottest first.
    pub fn top(&self, n: usize) -> Vec<HotKey> {
        self.top_at(n, self.now_ms())
    }

    /// The `n` hottest keys at `now_ms`, hottest first (ties: partition, then key).
    pub fn top_at(&self, n: usize, now_ms: u64) -> Vec<HotKey> {
        let mut all: Vec<HotKey> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .snapshot(now_ms)
            })
            .collect();
        all.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(a.partition.cmp(&b.partition))
                .then_with(|| a.key.cmp(&b.key))
        });
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn record(s: &mut SpaceSaving, p: u32, key: &[u8], now: u64) {
        s.record(p, key, key_hash(p, key), now);
    }

    #[test]
    fn internal_keys_are_never_hot() {
        let hot = HotKeys::new();
        for _ in 0..100 {
            hot.record_at(0, b"__raftcache:cdc:lease:slot", 1);
            hot.record_at(0, b"__raftcache:cdc:slot:slot", 1);
        }
        hot.record_at(0, b"user:1", 1);
        let top = hot.top_at(REPORTED, 1);
        assert_eq!(top.len(), 1, "{top:?}");
        assert_eq!(top[0].key, "user:1");
        assert!(
            is_internal(b"__raftcache:x")
                && !is_internal(b"__raftcache")
                && !is_internal(b"x__raftcache:")
        );
    }

    #[test]
    fn heavy_hitters_stand_out_of_noise() {
        let seed = 7;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let hot = HotKeys::new();
        let heavy: Vec<(u32, Vec<u8>)> = (0..5)
            .map(|i| (i % 3, format!("heavy-{i}").into_bytes()))
            .collect();
        let mut exact = std::collections::HashMap::new();
        // 60 000 requests within one period: 5 heavy keys at 3% each, the rest spread
        // over 50 000 keys in 16 partitions.
        for _ in 0..60_000 {
            let (p, key) = if rng.random_range(0..100) < 15 {
                heavy[rng.random_range(0..heavy.len())].clone()
            } else {
                let k = rng.random_range(0..50_000u32);
                (k % 16, format!("noise-{k}").into_bytes())
            };
            *exact.entry((p, key.clone())).or_insert(0u64) += 1;
            hot.record_at(p, &key, 5_000);
        }
        let top = hot.top_at(REPORTED, 5_000);
        assert_eq!(top.len(), REPORTED);
        let first: Vec<_> = top[..5]
            .iter()
            .map(|h| (h.partition, h.key.to_vec()))
            .collect();
        for h in &heavy {
            assert!(first.contains(h), "seed {seed}: {h:?} not among {first:?}");
        }
        for h in &top {
            let truth = exact[&(h.partition, h.key.to_vec())];
            assert!(
                h.count - h.error <= truth && truth <= h.count,
                "seed {seed}: {h:?} vs {truth}"
            );
        }
        // Steady state 5 s into the first period: the window is 15 s.
        assert!((top[0].per_second - top[0].count as f64 / 15.0).abs() < 1e-9);
    }

    #[test]
    fn error_bound_is_at_most_n_over_capacity() {
        let mut s = SpaceSaving::new(16, 0);
        let n = 10_000u64;
        for i in 0..n {
            // A skewed stream: key k with probability ~ 1/(k+1).
            let k = (i * 2_654_435_761) % 97;
            let k = k * k / 97;
            record(&mut s, 0, format!("k{k}").as_bytes(), 0);
        }
        let snap = s.snapshot(0);
        assert_eq!(snap.len(), 16);
        let total: u64 = snap.iter().map(|h| h.count).sum();
        assert_eq!(total, n, "space-saving counts sum to the stream length");
        for h in &snap {
            assert!(h.error <= n / 16, "{h:?}");
            assert!(h.count >= h.error);
        }
    }

    #[test]
    fn counts_halve_every_period_and_vanish() {
        let mut s = SpaceSaving::new(4, 0);
        for _ in 0..100 {
            record(&mut s, 1, b"a", 1_000);
        }
        let at = |s: &mut SpaceSaving, now| s.snapshot(now).first().map_or(0, |h| h.count);
        assert_eq!(at(&mut s, 9_999), 100);
        assert_eq!(at(&mut s, 10_000), 50);
        assert_eq!(at(&mut s, 35_000), 12); // two more halvings
        let snap = s.snapshot(35_000);
        // 5 s into the period: window 15 s.
        assert!((snap[0].per_second - 12.0 / 15.0).abs() < 1e-9);
        assert!(s.snapshot(200_000).is_empty(), "decayed to nothing, freed");
        // A key that went cold is overtaken by a warm one.
        record(&mut s, 0, b"new", 200_000);
        assert_eq!(s.snapshot(200_000)[0].key, Bytes::from_static(b"new"));
    }

    #[test]
    fn steady_rate_reads_the_same_at_any_phase() {
        let hot = HotKeys::new();
        // 100 requests per second for 60 s.
        for ms in (0..60_000u64).step_by(10) {
            hot.record_at(0, b"k", ms);
        }
        for now in [60_000, 64_000, 69_990] {
            let rate = hot.top_at(1, now)[0].per_second;
            // Requests after `now` are not counted yet, so compare with the window
            // ending at 60 s only when now == 60 s; later the rate only decays.
            if now == 60_000 {
                // Six halvings in: 1 - 2^-6 of the steady state.
                assert!((rate - 100.0).abs() < 2.0, "{rate}");
            } else {
                assert!(rate < 100.0, "{rate}");
            }
        }
    }

    /// The request-path cost: `cargo test --release -p raftcache-node --lib
    /// hot::tests::record_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing, not a check"]
    fn record_cost() {
        let hot = std::sync::Arc::new(HotKeys::new());
        let keys: Vec<Vec<u8>> = (0..100_000)
            .map(|i| format!("key:{i:08}").into_bytes())
            .collect();
        for threads in [1, 2, 4] {
            let n = 1_000_000 / threads;
            let started = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (hot, keys) = (&hot, &keys);
                    s.spawn(move || {
                        for i in 0..n {
                            // Zipf-ish: a few hot keys, a long tail.
                            let k = (i * 7919 + t * 13) % keys.len();
                            let k = if i % 4 == 0 { k % 10 } else { k };
                            hot.record(u32::try_from(k % 16).unwrap(), &keys[k]);
                        }
                    });
                }
            });
            let per = started.elapsed().as_nanos() as f64 / (n * threads) as f64;
            println!("{threads} thread(s): {per:.0} ns per record (wall / total records)");
        }
        let started = Instant::now();
        for i in 0..1_000_000usize {
            hot.record_at(0, &keys[i % 10], 1);
        }
        println!(
            "hot keys only, fixed time: {:.0} ns",
            started.elapsed().as_nanos() as f64 / 1e6
        );
        let started = Instant::now();
        for i in 0..1_000_000usize {
            hot.record_at(0, &keys[(i * 7919) % keys.len()], 1);
        }
        println!(
            "tail keys only, fixed time: {:.0} ns",
            started.elapsed().as_nanos() as f64 / 1e6
        );
        let started = Instant::now();
        let mut x = 0u64;
        for _ in 0..1_000_000usize {
            x = x.wrapping_add(hot.now_ms());
        }
        println!(
            "clock: {:.0} ns ({x})",
            started.elapsed().as_nanos() as f64 / 1e6
        );
    }

    #[test]
    fn the_same_key_in_two_partitions_is_two_entries() {
        let hot = HotKeys::new();
        for _ in 0..3 {
            hot.record_at(1, b"k", 0);
        }
        hot.record_at(2, b"k", 0);
        let top = hot.top_at(10, 0);
        let seen: Vec<_> = top.iter().map(|h| (h.partition, h.count)).collect();
        assert_eq!(seen, [(1, 3), (2, 1)]);
    }
}
