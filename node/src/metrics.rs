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
use crate::hot::{HotKey, HotKeys};
use crate::storage::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use raftcache_proto::v1::{ErrorCode, WatchEventKind};
use std::convert::Infallible;
use std::fmt::Write as _;
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
        "Requests handled, by op and result. gRPC calls: op is the call (get, set, ...), result ok or the error code. Redis commands on this node's RESP listener: op is resp_<command> (resp_get, resp_set, ...; resp_unknown for unknown commands), result ok or the Redis error prefix (ERR, OOM, TRYAGAIN, LOADING, ...); counted once, on the node the client talks to"
    );
    describe_histogram!(
        "raftcache_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to handle a request inside the node, by op (gRPC calls and resp_<command>, forwarding included)"
    );
    describe_counter!(
        "raftcache_resp_too_large_total",
        "RESP commands refused for a key or value over its limit, by limit (max-key-size, max-value-size; max-query-buffer closes the connection); the connection goes on"
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
    describe_gauge!(
        "raftcache_cdc_tombstone_bytes",
        metrics::Unit::Bytes,
        "Bytes held by CDC tombstones (outside max-memory; capped per partition, past the cap the oldest are forgotten and raise the fill floor)"
    );
    describe_gauge!("raftcache_watch_streams", "Open Watch streams");
    describe_counter!(
        "raftcache_watch_events_total",
        "Events sent on Watch streams, by kind (sync, change, reset)"
    );
    describe_counter!(
        "raftcache_watch_resets_total",
        "RESET events sent on Watch streams (snapshot installed, replica moved, stream lagged)"
    );
    describe_counter!(
        "raftcache_leases_total",
        "GetOrLease answers, by outcome (hit, granted, wait, miss)"
    );
    describe_counter!(
        "raftcache_lease_fills_total",
        "Sets under a fill lease, by result (applied, lost, stale)"
    );
    describe_gauge!(
        "raftcache_partitions_led",
        "Partitions whose Raft group this node leads (as the cluster map observes it)"
    );
    describe_gauge!(
        "raftcache_partitions_hosted",
        "Partitions with a replica on this node"
    );
    describe_gauge!(
        "raftcache_cluster_epoch",
        "Epoch of the cluster map this node holds (grows with every placement change)"
    );
    describe_counter!(
        "raftcache_raft_batches_total",
        "Raft transport batches sent to peers (each carries messages of many groups)"
    );
    describe_counter!(
        "raftcache_raft_messages_total",
        "Raft messages sent to peers, all groups together"
    );
    describe_counter!(
        "raftcache_persist_flushes_total",
        "fsyncs of the durable Raft log (group commit: one per batch of waiting writes)"
    );
    describe_counter!(
        "raftcache_persist_flushed_writes_total",
        "Writes made durable by those fsyncs"
    );
    describe_counter!(
        "raftcache_snapshots_total",
        "Partition snapshots written to the data directory"
    );
    describe_gauge!(
        "raftcache_snapshot_last_bytes",
        metrics::Unit::Bytes,
        "Size of the last partition snapshot written"
    );
    describe_histogram!(
        "raftcache_snapshot_pause_seconds",
        metrics::Unit::Seconds,
        "How long a snapshot held its partition's writes while copying its state"
    );
    describe_histogram!(
        "raftcache_snapshot_write_seconds",
        metrics::Unit::Seconds,
        "Time to encode and write one partition snapshot"
    );
    describe_counter!(
        "raftcache_client_breaker_opened_total",
        "Circuit breakers opened by this node's forwarding client (RESP commands for keys led elsewhere)"
    );
    describe_gauge!(
        "raftcache_client_breaker_state",
        "Circuit breaker of the forwarding client per peer node: 0 closed, 1 open, 2 half-open"
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

/// Counts one Redis command served over RESP: `op` is `resp_<command>`, `result` `ok`
/// or the Redis error prefix; `elapsed` `None` for a command refused before it ran (an
/// oversized argument), counted without a latency.
pub fn record_resp_op(op: &'static str, result: &'static str, elapsed: Option<Duration>) {
    counter!("raftcache_ops_total", "op" => op, "result" => result).increment(1);
    if let Some(elapsed) = elapsed {
        histogram!("raftcache_request_duration_seconds", "op" => op).record(elapsed.as_secs_f64());
    }
}

/// Counts one RESP command refused for a key or value over `limit` (`max-key-size`,
/// `max-value-size`, `max-query-buffer`).
pub fn record_resp_too_large(limit: &'static str) {
    counter!("raftcache_resp_too_large_total", "limit" => limit).increment(1);
}

/// Counts one `GetOrLease` answer: `outcome` is `hit`, `granted`, `wait` or `miss`.
pub fn record_lease(outcome: &'static str) {
    counter!("raftcache_leases_total", "outcome" => outcome).increment(1);
}

/// Counts one fill under a lease: `result` is `applied`, `lost` (the lease was voided or
/// expired) or `stale` (refused by its `source_lsn`).
pub fn record_lease_fill(result: &'static str) {
    counter!("raftcache_lease_fills_total", "result" => result).increment(1);
}

/// Counts a `Watch` stream opening (`+1`) or ending (`-1`).
pub fn watch_stream(delta: f64) {
    gauge!("raftcache_watch_streams").increment(delta);
}

/// Counts one event sent on a `Watch` stream.
pub fn record_watch_event(kind: WatchEventKind) {
    let name = match kind {
        WatchEventKind::Sync => "sync",
        WatchEventKind::Change => "change",
        WatchEventKind::Reset => {
            counter!("raftcache_watch_resets_total").increment(1);
            "reset"
        }
        WatchEventKind::Unspecified => "unspecified",
    };
    counter!("raftcache_watch_events_total", "kind" => name).increment(1);
}

/// Hot keys exported as `raftcache_hot_key_requests_per_second{rank,key}`.
pub const HOT_KEY_RANKS: usize = 10;
/// Characters of a key kept in its label.
const HOT_KEY_LABEL_CHARS: usize = 64;

/// The `raftcache_hot_key_requests_per_second` family for the hottest keys, in
/// Prometheus text. Rendered at scrape time rather than recorded as gauges: the
/// recorder keeps every label set it ever saw, so hot keys that cooled down would stay
/// as stale series forever; this way there are exactly the current top ranks.
pub fn hot_keys_text(top: &[HotKey]) -> String {
    let mut out = String::from(
        "# HELP raftcache_hot_key_requests_per_second Estimated requests per second of the \
         hottest keys on this node (decayed over 10-20 s), by rank (1 = hottest)\n\
         # TYPE raftcache_hot_key_requests_per_second gauge\n",
    );
    for (rank, h) in top.iter().take(HOT_KEY_RANKS).enumerate() {
        let _ = writeln!(
            out,
            "raftcache_hot_key_requests_per_second{{rank=\"{}\",key=\"{}\"}} {}",
            rank + 1,
            label_value(&h.key),
            h.per_second
        );
    }
    out
}

/// A key as a label value: lossy UTF-8, at most [`HOT_KEY_LABEL_CHARS`] characters,
/// `\`, `"` and newlines escaped, other control characters replaced.
fn label_value(key: &[u8]) -> String {
    let mut out = String::new();
    for c in String::from_utf8_lossy(key)
        .chars()
        .take(HOT_KEY_LABEL_CHARS)
    {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(char::REPLACEMENT_CHARACTER),
            c => out.push(c),
        }
    }
    out
}

/// Copies the engine's counters and gauges into the recorder.
pub fn refresh_storage(engine: &Engine) {
    let s = engine.stats();
    gauge!("raftcache_keys").set(s.keys as f64);
    gauge!("raftcache_memory_used_bytes").set(s.memory_used as f64);
    gauge!("raftcache_memory_limit_bytes").set(s.memory_limit as f64);
    gauge!("raftcache_cdc_tombstone_bytes").set(engine.tombstone_bytes() as f64);
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
    hot: Arc<HotKeys>,
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
        let hot = hot.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let response = if req.uri().path() == "/metrics" {
                if let Some(engine) = node.engine() {
                    refresh_storage(engine);
                }
                refresh_cluster(&node);
                let mut text = handle.render();
                text.push_str(&hot_keys_text(&hot.top(HOT_KEY_RANKS)));
                text_response(StatusCode::OK, text)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_keys_render_as_ranked_escaped_labels() {
        let hot = |key: &[u8], per_second| HotKey {
            partition: 0,
            key: Bytes::copy_from_slice(key),
            per_second,
            count: 1,
            error: 0,
        };
        let long = "x".repeat(100);
        let top = vec![
            hot(b"user:1", 12.5),
            hot(b"a\"b\\c\nd\x01", 3.0),
            hot(&[0xff, b'k'], 2.0),
            hot(long.as_bytes(), 1.0),
        ];
        let text = hot_keys_text(&top);
        assert!(text.contains("# TYPE raftcache_hot_key_requests_per_second gauge\n"));
        assert!(text
            .contains("raftcache_hot_key_requests_per_second{rank=\"1\",key=\"user:1\"} 12.5\n"));
        assert!(text.contains("{rank=\"2\",key=\"a\\\"b\\\\c\\nd\u{fffd}\"} 3\n"));
        assert!(text.contains("{rank=\"3\",key=\"\u{fffd}k\"} 2\n"));
        assert!(text.contains(&format!("{{rank=\"4\",key=\"{}\"}} 1\n", "x".repeat(64))));
        let many: Vec<_> = (0..20)
            .map(|i| hot(format!("k{i}").as_bytes(), 1.0))
            .collect();
        assert_eq!(hot_keys_text(&many).lines().count(), 2 + HOT_KEY_RANKS);
    }
}
