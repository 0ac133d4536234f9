//! The one place where node errors become gRPC statuses with an `ErrorDetail`.

use crate::error::NodeError;
use crate::storage::StorageError;
use raftcache_proto::tonic::Status;
use raftcache_proto::v1::{ErrorCode, ErrorDetail};

/// The error code of `err`, also used as the `result` label of `raftcache_ops_total`.
pub fn error_code(err: &NodeError) -> ErrorCode {
    match err {
        NodeError::Storage(e) => match e {
            StorageError::EmptyKey => ErrorCode::EmptyKey,
            StorageError::KeyTooLarge { .. } => ErrorCode::KeyTooLarge,
            StorageError::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
            StorageError::TtlOutOfRange { .. } => ErrorCode::TtlOutOfRange,
            StorageError::PartitionOutOfRange { .. } => ErrorCode::InvalidArgument,
            StorageError::LeaseTtlOutOfRange { .. } => ErrorCode::InvalidArgument,
            StorageError::OutOfMemory { .. } => ErrorCode::OutOfMemory,
            StorageError::NotAnInteger => ErrorCode::NotAnInteger,
            StorageError::IncrOverflow => ErrorCode::IncrOverflow,
            StorageError::InvalidFill(_) => ErrorCode::InvalidArgument,
        },
        NodeError::WrongEpoch { .. } => ErrorCode::WrongEpoch,
        NodeError::NotLeader { .. } => ErrorCode::NotLeader,
        NodeError::Unavailable(_) => ErrorCode::Unavailable,
        NodeError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        NodeError::LsnNotReached { .. } => ErrorCode::LsnNotReached,
        NodeError::Fenced { .. } => ErrorCode::Fenced,
        NodeError::Removed { .. } => ErrorCode::Removed,
        NodeError::WrongCluster { .. } => ErrorCode::WrongCluster,
        NodeError::ShuttingDown => ErrorCode::Unavailable,
        NodeError::Internal(_) => ErrorCode::Internal,
    }
}

/// Turns a node error into the status sent to the client.
pub fn to_status(err: &NodeError) -> Status {
    let mut detail = ErrorDetail::of(error_code(err));
    match err {
        NodeError::Storage(StorageError::KeyTooLarge { size, limit })
        | NodeError::Storage(StorageError::ValueTooLarge { size, limit }) => {
            detail.actual = Some(*size as u64);
            detail.limit = Some(*limit as u64);
        }
        NodeError::Storage(StorageError::TtlOutOfRange { ttl_ms, limit_ms })
        | NodeError::Storage(StorageError::LeaseTtlOutOfRange { ttl_ms, limit_ms }) => {
            detail.actual = Some(*ttl_ms);
            detail.limit = Some(*limit_ms);
        }
        NodeError::Storage(StorageError::OutOfMemory { used, limit, .. }) => {
            detail.actual = Some(*used);
            detail.limit = Some(*limit);
        }
        NodeError::Storage(StorageError::PartitionOutOfRange { partition, count }) => {
            detail.partition = Some(*partition);
            detail.limit = Some(u64::from(*count));
        }
        NodeError::WrongEpoch { current, .. } => detail.epoch = Some(*current),
        NodeError::LsnNotReached {
            partition,
            watermark,
            ..
        } => {
            detail.partition = Some(*partition);
            detail.actual = Some(*watermark);
        }
        NodeError::Fenced {
            partition, current, ..
        } => {
            detail.partition = Some(*partition);
            detail.limit = Some(*current);
        }
        NodeError::NotLeader {
            partition,
            leader,
            epoch,
        } => {
            detail.partition = *partition;
            if let Some((node, addr)) = leader {
                detail.leader_id = Some(*node);
                detail.leader_addr = Some(addr.clone());
            }
            detail.epoch = Some(*epoch);
        }
        _ => {}
    }
    detail.into_status(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftcache_proto::tonic::Code;

    #[test]
    fn size_errors_carry_size_and_limit() {
        let err = NodeError::Storage(StorageError::KeyTooLarge {
            size: 20000,
            limit: 16384,
        });
        let st = to_status(&err);
        assert_eq!(st.code(), Code::InvalidArgument);
        let d = ErrorDetail::from_status(&st).unwrap();
        assert_eq!(d.code(), ErrorCode::KeyTooLarge);
        assert_eq!((d.actual, d.limit), (Some(20000), Some(16384)));
        assert!(st.message().contains("16384"), "{}", st.message());
    }

    #[test]
    fn out_of_memory_is_resource_exhausted() {
        let err = NodeError::Storage(StorageError::OutOfMemory {
            used: 10,
            needed: 5,
            limit: 12,
        });
        let st = to_status(&err);
        assert_eq!(st.code(), Code::ResourceExhausted);
        assert_eq!(
            ErrorDetail::from_status(&st).unwrap().code(),
            ErrorCode::OutOfMemory
        );
    }
}
