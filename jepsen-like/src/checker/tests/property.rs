//! The checker against the brute-force oracle on thousands of tiny random histories.

use super::random::{linearizable, mutate, to_events, GenConfig};
use super::*;
use crate::checker::check;
use crate::history::{read_jsonl, write_jsonl};

const SIMULATED: u64 = 5000;
const MUTATED: u64 = 10_000;

fn tiny_history(rng: &mut Rng, mutations: u64) -> Vec<Op> {
    loop {
        let cfg = GenConfig::small(rng, oracle::MAX_OPS);
        let mut next_pid = 0;
        let mut ops = linearizable(rng, &cfg, &mut next_pid);
        for _ in 0..mutations {
            mutate(rng, &mut ops, &cfg, &mut next_pid);
        }
        let paired = pair(&to_events(&ops)).expect("generated histories are well formed");
        if paired.len() <= oracle::MAX_OPS {
            return paired;
        }
    }
}

#[test]
fn simulated_linearizable_histories_are_valid_for_checker_and_oracle() {
    let mut rng = Rng::new(0x5EED_0001);
    let mut with_info = 0;
    for seed in 0..SIMULATED {
        let ops = tiny_history(&mut rng, 0);
        with_info += u64::from(ops.iter().any(|o| o.status == OpStatus::Info));
        assert!(
            oracle::linearizable(&ops),
            "generator produced a non-linearizable history (case {seed}): {ops:#?}"
        );
        let v = verdict(&ops);
        assert!(v.is_valid(), "case {seed}: checker says {v} for {ops:#?}");
    }
    assert!(
        with_info > SIMULATED / 5,
        "only {with_info} histories had info ops"
    );
}

#[test]
fn mutated_histories_get_the_oracles_verdict() {
    let mut rng = Rng::new(0x5EED_0002);
    let (mut valid, mut invalid, mut valid_with_info, mut invalid_with_info) = (0, 0, 0, 0);
    for case in 0..MUTATED {
        let mutations = 1 + rng.below(3);
        let ops = tiny_history(&mut rng, mutations);
        let has_info = ops.iter().any(|o| o.status == OpStatus::Info);
        let expected = oracle::linearizable(&ops);
        let v = verdict(&ops);
        assert!(!v.is_unknown(), "case {case}: unlimited budget gave {v}");
        assert_eq!(
            v.is_valid(),
            expected,
            "case {case}: checker says {v}, oracle says {expected}, for {ops:#?}"
        );
        if expected {
            valid += 1;
            valid_with_info += u64::from(has_info);
        } else {
            invalid += 1;
            invalid_with_info += u64::from(has_info);
        }
        // Any smaller step budget must give Unknown, never a verdict.
        let steps: u64 = check_report(&ops, &Budget::unlimited())
            .keys
            .iter()
            .map(|k| k.steps)
            .max()
            .unwrap_or(0);
        if steps > 1
            && ops
                .iter()
                .map(|o| &o.key)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 1
        {
            assert!(
                check(&ops, &Budget::steps(steps - 1)).is_unknown(),
                "case {case}"
            );
        }
    }
    eprintln!("mutated: {valid} valid ({valid_with_info} with info), {invalid} invalid ({invalid_with_info} with info)");
    assert!(valid > MUTATED / 5, "only {valid} valid");
    assert!(invalid > MUTATED / 5, "only {invalid} invalid");
    assert!(valid_with_info > MUTATED / 20 && invalid_with_info > MUTATED / 20);
}

#[test]
fn jsonl_round_trip_preserves_random_histories() {
    let mut rng = Rng::new(0x5EED_0003);
    for _ in 0..500 {
        let cfg = GenConfig::small(&mut rng, 12);
        let mut next_pid = 0;
        let events = to_events(&linearizable(&mut rng, &cfg, &mut next_pid));
        let mut buf = Vec::new();
        write_jsonl(&mut buf, &events).expect("write to vec");
        let back = read_jsonl(&buf[..]).expect("read back");
        assert_eq!(back, events);
        assert_eq!(pair(&back).expect("pairs"), pair(&events).expect("pairs"));
    }
}
