//! What a run reports: op counts by outcome, the run's phases, fault counts, the guards that
//! keep a run from passing vacuously, and `summary.json` / `report.html`. Pure functions of
//! recorded data; knows no API and runs no process.

pub mod html;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::client::{OpRecord, Outcome};
use crate::nemesis::{FaultOutcome, NemesisKind, PlannedFault};
use crate::workload::{VerdictClass, WorkloadKind};

/// Counts by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
}

impl Counts {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Fail => self.fail += 1,
            Outcome::Info => self.info += 1,
        }
    }
    pub fn total(&self) -> u64 {
        self.ok + self.fail + self.info
    }
}

/// One workload's ops: overall and by function.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OpStats {
    #[serde(flatten)]
    pub all: Counts,
    pub by_f: BTreeMap<String, Counts>,
    /// Latency percentiles of `ok` ops, ms.
    pub ok_latency_ms: Percentiles,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Eq for Percentiles {}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let round = |x: f64| (x * 100.0).round() / 100.0;
    Percentiles {
        p50: round(at(0.5)),
        p99: round(at(0.99)),
        max: round(v[v.len() - 1]),
    }
}

/// Ops by workload.
pub fn op_stats(ops: &[OpRecord]) -> BTreeMap<String, OpStats> {
    let mut out: BTreeMap<String, OpStats> = BTreeMap::new();
    let mut lat: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for o in ops {
        let s = out.entry(o.workload.clone()).or_default();
        s.all.add(o.outcome);
        s.by_f.entry(o.f.clone()).or_default().add(o.outcome);
        if o.outcome == Outcome::Ok {
            lat.entry(o.workload.clone())
                .or_default()
                .push(o.complete.saturating_sub(o.invoke) as f64 / 1e6);
        }
    }
    for (w, v) in lat {
        if let Some(s) = out.get_mut(&w) {
            s.ok_latency_ms = percentiles(v);
        }
    }
    out
}

/// A coarse label for an error message, for counting: `503 no-quorum`, `not sent`,
/// `timeout`, `cas: the key holds …` → `cas precondition`.
pub fn error_label(e: &str) -> String {
    if e.contains("timed out") {
        return "timeout".into();
    }
    if e.starts_with("cas:") {
        return "cas precondition".into();
    }
    let e = e.strip_prefix("cas read: ").unwrap_or(e);
    e.split(':').next().unwrap_or(e).trim().to_owned()
}

/// Why ops did not succeed, by label.
pub fn error_counts(ops: &[OpRecord]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for o in ops {
        if let Some(e) = &o.error {
            *out.entry(error_label(e)).or_insert(0) += 1;
        }
    }
    out
}

/// A stretch of the run: before the first fault, while faults come and go, after the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phase {
    pub name: &'static str,
    /// ns on the run clock, `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// `ok` ops completed in the phase, by workload.
    pub ok: BTreeMap<String, u64>,
}

/// Splits `[0, end)` at the first fault's start and the last fault's stop (one phase, "run",
/// if no fault was injected) and counts `ok` completions in each.
pub fn phases(
    ops: &[OpRecord],
    faults: &[FaultOutcome],
    end: u64,
    workloads: &[WorkloadKind],
) -> Vec<Phase> {
    let first = faults.iter().filter_map(|f| f.start).min();
    let last = faults.iter().filter_map(|f| f.stop).max();
    let bounds: Vec<(&'static str, u64, u64)> = match (first, last) {
        (Some(a), Some(b)) => vec![
            ("before-faults", 0, a),
            ("faults", a, b),
            ("after-faults", b, end.max(b)),
        ],
        _ => vec![("run", 0, end)],
    };
    bounds
        .into_iter()
        .map(|(name, start, end)| {
            let mut ok: BTreeMap<String, u64> =
                workloads.iter().map(|w| (w.name().to_owned(), 0)).collect();
            for o in ops {
                if o.outcome == Outcome::Ok && o.complete >= start && o.complete < end {
                    *ok.entry(o.workload.clone()).or_insert(0) += 1;
                }
            }
            Phase {
                name,
                start,
                end,
                ok,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    pub planned: u64,
    pub injected: u64,
    /// Could not be applied or healed.
    pub errors: u64,
}

/// Faults by kind, for every enabled kind (zeros included).
pub fn fault_counts(
    kinds: &[NemesisKind],
    plan: &[PlannedFault],
    outcomes: &[FaultOutcome],
) -> BTreeMap<String, FaultCounts> {
    let mut out: BTreeMap<String, FaultCounts> = kinds
        .iter()
        .map(|k| (k.name().to_owned(), FaultCounts::default()))
        .collect();
    for p in plan {
        out.entry(p.fault.kind().name().to_owned())
            .or_default()
            .planned += 1;
    }
    for o in outcomes {
        let c = out.entry(o.kind.name().to_owned()).or_default();
        if o.injected {
            c.injected += 1;
        }
        if o.error.is_some() {
            c.errors += 1;
        }
    }
    out
}

/// The thresholds that keep a run from passing vacuously.
#[derive(Debug, Clone, Serialize)]
pub struct GuardConfig {
    /// Each workload must complete at least this many `ok` ops in every phase.
    pub min_ok_ops_per_phase: u64,
    /// Each enabled nemesis kind must be injected at least this often.
    pub min_faults_per_kind: u64,
}

/// Checks the guards; lists every shortfall.
pub fn guards(
    cfg: &GuardConfig,
    phases: &[Phase],
    faults: &BTreeMap<String, FaultCounts>,
) -> (VerdictClass, String) {
    let mut short = Vec::new();
    for p in phases {
        for (w, n) in &p.ok {
            if *n < cfg.min_ok_ops_per_phase {
                short.push(format!(
                    "{w}: {n} ok ops in phase {} (< {})",
                    p.name, cfg.min_ok_ops_per_phase
                ));
            }
        }
    }
    for (k, c) in faults {
        if c.injected < cfg.min_faults_per_kind {
            short.push(format!(
                "{k}: {} faults injected (< {})",
                c.injected, cfg.min_faults_per_kind
            ));
        }
    }
    if short.is_empty() {
        let injected: u64 = faults.values().map(|c| c.injected).sum();
        let ok: Vec<String> = phases
            .iter()
            .map(|p| {
                let n: u64 = p.ok.values().sum();
                format!("{} {n}", p.name)
            })
            .collect();
        (
            VerdictClass::Valid,
            format!(
                "valid ({injected} faults injected; ok ops per phase: {})",
                ok.join(", ")
            ),
        )
    } else {
        (
            VerdictClass::Invalid,
            format!("invalid: {}", short.join("; ")),
        )
    }
}

/// One verdict of `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct VerdictEntry {
    pub verdict: VerdictClass,
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        w: &str,
        f: &str,
        inv: u64,
        done: u64,
        outcome: Outcome,
        error: Option<&str>,
    ) -> OpRecord {
        OpRecord {
            workload: w.into(),
            f: f.into(),
            process: 0,
            node: 1,
            invoke: inv,
            complete: done,
            outcome,
            error: error.map(String::from),
        }
    }
    fn fault(kind: NemesisKind, start: Option<u64>, stop: Option<u64>) -> FaultOutcome {
        FaultOutcome {
            id: 0,
            kind,
            detail: String::new(),
            nodes: vec![],
            start,
            stop,
            injected: start.is_some(),
            error: None,
        }
    }

    #[test]
    fn stats_count_by_workload_function_and_outcome() {
        let ops = vec![
            op("register", "read", 0, 2_000_000, Outcome::Ok, None),
            op(
                "register",
                "write",
                0,
                4_000_000,
                Outcome::Info,
                Some("503 no-quorum: x"),
            ),
            op(
                "set",
                "add",
                0,
                1_000_000,
                Outcome::Fail,
                Some("not sent: refused"),
            ),
        ];
        let s = op_stats(&ops);
        assert_eq!(
            s["register"].all,
            Counts {
                ok: 1,
                fail: 0,
                info: 1
            }
        );
        assert_eq!(s["register"].by_f["write"].info, 1);
        assert_eq!(s["register"].ok_latency_ms.p50, 2.0);
        assert_eq!(s["set"].all.fail, 1);
        let e = error_counts(&ops);
        assert_eq!(e["503 no-quorum"], 1);
        assert_eq!(e["not sent"], 1);
        assert_eq!(error_label("lost: timed out: operation"), "timeout");
        assert_eq!(error_label("cas read: 503 no-quorum: y"), "503 no-quorum");
        assert_eq!(error_label("cas: the key holds \"a\""), "cas precondition");
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["register"]["ok"], 1);
        assert_eq!(json["register"]["by_f"]["read"]["ok"], 1);
    }

    #[test]
    fn phases_split_at_the_first_and_last_fault() {
        let ops = vec![
            op("register", "read", 0, 5, Outcome::Ok, None),
            op("register", "read", 0, 15, Outcome::Ok, None),
            op("register", "read", 0, 25, Outcome::Ok, None),
            op("register", "read", 0, 26, Outcome::Fail, None),
        ];
        let faults = vec![
            fault(NemesisKind::Kill, Some(10), Some(12)),
            fault(NemesisKind::Pause, Some(14), Some(20)),
        ];
        let p = phases(
            &ops,
            &faults,
            30,
            &[WorkloadKind::Register, WorkloadKind::Set],
        );
        let names: Vec<&str> = p.iter().map(|p| p.name).collect();
        assert_eq!(names, ["before-faults", "faults", "after-faults"]);
        assert_eq!((p[1].start, p[1].end), (10, 20));
        assert_eq!(
            p.iter().map(|p| p.ok["register"]).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert_eq!(p[0].ok["set"], 0, "a workload without ops shows as 0");
        assert_eq!(
            phases(&ops, &[], 30, &[WorkloadKind::Register])[0].name,
            "run"
        );
    }

    #[test]
    fn guards_fail_on_too_few_ops_or_faults() {
        let cfg = GuardConfig {
            min_ok_ops_per_phase: 2,
            min_faults_per_kind: 1,
        };
        let phase = |n| Phase {
            name: "faults",
            start: 0,
            end: 1,
            ok: BTreeMap::from([("register".to_owned(), n)]),
        };
        let kinds = [NemesisKind::Kill, NemesisKind::Pause];
        let mut faults = fault_counts(&kinds, &[], &[fault(NemesisKind::Kill, Some(1), Some(2))]);
        assert_eq!(faults["kill"].injected, 1);
        assert_eq!(faults["pause"].injected, 0);
        let (v, why) = guards(&cfg, &[phase(5)], &faults);
        assert_eq!(v, VerdictClass::Invalid);
        assert!(why.contains("pause: 0 faults injected"), "{why}");
        faults.get_mut("pause").expect("pause").injected = 1;
        assert_eq!(guards(&cfg, &[phase(5)], &faults).0, VerdictClass::Valid);
        let (v, why) = guards(&cfg, &[phase(1)], &faults);
        assert_eq!(v, VerdictClass::Invalid);
        assert!(why.contains("register: 1 ok ops in phase faults"), "{why}");
    }
}
