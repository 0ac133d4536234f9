//! `raftcache-cdc verify`: shows that the cache agrees with Postgres.
//!
//! ```text
//! per mapped table: catalog (columns, paging key) ─► rows (a random sample, or every row
//!   in keyset pages) ─► keys (the mapping's templates) + expected value (update-mode
//!   JSON, or the table's `verify-value`) ─► MGet ─► equal | absent | differs
//! differs ─► recheck: `pg_current_wal_insert_lsn()` and the rows of the key in one
//!   statement ─► get_with_min_lsn(key, that LSN) ─► compare ─► again, with back-off,
//!   until it agrees or is absent (converged, after how long) or `--bound` has passed
//!   since the first disagreement (stale: named in the report)
//! ```
//!
//! A missing key is always fine for a cache. A disagreement is only counted as stale
//! once the cache has been read at a CDC watermark past the row it is compared with,
//! for `--bound`: a change in flight (committed in Postgres, not yet applied) converges.
//!
//! The pure parts (classification, nines, percentiles, the report and its text) are
//! synchronous and unit-tested in `verify/verify_test.rs`; the rest drives Postgres
//! (`tokio-postgres`, rate-limited) and the cache (`raftcache-client`).
//!
//! Values are read with `format('%s', column)`, which is the type's output function, so
//! they are the same text pgoutput streams to the worker (`t` for a boolean, where
//! `::text` would give `true`). Keys are rendered and rows encoded by the worker's own
//! code ([`crate::mapping`]).

use crate::config::{Config, Mode, TableMapping};
use crate::mapping::{Cell, KeyChange, Rendered, Row};
use crate::walsender::quote_ident;
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use raftcache_client::{Client, ClientConfig, ClientError, Lsn};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

/// Rows sampled per table by default.
pub const DEFAULT_SAMPLE: u64 = 1000;
/// Most rechecks in flight at once.
const RECHECK_CONCURRENCY: usize = 64;
/// Most rows that may derive one key, read by a recheck.
const RECHECK_ROWS: i64 = 16;
/// Most stale keys named in a report (all are counted).
pub const MAX_STALE_LISTED: usize = 1000;
/// How much of a value a report shows.
pub const VALUE_PREFIX_CHARS: usize = 64;
/// The longest one Postgres statement may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting to Postgres may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long past `--max-time` + `--bound` a round may run before what is still under
/// way is dropped.
const HARD_DEADLINE_GRACE: Duration = Duration::from_secs(5);
/// The shortest time a recheck's cache read may wait for the CDC watermark.
const MIN_WATERMARK_WAIT: Duration = Duration::from_millis(50);

/// Which rows are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This many random rows per table.
    Sample(u64),
    /// Every row, in pages by the table's primary key (or replica identity).
    All,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Sample(n) => write!(f, "a sample of {n} rows per table"),
            Scope::All => f.write_str("every row"),
        }
    }
}

/// What a verification checks and how hard it may press on Postgres.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Sample or every row.
    pub scope: Scope,
    /// Rows per page (and keys per cache read).
    pub page_size: u64,
    /// How long a disagreement may last before the key counts as stale.
    pub bound: Duration,
    /// Most Postgres statements per second.
    pub rate: f64,
    /// A round stops starting new pages after this long and reports what it has.
    pub max_time: Duration,
    /// Only these tables (`schema.table` or `table`); all mapped tables when empty.
    pub tables: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scope: Scope::Sample(DEFAULT_SAMPLE),
            page_size: 500,
            bound: Duration::from_secs(1),
            rate: 200.0,
            max_time: Duration::from_secs(300),
            tables: Vec::new(),
        }
    }
}

impl Options {
    /// Checks the ranges.
    ///
    /// # Errors
    /// A message naming the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if matches!(self.scope, Scope::Sample(0)) {
            bail!("--sample must be at least 1");
        }
        if self.page_size == 0 || self.page_size > 100_000 {
            bail!("--page-size must be between 1 and 100000");
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be a positive number of queries per second");
        }
        if self.bound.is_zero() {
            bail!("--bound must be above zero");
        }
        if self.max_time.is_zero() {
            bail!("--max-time must be above zero");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// The pure part: classification, tallies, nines, percentiles, the report.
// ---------------------------------------------------------------------------------

/// How a cached value compares with what the rows say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The cache holds an expected value.
    Equal,
    /// The cache does not hold the key (always fine for a cache).
    Absent,
    /// The cache holds something else (or a value for a key no row derives).
    Differs,
}

/// Compares `cached` with the values the rows deriving the key say it may hold
/// (`None` in `expected`: a row whose expected value is NULL, i.e. the key should not
/// be cached; an empty `expected`: no row derives the key).
pub fn classify(cached: Option<&[u8]>, expected: &[Option<Bytes>]) -> Verdict {
    match cached {
        None => Verdict::Absent,
        Some(v) if expected.iter().flatten().any(|e| e.as_ref() == v) => Verdict::Equal,
        Some(_) => Verdict::Differs,
    }
}

/// A key that still disagreed `--bound` after the first disagreement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaleKey {
    /// The key (lossy UTF-8).
    pub key: String,
    /// `schema.table`.
    pub table: String,
    /// The start of the cached value (`None`: the last read did not answer).
    pub cached: Option<String>,
    /// The start of the expected value (`None`: no row derives the key, so it should
    /// be absent).
    pub expected: Option<String>,
    /// The LSN the row was read at, together with `pg_current_wal_insert_lsn()`.
    pub row_lsn: Option<Lsn>,
    /// Why it is stale.
    pub reason: String,
}

/// What became of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOutcome {
    /// Agreed at once.
    Equal,
    /// Not in the cache.
    Absent,
    /// Disagreed first, then agreed (or went) this long after.
    Converged(Duration),
    /// Still disagreed after the bound.
    Stale(Box<StaleKey>),
}

/// Counts of keys by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Keys checked (the sum of the four below).
    pub checked: u64,
    /// Equal at once.
    pub equal: u64,
    /// Not in the cache.
    pub absent: u64,
    /// Disagreed, then agreed within the bound.
    pub converged: u64,
    /// Disagreed beyond the bound.
    pub stale: u64,
}

impl Counts {
    fn add(&mut self, outcome: &KeyOutcome) {
        self.checked += 1;
        match outcome {
            KeyOutcome::Equal => self.equal += 1,
            KeyOutcome::Absent => self.absent += 1,
            KeyOutcome::Converged(_) => self.converged += 1,
            KeyOutcome::Stale(_) => self.stale += 1,
        }
    }
}

/// What a table's keys are compared with: `"json"` (the row as update mode writes
/// it) or `"verify-value"` (the table's expression).
pub fn expectation(has_verify_value: bool) -> &'static str {
    if has_verify_value {
        "verify-value"
    } else {
        "json"
    }
}

/// One table's share of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// See [`expectation`].
    pub expected: &'static str,
    /// Rows read (first pass).
    pub rows: u64,
    /// Keys by outcome.
    #[serde(flatten)]
    pub counts: Counts,
}

/// A nearest-rank summary of durations, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    /// How many.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// The nearest-rank percentile `p` (0 < p ≤ 100) of sorted `values`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// p50, p99 and max of `durations`; `None` when there are none.
pub fn spread(durations: &[Duration]) -> Option<Spread> {
    if durations.is_empty() {
        return None;
    }
    let mut sorted = durations.to_vec();
    sorted.sort_unstable();
    // Milliseconds, to the microsecond.
    let ms = |d: Duration| d.as_micros() as f64 / 1e3;
    Some(Spread {
        count: sorted.len(),
        p50_ms: ms(percentile(&sorted, 50.0)),
        p99_ms: ms(percentile(&sorted, 99.0)),
        max_ms: ms(sorted[sorted.len() - 1]),
    })
}

/// Agreement in nines: `floor(-log10(stale / checked))` when some keys are stale, or
/// "at least" `floor(log10(checked))` when none is. Computed in integers (the largest
/// `k` with `max(stale, 1) · 10^k ≤ checked`), so 1 of 1000 is exactly 3. `None` when
/// nothing was checked.
pub fn nines(checked: u64, stale: u64) -> Option<Nines> {
    if checked == 0 {
        return None;
    }
    let denominator = u128::from(stale.max(1));
    let mut k = 0u32;
    let mut power: u128 = 10;
    while denominator * power <= u128::from(checked) {
        k += 1;
        power *= 10;
    }
    Some(Nines {
        nines: k,
        at_least: stale == 0,
    })
}

/// See [`nines`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nines {
    /// The number of nines.
    pub nines: u32,
    /// No stale key: the true figure is this or more (the sample is too small to say).
    pub at_least: bool,
}

/// `"≥ 4 nines (0 of 10000 stale beyond 1s)"`, `"3 nines (1 of 1000 stale beyond 1s)"`.
pub fn agreement(checked: u64, stale: u64, bound: Duration) -> String {
    let Some(n) = nines(checked, stale) else {
        return "no keys checked".to_owned();
    };
    format!(
        "{}{} nine{} ({stale} of {checked} stale beyond {})",
        if n.at_least { "≥ " } else { "" },
        n.nines,
        if n.nines == 1 { "" } else { "s" },
        humantime_serde::re::humantime::format_duration(bound)
    )
}

/// The first [`VALUE_PREFIX_CHARS`] characters of `bytes` (lossy UTF-8), with `…` when
/// cut.
pub fn prefix(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut chars = text.chars();
    let mut out: String = chars.by_ref().take(VALUE_PREFIX_CHARS).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// The result of one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `"all"` or `"sample"`.
    pub scope: &'static str,
    /// Rows asked per table when sampling.
    pub sample: Option<u64>,
    /// The bound, in milliseconds.
    pub bound_ms: u64,
    /// Keys by outcome, all tables.
    #[serde(flatten)]
    pub counts: Counts,
    /// See [`nines`] (`None`: nothing checked).
    pub nines: Option<u32>,
    /// No stale key: the nines are a lower bound.
    pub nines_at_least: bool,
    /// The sentence, as the text report prints it.
    pub agreement: String,
    /// How long the converged keys took to agree.
    pub convergence: Option<Spread>,
    /// Per table.
    pub tables: Vec<TableReport>,
    /// The stale keys (at most [`MAX_STALE_LISTED`]).
    pub stale_keys: Vec<StaleKey>,
    /// Stale keys counted but not listed.
    pub stale_keys_omitted: u64,
    /// Postgres statements made.
    pub queries: u64,
    /// How long the round took.
    pub elapsed_ms: u64,
    /// The round stopped at `--max-time` before checking everything.
    pub truncated: bool,
    /// Every convergence time (for the metrics; the JSON has [`Report::convergence`]).
    #[serde(skip)]
    pub convergence_times: Vec<Duration>,
}

/// Collects key outcomes into a [`Report`].
#[derive(Debug)]
pub struct Tally {
    scope: Scope,
    bound: Duration,
    counts: Counts,
    tables: Vec<TableReport>,
    convergence: Vec<Duration>,
    stale: Vec<StaleKey>,
    omitted: u64,
}

impl Tally {
    /// An empty tally for these tables (name, [`expectation`]).
    pub fn new(scope: Scope, bound: Duration, tables: &[(String, &'static str)]) -> Tally {
        Tally {
            scope,
            bound,
            counts: Counts::default(),
            tables: tables
                .iter()
                .map(|(table, expected)| TableReport {
                    table: table.clone(),
                    expected,
                    rows: 0,
                    counts: Counts::default(),
                })
                .collect(),
            convergence: Vec::new(),
            stale: Vec::new(),
            omitted: 0,
        }
    }

    /// Counts rows read from table `table`.
    pub fn rows(&mut self, table: usize, n: u64) {
        if let Some(t) = self.tables.get_mut(table) {
            t.rows += n;
        }
    }

    /// Records the outcome of one key of table `table`.
    pub fn record(&mut self, table: usize, outcome: KeyOutcome) {
        self.counts.add(&outcome);
        if let Some(t) = self.tables.get_mut(table) {
            t.counts.add(&outcome);
        }
        match outcome {
            KeyOutcome::Converged(d) => self.convergence.push(d),
            KeyOutcome::Stale(key) if self.stale.len() < MAX_STALE_LISTED => self.stale.push(*key),
            KeyOutcome::Stale(_) => self.omitted += 1,
            KeyOutcome::Equal | KeyOutcome::Absent => {}
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The report.
    pub fn finish(self, queries: u64, elapsed: Duration, truncated: bool) -> Report {
        let n = nines(self.counts.checked, self.counts.stale);
        Report {
            scope: match self.scope {
                Scope::All => "all",
                Scope::Sample(_) => "sample",
            },
            sample: match self.scope {
                Scope::All => None,
                Scope::Sample(n) => Some(n),
            },
            bound_ms: u64::try_from(self.bound.as_millis()).unwrap_or(u64::MAX),
            counts: self.counts,
            nines: n.map(|n| n.nines),
            nines_at_least: n.is_some_and(|n| n.at_least),
            agreement: agreement(self.counts.checked, self.counts.stale, self.bound),
            convergence: spread(&self.convergence),
            convergence_times: self.convergence,
            tables: self.tables,
            stale_keys: self.stale,
            stale_keys_omitted: self.omitted,
            queries,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            truncated,
        }
    }
}

/// `3.2ms`, `1.25s`.
fn ms_text(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1e3)
    }
}

impl Report {
    /// The report for people: a few lines, then every listed stale key.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let bound =
            humantime_serde::re::humantime::format_duration(Duration::from_millis(self.bound_ms));
        let scope = match self.sample {
            Some(n) => format!("sample of {n} rows per table"),
            None => "every row".to_owned(),
        };
        let _ = writeln!(
            out,
            "raftcache-cdc verify: {} table(s), {scope}, bound {bound}, {} queries in {}{}",
            self.tables.len(),
            self.queries,
            ms_text(self.elapsed_ms as f64),
            if self.truncated {
                " (stopped at --max-time: not every row was checked)"
            } else {
                ""
            }
        );
        let width = self.tables.iter().map(|t| t.table.len()).max().unwrap_or(0);
        for t in &self.tables {
            let c = &t.counts;
            let _ = writeln!(
                out,
                "  {:<width$}  {} rows  {} keys: {} equal, {} absent, {} converged, {} stale  \
                 (vs {})",
                t.table,
                t.rows,
                c.checked,
                c.equal,
                c.absent,
                c.converged,
                c.stale,
                match t.expected {
                    "json" => "the row as JSON",
                    other => other,
                }
            );
        }
        let c = &self.counts;
        let _ = writeln!(
            out,
            "checked {} keys: {} equal, {} absent, {} converged, {} stale",
            c.checked, c.equal, c.absent, c.converged, c.stale
        );
        let _ = writeln!(out, "agreement: {}", self.agreement);
        match &self.convergence {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "convergence of {} disagreement(s): p50 {}, p99 {}, max {}",
                    s.count,
                    ms_text(s.p50_ms),
                    ms_text(s.p99_ms),
                    ms_text(s.max_ms)
                );
            }
            None if c.stale == 0 => {
                let _ = writeln!(out, "convergence: no disagreement seen");
            }
            None => {
                let _ = writeln!(out, "convergence: no disagreement converged");
            }
        }
        if !self.stale_keys.is_empty() {
            let _ = writeln!(out, "stale keys ({}):", c.stale);
            for k in &self.stale_keys {
                let _ = writeln!(out, "  {}  ({})", k.key, k.table);
                let _ = writeln!(
                    out,
                    "    cached    {}",
                    k.cached
                        .as_ref()
                        .map_or("(not read)".to_owned(), |v| format!("{v:?}"))
                );
                let _ = writeln!(
                    out,
                    "    expected  {}",
                    k.expected
                        .as_ref()
                        .map_or("(absent: no row gives it a value)".to_owned(), |v| format!(
                            "{v:?}"
                        ))
                );
                let _ = writeln!(
                    out,
                    "    row lsn   {}  ({})",
                    k.row_lsn.map_or("?".to_owned(), |l| l.to_string()),
                    k.reason
                );
            }
            if self.stale_keys_omitted > 0 {
                let _ = writeln!(out, "  … and {} more", self.stale_keys_omitted);
            }
        }
        out
    }

    /// 0 when no key is stale, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.counts.stale > 0)
    }
}

// ---------------------------------------------------------------------------------
// Against Postgres and the cache.
// ---------------------------------------------------------------------------------

/// Spaces Postgres statements at least `1/rate` apart, across tasks.
#[derive(Debug)]
struct RateLimit {
    period: Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
    count: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    fn new(rate: f64) -> RateLimit {
        RateLimit {
            period: Duration::from_secs_f64(1.0 / rate.max(1e-3)),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    async fn acquire(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + self.period;
            at
        };
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep_until(at).await;
    }

    fn queries(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A SQL connection whose task ends with it.
struct Pg {
    client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect_pg(url: &str) -> anyhow::Result<Pg> {
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| anyhow!("connecting to Postgres: timed out after {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| anyhow!("connecting to Postgres: {}", pg_error(&e)))?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "SQL connection ended");
        }
    });
    Ok(Pg { client, task })
}

/// A Postgres error on one line, with the server's message when there is one.
fn pg_error(e: &tokio_postgres::Error) -> String {
    let mut text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    };
    text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    text
}

/// Runs one statement under the rate limit and [`QUERY_TIMEOUT`].
async fn query(
    pg: &tokio_postgres::Client,
    limit: &RateLimit,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
    what: &str,
) -> anyhow::Result<Vec<tokio_postgres::Row>> {
    limit.acquire().await;
    match tokio::time::timeout(QUERY_TIMEOUT, pg.query(statement, params)).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(anyhow!("{what}: {}", pg_error(&e))),
        Err(_) => Err(anyhow!("{what}: no answer within {QUERY_TIMEOUT:?}")),
    }
}

/// Prepares `sql` under the rate limit.
async fn prepare(
    pg: &tokio_postgres::Client,
    limit: &RateLimit,
    sql: &str,
    what: &str,
) -> anyhow::Result<tokio_postgres::Statement> {
    limit.acquire().await;
    match tokio::time::timeout(QUERY_TIMEOUT, pg.prepare(sql)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(anyhow!("{what}: {}", pg_error(&e))),
        Err(_) => Err(anyhow!("{what}: no answer within {QUERY_TIMEOUT:?}")),
    }
}

/// A text column of a result row, checked.
fn text_at(row: &tokio_postgres::Row, i: usize) -> anyhow::Result<Option<String>> {
    row.try_get::<_, Option<String>>(i)
        .map_err(|e| anyhow!("reading column {i} of a result: {e}"))
}

/// How a table's rows become keys and expected values (no database needed).
#[derive(Debug, Clone)]
struct Shape {
    /// The mapping, in update mode: its `on_insert` gives every key with the JSON the
    /// worker writes.
    encoder: TableMapping,
    /// Columns in table order (what pgoutput sends: not dropped, not generated).
    columns: Vec<String>,
    /// Whether a `verify-value` column follows the columns.
    has_verify_value: bool,
}

/// A mapped table as one round checks it.
struct Plan {
    /// Index in the report.
    index: usize,
    /// `schema.table`, for people.
    name: String,
    /// Keys and expected values.
    shape: Shape,
    /// Paging: positions in `values` of the key columns, or `None` for
    /// `(tableoid, ctid)` (two extra select items after everything else).
    cursor_columns: Option<Vec<usize>>,
    /// Per template: a statement reading `pg_current_wal_insert_lsn()` and the rows
    /// that derive a key of it (parameters: the template's column values, in order).
    rechecks: Vec<tokio_postgres::Statement>,
    /// The first page, and the next ones (keyset).
    first_page: tokio_postgres::Statement,
    next_page: tokio_postgres::Statement,
    /// The random sample.
    sample: tokio_postgres::Statement,
}

/// A row read from Postgres.
struct Fetched {
    values: Vec<Option<String>>,
    verify: Option<String>,
    cursor: Vec<String>,
}

/// One key to check: where it comes from and what it should be.
struct Entry {
    key: Bytes,
    /// The template that rendered it (the recheck reads the rows by its columns).
    template: usize,
    /// The template's column values for this key.
    params: Vec<String>,
    /// What the deriving rows say it may hold.
    expected: Vec<Option<Bytes>>,
}

impl Plan {
    /// Decodes a result row whose select list starts at `offset`.
    fn fetched(&self, row: &tokio_postgres::Row, offset: usize) -> anyhow::Result<Fetched> {
        let n = self.shape.columns.len();
        let values = (0..n)
            .map(|i| text_at(row, offset + i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut next = offset + n;
        let verify = if self.shape.has_verify_value {
            next += 1;
            text_at(row, next - 1)?
        } else {
            None
        };
        let cursor = match &self.cursor_columns {
            Some(cols) => cols
                .iter()
                .map(|&c| values.get(c).cloned().flatten())
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| anyhow!("{}: a NULL in the paging key", self.name))?,
            None => vec![
                text_at(row, next)?.unwrap_or_default(),
                text_at(row, next + 1)?.unwrap_or_default(),
            ],
        };
        Ok(Fetched {
            values,
            verify,
            cursor,
        })
    }
}

impl Shape {
    fn new(map: &TableMapping, columns: Vec<String>, has_verify_value: bool) -> Shape {
        let mut encoder = map.clone();
        encoder.mode = Mode::Update;
        Shape {
            encoder,
            columns,
            has_verify_value,
        }
    }

    /// The keys a row derives, each with the value the row says it should hold.
    fn entries(&self, f: &Fetched) -> Vec<Entry> {
        let row = Row::new(self.columns.iter().zip(&f.values).map(|(name, v)| {
            let cell = match v {
                Some(t) => Cell::Text(t.as_bytes()),
                None => Cell::Null,
            };
            (name.as_str(), cell)
        }));
        let expected: Option<Bytes> = if self.has_verify_value {
            f.verify
                .as_ref()
                .map(|v| Bytes::copy_from_slice(v.as_bytes()))
        } else {
            self.encoder
                .on_insert(&row)
                .into_iter()
                .find_map(|c| match c {
                    KeyChange::Put(_, json) => Some(json),
                    _ => None,
                })
        };
        let mut out = Vec::new();
        for (i, template) in self.encoder.keys.iter().enumerate() {
            if let Rendered::Key(key) = template.render(|c| row.cell(c)) {
                let params = template
                    .columns()
                    .map(|c| match row.cell(c) {
                        Cell::Text(t) => String::from_utf8_lossy(t).into_owned(),
                        Cell::Null | Cell::Unknown => String::new(),
                    })
                    .collect();
                out.push(Entry {
                    key,
                    template: i,
                    params,
                    expected: vec![expected.clone()],
                });
            }
        }
        out
    }
}

/// The result list: `CASE … format('%s', col)` per column (the type's output function,
/// as pgoutput sends it; NULL kept), then the verify value, then `(tableoid, ctid)`.
fn select_list(
    columns: &[String],
    verify_value: Option<&str>,
    tid_cursor: bool,
) -> anyhow::Result<String> {
    let mut items = Vec::new();
    for (i, c) in columns.iter().enumerate() {
        let q = quote_ident(c)?;
        items.push(format!(
            "CASE WHEN num_nulls(t.{q}) = 1 THEN NULL ELSE format('%s', t.{q}) END AS c{i}"
        ));
    }
    if let Some(v) = verify_value {
        items.push(format!("(({v}))::text AS verify_value"));
    }
    if tid_cursor {
        items.push("t.tableoid::text AS cursor_oid".to_owned());
        items.push("t.ctid::text AS cursor_tid".to_owned());
    }
    Ok(items.join(", "))
}

/// The `TABLESAMPLE` clause of a sample of `wanted` rows from a table of about
/// `estimated` rows: none (a full scan in random order) unless the table is large
/// (over 100,000 rows and 10× the sample), then `SYSTEM` blocks for about four times the
/// rows wanted (a scan of a few pages, not the whole table).
pub fn sample_clause(estimated: f64, wanted: u64) -> String {
    let wanted = wanted as f64;
    if !(estimated.is_finite() && estimated > 100_000.0 && estimated > 10.0 * wanted) {
        return String::new();
    }
    let percent = (400.0 * wanted / estimated).clamp(0.0001, 100.0);
    format!(" TABLESAMPLE SYSTEM ({percent:.4})")
}

/// Checks every mapped table (or those chosen) against the cache, round after round.
pub struct Verifier {
    url: String,
    tables: Vec<(TableMapping, Option<String>)>,
    cache: Client,
    options: Options,
    pg: Option<Pg>,
}

impl Verifier {
    /// Validates the mapping and the options, and connects to Postgres and the cache.
    ///
    /// # Errors
    /// A bad configuration or option, an unknown `--table`, Postgres or the cache
    /// unreachable.
    pub async fn connect(config: &Config, options: Options) -> anyhow::Result<Verifier> {
        options.validate()?;
        let maps = config.mappings()?;
        let mut tables: Vec<(TableMapping, Option<String>)> = maps
            .into_iter()
            .zip(config.table.iter().map(|t| t.verify_value.clone()))
            .collect();
        if !options.tables.is_empty() {
            for wanted in &options.tables {
                if !tables.iter().any(|(m, _)| table_matches(m, wanted)) {
                    bail!("--table {wanted}: no such [[table]] in the configuration");
                }
            }
            tables.retain(|(m, _)| options.tables.iter().any(|w| table_matches(m, w)));
        }
        let pg = connect_pg(&config.postgres.url).await?;
        let cache = Client::connect(ClientConfig::new(config.cache.endpoints.clone()))
            .await
            .map_err(|e| anyhow!("connecting to the cache: {e}"))?;
        Ok(Verifier {
            url: config.postgres.url.clone(),
            tables,
            cache,
            options,
            pg: Some(pg),
        })
    }

    /// The SQL connection, opened again when it was lost.
    async fn pg(&mut self) -> anyhow::Result<&tokio_postgres::Client> {
        if self.pg.as_ref().is_none_or(|p| p.client.is_closed()) {
            self.pg = None;
            self.pg = Some(connect_pg(&self.url).await?);
        }
        self.pg
            .as_ref()
            .map(|p| &p.client)
            .ok_or_else(|| anyhow!("no Postgres connection"))
    }

    /// One round: every table, then the report. Stops starting pages at `--max-time`
    /// (rechecks under way still run to their bound).
    ///
    /// # Errors
    /// A Postgres or cache error (the round is abandoned).
    pub async fn round(&mut self) -> anyhow::Result<Report> {
        let started = Instant::now();
        let deadline = started + self.options.max_time;
        // Past the soft deadline no page starts; rechecks under way get their bound
        // and a little more, then whatever is still running is dropped.
        let hard_deadline = deadline + self.options.bound + HARD_DEADLINE_GRACE;
        let limit = RateLimit::new(self.options.rate);
        let names: Vec<(String, &'static str)> = self
            .tables
            .iter()
            .map(|(m, v)| {
                (
                    format!("{}.{}", m.schema, m.table),
                    expectation(v.is_some()),
                )
            })
            .collect();
        let mut tally = Tally::new(self.options.scope, self.options.bound, &names);
        let tables = self.tables.clone();
        let options = self.options.clone();
        let cache = self.cache.clone();
        let pg = self.pg().await?;
        let mut truncated = false;
        for (index, (map, verify_value)) in tables.iter().enumerate() {
            if Instant::now() >= deadline {
                truncated = true;
                break;
            }
            let table = Table {
                pg,
                cache: &cache,
                limit: &limit,
                options: &options,
                index,
                map,
                verify_value: verify_value.as_deref(),
                deadline,
            };
            let hard = tokio::time::Instant::from_std(hard_deadline);
            match tokio::time::timeout_at(hard, table.check(&mut tally)).await {
                Ok(Ok(complete)) => truncated |= !complete,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    truncated = true;
                    break;
                }
            }
        }
        Ok(tally.finish(limit.queries(), started.elapsed(), truncated))
    }

    /// Rounds every `interval` (start to start) until `shutdown`; `each` gets every
    /// report or round error. Exports the figures through [`crate::verify_metrics`]
    /// (install the exporter first).
    pub async fn watch(
        &mut self,
        interval: Duration,
        shutdown: CancellationToken,
        mut each: impl FnMut(&anyhow::Result<Report>),
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.round() => r,
            };
            match &result {
                Ok(report) => crate::verify_metrics::round(report),
                Err(_) => crate::verify_metrics::round_failed(),
            }
            each(&result);
        }
    }
}

/// One table of one round.
struct Table<'a> {
    pg: &'a tokio_postgres::Client,
    cache: &'a Client,
    limit: &'a RateLimit,
    options: &'a Options,
    index: usize,
    map: &'a TableMapping,
    verify_value: Option<&'a str>,
    /// No page starts after it.
    deadline: Instant,
}

impl Table<'_> {
    /// Reads the table's rows (a sample or every page) and checks their keys;
    /// `false` when the deadline stopped it early.
    async fn check(&self, tally: &mut Tally) -> anyhow::Result<bool> {
        let options = self.options;
        let (pg, limit) = (self.pg, self.limit);
        let sample_size = match options.scope {
            Scope::Sample(n) => n,
            Scope::All => 0,
        };
        let plan = plan(
            pg,
            limit,
            self.index,
            self.map,
            self.verify_value,
            sample_size,
        )
        .await?;
        let run = Run {
            pg,
            cache: self.cache,
            limit,
            plan: &plan,
            bound: options.bound,
        };
        let page = i64::try_from(options.page_size).unwrap_or(i64::MAX);
        let chunk = usize::try_from(options.page_size).unwrap_or(usize::MAX);
        match options.scope {
            Scope::All => {
                let mut cursor: Option<Vec<String>> = None;
                loop {
                    if Instant::now() >= self.deadline {
                        return Ok(false);
                    }
                    let rows = match &cursor {
                        None => query(pg, limit, &plan.first_page, &[&page], &plan.name).await?,
                        Some(c) => {
                            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&page];
                            params.extend(c.iter().map(|v| v as &(dyn ToSql + Sync)));
                            query(pg, limit, &plan.next_page, &params, &plan.name).await?
                        }
                    };
                    let fetched = rows
                        .iter()
                        .map(|r| plan.fetched(r, 0))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let Some(last) = fetched.last() else {
                        return Ok(true);
                    };
                    cursor = Some(last.cursor.clone());
                    let full = fetched.len() >= chunk;
                    run.check(&fetched, tally).await?;
                    if !full {
                        return Ok(true);
                    }
                }
            }
            Scope::Sample(n) => {
                let n = i64::try_from(n).unwrap_or(i64::MAX);
                let rows = query(pg, limit, &plan.sample, &[&n], &plan.name).await?;
                let fetched = rows
                    .iter()
                    .map(|r| plan.fetched(r, 0))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                for piece in fetched.chunks(chunk.max(1)) {
                    if Instant::now() >= self.deadline {
                        return Ok(false);
                    }
                    run.check(piece, tally).await?;
                }
                Ok(true)
            }
        }
    }
}

fn table_matches(m: &TableMapping, wanted: &str) -> bool {
    match wanted.split_once('.') {
        Some((s, t)) => m.schema == s && m.table == t,
        None => m.schema == "public" && m.table == wanted,
    }
}

/// Reads the catalog for `map` and prepares its statements.
async fn plan(
    pg: &tokio_postgres::Client,
    limit: &RateLimit,
    index: usize,
    map: &TableMapping,
    verify_value: Option<&str>,
    sample_size: u64,
) -> anyhow::Result<Plan> {
    let name = format!("{}.{}", map.schema, map.table);
    let catalog = |sql: &'static str| async move {
        let statement = prepare(pg, limit, sql, "reading the catalog").await?;
        Ok::<_, anyhow::Error>(statement)
    };
    let table = catalog(
        "SELECT c.oid, current_setting('server_version_num')::int, c.reltuples::float8 \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
    )
    .await?;
    let rows = query(pg, limit, &table, &[&map.schema, &map.table], &name).await?;
    let Some(row) = rows.first() else {
        bail!("mapped table {name} does not exist in Postgres");
    };
    let oid: u32 = row.try_get(0).context("pg_class.oid")?;
    let version: i32 = row.try_get(1).context("server_version_num")?;
    let estimated_rows: f64 = row.try_get(2).context("pg_class.reltuples")?;
    // Generated columns are not streamed by pgoutput (before PostgreSQL 18, and by
    // default since), so they are not in the worker's JSON either.
    let columns_sql = if version >= 120_000 {
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' \
         ORDER BY attnum"
    } else {
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    };
    let statement = catalog(columns_sql).await?;
    let mut columns: Vec<(String, String)> = Vec::new();
    for r in query(pg, limit, &statement, &[&oid], &name).await? {
        columns.push((
            r.try_get(0).context("attname")?,
            r.try_get(1).context("format_type")?,
        ));
    }
    let type_of = |c: &str| columns.iter().find(|(n, _)| n == c).map(|(_, t)| t.clone());
    for template in &map.keys {
        for c in template.columns() {
            if type_of(c).is_none() {
                bail!(
                    "key template {:?} of {name} names column {c:?}, which the table does not have",
                    template.source()
                );
            }
        }
    }
    // The paging key: the primary key, else the replica identity index.
    let statement = catalog(
        "SELECT a.attname::text FROM pg_index i \
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = $1 AND (CASE WHEN $2 THEN i.indisprimary ELSE i.indisreplident END) \
         ORDER BY k.ord",
    )
    .await?;
    let mut key: Vec<String> = Vec::new();
    for primary in [true, false] {
        key = query(pg, limit, &statement, &[&oid, &primary], &name)
            .await?
            .iter()
            .map(|r| r.try_get::<_, String>(0).context("attname"))
            .collect::<anyhow::Result<_>>()?;
        if !key.is_empty() {
            break;
        }
    }
    let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
    let cursor_columns = if key.is_empty() || key.iter().any(|k| !names.contains(k)) {
        None
    } else {
        Some(
            key.iter()
                .filter_map(|k| names.iter().position(|n| n == k))
                .collect::<Vec<usize>>(),
        )
    };
    let list = select_list(&names, verify_value, cursor_columns.is_none())?;
    let table_sql = map.sql_name()?;
    let (order, row_expr, param_expr) = match &cursor_columns {
        Some(_) => {
            let mut order = Vec::new();
            let mut params = Vec::new();
            for (i, k) in key.iter().enumerate() {
                order.push(format!("t.{}", quote_ident(k)?));
                params.push(format!(
                    "${}::text::{}",
                    i + 2,
                    type_of(k).unwrap_or_else(|| "text".to_owned())
                ));
            }
            (order.join(", "), order.join(", "), params.join(", "))
        }
        None => (
            "t.tableoid, t.ctid".to_owned(),
            "t.tableoid, t.ctid".to_owned(),
            "$2::text::oid, $3::text::tid".to_owned(),
        ),
    };
    let what = |s: &str| format!("{name}: {s}");
    let first_page = prepare(
        pg,
        limit,
        &format!("SELECT {list} FROM {table_sql} AS t ORDER BY {order} LIMIT $1"),
        &what("preparing the page query"),
    )
    .await?;
    let next_page = prepare(
        pg,
        limit,
        &format!(
            "SELECT {list} FROM {table_sql} AS t WHERE ({row_expr}) > ({param_expr}) \
             ORDER BY {order} LIMIT $1"
        ),
        &what("preparing the page query"),
    )
    .await?;
    let sample = prepare(
        pg,
        limit,
        &format!(
            "SELECT {list} FROM {table_sql} AS t{} ORDER BY random() LIMIT $1",
            sample_clause(estimated_rows, sample_size)
        ),
        &what("preparing the sample query"),
    )
    .await?;
    let mut rechecks = Vec::new();
    for template in &map.keys {
        let mut conds = Vec::new();
        for (i, c) in template.columns().enumerate() {
            let ty = type_of(c).unwrap_or_else(|| "text".to_owned());
            conds.push(format!("t.{} = ${}::text::{ty}", quote_ident(c)?, i + 1));
        }
        let cond = if conds.is_empty() {
            "true".to_owned()
        } else {
            conds.join(" AND ")
        };
        let sql = format!(
            "SELECT l.lsn, r.* FROM (SELECT pg_current_wal_insert_lsn()::text AS lsn) AS l \
             LEFT JOIN LATERAL (SELECT true AS found, {list} FROM {table_sql} AS t WHERE {cond} \
             LIMIT {RECHECK_ROWS}) AS r ON true"
        );
        let statement = prepare(pg, limit, &sql, &what("preparing the recheck query")).await?;
        rechecks.push(statement);
    }
    Ok(Plan {
        index,
        name,
        shape: Shape::new(map, names, verify_value.is_some()),
        cursor_columns,
        rechecks,
        first_page,
        next_page,
        sample,
    })
}

/// What one table's checks share.
struct Run<'a> {
    pg: &'a tokio_postgres::Client,
    cache: &'a Client,
    limit: &'a RateLimit,
    plan: &'a Plan,
    bound: Duration,
}

impl Run<'_> {
    /// Checks the keys of `rows`: one cache read for all, then a recheck of each key
    /// that disagrees.
    async fn check(&self, rows: &[Fetched], tally: &mut Tally) -> anyhow::Result<()> {
        tally.rows(self.plan.index, rows.len() as u64);
        // One entry per key (several rows, or templates, may derive one key).
        let mut entries: Vec<Entry> = Vec::new();
        let mut seen: HashMap<Bytes, usize> = HashMap::new();
        for row in rows {
            for e in self.plan.shape.entries(row) {
                match seen.get(&e.key) {
                    Some(&i) => entries[i].expected.extend(e.expected),
                    None => {
                        seen.insert(e.key.clone(), entries.len());
                        entries.push(e);
                    }
                }
            }
        }
        if entries.is_empty() {
            return Ok(());
        }
        let keys: Vec<&Bytes> = entries.iter().map(|e| &e.key).collect();
        let cached = self
            .cache
            .mget(&keys)
            .await
            .map_err(|e| anyhow!("reading the cache: {e}"))?;
        let read_at = Instant::now();
        let mut differing = Vec::new();
        for (entry, value) in entries.iter().zip(cached) {
            let value = value.map(|v| v.value);
            match classify(value.as_deref(), &entry.expected) {
                Verdict::Equal => tally.record(self.plan.index, KeyOutcome::Equal),
                Verdict::Absent => tally.record(self.plan.index, KeyOutcome::Absent),
                Verdict::Differs => differing.push((entry, value)),
            }
        }
        let mut results = futures::stream::iter(differing)
            .map(|(entry, value)| self.recheck(entry, value, read_at))
            .buffer_unordered(RECHECK_CONCURRENCY);
        while let Some(outcome) = results.next().await {
            tally.record(self.plan.index, outcome?);
        }
        Ok(())
    }

    /// Re-reads the rows of `entry.key` with the WAL insert position, then the key at
    /// a watermark past it, until they agree or `bound` has passed since `since`.
    async fn recheck(
        &self,
        entry: &Entry,
        first: Option<Bytes>,
        since: Instant,
    ) -> anyhow::Result<KeyOutcome> {
        let statement = self
            .plan
            .rechecks
            .get(entry.template)
            .ok_or_else(|| anyhow!("no recheck statement for template {}", entry.template))?;
        let params: Vec<&(dyn ToSql + Sync)> = entry
            .params
            .iter()
            .map(|p| p as &(dyn ToSql + Sync))
            .collect();
        let mut last_cached = first;
        let mut last_expected: Vec<Option<Bytes>>;
        let mut last_lsn: Lsn;
        let mut reason;
        let mut pause = Duration::from_millis(10);
        loop {
            let rows = query(
                self.pg,
                self.limit,
                statement,
                &params,
                &format!("{}: recheck", self.plan.name),
            )
            .await?;
            let mut lsn: Option<Lsn> = None;
            let mut expected = Vec::new();
            for r in &rows {
                if lsn.is_none() {
                    let text = text_at(r, 0)?.unwrap_or_default();
                    lsn = Some(
                        text.parse()
                            .map_err(|e| anyhow!("pg_current_wal_insert_lsn(): {e}"))?,
                    );
                }
                // `found` is NULL when no row derives the key (the LEFT JOIN's filler).
                let found: Option<bool> = r.try_get(1).context("recheck: found")?;
                if found != Some(true) {
                    continue;
                }
                let f = self.plan.fetched(r, 2)?;
                for e in self.plan.shape.entries(&f) {
                    if e.key == entry.key {
                        expected.extend(e.expected);
                    }
                }
            }
            let lsn = lsn.ok_or_else(|| anyhow!("recheck: no WAL position in the answer"))?;
            last_lsn = lsn;
            let wait = self
                .bound
                .saturating_sub(since.elapsed())
                .max(MIN_WATERMARK_WAIT);
            match tokio::time::timeout(wait, self.cache.get_with_min_lsn(&entry.key, lsn)).await {
                Ok(Ok(value)) => {
                    let value = value.map(|v| v.value);
                    match classify(value.as_deref(), &expected) {
                        Verdict::Equal | Verdict::Absent => {
                            return Ok(KeyOutcome::Converged(since.elapsed()));
                        }
                        Verdict::Differs => {
                            last_cached = value;
                            reason = "the value differs".to_owned();
                        }
                    }
                }
                Ok(Err(ClientError::LsnNotReached { .. })) | Err(_) => {
                    reason =
                        format!("CDC did not apply WAL up to {lsn} on the key's partition in time");
                }
                Ok(Err(e)) => return Err(anyhow!("reading the cache: {e}")),
            }
            last_expected = expected;
            if since.elapsed() >= self.bound {
                break;
            }
            let left = self.bound.saturating_sub(since.elapsed());
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
        Ok(KeyOutcome::Stale(Box::new(StaleKey {
            key: String::from_utf8_lossy(&entry.key).into_owned(),
            table: self.plan.name.clone(),
            cached: last_cached.as_deref().map(prefix),
            expected: last_expected.iter().flatten().next().map(|v| prefix(v)),
            row_lsn: Some(last_lsn),
            reason,
        })))
    }
}

#[cfg(test)]
#[path = "verify/verify_test.rs"]
mod tests;
