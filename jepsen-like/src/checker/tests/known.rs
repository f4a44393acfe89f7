//! Hand-written histories with known answers. Times are in arbitrary units; `p` = process.

use super::*;
use crate::checker::{check, CandidateRejection};

fn assert_valid(h: Hist) {
    let ops = h.ops();
    let v = verdict(&ops);
    assert!(v.is_valid(), "expected valid, got {v}");
}

fn assert_invalid(h: Hist) -> Box<crate::checker::Explanation> {
    let ops = h.ops();
    match verdict(&ops) {
        Verdict::Invalid { explanation, .. } => explanation,
        v => panic!("expected invalid, got {v}"),
    }
}

#[test]
fn empty_history_is_valid() {
    assert!(check(&[], &Budget::unlimited()).is_valid());
}

#[test]
fn sequential_valid() {
    assert_valid(
        Hist::new()
            .read(1, None, 0, 1)
            .write(1, 1, 2, 3)
            .read(2, Some(1), 4, 5)
            .write(2, 2, 6, 7)
            .read(1, Some(2), 8, 9),
    );
}

#[test]
fn concurrent_write_and_read_may_see_either_value() {
    // p1 |--w1--|
    // p2          |------w2------|
    // p3             |--r?--|
    for seen in [1, 2] {
        assert_valid(Hist::new().write(1, 1, 0, 10).write(2, 2, 20, 50).read(
            3,
            Some(seen),
            30,
            40,
        ));
    }
}

#[test]
fn read_overlapping_the_write_at_one_instant_may_see_old_value() {
    // Closed intervals: the read invoked at the instant the write completed is concurrent.
    assert_valid(Hist::new().write(1, 1, 0, 10).read(2, None, 10, 20));
    assert_invalid(Hist::new().write(1, 1, 0, 10).read(2, None, 11, 20));
}

#[test]
fn stale_read_is_invalid() {
    // A read that starts after w2's ok returns the older value.
    let e = assert_invalid(Hist::new().write(1, 1, 0, 10).write(1, 2, 20, 30).read(
        2,
        Some(1),
        40,
        50,
    ));
    assert_eq!(e.key, "k");
    assert_eq!(e.longest_prefix.len(), 2, "both writes linearize: {e}");
    assert_eq!(e.value, Value::Int(2));
    assert_eq!(e.blocked.output, Some(Value::Int(1)));
    assert_eq!(
        e.candidates
            .iter()
            .map(|c| c.rejection.clone())
            .collect::<Vec<_>>(),
        [CandidateRejection::ReadMismatch {
            held: Value::Int(2)
        }]
    );
}

#[test]
fn lost_write_is_invalid() {
    // The write was acknowledged; later reads never see it and nothing else wrote.
    assert_invalid(
        Hist::new()
            .write(1, 1, 0, 10)
            .read(2, None, 20, 30)
            .read(3, None, 40, 50),
    );
}

#[test]
fn read_of_a_never_written_value_is_invalid() {
    let e = assert_invalid(Hist::new().write(1, 1, 0, 10).read(2, Some(7), 5, 15));
    assert!(e.longest_prefix.len() <= 1);
    assert!(e
        .candidates
        .iter()
        .any(|c| matches!(c.rejection, CandidateRejection::ReadMismatch { .. })));
}

#[test]
fn cas_chain_is_valid() {
    assert_valid(
        Hist::new()
            .cas(1, None, 0, 0, 1) // create-if-absent
            .cas(2, Some(0), 1, 2, 3)
            .cas(1, Some(1), 2, 4, 5)
            .read(3, Some(2), 6, 7),
    );
}

#[test]
fn concurrent_cas_chain_may_linearize_in_either_order() {
    assert_valid(
        Hist::new()
            .write(1, 0, 0, 1)
            .cas(2, Some(1), 2, 2, 10)
            .cas(3, Some(0), 1, 3, 9)
            .read(1, Some(2), 11, 12),
    );
}

#[test]
fn two_ok_cas_with_the_same_expected_value_from_one_state_is_invalid() {
    let e = assert_invalid(Hist::new().write(1, 0, 0, 1).cas(2, Some(0), 1, 2, 10).cas(
        3,
        Some(0),
        2,
        3,
        9,
    ));
    assert!(e
        .candidates
        .iter()
        .any(|c| matches!(c.rejection, CandidateRejection::CasPrecondition { .. })));
}

#[test]
fn ok_cas_on_an_absent_key_with_a_value_expected_is_invalid() {
    assert_invalid(Hist::new().cas(1, Some(0), 1, 0, 1));
}

#[test]
fn info_write_that_later_appears_in_a_read_is_valid() {
    assert_valid(
        Hist::new()
            .write(1, 1, 0, 10)
            .info_write(2, 2, 20, 30)
            .read(3, Some(2), 100, 110),
    );
}

#[test]
fn info_write_may_take_effect_long_after_its_info() {
    // The info completion is not a deadline: the interval extends to +∞.
    assert_valid(
        Hist::new()
            .info_write(2, 2, 0, 10)
            .read(3, None, 20, 30)
            .read(3, Some(2), 40, 50),
    );
}

#[test]
fn info_write_that_never_appears_is_valid() {
    assert_valid(
        Hist::new()
            .write(1, 1, 0, 10)
            .info_write(2, 2, 20, 30)
            .read(3, Some(1), 40, 50)
            .read(3, Some(1), 60, 70),
    );
}

#[test]
fn info_write_seen_then_old_value_again_is_invalid() {
    let e = assert_invalid(
        Hist::new()
            .write(1, 1, 0, 10)
            .info_write(2, 2, 20, 30)
            .read(3, Some(2), 40, 50)
            .read(3, Some(1), 60, 70),
    );
    assert_eq!(e.blocked.output, Some(Value::Int(1)));
}

#[test]
fn info_write_seen_then_unseen_then_seen_again_needs_two_writes() {
    // w1 ok, w2 info: 2, 1, 2 is impossible with one info write…
    assert_invalid(
        Hist::new()
            .write(1, 1, 0, 10)
            .info_write(2, 2, 5, 30)
            .read(3, Some(2), 40, 50)
            .read(3, Some(1), 60, 70)
            .read(3, Some(2), 80, 90),
    );
    // …and possible when the old value is rewritten concurrently.
    assert_valid(
        Hist::new()
            .write(1, 1, 0, 10)
            .info_write(2, 2, 5, 30)
            .read(3, Some(2), 40, 50)
            .write(4, 1, 52, 58)
            .read(3, Some(1), 60, 70),
    );
}

#[test]
fn info_cas_applies_only_if_its_precondition_held() {
    // The info cas 0→5 can explain a read of 5 only while the key holds 0.
    assert_valid(
        Hist::new()
            .write(1, 0, 0, 10)
            .info_cas(2, Some(0), 5, 20, 30)
            .read(3, Some(5), 40, 50),
    );
    assert_invalid(
        Hist::new()
            .write(1, 1, 0, 10)
            .info_cas(2, Some(0), 5, 20, 30)
            .read(3, Some(5), 40, 50),
    );
}

#[test]
fn delete_then_read_null() {
    assert_valid(
        Hist::new()
            .write(1, 1, 0, 10)
            .delete(1, 20, 30)
            .read(2, None, 40, 50),
    );
    assert_invalid(
        Hist::new()
            .write(1, 1, 0, 10)
            .delete(1, 20, 30)
            .read(2, Some(1), 40, 50),
    );
}

#[test]
fn fail_ops_are_ignored() {
    // A failed write took no effect: reading its value is invalid, reading around it is fine.
    assert_valid(Hist::new().fail_write(1, 1, 0, 10).read(2, None, 20, 30));
    assert_invalid(Hist::new().fail_write(1, 1, 0, 10).read(2, Some(1), 20, 30));
    let ops = Hist::new().fail_write(1, 1, 0, 10).ops();
    assert!(ops.is_empty(), "fail ops are dropped by pair");
}

#[test]
fn incomplete_history_counts_invoke_without_completion_as_info() {
    let h = Hist::new()
        .write(1, 1, 0, 10)
        .pending_write(2, 2, 20)
        .read(3, Some(2), 30, 40);
    let ops = h.ops();
    let pending = ops
        .iter()
        .find(|o| o.process == 2)
        .expect("the pending write is kept");
    assert_eq!(
        (pending.status, pending.complete_time),
        (OpStatus::Info, None)
    );
    assert!(verdict(&ops).is_valid());
    // It may also never take effect.
    assert_valid(
        Hist::new()
            .write(1, 1, 0, 10)
            .pending_write(2, 2, 20)
            .read(3, Some(1), 30, 40),
    );
}

#[test]
fn unobserved_info_writes_are_dropped_before_the_search() {
    // Ten timed-out writes of values nobody reads; only the ok ops are searched.
    let mut h = Hist::new().write(1, 1, 0, 10);
    for p in 0..10 {
        h = h.info_write(100 + p, 1000 + p as i64, 20 + p, 25 + p);
    }
    let h = h.read(2, Some(1), 40, 50);
    let report = check_report(&h.ops(), &Budget::unlimited());
    assert!(report.verdict.is_valid());
    assert_eq!(report.keys[0].info_ops, 10);
    assert_eq!(report.keys[0].info_ops_dropped, 10);
}

#[test]
fn keys_are_independent_and_the_first_invalid_key_in_order_is_reported() {
    let h = Hist::new()
        .key("b")
        .write(1, 1, 0, 10)
        .read(2, None, 20, 30) // b: lost write
        .key("a")
        .write(3, 1, 0, 10)
        .read(4, Some(1), 20, 30) // a: fine
        .key("c")
        .read(5, Some(9), 0, 1); // c: never written
    let report = check_report(&h.ops(), &Budget::unlimited());
    let keys: Vec<_> = report.keys.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c"]);
    assert!(matches!(report.keys[0].outcome, KeyOutcome::Valid));
    assert!(matches!(report.keys[1].outcome, KeyOutcome::Invalid { .. }));
    assert!(matches!(report.keys[2].outcome, KeyOutcome::Invalid { .. }));
    match report.verdict {
        Verdict::Invalid { key, .. } => assert_eq!(key, "b"),
        v => panic!("expected invalid, got {v}"),
    }
    // The same value on different keys does not interfere.
    assert_valid(
        Hist::new()
            .key("x")
            .write(1, 1, 0, 10)
            .key("y")
            .read(2, None, 20, 30),
    );
}

#[test]
fn explanation_serializes_to_json_and_reads_well() {
    let ops = Hist::new()
        .write(1, 1, 0, 10)
        .write(1, 2, 20, 30)
        .read(2, Some(1), 40, 50)
        .ops();
    let v = check(&ops, &Budget::unlimited());
    let json = serde_json::to_value(&v).expect("verdicts serialize");
    assert_eq!(json["verdict"], "invalid");
    assert_eq!(json["key"], "k");
    let e = &json["explanation"];
    assert_eq!(e["longest_prefix"].as_array().map(Vec::len), Some(2));
    assert_eq!(e["longest_prefix"][1]["op"]["input"]["f"], "write");
    assert_eq!(e["longest_prefix"][1]["value_after"], 2);
    assert_eq!(e["blocked"]["output"], 1);
    assert_eq!(e["candidates"][0]["rejection"]["why"], "read_mismatch");
    assert_eq!(e["candidates"][0]["rejection"]["held"], 2);
    let text = v.to_string();
    assert!(
        text.contains("longest linearizable prefix: 2 ops, leaving the value 2"),
        "{text}"
    );
    assert!(text.contains("#2 p2 read→1 [40, 50]"), "{text}");
    let report = check_report(&ops, &Budget::unlimited());
    let json = serde_json::to_value(&report).expect("reports serialize");
    assert_eq!(json["keys"][0]["outcome"]["outcome"], "invalid");
}

/// A history that needs many steps: `n` concurrent writes of distinct values, each followed
/// later by a read of the one linearized last.
fn many_steps(n: u64) -> Vec<Op> {
    let mut h = Hist::new();
    for p in 0..n {
        h = h.write(p, p as i64, p, 1000 + p);
    }
    for p in 0..n {
        h = h.read(100 + p, Some(0), 2000 + p, 3000);
    }
    h.ops()
}

#[test]
fn running_out_of_steps_is_unknown_never_valid() {
    let ops = many_steps(12);
    let full = check_report(&ops, &Budget::unlimited());
    assert!(full.verdict.is_valid());
    let needed = full.keys[0].steps;
    assert!(needed > 10, "needs {needed} steps");
    for max in [1, needed / 2, needed - 1] {
        let v = check(&ops, &Budget::steps(max));
        assert!(v.is_unknown(), "{max} steps gave {v}");
    }
    assert!(check(&ops, &Budget::steps(needed)).is_valid());
}

#[test]
fn a_passed_deadline_or_a_tiny_memory_cap_is_unknown() {
    let ops = many_steps(40);
    let past = Budget {
        deadline: Some(std::time::Instant::now()),
        ..Budget::unlimited()
    };
    let v = check(&ops, &past);
    assert!(
        matches!(&v, Verdict::Unknown { reason } if reason.contains("deadline")),
        "{v}"
    );
    let tiny = Budget {
        max_cache_bytes: Some(1),
        ..Budget::unlimited()
    };
    let v = check(&ops, &tiny);
    assert!(
        matches!(&v, Verdict::Unknown { reason } if reason.contains("byte budget")),
        "{v}"
    );
}

#[test]
fn invalid_on_one_key_wins_over_unknown_on_another() {
    let mut ops = many_steps(12);
    let bad = Hist::new()
        .key("z")
        .write(1, 1, 0, 10)
        .read(2, None, 20, 30)
        .ops();
    let base = ops.len();
    ops.extend(bad.into_iter().map(|mut o| {
        o.id += base;
        o
    }));
    let v = check(&ops, &Budget::steps(5));
    assert!(
        matches!(&v, Verdict::Invalid { key, .. } if key == "z"),
        "{v}"
    );
    let report = check_report(&ops, &Budget::steps(5));
    assert!(matches!(report.keys[0].outcome, KeyOutcome::Unknown { .. }));
}
