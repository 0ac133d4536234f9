//! The `raftcache.v1.Cache` service over the storage engine.
//!
//! Every handler does the same four steps: check the route (epoch, partition),
//! translate the request into an engine call, map the outcome to the reply, and
//! record `raftcache_ops_total{op,result}` and the latency histogram.

use crate::error::{NodeError, Result};
use crate::metrics;
use crate::service::status::{error_code, to_status};
use crate::storage::{Condition, Engine, Outcome, PartitionId, WriteRequest};
use bytes::Bytes;
use raftcache_proto::tonic::{self, Request, Response, Status};
use raftcache_proto::v1::cache_server::Cache;
use raftcache_proto::v1::{
    ClusterMapRequest, ClusterMapResponse, Consistency, DeleteRequest, DeleteResponse,
    ExpireRequest, ExpireResponse, GetRequest, GetResponse, IncrRequest, IncrResponse, MGetRequest,
    MGetResponse, NodeInfo as PbNodeInfo, PartitionInfo, Route, SetCondition, SetRequest,
    SetResponse, StatsRequest, StatsResponse,
};
use std::sync::Arc;
use std::time::Instant;

/// Most keys one `MGet` may ask for; bounds the work and the reply of one request.
pub const MAX_MGET_KEYS: usize = 10_000;

/// Who this node is, as published in the cluster map.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node id.
    pub id: u64,
    /// The address clients reach this node's gRPC service at.
    pub advertise_addr: String,
    /// The cluster-map epoch. A single unreplicated node is always at epoch 1.
    pub epoch: u64,
    /// Virtual nodes per partition on the clients' ring.
    pub vnodes: u32,
}

/// The gRPC `Cache` service. Cheap to clone; all state is shared.
#[derive(Clone)]
pub struct CacheService {
    engine: Arc<Engine>,
    node: Arc<NodeInfo>,
    started: Instant,
}

impl CacheService {
    /// A service answering from `engine` as node `node`.
    pub fn new(engine: Arc<Engine>, node: NodeInfo) -> Self {
        CacheService {
            engine,
            node: Arc::new(node),
            started: Instant::now(),
        }
    }

    /// Checks the epoch and returns the partition a keyed request was routed to
    /// (the engine checks that it is in range).
    fn route(&self, route: Option<&Route>) -> Result<PartitionId> {
        let route = route.ok_or_else(|| {
            NodeError::InvalidArgument(
                "missing route: compute the key's partition with the ring described by ClusterMap"
                    .into(),
            )
        })?;
        if route.epoch != 0 && route.epoch != self.node.epoch {
            return Err(NodeError::WrongEpoch {
                got: route.epoch,
                current: self.node.epoch,
            });
        }
        Ok(PartitionId(route.partition))
    }

    fn read(&self, key: &[u8], route: Option<&Route>, skip_value: bool) -> Result<GetResponse> {
        let p = self.route(route)?;
        Ok(match self.engine.get(p, key)? {
            Some(v) => GetResponse {
                found: true,
                value: if skip_value { Bytes::new() } else { v.value },
                version: v.version,
                ttl_remaining_ms: v.ttl_remaining_ms,
            },
            None => GetResponse::default(),
        })
    }

    fn do_get(&self, r: GetRequest) -> Result<GetResponse> {
        check_consistency(r.consistency)?;
        self.read(&r.key, r.route.as_ref(), r.skip_value)
    }

    fn do_mget(&self, r: MGetRequest) -> Result<MGetResponse> {
        check_consistency(r.consistency)?;
        if r.keys.len() > MAX_MGET_KEYS {
            return Err(NodeError::InvalidArgument(format!(
                "MGet of {} keys is over the limit of {MAX_MGET_KEYS}; split it",
                r.keys.len()
            )));
        }
        let values = r
            .keys
            .iter()
            .map(|k| self.read(&k.key, k.route.as_ref(), false))
            .collect::<Result<Vec<_>>>()?;
        Ok(MGetResponse { values })
    }

    fn do_set(&self, r: SetRequest) -> Result<SetResponse> {
        let p = self.route(r.route.as_ref())?;
        let condition = match SetCondition::try_from(r.condition) {
            Ok(SetCondition::None) => Condition::Always,
            Ok(SetCondition::IfAbsent) => Condition::IfAbsent,
            Ok(SetCondition::IfPresent) => Condition::IfPresent,
            Ok(SetCondition::IfVersion) => Condition::IfVersion(r.expected_version),
            Ok(SetCondition::Unspecified) => {
                return Err(NodeError::InvalidArgument(
                    "set condition is unset: use NONE, IF_ABSENT, IF_PRESENT or IF_VERSION".into(),
                ))
            }
            Err(_) => {
                return Err(NodeError::InvalidArgument(format!(
                    "unknown set condition {}: use NONE, IF_ABSENT, IF_PRESENT or IF_VERSION",
                    r.condition
                )))
            }
        };
        if r.keep_ttl && r.ttl_ms != 0 {
            return Err(NodeError::InvalidArgument(
                "keep_ttl and ttl_ms exclude each other".into(),
            ));
        }
        let req = WriteRequest::Set {
            key: r.key,
            value: r.value,
            ttl_ms: nonzero(r.ttl_ms),
            keep_ttl: r.keep_ttl,
            condition,
        };
        match self.engine.write(p, req)? {
            Outcome::Set { applied, version } => Ok(SetResponse { applied, version }),
            other => Err(unexpected("set", &other)),
        }
    }

    fn do_delete(&self, r: DeleteRequest) -> Result<DeleteResponse> {
        let p = self.route(r.route.as_ref())?;
        match self.engine.write(p, WriteRequest::Delete { key: r.key })? {
            Outcome::Deleted(deleted) => Ok(DeleteResponse { deleted }),
            other => Err(unexpected("delete", &other)),
        }
    }

    fn do_incr(&self, r: IncrRequest) -> Result<IncrResponse> {
        let p = self.route(r.route.as_ref())?;
        let req = WriteRequest::Incr {
            key: r.key,
            delta: r.delta,
        };
        match self.engine.write(p, req)? {
            // `Engine::write` returns INCR failures as errors, so only success is left.
            Outcome::Incr(Ok((value, version))) => Ok(IncrResponse { value, version }),
            other => Err(unexpected("incr", &other)),
        }
    }

    fn do_expire(&self, r: ExpireRequest) -> Result<ExpireResponse> {
        let p = self.route(r.route.as_ref())?;
        let req = WriteRequest::Expire {
            key: r.key,
            ttl_ms: nonzero(r.ttl_ms),
        };
        match self.engine.write(p, req)? {
            Outcome::Expire(updated) => Ok(ExpireResponse { updated }),
            other => Err(unexpected("expire", &other)),
        }
    }

    fn cluster_map(&self) -> ClusterMapResponse {
        let id = self.node.id;
        let count = self.engine.config().partitions;
        ClusterMapResponse {
            epoch: self.node.epoch,
            partition_count: count,
            vnodes: self.node.vnodes,
            nodes: vec![PbNodeInfo {
                id,
                addr: self.node.advertise_addr.clone(),
            }],
            partitions: (0..count)
                .map(|p| PartitionInfo {
                    id: p,
                    leader: id,
                    replicas: vec![id],
                    term: 0,
                    applied: self.engine.partition_applied(PartitionId(p)).unwrap_or(0),
                })
                .collect(),
            node_id: id,
        }
    }

    fn stats(&self) -> StatsResponse {
        let s = self.engine.stats();
        StatsResponse {
            node_id: self.node.id,
            keys: s.keys,
            memory_used_bytes: s.memory_used,
            memory_limit_bytes: s.memory_limit,
            eviction_policy: s.policy.to_string(),
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
            expirations: s.expirations,
            uptime_seconds: self.started.elapsed().as_secs(),
            partitions: self.engine.config().partitions,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// Only the levels the API defines are accepted; on a single node every level is
/// served from the node's own state, which is always the latest.
fn check_consistency(level: i32) -> Result<()> {
    Consistency::try_from(level).map(|_| ()).map_err(|_| {
        NodeError::InvalidArgument(format!(
            "unknown consistency level {level}: use LINEARIZABLE, LEASE or FOLLOWER"
        ))
    })
}

/// The wire uses 0 for "no TTL".
fn nonzero(ms: u64) -> Option<u64> {
    (ms != 0).then_some(ms)
}

fn unexpected(op: &str, outcome: &Outcome) -> NodeError {
    NodeError::Internal(format!("{op} produced {outcome:?}"))
}

/// Records the op's metrics and turns its result into a gRPC reply.
fn reply<T>(op: &'static str, started: Instant, res: Result<T>) -> tonic::Result<Response<T>> {
    let result = match &res {
        Ok(_) => None,
        Err(e) => Some(error_code(e)),
    };
    metrics::record_op(op, result, started.elapsed());
    res.map(Response::new).map_err(|e| to_status(&e))
}

#[tonic::async_trait]
impl Cache for CacheService {
    async fn get(&self, req: Request<GetRequest>) -> tonic::Result<Response<GetResponse>> {
        let t = Instant::now();
        reply("get", t, self.do_get(req.into_inner()))
    }

    async fn m_get(&self, req: Request<MGetRequest>) -> tonic::Result<Response<MGetResponse>> {
        let t = Instant::now();
        reply("mget", t, self.do_mget(req.into_inner()))
    }

    async fn set(&self, req: Request<SetRequest>) -> tonic::Result<Response<SetResponse>> {
        let t = Instant::now();
        reply("set", t, self.do_set(req.into_inner()))
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> tonic::Result<Response<DeleteResponse>> {
        let t = Instant::now();
        reply("delete", t, self.do_delete(req.into_inner()))
    }

    async fn incr(&self, req: Request<IncrRequest>) -> tonic::Result<Response<IncrResponse>> {
        let t = Instant::now();
        reply("incr", t, self.do_incr(req.into_inner()))
    }

    async fn expire(&self, req: Request<ExpireRequest>) -> tonic::Result<Response<ExpireResponse>> {
        let t = Instant::now();
        reply("expire", t, self.do_expire(req.into_inner()))
    }

    async fn cluster_map(
        &self,
        _req: Request<ClusterMapRequest>,
    ) -> tonic::Result<Response<ClusterMapResponse>> {
        let t = Instant::now();
        reply("cluster_map", t, Ok(CacheService::cluster_map(self)))
    }

    async fn stats(&self, _req: Request<StatsRequest>) -> tonic::Result<Response<StatsResponse>> {
        let t = Instant::now();
        reply("stats", t, Ok(CacheService::stats(self)))
    }
}

/// Lets `Status` conversions be used with `?` in tests and callers.
impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        to_status(&e)
    }
}
