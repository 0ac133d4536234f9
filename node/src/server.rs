//! Running a node: bind listeners, serve gRPC and metrics, reclaim expired keys in
//! the background, shut down in order.
//!
//! Shutdown order, bounded by `server.shutdown-timeout`: stop accepting gRPC
//! connections and let in-flight requests finish, stop the Raft groups, write the
//! shutdown checkpoint (with persistence: every group's snapshot, vote and log tail,
//! then the clean mark), then stop the background tasks (reclaim, metrics).

use crate::cluster::{ClusterNode, NodeSettings, PersistSettings, Restart};
use crate::config::Config;
use crate::metrics;
use crate::persist::{Persistence, Store};
use crate::resp;
use crate::service::{CacheService, RaftService};
use crate::storage::SystemClock;
use anyhow::Context;
use raftcache_proto::tonic::transport::server::TcpIncoming;
use raftcache_proto::tonic::transport::Server;
use raftcache_proto::v1::admin_server::AdminServer;
use raftcache_proto::v1::cache_server::CacheServer;
use raftcache_proto::v1::raft_transport_server::RaftTransportServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// The node's bound listeners. Binding is separate from running so that tests and
/// `raftcache dev` can use port 0 and learn the ports before the node serves.
pub struct Listeners {
    /// Clients' gRPC listener.
    pub grpc: TcpListener,
    /// Prometheus `/metrics` listener.
    pub metrics: TcpListener,
    /// The RESP (Redis protocol) listener, when `resp.addr` is set.
    pub resp: Option<TcpListener>,
}

/// Where a running node listens.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    /// gRPC address.
    pub grpc: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// RESP address, if any.
    pub resp: Option<SocketAddr>,
}

impl Listeners {
    /// Binds both listeners of `config`.
    ///
    /// # Errors
    /// A message naming the address and the option to change when a port is taken.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        Ok(Listeners {
            grpc: bind_one(config.server.grpc_addr, "gRPC", "--grpc-addr").await?,
            metrics: bind_one(config.server.metrics_addr, "metrics", "--metrics-addr").await?,
            resp: match config.resp.addr {
                Some(addr) => Some(bind_one(addr, "RESP", "--resp-addr").await?),
                None => None,
            },
        })
    }

    /// The addresses actually bound.
    ///
    /// # Errors
    /// When the OS cannot report a socket's address.
    pub fn addrs(&self) -> std::io::Result<BoundAddrs> {
        Ok(BoundAddrs {
            grpc: self.grpc.local_addr()?,
            metrics: self.metrics.local_addr()?,
            resp: self
                .resp
                .as_ref()
                .map(TcpListener::local_addr)
                .transpose()?,
        })
    }
}

async fn bind_one(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for {what} on {addr} (is another process using it? choose another with {flag}, or port 0 for any free port)")
    })
}

/// Runs a node until `shutdown` completes, then shuts down gracefully.
/// `on_ready` is called once the node serves as a cluster member (founded, joined), or
/// at once with node id 0 for a standby node, with the bound addresses.
///
/// # Errors
/// When the data directory cannot be created, the metrics recorder cannot be
/// installed, the cluster cannot be founded, or the gRPC server fails.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(u64, BoundAddrs),
) -> anyhow::Result<()> {
    let bound = listeners.addrs()?;
    std::fs::create_dir_all(&config.server.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            config.server.data_dir.display()
        )
    })?;
    let handle = metrics::install()?;
    let cancel = CancellationToken::new();
    let advertise = config
        .server
        .advertise_addr
        .clone()
        .unwrap_or_else(|| bound.grpc.to_string());
    let persistence = &config.persistence;
    let store = match persistence.mode {
        Persistence::None => {
            if config.server.data_dir.join("sled").exists() {
                warn!(
                    dir = %config.server.data_dir.display(),
                    "the data directory holds persisted state, ignored with persistence `none`"
                );
            }
            None
        }
        _ => Some(Store::open(&config.server.data_dir).with_context(|| {
            format!(
                "cannot open the data directory {} (is another node using it?)",
                config.server.data_dir.display()
            )
        })?),
    };
    let restart = match &store {
        Some(store) => Restart::plan(
            store,
            persistence.mode,
            &advertise,
            persistence.restore_snapshots,
            &config.cluster.join,
        )?,
        None => Restart::Fresh,
    };
    let settings = NodeSettings {
        advertise,
        storage: config.storage_config(),
        vnodes: config.storage.vnodes,
        replication_factor: config.cluster.replicas,
        // Validated by Config::validate.
        peer_routes: config.cluster.peer_route_map().unwrap_or_default(),
        fault_injection: config.server.fault_injection,
        persist: PersistSettings {
            mode: persistence.mode,
            store,
            snapshot_interval: persistence.snapshot_interval,
            snapshot_writes: persistence.snapshot_writes,
        },
    };
    let node = ClusterNode::new(settings, Arc::new(SystemClock), cancel.clone())?;
    let max_msg = config.max_message_bytes();
    let mut cache_service = CacheService::new(node.clone());
    let hot_keys = cache_service.hot_keys();
    // Always built: other nodes' RESP listeners forward to this one (`Cache.Resp`).
    let frontend = Arc::new(resp::Frontend::new(
        node.clone(),
        hot_keys.clone(),
        resp::RespSettings {
            max_clients: config.resp.max_clients,
            allow_flushall: config.resp.allow_flushall,
            max_query_buffer: usize::try_from(config.resp.max_query_buffer.0).unwrap_or(usize::MAX),
            limits: resp::codec::Limits {
                max_bulk: usize::try_from(config.storage.max_value_size.0)
                    .unwrap_or(usize::MAX)
                    .max(usize::try_from(config.storage.max_key_size.0).unwrap_or(usize::MAX))
                    + 64 * 1024,
                ..resp::codec::Limits::default()
            },
            port: bound.resp.map_or(0, |a| a.port()),
        },
    ));
    cache_service.set_resp(frontend.clone());
    let cache = CacheServer::new(cache_service)
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let raft = RaftService::new(node.clone());
    let transport = RaftTransportServer::new(raft.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let admin = AdminServer::new(raft);

    let tasks = TaskTracker::new();
    tasks.spawn(reclaim_loop(
        node.clone(),
        config.storage.reclaim_interval,
        config.storage.reclaim_batch,
        cancel.clone(),
    ));
    tasks.spawn(metrics::serve(
        listeners.metrics,
        handle,
        node.clone(),
        hot_keys,
        cancel.clone(),
    ));
    let incoming = TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
    let grpc_stop = cancel.clone();
    let mut grpc = tokio::spawn(
        Server::builder()
            // A client gives up on a request after its attempt timeout; on a starved node
            // many such streams are reset before they are accepted, and past h2's default
            // of 20 the whole connection is closed (`too_many_resets`), failing every
            // other call on it. Resets by our own clients are not an attack here.
            .http2_max_pending_accept_reset_streams(Some(4096))
            .add_service(cache)
            .add_service(transport)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned()),
    );

    // Become a member: found, join, or wait in standby.
    let cluster = &config.cluster;
    let membership = async {
        match restart {
            Restart::Restore {
                identity,
                meta,
                groups,
                snapshots_only,
            } => {
                return node
                    .restore(identity, meta, groups, snapshots_only)
                    .await
                    .map(|()| node.node_id());
            }
            Restart::Rejoin { seeds, why } => {
                warn!("{why}");
                let join = node.join(&seeds);
                let mut join = std::pin::pin!(join);
                loop {
                    tokio::select! {
                        joined = &mut join => return joined,
                        () = tokio::time::sleep(Duration::from_secs(15)) => warn!(
                            seeds = ?seeds,
                            "no cluster member accepts this node yet; if every node stopped \
                             without a clean shutdown in snapshot mode, restart them all with \
                             --restore-snapshots"
                        ),
                    }
                }
            }
            Restart::Fresh => {}
        }
        if cluster.standby {
            info!(grpc = %bound.grpc, "standby: waiting for `raftcache admin add-node`");
            Ok(0)
        } else if !cluster.join.is_empty() {
            node.join(&cluster.join).await
        } else {
            node.bootstrap().await.map(|()| node.node_id())
        }
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let joined = tokio::select! {
        joined = membership => Some(joined),
        _ = &mut shutdown => None,
        res = &mut grpc => {
            res.context("gRPC server task failed")?
                .context("gRPC server failed")?;
            anyhow::bail!("gRPC server stopped unexpectedly");
        }
    };
    let node_id = match joined {
        Some(Ok(id)) => Some(id),
        Some(Err(e)) => {
            cancel.cancel();
            node.shutdown_groups().await;
            return Err(e.context("cannot become a cluster member"));
        }
        None => None,
    };
    let early_exit = if let Some(node_id) = node_id {
        info!(
            node = node_id,
            grpc = %bound.grpc,
            metrics = %bound.metrics,
            max_memory = %config.storage.max_memory,
            policy = %config.storage.eviction_policy,
            "node ready"
        );
        if let Some(listener) = listeners.resp {
            info!(resp = ?bound.resp, "RESP listener ready");
            tasks.spawn(resp::server::serve(
                listener,
                frontend,
                cancel.clone(),
                tasks.clone(),
            ));
        }
        on_ready(node_id, bound);
        tokio::select! {
            _ = &mut shutdown => None,
            res = &mut grpc => Some(res),
        }
    } else {
        None
    };
    cancel.cancel();
    tasks.close();
    if let Some(res) = early_exit {
        res.context("gRPC server task failed")?
            .context("gRPC server failed")?;
        anyhow::bail!("gRPC server stopped unexpectedly");
    }
    info!("shutting down: draining in-flight requests");
    let timeout = config.server.shutdown_timeout;
    match tokio::time::timeout(timeout, grpc).await {
        Ok(res) => res
            .context("gRPC server task failed")?
            .context("gRPC server failed")?,
        Err(_) => warn!(?timeout, "in-flight requests did not finish in time"),
    }
    node.shutdown_groups().await;
    if tokio::time::timeout(timeout, tasks.wait()).await.is_err() {
        warn!("background tasks did not stop in time");
    }
    info!("node stopped");
    Ok(())
}

/// Active expiry: every `interval`, the leader of each partition with due deadlines
/// proposes a `Reclaim` (at most `batch` keys); while rounds keep finding due keys it
/// goes again at once, a bounded number of times, so a mass expiry is caught up quickly
/// without starving requests. Followers apply the same ops; they never reclaim alone.
async fn reclaim_loop(
    node: Arc<ClusterNode>,
    interval: Duration,
    batch: usize,
    cancel: CancellationToken,
) {
    const MAX_ROUNDS_PER_TICK: usize = 16;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for _ in 0..MAX_ROUNDS_PER_TICK {
            if node.reclaim_expired(batch).await == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}
