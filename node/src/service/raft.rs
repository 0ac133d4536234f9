//! The receiving side of the Raft transport (`raftcache.v1.RaftTransport`) and the
//! membership `Admin` service.
//!
//! A `RaftBatch` carries messages of many groups; each is decoded and handed to its
//! group, all concurrently (a slow group never holds up the others), and the answers go
//! back in order. A message for a group or replica this node does not have is answered
//! with `unreachable` (the sender treats it as a network error and retries).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use futures::future::join_all;
use futures::Future;
use raftcache_proto::tonic::{self, Request, Response, Status, Streaming};
use raftcache_proto::v1::admin_client::AdminClient;
use raftcache_proto::v1::admin_server::Admin;
use raftcache_proto::v1::raft_transport_server::RaftTransport;
use raftcache_proto::v1::{
    AddNodeRequest, AddNodeResponse, AssignRequest, AssignResponse, HelloRequest, HelloResponse,
    InjectFaultRequest, InjectFaultResponse, RaftBatch, RaftBatchReply, RaftKind, RaftMessage,
    RaftResult, RebalanceRequest, RebalanceResponse, RemoveNodeRequest, RemoveNodeResponse,
    RemovedRequest, RemovedResponse, SnapshotChunk, SnapshotReply, SnapshotRequest,
    SnapshotResponse, SnapshotWritten, TransferLeaderRequest, TransferLeaderResponse,
};

use crate::cluster::ClusterNode;
use crate::error::NodeError;
use crate::metrics;
use crate::raft::{decode, encode, Group, Snapshot, SnapshotMeta, Vote};
use crate::service::status::{error_code, to_status};

/// Largest snapshot accepted (a partition's data; the node-wide memory limit is the real
/// bound, this only stops a corrupt header from asking for absurd allocations).
const MAX_SNAPSHOT_BYTES: u64 = 64 << 30;

/// The transport and admin services of a node.
#[derive(Clone)]
pub struct RaftService {
    node: Arc<ClusterNode>,
}

impl RaftService {
    /// The services of `node`.
    pub fn new(node: Arc<ClusterNode>) -> Self {
        RaftService { node }
    }

    fn local(&self, group: u32, target: u64) -> Result<Arc<Group>, String> {
        let g = self.node.group(group).ok_or_else(|| {
            format!(
                "node {} has no replica of group {group}",
                self.node.node_id()
            )
        })?;
        if g.replica != target {
            return Err(format!(
                "node {} holds replica {} of group {group}, not {target}",
                self.node.node_id(),
                g.replica
            ));
        }
        Ok(g)
    }

    async fn handle(&self, m: RaftMessage, sent_at_ms: u64) -> RaftResult {
        let unreachable = |e: String| RaftResult {
            payload: Default::default(),
            unreachable: e,
        };
        let g = match self.local(m.group, m.target) {
            Ok(g) => g,
            Err(e) => return unreachable(e),
        };
        let answer = match RaftKind::try_from(m.kind) {
            Ok(RaftKind::Append) => match decode(&m.payload) {
                Ok(req) => g
                    .append_entries(req, sent_at_ms)
                    .await
                    .and_then(|r| encode(&r)),
                Err(e) => Err(e),
            },
            Ok(RaftKind::Vote) => match decode(&m.payload) {
                Ok(req) => g
                    .raft
                    .vote(req)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| encode(&r)),
                Err(e) => Err(e),
            },
            Ok(RaftKind::PreVote) => match decode(&m.payload) {
                Ok(req) => g
                    .raft
                    .pre_vote(req)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| encode(&r)),
                Err(e) => Err(e),
            },
            Ok(RaftKind::TransferLeader) => match decode(&m.payload) {
                Ok(req) => g
                    .raft
                    .handle_transfer_leader(req)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| encode(&r)),
                Err(e) => Err(e),
            },
            Ok(RaftKind::Unspecified) | Err(_) => {
                Err(format!("unknown raft message kind {}", m.kind))
            }
        };
        match answer {
            Ok(payload) => RaftResult {
                payload,
                unreachable: String::new(),
            },
            Err(e) => unreachable(e),
        }
    }

    async fn install_snapshot(
        &self,
        mut stream: Streaming<SnapshotChunk>,
    ) -> Result<SnapshotReply, Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let header = first
            .header
            .ok_or_else(|| Status::invalid_argument("first snapshot chunk has no header"))?;
        self.node
            .check_peer_cluster(header.cluster_id, 0)
            .map_err(|e| to_status(&e))?;
        if header.total_len > MAX_SNAPSHOT_BYTES {
            return Err(Status::invalid_argument(format!(
                "snapshot of {} bytes is over the limit of {MAX_SNAPSHOT_BYTES}",
                header.total_len
            )));
        }
        let g = match self.local(header.group, header.target) {
            Ok(g) => g,
            Err(e) => {
                return Ok(SnapshotReply {
                    payload: Default::default(),
                    unreachable: e,
                })
            }
        };
        let vote: Vote = decode(&header.vote).map_err(Status::invalid_argument)?;
        let meta: SnapshotMeta = decode(&header.meta).map_err(Status::invalid_argument)?;
        let mut data = BytesMut::with_capacity(header.total_len as usize);
        data.extend_from_slice(&first.data);
        while let Some(chunk) = stream.message().await? {
            if data.len() as u64 + chunk.data.len() as u64 > header.total_len {
                return Err(Status::invalid_argument(
                    "snapshot longer than its header says",
                ));
            }
            data.extend_from_slice(&chunk.data);
        }
        if data.len() as u64 != header.total_len {
            return Err(Status::invalid_argument(format!(
                "snapshot stream ended at {} of {} bytes",
                data.len(),
                header.total_len
            )));
        }
        let snapshot = Snapshot {
            meta,
            snapshot: data.freeze(),
        };
        let resp = g
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(SnapshotReply {
            payload: encode(&resp).map_err(Status::internal)?,
            unreachable: String::new(),
        })
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn batch(&self, req: Request<RaftBatch>) -> tonic::Result<Response<RaftBatchReply>> {
        let batch = req.into_inner();
        // A whole batch comes from one node of one cluster: another cluster's (a
        // leftover node on a peer's old address) is refused before any group sees it.
        self.node
            .check_peer_cluster(batch.cluster_id, batch.from_node)
            .map_err(|e| to_status(&e))?;
        let sent_at_ms = batch.sent_at_ms;
        let results = join_all(
            batch
                .messages
                .into_iter()
                .map(|m| self.handle(m, sent_at_ms)),
        )
        .await;
        Ok(Response::new(RaftBatchReply { results }))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> tonic::Result<Response<SnapshotReply>> {
        RaftService::install_snapshot(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn hello(&self, _req: Request<HelloRequest>) -> tonic::Result<Response<HelloResponse>> {
        Ok(Response::new(HelloResponse {
            node_id: self.node.node_id(),
            addr: self.node.advertise().to_string(),
            partitions_hosted: self.node.partitions_hosted(),
            cluster_id: self.node.cluster_id(),
            removed: self.node.is_removed(),
        }))
    }

    async fn removed(
        &self,
        req: Request<RemovedRequest>,
    ) -> tonic::Result<Response<RemovedResponse>> {
        let req = req.into_inner();
        self.node
            .removed_notice(req.cluster_id, req.node_id)
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(RemovedResponse {}))
    }

    async fn assign(&self, req: Request<AssignRequest>) -> tonic::Result<Response<AssignResponse>> {
        let node_id = self
            .node
            .assign(req.into_inner())
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(AssignResponse { node_id }))
    }
}

/// Runs `here` on the meta leader: locally if this node leads the meta group, else by
/// forwarding `forward` to the leader (once; the client retries beyond that).
async fn on_meta_leader<T, H, F, HF, FF>(
    node: &ClusterNode,
    op: &'static str,
    here: H,
    forward: F,
) -> tonic::Result<Response<T>>
where
    H: FnOnce() -> HF,
    HF: Future<Output = Result<T, NodeError>>,
    F: FnOnce(AdminClient<raftcache_proto::tonic::transport::Channel>) -> FF,
    FF: Future<Output = tonic::Result<Response<T>>>,
{
    let started = Instant::now();
    if node.node_id() == 0 {
        let e = NodeError::Unavailable("this node is not part of a cluster yet".into());
        metrics::record_op(op, Some(error_code(&e)), started.elapsed());
        return Err(to_status(&e));
    }
    if !node.is_meta_leader() {
        if let Some(addr) = node.meta_leader_addr() {
            let channel = node.transport().channel(&addr).map_err(Status::internal)?;
            let answer = forward(AdminClient::new(channel)).await;
            metrics::record_op(op, None, started.elapsed());
            return answer;
        }
    }
    let result = here().await;
    metrics::record_op(op, result.as_ref().err().map(error_code), started.elapsed());
    result.map(Response::new).map_err(|e| to_status(&e))
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[tonic::async_trait]
impl Admin for RaftService {
    async fn add_node(
        &self,
        req: Request<AddNodeRequest>,
    ) -> tonic::Result<Response<AddNodeResponse>> {
        let req = req.into_inner();
        let mine = self.node.cluster_id();
        if req.cluster_id != 0 && req.cluster_id != mine && self.node.node_id() != 0 {
            let e = NodeError::WrongCluster {
                what: format!("the join of {}", req.addr),
                got: req.cluster_id,
                mine,
            };
            return Err(to_status(&e));
        }
        let addr = req.addr.clone();
        on_meta_leader(
            &self.node,
            "add_node",
            || -> BoxFut<'_, _> {
                Box::pin(async move {
                    let (node_id, epoch) = self.node.add_node(&addr).await?;
                    Ok(AddNodeResponse { node_id, epoch })
                })
            },
            |mut c| async move { c.add_node(req).await },
        )
        .await
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> tonic::Result<Response<RemoveNodeResponse>> {
        let req = req.into_inner();
        let id = req.node_id;
        on_meta_leader(
            &self.node,
            "remove_node",
            || -> BoxFut<'_, _> {
                Box::pin(async move {
                    let (found, meta) = self.node.change_meta(|m| m.drain_node(id)).await?;
                    if !found {
                        return Err(NodeError::InvalidArgument(format!(
                            "no node {id} in the cluster"
                        )));
                    }
                    Ok(RemoveNodeResponse { epoch: meta.epoch })
                })
            },
            |mut c| async move { c.remove_node(req).await },
        )
        .await
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> tonic::Result<Response<TransferLeaderResponse>> {
        let req = req.into_inner();
        let (p, to) = (req.partition, req.node_id);
        on_meta_leader(
            &self.node,
            "transfer_leader",
            || -> BoxFut<'_, _> {
                Box::pin(async move {
                    let (ok, meta) = self.node.change_meta(|m| m.prefer_leader(p, to)).await?;
                    if !ok {
                        return Err(NodeError::InvalidArgument(format!(
                            "node {to} holds no replica of partition {p}"
                        )));
                    }
                    Ok(TransferLeaderResponse { epoch: meta.epoch })
                })
            },
            |mut c| async move { c.transfer_leader(req).await },
        )
        .await
    }

    async fn rebalance(
        &self,
        req: Request<RebalanceRequest>,
    ) -> tonic::Result<Response<RebalanceResponse>> {
        let req = req.into_inner();
        on_meta_leader(
            &self.node,
            "rebalance",
            || -> BoxFut<'_, _> {
                Box::pin(async move {
                    let (moved, meta) = self.node.change_meta(|m| m.rebalance()).await?;
                    Ok(RebalanceResponse {
                        epoch: meta.epoch,
                        moved_replicas: moved,
                    })
                })
            },
            |mut c| async move { c.rebalance(req).await },
        )
        .await
    }

    async fn inject_fault(
        &self,
        req: Request<InjectFaultRequest>,
    ) -> tonic::Result<Response<InjectFaultResponse>> {
        if !self.node.fault_injection() {
            return Err(Status::failed_precondition(
                "fault injection is disabled on this node (start it with --fault-injection)",
            ));
        }
        let req = req.into_inner();
        if req.drop_watch_events > 0 {
            self.node
                .watch()
                .drop_next_changes(u64::from(req.drop_watch_events));
            tracing::warn!(
                events = req.drop_watch_events,
                "the next Watch CHANGE events will be dropped"
            );
        }
        // A request that only drops watch events leaves the clock alone (its
        // `clock_offset_ms` is the default 0, not a request to restore the clock).
        let offset = req.clock_offset_ms;
        let previous = if req.drop_watch_events > 0 && offset == 0 {
            crate::storage::clock_offset_ms()
        } else {
            let previous = crate::storage::set_clock_offset_ms(offset);
            tracing::warn!(
                offset_ms = offset,
                previous_ms = previous,
                "clock offset injected"
            );
            previous
        };
        Ok(Response::new(InjectFaultResponse {
            previous_clock_offset_ms: previous,
        }))
    }

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> tonic::Result<Response<SnapshotResponse>> {
        if self.node.persistence() == crate::persist::Persistence::None {
            return Err(Status::failed_precondition(
                "this node runs with persistence `none` (start it with --persistence snapshot \
                 or durable to write snapshots)",
            ));
        }
        let started = std::time::Instant::now();
        let written = self
            .node
            .snapshot_now(req.into_inner().partition)
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        Ok(Response::new(SnapshotResponse {
            node_id: self.node.node_id(),
            snapshots: written
                .into_iter()
                .map(|(partition, w)| SnapshotWritten {
                    partition,
                    applied_index: w.index,
                    bytes: w.bytes,
                    pause_us: u64::try_from(w.pause.as_micros()).unwrap_or(u64::MAX),
                })
                .collect(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }
}
