//! Test harness: real `cairn server` processes on 127.0.K.(10+i), generated certificates,
//! temp data dirs, and an HTTPS client with the admin operator certificate.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use cairn::certs::{self, CertAuthority, IssueRequest, Validity};
use cairn::crypto::Keyring;
use cairn::identity::Identity;
use serde_json::Value;

pub const TD: &str = "cairn.test";

/// Each cluster of this test process gets its own 127.0.K.0/24 block.
static NEXT_BLOCK: AtomicU8 = AtomicU8::new(20);

pub struct Node {
    pub id: u64,
    pub api: SocketAddr,
    pub raft: SocketAddr,
    pub zone: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub data_dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub ca: CertAuthority,
    pub client: reqwest::Client,
    /// Appended to every node config (tables such as `[raft]` or `[jwt]`).
    pub extra_config: String,
    /// Appended inside every node's `[tls]` table (e.g. `client_auth = "optional"`).
    pub tls_extra: String,
}

pub fn zone_of(i: u64, n: usize) -> String {
    // 3 nodes: a, b, c. 5 nodes: a, a, b, b, c (stopping a zone stops two nodes).
    let z = if n == 5 {
        ["a", "a", "b", "b", "c"][(i - 1) as usize]
    } else {
        ["a", "b", "c", "a", "b"][((i - 1) % 5) as usize]
    };
    format!("zone-{z}")
}

pub fn ip(block: u8, i: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, block, 10 + i as u8))
}

/// Issues a certificate for `identity` into `dir/<stem>.pem` and `dir/<stem>-key.pem`.
pub fn issue(
    ca: &CertAuthority,
    dir: &Path,
    stem: &str,
    identity: Identity,
    ips: Vec<IpAddr>,
) -> (PathBuf, PathBuf) {
    let issued = ca
        .issue(&IssueRequest {
            identity,
            trust_domain: TD.into(),
            ips,
            dns: vec![],
            validity: Validity::days(2),
        })
        .expect("issue cert");
    certs::write_pem_files(dir, stem, &issued).expect("write cert")
}

pub fn client_for(dir: &Path, stem: &str) -> reqwest::Client {
    cairn::tls::install_crypto_provider();
    cairn::tls::api_client(
        &dir.join("ca.pem"),
        &dir.join(format!("{stem}.pem")),
        &dir.join(format!("{stem}-key.pem")),
        Duration::from_secs(15),
    )
    .expect("client")
}

impl TestCluster {
    /// Starts `n` nodes and waits for a leader. `extra` is appended to every node config
    /// (e.g. `[raft]` tuning).
    pub async fn start(n: usize, extra: &str) -> TestCluster {
        let c = Self::create(n, extra);
        let mut c = c;
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_leader(Duration::from_secs(30)).await;
        c
    }

    pub fn create(n: usize, extra: &str) -> TestCluster {
        Self::create_with_tls(n, extra, "")
    }

    /// Like [`TestCluster::start`], with `tls_extra` added to every node's `[tls]` table.
    pub async fn start_with_tls(n: usize, extra: &str, tls_extra: &str) -> TestCluster {
        let mut c = Self::create_with_tls(n, extra, tls_extra);
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_leader(Duration::from_secs(30)).await;
        c
    }

    /// Creates the files of an `n`-node cluster (nothing started). Every node bootstraps the
    /// `cairn dev` example policy (`operator/admin` is admin; services manage themselves).
    pub fn create_with_tls(n: usize, extra: &str, tls_extra: &str) -> TestCluster {
        let block = NEXT_BLOCK.fetch_add(1, Ordering::SeqCst);
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::generate(TD, Validity::days(2)).expect("ca");
        certs::write_ca_files(dir.path(), &ca).expect("write ca");
        let mut keyring = Keyring::generate();
        keyring.add_backup_key().expect("backup key");
        keyring
            .write_new(&dir.path().join("keyring.json"))
            .expect("keyring");
        issue(
            &ca,
            dir.path(),
            "admin",
            Identity::Operator("admin".into()),
            vec![],
        );
        std::fs::write(dir.path().join("policy.toml"), cairn::dev::DEV_POLICY).expect("policy");
        let client = client_for(dir.path(), "admin");
        let mut c = TestCluster {
            dir,
            nodes: vec![],
            ca,
            client,
            extra_config: extra.to_string(),
            tls_extra: tls_extra.to_string(),
        };
        for i in 1..=n as u64 {
            c.add_node_files(block, i, n);
        }
        c.write_configs(n);
        c
    }

    fn add_node_files(&mut self, block: u8, i: u64, n: usize) {
        let ip = ip(block, i);
        let d = self.dir.path();
        issue(
            &self.ca,
            d,
            &format!("node{i}"),
            Identity::Node(i),
            vec![ip],
        );
        self.nodes.push(Node {
            id: i,
            api: SocketAddr::new(ip, 7400),
            raft: SocketAddr::new(ip, 7401),
            zone: zone_of(i, n),
            config: d.join(format!("node{i}.toml")),
            log: d.join(format!("node{i}.log")),
            data_dir: d.join(format!("data{i}")),
            child: None,
            starts: 0,
        });
    }

    /// Writes every node's config with the first `initial` nodes as initial members.
    fn write_configs(&self, initial: usize) {
        let d = self.dir.path();
        let mut members = String::new();
        for m in self.nodes.iter().take(initial) {
            members.push_str(&format!(
                "\n[[members]]\nid = {}\napi = \"{}\"\nraft = \"{}\"\nzone = \"{}\"\n",
                m.id, m.api, m.raft, m.zone
            ));
        }
        for node in &self.nodes {
            let i = node.id;
            // A node added later lists itself too (config validation requires it).
            let own = if (i as usize) > initial {
                format!(
                    "\n[[members]]\nid = {i}\napi = \"{}\"\nraft = \"{}\"\nzone = \"{}\"\n",
                    node.api, node.raft, node.zone
                )
            } else {
                String::new()
            };
            let cfg = format!(
                "node_id = {i}\nzone = \"{zone}\"\ndata_dir = \"{data}\"\ntrust_domain = \"{TD}\"\nkeyring = \"{d}/keyring.json\"\nlog = \"info\"\n\n\
                 [listen]\napi = \"{api}\"\nraft = \"{raft}\"\n\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/node{i}.pem\"\nkey = \"{d}/node{i}-key.pem\"\n{tls_extra}\n\n\
                 [acl]\npolicy_file = \"{d}/policy.toml\"\n{members}{own}\n{extra}\n",
                zone = node.zone,
                data = node.data_dir.display(),
                d = d.display(),
                extra = self.extra_config,
                tls_extra = self.tls_extra,
                api = node.api,
                raft = node.raft,
            );
            std::fs::write(&node.config, cfg).expect("write config");
        }
    }

    /// Creates the files of one more node (not started, not a member yet).
    pub fn prepare_extra_node(&mut self) -> usize {
        let block = match self.nodes[0].api.ip() {
            IpAddr::V4(v4) => v4.octets()[2],
            IpAddr::V6(_) => unreachable!("tests use IPv4 loopback"),
        };
        let initial = self.nodes.len();
        let i = initial as u64 + 1;
        self.add_node_files(block, i, initial + 1);
        self.write_configs(initial);
        self.nodes.len() - 1
    }

    pub fn spawn(&mut self, idx: usize) {
        self.spawn_with(idx, &[]);
    }

    /// Starts node `idx` with extra `cairn server` arguments (e.g. `--restore-from FILE`).
    pub fn spawn_with(&mut self, idx: usize, args: &[&std::ffi::OsStr]) {
        let node = &mut self.nodes[idx];
        assert!(node.child.is_none(), "node {} already running", node.id);
        node.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("server")
            .arg("--config")
            .arg(&node.config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn cairn server");
        node.child = Some(child);
    }

    pub fn is_running(&mut self, idx: usize) -> bool {
        match self.nodes[idx].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// kill -9.
    pub fn kill(&mut self, idx: usize) {
        if let Some(mut c) = self.nodes[idx].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, idx: usize) {
        if let Some(mut c) = self.nodes[idx].child.take() {
            // SAFETY: kill(2) on the pid of a child this harness spawned and still owns.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("node {} did not stop on SIGTERM within 15 s", idx + 1);
        }
    }

    /// Waits for a child to exit by itself; returns its exit status.
    pub fn wait_exit(&mut self, idx: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let c = self.nodes[idx].child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                self.nodes[idx].child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn url(&self, idx: usize, path: &str) -> String {
        format!("https://{}{}", self.nodes[idx].api, path)
    }

    pub fn log_text(&self, idx: usize) -> String {
        std::fs::read_to_string(&self.nodes[idx].log).unwrap_or_default()
    }

    pub async fn status(&self, idx: usize) -> Option<Value> {
        let r = self
            .client
            .get(self.url(idx, "/v1/cluster/status"))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Waits until some running node reports a leader that is itself running, and every
    /// running node answers (a leader needs only a quorum; a restarted node may still be
    /// starting). Returns the leader's index.
    pub async fn wait_leader(&mut self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let leader = self.wait_leader_only(deadline, timeout).await;
        for idx in 0..self.nodes.len() {
            while self.is_running(idx) && self.status(idx).await.is_none() {
                if Instant::now() > deadline {
                    panic!(
                        "node {} not serving within {timeout:?}:\n{}",
                        idx + 1,
                        self.log_text(idx)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        leader
    }

    async fn wait_leader_only(&mut self, deadline: Instant, timeout: Duration) -> usize {
        loop {
            for idx in 0..self.nodes.len() {
                if !self.is_running(idx) {
                    continue;
                }
                if let Some(s) = self.status(idx).await {
                    if let Some(l) = s["leader"].as_u64() {
                        let lidx = (l - 1) as usize;
                        if self.is_running(lidx)
                            && self
                                .status(lidx)
                                .await
                                .is_some_and(|ls| ls["state"] == "leader")
                        {
                            return lidx;
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                for i in 0..self.nodes.len() {
                    eprintln!("---- node {} log ----\n{}", i + 1, self.log_text(i));
                }
                panic!("no leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Indices of running followers (not `leader`).
    pub fn others(&mut self, leader: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| i != leader)
            .filter(|&i| self.is_running(i))
            .collect()
    }

    /// Asks node `via` to add node `idx` (as a voter or a learner); returns status and body.
    pub async fn add_member(&self, via: usize, idx: usize, voter: bool) -> (u16, String) {
        let n = &self.nodes[idx];
        let body = serde_json::json!({
            "id": n.id, "api": n.api.to_string(), "raft": n.raft.to_string(), "zone": n.zone, "voter": voter,
        });
        let r = self
            .client
            .post(self.url(via, "/v1/cluster/members"))
            .json(&body)
            .send()
            .await
            .expect("add member");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    pub async fn put_instance(
        &self,
        idx: usize,
        service: &str,
        id: &str,
        body: &Value,
    ) -> reqwest::Result<reqwest::Response> {
        self.client
            .put(self.url(idx, &format!("/v1/services/{service}/instances/{id}")))
            .json(body)
            .send()
            .await
    }

    pub async fn get_json(
        &self,
        idx: usize,
        path: &str,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let r = self
            .client
            .get(self.url(idx, path))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.json().await.unwrap_or(Value::Null);
        (status, body, headers)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for idx in 0..self.nodes.len() {
            self.kill(idx);
        }
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!("---- node {} log (tail) ----", i + 1);
                let text = self.log_text(i);
                for line in text.lines().filter(|l| l.contains("panicked at")) {
                    eprintln!("PANIC in node {}: {line}", i + 1);
                }
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

pub fn instance(address: &str, port: u16) -> Value {
    serde_json::json!({"address": address, "port": port})
}
