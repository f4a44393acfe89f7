//! Performance sanity: realistic single-key histories of ~2000 ops must check quickly. Times
//! are printed (`--nocapture`), not asserted: the machine is shared. What is asserted is the
//! verdict, and that a generous budget was not exhausted.

use std::time::{Duration, Instant};

use super::random::{linearizable, mutate, to_events, GenConfig};
use super::*;

/// ~2400 generated ops; failed ones (incl. cas with a false precondition) are dropped by
/// `pair`, leaving about 2000.
fn config(values: u64, info_percent: u64) -> GenConfig {
    GenConfig {
        ops: 2400,
        clients: 5,
        keys: 1,
        values,
        info_percent,
        fail_percent: 2,
        gap: 20,
        half: 30,
    }
}

fn run(name: &str, ops: &[Op]) -> Report {
    let budget = Budget {
        max_steps: Some(50_000_000),
        ..Budget::with_timeout(Duration::from_secs(120))
    };
    let start = Instant::now();
    let report = check_report(ops, &budget);
    let elapsed = start.elapsed();
    let k = &report.keys[0];
    eprintln!(
        "perf {name}: {} ops ({} info, {} dropped) on one key, {} concurrent at most: {} in {elapsed:?}, {} steps, {} cache entries",
        k.ops,
        k.info_ops,
        k.info_ops_dropped,
        max_concurrency(ops),
        match &report.verdict {
            Verdict::Invalid { explanation, .. } => format!("invalid at {}", explanation.blocked),
            v => v.to_string(),
        },
        k.steps,
        k.cache_entries
    );
    assert!(!report.verdict.is_unknown(), "{name}: {}", report.verdict);
    report
}

/// The most ok ops whose intervals contain one instant.
fn max_concurrency(ops: &[Op]) -> usize {
    let mut marks: Vec<(u64, i32)> = Vec::new();
    for op in ops.iter().filter(|o| o.status == OpStatus::Ok) {
        marks.push((op.invoke_time, -1));
        marks.push((op.complete_time.expect("ok ops complete"), 1));
    }
    marks.sort_unstable();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, delta) in marks {
        now -= delta;
        max = max.max(now);
    }
    max as usize
}

fn generated(cfg: &GenConfig, seed: u64, mutations: u64) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let mut next_pid = 0;
    let mut gen = linearizable(&mut rng, cfg, &mut next_pid);
    for _ in 0..mutations {
        mutate(&mut rng, &mut gen, cfg, &mut next_pid);
    }
    pair(&to_events(&gen)).expect("generated histories are well formed")
}

#[test]
fn two_thousand_ops_five_clients_colliding_values() {
    let ops = generated(&config(5, 0), 0xBE_0001, 0);
    assert!(ops.len() > 1800);
    assert!(run("values 0..5, no info", &ops).verdict.is_valid());
}

#[test]
fn two_thousand_ops_five_clients_with_timeouts() {
    let ops = generated(&config(5, 5), 0xBE_0002, 0);
    assert!(run("values 0..5, 5% info", &ops).verdict.is_valid());
}

#[test]
fn two_thousand_ops_unique_values_with_timeouts() {
    let ops = generated(&config(1_000_000, 10), 0xBE_0003, 0);
    assert!(run("unique values, 10% info", &ops).verdict.is_valid());
}

#[test]
fn two_thousand_ops_with_a_late_violation() {
    // Seed chosen so the single mutation breaks the history around op 1470: the search has to
    // exhaust every linearization of the first ~1300 ops before answering.
    let ops = generated(&config(1_000_000, 10), 6, 1);
    match run("unique values, 10% info, one late violation", &ops).verdict {
        Verdict::Invalid { explanation, .. } => {
            assert!(explanation.longest_prefix.len() > 1000, "{explanation}");
        }
        v => panic!("expected invalid, got {v}"),
    }
}
