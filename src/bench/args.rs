//! args: the command line of `bench` (clap derive structs) and the small parsers it needs:
//! durations like `10s` / `500ms` and comma-separated lists.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use super::workload::Workload;

/// `bench run ...` and `bench compare A.json B.json`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Runs workloads against one target and prints (and optionally saves) the results.
    Run(Box<RunArgs>),
    /// Prints two saved result sets side by side, with ratios A/B for throughput and p99.
    Compare(CompareArgs),
    /// Writes new keys until one is acknowledged; prints when (Unix ns). For failover timing.
    FirstWrite(FirstWriteArgs),
}

/// Options of `bench first-write`.
#[derive(Debug, Clone, Args)]
pub struct FirstWriteArgs {
    #[arg(long, value_enum)]
    pub target: TargetKind,
    /// Comma-separated base URLs of the nodes to write through.
    #[arg(long, value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    #[arg(long)]
    pub ca: PathBuf,
    #[arg(long)]
    pub cert: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
    /// Give up (exit 1) if no write is acknowledged within this.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub within: Duration,
    /// Namespace of the keys written (default: random).
    #[arg(long)]
    pub key_prefix: Option<String>,
}

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    /// cairn's REST API (`/v1/services/...`).
    Cairn,
    /// etcd v3 through its JSON gRPC gateway (`/v3/kv/...`).
    Etcd,
}

impl TargetKind {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Cairn => "cairn",
            TargetKind::Etcd => "etcd",
        }
    }
}

/// Options of `bench run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The system under test.
    #[arg(long, value_enum)]
    pub target: TargetKind,
    /// Comma-separated base URLs of every node, e.g. https://127.0.0.11:7400,https://127.0.0.12:7400.
    #[arg(long, env = "BENCH_ENDPOINTS", value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    /// PEM file with the CA certificate(s) that sign the servers' certificates.
    #[arg(long, env = "BENCH_CA")]
    pub ca: PathBuf,
    /// PEM file with the client certificate chain (mTLS).
    #[arg(long, env = "BENCH_CERT")]
    pub cert: PathBuf,
    /// PEM file with the client's private key.
    #[arg(long, env = "BENCH_KEY")]
    pub key: PathBuf,
    /// Comma-separated workloads, run in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "put,get,query,mixed"
    )]
    pub workload: Vec<Workload>,
    /// Closed loop: comma-separated numbers of concurrent clients, one run per level.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub clients: Vec<usize>,
    /// Fixed rate (open loop): comma-separated total ops/s, one run per rate. Replaces --clients.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Measured time of each run (e.g. 10s, 500ms, 1m).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Keys written before the read workloads (get, query, mixed); not measured.
    #[arg(long, default_value_t = 1000)]
    pub preload: u64,
    /// Size of the fixed pool of HTTP clients; logical client i uses pool[i % C].
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Fixed rate: most operations in flight at once (the worker pool).
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Timeout of one request.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Offer only HTTP/1.1 in ALPN (default: h2 and http/1.1, the server picks).
    #[arg(long)]
    pub http1: bool,
    /// Namespace of this run's keys (default: random), so repeated runs never collide.
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Also write every result to this file as a JSON array.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Options of `bench compare`. Each side may name several result files (repeated rounds,
/// comma-separated); for every workload and load the run with the median throughput stands
/// for its side.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Results of the first target (the numerator of the ratios), e.g. cairn-1.json,cairn-2.json.
    #[arg(value_delimiter = ',', num_args = 1, required = true)]
    pub a: Vec<PathBuf>,
    /// Results of the second target (the denominator), e.g. etcd-1.json,etcd-2.json.
    #[arg(value_delimiter = ',', num_args = 1, required = true)]
    pub b: Vec<PathBuf>,
}

/// Parses `10s`, `500ms`, `2m`, `1.5s`, or plain seconds (`3`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 10s, 500ms or 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" => n * 60.0,
        other => return Err(format!("unknown unit `{other}` in `{s}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: BenchCommand,
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn compare_takes_a_list_of_files_per_side() {
        let cli = Cli::try_parse_from(["bench", "compare", "a1.json,a2.json", "b1.json"])
            .expect("valid command line");
        let BenchCommand::Compare(c) = cli.cmd else {
            panic!("expected compare")
        };
        assert_eq!(c.a, [PathBuf::from("a1.json"), PathBuf::from("a2.json")]);
        assert_eq!(c.b, [PathBuf::from("b1.json")]);
    }

    #[test]
    fn parses_run_lists() {
        let cli = Cli::try_parse_from([
            "bench",
            "run",
            "--target",
            "etcd",
            "--endpoints",
            "https://a:1,https://b:2",
            "--ca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--workload",
            "get,mixed",
            "--clients",
            "1,16",
            "--duration",
            "500ms",
        ])
        .expect("valid command line");
        let BenchCommand::Run(r) = cli.cmd else {
            panic!("expected run")
        };
        assert_eq!(r.target, TargetKind::Etcd);
        assert_eq!(r.endpoints.len(), 2);
        assert_eq!(r.workload, vec![Workload::Get, Workload::Mixed]);
        assert_eq!(r.clients, vec![1, 16]);
        assert_eq!(r.duration, Duration::from_millis(500));
        assert_eq!(r.warmup, Duration::from_secs(2));
        assert!(r.rate.is_empty());
    }
}
