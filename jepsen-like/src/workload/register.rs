//! The register workload: read / write / cas / delete on instances of one service, each
//! instance id a key and `meta.v` its value; written to `history.jsonl` in the format of
//! [`crate::history`] and judged by the linearizability checker, key by key.
//!
//! Mapping onto the API (the op's linearization point is the one request that can change
//! state):
//! * read = linearizable `GET` (404 → `null`); any error → `fail` (a read has no effect);
//! * write = `PUT` with a value never written before; delete = `DELETE` (404 is a successful
//!   delete of an absent key);
//! * cas(expected, new) = linearizable `GET`; a value other than `expected` → `fail`; else a
//!   `PUT` with `If-Match: <modify_index read>` (`If-None-Match: *` when expected is `null`).
//!   A modify index is the log index of the instance's last change, so an unchanged index
//!   means an unchanged value: the PUT succeeds exactly when the key still holds `expected`.
//!   412 → `fail`.
//! * for writes, deletes and the cas's PUT: a 4xx or a connection never made → `fail`; a
//!   503, a timeout or a connection lost after sending → `info`.
//!
//! Keys rotate: a few keys are live at a time, each retires after `ops_per_key` ops, which
//! keeps every key's history small enough for an exhaustive search.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::api::{CallError, InstanceSpec, InstanceView, Precondition};
use crate::checker::{self, Budget, KeyOutcome, Report};
use crate::client::{ClientCtx, Outcome};
use crate::history::{self, Event, EventType, Payload, Value, F};
use crate::recorder::Journal;
use crate::workload::VerdictClass;

/// The service whose instances are the registers.
pub const SERVICE: &str = "jepsen";

/// One line of `history.jsonl`: a [`history::Event`] plus annotations the checker ignores
/// (which node served it, and the error behind a `fail` or `info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryLine {
    #[serde(flatten)]
    pub event: Event,
    pub node: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

struct LiveKey {
    name: String,
    remaining: u32,
}

struct KeysInner {
    live: Vec<LiveKey>,
    next: u64,
    ops_per_key: u32,
    /// The last value some client saw on each key: a likely `expected` for a cas.
    last_seen: HashMap<String, Value>,
}

/// The rotating key space, shared by the register clients.
pub struct Keys {
    inner: Mutex<KeysInner>,
}

impl Keys {
    pub fn new(live: usize, ops_per_key: u32) -> Arc<Keys> {
        let mut inner = KeysInner {
            live: Vec::new(),
            next: 0,
            ops_per_key: ops_per_key.max(1),
            last_seen: HashMap::new(),
        };
        for _ in 0..live.max(1) {
            inner.add_key();
        }
        Arc::new(Keys {
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeysInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Picks a live key for the next op and charges it one op; a key whose budget is spent
    /// is replaced by a fresh one. Returns the key and its last seen value.
    pub fn pick(&self, rng: &mut StdRng) -> (String, Value) {
        let mut k = self.lock();
        let i = rng.random_range(0..k.live.len());
        let name = k.live[i].name.clone();
        k.live[i].remaining -= 1;
        if k.live[i].remaining == 0 {
            k.live.swap_remove(i);
            k.add_key();
        }
        let last = k.last_seen.get(&name).cloned().unwrap_or_default();
        (name, last)
    }

    pub fn saw(&self, key: &str, value: Value) {
        self.lock().last_seen.insert(key.to_owned(), value);
    }

    /// Keys handed out so far.
    pub fn created(&self) -> u64 {
        self.lock().next
    }
}

impl KeysInner {
    fn add_key(&mut self) {
        self.next += 1;
        let name = format!("r{}", self.next);
        self.live.push(LiveKey {
            name,
            remaining: self.ops_per_key,
        });
    }
}

/// What one op will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegOp {
    Read,
    Write(String),
    Cas(Value, String),
    Delete,
}

impl RegOp {
    pub fn f(&self) -> F {
        match self {
            RegOp::Read => F::Read,
            RegOp::Write(_) => F::Write,
            RegOp::Cas(..) => F::Cas,
            RegOp::Delete => F::Delete,
        }
    }

    /// The invoke event's value.
    pub fn payload(&self) -> Payload {
        match self {
            RegOp::Read | RegOp::Delete => Payload::Scalar(Value::Null),
            RegOp::Write(v) => Payload::Scalar(Value::Str(v.clone())),
            RegOp::Cas(e, n) => Payload::Pair(e.clone(), Value::Str(n.clone())),
        }
    }
}

/// Op mix, in percent: reads, writes, cas (the rest is deletes).
const READ_PCT: u32 = 45;
const WRITE_PCT: u32 = 30;
const CAS_PCT: u32 = 20;

/// Draws an op. `fresh` makes the unique value a write or cas would store.
pub fn draw(rng: &mut StdRng, last_seen: Value, fresh: impl FnOnce() -> String) -> RegOp {
    let r = rng.random_range(0..100);
    if r < READ_PCT {
        RegOp::Read
    } else if r < READ_PCT + WRITE_PCT {
        RegOp::Write(fresh())
    } else if r < READ_PCT + WRITE_PCT + CAS_PCT {
        RegOp::Cas(last_seen, fresh())
    } else {
        RegOp::Delete
    }
}

/// The register value an instance holds. An instance without `meta.v` (never written by the
/// harness) reads as a value no write stored, which the checker then flags.
fn value_of(inst: &InstanceView) -> Value {
    match inst.value() {
        Some(v) => Value::Str(v.to_owned()),
        None => Value::Str(format!(
            "<instance without meta.v at index {}>",
            inst.modify_index
        )),
    }
}

/// How an op ended: outcome, the value for the completion event, and the error if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub outcome: Outcome,
    pub value: Payload,
    pub error: Option<String>,
}

impl Completion {
    fn ok(value: Payload) -> Self {
        Completion {
            outcome: Outcome::Ok,
            value,
            error: None,
        }
    }
    fn fail(error: String) -> Self {
        Completion {
            outcome: Outcome::Fail,
            value: Payload::Scalar(Value::Null),
            error: Some(error),
        }
    }
    /// A state-changing call that did not succeed: `fail` if it certainly had no effect.
    fn unsuccessful_write(e: &CallError) -> Self {
        Completion {
            outcome: if e.definitely_not_applied() {
                Outcome::Fail
            } else {
                Outcome::Info
            },
            value: Payload::Scalar(Value::Null),
            error: Some(e.to_string()),
        }
    }
}

/// Maps the answer of a read.
pub fn read_completion(res: Result<Option<InstanceView>, CallError>) -> Completion {
    match res {
        Ok(Some(inst)) => Completion::ok(Payload::Scalar(value_of(&inst))),
        Ok(None) => Completion::ok(Payload::Scalar(Value::Null)),
        Err(e) => Completion::fail(e.to_string()),
    }
}

/// Maps the answer of a write or the PUT of a cas (the completion repeats the invoke value).
pub fn write_completion(res: Result<Option<u64>, CallError>, invoked: &Payload) -> Completion {
    match res {
        Ok(_) => Completion::ok(invoked.clone()),
        Err(e) => Completion::unsuccessful_write(&e),
    }
}

/// Maps the answer of a delete (absent counts as deleted).
pub fn delete_completion(res: Result<bool, CallError>) -> Completion {
    match res {
        Ok(_) => Completion::ok(Payload::Scalar(Value::Null)),
        Err(e) => Completion::unsuccessful_write(&e),
    }
}

/// The first half of a cas: from the linearizable read, either the PUT's precondition or the
/// reason the cas fails without writing.
pub fn cas_precondition(
    read: Result<Option<InstanceView>, CallError>,
    expected: &Value,
) -> Result<Precondition, Completion> {
    let current = read.map_err(|e| Completion::fail(format!("cas read: {e}")))?;
    let held = current.as_ref().map_or(Value::Null, value_of);
    if &held != expected {
        return Err(Completion::fail(format!("cas: the key holds {held}")));
    }
    Ok(match current {
        Some(inst) => Precondition::IfMatch(inst.modify_index),
        None => Precondition::IfAbsent,
    })
}

/// A register client: draws ops on the rotating keys and records them.
pub struct RegisterClient {
    keys: Arc<Keys>,
    rng: StdRng,
    seq: u64,
    history: Journal<HistoryLine>,
    /// Read with `?consistency=stale` (a self-test: not linearizable, must be caught).
    stale_reads: bool,
}

impl RegisterClient {
    pub fn new(
        keys: Arc<Keys>,
        rng: StdRng,
        history: Journal<HistoryLine>,
        stale_reads: bool,
    ) -> Self {
        RegisterClient {
            keys,
            rng,
            seq: 0,
            history,
            stale_reads,
        }
    }

    pub async fn step(&mut self, ctx: &ClientCtx) -> Outcome {
        let (key, last) = self.keys.pick(&mut self.rng);
        self.seq += 1;
        let (process, seq) = (ctx.process, self.seq);
        let op = draw(&mut self.rng, last, || format!("p{process}-{seq}"));
        let invoked = op.payload();
        let f = op.f();
        let node = ctx.node.id;
        let invoke = self.history.record(|time| HistoryLine {
            event: Event::new(
                process,
                EventType::Invoke,
                f,
                key.clone(),
                invoked.clone(),
                time,
            ),
            node,
            error: None,
        });
        let done = self.execute(ctx, &key, &op, &invoked).await;
        if done.outcome == Outcome::Ok {
            match (&op, &done.value) {
                (RegOp::Read, Payload::Scalar(v)) => self.keys.saw(&key, v.clone()),
                (RegOp::Write(v) | RegOp::Cas(_, v), _) => {
                    self.keys.saw(&key, Value::Str(v.clone()))
                }
                (RegOp::Delete, _) => self.keys.saw(&key, Value::Null),
                _ => {}
            }
        }
        let kind = match done.outcome {
            Outcome::Ok => EventType::Ok,
            Outcome::Fail => EventType::Fail,
            Outcome::Info => EventType::Info,
        };
        let complete = self.history.record(|time| HistoryLine {
            event: Event::new(process, kind, f, key.clone(), done.value.clone(), time),
            node,
            error: done.error.clone(),
        });
        ctx.done(
            "register",
            &f.to_string(),
            invoke,
            complete,
            done.outcome,
            done.error,
        );
        done.outcome
    }

    async fn execute(
        &self,
        ctx: &ClientCtx,
        key: &str,
        op: &RegOp,
        invoked: &Payload,
    ) -> Completion {
        let api = &ctx.api;
        match op {
            RegOp::Read => read_completion(api.get_instance(SERVICE, key, self.stale_reads).await),
            RegOp::Write(v) => {
                let spec = InstanceSpec::with_value(v, None);
                write_completion(
                    api.put_instance(SERVICE, key, &spec, Precondition::None)
                        .await,
                    invoked,
                )
            }
            RegOp::Cas(expected, new) => {
                let pre =
                    match cas_precondition(api.get_instance(SERVICE, key, false).await, expected) {
                        Ok(p) => p,
                        Err(done) => return done,
                    };
                let spec = InstanceSpec::with_value(new, None);
                write_completion(api.put_instance(SERVICE, key, &spec, pre).await, invoked)
            }
            RegOp::Delete => delete_completion(api.delete_instance(SERVICE, key).await),
        }
    }
}

/// The register verdict and the checker's per-key report.
#[derive(Debug, Clone, Serialize)]
pub struct RegisterResult {
    pub report: Option<Report>,
    /// Set when the history itself is malformed (a harness bug): never valid.
    pub malformed: Option<String>,
    pub keys: usize,
    pub ops: usize,
}

impl RegisterResult {
    pub fn verdict_line(&self) -> (VerdictClass, String) {
        if let Some(e) = &self.malformed {
            return (
                VerdictClass::Unknown,
                format!("unknown: malformed history: {e}"),
            );
        }
        match self.report.as_ref().map(|r| &r.verdict) {
            Some(checker::Verdict::Valid) => (
                VerdictClass::Valid,
                format!("valid ({} keys, {} ops linearizable)", self.keys, self.ops),
            ),
            Some(checker::Verdict::Invalid { key, .. }) => (
                VerdictClass::Invalid,
                format!("invalid: key {key:?} is not linearizable"),
            ),
            Some(checker::Verdict::Unknown { reason }) => {
                (VerdictClass::Unknown, format!("unknown: {reason}"))
            }
            None => (VerdictClass::Unknown, "unknown: not checked".into()),
        }
    }
}

/// Checks the register history.
pub fn check(lines: &[HistoryLine], budget: &Budget) -> RegisterResult {
    let events: Vec<Event> = lines.iter().map(|l| l.event.clone()).collect();
    match history::pair(&events) {
        Ok(ops) => {
            let report = checker::check_report(&ops, budget);
            RegisterResult {
                keys: report.keys.len(),
                ops: ops.len(),
                report: Some(report),
                malformed: None,
            }
        }
        Err(e) => RegisterResult {
            report: None,
            malformed: Some(e.to_string()),
            keys: 0,
            ops: 0,
        },
    }
}

/// Per-key outcomes that are not valid, for the summary.
pub fn bad_keys(result: &RegisterResult) -> Vec<(String, &KeyOutcome)> {
    result
        .report
        .iter()
        .flat_map(|r| r.keys.iter())
        .filter(|k| !matches!(k.outcome, KeyOutcome::Valid))
        .map(|k| (k.key.clone(), &k.outcome))
        .collect()
}

/// How many linearized ops before the blocked one an anomaly shows (the whole prefix is in
/// `register-check.json`).
const PREFIX_SHOWN: usize = 10;

/// The summary's account of each key that is not valid: the checker's explanation as text,
/// the op that could not be linearized and the candidates, each annotated with the node that
/// served it, and the tail of the longest linearizable prefix.
pub fn anomalies(result: &RegisterResult, lines: &[HistoryLine]) -> Vec<serde_json::Value> {
    // An op is named by its process and invoke time; that finds its node.
    let node_of: HashMap<(u64, u64), u64> = lines
        .iter()
        .filter(|l| l.event.kind == EventType::Invoke)
        .map(|l| ((l.event.process, l.event.time), l.node))
        .collect();
    let annotate = |op: &history::Op| {
        let mut v = serde_json::to_value(op).unwrap_or_default();
        v["node"] = serde_json::json!(node_of.get(&(op.process, op.invoke_time)));
        v
    };
    bad_keys(result)
        .into_iter()
        .map(|(key, outcome)| match outcome {
            KeyOutcome::Invalid { explanation } => {
                let skip = explanation.longest_prefix.len().saturating_sub(PREFIX_SHOWN);
                let b = &explanation.blocked;
                serde_json::json!({
                    "workload": "register",
                    "kind": "not-linearizable",
                    "key": key,
                    "text": explanation.to_string(),
                    "at": [b.invoke_time, b.complete_time],
                    "blocked": annotate(&explanation.blocked),
                    "candidates": explanation.candidates.iter().map(|c| serde_json::json!({
                        "op": annotate(&c.op),
                        "rejection": c.rejection,
                    })).collect::<Vec<_>>(),
                    "prefix_length": explanation.longest_prefix.len(),
                    "prefix_tail": explanation.longest_prefix[skip..].iter().map(|l| serde_json::json!({
                        "op": annotate(&l.op),
                        "value_after": l.value_after,
                    })).collect::<Vec<_>>(),
                    "value": explanation.value,
                })
            }
            KeyOutcome::Unknown { reason } => serde_json::json!({
                "workload": "register", "kind": "undecided", "key": key, "text": reason,
            }),
            KeyOutcome::Valid => serde_json::Value::Null,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn inst(v: &str, index: u64) -> InstanceView {
        serde_json::from_value(serde_json::json!({
            "id": "r1", "meta": {"v": v}, "modify_index": index, "health": "passing"
        }))
        .expect("instance")
    }
    fn unavailable() -> CallError {
        CallError::Unavailable {
            status: 503,
            kind: "no-quorum".into(),
            detail: String::new(),
        }
    }
    fn rejected(status: u16) -> CallError {
        CallError::Rejected {
            status,
            kind: "precondition-failed".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn reads_map_404_to_null_and_errors_to_fail() {
        assert_eq!(
            read_completion(Ok(Some(inst("p1-1", 5)))).value,
            Payload::Scalar(Value::from("p1-1"))
        );
        let absent = read_completion(Ok(None));
        assert_eq!(
            (absent.outcome, absent.value),
            (Outcome::Ok, Payload::Scalar(Value::Null))
        );
        assert_eq!(read_completion(Err(unavailable())).outcome, Outcome::Fail);
        assert_eq!(
            read_completion(Err(CallError::Lost("timed out".into()))).outcome,
            Outcome::Fail
        );
    }

    #[test]
    fn writes_are_info_unless_certainly_not_applied() {
        let invoked = Payload::Scalar(Value::from("p1-2"));
        assert_eq!(write_completion(Ok(Some(7)), &invoked).value, invoked);
        assert_eq!(
            write_completion(Err(unavailable()), &invoked).outcome,
            Outcome::Info
        );
        assert_eq!(
            write_completion(Err(CallError::Lost("reset".into())), &invoked).outcome,
            Outcome::Info
        );
        assert_eq!(
            write_completion(Err(CallError::NotSent("refused".into())), &invoked).outcome,
            Outcome::Fail
        );
        assert_eq!(
            write_completion(Err(rejected(412)), &invoked).outcome,
            Outcome::Fail
        );
        assert_eq!(
            delete_completion(Ok(false)).outcome,
            Outcome::Ok,
            "absent is deleted"
        );
        assert_eq!(delete_completion(Err(unavailable())).outcome, Outcome::Info);
    }

    #[test]
    fn cas_writes_only_on_the_index_it_read_the_expected_value_at() {
        let e = Value::from("p1-1");
        assert_eq!(
            cas_precondition(Ok(Some(inst("p1-1", 9))), &e),
            Ok(Precondition::IfMatch(9))
        );
        assert_eq!(
            cas_precondition(Ok(None), &Value::Null),
            Ok(Precondition::IfAbsent)
        );
        let other = cas_precondition(Ok(Some(inst("p2-1", 9))), &e).expect_err("mismatch");
        assert_eq!(other.outcome, Outcome::Fail);
        assert_eq!(
            cas_precondition(Ok(None), &e).expect_err("absent").outcome,
            Outcome::Fail
        );
        assert_eq!(
            cas_precondition(Err(unavailable()), &e)
                .expect_err("read")
                .outcome,
            Outcome::Fail
        );
    }

    #[test]
    fn keys_rotate_after_their_budget() {
        let keys = Keys::new(2, 3);
        let mut rng = StdRng::seed_from_u64(1);
        let mut used = std::collections::BTreeMap::new();
        for _ in 0..30 {
            *used.entry(keys.pick(&mut rng).0).or_insert(0) += 1;
        }
        assert!(used.values().all(|&n| n <= 3), "{used:?}");
        assert!(keys.created() >= 10);
    }

    #[test]
    fn history_lines_are_history_events_with_annotations() {
        let line = HistoryLine {
            event: Event::new(
                3,
                EventType::Ok,
                F::Cas,
                "r1",
                Payload::Pair(Value::Null, "p3-1".into()),
                42,
            ),
            node: 2,
            error: None,
        };
        let text = serde_json::to_string(&line).expect("json");
        assert_eq!(
            text,
            r#"{"process":3,"type":"ok","f":"cas","key":"r1","value":[null,"p3-1"],"time":42,"node":2}"#
        );
        let back = history::read_jsonl(std::io::Cursor::new(text)).expect("read");
        assert_eq!(back, vec![line.event]);
    }

    #[test]
    fn a_checked_history_is_valid_or_names_the_key() {
        let ev = |p, k, f, v: Payload, t| HistoryLine {
            event: Event::new(p, k, f, "r1", v, t),
            node: 1,
            error: None,
        };
        let w = Payload::Scalar("a".into());
        let good = vec![
            ev(1, EventType::Invoke, F::Write, w.clone(), 1),
            ev(1, EventType::Ok, F::Write, w.clone(), 2),
            ev(
                2,
                EventType::Invoke,
                F::Read,
                Payload::Scalar(Value::Null),
                3,
            ),
            ev(2, EventType::Ok, F::Read, w.clone(), 4),
        ];
        let r = check(&good, &Budget::unlimited());
        assert_eq!(r.verdict_line().0, VerdictClass::Valid);
        let mut stale = good.clone();
        stale[3] = ev(2, EventType::Ok, F::Read, Payload::Scalar(Value::Null), 4);
        let r = check(&stale, &Budget::unlimited());
        assert_eq!(r.verdict_line().0, VerdictClass::Invalid);
        assert_eq!(bad_keys(&r).len(), 1);
        let malformed = vec![ev(1, EventType::Ok, F::Write, w, 2)];
        assert_eq!(
            check(&malformed, &Budget::unlimited()).verdict_line().0,
            VerdictClass::Unknown
        );
    }
}
