//! The deadline index: entries with a deadline, ordered by (deadline, key), so that
//! `Reclaim` finds what is due in O(log n) per key and in the same order on every replica.
//! CDC tombstones use a second instance, keyed by their `until_ms`.

use std::collections::BTreeSet;

use bytes::Bytes;

/// Keys with a deadline, ordered by deadline then key.
#[derive(Debug, Clone, Default)]
pub(crate) struct TtlIndex {
    by_deadline: BTreeSet<(u64, Bytes)>,
}

impl TtlIndex {
    /// Records that `key` expires at `deadline`.
    pub(crate) fn insert(&mut self, deadline: u64, key: Bytes) {
        self.by_deadline.insert((deadline, key));
    }

    /// Forgets the `(deadline, key)` pair.
    pub(crate) fn remove(&mut self, deadline: u64, key: &Bytes) {
        // The tuple needs an owned key; cloning a `Bytes` only bumps a reference count.
        self.by_deadline.remove(&(deadline, key.clone()));
    }

    /// The earliest deadline and its key, if any.
    pub(crate) fn first(&self) -> Option<&(u64, Bytes)> {
        self.by_deadline.first()
    }

    /// Removes and returns the earliest deadline and its key, if any.
    pub(crate) fn pop_first(&mut self) -> Option<(u64, Bytes)> {
        self.by_deadline.pop_first()
    }

    /// Keys whose deadline is `<= now_ms`, earliest first.
    pub(crate) fn due(&self, now_ms: u64) -> impl Iterator<Item = &(u64, Bytes)> {
        self.by_deadline
            .iter()
            .take_while(move |(deadline, _)| *deadline <= now_ms)
    }

    /// Number of keys with a deadline.
    pub(crate) fn len(&self) -> usize {
        self.by_deadline.len()
    }
}
