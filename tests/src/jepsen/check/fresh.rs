//! Fresh restarts (the `fresh-restart` nemesis, ARCHITECTURE.md item 38): every node
//! but one is killed and a brand-new cluster (new cluster id, empty) is founded on
//! their addresses while the old member keeps running.
//!
//! The history marks each one with an operation `f: "fresh-restart"` of the nemesis
//! process (an extension: other checkers ignore unknown `f`s): its `invoke` is the
//! moment the kills start, its `info` completion the moment the new cluster is up; the
//! completion's `value.ready_ns` repeats that time on the history's clock (an `info`
//! completion has no completion time once paired).
//!
//! Rule ([`check`], verdict line `no-old-cluster-values`): a read *invoked* after a
//! restart's `ready_ns` returns `null` or a value whose write was not completed before
//! that restart's kills started. Written values are unique per write (`"<process>.<n>"`),
//! so a value names its write. Left out on purpose (they may legitimately hold an old
//! value or come from either cluster): reads invoked before `ready_ns` (the old member
//! may still serve a lease read of its own data while the new cluster forms), and
//! values of writes still in flight at the kill (the client retries them with the same
//! request id, so they may well land in the new cluster) or whose outcome is unknown.
//!
//! [`eras`] scopes the linearizability checker: see its docs.

use super::{Anomaly, Validity};
use crate::jepsen::history::{Operation, Outcome};
use std::collections::HashMap;

/// The `f` of the marker.
pub const MARKER_F: &str = "fresh-restart";

/// One fresh restart on the history's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Restart {
    /// The kills started (the marker's invoke).
    pub kill_ns: u64,
    /// The new cluster was up (the marker's `value.ready_ns`; the invoke time when the
    /// restart did not finish, which is the stricter choice).
    pub ready_ns: u64,
}

/// The fresh restarts marked in `ops`, in time order.
pub(super) fn restarts(ops: &[Operation]) -> Vec<Restart> {
    let mut out: Vec<Restart> = ops
        .iter()
        .filter(|o| o.f == MARKER_F)
        .map(|o| Restart {
            kill_ns: o.invoke_ns,
            ready_ns: o
                .value
                .get("ready_ns")
                .and_then(serde_json::Value::as_u64)
                .or(o.complete_ns)
                .unwrap_or(o.invoke_ns)
                .max(o.invoke_ns),
        })
        .collect();
    out.sort_by_key(|r| r.kill_ns);
    out
}

/// The value a `write`/`cas` sets.
fn written(op: &Operation) -> Option<&str> {
    match op.f.as_str() {
        "write" => op.invoke_value.as_str(),
        "cas" => op.invoke_value.as_array()?.get(1)?.as_str(),
        _ => None,
    }
}

/// The result of [`check`].
pub(super) struct FreshResult {
    pub valid: Validity,
    pub keys: usize,
    pub reads_checked: usize,
    pub anomalies: Vec<Anomaly>,
}

/// Checks the rule of the module docs on the register operations of every key.
pub(super) fn check(keys: &[(&str, Vec<&Operation>)], restarts: &[Restart]) -> FreshResult {
    let mut anomalies = Vec::new();
    let mut reads_checked = 0;
    for (key, ops) in keys {
        // Value → (completion time of its write, the write).
        let mut done: HashMap<&str, (u64, &Operation)> = HashMap::new();
        for op in ops {
            if let (Some(v), Some(c)) = (written(op), op.complete_ns) {
                done.insert(v, (c, op));
            }
        }
        for read in ops
            .iter()
            .filter(|o| o.f == "read" && o.outcome == Outcome::Ok)
        {
            // The latest restart that was complete when the read was invoked.
            let Some(r) = restarts.iter().rev().find(|r| r.ready_ns <= read.invoke_ns) else {
                continue;
            };
            reads_checked += 1;
            let Some(v) = read.value.as_str() else {
                continue;
            };
            if let Some(&(c, w)) = done.get(v) {
                if c < r.kill_ns {
                    anomalies.push(Anomaly {
                        checker: "no-old-cluster-values".into(),
                        kind: "old-cluster-value".into(),
                        key: (*key).to_owned(),
                        message: format!(
                            "a read invoked at {:.6}s, after the fresh restart of {:.6}s \
                             (new cluster up at {:.6}s), returned {v:?}, written and \
                             completed at {:.6}s in the old cluster",
                            secs(read.invoke_ns),
                            secs(r.kill_ns),
                            secs(r.ready_ns),
                            secs(c)
                        ),
                        window: vec![(*w).clone(), (*read).clone()],
                    });
                }
            }
        }
    }
    FreshResult {
        valid: if anomalies.is_empty() {
            Validity::Valid
        } else {
            Validity::Invalid
        },
        keys: keys.len(),
        reads_checked,
        anomalies,
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Splits one key's register operations into *eras* (before the first restart,
/// between restarts, after the last), each checked for linearizability on its own from
/// the absent state (a fresh cluster starts empty).
///
/// Why per era and not the whole history: across a fresh restart the register is
/// reset to absent by design, so a read of `null` after acknowledged writes is
/// expected there, not an anomaly; within an era the cluster is one cluster and must be
/// linearizable as always. Operations that straddle a boundary are placed so that no
/// false anomaly can result:
/// - a write/cas/delete that had not completed when the next era began (or whose
///   outcome is unknown) may have taken effect in either cluster: it is `info` (maybe
///   applied, at any time after its invoke) in its own era and in the next;
/// - a read that completed after the next era began, or was invoked while the new
///   cluster was forming (old member still running, new cluster partly up), may have
///   been served by either cluster: it is left out (the no-old-values rule still
///   covers every read invoked after the new cluster was up).
pub(super) fn eras(ops: &[&Operation], restarts: &[Restart]) -> Vec<Vec<Operation>> {
    let mut eras: Vec<Vec<Operation>> = vec![Vec::new(); restarts.len() + 1];
    for op in ops {
        let e = restarts
            .iter()
            .take_while(|r| r.kill_ns <= op.invoke_ns)
            .count();
        let forming = e > 0 && op.invoke_ns < restarts[e - 1].ready_ns;
        let next = restarts.get(e).map(|r| r.kill_ns);
        let ends_in_era = match (op.complete_ns, next) {
            (Some(_), None) => true,
            (Some(c), Some(n)) => c < n,
            (None, _) => false,
        };
        if op.f == "read" {
            if ends_in_era && !forming {
                eras[e].push((*op).clone());
            }
        } else if ends_in_era || op.outcome == Outcome::Fail {
            eras[e].push((*op).clone());
        } else {
            let mut maybe = (*op).clone();
            maybe.outcome = Outcome::Info;
            maybe.complete_ns = None;
            if let Some(later) = eras.get_mut(e + 1) {
                later.push(maybe.clone());
            }
            eras[e].push(maybe);
        }
    }
    for era in &mut eras {
        era.sort_by_key(|o| (o.invoke_ns, o.invoke_index));
    }
    eras
}
