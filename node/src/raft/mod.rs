//! openraft storage for one partition: the Raft log and the state machine that drives
//! [`PartitionState`](crate::storage::PartitionState). No networking, no cluster logic.
//!
//! # Layout
//!
//! ```text
//! types.rs          TypeConfig (D = Op, R = Option<Outcome>, NodeId = u64 replica id,
//!                   Node = BasicNode), aliases for the openraft types used here
//! log_store.rs      MemLogStore: vote, committed id, entries (RaftLogStorage + RaftLogReader),
//!                   written through to sled in durable mode
//! disk.rs           a group's state on disk: load at restart, periodic snapshot, the
//!                   checkpoint of a clean shutdown
//! state_machine.rs  PartitionStateMachine: apply ops at their log index, build / install
//!   │               snapshots (RaftStateMachine + RaftSnapshotBuilder)
//!   └─ snapshot.rs  the versioned, checksummed binary snapshot format
//! ```
//!
//! openraft types stay inside this module: callers build a [`MemLogStore`] and a
//! [`PartitionStateMachine`] per partition, hand them to `openraft::Raft::new` (in the
//! partition group, next), and read the data through [`PartitionStateMachine::with_state`].

pub mod disk;
mod group;
mod log_limit;
mod log_store;
pub mod network;
pub mod snapshot;
mod state_machine;
mod types;

#[cfg(test)]
mod state_machine_test;
#[cfg(test)]
mod suite_test;
#[cfg(test)]
mod watch_test;

pub use group::{
    raft_config, Group, GroupDisk, GroupView, RaftConfig, RaftHandle, WriteError, HEARTBEAT,
};
pub use log_store::{LogContents, MemLogStore};
pub use network::{decode, encode, GroupId, Transport, META_GROUP};
pub use openraft::{ChangeMembers, ReadPolicy, ServerState};
pub use snapshot::{DecodedSnapshot, SnapshotError};
pub use state_machine::{PartitionStateMachine, Tickets};
pub use types::{
    CommittedLeaderId, Entry, EntryPayload, LogId, Membership, Proposal, ReplicaId, ReplicaNode,
    Response, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};
