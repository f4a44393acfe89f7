//! The cluster under test: 3 or 5 `cairn server` processes on 127.0.0.(10+i), their
//! certificates, keyring, policy and configs (made with the `cairn` CLI, as an operator
//! would), and process control by pid — start, SIGTERM, kill -9, SIGSTOP/SIGCONT, wipe.
//! Knows cairn's CLI and config format, never its code; knows nothing of workloads.
//!
//! Everything lives in the run directory: `pki/`, `keyring.json`, `policy.toml`, and per node
//! `n<i>/node.toml`, `n<i>/data/`, `n<i>/server.log` (appended across restarts, each start
//! marked). Children are only ever signalled by the pid this module spawned. They die with
//! the harness in three independent ways: [`Cluster::shutdown`] at the end of a run,
//! `kill_on_drop` when the cluster is dropped (panic, Ctrl-C unwinding the run), and
//! `PR_SET_PDEATHSIG` if the harness itself is killed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::api::{Api, CallError, InstanceSpec, Precondition, Status, TlsFiles};
use crate::recorder::Clock;

/// API port of every node.
pub const API_PORT: u16 = 7400;
/// Raft (internal) port of every node.
pub const RAFT_PORT: u16 = 7401;
/// Port of the harness's proxy in front of each node's raft port (net nemesis).
pub const PROXY_PORT: u16 = 7402;
/// The operator identity the harness acts as (`operator/jepsen`), granted `admin` on `*`.
pub const OPERATOR: &str = "jepsen";
/// Where the readiness probe and the final write go; no workload reads this service.
pub const PROBE_SERVICE: &str = "jepsen-probe";

/// How long a SIGTERMed node gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Address of node `id`: 127.0.0.(10+id).
pub fn node_ip(id: u64) -> Ipv4Addr {
    let last = u8::try_from(10 + id).expect("node ids are 1..=5");
    Ipv4Addr::new(127, 0, 0, last)
}

/// Zone of node `id` in an `n`-node cluster: 3 nodes a, b, c; 5 nodes a, a, b, b, c.
pub fn zone_of(id: u64, n: usize) -> String {
    let zones: &[&str] = if n == 5 {
        &["a", "a", "b", "b", "c"]
    } else {
        &["a", "b", "c"]
    };
    let z = zones[usize::try_from(id - 1).unwrap_or(0) % zones.len()];
    format!("zone-{z}")
}

/// Identity and addresses of one node; what clients and nemeses need to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: u64,
    pub ip: Ipv4Addr,
    pub zone: String,
}

impl NodeInfo {
    pub fn api(&self) -> SocketAddr {
        SocketAddr::from((self.ip, API_PORT))
    }
    pub fn raft(&self) -> SocketAddr {
        SocketAddr::from((self.ip, RAFT_PORT))
    }
    /// Where the harness's proxy in front of the raft port listens (when proxied).
    pub fn proxy(&self) -> SocketAddr {
        SocketAddr::from((self.ip, PROXY_PORT))
    }
}

/// Raft and server timing written into every node config. Short timeouts make faults bite
/// and recoveries quick.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// The server's bound on any request (and on answering `no-quorum`).
    pub request_timeout_ms: u64,
    /// Snapshot after this many entries; small, so lagging nodes get snapshots installed.
    pub snapshot_every: u64,
    pub max_in_snapshot_log_to_keep: u64,
    pub lease_check_interval_ms: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            heartbeat_ms: 100,
            election_min_ms: 800,
            election_max_ms: 1600,
            request_timeout_ms: 3000,
            snapshot_every: 2000,
            max_in_snapshot_log_to_keep: 500,
            lease_check_interval_ms: 250,
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// 3 or 5.
    pub nodes: usize,
    /// The `cairn` binary.
    pub bin: PathBuf,
    /// The run directory (created by the caller).
    pub dir: PathBuf,
    pub trust_domain: String,
    pub tuning: Tuning,
    /// TOML appended to every node config (e.g. a table only a feature build knows).
    pub extra_config: String,
    /// Extra environment for every server process (`CAIRN_*` overrides, planted-bug switches).
    pub server_env: Vec<(String, String)>,
    /// The server's `log` filter.
    pub log_filter: String,
    /// Peers dial each node through its proxy ([`crate::nemesis::proxy`]): the node
    /// advertises the proxy's address as its raft address.
    pub proxied: bool,
    /// Extra environment of one node's server (libfaketime for the clock nemesis).
    pub node_env: BTreeMap<u64, Vec<(String, String)>>,
}

impl ClusterSpec {
    /// The raft address peers dial to reach `n`.
    pub fn dialed_raft(&self, n: &NodeInfo) -> SocketAddr {
        if self.proxied {
            n.proxy()
        } else {
            n.raft()
        }
    }
}

/// Why a process operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("node {0} is not a member of this cluster")]
    UnknownNode(u64),
    #[error("node {0} is already running")]
    AlreadyRunning(u64),
    #[error("node {0} is not running")]
    NotRunning(u64),
    #[error("node {id}: cannot spawn the server: {source}")]
    Spawn { id: u64, source: std::io::Error },
    #[error("node {id}: {what}: {source}")]
    Io {
        id: u64,
        what: &'static str,
        source: std::io::Error,
    },
}

enum Proc {
    Stopped,
    Running(Child),
    /// SIGSTOPped; SIGCONT resumes it.
    Paused(Child),
}

struct Node {
    info: NodeInfo,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    proc: Proc,
    starts: u32,
    admin: Api,
}

/// The running cluster. Owned by one task (the nemesis); clients only get [`NodeInfo`]s.
pub struct Cluster {
    spec: ClusterSpec,
    nodes: Vec<Node>,
    tls: TlsFiles,
    clock: Clock,
}

/// What one unexpected exit looked like.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnexpectedExit {
    pub node: u64,
    pub time: u64,
    pub status: String,
}

fn run_cli(bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "`cairn {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not valid UTF-8", p.display()))
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// Fails with a clear message when someone else (say a `cairn dev`) holds a node's ports.
/// Never touches the foreign process.
pub fn check_ports_free(nodes: &[NodeInfo]) -> anyhow::Result<()> {
    for n in nodes {
        for addr in [n.api(), n.raft()] {
            if let Err(e) = TcpListener::bind(addr) {
                bail!(
                    "cannot use {addr} for node {}: {e}. Another process (a `cairn dev`, a test, \
                     an earlier run?) holds it; see `ss -ltnp | grep {}`. Stop it yourself; \
                     the harness never kills foreign processes.",
                    n.id,
                    n.ip
                );
            }
        }
    }
    Ok(())
}

/// The policy: `operator/jepsen` is admin on every service and the cluster.
pub fn policy_toml() -> String {
    format!(
        "# written by jepsen-like; applied once, when the cluster first starts\n\
         [[roles]]\n\
         name = \"admin\"\n\
         description = \"everything\"\n\
         rules = [{{ actions = [\"admin\"], services = [\"*\"] }}]\n\
         \n\
         [[bindings]]\n\
         name = \"jepsen\"\n\
         identities = [\"operator/{OPERATOR}\"]\n\
         roles = [\"admin\"]\n"
    )
}

/// Paths a node config refers to.
pub struct ConfigPaths<'a> {
    pub data: &'a Path,
    pub keyring: &'a Path,
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    pub policy: &'a Path,
}

/// One node's config file: every initial member listed, the harness's tuning, `extra` last.
pub fn node_toml(
    node: &NodeInfo,
    members: &[NodeInfo],
    spec: &ClusterSpec,
    paths: &ConfigPaths<'_>,
) -> anyhow::Result<String> {
    let t = &spec.tuning;
    let mut s = String::new();
    writeln!(s, "# written by jepsen-like")?;
    writeln!(s, "node_id = {}", node.id)?;
    writeln!(s, "zone = {}", toml_str(&node.zone))?;
    writeln!(s, "data_dir = {}", toml_str(path_str(paths.data)?))?;
    writeln!(s, "trust_domain = {}", toml_str(&spec.trust_domain))?;
    writeln!(s, "keyring = {}", toml_str(path_str(paths.keyring)?))?;
    writeln!(s, "log = {}", toml_str(&spec.log_filter))?;
    writeln!(s, "\n[listen]")?;
    writeln!(s, "api = \"{}\"", node.api())?;
    writeln!(s, "raft = \"{}\"", node.raft())?;
    if spec.proxied {
        writeln!(s, "raft_advertise = \"{}\"", spec.dialed_raft(node))?;
    }
    writeln!(s, "\n[tls]")?;
    writeln!(s, "ca = {}", toml_str(path_str(paths.ca)?))?;
    writeln!(s, "cert = {}", toml_str(path_str(paths.cert)?))?;
    writeln!(s, "key = {}", toml_str(path_str(paths.key)?))?;
    writeln!(s, "\n[acl]")?;
    writeln!(s, "policy_file = {}", toml_str(path_str(paths.policy)?))?;
    writeln!(s, "\n[raft]")?;
    writeln!(s, "heartbeat_ms = {}", t.heartbeat_ms)?;
    writeln!(s, "election_min_ms = {}", t.election_min_ms)?;
    writeln!(s, "election_max_ms = {}", t.election_max_ms)?;
    writeln!(s, "snapshot_every = {}", t.snapshot_every)?;
    writeln!(
        s,
        "max_in_snapshot_log_to_keep = {}",
        t.max_in_snapshot_log_to_keep
    )?;
    writeln!(s, "\n[limits]")?;
    writeln!(s, "request_timeout_ms = {}", t.request_timeout_ms)?;
    writeln!(s, "\n[leases]")?;
    writeln!(s, "check_interval_ms = {}", t.lease_check_interval_ms)?;
    for m in members {
        writeln!(s, "\n[[members]]")?;
        writeln!(s, "id = {}", m.id)?;
        writeln!(s, "api = \"{}\"", m.api())?;
        writeln!(s, "raft = \"{}\"", spec.dialed_raft(m))?;
        writeln!(s, "zone = {}", toml_str(&m.zone))?;
    }
    if !spec.extra_config.trim().is_empty() {
        writeln!(s, "\n# --extra-config")?;
        writeln!(s, "{}", spec.extra_config.trim_end())?;
    }
    Ok(s)
}

impl Cluster {
    /// Generates PKI, keyring, policy and configs in `spec.dir` with the `cairn` CLI. Starts
    /// nothing.
    pub fn create(
        spec: ClusterSpec,
        clock: Clock,
        op_timeout: Duration,
    ) -> anyhow::Result<Cluster> {
        if spec.nodes != 3 && spec.nodes != 5 {
            bail!("--nodes must be 3 or 5, not {}", spec.nodes);
        }
        if !spec.bin.is_file() {
            bail!(
                "cairn binary not found at {}: build it (`cargo build --release --bin cairn`) or \
                 pass --cairn-bin PATH",
                spec.bin.display()
            );
        }
        let infos: Vec<NodeInfo> = (1..=spec.nodes as u64)
            .map(|id| NodeInfo {
                id,
                ip: node_ip(id),
                zone: zone_of(id, spec.nodes),
            })
            .collect();
        check_ports_free(&infos)?;

        let dir = &spec.dir;
        let pki = dir.join("pki");
        let days = "3";
        let td = spec.trust_domain.as_str();
        let pki_s = path_str(&pki)?.to_owned();
        run_cli(
            &spec.bin,
            &[
                "certs",
                "init",
                "--dir",
                &pki_s,
                "--trust-domain",
                td,
                "--days",
                days,
            ],
        )?;
        for n in &infos {
            let name = n.id.to_string();
            let ip = n.ip.to_string();
            let stem = format!("node{}", n.id);
            run_cli(
                &spec.bin,
                &[
                    "certs",
                    "issue",
                    "--ca-dir",
                    &pki_s,
                    "--kind",
                    "node",
                    "--name",
                    &name,
                    "--trust-domain",
                    td,
                    "--ip",
                    &ip,
                    "--out-dir",
                    &pki_s,
                    "--stem",
                    &stem,
                    "--days",
                    days,
                ],
            )?;
        }
        run_cli(
            &spec.bin,
            &[
                "certs",
                "issue",
                "--ca-dir",
                &pki_s,
                "--kind",
                "operator",
                "--name",
                OPERATOR,
                "--trust-domain",
                td,
                "--out-dir",
                &pki_s,
                "--stem",
                OPERATOR,
                "--days",
                days,
            ],
        )?;
        let keyring = dir.join("keyring.json");
        run_cli(
            &spec.bin,
            &["keyring", "generate", "--out", path_str(&keyring)?],
        )?;
        let policy = dir.join("policy.toml");
        std::fs::write(&policy, policy_toml())
            .with_context(|| format!("cannot write {}", policy.display()))?;

        let tls = TlsFiles {
            ca: pki.join("ca.pem"),
            cert: pki.join(format!("{OPERATOR}.pem")),
            key: pki.join(format!("{OPERATOR}-key.pem")),
        };
        let mut nodes = Vec::new();
        for info in &infos {
            let ndir = dir.join(format!("n{}", info.id));
            std::fs::create_dir_all(&ndir)
                .with_context(|| format!("cannot create {}", ndir.display()))?;
            let data = ndir.join("data");
            let config = ndir.join("node.toml");
            let cert = pki.join(format!("node{}.pem", info.id));
            let key = pki.join(format!("node{}-key.pem", info.id));
            let text = node_toml(
                info,
                &infos,
                &spec,
                &ConfigPaths {
                    data: &data,
                    keyring: &keyring,
                    ca: &tls.ca,
                    cert: &cert,
                    key: &key,
                    policy: &policy,
                },
            )?;
            std::fs::write(&config, text)
                .with_context(|| format!("cannot write {}", config.display()))?;
            let admin = Api::new(&tls, info.api(), op_timeout, Duration::from_secs(1))?;
            nodes.push(Node {
                info: info.clone(),
                config,
                data,
                log: ndir.join("server.log"),
                proc: Proc::Stopped,
                starts: 0,
                admin,
            });
        }
        Ok(Cluster {
            spec,
            nodes,
            tls,
            clock,
        })
    }

    pub fn tls(&self) -> &TlsFiles {
        &self.tls
    }

    pub fn infos(&self) -> Vec<NodeInfo> {
        self.nodes.iter().map(|n| n.info.clone()).collect()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.info.id).collect()
    }

    /// The raft address peers dial to reach node `id` (its proxy when proxied).
    pub fn dialed_raft(&self, id: u64) -> Option<SocketAddr> {
        self.info(id).map(|n| self.spec.dialed_raft(n))
    }

    pub fn info(&self, id: u64) -> Option<&NodeInfo> {
        self.node(id).ok().map(|n| &n.info)
    }

    fn node(&self, id: u64) -> Result<&Node, ProcessError> {
        self.nodes
            .iter()
            .find(|n| n.info.id == id)
            .ok_or(ProcessError::UnknownNode(id))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Node, ProcessError> {
        self.nodes
            .iter_mut()
            .find(|n| n.info.id == id)
            .ok_or(ProcessError::UnknownNode(id))
    }

    /// The admin client of node `id`.
    pub fn admin(&self, id: u64) -> Option<&Api> {
        self.node(id).ok().map(|n| &n.admin)
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        match &self.node(id).ok()?.proc {
            Proc::Running(c) | Proc::Paused(c) => c.id(),
            Proc::Stopped => None,
        }
    }

    pub fn is_running(&self, id: u64) -> bool {
        matches!(self.node(id).map(|n| &n.proc), Ok(Proc::Running(_)))
    }

    pub fn is_paused(&self, id: u64) -> bool {
        matches!(self.node(id).map(|n| &n.proc), Ok(Proc::Paused(_)))
    }

    pub fn is_stopped(&self, id: u64) -> bool {
        matches!(self.node(id).map(|n| &n.proc), Ok(Proc::Stopped))
    }

    /// Nodes that are up and not paused.
    pub fn live(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| matches!(n.proc, Proc::Running(_)))
            .map(|n| n.info.id)
            .collect()
    }

    /// Spawns `cairn server --config n<id>/node.toml`, output appended to its log.
    pub fn start(&mut self, id: u64) -> Result<u32, ProcessError> {
        let now = self.clock.now();
        let bin = self.spec.bin.clone();
        let mut env = self.spec.server_env.clone();
        env.extend(self.spec.node_env.get(&id).cloned().unwrap_or_default());
        let node = self.node_mut(id)?;
        if !matches!(node.proc, Proc::Stopped) {
            return Err(ProcessError::AlreadyRunning(id));
        }
        node.starts += 1;
        let io = |what| move |source| ProcessError::Io { id, what, source };
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(io("cannot open the log"))?;
        use std::io::Write as _;
        writeln!(
            log,
            "=== jepsen-like: start #{} of node {id} at t={:.3}s",
            node.starts,
            now as f64 / 1e9
        )
        .map_err(io("cannot write the log"))?;
        let err = log.try_clone().map_err(io("cannot dup the log"))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("server")
            .arg("--config")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C in the terminal reaches the harness only, which
            // then stops the nodes in order.
            .process_group(0);
        // The harness's own CAIRN_* settings (a client's CAIRN_ENDPOINTS, say) must not leak
        // into a server's config.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CAIRN_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; the child
        // gets SIGKILL when the spawning thread (a runtime thread that lives as long as the
        // harness) dies, so a harness killed by SIGKILL leaves no servers behind.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| ProcessError::Spawn { id, source })?;
        let pid = child.id().unwrap_or(0);
        node.proc = Proc::Running(child);
        Ok(pid)
    }

    fn signal(&self, id: u64, sig: libc::c_int) -> Result<(), ProcessError> {
        let pid = self.pid(id).ok_or(ProcessError::NotRunning(id))?;
        let pid = libc::pid_t::try_from(pid).map_err(|_| ProcessError::NotRunning(id))?;
        // SAFETY: kill(2) with the pid of a child we spawned and have not reaped yet, so it
        // cannot name a recycled pid.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(ProcessError::Io {
                id,
                what: "kill(2) failed",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// kill -9, and reap.
    pub async fn kill(&mut self, id: u64) -> Result<(), ProcessError> {
        let node = self.node_mut(id)?;
        let mut child = match std::mem::replace(&mut node.proc, Proc::Stopped) {
            Proc::Running(c) | Proc::Paused(c) => c,
            Proc::Stopped => return Err(ProcessError::NotRunning(id)),
        };
        child.start_kill().ok();
        child.wait().await.map_err(|source| ProcessError::Io {
            id,
            what: "cannot reap",
            source,
        })?;
        Ok(())
    }

    /// SIGCONT if paused, SIGTERM, wait up to 10 s, then kill -9.
    pub async fn stop(&mut self, id: u64) -> Result<(), ProcessError> {
        if self.is_paused(id) {
            self.resume(id)?;
        }
        self.signal(id, libc::SIGTERM)?;
        let node = self.node_mut(id)?;
        let Proc::Running(child) = &mut node.proc else {
            return Err(ProcessError::NotRunning(id));
        };
        let clean = tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok();
        if clean {
            node.proc = Proc::Stopped;
            Ok(())
        } else {
            self.kill(id).await
        }
    }

    /// SIGSTOP.
    pub fn pause(&mut self, id: u64) -> Result<(), ProcessError> {
        if !self.is_running(id) {
            return Err(ProcessError::NotRunning(id));
        }
        self.signal(id, libc::SIGSTOP)?;
        let node = self.node_mut(id)?;
        if let Proc::Running(c) = std::mem::replace(&mut node.proc, Proc::Stopped) {
            node.proc = Proc::Paused(c);
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: u64) -> Result<(), ProcessError> {
        if !self.is_paused(id) {
            return Err(ProcessError::NotRunning(id));
        }
        self.signal(id, libc::SIGCONT)?;
        let node = self.node_mut(id)?;
        if let Proc::Paused(c) = std::mem::replace(&mut node.proc, Proc::Stopped) {
            node.proc = Proc::Running(c);
        }
        Ok(())
    }

    /// Deletes a stopped node's data directory (it restarts as a fresh, empty node).
    pub fn wipe(&mut self, id: u64) -> Result<(), ProcessError> {
        let node = self.node(id)?;
        if !matches!(node.proc, Proc::Stopped) {
            return Err(ProcessError::AlreadyRunning(id));
        }
        match std::fs::remove_dir_all(&node.data) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ProcessError::Io {
                id,
                what: "cannot wipe the data directory",
                source,
            }),
        }
    }

    pub fn data_dir(&self, id: u64) -> Option<&Path> {
        self.node(id).ok().map(|n| n.data.as_path())
    }

    /// Finds nodes that exited on their own (crash, panic, failed bind) since the last call;
    /// marks them stopped.
    pub fn reap_exits(&mut self) -> Vec<UnexpectedExit> {
        let now = self.clock.now();
        let mut exits = Vec::new();
        for node in &mut self.nodes {
            let status = match &mut node.proc {
                Proc::Running(c) | Proc::Paused(c) => match c.try_wait() {
                    Ok(Some(status)) => status.to_string(),
                    Ok(None) => continue,
                    Err(e) => format!("unknown ({e})"),
                },
                Proc::Stopped => continue,
            };
            node.proc = Proc::Stopped;
            exits.push(UnexpectedExit {
                node: node.info.id,
                time: now,
                status,
            });
        }
        exits
    }

    /// The last lines of a node's log, for error messages.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let Ok(node) = self.node(id) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&node.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub async fn status(&self, id: u64) -> Result<Status, CallError> {
        match self.admin(id) {
            Some(api) => api.status().await,
            None => Err(CallError::NotSent(format!("no node {id}"))),
        }
    }

    /// The current leader, as claimed by a live node in the highest term seen.
    pub async fn leader(&self) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for id in self.live() {
            if let Ok(s) = self.status(id).await {
                if s.state == "leader" && best.is_none_or(|(term, _)| s.term > term) {
                    best = Some((s.term, s.node_id));
                }
            }
        }
        best.map(|(_, id)| id)
    }

    /// Waits until every live node names the same leader, which itself says it leads.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut views = Vec::new();
            for id in self.live() {
                views.push(self.status(id).await.ok().and_then(|s| {
                    (s.leader.is_some()).then_some((s.leader, s.state == "leader", s.node_id))
                }));
            }
            if let Some(Some((Some(l), _, _))) = views.first() {
                let agreed = views
                    .iter()
                    .all(|v| matches!(v, Some((Some(x), _, _)) if x == l));
                let claims = views
                    .iter()
                    .any(|v| matches!(v, Some((_, true, id)) if id == l));
                if agreed && claims {
                    return Ok(*l);
                }
            }
            if Instant::now() > deadline {
                bail!("no leader agreed on by every live node within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One write through any live node, retried until it succeeds or `timeout` passes.
    /// Returns the node that took it. Used for readiness (the policy is bootstrapped) and as
    /// the post-heal "final write must succeed" check.
    pub async fn probe_write(&self, id: &str, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        let spec = InstanceSpec::with_value(id, None);
        let mut last = String::from("no live node");
        loop {
            for node in self.live() {
                let Some(api) = self.admin(node) else {
                    continue;
                };
                match api
                    .put_instance(PROBE_SERVICE, id, &spec, Precondition::None)
                    .await
                {
                    Ok(_) => return Ok(node),
                    Err(e) => last = format!("node {node}: {e}"),
                }
            }
            if Instant::now() > deadline {
                bail!("write {PROBE_SERVICE}/{id} did not succeed within {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Starts every node and waits until a leader is agreed and a write succeeds.
    pub async fn start_all(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        for id in self.ids() {
            self.start(id)?;
        }
        let deadline = Instant::now() + timeout;
        // A bind failure or a bad config shows as an early exit.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ready = async {
            self.wait_for_leader(timeout).await?;
            self.probe_write("ready", deadline.saturating_duration_since(Instant::now()))
                .await
        };
        let res = ready.await;
        let exits = self.reap_exits();
        if let Some(x) = exits.first() {
            bail!(
                "node {} exited during startup ({}); its log ends with:\n{}",
                x.node,
                x.status,
                self.log_tail(x.node, 15)
            );
        }
        res
    }

    /// Stops every node (SIGCONT, SIGTERM, then kill -9 after a grace period).
    pub async fn shutdown(&mut self) {
        for id in self.ids() {
            if !self.is_stopped(id) {
                if let Err(e) = self.stop(id).await {
                    eprintln!("stopping node {id}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_live_on_their_own_loopback_address_in_zones() {
        assert_eq!(node_ip(1), Ipv4Addr::new(127, 0, 0, 11));
        assert_eq!(node_ip(5), Ipv4Addr::new(127, 0, 0, 15));
        let z3: Vec<String> = (1..=3).map(|i| zone_of(i, 3)).collect();
        assert_eq!(z3, ["zone-a", "zone-b", "zone-c"]);
        let z5: Vec<String> = (1..=5).map(|i| zone_of(i, 5)).collect();
        assert_eq!(z5, ["zone-a", "zone-a", "zone-b", "zone-b", "zone-c"]);
    }

    #[test]
    fn a_node_config_lists_every_member_and_the_tuning() {
        let members: Vec<NodeInfo> = (1..=3)
            .map(|id| NodeInfo {
                id,
                ip: node_ip(id),
                zone: zone_of(id, 3),
            })
            .collect();
        let spec = ClusterSpec {
            nodes: 3,
            bin: PathBuf::from("/bin/true"),
            dir: PathBuf::from("/tmp/run"),
            trust_domain: "jepsen.test".into(),
            tuning: Tuning::default(),
            extra_config: "[chaos]\nbugs = [\"x\"]\n".into(),
            server_env: vec![],
            log_filter: "info".into(),
            proxied: false,
            node_env: BTreeMap::new(),
        };
        let p = |s: &str| PathBuf::from(format!("/tmp/run/{s}"));
        let (data, kr, ca, cert, key, pol) = (
            p("n2/data"),
            p("keyring.json"),
            p("ca"),
            p("c"),
            p("k"),
            p("policy.toml"),
        );
        let text = node_toml(
            &members[1],
            &members,
            &spec,
            &ConfigPaths {
                data: &data,
                keyring: &kr,
                ca: &ca,
                cert: &cert,
                key: &key,
                policy: &pol,
            },
        )
        .expect("toml");
        assert!(text.contains("node_id = 2\n"));
        assert!(text.contains("api = \"127.0.0.12:7400\"\nraft = \"127.0.0.12:7401\""));
        assert_eq!(text.matches("[[members]]").count(), 3);
        assert!(text.contains("election_min_ms = 800"));
        assert!(text.contains("request_timeout_ms = 3000"));
        assert!(text.contains("data_dir = \"/tmp/run/n2/data\""));
        assert!(text.trim_end().ends_with("bugs = [\"x\"]"));
        assert!(policy_toml().contains("identities = [\"operator/jepsen\"]"));
    }
}
