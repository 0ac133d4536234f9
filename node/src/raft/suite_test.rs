//! openraft's own storage test suite against [`MemLogStore`] + [`PartitionStateMachine`],
//! in memory and written through to a sled store (durable mode), and a durable log
//! read back from disk after its store is reopened.

use std::sync::Arc;

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;

use super::disk;
use super::types::{CommittedLeaderId, Entry, LogId, Vote};
use super::{MemLogStore, PartitionStateMachine, TypeConfig};
use crate::persist::Store;
use crate::storage::PartitionId;

struct Builder;

impl StoreBuilder<TypeConfig, MemLogStore, PartitionStateMachine> for Builder {
    async fn build(
        &self,
    ) -> Result<((), MemLogStore, PartitionStateMachine), StorageError<TypeConfig>> {
        Ok((
            (),
            MemLogStore::new(),
            PartitionStateMachine::new(PartitionId(7)),
        ))
    }
}

#[tokio::test]
async fn openraft_storage_suite_passes() {
    Suite::<TypeConfig, MemLogStore, PartitionStateMachine, Builder, ()>::test_all(Builder)
        .await
        .unwrap();
}

/// Each build gets its own store in a temporary directory (kept alive by the guard).
struct DurableBuilder;

impl StoreBuilder<TypeConfig, MemLogStore, PartitionStateMachine, (tempfile::TempDir, Arc<Store>)>
    for DurableBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            (tempfile::TempDir, Arc<Store>),
            MemLogStore,
            PartitionStateMachine,
        ),
        StorageError<TypeConfig>,
    > {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = MemLogStore::restored(Default::default(), Some((store.clone(), 7)));
        let sm = PartitionStateMachine::new(PartitionId(7)).with_disk(store.clone(), 7);
        Ok(((dir, store), log, sm))
    }
}

#[tokio::test]
async fn openraft_storage_suite_passes_in_durable_mode() {
    Suite::<
        TypeConfig,
        MemLogStore,
        PartitionStateMachine,
        DurableBuilder,
        (tempfile::TempDir, Arc<Store>),
    >::test_all(DurableBuilder)
    .await
    .unwrap();
}

fn entry(term: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId { term, node_id: 1 }, index),
        payload: openraft::EntryPayload::Blank,
    }
}

#[tokio::test]
async fn a_durable_log_is_read_back_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.start_replica(7, 11).unwrap();
        let mut log = MemLogStore::restored(Default::default(), Some((store.clone(), 7)));
        log.save_vote(&Vote::new(3, 11)).await.unwrap();
        let (tx, rx) = TypeConfig::oneshot();
        let flushed = IOFlushed::<TypeConfig>::signal(tx);
        log.append((0..10).map(|i| entry(2, i)), flushed)
            .await
            .unwrap();
        rx.await.unwrap().unwrap();
        log.truncate_after(Some(entry(2, 7).log_id)).await.unwrap();
        // An in-memory purge leaves the disk alone: no snapshot covers those entries.
        log.purge(entry(2, 4).log_id).await.unwrap();
        let (tx, rx) = TypeConfig::oneshot();
        log.append([entry(3, 8)], IOFlushed::<TypeConfig>::signal(tx))
            .await
            .unwrap();
        rx.await.unwrap().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let loaded = disk::load(&store, 7, 11, false).unwrap();
    assert!(loaded.snapshot.is_none());
    assert_eq!(loaded.log.vote, Some(Vote::new(3, 11)));
    let ids: Vec<(u64, u64)> = loaded
        .log
        .entries
        .iter()
        .map(|e| (e.log_id.leader_id.term, e.log_id.index))
        .collect();
    let mut want: Vec<(u64, u64)> = (0..=7).map(|i| (2, i)).collect();
    want.push((3, 8));
    assert_eq!(ids, want, "truncated after 7, then 8 of term 3 appended");

    // A hole after the snapshot point is a damaged log, not silently skipped.
    store.trim_log(7, 0).unwrap();
    store.remove_log_from(7, 5).unwrap();
    store
        .append(
            7,
            [(6, super::network::encode(&entry(2, 6)).unwrap().to_vec())],
        )
        .unwrap();
    let err = disk::load(&store, 7, 11, false).unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
}
