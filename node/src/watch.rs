//! The node's change feed behind `Cache/Watch`, for client near caches.
//!
//! ```text
//! PartitionStateMachine::apply_entry ──► WatchHub::changed ┐ under the partition's apply
//!   (after each op, in apply order)                        │ lock and the hub's lock, so
//! with_watch / restore / install_snapshot ──► reset        │ per partition `seq` and the
//! ClusterNode::stop_group (replica left) ──► reset         ┘ events agree
//!                                   │ one broadcast of Arc<HubEvent> (HUB_CAPACITY)
//! service::kv::watch ──► WatchHub::subscribe ──► Cursor (SYNC / skip / RESET per stream)
//!                                   └──► pump ──► bounded mpsc (STREAM_BUFFER) ──► gRPC
//! ```
//!
//! Per partition the hub keeps a [`Track`]: the change sequence `seq` (the log index of
//! the last applied entry that changed a key), the CDC watermark, whether a replica is
//! hosted here, and a *generation* that every reset renews. A stream records, per
//! partition, the generation and `seq` it told its client; an event of an older
//! generation, or of the same generation at or below that `seq`, is already covered and
//! skipped. A slow stream blocks only itself: its channel fills, its broadcast receiver
//! falls behind and reports `Lagged`, and the stream answers with RESET + SYNC for every
//! partition it watches, so memory stays bounded and the client never misses a change
//! silently.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use raftcache_proto::tonic::Status;
use raftcache_proto::v1::{WatchEvent, WatchEventKind};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::storage::{CdcChange, Command};

/// Events the broadcast keeps for slow streams before they lag (node-wide).
pub const HUB_CAPACITY: usize = 8192;
/// Events queued per stream towards its client; when full, the stream stops reading the
/// broadcast and eventually lags.
pub const STREAM_BUFFER: usize = 1024;

/// What the hub knows about one partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Track {
    /// Renewed by every reset (hub-wide counter, so never reused).
    pub generation: u64,
    /// The log index of the last applied entry that changed a key (or the snapshot index
    /// after a reset).
    pub seq: u64,
    /// The partition's CDC watermark.
    pub cdc_lsn: u64,
    /// Whether a replica of the partition runs on this node.
    pub hosted: bool,
}

/// Why the hub lost track of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// A replica (re)started here (empty, or from its stored snapshot).
    Started,
    /// The replica's state was restored from a snapshot on disk.
    Restored,
    /// The replica installed a snapshot from its leader.
    Snapshot,
    /// The replica left this node (its data is gone).
    Left,
}

/// Keys of one partition changed by one applied entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The partition.
    pub partition: u32,
    /// The partition's generation when it happened.
    pub generation: u64,
    /// The entry's log index (the new `seq`).
    pub seq: u64,
    /// The partition's `seq` before it.
    pub prev_seq: u64,
    /// Keys written, deleted, evicted or invalidated.
    pub keys: Vec<Bytes>,
    /// Prefixes invalidated (CDC), empty = every key.
    pub prefixes: Vec<Bytes>,
    /// The CDC watermark after the entry.
    pub cdc_lsn: u64,
}

/// One event of the hub's broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// Keys changed.
    Change(Change),
    /// The partition's state was replaced or dropped; `track` is the new one.
    Reset {
        /// The partition.
        partition: u32,
        /// Its new track.
        track: Track,
        /// Why.
        reason: ResetReason,
    },
}

/// What one applied command changed, borrowed from the command: turned into key lists
/// only when a stream listens.
#[derive(Debug, Clone, Copy)]
pub enum Changed<'a> {
    /// Nothing a near cache needs to hear about (`Reclaim`: clients honour TTLs).
    Nothing,
    /// One key (any single-key command, refused ones included: conservative).
    Key(&'a Bytes),
    /// Several keys (`Evict`).
    Keys(&'a [Bytes]),
    /// A CDC batch: its keys and prefixes.
    Cdc(&'a [CdcChange]),
    /// Possibly every key (`Flush`).
    All,
}

impl<'a> Changed<'a> {
    /// What `cmd` changes.
    pub fn of(cmd: &'a Command) -> Self {
        match cmd {
            Command::Evict { keys } => Changed::Keys(keys),
            // Every key may have gone: near caches drop everything (the empty prefix).
            Command::Flush { .. } => Changed::All,
            Command::Cdc { changes, .. } | Command::CdcTx { changes, .. } => Changed::Cdc(changes),
            // Reclaimed keys had expired (near caches honour TTLs themselves); a lease
            // grant or release changes no value.
            Command::Reclaim { .. } | Command::Lease { .. } | Command::ReleaseLease { .. } => {
                Changed::Nothing
            }
            other => other.key().map_or(Changed::Nothing, Changed::Key),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Changed::Nothing => true,
            Changed::Key(_) => false,
            Changed::Keys(keys) => keys.is_empty(),
            Changed::Cdc(changes) => changes.is_empty(),
            Changed::All => false,
        }
    }

    /// The keys and the prefixes (cheap clones of the op's buffers).
    fn build(&self) -> (Vec<Bytes>, Vec<Bytes>) {
        match self {
            Changed::Nothing => (Vec::new(), Vec::new()),
            Changed::Key(k) => (vec![(*k).clone()], Vec::new()),
            Changed::Keys(keys) => (keys.to_vec(), Vec::new()),
            Changed::All => (Vec::new(), vec![Bytes::new()]),
            Changed::Cdc(changes) => {
                let mut keys = Vec::new();
                let mut prefixes = Vec::new();
                for c in *changes {
                    match c {
                        CdcChange::InvalidatePrefix { prefix } => prefixes.push(prefix.clone()),
                        other => keys.push(other.key().clone()),
                    }
                }
                (keys, prefixes)
            }
        }
    }
}

#[derive(Debug, Default)]
struct HubState {
    tracks: HashMap<u32, Track>,
    generations: u64,
}

/// The node-wide change feed. Shared through an `Arc` by the state machines (publish)
/// and the `Watch` handler (subscribe).
#[derive(Debug)]
pub struct WatchHub {
    state: Mutex<HubState>,
    tx: broadcast::Sender<Arc<HubEvent>>,
    /// Fault injection: CHANGE events still to drop silently (node-wide).
    drop_next: AtomicU64,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self::with_capacity(HUB_CAPACITY)
    }
}

impl WatchHub {
    /// A hub whose broadcast keeps `capacity` events for lagging streams.
    pub fn with_capacity(capacity: usize) -> Self {
        WatchHub {
            state: Mutex::new(HubState::default()),
            tx: broadcast::channel(capacity.max(1)).0,
            drop_next: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that the entry at `index` of `partition` was applied and changed `what`
    /// (`cdc_lsn`: the watermark after it, when the entry was a CDC batch). Advances
    /// `seq` unless nothing changed; builds and sends an event only when a stream
    /// listens. Callers hold the partition's apply lock, so calls of one partition come
    /// in log order.
    pub fn changed(&self, partition: u32, index: u64, what: Changed<'_>, cdc_lsn: Option<u64>) {
        let mut state = self.lock();
        let track = state.tracks.entry(partition).or_default();
        if let Some(lsn) = cdc_lsn {
            track.cdc_lsn = track.cdc_lsn.max(lsn);
        }
        if what.is_empty() {
            return;
        }
        let prev_seq = track.seq;
        track.seq = index;
        let track = *track;
        if self.tx.receiver_count() == 0 {
            return;
        }
        let (keys, prefixes) = what.build();
        // An error only means that every receiver went away meanwhile.
        let _ = self.tx.send(Arc::new(HubEvent::Change(Change {
            partition,
            generation: track.generation,
            seq: index,
            prev_seq,
            keys,
            prefixes,
            cdc_lsn: track.cdc_lsn,
        })));
    }

    /// The hub lost track of `partition`: its state was replaced (`hosted`, now at
    /// `seq`) or dropped (not `hosted`). Streams tell their clients RESET (and SYNC when
    /// hosted).
    pub fn reset(&self, partition: u32, seq: u64, cdc_lsn: u64, hosted: bool, reason: ResetReason) {
        let mut state = self.lock();
        state.generations += 1;
        let track = Track {
            generation: state.generations,
            seq,
            cdc_lsn,
            hosted,
        };
        state.tracks.insert(partition, track);
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(HubEvent::Reset {
                partition,
                track,
                reason,
            }));
        }
    }

    /// Subscribes to every event after the returned tracks of `partitions` (taken under
    /// the same lock the publishers hold, so nothing falls between them).
    pub fn subscribe(
        &self,
        partitions: &[u32],
    ) -> (broadcast::Receiver<Arc<HubEvent>>, Vec<(u32, Track)>) {
        let state = self.lock();
        let rx = self.tx.subscribe();
        (rx, Self::read(&state, partitions))
    }

    /// The current tracks of `partitions`.
    pub fn tracks(&self, partitions: &[u32]) -> Vec<(u32, Track)> {
        Self::read(&self.lock(), partitions)
    }

    fn read(state: &HubState, partitions: &[u32]) -> Vec<(u32, Track)> {
        partitions
            .iter()
            .map(|p| (*p, state.tracks.get(p).copied().unwrap_or_default()))
            .collect()
    }

    /// Fault injection: the next `n` CHANGE events that streams would send are dropped
    /// silently (counted node-wide, not per stream); 0 leaves the setting alone.
    pub fn drop_next_changes(&self, n: u64) {
        if n > 0 {
            self.drop_next.store(n, Ordering::Relaxed);
        }
    }

    /// Whether the next CHANGE event is to be dropped (and counts it).
    pub fn take_drop(&self) -> bool {
        self.drop_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// What a stream told its client about one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// SYNC (or CHANGE events after it) up to `seq` of `generation`.
    Synced { generation: u64, seq: u64 },
    /// RESET without a SYNC since (no replica here), as of `generation`.
    Lost { generation: u64 },
}

impl Seen {
    fn generation(self) -> u64 {
        match self {
            Seen::Synced { generation, .. } | Seen::Lost { generation } => generation,
        }
    }
}

/// One stream's view of its partitions: turns hub events into the events its client
/// gets. Pure logic, no I/O.
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    seen: BTreeMap<u32, Seen>,
}

impl Cursor {
    /// The cursor of a stream subscribed with `tracks`, and the events it starts with:
    /// SYNC for a partition hosted here, RESET for the others.
    pub fn start(tracks: &[(u32, Track)], out: &mut Vec<WatchEvent>) -> Cursor {
        let mut cursor = Cursor::default();
        for &(p, track) in tracks {
            if track.hosted {
                out.push(sync(p, track));
            } else {
                out.push(reset(p, track));
            }
            cursor.seen.insert(p, seen_at(track));
        }
        cursor
    }

    /// The partitions watched.
    pub fn partitions(&self) -> Vec<u32> {
        self.seen.keys().copied().collect()
    }

    /// Handles one hub event. `drop_change` is asked before a CHANGE goes out (fault
    /// injection: true drops it silently).
    pub fn on_event(
        &mut self,
        event: &HubEvent,
        drop_change: impl FnOnce() -> bool,
        out: &mut Vec<WatchEvent>,
    ) {
        match event {
            HubEvent::Change(c) => {
                let Some(seen) = self.seen.get_mut(&c.partition) else {
                    return;
                };
                // Older generations and sequences are covered by what the client got.
                let Seen::Synced { generation, seq } = *seen else {
                    return;
                };
                if c.generation != generation || c.seq <= seq {
                    return;
                }
                *seen = Seen::Synced {
                    generation,
                    seq: c.seq,
                };
                if drop_change() {
                    return;
                }
                out.push(WatchEvent {
                    partition: c.partition,
                    kind: WatchEventKind::Change.into(),
                    seq: c.seq,
                    prev_seq: c.prev_seq,
                    keys: c.keys.clone(),
                    prefixes: c.prefixes.clone(),
                    cdc_lsn: c.cdc_lsn,
                });
            }
            HubEvent::Reset {
                partition, track, ..
            } => {
                let Some(seen) = self.seen.get_mut(partition) else {
                    return;
                };
                if track.generation <= seen.generation() {
                    return;
                }
                if matches!(seen, Seen::Synced { .. }) {
                    out.push(reset(*partition, *track));
                }
                if track.hosted {
                    out.push(sync(*partition, *track));
                }
                *seen = seen_at(*track);
            }
        }
    }

    /// The stream fell behind the broadcast (events were lost): RESET every watched
    /// partition, then SYNC it at `tracks` (read after the loss) when hosted.
    pub fn on_lagged(&mut self, tracks: &[(u32, Track)], out: &mut Vec<WatchEvent>) {
        for &(p, track) in tracks {
            if let Some(seen) = self.seen.get_mut(&p) {
                out.push(reset(p, track));
                if track.hosted {
                    out.push(sync(p, track));
                }
                *seen = seen_at(track);
            }
        }
    }
}

fn seen_at(track: Track) -> Seen {
    if track.hosted {
        Seen::Synced {
            generation: track.generation,
            seq: track.seq,
        }
    } else {
        Seen::Lost {
            generation: track.generation,
        }
    }
}

fn sync(partition: u32, track: Track) -> WatchEvent {
    WatchEvent {
        partition,
        kind: WatchEventKind::Sync.into(),
        seq: track.seq,
        cdc_lsn: track.cdc_lsn,
        ..WatchEvent::default()
    }
}

fn reset(partition: u32, track: Track) -> WatchEvent {
    WatchEvent {
        partition,
        kind: WatchEventKind::Reset.into(),
        seq: track.seq,
        cdc_lsn: track.cdc_lsn,
        ..WatchEvent::default()
    }
}

/// Most partitions one `Watch` request may name (the most a cluster can have).
pub const MAX_WATCH_PARTITIONS: usize = 4096;

/// The distinct partitions of a `WatchRequest`, in order, checked against the
/// cluster's `partition_count`.
///
/// # Errors
/// A message for INVALID_ARGUMENT: none named, too many, or one out of range.
pub fn requested_partitions(requested: &[u32], partition_count: u32) -> Result<Vec<u32>, String> {
    if requested.is_empty() {
        return Err("Watch names no partition".into());
    }
    if requested.len() > MAX_WATCH_PARTITIONS {
        return Err(format!(
            "Watch of {} partitions is over the limit of {MAX_WATCH_PARTITIONS}",
            requested.len()
        ));
    }
    if let Some(p) = requested.iter().find(|p| **p >= partition_count) {
        return Err(format!(
            "partition {p} does not exist (the cluster has {partition_count})"
        ));
    }
    let distinct: std::collections::BTreeSet<u32> = requested.iter().copied().collect();
    Ok(distinct.into_iter().collect())
}

/// The events of one `Watch` stream.
pub type EventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchEvent, Status>> + Send + 'static>>;

/// Opens a stream over `partitions`: subscribes, starts the [`pump`] task (which ends
/// with `cancel`, or when the stream is dropped) and returns the stream its client reads.
pub fn open(hub: Arc<WatchHub>, partitions: &[u32], cancel: CancellationToken) -> EventStream {
    let (rx, tracks) = hub.subscribe(partitions);
    let mut first = Vec::new();
    let cursor = Cursor::start(&tracks, &mut first);
    let (tx, out) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(pump(hub, rx, cursor, first, tx, cancel));
    Box::pin(futures::stream::unfold(out, |mut out| async move {
        out.recv().await.map(|event| (event, out))
    }))
}

/// Counts the open streams in `raftcache_watch_streams` while alive.
struct OpenStream;

impl OpenStream {
    fn open() -> Self {
        metrics::watch_stream(1.0);
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::watch_stream(-1.0);
    }
}

/// Runs one stream: sends `first`, then the events `cursor` derives from `rx`, into `tx`
/// until the client goes away or `cancel` fires (node shutdown), which ends the stream.
pub async fn pump(
    hub: Arc<WatchHub>,
    mut rx: broadcast::Receiver<Arc<HubEvent>>,
    mut cursor: Cursor,
    first: Vec<WatchEvent>,
    tx: mpsc::Sender<Result<WatchEvent, Status>>,
    cancel: CancellationToken,
) {
    let _open = OpenStream::open();
    let mut out = first;
    loop {
        for event in std::mem::take(&mut out) {
            metrics::record_watch_event(event.kind());
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                sent = tx.send(Ok(event)) => if sent.is_err() { return },
            }
        }
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            () = tx.closed() => return,
            next = rx.recv() => next,
        };
        match next {
            Ok(event) => cursor.on_event(&event, || hub.take_drop(), &mut out),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "watch stream fell behind: resetting its partitions");
                cursor.on_lagged(&hub.tracks(&cursor.partitions()), &mut out);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn set(k: &str) -> Command {
        Command::Set {
            key: key(k),
            value: key("v"),
            expire_at_ms: None,
            keep_ttl: false,
            condition: crate::storage::Condition::Always,
            source_lsn: 0,
        }
    }

    fn kind(e: &WatchEvent) -> WatchEventKind {
        e.kind()
    }

    /// Drains `rx` through `cursor` (no drops).
    fn drain(
        rx: &mut broadcast::Receiver<Arc<HubEvent>>,
        cursor: &mut Cursor,
        hub: &WatchHub,
    ) -> Vec<WatchEvent> {
        let mut out = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(ev) => cursor.on_event(&ev, || false, &mut out),
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    cursor.on_lagged(&hub.tracks(&cursor.partitions()), &mut out);
                }
                Err(_) => return out,
            }
        }
    }

    #[test]
    fn changed_keys_of_each_command() {
        let evict = Command::Evict {
            keys: vec![key("a"), key("b")],
        };
        let cdc = Command::Cdc {
            lsn: 5,
            watermark: 5,
            fence: 1,
            tombstone_until_ms: 0,
            changes: vec![
                CdcChange::Invalidate { key: key("x") },
                CdcChange::Put {
                    key: key("y"),
                    value: key("v"),
                    expire_at_ms: None,
                },
                CdcChange::InvalidatePrefix { prefix: key("u:") },
            ],
        };
        assert_eq!(Changed::of(&set("k")).build(), (vec![key("k")], vec![]));
        let lease = Command::Lease {
            key: key("l"),
            lease_until_ms: 10,
            stale_window_ms: 0,
        };
        assert!(Changed::of(&lease).is_empty(), "a lease changes no value");
        let release = Command::ReleaseLease {
            key: key("l"),
            token: 3,
        };
        assert!(Changed::of(&release).is_empty());
        let fill = Command::Fill {
            key: key("f"),
            value: key("v"),
            expire_at_ms: None,
            source_lsn: 0,
            token: 3,
        };
        assert_eq!(Changed::of(&fill).build(), (vec![key("f")], vec![]));
        assert_eq!(
            Changed::of(&Command::Delete { key: key("d") }).build(),
            (vec![key("d")], vec![])
        );
        assert_eq!(
            Changed::of(&evict).build(),
            (vec![key("a"), key("b")], vec![])
        );
        assert_eq!(
            Changed::of(&cdc).build(),
            (vec![key("x"), key("y")], vec![key("u:")])
        );
        assert!(Changed::of(&Command::Reclaim { max: 10 }).is_empty());
        assert!(Changed::of(&Command::Evict { keys: vec![] }).is_empty());
    }

    #[test]
    fn seq_and_prev_seq_are_continuous_and_no_op_entries_do_not_advance() {
        let hub = WatchHub::default();
        hub.reset(1, 0, 0, true, ResetReason::Started);
        let (mut rx, tracks) = hub.subscribe(&[1]);
        let mut out = Vec::new();
        let mut cursor = Cursor::start(&tracks, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(kind(&out[0]), WatchEventKind::Sync);
        assert_eq!(out[0].seq, 0);

        let a = set("a");
        hub.changed(1, 3, Changed::of(&a), None);
        hub.changed(1, 4, Changed::Nothing, None); // e.g. a Reclaim
        hub.changed(1, 6, Changed::of(&Command::Delete { key: key("a") }), None);
        hub.changed(2, 7, Changed::of(&a), None); // another partition: not watched
        let got = drain(&mut rx, &mut cursor, &hub);
        let pairs: Vec<_> = got.iter().map(|e| (e.prev_seq, e.seq)).collect();
        assert_eq!(pairs, [(0, 3), (3, 6)]);
        assert!(got.iter().all(|e| kind(e) == WatchEventKind::Change));
        assert_eq!(got[0].keys, [key("a")]);
        assert_eq!(hub.tracks(&[1])[0].1.seq, 6);
    }

    #[test]
    fn seq_advances_without_subscribers_and_cdc_watermark_is_kept() {
        let hub = WatchHub::default();
        hub.reset(0, 0, 0, true, ResetReason::Started);
        hub.changed(0, 5, Changed::of(&set("a")), None);
        hub.changed(0, 6, Changed::Cdc(&[]), Some(40)); // watermark only: no change
        let (mut rx, tracks) = hub.subscribe(&[0]);
        assert_eq!(tracks[0].1.seq, 5);
        assert_eq!(tracks[0].1.cdc_lsn, 40);
        let mut out = Vec::new();
        let mut cursor = Cursor::start(&tracks, &mut out);
        assert_eq!(
            (kind(&out[0]), out[0].seq, out[0].cdc_lsn),
            (WatchEventKind::Sync, 5, 40)
        );
        hub.changed(0, 9, Changed::of(&set("b")), None);
        let got = drain(&mut rx, &mut cursor, &hub);
        assert_eq!((got[0].prev_seq, got[0].seq, got[0].cdc_lsn), (5, 9, 40));
    }

    #[test]
    fn snapshot_install_resets_then_syncs_at_the_snapshot_index() {
        let hub = WatchHub::default();
        hub.reset(2, 0, 0, true, ResetReason::Started);
        let (mut rx, tracks) = hub.subscribe(&[2]);
        let mut out = Vec::new();
        let mut cursor = Cursor::start(&tracks, &mut out);
        hub.changed(2, 3, Changed::of(&set("a")), None);
        hub.reset(2, 300, 7, true, ResetReason::Snapshot);
        hub.changed(2, 301, Changed::of(&set("b")), None);
        let got = drain(&mut rx, &mut cursor, &hub);
        let seen: Vec<_> = got.iter().map(|e| (kind(e), e.prev_seq, e.seq)).collect();
        assert_eq!(
            seen,
            [
                (WatchEventKind::Change, 0, 3),
                (WatchEventKind::Reset, 0, 300),
                (WatchEventKind::Sync, 0, 300),
                (WatchEventKind::Change, 300, 301),
            ]
        );
    }

    #[test]
    fn a_replica_leaving_resets_and_a_new_one_syncs() {
        let hub = WatchHub::default();
        let (mut rx, tracks) = hub.subscribe(&[4]);
        let mut out = Vec::new();
        let mut cursor = Cursor::start(&tracks, &mut out);
        // Never hosted here: RESET at once.
        assert_eq!(kind(&out[0]), WatchEventKind::Reset);
        hub.reset(4, 0, 0, true, ResetReason::Started);
        hub.changed(4, 2, Changed::of(&set("a")), None);
        hub.reset(4, 0, 0, false, ResetReason::Left);
        hub.changed(4, 9, Changed::of(&set("late")), None); // not tracked: skipped
        let got = drain(&mut rx, &mut cursor, &hub);
        let seen: Vec<_> = got.iter().map(|e| (kind(e), e.seq)).collect();
        assert_eq!(
            seen,
            [
                (WatchEventKind::Sync, 0),
                (WatchEventKind::Change, 2),
                (WatchEventKind::Reset, 0),
            ]
        );
    }

    #[test]
    fn lag_resets_and_resyncs_every_watched_partition() {
        let hub = WatchHub::with_capacity(4);
        hub.reset(0, 0, 0, true, ResetReason::Started);
        hub.reset(1, 0, 0, true, ResetReason::Started);
        let (mut rx, tracks) = hub.subscribe(&[0, 1, 2]);
        let mut out = Vec::new();
        let mut cursor = Cursor::start(&tracks, &mut out);
        let a = set("a");
        for i in 1..=10 {
            hub.changed(0, i, Changed::of(&a), None);
        }
        let got = drain(&mut rx, &mut cursor, &hub);
        let seen: Vec<_> = got.iter().map(|e| (e.partition, kind(e), e.seq)).collect();
        // Lagged: RESET for all three, SYNC for the hosted ones at their current seq;
        // the events still buffered (seq <= 10) are covered by the SYNC and skipped.
        assert_eq!(
            seen,
            [
                (0, WatchEventKind::Reset, 10),
                (0, WatchEventKind::Sync, 10),
                (1, WatchEventKind::Reset, 0),
                (1, WatchEventKind::Sync, 0),
                (2, WatchEventKind::Reset, 0),
            ]
        );
        hub.changed(0, 11, Changed::of(&a), None);
        let got = drain(&mut rx, &mut cursor, &hub);
        assert_eq!((got[0].prev_seq, got[0].seq), (10, 11));
    }

    #[test]
    fn dropped_changes_leave_a_gap_in_prev_seq() {
        let hub = WatchHub::default();
        hub.reset(0, 0, 0, true, ResetReason::Started);
        let (mut rx, tracks) = hub.subscribe(&[0]);
        let mut out = Vec::new();
        let mut cursor = Cursor::start(&tracks, &mut out);
        hub.drop_next_changes(1);
        hub.drop_next_changes(0); // leaves it alone
        let a = set("a");
        for i in 1..=3 {
            hub.changed(0, i, Changed::of(&a), None);
        }
        let mut got = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            cursor.on_event(&ev, || hub.take_drop(), &mut got);
        }
        let pairs: Vec<_> = got.iter().map(|e| (e.prev_seq, e.seq)).collect();
        assert_eq!(pairs, [(1, 2), (2, 3)]);
        assert!(!hub.take_drop());
    }

    #[tokio::test]
    async fn pump_ends_on_cancel_and_when_the_client_leaves() {
        let hub = Arc::new(WatchHub::default());
        hub.reset(0, 0, 0, true, ResetReason::Started);
        let (rx, tracks) = hub.subscribe(&[0]);
        let mut first = Vec::new();
        let cursor = Cursor::start(&tracks, &mut first);
        let (tx, mut out) = mpsc::channel(STREAM_BUFFER);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(pump(hub.clone(), rx, cursor, first, tx, cancel.clone()));
        let sync = out.recv().await.unwrap().unwrap();
        assert_eq!(sync.kind(), WatchEventKind::Sync);
        hub.changed(0, 1, Changed::of(&set("a")), None);
        let change = out.recv().await.unwrap().unwrap();
        assert_eq!((change.prev_seq, change.seq), (0, 1));
        cancel.cancel();
        task.await.unwrap();
        assert!(out.recv().await.is_none(), "the stream ends with the node");

        let (rx, tracks) = hub.subscribe(&[0]);
        let mut first = Vec::new();
        let cursor = Cursor::start(&tracks, &mut first);
        let (tx, out) = mpsc::channel(STREAM_BUFFER);
        let task = tokio::spawn(pump(hub, rx, cursor, first, tx, CancellationToken::new()));
        drop(out);
        task.await.unwrap();
    }
}
