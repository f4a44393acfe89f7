//! Random histories: a simulated linearizable register (each op takes effect at a random
//! instant inside its interval; timeouts become info and retire their process), and random
//! mutations of such histories, which may or may not stay linearizable.

use std::collections::BTreeMap;

use super::Rng;
use crate::history::{Event, EventType, Payload, Value, F};

#[derive(Debug, Clone, Copy)]
pub(crate) struct GenConfig {
    pub(crate) ops: usize,
    /// Concurrent clients; a client whose op times out continues under a new process id.
    pub(crate) clients: usize,
    pub(crate) keys: u64,
    /// Written values are drawn from `0..values` (small = many collisions = hard).
    pub(crate) values: u64,
    pub(crate) info_percent: u64,
    pub(crate) fail_percent: u64,
    /// Max idle time between a client's ops, and max length of each half of an op.
    pub(crate) gap: u64,
    pub(crate) half: u64,
}

impl GenConfig {
    /// A random small configuration for oracle-sized histories.
    pub(crate) fn small(rng: &mut Rng, max_ops: usize) -> Self {
        GenConfig {
            ops: 1 + rng.below(max_ops as u64) as usize,
            clients: 1 + rng.below(4) as usize,
            keys: 1 + rng.below(2),
            values: 1 + rng.below(3),
            info_percent: [0, 10, 25][rng.below(3) as usize],
            fail_percent: [0, 10][rng.below(2) as usize],
            gap: rng.below(4),
            half: 1 + rng.below(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Ok,
    Fail,
    Info,
    /// Invoked, never completed.
    Pending,
}

#[derive(Debug, Clone)]
pub(crate) struct GenOp {
    pub(crate) process: u64,
    pub(crate) key: String,
    pub(crate) f: F,
    pub(crate) input: Payload,
    /// What an ok read returned.
    pub(crate) read: Value,
    pub(crate) end: End,
    pub(crate) t0: u64,
    pub(crate) t1: u64,
}

fn value(rng: &mut Rng, values: u64) -> Value {
    Value::Int(rng.below(values) as i64)
}

fn maybe_null(rng: &mut Rng, values: u64) -> Value {
    if rng.chance(25) {
        Value::Null
    } else {
        value(rng, values)
    }
}

/// A linearizable history by construction. `next_pid` hands out process ids.
pub(crate) fn linearizable(rng: &mut Rng, cfg: &GenConfig, next_pid: &mut u64) -> Vec<GenOp> {
    let mut clients: Vec<(u64, u64)> = (0..cfg.clients)
        .map(|_| {
            *next_pid += 1;
            (*next_pid, 0)
        })
        .collect();
    // (op, linearization instant, class: 0 normal, 1 info, 2 fail)
    let mut drafts: Vec<(GenOp, u64, u8)> = Vec::new();
    for _ in 0..cfg.ops {
        let c = rng.below(cfg.clients as u64) as usize;
        let (process, free_at) = clients[c];
        let t0 = free_at + rng.below(cfg.gap + 1);
        let lin = t0 + rng.below(cfg.half + 1);
        let t1 = lin + rng.below(cfg.half + 1);
        let (f, input) = match rng.below(10) {
            0..=3 => (F::Read, Payload::default()),
            4..=6 => (F::Write, Payload::Scalar(value(rng, cfg.values))),
            7..=8 => (
                F::Cas,
                Payload::Pair(maybe_null(rng, cfg.values), value(rng, cfg.values)),
            ),
            _ => (F::Delete, Payload::default()),
        };
        let class = if rng.chance(cfg.info_percent) {
            1
        } else if rng.chance(cfg.fail_percent) {
            2
        } else {
            0
        };
        if class == 1 {
            *next_pid += 1;
            clients[c] = (*next_pid, t0 + rng.below(t1 - t0 + 1));
        } else {
            clients[c].1 = t1;
        }
        let op = GenOp {
            process,
            key: format!("k{}", rng.below(cfg.keys)),
            f,
            input,
            read: Value::Null,
            end: End::Ok,
            t0,
            t1,
        };
        drafts.push((op, lin, class));
    }

    // Apply in linearization order (ties in op order: both intervals contain the instant).
    let mut order: Vec<usize> = (0..drafts.len()).collect();
    order.sort_by_key(|&i| (drafts[i].1, i));
    let mut state: BTreeMap<String, Value> = BTreeMap::new();
    for i in order {
        let (op, _, class) = &mut drafts[i];
        let current = state.get(&op.key).cloned().unwrap_or(Value::Null);
        let takes_effect = match *class {
            2 => {
                op.end = End::Fail;
                false
            }
            1 => {
                op.end = if rng.chance(50) {
                    End::Info
                } else {
                    End::Pending
                };
                rng.chance(50)
            }
            _ => true,
        };
        if !takes_effect {
            continue;
        }
        let next = match (&op.f, &op.input) {
            (F::Read, _) => {
                op.read = current.clone();
                current
            }
            (F::Write, Payload::Scalar(v)) => v.clone(),
            (F::Delete, _) => Value::Null,
            (F::Cas, Payload::Pair(expected, new)) if *expected == current => new.clone(),
            (F::Cas, _) => {
                if op.end == End::Ok {
                    op.end = End::Fail; // the harness reports a failed precondition as fail
                }
                current
            }
            (_, _) => unreachable!("generator shapes"),
        };
        state.insert(op.key.clone(), next);
    }
    drafts.into_iter().map(|(op, _, _)| op).collect()
}

/// Applies one random mutation (retrying until one applies). The result is a well-formed
/// history that may or may not be linearizable.
pub(crate) fn mutate(rng: &mut Rng, ops: &mut [GenOp], cfg: &GenConfig, next_pid: &mut u64) {
    if ops.is_empty() {
        return;
    }
    for _ in 0..50 {
        let i = rng.below(ops.len() as u64) as usize;
        let op = &mut ops[i];
        // Weighted towards mutations likely to break linearizability.
        const KINDS: [u8; 12] = [0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6];
        let applied = match KINDS[rng.below(KINDS.len() as u64) as usize] {
            // A read returns something else.
            0 if op.f == F::Read && op.end == End::Ok => {
                op.read = maybe_null(rng, cfg.values + 1);
                true
            }
            // A write or cas stores something else.
            1 if matches!(op.input, Payload::Scalar(Value::Int(_))) => {
                op.input = Payload::Scalar(value(rng, cfg.values + 1));
                true
            }
            1 if matches!(op.input, Payload::Pair(..)) => {
                if let Payload::Pair(_, new) = &mut op.input {
                    *new = value(rng, cfg.values + 1);
                }
                true
            }
            // A cas expects something else.
            2 => match &mut op.input {
                Payload::Pair(expected, _) => {
                    *expected = maybe_null(rng, cfg.values + 1);
                    true
                }
                _ => false,
            },
            // An unknown or failed op claims success.
            3 if op.end != End::Ok => {
                op.end = End::Ok;
                if op.f == F::Read {
                    op.read = maybe_null(rng, cfg.values + 1);
                }
                true
            }
            // An acknowledged op becomes unknown (always stays linearizable).
            4 if op.end == End::Ok => {
                op.end = if rng.chance(50) {
                    End::Info
                } else {
                    End::Pending
                };
                *next_pid += 1;
                op.process = *next_pid;
                true
            }
            // The op happened at another time.
            5 => {
                let len = op.t1 - op.t0;
                let horizon = ops.iter().map(|o| o.t1).max().unwrap_or(0) + 2;
                let op = &mut ops[i];
                op.t0 = rng.below(horizon);
                op.t1 = op.t0 + len;
                *next_pid += 1;
                op.process = *next_pid;
                true
            }
            // Completion moved earlier or later.
            6 if op.end == End::Ok => {
                let len = op.t1 - op.t0;
                op.t1 = op.t0 + rng.below(2 * len + 2);
                *next_pid += 1;
                op.process = *next_pid;
                true
            }
            _ => false,
        };
        if applied {
            return;
        }
    }
}

/// The events a harness would have logged for these ops.
pub(crate) fn to_events(ops: &[GenOp]) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::new();
    for op in ops {
        let ev =
            |kind, value, time| Event::new(op.process, kind, op.f, op.key.clone(), value, time);
        let completion = match op.f {
            F::Read => Payload::Scalar(op.read.clone()),
            _ => op.input.clone(),
        };
        events.push(ev(EventType::Invoke, op.input.clone(), op.t0));
        let kind = match op.end {
            End::Ok => EventType::Ok,
            End::Fail => EventType::Fail,
            End::Info => EventType::Info,
            End::Pending => continue,
        };
        let value = if kind == EventType::Ok {
            completion
        } else {
            Payload::default()
        };
        events.push(ev(kind, value, op.t1));
    }
    // A process's ops are generated in time order, so a stable sort by time keeps each
    // process's events in order even when one op ends at the instant the next begins.
    events.sort_by_key(|e| e.time);
    events
}
