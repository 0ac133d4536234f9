//! Errors returned by the [`Engine`](super::Engine).

/// Why the engine refused a request. Each message is one line naming the limit involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// Keys must be at least one byte long.
    #[error("key is empty")]
    EmptyKey,
    /// The key is longer than `max_key_bytes`.
    #[error("key is {size} bytes, over the {limit}-byte limit")]
    KeyTooLarge {
        /// Size of the key.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The value is longer than `max_value_bytes`.
    #[error("value is {size} bytes, over the {limit}-byte limit")]
    ValueTooLarge {
        /// Size of the value.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The TTL is longer than [`MAX_TTL_MS`](super::MAX_TTL_MS) (or the deadline would not fit).
    #[error("TTL of {ttl_ms} ms is over the {limit_ms} ms (100-year) limit")]
    TtlOutOfRange {
        /// The requested TTL.
        ttl_ms: u64,
        /// The largest TTL accepted.
        limit_ms: u64,
    },
    /// A lease lifetime outside `1..=`[`MAX_LEASE_TTL_MS`](super::MAX_LEASE_TTL_MS) (0 asks
    /// for the default).
    #[error(
        "lease_ttl_ms of {ttl_ms} is out of range: use 1 to {limit_ms} ms, or 0 for the default"
    )]
    LeaseTtlOutOfRange {
        /// The requested lifetime.
        ttl_ms: u64,
        /// The longest lifetime accepted.
        limit_ms: u64,
    },
    /// No such partition on this node.
    #[error("partition {partition} is out of range: there are {count} partitions")]
    PartitionOutOfRange {
        /// The partition asked for.
        partition: u32,
        /// How many partitions exist (valid ids are `0..count`).
        count: u32,
    },
    /// The write would take accounted memory past `max_memory` and nothing could be evicted
    /// (or the policy is `noeviction`).
    #[error("out of memory: {used} bytes used, {needed} more needed, over the {limit}-byte max-memory limit")]
    OutOfMemory {
        /// Accounted bytes in use when the write was refused.
        used: u64,
        /// Bytes the write would have added.
        needed: u64,
        /// The configured `max_memory`.
        limit: u64,
    },
    /// INCR on a value that is not a base-10 signed 64-bit integer.
    #[error("value is not an integer or out of range")]
    NotAnInteger,
    /// INCR whose result would not fit in a signed 64-bit integer.
    #[error("increment or decrement would overflow")]
    IncrOverflow,
    /// A cache-aside fill whose options contradict each other.
    #[error("{0}")]
    InvalidFill(String),
}

impl From<super::IncrError> for StorageError {
    fn from(err: super::IncrError) -> Self {
        match err {
            super::IncrError::NotAnInteger => StorageError::NotAnInteger,
            super::IncrError::Overflow => StorageError::IncrOverflow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_limit() {
        assert_eq!(
            StorageError::KeyTooLarge {
                size: 20000,
                limit: 16384
            }
            .to_string(),
            "key is 20000 bytes, over the 16384-byte limit"
        );
        assert_eq!(
            StorageError::TtlOutOfRange {
                ttl_ms: 5,
                limit_ms: 4
            }
            .to_string(),
            "TTL of 5 ms is over the 4 ms (100-year) limit"
        );
        assert_eq!(
            StorageError::PartitionOutOfRange {
                partition: 16,
                count: 16
            }
            .to_string(),
            "partition 16 is out of range: there are 16 partitions"
        );
        assert_eq!(
            StorageError::OutOfMemory {
                used: 90,
                needed: 20,
                limit: 100
            }
            .to_string(),
            "out of memory: 90 bytes used, 20 more needed, over the 100-byte max-memory limit"
        );
    }
}
