//! Hot keys: what each node reports in `Stats.hot_keys`, and the cluster-wide view the
//! CLI prints (`raftcache stats --hot`).
//!
//! A node counts the requests it serves per (partition, key) with a decayed
//! space-saving sketch (about the last 10-20 s); `count` may overstate by at most
//! `error`. The cluster view *sums* a key's figures over the nodes that report it: a key
//! is served by its partition's leader and, for follower reads or across a leadership
//! change, by other replicas too, and the load on the key is the total of those.

use bytes::Bytes;
use raftcache_proto::v1;
use serde::{Serialize, Serializer};

use crate::client::NodeStats;

/// A frequently requested key, as one node reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HotKey {
    /// The key (lossy UTF-8 text in JSON).
    #[serde(serialize_with = "lossy")]
    pub key: Bytes,
    /// Its partition.
    pub partition: u32,
    /// Estimated requests per second over the node's recent window.
    pub per_second: f64,
    /// Estimated requests in that window (may overstate by at most `error`).
    pub count: u64,
    /// The most `count` can overstate.
    pub error: u64,
}

impl From<v1::HotKey> for HotKey {
    fn from(h: v1::HotKey) -> Self {
        HotKey {
            key: h.key,
            partition: h.partition,
            per_second: h.per_second,
            count: h.count,
            error: h.error,
        }
    }
}

/// A hot key across the cluster: the sum over the nodes reporting it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterHotKey {
    /// The key (lossy UTF-8 text in JSON).
    #[serde(serialize_with = "lossy")]
    pub key: Bytes,
    /// Its partition.
    pub partition: u32,
    /// The nodes reporting it, ascending.
    pub nodes: Vec<u64>,
    /// Requests per second, summed over those nodes.
    pub per_second: f64,
    /// Requests in the nodes' windows, summed.
    pub count: u64,
    /// The most `count` can overstate, summed.
    pub error: u64,
}

/// Every reported key once, its figures summed over the nodes, hottest first (ties:
/// partition, then key).
pub fn merge_hot_keys(stats: &[NodeStats]) -> Vec<ClusterHotKey> {
    let mut merged: std::collections::BTreeMap<(u32, Bytes), ClusterHotKey> = Default::default();
    for s in stats {
        for h in &s.hot_keys {
            let m = merged
                .entry((h.partition, h.key.clone()))
                .or_insert_with(|| ClusterHotKey {
                    key: h.key.clone(),
                    partition: h.partition,
                    nodes: Vec::new(),
                    per_second: 0.0,
                    count: 0,
                    error: 0,
                });
            if !m.nodes.contains(&s.node_id) {
                m.nodes.push(s.node_id);
            }
            m.per_second += h.per_second;
            m.count += h.count;
            m.error += h.error;
        }
    }
    let mut all: Vec<ClusterHotKey> = merged.into_values().collect();
    for m in &mut all {
        m.nodes.sort_unstable();
    }
    all.sort_by(|a, b| {
        b.per_second
            .total_cmp(&a.per_second)
            .then(a.partition.cmp(&b.partition))
            .then_with(|| a.key.cmp(&b.key))
    });
    all
}

/// A key as text for people: lossy UTF-8 with control characters, quotes and
/// backslashes escaped (so a key never breaks a table line).
pub fn key_text(key: &[u8]) -> String {
    String::from_utf8_lossy(key).escape_debug().to_string()
}

fn lossy<S: Serializer>(key: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(key))
}
