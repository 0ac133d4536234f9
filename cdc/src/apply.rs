//! The applier: turns committed transactions into `ApplyChanges` batches and reports
//! how far the cache has durably caught up (the LSN the worker may confirm to Postgres).
//!
//! Work arrives in stream order. The applier runs **rounds**: it takes everything queued
//! (up to a bound), sends every transaction's changes as one request per (transaction,
//! partition, chunk) — all of a round's requests concurrently — and when all of them are
//! committed in the cache the round's end position becomes the *acknowledged* LSN.
//! Requests of one round may apply in any order: every change carries its commit LSN and
//! the partition compares it per key, so the result is the same as in commit order
//! (and a replay after a crash changes nothing).
//!
//! The **watermark** (every commit before W applied) of a partition may only move once all
//! earlier changes reached that partition, so the watermark of round *k* rides on the
//! requests of round *k+1* (an idle round carries it alone). A `min_lsn` read therefore
//! waits at most about two rounds after the commit.

use crate::mapping::KeyChange;
use crate::metrics as m;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use raftcache_client::{Client, ClientError, Lsn};
use raftcache_proto::v1;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// One unit of work for the applier, in stream order.
#[derive(Debug)]
pub enum Work {
    /// Changes of one transaction (all of it, or a piece of a large one).
    Tx(TxWork),
    /// The stream is idle at this position: every commit before it has been queued.
    Position(Lsn),
}

/// Changes of one transaction.
#[derive(Debug)]
pub struct TxWork {
    /// The version of every change of this piece: the commit's end LSN for a complete
    /// transaction, just above the commit record's start for a piece sent ahead of it
    /// (see the worker's `Decoder::push`).
    pub lsn: Lsn,
    /// The transaction's 64-bit id (pgoutput's 32-bit xid widened), carried by every
    /// request of its changes.
    pub xid: u64,
    /// The changes, with the TTL of each `Put`.
    pub changes: Vec<(KeyChange, Option<Duration>)>,
    /// Set on the last piece: the position after the commit and the commit time.
    pub end: Option<(Lsn, i64)>,
    /// Rows this piece covers (for metrics).
    pub rows: u64,
}

/// Why the applier stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A newer worker holds the lease.
    #[error("fenced by a newer CDC worker (partition token {0})")]
    Fenced(u64),
    /// A change the cache refuses for good (a key over the size limit, ...).
    #[error("the cache refused a change: {0}")]
    Refused(ClientError),
}

/// Most requests of a round in flight at once.
const CONCURRENCY: usize = 64;
/// Most transactions taken into one round.
const ROUND_MAX_TX: usize = 512;

/// Runs rounds until `work` closes or an error stops it; `acked` receives the position up
/// to which everything is committed in the cache.
pub async fn run(
    client: Client,
    fence: u64,
    batch_max: usize,
    mut work: mpsc::Receiver<Work>,
    acked: watch::Sender<Lsn>,
) -> Result<(), ApplyError> {
    let partitions = loop {
        match client.cluster_map().await {
            Ok(map) if map.partition_count > 0 => break map.partition_count,
            Ok(_) => {}
            Err(e) if e.is_transient() => tracing::warn!(error = %e, "no cluster map yet"),
            Err(e) => return Err(ApplyError::Refused(e)),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut pushed = vec![Lsn::ZERO; partitions as usize];
    let mut watermark = *acked.borrow();
    loop {
        // With a watermark still to push, a round goes out even without new work.
        let idle_watermark = pushed.iter().any(|p| *p < watermark);
        let mut batch = Vec::new();
        if !idle_watermark {
            match work.recv().await {
                Some(w) => batch.push(w),
                None => return Ok(()),
            }
        }
        while batch.len() < ROUND_MAX_TX {
            match work.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let end = round(&client, fence, batch_max, &batch, watermark, &mut pushed).await?;
        m::round_done(started.elapsed());
        let now_us = crate::metrics::pg_now_us();
        for w in &batch {
            if let Work::Tx(tx) = w {
                m::tx_applied(tx, now_us);
            }
        }
        if let Some(end) = end {
            watermark = watermark.max(end);
            acked.send_replace(watermark);
            m::acked(watermark);
        }
    }
}

/// One round: every change of `batch`, plus `watermark` to every partition not yet at
/// it. Returns the position the batch reaches (None if it has no complete commit or
/// position).
async fn round(
    client: &Client,
    fence: u64,
    batch_max: usize,
    batch: &[Work],
    watermark: Lsn,
    pushed: &mut [Lsn],
) -> Result<Option<Lsn>, ApplyError> {
    let (requests, end) = requests(fence, batch_max, batch, watermark, pushed, |k| {
        client.partition_of(k)
    });
    let keys: u64 = requests.iter().map(|(_, r)| r.changes.len() as u64).sum();
    stream::iter(requests)
        .map(|(p, r)| apply_one(client, p, r))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    m::keys_applied(keys);
    Ok(end)
}

/// The requests of one round (see [`round`]) and the position the batch reaches;
/// `partition_of` routes a key. Marks in `pushed` the partitions that get `watermark`.
fn requests(
    fence: u64,
    batch_max: usize,
    batch: &[Work],
    watermark: Lsn,
    pushed: &mut [Lsn],
    partition_of: impl Fn(&[u8]) -> u32,
) -> (Vec<(u32, v1::ApplyChangesRequest)>, Option<Lsn>) {
    let partition_count = pushed.len() as u32;
    let mut requests: Vec<(u32, v1::ApplyChangesRequest)> = Vec::new();
    let mut end: Option<Lsn> = None;
    for w in batch {
        let tx = match w {
            Work::Position(p) => {
                end = Some(end.map_or(*p, |e| e.max(*p)));
                continue;
            }
            Work::Tx(tx) => tx,
        };
        if let Some((e, _)) = tx.end {
            end = Some(end.map_or(e, |x| x.max(e)));
        }
        let mut by_partition: BTreeMap<u32, Vec<v1::Change>> = BTreeMap::new();
        for (change, ttl) in &tx.changes {
            let wire = to_wire(change, *ttl);
            match change {
                KeyChange::InvalidatePrefix(_) => {
                    for p in 0..partition_count {
                        by_partition.entry(p).or_default().push(wire.clone());
                    }
                }
                KeyChange::Invalidate(k) | KeyChange::Put(k, _) => {
                    by_partition.entry(partition_of(k)).or_default().push(wire);
                }
            }
        }
        for (p, changes) in by_partition {
            for chunk in changes.chunks(batch_max) {
                requests.push((
                    p,
                    v1::ApplyChangesRequest {
                        route: None,
                        lsn: tx.lsn.0,
                        watermark: 0,
                        fence,
                        changes: chunk.to_vec(),
                        xid: tx.xid,
                        min_xmin: 0,
                    },
                ));
            }
        }
    }
    // The previous rounds' watermark: on one request of each partition that needs it.
    for (p, at) in pushed.iter_mut().enumerate() {
        if *at >= watermark {
            continue;
        }
        let p = p as u32;
        match requests.iter_mut().find(|(q, _)| *q == p) {
            Some((_, r)) => r.watermark = watermark.0,
            None => requests.push((
                p,
                v1::ApplyChangesRequest {
                    route: None,
                    lsn: 0,
                    watermark: watermark.0,
                    fence,
                    changes: Vec::new(),
                    xid: 0,
                    min_xmin: 0,
                },
            )),
        }
        *at = watermark;
    }
    (requests, end)
}

/// Sends one request until it is committed: transient failures are retried forever
/// (with back-off), since skipping would lose an invalidation.
async fn apply_one(client: &Client, p: u32, r: v1::ApplyChangesRequest) -> Result<(), ApplyError> {
    let mut pause = Duration::from_millis(50);
    loop {
        match client.apply_changes(p, r.clone()).await {
            Ok(_) => return Ok(()),
            Err(ClientError::Fenced { current }) => return Err(ApplyError::Fenced(current)),
            Err(e) if e.is_transient() || matches!(e, ClientError::Server { .. }) => {
                tracing::warn!(partition = p, error = %e, "applying CDC changes failed; retrying");
                m::apply_retry();
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(ApplyError::Refused(e)),
        }
    }
}

fn to_wire(change: &KeyChange, ttl: Option<Duration>) -> v1::Change {
    let (kind, key, value, ttl_ms) = match change {
        KeyChange::Invalidate(k) => (v1::ChangeKind::Invalidate, k.clone(), Bytes::new(), 0),
        KeyChange::InvalidatePrefix(k) => {
            (v1::ChangeKind::InvalidatePrefix, k.clone(), Bytes::new(), 0)
        }
        KeyChange::Put(k, v) => (
            v1::ChangeKind::Put,
            k.clone(),
            v.clone(),
            ttl.map_or(0, |t| {
                u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
            }),
        ),
    };
    v1::Change {
        kind: kind as i32,
        key,
        value,
        ttl_ms,
    }
}

#[cfg(test)]
#[path = "apply/apply_test.rs"]
mod tests;
