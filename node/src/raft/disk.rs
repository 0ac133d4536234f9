//! A group's state on disk (see [`crate::persist`] for the modes and the layout): what a
//! restart loads, the periodic snapshot, and the checkpoint of a clean shutdown.

use std::io;
use std::time::Duration;

use super::group::Group;
use super::log_store::LogContents;
use super::network::{decode, encode, GroupId};
use super::snapshot;
use super::types::{Entry, LogId, SnapshotMeta, Vote};
use crate::persist::Store;
use crate::storage::{PartitionId, PartitionState};

/// A stored snapshot, checked and rebuilt into a partition's state.
#[derive(Debug)]
pub struct LoadedSnapshot {
    /// The partition it belongs to.
    pub partition: PartitionId,
    /// The Raft position and membership it covers.
    pub meta: SnapshotMeta,
    /// The state, ready to be swapped into the engine.
    pub state: PartitionState,
    /// Its number of keys.
    pub keys: usize,
}

/// A group's state as read back from disk.
#[derive(Debug)]
pub struct LoadedGroup {
    /// The stored snapshot, checked (magic, version, checksum, contents).
    pub snapshot: Option<LoadedSnapshot>,
    /// The vote, committed id and log entries after the snapshot.
    pub log: LogContents,
}

impl LoadedGroup {
    /// The applied index the snapshot covers (0 without one).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot
            .as_ref()
            .and_then(|s| s.meta.last_log_id)
            .map_or(0, |id| id.index)
    }
}

/// Why a group's stored state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The snapshot fails its checks (truncated, bit-flipped, foreign).
    #[error("snapshot of group {group} is corrupt: {why}")]
    CorruptSnapshot {
        /// The group.
        group: GroupId,
        /// What the decoder found.
        why: snapshot::SnapshotError,
    },
    /// The vote or the log is unreadable or has a hole.
    #[error("raft log of group {group} is damaged: {why}")]
    DamagedLog {
        /// The group.
        group: GroupId,
        /// What is wrong.
        why: String,
    },
    /// The store itself failed.
    #[error("cannot read group {group}: {0}", group = .1)]
    Io(#[source] io::Error, GroupId),
}

/// Reads `group`'s snapshot and, unless `snapshot_only`, its vote, committed id and log.
/// With `snapshot_only` (restoring from snapshots after every node crashed) the vote
/// is set to the term of the snapshot's last entry, so that this replica can never
/// take part in an election of a term its lost log may have seen before.
///
/// # Errors
/// [`LoadError`]: a corrupt snapshot, a damaged log, an I/O error.
pub fn load(
    store: &Store,
    group: GroupId,
    replica: u64,
    snapshot_only: bool,
) -> Result<LoadedGroup, LoadError> {
    let io = |e: io::Error| LoadError::Io(e, group);
    let damaged = |why: String| LoadError::DamagedLog { group, why };
    let snapshot = match store.snapshot(group).map_err(io)? {
        None => None,
        Some(bytes) => {
            let decoded = snapshot::decode(&bytes)
                .map_err(|why| LoadError::CorruptSnapshot { group, why })?;
            drop(bytes);
            let keys = decoded.state.entries.len();
            Some(LoadedSnapshot {
                partition: decoded.partition,
                meta: decoded.meta,
                state: PartitionState::restore(decoded.partition, decoded.state),
                keys,
            })
        }
    };
    let last_purged = snapshot.as_ref().and_then(|s| s.meta.last_log_id);
    let from = last_purged.map_or(0, |id| id.index + 1);
    if let Some(id) = last_purged {
        store.note_snapshot(group, id.index);
    }
    if snapshot_only {
        let vote = last_purged.map(|id| Vote::new(id.leader_id.term, replica));
        return Ok(LoadedGroup {
            snapshot,
            log: LogContents {
                vote,
                committed: last_purged,
                last_purged,
                entries: Vec::new(),
            },
        });
    }
    let vote: Option<Vote> = match store.raft(group, "vote").map_err(io)? {
        None => None,
        Some(b) => Some(decode(&b).map_err(damaged)?),
    };
    let committed: Option<LogId> = match store.raft(group, "committed").map_err(io)? {
        None => None,
        Some(b) => decode(&b).map_err(damaged)?,
    };
    let mut entries = Vec::new();
    let mut expect = from;
    for (index, bytes) in store.log(group).map_err(io)? {
        if index < from {
            continue; // covered by the snapshot
        }
        let entry: Entry = decode(&bytes).map_err(damaged)?;
        if index != expect || entry.log_id.index != index {
            return Err(damaged(format!(
                "expected entry {expect} after the snapshot at {}, found {index}",
                from.saturating_sub(1)
            )));
        }
        expect += 1;
        entries.push(entry);
    }
    Ok(LoadedGroup {
        snapshot,
        log: LogContents {
            vote,
            // Never past what is held: a committed id beyond the log would make openraft
            // look for entries that are not there.
            committed: committed.filter(|c| c.index < expect),
            last_purged,
            entries,
        },
    })
}

/// What writing one snapshot took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Written {
    /// The applied index covered.
    pub index: u64,
    /// Encoded size in bytes.
    pub bytes: u64,
    /// How long applying waited while the state was copied.
    pub pause: Duration,
    /// Whether it was stored (a newer one may have been stored meanwhile).
    pub stored: bool,
}

/// Encodes `group`'s current state and stores it (flushed); in durable mode the disk log
/// it covers is trimmed. Blocking: call from a blocking thread.
///
/// # Errors
/// On I/O errors.
pub fn write_snapshot(store: &Store, group: &Group) -> io::Result<Written> {
    let encoded = group.sm.encode()?;
    let bytes = encoded.snapshot.snapshot.len() as u64;
    let stored = store.put_snapshot(group.id, encoded.index, &encoded.snapshot.snapshot)?;
    if stored {
        store.trim_log(group.id, encoded.index)?;
    }
    store.flush()?;
    Ok(Written {
        index: encoded.index,
        bytes,
        pause: encoded.pause,
        stored,
    })
}

/// The checkpoint of a clean shutdown, after the group's Raft stopped: its snapshot,
/// vote, committed id and every log entry after the snapshot, so that a restart is
/// exact. Not flushed (the caller flushes once for all groups).
///
/// # Errors
/// On I/O errors.
pub fn checkpoint(store: &Store, group: &Group) -> io::Result<Written> {
    let log = group.log.contents()?;
    // The group has stopped: a stored snapshot at its applied index is already this
    // state (e.g. right after `admin snapshot`), and is not written again.
    let applied = group.sm.last_applied_index()?;
    let (index, bytes, pause) = if store.snapshot_index(group.id) == Some(applied) {
        (applied, 0, Duration::ZERO)
    } else {
        let encoded = group.sm.encode()?;
        // Stored unconditionally: this is the state the replica stops with.
        store.note_snapshot(group.id, 0);
        store.put_snapshot(group.id, encoded.index, &encoded.snapshot.snapshot)?;
        (
            encoded.index,
            encoded.snapshot.snapshot.len() as u64,
            encoded.pause,
        )
    };
    // Replace everything stored for the log: an older checkpoint's tail may hold
    // entries that were truncated since.
    store.remove_log_from(group.id, 0)?;
    if let Some(vote) = &log.vote {
        store.put_raft(group.id, "vote", &encode(vote).map_err(io::Error::other)?)?;
    }
    store.put_raft(
        group.id,
        "committed",
        &encode(&log.committed).map_err(io::Error::other)?,
    )?;
    let tail = log
        .entries
        .iter()
        .filter(|e| e.log_id.index > index)
        .map(|e| {
            Ok((
                e.log_id.index,
                encode(e).map_err(io::Error::other)?.to_vec(),
            ))
        })
        .collect::<io::Result<Vec<_>>>()?;
    store.append(group.id, tail)?;
    Ok(Written {
        index,
        bytes,
        pause,
        stored: bytes > 0,
    })
}
