//! Running a node: bind listeners, serve gRPC and metrics, reclaim expired keys in
//! the background, shut down in order.
//!
//! Shutdown order, bounded by `server.shutdown-timeout`: stop accepting gRPC
//! connections and let in-flight requests finish, then stop the background tasks
//! (reclaim, metrics). The cache is memory-only in this version, so there is nothing
//! to flush.

use crate::config::Config;
use crate::metrics;
use crate::service::{CacheService, NodeInfo};
use crate::storage::{Engine, SystemClock};
use anyhow::Context;
use raftcache_proto::tonic::transport::server::TcpIncoming;
use raftcache_proto::tonic::transport::Server;
use raftcache_proto::v1::cache_server::CacheServer;
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
}

/// Where a running node listens.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    /// gRPC address.
    pub grpc: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
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
        })
    }
}

async fn bind_one(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for {what} on {addr} (is another process using it? choose another with {flag}, or port 0 for any free port)")
    })
}

/// Runs a node until `shutdown` completes, then shuts down gracefully.
/// `on_ready` is called once the node serves, with the bound addresses.
///
/// # Errors
/// When the data directory cannot be created, the metrics recorder cannot be
/// installed, or the gRPC server fails.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(BoundAddrs),
) -> anyhow::Result<()> {
    let bound = listeners.addrs()?;
    std::fs::create_dir_all(&config.server.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            config.server.data_dir.display()
        )
    })?;
    let handle = metrics::install()?;
    let engine = Arc::new(Engine::new(config.storage_config(), Arc::new(SystemClock)));
    let node = NodeInfo {
        id: config.server.node_id,
        advertise_addr: config
            .server
            .advertise_addr
            .clone()
            .unwrap_or_else(|| bound.grpc.to_string()),
        epoch: 1,
        vnodes: config.storage.vnodes,
    };
    let max_msg = config.max_message_bytes();
    let service = CacheServer::new(CacheService::new(engine.clone(), node))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);

    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(reclaim_loop(
        engine.clone(),
        config.storage.reclaim_interval,
        config.storage.reclaim_batch,
        cancel.clone(),
    ));
    tasks.spawn(metrics::serve(
        listeners.metrics,
        handle,
        engine.clone(),
        cancel.clone(),
    ));
    let incoming = TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
    let grpc_stop = cancel.clone();
    let mut grpc = tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned()),
    );
    info!(
        node = config.server.node_id,
        grpc = %bound.grpc,
        metrics = %bound.metrics,
        partitions = config.storage.partitions,
        max_memory = %config.storage.max_memory,
        policy = %config.storage.eviction_policy,
        "node ready"
    );
    on_ready(bound);

    let early_exit = tokio::select! {
        _ = shutdown => None,
        res = &mut grpc => Some(res),
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
    if tokio::time::timeout(timeout, tasks.wait()).await.is_err() {
        warn!("background tasks did not stop in time");
    }
    info!("node stopped");
    Ok(())
}

/// Active expiry: every `interval`, reclaims expired keys (at most `batch` per
/// partition per round); while rounds keep finding due keys it goes again at once, a
/// bounded number of times, so a mass expiry is caught up quickly without starving
/// requests. Partitions with nothing due are skipped without applying anything.
async fn reclaim_loop(
    engine: Arc<Engine>,
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
            if engine.reclaim_expired(batch) == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}
