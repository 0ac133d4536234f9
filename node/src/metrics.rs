//! Prometheus metrics of the node, in text format at `http://<metrics-addr>/metrics`.
//!
//! Request counters and latency histograms are recorded by the gRPC handlers as they
//! run ([`record_op`]); the storage figures (keys, memory, hits, evictions, ...) are
//! read from the engine's own counters at scrape time ([`refresh_storage`]), so the
//! storage engine stays free of any metrics dependency.
//!
//! The HTTP endpoint is served with hyper on a listener the caller bound, rather than
//! by the exporter's own listener, so that tests can bind port 0 and learn the port.

use crate::cluster::ClusterNode;
use crate::storage::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use raftcache_proto::v1::ErrorCode;
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Latency buckets (seconds) of `raftcache_request_duration_seconds`: 25 µs to 1 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same
/// handle) and describes every metric.
///
/// # Errors
/// When another metrics recorder is already installed in this process.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("raftcache_request_duration_seconds".into()),
            LATENCY_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    describe_counter!(
        "raftcache_ops_total",
        "Requests handled, by op and result (ok or the error code)"
    );
    describe_histogram!(
        "raftcache_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to handle a request inside the node, by op"
    );
    describe_counter!("raftcache_hits_total", "Reads that found their key");
    describe_counter!(
        "raftcache_misses_total",
        "Reads that did not find their key"
    );
    describe_gauge!(
        "raftcache_keys",
        "Keys held (expired but not yet reclaimed keys included)"
    );
    describe_gauge!(
        "raftcache_memory_used_bytes",
        metrics::Unit::Bytes,
        "Accounted memory: keys + values + per-entry overhead"
    );
    describe_gauge!(
        "raftcache_memory_limit_bytes",
        metrics::Unit::Bytes,
        "The max-memory limit; 0 means unlimited"
    );
    describe_counter!(
        "raftcache_evictions_total",
        "Keys evicted to stay under max-memory"
    );
    describe_counter!(
        "raftcache_expirations_total",
        "Keys removed because their TTL passed"
    );
}

/// Counts one request and its latency. `error` is `None` for success.
pub fn record_op(op: &'static str, error: Option<ErrorCode>, elapsed: Duration) {
    let result = match error {
        None => "ok",
        Some(code) => code
            .as_str_name()
            .strip_prefix("ERROR_CODE_")
            .unwrap_or("unknown"),
    };
    counter!("raftcache_ops_total", "op" => op, "result" => result).increment(1);
    histogram!("raftcache_request_duration_seconds", "op" => op).record(elapsed.as_secs_f64());
}

/// Copies the engine's counters and gauges into the recorder.
pub fn refresh_storage(engine: &Engine) {
    let s = engine.stats();
    gauge!("raftcache_keys").set(s.keys as f64);
    gauge!("raftcache_memory_used_bytes").set(s.memory_used as f64);
    gauge!("raftcache_memory_limit_bytes").set(s.memory_limit as f64);
    counter!("raftcache_hits_total").absolute(s.hits);
    counter!("raftcache_misses_total").absolute(s.misses);
    counter!("raftcache_evictions_total").absolute(s.evictions);
    counter!("raftcache_expirations_total").absolute(s.expirations);
}

/// Copies the node's cluster gauges (leaderships, transport batching) into the recorder.
pub fn refresh_cluster(node: &ClusterNode) {
    let map = node.cluster_map();
    let me = node.node_id();
    let led = map
        .partitions
        .iter()
        .filter(|p| p.observed && p.leader == me)
        .count();
    gauge!("raftcache_partitions_led").set(led as f64);
    gauge!("raftcache_partitions_hosted").set(f64::from(node.partitions_hosted()));
    gauge!("raftcache_cluster_epoch").set(map.epoch as f64);
    let (batches, messages) = node.transport().counters();
    counter!("raftcache_raft_batches_total").absolute(batches);
    counter!("raftcache_raft_messages_total").absolute(messages);
}

/// Serves `GET /metrics` on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    node: Arc<ClusterNode>,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        let node = node.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let response = if req.uri().path() == "/metrics" {
                if let Some(engine) = node.engine() {
                    refresh_storage(engine);
                }
                refresh_cluster(&node);
                text_response(StatusCode::OK, handle.render())
            } else {
                text_response(StatusCode::NOT_FOUND, "try /metrics\n".to_owned())
            };
            async move { Ok::<_, Infallible>(response) }
        });
        let conn_cancel = cancel.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            tokio::select! {
                res = conn => if let Err(e) = res {
                    debug!(error = %e, "metrics connection ended with an error");
                },
                _ = conn_cancel.cancelled() => {}
            }
        });
    }
}

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
