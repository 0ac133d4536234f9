//! Running parsed commands: locally when this node leads the key's partition,
//! otherwise forwarded to the leader through the client crate (`Client::resp_keyed`,
//! the one routing implementation), whose `Cache.Resp` handler runs it here again with
//! [`Frontend::run_forwarded`].
//!
//! Reads are lease reads on the leader (what the gRPC API calls `LEASE`, its default);
//! writes go through the partition's Raft group like every other write.

use super::codec::{Protocol, ProtocolError, Reply};
use super::command::{self, Cmd, CommandSub, KeyOp, SetReply};
use crate::cluster::ClusterNode;
use crate::error::NodeError;
use crate::hot::{self, HotKeys};
use crate::storage::{
    Command, Condition, Engine, Expiry, IncrError, Op, Outcome, PartitionId, RedisOutcome,
    RedisWrite, RequestId, StorageError, WriteRequest,
};
use bytes::Bytes;
use futures::future::join_all;
use raftcache_client::ring::Ring;
use raftcache_client::{Client, ClientConfig, ClientError, RespCall};
use raftcache_proto::v1::Consistency;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Settings of the RESP front end (`[resp]` in the node's config).
#[derive(Debug, Clone)]
pub struct RespSettings {
    /// Most connections at once; more are answered with an error and closed.
    pub max_clients: usize,
    /// Whether `FLUSHALL`/`FLUSHDB` are accepted.
    pub allow_flushall: bool,
    /// Most bytes buffered for one connection's unanswered requests.
    pub max_query_buffer: usize,
    /// The parser's bounds.
    pub limits: super::codec::Limits,
    /// The port the listener is bound to (for `INFO`); 0 without a listener.
    pub port: u16,
}

/// At most one warning per this many ms about refused oversized arguments.
const OVERSIZED_LOG_MS: u64 = 10_000;

/// `FLUSHALL`/`FLUSHDB` while `resp.allow-flushall` is false (the default).
pub const FLUSHALL_DISABLED: &str = "ERR FLUSHALL and FLUSHDB are disabled on this node: they empty the whole cluster. To enable them set `allow-flushall = true` under [resp] in every node's config file and restart (internal __raftcache: keys are kept)";

/// Counters shown by `INFO`.
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) connected: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) commands: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) net_in: AtomicU64,
    pub(crate) net_out: AtomicU64,
    next_id: AtomicU64,
    /// Oversized arguments refused (for the rate-limited warning).
    oversized: AtomicU64,
    /// When the last such warning was logged, in ms since the front end started.
    oversized_logged_ms: AtomicU64,
}

/// One client connection's state.
#[derive(Debug)]
pub struct Conn {
    /// `CLIENT ID`.
    pub id: u64,
    /// `CLIENT SETNAME`.
    pub name: Option<Bytes>,
    /// The reply protocol (`HELLO 3` switches to RESP3).
    pub protocol: Protocol,
    /// The peer's address.
    pub peer: String,
    /// The listener's address.
    pub local: String,
    /// When the connection was accepted.
    pub since: Instant,
    /// Set by `QUIT`: answer, then close.
    pub quit: bool,
}

/// Internal keys found per partition, by the (generation, seq, length) they were
/// found at.
type InternalCache = std::collections::HashMap<u32, ((u64, u64, u64), Vec<Bytes>)>;

/// The RESP front end of one node: shared by every connection and by the `Cache.Resp`
/// handler.
pub struct Frontend {
    node: Arc<ClusterNode>,
    hot: Arc<HotKeys>,
    settings: RespSettings,
    /// The ring of the cluster map (its shape never changes), once the node is a member.
    ring: OnceLock<Ring>,
    /// The forwarding client, connected to this node on first use.
    client: tokio::sync::OnceCell<Client>,
    /// `INFO` counters.
    pub counters: Counters,
    started: Instant,
    run_id: String,
    /// Internal keys per led partition, by the watch track (generation, seq) and
    /// length they were found at (see [`Frontend::internal_keys`]).
    internal: Mutex<InternalCache>,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A node-side error as the Redis reply a client sees.
pub fn error_reply(e: &NodeError) -> Reply {
    match e {
        NodeError::Storage(s) => storage_reply(s),
        NodeError::ShuttingDown => Reply::error("LOADING node is shutting down"),
        NodeError::Removed { .. } => Reply::error(format!("ERR {e}")),
        other => Reply::error(format!("TRYAGAIN {other}")),
    }
}

fn storage_reply(e: &StorageError) -> Reply {
    match e {
        StorageError::NotAnInteger => Reply::error("ERR value is not an integer or out of range"),
        StorageError::IncrOverflow => Reply::error("ERR increment or decrement would overflow"),
        StorageError::OutOfMemory { .. } => {
            Reply::error("OOM command not allowed when used memory > 'maxmemory'.")
        }
        StorageError::TtlOutOfRange { .. } => Reply::error("ERR invalid expire time"),
        StorageError::KeyTooLarge { size, limit } => too_large("key", *size as u64, *limit),
        StorageError::ValueTooLarge { size, limit } => too_large("value", *size as u64, *limit),
        other => Reply::error(format!("ERR {other}")),
    }
}

/// The error of a key or value over its limit, naming the option that sets it, e.g.
/// `ERR value of 20971520 bytes is over the 16777216-byte limit (storage.max-value-size)`.
fn too_large(what: &str, size: u64, limit: usize) -> Reply {
    let option = if what == "key" {
        "storage.max-key-size"
    } else {
        "storage.max-value-size"
    };
    crate::metrics::record_resp_too_large(if what == "key" {
        "max-key-size"
    } else {
        "max-value-size"
    });
    Reply::error(format!(
        "ERR {what} of {size} bytes is over the {limit}-byte limit ({option})"
    ))
}

/// The `result` label of a reply in `raftcache_ops_total`: `ok`, or the Redis error
/// prefix (`ERR`, `OOM`, `TRYAGAIN`, ...; `ERR` for any other) of an error reply, a
/// forwarded one included.
pub fn result_label(reply: &Reply) -> &'static str {
    let text: &[u8] = match reply {
        Reply::Error(text) => text.as_bytes(),
        Reply::Raw(raw) if raw.first() == Some(&b'-') => &raw[1..],
        _ => return "ok",
    };
    let word = text.split(|&b| b == b' ').next().unwrap_or_default();
    [
        "ERR",
        "OOM",
        "TRYAGAIN",
        "LOADING",
        "WRONGTYPE",
        "NOPROTO",
        "WRONGPASS",
    ]
    .into_iter()
    .find(|p| p.as_bytes() == word)
    .unwrap_or("ERR")
}

/// Counts a command served over RESP (`raftcache_ops_total`, latency histogram).
pub fn record_command(name: &[u8], reply: &Reply, started: Instant) {
    crate::metrics::record_resp_op(
        command::op_label(name),
        result_label(reply),
        Some(started.elapsed()),
    );
}

/// The refusal of a RESP command on an internal key.
fn reserved_key() -> Reply {
    Reply::error(format!(
        "ERR keys starting with '{}' are reserved for raftcache itself (CDC lease and slot markers) and cannot be read or written over RESP; use the gRPC API",
        String::from_utf8_lossy(hot::INTERNAL_PREFIX)
    ))
}

/// Whether argument `arg` of command `name` is a key (for the error of an oversized
/// argument): every argument of `MGET`/`DEL`/`UNLINK`/`EXISTS`, the odd ones of `MSET`,
/// otherwise the first.
fn is_key_arg(name: &[u8], arg: usize) -> bool {
    let any = |n: &[u8]| name.eq_ignore_ascii_case(n);
    if any(b"mget") || any(b"del") || any(b"unlink") || any(b"exists") {
        arg >= 1
    } else if any(b"mset") || any(b"msetnx") {
        arg % 2 == 1
    } else {
        arg == 1
    }
}

/// Whether `cmd` reads or writes keys (refused by a removed node; connection and
/// server commands such as `PING`, `HELLO`, `INFO` still answer).
fn touches_data(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Key { .. }
            | Cmd::MGet(_)
            | Cmd::MSet(_)
            | Cmd::Del(_)
            | Cmd::Exists(_)
            | Cmd::DbSize
            | Cmd::Keyspace
            | Cmd::FlushAll
    )
}

fn client_error_reply(e: &ClientError) -> Reply {
    Reply::error(format!("TRYAGAIN forwarding failed: {e}"))
}

fn bulk_or_nil(v: Option<Bytes>) -> Reply {
    v.map_or(Reply::Nil, Reply::Bulk)
}

/// `RAFTCACHE.KEYSPACE`'s reply.
fn keyspace_reply((keys, expires): (u64, u64)) -> Reply {
    Reply::Array(vec![Reply::Int(keys as i64), Reply::Int(expires as i64)])
}

/// Reads a RESP2-encoded `RAFTCACHE.KEYSPACE` reply: `*2\r\n:k\r\n:e\r\n`.
fn parse_keyspace(raw: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(raw).ok()?;
    let ints = text.strip_prefix("*2\r\n:")?.strip_suffix("\r\n")?;
    let (keys, expires) = ints.split_once("\r\n:")?;
    Some((keys.parse().ok()?, expires.parse().ok()?))
}

/// The sum of the `:n` replies of a multi-key `DEL` or `EXISTS` run key by key; the
/// first other reply (an error) instead.
fn sum_counts(replies: Vec<Reply>) -> Reply {
    let mut total = 0;
    for r in replies {
        match r {
            Reply::Int(n) => total += n,
            Reply::Raw(raw) => match raw_int(&raw) {
                Some(n) => total += n,
                None => return Reply::Raw(raw),
            },
            other => return other,
        }
    }
    Reply::Int(total)
}

/// The integer of an encoded `:n` reply (a forwarded `DEL`/`EXISTS`).
fn raw_int(raw: &[u8]) -> Option<i64> {
    let body = raw.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    command::parse_int(body)
}

impl Frontend {
    /// The front end of `node`, counting keyed commands in `hot`.
    pub fn new(node: Arc<ClusterNode>, hot: Arc<HotKeys>, settings: RespSettings) -> Self {
        let run_id = format!(
            "{:016x}{:016x}{:08x}",
            rand::random::<u64>(),
            rand::random::<u64>(),
            rand::random::<u32>()
        );
        Frontend {
            node,
            hot,
            settings,
            ring: OnceLock::new(),
            client: tokio::sync::OnceCell::new(),
            counters: Counters::default(),
            started: Instant::now(),
            run_id,
            internal: Mutex::default(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &RespSettings {
        &self.settings
    }

    /// The reply to a command skipped for an argument over the parser's bulk limit
    /// ([`ProtocolError::BulkTooLarge`]), naming the storage limit it is over; counts
    /// it and logs it (at most once per [`OVERSIZED_LOG_MS`], with the count since).
    pub fn oversized(&self, e: &ProtocolError) -> Reply {
        let ProtocolError::BulkTooLarge {
            len,
            arg,
            limit,
            command,
            ..
        } = e
        else {
            return e.reply();
        };
        let name = command.as_deref().unwrap_or_default();
        let key = is_key_arg(name, *arg);
        let engine = self.node.engine().map(|e| e.config());
        // The parser's bound is the larger limit plus slack; without an engine (not a
        // member yet) that bound is all there is to name.
        let reply = match engine {
            Some(c) if key => too_large("key", *len, c.max_key_bytes),
            Some(c) => too_large("value", *len, c.max_value_bytes),
            None => Reply::error(format!(
                "ERR argument of {len} bytes is over the {limit}-byte limit (storage.max-value-size)"
            )),
        };
        if !name.is_empty() {
            crate::metrics::record_resp_op(command::op_label(name), "ERR", None);
        }
        let c = &self.counters;
        let suppressed = c.oversized.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = c.oversized_logged_ms.load(Ordering::Relaxed);
        let due = suppressed == 0 || now.saturating_sub(last) >= OVERSIZED_LOG_MS;
        if due
            && c.oversized_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let text = match &reply {
                Reply::Error(t) => t.to_string(),
                _ => String::new(),
            };
            tracing::warn!(
                command = %String::from_utf8_lossy(name),
                refused_total = suppressed + 1,
                "RESP: refused a command with an oversized argument (read and dropped, the connection goes on): {text}"
            );
        }
        reply
    }

    /// A key or value over the engine's limits, refused before it is routed (the
    /// leader would refuse it with the same text); `None` when within them.
    fn check_sizes(&self, key: &Bytes, op: &KeyOp) -> Option<Reply> {
        let config = self.node.engine()?.config();
        if key.len() > config.max_key_bytes {
            return Some(too_large("key", key.len() as u64, config.max_key_bytes));
        }
        let value = match op {
            KeyOp::Set { value, .. } => value,
            KeyOp::Append(suffix) => suffix,
            _ => return None,
        };
        (value.len() > config.max_value_bytes)
            .then(|| too_large("value", value.len() as u64, config.max_value_bytes))
    }

    /// A new connection's state.
    pub fn connect(&self, peer: String, local: String) -> Conn {
        Conn {
            id: self.counters.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            name: None,
            protocol: Protocol::Resp2,
            peer,
            local,
            since: Instant::now(),
            quit: false,
        }
    }

    /// The partition of `key`, once the node knows the cluster's shape.
    fn partition_of(&self, key: &[u8]) -> Result<u32, NodeError> {
        if let Some(ring) = self.ring.get() {
            return Ok(ring.partition_of(key));
        }
        let map = self.node.cluster_map();
        if map.partition_count == 0 {
            return Err(NodeError::Unavailable(
                "this node is not part of a cluster yet".into(),
            ));
        }
        let ring = self
            .ring
            .get_or_init(|| Ring::new(map.partition_count, map.vnodes));
        Ok(ring.partition_of(key))
    }

    async fn client(&self) -> Result<&Client, ClientError> {
        self.client
            .get_or_try_init(|| async {
                let mut config = ClientConfig::new([self.node.advertise().to_owned()]);
                // Forward only within this node's cluster: a restarted cluster on the
                // peers' addresses must never receive (or answer) this node's commands.
                config.cluster_id = self.node.cluster_id();
                config.max_message_bytes = config
                    .max_message_bytes
                    .max(self.settings.max_query_buffer + 1024 * 1024);
                // The node's own limits (checked before forwarding), not the defaults.
                if let Some(engine) = self.node.engine() {
                    config.max_key_bytes = engine.config().max_key_bytes;
                    config.max_value_bytes = engine.config().max_value_bytes;
                }
                Client::connect(config).await
            })
            .await
    }

    /// Runs one command of a connection. `args` are the command as sent (forwarded
    /// as they are when the key is led elsewhere).
    pub async fn run(&self, conn: &mut Conn, cmd: Cmd, args: &[Bytes]) -> Reply {
        let protocol = conn.protocol;
        if touches_data(&cmd) {
            if let Err(e) = self.node.serving() {
                return error_reply(&e);
            }
        }
        match cmd {
            Cmd::Key { key, op } => self.run_key(&key, &op, args, protocol).await,
            other => self.run_other(conn, other).await,
        }
    }

    /// A single-key command, by the key's leader; `GET`s count as keyspace hits or
    /// misses of this node (`INFO stats`), wherever the key lives.
    pub async fn run_key(
        &self,
        key: &Bytes,
        op: &KeyOp,
        args: &[Bytes],
        protocol: Protocol,
    ) -> Reply {
        if let Err(e) = self.node.serving() {
            return error_reply(&e);
        }
        if hot::is_internal(key) {
            return reserved_key();
        }
        if let Some(reply) = self.check_sizes(key, op) {
            return reply;
        }
        let reply = self.route_key(key, op, args, protocol).await;
        if matches!(op, KeyOp::Get | KeyOp::GetEx(_) | KeyOp::GetDel) {
            let miss = match &reply {
                Reply::Nil => Some(true),
                Reply::Bulk(_) => Some(false),
                Reply::Raw(raw) => Some(raw.starts_with(b"$-1") || raw.starts_with(b"_")),
                _ => None,
            };
            match miss {
                Some(true) => self.counters.misses.fetch_add(1, Ordering::Relaxed),
                Some(false) => self.counters.hits.fetch_add(1, Ordering::Relaxed),
                None => 0,
            };
        }
        reply
    }

    async fn route_key(
        &self,
        key: &Bytes,
        op: &KeyOp,
        args: &[Bytes],
        protocol: Protocol,
    ) -> Reply {
        let p = match self.partition_of(key) {
            Ok(p) => p,
            Err(e) => return error_reply(&e),
        };
        // The local run checks leadership itself (the read or write it makes would);
        // when this node does not lead, the client finds the leader.
        match self.run_local(PartitionId(p), key, op, None).await {
            Ok(reply) => return reply,
            Err(NodeError::NotLeader { .. }) => {}
            Err(e) => return error_reply(&e),
        }
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => return client_error_reply(&e),
        };
        let kind = if !op.is_write() {
            RespCall::Read
        } else if op.exactly_once() {
            RespCall::WriteOnce
        } else {
            RespCall::Write
        };
        match client
            .resp_keyed(key, args, protocol_number(protocol), kind)
            .await
        {
            Ok(raw) => Reply::Raw(raw),
            Err(e) => client_error_reply(&e),
        }
    }

    /// Runs a command forwarded by another node (`Cache.Resp`): a single-key command
    /// for `route` (this node must lead it), or a node-wide one (`route` `None`).
    ///
    /// # Errors
    /// `NotLeader` and the other routing errors; `InvalidArgument` for a command that
    /// cannot be forwarded. Redis errors are replies.
    pub async fn run_forwarded(
        &self,
        route: Option<u32>,
        args: &[Bytes],
        request: Option<RequestId>,
    ) -> Result<Reply, NodeError> {
        let cmd = match command::parse(args) {
            Ok(cmd) => cmd,
            Err(reply) => return Ok(reply),
        };
        match (route, cmd) {
            (Some(p), Cmd::Key { key, op }) => {
                let expected = self.partition_of(&key)?;
                if expected != p {
                    return Err(NodeError::InvalidArgument(format!(
                        "key belongs to partition {expected}, not {p}"
                    )));
                }
                self.run_local(PartitionId(p), &key, &op, request).await
            }
            (None, Cmd::Keyspace) => Ok(keyspace_reply(self.local_keyspace())),
            (None, Cmd::FlushAll) if self.settings.allow_flushall => {
                self.local_flush().await;
                Ok(Reply::Ok)
            }
            (None, Cmd::FlushAll) => Ok(Reply::error(FLUSHALL_DISABLED)),
            _ => Err(NodeError::InvalidArgument(
                "only single-key commands (with a route) and RAFTCACHE.KEYSPACE/FLUSHALL (without) are forwarded"
                    .into(),
            )),
        }
    }

    /// A single-key command on the local leader of `p` (`NotLeader` when this node
    /// does not lead it): the one place a RESP command is counted for the hot-key
    /// tracker, on the node that runs it, not on the one that forwards it.
    async fn run_local(
        &self,
        p: PartitionId,
        key: &Bytes,
        op: &KeyOp,
        request: Option<RequestId>,
    ) -> Result<Reply, NodeError> {
        let reply = self.execute(p, key, op, request).await;
        if reply.is_ok() {
            self.hot.record(p.0, key);
        }
        reply
    }

    /// [`run_local`](Self::run_local) without the count.
    async fn execute(
        &self,
        p: PartitionId,
        key: &Bytes,
        op: &KeyOp,
        request: Option<RequestId>,
    ) -> Result<Reply, NodeError> {
        let node = &self.node;
        let read = || async { node.read(p, key, Consistency::Lease, Duration::ZERO).await };
        let write = |req: WriteRequest| async move {
            match node.write_once(p, req, request).await {
                Err(NodeError::Storage(e)) => Ok(Err(storage_reply(&e))),
                Err(e) => Err(e),
                Ok(outcome) => Ok(Ok(outcome)),
            }
        };
        let redis = |op: RedisWrite| WriteRequest::Redis {
            key: key.clone(),
            op,
        };
        let outcome = match op {
            KeyOp::Get | KeyOp::GetEx(None) => {
                return Ok(bulk_or_nil(read().await?.map(|v| v.value)));
            }
            KeyOp::Strlen => {
                return Ok(Reply::Int(
                    read().await?.map_or(0, |v| v.value.len() as i64),
                ));
            }
            KeyOp::Exists => return Ok(Reply::Int(i64::from(read().await?.is_some()))),
            KeyOp::Type => {
                let t = if read().await?.is_some() {
                    "string"
                } else {
                    "none"
                };
                return Ok(Reply::Simple(Cow::Borrowed(t)));
            }
            KeyOp::Ttl { ms } => {
                let view = read().await?;
                return Ok(Reply::Int(match view {
                    None => -2,
                    Some(v) => match v.ttl_remaining_ms {
                        None => -1,
                        Some(left) if *ms => left as i64,
                        // Redis rounds to the nearest second.
                        Some(left) => left.saturating_add(500) as i64 / 1000,
                    },
                }));
            }
            KeyOp::Set {
                value,
                expiry,
                keep_ttl,
                condition,
                reply,
            } => {
                let plain = *reply != SetReply::Old
                    && match expiry {
                        Expiry::Never => true,
                        Expiry::In(ms) => *ms <= crate::storage::MAX_TTL_MS,
                        Expiry::At(_) => false,
                    };
                let req = if plain {
                    WriteRequest::Set {
                        key: key.clone(),
                        value: value.clone(),
                        ttl_ms: match expiry {
                            Expiry::In(ms) => Some((*ms).max(1)),
                            _ => None,
                        },
                        keep_ttl: *keep_ttl,
                        condition: *condition,
                        source_lsn: 0,
                        source_snapshot: None,
                    }
                } else {
                    redis(RedisWrite::Set {
                        value: value.clone(),
                        expiry: *expiry,
                        keep_ttl: *keep_ttl,
                        condition: *condition,
                    })
                };
                let outcome = match write(req).await? {
                    Ok(o) => o,
                    Err(reply) => return Ok(reply),
                };
                let (applied, old) = match outcome {
                    Outcome::Set { applied, .. } => (applied, None),
                    Outcome::Redis(RedisOutcome::Set { applied, old, .. }) => (applied, old),
                    other => return Ok(unexpected(&other)),
                };
                return Ok(match reply {
                    SetReply::Ok if applied => Reply::Ok,
                    SetReply::Ok => Reply::Nil,
                    SetReply::Int => Reply::Int(i64::from(applied)),
                    SetReply::Old => bulk_or_nil(old),
                });
            }
            KeyOp::GetDel => write(redis(RedisWrite::GetDel)).await?,
            KeyOp::GetEx(Some(expiry)) => {
                write(redis(RedisWrite::GetEx { expiry: *expiry })).await?
            }
            KeyOp::Incr(delta) => {
                write(WriteRequest::Incr {
                    key: key.clone(),
                    delta: *delta,
                })
                .await?
            }
            KeyOp::Append(suffix) => {
                write(redis(RedisWrite::Append {
                    suffix: suffix.clone(),
                }))
                .await?
            }
            KeyOp::Expire { expiry, condition } => {
                write(redis(RedisWrite::Expire {
                    expiry: *expiry,
                    condition: *condition,
                }))
                .await?
            }
            KeyOp::Persist => {
                write(redis(RedisWrite::Expire {
                    expiry: Expiry::Never,
                    condition: None,
                }))
                .await?
            }
            KeyOp::Del => write(WriteRequest::Delete { key: key.clone() }).await?,
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(reply) => return Ok(reply),
        };
        Ok(match outcome {
            Outcome::Redis(RedisOutcome::Value(v)) => bulk_or_nil(v),
            Outcome::Redis(RedisOutcome::Append(Some(len))) => Reply::Int(len as i64),
            Outcome::Redis(RedisOutcome::Append(None)) => Reply::error(format!(
                "ERR string exceeds maximum allowed size ({} bytes)",
                self.node.engine().map_or(0, |e| e.config().max_value_bytes)
            )),
            Outcome::Incr(Ok((n, _))) => Reply::Int(n),
            Outcome::Incr(Err(IncrError::NotAnInteger)) => {
                storage_reply(&StorageError::NotAnInteger)
            }
            Outcome::Incr(Err(IncrError::Overflow)) => storage_reply(&StorageError::IncrOverflow),
            Outcome::Expire(updated) => Reply::Int(i64::from(updated)),
            Outcome::Deleted(deleted) => Reply::Int(i64::from(deleted)),
            other => unexpected(&other),
        })
    }

    /// Commands that are not single-key.
    async fn run_other(&self, conn: &mut Conn, cmd: Cmd) -> Reply {
        let protocol = conn.protocol;
        match cmd {
            Cmd::Ping(None) => Reply::Simple(Cow::Borrowed("PONG")),
            Cmd::Ping(Some(m)) | Cmd::Echo(m) => Reply::Bulk(m),
            Cmd::Hello {
                protover,
                setname,
                auth,
            } => {
                if auth {
                    return Reply::error(
                        "WRONGPASS invalid username-password pair or user is disabled.",
                    );
                }
                match protover {
                    None => {}
                    Some(2) => conn.protocol = Protocol::Resp2,
                    Some(3) => conn.protocol = Protocol::Resp3,
                    Some(_) => return Reply::error("NOPROTO unsupported protocol version"),
                }
                if let Some(name) = setname {
                    conn.name = Some(name);
                }
                self.hello(conn)
            }
            Cmd::Auth => Reply::error(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            ),
            Cmd::Select(0) => Reply::Ok,
            Cmd::Select(_) => Reply::error("ERR DB index is out of range"),
            Cmd::Quit => {
                conn.quit = true;
                Reply::Ok
            }
            Cmd::Reset => {
                conn.name = None;
                conn.protocol = Protocol::Resp2;
                Reply::Simple(Cow::Borrowed("RESET"))
            }
            Cmd::ClientSetName(name) => {
                conn.name = (!name.is_empty()).then_some(name);
                Reply::Ok
            }
            Cmd::ClientGetName => bulk_or_nil(conn.name.clone()),
            Cmd::ClientId => Reply::Int(conn.id as i64),
            Cmd::ClientSetInfo => Reply::Ok,
            Cmd::ClientInfo => Reply::Verbatim(Bytes::from(format!(
                "id={} addr={} laddr={} fd=0 name={} age={} idle=0 flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd=client|info user=default redir=-1 resp={}\n",
                conn.id,
                conn.peer,
                conn.local,
                conn.name.as_ref().map_or(Cow::Borrowed(""), |n| String::from_utf8_lossy(n)),
                conn.since.elapsed().as_secs(),
                protocol_number(protocol),
            ))),
            Cmd::Command(sub) => command_reply(sub),
            Cmd::Info(sections) => self.info(&sections).await,
            Cmd::DbSize => match self.keyspace().await {
                Ok((keys, _)) => Reply::Int(keys as i64),
                Err(reply) => reply,
            },
            Cmd::Keyspace => keyspace_reply(self.local_keyspace()),
            Cmd::FlushAll => {
                if !self.settings.allow_flushall {
                    return Reply::error(FLUSHALL_DISABLED);
                }
                self.flushall().await
            }
            Cmd::Time => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                Reply::Array(vec![
                    Reply::Bulk(Bytes::from(now.as_secs().to_string())),
                    Reply::Bulk(Bytes::from(now.subsec_micros().to_string())),
                ])
            }
            Cmd::MGet(keys) => {
                let replies = join_all(keys.iter().map(|k| {
                    let args = [Bytes::from_static(b"GET"), k.clone()];
                    async move { self.run_key(k, &KeyOp::Get, &args, protocol).await }
                }))
                .await;
                // A key that cannot be read is nil in MGET, as a missing key.
                Reply::Array(
                    replies
                        .into_iter()
                        .map(|r| match r {
                            Reply::Error(_) => Reply::Nil,
                            other => other,
                        })
                        .collect(),
                )
            }
            Cmd::MSet(pairs) => {
                // The last value of a key given twice wins, as in Redis.
                let mut last: Vec<(Bytes, Bytes)> = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    match last.iter_mut().find(|(lk, _)| *lk == k) {
                        Some(slot) => slot.1 = v,
                        None => last.push((k, v)),
                    }
                }
                let replies = join_all(last.iter().map(|(k, v)| {
                    let op = KeyOp::Set {
                        value: v.clone(),
                        expiry: Expiry::Never,
                        keep_ttl: false,
                        condition: Condition::Always,
                        reply: SetReply::Ok,
                    };
                    let args = [Bytes::from_static(b"SET"), k.clone(), v.clone()];
                    async move { self.run_key(k, &op, &args, protocol).await }
                }))
                .await;
                replies
                    .into_iter()
                    .find(|r| matches!(r, Reply::Error(_)))
                    .unwrap_or(Reply::Ok)
            }
            Cmd::Del(keys) => {
                // One key after the other: a key given twice counts once.
                let mut replies = Vec::with_capacity(keys.len());
                for k in &keys {
                    let args = [Bytes::from_static(b"DEL"), k.clone()];
                    replies.push(self.run_key(k, &KeyOp::Del, &args, protocol).await);
                }
                sum_counts(replies)
            }
            Cmd::Exists(keys) => {
                let replies = join_all(keys.iter().map(|k| async move {
                    let args = [Bytes::from_static(b"EXISTS"), k.clone()];
                    self.run_key(k, &KeyOp::Exists, &args, protocol).await
                }))
                .await;
                sum_counts(replies)
            }
            Cmd::ConfigGet(patterns) => self.config_get(&patterns),
            Cmd::ConfigOther => Reply::error(
                "ERR CONFIG is read-only here: only CONFIG GET is supported (settings come from the node's config file and flags)",
            ),
            Cmd::Key { .. } => Reply::error("ERR internal: keyed command in run_other"),
        }
    }

    /// `CONFIG GET`: the Redis parameters that have a meaning here, matched by exact
    /// name or `*` (glob patterns beyond that are not supported).
    fn config_get(&self, patterns: &[String]) -> Reply {
        let (maxmemory, policy) = self.node.engine().map_or((0, String::new()), |e| {
            let s = e.stats();
            (s.memory_limit, s.policy.to_string())
        });
        let params: [(&str, String); 6] = [
            ("maxmemory", maxmemory.to_string()),
            ("maxmemory-policy", policy),
            ("maxclients", self.settings.max_clients.to_string()),
            ("databases", "1".into()),
            ("save", String::new()),
            ("appendonly", "no".into()),
        ];
        Reply::Map(
            params
                .into_iter()
                .filter(|(name, _)| patterns.iter().any(|p| p == "*" || p == name))
                .map(|(name, value)| {
                    (
                        Reply::Bulk(Bytes::from_static(name.as_bytes())),
                        Reply::Bulk(Bytes::from(value)),
                    )
                })
                .collect(),
        )
    }

    /// `HELLO`'s map.
    fn hello(&self, conn: &Conn) -> Reply {
        let s = |v: &'static str| Reply::Bulk(Bytes::from_static(v.as_bytes()));
        Reply::Map(vec![
            (s("server"), s("redis")),
            (s("version"), s(REDIS_VERSION)),
            (
                s("proto"),
                Reply::Int(protocol_number(conn.protocol).into()),
            ),
            (s("id"), Reply::Int(conn.id as i64)),
            (s("mode"), s("standalone")),
            (s("role"), s("master")),
            (s("modules"), Reply::Array(Vec::new())),
        ])
    }

    /// Keys, and keys with a deadline, in the partitions this node leads (expired keys
    /// not yet reclaimed count, as in Redis); internal keys (`__raftcache:`) do not.
    fn local_keyspace(&self) -> (u64, u64) {
        let Some(engine) = self.node.engine() else {
            return (0, 0);
        };
        (0..engine.partition_count())
            .filter(|&p| self.node.leads(p))
            .map(|p| {
                let (ik, ie) = self.internal_counts(engine, p);
                (
                    engine
                        .partition_len(PartitionId(p))
                        .unwrap_or(0)
                        .saturating_sub(ik),
                    engine
                        .partition_expires(PartitionId(p))
                        .unwrap_or(0)
                        .saturating_sub(ie),
                )
            })
            .fold((0, 0), |(k, e), (pk, pe)| (k + pk, e + pe))
    }

    /// The internal keys held in partition `p`, and how many of them have a deadline.
    fn internal_counts(&self, engine: &Engine, p: u32) -> (u64, u64) {
        let keys = self.internal_keys(engine, p);
        // Every key found is held (the scan is as fresh as the partition); one that
        // reads as absent has expired and awaits reclaim, so it has a deadline.
        let expires = keys
            .iter()
            .filter(|k| {
                engine
                    .peek(PartitionId(p), k)
                    .ok()
                    .flatten()
                    .is_none_or(|v| v.ttl_remaining_ms.is_some())
            })
            .count();
        (keys.len() as u64, expires as u64)
    }

    /// The internal keys of partition `p`. The engine keeps no index by prefix, so
    /// they are found by a scan of the partition's keys; the result is kept until the
    /// partition changes (its watch track: every applied write that changes a key moves
    /// its `seq`, a snapshot install or restart its generation; a reclaim its length),
    /// so an idle keyspace costs nothing and a busy one one scan per `DBSIZE`/`INFO
    /// keyspace`.
    fn internal_keys(&self, engine: &Engine, p: u32) -> Vec<Bytes> {
        let (generation, seq) = self
            .node
            .watch()
            .tracks(&[p])
            .first()
            .map_or((0, 0), |(_, t)| (t.generation, t.seq));
        let track = (
            generation,
            seq,
            engine.partition_len(PartitionId(p)).unwrap_or(0),
        );
        let mut cache = self.internal.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, keys)) = cache.get(&p) {
            if *at == track {
                return keys.clone();
            }
        }
        let keys: Vec<Bytes> = engine
            .partition_keys(PartitionId(p), usize::MAX)
            .into_iter()
            .filter(|k| hot::is_internal(k))
            .collect();
        cache.insert(p, (track, keys.clone()));
        keys
    }

    /// [`local_keyspace`](Self::local_keyspace) summed over every node (`DBSIZE`,
    /// `INFO keyspace`).
    async fn keyspace(&self) -> Result<(u64, u64), Reply> {
        let (mut keys, mut expires) = self.local_keyspace();
        let client = self.client().await.map_err(|e| client_error_reply(&e))?;
        let args = [Bytes::from_static(b"RAFTCACHE.KEYSPACE")];
        for (addr, r) in client.resp_nodes(&args, 2, self.node.advertise()).await {
            let raw = r.map_err(|e| Reply::error(format!("TRYAGAIN node {addr}: {e}")))?;
            let (k, e) = parse_keyspace(&raw)
                .ok_or_else(|| Reply::error(format!("ERR bad keyspace answer from {addr}")))?;
            keys += k;
            expires += e;
        }
        Ok((keys, expires))
    }

    /// Empties the partitions this node leads of user keys, one `Flush` op per partition
    /// (atomic: a partition's writes are before or after it), keeping internal keys
    /// (`__raftcache:`).
    async fn local_flush(&self) {
        let Some(engine) = self.node.engine() else {
            return;
        };
        for p in (0..engine.partition_count()).filter(|&p| self.node.leads(p)) {
            if let Err(e) = self.flush_partition(engine, p).await {
                tracing::warn!(partition = p, error = %e, "FLUSHALL: partition not emptied");
            }
        }
    }

    /// One partition of [`local_flush`](Self::local_flush); the keys removed.
    async fn flush_partition(&self, engine: &Engine, p: u32) -> Result<u64, String> {
        let Some(group) = self.node.group(p).filter(|g| g.is_leader()) else {
            return Err("this node no longer leads the partition".into());
        };
        let op = Op {
            now_ms: engine.now_ms(),
            cmd: Command::Flush {
                keep: Bytes::from_static(hot::INTERNAL_PREFIX),
            },
        };
        match group.write(crate::raft::Proposal::from(op)).await {
            Ok(Some(Outcome::Evicted(n))) => Ok(n as u64),
            Ok(_) => Ok(0),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    /// `FLUSHALL` over the cluster.
    async fn flushall(&self) -> Reply {
        self.local_flush().await;
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => return client_error_reply(&e),
        };
        let args = [Bytes::from_static(b"FLUSHALL")];
        for (addr, r) in client.resp_nodes(&args, 2, self.node.advertise()).await {
            match r {
                Err(e) => return Reply::error(format!("TRYAGAIN node {addr}: {e}")),
                // That node refused (its allow-flushall is off): say which.
                Ok(raw) if raw.starts_with(b"-") => {
                    let text = String::from_utf8_lossy(&raw[1..]);
                    return Reply::error(format!(
                        "ERR node {addr}: {}",
                        text.trim_end().trim_start_matches("ERR ")
                    ));
                }
                Ok(_) => {}
            }
        }
        Reply::Ok
    }

    /// `INFO [section ...]` in Redis's format.
    async fn info(&self, sections: &[String]) -> Reply {
        let all = sections.is_empty()
            || sections
                .iter()
                .any(|s| s == "all" || s == "everything" || s == "default");
        let want = |name: &str| all || sections.iter().any(|s| s == name);
        let mut out = String::with_capacity(2048);
        let stats = self.node.engine().map(|e| e.stats());
        let c = &self.counters;
        let uptime = self.started.elapsed().as_secs();
        if want("server") {
            out.push_str(&format!(
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nraftcache_version:{}\r\nredis_mode:standalone\r\nos:{} {}\r\narch_bits:64\r\nprocess_id:{}\r\nrun_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\nraftcache_node_id:{}\r\nraftcache_grpc_addr:{}\r\n\r\n",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::OS,
                std::env::consts::ARCH,
                std::process::id(),
                self.run_id,
                self.settings.port,
                uptime / 86_400,
                self.node.node_id(),
                self.node.advertise(),
            ));
        }
        if want("clients") {
            out.push_str(&format!(
                "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\nblocked_clients:0\r\n\r\n",
                c.connected.load(Ordering::Relaxed),
                self.settings.max_clients,
            ));
        }
        if want("memory") {
            let (data, limit, policy) = stats.as_ref().map_or((0, 0, String::new()), |s| {
                (s.memory_used, s.memory_limit, s.policy.to_string())
            });
            // Redis's used_memory is what the process allocated; here the resident set
            // (the cache's own accounting of keys and values is raftcache_data_memory,
            // the figure maxmemory limits).
            let rss = resident_bytes().unwrap_or(data);
            out.push_str(&format!(
                "# Memory\r\nused_memory:{rss}\r\nused_memory_human:{}\r\nused_memory_rss:{rss}\r\nraftcache_data_memory:{data}\r\nmaxmemory:{limit}\r\nmaxmemory_human:{}\r\nmaxmemory_policy:{policy}\r\n\r\n",
                human(rss),
                human(limit),
            ));
        }
        if want("stats") {
            let (evictions, expirations) = stats
                .as_ref()
                .map_or((0, 0), |s| (s.evictions, s.expirations));
            let hits = c.hits.load(Ordering::Relaxed);
            let misses = c.misses.load(Ordering::Relaxed);
            out.push_str(&format!(
                "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\ntotal_net_input_bytes:{}\r\ntotal_net_output_bytes:{}\r\nexpired_keys:{expirations}\r\nevicted_keys:{evictions}\r\nkeyspace_hits:{hits}\r\nkeyspace_misses:{misses}\r\nraftcache_forwarded_commands:{}\r\n\r\n",
                c.connections.load(Ordering::Relaxed),
                c.commands.load(Ordering::Relaxed),
                c.rejected.load(Ordering::Relaxed),
                c.net_in.load(Ordering::Relaxed),
                c.net_out.load(Ordering::Relaxed),
                c.forwarded.load(Ordering::Relaxed),
            ));
        }
        if want("replication") {
            let led = self.node.engine().map_or(0, |e| {
                (0..e.partition_count())
                    .filter(|&p| self.node.leads(p))
                    .count()
            });
            out.push_str(&format!(
                "# Replication\r\nrole:master\r\nconnected_slaves:0\r\nraftcache_partitions_led:{led}\r\nraftcache_partitions_hosted:{}\r\n\r\n",
                self.node.partitions_hosted(),
            ));
        }
        if want("keyspace") {
            out.push_str("# Keyspace\r\n");
            if let Ok((keys, expires)) = self.keyspace().await {
                if keys > 0 {
                    out.push_str(&format!("db0:keys={keys},expires={expires},avg_ttl=0\r\n"));
                }
            }
            out.push_str("\r\n");
        }
        while out.ends_with("\r\n\r\n") {
            out.truncate(out.len() - 2);
        }
        Reply::Verbatim(Bytes::from(out))
    }
}

/// The Redis version this front end answers as (the command set it follows).
pub const REDIS_VERSION: &str = "7.0.0";

/// This process's resident set size (Linux `/proc/self/statm`).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).to_string().replace(' ', "")
}

/// The protocol number of `HELLO` and `Cache.Resp`.
pub fn protocol_number(p: Protocol) -> u32 {
    match p {
        Protocol::Resp2 => 2,
        Protocol::Resp3 => 3,
    }
}

/// An outcome that does not belong to the op sent (a bug).
fn unexpected(outcome: &Outcome) -> Reply {
    tracing::error!(?outcome, "RESP: unexpected outcome");
    Reply::error("ERR internal error: unexpected outcome")
}

/// `COMMAND`'s replies.
fn command_reply(sub: CommandSub) -> Reply {
    match sub {
        CommandSub::Count => Reply::Int(command::COMMANDS.len() as i64),
        // No documentation: redis-cli then falls back to its built-in hints.
        CommandSub::Docs => Reply::Map(Vec::new()),
        CommandSub::List => Reply::Array(
            command::COMMANDS
                .iter()
                .map(|(n, ..)| Reply::Bulk(Bytes::from_static(n.as_bytes())))
                .collect(),
        ),
        CommandSub::Info(names) if names.is_empty() => Reply::Array(
            command::COMMANDS
                .iter()
                .map(|(n, ..)| command::command_info(n))
                .collect(),
        ),
        CommandSub::Info(names) => {
            Reply::Array(names.iter().map(|n| command::command_info(n)).collect())
        }
    }
}
