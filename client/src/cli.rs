//! The `raftcache` command line.
//!
//! Exit codes: 0 on success; 1 when the answer is a negative one (`get` of a missing
//! key, `set` whose condition did not hold, `dev` when a node died); 2 on any error,
//! printed as one line `error: <message>` on stderr.

mod dev;

use crate::bench::{self, BenchConfig, BenchReport, Ratio};
use crate::{
    Client, ClientConfig, ClusterMap, Condition, Consistency, NodeStats, ReadOptions, SetOptions,
    Ttl, DEFAULT_ENDPOINT,
};
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Timeout of each request, e.g. `500ms`, `5s`.
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
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
    },
    /// Write a key (exit 1 when the condition did not hold).
    Set {
        /// The key.
        key: String,
        /// The value.
        #[arg(allow_hyphen_values = true)]
        value: String,
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
    /// Show the cluster map.
    Cluster {
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Show every node's counters.
    Stats {
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Measure throughput and latency with a get/set load.
    Bench(BenchArgs),
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
    /// Number of nodes (this build: 1).
    #[arg(long, default_value_t = 1)]
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
    /// Memory limit per node, e.g. `512MiB`.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
    /// Eviction policy: noeviction, allkeys-lru or allkeys-lfu.
    #[arg(long, value_name = "POLICY")]
    eviction_policy: Option<String>,
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
                max_memory: args.max_memory,
                eviction_policy: args.eviction_policy,
            })
            .await
        }
        Command::Client(command) => {
            let config = ClientConfig {
                endpoints: cli.endpoints,
                request_timeout: cli.timeout,
                ..ClientConfig::default()
            };
            run_client(config, command).await
        }
    }
}

async fn run_client(config: ClientConfig, command: ClientCommand) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    let mut out = String::new();
    let code = match command {
        ClientCommand::Get {
            key,
            json,
            consistency,
            max_staleness,
        } => {
            let consistency = match consistency {
                ConsistencyArg::Linearizable => Consistency::Linearizable,
                ConsistencyArg::Lease => Consistency::Lease,
                ConsistencyArg::Follower => Consistency::Follower { max_staleness },
            };
            let value = client.get_with(&key, ReadOptions { consistency }).await?;
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
            ttl,
            nx,
            xx,
            if_version,
            keep_ttl,
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
            };
            let outcome = client.set_with(&key, value, options).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&outcome)?)?;
            } else {
                out.push_str(if outcome.applied { "OK\n" } else { "NOT SET\n" });
            }
            write_stdout(out.as_bytes())?;
            negative_unless(outcome.applied)
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
            let map = client.cluster_map().await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&map)?)?;
            } else {
                out = cluster_table(&map);
            }
            write_stdout(out.as_bytes())?;
            ExitCode::SUCCESS
        }
        ClientCommand::Stats { json } => {
            let stats = client.stats().await?;
            if json {
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
    };
    Ok(code)
}

/// The `get --json` line.
#[derive(Serialize)]
struct GetJson<'a> {
    key: &'a str,
    found: bool,
    value: Option<String>,
    version: Option<u64>,
    ttl_ms: Option<u64>,
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

/// The human view of the cluster map.
fn cluster_table(map: &ClusterMap) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "epoch {}  partitions {}  vnodes {}",
        map.epoch, map.partition_count, map.vnodes
    );
    let _ = writeln!(out, "\nnode  address");
    for n in &map.nodes {
        let _ = writeln!(out, "{:>4}  {}", n.id, n.addr);
    }
    let _ = writeln!(
        out,
        "\n{:>9}  {:>6}  {:<12}  {:>6}  {:>10}",
        "partition", "leader", "replicas", "term", "applied"
    );
    for p in &map.partitions {
        let leader = p.leader.map_or_else(|| "-".to_owned(), |l| l.to_string());
        let replicas = p
            .replicas
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let _ = writeln!(
            out,
            "{:>9}  {:>6}  {:<12}  {:>6}  {:>10}",
            p.id, leader, replicas, p.term, p.applied
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
    }
    out
}

/// The human view of a benchmark report.
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
    use crate::{NodeInfo, PartitionInfo};

    #[test]
    fn arguments_parse() {
        let cli = Cli::try_parse_from(["raftcache", "incr", "k", "--by", "-5"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Client(ClientCommand::Incr { by: -5, .. })
        ));
        assert_eq!(cli.endpoints, [DEFAULT_ENDPOINT]);
        assert_eq!(cli.timeout, Duration::from_secs(5));

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
        assert_eq!(cli.timeout, Duration::from_millis(250));
        match cli.command {
            Command::Client(ClientCommand::Set { value, ttl, nx, .. }) => {
                assert_eq!(value, "-v");
                assert_eq!(ttl, Some(Duration::from_secs(10)));
                assert!(nx);
            }
            other => panic!("{other:?}"),
        }

        for conflicting in [
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
    }

    #[test]
    fn the_cluster_table_has_a_row_per_partition() {
        let map = ClusterMap {
            epoch: 3,
            partition_count: 2,
            vnodes: 1024,
            nodes: vec![NodeInfo {
                id: 1,
                addr: "127.0.0.1:7001".into(),
            }],
            partitions: vec![
                PartitionInfo {
                    id: 0,
                    leader: Some(1),
                    replicas: vec![1, 2],
                    term: 4,
                    applied: 17,
                },
                PartitionInfo {
                    id: 1,
                    leader: None,
                    replicas: vec![1],
                    term: 0,
                    applied: 0,
                },
            ],
        };
        let table = cluster_table(&map);
        println!("{table}");
        assert!(table.starts_with("epoch 3  partitions 2  vnodes 1024\n"));
        assert!(table.contains("   1  127.0.0.1:7001\n"));
        assert!(table.contains("        0       1  1,2                4          17\n"));
        assert!(table.contains("        1       -  1                  0           0\n"));
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
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }
}
