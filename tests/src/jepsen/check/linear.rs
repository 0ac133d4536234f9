//! Per-key register linearizability: the Wing & Gong search with Lowe's memoisation,
//! in the form Porcupine and Knossos use.
//!
//! Model: the state is the key's value or absent (initially absent). `read v` is
//! allowed iff the state is v; `write v` sets it; `cas [e, n]` is allowed iff the state
//! is e and sets n; `delete` makes it absent (a write of absent).
//!
//! Outcomes: `fail` operations are dropped; `info` reads are dropped (no effect);
//! other `info` operations never return (return time +∞) and *may* be linearized —
//! "did not take effect" is modelled by not linearizing them at all, because the
//! search succeeds as soon as every `ok` operation is linearized.
//!
//! Search: call/return entries sorted by time (calls first on ties) in a doubly linked
//! list; an operation whose call precedes the first return in the list may be
//! linearized next (removed from the list, pushed on a stack); reaching a return means
//! backtracking. A memo of (set of linearized ops, state) prunes revisits; the set is
//! kept as a 128-bit Zobrist hash (XOR of a fixed random word per op), updated in O(1).
//! Two distinct sets collide with probability 2⁻¹²⁸ per pair, below 2⁻⁸⁰ for 10⁷
//! states; a collision could only prune a branch (a false "invalid"), never the reverse.
//!
//! Pruning: `info` writes, cas and deletes whose new value nothing could observe after
//! their invoke are dropped up front ([`prune`]), and during the search an optional op
//! is only applied while some unlinearized op still observes its value.
//!
//! Windows: a failing *window* — the ops that may take effect in a time range `[s, t)`,
//! those in flight at its edges made optional, started from an unknown state — proves
//! the whole key non-linearizable ([`window_ops`]). Keys of more than 128 ops are first
//! checked window by window (64 ops each, overlapping by half), which finds most
//! violations at a fraction of the cost of the exhaustive search a non-linearizable
//! history needs; then the whole key is searched. A failing key's report shows the
//! smallest failing window found ([`smallest_window`]).
//!
//! Budget: each key gets its share of [`CheckOptions::time_limit`](super::CheckOptions::time_limit);
//! a search also stops after [`step_limit`](super::CheckOptions::step_limit) loop
//! iterations. Running out gives `Unknown`, never `Valid`.

use super::{after, truncate_window, Anomaly, CheckOptions, KeyResult, Validity};
use crate::jepsen::history::{Operation, Outcome};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

/// Value id of "absent".
const ABSENT: u32 = 0;
/// The unknown initial state of a window: the first operation that looks at the
/// value fixes it.
const ANY: u32 = u32::MAX;
/// Return time of an operation that never returned.
const NEVER: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read(u32),
    /// Also `delete` (a write of [`ABSENT`]).
    Write(u32),
    Cas(u32, u32),
}

impl Kind {
    /// The value this operation requires the state to hold.
    fn observes(self) -> Option<u32> {
        match self {
            Kind::Read(v) | Kind::Cas(v, _) => Some(v),
            Kind::Write(_) => None,
        }
    }

    /// The value this operation sets.
    fn writes(self) -> Option<u32> {
        match self {
            Kind::Read(_) => None,
            Kind::Write(v) | Kind::Cas(_, v) => Some(v),
        }
    }

    /// The state after applying it to `state`, if allowed.
    fn step(self, state: u32) -> Option<u32> {
        match self {
            Kind::Read(v) => (state == ANY || state == v).then_some(v),
            Kind::Write(v) => Some(v),
            Kind::Cas(e, n) => (state == ANY || state == e).then_some(n),
        }
    }
}

/// How an operation must be linearized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Completed `ok`: linearized, with effect, before its return.
    Ok,
    /// Outcome unknown, no return: linearized with effect, or not at all.
    Info,
    /// Linearized before its return, with or without effect (window edges only).
    Maybe,
}

#[derive(Debug, Clone, Copy)]
struct LinOp {
    inv: u64,
    ret: u64,
    kind: Kind,
    class: Class,
    /// Index into the key's operations.
    src: usize,
}

struct Limits {
    deadline: Instant,
    steps: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    Linearizable,
    /// With the search's *frontier*: the latest time any configuration it explored
    /// could not get past (the return of its first unlinearized op).
    NotLinearizable(u64),
    GaveUp,
}

/// Ops per window of the pre-pass (consecutive windows overlap by half).
const CHUNK: usize = 64;
/// Step cap of one pre-pass window.
const CHUNK_STEPS: u64 = 1_000_000;

/// Checks one key; `deadline` is the end of the whole linearizability budget and
/// `keys_left` counts this key and those after it.
pub(super) fn check_key(
    key: &str,
    ops: &[&Operation],
    opts: &CheckOptions,
    deadline: Instant,
    keys_left: u32,
) -> KeyResult {
    let (all, n_values) = match convert(ops) {
        Ok(x) => x,
        Err(note) => {
            return KeyResult {
                valid: Validity::Unknown,
                note: Some(note),
                anomalies: Vec::new(),
            }
        }
    };
    let lin_ops = prune(all, n_values);
    let share = |now: Instant| deadline.saturating_duration_since(now) / keys_left.max(1);
    let now = Instant::now();
    let lim = Limits {
        deadline: after(now, share(now)),
        steps: opts.step_limit,
    };
    // Pre-pass: a failing window proves the key invalid (see `window_ops`) and is much
    // cheaper to find than the exhaustive search of everything before the violation.
    let mut failing = None;
    if lin_ops.len() > 2 * CHUNK {
        let chunk_lim = Limits {
            deadline: lim.deadline,
            steps: lim.steps.min(CHUNK_STEPS),
        };
        for i in (0..lin_ops.len()).step_by(CHUNK / 2) {
            let s = if i == 0 { 0 } else { lin_ops[i].inv };
            let t = lin_ops.get(i + CHUNK).map_or(NEVER, |o| o.inv);
            if let Search::NotLinearizable(f) = run(&lin_ops, n_values, s, t, &chunk_lim) {
                failing = Some((s, t, f));
                break;
            }
            if t == NEVER || Instant::now() >= lim.deadline {
                break;
            }
        }
    }
    let failing = match failing {
        Some(w) => w,
        None => match search(&lin_ops, ABSENT, n_values, &lim) {
            Search::NotLinearizable(f) => (0, NEVER, f),
            Search::Linearizable => {
                return KeyResult {
                    valid: Validity::Valid,
                    note: None,
                    anomalies: Vec::new(),
                }
            }
            Search::GaveUp => {
                return KeyResult {
                    valid: Validity::Unknown,
                    note: Some(format!(
                        "linearizability search of {} ops ran out of budget ({:?} time share, \
                         {} steps)",
                        lin_ops.len(),
                        share(now),
                        opts.step_limit
                    )),
                    anomalies: Vec::new(),
                }
            }
        },
    };
    let now = Instant::now();
    let wlim = Limits {
        deadline: after(now, share(now).max(opts.time_limit / 10)),
        steps: opts.step_limit,
    };
    let (from, to, smallest) = smallest_window(&lin_ops, n_values, failing, &wlim);
    let mut window: Vec<Operation> = prune(window_ops(&lin_ops, from, to), n_values)
        .iter()
        .map(|o| (*ops[o.src]).clone())
        .collect();
    let secs = |t: u64| t as f64 / 1e9;
    let to = if to == NEVER {
        "the end".to_owned()
    } else {
        format!("{:.6}s", secs(to))
    };
    let mut message = format!(
        "no linearization of the {} ops on this key ({} after dropping fail ops, info \
         reads and unobservable info writes); {} window: the {} ops that may take effect \
         from {:.6}s to {to} (those in flight at its edges may or may not have)",
        ops.len(),
        lin_ops.len(),
        if smallest {
            "smallest failing"
        } else {
            "failing (budget ran out before the smallest was found)"
        },
        window.len(),
        secs(from),
    );
    truncate_window(&mut window, opts.window_ops, &mut message);
    KeyResult {
        valid: Validity::Invalid,
        note: None,
        anomalies: vec![Anomaly {
            checker: "linearizable".into(),
            kind: "not-linearizable".into(),
            key: key.to_owned(),
            message,
            window,
        }],
    }
}

/// Turns the key's operations into model operations sorted by invoke time, with
/// values interned (0 = absent). Returns them and the number of value ids.
fn convert(ops: &[&Operation]) -> Result<(Vec<LinOp>, usize), String> {
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut id = |v: &Value| -> u32 {
        if v.is_null() {
            return ABSENT;
        }
        let next = u32::try_from(ids.len() + 1).unwrap_or(ANY - 1);
        *ids.entry(v.to_string()).or_insert(next)
    };
    let mut out = Vec::new();
    for (src, op) in ops.iter().enumerate() {
        let info = match op.outcome {
            Outcome::Fail => continue,
            Outcome::Info => true,
            Outcome::Ok => false,
        };
        let kind = match op.f.as_str() {
            "read" if info => continue,
            "read" => Kind::Read(id(&op.value)),
            "write" => Kind::Write(id(&op.invoke_value)),
            "delete" => Kind::Write(ABSENT),
            "cas" => match op.invoke_value.as_array().map(Vec::as_slice) {
                Some([e, n]) => Kind::Cas(id(e), id(n)),
                _ => return Err(format!("cas without an [expected, new] value: {op}")),
            },
            _ => continue,
        };
        let ret = if info {
            NEVER
        } else {
            op.complete_ns.unwrap_or(NEVER)
        };
        out.push(LinOp {
            inv: op.invoke_ns,
            ret,
            kind,
            class: if info { Class::Info } else { Class::Ok },
            src,
        });
    }
    out.sort_by_key(|o| (o.inv, o.src));
    Ok((out, ids.len() + 1))
}

/// Drops `info` (and `Maybe`) writes/cas/deletes whose new value no observer could
/// see: no read of it and no cas expecting it returns at or after the op's invoke
/// (observers that returned before it was invoked are linearized before it).
///
/// Why this is sound (both ways): dropping an info op is the same as choosing "did not
/// take effect", so a linearization without it is one with it. Conversely, if some
/// linearization applies the op at a point p (after its invoke), the state is then its
/// value v; every op after p that is allowed in state v without setting it is an
/// observer of v, and none is linearized after p, so the next effective op overwrites v
/// (a write, delete, or cas of another value can't run). Removing the op leaves every
/// later state unchanged. An info delete is the write of "absent", observed by `null`
/// reads and cas expecting `null`. Dropping an info cas removes it as an observer of
/// its expected value, so this repeats until nothing changes. A `Maybe` op may always
/// be a no-op, so the same argument drops it.
fn prune(mut ops: Vec<LinOp>, n_values: usize) -> Vec<LinOp> {
    loop {
        let mut last_seen: Vec<Option<u64>> = vec![None; n_values];
        for o in &ops {
            if let Some(slot) = o
                .kind
                .observes()
                .and_then(|v| last_seen.get_mut(v as usize))
            {
                *slot = Some(slot.map_or(o.ret, |t| t.max(o.ret)));
            }
        }
        let before = ops.len();
        ops.retain(|o| {
            o.class == Class::Ok
                || o.kind.writes().is_some_and(|v| {
                    last_seen
                        .get(v as usize)
                        .copied()
                        .flatten()
                        .is_some_and(|t| t >= o.inv)
                })
        });
        if ops.len() == before {
            return ops;
        }
    }
}

/// The window of operations that may linearize in the time range `[s, t)`, as a
/// history of its own: ops invoked before `t` that had not returned before `s`.
/// - `ok` ops invoked at or after `s` that returned before `t` stay as they are;
/// - reads in flight at an edge are dropped (a read has no effect);
/// - other ops in flight at `t` (or `info`) become optional ([`Class::Info`], no
///   return: they took effect inside the window or not at all);
/// - other ops in flight at `s` only (returned before `t`) become [`Class::Maybe`]:
///   linearized before their return, with or without effect (their effect may lie
///   before `s`, where the unknown start state [`ANY`] absorbs it).
///
/// Soundness: take a linearization L of the whole history, with linearization points
/// inside the operations' intervals. The ops L places in `[s, t)` all belong to the
/// window, every `ok` op of the window that stays as it is is among them, and each
/// `Maybe` op that L places before `s` can go first as a no-op. That is a valid
/// linearization of the window from the state L has at `s`. So if the history is
/// linearizable, every window is (from [`ANY`], or from absent when `s` is 0), and the
/// same argument applied to a window shows every sub-window of a linearizable window is
/// linearizable: failing windows are monotone, which [`smallest_window`] relies on.
fn window_ops(ops: &[LinOp], s: u64, t: u64) -> Vec<LinOp> {
    ops.iter()
        .filter(|o| o.inv < t && o.ret >= s)
        .filter_map(|&o| {
            if o.class == Class::Info || (o.inv >= s && o.ret < t) {
                Some(o)
            } else if matches!(o.kind, Kind::Read(_)) {
                None
            } else if o.ret >= t {
                Some(LinOp {
                    ret: NEVER,
                    class: Class::Info,
                    ..o
                })
            } else {
                Some(LinOp {
                    class: Class::Maybe,
                    ..o
                })
            }
        })
        .collect()
}

/// Searches the window `[s, t)` (see [`window_ops`]).
fn run(ops: &[LinOp], n_values: usize, s: u64, t: u64, lim: &Limits) -> Search {
    let init = if s == 0 { ABSENT } else { ANY };
    search(&prune(window_ops(ops, s, t), n_values), init, n_values, lim)
}

/// Shrinks the failing window `[s0, t0)`, whose search had frontier `f`, to a small
/// failing window `[s, t)`, returned with whether the budget sufficed to shrink it all
/// the way (otherwise the window is larger, but still fails).
///
/// End: if the prefix `[s0, t)` of the window were linearizable, its linearization
/// would be a path of the window's search (same real-time constraints) to a
/// configuration whose first unlinearized op returns at or after `t`, so `f ≥ t`.
/// Hence `t = f + 1` fails (no search needed), and it is the smallest end that can: the
/// configuration at the frontier linearizes everything that returned before `f`.
/// Start: windows fail for every start up to some `s*` (monotone, see [`window_ops`]);
/// `s*` is found by galloping back from `t` (small windows are cheap) and then
/// bisecting.
fn smallest_window(
    ops: &[LinOp],
    n_values: usize,
    (s0, t0, f): (u64, u64, u64),
    lim: &Limits,
) -> (u64, u64, bool) {
    let mut complete = true;
    let t = if f.saturating_add(1) < t0 { f + 1 } else { t0 };
    let mut starts: Vec<u64> = ops
        .iter()
        .map(|o| o.inv)
        .filter(|&i| i > s0 && i < t)
        .collect();
    starts.push(s0);
    starts.sort_unstable();
    starts.dedup();
    // starts[lo] is known to fail, starts[upper] (if any) to pass.
    let (mut lo, mut upper, mut step) = (0, starts.len(), 1);
    while complete {
        let probe = upper.saturating_sub(step);
        if probe <= lo {
            break;
        }
        match run(ops, n_values, starts[probe], t, lim) {
            Search::NotLinearizable(_) => lo = probe,
            Search::Linearizable => {
                upper = probe;
                step *= 2;
                continue;
            }
            Search::GaveUp => complete = false,
        }
        break;
    }
    while complete && lo + 1 < upper {
        let mid = (lo + upper) / 2;
        match run(ops, n_values, starts[mid], t, lim) {
            Search::NotLinearizable(_) => lo = mid,
            Search::Linearizable => upper = mid,
            Search::GaveUp => complete = false,
        }
    }
    (starts[lo], t, complete)
}

/// Memo hasher: the keys are already random (Zobrist), so mixing is cheap.
#[derive(Default)]
struct MemoHasher(u64);

impl Hasher for MemoHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    fn write_u128(&mut self, x: u128) {
        self.0 ^= (x as u64) ^ ((x >> 64) as u64);
    }
    fn write_u32(&mut self, x: u32) {
        self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn zobrist(i: usize) -> u128 {
    let i = i as u64;
    (u128::from(splitmix64(2 * i)) << 64) | u128::from(splitmix64(2 * i + 1))
}

/// Node ids of the entry list: 0 = head, `1 + 2i` = call of op i, `2 + 2i` = its
/// return, `2n + 1` = tail.
fn call_node(i: usize) -> usize {
    1 + 2 * i
}

/// Unlinks op `c`'s call and return nodes (they keep their own links for `unlift`).
fn lift(next: &mut [usize], prev: &mut [usize], c: usize) {
    for node in [c, c + 1] {
        let (p, n) = (prev[node], next[node]);
        next[p] = n;
        prev[n] = p;
    }
}

/// Relinks what [`lift`] unlinked (dancing links, in reverse order).
fn unlift(next: &mut [usize], prev: &mut [usize], c: usize) {
    for node in [c + 1, c] {
        let (p, n) = (prev[node], next[node]);
        next[p] = node;
        prev[n] = node;
    }
}

/// Is there an order of `ops` that respects real time and the register model, starting
/// from `init`, containing every `Ok` and `Maybe` op and any subset of the `Info` ops?
fn search(ops: &[LinOp], init: u32, n_values: usize, lim: &Limits) -> Search {
    let n = ops.len();
    let must = ops.iter().filter(|o| o.class != Class::Info).count();
    if must == 0 {
        return Search::Linearizable;
    }
    let tail = 2 * n + 1;
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        order.push((o.inv, false, i));
        order.push((o.ret, true, i));
    }
    order.sort_unstable();
    let mut next = vec![tail; 2 * n + 2];
    let mut prev = vec![0; 2 * n + 2];
    let mut last = 0;
    for &(_, is_ret, i) in &order {
        let node = call_node(i) + usize::from(is_ret);
        next[last] = node;
        prev[node] = last;
        last = node;
    }
    next[last] = tail;
    prev[tail] = last;

    // Unlinearized observers per value: applying an optional op whose new value has
    // none left can only be overwritten unseen (see `prune`), so it is not tried.
    let mut observers = vec![0u32; n_values];
    for v in ops.iter().filter_map(|o| o.kind.observes()) {
        observers[v as usize] += 1;
    }
    let keys: Vec<u128> = (0..n).map(zobrist).collect();
    let mut memo: HashSet<(u128, u32), BuildHasherDefault<MemoHasher>> = HashSet::default();
    let mut linearized: u128 = 0;
    // (op, state before it, 0 = applied / 1 = linearized as a no-op)
    let mut stack: Vec<(usize, u32, u8)> = Vec::new();
    let (mut state, mut done, mut steps) = (init, 0usize, 0u64);
    let mut entry = next[0];
    let mut first_choice = 0;
    let mut frontier = 0;
    loop {
        steps += 1;
        if steps > lim.steps || (steps % 1024 == 1 && Instant::now() >= lim.deadline) {
            return Search::GaveUp;
        }
        if entry != tail && entry % 2 == 1 {
            // A call before the first return: try to linearize op i now.
            let i = (entry - 1) / 2;
            let op = ops[i];
            let useful = op.class == Class::Ok
                || op.kind.writes().is_some_and(|v| observers[v as usize] > 0);
            let choices: &[u8] = if op.class == Class::Maybe {
                &[0, 1]
            } else {
                &[0]
            };
            let mut lifted = false;
            for &choice in choices.iter().filter(|&&c| c >= first_choice) {
                let new_state = match choice {
                    0 => op.kind.step(state).filter(|_| useful),
                    _ => Some(state),
                };
                let Some(new_state) = new_state else { continue };
                let set = linearized ^ keys[i];
                if memo.insert((set, new_state)) {
                    linearized = set;
                    stack.push((i, state, choice));
                    state = new_state;
                    lift(&mut next, &mut prev, entry);
                    if let Some(v) = op.kind.observes().filter(|_| choice == 0) {
                        observers[v as usize] -= 1;
                    }
                    if op.class != Class::Info {
                        done += 1;
                    }
                    lifted = true;
                    break;
                }
            }
            first_choice = 0;
            if !lifted {
                entry = next[entry];
            } else if done == must {
                return Search::Linearizable;
            } else {
                entry = next[0];
            }
        } else {
            // An op must have returned before anything else is linearized: undo the
            // last choice and try the next one.
            if entry != tail {
                frontier = frontier.max(ops[(entry - 2) / 2].ret);
            }
            let Some((j, old_state, choice)) = stack.pop() else {
                return Search::NotLinearizable(frontier);
            };
            let c = call_node(j);
            unlift(&mut next, &mut prev, c);
            linearized ^= keys[j];
            state = old_state;
            if let Some(v) = ops[j].kind.observes().filter(|_| choice == 0) {
                observers[v as usize] += 1;
            }
            if ops[j].class != Class::Info {
                done -= 1;
            }
            if ops[j].class == Class::Maybe && choice == 0 {
                entry = c;
                first_choice = 1;
            } else {
                entry = next[c];
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn op(inv: u64, ret: u64, kind: Kind) -> LinOp {
        LinOp {
            inv,
            ret,
            kind,
            class: if ret == NEVER { Class::Info } else { Class::Ok },
            src: 0,
        }
    }

    fn lim() -> Limits {
        Limits {
            deadline: Instant::now() + std::time::Duration::from_secs(10),
            steps: u64::MAX,
        }
    }

    #[test]
    fn search_basics() {
        use Kind::*;
        let seq = [op(0, 1, Write(1)), op(2, 3, Read(1))];
        assert_eq!(search(&seq, ABSENT, 3, &lim()), Search::Linearizable);
        let stale = [op(0, 1, Write(1)), op(2, 3, Write(2)), op(4, 5, Read(1))];
        assert_eq!(
            search(&stale, ABSENT, 3, &lim()),
            Search::NotLinearizable(5),
            "stuck at the read's return, with both writes linearized"
        );
        // From an unknown state, a read alone is fine.
        assert_eq!(search(&stale[2..], ANY, 3, &lim()), Search::Linearizable);
        // Concurrent write and read may go either way.
        let conc = [
            op(0, 10, Write(1)),
            op(1, 2, Read(ABSENT)),
            op(3, 4, Read(1)),
        ];
        assert_eq!(search(&conc, ABSENT, 3, &lim()), Search::Linearizable);
        // An info write can explain a later read, but need not happen.
        let info = [op(0, NEVER, Write(2)), op(5, 6, Read(2)), op(7, 8, Read(2))];
        assert_eq!(search(&info, ABSENT, 3, &lim()), Search::Linearizable);
        let info_unused = [op(0, NEVER, Write(2)), op(5, 6, Read(ABSENT))];
        assert_eq!(
            search(&info_unused, ABSENT, 3, &lim()),
            Search::Linearizable
        );
    }

    #[test]
    fn prune_keeps_observed_info_ops_only() {
        use Kind::*;
        let ops = vec![
            op(0, NEVER, Write(1)),  // read later: kept
            op(0, NEVER, Write(2)),  // only expected by a cas that is dropped: dropped
            op(10, NEVER, Write(1)), // invoked after the only read of 1 returned: dropped
            op(1, NEVER, Cas(2, 3)), // 3 is never observed: dropped
            op(5, 6, Read(1)),
        ];
        let kept = prune(ops, 4);
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.iter().all(|o| o.inv == 0 || o.inv == 5));
        // An info cas expecting 2 that might be observed keeps the write of 2.
        let ops = vec![
            op(0, NEVER, Write(2)),
            op(1, NEVER, Cas(2, 1)),
            op(5, 6, Read(1)),
        ];
        assert_eq!(prune(ops, 3).len(), 3);
    }

    #[test]
    fn windows_make_edge_ops_optional() {
        use Kind::*;
        let ops = [
            op(0, 50, Write(1)),    // in flight at s: Maybe
            op(1, 60, Read(1)),     // read in flight at s: dropped
            op(5, 8, Write(2)),     // returned before s: out
            op(20, 30, Read(1)),    // inside
            op(25, 200, Write(3)),  // in flight at t: Info
            op(8, NEVER, Write(4)), // info: stays Info
            op(150, 160, Read(3)),  // invoked after t: out
        ];
        let w = window_ops(&ops, 10, 100);
        let classes: Vec<(u64, Class)> = w.iter().map(|o| (o.inv, o.class)).collect();
        assert_eq!(
            classes,
            vec![
                (0, Class::Maybe),
                (20, Class::Ok),
                (25, Class::Info),
                (8, Class::Info)
            ]
        );
        // A Maybe op may be a no-op: the read of 1 is fine from a state of 5 ...
        let w = [
            LinOp {
                class: Class::Maybe,
                ..op(0, 50, Write(1))
            },
            op(60, 70, Read(5)),
        ];
        assert_eq!(search(&w, ANY, 6, &lim()), Search::Linearizable);
        // ... or applied, but only before its return.
        let w = [
            LinOp {
                class: Class::Maybe,
                ..op(0, 50, Write(1))
            },
            op(10, 20, Write(2)),
            op(30, 40, Read(1)),
            op(60, 70, Read(2)),
        ];
        assert_eq!(search(&w[..3], ANY, 6, &lim()), Search::Linearizable);
        assert!(matches!(
            search(&w, ANY, 6, &lim()),
            Search::NotLinearizable(_)
        ));
    }

    /// By the definition: some subset of the `Info` ops and every other op, in an
    /// order where no op comes after one that was invoked after it returned, with
    /// `Maybe` ops applied or not.
    fn brute(ops: &[LinOp], init: u32) -> bool {
        fn go(ops: &[LinOp], chosen: &[usize], placed: &mut Vec<bool>, state: u32) -> bool {
            if chosen.iter().all(|&i| placed[i]) {
                return true;
            }
            for &x in chosen {
                let blocked = chosen
                    .iter()
                    .any(|&y| y != x && !placed[y] && ops[y].ret < ops[x].inv);
                if placed[x] || blocked {
                    continue;
                }
                placed[x] = true;
                let mut next = vec![];
                next.extend(ops[x].kind.step(state));
                if ops[x].class == Class::Maybe {
                    next.push(state);
                }
                if next.into_iter().any(|s| go(ops, chosen, placed, s)) {
                    return true;
                }
                placed[x] = false;
            }
            false
        }
        let infos: Vec<usize> = (0..ops.len())
            .filter(|&i| ops[i].class == Class::Info)
            .collect();
        (0..1u32 << infos.len()).any(|mask| {
            let chosen: Vec<usize> = (0..ops.len())
                .filter(|i| match infos.iter().position(|j| j == i) {
                    Some(k) => mask & (1 << k) != 0,
                    None => true,
                })
                .collect();
            go(ops, &chosen, &mut vec![false; ops.len()], init)
        })
    }

    #[test]
    fn search_prune_and_windows_agree_with_brute_force() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (mut valid, mut invalid) = (0, 0);
        for _ in 0..3000 {
            let n = 3 + rnd(5) as usize;
            let mut ops: Vec<LinOp> = (0..n)
                .map(|src| {
                    let inv = rnd(20);
                    let v = |r: u64| r as u32; // 0 = absent, 1..=2 values
                    let kind = match rnd(4) {
                        0 | 1 => Kind::Read(v(rnd(3))),
                        2 => Kind::Write(v(rnd(3))),
                        _ => Kind::Cas(v(rnd(3)), v(rnd(3))),
                    };
                    let info = !matches!(kind, Kind::Read(_)) && rnd(4) == 0;
                    LinOp {
                        inv,
                        ret: if info { NEVER } else { inv + 1 + rnd(8) },
                        kind,
                        class: if info { Class::Info } else { Class::Ok },
                        src,
                    }
                })
                .collect();
            ops.sort_by_key(|o| (o.inv, o.src));
            let truth = brute(&ops, ABSENT);
            let pruned = prune(ops.clone(), 3);
            assert_eq!(
                brute(&pruned, ABSENT),
                truth,
                "prune changed the verdict: {ops:?}"
            );
            let got = search(&pruned, ABSENT, 3, &lim());
            let ends: Vec<u64> = ops.iter().map(|o| o.ret.saturating_add(1)).collect();
            if truth {
                valid += 1;
                assert_eq!(got, Search::Linearizable, "{ops:?}");
                // Every window of a linearizable history is linearizable.
                for s in ops.iter().map(|o| o.inv).chain([0]) {
                    for &t in &ends {
                        let init = if s == 0 { ABSENT } else { ANY };
                        let w = window_ops(&ops, s, t);
                        assert!(brute(&w, init), "window {s}..{t} of {ops:?}: {w:?}");
                        assert!(!matches!(
                            run(&ops, 3, s, t, &lim()),
                            Search::NotLinearizable(_)
                        ));
                    }
                }
            } else {
                invalid += 1;
                let Search::NotLinearizable(f) = got else {
                    panic!("{got:?} for {ops:?}")
                };
                let (s, t, complete) = smallest_window(&pruned, 3, (0, NEVER, f), &lim());
                assert!(complete);
                let init = if s == 0 { ABSENT } else { ANY };
                let w = window_ops(&pruned, s, t);
                assert!(!brute(&w, init), "window {s}..{t} passes: {w:?} of {ops:?}");
                // The prefix just before the frontier is linearizable (the end is tight).
                assert!(brute(&window_ops(&pruned, 0, f), ABSENT), "{ops:?} f={f}");
            }
        }
        assert!(
            valid > 500 && invalid > 500,
            "{valid} valid, {invalid} invalid"
        );
    }
}
