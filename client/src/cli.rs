//! The `raftcache` command line.
//!
//! Exit codes: 0 on success; 1 when the answer is a negative one (`get` of a missing
//! key, `set` whose condition did not hold, `dev` when a node died); 2 on any error,
//! printed as one line `error: <message>` on stderr.
//!
//! Membership is managed with `raftcache admin add-node ADDR`, `admin remove-node ID
//! [--wait]`, `admin transfer-leader PARTITION NODE` and `admin rebalance`;
//! `raftcache cluster` shows the merged view of every node.

mod dev;

use crate::bench::{self, BenchConfig, BenchReport, Ratio};
use crate::hot::{key_text, merge_hot_keys, ClusterHotKey};
use crate::load::LoadOptions;
use crate::stampede::{self, StampedeConfig, StampedeReport};
use crate::{
    Client, ClientConfig, ClusterStatus, Condition, Consistency, Lsn, NodeSnapshots, NodeStats,
    PgSnapshot, ReadOptions, SetOptions, Ttl, DEFAULT_ENDPOINT,
};
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Command-line client of a raftcache cluster.
#[derive(Debug, Parser)]
#[command(name = "raftcache", version, about)]
struct Cli {
    /// Seed nodes, comma-separated `host:port`.
    #[arg(
        long,
        global = true,
        env = "RAFTCACHE_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINT
    )]
    endpoints: Vec<String>,
    /// Timeout of each call, retries included, e.g. `500ms`, `5s` [default: 5s].
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Client(ClientCommand),
    /// Run a local cluster in the foreground (ctrl-c stops it).
    Dev(DevArgs),
}

/// The commands that talk to a cluster.
#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// Print a key's value (exit 1 when it is missing).
    Get {
        /// The key.
        key: String,
        /// Print one JSON line with the value, version and TTL.
        #[arg(long)]
        json: bool,
        /// How fresh the read must be.
        #[arg(long, value_enum, default_value_t = ConsistencyArg::Lease)]
        consistency: ConsistencyArg,
        /// For `--consistency follower`: how stale the answer may be.
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        max_staleness: Duration,
        /// Read-your-writes with Postgres: answer only once CDC has applied every commit
        /// before this LSN (as `pg_current_wal_lsn()` prints it, e.g. `0/16B3748`).
        #[arg(long, value_name = "LSN")]
        min_lsn: Option<Lsn>,
    },
    /// Write a key (exit 1 when the condition did not hold, 3 when a `--source-lsn`
    /// fill was refused as stale).
    Set {
        /// The key.
        key: String,
        /// The value (or `--stdin` / `--file`).
        #[arg(allow_hyphen_values = true, required_unless_present_any = ["stdin", "file"])]
        value: Option<String>,
        /// Read the value from standard input, as bytes (binary-safe, nothing trimmed):
        /// `raftcache set k --stdin < photo.jpg`.
        #[arg(long, conflicts_with_all = ["value", "file"])]
        stdin: bool,
        /// Read the value from this file, as bytes.
        #[arg(long, value_name = "PATH", conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Time to live, e.g. `10s`, `1h 30m`.
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "keep_ttl")]
        ttl: Option<Duration>,
        /// Only if the key is absent.
        #[arg(long, conflicts_with_all = ["xx", "if_version"])]
        nx: bool,
        /// Only if the key is present.
        #[arg(long, conflicts_with = "if_version")]
        xx: bool,
        /// Only if the key's current version is N (compare-and-set).
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
        /// Keep the key's current TTL.
        #[arg(long)]
        keep_ttl: bool,
        /// A cache-aside fill of a row read from Postgres at this LSN: refused (exit 3)
        /// when CDC invalidated or rewrote the key at or after it.
        #[arg(long, value_name = "LSN", conflicts_with = "source_snapshot")]
        source_lsn: Option<Lsn>,
        /// An exact cache-aside fill of a row read under this Postgres snapshot
        /// (`xmin:xmax:xip,…`, from `SELECT pg_current_snapshot()` in the statement that
        /// read the row): refused (exit 3) when a transaction that CDC saw invalidate or
        /// rewrite the key is not visible in it.
        #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["nx", "xx", "if_version"])]
        source_snapshot: Option<PgSnapshot>,
        /// Print `{"applied":…,"version":…}`.
        #[arg(long)]
        json: bool,
    },
    /// Remove a key; prints 1 when it existed, else 0.
    Del {
        /// The key.
        key: String,
    },
    /// Add to an integer value; prints the result.
    Incr {
        /// The key.
        key: String,
        /// The amount to add (may be negative).
        #[arg(
            long,
            default_value_t = 1,
            allow_hyphen_values = true,
            value_name = "N"
        )]
        by: i64,
    },
    /// Set a key's TTL; prints 1 when the key exists, else 0.
    Expire {
        /// The key.
        key: String,
        /// Time to live, e.g. `10s`.
        #[arg(value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Remove a key's TTL; prints 1 when the key exists, else 0.
    Persist {
        /// The key.
        key: String,
    },
    /// Print a key's remaining TTL in milliseconds (-2: missing, -1: no TTL).
    Ttl {
        /// The key.
        key: String,
    },
    /// Show the cluster as all its nodes see it: nodes, and per partition its
    /// leader, replicas, learners, term and applied index.
    Cluster {
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Change the cluster's membership and placement.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Show every node's counters.
    Stats {
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
        /// Show only the hottest keys across the nodes (a key's rates summed over the
        /// nodes reporting it).
        #[arg(long)]
        hot: bool,
    },
    /// Measure throughput and latency with a get/set load.
    Bench(BenchArgs),
    /// Simulate a cache stampede: many concurrent `get_or_load` callers whose loader
    /// (a stand-in for a database query) sleeps and counts itself; prints the loader
    /// calls, where answers came from, and latencies.
    Stampede(StampedeArgs),
}

#[derive(Debug, Args)]
struct StampedeArgs {
    /// Concurrent callers.
    #[arg(long, default_value_t = 1000)]
    callers: usize,
    /// The key (with `--keys N`: the prefix of keys `KEY:0` ..).
    #[arg(long, default_value = "stampede")]
    key: String,
    /// How many keys the callers spread over.
    #[arg(long, default_value_t = 1)]
    keys: usize,
    /// How long one loader call takes.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    loader: Duration,
    /// How long a loaded value is fresh.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Serve values stale for this long after `--ttl` while one caller refreshes.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    stale_ttl: Duration,
    /// Loop for this long (each caller calls again and again); default: one burst.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Pause between a caller's calls when looping.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Plain cache-aside: no leases, no single-flight, no early refresh.
    #[arg(long)]
    unprotected: bool,
    /// Loader calls at once while the cache is unavailable.
    #[arg(long, default_value_t = 8)]
    degraded_concurrency: usize,
    /// How long to wait for the cache before calling the loader directly.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    cache_deadline: Duration,
    /// Print one JSON line (with a per-second timeline).
    #[arg(long)]
    json: bool,
}

/// The `admin` commands.
#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Add the node listening at ADDR (started with `--join` or `--standby`); prints
    /// its node id.
    AddNode {
        /// The node's gRPC address, `host:port`.
        addr: String,
    },
    /// Drain a node: its replicas and leaderships move away, then it leaves the map.
    RemoveNode {
        /// The node id.
        id: u64,
        /// Wait until the node is gone from the cluster map; `--timeout` bounds the wait
        /// here [default: 60s].
        #[arg(long)]
        wait: bool,
    },
    /// Move the leadership of a partition to a node holding a voting replica of it.
    TransferLeader {
        /// The partition.
        partition: u32,
        /// The node to lead it.
        node: u64,
    },
    /// Recompute placement: min(R, active nodes) replicas per partition, spread evenly.
    Rebalance,
    /// Make every node write a snapshot of its partitions (or of PARTITION) to its data
    /// directory now (nodes run with --persistence snapshot or durable).
    Snapshot {
        /// Only this partition.
        partition: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ConsistencyArg {
    Linearizable,
    Lease,
    Follower,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Concurrent requests.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Size of the key space (`bench:0` ..).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Mix of sets and gets, `SET:GET`.
    #[arg(long, default_value = "1:1")]
    ratio: Ratio,
    /// Stop after N operations.
    #[arg(long, value_name = "N")]
    max_ops: Option<u64>,
    /// Do not write the key space before measuring.
    #[arg(long)]
    no_preload: bool,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// gRPC port of node 1; node i listens on P+i-1 and serves metrics on
    /// P+100+i-1. 0 picks free ports.
    #[arg(long, default_value_t = 7001)]
    base_port: u16,
    /// Directory for the nodes' files (node i uses DIR/node-i).
    #[arg(long, default_value = "./.raftcache-dev")]
    data_dir: PathBuf,
    /// Partitions of the cluster.
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Replicas per partition [default: min(3, nodes)].
    #[arg(long, value_name = "R")]
    replicas: Option<u32>,
    /// Memory limit per node, e.g. `512MiB`.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
    /// Eviction policy: noeviction, allkeys-lru or allkeys-lfu.
    #[arg(long, value_name = "POLICY")]
    eviction_policy: Option<String>,
    /// Persistence of every node: none, snapshot or durable. With snapshot or durable,
    /// running `dev` again on the same --data-dir brings the cluster back with its data.
    #[arg(long, value_name = "MODE")]
    persistence: Option<String>,
}

/// The entry point of the `raftcache` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Logs go to stderr so that stdout carries only answers.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Prints `error: <message>` on one line and returns exit code 2.
fn fail(error: &anyhow::Error) -> ExitCode {
    let message = format!("{error:#}").replace(['\n', '\r'], " ");
    eprintln!("error: {message}");
    ExitCode::from(2)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Dev(args) => {
            dev::run(dev::DevConfig {
                nodes: args.nodes,
                base_port: args.base_port,
                data_dir: args.data_dir,
                partitions: args.partitions,
                replicas: args.replicas.unwrap_or(args.nodes.min(3)),
                max_memory: args.max_memory,
                eviction_policy: args.eviction_policy,
                persistence: args.persistence,
            })
            .await
        }
        Command::Client(command) => {
            let timeout = cli.timeout.unwrap_or(REQUEST_TIMEOUT);
            let config = ClientConfig {
                endpoints: cli.endpoints,
                request_timeout: timeout,
                request_deadline: timeout,
                ..ClientConfig::default()
            };
            let wait = cli.timeout.unwrap_or(WAIT_TIMEOUT);
            run_client(config, command, wait).await
        }
    }
}

/// The timeout of a call when `--timeout` is not given.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `admin remove-node --wait` waits when `--timeout` is not given.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `admin remove-node --wait` looks at the cluster.
const WAIT_POLL: Duration = Duration::from_millis(250);

async fn run_client(
    mut config: ClientConfig,
    command: ClientCommand,
    wait: Duration,
) -> anyhow::Result<ExitCode> {
    if let ClientCommand::Stampede(args) = &command {
        config.load.degraded_concurrency = args.degraded_concurrency;
        config.load.cache_deadline = args.cache_deadline;
    }
    // A command reports an unreachable cluster at once rather than wait for it.
    let client = Client::try_connect(config).await?;
    let mut out = String::new();
    let code = match command {
        ClientCommand::Get {
            key,
            json,
            consistency,
            max_staleness,
            min_lsn,
        } => {
            let consistency = match consistency {
                ConsistencyArg::Linearizable => Consistency::Linearizable,
                ConsistencyArg::Lease => Consistency::Lease,
                ConsistencyArg::Follower => Consistency::Follower { max_staleness },
            };
            let options = ReadOptions {
                consistency,
                min_lsn,
            };
            let value = client.get_with(&key, options).await?;
            let found = value.is_some();
            if json {
                let line = GetJson {
                    key: &key,
                    found,
                    value: value
                        .as_ref()
                        .map(|v| String::from_utf8_lossy(&v.value).into_owned()),
                    version: value.as_ref().map(|v| v.version),
                    ttl_ms: value.as_ref().and_then(|v| v.ttl).map(millis),
                    source_lsn: value
                        .as_ref()
                        .map(|v| v.source_lsn)
                        .filter(|l| *l != Lsn::ZERO),
                };
                writeln!(out, "{}", serde_json::to_string(&line)?)?;
                write_stdout(out.as_bytes())?;
            } else if let Some(v) = &value {
                write_stdout(&v.value)?;
                write_stdout(b"\n")?;
            }
            negative_unless(found)
        }
        ClientCommand::Set {
            key,
            value,
            stdin,
            file,
            ttl,
            nx,
            xx,
            if_version,
            keep_ttl,
            source_lsn,
            source_snapshot,
            json,
        } => {
            let condition = match (nx, xx, if_version) {
                (true, _, _) => Condition::IfAbsent,
                (_, true, _) => Condition::IfPresent,
                (_, _, Some(version)) => Condition::IfVersion(version),
                _ => Condition::Always,
            };
            let options = SetOptions {
                ttl,
                condition,
                keep_ttl,
                source_lsn,
                source_snapshot: source_snapshot.clone(),
            };
            let value: Vec<u8> = match (value, file) {
                (Some(value), _) => value.into_bytes(),
                (None, Some(path)) => std::fs::read(&path)
                    .with_context(|| format!("cannot read the value from {}", path.display()))?,
                (None, None) => {
                    debug_assert!(stdin, "clap requires a value, --stdin or --file");
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf)
                        .context("cannot read the value from standard input")?;
                    buf
                }
            };
            let outcome = client.set_with(&key, value, options).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&outcome)?)?;
            } else if let (Some(newer), Some(snapshot)) = (outcome.refused_by, &source_snapshot) {
                writeln!(
                    out,
                    "NOT SET: stale fill, a transaction that invalidated or updated the key (CDC, at {newer}) is not visible in snapshot {snapshot}"
                )?;
            } else if let Some(newer) = outcome.refused_by {
                writeln!(
                    out,
                    "NOT SET: stale fill, the key was invalidated or updated by CDC at {newer}, not before {}",
                    source_lsn.unwrap_or_default()
                )?;
            } else {
                out.push_str(if outcome.applied { "OK\n" } else { "NOT SET\n" });
            }
            write_stdout(out.as_bytes())?;
            if outcome.refused_by.is_some() {
                ExitCode::from(3)
            } else {
                negative_unless(outcome.applied)
            }
        }
        ClientCommand::Del { key } => print_flag(client.delete(&key).await?)?,
        ClientCommand::Incr { key, by } => {
            write_stdout(format!("{}\n", client.incr(&key, by).await?).as_bytes())?;
            ExitCode::SUCCESS
        }
        ClientCommand::Expire { key, ttl } => print_flag(client.expire(&key, Some(ttl)).await?)?,
        ClientCommand::Persist { key } => print_flag(client.expire(&key, None).await?)?,
        ClientCommand::Ttl { key } => {
            let pttl = match client.ttl(&key).await? {
                Ttl::Missing => -2,
                Ttl::Persistent => -1,
                Ttl::Expires(left) => i64::try_from(left.as_millis()).unwrap_or(i64::MAX),
            };
            write_stdout(format!("{pttl}\n").as_bytes())?;
            ExitCode::SUCCESS
        }
        ClientCommand::Cluster { json } => {
            let status = client.cluster_status().await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&status)?)?;
            } else {
                out = cluster_table(&status);
            }
            write_stdout(out.as_bytes())?;
            ExitCode::SUCCESS
        }
        ClientCommand::Admin(command) => run_admin(&client, command, wait).await?,
        ClientCommand::Stats { json, hot } => {
            let stats = client.stats().await?;
            if hot {
                let merged = merge_hot_keys(&stats);
                if json {
                    writeln!(out, "{}", serde_json::to_string(&merged)?)?;
                } else {
                    out = hot_keys_table(&merged);
                }
            } else if json {
                writeln!(out, "{}", serde_json::to_string(&stats)?)?;
            } else {
                out = stats_text(&stats);
            }
            write_stdout(out.as_bytes())?;
            ExitCode::SUCCESS
        }
        ClientCommand::Bench(args) => {
            let config = BenchConfig {
                concurrency: args.concurrency,
                duration: args.duration,
                keys: args.keys,
                value_size: args.value_size,
                ratio: args.ratio,
                max_ops: args.max_ops,
                preload: !args.no_preload,
            };
            let report = bench::run(&client, &config).await?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                out = bench_text(&report);
            }
            write_stdout(out.as_bytes())?;
            ExitCode::SUCCESS
        }
        ClientCommand::Stampede(args) => {
            let mut options = LoadOptions::ttl(args.ttl).stale_while_revalidate(args.stale_ttl);
            if args.unprotected {
                options = options.unprotected();
            }
            let config = StampedeConfig {
                callers: args.callers,
                key: args.key,
                keys: args.keys,
                loader: args.loader,
                value_size: 100,
                options,
                duration: args.duration,
                interval: args.interval,
            };
            let report = stampede::run(std::slice::from_ref(&client), &config).await?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                out = stampede_text(&report);
            }
            write_stdout(out.as_bytes())?;
            ExitCode::SUCCESS
        }
    };
    Ok(code)
}

/// Runs an `admin` command.
async fn run_admin(
    client: &Client,
    command: AdminCommand,
    wait: Duration,
) -> anyhow::Result<ExitCode> {
    match command {
        AdminCommand::AddNode { addr } => {
            let id = client
                .add_node(&addr)
                .await
                .with_context(|| format!("cannot add the node at {addr}"))?;
            write_stdout(format!("{id}\n").as_bytes())?;
        }
        AdminCommand::RemoveNode { id, wait: false } => {
            let epoch = client
                .remove_node(id)
                .await
                .with_context(|| format!("cannot remove node {id}"))?;
            write_stdout(format!("draining node {id} (epoch {epoch})\n").as_bytes())?;
        }
        AdminCommand::RemoveNode { id, wait: true } => {
            let deadline = tokio::time::Instant::now() + wait;
            client
                .remove_node(id)
                .await
                .with_context(|| format!("cannot remove node {id}"))?;
            loop {
                match client.cluster_status().await {
                    Ok(status) if !status.nodes.iter().any(|n| n.id == id) => break,
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "cluster status failed; polling on"),
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() + WAIT_POLL < deadline,
                    "node {id} is still in the cluster map after {}",
                    humantime::format_duration(wait)
                );
                tokio::time::sleep(WAIT_POLL).await;
            }
            write_stdout(format!("removed node {id}\n").as_bytes())?;
        }
        AdminCommand::TransferLeader { partition, node } => {
            client
                .transfer_leader(partition, node)
                .await
                .with_context(|| {
                    format!("cannot move the leadership of partition {partition} to node {node}")
                })?;
            write_stdout(b"OK\n")?;
        }
        AdminCommand::Rebalance => {
            let (epoch, moved) = client.rebalance().await.context("cannot rebalance")?;
            write_stdout(format!("epoch {epoch}, {moved} replicas moved\n").as_bytes())?;
        }
        AdminCommand::Snapshot { partition } => {
            let nodes = client
                .snapshot(partition)
                .await
                .context("cannot write snapshots")?;
            write_stdout(snapshots_text(&nodes).as_bytes())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The `get --json` line.
#[derive(Serialize)]
struct GetJson<'a> {
    key: &'a str,
    found: bool,
    value: Option<String>,
    version: Option<u64>,
    ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_lsn: Option<Lsn>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Exit 0 for a positive answer, 1 for a negative one.
fn negative_unless(positive: bool) -> ExitCode {
    if positive {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Prints `1` or `0` (Redis style) and exits 0 either way.
fn print_flag(flag: bool) -> anyhow::Result<ExitCode> {
    write_stdout(if flag { b"1\n" } else { b"0\n" })?;
    Ok(ExitCode::SUCCESS)
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

/// The human view of the merged cluster status.
fn cluster_table(status: &ClusterStatus) -> String {
    let ids = |ids: &[u64]| -> String {
        if ids.is_empty() {
            "-".to_owned()
        } else {
            ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "epoch {}  replication factor {}  partitions {}",
        status.epoch,
        status.replication_factor,
        status.partitions.len()
    );
    let _ = writeln!(out, "\n{:>4}  {:<21}  state", "node", "address");
    for n in &status.nodes {
        let _ = writeln!(out, "{:>4}  {:<21}  {}", n.id, n.addr, n.state);
    }
    if !status.unreachable.is_empty() {
        let _ = writeln!(out, "unreachable: {}", status.unreachable.join(", "));
    }
    let _ = writeln!(
        out,
        "\n{:>9}  {:>6}  {:<12}  {:<8}  {:>6}  {:>10}  {:>17}",
        "partition", "leader", "replicas", "learners", "term", "applied", "cdc lsn"
    );
    for p in &status.partitions {
        let leader = p.leader.map_or_else(|| "-".to_owned(), |l| l.to_string());
        let _ = writeln!(
            out,
            "{:>9}  {:>6}  {:<12}  {:<8}  {:>6}  {:>10}  {:>17}",
            p.id,
            leader,
            ids(&p.replicas),
            ids(&p.learners),
            p.term,
            p.applied,
            p.cdc_lsn.to_string()
        );
    }
    out
}

/// The human view of `admin snapshot`.
fn snapshots_text(nodes: &[NodeSnapshots]) -> String {
    let mut out = String::new();
    for n in nodes {
        let bytes: u64 = n.snapshots.iter().map(|s| s.2).sum();
        let pause = n.snapshots.iter().map(|s| s.3).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "node {} at {}: {} snapshots, {bytes} bytes in {} ms (longest write pause {pause} µs)",
            n.node_id,
            n.addr,
            n.snapshots.len(),
            n.duration_ms
        );
        for (p, index, bytes, pause) in &n.snapshots {
            let name = if *p == u32::MAX {
                "meta".to_owned()
            } else {
                format!("partition {p}")
            };
            let _ = writeln!(
                out,
                "  {name:<14} index {index:<10} {bytes} bytes, pause {pause} µs"
            );
        }
    }
    out
}

/// The `stats --hot` table: one line per key, hottest first.
fn hot_keys_table(keys: &[ClusterHotKey]) -> String {
    if keys.is_empty() {
        return "no hot keys reported (no keyed requests recently)\n".to_owned();
    }
    let mut out = format!("{:<10} {:>9} {:>10}  key\n", "node", "partition", "req/s");
    for k in keys {
        let nodes = k
            .nodes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let _ = writeln!(
            out,
            "{nodes:<10} {:>9} {:>10.1}  {}",
            k.partition,
            k.per_second,
            key_text(&k.key)
        );
    }
    out
}

/// The human view of the nodes' counters.
fn stats_text(stats: &[NodeStats]) -> String {
    let mut out = String::new();
    for (i, s) in stats.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let limit = match s.memory_limit_bytes {
            0 => "unlimited".to_owned(),
            limit => format!("{limit} bytes"),
        };
        let uptime = humantime::format_duration(Duration::from_secs(s.uptime_seconds));
        let _ = writeln!(
            out,
            "node {} at {} (version {})",
            s.node_id, s.addr, s.version
        );
        let _ = writeln!(
            out,
            "  keys         {} in {} partitions",
            s.keys, s.partitions
        );
        let _ = writeln!(
            out,
            "  memory       {} bytes used, limit {limit}",
            s.memory_used_bytes
        );
        let _ = writeln!(out, "  policy       {}", s.eviction_policy);
        let _ = writeln!(out, "  hits         {}", s.hits);
        let _ = writeln!(out, "  misses       {}", s.misses);
        let _ = writeln!(out, "  evictions    {}", s.evictions);
        let _ = writeln!(out, "  expirations  {}", s.expirations);
        let _ = writeln!(out, "  uptime       {uptime}");
        let _ = writeln!(out, "  persistence  {}", s.persistence);
        if s.snapshots_written > 0 {
            let ago = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .saturating_sub(s.last_snapshot_unix_ms);
            let ago = humantime::format_duration(Duration::from_secs(ago / 1000));
            let _ = writeln!(
                out,
                "  snapshots    {} written; last {ago} ago, {} bytes in {} ms; longest write pause {} µs",
                s.snapshots_written, s.last_snapshot_bytes, s.last_snapshot_ms, s.snapshot_max_pause_us
            );
            let _ = writeln!(
                out,
                "  on disk      {} bytes of snapshots, {} bytes in all",
                s.snapshot_stored_bytes, s.disk_bytes
            );
        } else if s.persistence != "none" {
            let _ = writeln!(
                out,
                "  snapshots    none written yet ({} bytes on disk)",
                s.disk_bytes
            );
        }
    }
    out
}

/// The human view of a benchmark report.
fn stampede_text(r: &StampedeReport) -> String {
    format!(
        "calls {}  errors {}\nloader calls {} (peak {}/s, at most {} at once)\n\
         answers: cache {}  stale {}  loader {}  degraded {}\n\
         coalesced {}  lease waits {}  early refreshes {}\n\
         latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n",
        r.calls,
        r.errors,
        r.loader_calls,
        r.peak_loader_calls_per_second,
        r.max_concurrent_loads,
        r.from_cache,
        r.from_stale,
        r.from_loader,
        r.from_degraded,
        r.load_stats.coalesced,
        r.load_stats.lease_waits,
        r.load_stats.early_refreshes,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
    )
}

fn bench_text(r: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:.0} ops/s ({:.0} gets/s, {:.0} sets/s) over {:.2}s, {} tasks, {} keys, {}-byte values, set:get {}",
        r.ops_per_sec, r.gets_per_sec, r.sets_per_sec, r.duration_s, r.concurrency, r.keys,
        r.value_size, r.ratio
    );
    let _ = writeln!(out, "hit rate  {:.2} %", r.hit_rate * 100.0);
    match &r.first_error {
        Some(first) => {
            let _ = writeln!(out, "errors    {} (first: {first})", r.errors);
        }
        None => {
            let _ = writeln!(out, "errors    {}", r.errors);
        }
    }
    let _ = writeln!(
        out,
        "latency   p50 {} µs  p99 {} µs  p999 {} µs  max {} µs",
        r.p50_us, r.p99_us, r.p999_us, r.max_us
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeInfo, PartitionStatus};

    #[test]
    fn arguments_parse() {
        let cli = Cli::try_parse_from(["raftcache", "incr", "k", "--by", "-5"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Client(ClientCommand::Incr { by: -5, .. })
        ));
        assert_eq!(cli.endpoints, [DEFAULT_ENDPOINT]);
        assert_eq!(cli.timeout, None);

        let cli = Cli::try_parse_from([
            "raftcache",
            "--endpoints",
            "a:1,b:2",
            "--timeout",
            "250ms",
            "set",
            "k",
            "-v",
            "--ttl",
            "10s",
            "--nx",
        ])
        .unwrap();
        assert_eq!(cli.endpoints, ["a:1", "b:2"]);
        assert_eq!(cli.timeout, Some(Duration::from_millis(250)));
        match cli.command {
            Command::Client(ClientCommand::Set { value, ttl, nx, .. }) => {
                assert_eq!(value.as_deref(), Some("-v"));
                assert_eq!(ttl, Some(Duration::from_secs(10)));
                assert!(nx);
            }
            other => panic!("{other:?}"),
        }

        let cli = Cli::try_parse_from(["raftcache", "set", "k", "--stdin"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Client(ClientCommand::Set {
                value: None,
                stdin: true,
                file: None,
                ..
            })
        ));
        let cli = Cli::try_parse_from(["raftcache", "set", "k", "--file", "/tmp/v"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Client(ClientCommand::Set {
                value: None,
                stdin: false,
                file: Some(_),
                ..
            })
        ));
        for conflicting in [
            &["raftcache", "set", "k"][..],
            &["raftcache", "set", "k", "v", "--stdin"],
            &["raftcache", "set", "k", "v", "--file", "f"],
            &["raftcache", "set", "k", "--stdin", "--file", "f"],
            &["raftcache", "set", "k", "v", "--nx", "--xx"][..],
            &["raftcache", "set", "k", "v", "--xx", "--if-version", "3"],
            &["raftcache", "set", "k", "v", "--ttl", "1s", "--keep-ttl"],
        ] {
            assert!(Cli::try_parse_from(conflicting).is_err(), "{conflicting:?}");
        }

        let cli =
            Cli::try_parse_from(["raftcache", "bench", "--ratio", "1:9", "--no-preload"]).unwrap();
        match cli.command {
            Command::Client(ClientCommand::Bench(b)) => {
                assert_eq!(b.ratio, Ratio { sets: 1, gets: 9 });
                assert!(b.no_preload);
                assert_eq!((b.concurrency, b.keys, b.value_size), (64, 100_000, 100));
            }
            other => panic!("{other:?}"),
        }

        let cli = Cli::try_parse_from([
            "raftcache",
            "admin",
            "remove-node",
            "3",
            "--wait",
            "--timeout",
            "90s",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Client(ClientCommand::Admin(AdminCommand::RemoveNode {
                id: 3,
                wait: true
            }))
        ));
        assert_eq!(cli.timeout, Some(Duration::from_secs(90)));
        let cli = Cli::try_parse_from(["raftcache", "admin", "transfer-leader", "7", "2"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Client(ClientCommand::Admin(AdminCommand::TransferLeader {
                partition: 7,
                node: 2
            }))
        ));
        for admin in [
            &["raftcache", "admin", "add-node", "127.0.0.1:7004"][..],
            &["raftcache", "admin", "rebalance"],
        ] {
            assert!(Cli::try_parse_from(admin).is_ok(), "{admin:?}");
        }

        let cli = Cli::try_parse_from([
            "raftcache",
            "get",
            "k",
            "--consistency",
            "follower",
            "--max-staleness",
            "250ms",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Client(ClientCommand::Get {
                consistency: ConsistencyArg::Follower,
                max_staleness,
                ..
            }) if max_staleness == Duration::from_millis(250)
        ));

        let cli = Cli::try_parse_from(["raftcache", "dev"]).unwrap();
        match cli.command {
            Command::Dev(d) => assert_eq!((d.nodes, d.partitions, d.replicas), (3, 16, None)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_cluster_table_has_a_row_per_partition() {
        let status = ClusterStatus {
            epoch: 3,
            replication_factor: 3,
            nodes: vec![
                NodeInfo {
                    id: 1,
                    addr: "127.0.0.1:7001".into(),
                    state: "active".into(),
                },
                NodeInfo {
                    id: 2,
                    addr: "127.0.0.1:7002".into(),
                    state: "draining".into(),
                },
            ],
            partitions: vec![
                PartitionStatus {
                    id: 0,
                    leader: Some(1),
                    replicas: vec![1, 2],
                    learners: vec![3],
                    term: 4,
                    applied: 17,
                    cdc_lsn: Lsn(0x16_B374_D848),
                },
                PartitionStatus {
                    id: 1,
                    leader: None,
                    replicas: vec![1],
                    learners: vec![],
                    term: 0,
                    applied: 0,
                    cdc_lsn: Lsn::ZERO,
                },
            ],
            unreachable: vec!["127.0.0.1:7003".into()],
        };
        let table = cluster_table(&status);
        println!("{table}");
        assert!(table.starts_with("epoch 3  replication factor 3  partitions 2\n"));
        assert!(table.contains("   1  127.0.0.1:7001         active\n"));
        assert!(table.contains("   2  127.0.0.1:7002         draining\n"));
        assert!(table.contains("unreachable: 127.0.0.1:7003\n"));
        assert!(table.contains(
            "        0       1  1,2           3              4          17        16/B374D848\n"
        ));
        assert!(table.contains(
            "        1       -  1             -              0           0                0/0\n"
        ));
    }

    #[test]
    fn stats_name_every_figure() {
        let text = stats_text(&[NodeStats {
            addr: "127.0.0.1:7001".into(),
            node_id: 1,
            keys: 5,
            memory_used_bytes: 640,
            memory_limit_bytes: 0,
            eviction_policy: "allkeys-lru".into(),
            hits: 7,
            misses: 2,
            evictions: 1,
            expirations: 3,
            uptime_seconds: 61,
            partitions: 16,
            version: "0.1.0".into(),
            persistence: "snapshot".into(),
            snapshots_written: 4,
            last_snapshot_unix_ms: 1,
            last_snapshot_bytes: 4096,
            last_snapshot_ms: 3,
            snapshot_max_pause_us: 250,
            snapshot_stored_bytes: 8192,
            disk_bytes: 10000,
            hot_keys: vec![],
        }]);
        for want in [
            "node 1 at 127.0.0.1:7001",
            "keys         5 in 16 partitions",
            "640 bytes used, limit unlimited",
            "allkeys-lru",
            "hits         7",
            "misses       2",
            "evictions    1",
            "expirations  3",
            "uptime       1m 1s",
            "persistence  snapshot",
            "4 written",
            "4096 bytes in 3 ms; longest write pause 250 µs",
            "8192 bytes of snapshots, 10000 bytes in all",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }
    #[test]
    fn hot_keys_merge_by_sum_and_print_escaped() {
        use crate::HotKey;
        let node = |id: u64, keys: Vec<HotKey>| NodeStats {
            addr: format!("127.0.0.1:700{id}"),
            node_id: id,
            keys: 0,
            memory_used_bytes: 0,
            memory_limit_bytes: 0,
            eviction_policy: "noeviction".into(),
            hits: 0,
            misses: 0,
            evictions: 0,
            expirations: 0,
            uptime_seconds: 0,
            partitions: 4,
            version: "0.1.0".into(),
            persistence: "none".into(),
            snapshots_written: 0,
            last_snapshot_unix_ms: 0,
            last_snapshot_bytes: 0,
            last_snapshot_ms: 0,
            snapshot_max_pause_us: 0,
            snapshot_stored_bytes: 0,
            disk_bytes: 0,
            hot_keys: keys,
        };
        let hot = |key: &[u8], partition, per_second, count| HotKey {
            key: bytes::Bytes::copy_from_slice(key),
            partition,
            per_second,
            count,
            error: 1,
        };
        let stats = [
            node(
                2,
                vec![hot(b"user:1", 3, 40.0, 800), hot(b"a\tb\xff", 1, 5.0, 100)],
            ),
            node(
                1,
                vec![hot(b"user:1", 3, 60.0, 1200), hot(b"cold", 0, 1.0, 20)],
            ),
        ];
        let merged = merge_hot_keys(&stats);
        assert_eq!(merged.len(), 3);
        assert_eq!(merged[0].nodes, [1, 2]);
        assert!((merged[0].per_second - 100.0).abs() < 1e-9, "summed");
        assert_eq!((merged[0].count, merged[0].error), (2000, 2));
        let table = hot_keys_table(&merged);
        println!("{table}");
        assert_eq!(
            table,
            "node       partition      req/s  key\n\
             1,2                3      100.0  user:1\n\
             2                  1        5.0  a\\tb\u{fffd}\n\
             1                  0        1.0  cold\n"
        );
        assert!(hot_keys_table(&[]).starts_with("no hot keys"));
        let json = serde_json::to_string(&merged[0]).unwrap();
        assert!(
            json.starts_with(r#"{"key":"user:1","partition":3,"nodes":[1,2]"#),
            "{json}"
        );
        let json = serde_json::to_string(&stats[0]).unwrap();
        assert!(
            json.contains(r#""hot_keys":[{"key":"user:1","partition":3,"per_second":40.0"#),
            "{json}"
        );
    }
}
