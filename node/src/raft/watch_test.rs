//! The change feed as the state machine drives it: CHANGE per applied op in log order,
//! nothing for blank / membership / reclaim entries, RESET when a snapshot is installed.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use tokio::sync::broadcast::Receiver;

use super::{CommittedLeaderId, Entry, EntryPayload, LogId, PartitionStateMachine};
use crate::storage::{Command, Condition, Op, PartitionId};
use crate::watch::{HubEvent, ResetReason, WatchHub};

const P: PartitionId = PartitionId(2);

fn entry(index: u64, cmd: Option<Command>) -> Entry {
    Entry {
        log_id: LogId::new(
            CommittedLeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        ),
        payload: match cmd {
            Some(cmd) => EntryPayload::Normal(Op { now_ms: 1_000, cmd }.into()),
            None => EntryPayload::Blank,
        },
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn set(key: &str) -> Command {
    Command::Set {
        key: b(key),
        value: b("v"),
        expire_at_ms: None,
        keep_ttl: false,
        condition: Condition::Always,
        source_lsn: 0,
    }
}

async fn apply(sm: &mut PartitionStateMachine, entries: Vec<Entry>) {
    sm.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None)))))
        .await
        .unwrap();
}

fn events(rx: &mut Receiver<Arc<HubEvent>>) -> Vec<HubEvent> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|e| (*e).clone())
        .collect()
}

fn changes(events: &[HubEvent]) -> Vec<(u64, u64, Vec<Bytes>)> {
    events
        .iter()
        .filter_map(|e| match e {
            HubEvent::Change(c) => Some((c.prev_seq, c.seq, c.keys.clone())),
            HubEvent::Reset { .. } => None,
        })
        .collect()
}

#[tokio::test]
async fn applied_ops_publish_changes_in_log_order() {
    let hub = Arc::new(WatchHub::default());
    let mut sm = PartitionStateMachine::new(P).with_watch(hub.clone());
    let (mut rx, tracks) = hub.subscribe(&[P.0]);
    assert!(tracks[0].1.hosted, "a replica with a feed is tracked");
    assert_eq!(tracks[0].1.seq, 0);
    apply(
        &mut sm,
        vec![
            entry(1, None),
            entry(2, Some(set("a"))),
            entry(3, Some(Command::Reclaim { max: 10 })),
            entry(4, Some(Command::Delete { key: b("a") })),
            entry(
                5,
                Some(Command::Delete {
                    key: b("never-there"),
                }),
            ),
            entry(
                6,
                Some(Command::Evict {
                    keys: vec![b("x"), b("y")],
                }),
            ),
        ],
    )
    .await;
    assert_eq!(
        changes(&events(&mut rx)),
        [
            (0, 2, vec![b("a")]),
            (2, 4, vec![b("a")]),
            // A refused op is reported too (conservative).
            (4, 5, vec![b("never-there")]),
            (5, 6, vec![b("x"), b("y")]),
        ]
    );
    assert_eq!(hub.tracks(&[P.0])[0].1.seq, 6);
}

#[tokio::test]
async fn installing_a_snapshot_resets_at_its_index() {
    let mut leader = PartitionStateMachine::new(P);
    apply(
        &mut leader,
        (1..=20)
            .map(|i| entry(i, Some(set(&format!("k{i}")))))
            .collect(),
    )
    .await;
    leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let snap = leader.get_current_snapshot().await.unwrap().unwrap();

    let hub = Arc::new(WatchHub::default());
    let mut follower = PartitionStateMachine::new(P).with_watch(hub.clone());
    apply(&mut follower, vec![entry(1, Some(set("k1")))]).await;
    let (mut rx, _) = hub.subscribe(&[P.0]);
    follower
        .install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .unwrap();
    apply(&mut follower, vec![entry(21, Some(set("after")))]).await;
    let got = events(&mut rx);
    assert!(
        matches!(
            got[0],
            HubEvent::Reset {
                partition: 2,
                track,
                reason: ResetReason::Snapshot,
            } if track.seq == 20 && track.hosted
        ),
        "{got:?}"
    );
    assert_eq!(changes(&got), [(20, 21, vec![b("after")])]);
}
