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
