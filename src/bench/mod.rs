//! bench: a load generator that compares cairn's REST API with etcd v3's JSON gateway over
//! the same HTTPS mTLS client stack. [`run`] executes a [`BenchCommand`]: `run` drives the
//! chosen workloads (closed loop per client level, or fixed rate per rate) against one
//! target and prints a table (and `--json`); `compare` prints two saved result sets side by
//! side.
//!
//! Modules: [`args`] (command line), [`http`] (shared TLS + client pool), [`target`] (the
//! [`Target`] trait), [`cairn`] and [`etcd`] (the two targets), [`workload`] (ops and keys),
//! [`driver`] (closed loop and fixed rate), [`stats`] (histograms), [`report`] (results,
//! tables, compare), [`failover`] (time to the first write after a leader is killed).

pub mod args;
pub mod cairn;
pub mod driver;
pub mod etcd;
pub mod failover;
pub mod http;
pub mod report;
pub mod stats;
pub mod target;
pub mod workload;

#[cfg(test)]
mod testserver;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};

pub use args::{BenchCommand, CompareArgs, FirstWriteArgs, RunArgs, TargetKind};
pub use report::BenchResult;
pub use target::Target;
pub use workload::Workload;

use driver::{Job, Timing};
use report::{Load, RunInfo};
use workload::KeySpace;

/// Longest `--key-prefix`: it must fit a DNS label together with `bench-q-`.
const MAX_PREFIX_LEN: usize = 40;

/// Runs one bench command to completion.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Run(args) => {
            run_bench(&args).await?;
            Ok(())
        }
        BenchCommand::Compare(args) => compare_files(&args),
        BenchCommand::FirstWrite(args) => first_write(&args).await,
    }
}

/// `bench first-write`: prints the Unix time (ns) of the first acknowledged write.
pub async fn first_write(args: &FirstWriteArgs) -> anyhow::Result<()> {
    let files = http::TlsFiles {
        ca: &args.ca,
        cert: &args.cert,
        key: &args.key,
    };
    let conn = Connection {
        tls: files,
        http1: false,
        endpoints: &args.endpoints,
        connections: 1,
        timeout: failover::ATTEMPT_TIMEOUT,
    };
    let (pool, prefix) = conn.open(args.key_prefix.as_deref())?;
    let (at, attempts) = match args.target {
        TargetKind::Cairn => {
            let t = Arc::new(cairn::CairnTarget::new(pool, &prefix));
            failover::first_write(t, args.within).await?
        }
        TargetKind::Etcd => {
            let t = Arc::new(etcd::EtcdTarget::new(pool, &prefix));
            failover::first_write(t, args.within).await?
        }
    };
    eprintln!("bench: first write acknowledged after {attempts} attempt(s)");
    println!("{}", failover::unix_nanos(at));
    Ok(())
}

/// `bench compare`: prints the side-by-side table of two sides' result files (the median
/// run of each workload and load, when a side has several rounds).
pub fn compare_files(args: &CompareArgs) -> anyhow::Result<()> {
    let read_side = |files: &[std::path::PathBuf]| -> anyhow::Result<Vec<BenchResult>> {
        let mut all = Vec::new();
        for f in files {
            all.extend(report::read_json(f)?);
        }
        Ok(report::median_runs(&all))
    };
    let a = read_side(&args.a)?;
    let b = read_side(&args.b)?;
    println!("{}", report::compare_table(&report::compare(&a, &b)));
    Ok(())
}

/// `bench run`: every workload at every level, printed as it completes; returns the results
/// (also written to `--json`).
pub async fn run_bench(args: &RunArgs) -> anyhow::Result<Vec<BenchResult>> {
    validate(args)?;
    let files = http::TlsFiles {
        ca: &args.ca,
        cert: &args.cert,
        key: &args.key,
    };
    let conn = Connection {
        tls: files,
        http1: args.http1,
        endpoints: &args.endpoints,
        connections: args.connections,
        timeout: args.timeout,
    };
    let (pool, prefix) = conn.open(args.key_prefix.as_deref())?;
    eprintln!(
        "bench: target {} at {} endpoint(s), {} connection(s), key prefix `{prefix}`",
        args.target.name(),
        pool.endpoint_count(),
        pool.client_count()
    );
    for (ep, version) in pool.probe().await? {
        eprintln!("bench: {ep} answers over {version:?}");
    }
    let results = match args.target {
        TargetKind::Cairn => {
            run_all(cairn::CairnTarget::new(pool.clone(), &prefix), &pool, args).await?
        }
        TargetKind::Etcd => {
            run_all(etcd::EtcdTarget::new(pool.clone(), &prefix), &pool, args).await?
        }
    };
    if let Some(path) = &args.json {
        report::write_json(path, &results)?;
        eprintln!(
            "bench: wrote {} result(s) to {}",
            results.len(),
            path.display()
        );
    }
    Ok(results)
}

/// How a command reaches its target: mTLS from these files, a pool of `connections` over
/// `endpoints`, each request bounded by `timeout`.
struct Connection<'a> {
    tls: http::TlsFiles<'a>,
    http1: bool,
    endpoints: &'a [String],
    connections: usize,
    timeout: std::time::Duration,
}

impl Connection<'_> {
    /// The client pool, and the key prefix (`key_prefix`, validated, or a random one).
    fn open(self, key_prefix: Option<&str>) -> anyhow::Result<(http::HttpPool, String)> {
        let prefix = key_prefix.map_or_else(random_prefix, str::to_owned);
        validate_prefix(&prefix)?;
        let tls = http::client_tls_config(self.tls, self.http1)?;
        let pool = http::HttpPool::new(self.endpoints, Some(tls), self.connections, self.timeout)?;
        Ok((pool, prefix))
    }
}

fn validate(args: &RunArgs) -> anyhow::Result<()> {
    if args.workload.is_empty() {
        bail!("--workload needs at least one of put, get, query, mixed");
    }
    if args.rate.is_empty() && (args.clients.is_empty() || args.clients.contains(&0)) {
        bail!("--clients needs one or more numbers above 0");
    }
    if let Some(r) = args.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rate must be positive ops/s, not {r}");
    }
    if args.duration.is_zero() {
        bail!("--duration must be above 0");
    }
    if args.max_in_flight == 0 {
        bail!("--max-in-flight must be at least 1");
    }
    Ok(())
}

/// A prefix must be usable in a cairn service name (a DNS label) and in an etcd key.
fn validate_prefix(p: &str) -> anyhow::Result<()> {
    let ok = !p.is_empty()
        && p.len() <= MAX_PREFIX_LEN
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !p.ends_with('-');
    if !ok {
        bail!("--key-prefix `{p}`: use 1-{MAX_PREFIX_LEN} of a-z, 0-9 and `-`, not ending in `-`");
    }
    Ok(())
}

/// Eight random characters of `a-z0-9`.
fn random_prefix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..8)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// The levels of a run: one per `--rate` if any were given, else one per `--clients`.
fn loads(args: &RunArgs) -> Vec<Load> {
    if args.rate.is_empty() {
        args.clients
            .iter()
            .map(|&clients| Load::Closed { clients })
            .collect()
    } else {
        args.rate.iter().map(|&rate| Load::Rate { rate }).collect()
    }
}

async fn run_all<T: Target>(
    target: T,
    pool: &http::HttpPool,
    args: &RunArgs,
) -> anyhow::Result<Vec<BenchResult>> {
    let target = Arc::new(target);
    let keys = Arc::new(KeySpace::new(args.preload));
    let timing = Timing {
        warmup: args.warmup,
        duration: args.duration,
    };
    let mut preloaded = false;
    let mut results: Vec<BenchResult> = Vec::new();
    for &workload in &args.workload {
        if workload.needs_preload() && !preloaded {
            preload(&*target, args.preload).await?;
            preloaded = true;
        }
        let job = Job {
            target: target.clone(),
            workload,
            keys: keys.clone(),
        };
        for load in loads(args) {
            let measured = match load {
                Load::Closed { clients } => driver::closed_loop(&job, clients, timing).await?,
                Load::Rate { rate } => {
                    driver::fixed_rate(&job, rate, args.max_in_flight, timing).await?
                }
            };
            let info = RunInfo {
                target: target.name(),
                workload,
                load,
                connections: pool.client_count(),
                endpoints: pool.endpoint_count(),
            };
            let r = BenchResult::new(info, &measured);
            if results.is_empty() {
                println!("{}", report::table_header());
            }
            println!("{}", report::table_row(&r));
            results.push(r);
        }
    }
    Ok(results)
}

async fn preload<T: Target>(target: &T, n: u64) -> anyhow::Result<()> {
    let t = Instant::now();
    target
        .preload(n)
        .await
        .with_context(|| format!("preloading {n} keys into {}", target.name()))?;
    eprintln!(
        "bench: preloaded {n} keys and the query group in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(validate_prefix("ab-12").is_ok());
        assert!(validate_prefix("Ab").is_err());
        assert!(validate_prefix("a/b").is_err());
        assert!(validate_prefix("a-").is_err());
        assert!(validate_prefix("").is_err());
        let p = random_prefix();
        assert_eq!(p.len(), 8);
        assert!(validate_prefix(&p).is_ok());
    }
}
