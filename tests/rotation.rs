//! Certificate and CA rotation without restarts, through real processes: while a client keeps
//! issuing requests, the CA bundle gains a new CA, every node's certificate is replaced by one
//! of the new CA, and the old CA is finally dropped. No request fails because of it, new
//! connections see the new certificates, and a file that fails to load changes nothing.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn::certs::{self, CertAuthority, Validity};
use cairn::identity::Identity;
use common::{instance, issue, TestCluster, TD};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

const TUNING: &str = "[raft]\nheartbeat_ms = 100\nelection_min_ms = 800\nelection_max_ms = 1600\n\n[limits]\nrequest_timeout_ms = 4000\n";

/// The end-entity certificate a node's API listener presents on a fresh connection.
async fn presented_cert(
    addr: std::net::SocketAddr,
    bundle: &Path,
    dir: &Path,
    stem: &str,
) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(bundle).expect("bundle") {
        roots.add(c.expect("ca")).expect("root");
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{stem}.pem")))
            .expect("cert")
            .map(|c| c.expect("cert"))
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{stem}-key.pem"))).expect("key");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates().expect("server certificate")[0]
        .as_ref()
        .to_vec()
}

fn der_of(pem_path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem_path)
        .expect("pem")
        .as_ref()
        .to_vec()
}

/// Keeps registering and reading through every node, over one pooled client and over a
/// fresh client (new connections) every few requests; counts successes and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

fn start_load(c: &TestCluster, dir: &Path, stem: &'static str) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let urls: Vec<String> = (0..c.nodes.len()).map(|i| c.url(i, "")).collect();
    let dir = dir.to_path_buf();
    let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
    let task = tokio::spawn(async move {
        let mut errors = vec![];
        let mut pooled = common::client_for(&dir, stem);
        let mut n = 0u64;
        while !s.load(Ordering::SeqCst) {
            n += 1;
            if n.is_multiple_of(5) {
                pooled = common::client_for(&dir, stem);
            }
            let base = &urls[(n as usize) % urls.len()];
            let res = if n.is_multiple_of(2) {
                pooled
                    .put(format!("{base}/v1/services/load/instances/i{}", n % 50))
                    .json(&instance("10.0.0.1", 80))
                    .send()
                    .await
            } else {
                pooled.get(format!("{base}/v1/services/load")).send().await
            };
            match res {
                Ok(r) if r.status().is_success() => {
                    o.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) => {
                    f.fetch_add(1, Ordering::SeqCst);
                    errors.push(format!("{base}: {}", r.status()));
                }
                Err(e) => {
                    f.fetch_add(1, Ordering::SeqCst);
                    errors.push(format!("{base}: {}", cairn_error(&e)));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        errors
    });
    Load {
        stop,
        ok,
        failed,
        task,
    }
}

fn cairn_error(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

impl Load {
    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.task.await.expect("load task");
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            errors,
        )
    }
}

/// Waits until `check` holds, polling.
async fn eventually(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_the_ca_rotate_without_a_failed_request() {
    let c = TestCluster::start_with_tls(3, TUNING, "reload_interval_ms = 200").await;
    let d = c.dir.path().to_path_buf();
    let ca_pem = d.join("ca.pem");
    std::fs::copy(&ca_pem, d.join("ca1.pem")).expect("keep CA1");

    // The new CA, and a client trust bundle of both (clients get the bundle first).
    let new_dir = d.join("ca2");
    let ca2 = CertAuthority::generate(TD, Validity::days(2)).expect("ca2");
    certs::write_ca_files(&new_dir, &ca2).expect("write ca2");
    let bundle = d.join("bundle.pem");
    certs::write_bundle(&bundle, &[d.join("ca1.pem"), new_dir.join("ca.pem")]).expect("bundle");
    // The load client trusts the bundle and presents the old admin certificate.
    let load_dir = d.join("load");
    std::fs::create_dir_all(&load_dir).expect("dir");
    std::fs::copy(d.join("admin.pem"), load_dir.join("admin.pem")).expect("copy");
    std::fs::copy(d.join("admin-key.pem"), load_dir.join("admin-key.pem")).expect("copy");
    std::fs::copy(&bundle, load_dir.join("ca.pem")).expect("copy");
    let load = start_load(&c, &load_dir, "admin");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Every node trusts both CAs (all nodes read the same bundle file here).
    certs::write_bundle(&ca_pem, &[d.join("ca1.pem"), new_dir.join("ca.pem")]).expect("bundle");
    eventually(
        "every node trusts two CAs",
        Duration::from_secs(10),
        async || {
            let s = c.status(0).await;
            s.is_some_and(|s| {
                s["members"].as_array().is_some_and(|ms| {
                    ms.iter()
                        .all(|m| m["tls"]["ca"].as_array().map(Vec::len) == Some(2))
                })
            })
        },
    )
    .await;

    // 2. A broken certificate file is refused; the node keeps serving its old certificate.
    let node2_pem = d.join("node2.pem");
    let good = std::fs::read(&node2_pem).expect("node2 cert");
    std::fs::write(
        &node2_pem,
        b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .expect("garbage");
    eventually(
        "node 2 reports the failed reload",
        Duration::from_secs(10),
        async || {
            c.log_text(1)
                .contains("reload failed; keeping the previous material")
        },
    )
    .await;
    let old = CertificateDer::from_pem_slice(&good)
        .expect("pem")
        .as_ref()
        .to_vec();
    assert_eq!(
        presented_cert(c.nodes[1].api, &bundle, &d, "admin").await,
        old
    );
    std::fs::write(&node2_pem, &good).expect("restore");

    // 3. Each node gets a certificate of the new CA; new connections present it at once.
    for (idx, node) in c.nodes.iter().enumerate() {
        let i = node.id;
        issue(
            &ca2,
            &d,
            &format!("node{i}"),
            Identity::Node(i),
            vec![node.api.ip()],
        );
        let expected = der_of(&d.join(format!("node{i}.pem")));
        eventually(
            &format!("node {i} presents its new certificate"),
            Duration::from_secs(10),
            async || presented_cert(c.nodes[idx].api, &bundle, &d, "admin").await == expected,
        )
        .await;
        // Let the load run against the mixed cluster (old and new certificates side by side).
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // The cluster still replicates (peer connections use the new certificates too).
    let r = c
        .put_instance(2, "after", "x", &instance("10.0.0.2", 81))
        .await
        .expect("put");
    assert_eq!(r.status(), 201);

    // 4. Operators move to the new CA, then the old CA is dropped.
    issue(
        &ca2,
        &load_dir,
        "admin2",
        Identity::Operator("admin".into()),
        vec![],
    );
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "requests failed during the rotation: {errors:?}");
    assert!(
        ok > 50,
        "the load made too few requests ({ok}) to show anything"
    );
    eprintln!("rotation: {ok} requests succeeded through it, {failed} failed");

    let load = start_load(&c, &load_dir, "admin2");
    certs::write_bundle(&ca_pem, &[new_dir.join("ca.pem")]).expect("bundle");
    // A fresh client each time: existing connections are never dropped by a reload.
    eventually(
        "the old CA is no longer trusted",
        Duration::from_secs(10),
        async || {
            let old_admin = common::client_for(&load_dir, "admin");
            old_admin
                .get(c.url(0, "/v1/health/live"))
                .send()
                .await
                .is_err()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(
        failed, 0,
        "requests with the new admin certificate failed: {errors:?}"
    );
    assert!(ok > 10, "{ok}");

    // The status reports, per node, the new certificate's validity and one trusted CA.
    let new_admin = common::client_for(&load_dir, "admin2");
    let s: Value = new_admin
        .get(c.url(1, "/v1/cluster/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    for m in s["members"].as_array().expect("members") {
        let tls = &m["tls"];
        assert_eq!(tls["ca"].as_array().map(Vec::len), Some(1), "{m}");
        let remaining = tls["remaining_seconds"].as_i64().expect("remaining");
        assert!(remaining > 86_400 && remaining <= 2 * 86_400, "{m}");
        assert_eq!(tls["identity"], format!("node/{}", m["id"]));
    }
}
