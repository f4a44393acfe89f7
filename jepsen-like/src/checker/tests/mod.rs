//! Proof of the checker: known-answer histories, a brute-force oracle, random histories from a
//! simulated register and their mutations, a differential test against `todc-utils`, budget
//! behaviour and a performance sanity check. Everything here is deterministic (fixed seeds).

mod differential;
mod known;
mod oracle;
mod perf;
mod property;
mod random;

use std::collections::BTreeMap;

use super::{check_key, check_report, Budget, KeyOutcome, Report, Verdict};
use crate::history::{pair, Event, EventType, Input, Op, OpStatus, Payload, Value, F};

/// Builds histories op by op; events are stably sorted by time before pairing, so each
/// process's ops must be added in program order.
#[derive(Default)]
pub(super) struct Hist {
    key: String,
    events: Vec<Event>,
}

pub(super) fn val(v: Option<i64>) -> Value {
    v.map_or(Value::Null, Value::Int)
}

impl Hist {
    pub(super) fn new() -> Self {
        Hist {
            key: "k".to_owned(),
            events: Vec::new(),
        }
    }

    /// Subsequent ops go to this key.
    pub(super) fn key(mut self, key: &str) -> Self {
        self.key = key.to_owned();
        self
    }

    fn push(&mut self, p: u64, kind: EventType, f: F, value: Payload, t: u64) {
        self.events
            .push(Event::new(p, kind, f, self.key.clone(), value, t));
    }

    /// An op invoked at `t0` that ends as `end` at `t1` (`None`: never completes).
    pub(super) fn op(
        mut self,
        p: u64,
        f: F,
        input: Payload,
        output: Payload,
        t0: u64,
        end: Option<(EventType, u64)>,
    ) -> Self {
        self.push(p, EventType::Invoke, f, input, t0);
        if let Some((kind, t1)) = end {
            self.push(p, kind, f, output, t1);
        }
        self
    }

    pub(super) fn write(self, p: u64, v: i64, t0: u64, t1: u64) -> Self {
        let v = Payload::Scalar(Value::Int(v));
        self.op(p, F::Write, v.clone(), v, t0, Some((EventType::Ok, t1)))
    }
    pub(super) fn read(self, p: u64, v: Option<i64>, t0: u64, t1: u64) -> Self {
        self.op(
            p,
            F::Read,
            Payload::default(),
            Payload::Scalar(val(v)),
            t0,
            Some((EventType::Ok, t1)),
        )
    }
    pub(super) fn cas(self, p: u64, expected: Option<i64>, new: i64, t0: u64, t1: u64) -> Self {
        let v = Payload::Pair(val(expected), Value::Int(new));
        self.op(p, F::Cas, v.clone(), v, t0, Some((EventType::Ok, t1)))
    }
    pub(super) fn delete(self, p: u64, t0: u64, t1: u64) -> Self {
        self.op(
            p,
            F::Delete,
            Payload::default(),
            Payload::default(),
            t0,
            Some((EventType::Ok, t1)),
        )
    }
    pub(super) fn fail_write(self, p: u64, v: i64, t0: u64, t1: u64) -> Self {
        let v = Payload::Scalar(Value::Int(v));
        self.op(p, F::Write, v.clone(), v, t0, Some((EventType::Fail, t1)))
    }
    /// A write that timed out: `info` at `t1`.
    pub(super) fn info_write(self, p: u64, v: i64, t0: u64, t1: u64) -> Self {
        let v = Payload::Scalar(Value::Int(v));
        self.op(p, F::Write, v.clone(), v, t0, Some((EventType::Info, t1)))
    }
    pub(super) fn info_cas(
        self,
        p: u64,
        expected: Option<i64>,
        new: i64,
        t0: u64,
        t1: u64,
    ) -> Self {
        let v = Payload::Pair(val(expected), Value::Int(new));
        self.op(p, F::Cas, v.clone(), v, t0, Some((EventType::Info, t1)))
    }
    /// A write invoked and never completed (the history ended).
    pub(super) fn pending_write(self, p: u64, v: i64, t0: u64) -> Self {
        self.op(
            p,
            F::Write,
            Payload::Scalar(Value::Int(v)),
            Payload::default(),
            t0,
            None,
        )
    }

    pub(super) fn events(&self) -> Vec<Event> {
        let mut events = self.events.clone();
        events.sort_by_key(|e| e.time);
        events
    }

    pub(super) fn ops(&self) -> Vec<Op> {
        pair(&self.events()).expect("test histories are well formed")
    }
}

/// Checks with no budget, and verifies any witness the checker produced.
pub(super) fn verdict(ops: &[Op]) -> Verdict {
    let report = check_report(ops, &Budget::unlimited());
    for k in &report.keys {
        let key_ops: Vec<&Op> = ops.iter().filter(|o| o.key == k.key).collect();
        let (_, witness) = check_key(&k.key, &key_ops, &Budget::unlimited());
        match (&k.outcome, witness) {
            (KeyOutcome::Valid, Some(order)) => verify_order(&key_ops, &order, true),
            (KeyOutcome::Valid, None) => panic!("valid key {:?} without a witness", k.key),
            (KeyOutcome::Invalid { explanation }, _) => {
                let prefix: Vec<usize> =
                    explanation.longest_prefix.iter().map(|l| l.op.id).collect();
                verify_order(&key_ops, &prefix, false);
                let blocked = &explanation.blocked;
                assert_eq!(blocked.status, OpStatus::Ok, "only an ok op can block");
                assert!(!prefix.contains(&blocked.id), "blocked op is in the prefix");
                assert!(explanation.candidates.iter().any(|c| c.op.id == blocked.id));
                assert!(explanation
                    .candidates
                    .iter()
                    .all(|c| !prefix.contains(&c.op.id)));
                let last = explanation.longest_prefix.last().map(|l| &l.value_after);
                assert_eq!(last.unwrap_or(&Value::Null), &explanation.value);
            }
            (_, _) => {}
        }
    }
    report.verdict
}

/// An independent check that `order` (op ids) is a linearization of `ops` (one key) — or, if
/// not `complete`, a prefix of one: every op at most once (every ok op exactly once if
/// complete); an op placed only after every ok op that completed before its invoke; ordered
/// pairs never against real time; and the register's sequential semantics hold.
pub(super) fn verify_order(ops: &[&Op], order: &[usize], complete: bool) {
    let by_id: BTreeMap<usize, &Op> = ops.iter().map(|o| (o.id, *o)).collect();
    let mut seen = BTreeMap::new();
    for (pos, id) in order.iter().enumerate() {
        assert!(seen.insert(*id, pos).is_none(), "op {id} linearized twice");
    }
    for op in ops {
        if complete && op.status == OpStatus::Ok {
            assert!(
                seen.contains_key(&op.id),
                "ok op {op} missing from the witness"
            );
        }
    }
    let mut state = Value::Null;
    for (pos, id) in order.iter().enumerate() {
        let op = by_id[id];
        for before in ops {
            if before.complete_time.is_some_and(|c| c < op.invoke_time) {
                assert!(
                    seen.get(&before.id).is_some_and(|&p| p < pos),
                    "{op} is placed before {before}, which completed before it was invoked"
                );
            }
        }
        for later in &order[pos + 1..] {
            let later = by_id[later];
            if let Some(done) = later.complete_time {
                assert!(
                    done >= op.invoke_time,
                    "witness puts {op} before {later}, which completed before it was invoked"
                );
            }
        }
        let definite = op.status == OpStatus::Ok;
        state = match (&op.input, &op.output) {
            (Input::Read, Some(v)) => {
                assert_eq!(
                    v, &state,
                    "witness: {op} reads {v} but the register holds {state}"
                );
                state
            }
            (Input::Read, None) => panic!("an info read has no place in a witness"),
            (Input::Write { value }, _) => value.clone(),
            (Input::Delete, _) => Value::Null,
            (Input::Cas { expected, new }, _) if *expected == state => new.clone(),
            (Input::Cas { .. }, _) => {
                assert!(!definite, "witness: ok {op} with a failing precondition");
                state
            }
        };
    }
}

/// SplitMix64: tiny, seedable, and stable forever (a failing seed stays reproducible).
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub(super) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
