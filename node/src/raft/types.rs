//! The openraft type configuration of one partition group, and short aliases for the
//! openraft types the rest of [`crate::raft`] uses.
//!
//! Only this module names openraft types; code outside `raft/` sees [`Op`], [`Outcome`]
//! and [`PartitionState`](crate::storage::PartitionState).

use std::fmt;

use bytes::Bytes;
use openraft::type_config::alias;

use crate::storage::{Command, Op, Outcome, RequestId};

/// A log entry's application data: the prepared [`Op`] plus who proposed it.
///
/// `origin` and `ticket` never influence what `apply` does (replicas stay deterministic);
/// they let the proposing node find the memory it reserved for this op when it applies
/// the op itself ([`Tickets`](super::Tickets)), so the op is never accounted twice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Proposal {
    /// The op to apply.
    pub op: Op,
    /// The node id of the proposer (0: none).
    pub origin: u64,
    /// The proposer's reservation ticket (0: nothing reserved).
    pub ticket: u64,
    /// The client request this op carries out: applied at most once per id (see
    /// `storage::RequestLog`).
    pub request: Option<RequestId>,
}

impl From<Op> for Proposal {
    fn from(op: Op) -> Self {
        Proposal {
            op,
            origin: 0,
            ticket: 0,
            request: None,
        }
    }
}

openraft::declare_raft_types!(
    /// Type configuration of one partition's Raft group.
    ///
    /// - `D = Op`: a log entry carries exactly what
    ///   [`PartitionState::apply`](crate::storage::PartitionState::apply) consumes, already
    ///   prepared by the leader (validated, TTL turned into a deadline, `now_ms` stamped).
    /// - `R = Response` (`Option<Outcome>`): openraft also asks the state machine for a
    ///   response to blank and membership entries (e.g. the reply to `change_membership`),
    ///   and [`Outcome`] has no "nothing applied" value; those entries answer `None`, a normal
    ///   entry always answers `Some(outcome)`.
    /// - `NodeId = u64`: a replica id assigned by the meta group and never reused, so a
    ///   memory-only node that restarts (and lost its log) joins under a new id.
    /// - `Node = BasicNode`: the replica's node raft address (`raft-addr`), all the transport
    ///   needs to reach it; its `Default` is also what openraft's storage suite requires.
    /// - Everything else is openraft's default: `Term = u64`, the "advanced" leader id (several
    ///   leaders per term, totally ordered; log entries then carry term and node id),
    ///   `Vote`, `Entry`, the tokio runtime.
    ///
    /// The snapshot type is not here: in 0.10 it belongs to the state machine, see
    /// [`SnapshotData`].
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = ReplicaId,
        Node = ReplicaNode,
);

/// What applying one log entry answers: `Some` for a normal entry, `None` for blank and
/// membership entries.
pub type Response = Option<Outcome>;

/// A replica id: the openraft node id of one replica of one partition.
pub type ReplicaId = u64;

/// How to reach a replica: its node's raft address.
pub type ReplicaNode = openraft::BasicNode;

/// The snapshot payload: the encoded form of [`crate::raft::snapshot`]. Immutable and
/// reference-counted, so `get_current_snapshot` and sending it to several followers never
/// copy it, and a durable store can write it as one blob.
pub type SnapshotData = Bytes;

/// The committed leader id stored in each log id (term and node id).
pub type CommittedLeaderId = alias::CommittedLeaderIdOf<TypeConfig>;
/// A log id: committed leader id and index.
pub type LogId = alias::LogIdOf<TypeConfig>;
/// A log entry.
pub type Entry = alias::EntryOf<TypeConfig>;
/// A log entry payload (blank, normal [`Op`], membership).
pub type EntryPayload = alias::EntryPayloadOf<TypeConfig>;
/// The persisted vote.
pub type Vote = alias::VoteOf<TypeConfig>;
/// A membership config (voters, learners and their addresses).
pub type Membership = openraft::Membership<ReplicaId, ReplicaNode>;
/// A membership config with the log id of the entry that set it.
pub type StoredMembership = alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata: last log id and membership covered by the snapshot.
pub type SnapshotMeta = alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot: metadata and [`SnapshotData`].
pub type Snapshot = alias::SnapshotOf<TypeConfig, SnapshotData>;

/// openraft requires `Display` of its app data (for logs). This prints the command kind and
/// sizes, never key or value bytes (which may be large or sensitive).
impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.op, f)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cmd {
            Command::Set { key, value, .. } => {
                write!(f, "set(key {}B, value {}B)", key.len(), value.len())?
            }
            Command::Delete { key } => write!(f, "delete(key {}B)", key.len())?,
            Command::Incr { key, delta } => write!(f, "incr(key {}B, {delta})", key.len())?,
            Command::Expire { key, expire_at_ms } => {
                write!(f, "expire(key {}B, {expire_at_ms:?})", key.len())?
            }
            Command::Evict { keys } => write!(f, "evict({} keys)", keys.len())?,
            Command::Flush { keep } => write!(f, "flush(keep {}B)", keep.len())?,
            Command::Reclaim { max } => write!(f, "reclaim(max {max})")?,
            Command::Cdc { lsn, changes, .. } => {
                write!(f, "cdc(lsn {lsn}, {} changes)", changes.len())?
            }
            Command::CdcTx {
                lsn, xid, changes, ..
            } => write!(f, "cdc(lsn {lsn}, xid {xid}, {} changes)", changes.len())?,
            Command::SnapshotFill {
                key, value, token, ..
            } => write!(
                f,
                "snapshot-fill(key {}B, value {}B, token {token})",
                key.len(),
                value.len()
            )?,
            Command::Lease { key, .. } => write!(f, "lease(key {}B)", key.len())?,
            Command::ReleaseLease { key, token } => {
                write!(f, "release-lease(key {}B, token {token})", key.len())?
            }
            Command::Fill {
                key, value, token, ..
            } => write!(
                f,
                "fill(key {}B, value {}B, token {token})",
                key.len(),
                value.len()
            )?,
            Command::Redis { key, op } => write!(f, "redis-{}(key {}B)", op.name(), key.len())?,
        }
        write!(f, "@{}", self.now_ms)
    }
}
