//! The set workload, the acknowledged-but-lost detector: clients register many distinct
//! instances of one service (an add), and now and then list the whole service with a
//! linearizable query (a read). After healing, the harness lists it once more on every node
//! (the final reads). Recorded in `set.jsonl`.
//!
//! Judged by [`crate::checker::set::check_set`] against each final read (every acknowledged
//! add present; nothing never attempted; nothing whose add failed), and, for the reads during
//! the run, by [`check_reads`] (Jepsen's set-full idea): a linearizable read must contain
//! every add acknowledged before it began, nothing not yet attempted when it ended, and
//! nothing that a read already showed may vanish from a read that began later.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::api::{InstanceSpec, Precondition};
use crate::checker::set::{check_set, Add, AddOutcome, SetReport};
use crate::client::{ClientCtx, Outcome};
use crate::history::{EventType, Value};
use crate::recorder::Journal;
use crate::workload::VerdictClass;

/// The service whose instances are the set's elements.
pub const SERVICE: &str = "jepsen-set";

/// Share of ops that are reads (percent); the rest are adds.
const READ_PCT: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetF {
    Add,
    Read,
}

/// One line of `set.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetEvent {
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub f: SetF,
    /// The element of an add.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub element: Option<String>,
    /// What an `ok` read returned, sorted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elements: Option<Vec<String>>,
    pub time: u64,
    pub node: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Hands out element names, never the same twice.
#[derive(Debug, Clone, Default)]
pub struct Elements(Arc<AtomicU64>);

impl Elements {
    pub fn next(&self) -> String {
        format!("e{}", self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

pub struct SetClient {
    elements: Elements,
    rng: StdRng,
    history: Journal<SetEvent>,
    /// List with `?consistency=stale` (a self-test: such reads may be stale and must be
    /// caught).
    stale_reads: bool,
}

impl SetClient {
    pub fn new(
        elements: Elements,
        rng: StdRng,
        history: Journal<SetEvent>,
        stale_reads: bool,
    ) -> Self {
        SetClient {
            elements,
            rng,
            history,
            stale_reads,
        }
    }

    pub async fn step(&mut self, ctx: &ClientCtx) -> Outcome {
        let (process, node) = (ctx.process, ctx.node.id);
        if self.rng.random_range(0..100) < READ_PCT {
            let invoke = self.history.record(|time| SetEvent {
                process,
                kind: EventType::Invoke,
                f: SetF::Read,
                element: None,
                elements: None,
                time,
                node,
                error: None,
            });
            let (outcome, elements, error) = match ctx.api.list(SERVICE, self.stale_reads).await {
                Ok(list) => {
                    let mut v: Vec<String> = list.into_iter().map(|i| i.id).collect();
                    v.sort();
                    (Outcome::Ok, Some(v), None)
                }
                Err(e) => (Outcome::Fail, None, Some(e.to_string())),
            };
            let complete = self.history.record(|time| SetEvent {
                process,
                kind: event_type(outcome),
                f: SetF::Read,
                element: None,
                elements,
                time,
                node,
                error: error.clone(),
            });
            ctx.done("set", "read", invoke, complete, outcome, error);
            return outcome;
        }
        let element = self.elements.next();
        let invoke = self.history.record(|time| SetEvent {
            process,
            kind: EventType::Invoke,
            f: SetF::Add,
            element: Some(element.clone()),
            elements: None,
            time,
            node,
            error: None,
        });
        let spec = InstanceSpec::with_value(&element, None);
        let (outcome, error) = match ctx
            .api
            .put_instance(SERVICE, &element, &spec, Precondition::None)
            .await
        {
            Ok(_) => (Outcome::Ok, None),
            Err(e) if e.definitely_not_applied() => (Outcome::Fail, Some(e.to_string())),
            Err(e) => (Outcome::Info, Some(e.to_string())),
        };
        let complete = self.history.record(|time| SetEvent {
            process,
            kind: event_type(outcome),
            f: SetF::Add,
            element: Some(element.clone()),
            elements: None,
            time,
            node,
            error: error.clone(),
        });
        ctx.done("set", "add", invoke, complete, outcome, error);
        outcome
    }
}

fn event_type(o: Outcome) -> EventType {
    match o {
        Outcome::Ok => EventType::Ok,
        Outcome::Fail => EventType::Fail,
        Outcome::Info => EventType::Info,
    }
}

/// An add or a read with its invoke and completion paired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetOp {
    pub process: u64,
    pub node: u64,
    pub f: SetF,
    pub element: Option<String>,
    pub invoke: u64,
    /// `None` for info (and an invoke never completed).
    pub complete: Option<u64>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elements: Option<Vec<String>>,
}

/// Pairs each invoke with its process's next completion. An invoke never completed is info.
pub fn pair(events: &[SetEvent]) -> Vec<SetOp> {
    let mut open: BTreeMap<u64, usize> = BTreeMap::new();
    let mut ops: Vec<SetOp> = Vec::new();
    for e in events {
        if e.kind == EventType::Invoke {
            open.insert(e.process, ops.len());
            ops.push(SetOp {
                process: e.process,
                node: e.node,
                f: e.f,
                element: e.element.clone(),
                invoke: e.time,
                complete: None,
                outcome: Outcome::Info,
                elements: None,
            });
        } else if let Some(i) = open.remove(&e.process) {
            let op = &mut ops[i];
            match e.kind {
                EventType::Ok => {
                    op.outcome = Outcome::Ok;
                    op.complete = Some(e.time);
                    op.elements = e.elements.clone();
                }
                EventType::Fail => {
                    op.outcome = Outcome::Fail;
                    op.complete = Some(e.time);
                }
                EventType::Info | EventType::Invoke => {}
            }
        }
    }
    ops
}

/// The adds, as the set checker takes them.
pub fn adds(ops: &[SetOp]) -> Vec<Add> {
    ops.iter()
        .filter(|o| o.f == SetF::Add)
        .filter_map(|o| {
            Some(Add {
                element: Value::Str(o.element.clone()?),
                outcome: match o.outcome {
                    Outcome::Ok => AddOutcome::Ok,
                    Outcome::Fail => AddOutcome::Fail,
                    Outcome::Info => AddOutcome::Info,
                },
            })
        })
        .collect()
}

/// How many elements an anomaly lists at most.
const SHOW: usize = 20;

/// A read during the run that a linearizable set cannot explain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadAnomaly {
    /// `stale-read` (an add acknowledged before the read began is missing), `unexpected` (an
    /// element not attempted before the read ended), `disappeared` (shown by a read that
    /// ended before this one began, and missing here), `failed-but-present`.
    pub kind: &'static str,
    /// The read (without its element list).
    pub read: SetOp,
    /// How many elements the read returned.
    pub read_size: usize,
    pub count: usize,
    /// Up to 20 of the elements concerned.
    pub elements: Vec<String>,
}

/// Checks the `ok` reads of the run against the adds (see the module docs).
pub fn check_reads(ops: &[SetOp]) -> Vec<ReadAnomaly> {
    // Per element: when its add was invoked, when it was acknowledged (if ok), and whether
    // it failed.
    let mut invoked: BTreeMap<&str, u64> = BTreeMap::new();
    let mut acked: Vec<(u64, &str)> = Vec::new();
    let mut failed: BTreeSet<&str> = BTreeSet::new();
    for o in ops.iter().filter(|o| o.f == SetF::Add) {
        let Some(e) = o.element.as_deref() else {
            continue;
        };
        invoked.insert(e, o.invoke);
        match (o.outcome, o.complete) {
            (Outcome::Ok, Some(t)) => acked.push((t, e)),
            (Outcome::Fail, _) => {
                failed.insert(e);
            }
            _ => {}
        }
    }
    acked.sort_unstable();
    let mut reads: Vec<&SetOp> = ops
        .iter()
        .filter(|o| o.f == SetF::Read && o.outcome == Outcome::Ok && o.elements.is_some())
        .collect();
    reads.sort_by_key(|o| o.invoke);
    // When each element was first shown by a read: the earliest completion among the reads
    // containing it.
    let mut first_seen: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &reads {
        let done = r.complete.unwrap_or(u64::MAX);
        for e in r.elements.iter().flatten() {
            let t = first_seen.entry(e.as_str()).or_insert(done);
            *t = (*t).min(done);
        }
    }
    let mut seen_order: Vec<(u64, &str)> = first_seen.iter().map(|(e, t)| (*t, *e)).collect();
    seen_order.sort_unstable();

    let mut out = Vec::new();
    for r in reads {
        let done = r.complete.unwrap_or(u64::MAX);
        let have: BTreeSet<&str> = r.elements.iter().flatten().map(String::as_str).collect();
        let mut report = |kind: &'static str, list: Vec<&str>| {
            if !list.is_empty() {
                out.push(ReadAnomaly {
                    kind,
                    read: SetOp {
                        elements: None,
                        ..(*r).clone()
                    },
                    read_size: have.len(),
                    count: list.len(),
                    elements: list.iter().take(SHOW).map(|s| (*s).to_owned()).collect(),
                });
            }
        };
        let stale: Vec<&str> = acked
            .iter()
            .take_while(|(t, _)| *t < r.invoke)
            .map(|(_, e)| *e)
            .filter(|e| !have.contains(e))
            .collect();
        report("stale-read", stale);
        let unexpected: Vec<&str> = have
            .iter()
            .copied()
            .filter(|e| invoked.get(e).is_none_or(|&t| t > done))
            .collect();
        report("unexpected", unexpected);
        let failed_present: Vec<&str> = have
            .iter()
            .copied()
            .filter(|e| failed.contains(e))
            .collect();
        report("failed-but-present", failed_present);
        let acked_set: BTreeSet<&str> = acked
            .iter()
            .take_while(|(t, _)| *t < r.invoke)
            .map(|(_, e)| *e)
            .collect();
        let vanished: Vec<&str> = seen_order
            .iter()
            .take_while(|(t, _)| *t < r.invoke)
            .map(|(_, e)| *e)
            // Missing acknowledged adds are already stale reads; report the rest.
            .filter(|e| !have.contains(e) && !acked_set.contains(e))
            .collect();
        report("disappeared", vanished);
    }
    out
}

/// One final read (after healing) on one node.
#[derive(Debug, Clone, Serialize)]
pub struct FinalRead {
    pub node: u64,
    /// The elements, or why the read never succeeded.
    pub result: Result<Vec<String>, String>,
}

/// Everything the set workload found.
#[derive(Debug, Clone, Serialize)]
pub struct SetResult {
    /// The set checker against the first successful final read.
    pub report: Option<SetReport>,
    /// Final reads whose node disagrees with the set checker (lost/unexpected elements
    /// there), by node.
    pub final_read_failures: Vec<(u64, String)>,
    pub read_anomalies: Vec<ReadAnomaly>,
    pub reads_checked: usize,
    pub adds: usize,
}

impl SetResult {
    pub fn valid(&self) -> bool {
        self.report.as_ref().is_some_and(|r| r.valid)
            && self.final_read_failures.is_empty()
            && self.read_anomalies.is_empty()
    }

    /// The verdict and its one-line account; `nodes` is how many final reads were taken.
    pub fn verdict_line(&self, nodes: usize) -> (VerdictClass, String) {
        match (&self.report, self.valid()) {
            (Some(r), true) => (
                VerdictClass::Valid,
                format!(
                    "valid ({} adds: {} acknowledged all present on {nodes} nodes, {} info recovered; {} reads checked)",
                    r.attempted, r.stable, r.recovered_from_info, self.reads_checked
                ),
            ),
            _ => (
                VerdictClass::Invalid,
                format!(
                    "invalid: {} read anomalies, {} bad final reads, lost {}",
                    self.read_anomalies.len(),
                    self.final_read_failures.len(),
                    self.report.as_ref().map_or(0, |r| r.lost.len())
                ),
            ),
        }
    }

    /// Each anomaly for the summary: `text`, and `at` (the ns interval it concerns).
    pub fn anomalies(&self) -> Vec<serde_json::Value> {
        let secs =
            |t: Option<u64>| t.map_or("∞".to_owned(), |t| format!("{:.3}", t as f64 / 1e9));
        let mut out = Vec::new();
        for a in &self.read_anomalies {
            let text = format!(
                "{}: read by p{} on n{} [{} s, {} s] returned {} elements; {} concerned: {}",
                a.kind,
                a.read.process,
                a.read.node,
                secs(Some(a.read.invoke)),
                secs(a.read.complete),
                a.read_size,
                a.count,
                a.elements.join(" ")
            );
            out.push(serde_json::json!({
                "workload": "set", "kind": a.kind, "text": text,
                "at": [a.read.invoke, a.read.complete], "detail": a,
            }));
        }
        for (node, why) in &self.final_read_failures {
            out.push(serde_json::json!({
                "workload": "set", "kind": "final-read", "node": node,
                "text": format!("final read on n{node}: {why}"),
            }));
        }
        out
    }
}

/// Judges the set workload.
pub fn check(events: &[SetEvent], finals: &[FinalRead]) -> SetResult {
    let ops = pair(events);
    let adds = adds(&ops);
    let read_anomalies = check_reads(&ops);
    let reads_checked = ops
        .iter()
        .filter(|o| o.f == SetF::Read && o.outcome == Outcome::Ok)
        .count();
    let mut report = None;
    let mut final_read_failures = Vec::new();
    for f in finals {
        match &f.result {
            Ok(elements) => {
                let values: Vec<Value> = elements.iter().map(|e| Value::Str(e.clone())).collect();
                let r = check_set(&adds, &values);
                if !r.valid {
                    final_read_failures.push((
                        f.node,
                        format!(
                            "lost {:?}, unexpected {:?}, failed but present {:?}",
                            r.lost.iter().take(SHOW).collect::<Vec<_>>(),
                            r.unexpected.iter().take(SHOW).collect::<Vec<_>>(),
                            r.failed_but_present.iter().take(SHOW).collect::<Vec<_>>()
                        ),
                    ));
                }
                report.get_or_insert(r);
            }
            Err(e) => final_read_failures.push((f.node, format!("no final read: {e}"))),
        }
    }
    SetResult {
        report,
        final_read_failures,
        read_anomalies,
        reads_checked,
        adds: adds.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(p: u64, e: &str, inv: u64, done: Option<u64>, outcome: Outcome) -> SetOp {
        SetOp {
            process: p,
            node: 1,
            f: SetF::Add,
            element: Some(e.into()),
            invoke: inv,
            complete: done,
            outcome,
            elements: None,
        }
    }
    fn read(inv: u64, done: u64, els: &[&str]) -> SetOp {
        SetOp {
            process: 9,
            node: 2,
            f: SetF::Read,
            element: None,
            invoke: inv,
            complete: Some(done),
            outcome: Outcome::Ok,
            elements: Some(els.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    #[test]
    fn reads_that_a_linearizable_set_explains_are_fine() {
        let ops = vec![
            add(1, "e1", 0, Some(10), Outcome::Ok),
            add(2, "e2", 5, None, Outcome::Info),
            add(3, "e3", 20, Some(40), Outcome::Ok),
            // Concurrent with e3's add: may or may not see it; e2 (info) may appear.
            read(15, 30, &["e1", "e2"]),
            read(50, 60, &["e1", "e2", "e3"]),
        ];
        assert_eq!(check_reads(&ops), vec![]);
    }

    #[test]
    fn stale_unexpected_and_vanished_elements_are_each_reported() {
        let ops = vec![
            add(1, "e1", 0, Some(10), Outcome::Ok),
            add(2, "e2", 0, None, Outcome::Info),
            add(3, "e3", 0, Some(5), Outcome::Fail),
            read(20, 30, &["e2"]),       // e1 missing: stale
            read(40, 50, &["e1", "e9"]), // e9 never attempted; e2 vanished
            read(60, 70, &["e1", "e3"]), // e3's add failed; e2 and e9 vanished
        ];
        let found = check_reads(&ops);
        let kinds: Vec<&str> = found.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            [
                "stale-read",
                "unexpected",
                "disappeared",
                "failed-but-present",
                "disappeared"
            ]
        );
        assert_eq!(found[0].elements, ["e1"]);
        assert_eq!(found[4].elements, ["e2", "e9"]);
    }

    #[test]
    fn pairing_and_the_final_read_check() {
        let ev = |p, kind, f, el: Option<&str>, time| SetEvent {
            process: p,
            kind,
            f,
            element: el.map(String::from),
            elements: None,
            time,
            node: 1,
            error: None,
        };
        let events = vec![
            ev(1, EventType::Invoke, SetF::Add, Some("e1"), 1),
            ev(2, EventType::Invoke, SetF::Add, Some("e2"), 2),
            ev(1, EventType::Ok, SetF::Add, Some("e1"), 3),
            ev(2, EventType::Info, SetF::Add, Some("e2"), 4),
        ];
        let ok = check(
            &events,
            &[FinalRead {
                node: 1,
                result: Ok(vec!["e1".into()]),
            }],
        );
        assert!(ok.valid(), "{ok:?}");
        let lost = check(
            &events,
            &[
                FinalRead {
                    node: 1,
                    result: Ok(vec!["e1".into(), "e2".into()]),
                },
                FinalRead {
                    node: 2,
                    result: Ok(vec![]),
                },
            ],
        );
        assert!(!lost.valid());
        assert_eq!(lost.final_read_failures.len(), 1);
        assert_eq!(lost.final_read_failures[0].0, 2);
        let none = check(&events, &[]);
        assert!(!none.valid(), "no final read is never valid");
    }
}
