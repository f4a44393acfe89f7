//! stats: what one worker records while it runs — a latency histogram of the successful ops
//! (microseconds, 3 significant figures, up to 60 s), error counts by kind, and late starts —
//! and the summary ([`LatencySummary`]) a report is made of. Workers record into their own
//! [`Recorder`]; the driver merges them at the end, so the hot path takes no lock.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the histogram holds exactly, in microseconds; longer ones saturate here.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// Significant figures of the histogram.
const SIGFIG: u8 = 3;

/// Latencies, op counts and error counts of one worker or of a merged run.
#[derive(Debug, Clone)]
pub struct Recorder {
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    late: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Recorder {
        // Bounds 1 us ..= 60 s with 3 significant figures are always valid.
        let hist = Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGFIG)
            .expect("constant histogram bounds are valid");
        Recorder {
            hist,
            errors: BTreeMap::new(),
            late: 0,
        }
    }

    /// Records one successful op.
    pub fn ok(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    /// Records one failed op of `kind` (e.g. `status-5xx`, `timeout`).
    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_insert(0) += 1;
    }

    /// Records that an op started more than the lateness threshold after its intended time.
    pub fn late_start(&mut self) {
        self.late += 1;
    }

    /// Adds everything `other` recorded.
    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms have the same bounds, so adding cannot fail; saturate to be safe.
        if self.hist.add(&other.hist).is_err() {
            for v in other.hist.iter_recorded() {
                self.hist
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        for (k, n) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += n;
        }
        self.late += other.late;
    }

    /// Successful ops.
    pub fn ok_count(&self) -> u64 {
        self.hist.len()
    }

    /// Failed ops, all kinds.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Failed ops by kind.
    pub fn errors(&self) -> &BTreeMap<String, u64> {
        &self.errors
    }

    /// Ops that started late.
    pub fn late_count(&self) -> u64 {
        self.late
    }

    /// The latency summary of the successful ops (all zero when there were none).
    pub fn summary(&self) -> LatencySummary {
        LatencySummary::of(&self.hist)
    }
}

/// Latency statistics in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencySummary {
    /// Summarises a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b.abs() * 0.002 + 1e-9
    }

    #[test]
    fn percentiles_of_a_uniform_run() {
        let mut r = Recorder::new();
        for ms in 1..=1000u64 {
            r.ok(Duration::from_millis(ms));
        }
        let s = r.summary();
        assert_eq!(r.ok_count(), 1000);
        assert!(close(s.p50, 500.0), "{s:?}");
        assert!(close(s.p90, 900.0), "{s:?}");
        assert!(close(s.p99, 990.0), "{s:?}");
        assert!(close(s.max, 1000.0), "{s:?}");
        assert!(close(s.mean, 500.5), "{s:?}");
    }

    #[test]
    fn merge_adds_counts_errors_and_late_starts() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        a.ok(Duration::from_micros(100));
        b.ok(Duration::from_micros(300));
        a.error("timeout");
        b.error("timeout");
        b.error("status-5xx");
        b.late_start();
        a.merge(&b);
        assert_eq!(a.ok_count(), 2);
        assert_eq!(a.error_count(), 3);
        assert_eq!(a.errors()["timeout"], 2);
        assert_eq!(a.errors()["status-5xx"], 1);
        assert_eq!(a.late_count(), 1);
        assert!(close(a.summary().max, 0.3));
    }

    #[test]
    fn huge_and_tiny_latencies_saturate() {
        let mut r = Recorder::new();
        r.ok(Duration::from_secs(3600));
        r.ok(Duration::ZERO);
        assert_eq!(r.ok_count(), 2);
        assert!(r.summary().max >= 59_000.0);
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(Recorder::new().summary(), LatencySummary::default());
    }
}
