//! The history of a Jepsen-style run: JSON Lines, one operation event a line, in the
//! order the events happened (`shared/HISTORY_FORMAT.md`).
//!
//! - [`HistoryWriter`] appends events from many tasks at once and stamps `index` and
//!   `time_ns` itself, so file order and time order agree.
//! - [`read_history`] / [`parse_history`] load a file back ([`Event`]s).
//! - [`pair`] turns events into [`Operation`]s (one invoke plus at most one
//!   completion; a missing completion is `info`), checking the protocol.
//!
//! ```text
//! workload ─► HistoryWriter ─► run.jsonl ─► read_history ─► pair ─► check::check_operations
//! ```
//!
//! # Extensions to the shared format
//! Readers ignore unknown fields and the checkers ignore unknown `f`s, so these stay
//! compatible with other tools:
//! - `consistency` (optional, on `read` events): the read mode asked for, e.g.
//!   `"linearizable"` or `"lease"`. Informational: every read is checked as
//!   linearizable.
//! - `f: "db-read"`: the harness's final read of a row after the run quiesced. The
//!   invoke value is `null`; the `ok` value is the row's value and its `lsn` is the WAL
//!   LSN at that time. The CDC checker treats it like an `ok` `db-write` of that version
//!   at that LSN (later `cache-read`s with `min_lsn` ≥ it must return it or `null`) and
//!   counts it as a final check.
//! - `f: "cache-fill"`: the application filled the cache (cache-aside); `value` is the
//!   value filled and `lsn` its source LSN. Informational, ignored by the checkers.
//! - CDC values are decimal integer strings that grow per key in commit order (the
//!   row's version), so "older" means numerically smaller. Values that do not parse as
//!   integers are only compared for equality and are never called older.
//! - The nemesis log is a separate file, not part of the history — except
//!   `f: "fresh-restart"` (process `nemesis::NEMESIS_PROCESS`, key `""`): invoked when
//!   the nemesis starts killing every node but one, completed as `info` when a new
//!   cluster is up on their addresses, with `value.ready_ns` = that time. The register
//!   checker needs it from the file alone (`check/fresh.rs`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A Postgres WAL position (`HI/LO` in hex), the client crate's type.
pub use raftcache_client::Lsn;

/// The `type` of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// The operation starts.
    Invoke,
    /// It took effect and its result is known.
    Ok,
    /// It certainly did not take effect.
    Fail,
    /// Unknown whether it took effect (timeout, connection lost).
    Info,
}

/// One line of a history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// 0, 1, 2 … in file order.
    pub index: u64,
    /// The logical client; it runs one operation at a time.
    pub process: u64,
    /// invoke / ok / fail / info.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The operation: `read`, `write`, `cas`, `delete`, `incr`, `db-write`,
    /// `cache-read`, `db-read`, `cache-fill`, or anything else (ignored by checkers).
    pub f: String,
    /// The key.
    pub key: String,
    /// The argument or result; its shape depends on `f` (see the module docs).
    #[serde(default)]
    pub value: Value,
    /// Monotonic nanoseconds since the start of the run.
    pub time_ns: u64,
    /// The node that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A Postgres LSN: the commit LSN of a `db-write`/`db-read` completion, or the
    /// `min_lsn` a `cache-read` invoke asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Why a `fail`/`info` happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Read mode (extension, informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Took effect, result known.
    Ok,
    /// Certainly did not take effect.
    Fail,
    /// Unknown (also: no completion in the file).
    Info,
}

impl Outcome {
    fn event_type(self) -> EventType {
        match self {
            Outcome::Ok => EventType::Ok,
            Outcome::Fail => EventType::Fail,
            Outcome::Info => EventType::Info,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Info => "info",
        })
    }
}

/// Optional fields of an event, built with the `with_*` methods:
/// `Extra::default().with_node("n2").with_lsn(lsn)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extra {
    /// See [`Event::node`].
    pub node: Option<String>,
    /// See [`Event::lsn`].
    pub lsn: Option<String>,
    /// See [`Event::error`].
    pub error: Option<String>,
    /// See [`Event::consistency`].
    pub consistency: Option<String>,
}

impl Extra {
    /// Sets the answering node.
    pub fn with_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }
    /// Sets the LSN (an [`Lsn`] or an `HI/LO` string).
    pub fn with_lsn(mut self, lsn: impl fmt::Display) -> Self {
        self.lsn = Some(lsn.to_string());
        self
    }
    /// Sets the error text.
    pub fn with_error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }
    /// Sets the read mode.
    pub fn with_consistency(mut self, mode: impl Into<String>) -> Self {
        self.consistency = Some(mode.into());
        self
    }
}

/// An invoked operation waiting for its one completion. Pass it by value to
/// [`HistoryWriter::complete`] (or `ok`/`fail`/`info`); a handle that is dropped
/// instead leaves the operation without completion, which counts as `info`.
#[must_use = "complete the operation (a dropped handle counts as info)"]
#[derive(Debug)]
pub struct OpHandle {
    process: u64,
    f: String,
    key: String,
    value: Value,
    index: u64,
}

impl OpHandle {
    /// The process that invoked it.
    pub fn process(&self) -> u64 {
        self.process
    }
    /// The `index` of the invoke event.
    pub fn index(&self) -> u64 {
        self.index
    }
}

/// Thread-safe append-only JSONL writer. Every method takes `&self` (share it in an
/// `Arc`); `index` and `time_ns` are assigned under one lock, so they grow together
/// in file order. Output is buffered and flushed at least every 100 ms of activity,
/// by [`flush`](Self::flush), and on drop.
///
/// I/O errors do not interrupt a workload: the first one is kept and returned by the
/// next [`flush`](Self::flush), which a harness calls at the end of a run.
pub struct HistoryWriter {
    start: Instant,
    inner: Mutex<WriterInner>,
}

struct WriterInner {
    out: BufWriter<Box<dyn Write + Send>>,
    next_index: u64,
    last_flush: Instant,
    error: Option<io::Error>,
}

const FLUSH_EVERY: Duration = Duration::from_millis(100);

impl HistoryWriter {
    /// Creates (truncates) the file at `path`; its clock starts now.
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn create(path: impl AsRef<Path>) -> Result<HistoryWriter> {
        let path = path.as_ref();
        let file = File::create(path).with_context(|| format!("create history {path:?}"))?;
        Ok(Self::from_writer(file))
    }

    /// Writes to any sink; its clock starts now.
    pub fn from_writer(out: impl Write + Send + 'static) -> HistoryWriter {
        let start = Instant::now();
        HistoryWriter {
            start,
            inner: Mutex::new(WriterInner {
                out: BufWriter::new(Box::new(out)),
                next_index: 0,
                last_flush: start,
                error: None,
            }),
        }
    }

    /// The instant `time_ns` counts from.
    pub fn start_instant(&self) -> Instant {
        self.start
    }

    /// Nanoseconds since [`start_instant`](Self::start_instant), on the events' clock.
    pub fn elapsed_ns(&self) -> u64 {
        nanos(self.start.elapsed())
    }

    /// Records an `invoke` event and returns the handle to complete it with.
    pub fn invoke(&self, process: u64, f: &str, key: &str, value: Value, extra: Extra) -> OpHandle {
        let index = self.append(process, EventType::Invoke, f, key, value.clone(), extra);
        OpHandle {
            process,
            f: f.to_owned(),
            key: key.to_owned(),
            value,
            index,
        }
    }

    /// Records the completion of `op` with `value` (for a `read` the value read, for a
    /// `write` the value written, for an `incr` the value after; see the format).
    pub fn complete(&self, op: OpHandle, outcome: Outcome, value: Value, extra: Extra) {
        self.append(
            op.process,
            outcome.event_type(),
            &op.f,
            &op.key,
            value,
            extra,
        );
    }

    /// [`complete`](Self::complete) with `ok`.
    pub fn ok(&self, op: OpHandle, value: Value, extra: Extra) {
        self.complete(op, Outcome::Ok, value, extra);
    }

    /// Completes `op` as `fail` (certainly not applied), echoing its invoke value.
    pub fn fail(&self, op: OpHandle, error: impl Into<String>) {
        let value = op.value.clone();
        self.complete(op, Outcome::Fail, value, Extra::default().with_error(error));
    }

    /// Completes `op` as `info` (outcome unknown), echoing its invoke value.
    pub fn info(&self, op: OpHandle, error: impl Into<String>) {
        let value = op.value.clone();
        self.complete(op, Outcome::Info, value, Extra::default().with_error(error));
    }

    /// Flushes buffered lines to the sink.
    ///
    /// # Errors
    /// The first I/O error seen since the writer was created (it stays reported), or
    /// the flush's own error.
    pub fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        if let Some(e) = &inner.error {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        inner.last_flush = Instant::now();
        inner.out.flush()
    }

    fn lock(&self) -> MutexGuard<'_, WriterInner> {
        // A panic while holding the lock cannot leave a half-written line that matters
        // more than the history itself, so keep writing.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(
        &self,
        process: u64,
        kind: EventType,
        f: &str,
        key: &str,
        value: Value,
        extra: Extra,
    ) -> u64 {
        let mut inner = self.lock();
        let index = inner.next_index;
        inner.next_index += 1;
        let event = Event {
            index,
            process,
            kind,
            f: f.to_owned(),
            key: key.to_owned(),
            value,
            time_ns: self.elapsed_ns(),
            node: extra.node,
            lsn: extra.lsn,
            error: extra.error,
            consistency: extra.consistency,
        };
        let mut res = serde_json::to_writer(&mut inner.out, &event)
            .map_err(io::Error::from)
            .and_then(|()| inner.out.write_all(b"\n"));
        if res.is_ok() && inner.last_flush.elapsed() >= FLUSH_EVERY {
            inner.last_flush = Instant::now();
            res = inner.out.flush();
        }
        if let Err(e) = res {
            inner.error.get_or_insert(e);
        }
        index
    }
}

impl Drop for HistoryWriter {
    fn drop(&mut self) {
        let _ = self.lock().out.flush();
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Reads a history file.
///
/// # Errors
/// When the file cannot be read or a line is malformed (the message names the line).
pub fn read_history(path: impl AsRef<Path>) -> Result<Vec<Event>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).with_context(|| format!("read history {path:?}"))?;
    parse_history(&text).with_context(|| format!("history {path:?}"))
}

/// Parses JSONL text into events; blank lines are skipped, unknown fields ignored.
///
/// # Errors
/// On the first malformed line, naming its 1-based line number.
pub fn parse_history(text: &str) -> Result<Vec<Event>> {
    let mut events = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ev: Event = serde_json::from_str(line).with_context(|| {
            let shown: String = line.chars().take(200).collect();
            format!("line {}: malformed event: {shown}", n + 1)
        })?;
        events.push(ev);
    }
    Ok(events)
}

/// One operation: its invoke event paired with its completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Operation {
    /// The process that ran it.
    pub process: u64,
    /// The operation name.
    pub f: String,
    /// The key.
    pub key: String,
    /// The invoke event's value (the argument).
    pub invoke_value: Value,
    /// The completion's value (`null` without completion).
    pub value: Value,
    /// ok / fail / info (info when no completion).
    pub outcome: Outcome,
    /// Invoke time.
    pub invoke_ns: u64,
    /// Completion time of an `ok` or `fail`; `None` for `info` (it may take effect
    /// at any later time).
    pub complete_ns: Option<u64>,
    /// The invoke event's `lsn` (a `cache-read`'s `min_lsn`).
    pub invoke_lsn: Option<String>,
    /// The completion's `lsn` (a `db-write`'s commit LSN).
    pub lsn: Option<String>,
    /// The answering node (completion's, else invoke's).
    pub node: Option<String>,
    /// The read mode (invoke's, else completion's).
    pub consistency: Option<String>,
    /// The completion's error.
    pub error: Option<String>,
    /// `index` of the invoke event.
    pub invoke_index: u64,
    /// `index` of the completion event, if any.
    pub complete_index: Option<u64>,
}

impl Operation {
    /// Whether `f` returns a value read from somewhere.
    fn is_read(&self) -> bool {
        matches!(self.f.as_str(), "read" | "cache-read" | "db-read")
    }
}

/// `p3 write k1 "7" ok [1.203000s..1.205000s] @n2`; reads show `→ value`, a
/// `cache-read` its `min_lsn`, a `db-write` its `lsn`, failures their error.
impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{} {} {}", self.process, self.f, self.key)?;
        if let Some(m) = &self.invoke_lsn {
            write!(f, " min_lsn={m}")?;
        }
        match self.invoke_value.as_i64() {
            Some(delta) if self.f == "incr" => write!(f, " {delta:+}")?,
            _ if !self.invoke_value.is_null() => write!(f, " {}", self.invoke_value)?,
            _ => {}
        }
        if self.outcome == Outcome::Ok
            && (self.is_read() || (!self.value.is_null() && self.value != self.invoke_value))
        {
            write!(f, " → {}", self.value)?;
        }
        if let Some(l) = &self.lsn {
            write!(f, " lsn={l}")?;
        }
        let secs = |ns: u64| ns as f64 / 1e9;
        write!(f, " {} [{:.6}s..", self.outcome, secs(self.invoke_ns))?;
        match self.complete_ns {
            Some(t) => write!(f, "{:.6}s]", secs(t))?,
            None => f.write_str("?]")?,
        }
        if let Some(n) = &self.node {
            write!(f, " @{n}")?;
        }
        if let Some(c) = &self.consistency {
            write!(f, " ({c})")?;
        }
        if let Some(e) = &self.error {
            write!(f, " error: {e}")?;
        }
        Ok(())
    }
}

/// Pairs each invoke with its completion, in invoke order.
///
/// # Errors
/// On protocol violations: a completion without an open invoke on its process, a
/// second invoke on a process whose operation is still open, a completion whose
/// `f`/`key` differ from its invoke, or one that happens before its invoke.
pub fn pair(events: &[Event]) -> Result<Vec<Operation>> {
    let mut ops: Vec<Operation> = Vec::new();
    let mut open: HashMap<u64, usize> = HashMap::new();
    for ev in events {
        if ev.kind == EventType::Invoke {
            if let Some(&i) = open.get(&ev.process) {
                let o = &ops[i];
                bail!(
                    "event {}: process {} invokes {} {:?} while its {} {:?} (event {}) is still open",
                    ev.index, ev.process, ev.f, ev.key, o.f, o.key, o.invoke_index
                );
            }
            open.insert(ev.process, ops.len());
            ops.push(Operation {
                process: ev.process,
                f: ev.f.clone(),
                key: ev.key.clone(),
                invoke_value: ev.value.clone(),
                value: Value::Null,
                outcome: Outcome::Info,
                invoke_ns: ev.time_ns,
                complete_ns: None,
                invoke_lsn: ev.lsn.clone(),
                lsn: None,
                node: ev.node.clone(),
                consistency: ev.consistency.clone(),
                error: None,
                invoke_index: ev.index,
                complete_index: None,
            });
            continue;
        }
        let Some(i) = open.remove(&ev.process) else {
            bail!(
                "event {}: {:?} completion of {} {:?} by process {} without an open invoke",
                ev.index,
                ev.kind,
                ev.f,
                ev.key,
                ev.process
            );
        };
        let op = &mut ops[i];
        if op.f != ev.f || op.key != ev.key {
            bail!(
                "event {}: process {} completes {} {:?} but invoked {} {:?} (event {})",
                ev.index,
                ev.process,
                ev.f,
                ev.key,
                op.f,
                op.key,
                op.invoke_index
            );
        }
        if ev.time_ns < op.invoke_ns {
            bail!(
                "event {}: completes at {} ns, before its invoke (event {}) at {} ns",
                ev.index,
                ev.time_ns,
                op.invoke_index,
                op.invoke_ns
            );
        }
        op.outcome = match ev.kind {
            EventType::Ok => Outcome::Ok,
            EventType::Fail => Outcome::Fail,
            _ => Outcome::Info,
        };
        op.value = ev.value.clone();
        op.complete_ns = (op.outcome != Outcome::Info).then_some(ev.time_ns);
        op.lsn = ev.lsn.clone();
        op.node = ev.node.clone().or(op.node.take());
        op.consistency = op.consistency.take().or(ev.consistency.clone());
        op.error = ev.error.clone();
        op.complete_index = Some(ev.index);
    }
    Ok(ops)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn temp_path(name: &str) -> std::path::PathBuf {
        let nanos = nanos(
            std::time::SystemTime::UNIX_EPOCH
                .elapsed()
                .unwrap_or_default(),
        );
        std::env::temp_dir().join(format!("{name}-{}-{nanos}.jsonl", std::process::id()))
    }

    #[test]
    fn lsn_parses_and_prints() {
        let l: Lsn = "0/16B3748".parse().unwrap();
        assert_eq!(l, Lsn(0x16B_3748));
        assert_eq!("1/0".parse::<Lsn>().unwrap(), Lsn(1 << 32));
        assert_eq!(Lsn(0x1_0000_00FF).to_string(), "1/FF");
        assert!("16B3748".parse::<Lsn>().is_err());
        assert!("0/xyz".parse::<Lsn>().is_err());
    }

    #[test]
    fn round_trip_write_read_pair() {
        let path = temp_path("history-roundtrip");
        let w = Arc::new(HistoryWriter::create(&path).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|p| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let v = json!(format!("{p}-{i}"));
                        let op = w.invoke(p, "write", "k1", v.clone(), Extra::default());
                        w.ok(op, v, Extra::default().with_node("n1"));
                        let op = w.invoke(p, "read", "k1", Value::Null, Extra::default());
                        w.info(op, "timeout");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let op = w.invoke(
            9,
            "cache-read",
            "k2",
            Value::Null,
            Extra::default().with_lsn(Lsn(0x100)),
        );
        w.fail(op, "refused");
        let _left_open = w.invoke(7, "write", "k3", json!("x"), Extra::default());
        w.flush().unwrap();
        drop(w);

        let events = read_history(&path).unwrap();
        assert_eq!(events.len(), 4 * 50 * 4 + 3);
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.index, i as u64);
        }
        assert!(events.windows(2).all(|p| p[0].time_ns <= p[1].time_ns));
        let ops = pair(&events).unwrap();
        assert_eq!(ops.len(), 4 * 50 * 2 + 2);
        let cr = ops.iter().find(|o| o.f == "cache-read").unwrap();
        assert_eq!(cr.invoke_lsn.as_deref(), Some("0/100"));
        assert_eq!(cr.outcome, Outcome::Fail);
        assert_eq!(cr.error.as_deref(), Some("refused"));
        let open = ops.last().unwrap();
        assert_eq!((open.outcome, open.complete_ns), (Outcome::Info, None));
        let w0 = ops.iter().find(|o| o.f == "write").unwrap();
        assert_eq!(w0.outcome, Outcome::Ok);
        assert_eq!(w0.node.as_deref(), Some("n1"));
        assert!(w0.to_string().contains(" ok ["), "{w0}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("\"node\":null"), "None fields are skipped");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn malformed_line_names_its_number() {
        let text = "{\"index\":0,\"process\":0,\"type\":\"invoke\",\"f\":\"read\",\"key\":\"k\",\"value\":null,\"time_ns\":1}\n\n{\"index\":1,\"process\":0,\"type\":\"okay\"}\n";
        let err = format!("{:#}", parse_history(text).unwrap_err());
        assert!(err.contains("line 3"), "{err}");
        assert!(parse_history("not json").is_err());
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_completion_is_info() {
        let text = r#"{"index":0,"process":1,"type":"invoke","f":"read","key":"k","value":null,"time_ns":5,"extra":42,"consistency":"lease"}"#;
        let ops = pair(&parse_history(text).unwrap()).unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].outcome, Outcome::Info);
        assert_eq!(ops[0].complete_ns, None);
        assert_eq!(ops[0].consistency.as_deref(), Some("lease"));
    }

    fn ev(index: u64, process: u64, kind: EventType, f: &str, key: &str) -> Event {
        Event {
            index,
            process,
            kind,
            f: f.into(),
            key: key.into(),
            value: Value::Null,
            time_ns: index * 10,
            node: None,
            lsn: None,
            error: None,
            consistency: None,
        }
    }

    #[test]
    fn protocol_violations_are_errors() {
        use EventType::*;
        let orphan = [ev(0, 1, Ok, "read", "k")];
        assert!(format!("{:#}", pair(&orphan).unwrap_err()).contains("without an open invoke"));
        let double = [ev(0, 1, Invoke, "read", "k"), ev(1, 1, Invoke, "read", "k")];
        assert!(format!("{:#}", pair(&double).unwrap_err()).contains("still open"));
        let mismatch = [ev(0, 1, Invoke, "read", "k"), ev(1, 1, Ok, "write", "k")];
        assert!(format!("{:#}", pair(&mismatch).unwrap_err()).contains("but invoked"));
        let mut backwards = [ev(0, 1, Invoke, "read", "k"), ev(1, 1, Ok, "read", "k")];
        backwards[1].time_ns = 0;
        backwards[0].time_ns = 5;
        assert!(pair(&backwards).is_err());
    }
}
