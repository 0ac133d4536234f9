//! One Raft group hosted on this node: a partition's (or the meta group's) replica.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::rt::WatchReceiver;
use openraft::{Config, ReadPolicy, ServerState, SnapshotPolicy};

use super::disk::LoadedGroup;
use super::network::{GroupId, GroupNetwork, Transport, META_GROUP};
use super::state_machine::{PartitionStateMachine, Tickets};
use super::types::{Proposal, ReplicaId, ReplicaNode, Response, TypeConfig, Vote};
use super::MemLogStore;
use crate::persist::Store;
use crate::storage::{Clock, Engine, PartitionId, SystemClock};
use crate::watch::WatchHub;

/// The openraft settings shared by every group.
pub type RaftConfig = Arc<Config>;

/// The openraft handle of one group.
pub type RaftHandle = openraft::Raft<TypeConfig, PartitionStateMachine>;

/// Timing of every group. Heartbeats are sent by the node's ticker for all groups at
/// once (see [`crate::raft::network`]), every [`HEARTBEAT`].
///
/// Failover takes up to about two election timeouts: a follower whose timer fires while
/// the other follower still honours the dead leader's lease (`ELECTION_MAX_MS`, openraft's
/// leader lease) is refused once, and the next timer wins. With 200..400 ms that is
/// 0.4..0.8 s plus the election round trip. openraft's own `heartbeat_interval` only sets its internal tick (13/64 of
/// it) and timeouts of heartbeats it would send itself, so it is larger than ours to
/// keep idle groups cheap.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
const OPENRAFT_HEARTBEAT_MS: u64 = 190;
const ELECTION_MIN_MS: u64 = 200;
const ELECTION_MAX_MS: u64 = 400;
/// How recent a quorum acknowledgement must be for [`Group::lease_read_ready`]: half
/// of openraft's leader lease (`ELECTION_MAX_MS`), leaving the rest for clock rate
/// differences and the time the metrics take to be published.
const LEASE_READ_FAST: Duration = Duration::from_millis(ELECTION_MAX_MS / 2);
/// Log entries after which a snapshot is built and the log before it purged. Small, so
/// that a memory-only log never holds much beyond the data itself.
const SNAPSHOT_EVERY: u64 = 300;
const LOGS_KEPT: u64 = 50;

/// The openraft config shared by all groups.
///
/// # Errors
///
/// If openraft rejects the values (a bug).
pub fn raft_config() -> Result<RaftConfig, String> {
    let config = Config {
        cluster_name: "raftcache".into(),
        heartbeat_interval: OPENRAFT_HEARTBEAT_MS,
        // No suppression of openraft's own heartbeats (they are off; ours are explicit).
        heartbeat_min_interval: Some(0),
        election_timeout_min: ELECTION_MIN_MS,
        election_timeout_max: ELECTION_MAX_MS,
        enable_heartbeat: false,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
        max_in_snapshot_log_to_keep: LOGS_KEPT,
        install_snapshot_timeout: 10_000,
        api_batch_capacity: 64,
        // A restarted leader must win a new election (and commit its blank entry) before
        // it serves: restored as leader at once, its commit index may be behind the
        // one it acknowledged (the committed id is stored without a flush), and a
        // LINEARIZABLE read would be answered from a stale state. Found by
        // raftcache-jepsen (counter, --persistence durable, kill-all).
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| format!("invalid raft config: {e}"))
}

/// What a follower knows about its freshness: when it last accepted an append from its
/// leader, and the leader's commit index carried by it.
#[derive(Debug, Clone)]
struct Freshness {
    at: Instant,
    leader_commit: u64,
    /// The leader's vote carried by the append; the record only counts while this
    /// replica's vote is still that one (not after it led, voted or saw a newer term).
    vote: Vote,
}

/// One group's replica on this node.
pub struct Group {
    /// The group.
    pub id: GroupId,
    /// This node's replica id in the group.
    pub replica: ReplicaId,
    /// The openraft handle.
    pub raft: RaftHandle,
    /// The state machine (data in the engine).
    pub sm: PartitionStateMachine,
    /// The log store (a handle sharing openraft's), read for the shutdown checkpoint.
    pub(crate) log: MemLogStore,
    fresh: Mutex<Option<Freshness>>,
    /// When this replica was first seen missing from the desired placement.
    pub(crate) unwanted_since: Mutex<Option<Instant>>,
    /// When this node last asked for a leadership transfer in this group.
    pub(crate) last_transfer: Mutex<Option<Instant>>,
    /// When this node last proposed a membership step in this group.
    pub(crate) last_change: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("id", &self.id)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// What one replica knows of its group, read from openraft's metrics in one go.
#[derive(Debug, Clone, Default)]
pub struct GroupView {
    /// The current leader, if known.
    pub leader: Option<ReplicaId>,
    /// The current term.
    pub term: u64,
    /// The index of the last applied entry (0 before any).
    pub applied: u64,
    /// The index of the last log entry (0 before any).
    pub last_index: u64,
    /// The voters of the effective membership.
    pub voters: BTreeSet<ReplicaId>,
    /// The learners of the effective membership.
    pub learners: BTreeSet<ReplicaId>,
    /// Whether the membership is a joint configuration (a change in progress).
    pub joint: bool,
    /// On the leader: the index of the last entry each follower is known to hold.
    pub matched: BTreeMap<ReplicaId, u64>,
}

impl GroupView {
    /// Whether `replica` is a member (voter or learner).
    pub fn counts(&self, replica: ReplicaId) -> bool {
        self.voters.contains(&replica) || self.learners.contains(&replica)
    }
}

/// How a group's replica uses the disk.
#[derive(Debug, Default)]
pub struct GroupDisk {
    /// Durable mode: the store its vote, log and installed snapshots are written to.
    pub durable: Option<Arc<Store>>,
    /// State loaded from disk to start from (a restart).
    pub restored: Option<LoadedGroup>,
}

/// A failed write: not the leader (with the leader's replica id and address when known),
/// or the group cannot take writes now.
#[derive(Debug)]
pub enum WriteError {
    /// Another replica leads (or none is known).
    NotLeader(Option<(ReplicaId, String)>),
    /// The group is shutting down or failed.
    Unavailable(String),
}

impl Group {
    /// Starts a replica of `id` with an empty log (it learns everything from the leader,
    /// or from [`initialize`](Self::initialize) when it founds the group), or with the
    /// state `disk.restored` loaded from disk. With `disk.durable`, its vote and log are
    /// written through to the store. With `watch`, the replica's changes go to that
    /// change feed (partition groups; the meta group has none).
    ///
    /// # Errors
    ///
    /// When openraft cannot start the group or the loaded snapshot does not fit.
    // Each argument is a separate handle the node shares with all its groups.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        id: GroupId,
        replica: ReplicaId,
        config: RaftConfig,
        transport: Transport,
        engine: Arc<Engine>,
        tickets: Arc<Tickets>,
        disk: GroupDisk,
        watch: Option<Arc<WatchHub>>,
    ) -> Result<Arc<Group>, String> {
        let partition = if id == META_GROUP {
            PartitionId(0)
        } else {
            PartitionId(id)
        };
        let mut sm = PartitionStateMachine::with_engine(partition, engine, tickets);
        let durable = disk.durable.map(|store| (store, id));
        if let Some((store, _)) = &durable {
            sm = sm.with_disk(store.clone(), id);
        }
        let log = match disk.restored {
            None => MemLogStore::restored(Default::default(), durable),
            Some(loaded) => {
                if let Some(snapshot) = loaded.snapshot {
                    sm.restore(snapshot)
                        .map_err(|e| format!("cannot restore group {id}: {e}"))?;
                }
                MemLogStore::restored(loaded.log, durable)
            }
        };
        if let Some(hub) = watch {
            sm = sm.with_watch(hub);
        }
        let raft = openraft::Raft::new(
            replica,
            config,
            GroupNetwork::new(transport, id),
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| format!("cannot start raft group {id}: {e}"))?;
        Ok(Arc::new(Group {
            id,
            replica,
            raft,
            sm,
            log,
            fresh: Mutex::new(None),
            unwanted_since: Mutex::new(None),
            last_transfer: Mutex::new(None),
            last_change: Mutex::new(None),
        }))
    }

    /// Founds the group with these voters.
    ///
    /// # Errors
    ///
    /// When openraft refuses (already initialized).
    pub async fn initialize(&self, voters: BTreeMap<ReplicaId, ReplicaNode>) -> Result<(), String> {
        self.raft
            .initialize(voters)
            .await
            .map_err(|e| format!("cannot initialize group {}: {e}", self.id))
    }

    /// A consistent view of the group as this replica sees it.
    pub fn view(&self) -> GroupView {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        GroupView {
            leader: m.current_leader,
            term: m.current_term,
            applied: m.last_applied.map_or(0, |l| l.index),
            last_index: m.last_log_index.unwrap_or(0),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            joint: membership.get_joint_config().len() > 1,
            matched: m
                .replication
                .iter()
                .flatten()
                .filter_map(|(r, l)| Some((*r, l.as_ref()?.index)))
                .collect(),
        }
    }

    /// Whether this replica leads the group now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Whether a lease read may be served at once from what openraft last published,
    /// without a round trip to the group's core: this replica leads, it alone is a
    /// quorum or a quorum acknowledged it less than [`LEASE_READ_FAST`] ago (half the
    /// leader lease, `ELECTION_MAX_MS`), and it has applied everything committed,
    /// including an entry of its own term (so every entry of earlier terms; writes are
    /// acknowledged only once applied here). Published metrics lag the core, which only
    /// makes them older: a deposed leader whose last quorum acknowledgement is that
    /// recent is still inside the lease during which no other leader can be elected.
    /// When this says no, the caller asks the core
    /// ([`ensure_linearizable`](Self::ensure_linearizable)).
    pub fn lease_read_ready(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        if m.state != ServerState::Leader || m.current_leader != Some(m.id) {
            return false;
        }
        let Some(applied) = &m.last_applied else {
            return false;
        };
        // Everything committed, by a quorum or locally, is applied.
        let committed = [&m.cluster_committed, &m.local_committed]
            .into_iter()
            .flatten()
            .map(|c| c.index)
            .max()
            .unwrap_or(0);
        if applied.index < committed || applied.leader_id.term != m.current_term {
            return false;
        }
        let mut voters = m.membership_config.membership().voter_ids();
        if voters.next() == Some(m.id) && voters.next().is_none() {
            return true;
        }
        m.last_quorum_acked
            .as_ref()
            .is_some_and(|at| openraft::Instant::elapsed(&**at) < LEASE_READ_FAST)
    }

    /// The current leader's replica id and address, if known.
    pub fn leader(&self) -> Option<(ReplicaId, String)> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let leader = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Some((leader, addr))
    }

    /// Proposes `proposal` and waits until it is applied here.
    ///
    /// # Errors
    ///
    /// [`WriteError`].
    pub async fn write(&self, proposal: Proposal) -> Result<Response, WriteError> {
        match self.raft.client_write(proposal).await {
            Ok(resp) => Ok(resp.response().clone()),
            Err(e) => Err(write_error(e)),
        }
    }

    /// Waits until a read at `policy` is linearizable here (the state machine has applied
    /// everything committed before the read began, and this replica still leads).
    ///
    /// # Errors
    ///
    /// [`WriteError`] (not the leader, or unavailable).
    pub async fn ensure_linearizable(&self, policy: ReadPolicy) -> Result<(), WriteError> {
        match self.raft.ensure_linearizable(policy).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader(f.leader_id.map(|id| {
                    (id, f.leader_node.map(|n| n.addr).unwrap_or_default())
                })))
            }
            Err(e) => Err(WriteError::Unavailable(e.to_string())),
        }
    }

    /// Handles an append from the leader and remembers how fresh it makes this replica:
    /// as fresh as the moment the leader sent it (`sent_at_ms`, the sender's wall clock),
    /// never the moment it arrived.
    ///
    /// # Errors
    ///
    /// openraft's error (fatal: the group stopped).
    pub async fn append_entries(
        &self,
        req: AppendEntriesRequest<TypeConfig>,
        sent_at_ms: u64,
    ) -> Result<AppendEntriesResponse<TypeConfig>, String> {
        let leader_commit = req.leader_commit.map(|id| id.index);
        let vote = req.vote;
        let resp = self
            .raft
            .append_entries(req)
            .await
            .map_err(|e| e.to_string())?;
        tracing::trace!(
            group = self.id,
            ?leader_commit,
            success = resp.is_success(),
            sent_at_ms,
            "append"
        );
        // Only a message that tells the leader's commit index can date freshness: one
        // without it (a new leader's first heartbeats) says nothing about what this
        // replica misses, and under one vote the commit index only grows, so a message
        // carrying less than already seen is older news.
        if let (true, Some(commit)) = (resp.is_success(), leader_commit) {
            let age = Duration::from_millis(SystemClock.now_ms().saturating_sub(sent_at_ms));
            let now = Instant::now();
            let mut fresh = self.fresh.lock().unwrap_or_else(PoisonError::into_inner);
            let known = fresh
                .as_ref()
                .filter(|f| f.vote == vote)
                .map_or(0, |f| f.leader_commit);
            if commit >= known {
                *fresh = Some(Freshness {
                    at: now.checked_sub(age).unwrap_or(now),
                    leader_commit: commit,
                    vote,
                });
            }
        }
        Ok(resp)
    }

    /// How stale this follower's applied state may be: the time since the last append
    /// from the leader whose commit index it has applied; `None` when it never heard from
    /// a leader or has not applied what the last append said was committed.
    pub fn staleness(&self) -> Option<Duration> {
        let fresh = self
            .fresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let current_vote = self.raft.metrics().borrow_watched().vote;
        if current_vote != fresh.vote {
            return None;
        }
        let applied = self.sm.last_applied_index().ok()?;
        (applied >= fresh.leader_commit).then(|| fresh.at.elapsed())
    }
}

fn write_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteError::NotLeader(
            f.leader_id
                .map(|id| (id, f.leader_node.map(|n| n.addr).unwrap_or_default())),
        ),
        other => WriteError::Unavailable(other.to_string()),
    }
}
