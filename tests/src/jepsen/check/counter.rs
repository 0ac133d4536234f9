//! Counter checker for keys with `incr` (Jepsen's counter bounds, plus unique results).
//!
//! The counter starts at 0 (a `null` read is 0). For every `ok` `read` and every `ok`
//! `incr` (whose value is the counter after it) the value must lie within bounds:
//! - *certain* increments: `ok` incrs that completed before the op was invoked (and an
//!   incr itself) — they are applied before it;
//! - *possible* increments: `ok` or `info` incrs invoked no later than the op completed.
//!
//! Deltas may have any sign: `lower = Σcertain max(0,d) + Σpossible min(0,d)` and
//! `upper = Σcertain min(0,d) + Σpossible max(0,d)`, which for positive deltas is the
//! usual "sum of certain ≤ value ≤ sum of possible". Below → `lost-increment`, above →
//! `double-or-phantom-increment`. When every delta is positive, the values returned by
//! `ok` incrs must also be pairwise distinct (`duplicate-increment-result`). A delta
//! that is not an integer is a harness error and makes the key `Unknown`, as do
//! write/cas/delete operations on a counter key (not modelled).

use super::{as_int, Anomaly, CheckOptions, KeyResult, Validity};
use crate::jepsen::history::{Operation, Outcome};
use std::collections::HashMap;

/// Checks the operations of one counter key.
pub(super) fn check_key(key: &str, ops: &[&Operation], opts: &CheckOptions) -> KeyResult {
    let unknown = |note: String| KeyResult {
        valid: Validity::Unknown,
        note: Some(note),
        anomalies: Vec::new(),
    };
    let live = |o: &&&Operation| o.outcome != Outcome::Fail;
    if let Some(op) = ops
        .iter()
        .filter(live)
        .find(|o| matches!(o.f.as_str(), "write" | "cas" | "delete"))
    {
        return unknown(format!(
            "counter key also has write/cas/delete, which the counter checker does not model: {op}"
        ));
    }
    let mut incrs: Vec<(&Operation, i128)> = Vec::new();
    for op in ops.iter().filter(live).filter(|o| o.f == "incr") {
        match as_int(&op.invoke_value) {
            Some(d) => incrs.push((op, d)),
            None => {
                return unknown(format!(
                    "incr without an integer delta (harness error): {op}"
                ))
            }
        }
    }

    // Certain: ok incrs by completion time; possible: ok/info incrs by invoke time.
    let mut certain: Vec<(u64, i128, &Operation)> = incrs
        .iter()
        .filter(|(o, _)| o.outcome == Outcome::Ok)
        .filter_map(|&(o, d)| o.complete_ns.map(|t| (t, d, o)))
        .collect();
    certain.sort_by_key(|c| (c.0, c.2.invoke_index));
    let mut possible: Vec<(u64, i128, &Operation)> =
        incrs.iter().map(|&(o, d)| (o.invoke_ns, d, o)).collect();
    possible.sort_by_key(|p| (p.0, p.2.invoke_index));
    let prefix = |xs: &[(u64, i128, &Operation)], f: fn(i128) -> i128| {
        let mut sums = vec![0i128];
        for x in xs {
            sums.push(sums[sums.len() - 1] + f(x.1));
        }
        sums
    };
    let pos = |d: i128| d.max(0);
    let neg = |d: i128| d.min(0);
    let (c_pos, c_neg) = (prefix(&certain, pos), prefix(&certain, neg));
    let (p_pos, p_neg) = (prefix(&possible, pos), prefix(&possible, neg));

    let mut anomalies = Vec::new();
    let max = opts.max_anomalies;
    let mut anomaly = |kind: &str, message: String, mut window: Vec<Operation>| {
        if anomalies.len() >= max {
            window.clear(); // counted, but the report will not show it
        }
        anomalies.push(Anomaly {
            checker: "counter".into(),
            kind: kind.into(),
            key: key.to_owned(),
            message,
            window,
        });
    };
    for op in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        let own = match op.f.as_str() {
            "read" => 0,
            "incr" => as_int(&op.invoke_value).unwrap_or(0),
            _ => continue,
        };
        let value = if op.value.is_null() && op.f == "read" {
            Some(0)
        } else {
            as_int(&op.value)
        };
        let Some(value) = value else {
            anomaly(
                "bad-value",
                format!("{} returned {}, not an integer", op.f, op.value),
                vec![(*op).clone()],
            );
            continue;
        };
        let ret = op.complete_ns.unwrap_or(op.invoke_ns);
        let kc = certain.partition_point(|c| c.0 < op.invoke_ns);
        let kp = possible.partition_point(|p| p.0 <= ret);
        let lower = c_pos[kc] + p_neg[kp] + pos(own);
        let upper = c_neg[kc] + p_pos[kp] + neg(own);
        let (kind, msg, defining) = if value < lower {
            let msg = format!(
                "{} returned {value}, but increments that completed before it was invoked \
                 bring the counter to at least {lower}",
                op.f
            );
            ("lost-increment", msg, &certain[..kc])
        } else if value > upper {
            let msg = format!(
                "{} returned {value}, but all increments invoked before it completed bring \
                 the counter to at most {upper}",
                op.f
            );
            ("double-or-phantom-increment", msg, &possible[..kp])
        } else {
            continue;
        };
        // The op and the latest of the increments that define the bound.
        let keep = opts.window_ops.saturating_sub(1);
        let mut window: Vec<Operation> = defining
            .iter()
            .rev()
            .filter(|d| d.2.invoke_index != op.invoke_index)
            .take(keep)
            .map(|d| d.2.clone())
            .collect();
        window.push((*op).clone());
        window.sort_by_key(|o| o.invoke_index);
        anomaly(kind, msg, window);
    }

    if incrs.iter().all(|&(_, d)| d > 0) {
        let mut seen: HashMap<i128, &Operation> = HashMap::new();
        for &(op, _) in incrs.iter().filter(|(o, _)| o.outcome == Outcome::Ok) {
            let Some(v) = as_int(&op.value) else { continue };
            if let Some(first) = seen.insert(v, op) {
                anomaly(
                    "duplicate-increment-result",
                    format!(
                        "two increments both returned {v}: one was applied twice, or both saw \
                         the same state"
                    ),
                    vec![first.clone(), op.clone()],
                );
            }
        }
    }
    KeyResult {
        valid: if anomalies.is_empty() {
            Validity::Valid
        } else {
            Validity::Invalid
        },
        note: None,
        anomalies,
    }
}
