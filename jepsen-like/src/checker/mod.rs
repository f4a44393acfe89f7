//! Offline checkers that judge a paired history: per-key linearizability of a register
//! (read / write / cas / delete), and the set checker in [`set`]. They know the history format
//! and nothing about cairn, its API or how the history was produced.
//!
//! Linearizability is P-compositional: a history is linearizable iff each key's sub-history
//! is, so keys are checked independently, in sorted order. The verdict is `Invalid` if any key
//! is invalid, else `Unknown` if any key ran out of budget, else `Valid`. A search that runs
//! out of budget is never `Valid`.
//!
//! # Semantics of ops
//! * Every key starts absent (`null`).
//! * `ok` ops took effect at one instant between invoke and completion (closed intervals: an
//!   op completing at t and one invoked at t are concurrent).
//! * `fail` ops took no effect; [`crate::history::pair`] has already dropped them. (A cas that
//!   failed its precondition is `fail`, and so carries no information here.)
//! * `info` ops (and invokes never completed) took effect at one instant in [invoke, +∞), or
//!   never. An info read constrains nothing and is ignored. An info cas applies iff the key
//!   holds its expected value at that instant. "Never" needs no separate branch: an info op
//!   can always be placed after every other op, where nothing observes it.
//! * Before searching, info ops that store a value no op could observe (no `ok` read returned
//!   it, no cas expected it) are dropped; this provably preserves the verdict (see
//!   `prune_unobserved`) and keeps timeouts from multiplying the search.
//!
//! The search itself (porcupine-style WGL) and four further rules that keep info ops from
//! blowing it up, each with its soundness argument, are in the private `wgl` module.

mod register;
pub mod set;
mod wgl;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::history::{Op, OpStatus, Value};
use register::{Illegal, Interner, ModelOp, State};
use wgl::{Exhausted, Outcome, Rejection, TimedOp};

/// Limits on the search. `max_steps` and `max_cache_bytes` apply to each key separately (one
/// hard key does not starve the others); `deadline` applies to the whole check.
#[derive(Debug, Clone, Default)]
pub struct Budget {
    /// Stop (Unknown) once this instant passes. Checked every 1024 steps.
    pub deadline: Option<Instant>,
    /// Stop (Unknown) after this many search steps on one key.
    pub max_steps: Option<u64>,
    /// Stop (Unknown) once one key's memo cache would exceed about this many bytes.
    pub max_cache_bytes: Option<usize>,
}

impl Budget {
    /// Default memory cap per key: a quarter of the 24 GiB CI machine is plenty, and stops a
    /// pathological history from taking the machine down with it.
    pub const DEFAULT_MAX_CACHE_BYTES: usize = 4 << 30;

    /// No limits at all (tests and small histories only).
    pub fn unlimited() -> Self {
        Budget::default()
    }

    /// A deadline `timeout` from now, and the default memory cap.
    pub fn with_timeout(timeout: Duration) -> Self {
        Budget {
            deadline: Some(Instant::now() + timeout),
            max_steps: None,
            max_cache_bytes: Some(Self::DEFAULT_MAX_CACHE_BYTES),
        }
    }

    /// At most `max_steps` search steps per key, nothing else.
    pub fn steps(max_steps: u64) -> Self {
        Budget {
            max_steps: Some(max_steps),
            ..Budget::default()
        }
    }
}

/// The answer for a whole history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Every key is linearizable.
    Valid,
    /// This key (the first invalid one in key order) is not linearizable.
    Invalid {
        key: String,
        explanation: Box<Explanation>,
    },
    /// No key is invalid, but at least one could not be decided within the budget.
    Unknown { reason: String },
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid)
    }
    pub fn is_invalid(&self) -> bool {
        matches!(self, Verdict::Invalid { .. })
    }
    pub fn is_unknown(&self) -> bool {
        matches!(self, Verdict::Unknown { .. })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Valid => f.write_str("valid: every key is linearizable"),
            Verdict::Invalid { explanation, .. } => write!(f, "invalid: {explanation}"),
            Verdict::Unknown { reason } => write!(f, "unknown: {reason}"),
        }
    }
}

/// The verdict plus what happened on each key, in key order. Deterministic for a given
/// history unless a deadline was hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub keys: Vec<KeyReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyReport {
    pub key: String,
    /// Ops on this key (ok + info).
    pub ops: usize,
    /// Of which info (including invokes never completed).
    pub info_ops: usize,
    /// Info ops left out of the search: info reads, and info ops whose stored value nothing
    /// observes.
    pub info_ops_dropped: usize,
    pub outcome: KeyOutcome,
    pub steps: u64,
    pub cache_entries: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum KeyOutcome {
    Valid,
    Invalid { explanation: Box<Explanation> },
    Unknown { reason: String },
}

/// Why a key is not linearizable, in the manner of porcupine's partial linearizations and
/// Knossos's final paths: the longest prefix the search could linearize, and the op that had
/// to take effect next but could not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub key: String,
    /// Ops the search considered on this key (after dropping irrelevant info ops).
    pub ops_considered: usize,
    /// The longest linearizable prefix found, in linearization order.
    pub longest_prefix: Vec<LinearizedOp>,
    /// The key's value after that prefix.
    pub value: Value,
    /// The op whose completion was reached while it was still not linearized: it must take
    /// effect before that point, and nothing pending lets it.
    pub blocked: Op,
    /// Every op that could have been linearized next (including `blocked`), in invoke order,
    /// and why it was not.
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinearizedOp {
    pub op: Op,
    /// The key's value right after this op.
    pub value_after: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub op: Op,
    pub rejection: CandidateRejection,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum CandidateRejection {
    /// A read returned a value the key did not hold.
    ReadMismatch { held: Value },
    /// A cas reported success but the key did not hold its expected value.
    CasPrecondition { held: Value },
    /// An info op that would not change the key here (so it is better left for later).
    NoEffect,
    /// A write or delete right after an info op whose value nobody has observed: the same
    /// linearization without that info op is explored instead.
    OverwritesUnobservedInfo,
    /// An identical info op invoked earlier is still pending: it is tried first.
    EarlierTwinPending,
    /// Legal here, but every continuation after it was already explored and failed.
    Explored,
}

/// How many prefix ops the human-readable form shows.
const DISPLAY_PREFIX: usize = 8;

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "key {:?} is not linearizable ({} ops considered)",
            self.key, self.ops_considered
        )?;
        writeln!(
            f,
            "  longest linearizable prefix: {} ops, leaving the value {}",
            self.longest_prefix.len(),
            self.value
        )?;
        let skip = self.longest_prefix.len().saturating_sub(DISPLAY_PREFIX);
        if skip > 0 {
            writeln!(f, "    … {skip} earlier ops")?;
        }
        for l in &self.longest_prefix[skip..] {
            writeln!(f, "    {}  ⇒ {}", l.op, l.value_after)?;
        }
        writeln!(
            f,
            "  then {} must take effect before it completes, but no pending op can go next:",
            self.blocked
        )?;
        for c in &self.candidates {
            let why = match &c.rejection {
                CandidateRejection::ReadMismatch { held } => format!("the value is {held}"),
                CandidateRejection::CasPrecondition { held } => {
                    format!("cas succeeded but the value is {held}")
                }
                CandidateRejection::NoEffect => "info op with no effect here".to_owned(),
                CandidateRejection::OverwritesUnobservedInfo => {
                    "would overwrite an unobserved info value (explored without it)".to_owned()
                }
                CandidateRejection::EarlierTwinPending => {
                    "an identical earlier info op goes first".to_owned()
                }
                CandidateRejection::Explored => "every continuation fails".to_owned(),
            };
            writeln!(f, "    {}: {why}", c.op)?;
        }
        Ok(())
    }
}

/// Checks every key; see the module docs for the semantics.
pub fn check(ops: &[Op], budget: &Budget) -> Verdict {
    check_report(ops, budget).verdict
}

/// [`check`], with what happened on each key.
pub fn check_report(ops: &[Op], budget: &Budget) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let keys: Vec<KeyReport> = by_key
        .into_iter()
        .map(|(key, ops)| check_key(key, &ops, budget).0)
        .collect();

    let mut unknown = Vec::new();
    let mut verdict = None;
    for k in &keys {
        match &k.outcome {
            KeyOutcome::Invalid { explanation } if verdict.is_none() => {
                verdict = Some(Verdict::Invalid {
                    key: k.key.clone(),
                    explanation: explanation.clone(),
                });
            }
            KeyOutcome::Unknown { reason } => unknown.push(format!("{:?}: {reason}", k.key)),
            _ => {}
        }
    }
    let verdict = verdict.unwrap_or_else(|| {
        if unknown.is_empty() {
            Verdict::Valid
        } else {
            Verdict::Unknown {
                reason: format!(
                    "{} of {} keys undecided: {}",
                    unknown.len(),
                    keys.len(),
                    unknown.join("; ")
                ),
            }
        }
    });
    Report { verdict, keys }
}

/// Checks one key's ops. Also returns the witness linearization (op ids in order) when valid,
/// which the tests verify independently.
fn check_key(key: &str, ops: &[&Op], budget: &Budget) -> (KeyReport, Option<Vec<usize>>) {
    let mut interner = Interner::new();
    let mut considered: Vec<(&Op, TimedOp)> = ops
        .iter()
        .filter_map(|op| {
            let model = ModelOp::from_op(op, &mut interner)?;
            Some((
                *op,
                TimedOp {
                    model,
                    invoke: op.invoke_time,
                    complete: op.complete_time,
                },
            ))
        })
        .collect();
    prune_unobserved(&mut considered);
    let info_ops = ops.iter().filter(|o| o.status == OpStatus::Info).count();
    let timed: Vec<TimedOp> = considered.iter().map(|(_, t)| *t).collect();
    let search = wgl::search(&timed, budget);

    let mut witness = None;
    let outcome = match search.outcome {
        Outcome::Linearizable { order } => {
            witness = Some(order.iter().map(|&i| considered[i].0.id).collect());
            KeyOutcome::Valid
        }
        Outcome::NotLinearizable(failure) => {
            let op = |i: usize| considered[i].0.clone();
            let value = |s: State| interner.value(s).clone();
            KeyOutcome::Invalid {
                explanation: Box::new(Explanation {
                    key: key.to_owned(),
                    ops_considered: considered.len(),
                    longest_prefix: failure
                        .prefix
                        .iter()
                        .map(|&(i, s)| LinearizedOp {
                            op: op(i),
                            value_after: value(s),
                        })
                        .collect(),
                    value: value(failure.state),
                    blocked: op(failure.blocked),
                    candidates: failure
                        .candidates
                        .iter()
                        .map(|&(i, why)| Candidate {
                            op: op(i),
                            rejection: match why {
                                Rejection::Illegal(Illegal::ReadMismatch { held }) => {
                                    CandidateRejection::ReadMismatch { held: value(held) }
                                }
                                Rejection::Illegal(Illegal::CasPrecondition { held }) => {
                                    CandidateRejection::CasPrecondition { held: value(held) }
                                }
                                Rejection::NoEffect => CandidateRejection::NoEffect,
                                Rejection::OverwritesUnobservedInfo => {
                                    CandidateRejection::OverwritesUnobservedInfo
                                }
                                Rejection::EarlierTwinPending => {
                                    CandidateRejection::EarlierTwinPending
                                }
                                Rejection::Explored => CandidateRejection::Explored,
                            },
                        })
                        .collect(),
                }),
            }
        }
        Outcome::OutOfBudget(why) => KeyOutcome::Unknown {
            reason: match why {
                Exhausted::Steps => format!("step budget exhausted after {} steps", search.steps),
                Exhausted::Deadline => format!("deadline passed after {} steps", search.steps),
                Exhausted::Memory => format!(
                    "memo cache over its byte budget after {} steps ({} entries)",
                    search.steps, search.cache_entries
                ),
            },
        },
    };
    let report = KeyReport {
        key: key.to_owned(),
        ops: ops.len(),
        info_ops,
        info_ops_dropped: ops.len() - considered.len(),
        outcome,
        steps: search.steps,
        cache_entries: search.cache_entries,
    };
    (report, witness)
}

/// Drops info ops whose effect no op can observe.
///
/// Let O be the values returned by `ok` reads plus the expected values of every cas. An info
/// op that stores a value v ∉ O (write v, cas →v, delete when absent ∉ O) can be removed
/// without changing the verdict:
/// * if the history without it is linearizable, so is the one with it (it never took effect);
/// * if L linearizes the history with it applied, then in L nothing between it and the next
///   blind write/delete can depend on the key holding v (no read returns v, no cas expects
///   v), and info cas ops there are no-ops; removing it leaves those info cas ops possibly
///   applicable, so move them to the end of L, where nothing observes them. The rest of L is
///   unchanged, so it stays legal.
///
/// O is computed once over all ops (including dropped info cas), which only makes it larger,
/// i.e. the pruning more conservative.
fn prune_unobserved(ops: &mut Vec<(&Op, TimedOp)>) {
    let observed: HashSet<State> = ops
        .iter()
        .filter_map(|(_, t)| match t.model.command {
            register::Command::Read(v) => Some(v),
            register::Command::Cas { expected, .. } => Some(expected),
            _ => None,
        })
        .collect();
    ops.retain(|(_, t)| {
        t.model.definite || t.model.stores().is_some_and(|v| observed.contains(&v))
    });
}
