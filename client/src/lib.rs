#![cfg_attr(test, allow(clippy::unwrap_used))]
//! The raftcache client: routes each key to the leader of its partition over gRPC,
//! and the `raftcache` command line built on it.
//!
//! # Layout
//! - [`client`]: [`Client`], the typed API (get/mget/set/delete/incr/expire/ttl,
//!   cluster map and merged status, admin calls, stats) with its options, answers
//!   and its one retry policy.
//! - [`config`]: [`ClientConfig`], seed endpoints, timeouts, attempts and back-off.
//! - [`error`]: [`ClientError`] and the one mapping from a gRPC status to it.
//! - [`hot`]: [`HotKey`] (`Stats.hot_keys`) and their cluster-wide merge.
//! - [`ring`]: the consistent-hash [`Ring`](ring::Ring) with hash tags.
//! - [`routing`]: [`ClusterMap`], the merged [`ClusterStatus`], and the routing table
//!   with its per-partition leader cache (private part).
//! - [`near`]: the opt-in near cache ([`NearCacheConfig`]): values kept in the
//!   process, invalidated by the nodes' `Watch` streams (one background driver per
//!   client).
//! - `endpoint`: endpoint syntax checks, and the probe that tells a closed port or a
//!   non-gRPC port (a node's RESP or metrics port) from a gRPC endpoint.
//! - `pool`: one lazily created gRPC channel per node address (and one per node for
//!   `Watch` streams, with keepalive).
//! - [`bench`](mod@bench): the load generator behind `raftcache bench`.
//! - [`cli`]: the `raftcache` command line; `cli::dev` runs a local cluster.
//!
//! ```text
//! cli ──► bench ──► client ──► routing ──► ring
//!  │                  │           └──────► pool ──► raftcache_proto (tonic channel)
//!  └─► cli::dev       ├──► config
//!      (spawns        └──► error ◄── raftcache_proto::status (ErrorDetail)
//!       raftcache-node)
//! ```
//!
//! # Example
//! ```no_run
//! # async fn demo() -> raftcache_client::Result<()> {
//! use raftcache_client::{Client, ClientConfig, Condition, SetOptions};
//! use std::time::Duration;
//!
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7001"])).await?;
//! let options = SetOptions {
//!     ttl: Some(Duration::from_secs(60)),
//!     condition: Condition::IfAbsent,
//!     ..SetOptions::default()
//! };
//! let outcome = client.set_with("{user:1}:profile", "ada", options).await?;
//! if let Some(v) = client.get("{user:1}:profile").await? {
//!     println!("version {} (applied now: {})", v.version, outcome.applied);
//! }
//! # Ok(()) }
//! ```

pub mod bench;
pub mod breaker;
pub mod cli;
pub mod client;
pub mod config;
mod endpoint;
pub mod error;
pub mod hot;
pub mod load;
pub mod lsn;
pub mod near;
mod pool;
pub mod ring;
pub mod routing;
pub mod stampede;

/// The byte buffer values are read and loaded as (`get_or_load` loaders return it).
pub use bytes::Bytes;
pub use client::{
    Client, Condition, Consistency, NodeSnapshots, NodeStats, PgSnapshot, ReadOptions, RespCall,
    SetOptions, SetOutcome, Ttl, Value,
};
pub use config::{ClientConfig, DEFAULT_ENDPOINT};
pub use error::{ClientError, Result};
pub use hot::HotKey;
pub use load::{LoadError, LoadOptions, LoadSource, LoadStats, Loaded};
pub use lsn::Lsn;
pub use near::{NearCacheConfig, NearMode, NearStats};
pub use routing::{ClusterMap, ClusterStatus, NodeInfo, PartitionInfo, PartitionStatus};
