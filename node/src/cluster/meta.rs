//! [`ClusterMeta`]: what the meta group replicates — nodes, the placement of every
//! partition's replicas, the epoch — and the pure placement algorithm.
//!
//! The meta group stores one value (JSON of this struct) under [`META_KEY`] in its own
//! state machine; the meta leader changes it with compare-and-set on the key's version,
//! so two leaders in a row can never overwrite each other's change. Every node hosts a
//! replica of the meta group (voters on the first three nodes, learners elsewhere), so
//! every node reads the current map locally.
//!
//! Ids: node ids and replica ids come from two counters here and are never reused. A
//! memory-only node that restarts is a new node (new id) whose replicas have new ids;
//! the old node is dropped from the map when the new one takes its address.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The key of the cluster metadata in the meta group's state machine.
pub const META_KEY: &[u8] = b"cluster";

/// A node's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Holds replicas and takes new ones.
    Active,
    /// Being removed: its replicas move away; it is forgotten once it hosts none.
    Draining,
}

impl NodeState {
    /// The name used in the cluster map.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
        }
    }
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaNode {
    /// The gRPC address (clients and peers).
    pub addr: String,
    /// Lifecycle state.
    pub state: NodeState,
}

/// One replica of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// The node hosting it.
    pub node: u64,
    /// The replica id (the openraft node id in the partition's group).
    pub id: u64,
}

/// Where one partition's replicas should be. `replicas[0]` is the preferred leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The replicas, preferred leader first.
    pub replicas: Vec<Replica>,
}

/// The replicated cluster metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// The cluster's identity: random and non-zero, chosen by the founder; 0 for a
    /// cluster founded by a raftcache without cluster ids (metadata stored then has no
    /// such field). Never changes.
    #[serde(default)]
    pub cluster_id: u64,
    /// Increases with every change.
    pub epoch: u64,
    /// P, fixed at creation.
    pub partition_count: u32,
    /// V, virtual nodes per partition on the clients' ring.
    pub vnodes: u32,
    /// R, the replication factor aimed for.
    pub replication_factor: u32,
    /// The next node id to give.
    pub next_node_id: u64,
    /// The next replica id to give.
    pub next_replica_id: u64,
    /// The nodes by id.
    pub nodes: BTreeMap<u64, MetaNode>,
    /// Each node's replica of the meta group.
    pub meta_replicas: BTreeMap<u64, u64>,
    /// Placement per partition, indexed by partition id.
    pub partitions: Vec<Placement>,
    /// Owner node of every replica id still in use (placed, or being removed).
    pub replica_owner: BTreeMap<u64, u64>,
}

/// At most this many voters in the meta group.
pub const META_VOTERS: usize = 3;

impl ClusterMeta {
    /// A new cluster of one node (id 1) at `addr` holding every partition.
    pub fn bootstrap(addr: &str, partitions: u32, vnodes: u32, replication_factor: u32) -> Self {
        let mut meta = ClusterMeta {
            cluster_id: 0,
            epoch: 0,
            partition_count: partitions,
            vnodes,
            replication_factor: replication_factor.max(1),
            next_node_id: 1,
            next_replica_id: 1,
            nodes: BTreeMap::new(),
            meta_replicas: BTreeMap::new(),
            partitions: vec![Placement::default(); partitions as usize],
            replica_owner: BTreeMap::new(),
        };
        meta.add_node(addr);
        meta
    }

    /// Adds a node at `addr` (an active node already at `addr` is an earlier incarnation
    /// and is dropped with its replicas), gives it a meta replica, fills under-replicated
    /// partitions. Returns (node id, meta replica id).
    pub fn add_node(&mut self, addr: &str) -> (u64, u64) {
        let stale: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.addr == addr)
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            self.forget_node(id);
        }
        let id = self.next_node_id;
        self.next_node_id += 1;
        self.nodes.insert(
            id,
            MetaNode {
                addr: addr.to_string(),
                state: NodeState::Active,
            },
        );
        let meta_replica = self.new_replica_id(id);
        self.meta_replicas.insert(id, meta_replica);
        self.fill();
        self.balance_leaders();
        self.epoch += 1;
        (id, meta_replica)
    }

    /// Starts draining `node`: its replicas are re-placed on the other active nodes.
    /// Returns false when there is no such node.
    pub fn drain_node(&mut self, node: u64) -> bool {
        let Some(n) = self.nodes.get_mut(&node) else {
            return false;
        };
        n.state = NodeState::Draining;
        for p in &mut self.partitions {
            p.replicas.retain(|r| r.node != node);
        }
        self.fill();
        self.balance_leaders();
        self.epoch += 1;
        true
    }

    /// Removes a node (drained, or replaced by a new incarnation) and everything it held.
    pub fn forget_node(&mut self, node: u64) {
        self.nodes.remove(&node);
        self.meta_replicas.remove(&node);
        for p in &mut self.partitions {
            p.replicas.retain(|r| r.node != node);
        }
        self.replica_owner.retain(|_, owner| *owner != node);
        self.fill();
        self.balance_leaders();
        self.epoch += 1;
    }

    /// Makes `node` the preferred leader of `partition`. False when it holds no replica.
    pub fn prefer_leader(&mut self, partition: u32, node: u64) -> bool {
        let Some(p) = self.partitions.get_mut(partition as usize) else {
            return false;
        };
        let Some(at) = p.replicas.iter().position(|r| r.node == node) else {
            return false;
        };
        let r = p.replicas.remove(at);
        p.replicas.insert(0, r);
        self.epoch += 1;
        true
    }

    /// Recomputes placement: min(R, active nodes) replicas per partition, replica counts
    /// per node within one of each other, preferred leaders spread evenly. Moves as few
    /// replicas as possible; returns how many moved.
    pub fn rebalance(&mut self) -> u32 {
        self.fill();
        let active = self.active_nodes();
        let mut moved = 0;
        if !active.is_empty() {
            // Bounded: each move lowers the spread; at most one move per replica.
            let budget = self.partitions.len() * self.replication_factor as usize + 1;
            for _ in 0..budget {
                let load = self.load(&active);
                let (Some((&max_node, &max)), Some((&min_node, &min))) = (
                    load.iter()
                        .max_by_key(|(id, l)| (**l, std::cmp::Reverse(**id))),
                    load.iter().min_by_key(|(id, l)| (**l, **id)),
                ) else {
                    break;
                };
                if max <= min + 1 {
                    break;
                }
                // A partition on the most loaded node that the least loaded lacks.
                let Some(p) = self.partitions.iter().position(|p| {
                    p.replicas.iter().any(|r| r.node == max_node)
                        && !p.replicas.iter().any(|r| r.node == min_node)
                }) else {
                    break;
                };
                let id = self.new_replica_id(min_node);
                let placement = &mut self.partitions[p];
                if let Some(r) = placement.replicas.iter_mut().find(|r| r.node == max_node) {
                    *r = Replica { node: min_node, id };
                    moved += 1;
                }
            }
        }
        self.balance_leaders();
        self.epoch += 1;
        moved
    }

    /// Nodes that take replicas, by id.
    pub fn active_nodes(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Active)
            .map(|(&id, _)| id)
            .collect()
    }

    /// The nodes that should vote in the meta group: the first [`META_VOTERS`] active
    /// nodes (draining ones only if there are not enough active ones).
    pub fn meta_voters(&self) -> Vec<u64> {
        let mut voters: Vec<u64> = self.active_nodes();
        voters.extend(
            self.nodes
                .iter()
                .filter(|(_, n)| n.state == NodeState::Draining)
                .map(|(&id, _)| id),
        );
        voters.retain(|id| self.meta_replicas.contains_key(id));
        voters.truncate(META_VOTERS);
        voters
    }

    /// The address of a node.
    pub fn addr(&self, node: u64) -> Option<&str> {
        self.nodes.get(&node).map(|n| n.addr.as_str())
    }

    /// The node owning a replica id.
    pub fn owner(&self, replica: u64) -> Option<u64> {
        self.replica_owner.get(&replica).copied()
    }

    /// The replica `node` should hold in `partition`, if any.
    pub fn replica_on(&self, partition: u32, node: u64) -> Option<u64> {
        self.partitions
            .get(partition as usize)?
            .replicas
            .iter()
            .find(|r| r.node == node)
            .map(|r| r.id)
    }

    fn new_replica_id(&mut self, node: u64) -> u64 {
        let id = self.next_replica_id;
        self.next_replica_id += 1;
        self.replica_owner.insert(id, node);
        id
    }

    /// Replica count per active node.
    fn load(&self, active: &[u64]) -> BTreeMap<u64, usize> {
        let mut load: BTreeMap<u64, usize> = active.iter().map(|&n| (n, 0)).collect();
        for p in &self.partitions {
            for r in &p.replicas {
                if let Some(l) = load.get_mut(&r.node) {
                    *l += 1;
                }
            }
        }
        load
    }

    /// Gives every partition min(R, active) replicas, adding to the least loaded nodes.
    fn fill(&mut self) {
        let active = self.active_nodes();
        let target = (self.replication_factor as usize).min(active.len());
        for p in 0..self.partitions.len() {
            while self.partitions[p].replicas.len() < target {
                let load = self.load(&active);
                let Some(node) = active
                    .iter()
                    .filter(|n| !self.partitions[p].replicas.iter().any(|r| r.node == **n))
                    .min_by_key(|n| (load.get(n).copied().unwrap_or(0), **n))
                    .copied()
                else {
                    break;
                };
                let id = self.new_replica_id(node);
                self.partitions[p].replicas.push(Replica { node, id });
            }
        }
    }

    /// Puts first in each partition the replica whose node prefers the fewest leaderships
    /// so far, so preferred leaders spread evenly (ties keep the current first).
    fn balance_leaders(&mut self) {
        let mut leads: BTreeMap<u64, usize> = BTreeMap::new();
        for p in &mut self.partitions {
            let Some(best) = p
                .replicas
                .iter()
                .enumerate()
                .min_by_key(|(i, r)| (leads.get(&r.node).copied().unwrap_or(0), *i))
                .map(|(i, _)| i)
            else {
                continue;
            };
            let r = p.replicas.remove(best);
            *leads.entry(r.node).or_default() += 1;
            p.replicas.insert(0, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes_of(meta: &ClusterMeta, p: usize) -> Vec<u64> {
        let mut n: Vec<u64> = meta.partitions[p].replicas.iter().map(|r| r.node).collect();
        n.sort_unstable();
        n
    }

    fn leaders(meta: &ClusterMeta) -> BTreeMap<u64, usize> {
        let mut l = BTreeMap::new();
        for p in &meta.partitions {
            *l.entry(p.replicas[0].node).or_default() += 1;
        }
        l
    }

    #[test]
    fn three_nodes_hold_every_partition_with_leaders_spread() {
        let mut meta = ClusterMeta::bootstrap("a:1", 16, 1024, 3);
        meta.add_node("b:1");
        meta.add_node("c:1");
        for p in 0..16 {
            assert_eq!(nodes_of(&meta, p), vec![1, 2, 3]);
        }
        let l = leaders(&meta);
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(l.values().all(|&n| (5..=6).contains(&n)), "{l:?}");
        assert_eq!(meta.meta_voters(), vec![1, 2, 3]);
    }

    #[test]
    fn ids_are_never_reused() {
        let mut meta = ClusterMeta::bootstrap("a:1", 4, 1024, 3);
        meta.add_node("b:1");
        let before: Vec<u64> = meta.replica_owner.keys().copied().collect();
        // b restarts: a new incarnation at the same address.
        let (id, meta_replica) = meta.add_node("b:1");
        assert_eq!(id, 3);
        assert!(!meta.nodes.contains_key(&2));
        assert!(!before.contains(&meta_replica));
        for p in &meta.partitions {
            for r in &p.replicas {
                if r.node == 3 {
                    assert!(!before.contains(&r.id), "replica id {} reused", r.id);
                }
            }
        }
    }

    #[test]
    fn rebalance_spreads_replicas_to_a_new_node_and_drain_moves_them_away() {
        let mut meta = ClusterMeta::bootstrap("a:1", 16, 1024, 3);
        meta.add_node("b:1");
        meta.add_node("c:1");
        meta.add_node("d:1");
        let moved = meta.rebalance();
        assert_eq!(moved, 12);
        let load = meta.load(&meta.active_nodes());
        assert!(load.values().all(|&n| n == 12), "{load:?}");
        let l = leaders(&meta);
        assert!(l.values().all(|&n| n == 4), "{l:?}");

        assert!(meta.drain_node(1));
        for p in 0..16 {
            let n = nodes_of(&meta, p);
            assert_eq!(n.len(), 3);
            assert!(!n.contains(&1));
        }
        assert_eq!(meta.meta_voters(), vec![2, 3, 4]);
        meta.forget_node(1);
        assert!(!meta.nodes.contains_key(&1));
    }

    #[test]
    fn replication_is_capped_by_the_node_count() {
        let mut meta = ClusterMeta::bootstrap("a:1", 8, 1024, 3);
        assert!(meta.partitions.iter().all(|p| p.replicas.len() == 1));
        meta.add_node("b:1");
        assert!(meta.partitions.iter().all(|p| p.replicas.len() == 2));
        let mut one = ClusterMeta::bootstrap("a:1", 8, 1024, 1);
        one.add_node("b:1");
        assert!(one.partitions.iter().all(|p| p.replicas.len() == 1));
        let moved = one.rebalance();
        assert_eq!(moved, 4);
    }

    #[test]
    fn json_round_trip() {
        let meta = ClusterMeta::bootstrap("a:1", 4, 1024, 3);
        let json = serde_json::to_vec(&meta).unwrap();
        let back: ClusterMeta = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, meta);
    }
}
