//! The nemesis: a seeded random fault plan (pure, deterministic per seed), and its execution
//! against the [`Cluster`] — kill -9 + restart, SIGSTOP/SIGCONT, iptables partitions,
//! remove-wipe-re-add membership changes, delay and loss on the peer links (a userspace
//! proxy), wall-clock bumps (libfaketime) — with every fault's start and stop recorded on the
//! run's clock (`nemesis.jsonl`). Knows nothing of clients or histories.
//!
//! Faults run one at a time: apply, hold, heal, quiet gap, next. Targets that depend on the
//! cluster's state ("the leader") are resolved when the fault is applied; everything random
//! is drawn when planning, so a seed names the schedule.

pub mod clock;
pub mod partition;
pub mod proxy;

use std::fmt;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::api::{CallError, NewMember};
use crate::cluster::{Cluster, UnexpectedExit};
use crate::recorder::{Clock, Journal};
use clock::Clocks;
use partition::{Firewall, Grudge};
use proxy::{LinkFault, Proxy};

/// The kinds of fault, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NemesisKind {
    Kill,
    Pause,
    Partition,
    Membership,
    /// Delay or loss on peer links (through the proxy).
    Net,
    /// A bumped wall clock (libfaketime).
    Clock,
}

impl NemesisKind {
    pub const ALL: [NemesisKind; 6] = [
        NemesisKind::Kill,
        NemesisKind::Pause,
        NemesisKind::Partition,
        NemesisKind::Membership,
        NemesisKind::Net,
        NemesisKind::Clock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NemesisKind::Kill => "kill",
            NemesisKind::Pause => "pause",
            NemesisKind::Partition => "partition",
            NemesisKind::Membership => "membership",
            NemesisKind::Net => "net",
            NemesisKind::Clock => "clock",
        }
    }

    pub fn parse(s: &str) -> Option<NemesisKind> {
        NemesisKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for NemesisKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which nodes a process fault hits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Nodes(Vec<u64>),
    /// Whoever leads when the fault starts.
    Leader,
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Leader => "the leader".into(),
            Target::Nodes(v) => v
                .iter()
                .map(|i| format!("n{i}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
pub enum Fault {
    /// kill -9; restarted at heal.
    Kill { target: Target },
    /// SIGSTOP; SIGCONT at heal.
    Pause { target: Target },
    /// iptables DROP between node addresses; flushed at heal.
    Partition { grudge: Grudge },
    /// Remove the node from the cluster, stop it, wipe its data; at heal start it empty and
    /// add it back (it joins as a learner and is promoted).
    Membership { target: Target },
    /// Degrade every peer link touching `target` (all links for [`NetTarget::All`]).
    Net { target: NetTarget, link: LinkFault },
    /// Move the targets' wall clocks by `offset_s`; back to real time at heal.
    Clock { target: Target, offset_s: i64 },
}

/// Which links a net fault degrades.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetTarget {
    All,
    /// Every link to and from these nodes (or the leader).
    Around(Target),
}

impl NetTarget {
    fn describe(&self) -> String {
        match self {
            NetTarget::All => "every peer link".into(),
            NetTarget::Around(t) => format!("the peer links of {}", t.describe()),
        }
    }
}

/// The directed links among `ids` that touch one of `nodes`.
fn links_around(ids: &[u64], nodes: &[u64]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &a in ids {
        for &b in ids {
            if a != b && (nodes.contains(&a) || nodes.contains(&b)) {
                out.push((a, b));
            }
        }
    }
    out
}

impl Fault {
    pub fn kind(&self) -> NemesisKind {
        match self {
            Fault::Kill { .. } => NemesisKind::Kill,
            Fault::Pause { .. } => NemesisKind::Pause,
            Fault::Partition { .. } => NemesisKind::Partition,
            Fault::Membership { .. } => NemesisKind::Membership,
            Fault::Net { .. } => NemesisKind::Net,
            Fault::Clock { .. } => NemesisKind::Clock,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Fault::Kill { target } => format!("kill -9 {}", target.describe()),
            Fault::Pause { target } => format!("pause {}", target.describe()),
            Fault::Partition { grudge } => grudge.describe(),
            Fault::Membership { target } => {
                format!("remove, wipe and re-add {}", target.describe())
            }
            Fault::Net { target, link } => {
                let mut what = Vec::new();
                if link.delay_ms > 0 || link.jitter_ms > 0 {
                    what.push(format!("delay {}±{} ms", link.delay_ms, link.jitter_ms));
                }
                if link.loss_pct > 0 {
                    what.push(format!("loss {}%", link.loss_pct));
                }
                format!("{} on {}", what.join(", "), target.describe())
            }
            Fault::Clock { target, offset_s } => {
                format!("bump the clock of {} by {offset_s:+} s", target.describe())
            }
        }
    }
}

/// One fault of the plan. Offsets are from the run's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedFault {
    pub start_ms: u64,
    pub hold_ms: u64,
    pub fault: Fault,
}

/// Timing of the schedule.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// Length of the client phase.
    pub run: Duration,
    /// No fault before this.
    pub warmup: Duration,
    /// No fault in the last stretch: the cluster must recover and serve again.
    pub recovery: Duration,
    /// How long a fault stays in place (uniform in the range).
    pub hold: (Duration, Duration),
    /// Quiet time between a heal and the next fault (uniform in the range).
    pub gap: (Duration, Duration),
}

impl PlanConfig {
    pub fn for_run(run: Duration) -> PlanConfig {
        PlanConfig {
            run,
            warmup: Duration::from_secs(5),
            recovery: Duration::from_secs(10),
            hold: (Duration::from_secs(3), Duration::from_secs(7)),
            gap: (Duration::from_secs(2), Duration::from_secs(5)),
        }
    }
}

/// Extra time a membership change needs beyond its hold: restart, catch-up, promotion.
const MEMBERSHIP_EXTRA: Duration = Duration::from_secs(6);

/// Keeps plans of different seeds apart from the clients' random streams of the same seed.
const PLAN_SALT: u64 = 0x6e65_6d65_7369_7321;

fn between(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    let (lo, hi) = (
        lo.as_millis() as u64,
        hi.as_millis().max(lo.as_millis()) as u64,
    );
    Duration::from_millis(rng.random_range(lo..=hi))
}

fn one(rng: &mut StdRng, nodes: &[u64]) -> u64 {
    *nodes.choose(rng).expect("a cluster has nodes")
}

fn process_target(rng: &mut StdRng, nodes: &[u64]) -> Target {
    // For 3 nodes a minority is one node; for 5 it is two.
    let minority = (nodes.len() - 1) / 2;
    match rng.random_range(0..3) {
        0 => Target::Leader,
        1 if minority > 1 => {
            let mut v: Vec<u64> = nodes.choose_multiple(rng, minority).copied().collect();
            v.sort_unstable();
            Target::Nodes(v)
        }
        _ => Target::Nodes(vec![one(rng, nodes)]),
    }
}

fn grudge(rng: &mut StdRng, nodes: &[u64]) -> Grudge {
    let choices = if nodes.len() >= 5 { 5 } else { 2 };
    match rng.random_range(0..choices) {
        0 => Grudge::IsolateLeader,
        1 => Grudge::Isolate {
            node: one(rng, nodes),
        },
        2 => {
            let mut minority: Vec<u64> = nodes
                .choose_multiple(rng, (nodes.len() - 1) / 2)
                .copied()
                .collect();
            minority.sort_unstable();
            Grudge::Split { minority }
        }
        3 => {
            let mut order = nodes.to_vec();
            order.shuffle(rng);
            Grudge::MajoritiesRing { order }
        }
        _ => {
            let mut order = nodes.to_vec();
            order.shuffle(rng);
            Grudge::Bridge { order }
        }
    }
}

/// A net fault: a slow or lossy network everywhere, or one slow or lossy node.
fn net_fault(rng: &mut StdRng, nodes: &[u64]) -> Fault {
    let around = |rng: &mut StdRng| {
        NetTarget::Around(if rng.random_bool(0.5) {
            Target::Leader
        } else {
            Target::Nodes(vec![one(rng, nodes)])
        })
    };
    let (target, link) = match rng.random_range(0..4) {
        0 => (
            NetTarget::All,
            LinkFault {
                delay_ms: rng.random_range(20..=100),
                jitter_ms: rng.random_range(0..=50),
                loss_pct: 0,
            },
        ),
        1 => (
            around(rng),
            LinkFault {
                delay_ms: rng.random_range(200..=800),
                jitter_ms: rng.random_range(0..=200),
                loss_pct: 0,
            },
        ),
        2 => (
            NetTarget::All,
            LinkFault {
                loss_pct: rng.random_range(5..=20),
                ..LinkFault::default()
            },
        ),
        _ => (
            around(rng),
            LinkFault {
                delay_ms: 0,
                jitter_ms: 20,
                loss_pct: rng.random_range(20..=50),
            },
        ),
    };
    Fault::Net { target, link }
}

/// The schedule for `seed`: faults of the given kinds, cycling through them in a shuffled
/// order (every kind appears once before any appears again), each with a random variant,
/// hold and gap, all within `[warmup, run - recovery]`. When the window is too short for one
/// fault of every kind, holds and gaps are shortened (down to a third) until it fits. Pure:
/// same inputs, same plan.
pub fn plan(
    seed: u64,
    kinds: &[NemesisKind],
    nodes: &[u64],
    cfg: &PlanConfig,
) -> Vec<PlannedFault> {
    let mut kinds = kinds.to_vec();
    kinds.sort_unstable();
    kinds.dedup();
    let scale = |(a, b): (Duration, Duration), f: f64| (a.mul_f64(f), b.mul_f64(f));
    let mut best = Vec::new();
    for f in [1.0, 0.8, 0.6, 0.45, 0.33] {
        let scaled = PlanConfig {
            hold: scale(cfg.hold, f),
            gap: scale(cfg.gap, f),
            ..cfg.clone()
        };
        let p = plan_once(seed, &kinds, nodes, &scaled);
        let covered = kinds.iter().all(|k| p.iter().any(|x| x.fault.kind() == *k));
        if covered {
            return p;
        }
        if p.len() > best.len() || best.is_empty() {
            best = p;
        }
    }
    best
}

fn plan_once(
    seed: u64,
    kinds: &[NemesisKind],
    nodes: &[u64],
    cfg: &PlanConfig,
) -> Vec<PlannedFault> {
    let mut rng = StdRng::seed_from_u64(seed ^ PLAN_SALT);
    let kinds = kinds.to_vec();
    let mut out = Vec::new();
    if kinds.is_empty() || nodes.is_empty() {
        return out;
    }
    let end = cfg.run.saturating_sub(cfg.recovery);
    let mut t = cfg.warmup;
    let mut bag: Vec<NemesisKind> = Vec::new();
    loop {
        if bag.is_empty() {
            bag = kinds.clone();
            bag.shuffle(&mut rng);
        }
        let kind = bag.pop().expect("refilled above");
        let hold = between(&mut rng, cfg.hold);
        let extra = if kind == NemesisKind::Membership {
            MEMBERSHIP_EXTRA
        } else {
            Duration::ZERO
        };
        if t + hold + extra > end {
            break;
        }
        let fault = match kind {
            NemesisKind::Kill => Fault::Kill {
                target: process_target(&mut rng, nodes),
            },
            NemesisKind::Pause => Fault::Pause {
                target: process_target(&mut rng, nodes),
            },
            NemesisKind::Partition => Fault::Partition {
                grudge: grudge(&mut rng, nodes),
            },
            NemesisKind::Membership => Fault::Membership {
                target: if rng.random_bool(0.3) {
                    Target::Leader
                } else {
                    Target::Nodes(vec![one(&mut rng, nodes)])
                },
            },
            NemesisKind::Net => net_fault(&mut rng, nodes),
            NemesisKind::Clock => {
                let magnitude: i64 = rng.random_range(5..=600);
                Fault::Clock {
                    target: process_target(&mut rng, nodes),
                    offset_s: if rng.random_bool(0.5) {
                        magnitude
                    } else {
                        -magnitude
                    },
                }
            }
        };
        out.push(PlannedFault {
            start_ms: t.as_millis() as u64,
            hold_ms: hold.as_millis() as u64,
            fault,
        });
        t += hold + extra + between(&mut rng, cfg.gap);
    }
    out
}

/// One line of `nemesis.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEvent {
    pub time: u64,
    /// `start`, `stop`, `error` (the fault could not be applied or healed) or `crash` (a node
    /// exited on its own).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The fault's position in the plan (`null` for a crash).
    pub id: Option<usize>,
    pub fault: Option<NemesisKind>,
    pub detail: String,
    pub nodes: Vec<u64>,
}

/// What became of one planned fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultOutcome {
    pub id: usize,
    pub kind: NemesisKind,
    pub detail: String,
    pub nodes: Vec<u64>,
    /// When it was in place (ns on the run clock); `None` if it never was.
    pub start: Option<u64>,
    pub stop: Option<u64>,
    pub injected: bool,
    pub error: Option<String>,
}

/// What a fault did, so heal can undo exactly that.
enum Active {
    Killed(Vec<u64>),
    Paused(Vec<u64>),
    Cut,
    Removed(u64),
    Degraded,
    Bumped(Vec<u64>),
}

/// How long a membership change (either direction) is retried.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a plan against the cluster.
pub struct Nemesis<'a> {
    cluster: &'a mut Cluster,
    firewall: Option<Firewall>,
    proxy: Option<Proxy>,
    clocks: Option<Clocks>,
    timeline: Journal<TimelineEvent>,
    clock: Clock,
    rng: StdRng,
    crashes: Vec<UnexpectedExit>,
}

impl<'a> Nemesis<'a> {
    pub fn new(
        cluster: &'a mut Cluster,
        firewall: Option<Firewall>,
        timeline: Journal<TimelineEvent>,
        clock: Clock,
        seed: u64,
    ) -> Nemesis<'a> {
        Nemesis {
            cluster,
            firewall,
            proxy: None,
            clocks: None,
            timeline,
            clock,
            rng: StdRng::seed_from_u64(seed ^ PLAN_SALT ^ 1),
            crashes: Vec::new(),
        }
    }

    /// Net faults go through these proxies.
    pub fn with_proxy(mut self, proxy: Option<Proxy>) -> Self {
        self.proxy = proxy;
        self
    }

    /// Clock faults rewrite these offset files.
    pub fn with_clocks(mut self, clocks: Option<Clocks>) -> Self {
        self.clocks = clocks;
        self
    }

    /// Takes the proxies back (they must outlive the nemesis until the cluster stops).
    pub fn take_proxy(&mut self) -> Option<Proxy> {
        self.proxy.take()
    }

    pub fn cluster(&self) -> &Cluster {
        self.cluster
    }

    /// Nodes that exited on their own so far.
    pub fn crashes(&self) -> &[UnexpectedExit] {
        &self.crashes
    }

    /// Takes the firewall back (to tear it down explicitly at the end).
    pub fn take_firewall(&mut self) -> Option<Firewall> {
        self.firewall.take()
    }

    fn note(
        &self,
        kind: &'static str,
        id: Option<usize>,
        fault: Option<NemesisKind>,
        detail: String,
        nodes: Vec<u64>,
    ) -> u64 {
        self.timeline.record(|time| TimelineEvent {
            time,
            kind,
            id,
            fault,
            detail,
            nodes,
        })
    }

    /// Notices nodes that died on their own and starts them again (a crash is recorded and
    /// judged later; the run goes on so the histories stay meaningful).
    fn watch_crashes(&mut self) {
        for exit in self.cluster.reap_exits() {
            let tail = self.cluster.log_tail(exit.node, 5);
            eprintln!(
                "node {} exited on its own ({}); log ends with:\n{tail}",
                exit.node, exit.status
            );
            self.note(
                "crash",
                None,
                None,
                format!("exited: {}", exit.status),
                vec![exit.node],
            );
            self.crashes.push(exit.clone());
            if let Err(e) = self.cluster.start(exit.node) {
                eprintln!("restarting node {}: {e}", exit.node);
            }
        }
    }

    /// Sleeps until `until`, watching for crashes.
    async fn idle_until(&mut self, until: Instant) {
        loop {
            self.watch_crashes();
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(250))).await;
        }
    }

    async fn resolve(&mut self, target: &Target) -> (Vec<u64>, String) {
        match target {
            Target::Nodes(v) => (v.clone(), String::new()),
            Target::Leader => match self.cluster.leader().await {
                Some(l) => (vec![l], format!(" (n{l})")),
                None => {
                    let live = self.cluster.live();
                    let pick = live.choose(&mut self.rng).copied().unwrap_or(1);
                    (vec![pick], format!(" (no leader known; chose n{pick})"))
                }
            },
        }
    }

    /// Runs the planned faults that fit before `faults_end`, then idles (restarting crashed
    /// nodes) until `end`; both are offsets from the run's start.
    pub async fn run(
        &mut self,
        plan: &[PlannedFault],
        faults_end: Duration,
        end: Duration,
    ) -> Vec<FaultOutcome> {
        let mut outcomes = Vec::new();
        let min_gap = Duration::from_secs(1);
        let mut last_heal = Instant::now();
        for (id, p) in plan.iter().enumerate() {
            let planned = self.clock.instant(Duration::from_millis(p.start_ms));
            let start_at = planned.max(last_heal + min_gap);
            // Heals may take longer than planned (a re-added node catching up); a fault that
            // would overrun the window is shortened, and dropped if under a second remains.
            let window_end = self.clock.instant(faults_end);
            let hold = Duration::from_millis(p.hold_ms)
                .min(window_end.saturating_duration_since(start_at));
            if hold < Duration::from_secs(1) {
                break;
            }
            self.idle_until(start_at).await;
            let mut outcome = FaultOutcome {
                id,
                kind: p.fault.kind(),
                detail: p.fault.describe(),
                nodes: Vec::new(),
                start: None,
                stop: None,
                injected: false,
                error: None,
            };
            // The fault begins when applying it begins (a membership change takes a while).
            let began = self.clock.now();
            match self.apply(&p.fault).await {
                Ok((active, nodes, detail)) => {
                    outcome.detail = detail.clone();
                    outcome.nodes = nodes.clone();
                    outcome.injected = true;
                    let (d, n) = (detail.clone(), nodes.clone());
                    self.timeline.record(|_| TimelineEvent {
                        time: began,
                        kind: "start",
                        id: Some(id),
                        fault: Some(p.fault.kind()),
                        detail: d,
                        nodes: n,
                    });
                    outcome.start = Some(began);
                    eprintln!(
                        "[{:7.2}s] nemesis: {detail}",
                        self.clock.elapsed().as_secs_f64()
                    );
                    self.idle_until(Instant::now() + hold).await;
                    let res = self.heal(active).await;
                    if let Err(e) = &res {
                        outcome.error = Some(format!("heal: {e}"));
                        self.note(
                            "error",
                            Some(id),
                            Some(p.fault.kind()),
                            format!("heal: {e}"),
                            nodes.clone(),
                        );
                    }
                    outcome.stop =
                        Some(self.note("stop", Some(id), Some(p.fault.kind()), detail, nodes));
                    eprintln!(
                        "[{:7.2}s] nemesis: healed{}",
                        self.clock.elapsed().as_secs_f64(),
                        res.err()
                            .map(|e| format!(" with an error: {e}"))
                            .unwrap_or_default()
                    );
                }
                Err(e) => {
                    eprintln!("nemesis: cannot {}: {e}", p.fault.describe());
                    self.note(
                        "error",
                        Some(id),
                        Some(p.fault.kind()),
                        format!("{}: {e}", p.fault.describe()),
                        Vec::new(),
                    );
                    outcome.error = Some(e);
                }
            }
            last_heal = Instant::now();
            outcomes.push(outcome);
        }
        self.idle_until(self.clock.instant(end)).await;
        outcomes
    }

    async fn apply(&mut self, fault: &Fault) -> Result<(Active, Vec<u64>, String), String> {
        let base = fault.describe();
        match fault {
            Fault::Kill { target } => {
                let (nodes, how) = self.resolve(target).await;
                let mut done = Vec::new();
                for &id in &nodes {
                    let pid = self.cluster.pid(id);
                    match self.cluster.kill(id).await {
                        Ok(()) => done.push(id),
                        Err(e) => eprintln!("kill n{id} (pid {pid:?}): {e}"),
                    }
                }
                acted(
                    &nodes,
                    done,
                    "killed",
                    Active::Killed,
                    format!("{base}{how}"),
                )
            }
            Fault::Pause { target } => {
                let (nodes, how) = self.resolve(target).await;
                let mut done = Vec::new();
                for &id in &nodes {
                    match self.cluster.pause(id) {
                        Ok(()) => done.push(id),
                        Err(e) => eprintln!("pause n{id}: {e}"),
                    }
                }
                acted(
                    &nodes,
                    done,
                    "paused",
                    Active::Paused,
                    format!("{base}{how}"),
                )
            }
            Fault::Partition { grudge } => {
                let leader = if *grudge == Grudge::IsolateLeader {
                    self.cluster.leader().await
                } else {
                    None
                };
                let ids = self.cluster.ids();
                let cuts = partition::cuts(grudge, &ids, leader)?;
                let fw = self
                    .firewall
                    .as_mut()
                    .ok_or("partitions are not available (no firewall)")?;
                if let Err(e) = fw.cut(&cuts) {
                    let _ = fw.heal();
                    return Err(e);
                }
                let mut nodes: Vec<u64> = cuts.iter().flat_map(|&(a, b)| [a, b]).collect();
                nodes.sort_unstable();
                nodes.dedup();
                let how = leader.map(|l| format!(" (n{l})")).unwrap_or_default();
                let pairs: Vec<String> = cuts.iter().map(|(a, b)| format!("{a}-{b}")).collect();
                Ok((
                    Active::Cut,
                    nodes,
                    format!("{base}{how}; cut {}", pairs.join(" ")),
                ))
            }
            Fault::Membership { target } => {
                let (nodes, how) = self.resolve(target).await;
                let x = nodes[0];
                self.remove_member(x).await?;
                // Its data is wiped next, so there is nothing to stop gracefully.
                if let Err(e) = self.cluster.kill(x).await {
                    eprintln!("stopping removed node n{x}: {e}");
                }
                self.cluster.wipe(x).map_err(|e| e.to_string())?;
                Ok((Active::Removed(x), vec![x], format!("{base}{how}")))
            }
            Fault::Net { target, link } => {
                let (nodes, how) = match target {
                    NetTarget::All => (self.cluster.ids(), String::new()),
                    NetTarget::Around(t) => self.resolve(t).await,
                };
                let proxy = self
                    .proxy
                    .as_ref()
                    .ok_or("net faults are not available (no proxy)")?;
                for (a, b) in links_around(&self.cluster.ids(), &nodes) {
                    proxy.set(a, b, *link);
                }
                Ok((Active::Degraded, nodes, format!("{base}{how}")))
            }
            Fault::Clock { target, offset_s } => {
                let (nodes, how) = self.resolve(target).await;
                let clocks = self
                    .clocks
                    .as_ref()
                    .ok_or("clock faults are not available (no libfaketime)")?;
                for (i, &n) in nodes.iter().enumerate() {
                    if let Err(e) = clocks.set_offset(n, *offset_s) {
                        // Nothing half-applied: the clocks already moved go back.
                        for &done in &nodes[..i] {
                            let _ = clocks.set_offset(done, 0);
                        }
                        return Err(format!("n{n}'s clock file: {e}"));
                    }
                }
                Ok((Active::Bumped(nodes.clone()), nodes, format!("{base}{how}")))
            }
        }
    }

    async fn heal(&mut self, active: Active) -> Result<(), String> {
        match active {
            Active::Killed(nodes) => on_each(&nodes, |id| self.cluster.start(id)),
            Active::Paused(nodes) => on_each(&nodes, |id| self.cluster.resume(id)),
            Active::Cut => match self.firewall.as_mut() {
                Some(fw) => fw.heal(),
                None => Ok(()),
            },
            Active::Removed(x) => {
                if self.cluster.is_stopped(x) {
                    self.cluster.start(x).map_err(|e| e.to_string())?;
                }
                self.add_member(x).await
            }
            Active::Degraded => {
                if let Some(p) = &self.proxy {
                    p.heal();
                }
                Ok(())
            }
            Active::Bumped(nodes) => self.reset_clocks(&nodes),
        }
    }

    fn reset_clocks(&self, nodes: &[u64]) -> Result<(), String> {
        let Some(clocks) = &self.clocks else {
            return Ok(());
        };
        let failed: Vec<String> = nodes
            .iter()
            .filter_map(|&n| clocks.set_offset(n, 0).err().map(|e| format!("n{n}: {e}")))
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(format!("resetting clocks: {}", failed.join("; ")))
        }
    }

    /// Removes `x` through any other live node, retried; "not found" means already removed
    /// (an earlier attempt may have succeeded without us hearing).
    async fn remove_member(&mut self, x: u64) -> Result<(), String> {
        let deadline = Instant::now() + MEMBERSHIP_TIMEOUT / 3;
        let mut last = String::from("no other live node");
        let mut attempted = false;
        loop {
            for via in self.cluster.live().into_iter().filter(|&v| v != x) {
                let Some(api) = self.cluster.admin(via) else {
                    continue;
                };
                match api.remove_member(x).await {
                    Ok(()) => return Ok(()),
                    Err(CallError::Rejected { status: 404, .. }) if attempted => return Ok(()),
                    Err(e) => {
                        if !e.definitely_not_applied() {
                            attempted = true;
                        }
                        last = format!("via n{via}: {e}");
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!("cannot remove n{x}: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Adds `x` back as a voter through any other live node, retried until it is a voter.
    async fn add_member(&mut self, x: u64) -> Result<(), String> {
        let info = self
            .cluster
            .info(x)
            .cloned()
            .ok_or_else(|| format!("no node {x}"))?;
        let member = NewMember {
            id: x,
            api: info.api().to_string(),
            raft: self
                .cluster
                .dialed_raft(x)
                .unwrap_or_else(|| info.raft())
                .to_string(),
            zone: info.zone.clone(),
            voter: true,
        };
        let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
        let mut last = String::from("no other live node");
        // One attempt per round (an add can take long: it waits for the catch-up), through
        // the other live nodes in turn.
        for round in 0usize.. {
            self.watch_crashes();
            let others: Vec<u64> = self
                .cluster
                .live()
                .into_iter()
                .filter(|&v| v != x)
                .collect();
            if let Some(&via) = others.get(round % others.len().max(1)) {
                let api = self.cluster.admin(via).expect("a live node has a client");
                match api.add_member(&member).await {
                    Ok(()) => return Ok(()),
                    // "already a voter": an earlier attempt succeeded.
                    Err(CallError::Rejected {
                        status: 409,
                        detail,
                        ..
                    }) if detail.contains("already a voter") => return Ok(()),
                    Err(e) => last = format!("via n{via}: {e}"),
                }
            }
            if Instant::now() > deadline {
                return Err(format!("cannot add n{x} back: {last}"));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        unreachable!("the rounds never run out")
    }

    /// Undoes everything that may still be in place — cuts, pauses, stopped nodes, a
    /// removed member — and restarts crashed nodes. Returns what could not be undone.
    pub async fn heal_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        self.watch_crashes();
        if let Some(fw) = self.firewall.as_mut() {
            if let Err(e) = fw.heal() {
                errors.push(e);
            }
        }
        if let Some(p) = &self.proxy {
            p.heal();
        }
        if let Err(e) = self.reset_clocks(&self.cluster.ids()) {
            errors.push(e);
        }
        // Chunks already queued in the proxies still arrive late, and libfaketime re-reads
        // its offset once a second: let both settle before the final checks.
        let settle = match (&self.proxy, &self.clocks) {
            (Some(_), _) => Some(proxy::MAX_QUEUED),
            (None, Some(_)) => Some(Duration::from_millis(1500)),
            (None, None) => None,
        };
        if let Some(d) = settle {
            tokio::time::sleep(d).await;
        }
        for id in self.cluster.ids() {
            if self.cluster.is_paused(id) {
                if let Err(e) = self.cluster.resume(id) {
                    errors.push(e.to_string());
                }
            }
            if self.cluster.is_stopped(id) {
                if let Err(e) = self.cluster.start(id) {
                    errors.push(e.to_string());
                }
            }
        }
        // Every node must be a voter again.
        let ids = self.cluster.ids();
        let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
        loop {
            let leader = self.cluster.leader().await;
            let members = match leader {
                Some(l) => self.cluster.status(l).await.ok().map(|s| s.members),
                None => None,
            };
            if let Some(members) = members {
                let missing: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|id| !members.iter().any(|m| m.id == *id && m.role == "voter"))
                    .collect();
                if missing.is_empty() {
                    break;
                }
                for x in missing {
                    if let Err(e) = self.add_member(x).await {
                        errors.push(e);
                    }
                }
            }
            if Instant::now() > deadline {
                errors.push("not every node is a voter again".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        errors
    }
}

/// Runs `op` on every node and collects the errors: `Err` joins them, if any.
fn on_each<T, E: fmt::Display>(
    nodes: &[u64],
    mut op: impl FnMut(u64) -> Result<T, E>,
) -> Result<(), String> {
    let errors: Vec<String> = nodes
        .iter()
        .filter_map(|&id| op(id).err().map(|e| e.to_string()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The result of a process fault applied to `done` out of `nodes`: an error if none took it.
fn acted(
    nodes: &[u64],
    done: Vec<u64>,
    verb: &str,
    active: fn(Vec<u64>) -> Active,
    description: String,
) -> Result<(Active, Vec<u64>, String), String> {
    if done.is_empty() {
        return Err(format!("no node of {nodes:?} could be {verb}"));
    }
    Ok((active(done.clone()), done, description))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(secs: u64) -> PlanConfig {
        PlanConfig::for_run(Duration::from_secs(secs))
    }

    #[test]
    fn a_seed_names_the_plan() {
        let kinds = NemesisKind::ALL;
        let a = plan(7, &kinds, &[1, 2, 3, 4, 5], &cfg(120));
        let b = plan(7, &kinds, &[1, 2, 3, 4, 5], &cfg(120));
        let c = plan(8, &kinds, &[1, 2, 3, 4, 5], &cfg(120));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(
            a.len() >= 8,
            "a 120 s run has room for many faults: {}",
            a.len()
        );
    }

    #[test]
    fn plans_stay_inside_the_fault_window_and_cycle_through_every_kind() {
        for seed in 0..50 {
            let c = cfg(60);
            let p = plan(seed, &NemesisKind::ALL, &[1, 2, 3], &c);
            let end = (c.run - c.recovery).as_millis() as u64;
            let mut prev_end = 0;
            for f in &p {
                assert!(f.start_ms >= c.warmup.as_millis() as u64);
                assert!(f.start_ms >= prev_end, "faults never overlap");
                assert!(f.start_ms + f.hold_ms <= end);
                prev_end = f.start_ms + f.hold_ms;
            }
            // The first faults are every kind once, in some order.
            let n = NemesisKind::ALL.len();
            let mut first: Vec<NemesisKind> = p.iter().take(n).map(|f| f.fault.kind()).collect();
            first.sort_unstable();
            assert_eq!(first, NemesisKind::ALL, "seed {seed}");
        }
    }

    #[test]
    fn three_node_plans_use_only_three_node_grudges_and_single_targets() {
        for seed in 0..50 {
            for f in plan(seed, &NemesisKind::ALL, &[1, 2, 3], &cfg(120)) {
                match f.fault {
                    Fault::Partition { grudge } => assert!(matches!(
                        grudge,
                        Grudge::Isolate { .. } | Grudge::IsolateLeader
                    )),
                    Fault::Kill {
                        target: Target::Nodes(v),
                    }
                    | Fault::Pause {
                        target: Target::Nodes(v),
                    } => {
                        assert_eq!(v.len(), 1)
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn net_faults_degrade_the_links_around_their_targets() {
        assert_eq!(
            links_around(&[1, 2, 3], &[2]),
            [(1, 2), (2, 1), (2, 3), (3, 2)]
        );
        assert_eq!(links_around(&[1, 2, 3], &[1, 2, 3]).len(), 6);
        let mut variants = std::collections::BTreeSet::new();
        for seed in 0..40 {
            for f in plan(seed, &[NemesisKind::Net], &[1, 2, 3], &cfg(120)) {
                let Fault::Net { target, link } = f.fault else {
                    panic!("only net faults planned");
                };
                assert!(link.delay_ms <= 800 && link.loss_pct <= 50, "{link:?}");
                assert!(link.delay_ms > 0 || link.loss_pct > 0, "{link:?}");
                variants.insert((target == NetTarget::All, link.loss_pct > 0));
            }
        }
        assert_eq!(
            variants.len(),
            4,
            "slow and lossy, everywhere and around one node"
        );
    }

    #[test]
    fn clock_bumps_go_both_ways_within_ten_minutes() {
        let offsets: Vec<i64> = (0..40)
            .flat_map(|seed| plan(seed, &[NemesisKind::Clock], &[1, 2, 3], &cfg(120)))
            .map(|f| match f.fault {
                Fault::Clock { offset_s, .. } => offset_s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(offsets.iter().all(|o| (5..=600).contains(&o.abs())));
        assert!(offsets.iter().any(|&o| o > 0) && offsets.iter().any(|&o| o < 0));
    }

    #[test]
    fn five_node_plans_reach_every_grudge() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..40 {
            for f in plan(seed, &[NemesisKind::Partition], &[1, 2, 3, 4, 5], &cfg(120)) {
                if let Fault::Partition { grudge } = f.fault {
                    seen.insert(match grudge {
                        Grudge::Isolate { .. } => "isolate",
                        Grudge::IsolateLeader => "leader",
                        Grudge::Split { minority } => {
                            assert_eq!(minority.len(), 2);
                            "split"
                        }
                        Grudge::MajoritiesRing { .. } => "ring",
                        Grudge::Bridge { .. } => "bridge",
                    });
                }
            }
        }
        assert_eq!(seen.len(), 5, "{seen:?}");
    }

    #[test]
    fn a_short_ci_run_still_gets_every_kind() {
        for seed in 0..50 {
            let p = plan(seed, &NemesisKind::ALL, &[1, 2, 3], &cfg(45));
            let mut kinds: Vec<NemesisKind> = p.iter().map(|f| f.fault.kind()).collect();
            kinds.sort_unstable();
            kinds.dedup();
            assert_eq!(kinds, NemesisKind::ALL, "seed {seed}: {p:?}");
        }
    }

    #[test]
    fn no_kinds_or_no_time_means_no_faults() {
        assert!(plan(1, &[], &[1, 2, 3], &cfg(60)).is_empty());
        assert!(plan(1, &NemesisKind::ALL, &[1, 2, 3], &cfg(12)).is_empty());
    }
}
