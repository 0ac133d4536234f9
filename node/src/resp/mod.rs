//! The RESP (Redis protocol) front end: redis-cli, redis-benchmark and ordinary Redis
//! clients talk to any node.
//!
//! ```text
//! TCP ──► server (one task per connection, batches of pipelined commands)
//!           │  codec::parse_command ──► command::parse ──► Cmd
//!           ▼
//!         exec::Frontend ── key led here ──► ClusterNode read / Raft write
//!                        └─ led elsewhere ─► raftcache_client::Client::resp_keyed
//!                                              ──► Cache.Resp on the leader ──► Frontend::run_forwarded
//! ```
//! - [`codec`]: the bounded RESP2/RESP3 parser and reply encoder.
//! - [`command`]: Redis commands as typed values, with Redis's exact errors.
//! - [`exec`]: running them, locally or forwarded (the client crate is the one routing
//!   implementation); `INFO`, `DBSIZE`, `FLUSHALL`.
//! - [`server`]: the listener and the per-connection loop.

pub mod codec;
pub mod command;
pub mod exec;
pub mod server;

pub use exec::{Frontend, RespSettings};
