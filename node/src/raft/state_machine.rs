//! [`PartitionStateMachine`]: openraft's state machine for one partition, wrapping the
//! deterministic [`PartitionState`].

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::OptionalSend;

use super::disk::LoadedSnapshot;
use super::network::GroupId;
use super::snapshot;
use super::types::{
    Entry, EntryPayload, LogId, Response, Snapshot, SnapshotData, SnapshotMeta, StoredMembership,
    TypeConfig,
};
use crate::persist::Store;
use crate::storage::{Engine, Outcome, PartitionId, PartitionState, StorageConfig, SystemClock};
use crate::watch::{Changed, ResetReason, WatchHub};

/// Memory reservations this node made for ops it proposed, by ticket.
///
/// The leader reserves an op's growth before proposing it (so that concurrent writers
/// never push the accounted total past `max-memory`), and its own apply of that op takes
/// the reservation back here, so the op is counted once. Other replicas find nothing and
/// apply the op unreserved.
#[derive(Debug, Default)]
pub struct Tickets {
    node: AtomicU64,
    next: AtomicU64,
    reserved: Mutex<HashMap<u64, u64>>,
}

impl Tickets {
    /// Sets this node's id (the `origin` of its proposals).
    pub fn set_node(&self, node: u64) {
        self.node.store(node, Ordering::Relaxed);
    }

    /// This node's id as set by [`set_node`](Self::set_node).
    pub fn node(&self) -> u64 {
        self.node.load(Ordering::Relaxed)
    }

    /// Records a reservation of `bytes` and returns its ticket (0 when nothing is reserved).
    pub fn issue(&self, bytes: u64) -> u64 {
        if bytes == 0 {
            return 0;
        }
        let ticket = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(ticket, bytes);
        ticket
    }

    /// Takes the reservation of `ticket` if this node issued it (0 otherwise or if gone).
    pub fn take(&self, origin: u64, ticket: u64) -> u64 {
        if ticket == 0 || origin != self.node() {
            return 0;
        }
        self.lock().remove(&ticket).unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, u64>> {
        self.reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The state machine of one partition's Raft group.
///
/// The data lives in the node's [`Engine`] (partition `partition`), which keeps the
/// node-wide memory accounting; this type adds what openraft needs around it: the last
/// applied log id, the last membership and the snapshot metadata. A normal entry's op is
/// applied with the entry's log index as the index, so versions are log indexes and
/// identical on every replica. Blank and membership entries advance the last applied log
/// id without touching the data.
///
/// A cheap `Clone` handle: clones share everything, so the snapshot builder is a clone.
#[derive(Debug, Clone)]
pub struct PartitionStateMachine {
    partition: PartitionId,
    engine: Arc<Engine>,
    tickets: Arc<Tickets>,
    inner: Arc<Mutex<SmInner>>,
    /// Durable mode: where an installed snapshot is written (before the log it replaces
    /// is purged) and the group's key there.
    disk: Option<(Arc<Store>, GroupId)>,
    /// The node's change feed (partition groups only, not the meta group).
    watch: Option<Arc<WatchHub>>,
}

/// A snapshot encoded for writing, and how long the partition's writes waited for it.
#[derive(Debug)]
pub struct Encoded {
    /// The snapshot (metadata and bytes).
    pub snapshot: Snapshot,
    /// The applied index it covers (0 before any entry).
    pub index: u64,
    /// How long the state machine's lock was held to copy the state (the write pause).
    pub pause: std::time::Duration,
}

#[derive(Debug)]
struct SmInner {
    /// The log id of the last applied entry of any kind.
    last_applied: Option<LogId>,
    /// The last applied membership config.
    last_membership: StoredMembership,
    /// Metadata of the last built or installed snapshot. The encoded data is not kept
    /// (it would double the memory of the partition); a snapshot asked for later is built
    /// afresh from the current state, which is at least as new.
    snapshot_meta: Option<SnapshotMeta>,
}

impl PartitionStateMachine {
    /// The state machine of `partition`, whose data lives in `engine`.
    pub fn with_engine(partition: PartitionId, engine: Arc<Engine>, tickets: Arc<Tickets>) -> Self {
        Self {
            partition,
            engine,
            tickets,
            inner: Arc::new(Mutex::new(SmInner {
                last_applied: None,
                last_membership: StoredMembership::default(),
                snapshot_meta: None,
            })),
            disk: None,
            watch: None,
        }
    }

    /// Writes installed snapshots to `store` under `group` (durable mode).
    #[must_use]
    pub fn with_disk(mut self, store: Arc<Store>, group: GroupId) -> Self {
        self.disk = Some((store, group));
        self
    }

    /// Publishes the partition's changes to `hub` from now on, starting with a RESET
    /// that tracks it at its last applied index (a replica starting here).
    #[must_use]
    pub fn with_watch(mut self, hub: Arc<WatchHub>) -> Self {
        if let Ok(inner) = self.lock() {
            self.publish_reset(&hub, &inner, ResetReason::Started);
        }
        self.watch = Some(hub);
        self
    }

    /// Tells the change feed that the state was replaced, now at the last applied
    /// index (called under the state machine's lock, so no apply slips in between).
    fn publish_reset(&self, hub: &WatchHub, inner: &SmInner, reason: ResetReason) {
        hub.reset(
            self.partition.0,
            inner.last_applied.map_or(0, |id| id.index),
            self.engine.cdc_watermark(self.partition).unwrap_or(0),
            true,
            reason,
        );
    }

    /// Takes a snapshot loaded from disk as the state (before the group starts).
    ///
    /// # Errors
    /// When the snapshot belongs to another partition or the engine refuses it.
    pub fn restore(&self, loaded: LoadedSnapshot) -> io::Result<()> {
        if loaded.partition != self.partition {
            return Err(invalid_data(format!(
                "snapshot of partition {} loaded for partition {}",
                loaded.partition, self.partition
            )));
        }
        let mut inner = self.lock()?;
        self.engine
            .restore(self.partition, loaded.state)
            .map_err(|e| invalid_data(e.to_string()))?;
        inner.last_applied = loaded.meta.last_log_id;
        inner.last_membership = loaded.meta.last_membership.clone();
        inner.snapshot_meta = Some(loaded.meta);
        if let Some(hub) = &self.watch {
            self.publish_reset(hub, &inner, ResetReason::Restored);
        }
        Ok(())
    }

    /// A standalone state machine for `partition` over its own unlimited engine (tests).
    pub fn new(partition: PartitionId) -> Self {
        let config = StorageConfig {
            partitions: partition.0 + 1,
            ..StorageConfig::default()
        };
        let engine = Arc::new(Engine::new(config, Arc::new(SystemClock)));
        Self::with_engine(partition, engine, Arc::new(Tickets::default()))
    }

    /// The partition this state machine holds.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// The engine holding the data.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Runs `f` on a copy of the partition's replicated state (tests and snapshots).
    ///
    /// # Errors
    ///
    /// If the partition does not exist in the engine.
    pub fn with_state<T>(&self, f: impl FnOnce(&mut PartitionState) -> T) -> io::Result<T> {
        let snap = self
            .engine
            .snapshot(self.partition)
            .ok_or_else(|| io::Error::other("no such partition in the engine"))?;
        let mut state = PartitionState::restore(self.partition, snap);
        Ok(f(&mut state))
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
            EntryPayload::Normal(proposal) => {
                // Versions are log indexes: the engine's partition must be behind this
                // entry (a stale partition would be a bug in replica start-up).
                let engine_applied = self.engine.partition_applied(self.partition).unwrap_or(0);
                if engine_applied >= log_id.index {
                    return Err(invalid_data(format!(
                        "partition {}: entry {log_id} is not after the stored index {engine_applied}",
                        self.partition
                    )));
                }
                let reserved = self.tickets.take(proposal.origin, proposal.ticket);
                let outcome = self
                    .engine
                    .apply_at(
                        self.partition,
                        log_id.index,
                        &proposal.op,
                        reserved,
                        proposal.request,
                    )
                    .map_err(|e| invalid_data(e.to_string()))?;
                // In apply order, under this partition's lock: the feed's `seq` follows
                // the log.
                if let Some(hub) = &self.watch {
                    let cdc_lsn = match &outcome {
                        Outcome::Cdc(Ok(applied)) => Some(applied.watermark),
                        _ => None,
                    };
                    hub.changed(
                        self.partition.0,
                        log_id.index,
                        Changed::of(&proposal.op.cmd),
                        cdc_lsn,
                    );
                }
                Some(outcome)
            }
            EntryPayload::Membership(membership) => {
                inner.last_membership = StoredMembership::new(Some(log_id), membership);
                None
            }
        };
        inner.last_applied = Some(log_id);
        Ok(response)
    }

    /// Encodes the current state as a snapshot. Applying waits only while the state is
    /// copied (measured as [`Encoded::pause`]); encoding happens outside the lock.
    ///
    /// # Errors
    /// If the partition is missing from the engine.
    pub fn encode(&self) -> io::Result<Encoded> {
        let started = std::time::Instant::now();
        let (meta, state, pause) = {
            let inner = self.lock()?;
            let meta = SnapshotMeta {
                last_log_id: inner.last_applied,
                last_membership: inner.last_membership.clone(),
            };
            // Taken under the state machine's lock, so no entry is applied in between.
            let state = self
                .engine
                .snapshot(self.partition)
                .ok_or_else(|| io::Error::other("no such partition in the engine"))?;
            (meta, state, started.elapsed())
        };
        let index = meta.last_log_id.map_or(0, |id| id.index);
        Ok(Encoded {
            snapshot: Snapshot {
                snapshot: snapshot::encode(self.partition, &meta, &state),
                meta,
            },
            index,
            pause,
        })
    }
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionStateMachine {
    type SnapshotData = SnapshotData;

    /// Marks a snapshot point: openraft only keeps the metadata of a built snapshot (and
    /// purges the log up to it), and asks [`get_current_snapshot`] for data when a
    /// follower needs it, which encodes the then-current state. So building is cheap
    /// here: the returned data is empty and never sent anywhere. (Encoding a whole
    /// partition every few hundred writes cost more CPU than the writes, and the
    /// transient buffers kept RSS well above the data under a memory limit.)
    ///
    /// [`get_current_snapshot`]: RaftStateMachine::get_current_snapshot
    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let snapshot = {
            let inner = self.lock()?;
            Snapshot {
                meta: SnapshotMeta {
                    last_log_id: inner.last_applied,
                    last_membership: inner.last_membership.clone(),
                },
                snapshot: SnapshotData::new(),
            }
        };
        let mut inner = self.lock()?;
        let newer_exists = inner
            .snapshot_meta
            .as_ref()
            .is_some_and(|cur| cur.last_log_id > snapshot.meta.last_log_id);
        if !newer_exists {
            inner.snapshot_meta = Some(snapshot.meta.clone());
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
    /// lock, then swaps it in.
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
        // Durable mode: on disk before openraft purges the log it replaces, so that a
        // restart finds this snapshot and the entries after it, without a hole.
        if let Some((store, group)) = &self.disk {
            let index = meta.last_log_id.map_or(0, |id| id.index);
            if store.put_snapshot(*group, index, &snapshot)? {
                store.trim_log(*group, index)?;
            }
            store.flushed().await?;
        }
        let state = PartitionState::restore(self.partition, decoded.state);
        let mut inner = self.lock()?;
        self.engine
            .restore(self.partition, state)
            .map_err(|e| invalid_data(e.to_string()))?;
        inner.last_applied = meta.last_log_id;
        inner.last_membership = meta.last_membership.clone();
        inner.snapshot_meta = Some(meta.clone());
        if let Some(hub) = &self.watch {
            self.publish_reset(hub, &inner, ResetReason::Snapshot);
        }
        Ok(())
    }

    /// A fresh snapshot of the current state once any snapshot was built or installed
    /// (its log id is at least that one's), `None` before.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        if self.lock()?.snapshot_meta.is_none() {
            return Ok(None);
        }
        self.encode().map(|e| Some(e.snapshot))
    }
}
