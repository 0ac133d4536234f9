//! The checked apply shared by the unit tests of the state machine.

use super::{Command, Op, Outcome, PartitionState};

/// Applies `cmd` at `index` with the proposer's clock `now`, checking that `growth`
/// predicted the change of accounted memory (exactly; for `Cdc` an upper bound), that
/// the index counts as applied, and the state's internal invariants.
pub(super) fn apply_checked(
    state: &mut PartitionState,
    index: u64,
    now: u64,
    cmd: Command,
) -> Outcome {
    let op = Op { now_ms: now, cmd };
    let predicted = state.growth(&op);
    let before = state.memory_used() as i64;
    let outcome = state.apply(index, &op);
    let grown = state.memory_used() as i64 - before;
    if let Command::Cdc { .. } | Command::CdcTx { .. } = op.cmd {
        assert!(
            predicted >= 0 && grown <= predicted,
            "{grown} > {predicted}"
        );
    } else {
        assert_eq!(grown, predicted, "{op:?}");
    }
    assert_eq!(state.applied_index(), index);
    state.assert_consistent();
    outcome
}
