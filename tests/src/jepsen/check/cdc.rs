//! CDC freshness: a cache fed from the Postgres WAL never serves an older version
//! once a client asked for a `min_lsn` at or past that version's commit.
//!
//! For every `ok` `cache-read` R on key k with `min_lsn` M (its invoke's `lsn`), and
//! every `ok` `db-write` W on k that completed before R was invoked with `W.lsn ≤ M`,
//! R returns `null`, W's version, or a newer one — never a numerically older version
//! (`stale-read-after-min-lsn`, window `[W, R]`). An `ok` `db-read` (the final read of
//! the row after quiescence) counts as a write of its value at its LSN, but R must
//! return exactly that value or `null` (`final-read-mismatch`) — unless some `db-write`
//! on k was invoked after the db-read and before R completed, in which case the
//! ordinary "not older" rule applies. Values that are not integers are only compared
//! for equality and never called older.
//!
//! Statistics: see [`super::CdcStats`].

use super::{as_int, Anomaly, CdcStats, Validity};
use crate::jepsen::history::{Lsn, Operation, Outcome};
use serde_json::Value;
use std::collections::BTreeMap;

/// What the CDC checker found.
pub(super) struct CdcResult {
    pub valid: Validity,
    pub keys: usize,
    pub notes: Vec<String>,
    pub anomalies: Vec<Anomaly>,
    pub stats: CdcStats,
}

/// A version of a row known to be committed: an `ok` db-write or db-read.
struct Version<'a> {
    op: &'a Operation,
    lsn: Lsn,
    /// When its `ok` arrived.
    at: u64,
    text: String,
    num: Option<i128>,
    final_read: bool,
}

/// An `ok` cache-read.
struct CacheRead<'a> {
    op: &'a Operation,
    min_lsn: Option<Lsn>,
    /// `None` for a miss.
    text: Option<String>,
    num: Option<i128>,
    ret: u64,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn older(a: Option<i128>, b: Option<i128>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a < b)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Checks every CDC operation (`db-write`, `cache-read`, `db-read`) of the history.
pub(super) fn check(ops: &[&Operation]) -> CdcResult {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut stats = CdcStats::default();
    let mut anomalies = Vec::new();
    let (mut no_lsn, mut bad_min_lsn) = (0usize, 0usize);
    let mut stale_ns: Vec<u64> = Vec::new();
    for (key, kops) in &by_key {
        let mut versions = Vec::new();
        let mut write_invokes = Vec::new();
        let mut reads = Vec::new();
        for &op in kops {
            match (op.f.as_str(), op.outcome) {
                ("db-write", Outcome::Fail) => {}
                ("db-write", _) => write_invokes.push(op.invoke_ns),
                _ => {}
            }
            if op.outcome != Outcome::Ok {
                continue;
            }
            match op.f.as_str() {
                f @ ("db-write" | "db-read") => {
                    let Some(lsn) = op.lsn.as_deref().and_then(|l| l.parse().ok()) else {
                        no_lsn += 1;
                        continue;
                    };
                    let final_read = f == "db-read";
                    if final_read {
                        stats.final_checks += 1;
                    } else {
                        stats.db_writes += 1;
                    }
                    versions.push(Version {
                        op,
                        lsn,
                        at: op.complete_ns.unwrap_or(op.invoke_ns),
                        text: text(&op.value).unwrap_or_else(|| "null".into()),
                        num: as_int(&op.value),
                        final_read,
                    });
                }
                "cache-read" => {
                    let min_lsn = match op.invoke_lsn.as_deref().map(str::parse::<Lsn>) {
                        Some(Ok(l)) => Some(l),
                        Some(Err(_)) => {
                            bad_min_lsn += 1;
                            None
                        }
                        None => None,
                    };
                    if min_lsn.is_some() {
                        stats.cache_reads_with_min_lsn += 1;
                    } else {
                        stats.cache_reads_without_min_lsn += 1;
                    }
                    reads.push(CacheRead {
                        op,
                        min_lsn,
                        text: text(&op.value),
                        num: as_int(&op.value),
                        ret: op.complete_ns.unwrap_or(op.invoke_ns),
                    });
                }
                _ => {}
            }
        }

        // The freshness rule.
        for r in &reads {
            let (Some(m), Some(got)) = (r.min_lsn, &r.text) else {
                continue;
            };
            let written_since = |t: u64| write_invokes.iter().any(|&w| w > t && w <= r.ret);
            let worst = versions
                .iter()
                .filter(|w| w.at < r.op.invoke_ns && w.lsn <= m)
                .filter(|w| {
                    if w.final_read && !written_since(w.op.invoke_ns) {
                        *got != w.text
                    } else {
                        older(r.num, w.num)
                    }
                })
                .max_by_key(|w| (w.lsn, w.at));
            if let Some(w) = worst {
                let (kind, message) = if w.final_read {
                    (
                        "final-read-mismatch",
                        format!(
                            "cache-read with min_lsn {m} returned {got:?}, but the row read after \
                             quiescence ({:.3} ms before it) was {:?} at LSN {}",
                            ms(r.op.invoke_ns.saturating_sub(w.at)),
                            w.text,
                            w.lsn
                        ),
                    )
                } else {
                    (
                        "stale-read-after-min-lsn",
                        format!(
                            "cache-read with min_lsn {m} returned version {got:?}, older than \
                             {:?} committed at LSN {} and acknowledged {:.3} ms before it",
                            w.text,
                            w.lsn,
                            ms(r.op.invoke_ns.saturating_sub(w.at))
                        ),
                    )
                };
                anomalies.push(Anomaly {
                    checker: "cdc".into(),
                    kind: kind.into(),
                    key: (*key).to_owned(),
                    message,
                    window: vec![w.op.clone(), r.op.clone()],
                });
            }
        }

        for w in versions.iter().filter(|w| w.final_read) {
            if reads
                .iter()
                .any(|r| r.op.invoke_ns > w.at && r.min_lsn.is_some_and(|m| m >= w.lsn))
            {
                stats.final_checks_verified += 1;
            }
        }

        // Staleness of each db-write.
        let mut writes: Vec<&Version> = versions.iter().filter(|w| !w.final_read).collect();
        writes.sort_by_key(|w| (w.at, w.lsn));
        for (i, w) in writes.iter().enumerate() {
            let next_at = writes.get(i + 1).map_or(u64::MAX, |n| n.at);
            let later = |r: &&CacheRead| r.op.invoke_ns > w.at;
            if !reads.iter().filter(later).any(|r| r.op.invoke_ns < next_at) {
                continue;
            }
            let stale = reads
                .iter()
                .filter(later)
                .filter(|r| older(r.num, w.num))
                .map(|r| r.ret.saturating_sub(w.at))
                .max()
                .unwrap_or(0);
            stale_ns.push(stale);
        }
    }

    stale_ns.sort_unstable();
    stats.staleness_samples = stale_ns.len();
    stats.stale_writes = stale_ns.iter().filter(|&&s| s > 0).count();
    let pct = |p: f64| {
        let rank = (p * stale_ns.len() as f64).ceil() as usize;
        stale_ns
            .get(rank.saturating_sub(1))
            .map_or(0.0, |&ns| ms(ns))
    };
    stats.staleness_p50_ms = pct(0.50);
    stats.staleness_p99_ms = pct(0.99);
    stats.staleness_max_ms = stale_ns.last().map_or(0.0, |&ns| ms(ns));

    let mut notes = Vec::new();
    let mut valid = if anomalies.is_empty() {
        Validity::Valid
    } else {
        Validity::Invalid
    };
    if stats.db_writes > 0 && stats.final_checks == 0 {
        notes.push("no final quiescent reads (db-read) in this history".to_owned());
    }
    if stats.final_checks > stats.final_checks_verified {
        notes.push(format!(
            "{} of {} final db-reads were not followed by a cache-read with min_lsn at or past \
             their LSN",
            stats.final_checks - stats.final_checks_verified,
            stats.final_checks
        ));
    }
    if no_lsn > 0 {
        notes.push(format!(
            "{no_lsn} ok db-writes/db-reads without a parseable lsn could not be checked \
             (harness error)"
        ));
        valid = valid.combine(Validity::Unknown);
    }
    if bad_min_lsn > 0 {
        notes.push(format!(
            "{bad_min_lsn} cache-reads with an unparseable min_lsn were not checked (harness error)"
        ));
        valid = valid.combine(Validity::Unknown);
    }
    CdcResult {
        valid,
        keys: by_key.len(),
        notes,
        anomalies,
        stats,
    }
}
