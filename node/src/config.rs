//! Node configuration: one `Config` read from TOML, overridden by flags, validated once.
//!
//! Precedence is file < environment < command-line flags (the flags and their
//! `RAFTCACHE_*` environment variables live in [`crate::cli`]). Sizes and durations are
//! written in human units ("512MiB", "200ms"). Every option, with its default, is in
//! `node/etc/node.example.toml`; a test parses that file so it cannot rot.

use crate::persist::Persistence;
use crate::storage::{EvictionPolicy, StorageConfig};
use bytesize::ByteSize;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Virtual nodes per partition on the client's consistent-hash ring, published in the
/// cluster map. Clients use whatever the map says; 1024 keeps every one of 16 partitions
/// within ~7 % of its fair share of 100k keys (512: ~8-9 %, 256: ~15 %).
pub const DEFAULT_VNODES: u32 = 1024;

/// Why a configuration was refused. Every message names the file, option or limit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped options.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml/serde said, with the line and column.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid option {option}: {message}")]
    Invalid {
        /// The option, as written in the file (`storage.partitions`).
        option: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// The whole node configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Identity, listeners and lifecycle.
    pub server: ServerConfig,
    /// The in-memory store: partitions, limits, eviction, expiry.
    pub storage: StorageSection,
    /// How the node becomes part of a cluster.
    pub cluster: ClusterSection,
    /// What the node writes to its data directory.
    pub persistence: PersistenceSection,
    /// The RESP (Redis protocol) listener.
    pub resp: RespSection,
}

/// `[resp]`: the Redis-protocol listener (see `crate::resp`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RespSection {
    /// Where redis-cli and Redis clients connect (port 0: any free port); no listener
    /// when unset. Any node accepts any key.
    pub addr: Option<SocketAddr>,
    /// Most client connections at once.
    pub max_clients: usize,
    /// Accept `FLUSHALL` / `FLUSHDB` (they empty the whole cluster, internal keys
    /// excepted). Off by default: a stray `FLUSHALL` from a Redis tool must not wipe a
    /// shared cache (Redis operators rename the command away for the same reason).
    pub allow_flushall: bool,
    /// Most bytes of unanswered requests buffered per connection (Redis
    /// `client-query-buffer-limit`); must exceed `storage.max-value-size`.
    pub max_query_buffer: ByteSize,
}

impl Default for RespSection {
    fn default() -> Self {
        RespSection {
            addr: None,
            max_clients: 10_000,
            allow_flushall: false,
            max_query_buffer: ByteSize::mib(64),
        }
    }
}

/// `[persistence]`: what is written to `server.data-dir` (see `crate::persist`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PersistenceSection {
    /// `none` (memory only), `snapshot` (RDB-style snapshots, exact restart after a clean
    /// shutdown) or `durable` (also the Raft log and vote, flushed before acknowledging).
    pub mode: Persistence,
    /// A partition with new writes is written at least this often.
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// ... and after this many writes (Raft entries applied) since its last snapshot.
    pub snapshot_writes: u64,
    /// After every node crashed in `snapshot` mode: come back from the last snapshots
    /// (writes after them are lost). Never needed after a clean shutdown or in `durable`
    /// mode.
    pub restore_snapshots: bool,
}

impl Default for PersistenceSection {
    fn default() -> Self {
        PersistenceSection {
            mode: Persistence::None,
            snapshot_interval: Duration::from_secs(60),
            snapshot_writes: 100_000,
            restore_snapshots: false,
        }
    }
}

/// `[cluster]`: founding or joining a cluster.
///
/// With neither `join` nor `standby` the node founds a new cluster (it becomes node 1,
/// with `storage.partitions` partitions and replication factor `replicas`). With `join`
/// it asks those nodes to add it and gets a fresh node id; with `standby` it waits for
/// `raftcache admin add-node`. A restarted memory-only node must join (it forgot its
/// replicas; it comes back as a new node).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterSection {
    /// R: replicas per partition aimed for when founding (fewer while nodes are missing).
    pub replicas: u32,
    /// Addresses (host:port) of cluster members to join through.
    pub join: Vec<String>,
    /// Wait to be added by an administrator instead of founding or joining.
    pub standby: bool,
    /// `ADDR=VIA` pairs: to reach the peer published as `ADDR`, dial `VIA` instead
    /// (a fault-injecting proxy in the Jepsen harness, a tunnel, a NAT). Only this
    /// node's outgoing peer connections are affected; the map still says `ADDR`.
    pub peer_routes: Vec<String>,
}

impl ClusterSection {
    /// `peer_routes` as a map from published address to dialled address.
    ///
    /// # Errors
    /// A message naming the first entry that is not `host:port=host:port`.
    pub fn peer_route_map(&self) -> Result<std::collections::HashMap<String, String>, String> {
        self.peer_routes
            .iter()
            .map(|r| match r.split_once('=') {
                Some((from, via)) if from.contains(':') && via.contains(':') => {
                    Ok((from.trim().to_owned(), via.trim().to_owned()))
                }
                _ => Err(format!("{r:?} is not ADDR=VIA (two host:port addresses)")),
            })
            .collect()
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            replicas: 3,
            join: Vec::new(),
            standby: false,
            peer_routes: Vec::new(),
        }
    }
}

/// `[server]`: listeners and lifecycle. (The node id is not configured: the cluster
/// gives it, and never gives the same id twice.)
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// Where the gRPC `Cache` service listens (port 0 picks a free port).
    pub grpc_addr: SocketAddr,
    /// The address published to clients in the cluster map; defaults to the bound
    /// gRPC address. Set it when clients reach the node through another name.
    pub advertise_addr: Option<String>,
    /// Where the Prometheus text endpoint (`/metrics`) listens (port 0 picks a free port).
    pub metrics_addr: SocketAddr,
    /// Directory for the node's files (`<data-dir>/sled` with persistence; see
    /// `[persistence]`).
    pub data_dir: PathBuf,
    /// How long a graceful shutdown may wait for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Accept `Admin/InjectFault` (e.g. a clock offset) from the Jepsen harness.
    /// Never enable it in production.
    pub fault_injection: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 7001)),
            advertise_addr: None,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 7101)),
            data_dir: PathBuf::from("./raftcache-data"),
            shutdown_timeout: Duration::from_secs(10),
            fault_injection: false,
        }
    }
}

/// `[storage]`: the in-memory store.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StorageSection {
    /// P, the number of partitions, fixed when the cluster is created.
    pub partitions: u32,
    /// V, virtual nodes per partition on the clients' ring (published in the cluster map).
    pub vnodes: u32,
    /// Memory limit for keys + values + per-entry overhead; "0" means unlimited.
    pub max_memory: ByteSize,
    /// What happens at `max-memory`: `noeviction`, `allkeys-lru` or `allkeys-lfu`.
    pub eviction_policy: EvictionPolicy,
    /// Keys sampled per eviction round (Redis `maxmemory-samples`).
    pub eviction_samples: usize,
    /// Longest accepted key.
    pub max_key_size: ByteSize,
    /// Longest accepted value.
    pub max_value_size: ByteSize,
    /// How often expired keys are reclaimed in the background.
    #[serde(with = "humantime_serde")]
    pub reclaim_interval: Duration,
    /// At most this many expired keys are reclaimed per partition per round.
    pub reclaim_batch: usize,
    /// How long a CDC tombstone (a key changed in Postgres) refuses older cache-aside fills
    /// by itself before it is folded into the partition's tombstone floor.
    #[serde(with = "humantime_serde")]
    pub cdc_tombstone_ttl: Duration,
}

impl Default for StorageSection {
    fn default() -> Self {
        let s = StorageConfig::default();
        StorageSection {
            partitions: s.partitions,
            vnodes: DEFAULT_VNODES,
            max_memory: ByteSize(s.max_memory),
            // Redis's default: a full cache refuses writes rather than dropping data
            // nobody asked it to drop.
            eviction_policy: EvictionPolicy::NoEviction,
            eviction_samples: s.eviction_samples,
            max_key_size: ByteSize(s.max_key_bytes as u64),
            max_value_size: ByteSize(s.max_value_bytes as u64),
            reclaim_interval: Duration::from_millis(100),
            reclaim_batch: 1000,
            cdc_tombstone_ttl: Duration::from_millis(s.cdc_tombstone_ttl_ms),
        }
    }
}

/// Hard ceilings for the size limits: past these, gRPC framing and memory use stop
/// making sense for a cache entry.
const KEY_SIZE_CEILING: u64 = 1 << 20;
const VALUE_SIZE_CEILING: u64 = 512 << 20;

impl Config {
    /// Reads and parses a TOML file; unknown options are errors.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`], naming the file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; the error is toml's message with line and column.
    ///
    /// # Errors
    /// The parser's message when the text is not a valid configuration.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Checks ranges once at start-up.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad option.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let invalid = |option, message: String| Err(ConfigError::Invalid { option, message });
        let s = &self.storage;
        if !(1..=7).contains(&self.cluster.replicas) {
            return invalid(
                "cluster.replicas",
                format!("{} is outside 1..=7", self.cluster.replicas),
            );
        }
        if self.cluster.standby && !self.cluster.join.is_empty() {
            return invalid(
                "cluster.standby",
                "a node either joins through `join` or waits in standby, not both".into(),
            );
        }
        if let Some(bad) = self.cluster.join.iter().find(|a| !a.contains(':')) {
            return invalid(
                "cluster.join",
                format!("{bad:?} is not a host:port address"),
            );
        }
        if let Err(message) = self.cluster.peer_route_map() {
            return invalid("cluster.peer-routes", message);
        }
        if !(1..=4096).contains(&s.partitions) {
            return invalid(
                "storage.partitions",
                format!("{} is outside 1..=4096", s.partitions),
            );
        }
        if !(1..=4096).contains(&s.vnodes) {
            return invalid(
                "storage.vnodes",
                format!("{} is outside 1..=4096", s.vnodes),
            );
        }
        if s.eviction_samples == 0 || s.eviction_samples > 64 {
            return invalid(
                "storage.eviction-samples",
                format!("{} is outside 1..=64", s.eviction_samples),
            );
        }
        if s.max_key_size.0 == 0 || s.max_key_size.0 > KEY_SIZE_CEILING {
            return invalid(
                "storage.max-key-size",
                format!("{} is outside 1B..=1MiB", s.max_key_size),
            );
        }
        if s.max_value_size.0 > VALUE_SIZE_CEILING {
            return invalid(
                "storage.max-value-size",
                format!("{} is over 512MiB", s.max_value_size),
            );
        }
        if s.reclaim_interval.is_zero() {
            return invalid("storage.reclaim-interval", "must be above 0".into());
        }
        if s.reclaim_batch == 0 {
            return invalid("storage.reclaim-batch", "must be at least 1".into());
        }
        if s.cdc_tombstone_ttl.as_millis() == 0 {
            return invalid("storage.cdc-tombstone-ttl", "must be at least 1ms".into());
        }
        let r = &self.resp;
        if r.max_clients == 0 {
            return invalid("resp.max-clients", "must be at least 1".into());
        }
        if r.max_query_buffer.0 <= s.max_key_size.0 + s.max_value_size.0 {
            return invalid(
                "resp.max-query-buffer",
                format!(
                    "{} must exceed storage.max-key-size + storage.max-value-size",
                    r.max_query_buffer
                ),
            );
        }
        let p = &self.persistence;
        if p.snapshot_interval < Duration::from_secs(1) {
            return invalid(
                "persistence.snapshot-interval",
                "must be at least 1s".into(),
            );
        }
        if p.snapshot_writes == 0 {
            return invalid("persistence.snapshot-writes", "must be at least 1".into());
        }
        if p.restore_snapshots && p.mode == Persistence::None {
            return invalid(
                "persistence.restore-snapshots",
                "needs persistence `snapshot` or `durable` (there is nothing to restore)".into(),
            );
        }
        Ok(self)
    }

    /// The storage engine's view of this configuration.
    pub fn storage_config(&self) -> StorageConfig {
        let s = &self.storage;
        StorageConfig {
            partitions: s.partitions,
            max_memory: s.max_memory.0,
            policy: s.eviction_policy,
            eviction_samples: s.eviction_samples,
            max_key_bytes: usize::try_from(s.max_key_size.0).unwrap_or(usize::MAX),
            max_value_bytes: usize::try_from(s.max_value_size.0).unwrap_or(usize::MAX),
            cdc_tombstone_ttl_ms: u64::try_from(s.cdc_tombstone_ttl.as_millis())
                .unwrap_or(u64::MAX),
        }
    }

    /// The largest gRPC message the node must accept: one maximal key and value plus
    /// framing slack, so an oversized value still reaches the validator and gets a
    /// `VALUE_TOO_LARGE` answer that names the limit.
    pub fn max_message_bytes(&self) -> usize {
        let s = &self.storage;
        let total = s.max_key_size.0 + s.max_value_size.0 + (1 << 20);
        usize::try_from(total).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/node.example.toml");
        let parsed = Config::from_file(&path).unwrap().validate().unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn human_units_parse() {
        let c = Config::from_toml(
            "[storage]\nmax-memory = \"64MiB\"\nreclaim-interval = \"250ms\"\neviction-policy = \"allkeys-lfu\"\ncdc-tombstone-ttl = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(c.storage.cdc_tombstone_ttl, Duration::from_secs(120));
        assert_eq!(c.storage_config().cdc_tombstone_ttl_ms, 120_000);
        assert_eq!(c.storage.max_memory.0, 64 << 20);
        assert_eq!(c.storage.reclaim_interval, Duration::from_millis(250));
        assert_eq!(c.storage.eviction_policy, EvictionPolicy::AllKeysLfu);
    }

    #[test]
    fn garbage_and_unknown_options_are_clear_errors() {
        let e = Config::from_toml("[storage]\nmax-memroy = \"1GiB\"\n").unwrap_err();
        assert!(e.contains("max-memroy"), "{e}");
        let e = Config::from_toml("[storage]\neviction-policy = \"random\"\n").unwrap_err();
        assert!(e.contains("random"), "{e}");
        let e = Config::from_toml("this is not toml").unwrap_err();
        assert!(!e.is_empty());
        let e = Config::from_toml("[server]\ngrpc-addr = \"nowhere\"\n").unwrap_err();
        assert!(e.contains("grpc-addr") || e.contains("address"), "{e}");
    }

    #[test]
    fn validate_names_the_option() {
        let mut c = Config::default();
        c.storage.partitions = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("storage.partitions"), "{e}");
        let mut c = Config::default();
        c.storage.cdc_tombstone_ttl = Duration::from_micros(500);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("storage.cdc-tombstone-ttl"), "{e}");
        let mut c = Config::default();
        c.persistence.snapshot_writes = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("persistence.snapshot-writes"), "{e}");
    }

    #[test]
    fn persistence_parses() {
        let c = Config::from_toml(
            "[persistence]\nmode = \"durable\"\nsnapshot-interval = \"30s\"\nsnapshot-writes = 5000\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.persistence.mode, Persistence::Durable);
        assert_eq!(c.persistence.snapshot_interval, Duration::from_secs(30));
        assert_eq!(c.persistence.snapshot_writes, 5000);
        let e = Config::from_toml("[persistence]\nmode = \"fsync\"\n").unwrap_err();
        assert!(e.contains("fsync"), "{e}");
    }
}
