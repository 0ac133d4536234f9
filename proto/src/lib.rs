//! The raftcache wire API.
//!
//! # Layout
//! - [`v1`]: the `raftcache.v1` protobuf messages and the tonic `Cache` client and
//!   server, generated at build time from `proto/raftcache/v1/kv.proto` by protox.
//! - [`status`]: the one place where an [`v1::ErrorDetail`] is put into and read back
//!   out of a `tonic::Status`, shared by the node (encoding) and the client (decoding).
//! - [`pg_snapshot`]: Postgres snapshots (`xmin:xmax:xip`) and xid widening, pure: the
//!   exact fill guard's visibility rule, shared by node, client and CDC worker.
//!
//! ```text
//! raftcache-proto  <-  raftcache-node     (serves v1::cache_server)
//!                  <-  raftcache-client   (calls  v1::cache_client)
//! ```
//!
//! tonic and prost are re-exported so that dependants pin no versions of their own.

pub use bytes;
pub use prost;
pub use tonic;

/// Generated `raftcache.v1` messages and services.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("raftcache.v1");
}

pub mod pg_snapshot;
pub mod status;
