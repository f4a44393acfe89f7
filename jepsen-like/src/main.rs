//! `jepsen-like`: runs a fault-injection test against a local cairn cluster, or re-checks a
//! recorded history offline.
//!
//! * `jepsen-like [--nodes 3|5] [--time S] [--nemesis all|kill,pause,partition,membership,net,clock|none]
//!   [--workload all|register,set,lease] [--seed N] [--out DIR] [--cairn-bin PATH] ...` —
//!   one run; prints the run directory and one verdict line per check. Exit 0 only if every
//!   verdict is valid (unknown is not), 1 otherwise, 2 on bad usage or a setup failure.
//! * `jepsen-like --ci` — the CI profile: 3 nodes, seeds 1 and 2, 60 s each, every nemesis
//!   and workload unless `--nemesis` / `--workload` narrow them.
//! * `jepsen-like check HISTORY.jsonl [TIMEOUT_SECS]` — checks a register history offline and
//!   prints the report as JSON. Exit 0 valid, 1 invalid, 2 unknown, 3 unreadable history.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};

use jepsen_like::checker::{self, Budget, Verdict};
use jepsen_like::cluster::Tuning;
use jepsen_like::history;
use jepsen_like::nemesis::NemesisKind;
use jepsen_like::report::GuardConfig;
use jepsen_like::run::{self, RunConfig, RunOutcome};
use jepsen_like::workload::WorkloadKind;

#[derive(Parser)]
#[command(
    name = "jepsen-like",
    about = "Black-box fault-injection tests for cairn: runs a cluster, injects faults, checks the history",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Check a recorded register history (history.jsonl) offline; prints the report as JSON.
    Check {
        history: PathBuf,
        /// Checker timeout; running out of it is "unknown", never "valid".
        #[arg(default_value_t = 300)]
        timeout_secs: u64,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Cluster size: 3 or 5 (node i on 127.0.0.(10+i), ports 7400/7401).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Seconds of client traffic (faults stop 10 s before the end).
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Faults: `all`, `none`, or a list of kill, pause, partition, membership, net, clock [default: all].
    #[arg(long)]
    nemesis: Option<String>,
    /// Workloads: `all`, or a list of register, set, lease [default: all].
    #[arg(long)]
    workload: Option<String>,
    /// Seed of the fault plan and of every client's op stream (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Runs go to DIR/<run-id>/ (default: <target dir>/jepsen, see --cairn-bin).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The cairn binary (default: $CARGO_TARGET_DIR/release/cairn if CARGO_TARGET_DIR is set,
    /// else target/release/cairn in the workspace root this crate was built in).
    #[arg(long)]
    cairn_bin: Option<PathBuf>,
    /// Logical clients (each single-threaded, bound to one node).
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Client-side bound on one op (ms); a write that runs out of it is `info`.
    #[arg(long, default_value_t = 5000)]
    op_timeout_ms: u64,
    /// Register ops per key before the key retires.
    #[arg(long, default_value_t = 200)]
    ops_per_key: u32,
    /// Register keys live at a time.
    #[arg(long, default_value_t = 5)]
    live_keys: usize,
    /// TTL of the lease workload's instances (s). Shorter than a fault's hold, so a lease
    /// renewed on the wrong side of a partition has time to expire and be seen.
    #[arg(long, default_value_t = 3)]
    lease_ttl: u64,
    /// Guard: each workload needs this many ok ops in each phase (before, during, after faults).
    #[arg(long, default_value_t = 20)]
    min_ok_ops_per_phase: u64,
    /// Guard: each enabled nemesis must be injected at least this often.
    #[arg(long, default_value_t = 1)]
    min_faults_per_kind: u64,
    /// Checker timeout (s); running out of it is "unknown", which fails the run.
    #[arg(long, default_value_t = 120)]
    check_timeout: u64,
    /// Keep node data directories even when the run is valid.
    #[arg(long)]
    keep_data: bool,
    /// The CI profile: 3 nodes, seeds 1 and 2, 60 s each (all nemeses and workloads unless
    /// --nemesis / --workload say otherwise; --nodes, --time and --seed are ignored).
    #[arg(long)]
    ci: bool,
    /// Exit 0 only if some workload is invalid (and the guards held): for builds with planted
    /// bugs, which the harness must catch.
    #[arg(long)]
    expect_invalid: bool,
    /// Self-test of the harness: register and set reads use `?consistency=stale`, which is not
    /// linearizable; with partitions or pauses the checkers must report invalid (combine with
    /// --expect-invalid).
    #[arg(long)]
    stale_reads: bool,
    /// KEY=VALUE added to every server's environment (repeatable), e.g. a planted-bug switch.
    #[arg(long = "server-env", value_parser = parse_kv)]
    server_env: Vec<(String, String)>,
    /// A TOML file appended to every node config (tables the harness does not write).
    #[arg(long)]
    extra_config: Option<PathBuf>,
    /// The servers' log filter.
    #[arg(long, default_value = "info")]
    server_log: String,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    if k.is_empty() {
        return Err("empty KEY".into());
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// `$CARGO_TARGET_DIR` when set (relative to the current directory, as cargo reads it), else
/// the `target/` of the workspace this crate sits in.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if !t.is_empty() => PathBuf::from(t),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target"),
    }
}

fn list<T: Copy>(
    s: &str,
    all: &[T],
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Result<Vec<T>, String> {
    match s {
        "all" => Ok(all.to_vec()),
        "none" | "" => Ok(Vec::new()),
        _ => s
            .split(',')
            .map(|x| parse(x.trim()).ok_or_else(|| format!("unknown {what} `{x}`")))
            .collect(),
    }
}

fn configs(a: &RunArgs) -> Result<Vec<RunConfig>, String> {
    let nemeses = list(
        a.nemesis.as_deref().unwrap_or("all"),
        &NemesisKind::ALL,
        NemesisKind::parse,
        "nemesis",
    )?;
    let workloads = list(
        a.workload.as_deref().unwrap_or("all"),
        &WorkloadKind::ALL,
        WorkloadKind::parse,
        "workload",
    )?;
    if workloads.is_empty() {
        return Err("--workload needs at least one workload".into());
    }
    if a.nodes != 3 && a.nodes != 5 {
        return Err(format!("--nodes must be 3 or 5, not {}", a.nodes));
    }
    let extra_config = match &a.extra_config {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => String::new(),
    };
    let seed = a.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let base = RunConfig {
        nodes: a.nodes,
        time: Duration::from_secs(a.time),
        workloads,
        nemeses,
        seed,
        out: a.out.clone().unwrap_or_else(|| target_dir().join("jepsen")),
        cairn_bin: a
            .cairn_bin
            .clone()
            .unwrap_or_else(|| target_dir().join("release").join("cairn")),
        clients: a.clients,
        op_timeout: Duration::from_millis(a.op_timeout_ms),
        ops_per_key: a.ops_per_key,
        live_keys: a.live_keys,
        lease_ttl: Duration::from_secs(a.lease_ttl),
        guards: GuardConfig {
            min_ok_ops_per_phase: a.min_ok_ops_per_phase,
            min_faults_per_kind: a.min_faults_per_kind,
        },
        check_timeout: Duration::from_secs(a.check_timeout),
        keep_data: a.keep_data,
        stale_reads: a.stale_reads,
        tuning: Tuning::default(),
        extra_config,
        server_env: a.server_env.clone(),
        server_log: a.server_log.clone(),
    };
    if !a.ci {
        return Ok(vec![base]);
    }
    Ok([1, 2]
        .into_iter()
        .map(|seed| RunConfig {
            nodes: 3,
            time: Duration::from_secs(60),
            seed,
            ..base.clone()
        })
        .collect())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check {
            history,
            timeout_secs,
        }) => check(&history, timeout_secs),
        None => run_all(&cli.run).await,
    }
}

async fn run_all(args: &RunArgs) -> ExitCode {
    let cfgs = match configs(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jepsen-like: {e}");
            return ExitCode::from(2);
        }
    };
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("jepsen-like: cannot watch SIGTERM: {e}");
            return ExitCode::from(2);
        }
    };
    let mut outcomes: Vec<RunOutcome> = Vec::new();
    for cfg in &cfgs {
        println!(
            "jepsen-like: {} nodes, {} s, seed {}, workloads {}, nemeses {}",
            cfg.nodes,
            cfg.time.as_secs(),
            cfg.seed,
            names(&cfg.workloads, |w| w.name()),
            names(&cfg.nemeses, |k| k.name())
        );
        // Dropping the run (Ctrl-C, SIGTERM) drops its cluster and firewall: every node it
        // started is killed by pid and its iptables chain removed.
        let res = tokio::select! {
            r = run::run(cfg) => r,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("jepsen-like: interrupted; stopped every node of this run and removed its iptables chain");
                return ExitCode::from(130);
            }
            _ = sigterm.recv() => {
                eprintln!("jepsen-like: terminated; stopped every node of this run and removed its iptables chain");
                return ExitCode::from(143);
            }
        };
        match res {
            Ok(o) => {
                println!("{}", o.dir.display());
                for v in &o.verdicts {
                    println!("{}: {}", v.name, v.line);
                }
                outcomes.push(o);
            }
            Err(e) => {
                eprintln!("jepsen-like: run failed to set up: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    let pass = if args.expect_invalid {
        outcomes.iter().all(RunOutcome::caught_a_bug)
    } else {
        outcomes.iter().all(RunOutcome::valid)
    };
    if cfgs.len() > 1 {
        println!(
            "{} of {} runs {}",
            outcomes
                .iter()
                .filter(|o| if args.expect_invalid {
                    o.caught_a_bug()
                } else {
                    o.valid()
                })
                .count(),
            outcomes.len(),
            if args.expect_invalid {
                "caught a bug"
            } else {
                "valid"
            }
        );
    }
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn names<T>(v: &[T], name: impl Fn(&T) -> &'static str) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.iter().map(name).collect::<Vec<_>>().join(",")
    }
}

/// Exit code: 0 valid, 1 invalid, 2 unknown, 3 unreadable or malformed history.
fn check(path: &Path, timeout: u64) -> ExitCode {
    let ops = match File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|f| history::read_jsonl(BufReader::new(f)).map_err(|e| e.to_string()))
        .and_then(|events| history::pair(&events).map_err(|e| e.to_string()))
    {
        Ok(ops) => ops,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(3);
        }
    };
    let report = checker::check_report(&ops, &Budget::with_timeout(Duration::from_secs(timeout)));
    match serde_json::to_string_pretty(&report) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("cannot serialize report: {e}");
            return ExitCode::from(3);
        }
    }
    eprintln!("{}", report.verdict);
    ExitCode::from(match report.verdict {
        Verdict::Valid => 0,
        Verdict::Invalid { .. } => 1,
        Verdict::Unknown { .. } => 2,
    })
}
