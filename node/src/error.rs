//! Errors of the node's request path.
//!
//! Expected outcomes (a miss, a failed condition) are values, not errors. What is
//! here is turned into a gRPC status in exactly one place, [`crate::service::status`].

use crate::storage::StorageError;

/// A request the node refuses, with the fields a client needs to react.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The storage engine refused the operation (sizes, memory, INCR, TTL).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The request was routed with a different cluster-map epoch.
    #[error("request routed with cluster-map epoch {got}, this node is at epoch {current}; refresh the cluster map")]
    WrongEpoch {
        /// The epoch the client used.
        got: u64,
        /// This node's epoch.
        current: u64,
    },
    /// This node does not lead the partition (or the meta group) and cannot serve the
    /// request here.
    #[error("{}", not_leader_message(*partition, leader.as_ref()))]
    NotLeader {
        /// The partition; `None` for the meta group.
        partition: Option<u32>,
        /// The leader's node id and address, when known.
        leader: Option<(u64, String)>,
        /// This node's cluster-map epoch.
        epoch: u64,
    },
    /// The request cannot be served now (no quorum, election in progress, not yet part
    /// of a cluster); retrying later may work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A `min_lsn` read gave up: CDC had not applied Postgres up to `wanted` on the
    /// partition within the request's deadline.
    #[error("CDC has not reached LSN {} on partition {partition} (it is at {}); is raftcache-cdc running?", fmt_lsn(*wanted), fmt_lsn(*watermark))]
    LsnNotReached {
        /// The partition.
        partition: u32,
        /// The LSN asked for.
        wanted: u64,
        /// The partition's CDC watermark.
        watermark: u64,
    },
    /// A CDC batch with a fencing token older than one the partition accepted.
    #[error("fenced: partition {partition} accepted CDC token {current}, this batch has {got}; a newer worker holds the lease")]
    Fenced {
        /// The partition.
        partition: u32,
        /// The batch's token.
        got: u64,
        /// The partition's token.
        current: u64,
    },
    /// This node was removed from its cluster: it serves no keys any more.
    #[error("node {node} was removed from cluster {}; it can be shut down", fmt_cluster(*cluster))]
    Removed {
        /// The node id it had.
        node: u64,
        /// The cluster it was removed from.
        cluster: u64,
    },
    /// A request or peer message of another cluster than this node's.
    #[error("{what} belongs to cluster {}, this node to cluster {}; refresh the cluster map from the configured endpoints", fmt_cluster(*got), fmt_cluster(*mine))]
    WrongCluster {
        /// What was refused (`request`, `raft message from node 4`, ...).
        what: String,
        /// The cluster id it carried (0: none, an older raftcache).
        got: u64,
        /// This node's cluster id.
        mine: u64,
    },
    /// A malformed request (missing route, unknown enum value, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The node is shutting down.
    #[error("node is shutting down")]
    ShuttingDown,
    /// A broken invariant inside the node; the message says which.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result of the node's request path.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// A cluster id as logs and messages show it: 16 hex digits; `0` (no id: a node or
/// cluster of a raftcache version without cluster ids) as `none`.
pub fn fmt_cluster(id: u64) -> String {
    if id == 0 {
        "none".to_string()
    } else {
        format!("{id:016x}")
    }
}

/// An LSN as Postgres prints it (`16/B374D848`).
pub fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

fn not_leader_message(partition: Option<u32>, leader: Option<&(u64, String)>) -> String {
    let what = match partition {
        Some(p) => format!("partition {p}"),
        None => "the meta group".to_string(),
    };
    match leader {
        Some((node, addr)) => format!("this node does not lead {what}; node {node} at {addr} does"),
        None => format!("this node does not lead {what}; the leader is not known yet"),
    }
}
