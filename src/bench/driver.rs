//! driver: runs one workload level against a [`Target`] and returns what was measured.
//!
//! * Closed loop ([`closed_loop`]): `clients` tasks, each sending its next op as soon as the
//!   previous one answered. Latency is send-to-answer.
//! * Fixed rate ([`fixed_rate`]): an open-loop [`Schedule`] — op k is due at t0 + k/R — whose
//!   ops are started in order, each as its own task, at most `max_in_flight` at once.
//!   Latency is measured from the op's *intended* start, so a stalled server shows up in
//!   the percentiles of every op queued behind the stall instead of being hidden by the
//!   client slowing down (no coordinated omission). Ops that start more than
//!   [`LATE_THRESHOLD`] after their intended time are counted.
//!
//! Ops of the warmup are run but not recorded. Closed-loop clients record into their own
//! [`Recorder`]; fixed-rate ops into a few sharded ones; all are merged at the end.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::stats::Recorder;
use super::target::{execute, Target};
use super::workload::{KeySpace, OpPicker, Workload};

/// An op that starts later than this after its intended time counts as a late start.
pub const LATE_THRESHOLD: Duration = Duration::from_millis(1);

/// Closed loop: pause after a failed op, so a client facing errors (an election's 503s, a
/// refused connection) does not spin.
pub const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Warmup and measured time of one run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
}

/// What one run measured.
#[derive(Debug)]
pub struct Measured {
    /// All workers' records, merged.
    pub rec: Recorder,
    /// From the start of the measured window until the last measured op answered.
    pub elapsed: Duration,
    /// Wall-clock time the measured window started.
    pub started: SystemTime,
}

/// What every run needs: the target, the workload and the run's keys.
pub struct Job<T> {
    pub target: Arc<T>,
    pub workload: Workload,
    pub keys: Arc<KeySpace>,
}

impl<T> Clone for Job<T> {
    fn clone(&self) -> Self {
        Job {
            target: self.target.clone(),
            workload: self.workload,
            keys: self.keys.clone(),
        }
    }
}

impl<T: Target> Job<T> {
    fn picker(&self) -> OpPicker {
        OpPicker::new(self.workload, self.keys.clone())
    }
}

/// Runs `clients` closed-loop clients for `timing.warmup + timing.duration`.
pub async fn closed_loop<T: Target>(
    job: &Job<T>,
    clients: usize,
    timing: Timing,
) -> anyhow::Result<Measured> {
    let t0 = Instant::now();
    let measure_from = t0 + timing.warmup;
    let end = measure_from + timing.duration;
    let started = SystemTime::now() + timing.warmup;
    let workers = (0..clients.max(1))
        .map(|id| tokio::spawn(closed_worker(job.clone(), id, measure_from, end)))
        .collect();
    let rec = join_workers(workers).await?;
    Ok(Measured {
        rec,
        elapsed: measure_from.elapsed(),
        started,
    })
}

async fn closed_worker<T: Target>(
    job: Job<T>,
    id: usize,
    measure_from: Instant,
    end: Instant,
) -> Recorder {
    let mut picker = job.picker();
    let mut rec = Recorder::new();
    loop {
        let start = Instant::now();
        if start >= end {
            return rec;
        }
        let res = execute(&*job.target, id, picker.next_op()).await;
        let failed = res.is_err();
        if start >= measure_from {
            record(&mut rec, res, start.elapsed());
        }
        if failed {
            tokio::time::sleep(ERROR_BACKOFF).await;
        }
    }
}

/// The open-loop schedule: op `k` (0-based) is due at `t0 + k / rate`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    t0: Instant,
    rate: f64,
}

impl Schedule {
    /// A schedule of `rate` ops/s from `t0`; `rate` must be positive and finite.
    pub fn new(t0: Instant, rate: f64) -> Schedule {
        Schedule { t0, rate }
    }

    /// When op `k` should start.
    pub fn intended(&self, k: u64) -> Instant {
        // Whole nanoseconds, rounded: exact for any rate that divides 1e9 * k.
        self.t0 + Duration::from_nanos((k as f64 * 1e9 / self.rate).round() as u64)
    }

    /// The number of ops due in the first `span`: the first index due at or after it.
    pub fn ops_within(&self, span: Duration) -> u64 {
        (span.as_secs_f64() * self.rate).ceil() as u64
    }
}

/// A fixed-rate run's shared state: its schedule, the in-flight limit and the recorders
/// its op tasks write into (sharded so concurrent ops rarely wait on one lock).
struct RateRun<T> {
    job: Job<T>,
    schedule: Schedule,
    /// The first op of the measured window.
    first_measured: u64,
    /// One past the last op.
    total: u64,
    in_flight: Arc<Semaphore>,
    shards: Vec<Mutex<Recorder>>,
}

impl<T> RateRun<T> {
    fn shard(&self, k: u64) -> MutexGuard<'_, Recorder> {
        let i = usize::try_from(k).unwrap_or(0) % self.shards.len();
        // A poisoned shard only means another op task panicked; its counts are still good.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn merged(&self) -> Recorder {
        let mut all = Recorder::new();
        for i in 0..self.shards.len() {
            all.merge(&self.shard(i as u64));
        }
        all
    }
}

/// Runs `rate` ops/s for `timing.warmup + timing.duration` with at most `max_in_flight`
/// ops in flight.
///
/// A dispatcher on a blocking thread sleeps with the OS timer (tens of microseconds of
/// error, where tokio's timer wheel rounds every deadline up to the next millisecond and
/// would add 1-2 ms to every op) until op k is due, waits for an in-flight slot, and
/// spawns the op as a task. Ops are therefore taken strictly in order; one that cannot get
/// a slot in time starts late, and is charged from its intended time all the same.
pub async fn fixed_rate<T: Target>(
    job: &Job<T>,
    rate: f64,
    max_in_flight: usize,
    timing: Timing,
) -> anyhow::Result<Measured> {
    anyhow::ensure!(
        rate.is_finite() && rate > 0.0,
        "--rate must be a positive number of ops/s, not {rate}"
    );
    let permits = u32::try_from(max_in_flight.clamp(1, Semaphore::MAX_PERMITS))
        .context("--max-in-flight is too large")?;
    let schedule = Schedule::new(Instant::now(), rate);
    let run = Arc::new(RateRun {
        job: job.clone(),
        schedule,
        first_measured: schedule.ops_within(timing.warmup),
        total: schedule.ops_within(timing.warmup + timing.duration),
        in_flight: Arc::new(Semaphore::new(permits as usize)),
        shards: (0..RECORDER_SHARDS)
            .map(|_| Mutex::new(Recorder::new()))
            .collect(),
    });
    let measure_from = schedule.intended(run.first_measured);
    let started = SystemTime::now() + timing.warmup;
    let handle = tokio::runtime::Handle::current();
    let dispatcher = run.clone();
    tokio::task::spawn_blocking(move || dispatch(&dispatcher, &handle))
        .await
        .context("the rate dispatcher panicked")??;
    // Every op holds a permit until it is recorded: holding them all means all are done.
    let _all = run
        .in_flight
        .acquire_many(permits)
        .await
        .context("the in-flight limiter closed")?;
    Ok(Measured {
        rec: run.merged(),
        elapsed: measure_from.elapsed(),
        started,
    })
}

/// Recorder shards of a fixed-rate run.
const RECORDER_SHARDS: usize = 16;

/// The dispatcher loop of [`fixed_rate`]; runs on a blocking thread.
fn dispatch<T: Target>(
    run: &Arc<RateRun<T>>,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let mut picker = run.job.picker();
    for k in 0..run.total {
        let intended = run.schedule.intended(k);
        if let Some(wait) = intended.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let permit = match run.in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => handle
                .block_on(run.in_flight.clone().acquire_owned())
                .context("the in-flight limiter closed")?,
        };
        let op = picker.next_op();
        let run = run.clone();
        handle.spawn(async move {
            let late = intended.elapsed() > LATE_THRESHOLD;
            // The op index doubles as the logical client: ops go round-robin over the pool.
            let client = usize::try_from(k).unwrap_or(0);
            let res = execute(&*run.job.target, client, op).await;
            let latency = intended.elapsed();
            if k >= run.first_measured {
                let mut rec = run.shard(k);
                if late {
                    rec.late_start();
                }
                record(&mut rec, res, latency);
            }
            drop(permit);
        });
    }
    Ok(())
}

fn record(rec: &mut Recorder, res: Result<(), super::http::OpError>, latency: Duration) {
    match res {
        Ok(()) => rec.ok(latency),
        Err(e) => rec.error(&e.kind()),
    }
}

async fn join_workers(workers: Vec<JoinHandle<Recorder>>) -> anyhow::Result<Recorder> {
    let mut all = Recorder::new();
    for w in futures::future::join_all(workers).await {
        all.merge(&w.context("a benchmark worker panicked")?);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::super::cairn::CairnTarget;
    use super::super::http::HttpPool;
    use super::super::testserver::StallServer;
    use super::*;

    #[test]
    fn schedule_intended_times() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 200.0);
        assert_eq!(s.intended(0), t0);
        assert_eq!(s.intended(1), t0 + Duration::from_millis(5));
        assert_eq!(s.intended(200), t0 + Duration::from_secs(1));
        assert_eq!(s.intended(1001), t0 + Duration::from_micros(5_005_000));
        assert_eq!(s.ops_within(Duration::from_secs(2)), 400);
        assert_eq!(s.ops_within(Duration::from_millis(2)), 1);
        assert_eq!(s.ops_within(Duration::ZERO), 0);
    }

    const STALL: Duration = Duration::from_millis(500);

    /// A get job against a fresh server that stalls every request for 500 ms once its
    /// 100th request arrives.
    async fn stalled_job() -> (Job<CairnTarget>, StallServer) {
        let server = StallServer::start(100, STALL).await.expect("test server");
        let pool = HttpPool::new(&[server.url()], None, 4, Duration::from_secs(5)).expect("pool");
        let job = Job {
            target: Arc::new(CairnTarget::new(pool, "t")),
            workload: Workload::Get,
            keys: Arc::new(KeySpace::new(10)),
        };
        (job, server)
    }

    const TIMING: Timing = Timing {
        warmup: Duration::ZERO,
        duration: Duration::from_secs(2),
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fixed_rate_charges_the_stall_to_every_queued_op() {
        let (job, server) = stalled_job().await;
        let m = fixed_rate(&job, 200.0, 1024, TIMING).await.expect("run");
        assert!(server.stalled(), "the stall never happened");
        let s = m.rec.summary();
        assert_eq!(m.rec.error_count(), 0, "{:?}", m.rec.errors());
        assert_eq!(m.rec.ok_count(), 400);
        // ~100 of 400 ops were due during the stall: their latencies spread over 0..500 ms.
        assert!(s.p99 >= 400.0, "p99 {} ms hides the stall", s.p99);
        assert!(s.p90 >= 150.0, "p90 {} ms hides the stall", s.p90);
        assert!(s.max >= 480.0, "{s:?}");
        // (How many started late depends on the machine's load, so it is not asserted.)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_hides_the_stall_in_its_percentiles() {
        let (job, server) = stalled_job().await;
        let m = closed_loop(&job, 1, TIMING).await.expect("run");
        assert!(server.stalled(), "the stall never happened");
        let s = m.rec.summary();
        assert_eq!(m.rec.error_count(), 0, "{:?}", m.rec.errors());
        // The one client waited out the stall as one slow op; the rest were fast.
        // With at least 100 ops, one slow op is above the 99th percentile. The bound is loose
        // so a loaded machine does not fail it; the stall alone would be 500 ms.
        assert!(s.max >= 480.0, "{s:?}");
        assert!(m.rec.ok_count() >= 100, "{} ops", m.rec.ok_count());
        assert!(s.p99 < 250.0, "p99 {} ms shows the stall", s.p99);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn too_few_workers_start_late_and_still_count_from_the_schedule() {
        let (job, server) = stalled_job().await;
        let m = fixed_rate(&job, 200.0, 4, TIMING).await.expect("run");
        assert!(server.stalled());
        assert!(
            m.rec.late_count() >= 50,
            "{} late starts",
            m.rec.late_count()
        );
        assert!(m.rec.summary().p99 >= 400.0, "{:?}", m.rec.summary());
    }

    #[tokio::test]
    async fn warmup_ops_are_not_recorded() {
        let server = StallServer::start(u64::MAX, STALL).await.expect("server");
        let pool = HttpPool::new(&[server.url()], None, 1, Duration::from_secs(5)).expect("pool");
        let job = Job {
            target: Arc::new(CairnTarget::new(pool, "t")),
            workload: Workload::Get,
            keys: Arc::new(KeySpace::new(10)),
        };
        let timing = Timing {
            warmup: Duration::from_millis(500),
            duration: Duration::from_millis(500),
        };
        let m = fixed_rate(&job, 100.0, 16, timing).await.expect("run");
        assert_eq!(m.rec.ok_count(), 50);
        assert!(server.requests() >= 100);
        assert!(m.elapsed >= Duration::from_millis(490), "{:?}", m.elapsed);
    }
}
