//! Prometheus metrics of `raftcache-cdc verify --watch` (on `[metrics] listen`, or
//! `--metrics-listen`; text format at `/metrics`).
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `raftcache_cdc_verify_rounds_total` | counter | rounds completed |
//! | `raftcache_cdc_verify_round_errors_total` | counter | rounds abandoned on a Postgres or cache error |
//! | `raftcache_cdc_verify_checked_total` | counter | keys checked |
//! | `raftcache_cdc_verify_equal_total` | counter | keys whose cached value agreed at once |
//! | `raftcache_cdc_verify_absent_total` | counter | keys not in the cache (fine for a cache) |
//! | `raftcache_cdc_verify_converged_total` | counter | keys that disagreed, then agreed within the bound |
//! | `raftcache_cdc_verify_stale_total` | counter | keys still disagreeing after the bound |
//! | `raftcache_cdc_verify_convergence_seconds` | summary | first disagreement → agreement, per converged key |
//! | `raftcache_cdc_verify_last_round_checked` | gauge | keys checked by the last round |
//! | `raftcache_cdc_verify_last_round_stale` | gauge | stale keys found by the last round |
//! | `raftcache_cdc_verify_last_round_nines` | gauge | the last round's agreement in nines (a lower bound when nothing was stale) |
//! | `raftcache_cdc_verify_last_round_seconds` | gauge | how long the last round took |
//! | `raftcache_cdc_verify_last_round_timestamp_seconds` | gauge | when the last round ended (Unix time) |
//! | `raftcache_cdc_verify_bound_seconds` | gauge | the bound a disagreement has to converge within |

use crate::verify::Report;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Installs the Prometheus exporter listening on `listen`, and describes the metrics.
///
/// # Errors
/// When the address cannot be bound or a recorder is already installed.
pub fn install(listen: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .install()?;
    describe();
    Ok(())
}

/// The HELP texts.
fn describe() {
    describe_counter!(
        "raftcache_cdc_verify_rounds_total",
        "Verification rounds completed"
    );
    describe_counter!(
        "raftcache_cdc_verify_round_errors_total",
        "Verification rounds abandoned on a Postgres or cache error"
    );
    describe_counter!(
        "raftcache_cdc_verify_checked_total",
        "Cache keys compared with the Postgres rows they derive from"
    );
    describe_counter!(
        "raftcache_cdc_verify_equal_total",
        "Keys whose cached value agreed with the row at once"
    );
    describe_counter!(
        "raftcache_cdc_verify_absent_total",
        "Keys not in the cache (always fine for a cache)"
    );
    describe_counter!(
        "raftcache_cdc_verify_converged_total",
        "Keys that disagreed, then agreed within the bound once CDC passed the row's LSN"
    );
    describe_counter!(
        "raftcache_cdc_verify_stale_total",
        "Keys still disagreeing with their row beyond the bound"
    );
    describe_histogram!(
        "raftcache_cdc_verify_convergence_seconds",
        metrics::Unit::Seconds,
        "From a key's first disagreement to its agreement, per converged key"
    );
    describe_gauge!(
        "raftcache_cdc_verify_last_round_checked",
        "Keys checked by the last verification round"
    );
    describe_gauge!(
        "raftcache_cdc_verify_last_round_stale",
        "Stale keys found by the last verification round"
    );
    describe_gauge!(
        "raftcache_cdc_verify_last_round_nines",
        "The last round's agreement in nines, floor(-log10(stale/checked)); with no stale key, the lower bound floor(log10(checked))"
    );
    describe_gauge!(
        "raftcache_cdc_verify_last_round_seconds",
        metrics::Unit::Seconds,
        "How long the last verification round took"
    );
    describe_gauge!(
        "raftcache_cdc_verify_last_round_timestamp_seconds",
        metrics::Unit::Seconds,
        "When the last verification round ended (Unix time)"
    );
    describe_gauge!(
        "raftcache_cdc_verify_bound_seconds",
        metrics::Unit::Seconds,
        "How long a disagreement may last before its key counts as stale"
    );
}

/// Exports a completed round.
pub fn round(report: &Report) {
    let c = &report.counts;
    counter!("raftcache_cdc_verify_rounds_total").increment(1);
    counter!("raftcache_cdc_verify_checked_total").increment(c.checked);
    counter!("raftcache_cdc_verify_equal_total").increment(c.equal);
    counter!("raftcache_cdc_verify_absent_total").increment(c.absent);
    counter!("raftcache_cdc_verify_converged_total").increment(c.converged);
    counter!("raftcache_cdc_verify_stale_total").increment(c.stale);
    let h = histogram!("raftcache_cdc_verify_convergence_seconds");
    for d in &report.convergence_times {
        h.record(d.as_secs_f64());
    }
    gauge!("raftcache_cdc_verify_last_round_checked").set(c.checked as f64);
    gauge!("raftcache_cdc_verify_last_round_stale").set(c.stale as f64);
    gauge!("raftcache_cdc_verify_last_round_nines").set(report.nines.map_or(0.0, f64::from));
    gauge!("raftcache_cdc_verify_last_round_seconds").set(report.elapsed_ms as f64 / 1e3);
    gauge!("raftcache_cdc_verify_bound_seconds").set(report.bound_ms as f64 / 1e3);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!("raftcache_cdc_verify_last_round_timestamp_seconds").set(now);
}

/// Counts a round abandoned on an error.
pub fn round_failed() {
    counter!("raftcache_cdc_verify_round_errors_total").increment(1);
}
