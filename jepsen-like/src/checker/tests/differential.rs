//! The checker against an independent implementation: `todc-utils`'s `WGLChecker` (Horn &
//! Kroening's memoized WGL), on random single-key histories larger than the oracle can take.
//!
//! todc needs every call to have a response, so — as in its own etcd test — an info op gets a
//! synthetic response after every real event, and its specification makes an info op legal
//! in every state (it applies, a cas only if its precondition holds). That encodes the same
//! semantics as ours by a different route: no pruning, no "skip no-op info" rule, no early
//! success; info ops are linearized somewhere before the end of time.

use todc_utils::linearizability::history::{Action, History};
use todc_utils::linearizability::WGLChecker;
use todc_utils::Specification;

use super::random::{linearizable, mutate, to_events, GenConfig};
use super::*;

#[derive(Debug, Clone)]
struct TodcOp {
    input: Input,
    output: Option<Value>,
    definite: bool,
}

struct TodcRegister;

impl Specification for TodcRegister {
    type State = Value;
    type Operation = TodcOp;

    fn init() -> Value {
        Value::Null
    }

    fn apply(op: &TodcOp, state: &Value) -> (bool, Value) {
        match (&op.input, &op.output) {
            (Input::Read, Some(v)) => (v == state, state.clone()),
            (Input::Read, None) => (true, state.clone()),
            (Input::Write { value }, _) => (true, value.clone()),
            (Input::Delete, _) => (true, Value::Null),
            (Input::Cas { expected, new }, _) if expected == state => (true, new.clone()),
            (Input::Cas { .. }, _) => (!op.definite, state.clone()),
        }
    }
}

fn todc_linearizable(ops: &[Op]) -> bool {
    if ops.is_empty() {
        return true;
    }
    // todc indexes processes densely.
    let procs: BTreeMap<u64, usize> = ops
        .iter()
        .map(|o| o.process)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, i))
        .collect();
    // (time, 0 = call / 1 = return, op index); closed intervals: calls first at equal times.
    let mut marks: Vec<(u64, u8, usize)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        marks.push((op.invoke_time, 0, i));
        marks.push((op.complete_time.unwrap_or(u64::MAX), 1, i));
    }
    marks.sort_unstable();
    let actions = marks
        .into_iter()
        .map(|(_, kind, i)| {
            let op = &ops[i];
            let t = TodcOp {
                input: op.input.clone(),
                output: op.output.clone(),
                definite: op.status == OpStatus::Ok,
            };
            let action = if kind == 0 {
                Action::Call(t)
            } else {
                Action::Response(t)
            };
            (procs[&op.process], action)
        })
        .collect();
    WGLChecker::<TodcRegister>::is_linearizable(History::from_actions(actions))
}

fn compare(seed: u64, cases: u64, max_ops: usize, mutations: u64) -> (u64, u64) {
    let mut rng = Rng::new(seed);
    let (mut valid, mut invalid) = (0, 0);
    for case in 0..cases {
        let cfg = GenConfig {
            ops: 1 + rng.below(max_ops as u64) as usize,
            clients: 2 + rng.below(4) as usize,
            keys: 1,
            values: 2 + rng.below(4),
            info_percent: [0, 5, 15][rng.below(3) as usize],
            fail_percent: 5,
            gap: rng.below(5),
            half: 1 + rng.below(8),
        };
        let mut next_pid = 0;
        let mut gen = linearizable(&mut rng, &cfg, &mut next_pid);
        for _ in 0..rng.below(mutations + 1) * 2 {
            mutate(&mut rng, &mut gen, &cfg, &mut next_pid);
        }
        let ops = pair(&to_events(&gen)).expect("generated histories are well formed");
        let theirs = todc_linearizable(&ops);
        let ours = verdict(&ops);
        assert!(!ours.is_unknown());
        assert_eq!(
            ours.is_valid(),
            theirs,
            "seed {seed:#x} case {case}: ours {ours}, todc {theirs}: {ops:#?}"
        );
        if theirs {
            valid += 1
        } else {
            invalid += 1
        }
    }
    (valid, invalid)
}

#[test]
fn agrees_with_todc_on_random_histories_up_to_24_ops() {
    let (valid, invalid) = compare(0x70DC_0001, 1500, 24, 2);
    eprintln!("todc ≤24 ops: {valid} valid, {invalid} invalid");
    assert!(
        valid > 300 && invalid > 300,
        "{valid} valid, {invalid} invalid"
    );
}

#[test]
fn agrees_with_todc_on_random_histories_up_to_60_ops() {
    let (valid, invalid) = compare(0x70DC_0002, 300, 60, 1);
    eprintln!("todc ≤60 ops: {valid} valid, {invalid} invalid");
    assert!(
        valid > 50 && invalid > 50,
        "{valid} valid, {invalid} invalid"
    );
}

#[test]
fn todc_encoding_agrees_on_hand_written_answers() {
    // Guards the encoding above: if it were wrong, the differential test would prove little.
    let stale = Hist::new()
        .write(1, 1, 0, 10)
        .write(1, 2, 20, 30)
        .read(2, Some(1), 40, 50);
    assert!(!todc_linearizable(&stale.ops()));
    let info_seen = Hist::new()
        .write(1, 1, 0, 10)
        .info_write(2, 2, 20, 30)
        .read(3, Some(2), 40, 50);
    assert!(todc_linearizable(&info_seen.ops()));
    let info_unseen = Hist::new()
        .write(1, 1, 0, 10)
        .info_write(2, 2, 20, 30)
        .read(3, Some(1), 40, 50);
    assert!(todc_linearizable(&info_unseen.ops()));
}
