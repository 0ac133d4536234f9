//! The cluster map, the merged cluster status, and the routing table built from the
//! map.
//!
//! [`ClusterMap`] is one node's `ClusterMapResponse`, checked and turned into plain
//! Rust. [`ClusterStatus`] merges the maps of every node into one view with live
//! leaders. A `Topology` (crate-private) adds what routing needs: the [`Ring`] of the
//! map's shape, a channel per node and a leader cache per partition (which
//! `NOT_LEADER` hints update at once), so that routing a key is a ring lookup and two
//! vector indexings:
//!
//! ```text
//! key ──ring──► partition ──leaders[p]──► node ──► channel
//!                         └─replicas[p]──► node (FOLLOWER reads)
//! ```

use crate::error::{ClientError, Result};
use crate::lsn::Lsn;
use crate::pool::Pool;
use crate::ring::Ring;
use raftcache_proto::tonic::transport::Channel;
use raftcache_proto::v1;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;

/// The state of a node that a map reports when it reports none (older nodes).
const ACTIVE: &str = "active";

/// The cluster as one node describes it: the ring's shape, the nodes, and where each
/// partition lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterMap {
    /// Increases whenever placement changes; every keyed request carries it.
    pub epoch: u64,
    /// `P`, the number of partitions.
    pub partition_count: u32,
    /// `V`, the virtual nodes per partition on the ring.
    pub vnodes: u32,
    /// `R`, the replication factor the cluster aims for (fewer replicas while nodes
    /// are missing); 0 when the node did not say.
    pub replication_factor: u32,
    /// The id of the node that answered.
    pub node_id: u64,
    /// The nodes, in the order the node listed them.
    pub nodes: Vec<NodeInfo>,
    /// The partitions, ordered by id.
    pub partitions: Vec<PartitionInfo>,
    /// The cluster's identity (random, non-zero, chosen when the cluster was founded;
    /// 0 from nodes of a version without cluster ids). Epochs order the maps of one
    /// cluster only: a map with another id is another cluster (see [`map_change`]).
    pub cluster_id: u64,
}

/// What the client does with a fetched map, given the one it caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapChange {
    /// Same cluster, same or newer epoch: cache it.
    Install,
    /// Same cluster, older epoch (or another cluster than the one the client is
    /// pinned to): keep the cached map.
    Ignore,
    /// Another cluster (restarted on the same addresses): drop the cached map and
    /// everything learnt about its nodes, and cache this one whatever its epoch.
    NewCluster,
}

/// The map-replacement rule: an epoch only orders maps of the same cluster; a map of
/// another cluster replaces the cached one regardless of epoch, unless the client is
/// pinned to a cluster (`pinned` non-zero, [`ClientConfig::cluster_id`]) and the map
/// is not of it.
///
/// [`ClientConfig::cluster_id`]: crate::ClientConfig::cluster_id
pub fn map_change(cached: &ClusterMap, fetched: &ClusterMap, pinned: u64) -> MapChange {
    if pinned != 0 && fetched.cluster_id != pinned {
        MapChange::Ignore
    } else if fetched.cluster_id != cached.cluster_id {
        MapChange::NewCluster
    } else if fetched.epoch < cached.epoch {
        MapChange::Ignore
    } else {
        MapChange::Install
    }
}

/// Which cluster a map refresh follows, given the clusters of the maps that came back
/// (`from_seed`: the answering address is one of the configured endpoints) and the
/// cached cluster:
/// - pinned: only that one;
/// - the cached cluster while any configured endpoint still answers with it, or when
///   no configured endpoint answered at all (a node learnt from an old map — a
///   leftover member of a cluster that was restarted — can never move the client to
///   its cluster, nor away from it);
/// - otherwise the cluster of the first configured endpoint that answered: the
///   endpoints were restarted as a new cluster.
pub fn follow_cluster(cached: u64, pinned: u64, answers: &[(bool, u64)]) -> u64 {
    if pinned != 0 {
        return pinned;
    }
    let mut seeds = answers.iter().filter(|(seed, _)| *seed).map(|(_, c)| *c);
    let first = seeds.clone().next();
    if seeds.any(|c| c == cached) {
        return cached;
    }
    first.unwrap_or(cached)
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    /// The node's id (assigned by the cluster, never reused).
    pub id: u64,
    /// Where clients reach it (`host:port`).
    pub addr: String,
    /// `active`, or `draining` while `remove-node` moves its replicas away.
    pub state: String,
}

impl NodeInfo {
    /// Whether the node is being drained (removed).
    pub fn is_draining(&self) -> bool {
        self.state == "draining"
    }
}

/// One partition and where it lives, as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionInfo {
    /// The partition id, below [`ClusterMap::partition_count`].
    pub id: u32,
    /// The node id of the leader; `None` while an election is in progress. When
    /// [`PartitionInfo::observed`] is false, only the preferred leader of the
    /// placement.
    pub leader: Option<u64>,
    /// The node ids holding a voting replica.
    pub replicas: Vec<u64>,
    /// The node ids being added as learners (catching up before they vote).
    pub learners: Vec<u64>,
    /// The leader's Raft term (0 on a single unreplicated node).
    pub term: u64,
    /// The highest applied log index.
    pub applied: u64,
    /// Whether `leader`, `term` and `applied` are live, from a replica on the node
    /// that answered.
    pub observed: bool,
    /// The observed replica's CDC watermark: every Postgres commit before it is
    /// applied to the partition ([`Lsn::ZERO`]: no CDC yet, or not observed).
    pub cdc_lsn: Lsn,
}

impl ClusterMap {
    /// The partition `id`, if the map lists it.
    pub fn partition(&self, id: u32) -> Option<&PartitionInfo> {
        self.partitions
            .binary_search_by_key(&id, |p| p.id)
            .ok()
            .map(|i| &self.partitions[i])
    }
}

impl TryFrom<v1::ClusterMapResponse> for ClusterMap {
    type Error = ClientError;

    /// Checks the map a node sent: a ring shape the client can build, unique node
    /// ids, and partition ids that are in range and unique.
    fn try_from(m: v1::ClusterMapResponse) -> Result<ClusterMap> {
        let invalid = |what: String| Err(ClientError::InvalidResponse(what));
        if !Ring::is_valid_shape(m.partition_count, m.vnodes) {
            return invalid(format!(
                "cluster map has an unusable ring of {} partitions x {} vnodes",
                m.partition_count, m.vnodes
            ));
        }
        let mut node_ids = HashSet::new();
        for n in &m.nodes {
            if !node_ids.insert(n.id) {
                return invalid(format!("cluster map lists node {} twice", n.id));
            }
        }
        let mut partition_ids = HashSet::new();
        for p in &m.partitions {
            if p.id >= m.partition_count || !partition_ids.insert(p.id) {
                return invalid(format!(
                    "cluster map has partition {} out of range or twice (partition_count {})",
                    p.id, m.partition_count
                ));
            }
        }
        let mut partitions: Vec<PartitionInfo> = m
            .partitions
            .into_iter()
            .map(|p| PartitionInfo {
                id: p.id,
                leader: (p.leader != 0).then_some(p.leader),
                replicas: p.replicas,
                learners: p.learners,
                term: p.term,
                applied: p.applied,
                observed: p.observed,
                cdc_lsn: Lsn(p.cdc_lsn),
            })
            .collect();
        partitions.sort_by_key(|p| p.id);
        Ok(ClusterMap {
            epoch: m.epoch,
            partition_count: m.partition_count,
            vnodes: m.vnodes,
            replication_factor: m.replication_factor,
            node_id: m.node_id,
            nodes: m
                .nodes
                .into_iter()
                .map(|n| NodeInfo {
                    id: n.id,
                    addr: n.addr,
                    state: if n.state.is_empty() {
                        ACTIVE.to_owned()
                    } else {
                        n.state
                    },
                })
                .collect(),
            partitions,
            cluster_id: m.cluster_id,
        })
    }
}

/// The cluster as all its nodes together describe it (see [`ClusterStatus::merge`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// The highest epoch any node reported; placement comes from that node's map.
    pub epoch: u64,
    /// `R`, the replication factor the cluster aims for.
    pub replication_factor: u32,
    /// The nodes of the newest map.
    pub nodes: Vec<NodeInfo>,
    /// One entry per partition of the newest map, ordered by id.
    pub partitions: Vec<PartitionStatus>,
    /// The addresses of the nodes that did not answer.
    #[serde(skip)]
    pub unreachable: Vec<String>,
}

/// One partition in a [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionStatus {
    /// The partition id.
    pub id: u32,
    /// The leader's node id; `None` when no node knows one.
    pub leader: Option<u64>,
    /// The node ids holding a voting replica.
    pub replicas: Vec<u64>,
    /// The node ids catching up as learners.
    pub learners: Vec<u64>,
    /// The leader's Raft term.
    pub term: u64,
    /// The highest applied log index, as the chosen report says.
    pub applied: u64,
    /// The CDC watermark, as the chosen report says.
    pub cdc_lsn: Lsn,
}

impl ClusterStatus {
    /// Merges the maps of several nodes; `None` when `reports` is empty.
    ///
    /// Placement (nodes, replicas, learners) comes from the report with the highest
    /// epoch. Per partition, leader, term and applied come from the observed report
    /// of a node that claims to lead it, the one with the highest term (then the
    /// highest applied index); failing that from any observed report (highest term
    /// first); failing that from the placement, whose leader is only the preferred
    /// one.
    pub fn merge(reports: &[ClusterMap]) -> Option<ClusterStatus> {
        let base = reports
            .iter()
            .reduce(|best, r| if r.epoch > best.epoch { r } else { best })?;
        let partitions = base
            .partitions
            .iter()
            .map(|placed| {
                let observed = reports.iter().filter_map(|r| {
                    r.partition(placed.id)
                        .filter(|p| p.observed)
                        .map(|p| (r.node_id, p))
                });
                let claimed = observed
                    .clone()
                    .filter(|(node, p)| p.leader == Some(*node))
                    .max_by_key(|(_, p)| (p.term, p.applied));
                let live = claimed
                    .or_else(|| {
                        observed.max_by_key(|(_, p)| (p.term, p.leader.is_some(), p.applied))
                    })
                    .map_or(placed, |(_, p)| p);
                PartitionStatus {
                    id: placed.id,
                    leader: live.leader,
                    replicas: placed.replicas.clone(),
                    learners: placed.learners.clone(),
                    term: live.term,
                    applied: live.applied,
                    cdc_lsn: live.cdc_lsn,
                }
            })
            .collect();
        Some(ClusterStatus {
            epoch: base.epoch,
            replication_factor: base.replication_factor,
            nodes: base.nodes.clone(),
            partitions,
            unreachable: Vec::new(),
        })
    }

    /// Whether every one of `partition_count` partitions is listed, has a known
    /// leader and at least `voters` voting replicas.
    pub fn is_settled(&self, partition_count: usize, voters: usize) -> bool {
        self.partitions.len() == partition_count
            && self
                .partitions
                .iter()
                .all(|p| p.leader.is_some() && p.replicas.len() >= voters)
    }
}

/// Where one keyed request goes.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The route to put in the request.
    pub(crate) route: v1::Route,
    /// The index of the node in [`Topology::nodes`].
    pub(crate) node: usize,
    /// The channel to that node.
    pub(crate) channel: Channel,
}

/// A node and its channel.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) info: NodeInfo,
    pub(crate) channel: Channel,
}

/// A cluster map ready for routing, with the leader cache.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub(crate) map: ClusterMap,
    pub(crate) ring: Arc<Ring>,
    /// The map's nodes, then any leader a `NOT_LEADER` hint named that the map lacks.
    pub(crate) nodes: Vec<Node>,
    /// For each partition id, the index in `nodes` of its leader, if known.
    leaders: Vec<Option<usize>>,
    /// For each partition id, the indices in `nodes` of its voting replicas.
    replicas: Vec<Vec<usize>>,
}

impl Topology {
    /// The nodes of the map (without those only a `NOT_LEADER` hint named): where a
    /// call to every node goes.
    pub(crate) fn map_nodes(&self) -> &[Node] {
        &self.nodes[..self.map.nodes.len().min(self.nodes.len())]
    }

    /// Builds the routing table of `map`, taking channels from `pool` and reusing
    /// `previous`'s ring when the shape is unchanged.
    ///
    /// A partition's leader is the map's when the map observed it live; otherwise
    /// the leader `previous` knew (from an older map or a `NOT_LEADER` hint) as long
    /// as it still holds a voting replica; otherwise the map's preferred leader.
    ///
    /// # Errors
    /// [`ClientError::InvalidResponse`] when a node's address is not a valid URI.
    pub(crate) fn new(
        map: ClusterMap,
        pool: &Pool,
        previous: Option<&Topology>,
    ) -> Result<Topology> {
        let ring = match previous {
            Some(t)
                if t.ring.partitions() == map.partition_count && t.ring.vnodes() == map.vnodes =>
            {
                Arc::clone(&t.ring)
            }
            _ => Arc::new(Ring::new(map.partition_count, map.vnodes)),
        };
        let nodes = map
            .nodes
            .iter()
            .map(|info| {
                let channel = pool.channel(&info.addr).map_err(|e| {
                    ClientError::InvalidResponse(format!(
                        "node {} has an unusable address {:?}: {e}",
                        info.id, info.addr
                    ))
                })?;
                Ok(Node {
                    info: info.clone(),
                    channel,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let index_of = |id: u64| nodes.iter().position(|n| n.info.id == id);
        let mut leaders = vec![None; map.partition_count as usize];
        let mut replicas = vec![Vec::new(); map.partition_count as usize];
        for p in &map.partitions {
            let id = p.id as usize;
            replicas[id] = p.replicas.iter().filter_map(|&r| index_of(r)).collect();
            let known = previous
                .filter(|_| !p.observed)
                .and_then(|t| t.leader_id(p.id))
                .filter(|l| p.replicas.contains(l));
            leaders[id] = known.or(p.leader).and_then(index_of);
        }
        Ok(Topology {
            map,
            ring,
            nodes,
            leaders,
            replicas,
        })
    }

    /// The node id of the cached leader of `partition`.
    pub(crate) fn leader_id(&self, partition: u32) -> Option<u64> {
        let index = self.leaders.get(partition as usize).copied().flatten()?;
        self.nodes.get(index).map(|n| n.info.id)
    }

    /// This table with `partition` led by the node a `NOT_LEADER` hint names (by id
    /// if the table knows it, else by address, added as a node if new); `None` when
    /// the hint names no usable node or changes nothing.
    pub(crate) fn with_leader(
        &self,
        partition: u32,
        leader_id: Option<u64>,
        leader_addr: Option<&str>,
        pool: &Pool,
    ) -> Option<Topology> {
        let slot = self.leaders.get(partition as usize)?;
        let by_id = leader_id.and_then(|id| self.nodes.iter().position(|n| n.info.id == id));
        let by_addr = || {
            let addr = leader_addr?;
            self.nodes
                .iter()
                .position(|n| same_addr(&n.info.addr, addr))
        };
        let mut next = self.clone();
        let index = match by_id.or_else(by_addr) {
            Some(index) => index,
            None => {
                let addr = leader_addr?;
                let channel = pool.channel(addr).ok()?;
                next.nodes.push(Node {
                    info: NodeInfo {
                        id: leader_id.unwrap_or(0),
                        addr: addr.to_owned(),
                        state: ACTIVE.to_owned(),
                    },
                    channel,
                });
                next.nodes.len() - 1
            }
        };
        if *slot == Some(index) {
            return None;
        }
        next.leaders[partition as usize] = Some(index);
        Some(next)
    }

    /// Where a request for `key` goes: the leader of its partition.
    ///
    /// # Errors
    /// [`ClientError::NotLeader`] when the map names no (known) leader for the key's
    /// partition; a fresher map may.
    pub(crate) fn target(&self, key: &[u8]) -> Result<Target> {
        self.partition_target(self.ring.partition_of(key))
    }

    /// Where a request for `partition` goes: its leader.
    ///
    /// # Errors
    /// As [`Topology::target`]; also for a partition the map does not have.
    pub(crate) fn partition_target(&self, partition: u32) -> Result<Target> {
        let leader = self.leaders.get(partition as usize).copied().flatten();
        let Some(index) = leader else {
            return Err(ClientError::NotLeader {
                partition: Some(partition),
                leader_id: None,
                leader_addr: None,
            });
        };
        self.target_at(partition, index)
    }

    /// Where a FOLLOWER read of `key` goes: the voting replica number `pick` (modulo
    /// their count) of its partition, or the leader when no replica is known.
    ///
    /// # Errors
    /// As [`Topology::target`].
    pub(crate) fn replica_target(&self, key: &[u8], pick: usize) -> Result<Target> {
        let partition = self.ring.partition_of(key);
        match self.replicas.get(partition as usize) {
            Some(voters) if !voters.is_empty() => {
                self.target_at(partition, voters[pick % voters.len()])
            }
            _ => self.target(key),
        }
    }

    /// The address of node number `index` (`""` for an index the table lacks, which a
    /// [`Target`] never holds).
    pub(crate) fn node_addr(&self, index: usize) -> &str {
        self.nodes.get(index).map_or("", |n| n.info.addr.as_str())
    }

    fn target_at(&self, partition: u32, index: usize) -> Result<Target> {
        let node = self.nodes.get(index).ok_or_else(|| {
            ClientError::InvalidResponse(format!("routing table has no node #{index}"))
        })?;
        Ok(Target {
            route: v1::Route {
                partition,
                epoch: self.map.epoch,
                cluster_id: self.map.cluster_id,
            },
            node: index,
            channel: node.channel.clone(),
        })
    }
}

/// Whether two `host:port` addresses are the same, with or without `http://`.
fn same_addr(a: &str, b: &str) -> bool {
    let bare = |s: &str| s.strip_prefix("http://").unwrap_or(s).to_owned();
    bare(a) == bare(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientConfig;

    fn node(id: u64) -> v1::NodeInfo {
        v1::NodeInfo {
            id,
            addr: format!("127.0.0.1:{}", 7000 + id),
            state: "active".into(),
        }
    }

    fn response(partitions: u32) -> v1::ClusterMapResponse {
        v1::ClusterMapResponse {
            epoch: 1,
            partition_count: partitions,
            vnodes: 64,
            nodes: vec![node(1)],
            partitions: (0..partitions)
                .rev()
                .map(|id| v1::PartitionInfo {
                    id,
                    leader: 1,
                    replicas: vec![1],
                    term: 0,
                    applied: u64::from(id),
                    learners: vec![],
                    observed: true,
                    cdc_lsn: 0,
                })
                .collect(),
            node_id: 1,
            replication_factor: 1,
            cluster_id: 0xa,
        }
    }

    /// The map node `me` of a three-node cluster would send: it observes the
    /// partitions it holds (all of them here unless `observes` says otherwise).
    fn three(me: u64, epoch: u64, parts: &[(u64, u64, u64, bool)]) -> ClusterMap {
        let m = v1::ClusterMapResponse {
            epoch,
            partition_count: parts.len() as u32,
            vnodes: 64,
            nodes: vec![node(1), node(2), node(3)],
            partitions: parts
                .iter()
                .enumerate()
                .map(
                    |(id, &(leader, term, applied, observed))| v1::PartitionInfo {
                        id: id as u32,
                        leader,
                        replicas: vec![1, 2, 3],
                        learners: vec![],
                        term,
                        applied,
                        observed,
                        cdc_lsn: 0,
                    },
                )
                .collect(),
            node_id: me,
            replication_factor: 3,
            cluster_id: 0xa,
        };
        ClusterMap::try_from(m).unwrap()
    }

    fn map_of(cluster_id: u64, epoch: u64) -> ClusterMap {
        let mut m = three(1, epoch, &[(1, 1, 1, true)]);
        m.cluster_id = cluster_id;
        m
    }

    #[test]
    fn epochs_order_maps_of_one_cluster_only() {
        use MapChange::*;
        let cached = map_of(0xa, 8);
        // Same cluster: the epoch decides.
        assert_eq!(map_change(&cached, &map_of(0xa, 9), 0), Install);
        assert_eq!(map_change(&cached, &map_of(0xa, 8), 0), Install);
        assert_eq!(map_change(&cached, &map_of(0xa, 3), 0), Ignore);
        // Another cluster on the same addresses: replaced whatever its epoch (the
        // measured case: new cluster at epoch 3, cached old one at 8).
        assert_eq!(map_change(&cached, &map_of(0xb, 3), 0), NewCluster);
        assert_eq!(map_change(&cached, &map_of(0xb, 30), 0), NewCluster);
        // A node of an older version (no id) is another cluster too.
        assert_eq!(map_change(&cached, &map_of(0, 9), 0), NewCluster);
        assert_eq!(map_change(&map_of(0, 8), &map_of(0, 9), 0), Install);
        // Pinned: only maps of that cluster.
        assert_eq!(map_change(&cached, &map_of(0xb, 3), 0xa), Ignore);
        assert_eq!(map_change(&cached, &map_of(0xa, 9), 0xa), Install);
    }

    #[test]
    fn a_refresh_follows_the_configured_endpoints_not_leftover_nodes() {
        // Only the leftover old node (not an endpoint) answers: stay.
        assert_eq!(follow_cluster(0xa, 0, &[(false, 0xa)]), 0xa);
        // A leftover node of another cluster never moves the client.
        assert_eq!(follow_cluster(0xa, 0, &[(false, 0xb), (true, 0xa)]), 0xa);
        assert_eq!(follow_cluster(0xb, 0, &[(false, 0xa)]), 0xb);
        // The endpoints were restarted as a new cluster: follow them, even when the
        // leftover node answers the old one first.
        assert_eq!(
            follow_cluster(0xa, 0, &[(false, 0xa), (true, 0xb), (true, 0xb)]),
            0xb
        );
        // While any endpoint still answers the cached cluster, keep it.
        assert_eq!(follow_cluster(0xa, 0, &[(true, 0xb), (true, 0xa)]), 0xa);
        // Nobody answered: unchanged. Pinned: always the pin.
        assert_eq!(follow_cluster(0xa, 0, &[]), 0xa);
        assert_eq!(follow_cluster(0xa, 0xc, &[(true, 0xb)]), 0xc);
    }

    #[test]
    fn a_single_node_map_converts_in_partition_order() {
        let mut m = response(4);
        m.nodes[0].state = String::new();
        let map = ClusterMap::try_from(m).unwrap();
        assert_eq!(map.epoch, 1);
        assert_eq!(map.partitions.len(), 4);
        assert!(map
            .partitions
            .iter()
            .enumerate()
            .all(|(i, p)| p.id == i as u32));
        assert_eq!(map.partitions[0].leader, Some(1));
        assert_eq!(map.partition(3).unwrap().applied, 3);
        assert_eq!(map.partition(4), None);
        assert_eq!(map.nodes[0].state, "active", "no state means active");
        let json = serde_json::to_string(&map).unwrap();
        assert!(
            json.starts_with(r#"{"epoch":1,"partition_count":4,"vnodes":64,"replication_factor":1,"node_id":1,"nodes":[{"id":1,"addr":"127.0.0.1:7001","state":"active"}],"partitions":[{"id":0,"leader":1,"replicas":[1],"learners":[],"term":0,"applied":0,"observed":true,"cdc_lsn":"0/0"}"#),
            "{json}"
        );
    }

    #[test]
    fn malformed_maps_are_rejected() {
        let mut m = response(4);
        m.partition_count = 0;
        assert!(ClusterMap::try_from(m).is_err());

        let mut m = response(4);
        m.vnodes = u32::MAX;
        m.partition_count = u32::MAX;
        assert!(ClusterMap::try_from(m).is_err());

        let mut m = response(4);
        m.partitions[0].id = 4;
        assert!(ClusterMap::try_from(m).is_err());

        let mut m = response(4);
        m.partitions[1].id = m.partitions[0].id;
        assert!(ClusterMap::try_from(m).is_err());

        let mut m = response(4);
        m.nodes.push(m.nodes[0].clone());
        assert!(ClusterMap::try_from(m).is_err());
    }

    #[test]
    fn the_status_takes_each_leader_from_the_node_that_leads_with_the_highest_term() {
        // Partition 0: node 2 leads at term 5; node 1 still believes it leads at
        // term 4 (a deposed leader); node 3 follows.
        // Partition 1: no node claims it; node 3 saw leader 1 at term 7, node 1 saw
        // no leader at term 6.
        // Partition 2: nobody observes it: the placement (preferred leader 3) stands.
        let reports = [
            three(1, 4, &[(1, 4, 10, true), (0, 6, 3, true), (3, 0, 0, false)]),
            three(
                2,
                5,
                &[(2, 5, 12, true), (0, 0, 0, false), (3, 0, 0, false)],
            ),
            three(3, 5, &[(2, 5, 11, true), (1, 7, 9, true), (3, 0, 0, false)]),
        ];
        let status = ClusterStatus::merge(&reports).unwrap();
        assert_eq!(status.epoch, 5);
        assert_eq!(status.replication_factor, 3);
        assert_eq!(status.nodes.len(), 3);
        let got: Vec<_> = status
            .partitions
            .iter()
            .map(|p| (p.id, p.leader, p.term, p.applied))
            .collect();
        assert_eq!(
            got,
            [(0, Some(2), 5, 12), (1, Some(1), 7, 9), (2, Some(3), 0, 0)]
        );
        assert!(status.is_settled(3, 3));
        assert!(!status.is_settled(4, 3));
        assert!(!status.is_settled(3, 4));

        let json = serde_json::to_string(&status).unwrap();
        assert!(
            json.starts_with(r#"{"epoch":5,"replication_factor":3,"nodes":[{"id":1,"addr":"127.0.0.1:7001","state":"active"},"#),
            "{json}"
        );
        assert!(
            json.ends_with(
                r#"{"id":2,"leader":3,"replicas":[1,2,3],"learners":[],"term":0,"applied":0,"cdc_lsn":"0/0"}]}"#
            ),
            "{json}"
        );

        // A partition with no leader anywhere is unsettled.
        let lost = ClusterStatus::merge(&[three(1, 1, &[(0, 3, 0, true)])]).unwrap();
        assert_eq!(lost.partitions[0].leader, None);
        assert!(!lost.is_settled(1, 1));
        assert_eq!(ClusterStatus::merge(&[]), None);
    }

    #[tokio::test]
    async fn keys_route_to_the_leader_or_fail_as_not_leader() {
        let pool = Pool::new(&ClientConfig::default());
        let mut m = response(4);
        // Partition 2 has no leader; partition 3 names a node the map does not list.
        for p in &mut m.partitions {
            match p.id {
                2 => p.leader = 0,
                3 => p.leader = 9,
                _ => {}
            }
        }
        let topology = Topology::new(ClusterMap::try_from(m).unwrap(), &pool, None).unwrap();
        let mut seen = HashSet::new();
        for i in 0..200 {
            let key = format!("key:{i}");
            let partition = topology.ring.partition_of(&key);
            seen.insert(partition);
            match topology.target(key.as_bytes()) {
                Ok(t) => {
                    assert!(partition < 2);
                    assert_eq!(
                        t.route,
                        v1::Route {
                            partition,
                            epoch: 1,
                            cluster_id: 0xa,
                        }
                    );
                    assert_eq!(t.node, 0);
                }
                Err(e) => {
                    assert!(partition >= 2);
                    assert_eq!(
                        e,
                        ClientError::NotLeader {
                            partition: Some(partition),
                            leader_id: None,
                            leader_addr: None
                        }
                    );
                }
            }
        }
        assert_eq!(seen.len(), 4);

        // A new map of the same shape shares the ring.
        let again = Topology::new(
            ClusterMap::try_from(response(4)).unwrap(),
            &pool,
            Some(&topology),
        )
        .unwrap();
        assert!(Arc::ptr_eq(&again.ring, &topology.ring));
    }

    #[tokio::test]
    async fn hints_move_leaders_and_survive_unobserved_maps() {
        let pool = Pool::new(&ClientConfig::default());
        let map = three(1, 1, &[(1, 1, 0, true), (1, 1, 0, true)]);
        let t = Topology::new(map, &pool, None).unwrap();
        assert_eq!(t.leader_id(0), Some(1));

        // By id.
        let t = t.with_leader(0, Some(2), None, &pool).unwrap();
        assert_eq!(t.leader_id(0), Some(2));
        assert!(
            t.with_leader(0, Some(2), None, &pool).is_none(),
            "no change"
        );
        // By address.
        let t = t
            .with_leader(0, None, Some("http://127.0.0.1:7003"), &pool)
            .unwrap();
        assert_eq!(t.leader_id(0), Some(3));
        // A node the map does not list yet joins the table.
        let t = t
            .with_leader(1, Some(4), Some("127.0.0.1:7004"), &pool)
            .unwrap();
        assert_eq!(t.leader_id(1), Some(4));
        assert_eq!(t.nodes.len(), 4);
        // Unusable hints change nothing.
        assert!(t.with_leader(1, Some(9), None, &pool).is_none());
        assert!(t.with_leader(9, Some(1), None, &pool).is_none());

        // A map that only knows placement keeps the learned leader of partition 0
        // (still a voter) but not node 4 (not in the map).
        let placement = three(2, 1, &[(1, 0, 0, false), (1, 0, 0, false)]);
        let t2 = Topology::new(placement, &pool, Some(&t)).unwrap();
        assert_eq!((t2.leader_id(0), t2.leader_id(1)), (Some(3), Some(1)));
        // An observed map wins over what was learned.
        let live = three(2, 1, &[(2, 3, 0, true), (2, 3, 0, true)]);
        let t3 = Topology::new(live, &pool, Some(&t2)).unwrap();
        assert_eq!((t3.leader_id(0), t3.leader_id(1)), (Some(2), Some(2)));
    }

    #[tokio::test]
    async fn follower_reads_rotate_over_the_voters() {
        let pool = Pool::new(&ClientConfig::default());
        let t = Topology::new(three(1, 1, &[(1, 1, 0, true)]), &pool, None).unwrap();
        let picked: HashSet<usize> = (0..6)
            .map(|pick| t.replica_target(b"k", pick).unwrap().node)
            .collect();
        assert_eq!(picked.len(), 3);
        assert_eq!(t.target(b"k").unwrap().node, 0);
    }
}
