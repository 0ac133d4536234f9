//! `raftcache-jepsen`: a Jepsen-style harness that ships with raftcache.
//!
//! - [`history`]: the JSONL history of `shared/HISTORY_FORMAT.md` (writer, reader,
//!   invoke/completion pairing).
//! - [`check`]: checkers (per-key linearizability, counter bounds, CDC freshness).
//! - [`proxy`]: the fault-injecting TCP proxy every peer link goes through.
//! - [`partition`]: the partition shapes the nemesis cuts (pure functions).
//! - [`cluster`]: node processes behind the proxy; [`nemesis`]: the faults and their
//!   schedule; [`workload`] and [`cdc_workload`]: the client processes; [`run`]: one
//!   test run end to end; [`cli`]: `raftcache-jepsen test|check`.

pub mod cdc_workload;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod partition;
pub mod proxy;
pub mod run;
pub mod workload;
