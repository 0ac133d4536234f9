//! Workloads: client processes that issue operations and record them in the history.
//!
//! Each logical process is a tokio task with its own [`Client`]; it runs one operation
//! at a time, bounded by a per-operation timeout, then sleeps a random pause (so that
//! the whole run issues about `rate` operations a second). After an operation ends as
//! `info` (its outcome unknown, it may still take effect), the task goes on under a
//! new process number (`process + concurrency`), as Jepsen does, so that a process
//! never has two operations open in the history.
//!
//! - `register`: get / set / cas / delete on a few keys; reads alternate between
//!   LINEARIZABLE and LEASE (the history's `consistency` says which). Written values
//!   are unique (`"<process>.<n>"`), which keeps the checker's search small. A cas
//!   reads the key (LINEARIZABLE) and, if it holds the expected value, writes with
//!   `IF_VERSION` of what it read: same version means same write, so a success is an
//!   atomic compare-and-set on the value; a mismatch is a `fail`.
//! - `counter`: INCR with deltas 1–5 and LINEARIZABLE reads on a few keys.
//! - `cdc`: see [`super::cdc_workload`].
//!
//! Errors map to `fail` only when the operation surely had no effect (a routing
//! refusal, no connection, a validation error, a condition that did not hold);
//! everything else (timeouts, broken connections, "outcome unknown") is `info`.

use super::history::{Extra, HistoryWriter, OpHandle};
use anyhow::Result;
use raftcache_client::{
    Client, ClientConfig, ClientError, Condition, Consistency, ReadOptions, SetOptions,
};
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Longest an operation may take before it is recorded as `info`.
pub const OP_TIMEOUT: Duration = Duration::from_secs(6);

/// The settings every workload shares.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// Logical client processes.
    pub concurrency: usize,
    /// Target operations per second over all processes.
    pub rate: f64,
    /// Keys used.
    pub keys: usize,
    /// Base seed (each process derives its own).
    pub seed: u64,
    /// `register` reads from followers (10 s staleness bound) instead of the leader:
    /// not linearizable, so a run shows the checker catching real stale reads.
    pub follower_reads: bool,
}

/// How a register read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Read index on the leader.
    Linearizable,
    /// Leader lease.
    Lease,
    /// Any fresh-enough replica (not linearizable).
    Follower,
}

/// How an error ends an operation.
pub fn classify(e: &ClientError) -> bool {
    // true = certainly not applied (fail); false = unknown (info).
    e.is_unapplied()
        || matches!(
            e,
            ClientError::KeyTooLarge { .. }
                | ClientError::ValueTooLarge { .. }
                | ClientError::EmptyKey
                | ClientError::OutOfMemory { .. }
                | ClientError::NotAnInteger
                | ClientError::IncrOverflow
                | ClientError::TtlOutOfRange { .. }
                | ClientError::InvalidArgument(_)
                | ClientError::LsnNotReached { .. }
                | ClientError::Fenced { .. }
        )
}

/// Completes `op` after an error: `fail` when it surely had no effect, else `info`.
pub fn record_error(h: &HistoryWriter, op: OpHandle, e: &ClientError) -> bool {
    if classify(e) {
        h.fail(op, e.to_string());
        false
    } else {
        h.info(op, e.to_string());
        true
    }
}

/// A client for one process: short per-attempt limits so that operations end well
/// within [`OP_TIMEOUT`].
///
/// # Errors
/// When no endpoint answers.
pub async fn process_client(endpoints: &[String]) -> Result<Client> {
    let mut config = ClientConfig::new(endpoints.to_vec());
    config.request_deadline = Duration::from_secs(5);
    config.request_timeout = Duration::from_secs(2);
    Ok(Client::connect(config).await?)
}

/// The pause between two operations of one process for a total of `rate` ops/s.
pub fn pause(rng: &mut SmallRng, opts: &WorkloadOptions) -> Duration {
    let mean = opts.concurrency as f64 / opts.rate.max(0.1);
    Duration::from_secs_f64(rng.random_range(0.0..=2.0 * mean))
}

/// Register key names.
pub fn register_keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("r{i}")).collect()
}

/// Counter key names.
pub fn counter_keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{i}")).collect()
}

/// Last value seen per key (to pick cas expectations that sometimes hold).
type Seen = Arc<Mutex<HashMap<String, Option<String>>>>;

/// Runs the register workload until `until`.
pub async fn register(
    h: Arc<HistoryWriter>,
    endpoints: Vec<String>,
    opts: WorkloadOptions,
    until: Instant,
) -> Result<()> {
    let keys = register_keys(opts.keys);
    let seen: Seen = Arc::default();
    let mut tasks = Vec::new();
    for worker in 0..opts.concurrency {
        let (h, endpoints, opts, keys, seen) = (
            h.clone(),
            endpoints.clone(),
            opts.clone(),
            keys.clone(),
            seen.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = process_client(&endpoints).await?;
            let mut rng = SmallRng::seed_from_u64(opts.seed ^ (worker as u64 * 0x9E37_79B9));
            let mut process = worker as u64;
            let mut n = 0u64;
            while Instant::now() < until {
                let key = keys.choose(&mut rng).cloned().unwrap_or_default();
                n += 1;
                let unknown = match rng.random_range(0..100) {
                    0..50 => {
                        let mode = if opts.follower_reads {
                            ReadMode::Follower
                        } else if rng.random_bool(0.5) {
                            ReadMode::Linearizable
                        } else {
                            ReadMode::Lease
                        };
                        read(&h, &client, process, &key, mode, &seen).await
                    }
                    50..75 => {
                        let v = format!("{process}.{n}");
                        write(&h, &client, process, &key, v, &seen).await
                    }
                    75..92 => {
                        let expected = seen
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get(&key)
                            .cloned()
                            .flatten();
                        let v = format!("{process}.{n}");
                        cas(&h, &client, process, &key, expected, v, &seen).await
                    }
                    _ => delete(&h, &client, process, &key, &seen).await,
                };
                if unknown {
                    process += opts.concurrency as u64;
                }
                tokio::time::sleep(pause(&mut rng, &opts)).await;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn note(seen: &Seen, key: &str, v: Option<String>) {
    seen.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key.to_owned(), v);
}

/// One read; returns whether it ended as `info`.
pub async fn read(
    h: &HistoryWriter,
    client: &Client,
    process: u64,
    key: &str,
    mode: ReadMode,
    seen: &Seen,
) -> bool {
    let (consistency, mode) = match mode {
        ReadMode::Linearizable => (Consistency::Linearizable, "linearizable"),
        ReadMode::Lease => (Consistency::Lease, "lease"),
        ReadMode::Follower => (
            Consistency::Follower {
                max_staleness: Duration::from_secs(10),
            },
            "follower",
        ),
    };
    let op = h.invoke(
        process,
        "read",
        key,
        Value::Null,
        Extra::default().with_consistency(mode),
    );
    let options = ReadOptions {
        consistency,
        ..ReadOptions::default()
    };
    match tokio::time::timeout(OP_TIMEOUT, client.get_with(key, options)).await {
        Ok(Ok(v)) => {
            let got = v.map(|v| String::from_utf8_lossy(&v.value).into_owned());
            note(seen, key, got.clone());
            h.ok(
                op,
                got.map_or(Value::Null, Value::String),
                Extra::default().with_consistency(mode),
            );
            false
        }
        Ok(Err(e)) => record_error(h, op, &e),
        Err(_) => {
            h.info(op, "timeout");
            true
        }
    }
}

async fn write(
    h: &HistoryWriter,
    client: &Client,
    process: u64,
    key: &str,
    v: String,
    seen: &Seen,
) -> bool {
    let op = h.invoke(process, "write", key, json!(v), Extra::default());
    match tokio::time::timeout(OP_TIMEOUT, client.set(key, v.clone())).await {
        Ok(Ok(_)) => {
            note(seen, key, Some(v.clone()));
            h.ok(op, json!(v), Extra::default());
            false
        }
        Ok(Err(e)) => record_error(h, op, &e),
        Err(_) => {
            h.info(op, "timeout");
            true
        }
    }
}

async fn delete(h: &HistoryWriter, client: &Client, process: u64, key: &str, seen: &Seen) -> bool {
    let op = h.invoke(process, "delete", key, Value::Null, Extra::default());
    match tokio::time::timeout(OP_TIMEOUT, client.delete(key)).await {
        Ok(Ok(_)) => {
            note(seen, key, None);
            h.ok(op, Value::Null, Extra::default());
            false
        }
        Ok(Err(e)) => record_error(h, op, &e),
        Err(_) => {
            h.info(op, "timeout");
            true
        }
    }
}

async fn cas(
    h: &HistoryWriter,
    client: &Client,
    process: u64,
    key: &str,
    expected: Option<String>,
    new: String,
    seen: &Seen,
) -> bool {
    let op = h.invoke(
        process,
        "cas",
        key,
        json!([expected, new]),
        Extra::default(),
    );
    let attempt = async {
        let read = ReadOptions {
            consistency: Consistency::Linearizable,
            ..ReadOptions::default()
        };
        let current = client.get_with(key, read).await?;
        let condition = match (&current, &expected) {
            (None, None) => Condition::IfAbsent,
            (Some(v), Some(e)) if v.value.as_ref() == e.as_bytes() => {
                Condition::IfVersion(v.version)
            }
            _ => return Ok(false),
        };
        let options = SetOptions {
            condition,
            ..SetOptions::default()
        };
        Ok::<bool, ClientError>(client.set_with(key, new.clone(), options).await?.applied)
    };
    match tokio::time::timeout(OP_TIMEOUT, attempt).await {
        Ok(Ok(true)) => {
            note(seen, key, Some(new.clone()));
            h.ok(op, json!([expected, new]), Extra::default());
            false
        }
        Ok(Ok(false)) => {
            h.fail(op, "expected value not found");
            false
        }
        Ok(Err(e)) => record_error(h, op, &e),
        Err(_) => {
            h.info(op, "timeout");
            true
        }
    }
}

/// Runs the counter workload until `until`.
pub async fn counter(
    h: Arc<HistoryWriter>,
    endpoints: Vec<String>,
    opts: WorkloadOptions,
    until: Instant,
) -> Result<()> {
    let keys = counter_keys(opts.keys);
    let mut tasks = Vec::new();
    for worker in 0..opts.concurrency {
        let (h, endpoints, opts, keys) = (h.clone(), endpoints.clone(), opts.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let client = process_client(&endpoints).await?;
            let mut rng = SmallRng::seed_from_u64(opts.seed ^ (worker as u64 * 0x9E37_79B9));
            let mut process = worker as u64;
            while Instant::now() < until {
                let key = keys.choose(&mut rng).cloned().unwrap_or_default();
                let unknown = if rng.random_bool(0.7) {
                    let delta: i64 = rng.random_range(1..=5);
                    incr(&h, &client, process, &key, delta).await
                } else {
                    counter_read(&h, &client, process, &key).await
                };
                if unknown {
                    process += opts.concurrency as u64;
                }
                tokio::time::sleep(pause(&mut rng, &opts)).await;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn incr(h: &HistoryWriter, client: &Client, process: u64, key: &str, delta: i64) -> bool {
    let op = h.invoke(process, "incr", key, json!(delta), Extra::default());
    match tokio::time::timeout(OP_TIMEOUT, client.incr(key, delta)).await {
        Ok(Ok(after)) => {
            h.ok(op, json!(after), Extra::default());
            false
        }
        Ok(Err(e)) => record_error(h, op, &e),
        Err(_) => {
            h.info(op, "timeout");
            true
        }
    }
}

/// A LINEARIZABLE read of a counter (a miss reads as `null`, i.e. 0).
pub async fn counter_read(h: &HistoryWriter, client: &Client, process: u64, key: &str) -> bool {
    let op = h.invoke(
        process,
        "read",
        key,
        Value::Null,
        Extra::default().with_consistency("linearizable"),
    );
    let options = ReadOptions {
        consistency: Consistency::Linearizable,
        ..ReadOptions::default()
    };
    match tokio::time::timeout(OP_TIMEOUT, client.get_with(key, options)).await {
        Ok(Ok(v)) => {
            let value = match v {
                None => Value::Null,
                Some(v) => match String::from_utf8_lossy(&v.value).parse::<i64>() {
                    Ok(n) => json!(n),
                    Err(_) => json!(String::from_utf8_lossy(&v.value)),
                },
            };
            h.ok(op, value, Extra::default().with_consistency("linearizable"));
            false
        }
        Ok(Err(e)) => record_error(h, op, &e),
        Err(_) => {
            h.info(op, "timeout");
            true
        }
    }
}

/// Final reads after the run healed: every key once, LINEARIZABLE, by process
/// `process` (a fresh one), retried a few times until one answers.
pub async fn final_reads(
    h: &HistoryWriter,
    client: &Client,
    process: u64,
    keys: &[String],
    counter: bool,
) {
    let seen: Seen = Arc::default();
    let mut p = process;
    for key in keys {
        for _ in 0..5 {
            let unknown = if counter {
                counter_read(h, client, p, key).await
            } else {
                read(h, client, p, key, ReadMode::Linearizable, &seen).await
            };
            p += 1;
            if !unknown {
                break;
            }
        }
    }
}
