//! The brute-force oracle: for tiny histories, try every subset of info ops taking effect and
//! every total order of the chosen ops consistent with real time, and replay each order on a
//! map of registers (all keys at once — so agreement also tests P-compositionality). Shares
//! nothing with the checker but the `Op` type: no partitioning, no memo, no pruning.

use std::collections::BTreeMap;

use crate::history::{Input, Op, OpStatus, Value};

/// Largest history the oracle accepts (it is exponential).
pub(super) const MAX_OPS: usize = 8;

/// Whether some subset of the info ops, in some real-time-respecting order together with all
/// ok ops, is a legal sequential history.
pub(super) fn linearizable(ops: &[Op]) -> bool {
    assert!(ops.len() <= MAX_OPS, "the oracle is for tiny histories");
    let info: Vec<usize> = (0..ops.len())
        .filter(|&i| ops[i].status == OpStatus::Info)
        .collect();
    (0u32..1 << info.len()).any(|subset| {
        let chosen: Vec<usize> = (0..ops.len())
            .filter(|&i| match info.iter().position(|&j| j == i) {
                Some(bit) => subset & (1 << bit) != 0,
                None => true,
            })
            .collect();
        let mut placed = vec![false; ops.len()];
        some_order(ops, &chosen, &mut placed, &BTreeMap::new(), chosen.len())
    })
}

/// Depth-first over orders: `a` must come before `b` iff `a` completed before `b` was invoked.
fn some_order(
    ops: &[Op],
    chosen: &[usize],
    placed: &mut [bool],
    state: &BTreeMap<String, Value>,
    left: usize,
) -> bool {
    if left == 0 {
        return true;
    }
    for &i in chosen {
        if placed[i] {
            continue;
        }
        let must_wait = chosen.iter().any(|&j| {
            !placed[j] && j != i && ops[j].complete_time.is_some_and(|c| c < ops[i].invoke_time)
        });
        if must_wait {
            continue;
        }
        let Some(next) = apply(state, &ops[i]) else {
            continue;
        };
        placed[i] = true;
        let found = some_order(ops, chosen, placed, &next, left - 1);
        placed[i] = false;
        if found {
            return true;
        }
    }
    false
}

/// Sequential semantics of one op on the map of registers; `None` if illegal.
fn apply(state: &BTreeMap<String, Value>, op: &Op) -> Option<BTreeMap<String, Value>> {
    let current = state.get(&op.key).cloned().unwrap_or(Value::Null);
    let ok = op.status == OpStatus::Ok;
    let new = match &op.input {
        Input::Read => match &op.output {
            Some(v) if *v == current => current,
            Some(_) => return None,
            None => current, // an info read observed nothing
        },
        Input::Write { value } => value.clone(),
        Input::Delete => Value::Null,
        Input::Cas { expected, new } if *expected == current => new.clone(),
        Input::Cas { .. } if ok => return None,
        Input::Cas { .. } => current,
    };
    let mut next = state.clone();
    next.insert(op.key.clone(), new);
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::super::Hist;
    use super::*;

    #[test]
    fn oracle_agrees_with_hand_answers() {
        assert!(linearizable(
            &Hist::new().write(1, 1, 0, 10).read(2, Some(1), 5, 15).ops()
        ));
        assert!(!linearizable(
            &Hist::new()
                .write(1, 1, 0, 10)
                .write(1, 2, 20, 30)
                .read(2, Some(1), 40, 50)
                .ops()
        ));
        assert!(linearizable(
            &Hist::new()
                .write(1, 1, 0, 10)
                .info_write(2, 2, 20, 30)
                .read(3, Some(2), 40, 50)
                .ops()
        ));
        assert!(!linearizable(
            &Hist::new()
                .key("a")
                .write(1, 1, 0, 10)
                .key("b")
                .read(2, Some(1), 20, 30)
                .ops()
        ));
    }
}
