//! dev: `cairn dev`, the embedded default — a throwaway CA, certificates, a keyring and one
//! `cairn server` process per node on 127.0.0.(10+i), stopped together on Ctrl-C or SIGTERM.
//! Uses only the offline tools and the public binary; knows nothing of the server's internals.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::certs::{self, CertAuthority, IssueRequest, Validity};
use crate::client::Client;
use crate::crypto::Keyring;
use crate::identity::Identity;

pub const TRUST_DOMAIN: &str = "cairn.local";
pub const API_PORT: u16 = 7400;
pub const RAFT_PORT: u16 = 7401;

/// The address of dev node `i` (1-based).
pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        10 + u8::try_from(i).expect("at most 5 nodes"),
    ))
}

fn zone_of(i: usize) -> String {
    // 3 nodes: one per zone; 5 nodes: 2 + 2 + 1 over three zones.
    let z = ["a", "b", "c", "a", "b"][(i - 1) % 5];
    format!("zone-{z}")
}

/// Writes the TOML config of node `i` of an `n`-node cluster whose files live in `dir`.
pub fn node_config(dir: &Path, i: usize, n: usize) -> String {
    let mut s = String::new();
    let ip = node_ip(i);
    let _ = writeln!(s, "# cairn dev node {i} (generated)");
    let _ = writeln!(s, "node_id = {i}");
    let _ = writeln!(s, "zone = \"{}\"", zone_of(i));
    let _ = writeln!(
        s,
        "data_dir = \"{}\"",
        dir.join(format!("node{i}")).display()
    );
    let _ = writeln!(s, "trust_domain = \"{TRUST_DOMAIN}\"");
    let _ = writeln!(s, "keyring = \"{}\"", dir.join("keyring.json").display());
    let _ = writeln!(
        s,
        "\n[listen]\napi = \"{ip}:{API_PORT}\"\nraft = \"{ip}:{RAFT_PORT}\""
    );
    let _ = writeln!(
        s,
        "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"",
        dir.join("ca.pem").display(),
        dir.join(format!("node{i}.pem")).display(),
        dir.join(format!("node{i}-key.pem")).display()
    );
    let _ = writeln!(
        s,
        "\n[acl]\npolicy_file = \"{}\"",
        dir.join("policy.toml").display()
    );
    for m in 1..=n {
        let mip = node_ip(m);
        let _ = writeln!(
            s,
            "\n[[members]]\nid = {m}\napi = \"{mip}:{API_PORT}\"\nraft = \"{mip}:{RAFT_PORT}\"\nzone = \"{}\"",
            zone_of(m)
        );
    }
    s
}

/// The policy a dev cluster starts with: the `admin` operator may do everything; every service
/// manages and discovers its own instances; `service/web` may also discover every service;
/// `operator/backup` may take snapshots.
pub const DEV_POLICY: &str = r#"# cairn dev policy (generated); applied once, when the cluster first starts.
[[roles]]
name = "admin"
description = "everything, including the cluster and the policy"
rules = [{ actions = ["admin"], services = ["*"] }]

[[roles]]
name = "service-self"
description = "a service registers, renews, deregisters and discovers its own instances"
rules = [{ actions = ["register", "deregister", "heartbeat", "discover"], services = ["{self}"] }]

[[roles]]
name = "discover-all"
description = "read every service"
rules = [{ actions = ["discover"], services = ["*"] }]

[[roles]]
name = "backup"
description = "take and restore snapshots"
rules = [{ actions = ["snapshot"], services = ["*"] }]

[[bindings]]
name = "operators"
identities = ["operator/admin"]
roles = ["admin"]

[[bindings]]
name = "services"
identities = ["service/*"]
roles = ["service-self"]

[[bindings]]
name = "web-discovers-all"
identities = ["service/web"]
roles = ["discover-all"]

[[bindings]]
name = "backups"
identities = ["operator/backup"]
roles = ["backup"]
"#;

/// Creates the CA, node, admin and example service certificates, the keyring, the policy
/// and the node configs in `dir`.
pub fn generate(dir: &Path, n: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = CertAuthority::generate(TRUST_DOMAIN, Validity::days(30))?;
    certs::write_ca_files(dir, &ca)?;
    for i in 1..=n {
        let issued = ca.issue(&IssueRequest {
            identity: Identity::Node(i as u64),
            trust_domain: TRUST_DOMAIN.into(),
            ips: vec![node_ip(i)],
            dns: vec!["localhost".into()],
            validity: Validity::days(30),
        })?;
        certs::write_pem_files(dir, &format!("node{i}"), &issued)?;
        std::fs::write(dir.join(format!("node{i}.toml")), node_config(dir, i, n))?;
    }
    let admin = ca.issue(&IssueRequest {
        identity: Identity::Operator("admin".into()),
        trust_domain: TRUST_DOMAIN.into(),
        ips: vec![],
        dns: vec![],
        validity: Validity::days(30),
    })?;
    certs::write_pem_files(dir, "admin", &admin)?;
    for name in ["web", "api"] {
        let issued = ca.issue(&IssueRequest {
            identity: Identity::Service(name.into()),
            trust_domain: TRUST_DOMAIN.into(),
            ips: vec![],
            dns: vec![],
            validity: Validity::days(30),
        })?;
        certs::write_pem_files(dir, &format!("service-{name}"), &issued)?;
    }
    std::fs::write(dir.join("policy.toml"), DEV_POLICY)?;
    let mut keyring = Keyring::generate();
    keyring.add_backup_key()?;
    keyring.write_new(&dir.join("keyring.json"))?;
    Ok(())
}

struct Nodes(Vec<(usize, Child)>);

impl Nodes {
    /// SIGTERM every node we started (by pid), wait, then SIGKILL what is left.
    fn stop(&mut self) {
        for (_, c) in &self.0 {
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill(2) with a pid of a child process we spawned and still own.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (i, c) in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = c.try_wait() {
                eprintln!("node {i} did not stop in time; killing it");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the dev cluster until Ctrl-C or SIGTERM.
pub async fn run(n: usize, dir: Option<PathBuf>) -> anyhow::Result<()> {
    // Without --dir everything is throwaway: removed again when the cluster stops.
    let throwaway = dir.is_none();
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("cairn-dev-{}", std::process::id())),
    };
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()?.join(dir)
    };
    if dir.join("ca.pem").exists() {
        if !dir.join(format!("node{n}.toml")).exists() {
            bail!(
                "{} holds a cluster of another size; use another --dir",
                dir.display()
            );
        }
        println!("reusing {}", dir.display());
    } else {
        generate(&dir, n)?;
        println!(
            "generated a CA, certificates and a keyring in {}",
            dir.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find the cairn binary")?;
    let mut nodes = Nodes(Vec::new());
    for i in 1..=n {
        let log = std::fs::File::create(dir.join(format!("node{i}.log")))?;
        let child = Command::new(&exe)
            .arg("server")
            .arg("--config")
            .arg(dir.join(format!("node{i}.toml")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {i}"))?;
        nodes.0.push((i, child));
    }
    let endpoints: Vec<String> = (1..=n)
        .map(|i| format!("{}:{API_PORT}", node_ip(i)))
        .collect();
    let d = dir.display();
    println!("started {n} nodes:");
    for (i, (_, c)) in nodes.0.iter().enumerate() {
        println!(
            "  node {} pid {:<7} api https://{}  log {d}/node{}.log",
            i + 1,
            c.id(),
            endpoints[i],
            i + 1
        );
    }
    let client = Client::new(
        &[endpoints.join(",")],
        &dir.join("ca.pem"),
        &dir.join("admin.pem"),
        &dir.join("admin-key.pem"),
        Duration::from_secs(5),
    )?;
    wait_ready(&client, &mut nodes).await?;
    println!(
        "\ncluster ready. Try:\n\n  curl --cacert {d}/ca.pem --cert {d}/admin.pem --key {d}/admin-key.pem \\\n    -X PUT https://{ep}/v1/services/web/instances/web-1 -d '{{\"address\":\"10.0.0.5\",\"port\":8080,\"tags\":[\"v1\"]}}'\n  curl --cacert {d}/ca.pem --cert {d}/admin.pem --key {d}/admin-key.pem https://{ep}/v1/services/web\n\n  export CAIRN_ENDPOINTS={eps} CAIRN_CA={d}/ca.pem CAIRN_CERT={d}/admin.pem CAIRN_KEY={d}/admin-key.pem\n  cairn cluster status\n  cairn register web web-2 --address 10.0.0.6 --port 8080 --ttl 30\n  cairn query web\n\nCtrl-C stops every node.",
        ep = endpoints[0],
        eps = endpoints.join(","),
    );
    wait_stop(&mut nodes).await;
    println!("stopping");
    nodes.stop();
    if throwaway {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("removed {}", dir.display());
    }
    Ok(())
}

async fn wait_ready(client: &Client, nodes: &mut Nodes) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (i, c) in &mut nodes.0 {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("node {i} exited ({status}); see its log");
            }
        }
        if let Ok(r) = client
            .request(reqwest::Method::GET, "/v1/health/ready", None, &[])
            .await
        {
            if r.status.is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("no leader elected within 60 s; see the node logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_stop(nodes: &mut Nodes) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = tick.tick() => {
                for (i, c) in &mut nodes.0 {
                    if let Ok(Some(status)) = c.try_wait() {
                        eprintln!("node {i} exited ({status}); the others keep running");
                    }
                }
                nodes.0.retain_mut(|(_, c)| !matches!(c.try_wait(), Ok(Some(_))));
            }
        }
    }
}
