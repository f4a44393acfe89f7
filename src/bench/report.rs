//! report: the result of one run ([`BenchResult`], what `--json` writes as an array), the
//! fixed-width human table, and the side-by-side comparison of two result sets matched by
//! (workload, clients-or-rate) with ratios A/B for throughput and p99.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::driver::Measured;
use super::stats::LatencySummary;
use super::workload::Workload;

/// How a run drove its load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Load {
    /// Closed loop with this many clients.
    Closed { clients: usize },
    /// Fixed rate (open loop) of this many ops/s in total.
    Rate { rate: f64 },
}

impl Load {
    /// `16` for 16 clients, `500/s` for a rate of 500 ops/s: the matching key of compare.
    pub fn label(&self) -> String {
        match self {
            Load::Closed { clients } => clients.to_string(),
            Load::Rate { rate } => format!("{rate}/s"),
        }
    }
}

/// Latencies in milliseconds, as written to JSON.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencyMs {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl From<LatencySummary> for LatencyMs {
    fn from(s: LatencySummary) -> Self {
        LatencyMs {
            mean_ms: s.mean,
            p50_ms: s.p50,
            p90_ms: s.p90,
            p99_ms: s.p99,
            max_ms: s.max,
        }
    }
}

/// Fixed-rate extras: how well the schedule was kept.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateStats {
    /// Ops that started more than 1 ms after their intended time.
    pub late_starts: u64,
    /// Ops (ok and failed) per second actually completed in the measured window.
    pub achieved_rate: f64,
}

/// One (target, workload, clients-or-rate) result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub target: String,
    pub workload: Workload,
    #[serde(flatten)]
    pub load: Load,
    /// Size of the HTTP client pool.
    pub connections: usize,
    /// Number of endpoints requests were spread over.
    pub endpoints: usize,
    /// Start of the measured window, RFC 3339 UTC.
    pub start_time: String,
    /// Seconds from the start of the measured window until its last op answered.
    pub duration_s: f64,
    pub ops_ok: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Successful ops per second.
    pub throughput_ops_s: f64,
    #[serde(flatten)]
    pub latency: LatencyMs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_stats: Option<RateStats>,
}

/// Who ran what, for [`BenchResult::new`].
#[derive(Debug, Clone, Copy)]
pub struct RunInfo<'a> {
    pub target: &'a str,
    pub workload: Workload,
    pub load: Load,
    pub connections: usize,
    pub endpoints: usize,
}

impl BenchResult {
    /// The result of a run from what it measured.
    pub fn new(info: RunInfo<'_>, m: &Measured) -> BenchResult {
        let secs = m.elapsed.as_secs_f64().max(1e-9);
        let ok = m.rec.ok_count();
        let errors = m.rec.error_count();
        let rate_stats = matches!(info.load, Load::Rate { .. }).then(|| RateStats {
            late_starts: m.rec.late_count(),
            achieved_rate: (ok + errors) as f64 / secs,
        });
        BenchResult {
            target: info.target.to_string(),
            workload: info.workload,
            load: info.load,
            connections: info.connections,
            endpoints: info.endpoints,
            start_time: rfc3339(m.started),
            duration_s: secs,
            ops_ok: ok,
            errors,
            errors_by_kind: m.rec.errors().clone(),
            throughput_ops_s: ok as f64 / secs,
            latency: m.rec.summary().into(),
            rate_stats,
        }
    }
}

/// The header of the human table.
pub fn table_header() -> String {
    format!(
        "{:<6} {:<8} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
        "target",
        "workload",
        "clients",
        "ops/s",
        "mean ms",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors"
    )
}

/// One row of the human table.
pub fn table_row(r: &BenchResult) -> String {
    let l = &r.latency;
    let mut row = format!(
        "{:<6} {:<8} {:>8} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}  {}",
        r.target,
        r.workload.name(),
        r.load.label(),
        r.throughput_ops_s,
        l.mean_ms,
        l.p50_ms,
        l.p90_ms,
        l.p99_ms,
        l.max_ms,
        error_text(r)
    );
    if let Some(rs) = &r.rate_stats {
        let _ = write!(
            row,
            "  (achieved {:.1}/s, {} late starts)",
            rs.achieved_rate, rs.late_starts
        );
    }
    row
}

/// The whole human table.
pub fn table(results: &[BenchResult]) -> String {
    let mut s = table_header();
    for r in results {
        s.push('\n');
        s.push_str(&table_row(r));
    }
    s
}

fn error_text(r: &BenchResult) -> String {
    if r.errors == 0 {
        return "0".into();
    }
    let kinds: Vec<String> = r
        .errors_by_kind
        .iter()
        .map(|(k, n)| format!("{k}:{n}"))
        .collect();
    format!("{} ({})", r.errors, kinds.join(","))
}

/// Writes `results` to `path` as a pretty JSON array.
pub fn write_json(path: &Path, results: &[BenchResult]) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(results).context("cannot encode the results")?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a result set written by [`write_json`].
pub fn read_json(path: &Path) -> anyhow::Result<Vec<BenchResult>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench result file", path.display()))
}

/// One matched (workload, clients-or-rate) pair of compare.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareRow<'a> {
    pub workload: Workload,
    pub label: String,
    pub a: Option<&'a BenchResult>,
    pub b: Option<&'a BenchResult>,
}

impl CompareRow<'_> {
    /// Throughput of A divided by throughput of B.
    pub fn throughput_ratio(&self) -> Option<f64> {
        ratio(self.a?.throughput_ops_s, self.b?.throughput_ops_s)
    }

    /// p99 of A divided by p99 of B.
    pub fn p99_ratio(&self) -> Option<f64> {
        ratio(self.a?.latency.p99_ms, self.b?.latency.p99_ms)
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// Matches `a` and `b` by (workload, clients-or-rate): A's order first, then what only B has.
pub fn compare<'a>(a: &'a [BenchResult], b: &'a [BenchResult]) -> Vec<CompareRow<'a>> {
    let key = |r: &BenchResult| (r.workload, r.load.label());
    let find = |set: &'a [BenchResult], k: &(Workload, String)| set.iter().find(|r| key(r) == *k);
    let mut rows: Vec<CompareRow<'a>> = Vec::new();
    for r in a.iter().chain(b) {
        let k = key(r);
        if rows
            .iter()
            .any(|row| (row.workload, row.label.clone()) == k)
        {
            continue;
        }
        rows.push(CompareRow {
            a: find(a, &k),
            b: find(b, &k),
            workload: k.0,
            label: k.1,
        });
    }
    rows
}

/// For each (workload, load) in `results`, the run with the median throughput (the lower
/// median for an even count), in first-seen order: repeated rounds reduced to one real run.
pub fn median_runs(results: &[BenchResult]) -> Vec<BenchResult> {
    let key = |r: &BenchResult| (r.workload, r.load.label());
    let mut keys: Vec<(Workload, String)> = Vec::new();
    for r in results {
        if !keys.contains(&key(r)) {
            keys.push(key(r));
        }
    }
    keys.iter()
        .filter_map(|k| {
            let mut runs: Vec<&BenchResult> = results.iter().filter(|r| key(r) == *k).collect();
            runs.sort_by(|x, y| x.throughput_ops_s.total_cmp(&y.throughput_ops_s));
            runs.get((runs.len().saturating_sub(1)) / 2)
                .map(|r| (*r).clone())
        })
        .collect()
}

/// The side-by-side table of [`compare`]; columns are named after each set's target.
pub fn compare_table(rows: &[CompareRow<'_>]) -> String {
    let an = set_name(rows.iter().find_map(|r| r.a), "A");
    let bn = set_name(rows.iter().find_map(|r| r.b), "B");
    let mut s = format!(
        "{:<8} {:>8} {:>12} {:>12} {:>8} {:>10} {:>10} {:>8}",
        "workload",
        "clients",
        format!("{an} ops/s"),
        format!("{bn} ops/s"),
        "ratio",
        format!("{an} p99"),
        format!("{bn} p99"),
        "ratio"
    );
    for r in rows {
        let tput = |x: Option<&BenchResult>| num(x.map(|x| x.throughput_ops_s), 1);
        let p99 = |x: Option<&BenchResult>| num(x.map(|x| x.latency.p99_ms), 3);
        let _ = write!(
            s,
            "\n{:<8} {:>8} {:>12} {:>12} {:>8} {:>10} {:>10} {:>8}",
            r.workload.name(),
            r.label,
            tput(r.a),
            tput(r.b),
            num(r.throughput_ratio(), 2),
            p99(r.a),
            p99(r.b),
            num(r.p99_ratio(), 2),
        );
    }
    s.push_str(&format!(
        "\n\nratio = {an} / {bn}; throughput ratio > 1 and p99 ratio < 1 favour {an}. p99 in ms."
    ));
    s
}

fn set_name(any: Option<&BenchResult>, default: &str) -> String {
    any.map_or_else(|| default.to_string(), |r| r.target.clone())
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// `t` as RFC 3339 UTC with milliseconds, e.g. `2025-01-31T12:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::Recorder;
    use std::time::Duration;

    fn result(target: &str, workload: Workload, load: Load, tput: f64, p99: f64) -> BenchResult {
        BenchResult {
            target: target.into(),
            workload,
            load,
            connections: 8,
            endpoints: 3,
            start_time: "2025-01-01T00:00:00.000Z".into(),
            duration_s: 10.0,
            ops_ok: (tput * 10.0) as u64,
            errors: 0,
            errors_by_kind: BTreeMap::new(),
            throughput_ops_s: tput,
            latency: LatencyMs {
                p99_ms: p99,
                ..LatencyMs::default()
            },
            rate_stats: None,
        }
    }

    #[test]
    fn result_from_measurement() {
        let mut rec = Recorder::new();
        for _ in 0..100 {
            rec.ok(Duration::from_millis(2));
        }
        rec.error("status-5xx");
        rec.late_start();
        let m = Measured {
            rec,
            elapsed: Duration::from_secs(2),
            started: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        };
        let info = RunInfo {
            target: "etcd",
            workload: Workload::Get,
            load: Load::Rate { rate: 50.0 },
            connections: 8,
            endpoints: 3,
        };
        let r = BenchResult::new(info, &m);
        assert_eq!(r.ops_ok, 100);
        assert_eq!(r.errors, 1);
        assert!((r.throughput_ops_s - 50.0).abs() < 1e-9);
        assert!((r.latency.p50_ms - 2.0).abs() < 0.01);
        let rs = r.rate_stats.expect("rate stats");
        assert_eq!(rs.late_starts, 1);
        assert!((rs.achieved_rate - 50.5).abs() < 1e-9);
        assert_eq!(r.start_time, "2023-11-14T22:13:20.123Z");
        assert!(table_row(&r).contains("status-5xx:1"));
    }

    #[test]
    fn json_round_trip() {
        let mut with_rate = result(
            "etcd",
            Workload::Mixed,
            Load::Rate { rate: 500.0 },
            499.0,
            3.0,
        );
        with_rate.rate_stats = Some(RateStats {
            late_starts: 2,
            achieved_rate: 499.5,
        });
        with_rate.errors = 3;
        with_rate.errors_by_kind.insert("timeout".into(), 3);
        let set = vec![
            result(
                "etcd",
                Workload::Put,
                Load::Closed { clients: 16 },
                1000.0,
                5.0,
            ),
            with_rate,
        ];
        let dir = std::env::temp_dir().join(format!("bench-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("r.json");
        write_json(&path, &set).expect("write");
        assert_eq!(read_json(&path).expect("read"), set);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(v[0]["mode"], "closed");
        assert_eq!(v[0]["clients"], 16);
        assert_eq!(v[0]["p99_ms"], 5.0);
        assert_eq!(v[1]["mode"], "rate");
        assert_eq!(v[1]["rate"], 500.0);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn compare_matches_by_workload_and_level() {
        let c = vec![
            result(
                "cairn",
                Workload::Get,
                Load::Closed { clients: 1 },
                2000.0,
                1.0,
            ),
            result(
                "cairn",
                Workload::Get,
                Load::Closed { clients: 16 },
                8000.0,
                6.0,
            ),
            result(
                "cairn",
                Workload::Put,
                Load::Closed { clients: 16 },
                500.0,
                40.0,
            ),
        ];
        let e = vec![
            result(
                "etcd",
                Workload::Get,
                Load::Closed { clients: 16 },
                4000.0,
                3.0,
            ),
            result(
                "etcd",
                Workload::Get,
                Load::Closed { clients: 1 },
                1000.0,
                2.0,
            ),
            result(
                "etcd",
                Workload::Query,
                Load::Closed { clients: 1 },
                900.0,
                2.0,
            ),
        ];
        let rows = compare(&c, &e);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].label, "1");
        assert_eq!(rows[0].throughput_ratio(), Some(2.0));
        assert_eq!(rows[0].p99_ratio(), Some(0.5));
        assert_eq!(rows[1].throughput_ratio(), Some(2.0));
        assert_eq!(rows[1].p99_ratio(), Some(2.0));
        assert_eq!(rows[2].workload, Workload::Put);
        assert!(rows[2].b.is_none() && rows[2].throughput_ratio().is_none());
        assert_eq!(rows[3].workload, Workload::Query);
        assert!(rows[3].a.is_none());
        let t = compare_table(&rows);
        assert!(t.contains("cairn ops/s") && t.contains("etcd p99"), "{t}");
        assert!(t.lines().nth(1).is_some_and(|l| l.contains("2.00")), "{t}");
    }

    #[test]
    fn median_runs_pick_one_real_run_per_workload_and_load() {
        let c16 = Load::Closed { clients: 16 };
        let c64 = Load::Closed { clients: 64 };
        let runs = vec![
            result("cairn", Workload::Put, c16, 300.0, 9.0),
            result("cairn", Workload::Put, c64, 900.0, 30.0),
            result("cairn", Workload::Put, c16, 100.0, 7.0),
            result("cairn", Workload::Put, c16, 200.0, 8.0),
            result("cairn", Workload::Put, c64, 700.0, 40.0),
        ];
        let m = median_runs(&runs);
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].load, m[0].throughput_ops_s, m[0].latency.p99_ms),
            (c16, 200.0, 8.0)
        );
        // Two rounds: the lower median.
        assert_eq!((m[1].load, m[1].throughput_ops_s), (c64, 700.0));
        assert!(median_runs(&[]).is_empty());
    }

    #[test]
    fn zero_denominators_have_no_ratio() {
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(0.0, 2.0), Some(0.0));
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
