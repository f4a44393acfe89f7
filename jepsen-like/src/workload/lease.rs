//! The lease workload: each lease client registers one instance with a TTL, renews it with a
//! heartbeat every `interval`, and in between reads random lease instances (linearizable
//! `GET`, noting their health). Recorded in `lease.jsonl`.
//!
//! The property ([`check`]): a renewal (heartbeat or registration) that was acknowledged
//! moved the lease's deadline to at least its *invoke* time + TTL — the server renews at some
//! instant inside the call, on a clock that runs at the harness's rate (same machine,
//! CLOCK_MONOTONIC) — and a new leader grants every lease a fresh TTL. So a read that began
//! after an acknowledged renewal completed, and completed before that renewal's invoke +
//! TTL, must not see the instance `critical`. A leader change must not mass-expire leases,
//! and a renewal acknowledged by a deposed leader must not be lost: both show up here.
//! Nothing is claimed about how soon an unrenewed lease expires (that is liveness).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::{CallError, InstanceSpec, Precondition};
use crate::client::{ClientCtx, Outcome};
use crate::history::EventType;
use crate::recorder::Journal;
use crate::workload::VerdictClass;

/// The service of the leased instances.
pub const SERVICE: &str = "jepsen-lease";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseF {
    Register,
    Heartbeat,
    Read,
}

impl LeaseF {
    pub fn name(self) -> &'static str {
        match self {
            LeaseF::Register => "register",
            LeaseF::Heartbeat => "heartbeat",
            LeaseF::Read => "read",
        }
    }
}

/// One line of `lease.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEvent {
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub f: LeaseF,
    pub instance: String,
    /// What an `ok` read saw: `passing`, `critical`, or `absent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    pub time: u64,
    pub node: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Timing of the lease clients.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub ttl: Duration,
    pub heartbeat_every: Duration,
    /// Pause between reads.
    pub read_every: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            ttl: Duration::from_secs(3),
            heartbeat_every: Duration::from_millis(1000),
            read_every: Duration::from_millis(200),
        }
    }
}

/// Instances registered so far (the read targets), shared by the lease clients.
#[derive(Debug, Clone, Default)]
pub struct Registered(Arc<Mutex<Vec<String>>>);

impl Registered {
    fn add(&self, id: &str) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !v.iter().any(|x| x == id) {
            v.push(id.to_owned());
        }
    }
    fn pick(&self, rng: &mut StdRng) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .choose(rng)
            .cloned()
    }
}

/// An op's invoke, as recorded.
struct Invoked {
    f: LeaseF,
    instance: String,
    time: u64,
}

pub struct LeaseClient {
    instance: String,
    registered: bool,
    timing: LeaseTiming,
    next_heartbeat: tokio::time::Instant,
    rng: StdRng,
    all: Registered,
    history: Journal<LeaseEvent>,
}

impl LeaseClient {
    pub fn new(
        index: usize,
        timing: LeaseTiming,
        rng: StdRng,
        all: Registered,
        history: Journal<LeaseEvent>,
    ) -> Self {
        LeaseClient {
            instance: format!("l{index}"),
            registered: false,
            timing,
            next_heartbeat: tokio::time::Instant::now(),
            rng,
            all,
            history,
        }
    }

    fn record(
        &self,
        ctx: &ClientCtx,
        kind: EventType,
        f: LeaseF,
        instance: &str,
        health: Option<String>,
        error: Option<String>,
    ) -> u64 {
        let (process, node) = (ctx.process, ctx.node.id);
        let instance = instance.to_owned();
        self.history.record(|time| LeaseEvent {
            process,
            kind,
            f,
            instance,
            health,
            time,
            node,
            error,
        })
    }

    fn invoke(&self, ctx: &ClientCtx, f: LeaseF, instance: &str) -> Invoked {
        Invoked {
            f,
            instance: instance.to_owned(),
            time: self.record(ctx, EventType::Invoke, f, instance, None, None),
        }
    }

    fn finish(
        &self,
        ctx: &ClientCtx,
        inv: Invoked,
        outcome: Outcome,
        health: Option<String>,
        error: Option<String>,
    ) -> Outcome {
        let Invoked {
            f,
            instance,
            time: invoke,
        } = inv;
        let instance = instance.as_str();
        let kind = match outcome {
            Outcome::Ok => EventType::Ok,
            Outcome::Fail => EventType::Fail,
            Outcome::Info => EventType::Info,
        };
        let complete = self.record(ctx, kind, f, instance, health, error.clone());
        ctx.done("lease", f.name(), invoke, complete, outcome, error);
        outcome
    }

    /// One op: (re-)register if needed, else heartbeat when due, else a read.
    pub async fn step(&mut self, ctx: &ClientCtx, stop: &watch::Receiver<bool>) -> Outcome {
        let id = self.instance.clone();
        if !self.registered {
            let inv = self.invoke(ctx, LeaseF::Register, &id);
            let ttl = u32::try_from(self.timing.ttl.as_secs().max(1)).unwrap_or(u32::MAX);
            let spec = InstanceSpec::with_value(&id, Some(ttl));
            let res = ctx
                .api
                .put_instance(SERVICE, &id, &spec, Precondition::None)
                .await;
            let (outcome, error) = write_outcome(res.map(|_| ()));
            if outcome == Outcome::Ok {
                self.registered = true;
                self.all.add(&id);
                self.next_heartbeat = tokio::time::Instant::now() + self.timing.heartbeat_every;
            }
            return self.finish(ctx, inv, outcome, None, error);
        }
        if tokio::time::Instant::now() >= self.next_heartbeat {
            self.next_heartbeat = tokio::time::Instant::now() + self.timing.heartbeat_every;
            let inv = self.invoke(ctx, LeaseF::Heartbeat, &id);
            let res = ctx.api.heartbeat(SERVICE, &id).await;
            if let Err(CallError::Rejected { status: 404, .. }) = &res {
                // Gone (it should not be: critical instances stay listed for an hour);
                // register it again.
                self.registered = false;
            }
            let (outcome, error) = write_outcome(res);
            return self.finish(ctx, inv, outcome, None, error);
        }
        let Some(target) = self.all.pick(&mut self.rng) else {
            tokio::time::sleep(self.timing.read_every).await;
            return Outcome::Ok;
        };
        let inv = self.invoke(ctx, LeaseF::Read, &target);
        let outcome = match ctx.api.get_instance(SERVICE, &target, false).await {
            Ok(Some(inst)) => self.finish(ctx, inv, Outcome::Ok, Some(inst.health), None),
            Ok(None) => self.finish(ctx, inv, Outcome::Ok, Some("absent".into()), None),
            Err(e) => self.finish(ctx, inv, Outcome::Fail, None, Some(e.to_string())),
        };
        // Pace reads, but wake up for the next heartbeat or the end of the run.
        let wake = (tokio::time::Instant::now() + self.timing.read_every).min(self.next_heartbeat);
        let mut stop = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.changed() => {}
        }
        outcome
    }
}

fn write_outcome(res: Result<(), CallError>) -> (Outcome, Option<String>) {
    match res {
        Ok(()) => (Outcome::Ok, None),
        Err(e) if e.definitely_not_applied() => (Outcome::Fail, Some(e.to_string())),
        Err(e) => (Outcome::Info, Some(e.to_string())),
    }
}

/// A completed op of the lease history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseOp {
    pub process: u64,
    pub node: u64,
    pub f: LeaseF,
    pub instance: String,
    pub invoke: u64,
    pub complete: u64,
    pub outcome: Outcome,
    pub health: Option<String>,
}

/// Pairs invokes with completions; ops never completed are dropped (only `ok` ops matter).
pub fn pair(events: &[LeaseEvent]) -> Vec<LeaseOp> {
    let mut open: BTreeMap<u64, &LeaseEvent> = BTreeMap::new();
    let mut ops = Vec::new();
    for e in events {
        if e.kind == EventType::Invoke {
            open.insert(e.process, e);
            continue;
        }
        let Some(inv) = open.remove(&e.process) else {
            continue;
        };
        ops.push(LeaseOp {
            process: e.process,
            node: inv.node,
            f: inv.f,
            instance: inv.instance.clone(),
            invoke: inv.time,
            complete: e.time,
            outcome: match e.kind {
                EventType::Ok => Outcome::Ok,
                EventType::Fail => Outcome::Fail,
                _ => Outcome::Info,
            },
            health: e.health.clone(),
        });
    }
    ops
}

/// A read that saw an instance critical although an acknowledged renewal covered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseViolation {
    pub read: LeaseOp,
    /// The renewal whose TTL covered the whole read.
    pub renewal: LeaseOp,
    /// How long before the covered deadline the read completed.
    pub margin_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaseResult {
    pub violations: Vec<LeaseViolation>,
    pub renewals_ok: usize,
    pub reads_ok: usize,
    /// Reads that saw `critical` (allowed when no renewal covered them).
    pub critical_reads: usize,
}

impl LeaseResult {
    pub fn valid(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn verdict_line(&self) -> (VerdictClass, String) {
        if self.valid() {
            (
                VerdictClass::Valid,
                format!(
                    "valid ({} renewals, {} reads, {} saw critical, none inside a renewed TTL)",
                    self.renewals_ok, self.reads_ok, self.critical_reads
                ),
            )
        } else {
            (
                VerdictClass::Invalid,
                format!(
                    "invalid: {} reads saw an instance critical inside a renewed TTL",
                    self.violations.len()
                ),
            )
        }
    }

    /// Each violation for the summary: `text`, and `at` (from the renewal's invoke to the
    /// read's completion, ns).
    pub fn anomalies(&self) -> Vec<serde_json::Value> {
        let s = |t: u64| t as f64 / 1e9;
        self.violations
            .iter()
            .map(|v| {
                let text = format!(
                    "{} seen critical by p{} on n{} [{:.3} s, {:.3} s], {} ms before the TTL of the {} by p{} on n{} (invoked {:.3} s, acknowledged {:.3} s) ran out",
                    v.read.instance,
                    v.read.process,
                    v.read.node,
                    s(v.read.invoke),
                    s(v.read.complete),
                    v.margin_ms,
                    v.renewal.f.name(),
                    v.renewal.process,
                    v.renewal.node,
                    s(v.renewal.invoke),
                    s(v.renewal.complete)
                );
                serde_json::json!({
                    "workload": "lease", "kind": "critical-while-renewed", "text": text,
                    "at": [v.renewal.invoke, v.read.complete], "detail": v,
                })
            })
            .collect()
    }
}

/// Checks the lease property (module docs). `ttl` is the TTL every instance was registered
/// with.
pub fn check(events: &[LeaseEvent], ttl: Duration) -> LeaseResult {
    let ttl_ns = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
    let ops = pair(events);
    let mut renewals: BTreeMap<&str, Vec<&LeaseOp>> = BTreeMap::new();
    for o in ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok && o.f != LeaseF::Read)
    {
        renewals.entry(o.instance.as_str()).or_default().push(o);
    }
    let reads: Vec<&LeaseOp> = ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok && o.f == LeaseF::Read)
        .collect();
    let mut violations = Vec::new();
    let mut critical_reads = 0;
    for r in &reads {
        if r.health.as_deref() != Some("critical") {
            continue;
        }
        critical_reads += 1;
        // Of the renewals acknowledged before the read began, the one invoked last covers
        // the longest.
        let best = renewals
            .get(r.instance.as_str())
            .into_iter()
            .flatten()
            .filter(|w| w.complete < r.invoke)
            .max_by_key(|w| w.invoke);
        if let Some(w) = best {
            let deadline = w.invoke.saturating_add(ttl_ns);
            if r.complete < deadline {
                violations.push(LeaseViolation {
                    read: (*r).clone(),
                    renewal: (*w).clone(),
                    margin_ms: (deadline - r.complete) / 1_000_000,
                });
            }
        }
    }
    LeaseResult {
        violations,
        renewals_ok: renewals.values().map(Vec::len).sum(),
        reads_ok: reads.len(),
        critical_reads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn ev(p: u64, kind: EventType, f: LeaseF, health: Option<&str>, t: u64) -> LeaseEvent {
        LeaseEvent {
            process: p,
            kind,
            f,
            instance: "l0".into(),
            health: health.map(String::from),
            time: t,
            node: 1,
            error: None,
        }
    }

    #[test]
    fn critical_inside_a_renewed_ttl_is_a_violation_and_after_it_is_not() {
        use EventType::*;
        let ttl = Duration::from_secs(8);
        let events = vec![
            ev(1, Invoke, LeaseF::Register, None, 0),
            ev(1, Ok, LeaseF::Register, None, S),
            ev(1, Invoke, LeaseF::Heartbeat, None, 2 * S),
            ev(1, Ok, LeaseF::Heartbeat, None, 3 * S),
            // Covered until 2 s + 8 s = 10 s.
            ev(2, Invoke, LeaseF::Read, None, 4 * S),
            ev(2, Ok, LeaseF::Read, Some("critical"), 5 * S),
            // After the deadline: fine.
            ev(2, Invoke, LeaseF::Read, None, 10 * S),
            ev(2, Ok, LeaseF::Read, Some("critical"), 11 * S),
            // Concurrent with the registration: not covered.
            ev(3, Invoke, LeaseF::Read, None, S / 2),
            ev(3, Ok, LeaseF::Read, Some("critical"), S / 2 + 1),
        ];
        let r = check(&events, ttl);
        assert_eq!(r.critical_reads, 3);
        assert_eq!(r.violations.len(), 1);
        assert_eq!(r.violations[0].read.invoke, 4 * S);
        assert_eq!(r.violations[0].renewal.f, LeaseF::Heartbeat);
        assert_eq!(r.violations[0].margin_ms, 5_000);
        assert!(!r.valid());
    }

    #[test]
    fn unacknowledged_renewals_cover_nothing() {
        use EventType::*;
        let events = vec![
            ev(1, Invoke, LeaseF::Heartbeat, None, 0),
            ev(1, Info, LeaseF::Heartbeat, None, S),
            ev(2, Invoke, LeaseF::Read, None, 2 * S),
            ev(2, Ok, LeaseF::Read, Some("critical"), 3 * S),
        ];
        assert!(check(&events, Duration::from_secs(8)).valid());
    }
}
