//! The set checker: the acknowledged-but-lost detector. Elements are added once each, then a
//! final read (after the faults are healed) returns the whole set. Knows nothing of how the
//! workload encodes adds or reads; the caller maps its ops to [`Add`]s and the final read.
//!
//! * every `ok` add must be in the final read (else it is *lost*);
//! * nothing may be in the final read that was never attempted (*unexpected*), or whose add
//!   `fail`ed — `fail` means it definitely took no effect (*failed but present*);
//! * an `info` add may or may not be present; present ones are counted as *recovered*.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::Value;

/// How an add ended. An add the history never completed is `Info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddOutcome {
    Fail,
    Info,
    Ok,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Add {
    pub element: Value,
    pub outcome: AddOutcome,
}

/// Element lists are sorted, so the report is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetReport {
    pub valid: bool,
    /// Distinct elements attempted.
    pub attempted: usize,
    /// `ok` adds present in the final read.
    pub stable: usize,
    /// `ok` adds missing from the final read.
    pub lost: Vec<Value>,
    /// In the final read but never attempted.
    pub unexpected: Vec<Value>,
    /// In the final read although their add failed.
    pub failed_but_present: Vec<Value>,
    /// `info` adds present in the final read.
    pub recovered_from_info: usize,
    /// `info` adds absent from the final read (allowed).
    pub info_absent: usize,
}

/// Judges a set workload. An element added more than once counts with its strongest outcome
/// (ok > info > fail): one acknowledged add is enough to require it. Duplicates in the final
/// read are ignored.
pub fn check_set(adds: &[Add], final_read: &[Value]) -> SetReport {
    let mut attempted: BTreeMap<&Value, AddOutcome> = BTreeMap::new();
    for add in adds {
        let o = attempted.entry(&add.element).or_insert(add.outcome);
        *o = (*o).max(add.outcome);
    }
    let present: BTreeSet<&Value> = final_read.iter().collect();

    let mut report = SetReport {
        valid: true,
        attempted: attempted.len(),
        stable: 0,
        lost: Vec::new(),
        unexpected: Vec::new(),
        failed_but_present: Vec::new(),
        recovered_from_info: 0,
        info_absent: 0,
    };
    for (&element, &outcome) in &attempted {
        let here = present.contains(element);
        match (outcome, here) {
            (AddOutcome::Ok, true) => report.stable += 1,
            (AddOutcome::Ok, false) => report.lost.push(element.clone()),
            (AddOutcome::Info, true) => report.recovered_from_info += 1,
            (AddOutcome::Info, false) => report.info_absent += 1,
            (AddOutcome::Fail, true) => report.failed_but_present.push(element.clone()),
            (AddOutcome::Fail, false) => {}
        }
    }
    report.unexpected = present
        .iter()
        .filter(|e| !attempted.contains_key(*e))
        .map(|e| (*e).clone())
        .collect();
    report.valid = report.lost.is_empty()
        && report.unexpected.is_empty()
        && report.failed_but_present.is_empty();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(e: i64, outcome: AddOutcome) -> Add {
        Add {
            element: Value::Int(e),
            outcome,
        }
    }
    fn ints(v: &[i64]) -> Vec<Value> {
        v.iter().map(|&i| Value::Int(i)).collect()
    }

    #[test]
    fn all_acknowledged_present_is_valid() {
        let r = check_set(
            &[add(1, AddOutcome::Ok), add(2, AddOutcome::Ok)],
            &ints(&[2, 1, 1]),
        );
        assert!(r.valid);
        assert_eq!((r.attempted, r.stable), (2, 2));
    }

    #[test]
    fn lost_unexpected_failed_and_recovered_are_each_reported() {
        let adds = [
            add(1, AddOutcome::Ok),   // stable
            add(2, AddOutcome::Ok),   // lost
            add(3, AddOutcome::Info), // recovered
            add(4, AddOutcome::Info), // absent, fine
            add(5, AddOutcome::Fail), // failed but present
            add(6, AddOutcome::Fail), // absent, fine
        ];
        let r = check_set(&adds, &ints(&[1, 3, 5, 9]));
        assert!(!r.valid);
        assert_eq!(r.stable, 1);
        assert_eq!(r.lost, ints(&[2]));
        assert_eq!(r.recovered_from_info, 1);
        assert_eq!(r.info_absent, 1);
        assert_eq!(r.failed_but_present, ints(&[5]));
        assert_eq!(r.unexpected, ints(&[9]));
    }

    #[test]
    fn info_adds_may_be_absent_and_a_repeated_add_takes_its_strongest_outcome() {
        let r = check_set(&[add(1, AddOutcome::Info)], &[]);
        assert!(r.valid);
        let r = check_set(&[add(1, AddOutcome::Fail), add(1, AddOutcome::Ok)], &[]);
        assert_eq!(r.lost, ints(&[1]));
    }
}
