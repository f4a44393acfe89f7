//! One run, start to finish — the composition root. It reads as the story of a test:
//!
//! 1. make the run directory; decide which nemeses can run here (partitions need root and
//!    iptables, else `skipping partition nemeses: <reason>`);
//! 2. build and start the cluster, wait for a leader and a first write;
//! 3. start the clients (spread over every node), run the seeded fault plan against the
//!    cluster for `--time`, stop the clients;
//! 4. heal everything; a final write must succeed; read the whole set on every node; every
//!    node must report the same `state_digest` at the same `digest_index`;
//! 5. stop the cluster, remove the iptables chain;
//! 6. check every workload's history, apply the guards, write `summary.json` and
//!    `report.html`, and return one verdict per check.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use tokio::sync::watch;

use crate::api::Api;
use crate::checker::Budget;
use crate::client::{self, ClientCtx, OpRecord, ProcessIds, WorkloadClient};
use crate::cluster::{Cluster, ClusterSpec, NodeInfo, Tuning, UnexpectedExit};
use crate::nemesis::clock::{self, Clocks};
use crate::nemesis::partition::{self, Firewall};
use crate::nemesis::proxy::{Proxy, ProxyStats};
use crate::nemesis::{
    self, FaultOutcome, Nemesis, NemesisKind, PlanConfig, PlannedFault, TimelineEvent,
};
use crate::recorder::{Clock, Journal};
use crate::report::{self, html, FaultCounts, GuardConfig, OpStats, Phase, VerdictEntry};
use crate::workload::lease::{self, LeaseClient, LeaseEvent, LeaseTiming, Registered};
use crate::workload::register::{self, HistoryLine, Keys, RegisterClient};
use crate::workload::set::{self, Elements, FinalRead, SetClient, SetEvent};
use crate::workload::{VerdictClass, WorkloadKind};

/// Durations in `summary.json` are whole milliseconds.
fn ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Everything a run needs to know.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub nodes: usize,
    #[serde(rename = "time_ms", serialize_with = "ms")]
    pub time: Duration,
    pub workloads: Vec<WorkloadKind>,
    pub nemeses: Vec<NemesisKind>,
    pub seed: u64,
    /// Runs go to `out/<run-id>/`.
    pub out: PathBuf,
    pub cairn_bin: PathBuf,
    pub clients: usize,
    #[serde(rename = "op_timeout_ms", serialize_with = "ms")]
    pub op_timeout: Duration,
    pub ops_per_key: u32,
    pub live_keys: usize,
    #[serde(rename = "lease_ttl_ms", serialize_with = "ms")]
    pub lease_ttl: Duration,
    pub guards: GuardConfig,
    #[serde(rename = "check_timeout_ms", serialize_with = "ms")]
    pub check_timeout: Duration,
    pub keep_data: bool,
    /// Self-test: register and set reads use `?consistency=stale`; the checkers must flag
    /// the run (with partitions or pauses, stale reads do happen).
    pub stale_reads: bool,
    #[serde(skip)]
    pub tuning: Tuning,
    pub extra_config: String,
    pub server_env: Vec<(String, String)>,
    pub server_log: String,
}

/// One line of the final output.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub name: String,
    pub class: VerdictClass,
    pub line: String,
}

/// What [`run`] hands back to `main`.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub dir: PathBuf,
    pub verdicts: Vec<Verdict>,
}

impl RunOutcome {
    /// Every check valid (unknown is not valid).
    pub fn valid(&self) -> bool {
        self.verdicts.iter().all(|v| v.class == VerdictClass::Valid)
    }

    /// A planted bug was caught: some workload is invalid, and the run was not vacuous.
    pub fn caught_a_bug(&self) -> bool {
        let workload = |v: &Verdict| WorkloadKind::parse(&v.name).is_some();
        self.verdicts
            .iter()
            .any(|v| workload(v) && v.class == VerdictClass::Invalid)
            && self
                .verdicts
                .iter()
                .any(|v| v.name == "guards" && v.class == VerdictClass::Valid)
    }
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_id: String,
    pub config: RunConfig,
    pub skipped_nemeses: BTreeMap<String, String>,
    /// ns on the run clock when the clients stopped.
    pub client_end: u64,
    pub ops: BTreeMap<String, OpStats>,
    pub errors: BTreeMap<String, u64>,
    pub phases: Vec<Phase>,
    pub faults: BTreeMap<String, FaultCounts>,
    pub fault_log: Vec<FaultOutcome>,
    pub crashes: Vec<UnexpectedExit>,
    pub final_checks: FinalChecks,
    /// Traffic through the peer-link proxies (net nemesis only).
    pub proxy: Option<ProxyStats>,
    pub verdicts: BTreeMap<String, VerdictEntry>,
    /// How many anomalies the checks found (the list below may be truncated).
    pub anomaly_count: usize,
    pub anomalies: Vec<serde_json::Value>,
    pub valid: bool,
}

/// The post-heal checks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FinalChecks {
    pub heal_errors: Vec<String>,
    pub final_write: Option<FinalWrite>,
    pub convergence: Option<Convergence>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Convergence {
    pub converged: bool,
    pub waited_ms: u64,
    pub nodes: Vec<NodeDigest>,
}

/// One node's answer at the last poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeDigest {
    pub node: u64,
    /// `(digest_index, state_digest)`, or why the status call failed.
    #[serde(serialize_with = "digest_json")]
    pub digest: Result<(u64, String), String>,
}

fn digest_json<S: serde::Serializer>(
    d: &Result<(u64, String), String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Ok((index, digest)) => {
            serde_json::json!({"digest_index": index, "state_digest": digest}).serialize(s)
        }
        Err(e) => serde_json::json!({ "error": e }).serialize(s),
    }
}

/// The write after healing, which must succeed.
#[derive(Debug, Clone, Serialize)]
pub struct FinalWrite {
    /// The node that took it.
    pub node: Option<u64>,
    pub error: Option<String>,
    /// How long after healing it succeeded (or gave up).
    pub after_ms: u64,
}

/// `YYYYMMDDTHHMMSS` in UTC, from the wall clock (names only; nothing is timed by it).
fn utc_stamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Which workload each client runs and which node it is bound to: register gets about half
/// the clients, set and lease share the rest; within a workload clients go round the nodes
/// (offset per workload), so every node — leader, followers, minority side — serves every
/// workload.
pub fn assign(
    clients: usize,
    workloads: &[WorkloadKind],
    nodes: usize,
) -> Vec<(WorkloadKind, u64)> {
    let weight = |w: WorkloadKind| if w == WorkloadKind::Register { 2 } else { 1 };
    let mut wheel: Vec<WorkloadKind> = Vec::new();
    for &w in workloads {
        for _ in 0..weight(w) {
            wheel.push(w);
        }
    }
    wheel.sort_by_key(|w| std::cmp::Reverse(weight(*w)));
    // Interleave: R, S, L, R, R, S, L, R ... but start with one of each.
    let mut order: Vec<WorkloadKind> = workloads.to_vec();
    let mut i = 0;
    while order.len() < clients.max(workloads.len()) && !wheel.is_empty() {
        order.push(wheel[i % wheel.len()]);
        i += 1;
    }
    order.truncate(clients.max(workloads.len()));
    let mut seen: BTreeMap<WorkloadKind, usize> = BTreeMap::new();
    order
        .into_iter()
        .map(|w| {
            let j = seen.entry(w).or_insert(0);
            let offset = workloads.iter().position(|x| *x == w).unwrap_or(0);
            let node = ((*j + offset) % nodes) as u64 + 1;
            *j += 1;
            (w, node)
        })
        .collect()
}

/// Polls every node until all report the same digest at the same index.
async fn converge(cluster: &Cluster, timeout: Duration) -> Convergence {
    let started = Instant::now();
    loop {
        let mut nodes = Vec::new();
        for id in cluster.ids() {
            let r = cluster
                .status(id)
                .await
                .map(|s| (s.digest_index, s.state_digest))
                .map_err(|e| e.to_string());
            nodes.push(NodeDigest {
                node: id,
                digest: r,
            });
        }
        let first = nodes.first().and_then(|n| n.digest.as_ref().ok()).cloned();
        let converged = first.is_some()
            && nodes
                .iter()
                .all(|n| n.digest.as_ref().ok() == first.as_ref());
        if converged || started.elapsed() > timeout {
            return Convergence {
                converged,
                waited_ms: started.elapsed().as_millis() as u64,
                nodes,
            };
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The final set read on one node, retried until it succeeds or `timeout` passes.
async fn final_set_read(api: &Api, node: u64, timeout: Duration) -> FinalRead {
    let deadline = Instant::now() + timeout;
    loop {
        match api.list(set::SERVICE, false).await {
            Ok(list) => {
                return FinalRead {
                    node,
                    result: Ok(list.into_iter().map(|i| i.id).collect()),
                }
            }
            Err(e) if Instant::now() > deadline => {
                return FinalRead {
                    node,
                    result: Err(e.to_string()),
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Appends to an anomaly's text the faults in place during its interval (`at`) or up to
/// 5 s before it: a deposed leader may go on answering for a while after a heal, its peer
/// connections still in TCP backoff.
fn annotate_with_faults(anomaly: &mut serde_json::Value, outcomes: &[FaultOutcome]) {
    const LOOKBACK: u64 = 5_000_000_000;
    let Some(at) = anomaly.get("at").and_then(|a| a.as_array()) else {
        return;
    };
    let from = at.first().and_then(|v| v.as_u64()).unwrap_or(0);
    let to = at.get(1).and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
    let during = faults_at(outcomes, from.saturating_sub(LOOKBACK), to);
    if during.is_empty() {
        return;
    }
    let text = anomaly["text"].as_str().unwrap_or_default().to_owned();
    anomaly["text"] = serde_json::Value::String(format!(
        "{text}\n  faults in place during it or up to 5 s before: {}",
        during.join("; ")
    ));
    anomaly["faults"] = serde_json::json!(during);
}

/// The post-heal verdict: heal worked, the final write succeeded, every node converged on
/// one digest, and no node exited on its own.
fn cluster_verdict(finals: &FinalChecks, crashes: &[UnexpectedExit], nodes: usize) -> Verdict {
    let mut problems = finals.heal_errors.clone();
    match finals.final_write.as_ref().map(|w| &w.error) {
        Some(None) => {}
        Some(Some(e)) => problems.push(format!("final write failed: {e}")),
        None => problems.push("no final write".into()),
    }
    let conv = finals.convergence.as_ref();
    if !conv.is_some_and(|c| c.converged) {
        let views: Vec<String> = conv
            .map(|c| c.nodes.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|n| match &n.digest {
                Ok((i, d)) => format!("n{} {} at {i}", n.node, &d[..d.len().min(12)]),
                Err(e) => format!("n{}: {e}", n.node),
            })
            .collect();
        problems.push(format!("nodes did not converge: {}", views.join(", ")));
    }
    for c in crashes {
        problems.push(format!("node {} exited on its own ({})", c.node, c.status));
    }
    if !problems.is_empty() {
        return Verdict {
            name: "cluster".into(),
            class: VerdictClass::Invalid,
            line: format!("invalid: {}", problems.join("; ")),
        };
    }
    let (index, digest) = conv
        .and_then(|c| c.nodes.first())
        .and_then(|n| n.digest.as_ref().ok())
        .cloned()
        .unwrap_or_default();
    Verdict {
        name: "cluster".into(),
        class: VerdictClass::Valid,
        line: format!(
            "valid (final write ok {} ms after healing; {nodes} nodes converged on digest {} at index {index})",
            finals.final_write.as_ref().map_or(0, |w| w.after_ms),
            &digest[..digest.len().min(12)]
        ),
    }
}

/// The faults in place at some time in `[from, to]`, described.
fn faults_at(outcomes: &[FaultOutcome], from: u64, to: u64) -> Vec<String> {
    outcomes
        .iter()
        .filter(|f| f.start.is_some_and(|s| s <= to) && f.stop.is_none_or(|e| e >= from))
        .map(|f| format!("#{} {}", f.id, f.detail))
        .collect()
}

/// `summary.json` lists at most this many anomalies; the `*-check.json` files have all.
const MAX_ANOMALIES: usize = 50;

fn write_json(path: &std::path::Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// `report.html`: verdicts, facts, the latency plot with faults shaded, the fault table and
/// the anomalies.
fn write_report(
    dir: &std::path::Path,
    summary: &Summary,
    verdicts: &[Verdict],
    all_ops: &[OpRecord],
    outcomes: &[FaultOutcome],
) -> anyhow::Result<()> {
    let cfg = &summary.config;
    let run_id = &summary.run_id;
    let stats = &summary.ops;
    let mut facts: Vec<(String, String)> = vec![
        ("run".into(), run_id.clone()),
        ("seed".into(), cfg.seed.to_string()),
        (
            "nodes / clients".into(),
            format!("{} / {}", cfg.nodes, cfg.clients),
        ),
        ("time".into(), format!("{} s", cfg.time.as_secs())),
        ("cairn".into(), cfg.cairn_bin.display().to_string()),
    ];
    for (w, s) in stats {
        facts.push((
            format!("{w} ops"),
            format!(
                "{} ok, {} fail, {} info; ok p50 {} ms, p99 {} ms",
                s.all.ok, s.all.fail, s.all.info, s.ok_latency_ms.p50, s.ok_latency_ms.p99
            ),
        ));
    }
    for (k, c) in &summary.faults {
        facts.push((
            format!("{k} faults"),
            format!("{} injected of {} planned", c.injected, c.planned),
        ));
    }
    for (k, why) in &summary.skipped_nemeses {
        facts.push((format!("{k} skipped"), why.clone()));
    }
    let rows: Vec<html::VerdictRow> = verdicts
        .iter()
        .map(|v| html::VerdictRow {
            name: v.name.clone(),
            valid: v.class == VerdictClass::Valid,
            line: v.line.clone(),
        })
        .collect();
    let anomaly_texts: Vec<String> = summary
        .anomalies
        .iter()
        .map(|a| match a.get("text").and_then(|t| t.as_str()) {
            Some(t) => format!("{}: {t}", a["workload"].as_str().unwrap_or("")),
            None => serde_json::to_string_pretty(a).unwrap_or_default(),
        })
        .collect();
    let page = html::page(&html::Page {
        title: &format!("jepsen-like {run_id}"),
        verdicts: &rows,
        facts: &facts,
        ops: all_ops,
        faults: outcomes,
        anomalies: &anomaly_texts,
        end: summary.client_end,
    });
    std::fs::write(dir.join("report.html"), page).context("cannot write report.html")
}

/// Runs one test. Errors are setup failures (no cluster, unwritable directory); everything
/// that happens once the cluster is up ends in verdicts instead.
pub async fn run(cfg: &RunConfig) -> anyhow::Result<RunOutcome> {
    // 1. The run directory, and which nemeses can run here.
    let run_id = format!("{}-n{}-s{}", utc_stamp(), cfg.nodes, cfg.seed);
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("cannot create {}", cfg.out.display()))?;
    let out = cfg.out.canonicalize()?;
    let dir = out.join(&run_id);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    println!("run directory: {}", dir.display());
    let clock = Clock::start();

    let mut kinds = cfg.nemeses.clone();
    let node_ids: Vec<u64> = (1..=cfg.nodes as u64).collect();
    let mut skipped = BTreeMap::new();
    let firewall = if kinds.contains(&NemesisKind::Partition) {
        match partition::unavailable_reason() {
            Some(reason) => {
                println!("skipping partition nemeses: {reason}");
                kinds.retain(|k| *k != NemesisKind::Partition);
                skipped.insert("partition".to_owned(), reason);
                None
            }
            None => Some(
                Firewall::install(partition::CHAIN)
                    .map_err(|e| anyhow::anyhow!("cannot set up iptables: {e}"))?,
            ),
        }
    } else {
        None
    };

    let clocks = if kinds.contains(&NemesisKind::Clock) {
        match clock::find_library() {
            Ok(lib) => {
                Some(Clocks::new(lib, &dir.join("clocks"), &node_ids).context("clock files")?)
            }
            Err(reason) => {
                println!("skipping clock nemeses: {reason}");
                kinds.retain(|k| *k != NemesisKind::Clock);
                skipped.insert("clock".to_owned(), reason);
                None
            }
        }
    } else {
        None
    };
    let node_env = clocks
        .iter()
        .flat_map(|c| node_ids.iter().map(move |&id| (id, c.env(id))))
        .collect();
    let proxied = kinds.contains(&NemesisKind::Net);

    // 2. The cluster (behind the proxies when there are net faults).
    let spec = ClusterSpec {
        nodes: cfg.nodes,
        bin: cfg.cairn_bin.clone(),
        dir: dir.clone(),
        trust_domain: "jepsen.test".into(),
        tuning: cfg.tuning.clone(),
        extra_config: cfg.extra_config.clone(),
        server_env: cfg.server_env.clone(),
        log_filter: cfg.server_log.clone(),
        proxied,
        node_env,
    };
    let mut cluster = Cluster::create(spec, clock, cfg.op_timeout)?;
    let proxy = if proxied {
        Some(
            Proxy::start(&cluster.infos())
                .await
                .context("cannot start the peer-link proxies")?,
        )
    } else {
        None
    };
    let leader = cluster.start_all(Duration::from_secs(60)).await?;
    eprintln!(
        "[{:7.2}s] cluster of {} up, leader n{leader}",
        clock.elapsed().as_secs_f64(),
        cfg.nodes
    );

    // 3. Clients and nemesis.
    let history: Journal<HistoryLine> = Journal::create(&dir.join("history.jsonl"), clock)?;
    let set_history: Journal<SetEvent> = Journal::create(&dir.join("set.jsonl"), clock)?;
    let lease_history: Journal<LeaseEvent> = Journal::create(&dir.join("lease.jsonl"), clock)?;
    let ops: Journal<OpRecord> = Journal::create(&dir.join("ops.jsonl"), clock)?;
    let timeline: Journal<TimelineEvent> = Journal::create(&dir.join("nemesis.jsonl"), clock)?;

    let plan_cfg = PlanConfig::for_run(cfg.time);
    let plan: Vec<PlannedFault> = nemesis::plan(cfg.seed, &kinds, &cluster.ids(), &plan_cfg);
    write_json(&dir.join("plan.json"), &plan)?;

    let infos: Vec<NodeInfo> = cluster.infos();
    let keys = Keys::new(cfg.live_keys, cfg.ops_per_key);
    let elements = Elements::default();
    let registered = Registered::default();
    let timing = LeaseTiming {
        ttl: cfg.lease_ttl,
        ..LeaseTiming::default()
    };
    let ids = ProcessIds::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (i, (w, node)) in assign(cfg.clients, &cfg.workloads, cfg.nodes)
        .into_iter()
        .enumerate()
    {
        let info = infos[(node - 1) as usize].clone();
        let api = Api::new(
            cluster.tls(),
            info.api(),
            cfg.op_timeout,
            Duration::from_secs(1),
        )?;
        let rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64);
        let workload = match w {
            WorkloadKind::Register => WorkloadClient::Register(RegisterClient::new(
                keys.clone(),
                rng,
                history.clone(),
                cfg.stale_reads,
            )),
            WorkloadKind::Set => WorkloadClient::Set(SetClient::new(
                elements.clone(),
                rng,
                set_history.clone(),
                cfg.stale_reads,
            )),
            WorkloadKind::Lease => WorkloadClient::Lease(LeaseClient::new(
                i,
                timing,
                rng,
                registered.clone(),
                lease_history.clone(),
            )),
        };
        let ctx = ClientCtx::new(i, info, api, ids.clone(), ops.clone());
        tasks.push(tokio::spawn(client::run(ctx, workload, stop_rx.clone())));
    }
    eprintln!(
        "[{:7.2}s] {} clients started; {} faults planned ({})",
        clock.elapsed().as_secs_f64(),
        tasks.len(),
        plan.len(),
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
    );

    let mut nemesis = Nemesis::new(&mut cluster, firewall, timeline.clone(), clock, cfg.seed)
        .with_proxy(proxy)
        .with_clocks(clocks);
    let outcomes = nemesis
        .run(
            &plan,
            plan_cfg.run.saturating_sub(plan_cfg.recovery),
            cfg.time,
        )
        .await;

    let _ = stop_tx.send(true);
    let join_deadline = cfg.op_timeout * 2 + Duration::from_secs(5);
    for t in tasks {
        if tokio::time::timeout(join_deadline, t).await.is_err() {
            eprintln!("a client did not stop within {join_deadline:?}");
        }
    }
    let client_end = clock.now();
    eprintln!(
        "[{:7.2}s] clients stopped; healing",
        clock.elapsed().as_secs_f64()
    );

    // 4. Heal, final write, final reads, convergence.
    let mut finals = FinalChecks {
        heal_errors: nemesis.heal_all().await,
        ..FinalChecks::default()
    };
    let crashes = nemesis.crashes().to_vec();
    let mut firewall = nemesis.take_firewall();
    // The proxies carry the peer links until the cluster is stopped.
    let proxy = nemesis.take_proxy();
    drop(nemesis);
    let healed = Instant::now();
    let res = cluster.probe_write("final", Duration::from_secs(30)).await;
    finals.final_write = Some(FinalWrite {
        node: res.as_ref().ok().copied(),
        error: res.err().map(|e| e.to_string()),
        after_ms: healed.elapsed().as_millis() as u64,
    });
    let mut final_reads = Vec::new();
    if cfg.workloads.contains(&WorkloadKind::Set) {
        for id in cluster.ids() {
            if let Some(api) = cluster.admin(id) {
                final_reads.push(final_set_read(api, id, Duration::from_secs(20)).await);
            }
        }
    }
    if !final_reads.is_empty() {
        write_json(&dir.join("set-final.json"), &final_reads)?;
    }
    finals.convergence = Some(converge(&cluster, Duration::from_secs(60)).await);
    eprintln!(
        "[{:7.2}s] final checks done; stopping the cluster",
        clock.elapsed().as_secs_f64()
    );

    // 5. Tear down.
    cluster.shutdown().await;
    let proxy_stats = proxy.as_ref().map(Proxy::stats);
    drop(proxy);
    if let Some(fw) = firewall.as_mut() {
        if let Err(e) = fw.teardown() {
            finals.heal_errors.push(format!("iptables teardown: {e}"));
        }
    }
    for (name, r) in [
        ("history.jsonl", history.flush()),
        ("set.jsonl", set_history.flush()),
        ("lease.jsonl", lease_history.flush()),
        ("ops.jsonl", ops.flush()),
        ("nemesis.jsonl", timeline.flush()),
    ] {
        r.map_err(|e| anyhow::anyhow!("cannot write {name}: {e}"))?;
    }

    for (w, file) in [
        (WorkloadKind::Register, "history.jsonl"),
        (WorkloadKind::Set, "set.jsonl"),
        (WorkloadKind::Lease, "lease.jsonl"),
    ] {
        if !cfg.workloads.contains(&w) {
            let _ = std::fs::remove_file(dir.join(file));
        }
    }

    // 6. Judge and report.
    let mut verdicts: Vec<Verdict> = Vec::new();
    let mut anomalies: Vec<serde_json::Value> = Vec::new();
    for w in &cfg.workloads {
        let (class, line) = match w {
            WorkloadKind::Register => {
                let lines = history.items();
                let result = register::check(&lines, &Budget::with_timeout(cfg.check_timeout));
                anomalies.extend(register::anomalies(&result, &lines));
                if let Some(r) = &result.report {
                    write_json(&dir.join("register-check.json"), r)?;
                }
                result.verdict_line()
            }
            WorkloadKind::Set => {
                let result = set::check(&set_history.items(), &final_reads);
                anomalies.extend(result.anomalies());
                write_json(&dir.join("set-check.json"), &result)?;
                result.verdict_line(final_reads.len())
            }
            WorkloadKind::Lease => {
                let result = lease::check(&lease_history.items(), cfg.lease_ttl);
                anomalies.extend(result.anomalies());
                write_json(&dir.join("lease-check.json"), &result)?;
                result.verdict_line()
            }
        };
        verdicts.push(Verdict {
            name: w.name().to_owned(),
            class,
            line,
        });
    }
    for a in &mut anomalies {
        annotate_with_faults(a, &outcomes);
    }
    verdicts.push(cluster_verdict(&finals, &crashes, cfg.nodes));

    let all_ops = ops.items();
    let phases = report::phases(&all_ops, &outcomes, client_end, &cfg.workloads);
    let faults = report::fault_counts(&kinds, &plan, &outcomes);
    let (gclass, gline) = report::guards(&cfg.guards, &phases, &faults);
    verdicts.push(Verdict {
        name: "guards".into(),
        class: gclass,
        line: gline,
    });

    let anomaly_count = anomalies.len();
    if anomalies.len() > MAX_ANOMALIES {
        anomalies.truncate(MAX_ANOMALIES);
        anomalies.push(serde_json::json!({
            "kind": "truncated",
            "text": format!("{} more anomalies not shown (see *-check.json)", anomaly_count - MAX_ANOMALIES),
        }));
    }
    let outcome = RunOutcome {
        dir: dir.clone(),
        verdicts,
    };
    let summary = Summary {
        run_id: run_id.clone(),
        config: cfg.clone(),
        skipped_nemeses: skipped,
        client_end,
        ops: report::op_stats(&all_ops),
        errors: report::error_counts(&all_ops),
        phases,
        faults: faults.clone(),
        fault_log: outcomes.clone(),
        crashes,
        final_checks: finals,
        proxy: proxy_stats,
        verdicts: outcome
            .verdicts
            .iter()
            .map(|v| {
                (
                    v.name.clone(),
                    VerdictEntry {
                        verdict: v.class,
                        detail: v.line.clone(),
                    },
                )
            })
            .collect(),
        anomaly_count,
        anomalies,
        valid: outcome.valid(),
    };
    write_json(&dir.join("summary.json"), &summary)?;

    write_report(&dir, &summary, &outcome.verdicts, &all_ops, &outcomes)?;

    if outcome.valid() && !cfg.keep_data {
        for id in 1..=cfg.nodes {
            let _ = std::fs::remove_dir_all(dir.join(format!("n{id}")).join("data"));
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_cover_every_workload_and_every_node() {
        use WorkloadKind::*;
        let a = assign(10, &[Register, Set, Lease], 3);
        assert_eq!(a.len(), 10);
        let count = |w| a.iter().filter(|(x, _)| *x == w).count();
        assert_eq!(count(Register), 5);
        assert!(count(Set) >= 2 && count(Lease) >= 2);
        for w in [Register, Set, Lease] {
            let nodes: std::collections::BTreeSet<u64> =
                a.iter().filter(|(x, _)| *x == w).map(|(_, n)| *n).collect();
            assert!(nodes.len() >= 2, "{w} spread over nodes: {nodes:?}");
        }
        let r: Vec<u64> = a
            .iter()
            .filter(|(x, _)| *x == Register)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(r, [1, 2, 3, 1, 2]);
        // At least one client per workload, whatever --clients says.
        assert_eq!(assign(1, &[Register, Set], 3).len(), 2);
    }

    fn config() -> RunConfig {
        RunConfig {
            nodes: 3,
            time: Duration::from_secs(45),
            workloads: WorkloadKind::ALL.to_vec(),
            nemeses: NemesisKind::ALL.to_vec(),
            seed: 1,
            out: PathBuf::from("/tmp/out"),
            cairn_bin: PathBuf::from("/bin/cairn"),
            clients: 10,
            op_timeout: Duration::from_millis(5000),
            ops_per_key: 200,
            live_keys: 5,
            lease_ttl: Duration::from_secs(3),
            guards: GuardConfig {
                min_ok_ops_per_phase: 20,
                min_faults_per_kind: 1,
            },
            check_timeout: Duration::from_secs(120),
            keep_data: false,
            stale_reads: false,
            tuning: Tuning::default(),
            extra_config: String::new(),
            server_env: vec![],
            server_log: "info".into(),
        }
    }

    #[test]
    fn the_summary_has_the_documented_shape() {
        let summary = Summary {
            run_id: "20261204T000000-n3-s1".into(),
            config: config(),
            skipped_nemeses: BTreeMap::from([("partition".into(), "not root".into())]),
            client_end: 45_000_000_000,
            ops: BTreeMap::new(),
            errors: BTreeMap::new(),
            phases: vec![],
            faults: BTreeMap::new(),
            fault_log: vec![],
            crashes: vec![],
            final_checks: FinalChecks {
                heal_errors: vec![],
                final_write: Some(FinalWrite {
                    node: Some(2),
                    error: None,
                    after_ms: 12,
                }),
                convergence: Some(Convergence {
                    converged: true,
                    waited_ms: 40,
                    nodes: vec![
                        NodeDigest {
                            node: 1,
                            digest: Ok((7, "ab".into())),
                        },
                        NodeDigest {
                            node: 2,
                            digest: Err("timeout".into()),
                        },
                    ],
                }),
            },
            proxy: None,
            verdicts: BTreeMap::from([(
                "register".into(),
                VerdictEntry {
                    verdict: VerdictClass::Valid,
                    detail: "valid".into(),
                },
            )]),
            anomaly_count: 0,
            anomalies: vec![],
            valid: true,
        };
        let v = serde_json::to_value(&summary).expect("json");
        for key in [
            "run_id",
            "config",
            "skipped_nemeses",
            "client_end",
            "ops",
            "errors",
            "phases",
            "faults",
            "fault_log",
            "crashes",
            "final_checks",
            "verdicts",
            "anomaly_count",
            "anomalies",
            "valid",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["config"]["time_ms"], 45_000);
        assert_eq!(v["config"]["lease_ttl_ms"], 3_000);
        assert_eq!(v["config"]["nemeses"][2], "partition");
        assert_eq!(v["verdicts"]["register"]["verdict"], "valid");
        assert_eq!(v["final_checks"]["final_write"]["node"], 2);
        let nodes = &v["final_checks"]["convergence"]["nodes"];
        assert_eq!(nodes[0]["digest"]["digest_index"], 7);
        assert_eq!(nodes[1]["digest"]["error"], "timeout");
    }

    #[test]
    fn run_ids_sort_by_time() {
        let s = utc_stamp();
        assert_eq!(s.len(), 15);
        assert_eq!(&s[8..9], "T");
        assert!(s.starts_with("20"));
    }
}
