//! raftcache CDC worker: tails PostgreSQL logical replication (pgoutput) and turns
//! committed row changes into cache invalidations or updates.
//!
//! **Not built yet.** This crate exists so that the workspace layout of
//! `ARCHITECTURE.md` is in place from the start; the CDC issue fills it in. It will
//! depend on `raftcache-proto` and write through the public `raftcache-client`,
//! like any other user of the cache:
//!
//! ```text
//! raftcache-proto <- raftcache-client <- raftcache-cdc
//! ```

/// Re-exported so the dependency arrow `client <- cdc` is real from the start.
pub use raftcache_client as client;

pub mod apply;
pub mod cli;
pub mod config;
pub mod lease;
pub mod lsn;
pub mod mapping;
pub mod metrics;
pub mod pgoutput;
pub mod walsender;
pub mod worker;
