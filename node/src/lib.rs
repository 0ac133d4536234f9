//! raftcache node: one member of a replicated cache cluster.
//!
//! # Layout
//! ```text
//! main.rs ─► cli ─► server ─► service ─► cluster ─► raft ─► storage
//!             │        │          │          │         (openraft groups over the engine)
//!          config   metrics    error     cluster::meta (placement, pure)
//! ```
//! - [`cli`]: flags over the TOML [`config`], logging, signals, the ready line.
//! - [`server`]: binds listeners, founds / joins a cluster, serves gRPC (cache, Raft
//!   transport, admin) and `/metrics`, background reclaim, graceful shutdown.
//! - [`service`]: the `raftcache.v1.Cache` handlers, the Raft transport and `Admin`
//!   servers, and the one error-to-status mapping.
//! - [`cluster`]: identity, the cluster metadata, reconciling groups with the
//!   placement, and the replicated read/write path.
//! - [`raft`]: the only module that names openraft types: type config, log store,
//!   state machine, one group, the batching transport.
//! - [`storage`]: synchronous engine with an injected clock: per-partition
//!   deterministic state machines (what Raft applies), TTL, memory accounting,
//!   eviction. No tonic, no tokio networking inside.
//! - [`metrics`]: Prometheus recorder and endpoint.
//! - [`persist`]: the sled store (identity, snapshots, durable Raft log and vote).
//! - [`hot`]: the hot-key tracker (space-saving sketches with decay).
//! - [`resp`]: the RESP (Redis protocol) front end; forwards through the client crate.
//! - [`watch`]: the change feed of `Watch` streams (state machines publish, the
//!   service subscribes).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod cluster;
pub mod config;
pub mod error;
pub mod hot;
pub mod metrics;
pub mod persist;
pub mod raft;
pub mod resp;
pub mod server;
pub mod service;
pub mod storage;
pub mod watch;
