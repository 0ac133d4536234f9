//! [`MemLogStore`]: the Raft log and vote of one partition, held in memory, and in
//! `durable` mode also written through to the node's sled [`Store`].
//!
//! Durable mode makes these durable, each before the step named:
//! - `save_vote`: the vote, flushed **before returning** (a node must never vote twice in a
//!   term after a crash).
//! - `append`: the entries, written before returning (readable at once) and flushed
//!   before the `IOFlushed` callback fires; the store's flush thread batches the
//!   callbacks of every group into one flush (group commit).
//! - `truncate_after`: applied in order with the other writes (one writer per group).
//! - `purge`: memory only. On disk, entries stay until a written snapshot covers them
//!   (`Store::trim_log`), so a restart finds "snapshot S, entries S+1.." and no hole.
//! - `save_committed`: written, not flushed (it only saves re-applying work).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;

use super::network::{encode, GroupId};
use super::types::{Entry, LogId, TypeConfig, Vote};
use crate::persist::Store;

/// The in-memory log store of one partition: vote, committed log id and log entries.
///
/// A cheap `Clone` handle: clones share the same log, so the log reader openraft hands to
/// replication tasks is just a clone. Every method holds the lock only for a map operation.
#[derive(Debug, Clone, Default)]
pub struct MemLogStore {
    inner: Arc<Mutex<LogInner>>,
    /// Durable mode: the store and this log's group.
    disk: Option<(Arc<Store>, GroupId)>,
}

/// Everything a log store holds (a checkpoint, or what a restart loaded).
#[derive(Debug, Clone, Default)]
pub struct LogContents {
    /// The last saved vote.
    pub vote: Option<Vote>,
    /// The last saved committed log id.
    pub committed: Option<LogId>,
    /// Entries up to this one are gone (covered by the snapshot).
    pub last_purged: Option<LogId>,
    /// The entries after it, in index order, no holes.
    pub entries: Vec<Entry>,
}

#[derive(Debug, Default)]
struct LogInner {
    /// The last saved vote.
    vote: Option<Vote>,
    /// The last saved committed log id.
    committed: Option<LogId>,
    /// The greatest log id purged so far (entries up to it are gone).
    last_purged: Option<LogId>,
    /// Log entries by index, no holes.
    entries: BTreeMap<u64, Entry>,
}

impl MemLogStore {
    /// An empty log with no vote.
    pub fn new() -> Self {
        Self::default()
    }

    /// A log holding `contents`, written through to `disk` (durable mode) when given.
    pub fn restored(contents: LogContents, disk: Option<(Arc<Store>, GroupId)>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(LogInner {
                vote: contents.vote,
                committed: contents.committed,
                last_purged: contents.last_purged,
                entries: contents
                    .entries
                    .into_iter()
                    .map(|e| (e.log_id.index, e))
                    .collect(),
            })),
            disk,
        }
    }

    /// A copy of everything held (for a checkpoint at shutdown).
    ///
    /// # Errors
    /// If the lock is poisoned.
    pub fn contents(&self) -> io::Result<LogContents> {
        let inner = self.lock()?;
        Ok(LogContents {
            vote: inner.vote,
            committed: inner.committed,
            last_purged: inner.last_purged,
            entries: inner.entries.values().cloned().collect(),
        })
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, LogInner>> {
        self.inner
            .lock()
            .map_err(|_| io::Error::other("raft log store lock poisoned"))
    }
}

/// The entries of `entries` whose index is in `range`; empty (not a panic) for empty or
/// inverted ranges.
fn read_range(entries: &BTreeMap<u64, Entry>, range: &impl RangeBounds<u64>) -> Vec<Entry> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => match s.checked_add(1) {
            Some(s) => s,
            None => return Vec::new(),
        },
        Bound::Unbounded => 0,
    };
    // Exclusive end; `None` = unbounded.
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if start >= end => Vec::new(),
        Some(end) => entries.range(start..end).map(|(_, e)| e.clone()).collect(),
        None => entries.range(start..).map(|(_, e)| e.clone()).collect(),
    }
}

/// Removes every entry with index `>= from` (`None`: nothing, the index would overflow).
fn remove_from(entries: &mut BTreeMap<u64, Entry>, from: Option<u64>) {
    if let Some(from) = from {
        drop(entries.split_off(&from));
    }
}

impl RaftLogReader<TypeConfig> for MemLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(read_range(&self.lock()?.entries, &range))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock()?.vote)
    }
}

impl RaftLogStorage<TypeConfig> for MemLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let inner = self.lock()?;
        let last = inner.entries.last_key_value().map(|(_, e)| e.log_id);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last.or(inner.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        if let Some((store, group)) = &self.disk {
            store.put_raft(*group, "vote", &encode(vote).map_err(io::Error::other)?)?;
            store.flushed().await?;
        }
        self.lock()?.vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        if let Some((store, group)) = &self.disk {
            store.put_raft(
                *group,
                "committed",
                &encode(&committed).map_err(io::Error::other)?,
            )?;
        }
        self.lock()?.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock()?.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some((store, group)) = &self.disk {
            let encoded = entries
                .iter()
                .map(|e| {
                    Ok((
                        e.log_id.index,
                        encode(e).map_err(io::Error::other)?.to_vec(),
                    ))
                })
                .collect::<io::Result<Vec<_>>>()?;
            store.append(*group, encoded)?;
        }
        {
            let mut inner = self.lock()?;
            for entry in entries {
                inner.entries.insert(entry.log_id.index, entry);
            }
        }
        match &self.disk {
            // Group commit: the flush thread answers once these bytes are on disk.
            Some((store, _)) => store.flush_then(move |r| callback.io_completed(r)),
            // In memory, "persisted" is "stored": report it at once.
            None => callback.io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        if let Some((store, group)) = &self.disk {
            match last_log_id {
                Some(id) => {
                    if let Some(from) = id.index.checked_add(1) {
                        store.remove_log_from(*group, from)?;
                    }
                }
                None => store.remove_log_from(*group, 0)?,
            }
        }
        let mut inner = self.lock()?;
        match last_log_id {
            Some(id) => remove_from(&mut inner.entries, id.index.checked_add(1)),
            None => inner.entries.clear(),
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut inner = self.lock()?;
        if inner.last_purged.is_some_and(|p| p >= log_id) {
            return Ok(());
        }
        let kept = match log_id.index.checked_add(1) {
            Some(from) => inner.entries.split_off(&from),
            None => BTreeMap::new(),
        };
        inner.entries = kept;
        inner.last_purged = Some(log_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::CommittedLeaderId;

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(
                CommittedLeaderId {
                    term: 1,
                    node_id: 1,
                },
                index,
            ),
            payload: openraft::EntryPayload::Blank,
        }
    }

    #[test]
    fn read_range_handles_empty_inverted_and_extreme_bounds() {
        let log: BTreeMap<u64, Entry> = (1..=5).map(|i| (i, blank(i))).collect();
        let idx = |v: Vec<Entry>| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
        assert_eq!(idx(read_range(&log, &(2..4))), [2, 3]);
        assert_eq!(idx(read_range(&log, &(2..=4))), [2, 3, 4]);
        assert_eq!(idx(read_range(&log, &(4..))), [4, 5]);
        assert_eq!(idx(read_range(&log, &(..))), [1, 2, 3, 4, 5]);
        assert!(read_range(&log, &(4..4)).is_empty());
        assert!(read_range(&log, &(Bound::Included(4), Bound::Excluded(2))).is_empty());
        assert!(read_range(&log, &(Bound::Excluded(3), Bound::Excluded(3))).is_empty());
        assert!(read_range(&log, &(Bound::Excluded(u64::MAX), Bound::Unbounded)).is_empty());
        assert_eq!(idx(read_range(&log, &(0..=u64::MAX))), [1, 2, 3, 4, 5]);
    }
}
