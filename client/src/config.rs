//! How a [`Client`](crate::Client) connects: seed endpoints, timeouts, retries,
//! message size.

use std::time::Duration;

pub use crate::breaker::BreakerConfig;
pub use crate::load::LoadConfig;
pub use crate::near::{NearCacheConfig, NearMode};

/// The endpoint a client uses when none is given: the first node of `raftcache dev`.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7001";

/// The nodes' default `storage.max-value-size`: [`ClientConfig::max_value_bytes`].
pub const DEFAULT_MAX_VALUE_BYTES: usize = 16 << 20;
/// The nodes' default `storage.max-key-size`: [`ClientConfig::max_key_bytes`].
pub const DEFAULT_MAX_KEY_BYTES: usize = 16 << 10;

/// Settings of a [`Client`](crate::Client).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// Seed nodes, `host:port` with an optional `http://` scheme. The client asks them
    /// in order for the cluster map; after that it talks to the nodes the map lists.
    pub endpoints: Vec<String>,
    /// How long opening a TCP connection to a node may take.
    pub connect_timeout: Duration,
    /// How long one attempt of a request may take, connecting included; past it the
    /// attempt fails with [`ClientError::Timeout`](crate::ClientError::Timeout) (and
    /// may be retried, see [`ClientConfig::request_deadline`]).
    pub request_timeout: Duration,
    /// How long a call may take in all, retries and back-off included. No attempt
    /// starts or runs past it.
    pub request_deadline: Duration,
    /// The most attempts of one call (the first one included); at least 1.
    pub max_attempts: u32,
    /// The first back-off before a retry; each further retry doubles it up to
    /// [`ClientConfig::backoff_max`], and the actual sleep is drawn uniformly below
    /// it ("full jitter").
    pub backoff_base: Duration,
    /// The cap of the back-off.
    pub backoff_max: Duration,
    /// The largest gRPC message sent or accepted, in bytes. Above the node's 16 MiB
    /// value limit so that the largest values (and multi-gets of them) pass.
    pub max_message_bytes: usize,
    /// The largest value the client sends (the nodes' `storage.max-value-size`, 16 MiB
    /// by default; nodes do not advertise it). A larger value fails at once with
    /// [`ClientError::ValueTooLarge`](crate::ClientError::ValueTooLarge), unsent and
    /// never retried.
    pub max_value_bytes: usize,
    /// The longest key the client sends (the nodes' `storage.max-key-size`, 16 KiB by
    /// default). A longer key fails at once with
    /// [`ClientError::KeyTooLarge`](crate::ClientError::KeyTooLarge).
    pub max_key_bytes: usize,
    /// When a node's circuit breaker opens (see [`crate::breaker`]).
    pub breaker: BreakerConfig,
    /// How [`Client::get_or_load`](crate::Client::get_or_load) protects the loader.
    pub load: LoadConfig,
    /// An opt-in near cache of values in this process, kept correct by the nodes'
    /// `Watch` streams (see [`crate::near`]); `None` (the default) for none.
    pub near_cache: Option<NearCacheConfig>,
    /// Pins the client to one cluster (its `ClusterMap.cluster_id`): maps of any other
    /// cluster are ignored. 0 (the default) follows the configured endpoints: when they
    /// answer with another cluster's map (the cluster was restarted on the same
    /// addresses), the client drops its cached map and follows the new cluster.
    pub cluster_id: u64,
}

impl ClientConfig {
    /// The default settings with these seed endpoints.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> ClientConfig {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }
}

impl Default for ClientConfig {
    /// [`DEFAULT_ENDPOINT`], a 2 s connect timeout, a 2 s timeout per attempt, a 5 s
    /// deadline per call, 16 attempts, back-off from 10 ms doubling to 500 ms, 64 MiB
    /// messages, and no near cache.
    fn default() -> Self {
        ClientConfig {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            request_deadline: Duration::from_secs(5),
            max_attempts: 16,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            max_message_bytes: 64 << 20,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            breaker: BreakerConfig::default(),
            load: LoadConfig::default(),
            near_cache: None,
            cluster_id: 0,
        }
    }
}
