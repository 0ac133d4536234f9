//! Approximate LRU/LFU eviction in the style of Redis: node-local access metadata, random
//! sampling and a small pool of the best candidates seen so far.
//!
//! Nothing here is replicated. The proposer picks victims with it and then applies
//! [`Command::Evict`](super::Command::Evict), which every replica replays identically.

use bytes::Bytes;

use super::{EvictionPolicy, PartitionId};

/// LFU counter given to new keys, so they are not evicted before they get a chance to be
/// read (Redis `LFU_INIT_VAL`).
pub(crate) const LFU_INIT: u8 = 5;
/// How quickly the LFU counter saturates (Redis `lfu-log-factor`): with 10, about a
/// million hits reach 255.
const LFU_LOG_FACTOR: u32 = 10;
/// The LFU counter loses one point per this much idle time (Redis `lfu-decay-time` 1 min).
const LFU_DECAY_MS: u64 = 60_000;
/// Candidates kept between eviction rounds (Redis `EVPOOL_SIZE`).
pub(crate) const POOL_SIZE: usize = 16;

/// Node-local access metadata of one entry: the LRU clock and the LFU counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    /// Wall-clock ms of the last access (also the LFU decay reference).
    last_ms: u64,
    /// Logarithmic access frequency, 0..=255.
    lfu: u8,
}

impl Access {
    /// Metadata of an entry created at `now_ms`.
    pub(crate) fn new(now_ms: u64) -> Self {
        Self {
            last_ms: now_ms,
            lfu: LFU_INIT,
        }
    }

    /// The LFU counter after decaying for the time idle until `now_ms`.
    pub(crate) fn lfu(&self, now_ms: u64) -> u8 {
        let periods = now_ms.saturating_sub(self.last_ms) / LFU_DECAY_MS;
        let periods = u8::try_from(periods).unwrap_or(u8::MAX);
        self.lfu.saturating_sub(periods)
    }

    /// Records a read at `now_ms`; `random` is a uniformly random `u32` used for the
    /// logarithmic increment.
    pub(crate) fn on_read(&mut self, now_ms: u64, random: u32) {
        let counter = self.lfu(now_ms);
        self.lfu = log_incr(counter, random);
        self.last_ms = now_ms;
    }

    /// Records a write at `now_ms` (deterministic: decays the counter, no increment).
    pub(crate) fn on_write(&mut self, now_ms: u64) {
        self.lfu = self.lfu(now_ms);
        self.last_ms = now_ms;
    }

    /// How good a victim this entry is under `policy` at `now_ms`; higher is better.
    /// Expired entries beat everything. Scores rank by last-access time rather than idle
    /// time, so scores computed at different moments (kept in the pool) stay comparable;
    /// only LFU decay depends on `now_ms`.
    pub(crate) fn score(&self, expired: bool, policy: EvictionPolicy, now_ms: u64) -> u64 {
        const TIME_BITS: u32 = 48; // ms since epoch fit until the year 10889
        const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
        if expired {
            return u64::MAX;
        }
        // Older access = larger.
        let age = TIME_MASK - self.last_ms.min(TIME_MASK);
        match policy {
            // NoEviction never samples; score it like LRU for completeness.
            EvictionPolicy::AllKeysLru | EvictionPolicy::NoEviction => age,
            // Least frequent first, then least recent.
            EvictionPolicy::AllKeysLfu => {
                let rarity = u64::from(u8::MAX - self.lfu(now_ms));
                (rarity << TIME_BITS) | age
            }
        }
    }
}

/// Redis `LFULogIncr`: increments with probability 1 / ((counter - LFU_INIT) * factor + 1).
fn log_incr(counter: u8, random: u32) -> u8 {
    if counter == u8::MAX {
        return counter;
    }
    let base = u32::from(counter.saturating_sub(LFU_INIT));
    if random.is_multiple_of(base * LFU_LOG_FACTOR + 1) {
        counter + 1
    } else {
        counter
    }
}

/// An eviction candidate found by sampling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// Higher is a better victim (see [`Access::score`]).
    pub(crate) score: u64,
    /// Where the key lives.
    pub(crate) partition: PartitionId,
    /// The key.
    pub(crate) key: Bytes,
}

/// The best [`POOL_SIZE`] candidates seen so far, ascending by score. Entries can be
/// stale (the key changed or vanished since it was sampled); evicting a stale one is
/// harmless in a cache (a miss), so they are not revalidated.
#[derive(Debug, Default)]
pub(crate) struct EvictionPool {
    best: Vec<Candidate>,
}

impl EvictionPool {
    /// Offers a candidate; keeps it if it is among the best seen.
    pub(crate) fn offer(&mut self, candidate: Candidate) {
        if let Some(pos) = self
            .best
            .iter()
            .position(|c| c.partition == candidate.partition && c.key == candidate.key)
        {
            self.best.remove(pos);
        } else if self.best.len() >= POOL_SIZE {
            match self.best.first() {
                Some(worst) if worst.score < candidate.score => {
                    self.best.remove(0);
                }
                _ => return,
            }
        }
        let at = self.best.partition_point(|c| c.score <= candidate.score);
        self.best.insert(at, candidate);
    }

    /// Takes the best candidate.
    #[cfg(test)]
    pub(crate) fn pop_best(&mut self) -> Option<Candidate> {
        self.best.pop()
    }

    /// Takes the best candidate that is not `except` (partition, key).
    pub(crate) fn pop_best_except(
        &mut self,
        except: Option<(PartitionId, &[u8])>,
    ) -> Option<Candidate> {
        let at = self.best.iter().rposition(|c| {
            except.is_none_or(|(partition, key)| c.partition != partition || c.key != key)
        })?;
        Some(self.best.remove(at))
    }

    /// Number of candidates held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.best.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn candidate(score: u64, key: &'static str) -> Candidate {
        Candidate {
            score,
            partition: PartitionId(0),
            key: Bytes::from_static(key.as_bytes()),
        }
    }

    #[test]
    fn pool_keeps_the_best_and_dedups() {
        let mut pool = EvictionPool::default();
        for i in 0..40u64 {
            pool.offer(candidate(i, "k"));
        }
        assert_eq!(pool.len(), 1, "same key offered again replaces itself");
        for i in 0..40u64 {
            pool.offer(Candidate {
                score: i,
                partition: PartitionId(1),
                key: Bytes::from(i.to_string()),
            });
        }
        assert_eq!(pool.len(), POOL_SIZE);
        assert_eq!(pool.pop_best().unwrap().score, 39);
        assert_eq!(pool.pop_best().unwrap().score, 39);
        assert_eq!(pool.pop_best().unwrap().score, 38);
    }

    #[test]
    fn expired_beats_everything() {
        let access = Access::new(0);
        let now = 10_000_000;
        for policy in EvictionPolicy::ALL {
            assert_eq!(access.score(true, policy, now), u64::MAX);
            assert!(access.score(false, policy, now) < u64::MAX);
        }
    }

    #[test]
    fn lru_prefers_idle() {
        let old = Access::new(100);
        let recent = Access::new(900);
        let p = EvictionPolicy::AllKeysLru;
        assert!(old.score(false, p, 1_000) > recent.score(false, p, 1_000));
    }

    #[test]
    fn lfu_counts_logarithmically_and_decays() {
        let mut hot = Access::new(0);
        let cold = Access::new(0);
        for i in 0..1000u32 {
            hot.on_read(0, i.wrapping_mul(2_654_435_761));
        }
        let counter = hot.lfu(0);
        assert!(counter > LFU_INIT + 5 && counter < 60, "{counter}");
        let p = EvictionPolicy::AllKeysLfu;
        assert!(cold.score(false, p, 0) > hot.score(false, p, 0));
        // Ten idle minutes cost ten points.
        assert_eq!(hot.lfu(10 * LFU_DECAY_MS), counter - 10);
        assert_eq!(Access::new(0).lfu(u64::MAX), 0);
        // Deterministic write touch: decay, no increment.
        let mut w = Access::new(0);
        w.on_write(3 * LFU_DECAY_MS);
        assert_eq!(w.lfu(3 * LFU_DECAY_MS), LFU_INIT - 3);
    }

    #[test]
    fn log_incr_saturates() {
        assert_eq!(log_incr(u8::MAX, 0), u8::MAX);
        assert_eq!(log_incr(0, 12345), 1);
        assert_eq!(log_incr(LFU_INIT, 7), LFU_INIT + 1);
        assert_eq!(log_incr(LFU_INIT + 1, 1), LFU_INIT + 1);
    }
}
