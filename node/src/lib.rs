//! raftcache node: the storage engine and the gRPC cache service of one node.
//!
//! # Layout
//! ```text
//! main.rs ─► cli ─► server ─► service ─► storage ◄── raft (openraft storage of one
//!             │        │          │                        partition; not wired in yet)
//!          config   metrics    error ─► service::status (the one mapping to gRPC)
//! ```
//! - [`cli`]: flags over the TOML [`config`], logging, signals, the ready line.
//! - [`server`]: binds listeners, serves gRPC and `/metrics`, background reclaim,
//!   graceful shutdown.
//! - [`service`]: the `raftcache.v1.Cache` handlers and error mapping.
//! - [`storage`]: synchronous engine with an injected clock: per-partition
//!   deterministic state machines (the ones Raft will drive), TTL, memory
//!   accounting, eviction. No tonic, no tokio networking inside.
//! - [`metrics`]: Prometheus recorder and endpoint.
//! - [`raft`]: openraft log store and state machine of one partition (groundwork for
//!   replication; the only module that names openraft types).
//!
//! This version runs one unreplicated node; replication (one openraft group per
//! partition) arrives with the multi-raft issue and drives the same state machines.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod config;
pub mod error;
pub mod metrics;
pub mod raft;
pub mod server;
pub mod service;
pub mod storage;
