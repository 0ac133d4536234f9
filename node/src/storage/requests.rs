//! Exactly-once writes: the outcomes of recently applied client requests.
//!
//! A client retries a write whose answer was lost (timeout, broken connection, leader
//! change), and the first attempt may still commit — in the old leader's log, replicated
//! before it lost leadership. Applied twice, a `SET k v` reappears after a later write
//! of k, which raftcache-jepsen's register workload caught as a non-linearizable
//! history. So every write carries a [`RequestId`] (random client id, per-call
//! sequence, the same on every attempt of one call), and the partition's state machine
//! remembers the outcome of each id it applied: a second entry with the same id is not
//! applied again but answered with the first outcome (Raft dissertation §6.3).
//!
//! The log is replicated state (the same ops in the same order on every replica, part of
//! snapshots) and forgets deterministically: an id is kept for [`REQUEST_TTL_MS`] of
//! the *op's* clock (`Op::now_ms`), and at most [`MAX_REQUESTS`] ids per partition,
//! oldest first. A client's retries end within its request deadline (5 s by default),
//! inside that window unless a partition takes more than `MAX_REQUESTS` writes in that
//! time.

use std::collections::{HashMap, VecDeque};

use super::command::Outcome;

/// How long (op clock) an applied request id is remembered: well past the client's
/// default 5 s request deadline, within which all retries of a call happen.
pub const REQUEST_TTL_MS: u64 = 30_000;
/// The most request ids remembered per partition (about 120 bytes each, not counted
/// against `max-memory`: 16 partitions hold at most ~8 MiB of them). A retry stays
/// exactly-once unless the partition applied more writes than this in between — over
/// 800 writes/s to one partition for a whole 5 s deadline.
pub const MAX_REQUESTS: usize = 4_096;

/// Identifies one client call across its retries.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RequestId {
    /// Random per client instance (never 0 for a deduplicated request).
    pub client: u64,
    /// Per call, growing.
    pub seq: u64,
}

/// The remembered outcomes of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestLog {
    outcomes: HashMap<RequestId, Outcome>,
    /// (forget at, id) in the order applied.
    order: VecDeque<(u64, RequestId)>,
}

impl RequestLog {
    /// The first outcome of `id`, if it was applied and is still remembered.
    pub fn get(&self, id: &RequestId) -> Option<&Outcome> {
        self.outcomes.get(id)
    }

    /// Remembers the outcome of `id`, applied by an op stamped `now_ms`, and forgets
    /// what is due.
    pub fn insert(&mut self, id: RequestId, outcome: Outcome, now_ms: u64) {
        self.forget(now_ms);
        if self.outcomes.insert(id, outcome).is_none() {
            self.order
                .push_back((now_ms.saturating_add(REQUEST_TTL_MS), id));
        }
        while self.order.len() > MAX_REQUESTS {
            if let Some((_, old)) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
    }

    /// Forgets ids whose time is up at `now_ms` (in application order, so an entry
    /// stamped by a leader with a slower clock may wait behind a later one: it is only
    /// kept longer, never dropped early).
    pub fn forget(&mut self, now_ms: u64) {
        while let Some(&(until, id)) = self.order.front() {
            if until > now_ms {
                break;
            }
            self.order.pop_front();
            self.outcomes.remove(&id);
        }
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// (id, forget at, outcome) in application order, for snapshots.
    pub fn export(&self) -> Vec<(RequestId, u64, Outcome)> {
        self.order
            .iter()
            .filter_map(|(until, id)| Some((*id, *until, self.outcomes.get(id)?.clone())))
            .collect()
    }

    /// The log a snapshot's [`export`](Self::export) describes.
    pub fn restore(items: Vec<(RequestId, u64, Outcome)>) -> RequestLog {
        let mut log = RequestLog::default();
        for (id, until, outcome) in items {
            if log.outcomes.insert(id, outcome).is_none() {
                log.order.push_back((until, id));
            }
        }
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> RequestId {
        RequestId { client: 7, seq }
    }

    #[test]
    fn remembers_until_the_ttl_then_forgets() {
        let mut log = RequestLog::default();
        log.insert(id(1), Outcome::Deleted(true), 1_000);
        assert_eq!(log.get(&id(1)), Some(&Outcome::Deleted(true)));
        log.insert(id(2), Outcome::Deleted(false), 1_000 + REQUEST_TTL_MS - 1);
        assert!(log.get(&id(1)).is_some());
        log.forget(1_000 + REQUEST_TTL_MS);
        assert!(log.get(&id(1)).is_none());
        assert!(log.get(&id(2)).is_some());
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn bounded_oldest_first_and_round_trips() {
        let mut log = RequestLog::default();
        for seq in 0..(MAX_REQUESTS as u64 + 10) {
            log.insert(id(seq), Outcome::Expire(true), 5);
        }
        assert_eq!(log.len(), MAX_REQUESTS);
        assert!(log.get(&id(9)).is_none());
        assert!(log.get(&id(10)).is_some());
        let back = RequestLog::restore(log.export());
        assert_eq!(back, log);
    }
}
