//! The near cache's background task: keeps one `Watch` stream open at each node that
//! leads partitions (per the client's routing table), applies their events to the
//! store, reconnects lost streams with back-off, and in hot mode polls the hot keys.
//! See the [module docs](super) for the rules.

use super::{NearMode, Shared};
use crate::client::WeakClient;
use crate::routing::Topology;
use bytes::Bytes;
use raftcache_proto::tonic::transport::Channel;
use raftcache_proto::tonic::{Code, Request};
use raftcache_proto::v1::{self, cache_client::CacheClient};
use rand::Rng;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often the plan is compared with the routing table.
const PLAN_INTERVAL: Duration = Duration::from_millis(500);
/// The first reconnect back-off after a stream that failed before its first event.
const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// The largest reconnect back-off.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The reconnect delay after a node answered that it has no `Watch`.
const UNIMPLEMENTED_RETRY: Duration = Duration::from_secs(10);

/// The near cache's driver; [`Driver::start`] spawns it.
#[derive(Debug)]
pub(crate) struct Driver {
    shared: Arc<Shared>,
    stop: oneshot::Receiver<()>,
}

/// One node's stream (running, or waiting to reconnect).
#[derive(Debug)]
struct Stream {
    /// This incarnation's subscription id (the store ignores other ids' events).
    sub: u64,
    node: u64,
    partitions: BTreeSet<u32>,
    /// The running task; `None` once it ended.
    task: Option<JoinHandle<()>>,
    /// Failures in a row before a first event.
    failures: u32,
    /// When an ended stream may reconnect.
    retry_at: Instant,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A stream task's last word.
#[derive(Debug)]
struct Ended {
    sub: u64,
    /// At least one event arrived (the node served the stream).
    served: bool,
    /// The node has no `Watch`.
    unimplemented: bool,
}

/// The running driver's state.
struct Run {
    shared: Arc<Shared>,
    client: WeakClient,
    streams: HashMap<String, Stream>,
    next_sub: u64,
    ended_tx: mpsc::UnboundedSender<Ended>,
    /// The routing table of the last plan (no change, no stream ended: nothing to do).
    planned: Option<Arc<Topology>>,
    hot_task: Option<JoinHandle<()>>,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(task) = &self.hot_task {
            task.abort();
        }
    }
}

impl Driver {
    pub(crate) fn new(shared: Arc<Shared>, stop: oneshot::Receiver<()>) -> Driver {
        Driver { shared, stop }
    }

    /// Spawns the driver of `client`'s near cache; it ends when the near cache is
    /// dropped (with the last clone of the client), aborting its streams.
    pub(crate) fn start(self, client: WeakClient) {
        tokio::spawn(self.run(client));
    }

    async fn run(self, client: WeakClient) {
        let Driver { shared, mut stop } = self;
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
        let mut run = Run {
            shared,
            client,
            streams: HashMap::new(),
            next_sub: 1,
            ended_tx,
            planned: None,
            hot_task: None,
        };
        let hot = run.shared.config.mode == NearMode::Hot;
        let mut next_hot = Instant::now();
        loop {
            let Some(client) = run.client.upgrade() else {
                break;
            };
            run.plan(&client);
            if hot
                && Instant::now() >= next_hot
                && run.hot_task.as_ref().is_none_or(|t| t.is_finished())
            {
                run.hot_task = Some(tokio::spawn(refresh_hot(
                    Arc::clone(&run.shared),
                    client.topology_snapshot(),
                    client.config().request_timeout,
                )));
                next_hot = Instant::now() + run.shared.config.hot_refresh;
            }
            drop(client);
            run.shared.publish_gauges();
            let mut wake = Instant::now() + PLAN_INTERVAL;
            for s in run.streams.values().filter(|s| s.task.is_none()) {
                wake = wake.min(s.retry_at);
            }
            if hot {
                wake = wake.min(next_hot);
            }
            tokio::select! {
                _ = &mut stop => break,
                ended = ended_rx.recv() => {
                    if let Some(ended) = ended {
                        run.ended(ended);
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        tracing::debug!("near cache driver stopped");
    }
}

impl Run {
    /// A stream task ended: schedule its reconnect and refresh the map (the node may
    /// have died or lost its leaderships).
    fn ended(&mut self, ended: Ended) {
        let Some(stream) = self.streams.values_mut().find(|s| s.sub == ended.sub) else {
            return;
        };
        stream.task = None;
        stream.failures = if ended.served { 0 } else { stream.failures + 1 };
        let pause = if ended.unimplemented {
            UNIMPLEMENTED_RETRY
        } else {
            backoff(stream.failures)
        };
        stream.retry_at = Instant::now() + pause;
        self.planned = None;
        if !ended.unimplemented {
            if let Some(client) = self.client.upgrade() {
                tokio::spawn(async move {
                    if let Err(e) = client.cluster_map().await {
                        tracing::debug!(error = %e, "map refresh after a lost watch stream failed");
                    }
                });
            }
        }
    }

    /// Brings the streams in line with the routing table: every partition watched at
    /// its leader, one stream per node; (re)starts streams whose partition set changed
    /// or whose back-off passed.
    fn plan(&mut self, client: &crate::Client) {
        let topology = client.topology_snapshot();
        let now = Instant::now();
        let retry_due = self
            .streams
            .values()
            .any(|s| s.task.is_none() && s.retry_at <= now);
        if !retry_due
            && self
                .planned
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, &topology))
        {
            return;
        }
        // node address → (node id, its partitions)
        let mut want: HashMap<String, (u64, BTreeSet<u32>)> = HashMap::new();
        for partition in 0..topology.map.partition_count {
            let Ok(target) = topology.partition_target(partition) else {
                continue;
            };
            let Some(node) = topology.nodes.get(target.node) else {
                continue;
            };
            want.entry(node.info.addr.clone())
                .or_insert_with(|| (node.info.id, BTreeSet::new()))
                .1
                .insert(partition);
        }
        self.streams.retain(|addr, _| want.contains_key(addr));
        let mut starts: Vec<(String, u64, Vec<u32>)> = Vec::new();
        for (addr, (node, partitions)) in want {
            let failures = match self.streams.get_mut(&addr) {
                None => 0,
                Some(s) if s.task.is_some() => {
                    if s.partitions == partitions {
                        continue;
                    }
                    // The node is healthy but leads other partitions now: reopen.
                    s.failures
                }
                Some(s) if s.retry_at > now => {
                    // Waiting out a back-off: the partitions wait with it (unsynced).
                    s.partitions = partitions;
                    s.node = node;
                    continue;
                }
                Some(s) => s.failures,
            };
            let sub = self.next_sub;
            self.next_sub += 1;
            starts.push((addr.clone(), sub, partitions.iter().copied().collect()));
            self.streams.insert(
                addr,
                Stream {
                    sub,
                    node,
                    partitions,
                    task: None,
                    failures,
                    retry_at: now,
                },
            );
        }
        // Assign every partition to its stream before any new stream runs, so that no
        // SYNC arrives for a partition that does not expect it yet.
        let mut assigned: HashMap<u32, (u64, u64)> = HashMap::new();
        for s in self.streams.values() {
            for &p in &s.partitions {
                assigned.insert(p, (s.sub, s.node));
            }
        }
        {
            let mut store = self.shared.store();
            for partition in 0..topology.map.partition_count {
                store.assign(partition, assigned.get(&partition).copied());
            }
        }
        for (addr, sub, partitions) in starts {
            let Ok(channel) = client.watch_channel(&addr) else {
                tracing::debug!(%addr, "no channel for a watch stream");
                if let Some(s) = self.streams.get_mut(&addr) {
                    s.retry_at = now + BACKOFF_MAX;
                }
                continue;
            };
            let config = client.config();
            let task = tokio::spawn(watch(
                Arc::clone(&self.shared),
                sub,
                addr.clone(),
                channel,
                partitions,
                config.connect_timeout + config.request_timeout,
                config.max_message_bytes,
                self.ended_tx.clone(),
            ));
            if let Some(s) = self.streams.get_mut(&addr) {
                s.task = Some(task);
            }
        }
        self.planned = Some(topology);
    }
}

/// A jittered exponential back-off after `failures` failures in a row: uniform in
/// [d/2, d] with d = 50 ms × 2^failures, at most 2 s.
fn backoff(failures: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1 << failures.min(16))
        .min(BACKOFF_MAX);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(nanos / 2..=nanos))
}

/// One `Watch` stream: opens it (bounded by `open_timeout`), applies its events until
/// it fails or ends, then drops its partitions and tells the driver.
#[allow(clippy::too_many_arguments)]
async fn watch(
    shared: Arc<Shared>,
    sub: u64,
    addr: String,
    channel: Channel,
    partitions: Vec<u32>,
    open_timeout: Duration,
    max_message_bytes: usize,
    ended: mpsc::UnboundedSender<Ended>,
) {
    let mut served = false;
    let mut unimplemented = false;
    let mut client = CacheClient::new(channel).max_decoding_message_size(max_message_bytes);
    let count = partitions.len();
    // No gRPC deadline: the stream lives until the node or the driver ends it.
    let request = Request::new(v1::WatchRequest { partitions });
    match tokio::time::timeout(open_timeout, client.watch(request)).await {
        Err(_) => tracing::debug!(%addr, "opening a watch stream timed out"),
        Ok(Err(status)) => {
            unimplemented = status.code() == Code::Unimplemented;
            tracing::debug!(%addr, %status, "watch stream refused");
        }
        Ok(Ok(response)) => {
            tracing::debug!(%addr, sub, partitions = count, "watch stream open");
            let mut events = response.into_inner();
            loop {
                match events.message().await {
                    Ok(Some(event)) => {
                        served = true;
                        let applied = shared.store().apply(sub, &event);
                        tracing::trace!(%addr, partition = event.partition, ?applied, "watch event");
                    }
                    Ok(None) => {
                        tracing::debug!(%addr, "watch stream ended");
                        break;
                    }
                    Err(status) => {
                        tracing::debug!(%addr, %status, "watch stream failed");
                        break;
                    }
                }
            }
        }
    }
    let lost = shared.store().stream_lost(sub);
    tracing::debug!(%addr, sub, lost, "watch stream gone; its partitions are unsynced");
    let _ = ended.send(Ended {
        sub,
        served,
        unimplemented,
    });
}

/// Fetches the hot keys of every node in `topology` and installs their union (kept
/// as it was when no node answers).
async fn refresh_hot(shared: Arc<Shared>, topology: Arc<Topology>, timeout: Duration) {
    let answers = futures::future::join_all(topology.map_nodes().iter().map(|node| {
        let mut client = CacheClient::new(node.channel.clone());
        async move {
            let mut request = Request::new(v1::StatsRequest {});
            request.set_timeout(timeout);
            tokio::time::timeout(timeout, client.stats(request)).await
        }
    }))
    .await;
    let mut hot: HashSet<Bytes> = HashSet::new();
    let mut answered = false;
    for answer in answers {
        if let Ok(Ok(stats)) = answer {
            answered = true;
            hot.extend(stats.into_inner().hot_keys.into_iter().map(|h| h.key));
        }
    }
    if answered {
        tracing::trace!(keys = hot.len(), "hot keys refreshed");
        shared.store().set_hot(hot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_bounded() {
        for failures in 0..40 {
            let cap = BACKOFF_BASE
                .saturating_mul(1 << failures.min(16))
                .min(BACKOFF_MAX);
            let d = backoff(failures);
            assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?} vs {cap:?}");
            assert!(d <= BACKOFF_MAX);
        }
        assert!(backoff(0) <= BACKOFF_BASE);
    }
}
