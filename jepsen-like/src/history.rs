//! The history format — the contract between the harness's clients, its checkers and any
//! independent checker — and the pairing of its events into operations.
//!
//! `history.jsonl` holds one [`Event`] per line:
//!
//! ```text
//! {"process":3,"type":"invoke","f":"cas","key":"k1","value":[1,2],"time":1200}
//! {"process":3,"type":"ok","f":"cas","key":"k1","value":[1,2],"time":5400}
//! ```
//!
//! * `time` is nanoseconds from one monotonic clock shared by every client.
//! * `value`: write → the written value; read → `null` on invoke, what was read on `ok`
//!   (`null` = key absent); cas → `[expected, new]`; delete → `null`.
//! * Each process is single-threaded: an invoke is followed by exactly one completion of the
//!   same process (`ok` / `fail` / `info`), or by none if the history ends, which counts as
//!   `info`. `fail` means the operation definitely took no effect; `info` means it may have
//!   taken effect at any time after its invoke. A process id is never reused after an `info`.
//!
//! This module knows nothing about models, registers or verdicts: it only parses, writes and
//! validates the shape of histories.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, Write};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

/// An opaque scalar: what a key holds. `Null` means the key is absent.
///
/// Integers and strings are distinct (`1` ≠ `"1"`). Floats, booleans, arrays and objects are
/// not values and are rejected when parsing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Value {
    /// No value: the key is absent.
    #[default]
    Null,
    Int(i64),
    Str(String),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}

/// Renders as JSON: `null`, `42`, `"text"`.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Str(s) => {
                let quoted = serde_json::to_string(s).map_err(|_| fmt::Error)?;
                f.write_str(&quoted)
            }
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Str(v) => s.serialize_str(v),
        }
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null, a 64-bit signed integer or a string")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// The `value` field of an [`Event`]: a scalar, or `[expected, new]` for a cas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Scalar(Value),
    /// `[expected, new]` of a compare-and-set.
    Pair(Value, Value),
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Scalar(Value::Null)
    }
}

impl From<Value> for Payload {
    fn from(v: Value) -> Self {
        Payload::Scalar(v)
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::Scalar(v) => v.serialize(s),
            Payload::Pair(a, b) => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element(a)?;
                t.serialize_element(b)?;
                t.end()
            }
        }
    }
}

struct PayloadVisitor;

impl<'de> Visitor<'de> for PayloadVisitor {
    type Value = Payload;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null, an integer, a string, or [expected, new]")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Payload, E> {
        ValueVisitor.visit_unit().map(Payload::Scalar)
    }
    fn visit_none<E: de::Error>(self) -> Result<Payload, E> {
        ValueVisitor.visit_none().map(Payload::Scalar)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Payload, E> {
        ValueVisitor.visit_i64(v).map(Payload::Scalar)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Payload, E> {
        ValueVisitor.visit_u64(v).map(Payload::Scalar)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Payload, E> {
        ValueVisitor.visit_str(v).map(Payload::Scalar)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Payload, E> {
        ValueVisitor.visit_string(v).map(Payload::Scalar)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Payload, A::Error> {
        let expected: Value = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let new: Value = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(3, &self));
        }
        Ok(Payload::Pair(expected, new))
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PayloadVisitor)
    }
}

/// Whether an event starts an operation or completes it, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Invoke,
    /// Completed and took effect.
    Ok,
    /// Completed and definitely took no effect.
    Fail,
    /// Outcome unknown (timeout, crash, lost connection): it may take effect at any time
    /// after its invoke, or never.
    Info,
}

/// The operation's function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum F {
    Read,
    Write,
    Cas,
    Delete,
}

impl fmt::Display for F {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            F::Read => "read",
            F::Write => "write",
            F::Cas => "cas",
            F::Delete => "delete",
        })
    }
}

/// One line of `history.jsonl`. Unknown fields are ignored when reading, so the harness may add
/// annotations (e.g. the node a client talked to) without breaking checkers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub f: F,
    pub key: String,
    /// A missing `value` reads as `null`.
    #[serde(default)]
    pub value: Payload,
    /// Nanoseconds from the harness's single monotonic clock.
    pub time: u64,
}

impl Event {
    pub fn new(
        process: u64,
        kind: EventType,
        f: F,
        key: impl Into<String>,
        value: impl Into<Payload>,
        time: u64,
    ) -> Self {
        Event {
            process,
            kind,
            f,
            key: key.into(),
            value: value.into(),
            time,
        }
    }
}

/// What the operation asked for (taken from its invoke event).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "f", rename_all = "lowercase")]
pub enum Input {
    Read,
    Write { value: Value },
    Cas { expected: Value, new: Value },
    Delete,
}

impl Input {
    pub fn f(&self) -> F {
        match self {
            Input::Read => F::Read,
            Input::Write { .. } => F::Write,
            Input::Cas { .. } => F::Cas,
            Input::Delete => F::Delete,
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Read => f.write_str("read"),
            Input::Write { value } => write!(f, "write {value}"),
            Input::Cas { expected, new } => write!(f, "cas {expected}→{new}"),
            Input::Delete => f.write_str("delete"),
        }
    }
}

/// How a paired operation ended. Failed operations are not operations: [`pair`] drops them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpStatus {
    /// Completed and took effect, between its invoke and completion.
    Ok,
    /// Unknown: took effect at some time after its invoke, or never.
    Info,
}

/// An invoke paired with its completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    /// Position in [`pair`]'s output (ops are numbered in invoke order).
    pub id: usize,
    pub process: u64,
    pub key: String,
    pub input: Input,
    /// For an `ok` read, what it read (`Null` = absent); `None` otherwise.
    pub output: Option<Value>,
    pub invoke_time: u64,
    /// `None` for `info` and for an invoke the history never completed.
    pub complete_time: Option<u64>,
    pub status: OpStatus,
}

impl Op {
    pub fn f(&self) -> F {
        self.input.f()
    }
}

/// Renders e.g. `#4 p2 read→1 [100, 200]` or `#5 p3 write 2 [150, ∞) info`.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} p{} {}", self.id, self.process, self.input)?;
        if let Some(out) = &self.output {
            write!(f, "→{out}")?;
        }
        match self.complete_time {
            Some(t) => write!(f, " [{}, {}]", self.invoke_time, t)?,
            None => write!(f, " [{}, ∞)", self.invoke_time)?,
        }
        if self.status == OpStatus::Info {
            f.write_str(" info")?;
        }
        Ok(())
    }
}

/// A history that cannot be read or is not well formed. `line` is 1-based; `index` is the
/// 0-based position of the event in the slice given to [`pair`].
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("line {line}: cannot read: {source}")]
    Io { line: usize, source: io::Error },
    #[error("line {line}: not a history event: {source}")]
    Json {
        line: usize,
        source: serde_json::Error,
    },
    #[error("event {index}: process {process} completes an operation it never invoked")]
    CompletionWithoutInvoke { index: usize, process: u64 },
    #[error("event {index}: process {process} invokes while its invoke at event {pending} is still pending")]
    DoubleInvoke {
        index: usize,
        process: u64,
        pending: usize,
    },
    #[error("event {index}: process {process} invokes again after an info at event {info}; a process id must not be reused after an info")]
    ReusedAfterInfo {
        index: usize,
        process: u64,
        info: usize,
    },
    #[error("event {index}: process {process} completes {completed} but invoked {invoked} at event {invoke}")]
    Mismatch {
        index: usize,
        process: u64,
        invoke: usize,
        invoked: String,
        completed: String,
    },
    #[error("event {index}: process {process}: {f} {kind:?} has an invalid value: {reason}")]
    InvalidValue {
        index: usize,
        process: u64,
        f: F,
        kind: EventType,
        reason: String,
    },
    #[error("event {index}: process {process}: time {time} is before its previous event's time {previous}")]
    TimeWentBackwards {
        index: usize,
        process: u64,
        time: u64,
        previous: u64,
    },
}

/// Writes one event as one JSON line. The caller flushes.
pub fn write_event(w: &mut impl Write, event: &Event) -> io::Result<()> {
    serde_json::to_writer(&mut *w, event)?;
    w.write_all(b"\n")
}

/// Writes events as JSON lines, in order, and flushes.
pub fn write_jsonl(w: &mut impl Write, events: &[Event]) -> io::Result<()> {
    for event in events {
        write_event(w, event)?;
    }
    w.flush()
}

/// Reads JSON lines into events, keeping file order. Whitespace-only lines are skipped. A torn
/// last line (the harness died mid-write) is an error naming that line: the caller decides
/// whether to truncate it.
pub fn read_jsonl(r: impl BufRead) -> Result<Vec<Event>, HistoryError> {
    let mut events = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| HistoryError::Io {
            line: line_no,
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str(&line).map_err(|source| HistoryError::Json {
            line: line_no,
            source,
        })?;
        events.push(event);
    }
    Ok(events)
}

/// An operation between its invoke and its completion.
struct Pending {
    invoke_index: usize,
    slot: usize,
}

/// An operation being assembled, in invoke order; `failed` ones are dropped at the end.
struct Draft {
    op: Op,
    failed: bool,
}

/// Pairs each invoke with its process's next completion, in slice order.
///
/// * `ok` and `info` operations are returned, numbered in invoke order; `fail` operations are
///   dropped (they took no effect, and a failed read observed nothing).
/// * An invoke the history never completes is returned as [`OpStatus::Info`].
/// * For write, cas and delete the invoke's value is authoritative; a completion's value must
///   be `null` or equal to it. A read's invoke value must be `null`; an `ok` read's value is
///   what it read.
/// * Errors on a completion without an invoke, a second invoke while one is pending, reuse of
///   a process id after an info, a completion whose `f` or `key` differ from the invoke, a
///   value of the wrong shape, and a process whose times go backwards.
pub fn pair(events: &[Event]) -> Result<Vec<Op>, HistoryError> {
    let mut drafts: Vec<Draft> = Vec::new();
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut retired: BTreeMap<u64, usize> = BTreeMap::new();
    let mut last_time: BTreeMap<u64, u64> = BTreeMap::new();

    for (index, e) in events.iter().enumerate() {
        let process = e.process;
        if let Some(&previous) = last_time.get(&process) {
            if e.time < previous {
                return Err(HistoryError::TimeWentBackwards {
                    index,
                    process,
                    time: e.time,
                    previous,
                });
            }
        }
        last_time.insert(process, e.time);
        let invalid = |reason: &str| HistoryError::InvalidValue {
            index,
            process,
            f: e.f,
            kind: e.kind,
            reason: reason.to_owned(),
        };

        if e.kind == EventType::Invoke {
            if let Some(&info) = retired.get(&process) {
                return Err(HistoryError::ReusedAfterInfo {
                    index,
                    process,
                    info,
                });
            }
            if let Some(p) = pending.get(&process) {
                return Err(HistoryError::DoubleInvoke {
                    index,
                    process,
                    pending: p.invoke_index,
                });
            }
            let input = match (e.f, &e.value) {
                (F::Read, Payload::Scalar(Value::Null)) => Input::Read,
                (F::Read, _) => return Err(invalid("a read's invoke value must be null")),
                (F::Write, Payload::Scalar(Value::Null)) => {
                    return Err(invalid("a write needs a non-null value (use delete)"))
                }
                (F::Write, Payload::Scalar(v)) => Input::Write { value: v.clone() },
                (F::Cas, Payload::Pair(expected, new)) => Input::Cas {
                    expected: expected.clone(),
                    new: new.clone(),
                },
                (F::Cas, _) => return Err(invalid("a cas value must be [expected, new]")),
                (F::Delete, Payload::Scalar(Value::Null)) => Input::Delete,
                (_, _) => return Err(invalid("expected null or a scalar")),
            };
            pending.insert(
                process,
                Pending {
                    invoke_index: index,
                    slot: drafts.len(),
                },
            );
            drafts.push(Draft {
                op: Op {
                    id: 0,
                    process,
                    key: e.key.clone(),
                    input,
                    output: None,
                    invoke_time: e.time,
                    complete_time: None,
                    status: OpStatus::Info,
                },
                failed: false,
            });
            continue;
        }

        let Some(p) = pending.remove(&process) else {
            return Err(HistoryError::CompletionWithoutInvoke { index, process });
        };
        let draft = &mut drafts[p.slot];
        if draft.op.f() != e.f || draft.op.key != e.key {
            return Err(HistoryError::Mismatch {
                index,
                process,
                invoke: p.invoke_index,
                invoked: format!("{} {:?}", draft.op.f(), draft.op.key),
                completed: format!("{} {:?}", e.f, e.key),
            });
        }
        match (&draft.op.input, &e.value) {
            (Input::Read, Payload::Scalar(v)) => {
                if e.kind == EventType::Ok {
                    draft.op.output = Some(v.clone());
                }
            }
            (Input::Read, Payload::Pair(..)) => {
                return Err(invalid("a read's value must be a scalar"))
            }
            (_, Payload::Scalar(Value::Null)) => {}
            (Input::Write { value }, Payload::Scalar(v)) if v == value => {}
            (Input::Cas { expected, new }, Payload::Pair(a, b)) if a == expected && b == new => {}
            (_, _) => {
                return Err(invalid(
                    "a completion's value must be null or equal to its invoke's",
                ))
            }
        }
        match e.kind {
            EventType::Invoke => unreachable!("handled above"),
            EventType::Ok => {
                draft.op.status = OpStatus::Ok;
                draft.op.complete_time = Some(e.time);
            }
            EventType::Fail => draft.failed = true,
            EventType::Info => {
                retired.insert(process, index);
            }
        }
    }

    let mut ops = Vec::with_capacity(drafts.len());
    for draft in drafts {
        if draft.failed {
            continue;
        }
        let mut op = draft.op;
        op.id = ops.len();
        ops.push(op);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(process: u64, kind: EventType, f: F, value: Payload, time: u64) -> Event {
        Event::new(process, kind, f, "k", value, time)
    }
    fn null() -> Payload {
        Payload::Scalar(Value::Null)
    }
    fn int(i: i64) -> Payload {
        Payload::Scalar(Value::Int(i))
    }

    #[test]
    fn jsonl_round_trips_every_shape() {
        let events = vec![
            ev(1, EventType::Invoke, F::Write, int(1), 10),
            ev(1, EventType::Ok, F::Write, int(1), 20),
            ev(2, EventType::Invoke, F::Read, null(), 30),
            ev(
                2,
                EventType::Ok,
                F::Read,
                Payload::Scalar("x\"y".into()),
                40,
            ),
            ev(
                3,
                EventType::Invoke,
                F::Cas,
                Payload::Pair(Value::Null, 7.into()),
                50,
            ),
            ev(
                3,
                EventType::Fail,
                F::Cas,
                Payload::Pair(Value::Null, 7.into()),
                60,
            ),
            ev(4, EventType::Invoke, F::Delete, null(), 70),
            ev(4, EventType::Info, F::Delete, null(), 80),
        ];
        let mut buf = Vec::new();
        write_jsonl(&mut buf, &events).expect("write to vec");
        let text = String::from_utf8(buf.clone()).expect("utf8");
        assert_eq!(
            text.lines().next(),
            Some(r#"{"process":1,"type":"invoke","f":"write","key":"k","value":1,"time":10}"#)
        );
        assert!(text.contains(r#""value":[null,7]"#));
        let back = read_jsonl(&buf[..]).expect("read back");
        assert_eq!(back, events);
    }

    #[test]
    fn read_reports_the_line_number_of_a_bad_line() {
        let text = "\
{\"process\":1,\"type\":\"invoke\",\"f\":\"read\",\"key\":\"k\",\"value\":null,\"time\":1}

{\"process\":1,\"type\":\"ok\",\"f\":\"read\",\"key\":\"k\",\"value\":1.5,\"time\":2}
";
        match read_jsonl(text.as_bytes()) {
            Err(HistoryError::Json { line, .. }) => assert_eq!(line, 3),
            other => panic!("expected a JSON error on line 3, got {other:?}"),
        }
        let torn = "{\"process\":1,\"type\":\"invoke\",\"f\":\"read\",\"key\":\"k\",\"value\":null,\"time\":1}\n{\"process\":1,\"ty";
        assert!(matches!(
            read_jsonl(torn.as_bytes()),
            Err(HistoryError::Json { line: 2, .. })
        ));
    }

    #[test]
    fn values_reject_non_scalars_and_accept_missing_value() {
        for bad in [
            "true",
            "1.5",
            "{}",
            "[1]",
            "[1,2,3]",
            "18446744073709551615",
        ] {
            let line = format!(
                r#"{{"process":1,"type":"invoke","f":"write","key":"k","value":{bad},"time":1}}"#
            );
            assert!(
                read_jsonl(line.as_bytes()).is_err(),
                "{bad} must be rejected"
            );
        }
        let line = r#"{"process":1,"type":"invoke","f":"read","key":"k","time":1,"node":"n1"}"#;
        let events = read_jsonl(line.as_bytes()).expect("missing value and extra field are fine");
        assert_eq!(events[0].value, null());
        assert_ne!(Value::Int(1), Value::Str("1".into()));
    }

    #[test]
    fn pair_builds_ops_drops_fails_and_completes_missing_as_info() {
        let events = vec![
            ev(1, EventType::Invoke, F::Write, int(1), 10),
            ev(2, EventType::Invoke, F::Write, int(2), 11),
            ev(3, EventType::Invoke, F::Read, null(), 12),
            ev(1, EventType::Ok, F::Write, int(1), 20),
            ev(2, EventType::Fail, F::Write, null(), 21),
            ev(3, EventType::Info, F::Read, null(), 22),
            ev(1, EventType::Invoke, F::Read, null(), 30),
            ev(1, EventType::Ok, F::Read, int(1), 40),
            ev(
                4,
                EventType::Invoke,
                F::Cas,
                Payload::Pair(1.into(), 5.into()),
                50,
            ),
        ];
        let ops = pair(&events).expect("well formed");
        assert_eq!(ops.len(), 4);
        assert_eq!(ops.iter().map(|o| o.id).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(ops[0].input, Input::Write { value: 1.into() });
        assert_eq!(
            (ops[0].status, ops[0].complete_time),
            (OpStatus::Ok, Some(20))
        );
        assert_eq!(
            (ops[1].process, ops[1].status, ops[1].output.clone()),
            (3, OpStatus::Info, None)
        );
        assert_eq!(ops[2].output, Some(Value::Int(1)));
        assert_eq!(ops[3].status, OpStatus::Info);
        assert_eq!(ops[3].complete_time, None);
        assert_eq!(
            ops[3].input,
            Input::Cas {
                expected: 1.into(),
                new: 5.into()
            }
        );
    }

    #[test]
    fn pair_rejects_malformed_histories() {
        use EventType::*;
        type Case = (&'static str, Vec<Event>, fn(&HistoryError) -> bool);
        let cases: Vec<Case> = vec![
            (
                "completion without invoke",
                vec![ev(1, Ok, F::Read, null(), 1)],
                |e| {
                    matches!(
                        e,
                        HistoryError::CompletionWithoutInvoke {
                            index: 0,
                            process: 1
                        }
                    )
                },
            ),
            (
                "double invoke",
                vec![
                    ev(1, Invoke, F::Read, null(), 1),
                    ev(1, Invoke, F::Read, null(), 2),
                ],
                |e| {
                    matches!(
                        e,
                        HistoryError::DoubleInvoke {
                            index: 1,
                            pending: 0,
                            ..
                        }
                    )
                },
            ),
            (
                "mismatched f",
                vec![
                    ev(1, Invoke, F::Read, null(), 1),
                    ev(1, Ok, F::Delete, null(), 2),
                ],
                |e| {
                    matches!(
                        e,
                        HistoryError::Mismatch {
                            index: 1,
                            invoke: 0,
                            ..
                        }
                    )
                },
            ),
            (
                "mismatched key",
                vec![
                    ev(1, Invoke, F::Read, null(), 1),
                    Event::new(1, Ok, F::Read, "other", null(), 2),
                ],
                |e| matches!(e, HistoryError::Mismatch { .. }),
            ),
            (
                "reuse after info",
                vec![
                    ev(1, Invoke, F::Write, int(1), 1),
                    ev(1, Info, F::Write, int(1), 2),
                    ev(1, Invoke, F::Read, null(), 3),
                ],
                |e| {
                    matches!(
                        e,
                        HistoryError::ReusedAfterInfo {
                            index: 2,
                            info: 1,
                            ..
                        }
                    )
                },
            ),
            (
                "write of null",
                vec![ev(1, Invoke, F::Write, null(), 1)],
                |e| matches!(e, HistoryError::InvalidValue { .. }),
            ),
            (
                "cas with a scalar",
                vec![ev(1, Invoke, F::Cas, int(1), 1)],
                |e| matches!(e, HistoryError::InvalidValue { .. }),
            ),
            (
                "completion value differs",
                vec![
                    ev(1, Invoke, F::Write, int(1), 1),
                    ev(1, Ok, F::Write, int(2), 2),
                ],
                |e| matches!(e, HistoryError::InvalidValue { index: 1, .. }),
            ),
            (
                "time goes backwards",
                vec![
                    ev(1, Invoke, F::Read, null(), 5),
                    ev(1, Ok, F::Read, null(), 4),
                ],
                |e| {
                    matches!(
                        e,
                        HistoryError::TimeWentBackwards {
                            index: 1,
                            time: 4,
                            previous: 5,
                            ..
                        }
                    )
                },
            ),
        ];
        for (name, events, expected) in cases {
            match pair(&events) {
                Err(e) => assert!(expected(&e), "{name}: unexpected error {e}"),
                Result::Ok(ops) => panic!("{name}: accepted as {ops:?}"),
            }
        }
    }
}
