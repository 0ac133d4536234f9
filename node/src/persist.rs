//! The node's on-disk state: per-group snapshot files, and in sled the identity and
//! (in `durable` mode, or at a clean shutdown) each group's Raft vote and log.
//!
//! # Modes (`persistence = "none" | "snapshot" | "durable"`)
//! - `none`: nothing is written; a restarted node is a new node (it rejoins under a new
//!   node id and new replica ids, so it never votes with state it forgot).
//! - `snapshot` (RDB-style): each group's state is written every `snapshot-interval` or
//!   after `snapshot-writes` applied entries, and at a graceful shutdown, where the node
//!   also writes every group's vote and log tail and then marks the directory *clean*. A
//!   restart after a clean shutdown is exact: same node id, same replica ids, same vote,
//!   the data from the snapshots, then catch-up from the leaders. After a crash the vote
//!   and log are lost, so the node rejoins as a new node (its peers hold the data); if the
//!   whole cluster crashed, `--restore-snapshots` brings every node back from its last
//!   snapshots (writes after them are lost, as with Redis RDB).
//! - `durable`: the vote is flushed before it is used and log entries are flushed before
//!   they are acknowledged (group commit: one flush for whatever all groups appended
//!   meanwhile). Survives kill -9 of every node.
//!
//! # Layout
//! ```text
//! <data-dir>/snapshots/partition-<p>.snap, meta.snap   one file per group: the
//!            raft::snapshot format (own header: version, partition, applied log id;
//!            xxh3 checksum); written to a temporary file, fsynced, renamed, dir fsynced
//! <data-dir>/sled, trees:
//! node       "identity" → JSON Identity; "clean" → [1] after a clean shutdown;
//!            "meta" → the latest ClusterMeta JSON the node knew
//! replicas   group u32 BE → replica id u64 BE      (the replicas this node hosts)
//! raft       group u32 BE ‖ tag → bytes             (tag "vote" | "committed"; postcard)
//! log        group u32 BE ‖ index u64 BE → entry    (postcard)
//! ```
//! Why snapshots are files and not sled values: sled 0.34 keeps a large value in a blob
//! file and, when the value is overwritten while other writes go on, does not remove the
//! old blob; measured here, 12 rewrites of 16 × 8.5 MB left 3.8 GB on disk, and a node
//! writing snapshots under load grew by a full snapshot per round. Splitting the value
//! into small sled values stays bounded but took 2.3-2.6× the space and ~3× the time of
//! a plain file. Everything small and frequent (vote, log, identity) stays in sled.
//! On disk, a group's log never has entries at or below its snapshot's index once the
//! snapshot is written (`trim_log`), and openraft's in-memory purges are not mirrored:
//! entries stay until a written snapshot covers them, so a restart always finds
//! "snapshot S, then entries S+1.." with no hole.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a node persists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Persistence {
    /// Memory only.
    #[default]
    None,
    /// Periodic and shutdown snapshots (RDB-style).
    Snapshot,
    /// Snapshots plus a flushed Raft log and vote.
    Durable,
}

impl Persistence {
    /// The name used in config and flags.
    pub fn name(self) -> &'static str {
        match self {
            Persistence::None => "none",
            Persistence::Snapshot => "snapshot",
            Persistence::Durable => "durable",
        }
    }
}

impl std::fmt::Display for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Persistence {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Persistence::None),
            "snapshot" => Ok(Persistence::Snapshot),
            "durable" => Ok(Persistence::Durable),
            other => Err(format!(
                "unknown persistence {other:?}: expected none, snapshot or durable"
            )),
        }
    }
}

/// Who this data directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The node id the cluster gave.
    pub node_id: u64,
    /// The address the node advertised (a restart must use the same one).
    pub advertise: String,
    /// The mode the directory was written in.
    pub persistence: Persistence,
    /// The cluster the node is a member of (0: stored by a raftcache without cluster
    /// ids; the node then keeps 0, see `ClusterNode::restore`).
    #[serde(default)]
    pub cluster_id: u64,
}

/// A callback run once the writes made before it are on disk.
type Flushed = Box<dyn FnOnce(io::Result<()>) + Send>;

/// The node's sled database (see the module docs). Cheap to share through an `Arc`.
pub struct Store {
    /// The node's data directory (`<data-dir>`).
    dir: PathBuf,
    db: sled::Db,
    node: sled::Tree,
    replicas: sled::Tree,
    /// `<data-dir>/snapshots`.
    snapshot_dir: PathBuf,
    raft: sled::Tree,
    log: sled::Tree,
    flusher: Option<mpsc::Sender<Flushed>>,
    /// The flush thread (it holds the database open until it ends).
    flush_thread: Option<std::thread::JoinHandle<()>>,
    /// The applied index of the snapshot last written per group: a snapshot never
    /// replaces a newer one (the log below the newer one may be trimmed already).
    written: std::sync::Mutex<std::collections::HashMap<u32, u64>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

fn sled_error(e: sled::Error) -> io::Error {
    io::Error::other(format!("sled: {e}"))
}

fn group_key(group: u32) -> [u8; 4] {
    group.to_be_bytes()
}

fn log_key(group: u32, index: u64) -> [u8; 12] {
    let mut k = [0; 12];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

fn raft_key(group: u32, tag: &str) -> Vec<u8> {
    let mut k = group.to_be_bytes().to_vec();
    k.extend_from_slice(tag.as_bytes());
    k
}

impl Store {
    /// Opens (or creates) the database under `data_dir`.
    ///
    /// # Errors
    /// When sled cannot open it (another process holds it, the files are damaged, ...).
    pub fn open(data_dir: &Path) -> io::Result<Arc<Store>> {
        let dir = data_dir.join("sled");
        let db = sled::Config::new()
            .path(&dir)
            // Flushes are ours (group commit); sled's own timer would only add fsyncs.
            .flush_every_ms(None)
            .open()
            .map_err(|e| io::Error::other(format!("cannot open {}: {e}", dir.display())))?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_error);
        let (node, replicas, raft, log) = (
            tree("node")?,
            tree("replicas")?,
            tree("raft")?,
            tree("log")?,
        );
        let snapshot_dir = data_dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir).map_err(|e| {
            io::Error::other(format!("cannot create {}: {e}", snapshot_dir.display()))
        })?;
        let (tx, rx) = mpsc::channel::<Flushed>();
        let flush_db = db.clone();
        let flush_thread = std::thread::Builder::new()
            .name("raftcache-flush".into())
            .spawn(move || flush_loop(&flush_db, &rx))?;
        Ok(Arc::new(Store {
            dir: data_dir.to_path_buf(),
            db,
            node,
            replicas,
            snapshot_dir,
            raft,
            log,
            flusher: Some(tx),
            flush_thread: Some(flush_thread),
            written: std::sync::Mutex::default(),
        }))
    }

    /// The data directory (`sled/` and `snapshots/` inside).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes everything to disk now (blocking).
    ///
    /// # Errors
    /// When the flush fails.
    pub fn flush(&self) -> io::Result<()> {
        self.db.flush().map(drop).map_err(sled_error)
    }

    /// Runs `done` once everything written before this call is on disk. Calls made while
    /// a flush is under way share the next one (group commit).
    pub fn flush_then(&self, done: impl FnOnce(io::Result<()>) + Send + 'static) {
        let Some(flusher) = &self.flusher else {
            return done(Err(io::Error::other("the store is closing")));
        };
        if let Err(mpsc::SendError(done)) = flusher.send(Box::new(done)) {
            done(Err(io::Error::other("the flush thread has stopped")));
        }
    }

    /// Waits until everything written before this call is on disk.
    ///
    /// # Errors
    /// When the flush fails.
    pub async fn flushed(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flush_then(move |r| {
            let _ = tx.send(r);
        });
        rx.await
            .map_err(|_| io::Error::other("the flush thread has stopped"))?
    }

    // ---- identity --------------------------------------------------------------------

    /// The identity stored here, if any.
    ///
    /// # Errors
    /// On I/O errors or an unreadable record.
    pub fn identity(&self) -> io::Result<Option<Identity>> {
        match self.node.get("identity").map_err(sled_error)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| io::Error::other(format!("unreadable node identity: {e}"))),
        }
    }

    /// Forgets everything, then stores `identity` (a node that became a new member).
    ///
    /// # Errors
    /// On I/O errors.
    pub fn reset(&self, identity: &Identity) -> io::Result<()> {
        self.written_lock().clear();
        for tree in [&self.node, &self.replicas, &self.raft, &self.log] {
            tree.clear().map_err(sled_error)?;
        }
        for entry in std::fs::read_dir(&self.snapshot_dir)? {
            std::fs::remove_file(entry?.path())?;
        }
        let json = serde_json::to_vec(identity).map_err(io::Error::other)?;
        self.node.insert("identity", json).map_err(sled_error)?;
        self.flush()
    }

    /// Stores the latest cluster metadata this node knew (JSON; not flushed). A restart
    /// reads the partition count and the peers' addresses from it before its meta
    /// replica runs.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn put_meta(&self, json: &[u8]) -> io::Result<()> {
        self.node.insert("meta", json).map(drop).map_err(sled_error)
    }

    /// The cluster metadata stored by [`Store::put_meta`].
    ///
    /// # Errors
    /// On I/O errors.
    pub fn meta(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self
            .node
            .get("meta")
            .map_err(sled_error)?
            .map(|v| v.to_vec()))
    }

    /// Replaces the stored identity (same node, e.g. another persistence mode). Flushed.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn set_identity(&self, identity: &Identity) -> io::Result<()> {
        let json = serde_json::to_vec(identity).map_err(io::Error::other)?;
        self.node.insert("identity", json).map_err(sled_error)?;
        self.flush()
    }

    /// Whether the last run ended with a clean shutdown (everything written).
    ///
    /// # Errors
    /// On I/O errors.
    pub fn is_clean(&self) -> io::Result<bool> {
        Ok(self.node.get("clean").map_err(sled_error)?.is_some())
    }

    /// Marks (or unmarks) a clean shutdown, flushed.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn set_clean(&self, clean: bool) -> io::Result<()> {
        if clean {
            self.node.insert("clean", &[1u8]).map_err(sled_error)?;
        } else {
            self.node.remove("clean").map_err(sled_error)?;
        }
        self.flush()
    }

    // ---- replicas ----------------------------------------------------------------------

    /// The replicas this node hosts: group → replica id.
    ///
    /// # Errors
    /// On I/O errors or a malformed record.
    pub fn replicas(&self) -> io::Result<BTreeMap<u32, u64>> {
        let mut out = BTreeMap::new();
        for item in &self.replicas {
            let (k, v) = item.map_err(sled_error)?;
            let (Ok(k), Ok(v)) = (<[u8; 4]>::try_from(&*k), <[u8; 8]>::try_from(&*v)) else {
                return Err(io::Error::other("malformed replica record"));
            };
            out.insert(u32::from_be_bytes(k), u64::from_be_bytes(v));
        }
        Ok(out)
    }

    /// Records that `group`'s replica here is `replica`, starting from nothing: its old
    /// snapshot, vote and log are removed. Flushed.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn start_replica(&self, group: u32, replica: u64) -> io::Result<()> {
        self.forget_group(group)?;
        self.replicas
            .insert(group_key(group), &replica.to_be_bytes())
            .map_err(sled_error)?;
        self.flush()
    }

    /// Removes everything stored for `group` (its replica left this node). Flushed.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn drop_replica(&self, group: u32) -> io::Result<()> {
        self.forget_group(group)?;
        self.flush()
    }

    fn forget_group(&self, group: u32) -> io::Result<()> {
        self.written_lock().remove(&group);
        self.replicas.remove(group_key(group)).map_err(sled_error)?;
        match std::fs::remove_file(self.snapshot_path(group)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for tag in ["vote", "committed"] {
            self.raft.remove(raft_key(group, tag)).map_err(sled_error)?;
        }
        self.remove_log_from(group, 0)
    }

    // ---- snapshots ---------------------------------------------------------------------

    fn written_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u32, u64>> {
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The file holding `group`'s snapshot.
    pub fn snapshot_path(&self, group: u32) -> PathBuf {
        let name = if group == u32::MAX {
            "meta.snap".to_owned()
        } else {
            format!("partition-{group}.snap")
        };
        self.snapshot_dir.join(name)
    }

    /// Stores `group`'s snapshot covering applied index `index`, on disk when this
    /// returns (temporary file, fsync, rename, directory fsync), unless one covering a
    /// later index was stored: returns whether it was written.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn put_snapshot(&self, group: u32, index: u64, bytes: &[u8]) -> io::Result<bool> {
        use std::io::Write as _;
        let mut written = self.written_lock();
        if written.get(&group).is_some_and(|w| *w > index) {
            return Ok(false);
        }
        let path = self.snapshot_path(group);
        let tmp = path.with_extension("snap.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.snapshot_dir)?.sync_all()?;
        written.insert(group, index);
        Ok(true)
    }

    /// The applied index `group`'s stored snapshot covers, if one was written or loaded
    /// by this process.
    pub fn snapshot_index(&self, group: u32) -> Option<u64> {
        self.written_lock().get(&group).copied()
    }

    /// Notes that `group`'s stored snapshot covers `index` (it was loaded at start).
    pub fn note_snapshot(&self, group: u32, index: u64) {
        self.written_lock().insert(group, index);
    }

    /// `group`'s stored snapshot.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn snapshot(&self, group: u32) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.snapshot_path(group)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    // ---- vote, committed, log ----------------------------------------------------------

    /// Stores a small Raft record of `group` (`tag` = "vote" or "committed"); not flushed.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn put_raft(&self, group: u32, tag: &str, bytes: &[u8]) -> io::Result<()> {
        self.raft
            .insert(raft_key(group, tag), bytes)
            .map(drop)
            .map_err(sled_error)
    }

    /// A small Raft record of `group`.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn raft(&self, group: u32, tag: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self
            .raft
            .get(raft_key(group, tag))
            .map_err(sled_error)?
            .map(|v| v.to_vec()))
    }

    /// Appends encoded log entries of `group` (not flushed; see [`Store::flush_then`]).
    ///
    /// # Errors
    /// On I/O errors.
    pub fn append(
        &self,
        group: u32,
        entries: impl IntoIterator<Item = (u64, Vec<u8>)>,
    ) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for (index, bytes) in entries {
            batch.insert(&log_key(group, index), bytes);
        }
        self.log.apply_batch(batch).map_err(sled_error)
    }

    /// Removes `group`'s log entries with index `>= from`.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn remove_log_from(&self, group: u32, from: u64) -> io::Result<()> {
        let end = log_key(group, u64::MAX);
        let mut batch = sled::Batch::default();
        for item in self.log.range(log_key(group, from)..=end) {
            batch.remove(item.map_err(sled_error)?.0);
        }
        self.log.apply_batch(batch).map_err(sled_error)
    }

    /// Removes `group`'s log entries with index `<= through` (a written snapshot covers
    /// them).
    ///
    /// # Errors
    /// On I/O errors.
    pub fn trim_log(&self, group: u32, through: u64) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(log_key(group, 0)..=log_key(group, through)) {
            batch.remove(item.map_err(sled_error)?.0);
        }
        self.log.apply_batch(batch).map_err(sled_error)
    }

    /// `group`'s stored log entries in index order.
    ///
    /// # Errors
    /// On I/O errors or a malformed key.
    pub fn log(&self, group: u32) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.log.scan_prefix(group_key(group)) {
            let (k, v) = item.map_err(sled_error)?;
            let index = k
                .get(4..12)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| io::Error::other("malformed log key"))?;
            out.push((index, v.to_vec()));
        }
        Ok(out)
    }

    /// Removes every group's vote and log (kept: identity, replicas, snapshots). Used
    /// after a `snapshot`-mode restore: the vote and log written at the clean shutdown
    /// are in memory now and would be stale on disk. Flushed.
    ///
    /// # Errors
    /// On I/O errors.
    pub fn clear_raft_state(&self) -> io::Result<()> {
        self.raft.clear().map_err(sled_error)?;
        self.log.clear().map_err(sled_error)?;
        self.flush()
    }

    /// Bytes the database and the snapshot files take on disk.
    pub fn size_on_disk(&self) -> u64 {
        let files: u64 = std::fs::read_dir(&self.snapshot_dir)
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        self.db.size_on_disk().unwrap_or(0) + files
    }
}

impl Drop for Store {
    /// Ends the flush thread (after a last flush of what it was asked), so that the
    /// database is closed (its lock released) when the store is gone.
    fn drop(&mut self) {
        drop(self.flusher.take());
        if let Some(t) = self.flush_thread.take() {
            let _ = t.join();
        }
    }
}

/// The group-commit thread: takes every waiting callback, flushes once, answers them all.
fn flush_loop(db: &sled::Db, rx: &mpsc::Receiver<Flushed>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let result = db.flush().map(drop).map_err(|e| e.to_string());
        metrics::counter!("raftcache_persist_flushes_total").increment(1);
        metrics::counter!("raftcache_persist_flushed_writes_total").increment(waiting.len() as u64);
        for done in waiting {
            done(result.clone().map_err(io::Error::other));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_replicas_snapshots_and_log_round_trip_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.identity().unwrap(), None);
            let id = Identity {
                cluster_id: 0x5eed,
                node_id: 3,
                advertise: "127.0.0.1:7003".into(),
                persistence: Persistence::Durable,
            };
            store.reset(&id).unwrap();
            store.start_replica(0, 11).unwrap();
            store.start_replica(u32::MAX, 12).unwrap();
            assert!(store.put_snapshot(0, 7, b"snap").unwrap());
            assert!(!store.put_snapshot(0, 6, b"older").unwrap());
            store.put_raft(0, "vote", b"v").unwrap();
            store
                .append(0, (1..=5).map(|i| (i, vec![i as u8])))
                .unwrap();
            store.append(1, [(1, vec![9])]).unwrap();
            store.remove_log_from(0, 5).unwrap();
            store.trim_log(0, 2).unwrap();
            store.set_clean(true).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.identity().unwrap().unwrap().node_id, 3);
        assert!(store.is_clean().unwrap());
        assert_eq!(
            store.replicas().unwrap(),
            BTreeMap::from([(0, 11), (u32::MAX, 12)])
        );
        assert_eq!(store.snapshot(0).unwrap().unwrap(), b"snap");
        assert_eq!(store.raft(0, "vote").unwrap().unwrap(), b"v");
        let log: Vec<u64> = store.log(0).unwrap().into_iter().map(|(i, _)| i).collect();
        assert_eq!(log, [3, 4], "trimmed through 2, truncated from 5");
        assert_eq!(store.log(1).unwrap().len(), 1, "other groups untouched");

        // A new replica of a group starts from nothing.
        store.start_replica(0, 13).unwrap();
        assert!(store.snapshot(0).unwrap().is_none());
        assert!(store.log(0).unwrap().is_empty());
        assert!(store.raft(0, "vote").unwrap().is_none());
        store.clear_raft_state().unwrap();
        assert!(store.log(1).unwrap().is_empty());
        assert_eq!(store.replicas().unwrap()[&0], 13);
    }

    #[tokio::test]
    async fn concurrent_flush_requests_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut waits = Vec::new();
        for i in 0..64u64 {
            store.append(0, [(i, vec![0; 100])]).unwrap();
            let s = store.clone();
            waits.push(tokio::spawn(async move { s.flushed().await }));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
    }

    #[test]
    fn an_identity_stored_before_cluster_ids_loads_with_cluster_0() {
        let json = r#"{"node_id":2,"advertise":"127.0.0.1:7002","persistence":"durable"}"#;
        let id: Identity = serde_json::from_str(json).unwrap();
        assert_eq!((id.node_id, id.cluster_id), (2, 0));
    }

    #[test]
    fn persistence_names_parse() {
        for p in [
            Persistence::None,
            Persistence::Snapshot,
            Persistence::Durable,
        ] {
            assert_eq!(p.name().parse::<Persistence>().unwrap(), p);
        }
        assert!("fsync".parse::<Persistence>().is_err());
    }
}
