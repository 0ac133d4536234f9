//! [`PartitionStateMachine`]: openraft's state machine for one partition, wrapping the
//! deterministic [`PartitionState`].

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::OptionalSend;

use super::snapshot;
use super::types::{
    Entry, EntryPayload, LogId, Response, Snapshot, SnapshotData, SnapshotMeta, StoredMembership,
    TypeConfig,
};
use crate::storage::{PartitionId, PartitionState};

/// The state machine of one partition's Raft group.
///
/// A normal entry's [`Op`] is applied with the entry's log index as the index, so versions
/// are log indexes and identical on every replica. Blank and membership entries advance the
/// last applied log id without touching the data.
///
/// A cheap `Clone` handle: clones share the state, so the snapshot builder is a clone, and
/// the read path (later: the partition group) reads through [`with_state`](Self::with_state).
#[derive(Debug, Clone)]
pub struct PartitionStateMachine {
    partition: PartitionId,
    inner: Arc<Mutex<SmInner>>,
}

#[derive(Debug)]
struct SmInner {
    /// The data.
    state: PartitionState,
    /// The log id of the last applied entry of any kind.
    last_applied: Option<LogId>,
    /// The last applied membership config.
    last_membership: StoredMembership,
    /// The last built or installed snapshot.
    current_snapshot: Option<Snapshot>,
}

impl PartitionStateMachine {
    /// An empty state machine for `partition`: nothing applied, no snapshot.
    pub fn new(partition: PartitionId) -> Self {
        Self {
            partition,
            inner: Arc::new(Mutex::new(SmInner {
                state: PartitionState::new(partition),
                last_applied: None,
                last_membership: StoredMembership::default(),
                current_snapshot: None,
            })),
        }
    }

    /// The partition this state machine holds.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// Runs `f` on the partition's data under the state machine's lock (reads take `&mut`
    /// because they update node-local access metadata). Keep `f` short: applying waits.
    ///
    /// # Errors
    ///
    /// If the lock is poisoned (a panic while applying).
    pub fn with_state<T>(&self, f: impl FnOnce(&mut PartitionState) -> T) -> io::Result<T> {
        Ok(f(&mut self.lock()?.state))
    }

    /// The index of the last applied log entry of any kind (0 before the first).
    ///
    /// # Errors
    ///
    /// If the lock is poisoned.
    pub fn last_applied_index(&self) -> io::Result<u64> {
        Ok(self.lock()?.last_applied.map_or(0, |id| id.index))
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, SmInner>> {
        self.inner
            .lock()
            .map_err(|_| io::Error::other("partition state machine lock poisoned"))
    }

    /// Applies one committed entry and returns its response.
    pub(crate) fn apply_entry(&self, entry: Entry) -> io::Result<Response> {
        let log_id = entry.log_id;
        let payload = entry.payload;
        let mut inner = self.lock()?;
        // Applied indexes strictly increase (they become versions); compare indexes, not
        // whole log ids, whose order puts the leader id first.
        if inner
            .last_applied
            .is_some_and(|last| last.index >= log_id.index)
        {
            return Err(invalid_data(format!(
                "partition {}: entry {log_id} applied after {}",
                self.partition,
                inner.last_applied.map_or(0, |id| id.index)
            )));
        }
        let response = match payload {
            EntryPayload::Blank => None,
            EntryPayload::Normal(op) => {
                // Guaranteed by the check above unless a snapshot said otherwise; an error
                // (fatal for this group) rather than PartitionState's debug assertion.
                if log_id.index <= inner.state.applied_index() {
                    return Err(invalid_data(format!(
                        "partition {}: entry {log_id} is not after applied index {}",
                        self.partition,
                        inner.state.applied_index()
                    )));
                }
                Some(inner.state.apply(log_id.index, &op))
            }
            EntryPayload::Membership(membership) => {
                inner.last_membership = StoredMembership::new(Some(log_id), membership);
                None
            }
        };
        inner.last_applied = Some(log_id);
        Ok(response)
    }
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionStateMachine {
    type SnapshotData = SnapshotData;

    /// Copies the state (reference counts only) under the lock, encodes outside it, and
    /// keeps the result as the current snapshot unless a newer one was installed meanwhile.
    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (meta, state) = {
            let inner = self.lock()?;
            let meta = SnapshotMeta {
                last_log_id: inner.last_applied,
                last_membership: inner.last_membership.clone(),
            };
            (meta, inner.state.snapshot())
        };
        let snapshot = Snapshot {
            snapshot: snapshot::encode(self.partition, &meta, &state),
            meta,
        };
        let mut inner = self.lock()?;
        let newer_exists = inner
            .current_snapshot
            .as_ref()
            .is_some_and(|cur| cur.meta.last_log_id > snapshot.meta.last_log_id);
        if !newer_exists {
            inner.current_snapshot = Some(snapshot.clone());
        }
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for PartitionStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let inner = self.lock()?;
        Ok((inner.last_applied, inner.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let response = self.apply_entry(entry)?;
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    /// Decodes and checks the snapshot (partition, metadata), rebuilds the state outside the
    /// lock, then swaps it in and keeps the snapshot as the current one.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let decoded = snapshot::decode(&snapshot).map_err(|e| invalid_data(e.to_string()))?;
        if decoded.partition != self.partition {
            return Err(invalid_data(format!(
                "snapshot of partition {} offered to partition {}",
                decoded.partition, self.partition
            )));
        }
        if decoded.meta != *meta {
            return Err(invalid_data(format!(
                "snapshot header ({}) disagrees with its metadata ({meta})",
                decoded.meta
            )));
        }
        let state = PartitionState::restore(self.partition, decoded.state);
        let mut inner = self.lock()?;
        inner.state = state;
        inner.last_applied = meta.last_log_id;
        inner.last_membership = meta.last_membership.clone();
        inner.current_snapshot = Some(Snapshot {
            meta: meta.clone(),
            snapshot,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.lock()?.current_snapshot.clone())
    }
}
