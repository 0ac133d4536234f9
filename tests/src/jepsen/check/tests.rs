//! Tests of the checkers: planted anomalies fail, valid histories pass.
#![allow(clippy::unwrap_used, clippy::too_many_arguments)]

use super::*;
use crate::jepsen::history::{Event, EventType};
use serde_json::{json, Value};
use std::collections::HashMap;

/// A history under construction; events are sorted by time when taken.
#[derive(Default, Clone)]
struct Hist {
    evs: Vec<Event>,
}

impl Hist {
    fn push(&mut self, p: u64, kind: EventType, f: &str, key: &str, value: Value, t: u64) {
        self.evs.push(Event {
            index: 0,
            process: p,
            kind,
            f: f.into(),
            key: key.into(),
            value,
            time_ns: t,
            node: None,
            lsn: None,
            error: None,
            consistency: None,
        });
    }

    /// `outcome`: "ok", "fail", "info" or "open" (no completion).
    fn op(
        &mut self,
        p: u64,
        f: &str,
        key: &str,
        arg: Value,
        t0: u64,
        t1: u64,
        outcome: &str,
        result: Value,
    ) -> &mut Self {
        self.push(p, EventType::Invoke, f, key, arg, t0);
        let kind = match outcome {
            "ok" => EventType::Ok,
            "fail" => EventType::Fail,
            "info" => EventType::Info,
            _ => return self,
        };
        self.push(p, kind, f, key, result, t1);
        self
    }

    /// Sets the `lsn` of the last op's invoke and completion events.
    fn lsn(&mut self, invoke: Option<&str>, done: Option<&str>) -> &mut Self {
        let n = self.evs.len();
        self.evs[n - 2].lsn = invoke.map(Into::into);
        self.evs[n - 1].lsn = done.map(Into::into);
        self
    }

    fn w(&mut self, p: u64, key: &str, v: &str, t0: u64, t1: u64) -> &mut Self {
        self.op(p, "write", key, json!(v), t0, t1, "ok", json!(v))
    }

    fn r(&mut self, p: u64, key: &str, v: Option<&str>, t0: u64, t1: u64) -> &mut Self {
        self.op(p, "read", key, Value::Null, t0, t1, "ok", json!(v))
    }

    fn incr(&mut self, p: u64, d: i64, t0: u64, t1: u64, outcome: &str, v: Value) -> &mut Self {
        self.op(p, "incr", "c", json!(d), t0, t1, outcome, v)
    }

    fn events(&self) -> Vec<Event> {
        let mut evs = self.evs.clone();
        evs.sort_by_key(|e| e.time_ns);
        for (i, e) in evs.iter_mut().enumerate() {
            e.index = i as u64;
        }
        evs
    }

    fn check(&self) -> Report {
        check_history(&self.events(), &CheckOptions::default())
    }
}

fn assert_valid(r: &Report) {
    assert_eq!(r.valid, Validity::Valid, "{}", r.details());
}

fn only_anomaly<'a>(r: &'a Report, kind: &str) -> &'a Anomaly {
    assert_eq!(r.valid, Validity::Invalid, "{}", r.details());
    let a = r.anomalies.first().unwrap();
    assert_eq!(a.kind, kind, "{}", r.details());
    a
}

fn window_has(a: &Anomaly, f: &str, value: Value) -> bool {
    a.window
        .iter()
        .any(|o| o.f == f && (o.value == value || o.invoke_value == value))
}

#[test]
fn validity_combines() {
    use Validity::*;
    assert_eq!(Validity::all([Valid, Unknown, Valid]), Unknown);
    assert_eq!(Validity::all([Unknown, Invalid]), Invalid);
    assert_eq!(Validity::all([]), Valid);
}

#[test]
fn planted_stale_read() {
    let r = Hist::default()
        .w(0, "k", "1", 0, 10)
        .w(0, "k", "2", 20, 30)
        .r(1, "k", Some("1"), 40, 50)
        .check();
    let a = only_anomaly(&r, "not-linearizable");
    assert_eq!(a.window.len(), 2, "{}", r.details());
    assert!(window_has(a, "write", json!("2")));
    assert!(window_has(a, "read", json!("1")));
    assert!(r
        .summary()
        .starts_with("valid: false · 3 ops (ok 3, fail 0, info 0)"));
    assert!(
        r.details().contains("p1 read k → \"1\" ok"),
        "{}",
        r.details()
    );
}

#[test]
fn planted_lost_write() {
    let r = Hist::default()
        .w(0, "k", "1", 0, 10)
        .r(1, "k", None, 20, 30)
        .check();
    let a = only_anomaly(&r, "not-linearizable");
    assert!(window_has(a, "write", json!("1")) && window_has(a, "read", Value::Null));
    // The previous value comes back although the single writer overwrote it.
    let r = Hist::default()
        .w(0, "k", "a", 0, 10)
        .r(1, "k", Some("a"), 12, 14)
        .w(0, "k", "b", 20, 30)
        .r(1, "k", Some("a"), 40, 50)
        .check();
    only_anomaly(&r, "not-linearizable");
}

#[test]
fn planted_non_linearizable_cas() {
    let seq = Hist::default()
        .op(
            0,
            "cas",
            "k",
            json!([null, "a"]),
            0,
            10,
            "ok",
            json!([null, "a"]),
        )
        .op(
            1,
            "cas",
            "k",
            json!([null, "b"]),
            20,
            30,
            "ok",
            json!([null, "b"]),
        )
        .check();
    only_anomaly(&seq, "not-linearizable");
    let conc = Hist::default()
        .op(
            0,
            "cas",
            "k",
            json!([null, "a"]),
            0,
            30,
            "ok",
            json!([null, "a"]),
        )
        .op(
            1,
            "cas",
            "k",
            json!([null, "b"]),
            5,
            20,
            "ok",
            json!([null, "b"]),
        )
        .check();
    only_anomaly(&conc, "not-linearizable");
}

#[test]
fn valid_only_in_a_non_obvious_order() {
    // The write of "1" starts first but must take effect after "2": reads see 2, then 1.
    let r = Hist::default()
        .w(0, "k", "1", 0, 100)
        .w(1, "k", "2", 10, 20)
        .r(2, "k", Some("2"), 30, 40)
        .r(3, "k", Some("1"), 50, 60)
        .r(2, "k", Some("1"), 70, 80)
        .op(
            4,
            "cas",
            "k",
            json!(["1", "3"]),
            90,
            200,
            "ok",
            json!(["1", "3"]),
        )
        .r(3, "k", Some("1"), 95, 99)
        .r(1, "k", Some("3"), 150, 160)
        .op(2, "delete", "k", Value::Null, 170, 300, "ok", Value::Null)
        .r(3, "k", Some("3"), 180, 190)
        .r(3, "k", None, 310, 320)
        .check();
    assert_valid(&r);
    assert_eq!(r.checkers[0].name, "linearizable");
}

#[test]
fn info_ops_may_take_effect_and_fail_ops_do_not() {
    let r = Hist::default()
        .op(0, "write", "k", json!("x"), 0, 10, "info", json!("x"))
        .r(1, "k", Some("x"), 20, 30)
        .op(
            2,
            "cas",
            "k",
            json!(["x", "y"]),
            40,
            45,
            "info",
            json!(["x", "y"]),
        )
        .r(1, "k", Some("y"), 50, 60)
        .op(3, "write", "k", json!("z"), 70, 80, "fail", json!("z"))
        .op(
            3,
            "cas",
            "k",
            json!(["y", "q"]),
            81,
            85,
            "fail",
            json!(["y", "q"]),
        )
        .r(1, "k", Some("y"), 90, 100)
        .op(
            4,
            "write",
            "k",
            json!("never-seen"),
            91,
            0,
            "open",
            Value::Null,
        )
        .op(5, "delete", "k", Value::Null, 92, 93, "info", Value::Null)
        .op(6, "read", "k", Value::Null, 94, 95, "info", Value::Null)
        .r(1, "k", Some("y"), 110, 120)
        .op(7, "cache-fill", "k", json!("y"), 121, 122, "ok", json!("y"))
        .check();
    assert_valid(&r);
    assert_eq!(r.counts.outcomes.info, 5, "{}", r.details());
    // An info write that was never read and a read of absent: fine too.
    let r = Hist::default()
        .op(0, "write", "k", json!("x"), 0, 10, "info", json!("x"))
        .r(1, "k", None, 20, 30)
        .check();
    assert_valid(&r);
    // A fail write that is read is an anomaly.
    let r = Hist::default()
        .op(0, "write", "k", json!("x"), 0, 10, "fail", json!("x"))
        .r(1, "k", Some("x"), 20, 30)
        .check();
    only_anomaly(&r, "not-linearizable");
}

#[test]
fn planted_double_increment() {
    let r = Hist::default()
        .incr(0, 1, 0, 10, "ok", json!(1))
        .incr(0, 2, 20, 30, "ok", json!(3))
        .op(1, "read", "c", Value::Null, 40, 50, "ok", json!(4))
        .check();
    let a = only_anomaly(&r, "double-or-phantom-increment");
    assert!(window_has(a, "read", json!(4)));
    assert_eq!(r.checkers[0].name, "counter");
}

#[test]
fn planted_lost_and_duplicate_increments() {
    let r = Hist::default()
        .incr(0, 1, 0, 10, "ok", json!(1))
        .op(1, "read", "c", Value::Null, 20, 30, "ok", Value::Null)
        .check();
    only_anomaly(&r, "lost-increment");
    let r = Hist::default()
        .incr(0, 1, 0, 10, "ok", json!(1))
        .incr(1, 1, 5, 15, "ok", json!(1))
        .check();
    only_anomaly(&r, "duplicate-increment-result");
}

#[test]
fn counter_with_info_increments_in_range() {
    let h = Hist::default()
        .incr(0, 1, 0, 10, "ok", json!(1))
        .incr(1, 5, 5, 12, "info", json!(5))
        .incr(2, 2, 20, 30, "ok", json!(8))
        .incr(0, 3, 25, 0, "open", Value::Null)
        .incr(3, 4, 26, 27, "fail", json!(4))
        .op(3, "read", "c", Value::Null, 40, 50, "ok", json!(8))
        .op(4, "read", "c", Value::Null, 41, 51, "ok", json!(11))
        .clone();
    assert_valid(&h.check());
    let mut too_high = h;
    too_high.op(5, "read", "c", Value::Null, 60, 70, "ok", json!(12));
    only_anomaly(&too_high.check(), "double-or-phantom-increment");
}

#[test]
fn planted_cdc_stale_read() {
    let r = Hist::default()
        .op(0, "db-write", "row1", json!("4"), 0, 5, "ok", json!("4"))
        .lsn(None, Some("0/90"))
        .op(0, "db-write", "row1", json!("5"), 6, 10, "ok", json!("5"))
        .lsn(None, Some("0/100"))
        .op(
            1,
            "cache-read",
            "row1",
            Value::Null,
            20,
            30,
            "ok",
            json!("4"),
        )
        .lsn(Some("0/100"), None)
        .check();
    let a = only_anomaly(&r, "stale-read-after-min-lsn");
    assert_eq!(a.window.len(), 2);
    assert_eq!(a.window[0].value, json!("5"));
    assert_eq!(a.window[1].f, "cache-read");
    assert!(
        r.details().contains("no final quiescent reads"),
        "{}",
        r.details()
    );
}

#[test]
fn planted_cdc_final_mismatch() {
    let base = Hist::default()
        .op(0, "db-write", "row1", json!("6"), 0, 5, "ok", json!("6"))
        .lsn(None, Some("0/90"))
        .op(
            0,
            "db-read",
            "row1",
            Value::Null,
            100,
            110,
            "ok",
            json!("7"),
        )
        .lsn(None, Some("0/100"))
        .clone();
    for stale in ["6", "8"] {
        let r = base
            .clone()
            .op(
                1,
                "cache-read",
                "row1",
                Value::Null,
                120,
                130,
                "ok",
                json!(stale),
            )
            .lsn(Some("0/100"), None)
            .check();
        only_anomaly(&r, "final-read-mismatch");
    }
    let r = base
        .clone()
        .op(
            1,
            "cache-read",
            "row1",
            Value::Null,
            120,
            130,
            "ok",
            json!("7"),
        )
        .lsn(Some("0/1A0"), None)
        .check();
    assert_valid(&r);
    assert_eq!(r.cdc.as_ref().unwrap().final_checks_verified, 1);
}

#[test]
fn cdc_valid_with_misses_newer_values_and_staleness() {
    let r = Hist::default()
        .op(0, "db-write", "r", json!("1"), 0, 10, "ok", json!("1"))
        .lsn(None, Some("0/10"))
        .op(
            0,
            "db-write",
            "r",
            json!("2"),
            20,
            1_000_000,
            "ok",
            json!("2"),
        )
        .lsn(None, Some("0/20"))
        .op(
            1,
            "cache-read",
            "r",
            Value::Null,
            1_000_001,
            1_000_002,
            "ok",
            Value::Null,
        )
        .lsn(Some("0/20"), None)
        .op(
            1,
            "cache-read",
            "r",
            Value::Null,
            1_000_003,
            1_000_004,
            "ok",
            json!("2"),
        )
        .lsn(Some("0/10"), None)
        .op(
            2,
            "cache-read",
            "r",
            Value::Null,
            1_000_010,
            3_000_000,
            "ok",
            json!("1"),
        )
        .op(
            1,
            "cache-read",
            "r",
            Value::Null,
            1_000_020,
            1_000_030,
            "ok",
            json!("3"),
        )
        .lsn(Some("0/20"), None)
        .op(
            1,
            "cache-read",
            "r",
            Value::Null,
            1_000_040,
            1_000_050,
            "ok",
            json!("abc"),
        )
        .lsn(Some("0/20"), None)
        .op(
            1,
            "cache-fill",
            "r",
            json!("2"),
            1_000_060,
            1_000_070,
            "ok",
            json!("2"),
        )
        .op(
            3,
            "db-read",
            "r",
            Value::Null,
            4_000_000,
            4_000_010,
            "ok",
            json!("2"),
        )
        .lsn(None, Some("0/20"))
        .op(
            1,
            "cache-read",
            "r",
            Value::Null,
            4_000_020,
            4_000_030,
            "ok",
            json!("2"),
        )
        .lsn(Some("0/20"), None)
        .op(
            1,
            "cache-read",
            "r",
            Value::Null,
            4_000_040,
            4_000_050,
            "ok",
            Value::Null,
        )
        .lsn(Some("0/20"), None)
        .check();
    assert_valid(&r);
    let s = r.cdc.as_ref().unwrap();
    assert_eq!(
        (s.cache_reads_with_min_lsn, s.cache_reads_without_min_lsn),
        (6, 1)
    );
    assert_eq!(
        (s.final_checks, s.final_checks_verified, s.db_writes),
        (1, 1, 2)
    );
    // Write "1" saw no read before write "2" was ok; write "2" was read stale for 2 ms.
    assert_eq!((s.staleness_samples, s.stale_writes), (1, 1));
    assert!((s.staleness_max_ms - 2.0).abs() < 1e-9, "{s:?}");
    assert!((s.staleness_p50_ms - 2.0).abs() < 1e-9, "{s:?}");
}

/// A history whose search space explodes: many concurrent writes of distinct values
/// and reads that keep the order ambiguous until a contradiction at the end.
fn pathological() -> Hist {
    let mut h = Hist::default();
    for p in 0..12 {
        h.w(p, "k", &format!("v{p}"), p, 1000 + p);
    }
    h.r(20, "k", Some("v0"), 2000, 2001);
    h.r(20, "k", Some("v1"), 2002, 2003);
    h
}

#[test]
fn tiny_budget_is_unknown_not_valid() {
    let h = pathological();
    assert_eq!(h.check().valid, Validity::Invalid);
    let zero = CheckOptions {
        time_limit: Duration::ZERO,
        ..CheckOptions::default()
    };
    let r = check_history(&h.events(), &zero);
    assert_eq!(r.valid, Validity::Unknown, "{}", r.details());
    assert!(r.checkers[0].notes[0].contains("ran out of budget"));
    let one_step = CheckOptions {
        step_limit: 1,
        ..CheckOptions::default()
    };
    let ok = Hist::default()
        .w(0, "k", "1", 0, 1)
        .r(1, "k", Some("1"), 2, 3)
        .check();
    assert_valid(&ok);
    let r = check_history(
        &Hist::default()
            .w(0, "k", "1", 0, 1)
            .r(1, "k", Some("1"), 2, 3)
            .events(),
        &one_step,
    );
    assert_eq!(r.valid, Validity::Unknown, "{}", r.details());
}

#[test]
fn protocol_violation_is_unknown_and_unknown_fs_are_ignored() {
    let mut h = Hist::default();
    h.push(0, EventType::Ok, "read", "k", Value::Null, 1);
    let r = h.check();
    assert_eq!(r.valid, Validity::Unknown);
    assert!(
        r.notes[0].contains("without an open invoke"),
        "{:?}",
        r.notes
    );
    let r = Hist::default()
        .op(0, "frobnicate", "k", json!(1), 0, 1, "ok", json!(2))
        .check();
    assert_eq!(r.valid, Validity::Unknown, "nothing checkable");
    assert_eq!(r.counts.by_f["frobnicate"].ok, 1);
}

#[test]
fn report_serializes_and_renders() {
    let r = Hist::default()
        .w(0, "k", "1", 0, 10)
        .r(1, "k", Some("2"), 20, 30)
        .check();
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["valid"], "invalid");
    assert_eq!(v["counts"]["ok"], 2);
    assert_eq!(v["anomalies"][0]["window"][0]["f"], "write");
    assert_eq!(r.to_string(), r.summary());
    assert!(r.details().lines().count() >= 4, "{}", r.details());
}

// ---- random histories from a simulated atomic register ----

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Clone)]
struct SimOp {
    process: u64,
    key: String,
    f: &'static str,
    inv: u64,
    lin: u64,
    ret: u64,
    arg: Value,
    result: Value,
    outcome: &'static str,
}

/// `n` ops by 5 processes over `keys` keys on a real atomic register: each op takes
/// effect at a random instant inside its interval. About `info_per_mille` ops are
/// `info` (half of them took effect; some never complete).
fn simulate(seed: u64, n: usize, keys: u64, info_per_mille: u64) -> Vec<SimOp> {
    let mut rng = Rng(seed | 1);
    let procs = 5;
    let mut clock = [0u64; 5];
    let mut pid: Vec<u64> = (0..procs).collect();
    let mut ops = Vec::new();
    for _ in 0..n {
        let p = (0..procs as usize).min_by_key(|&p| clock[p]).unwrap();
        let inv = clock[p] + rng.below(20);
        let dur = 1 + rng.below(100);
        let lin = inv + rng.below(dur + 1);
        let f = match rng.below(100) {
            0..=49 => "read",
            50..=74 => "write",
            75..=94 => "cas",
            _ => "delete",
        };
        let info = rng.below(1000) < info_per_mille;
        let open = info && rng.below(5) == 0;
        ops.push(SimOp {
            process: pid[p],
            key: format!("k{}", rng.below(keys)),
            f,
            inv,
            lin,
            ret: inv + dur,
            arg: Value::Null,
            result: Value::Null,
            outcome: if open {
                "open"
            } else if info {
                "info"
            } else {
                "ok"
            },
        });
        clock[p] = inv + dur + 1;
        if open {
            pid[p] += procs; // a process with an open op never invokes again
        }
    }
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|&i| (ops[i].lin, i));
    let mut state: HashMap<String, Option<String>> = HashMap::new();
    let mut past: Vec<String> = Vec::new();
    for (serial, i) in order.into_iter().enumerate() {
        let o = &mut ops[i];
        let cur = state.get(&o.key).cloned().flatten();
        let effect = o.outcome == "ok" || rng.below(2) == 0;
        let fresh = format!("v{serial}");
        let mut new = None;
        match o.f {
            "read" => o.result = json!(cur),
            "write" => {
                o.arg = json!(fresh);
                new = Some(Some(fresh));
            }
            "delete" => new = Some(None),
            _ => {
                let expected = if rng.below(2) == 0 || past.is_empty() {
                    cur.clone()
                } else {
                    Some(past[rng.below(past.len() as u64) as usize].clone())
                };
                o.arg = json!([expected, fresh]);
                if expected == cur {
                    new = Some(Some(fresh));
                } else if o.outcome == "ok" {
                    o.outcome = "fail";
                }
            }
        }
        if o.f != "read" {
            o.result = o.arg.clone();
        }
        if let (Some(v), true) = (new, effect) {
            if let Some(s) = &v {
                past.push(s.clone());
            }
            state.insert(o.key.clone(), v);
        }
    }
    ops
}

fn to_hist(ops: &[SimOp]) -> Hist {
    let mut h = Hist::default();
    for o in ops {
        let result = if o.outcome == "ok" {
            o.result.clone()
        } else {
            o.arg.clone()
        };
        h.op(
            o.process,
            o.f,
            &o.key,
            o.arg.clone(),
            o.inv,
            o.ret,
            o.outcome,
            result,
        );
    }
    h
}

/// Makes one ok read (in the second half) return a value that two sequential later
/// writes overwrote before the read began; returns its index.
fn plant_stale_read(ops: &mut [SimOp]) -> usize {
    let writes: Vec<(u64, u64, String, Value)> = ops
        .iter()
        .filter(|o| o.outcome == "ok" && (o.f == "write" || o.f == "cas"))
        .map(|o| {
            let v = if o.f == "cas" {
                o.arg[1].clone()
            } else {
                o.arg.clone()
            };
            (o.inv, o.ret, o.key.clone(), v)
        })
        .collect();
    for i in ops.len() / 2..ops.len() {
        let r = &ops[i];
        if r.f != "read" || r.outcome != "ok" {
            continue;
        }
        let before = |t: u64| writes.iter().filter(move |w| w.2 == r.key && w.1 < t);
        let Some(w2) = before(r.inv).max_by_key(|w| w.1) else {
            continue;
        };
        let Some(w1) = before(w2.0).find(|w| w.3 != r.result) else {
            continue;
        };
        let stale = w1.3.clone();
        ops[i].result = stale;
        return i;
    }
    panic!("no read to plant a stale value in");
}

#[test]
fn random_register_histories_check_valid_and_planted_stale_read_invalid() {
    let mut ops = simulate(0x5EED_1234, 10_000, 4, 10);
    let h = to_hist(&ops);
    let r = h.check();
    assert_valid(&r);
    assert_eq!(r.checkers[0].keys, 4);
    assert!(r.counts.outcomes.info > 20, "{}", r.summary());
    let i = plant_stale_read(&mut ops);
    let r = to_hist(&ops).check();
    let a = only_anomaly(&r, "not-linearizable");
    assert!(
        a.window
            .iter()
            .any(|o| o.invoke_ns == ops[i].inv && o.f == "read"),
        "{}",
        r.details()
    );
    assert!(a.window.len() <= 30, "{}", r.details());
}

#[test]
fn stale_read_after_a_long_valid_history_has_a_small_window() {
    let mut ops = simulate(77, 500, 1, 20);
    let t = ops.iter().map(|o| o.ret).max().unwrap() + 10;
    let h = to_hist(&ops)
        .w(100, "k0", "A", t, t + 10)
        .w(100, "k0", "B", t + 20, t + 30)
        .r(101, "k0", Some("A"), t + 40, t + 50)
        .clone();
    let r = h.check();
    let a = only_anomaly(&r, "not-linearizable");
    assert!(a.window.len() <= 10, "{}", r.details());
    assert!(window_has(a, "read", json!("A")));
    // The same holds when the stale read is planted inside the random part.
    let i = plant_stale_read(&mut ops);
    let r = to_hist(&ops).check();
    let a = only_anomaly(&r, "not-linearizable");
    assert!(a.window.len() <= 10, "{}", r.details());
    assert!(a.window.iter().any(|o| o.invoke_ns == ops[i].inv));
}

/// Many seeds, more info ops, fewer keys (more contention): run with `--ignored`.
#[test]
#[ignore = "slow stress test"]
fn random_histories_many_seeds() {
    for seed in 1..60u64 {
        let (keys, info) = (1 + seed % 4, 5 + 10 * (seed % 6));
        let mut ops = simulate(seed * 7919, 3000, keys, info);
        let r = to_hist(&ops).check();
        assert_valid(&r);
        let i = plant_stale_read(&mut ops);
        let r = to_hist(&ops).check();
        let a = only_anomaly(&r, "not-linearizable");
        assert!(
            a.window.iter().any(|o| o.invoke_ns == ops[i].inv),
            "{}",
            r.details()
        );
    }
}
