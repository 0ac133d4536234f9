//! raftcache benchmarks.
//!
//! - `benches/storage.rs`: criterion benches of the storage engine (get / set / incr
//!   on 1M keys, and set under eviction pressure).
//! - `benches/ring.rs`: criterion benches of the client's consistent-hash ring.
//! - The load generator over gRPC is `raftcache bench` (in the client crate, so the
//!   CLI ships it); see README "Benchmarks" for the commands and the figures.
//!
//! Run with `cargo bench -p raftcache-benches`.
