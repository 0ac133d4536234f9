//! Storage limits and the eviction policy.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What to do when a write would take memory past `max_memory` (Redis `maxmemory-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum EvictionPolicy {
    /// Refuse writes that would grow memory past the limit.
    #[default]
    #[serde(rename = "noeviction")]
    NoEviction,
    /// Evict the approximately least recently used keys.
    #[serde(rename = "allkeys-lru")]
    AllKeysLru,
    /// Evict the approximately least frequently used keys.
    #[serde(rename = "allkeys-lfu")]
    AllKeysLfu,
}

impl EvictionPolicy {
    /// Every policy, in documentation order.
    pub const ALL: [EvictionPolicy; 3] = [
        EvictionPolicy::NoEviction,
        EvictionPolicy::AllKeysLru,
        EvictionPolicy::AllKeysLfu,
    ];

    /// The Redis name: `noeviction`, `allkeys-lru` or `allkeys-lfu`.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionPolicy::NoEviction => "noeviction",
            EvictionPolicy::AllKeysLru => "allkeys-lru",
            EvictionPolicy::AllKeysLfu => "allkeys-lfu",
        }
    }
}

impl fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an [`EvictionPolicy`]; its message lists the valid names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction policy {input:?}; expected one of: noeviction, allkeys-lru, allkeys-lfu")]
pub struct ParsePolicyError {
    /// What was given.
    pub input: String,
}

impl FromStr for EvictionPolicy {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParsePolicyError {
                input: s.to_owned(),
            })
    }
}

/// Limits and policy of one node's storage engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct StorageConfig {
    /// Number of partitions (fixed at cluster creation). Must be at least 1.
    pub partitions: u32,
    /// Accounted bytes allowed across all partitions of this node; 0 means unlimited.
    pub max_memory: u64,
    /// What happens when a write would exceed `max_memory`.
    pub policy: EvictionPolicy,
    /// Keys sampled per eviction round (Redis `maxmemory-samples`); 0 is treated as 1.
    pub eviction_samples: usize,
    /// Largest key accepted, in bytes.
    pub max_key_bytes: usize,
    /// Largest value accepted, in bytes.
    pub max_value_bytes: usize,
    /// How long a CDC tombstone refuses stale cache-aside fills by itself, in ms (must be
    /// above 0). After that it is folded into the partition's tombstone floor, which keeps
    /// refusing fills at or below its LSN — so this bounds memory, not correctness.
    pub cdc_tombstone_ttl_ms: u64,
}

impl StorageConfig {
    /// Default partition count (a laptop-sized cluster).
    pub const DEFAULT_PARTITIONS: u32 = 16;
    /// Default keys sampled per eviction round, as in Redis.
    pub const DEFAULT_EVICTION_SAMPLES: usize = 5;
    /// Default key size limit: 16 KiB.
    pub const DEFAULT_MAX_KEY_BYTES: usize = 16 * 1024;
    /// Default value size limit: 16 MiB.
    pub const DEFAULT_MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;
    /// Default CDC tombstone lifetime: 10 minutes, far longer than a fill takes from its
    /// Postgres read to its cache write.
    pub const DEFAULT_CDC_TOMBSTONE_TTL_MS: u64 = 10 * 60 * 1000;
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            partitions: Self::DEFAULT_PARTITIONS,
            max_memory: 0,
            policy: EvictionPolicy::default(),
            eviction_samples: Self::DEFAULT_EVICTION_SAMPLES,
            max_key_bytes: Self::DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: Self::DEFAULT_MAX_VALUE_BYTES,
            cdc_tombstone_ttl_ms: Self::DEFAULT_CDC_TOMBSTONE_TTL_MS,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn policy_names_round_trip() {
        for policy in EvictionPolicy::ALL {
            let name = policy.to_string();
            assert_eq!(name.parse::<EvictionPolicy>().unwrap(), policy);
            let json = serde_json::to_string(&policy).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<EvictionPolicy>(&json).unwrap(),
                policy
            );
        }
        assert_eq!(EvictionPolicy::AllKeysLru.to_string(), "allkeys-lru");
        assert_eq!(EvictionPolicy::AllKeysLfu.to_string(), "allkeys-lfu");
        assert_eq!(EvictionPolicy::NoEviction.to_string(), "noeviction");
    }

    #[test]
    fn policy_parse_error_names_the_choices() {
        let err = "lru".parse::<EvictionPolicy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown eviction policy \"lru\"; expected one of: noeviction, allkeys-lru, allkeys-lfu"
        );
    }

    #[test]
    fn config_defaults_and_kebab_case() {
        let config: StorageConfig =
            toml::from_str("max-memory = 1024\npolicy = \"allkeys-lfu\"").unwrap();
        assert_eq!(config.max_memory, 1024);
        assert_eq!(config.policy, EvictionPolicy::AllKeysLfu);
        assert_eq!(config.partitions, 16);
        assert_eq!(config.eviction_samples, 5);
        assert_eq!(config.max_key_bytes, 16384);
        assert_eq!(config.max_value_bytes, 16 << 20);
        assert_eq!(config.cdc_tombstone_ttl_ms, 600_000);
        let config: StorageConfig = toml::from_str("cdc-tombstone-ttl-ms = 5000").unwrap();
        assert_eq!(config.cdc_tombstone_ttl_ms, 5000);
        assert!(toml::from_str::<StorageConfig>("max_memory = 1").is_err());
    }
}
