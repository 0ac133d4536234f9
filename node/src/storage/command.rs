//! The replicated write commands and their outcomes.
//!
//! An [`Op`] is everything a replica needs to apply a write deterministically: the command
//! plus the proposer's notion of "now" (used for expiry decisions inside the state machine,
//! which never reads a clock itself).

use bytes::Bytes;

/// One replicated write: a [`Command`] stamped with the proposer's clock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Op {
    /// Wall-clock ms chosen by the proposer (later: the Raft leader). Entries whose deadline
    /// is `<= now_ms` count as absent while this op is applied.
    pub now_ms: u64,
    /// What to do.
    pub cmd: Command,
}

/// A write to one partition's state machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Command {
    /// Store `value` under `key` if `condition` holds.
    Set {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
        /// Absolute deadline (ms since epoch); `None` stores the key without TTL unless
        /// `keep_ttl` keeps an existing one.
        expire_at_ms: Option<u64>,
        /// Keep the deadline of the live entry being replaced (Redis `KEEPTTL`). When the
        /// key is absent, `expire_at_ms` is used instead.
        keep_ttl: bool,
        /// When to apply.
        condition: Condition,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: Bytes,
    },
    /// Add `delta` to the decimal integer stored at `key` (missing = 0), keeping its TTL.
    Incr {
        /// The key.
        key: Bytes,
        /// The signed amount to add.
        delta: i64,
    },
    /// Set (`Some`) or remove (`None`, "persist") the deadline of a live key.
    /// A deadline `<= now_ms` deletes the key, as in Redis.
    Expire {
        /// The key.
        key: Bytes,
        /// The new absolute deadline, or `None` to persist.
        expire_at_ms: Option<u64>,
    },
    /// Remove these keys (live or expired). Eviction is decided by the proposer and
    /// replayed identically on every replica.
    Evict {
        /// The keys to remove; missing ones are skipped.
        keys: Vec<Bytes>,
    },
    /// Remove up to `max` keys whose deadline is `<= now_ms`, earliest deadline first
    /// (ties by key order).
    Reclaim {
        /// Upper bound on the keys removed by this op.
        max: usize,
    },
}

impl Command {
    /// The single key this command writes, if it is a single-key command.
    pub fn key(&self) -> Option<&Bytes> {
        match self {
            Command::Set { key, .. }
            | Command::Delete { key }
            | Command::Incr { key, .. }
            | Command::Expire { key, .. } => Some(key),
            Command::Evict { .. } | Command::Reclaim { .. } => None,
        }
    }
}

/// The precondition of a [`Command::Set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Condition {
    /// Always store.
    #[default]
    Always,
    /// Store only if the key is absent or expired (Redis `NX`).
    IfAbsent,
    /// Store only if the key is live (Redis `XX`).
    IfPresent,
    /// Store only if the key is live and its version equals this one (compare-and-set).
    IfVersion(u64),
}

/// What applying an [`Op`] did. One variant per [`Command`] variant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// Result of [`Command::Set`]. When `applied`, `version` is the new version (the op's
    /// index); otherwise it is the version of the live entry, or 0 when the key is absent.
    Set {
        /// Whether the condition held and the value was stored.
        applied: bool,
        /// See the variant docs.
        version: u64,
    },
    /// Result of [`Command::Delete`]: whether a live key was removed.
    Deleted(bool),
    /// Result of [`Command::Incr`]: the new value and version, or why nothing changed.
    Incr(Result<(i64, u64), IncrError>),
    /// Result of [`Command::Expire`]: with a deadline, whether the key was live; when
    /// persisting, whether the key was live *and* had a deadline (Redis `PERSIST`).
    Expire(bool),
    /// Result of [`Command::Evict`]: how many keys were removed.
    Evicted(usize),
    /// Result of [`Command::Reclaim`]: how many expired keys were removed.
    Reclaimed(usize),
}

/// Why an [`Command::Incr`] left the key unchanged.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize,
)]
pub enum IncrError {
    /// The stored value is not a base-10 signed 64-bit integer.
    #[error("value is not an integer or out of range")]
    NotAnInteger,
    /// The result would not fit in a signed 64-bit integer.
    #[error("increment or decrement would overflow")]
    Overflow,
}

/// Parses a stored value as INCR does: ASCII base-10 `i64`, an optional leading `-`,
/// at least one digit, nothing else (no spaces, no `+`). Leading zeros and `-0` are accepted.
pub(crate) fn parse_i64(value: &[u8]) -> Option<i64> {
    let digits = value.strip_prefix(b"-").unwrap_or(value);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // All ASCII, so this is valid UTF-8; from_str then only rejects out-of-range values.
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_i64_follows_redis_rules() {
        for (input, want) in [
            (&b"0"[..], Some(0)),
            (b"-0", Some(0)),
            (b"42", Some(42)),
            (b"-42", Some(-42)),
            (b"007", Some(7)),
            (b"9223372036854775807", Some(i64::MAX)),
            (b"-9223372036854775808", Some(i64::MIN)),
            (b"9223372036854775808", None),
            (b"", None),
            (b"-", None),
            (b"+1", None),
            (b" 1", None),
            (b"1 ", None),
            (b"abc", None),
            (b"1.0", None),
            (b"--1", None),
            (b"1e3", None),
            ("\u{0661}".as_bytes(), None),
        ] {
            assert_eq!(
                parse_i64(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn incr_error_messages() {
        assert_eq!(
            IncrError::NotAnInteger.to_string(),
            "value is not an integer or out of range"
        );
        assert_eq!(
            IncrError::Overflow.to_string(),
            "increment or decrement would overflow"
        );
    }
}
