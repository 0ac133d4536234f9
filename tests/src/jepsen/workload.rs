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
use std::future::Future;
use std::pin::Pin;
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

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `ok`.
    Ok,
    /// `fail`.
    Fail,
    /// `info`: the process goes on under a new number.
    Info,
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
pub fn record_error(h: &HistoryWriter, op: OpHandle, e: &ClientError) -> Ended {
    if classify(e) {
        h.fail(op, e.to_string());
        Ended::Fail
    } else {
        h.info(op, e.to_string());
        Ended::Info
    }
}

/// A client for one process. Its default limits (2 s per attempt, 5 s per call) end
/// every operation within [`OP_TIMEOUT`]. Connecting is retried for up to
/// [`CONNECT_PATIENCE`]: a nemesis may have every node down at that moment (`kill-all`).
///
/// # Errors
/// When no endpoint answers within that time.
pub async fn process_client(endpoints: &[String]) -> Result<Client> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match Client::try_connect(ClientConfig::new(endpoints.to_vec())).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// How long [`process_client`] keeps trying to connect.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// The pause between two operations of one process for a total of `rate` ops/s.
pub fn pause(rng: &mut SmallRng, opts: &WorkloadOptions) -> Duration {
    let mean = opts.concurrency as f64 / opts.rate.max(0.1);
    Duration::from_secs_f64(rng.random_range(0.0..=2.0 * mean))
}

/// One logical client process: its client, its random source, its current process
/// number and an operation counter (for unique values).
pub struct Proc {
    /// The process's own client.
    pub client: Client,
    /// Its random source (seeded from the run's seed and its index).
    pub rng: SmallRng,
    /// Its number in the history (bumped after an `info`).
    pub process: u64,
    /// Operations started so far.
    pub n: u64,
}

/// What a workload does in one step of one process.
pub trait Steps: Send + Sync + 'static {
    /// Per-process state besides [`Proc`] (e.g. a database connection).
    type State: Send;
    /// A process's initial state.
    fn state(&self) -> Self::State;
    /// Issues and records one operation.
    fn step<'a>(
        &'a self,
        p: &'a mut Proc,
        state: &'a mut Self::State,
    ) -> Pin<Box<dyn Future<Output = Ended> + Send + 'a>>;
}

/// Runs `opts.concurrency` processes of `steps` until `until` (see the module docs).
///
/// # Errors
/// When a process cannot connect its client.
pub async fn run_processes<S: Steps>(
    steps: Arc<S>,
    endpoints: Vec<String>,
    opts: WorkloadOptions,
    until: Instant,
) -> Result<()> {
    let mut tasks = Vec::new();
    for worker in 0..opts.concurrency {
        let (steps, endpoints, opts) = (steps.clone(), endpoints.clone(), opts.clone());
        tasks.push(tokio::spawn(async move {
            let mut p = Proc {
                client: process_client(&endpoints).await?,
                rng: SmallRng::seed_from_u64(opts.seed ^ (worker as u64).wrapping_mul(0x9E37_79B9)),
                process: worker as u64,
                n: 0,
            };
            let mut state = steps.state();
            while Instant::now() < until {
                p.n += 1;
                if steps.step(&mut p, &mut state).await == Ended::Info {
                    p.process += opts.concurrency as u64;
                }
                let pause = pause(&mut p.rng, &opts);
                tokio::time::sleep(pause).await;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs `fut` for `op` within [`OP_TIMEOUT`]. On success hands back the answer and
/// the handle to complete; otherwise records the completion itself (`fail` or
/// `info`, see [`record_error`]) and returns how it ended.
pub async fn attempt<T>(
    h: &HistoryWriter,
    op: OpHandle,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<(T, OpHandle), Ended> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok((v, op)),
        Ok(Err(e)) => Err(record_error(h, op, &e)),
        Err(_) => {
            h.info(op, "timeout");
            Err(Ended::Info)
        }
    }
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
type Seen = Mutex<HashMap<String, Option<String>>>;

/// The `register` workload.
pub struct Register {
    h: Arc<HistoryWriter>,
    keys: Vec<String>,
    seen: Seen,
    follower_reads: bool,
}

impl Register {
    /// Over `keys` keys, recording into `h`.
    pub fn new(h: Arc<HistoryWriter>, keys: usize, follower_reads: bool) -> Register {
        Register {
            h,
            keys: register_keys(keys),
            seen: Seen::default(),
            follower_reads,
        }
    }

    fn note(&self, key: &str, v: Option<String>) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned(), v);
    }
}

impl Steps for Register {
    type State = ();

    fn state(&self) {}

    fn step<'a>(
        &'a self,
        p: &'a mut Proc,
        _: &'a mut (),
    ) -> Pin<Box<dyn Future<Output = Ended> + Send + 'a>> {
        Box::pin(async move {
            let key = self.keys.choose(&mut p.rng).cloned().unwrap_or_default();
            let value = format!("{}.{}", p.process, p.n);
            match p.rng.random_range(0..100) {
                0..50 => {
                    let mode = if self.follower_reads {
                        ReadMode::Follower
                    } else if p.rng.random_bool(0.5) {
                        ReadMode::Linearizable
                    } else {
                        ReadMode::Lease
                    };
                    self.read(p, &key, mode).await
                }
                50..75 => self.write(p, &key, value).await,
                75..92 => {
                    let expected = self
                        .seen
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&key)
                        .cloned()
                        .flatten();
                    self.cas(p, &key, expected, value).await
                }
                _ => self.delete(p, &key).await,
            }
        })
    }
}

impl Register {
    /// One read.
    pub async fn read(&self, p: &Proc, key: &str, mode: ReadMode) -> Ended {
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
        let extra = || Extra::default().with_consistency(mode);
        let op = self.h.invoke(p.process, "read", key, Value::Null, extra());
        let options = ReadOptions {
            consistency,
            ..ReadOptions::default()
        };
        let (v, op) = match attempt(&self.h, op, p.client.get_with(key, options)).await {
            Ok(x) => x,
            Err(ended) => return ended,
        };
        let got = v.map(|v| String::from_utf8_lossy(&v.value).into_owned());
        self.note(key, got.clone());
        self.h
            .ok(op, got.map_or(Value::Null, Value::String), extra());
        Ended::Ok
    }

    async fn write(&self, p: &Proc, key: &str, v: String) -> Ended {
        let op = self
            .h
            .invoke(p.process, "write", key, json!(v), Extra::default());
        let op = match attempt(&self.h, op, p.client.set(key, v.clone())).await {
            Ok((_, op)) => op,
            Err(ended) => return ended,
        };
        self.note(key, Some(v.clone()));
        self.h.ok(op, json!(v), Extra::default());
        Ended::Ok
    }

    async fn delete(&self, p: &Proc, key: &str) -> Ended {
        let op = self
            .h
            .invoke(p.process, "delete", key, Value::Null, Extra::default());
        let op = match attempt(&self.h, op, p.client.delete(key)).await {
            Ok((_, op)) => op,
            Err(ended) => return ended,
        };
        self.note(key, None);
        self.h.ok(op, Value::Null, Extra::default());
        Ended::Ok
    }

    async fn cas(&self, p: &Proc, key: &str, expected: Option<String>, new: String) -> Ended {
        let value = json!([expected, new]);
        let op = self
            .h
            .invoke(p.process, "cas", key, value.clone(), Extra::default());
        let client = &p.client;
        let cas = async {
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
            Ok(client.set_with(key, new.clone(), options).await?.applied)
        };
        match attempt(&self.h, op, cas).await {
            Ok((true, op)) => {
                self.note(key, Some(new.clone()));
                self.h.ok(op, value, Extra::default());
                Ended::Ok
            }
            Ok((false, op)) => {
                self.h.fail(op, "expected value not found");
                Ended::Fail
            }
            Err(ended) => ended,
        }
    }
}

/// The `counter` workload.
pub struct Counter {
    h: Arc<HistoryWriter>,
    keys: Vec<String>,
}

impl Counter {
    /// Over `keys` keys, recording into `h`.
    pub fn new(h: Arc<HistoryWriter>, keys: usize) -> Counter {
        Counter {
            h,
            keys: counter_keys(keys),
        }
    }

    async fn incr(&self, p: &Proc, key: &str, delta: i64) -> Ended {
        let op = self
            .h
            .invoke(p.process, "incr", key, json!(delta), Extra::default());
        match attempt(&self.h, op, p.client.incr(key, delta)).await {
            Ok((after, op)) => {
                self.h.ok(op, json!(after), Extra::default());
                Ended::Ok
            }
            Err(ended) => ended,
        }
    }

    /// A LINEARIZABLE read of a counter (a miss reads as `null`, i.e. 0).
    pub async fn read(&self, p: &Proc, key: &str) -> Ended {
        let extra = || Extra::default().with_consistency("linearizable");
        let op = self.h.invoke(p.process, "read", key, Value::Null, extra());
        let options = ReadOptions {
            consistency: Consistency::Linearizable,
            ..ReadOptions::default()
        };
        let (v, op) = match attempt(&self.h, op, p.client.get_with(key, options)).await {
            Ok(x) => x,
            Err(ended) => return ended,
        };
        let value = match v {
            None => Value::Null,
            Some(v) => {
                let text = String::from_utf8_lossy(&v.value);
                text.parse::<i64>()
                    .map_or_else(|_| json!(text), |n| json!(n))
            }
        };
        self.h.ok(op, value, extra());
        Ended::Ok
    }
}

impl Steps for Counter {
    type State = ();

    fn state(&self) {}

    fn step<'a>(
        &'a self,
        p: &'a mut Proc,
        _: &'a mut (),
    ) -> Pin<Box<dyn Future<Output = Ended> + Send + 'a>> {
        Box::pin(async move {
            let key = self.keys.choose(&mut p.rng).cloned().unwrap_or_default();
            if p.rng.random_bool(0.7) {
                let delta: i64 = p.rng.random_range(1..=5);
                self.incr(p, &key, delta).await
            } else {
                self.read(p, &key).await
            }
        })
    }
}

/// Final reads after the run healed: every key once, LINEARIZABLE, from process
/// numbers starting at `process`, each retried (under a new number) up to 5 times
/// until it completes `ok`.
///
/// # Errors
/// When no endpoint answers.
pub async fn final_reads(
    h: &Arc<HistoryWriter>,
    endpoints: &[String],
    process: u64,
    keys: usize,
    counter: bool,
) -> Result<()> {
    let mut p = Proc {
        client: process_client(endpoints).await?,
        rng: SmallRng::seed_from_u64(process),
        process,
        n: 0,
    };
    let register = Register::new(h.clone(), keys, false);
    let counters = Counter::new(h.clone(), keys);
    let names = if counter {
        &counters.keys
    } else {
        &register.keys
    };
    for key in names {
        for _ in 0..5 {
            let ended = if counter {
                counters.read(&p, key).await
            } else {
                register.read(&p, key, ReadMode::Linearizable).await
            };
            p.process += 1;
            if ended == Ended::Ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}
