//! raftcache CDC worker: tails PostgreSQL logical replication (pgoutput) and turns
//! committed row changes into cache invalidations or updates.
//!
//! # Layout
//! - [`walsender`]: a replication-protocol client on postgres-protocol + tokio (startup
//!   with `replication=database`, cleartext/MD5/SCRAM, `CREATE_REPLICATION_SLOT`,
//!   `START_REPLICATION`, XLogData / keepalive / standby status).
//! - [`pgoutput`]: the decoder of pgoutput messages, with checked reads.
//! - [`config`], [`mapping`]: the TOML config; key templates and the row → key rules.
//! - [`lease`]: the fenced lease kept in the cache (one streaming worker per slot).
//! - [`worker`]: start-up checks, slot handling, the streaming session, reconnects.
//! - [`apply`]: rounds of `ApplyChanges` per partition and the acknowledged LSN.
//! - [`metrics`], [`cli`].
//!
//! It writes through the public `raftcache-client`, like any other user of the cache:
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
pub mod pg_errors;
pub mod pgoutput;
pub mod verify;
pub mod verify_metrics;
pub mod walsender;
pub mod worker;
