//! The `raftcache-node` command line: flags over the config file, logging, signals.
//!
//! When the node serves as a cluster member, it prints exactly one JSON line on stdout,
//! `{"event":"ready","node":1,"pid":…,"grpc":"127.0.0.1:…","metrics":"127.0.0.1:…"}`
//! (with `"resp":"127.0.0.1:…"` when the RESP listener is on),
//! which `raftcache dev` and the process tests wait for: a founding node once its groups
//! have leaders, a joining node once it has its node id, a standby node at once (with
//! `"node":0`; it logs when it is added). Logs go to stderr.

use crate::config::{Config, ConfigError};
use crate::persist::Persistence;
use crate::server::{self, Listeners};
use crate::storage::EvictionPolicy;
use bytesize::ByteSize;
use clap::Parser;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// A raftcache node: the cache service over gRPC, with a Prometheus endpoint.
#[derive(Debug, Parser)]
#[command(name = "raftcache-node", version, about)]
pub struct Args {
    /// TOML config file (see node/etc/node.example.toml); flags override it.
    #[arg(long, env = "RAFTCACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address (port 0: any free port).
    #[arg(long, env = "RAFTCACHE_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Address published to clients (defaults to the bound gRPC address).
    #[arg(long, env = "RAFTCACHE_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Prometheus /metrics listen address (port 0: any free port).
    #[arg(long, env = "RAFTCACHE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// RESP (Redis protocol) listen address (port 0: any free port); none when unset.
    #[arg(long, env = "RAFTCACHE_RESP_ADDR")]
    pub resp_addr: Option<SocketAddr>,
    /// Directory for the node's files.
    #[arg(long, env = "RAFTCACHE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Number of partitions (when founding a cluster).
    #[arg(long, env = "RAFTCACHE_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Replicas per partition (when founding a cluster).
    #[arg(long, env = "RAFTCACHE_REPLICAS")]
    pub replicas: Option<u32>,
    /// Join the cluster through this member (host:port); repeat or comma-separate.
    #[arg(long, env = "RAFTCACHE_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Wait to be added with `raftcache admin add-node`.
    #[arg(long, env = "RAFTCACHE_STANDBY")]
    pub standby: bool,
    /// ADDR=VIA: reach the peer published as ADDR by dialling VIA; repeat or
    /// comma-separate.
    #[arg(long, env = "RAFTCACHE_PEER_ROUTE", value_delimiter = ',')]
    pub peer_route: Vec<String>,
    /// Accept Admin/InjectFault (clock offsets) from the Jepsen harness.
    #[arg(long, env = "RAFTCACHE_FAULT_INJECTION")]
    pub fault_injection: bool,
    /// Memory limit, e.g. 512MiB ("0" = unlimited).
    #[arg(long, env = "RAFTCACHE_MAX_MEMORY")]
    pub max_memory: Option<ByteSize>,
    /// noeviction, allkeys-lru or allkeys-lfu.
    #[arg(long, env = "RAFTCACHE_EVICTION_POLICY")]
    pub eviction_policy: Option<EvictionPolicy>,
    /// Longest accepted key, e.g. 16KiB.
    #[arg(long, env = "RAFTCACHE_MAX_KEY_SIZE")]
    pub max_key_size: Option<ByteSize>,
    /// Longest accepted value, e.g. 16MiB.
    #[arg(long, env = "RAFTCACHE_MAX_VALUE_SIZE")]
    pub max_value_size: Option<ByteSize>,
    /// none, snapshot (RDB-style) or durable (Raft log and vote flushed too).
    #[arg(long, env = "RAFTCACHE_PERSISTENCE")]
    pub persistence: Option<Persistence>,
    /// Write a partition with new writes at least this often, e.g. 60s.
    #[arg(long, env = "RAFTCACHE_SNAPSHOT_INTERVAL", value_parser = humantime::parse_duration)]
    pub snapshot_interval: Option<std::time::Duration>,
    /// ... and after this many writes since its last snapshot.
    #[arg(long, env = "RAFTCACHE_SNAPSHOT_WRITES")]
    pub snapshot_writes: Option<u64>,
    /// After every node crashed in snapshot mode: come back from the last snapshots
    /// (writes after them are lost).
    #[arg(long, env = "RAFTCACHE_RESTORE_SNAPSHOTS")]
    pub restore_snapshots: bool,
}

impl Args {
    /// The configuration: file (or defaults), then these overrides, validated.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file or option.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let (s, st) = (&mut c.server, &mut c.storage);
        set(&mut s.grpc_addr, self.grpc_addr);
        if let Some(a) = &self.advertise_addr {
            s.advertise_addr = Some(a.clone());
        }
        set(&mut s.metrics_addr, self.metrics_addr);
        set(&mut s.data_dir, self.data_dir.clone());
        if self.resp_addr.is_some() {
            c.resp.addr = self.resp_addr;
        }
        set(&mut st.partitions, self.partitions);
        set(&mut st.max_memory, self.max_memory);
        set(&mut st.eviction_policy, self.eviction_policy);
        set(&mut st.max_key_size, self.max_key_size);
        set(&mut st.max_value_size, self.max_value_size);
        set(&mut c.cluster.replicas, self.replicas);
        if !self.join.is_empty() {
            c.cluster.join = self.join.clone();
        }
        if self.standby {
            c.cluster.standby = true;
        }
        if !self.peer_route.is_empty() {
            c.cluster.peer_routes = self.peer_route.clone();
        }
        if self.fault_injection {
            c.server.fault_injection = true;
        }
        let p = &mut c.persistence;
        set(&mut p.mode, self.persistence);
        set(&mut p.snapshot_interval, self.snapshot_interval);
        set(&mut p.snapshot_writes, self.snapshot_writes);
        if self.restore_snapshots {
            p.restore_snapshots = true;
        }
        c.validate()
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// Entry point of the `raftcache-node` binary (also used by the process tests).
pub fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing();
    let config = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("raftcache-node: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftcache-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listeners = Listeners::bind(&config).await?;
        server::run(config, listeners, shutdown_signal(), |node_id, bound| {
            let line = serde_json::json!({
                "event": "ready",
                "node": node_id,
                "pid": std::process::id(),
                "grpc": bound.grpc.to_string(),
                "metrics": bound.metrics.to_string(),
            });
            let mut line = line;
            if let Some(resp) = bound.resp {
                line["resp"] = serde_json::Value::String(resp.to_string());
            }
            let mut out = std::io::stdout().lock();
            // Nobody may be reading stdout (a daemonised node); that is not an error.
            let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        })
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftcache-node: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    // A second init (the binary is also driven from tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Completes on SIGTERM or ctrl-c (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// The log filter without `RUST_LOG`: openraft's per-message warnings (failed votes,
/// replication and heartbeats of every group: ~80 lines a second on a 16-partition node
/// whose two peers are paused) are left out; the transport logs one line per unreachable
/// peer per 10 s instead, with the count (`raft::log_limit`), and openraft's errors stay.
/// `RUST_LOG=info,openraft=warn` brings them back.
const DEFAULT_LOG_FILTER: &str = "info,openraft=warn,openraft::core::raft_core=error,\
                                  openraft::replication=error,openraft::core::heartbeat=error";
