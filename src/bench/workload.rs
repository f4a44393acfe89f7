//! workload: what each benchmark operation is. A [`Workload`] names the mix; an [`OpPicker`]
//! (one per logical client, with its own RNG) draws the next [`Op`] from it, over the key
//! space of the run ([`KeySpace`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clap::ValueEnum;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Share of puts in the `mixed` workload (the rest are gets).
pub const MIXED_PUT_SHARE: f64 = 0.10;

/// Records in the query group; a query must return exactly this many.
pub const QUERY_GROUP_SIZE: u64 = 10;

/// A benchmark workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Every op writes a new, distinct key.
    Put,
    /// Linearizable reads of random preloaded keys.
    Get,
    /// Reads of the whole query group (10 records).
    Query,
    /// 90% gets, 10% puts that overwrite random preloaded keys.
    Mixed,
}

impl Workload {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::Query => "query",
            Workload::Mixed => "mixed",
        }
    }

    /// True if the workload reads preloaded keys (so a preload must run first).
    pub fn needs_preload(self) -> bool {
        !matches!(self, Workload::Put)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One operation against a target. Key indexes start at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put(u64),
    Get(u64),
    Query,
}

/// The keys of one `bench run`: `preloaded` keys 1..=preloaded exist; new keys for the `put`
/// workload are handed out above them, never twice within the run.
#[derive(Debug)]
pub struct KeySpace {
    preloaded: u64,
    next_new: AtomicU64,
}

impl KeySpace {
    /// A key space whose keys 1..=preloaded are (or will be) written by the preload.
    pub fn new(preloaded: u64) -> KeySpace {
        KeySpace {
            preloaded,
            next_new: AtomicU64::new(preloaded + 1),
        }
    }

    /// Number of preloaded keys.
    pub fn preloaded(&self) -> u64 {
        self.preloaded
    }

    /// A key never handed out before in this run.
    pub fn fresh(&self) -> u64 {
        self.next_new.fetch_add(1, Ordering::Relaxed)
    }
}

/// Draws the ops of one logical client.
pub struct OpPicker {
    workload: Workload,
    keys: Arc<KeySpace>,
    rng: SmallRng,
}

impl OpPicker {
    /// A picker with a random seed.
    pub fn new(workload: Workload, keys: Arc<KeySpace>) -> OpPicker {
        OpPicker::seeded(workload, keys, rand::random())
    }

    /// A picker with a fixed seed (tests).
    pub fn seeded(workload: Workload, keys: Arc<KeySpace>, seed: u64) -> OpPicker {
        OpPicker {
            workload,
            keys,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// The next op.
    pub fn next_op(&mut self) -> Op {
        match self.workload {
            Workload::Put => Op::Put(self.keys.fresh()),
            Workload::Get => Op::Get(self.existing()),
            Workload::Query => Op::Query,
            Workload::Mixed => {
                if self.rng.random_bool(MIXED_PUT_SHARE) {
                    Op::Put(self.existing())
                } else {
                    Op::Get(self.existing())
                }
            }
        }
    }

    fn existing(&mut self) -> u64 {
        self.rng.random_range(1..=self.keys.preloaded().max(1))
    }
}

/// The instance id / key suffix of key index `i`: `i-000001`.
pub fn key_name(i: u64) -> String {
    format!("i-{i:06}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_keys_are_fresh_and_above_the_preload() {
        let keys = Arc::new(KeySpace::new(100));
        let mut a = OpPicker::seeded(Workload::Put, keys.clone(), 1);
        let mut b = OpPicker::seeded(Workload::Put, keys, 2);
        let ops: Vec<Op> = (0..4).flat_map(|_| [a.next_op(), b.next_op()]).collect();
        let want: Vec<Op> = (101..=108).map(Op::Put).collect();
        assert_eq!(ops, want);
    }

    #[test]
    fn mixed_is_about_ten_percent_puts_of_existing_keys() {
        let keys = Arc::new(KeySpace::new(50));
        let mut p = OpPicker::seeded(Workload::Mixed, keys, 7);
        let mut puts = 0;
        for _ in 0..10_000 {
            match p.next_op() {
                Op::Put(k) => {
                    puts += 1;
                    assert!((1..=50).contains(&k));
                }
                Op::Get(k) => assert!((1..=50).contains(&k)),
                Op::Query => panic!("mixed has no queries"),
            }
        }
        assert!((800..1200).contains(&puts), "{puts} puts of 10000");
    }

    #[test]
    fn key_names() {
        assert_eq!(key_name(1), "i-000001");
        assert_eq!(key_name(1_234_567), "i-1234567");
    }
}
