//! The cluster map and the routing table built from it.
//!
//! [`ClusterMap`] is the node's `ClusterMapResponse`, checked and turned into plain
//! Rust. A `Topology` (crate-private) adds what routing needs: the [`Ring`] of the map's shape and a
//! channel per node, so that routing a key is a ring lookup and two vector indexings:
//!
//! ```text
//! key ──ring──► partition ──partitions[p].leader──► node ──► channel
//! ```

use crate::error::{ClientError, Result};
use crate::pool::Pool;
use crate::ring::Ring;
use raftcache_proto::tonic::transport::Channel;
use raftcache_proto::v1;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;

/// The cluster as a node describes it: the ring's shape, the nodes, and where each
/// partition lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterMap {
    /// Increases whenever placement changes; every keyed request carries it.
    pub epoch: u64,
    /// `P`, the number of partitions.
    pub partition_count: u32,
    /// `V`, the virtual nodes per partition on the ring.
    pub vnodes: u32,
    /// The nodes, in the order the node listed them.
    pub nodes: Vec<NodeInfo>,
    /// The partitions, ordered by id.
    pub partitions: Vec<PartitionInfo>,
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    /// The node's id.
    pub id: u64,
    /// Where clients reach it (`host:port`).
    pub addr: String,
}

/// One partition and where it lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionInfo {
    /// The partition id, below [`ClusterMap::partition_count`].
    pub id: u32,
    /// The node id of the leader; `None` while an election is in progress.
    pub leader: Option<u64>,
    /// The node ids holding a replica.
    pub replicas: Vec<u64>,
    /// The leader's Raft term (0 on a single unreplicated node).
    pub term: u64,
    /// The highest applied log index.
    pub applied: u64,
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
                term: p.term,
                applied: p.applied,
            })
            .collect();
        partitions.sort_by_key(|p| p.id);
        Ok(ClusterMap {
            epoch: m.epoch,
            partition_count: m.partition_count,
            vnodes: m.vnodes,
            nodes: m
                .nodes
                .into_iter()
                .map(|n| NodeInfo {
                    id: n.id,
                    addr: n.addr,
                })
                .collect(),
            partitions,
        })
    }
}

/// Where one keyed request goes.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The route to put in the request.
    pub(crate) route: v1::Route,
    /// The node that leads the key's partition.
    pub(crate) node_id: u64,
    /// The channel to that node.
    pub(crate) channel: Channel,
}

/// A node and its channel.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) info: NodeInfo,
    pub(crate) channel: Channel,
}

/// A cluster map ready for routing.
#[derive(Debug)]
pub(crate) struct Topology {
    pub(crate) map: ClusterMap,
    pub(crate) ring: Arc<Ring>,
    pub(crate) nodes: Vec<Node>,
    /// For each partition id, the index in `nodes` of its leader, if known and listed.
    leaders: Vec<Option<usize>>,
}

impl Topology {
    /// Builds the routing table of `map`, taking channels from `pool` and reusing
    /// `previous`'s ring when the shape is unchanged.
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
        let mut leaders = vec![None; map.partition_count as usize];
        for p in &map.partitions {
            leaders[p.id as usize] = p
                .leader
                .and_then(|leader| nodes.iter().position(|n| n.info.id == leader));
        }
        Ok(Topology {
            map,
            ring,
            nodes,
            leaders,
        })
    }

    /// Where a request for `key` goes.
    ///
    /// # Errors
    /// [`ClientError::NotLeader`] when the map names no (known) leader for the key's
    /// partition; a fresher map may.
    pub(crate) fn target(&self, key: &[u8]) -> Result<Target> {
        let partition = self.ring.partition_of(key);
        let leader = self.leaders.get(partition as usize).copied().flatten();
        let Some(node) = leader.map(|i| &self.nodes[i]) else {
            return Err(ClientError::NotLeader {
                partition: Some(partition),
                leader_id: None,
                leader_addr: None,
            });
        };
        Ok(Target {
            route: v1::Route {
                partition,
                epoch: self.map.epoch,
            },
            node_id: node.info.id,
            channel: node.channel.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientConfig;

    fn response(partitions: u32) -> v1::ClusterMapResponse {
        v1::ClusterMapResponse {
            epoch: 1,
            partition_count: partitions,
            vnodes: 64,
            nodes: vec![v1::NodeInfo {
                id: 1,
                addr: "127.0.0.1:7001".into(),
            }],
            partitions: (0..partitions)
                .rev()
                .map(|id| v1::PartitionInfo {
                    id,
                    leader: 1,
                    replicas: vec![1],
                    term: 0,
                    applied: u64::from(id),
                })
                .collect(),
            node_id: 1,
        }
    }

    #[test]
    fn a_single_node_map_converts_in_partition_order() {
        let map = ClusterMap::try_from(response(4)).unwrap();
        assert_eq!(map.epoch, 1);
        assert_eq!(map.partitions.len(), 4);
        assert!(map
            .partitions
            .iter()
            .enumerate()
            .all(|(i, p)| p.id == i as u32));
        assert_eq!(map.partitions[0].leader, Some(1));
        let json = serde_json::to_string(&map).unwrap();
        assert!(
            json.starts_with(r#"{"epoch":1,"partition_count":4,"vnodes":64,"nodes":[{"id":1,"addr":"127.0.0.1:7001"}],"partitions":[{"id":0,"leader":1,"replicas":[1],"term":0,"applied":0}"#),
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
                            epoch: 1
                        }
                    );
                    assert_eq!(t.node_id, 1);
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
}
