//! raftcache benchmarks.
//!
//! - `benches/storage.rs`: criterion benches of the storage engine (get / set / incr
//!   on 1M keys, and set under eviction pressure).
//! - `benches/ring.rs`: criterion benches of the client's consistent-hash ring.
//! - The load generator over gRPC is `raftcache bench` (in the client crate, so the
//!   CLI ships it); see README "Benchmarks" for the commands and the figures.
//! - `src/bin/cluster-bench.rs`: the replication benchmarks on local 3-node clusters
//!   of `raftcache-node` processes (write throughput R=1 vs R=3, read consistency
//!   levels, leader failover after SIGKILL, idle CPU); [`cluster`] starts and stops
//!   those processes. Run them all with `benches/scripts/cluster.sh`.
//! - `src/bin/cdc-bench.rs`: the CDC benchmark (commit→invalidated lag at 1000 tx/s,
//!   maximum row changes/s) with a throwaway PostgreSQL, `pgbench` and the
//!   `raftcache-cdc` worker; [`cdc`] holds its worker guard, metrics scrape and pgbench
//!   runner. Run it with `benches/scripts/cdc.sh`.
//! - `src/bin/persist-bench.rs`: the persistence benchmark (save and load of 1M keys on
//!   one node vs Redis `BGSAVE` and restart, set latency during a snapshot, write
//!   throughput with persistence `none` / `snapshot` / `durable` on 3-node clusters);
//!   [`persist`] holds its process guard, RESP client, keys and loads. Run it with
//!   `benches/scripts/persist.sh`.
//!
//! - [`load`]: the bounded, timed load loop and the node-binary lookup both binaries
//!   use.
//!
//! Run the micro-benchmarks with `cargo bench -p raftcache-benches`.

pub mod cdc;
pub mod cluster;
pub mod load;
pub mod persist;
