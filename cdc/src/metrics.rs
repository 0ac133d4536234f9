//! The worker's Prometheus metrics (`[metrics] listen`, text format at `/metrics`).
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `raftcache_cdc_active` | gauge | 1 while this worker holds the lease and streams |
//! | `raftcache_cdc_transactions_total` | counter | transactions applied to the cache |
//! | `raftcache_cdc_rows_total` | counter | row changes of mapped tables applied |
//! | `raftcache_cdc_keys_total` | counter | key changes sent (invalidations, writes, prefixes) |
//! | `raftcache_cdc_acked_lsn` | gauge | the LSN confirmed to Postgres as flushed |
//! | `raftcache_cdc_lag_bytes` | gauge | server's current WAL position (`pg_current_wal_lsn()`, polled every second) − acknowledged LSN, at least 0 |
//! | `raftcache_cdc_lag_seconds` | gauge | now − commit time of the last transaction applied (0 when idle) |
//! | `raftcache_cdc_commit_to_applied_seconds` | summary | commit time → committed in the cache, per transaction |
//! | `raftcache_cdc_reconnects_total` | counter | streaming sessions that ended with an error |
//! | `raftcache_cdc_retries_total{cause}` | counter | transient errors retried after a back-off, by cause (`connect`, `io`, `shutdown`, `starting`, `limits`, `slot_in_use`, `server`, `protocol`, `cache`: see `pg_errors`) |
//! | `raftcache_cdc_apply_retries_total` | counter | cache writes retried |
//! | `raftcache_cdc_round_seconds` | summary | time of one apply round |

use crate::apply::TxWork;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use raftcache_client::Lsn;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// Now, in microseconds since 2000-01-01 (Postgres timestamps).
pub fn pg_now_us() -> i64 {
    crate::walsender::pg_micros(SystemTime::now())
}

/// Installs the Prometheus exporter listening on `listen`, and describes the metrics.
///
/// # Errors
/// When the address cannot be bound or a recorder is already installed.
pub fn install(listen: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .install()?;
    describe_gauge!(
        "raftcache_cdc_active",
        "1 while this worker holds the lease and streams"
    );
    describe_counter!(
        "raftcache_cdc_transactions_total",
        "Transactions applied to the cache"
    );
    describe_counter!(
        "raftcache_cdc_rows_total",
        "Row changes of mapped tables applied"
    );
    describe_counter!("raftcache_cdc_keys_total", "Key changes sent to the cache");
    describe_gauge!(
        "raftcache_cdc_acked_lsn",
        "The LSN confirmed to Postgres as flushed"
    );
    describe_gauge!(
        "raftcache_cdc_lag_bytes",
        metrics::Unit::Bytes,
        "The server's current WAL position (pg_current_wal_lsn(), polled every second, \
         including WAL not yet decoded) minus the acknowledged LSN, at least 0"
    );
    describe_gauge!(
        "raftcache_cdc_lag_seconds",
        metrics::Unit::Seconds,
        "Now minus the commit time of the last transaction applied (0 when idle)"
    );
    describe_histogram!(
        "raftcache_cdc_commit_to_applied_seconds",
        metrics::Unit::Seconds,
        "From a transaction's commit in Postgres to its changes committed in the cache"
    );
    describe_counter!(
        "raftcache_cdc_reconnects_total",
        "Streaming sessions that ended with an error"
    );
    describe_counter!(
        "raftcache_cdc_retries_total",
        "Transient errors retried after a back-off, by cause (connect, io, shutdown, \
         starting, limits, slot_in_use, server, protocol, cache)"
    );
    // Every cause from zero, so that rate() and alerts see the first retry.
    for cause in crate::pg_errors::Cause::ALL {
        counter!("raftcache_cdc_retries_total", "cause" => cause.label()).absolute(0);
    }
    describe_counter!("raftcache_cdc_apply_retries_total", "Cache writes retried");
    describe_histogram!(
        "raftcache_cdc_round_seconds",
        metrics::Unit::Seconds,
        "Time of one apply round"
    );
    describe_counter!(
        "raftcache_client_breaker_opened_total",
        "Circuit breakers opened by the worker's cache client"
    );
    describe_gauge!(
        "raftcache_client_breaker_state",
        "Circuit breaker of the worker's cache client per node: 0 closed, 1 open, 2 half-open"
    );
    Ok(())
}

/// Whether this worker streams.
pub fn active(on: bool) {
    gauge!("raftcache_cdc_active").set(if on { 1.0 } else { 0.0 });
}

pub(crate) fn tx_applied(tx: &TxWork, now_us: i64) {
    counter!("raftcache_cdc_rows_total").increment(tx.rows);
    if let Some((_, commit_us)) = tx.end {
        counter!("raftcache_cdc_transactions_total").increment(1);
        let lag = (now_us - commit_us).max(0) as f64 / 1e6;
        histogram!("raftcache_cdc_commit_to_applied_seconds").record(lag);
        gauge!("raftcache_cdc_lag_seconds").set(lag);
    }
}

pub(crate) fn keys_applied(n: u64) {
    counter!("raftcache_cdc_keys_total").increment(n);
}

pub(crate) fn acked(lsn: Lsn) {
    gauge!("raftcache_cdc_acked_lsn").set(lsn.0 as f64);
}

/// The server's WAL position as last polled (`pg_current_wal_lsn()`, or the stream's if
/// further), against the acknowledged position.
pub(crate) fn lag_bytes(server_end: Lsn, acked: Lsn) {
    gauge!("raftcache_cdc_lag_bytes").set(server_end.0.saturating_sub(acked.0) as f64);
    if server_end <= acked {
        gauge!("raftcache_cdc_lag_seconds").set(0.0);
    }
}

pub(crate) fn reconnect() {
    counter!("raftcache_cdc_reconnects_total").increment(1);
}

/// A transient error, retried after a back-off.
pub(crate) fn retry(cause: crate::pg_errors::Cause) {
    counter!("raftcache_cdc_retries_total", "cause" => cause.label()).increment(1);
}

pub(crate) fn apply_retry() {
    counter!("raftcache_cdc_apply_retries_total").increment(1);
}

pub(crate) fn round_done(took: Duration) {
    histogram!("raftcache_cdc_round_seconds").record(took.as_secs_f64());
}
