//! The sequential specification of one key: a register that is absent initially and supports
//! read, write, compare-and-set and delete. Pure: no clock, no I/O, no iteration over hash
//! maps. Knows nothing of search, time or the JSON format.

use std::collections::HashMap;

use crate::history::{Input, Op, OpStatus, Value};

/// An interned [`Value`]; [`ABSENT`] is `Null`. Interning makes a state 4 bytes, so the search
/// cache stores and compares integers instead of strings.
pub(crate) type State = u32;

/// The state of a key that does not exist (also every key's initial state).
pub(crate) const ABSENT: State = 0;

/// Maps each distinct value of one key's history to a [`State`], in first-seen order.
pub(crate) struct Interner {
    ids: HashMap<Value, State>,
    values: Vec<Value>,
}

impl Interner {
    pub(crate) fn new() -> Self {
        let mut ids = HashMap::new();
        ids.insert(Value::Null, ABSENT);
        Interner {
            ids,
            values: vec![Value::Null],
        }
    }

    pub(crate) fn intern(&mut self, v: &Value) -> State {
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        // The search packs a state and one flag into 32 bits.
        assert!(
            self.values.len() < 1 << 31,
            "more than 2^31 distinct values on one key"
        );
        let id = self.values.len() as State;
        self.values.push(v.clone());
        self.ids.insert(v.clone(), id);
        id
    }

    pub(crate) fn value(&self, s: State) -> &Value {
        &self.values[s as usize]
    }
}

/// An operation as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Command {
    /// A read that returned this value. (Reads without a result are never given to the model.)
    Read(State),
    Write(State),
    Cas {
        expected: State,
        new: State,
    },
    Delete,
}

/// A command and whether it is known to have taken effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ModelOp {
    pub(crate) command: Command,
    /// `true` for `ok`: it took effect, and its result is what the client saw. `false` for
    /// `info`: if it is linearized it takes effect, and nothing is known about its result.
    pub(crate) definite: bool,
}

impl ModelOp {
    /// `None` for an info read: it has no effect and no result, so it constrains nothing.
    pub(crate) fn from_op(op: &Op, interner: &mut Interner) -> Option<Self> {
        let definite = op.status == OpStatus::Ok;
        let command = match &op.input {
            Input::Read => Command::Read(interner.intern(op.output.as_ref()?)),
            Input::Write { value } => Command::Write(interner.intern(value)),
            Input::Cas { expected, new } => Command::Cas {
                expected: interner.intern(expected),
                new: interner.intern(new),
            },
            Input::Delete => Command::Delete,
        };
        Some(ModelOp { command, definite })
    }

    /// Whether it overwrites the register without looking at it (write, delete).
    pub(crate) fn is_blind(&self) -> bool {
        matches!(self.command, Command::Write(_) | Command::Delete)
    }

    /// The value this op stores when it changes the register, if any.
    pub(crate) fn stores(&self) -> Option<State> {
        match self.command {
            Command::Read(_) => None,
            Command::Write(v) => Some(v),
            Command::Cas { new, .. } => Some(new),
            Command::Delete => Some(ABSENT),
        }
    }
}

/// Why an operation cannot take effect in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Illegal {
    /// A read returned something other than what the register holds.
    ReadMismatch { held: State },
    /// A cas reported success, but the register did not hold its expected value.
    CasPrecondition { held: State },
}

/// Applies `op` to `state`: the register's whole contract.
///
/// * read: legal iff it returned the current value; no change.
/// * write: always legal; sets the value. delete: always legal; sets absent.
/// * cas `ok`: legal iff the current value is `expected`; sets `new`. (A cas whose
///   precondition failed is reported as `fail` by the harness and never reaches the model.)
/// * cas `info`: always legal; sets `new` iff the current value is `expected`, else no change.
///   Every info op is therefore legal in every state — the search relies on this (an info op
///   can always be linearized last, where nothing observes it).
pub(crate) fn step(state: State, op: &ModelOp) -> Result<State, Illegal> {
    match op.command {
        Command::Read(v) if v == state => Ok(state),
        Command::Read(_) => Err(Illegal::ReadMismatch { held: state }),
        Command::Write(v) => Ok(v),
        Command::Delete => Ok(ABSENT),
        Command::Cas { expected, new } if expected == state => Ok(new),
        Command::Cas { .. } if !op.definite => Ok(state),
        Command::Cas { .. } => Err(Illegal::CasPrecondition { held: state }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(command: Command) -> ModelOp {
        ModelOp {
            command,
            definite: true,
        }
    }
    fn info(command: Command) -> ModelOp {
        ModelOp {
            command,
            definite: false,
        }
    }

    #[test]
    fn step_table() {
        use Command::*;
        let cases: [(State, ModelOp, Result<State, Illegal>); 10] = [
            (ABSENT, ok(Read(ABSENT)), Ok(ABSENT)),
            (1, ok(Read(1)), Ok(1)),
            (1, ok(Read(2)), Err(Illegal::ReadMismatch { held: 1 })),
            (1, ok(Write(2)), Ok(2)),
            (1, ok(Delete), Ok(ABSENT)),
            (
                1,
                ok(Cas {
                    expected: 1,
                    new: 2,
                }),
                Ok(2),
            ),
            (
                ABSENT,
                ok(Cas {
                    expected: ABSENT,
                    new: 2,
                }),
                Ok(2),
            ),
            (
                3,
                ok(Cas {
                    expected: 1,
                    new: 2,
                }),
                Err(Illegal::CasPrecondition { held: 3 }),
            ),
            (
                3,
                info(Cas {
                    expected: 1,
                    new: 2,
                }),
                Ok(3),
            ),
            (
                1,
                info(Cas {
                    expected: 1,
                    new: 2,
                }),
                Ok(2),
            ),
        ];
        for (state, op, expected) in cases {
            assert_eq!(step(state, &op), expected, "{op:?} in state {state}");
        }
    }

    #[test]
    fn interner_keeps_null_absent_and_distinguishes_types() {
        let mut i = Interner::new();
        assert_eq!(i.intern(&Value::Null), ABSENT);
        let one = i.intern(&Value::Int(1));
        let one_str = i.intern(&Value::Str("1".into()));
        assert_ne!(one, one_str);
        assert_eq!(i.intern(&Value::Int(1)), one);
        assert_eq!(i.value(one_str), &Value::Str("1".into()));
    }
}
