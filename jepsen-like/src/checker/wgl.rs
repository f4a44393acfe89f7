//! The linearizability search for one key: Wing & Gong's algorithm with Lowe's just-in-time
//! linearization and memoization, as in porcupine's `checkSingle`. Knows the register model
//! only through [`step`]; knows nothing of keys, JSON or the history format.
//!
//! The history is a list of call and return entries sorted by time. Scanning from the head,
//! each call whose op can be applied to the current state is *lifted* (the op is linearized
//! now: its call and return are unlinked, the state advances) and the scan restarts. Reaching a
//! return means that op's deadline passed without it being linearized: pop the last lifted op,
//! *unlift* it (relink both entries in place — dancing links) and try the entry after it. A
//! (linearized-set, state) pair already in the cache has been explored and is skipped. Empty
//! stack at a return: not linearizable.
//!
//! Info ops (outcome unknown) have no return entry: nothing forces them to be linearized, so
//! their interval is [invoke, +∞). Every info op is legal in every state (see [`step`]), so an
//! info op can always be placed after everything else, where nothing observes it ("never took
//! effect"). That gives the search freedom it does not need, and on histories with many
//! timeouts that freedom is exponential. The rules below each keep at least one linearization
//! of every linearizable history (a *canonical* one), so they are sound and complete; the
//! brute-force oracle and todc-utils tests check them:
//! 1. **Success once every `ok` op is linearized**: the rest are info ops, placed at the end.
//! 2. **No no-op info ops**: an info op is linearized only where it changes the state. Deleting
//!    a no-op from a linearization changes no state.
//! 3. **No unobserved info values**: right after an info op set the value, a blind write or
//!    delete may not be linearized. In a linearization where it is, nothing observed the info
//!    op's value (under rule 2 nothing lies between them), so deleting the info op changes no
//!    other op's state. The search state therefore carries a `fresh` flag ("set by an info op,
//!    not yet observed") which is part of the memo key.
//! 4. **Identical info ops in invoke order**: info ops with the same command are
//!    interchangeable except for invoke times, and an earlier invoke admits every position a
//!    later one does; so one may be linearized only after its earlier twin is.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use super::register::{step, Illegal, ModelOp, State, ABSENT};
use super::Budget;

/// One op of one key, with its real-time interval. `complete: None` = info; only info ops may
/// have `model.definite == false`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimedOp {
    pub(crate) model: ModelOp,
    pub(crate) invoke: u64,
    pub(crate) complete: Option<u64>,
}

/// Why an op could not be linearized next (at the point of the longest prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    Illegal(Illegal),
    /// An info op that would not change the state here (rule 2).
    NoEffect,
    /// A blind write or delete right after an info op's unobserved value (rule 3).
    OverwritesUnobservedInfo,
    /// An identical info op invoked earlier is not linearized yet (rule 4).
    EarlierTwinPending,
    /// Legal, but applying it reaches a (linearized set, state) already explored: a dead end.
    Explored,
}

/// The deepest point the search reached before it had to give up on a non-linearizable key.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// Linearized ops (indices into the search's input) in order, with the state after each.
    pub(crate) prefix: Vec<(usize, State)>,
    pub(crate) state: State,
    /// The op whose return was reached without it being linearized.
    pub(crate) blocked: usize,
    /// Every op whose call preceded that return and was not linearized, in time order.
    pub(crate) candidates: Vec<(usize, Rejection)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exhausted {
    Steps,
    Deadline,
    Memory,
}

#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// A witness: ops in linearization order. Info ops absent from it never took effect.
    Linearizable {
        order: Vec<usize>,
    },
    NotLinearizable(Box<Failure>),
    OutOfBudget(Exhausted),
}

#[derive(Debug, Clone)]
pub(crate) struct Search {
    pub(crate) outcome: Outcome,
    pub(crate) steps: u64,
    pub(crate) cache_entries: usize,
}

const NIL: usize = usize::MAX;
const HEAD: usize = 0;
/// How often (in steps) the clock is read.
const DEADLINE_EVERY: u64 = 1024;

/// SplitMix64's finalizer: a fixed, well-mixed 64-bit hash (deterministic across runs).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The cache's keys are already hashes; hashing them again is wasted work.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// The set of explored (linearized set, state) pairs. Bitsets live in one flat arena; entries
/// with the same hash are chained through `chain`.
struct Cache {
    words: usize,
    heads: HashMap<u64, u32, BuildHasherDefault<PassThrough>>,
    chain: Vec<u32>,
    bits: Vec<u64>,
    states: Vec<u32>,
}

impl Cache {
    fn new(words: usize) -> Self {
        Cache {
            words,
            heads: HashMap::default(),
            chain: Vec::new(),
            bits: Vec::new(),
            states: Vec::new(),
        }
    }

    /// Inserts the pair unless present; returns whether it was new.
    fn insert(&mut self, hash: u64, bits: &[u64], state: u32) -> bool {
        let w = self.words;
        let head = self.heads.get(&hash).copied().unwrap_or(u32::MAX);
        let mut i = head;
        while i != u32::MAX {
            let at = i as usize;
            if self.states[at] == state && self.bits[at * w..(at + 1) * w] == *bits {
                return false;
            }
            i = self.chain[at];
        }
        let id = u32::try_from(self.states.len()).expect("memory budget caps entries below 2^32");
        self.chain.push(head);
        self.bits.extend_from_slice(bits);
        self.states.push(state);
        self.heads.insert(hash, id);
        true
    }

    fn len(&self) -> usize {
        self.states.len()
    }

    /// Approximate heap use: arena + state + chain + a hash-map slot per entry.
    fn bytes(&self) -> usize {
        self.len() * (self.words * 8 + 4 + 4 + 24)
    }
}

struct Frame {
    node: usize,
    op: usize,
    prev_state: State,
    prev_fresh: bool,
}

/// What the search knows about each op beyond the model, plus the rules that decide whether
/// an op may be linearized next.
struct Rules<'a> {
    ops: &'a [TimedOp],
    /// For an info op, the identical info op invoked just before it (rule 4).
    twin_before: Vec<usize>,
}

impl<'a> Rules<'a> {
    fn new(ops: &'a [TimedOp]) -> Self {
        let mut info: Vec<usize> = (0..ops.len()).filter(|&i| !ops[i].model.definite).collect();
        info.sort_by_key(|&i| (ops[i].invoke, i));
        let mut last: HashMap<ModelOp, usize> = HashMap::new();
        let mut twin_before = vec![NIL; ops.len()];
        for i in info {
            if let Some(prev) = last.insert(ops[i].model, i) {
                twin_before[i] = prev;
            }
        }
        Rules { ops, twin_before }
    }

    /// The (state, fresh) after linearizing `op` now, or why it may not go now.
    fn admit(
        &self,
        op: usize,
        state: State,
        fresh: bool,
        linearized: &[u64],
    ) -> Result<(State, bool), Rejection> {
        let model = &self.ops[op].model;
        let next = step(state, model).map_err(Rejection::Illegal)?;
        if !model.definite && next == state {
            return Err(Rejection::NoEffect);
        }
        if fresh && model.is_blind() {
            return Err(Rejection::OverwritesUnobservedInfo);
        }
        let twin = self.twin_before[op];
        if twin != NIL && !is_set(linearized, twin) {
            return Err(Rejection::EarlierTwinPending);
        }
        // An ok op observed (read, cas) or definitely set the value; an info op set it unseen.
        Ok((next, !model.definite))
    }
}

fn is_set(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

/// The memo key's state: the value and the `fresh` flag in one word.
fn pack(state: State, fresh: bool) -> u32 {
    (state << 1) | u32::from(fresh)
}

/// The entry list: node 0 is the head sentinel; each op has a call node and, unless it is an
/// info op, a return node.
struct Entries {
    next: Vec<usize>,
    prev: Vec<usize>,
    op: Vec<usize>,
    is_call: Vec<bool>,
    ret_of: Vec<usize>,
}

impl Entries {
    /// Sorted by time; at equal times calls come first (intervals are closed, so an op that
    /// returns at t overlaps one invoked at t), then by op index for determinism.
    fn new(ops: &[TimedOp]) -> Self {
        let mut sorted: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            sorted.push((op.invoke, false, i));
            if let Some(t) = op.complete {
                sorted.push((t, true, i));
            }
        }
        sorted.sort_unstable();
        let len = sorted.len() + 1;
        let mut e = Entries {
            next: vec![NIL; len],
            prev: vec![NIL; len],
            op: vec![NIL; len],
            is_call: vec![false; len],
            ret_of: vec![NIL; ops.len()],
        };
        for (k, &(_, is_return, op)) in sorted.iter().enumerate() {
            let node = k + 1;
            e.op[node] = op;
            e.is_call[node] = !is_return;
            if is_return {
                e.ret_of[op] = node;
            }
            e.prev[node] = k;
            e.next[k] = node;
        }
        e
    }

    fn unlink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    /// Exact inverse of `unlink` when undone in reverse order (x keeps its own links).
    fn relink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = x;
        if n != NIL {
            self.prev[n] = x;
        }
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        let ret = self.ret_of[self.op[call]];
        if ret != NIL {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, call: usize) {
        let ret = self.ret_of[self.op[call]];
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// Decides whether `ops` (one key, any order) is linearizable from the absent state.
pub(crate) fn search(ops: &[TimedOp], budget: &Budget) -> Search {
    let mut remaining = ops.iter().filter(|o| o.model.definite).count();
    if remaining == 0 {
        return Search {
            outcome: Outcome::Linearizable { order: Vec::new() },
            steps: 0,
            cache_entries: 0,
        };
    }
    let words = ops.len().div_ceil(64);
    let zobrist: Vec<u64> = (0..ops.len() as u64).map(mix).collect();

    let rules = Rules::new(ops);
    let mut list = Entries::new(ops);
    let mut cache = Cache::new(words);
    let mut linearized = vec![0u64; words];
    let mut bits_hash = 0u64;
    let mut state = ABSENT;
    let mut fresh = false;
    let mut stack: Vec<Frame> = Vec::new();
    let mut best: Option<Failure> = None;
    let mut steps = 0u64;
    let mut entry = list.next[HEAD];

    let out_of_budget = |why, steps, cache: &Cache| Search {
        outcome: Outcome::OutOfBudget(why),
        steps,
        cache_entries: cache.len(),
    };

    loop {
        steps += 1;
        if budget.max_steps.is_some_and(|max| steps > max) {
            return out_of_budget(Exhausted::Steps, steps - 1, &cache);
        }
        if steps.is_multiple_of(DEADLINE_EVERY)
            && budget.deadline.is_some_and(|d| Instant::now() >= d)
        {
            return out_of_budget(Exhausted::Deadline, steps, &cache);
        }
        // Every node before `entry` is a call (reaching a return backtracks), and every
        // unlinearized ok op still has its return in the list, so `entry` cannot run off the
        // end while `remaining > 0`.
        debug_assert_ne!(entry, NIL, "scan ran past the last return");

        if list.is_call[entry] {
            let op = list.op[entry];
            let Ok((next_state, next_fresh)) = rules.admit(op, state, fresh, &linearized) else {
                entry = list.next[entry];
                continue;
            };
            linearized[op / 64] |= 1 << (op % 64);
            let packed = pack(next_state, next_fresh);
            let hash = bits_hash ^ zobrist[op] ^ mix(u64::from(packed) ^ 0xC0FF_EE00_0000_0000);
            if !cache.insert(hash, &linearized, packed) {
                linearized[op / 64] &= !(1 << (op % 64));
                entry = list.next[entry];
                continue;
            }
            if budget
                .max_cache_bytes
                .is_some_and(|max| cache.bytes() > max)
            {
                return out_of_budget(Exhausted::Memory, steps, &cache);
            }
            stack.push(Frame {
                node: entry,
                op,
                prev_state: state,
                prev_fresh: fresh,
            });
            state = next_state;
            fresh = next_fresh;
            bits_hash ^= zobrist[op];
            list.lift(entry);
            if ops[op].model.definite {
                remaining -= 1;
                if remaining == 0 {
                    return Search {
                        outcome: Outcome::Linearizable {
                            order: stack.iter().map(|f| f.op).collect(),
                        },
                        steps,
                        cache_entries: cache.len(),
                    };
                }
            }
            entry = list.next[HEAD];
        } else {
            if best.as_ref().is_none_or(|b| stack.len() > b.prefix.len()) {
                best = Some(record(
                    &rules,
                    &list,
                    &stack,
                    (state, fresh),
                    entry,
                    &linearized,
                ));
            }
            let Some(frame) = stack.pop() else {
                let failure = best.expect("a failure is recorded before the stack can be empty");
                return Search {
                    outcome: Outcome::NotLinearizable(Box::new(failure)),
                    steps,
                    cache_entries: cache.len(),
                };
            };
            state = frame.prev_state;
            fresh = frame.prev_fresh;
            linearized[frame.op / 64] &= !(1 << (frame.op % 64));
            bits_hash ^= zobrist[frame.op];
            list.unlift(frame.node);
            if ops[frame.op].model.definite {
                remaining += 1;
            }
            entry = list.next[frame.node];
        }
    }
}

/// Snapshot of a dead end: the prefix on the stack, the return that stopped the scan, and
/// why each pending op before it could not go next.
fn record(
    rules: &Rules,
    list: &Entries,
    stack: &[Frame],
    (state, fresh): (State, bool),
    ret_node: usize,
    linearized: &[u64],
) -> Failure {
    let prefix = stack
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let after = stack.get(i + 1).map_or(state, |next| next.prev_state);
            (f.op, after)
        })
        .collect();
    let mut candidates = Vec::new();
    // Lifted ops are out of the list, so every node before the return is a pending call.
    let mut node = list.next[HEAD];
    while node != ret_node && node != NIL {
        let op = list.op[node];
        if list.is_call[node] {
            let why = match rules.admit(op, state, fresh, linearized) {
                Err(rejection) => rejection,
                Ok(_) => Rejection::Explored,
            };
            candidates.push((op, why));
        }
        node = list.next[node];
    }
    Failure {
        prefix,
        state,
        blocked: list.op[ret_node],
        candidates,
    }
}
