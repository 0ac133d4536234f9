//! Consistency checkers for a [`history`](crate::jepsen::history).
//!
//! [`check_history`] pairs the events and picks checkers by `f`:
//! - keys with any `incr` → the counter checker (`counter.rs`): every read and every
//!   increment result lies between what must and what may have been applied;
//! - keys with `read`/`write`/`cas`/`delete` and no `incr` → per-key register
//!   linearizability (`linear.rs`, Wing & Gong / Lowe with memoisation, as in Porcupine
//!   and Knossos), with the smallest failing window of operations for a report;
//! - `db-write`/`cache-read`/`db-read` → the CDC freshness checker (`cdc.rs`) and its
//!   staleness statistics;
//! - a history with `fresh-restart` markers (the nemesis founded a new cluster beside
//!   an old member, `fresh.rs`) → linearizability per era between restarts, and the
//!   `no-old-cluster-values` checker: no read after a restart returns a value written
//!   to the old cluster.
//!
//! Unknown `f`s (e.g. `cache-fill`) are counted and otherwise ignored. The result is a
//! [`Report`]: a [`Validity`] (`Invalid` beats `Unknown` beats `Valid`), counts, one
//! [`CheckerResult`] per checker that ran, [`Anomaly`]s with their windows, and
//! [`CdcStats`]. `Display` (or [`Report::summary`]) gives the one-line verdict,
//! [`Report::details`] the full text; the report also serialises to JSON.
//!
//! ```text
//! events ─► history::pair ─► ops by key ─┬─► counter  ─┐
//!                                        ├─► linear   ─┼─► Report
//!                                        └─► cdc      ─┘
//! ```

mod cdc;
mod counter;
mod fresh;
mod linear;

pub use fresh::MARKER_F as FRESH_RESTART_F;

use crate::jepsen::history::{pair, read_history, Event, Operation, Outcome};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

/// The verdict of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Validity {
    /// No anomaly, and everything could be checked.
    Valid,
    /// At least one anomaly.
    Invalid,
    /// No anomaly found, but something could not be checked (budget, bad input).
    Unknown,
}

impl Validity {
    /// Any `Invalid` → `Invalid`; else any `Unknown` → `Unknown`; else `Valid`.
    pub fn combine(self, other: Validity) -> Validity {
        use Validity::*;
        match (self, other) {
            (Invalid, _) | (_, Invalid) => Invalid,
            (Unknown, _) | (_, Unknown) => Unknown,
            _ => Valid,
        }
    }

    /// [`combine`](Self::combine) over many, `Valid` for none.
    pub fn all(items: impl IntoIterator<Item = Validity>) -> Validity {
        items.into_iter().fold(Validity::Valid, Validity::combine)
    }
}

/// `true`, `false` or `unknown`, as Jepsen prints `:valid?`.
impl fmt::Display for Validity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Validity::Valid => "true",
            Validity::Invalid => "false",
            Validity::Unknown => "unknown",
        })
    }
}

/// Budgets and report sizes.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Total time for the linearizability searches. Each key gets a fair share of what
    /// is left when its turn comes (`remaining / keys_left`), so time an easy key does
    /// not use goes to later keys and one hard key cannot starve the others. A key
    /// that runs out is `Unknown`, never `Valid`. Shrinking the window of a
    /// non-linearizable key gets its share again but at least `time_limit / 10`, so a
    /// run may exceed the limit by that much per invalid key. The counter and CDC
    /// checkers are polynomial and not budgeted.
    pub time_limit: Duration,
    /// Steps (search-loop iterations) allowed per search; exhausted → `Unknown`. The
    /// memo grows by at most one entry (~40 bytes) per step, usually far less: the
    /// default of 10⁸ is about 20 s of search and well under 1 GB.
    pub step_limit: u64,
    /// At most this many operations are printed per anomaly window (the last ones).
    pub window_ops: usize,
    /// At most this many anomalies are kept in [`Report::anomalies`] (all are counted).
    pub max_anomalies: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            time_limit: Duration::from_secs(60),
            step_limit: 100_000_000,
            window_ops: 30,
            max_anomalies: 100,
        }
    }
}

/// ok / fail / info counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeCounts {
    /// Completed `ok`.
    pub ok: usize,
    /// Completed `fail`.
    pub fail: usize,
    /// `info` or no completion.
    pub info: usize,
}

impl OutcomeCounts {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Fail => self.fail += 1,
            Outcome::Info => self.info += 1,
        }
    }
}

/// Operation counts, in total and per `f`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Number of operations.
    pub ops: usize,
    /// By outcome.
    #[serde(flatten)]
    pub outcomes: OutcomeCounts,
    /// By `f`, then outcome.
    pub by_f: BTreeMap<String, OutcomeCounts>,
}

impl Counts {
    /// Counts `ops`.
    pub fn of<'a>(ops: impl IntoIterator<Item = &'a Operation>) -> Counts {
        let mut c = Counts::default();
        for op in ops {
            c.ops += 1;
            c.outcomes.add(op.outcome);
            c.by_f.entry(op.f.clone()).or_default().add(op.outcome);
        }
        c
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.outcomes;
        write!(
            f,
            "{} ops (ok {}, fail {}, info {})",
            self.ops, o.ok, o.fail, o.info
        )
    }
}

/// One consistency violation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Anomaly {
    /// `linearizable`, `counter` or `cdc`.
    pub checker: String,
    /// What kind, e.g. `not-linearizable`, `lost-increment`, `stale-read-after-min-lsn`.
    pub kind: String,
    /// The key.
    pub key: String,
    /// A human explanation.
    pub message: String,
    /// The operations that show it, in invoke order (possibly truncated, see message).
    pub window: Vec<Operation>,
}

/// What one checker found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckerResult {
    /// `linearizable`, `counter` or `cdc`.
    pub name: String,
    /// Its verdict.
    pub valid: Validity,
    /// Keys it checked.
    pub keys: usize,
    /// Keys with an anomaly.
    pub keys_invalid: usize,
    /// Keys it could not decide.
    pub keys_unknown: usize,
    /// The operations it looked at.
    pub counts: Counts,
    /// Notes (budget exhausted, harness errors, missing final checks …).
    pub notes: Vec<String>,
    /// Wall time spent.
    pub elapsed_ms: u64,
}

/// Freshness statistics of a CDC run.
///
/// Staleness is measured per `ok` `db-write` W (value v, ok at time T) on key k:
/// W is a *sample* when some `ok` `cache-read` on k was invoked after T and before the
/// next `db-write` on k completed `ok`; its stale window is the largest
/// `R.complete − T` over `ok` `cache-read`s R on k (any `min_lsn` or none) invoked
/// after T that returned a numerically older version than v, and 0 when none did.
/// Percentiles are nearest-rank over the samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CdcStats {
    /// `ok` `db-write`s.
    pub db_writes: usize,
    /// `ok` `cache-read`s with a `min_lsn` (checked by the freshness rule).
    pub cache_reads_with_min_lsn: usize,
    /// `ok` `cache-read`s without one (only used for staleness).
    pub cache_reads_without_min_lsn: usize,
    /// `ok` `db-read`s (final checks after quiescence).
    pub final_checks: usize,
    /// Final checks followed by at least one `cache-read` with `min_lsn` ≥ their LSN.
    pub final_checks_verified: usize,
    /// `db-write`s that were staleness samples.
    pub staleness_samples: usize,
    /// Samples with a non-zero stale window.
    pub stale_writes: usize,
    /// Median stale window (ms).
    pub staleness_p50_ms: f64,
    /// 99th percentile stale window (ms).
    pub staleness_p99_ms: f64,
    /// Largest stale window (ms).
    pub staleness_max_ms: f64,
}

/// The result of checking a history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The combined verdict.
    pub valid: Validity,
    /// All operations of the history.
    pub counts: Counts,
    /// One entry per checker that ran.
    pub checkers: Vec<CheckerResult>,
    /// The first [`CheckOptions::max_anomalies`] anomalies.
    pub anomalies: Vec<Anomaly>,
    /// How many anomalies there were in all.
    pub anomaly_count: usize,
    /// CDC statistics, when the CDC checker ran.
    pub cdc: Option<CdcStats>,
    /// Notes about the history as a whole.
    pub notes: Vec<String>,
}

impl Report {
    /// `valid: false · 12345 ops (ok 11000, fail 300, info 45) · anomalies: 1`.
    pub fn summary(&self) -> String {
        format!(
            "valid: {} · {} · anomalies: {}",
            self.valid, self.counts, self.anomaly_count
        )
    }

    /// The summary, each checker's line, notes, CDC statistics and every kept anomaly
    /// with its window, one operation a line.
    pub fn details(&self) -> String {
        use std::fmt::Write as _;
        let mut s = self.summary();
        s.push('\n');
        for note in &self.notes {
            let _ = writeln!(s, "note: {note}");
        }
        for c in &self.checkers {
            let _ = writeln!(
                s,
                "{}: valid {} · {} keys (invalid {}, unknown {}) · {} · {} ms",
                c.name, c.valid, c.keys, c.keys_invalid, c.keys_unknown, c.counts, c.elapsed_ms
            );
            for note in &c.notes {
                let _ = writeln!(s, "  note: {note}");
            }
        }
        if let Some(c) = &self.cdc {
            let _ = writeln!(
                s,
                "cdc stats: cache-reads with min_lsn {}, without {} · final checks verified {}/{} · \
                 staleness over {} db-writes ({} stale): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                c.cache_reads_with_min_lsn,
                c.cache_reads_without_min_lsn,
                c.final_checks_verified,
                c.final_checks,
                c.staleness_samples,
                c.stale_writes,
                c.staleness_p50_ms,
                c.staleness_p99_ms,
                c.staleness_max_ms
            );
        }
        for (i, a) in self.anomalies.iter().enumerate() {
            let _ = writeln!(
                s,
                "anomaly {}: [{}] {} on key {:?}: {}",
                i + 1,
                a.checker,
                a.kind,
                a.key,
                a.message
            );
            for op in &a.window {
                let _ = writeln!(s, "    {op}");
            }
        }
        if self.anomaly_count > self.anomalies.len() {
            let _ = writeln!(
                s,
                "… {} more anomalies not shown",
                self.anomaly_count - self.anomalies.len()
            );
        }
        s
    }
}

/// The one-line [`summary`](Report::summary).
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Reads, pairs and checks a history file.
///
/// # Errors
/// When the file cannot be read or a line is malformed. Protocol violations found
/// while pairing give an `Unknown` report with a note instead.
pub fn check_file(path: impl AsRef<Path>, opts: &CheckOptions) -> anyhow::Result<Report> {
    Ok(check_history(&read_history(path)?, opts))
}

/// Pairs `events` and checks them; a history that violates the event protocol (see
/// [`pair`]) cannot be checked and gives `Unknown` with the reason in `notes`.
pub fn check_history(events: &[Event], opts: &CheckOptions) -> Report {
    match pair(events) {
        Ok(ops) => check_operations(&ops, opts),
        Err(e) => Report {
            valid: Validity::Unknown,
            counts: Counts::default(),
            checkers: Vec::new(),
            anomalies: Vec::new(),
            anomaly_count: 0,
            cdc: None,
            notes: vec![format!("history violates the event protocol: {e:#}")],
        },
    }
}

const REGISTER_FS: [&str; 4] = ["read", "write", "cas", "delete"];
const CDC_FS: [&str; 3] = ["db-write", "cache-read", "db-read"];

/// Checks paired operations (see the module docs for which checker sees what).
pub fn check_operations(ops: &[Operation], opts: &CheckOptions) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut counter_keys = Vec::new();
    let mut register_keys = Vec::new();
    let mut cdc_ops = Vec::new();
    for (key, kops) in &by_key {
        if kops.iter().any(|o| o.f == "incr") {
            counter_keys.push((*key, kops.as_slice()));
        } else if kops.iter().any(|o| REGISTER_FS.contains(&o.f.as_str())) {
            let reg: Vec<&Operation> = kops
                .iter()
                .copied()
                .filter(|o| REGISTER_FS.contains(&o.f.as_str()))
                .collect();
            register_keys.push((*key, reg));
        }
        cdc_ops.extend(kops.iter().filter(|o| CDC_FS.contains(&o.f.as_str())));
    }

    let mut checkers = Vec::new();
    let mut anomalies = Vec::new();
    let mut cdc_stats = None;
    let restarts = fresh::restarts(ops);
    if !register_keys.is_empty() {
        let started = Instant::now();
        let deadline = after(started, opts.time_limit);
        let mut res = KeyTally::new("linearizable");
        let n = register_keys.len();
        for (i, (key, kops)) in register_keys.iter().enumerate() {
            let keys_left = u32::try_from(n - i).unwrap_or(u32::MAX);
            let r = if restarts.is_empty() {
                linear::check_key(key, kops, opts, deadline, keys_left)
            } else {
                check_key_per_era(key, kops, &restarts, opts, deadline, keys_left)
            };
            res.add(key, r.valid, r.note, r.anomalies, &mut anomalies);
        }
        if !restarts.is_empty() {
            res.notes.push(format!(
                "{} fresh restart(s): each era between them checked on its own from an \
                 empty register (see check/fresh.rs)",
                restarts.len()
            ));
        }
        let ops = register_keys.iter().flat_map(|(_, k)| k.iter().copied());
        checkers.push(res.finish(ops, started));
        if !restarts.is_empty() {
            let started = Instant::now();
            let r = fresh::check(&register_keys, &restarts);
            let keys_invalid = r
                .anomalies
                .iter()
                .map(|a| a.key.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            let ops = register_keys.iter().flat_map(|(_, k)| k.iter().copied());
            checkers.push(CheckerResult {
                name: "no-old-cluster-values".into(),
                valid: r.valid,
                keys: r.keys,
                keys_invalid,
                keys_unknown: 0,
                counts: Counts::of(ops),
                notes: vec![format!(
                    "{} reads invoked after a fresh restart checked",
                    r.reads_checked
                )],
                elapsed_ms: millis(started.elapsed()),
            });
            anomalies.extend(r.anomalies);
        }
    }
    if !counter_keys.is_empty() {
        let started = Instant::now();
        let mut res = KeyTally::new("counter");
        for (key, kops) in &counter_keys {
            let r = counter::check_key(key, kops, opts);
            res.add(key, r.valid, r.note, r.anomalies, &mut anomalies);
        }
        let ops = counter_keys.iter().flat_map(|(_, k)| k.iter().copied());
        checkers.push(res.finish(ops, started));
    }
    if !cdc_ops.is_empty() {
        let started = Instant::now();
        let r = cdc::check(&cdc_ops);
        let keys_invalid = r
            .anomalies
            .iter()
            .map(|a| a.key.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        checkers.push(CheckerResult {
            name: "cdc".into(),
            valid: r.valid,
            keys: r.keys,
            keys_invalid,
            keys_unknown: 0,
            counts: Counts::of(cdc_ops.iter().copied()),
            notes: r.notes,
            elapsed_ms: millis(started.elapsed()),
        });
        anomalies.extend(r.anomalies);
        cdc_stats = Some(r.stats);
    }

    let mut notes = Vec::new();
    let mut valid = Validity::all(checkers.iter().map(|c| c.valid));
    if checkers.is_empty() {
        notes.push("no operation any checker understands".to_owned());
        valid = Validity::Unknown;
    }
    let anomaly_count = anomalies.len();
    anomalies.truncate(opts.max_anomalies);
    Report {
        valid,
        counts: Counts::of(ops),
        checkers,
        anomalies,
        anomaly_count,
        cdc: cdc_stats,
        notes,
    }
}

/// Per-key results of one checker, folded into a [`CheckerResult`].
struct KeyTally {
    name: &'static str,
    valid: Validity,
    keys: usize,
    keys_invalid: usize,
    keys_unknown: usize,
    notes: Vec<String>,
}

impl KeyTally {
    fn new(name: &'static str) -> Self {
        KeyTally {
            name,
            valid: Validity::Valid,
            keys: 0,
            keys_invalid: 0,
            keys_unknown: 0,
            notes: Vec::new(),
        }
    }

    fn add(
        &mut self,
        key: &str,
        valid: Validity,
        note: Option<String>,
        found: Vec<Anomaly>,
        all: &mut Vec<Anomaly>,
    ) {
        self.keys += 1;
        self.valid = self.valid.combine(valid);
        match valid {
            Validity::Invalid => self.keys_invalid += 1,
            Validity::Unknown => self.keys_unknown += 1,
            Validity::Valid => {}
        }
        if let Some(n) = note {
            self.notes.push(format!("key {key:?}: {n}"));
        }
        all.extend(found);
    }

    fn finish<'a>(
        self,
        ops: impl Iterator<Item = &'a Operation>,
        started: Instant,
    ) -> CheckerResult {
        CheckerResult {
            name: self.name.into(),
            valid: self.valid,
            keys: self.keys,
            keys_invalid: self.keys_invalid,
            keys_unknown: self.keys_unknown,
            counts: Counts::of(ops),
            notes: self.notes,
            elapsed_ms: millis(started.elapsed()),
        }
    }
}

/// Linearizability of one key across fresh restarts: each era on its own
/// ([`fresh::eras`] says why and how straddling operations are placed).
fn check_key_per_era(
    key: &str,
    kops: &[&Operation],
    restarts: &[fresh::Restart],
    opts: &CheckOptions,
    deadline: Instant,
    keys_left: u32,
) -> KeyResult {
    let mut out = KeyResult {
        valid: Validity::Valid,
        note: None,
        anomalies: Vec::new(),
    };
    let mut notes = Vec::new();
    for (e, era) in fresh::eras(kops, restarts).iter().enumerate() {
        let refs: Vec<&Operation> = era.iter().collect();
        let r = linear::check_key(key, &refs, opts, deadline, keys_left);
        out.valid = out.valid.combine(r.valid);
        if let Some(n) = r.note {
            notes.push(format!("era {e}: {n}"));
        }
        out.anomalies.extend(r.anomalies.into_iter().map(|mut a| {
            a.message = format!("era {e} (after {e} fresh restart(s)): {}", a.message);
            a
        }));
    }
    if !notes.is_empty() {
        out.note = Some(notes.join("; "));
    }
    out
}

/// The result of checking one key.
struct KeyResult {
    valid: Validity,
    note: Option<String>,
    anomalies: Vec<Anomaly>,
}

/// `start + d`, saturating (a huge `time_limit` means "no limit").
fn after(start: Instant, d: Duration) -> Instant {
    start
        .checked_add(d)
        .or_else(|| start.checked_add(Duration::from_secs(10 * 365 * 86_400)))
        .unwrap_or(start)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Keeps the last `max` of `window` and says so in `message`.
fn truncate_window(window: &mut Vec<Operation>, max: usize, message: &mut String) {
    if window.len() > max {
        message.push_str(&format!(
            " (showing the last {max} of {} ops)",
            window.len()
        ));
        window.drain(..window.len() - max);
    }
}

/// An integer from a JSON number or a decimal string.
fn as_int(v: &serde_json::Value) -> Option<i128> {
    match v {
        serde_json::Value::Number(n) => n.as_i64().map(i128::from),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
