//! Persistence of a cluster node (see [`crate::persist`] for the modes and the layout):
//! what a restart does with the data directory, the periodic snapshots, and the
//! checkpoint of a clean shutdown.
//!
//! # Restart
//! [`Restart::plan`] reads the directory:
//! - nothing there (or persistence `none`): a fresh node (found, join or standby);
//! - written in `durable` mode, or by a clean shutdown: **restore** — same node id, same
//!   replica ids, each group from its snapshot, vote and log; the groups then catch up
//!   from their leaders;
//! - written in `snapshot` mode by a run that crashed: its votes and logs are lost, so
//!   it **rejoins** as a new node through its peers (who hold the data), unless
//!   `--restore-snapshots` says every node crashed: then it restores from its snapshots
//!   alone (writes after them are lost, as with Redis RDB);
//! - a corrupt snapshot or a damaged log: the node says which, never serves that data,
//!   and rejoins as a new node through its peers; if it holds the only copy of a
//!   partition it refuses to start and says what to do.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tracing::{error, info, warn};

use super::meta::ClusterMeta;
use super::ClusterNode;
use crate::persist::{Identity, Persistence, Store};
use crate::raft::disk::{self, LoadError, LoadedGroup, Written};
use crate::raft::{Group, GroupDisk, GroupId, ReplicaId, META_GROUP};

/// How often the snapshot loop looks for partitions due for a snapshot.
pub const SNAPSHOT_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What is persisted and when (from `[persistence]`).
#[derive(Debug, Clone, Default)]
pub struct PersistSettings {
    /// The mode.
    pub mode: Persistence,
    /// The open store (`None` exactly when the mode is `none`).
    pub store: Option<Arc<Store>>,
    /// A partition with new entries is written at least this often.
    pub snapshot_interval: Duration,
    /// ... and after this many applied entries.
    pub snapshot_writes: u64,
}

/// Snapshot figures of one node (for `stats` and metrics).
#[derive(Debug, Clone, Default)]
pub struct SnapshotStats {
    /// Snapshots written since the node started.
    pub written: u64,
    /// When the last one was written (Unix ms; 0 = never).
    pub last_at_unix_ms: u64,
    /// Its partition (the meta group is `u32::MAX`).
    pub last_group: u32,
    /// Its size in bytes.
    pub last_bytes: u64,
    /// How long writing it took, in ms.
    pub last_duration_ms: u64,
    /// The longest write pause seen (the state copy), in µs.
    pub max_pause_us: u64,
    /// Bytes of all stored snapshots, last written per group.
    pub stored_bytes: u64,
}

/// Per-group bookkeeping of the snapshot loop.
#[derive(Debug, Default)]
pub(super) struct SnapshotBook {
    inner: Mutex<BookInner>,
    /// One snapshot writer at a time (the loop, an admin request, the shutdown).
    writing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct BookInner {
    /// Group → (index written, when, bytes).
    groups: BTreeMap<GroupId, (u64, Instant, u64)>,
    stats: SnapshotStats,
}

impl SnapshotBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, BookInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, group: GroupId, w: &Written, took: Duration) {
        let mut b = self.lock();
        b.groups.insert(group, (w.index, Instant::now(), w.bytes));
        let stored = b.groups.values().map(|(_, _, bytes)| bytes).sum();
        let s = &mut b.stats;
        s.written += 1;
        s.last_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        s.last_group = group;
        s.last_bytes = w.bytes;
        s.last_duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        s.max_pause_us = s
            .max_pause_us
            .max(u64::try_from(w.pause.as_micros()).unwrap_or(u64::MAX));
        s.stored_bytes = stored;
        metrics::counter!("raftcache_snapshots_total").increment(1);
        metrics::gauge!("raftcache_snapshot_last_bytes").set(w.bytes as f64);
        metrics::histogram!("raftcache_snapshot_pause_seconds").record(w.pause.as_secs_f64());
        metrics::histogram!("raftcache_snapshot_write_seconds").record(took.as_secs_f64());
    }
}

/// What a restart does with the data directory (see the module docs).
#[derive(Debug)]
pub enum Restart {
    /// Nothing to restore: found, join or wait as configured.
    Fresh,
    /// Come back as `identity` with these groups (group → replica id and state).
    Restore {
        /// The stored identity.
        identity: Identity,
        /// The metadata the node last knew.
        meta: ClusterMeta,
        /// Every group's replica and state.
        groups: BTreeMap<GroupId, (ReplicaId, LoadedGroup)>,
        /// Restored from snapshots alone (`--restore-snapshots`).
        snapshots_only: bool,
    },
    /// Join as a new node through `seeds`; `why` says what was lost.
    Rejoin {
        /// Peers to ask.
        seeds: Vec<String>,
        /// Why the stored state cannot be used.
        why: String,
    },
}

impl Restart {
    /// Reads `store` and decides (see the module docs).
    ///
    /// # Errors
    /// When the directory belongs to another address, or holds the only copy of a
    /// corrupt partition, or cannot be read at all: the message says what to do.
    pub fn plan(
        store: &Store,
        mode: Persistence,
        advertise: &str,
        restore_snapshots: bool,
        join: &[String],
    ) -> anyhow::Result<Restart> {
        let dir = store.dir().display().to_string();
        let Some(identity) = store.identity().context("cannot read the data directory")? else {
            return Ok(Restart::Fresh);
        };
        anyhow::ensure!(
            identity.advertise == advertise,
            "the data directory {dir} belongs to node {} at {}, not {advertise}: start it with \
             that address (--grpc-addr / --advertise-addr), or give this node another --data-dir",
            identity.node_id,
            identity.advertise
        );
        let meta: Option<ClusterMeta> = store
            .meta()
            .ok()
            .flatten()
            .and_then(|json| serde_json::from_slice(&json).ok());
        let mut seeds: Vec<String> = meta
            .iter()
            .flat_map(|m| m.nodes.values().map(|n| n.addr.clone()))
            .filter(|a| a != advertise)
            .collect();
        for j in join {
            if !seeds.contains(j) && j != advertise {
                seeds.push(j.clone());
            }
        }
        let clean = store.is_clean()?;
        let durable = identity.persistence == Persistence::Durable && mode == Persistence::Durable;
        let snapshots_only = !clean && !durable;
        if snapshots_only && !restore_snapshots {
            let why = format!(
                "node {} stopped without a clean shutdown in `{}` mode: its Raft votes and logs \
                 were not saved, so it rejoins as a new node and copies the data from its peers",
                identity.node_id, identity.persistence
            );
            anyhow::ensure!(
                !seeds.is_empty(),
                "{why}, but it knows no peer; if it was the only node, restart it with \
                 --restore-snapshots to bring back its last snapshots (writes after them are lost)"
            );
            return Ok(Restart::Rejoin { seeds, why });
        }
        let Some(meta) = meta else {
            return Self::lost(
                &identity,
                &dir,
                seeds,
                "the cluster metadata is unreadable".into(),
            );
        };
        // Reading, checking and rebuilding the partitions is CPU-bound: spread it over
        // the cores (a node restarts faster than one thread decodes its snapshots).
        let replicas: Vec<(GroupId, ReplicaId)> = store.replicas()?.into_iter().collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .clamp(1, replicas.len().max(1));
        let loaded: Vec<(GroupId, ReplicaId, Result<LoadedGroup, LoadError>)> =
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..threads)
                    .map(|t| {
                        let mine: Vec<(GroupId, ReplicaId)> =
                            replicas.iter().copied().skip(t).step_by(threads).collect();
                        scope.spawn(move || {
                            mine.into_iter()
                                .map(|(g, r)| (g, r, disk::load(store, g, r, snapshots_only)))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap_or_default())
                    .collect()
            });
        anyhow::ensure!(
            loaded.len() == replicas.len(),
            "a thread loading the data directory failed"
        );
        let mut groups = BTreeMap::new();
        for (group, replica, result) in loaded {
            match result {
                Ok(loaded) => {
                    groups.insert(group, (replica, loaded));
                }
                Err(e) => {
                    error!("{e}: not serving it; the data directory {dir} cannot be used as it is");
                    let only_copy = match &e {
                        LoadError::CorruptSnapshot { group, .. }
                        | LoadError::DamagedLog { group, .. }
                        | LoadError::Io(_, group) => only_copy(&meta, identity.node_id, *group),
                    };
                    anyhow::ensure!(
                        !only_copy,
                        "{e}, and node {} holds the only copy of it: restore {dir} from a backup, \
                         or move it away to start this node empty (the data is then lost)",
                        identity.node_id
                    );
                    return Self::lost(&identity, &dir, seeds, e.to_string());
                }
            }
        }
        anyhow::ensure!(
            groups.contains_key(&META_GROUP),
            "the data directory {dir} has no meta replica: it is damaged; move it away to start \
             this node empty"
        );
        Ok(Restart::Restore {
            identity,
            meta,
            groups,
            snapshots_only,
        })
    }

    fn lost(
        identity: &Identity,
        dir: &str,
        seeds: Vec<String>,
        why: String,
    ) -> anyhow::Result<Restart> {
        anyhow::ensure!(
            !seeds.is_empty(),
            "{why} in {dir}, and node {} knows no peer to recover from: restore the directory \
             from a backup, or move it away to start empty",
            identity.node_id
        );
        Ok(Restart::Rejoin {
            seeds,
            why: format!("{why}; recovering from the peers as a new node"),
        })
    }
}

/// Whether `node` holds the only copy of `group` (no other node in the cluster, or a
/// partition placed on this node alone).
fn only_copy(meta: &ClusterMeta, node: u64, group: GroupId) -> bool {
    if meta.nodes.keys().all(|n| *n == node) {
        return true;
    }
    if group == META_GROUP {
        return false;
    }
    meta.partitions
        .get(group as usize)
        .is_some_and(|p| p.replicas.iter().all(|r| r.node == node))
}

impl ClusterNode {
    fn store(&self) -> Option<&Arc<Store>> {
        self.settings.persist.store.as_ref()
    }

    /// How a new replica uses the disk.
    pub(super) fn group_disk(&self, restored: Option<LoadedGroup>) -> GroupDisk {
        GroupDisk {
            durable: self
                .store()
                .filter(|_| self.settings.persist.mode == Persistence::Durable)
                .cloned(),
            restored,
        }
    }

    /// Forgets the directory's old contents and records a new identity.
    pub(super) fn persist_new_identity(&self, node_id: u64, cluster_id: u64) -> anyhow::Result<()> {
        let Some(store) = self.store() else {
            return Ok(());
        };
        store
            .reset(&Identity {
                cluster_id,
                node_id,
                advertise: self.settings.advertise.clone(),
                persistence: self.settings.persist.mode,
            })
            .context("cannot write the node identity to the data directory")
    }

    /// Records a new (empty) replica of `group`.
    pub(super) fn persist_replica(&self, group: GroupId, replica: ReplicaId) -> anyhow::Result<()> {
        let Some(store) = self.store() else {
            return Ok(());
        };
        self.snapshots.lock().groups.remove(&group);
        store
            .start_replica(group, replica)
            .with_context(|| format!("cannot record replica {replica} of group {group} on disk"))
    }

    /// Removes a stopped replica's state from disk.
    pub(super) fn forget_replica(&self, group: GroupId) {
        let Some(store) = self.store() else { return };
        self.snapshots.lock().groups.remove(&group);
        if let Err(e) = store.drop_replica(group) {
            warn!(
                group,
                "cannot remove a stopped replica's data from disk: {e}"
            );
        }
    }

    /// Stores the latest metadata (for the next restart's partition count and peers).
    pub(super) fn persist_meta(&self, meta: &ClusterMeta) {
        let Some(store) = self.store() else { return };
        match serde_json::to_vec(meta) {
            Ok(json) => {
                if let Err(e) = store.put_meta(&json) {
                    warn!("cannot store the cluster metadata: {e}");
                }
            }
            Err(e) => warn!("cannot encode the cluster metadata: {e}"),
        }
    }

    /// Snapshot figures.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        self.snapshots.lock().stats.clone()
    }

    /// The persistence mode.
    pub fn persistence(&self) -> Persistence {
        self.settings.persist.mode
    }

    /// Bytes the data directory's database takes (0 without persistence).
    pub fn disk_bytes(&self) -> u64 {
        self.store().map_or(0, |s| s.size_on_disk())
    }

    /// Writes a snapshot of every group (or of `partition`) hosted here now. Returns
    /// (group, applied index, bytes, write pause) per written snapshot.
    ///
    /// # Errors
    /// When persistence is off or a write fails.
    pub async fn snapshot_now(
        &self,
        partition: Option<u32>,
    ) -> anyhow::Result<Vec<(GroupId, Written)>> {
        anyhow::ensure!(
            self.store().is_some(),
            "this node runs with persistence `none`: there is nothing to write snapshots to"
        );
        let mut groups = self.all_groups();
        groups.sort_by_key(|g| g.id);
        if let Some(p) = partition {
            groups.retain(|g| g.id == p);
            anyhow::ensure!(
                !groups.is_empty(),
                "this node holds no replica of partition {p}"
            );
        }
        let mut out = Vec::new();
        for g in groups {
            out.push((g.id, self.write_snapshot(&g).await?));
        }
        Ok(out)
    }

    /// Writes the snapshots that are due (`snapshot-writes` entries or `snapshot-interval`).
    pub(super) async fn snapshot_due(&self) {
        let settings = &self.settings.persist;
        let mut groups = self.all_groups();
        groups.sort_by_key(|g| g.id);
        for g in groups {
            let applied = g.sm.last_applied_index().unwrap_or(0);
            let (index, at) = self
                .snapshots
                .lock()
                .groups
                .get(&g.id)
                .map_or((0, None), |(i, at, _)| (*i, Some(*at)));
            let behind = applied.saturating_sub(index);
            let due = behind >= settings.snapshot_writes.max(1)
                || (behind > 0 && at.is_none_or(|at| at.elapsed() >= settings.snapshot_interval));
            if !due {
                continue;
            }
            if let Err(e) = self.write_snapshot(&g).await {
                warn!(group = g.id, "cannot write a snapshot: {e:#}");
            }
        }
    }

    async fn write_snapshot(&self, g: &Arc<Group>) -> anyhow::Result<Written> {
        let store = self.store().cloned().context("persistence is off")?;
        let _one = self.snapshots.writing.lock().await;
        let started = Instant::now();
        let group = g.clone();
        let written = tokio::task::spawn_blocking(move || disk::write_snapshot(&store, &group))
            .await
            .context("snapshot task")?
            .with_context(|| format!("cannot write the snapshot of group {}", g.id))?;
        self.snapshots.record(g.id, &written, started.elapsed());
        Ok(written)
    }

    /// The checkpoint of a clean shutdown (the groups' Raft has stopped): every group's
    /// snapshot, vote and log tail, then the clean mark.
    pub(super) async fn checkpoint(&self, groups: &[Arc<Group>]) {
        let Some(store) = self.store().cloned() else {
            return;
        };
        if self.node_id() == 0 {
            return;
        }
        let _one = self.snapshots.writing.lock().await;
        let started = Instant::now();
        let groups = groups.to_vec();
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<(usize, u64)> {
            let mut bytes = 0;
            for g in &groups {
                bytes += disk::checkpoint(&store, g)?.bytes;
            }
            store.flush()?;
            store.set_clean(true)?;
            Ok((groups.len(), bytes))
        })
        .await;
        match result {
            Ok(Ok((n, bytes))) => info!(
                groups = n,
                bytes,
                ms = started.elapsed().as_millis() as u64,
                "wrote the shutdown checkpoint; a restart will be exact"
            ),
            Ok(Err(e)) => error!("cannot write the shutdown checkpoint: {e}"),
            Err(e) => error!("shutdown checkpoint task failed: {e}"),
        }
    }

    /// Comes back as the node stored in the data directory (see [`Restart::plan`]).
    ///
    /// # Errors
    /// When a group cannot start from its stored state.
    pub async fn restore(
        self: &Arc<Self>,
        identity: Identity,
        meta: ClusterMeta,
        mut groups: BTreeMap<GroupId, (ReplicaId, LoadedGroup)>,
        snapshots_only: bool,
    ) -> anyhow::Result<()> {
        let _guard = self.assign_lock.lock().await;
        let node_id = identity.node_id;
        let store = self.store().cloned().context("persistence is off")?;
        // The metadata and the identity carry the same id (both 0 when written by a
        // raftcache without cluster ids: the node then stays in "cluster 0", which only
        // nodes of that same old cluster share; see ARCHITECTURE.md).
        let mut meta = meta;
        if meta.cluster_id == 0 {
            meta.cluster_id = identity.cluster_id;
        }
        let cluster_id = meta.cluster_id;
        let engine = self.take_identity(node_id, meta)?;
        let (meta_replica, meta_state) = groups
            .remove(&META_GROUP)
            .context("no meta replica stored")?;
        let mut indexes = vec![(META_GROUP, meta_state.snapshot_index())];
        self.host(
            META_GROUP,
            meta_replica,
            self.meta_engine.clone(),
            Some(meta_state),
        )
        .await?;
        let mut keys = 0;
        for (p, (replica, state)) in groups {
            indexes.push((p, state.snapshot_index()));
            keys += state.snapshot.as_ref().map_or(0, |s| s.keys);
            self.host(p, replica, engine.clone(), Some(state)).await?;
        }
        {
            let mut book = self.snapshots.lock();
            for (g, index) in &indexes {
                book.groups.insert(*g, (*index, Instant::now(), 0));
            }
        }
        // What was loaded is in memory now. In `snapshot` mode the vote and log stored by
        // the clean shutdown would be stale by the next crash: drop them. Either way the
        // directory is no longer clean until the next clean shutdown.
        if self.settings.persist.mode != Persistence::Durable {
            store.clear_raft_state()?;
        }
        store.set_identity(&Identity {
            persistence: self.settings.persist.mode,
            cluster_id,
            ..identity
        })?;
        store.set_clean(false)?;
        self.serve_as(node_id);
        info!(
            node = node_id,
            groups = indexes.len(),
            keys,
            snapshots_only,
            "restored from the data directory; catching up from the leaders"
        );
        Ok(())
    }
}
