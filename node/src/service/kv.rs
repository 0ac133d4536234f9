//! The `raftcache.v1.Cache` service over the replicated node.
//!
//! Every handler does the same steps: check the route (partition), translate the request
//! into a [`ClusterNode`] call (writes go through the partition's Raft group; reads wait
//! for the requested consistency), map the outcome to the reply, and record
//! `raftcache_ops_total{op,result}` and the latency histogram.
//!
//! The route's epoch is informational: the partition count never changes, so a request
//! with an old map still names the right partition, and the leader check decides where it
//! is served. A request routed with a *newer* epoch than this node knows is answered with
//! `WRONG_EPOCH` only if this node cannot serve it (so the client retries elsewhere).

use crate::cluster::ClusterNode;
use crate::error::{NodeError, Result};
use crate::hot::HotKeys;
use crate::metrics;
use crate::service::status::{error_code, to_status};
use crate::storage::{
    CdcError, CdcWrite, Condition, Outcome, PartitionId, ReadView, RequestId, StorageError,
    WriteRequest,
};
use bytes::Bytes;
use raftcache_proto::pg_snapshot::PgSnapshot;
use raftcache_proto::tonic::{self, Request, Response, Status};
use raftcache_proto::v1::cache_server::Cache;
use raftcache_proto::v1::{
    ApplyChangesRequest, ApplyChangesResponse, ChangeKind, ClusterMapRequest, ClusterMapResponse,
    Consistency, DeleteRequest, DeleteResponse, ExpireRequest, ExpireResponse, GetRequest,
    GetResponse, IncrRequest, IncrResponse, MGetRequest, MGetResponse, Route, SetCondition,
    SetRequest, SetResponse, StatsRequest, StatsResponse,
};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most keys one `MGet` may ask for; bounds the work and the reply of one request.
pub const MAX_MGET_KEYS: usize = 10_000;

/// Most changes one `ApplyChanges` may carry (one Raft entry).
pub const MAX_CHANGES: usize = 10_000;

/// How long a `min_lsn` read waits when the request has no deadline.
const DEFAULT_LSN_WAIT: Duration = Duration::from_millis(1500);
/// The longest a `min_lsn` read waits.
const MAX_LSN_WAIT: Duration = Duration::from_secs(10);
/// Kept from the request's deadline so the "not reached" answer arrives before it.
const LSN_WAIT_MARGIN: Duration = Duration::from_millis(100);

/// A request's write id (`client` 0: none, the request is not deduplicated).
fn request_id(r: Option<&raftcache_proto::v1::RequestId>) -> Option<RequestId> {
    r.filter(|r| r.client != 0).map(|r| RequestId {
        client: r.client,
        seq: r.seq,
    })
}

/// How long a `min_lsn` read may wait: the request's gRPC deadline (`grpc-timeout`)
/// minus a margin, at most [`MAX_LSN_WAIT`]; [`DEFAULT_LSN_WAIT`] without one.
fn lsn_wait(metadata: &tonic::metadata::MetadataMap) -> Duration {
    let timeout = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    match timeout {
        Some(t) => t.saturating_sub(LSN_WAIT_MARGIN).min(MAX_LSN_WAIT),
        None => DEFAULT_LSN_WAIT,
    }
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC `Cache` service. Cheap to clone; all state is shared.
#[derive(Clone)]
pub struct CacheService {
    node: Arc<ClusterNode>,
    /// Every keyed request is counted here (`Stats.hot_keys`, metrics).
    hot: Arc<HotKeys>,
    /// Runs Redis commands forwarded by other nodes' RESP listeners (`Resp`).
    resp: Option<Arc<crate::resp::Frontend>>,
}

impl CacheService {
    /// A service answering for `node`.
    pub fn new(node: Arc<ClusterNode>) -> Self {
        CacheService {
            node,
            hot: Arc::new(HotKeys::new()),
            resp: None,
        }
    }

    /// Serves `Resp` with `frontend`.
    pub fn set_resp(&mut self, frontend: Arc<crate::resp::Frontend>) {
        self.resp = Some(frontend);
    }

    async fn do_resp(
        &self,
        r: raftcache_proto::v1::RespRequest,
    ) -> Result<raftcache_proto::v1::RespResponse> {
        use crate::resp::codec::Protocol;
        let frontend = self
            .resp
            .as_ref()
            .ok_or_else(|| NodeError::Unavailable("no RESP front end on this node".into()))?;
        let protocol = match r.protocol {
            2 => Protocol::Resp2,
            3 => Protocol::Resp3,
            other => {
                return Err(NodeError::InvalidArgument(format!(
                    "protocol {other} is neither 2 nor 3"
                )))
            }
        };
        let request = request_id(r.request.as_ref());
        let route = r.route.as_ref();
        // Forwards carry the forwarding node's cluster in their route.
        self.node
            .check_route_cluster(route.map_or(0, |r| r.cluster_id))?;
        let reply = frontend
            .run_forwarded(route.map(|r| r.partition), &r.args, request)
            .await
            .map_err(|e| self.epoch_aware(route, e))?;
        Ok(raftcache_proto::v1::RespResponse {
            reply: crate::resp::codec::encode_to_bytes(&reply, protocol),
        })
    }

    /// The hot-key tracker the handlers feed (for the metrics endpoint).
    pub fn hot_keys(&self) -> Arc<HotKeys> {
        self.hot.clone()
    }

    /// Counts a keyed request for the hot-key tracker (unrouted ones fail anyway).
    fn note(&self, route: Option<&Route>, key: &[u8]) {
        if let Some(route) = route {
            self.hot.record(route.partition, key);
        }
    }

    /// The partition a keyed request was routed to (range checked by the node). A
    /// removed node, or a request routed with another cluster's map, is refused here:
    /// every keyed call goes through this.
    fn route(&self, route: Option<&Route>) -> Result<PartitionId> {
        self.node.serving()?;
        let route = route.ok_or_else(|| {
            NodeError::InvalidArgument(
                "missing route: compute the key's partition with the ring described by ClusterMap"
                    .into(),
            )
        })?;
        self.node.check_route_cluster(route.cluster_id)?;
        Ok(PartitionId(route.partition))
    }

    /// Turns `NotLeader` into `WrongEpoch` when the client's map is newer than ours.
    fn epoch_aware(&self, route: Option<&Route>, e: NodeError) -> NodeError {
        let current = self.node.epoch();
        match (&e, route) {
            (NodeError::NotLeader { leader: None, .. }, Some(r)) if r.epoch > current => {
                NodeError::WrongEpoch {
                    got: r.epoch,
                    current,
                }
            }
            _ => e,
        }
    }

    async fn do_get(&self, r: GetRequest, lsn_wait: Duration) -> Result<GetResponse> {
        self.note(r.route.as_ref(), &r.key);
        let consistency = consistency(r.consistency)?;
        let p = self.route(r.route.as_ref())?;
        self.node.wait_cdc(p, r.min_lsn, lsn_wait).await?;
        let view = self
            .node
            .read(
                p,
                &r.key,
                consistency,
                Duration::from_millis(r.max_staleness_ms),
            )
            .await
            .map_err(|e| self.epoch_aware(r.route.as_ref(), e))?;
        Ok(to_response(view, r.skip_value))
    }

    async fn do_mget(&self, r: MGetRequest, lsn_wait: Duration) -> Result<MGetResponse> {
        r.keys
            .iter()
            .for_each(|k| self.note(k.route.as_ref(), &k.key));
        let consistency = consistency(r.consistency)?;
        if r.keys.len() > MAX_MGET_KEYS {
            return Err(NodeError::InvalidArgument(format!(
                "MGet of {} keys is over the limit of {MAX_MGET_KEYS}; split it",
                r.keys.len()
            )));
        }
        let staleness = Duration::from_millis(r.max_staleness_ms);
        let mut partitions = BTreeSet::new();
        for k in &r.keys {
            partitions.insert(self.route(k.route.as_ref())?);
        }
        // One readiness check per partition, not per key.
        let deadline = Instant::now() + lsn_wait;
        for p in partitions {
            let left = deadline.saturating_duration_since(Instant::now());
            self.node.wait_cdc(p, r.min_lsn, left).await?;
            self.node.read_ready(p, consistency, staleness).await?;
        }
        let values = r
            .keys
            .iter()
            .map(|k| {
                let p = self.route(k.route.as_ref())?;
                Ok(to_response(self.node.read_local(p, &k.key)?, false))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MGetResponse { values })
    }

    async fn write(&self, route: Option<&Route>, req: WriteRequest) -> Result<Outcome> {
        self.write_once(route, req, None).await
    }

    /// A client write, applied at most once per request id (see `storage::RequestLog`).
    async fn write_once(
        &self,
        route: Option<&Route>,
        req: WriteRequest,
        request: Option<&raftcache_proto::v1::RequestId>,
    ) -> Result<Outcome> {
        let p = self.route(route)?;
        let request = request_id(request);
        self.node
            .write_once(p, req, request)
            .await
            .map_err(|e| self.epoch_aware(route, e))
    }

    async fn do_set(&self, r: SetRequest) -> Result<SetResponse> {
        self.note(r.route.as_ref(), &r.key);
        if r.lease_token != 0 {
            return self.do_fill(r).await;
        }
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
            key: exact(&r.key),
            value: exact(&r.value),
            ttl_ms: nonzero(r.ttl_ms),
            keep_ttl: r.keep_ttl,
            condition,
            source_lsn: r.source_lsn,
            source_snapshot: fill_snapshot(&r)?,
        };
        match self
            .write_once(r.route.as_ref(), req, r.request.as_ref())
            .await?
        {
            Outcome::Set {
                applied,
                version,
                newer_lsn,
            } => Ok(SetResponse {
                applied,
                version,
                stale: newer_lsn != 0,
                newer_lsn,
                lease_lost: false,
            }),
            other => Err(unexpected("set", &other)),
        }
    }

    async fn do_delete(&self, r: DeleteRequest) -> Result<DeleteResponse> {
        self.note(r.route.as_ref(), &r.key);
        let req = WriteRequest::Delete { key: exact(&r.key) };
        match self
            .write_once(r.route.as_ref(), req, r.request.as_ref())
            .await?
        {
            Outcome::Deleted(deleted) => Ok(DeleteResponse { deleted }),
            other => Err(unexpected("delete", &other)),
        }
    }

    async fn do_incr(&self, r: IncrRequest) -> Result<IncrResponse> {
        self.note(r.route.as_ref(), &r.key);
        let req = WriteRequest::Incr {
            key: exact(&r.key),
            delta: r.delta,
        };
        match self
            .write_once(r.route.as_ref(), req, r.request.as_ref())
            .await?
        {
            // The node returns INCR failures as errors, so only success is left.
            Outcome::Incr(Ok((value, version))) => Ok(IncrResponse { value, version }),
            other => Err(unexpected("incr", &other)),
        }
    }

    async fn do_expire(&self, r: ExpireRequest) -> Result<ExpireResponse> {
        self.note(r.route.as_ref(), &r.key);
        let req = WriteRequest::Expire {
            key: exact(&r.key),
            ttl_ms: nonzero(r.ttl_ms),
        };
        match self
            .write_once(r.route.as_ref(), req, r.request.as_ref())
            .await?
        {
            Outcome::Expire(updated) => Ok(ExpireResponse { updated }),
            other => Err(unexpected("expire", &other)),
        }
    }

    async fn do_apply_changes(&self, r: ApplyChangesRequest) -> Result<ApplyChangesResponse> {
        let p = self.route(r.route.as_ref())?;
        if r.changes.len() > MAX_CHANGES {
            return Err(NodeError::InvalidArgument(format!(
                "ApplyChanges of {} changes is over the limit of {MAX_CHANGES}; split it",
                r.changes.len()
            )));
        }
        if !r.changes.is_empty() && r.xid == 0 && r.min_xmin == 0 {
            return Err(NodeError::InvalidArgument(
                "ApplyChanges with changes needs the xid of their transaction (or min_xmin \
                 for a reset): upgrade the CDC worker"
                    .into(),
            ));
        }
        if r.lsn == 0 && !r.changes.is_empty() {
            return Err(NodeError::InvalidArgument(
                "ApplyChanges with changes needs their commit lsn".into(),
            ));
        }
        let changes = r
            .changes
            .iter()
            .map(|c| match ChangeKind::try_from(c.kind) {
                Ok(ChangeKind::Invalidate) => Ok(CdcWrite::Invalidate { key: exact(&c.key) }),
                Ok(ChangeKind::Put) => Ok(CdcWrite::Put {
                    key: exact(&c.key),
                    value: exact(&c.value),
                    ttl_ms: nonzero(c.ttl_ms),
                }),
                Ok(ChangeKind::InvalidatePrefix) => Ok(CdcWrite::InvalidatePrefix {
                    prefix: exact(&c.key),
                }),
                Ok(ChangeKind::Unspecified) | Err(_) => Err(NodeError::InvalidArgument(format!(
                    "unknown change kind {}: use INVALIDATE, PUT or INVALIDATE_PREFIX",
                    c.kind
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let request = |changes: Vec<CdcWrite>| WriteRequest::Cdc {
            lsn: r.lsn,
            watermark: r.watermark,
            fence: r.fence,
            xid: r.xid,
            min_xmin: r.min_xmin,
            changes,
        };
        let outcome = match self.write(r.route.as_ref(), request(changes.clone())).await {
            // Out of memory for the new rows: invalidating them instead is always
            // correct (readers miss and refill), and never blocks CDC.
            Err(NodeError::Storage(StorageError::OutOfMemory { .. })) => {
                let invalidations = changes
                    .into_iter()
                    .map(|c| match c {
                        CdcWrite::Put { key, .. } => CdcWrite::Invalidate { key },
                        other => other,
                    })
                    .collect();
                self.write(r.route.as_ref(), request(invalidations)).await?
            }
            other => other?,
        };
        match outcome {
            Outcome::Cdc(Ok(applied)) => Ok(ApplyChangesResponse {
                changed: applied.changed,
                watermark: applied.watermark,
            }),
            Outcome::Cdc(Err(CdcError::Fenced { current })) => Err(NodeError::Fenced {
                partition: p.0,
                got: r.fence,
                current,
            }),
            other => Err(unexpected("apply_changes", &other)),
        }
    }

    fn stats(&self) -> Result<StatsResponse> {
        let engine = self.node.data_engine()?;
        let s = engine.stats();
        let snap = self.node.snapshot_stats();
        Ok(StatsResponse {
            persistence: self.node.persistence().to_string(),
            snapshots_written: snap.written,
            last_snapshot_unix_ms: snap.last_at_unix_ms,
            last_snapshot_bytes: snap.last_bytes,
            last_snapshot_ms: snap.last_duration_ms,
            snapshot_max_pause_us: snap.max_pause_us,
            snapshot_stored_bytes: snap.stored_bytes,
            disk_bytes: self.node.disk_bytes(),
            node_id: self.node.node_id(),
            keys: s.keys,
            memory_used_bytes: s.memory_used,
            memory_limit_bytes: s.memory_limit,
            eviction_policy: s.policy.to_string(),
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
            expirations: s.expirations,
            uptime_seconds: self.node.started().elapsed().as_secs(),
            partitions: engine.config().partitions,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            hot_keys: self
                .hot
                .top(crate::hot::REPORTED)
                .into_iter()
                .map(|h| raftcache_proto::v1::HotKey {
                    key: h.key,
                    partition: h.partition,
                    per_second: h.per_second,
                    count: h.count,
                    error: h.error,
                })
                .collect(),
        })
    }
}

// ---- Fill leases (see `storage::lease`) ------------------------------------------------

impl CacheService {
    /// `GetOrLease`: a fresh value on the leader is a HIT without a Raft write; otherwise
    /// the partition decides through a `Lease` op, and GRANTED / WAIT / MISS carry the
    /// value still stored (stale, for stale-while-revalidate) when there is one.
    async fn do_get_or_lease(
        &self,
        r: raftcache_proto::v1::GetOrLeaseRequest,
    ) -> Result<raftcache_proto::v1::GetOrLeaseResponse> {
        self.note(r.route.as_ref(), &r.key);
        use crate::storage::{is_fresh, lease_ttl_ms, LeaseDecision, MAX_TTL_MS};
        use raftcache_proto::v1::{GetOrLeaseResponse, LeaseOutcome};

        let p = self.route(r.route.as_ref())?;
        // Checked before the fast path, so a bad request fails on a hit as well.
        lease_ttl_ms(r.lease_ttl_ms)?;
        if r.stale_window_ms > MAX_TTL_MS {
            return Err(StorageError::TtlOutOfRange {
                ttl_ms: r.stale_window_ms,
                limit_ms: MAX_TTL_MS,
            }
            .into());
        }
        let view = self
            .node
            .read(p, &r.key, Consistency::Lease, Duration::ZERO)
            .await
            .map_err(|e| self.epoch_aware(r.route.as_ref(), e))?;
        if let Some(v) = view.filter(|v| is_fresh(v.ttl_remaining_ms, r.stale_window_ms)) {
            metrics::record_lease("hit");
            return Ok(GetOrLeaseResponse {
                outcome: LeaseOutcome::Hit.into(),
                value: Some(to_response(Some(v), false)),
                lease_token: 0,
                lease_remaining_ms: 0,
            });
        }
        let req = WriteRequest::Lease {
            key: exact(&r.key),
            lease_ttl_ms: r.lease_ttl_ms,
            stale_window_ms: r.stale_window_ms,
        };
        let decision = match self.write(r.route.as_ref(), req).await? {
            Outcome::Lease(decision) => decision,
            other => return Err(unexpected("get_or_lease", &other)),
        };
        // The value as it is now (a `Lease` op never changes it): the fresh value of a
        // HIT (written since the fast path looked), else the stale one, if any.
        let current = self.node.data_engine()?.peek(p, &r.key)?;
        let (outcome, label, lease_token, lease_remaining_ms) = match decision {
            LeaseDecision::Hit => (LeaseOutcome::Hit, "hit", 0, 0),
            LeaseDecision::Granted { token } => (LeaseOutcome::Granted, "granted", token, 0),
            LeaseDecision::Wait { remaining_ms } => (LeaseOutcome::Wait, "wait", 0, remaining_ms),
            LeaseDecision::Miss => (LeaseOutcome::Miss, "miss", 0, 0),
        };
        metrics::record_lease(label);
        Ok(GetOrLeaseResponse {
            outcome: outcome.into(),
            value: Some(to_response(current, false)),
            lease_token,
            lease_remaining_ms,
        })
    }

    /// `ReleaseLease`: ends the key's lease if it still is `lease_token`.
    async fn do_release_lease(
        &self,
        r: raftcache_proto::v1::ReleaseLeaseRequest,
    ) -> Result<raftcache_proto::v1::ReleaseLeaseResponse> {
        let req = WriteRequest::ReleaseLease {
            key: exact(&r.key),
            token: r.lease_token,
        };
        match self.write(r.route.as_ref(), req).await? {
            Outcome::Released(released) => {
                Ok(raftcache_proto::v1::ReleaseLeaseResponse { released })
            }
            other => Err(unexpected("release_lease", &other)),
        }
    }

    /// A `Set` with a `lease_token`: a `Fill` (exactly once per request id, like `Set`).
    async fn do_fill(&self, r: SetRequest) -> Result<SetResponse> {
        if SetCondition::try_from(r.condition) != Ok(SetCondition::None) {
            return Err(NodeError::InvalidArgument(format!(
                "a set with lease_token needs condition NONE, not {}: a fill writes \
                 whenever its lease still holds",
                r.condition
            )));
        }
        if r.keep_ttl {
            return Err(NodeError::InvalidArgument(
                "lease_token and keep_ttl exclude each other: a fill takes its TTL from ttl_ms"
                    .into(),
            ));
        }
        let req = WriteRequest::Fill {
            key: exact(&r.key),
            value: exact(&r.value),
            ttl_ms: nonzero(r.ttl_ms),
            source_lsn: r.source_lsn,
            source_snapshot: fill_snapshot(&r)?,
            token: r.lease_token,
        };
        match self
            .write_once(r.route.as_ref(), req, r.request.as_ref())
            .await?
        {
            Outcome::Fill {
                applied,
                version,
                newer_lsn,
                lease_lost,
            } => {
                metrics::record_lease_fill(if lease_lost {
                    "lost"
                } else if applied {
                    "applied"
                } else {
                    "stale"
                });
                Ok(SetResponse {
                    applied,
                    version,
                    stale: newer_lsn != 0,
                    newer_lsn,
                    lease_lost,
                })
            }
            other => Err(unexpected("set", &other)),
        }
    }
}

/// An exact-size copy: the request's bytes are slices of the HTTP/2 frame they arrived
/// in, and a Raft log entry keeps its op until the log is purged; a slice would pin the
/// whole frame that long.
fn exact(b: &Bytes) -> Bytes {
    Bytes::copy_from_slice(b)
}

fn to_response(view: Option<ReadView>, skip_value: bool) -> GetResponse {
    match view {
        Some(v) => GetResponse {
            found: true,
            value: if skip_value { Bytes::new() } else { v.value },
            version: v.version,
            ttl_remaining_ms: v.ttl_remaining_ms,
            source_lsn: v.source_lsn,
        },
        None => GetResponse::default(),
    }
}

/// Only the levels the API defines are accepted; unspecified means LEASE.
fn consistency(level: i32) -> Result<Consistency> {
    Consistency::try_from(level).map_err(|_| {
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
        let wait = lsn_wait(req.metadata());
        reply("get", t, self.do_get(req.into_inner(), wait).await)
    }

    async fn m_get(&self, req: Request<MGetRequest>) -> tonic::Result<Response<MGetResponse>> {
        let t = Instant::now();
        let wait = lsn_wait(req.metadata());
        reply("mget", t, self.do_mget(req.into_inner(), wait).await)
    }

    async fn set(&self, req: Request<SetRequest>) -> tonic::Result<Response<SetResponse>> {
        let t = Instant::now();
        reply("set", t, self.do_set(req.into_inner()).await)
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> tonic::Result<Response<DeleteResponse>> {
        let t = Instant::now();
        reply("delete", t, self.do_delete(req.into_inner()).await)
    }

    async fn incr(&self, req: Request<IncrRequest>) -> tonic::Result<Response<IncrResponse>> {
        let t = Instant::now();
        reply("incr", t, self.do_incr(req.into_inner()).await)
    }

    async fn expire(&self, req: Request<ExpireRequest>) -> tonic::Result<Response<ExpireResponse>> {
        let t = Instant::now();
        reply("expire", t, self.do_expire(req.into_inner()).await)
    }

    async fn cluster_map(
        &self,
        _req: Request<ClusterMapRequest>,
    ) -> tonic::Result<Response<ClusterMapResponse>> {
        let t = Instant::now();
        reply("cluster_map", t, Ok(self.node.cluster_map()))
    }

    async fn apply_changes(
        &self,
        req: Request<ApplyChangesRequest>,
    ) -> tonic::Result<Response<ApplyChangesResponse>> {
        let t = Instant::now();
        reply(
            "apply_changes",
            t,
            self.do_apply_changes(req.into_inner()).await,
        )
    }

    async fn stats(&self, _req: Request<StatsRequest>) -> tonic::Result<Response<StatsResponse>> {
        let t = Instant::now();
        reply("stats", t, CacheService::stats(self))
    }

    async fn get_or_lease(
        &self,
        req: Request<raftcache_proto::v1::GetOrLeaseRequest>,
    ) -> tonic::Result<Response<raftcache_proto::v1::GetOrLeaseResponse>> {
        let t = Instant::now();
        reply(
            "get_or_lease",
            t,
            self.do_get_or_lease(req.into_inner()).await,
        )
    }

    async fn release_lease(
        &self,
        req: Request<raftcache_proto::v1::ReleaseLeaseRequest>,
    ) -> tonic::Result<Response<raftcache_proto::v1::ReleaseLeaseResponse>> {
        let t = Instant::now();
        reply(
            "release_lease",
            t,
            self.do_release_lease(req.into_inner()).await,
        )
    }

    async fn resp(
        &self,
        req: Request<raftcache_proto::v1::RespRequest>,
    ) -> tonic::Result<Response<raftcache_proto::v1::RespResponse>> {
        let t = Instant::now();
        reply("resp", t, self.do_resp(req.into_inner()).await)
    }

    type WatchStream = crate::watch::EventStream;

    /// SYNC (replica here) or RESET per requested partition, then its CHANGE events; see
    /// [`crate::watch`]. The stream ends when the client leaves or the node shuts down.
    async fn watch(
        &self,
        req: Request<raftcache_proto::v1::WatchRequest>,
    ) -> tonic::Result<Response<Self::WatchStream>> {
        let t = Instant::now();
        let opened = self
            .node
            .serving()
            .and_then(|()| self.node.data_engine())
            .and_then(|engine| {
                crate::watch::requested_partitions(
                    &req.get_ref().partitions,
                    engine.partition_count(),
                )
                .map_err(NodeError::InvalidArgument)
            })
            .map(|partitions| {
                crate::watch::open(
                    self.node.watch().clone(),
                    &partitions,
                    self.node.shutdown_token().clone(),
                )
            });
        reply("watch", t, opened)
    }
}

/// Lets `Status` conversions be used with `?` in tests and callers.
impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        to_status(&e)
    }
}

/// The validated `source_snapshot` of a `Set` (an exact cache-aside fill), if any.
fn fill_snapshot(r: &SetRequest) -> Result<Option<PgSnapshot>> {
    r.source_snapshot
        .as_ref()
        .map(|w| {
            PgSnapshot::from_wire(w)
                .map_err(|e| NodeError::InvalidArgument(format!("source_snapshot: {e}")))
        })
        .transpose()
}
