//! End-to-end tests of the replicated registry: real `cairn server` processes on loopback,
//! real mTLS, driven only through the public API (issue: the replicated registry).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{instance, TestCluster};
use serde_json::{json, Value};

/// Fast but CI-safe timings (2 cores, debug build) and frequent snapshots, so log purging and
/// snapshot restore are exercised by every restart.
const TUNING: &str = "[raft]\nheartbeat_ms = 100\nelection_min_ms = 800\nelection_max_ms = 1600\nsnapshot_every = 40\nmax_in_snapshot_log_to_keep = 10\n\n[limits]\nrequest_timeout_ms = 4000\n\n[leases]\ncheck_interval_ms = 100\n";

fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_writes_are_forwarded_and_reads_are_linearizable_everywhere() {
    let mut c = TestCluster::start(3, TUNING).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let f = c.others(leader);
    let (a, b) = (f[0], f[1]);

    // Register through follower A.
    let body = json!({"address": "10.1.2.3", "port": 8443, "tags": ["blue"], "meta": {"v": "1"}, "zone": "zone-a"});
    let r = c
        .put_instance(a, "payments", "p-1", &body)
        .await
        .expect("put");
    assert_eq!(r.status(), 201, "created through a follower");
    let index: u64 = header(r.headers(), "x-cairn-index")
        .expect("index header")
        .parse()
        .expect("number");
    assert_eq!(
        header(r.headers(), "x-cairn-leader"),
        Some((leader + 1).to_string())
    );
    let created: Value = r.json().await.expect("json");
    assert_eq!(created["registered_by"], "operator/admin");
    assert_eq!(created["create_index"], created["modify_index"]);

    // Immediately visible on the other follower (default consistency is linearizable) and on the leader.
    for idx in [b, leader] {
        let (status, body, h) = c.get_json(idx, "/v1/services/payments").await;
        assert_eq!(status, 200);
        assert_eq!(
            body["instances"].as_array().map(Vec::len),
            Some(1),
            "node {} sees the write",
            idx + 1
        );
        assert_eq!(body["instances"][0]["id"], "p-1");
        assert!(
            header(&h, "x-cairn-index")
                .expect("index")
                .parse::<u64>()
                .expect("n")
                >= index
        );
        assert!(header(&h, "x-cairn-leader").is_some());
    }
    let (status, inst, h) = c.get_json(b, "/v1/services/payments/instances/p-1").await;
    assert_eq!(status, 200);
    assert_eq!(inst["meta"]["v"], "1");
    assert_eq!(
        header(&h, "etag"),
        Some(format!("\"{}\"", inst["modify_index"]))
    );

    // Many writes through followers, each read back at once through the other follower.
    for k in 0..20 {
        let (w, r) = if k % 2 == 0 { (a, b) } else { (b, a) };
        let id = format!("i-{k}");
        let resp = c
            .put_instance(w, "orders", &id, &instance("10.0.0.1", 1000 + k))
            .await
            .expect("put");
        assert!(resp.status().is_success());
        let (status, _, _) = c
            .get_json(r, &format!("/v1/services/orders/instances/{id}"))
            .await;
        assert_eq!(
            status, 200,
            "write {k} visible on the other follower at once"
        );
    }

    // Stale reads answer locally and say how stale they may be.
    let (status, body, h) = c.get_json(b, "/v1/services/orders?consistency=stale").await;
    assert_eq!(status, 200);
    assert!(body["instances"].as_array().is_some());
    let contact = header(&h, "x-cairn-last-contact").expect("last contact header");
    assert!(
        contact.parse::<u64>().is_ok(),
        "last contact is a number of ms: {contact}"
    );

    // Service list with counts; cluster status has the documented shape.
    let (_, list, _) = c.get_json(a, "/v1/services").await;
    let names: Vec<&str> = list["services"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["orders", "payments"]);
    let status = c.status(b).await.expect("status");
    assert_eq!(status["node_id"], b as u64 + 1);
    assert_eq!(status["leader"], leader as u64 + 1);
    assert!(status["term"].as_u64().expect("term") >= 1);
    assert!(status["commit_index"].as_u64().expect("commit") >= index);
    assert!(status["applied_index"].as_u64().expect("applied") >= index);
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 3);
    for m in members {
        assert_eq!(m["role"], "voter");
        for k in ["id", "api", "raft", "zone", "last_contact_ms"] {
            assert!(m.get(k).is_some(), "member has {k}");
        }
    }
    assert!(
        members.iter().any(|m| m["last_contact_ms"].is_u64()),
        "leader view of contacts is reported"
    );

    // Deterministic state machine: once every node applied the same index, the digests of
    // their registries are identical.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = vec![];
        for idx in 0..3 {
            let s = c.status(idx).await.expect("status");
            seen.push((
                s["digest_index"].as_u64(),
                s["state_digest"].as_str().map(str::to_string),
            ));
        }
        if seen.iter().all(|x| x == &seen[0]) {
            assert!(
                seen[0].1.as_ref().is_some_and(|d| d.len() == 64),
                "sha-256 hex digest"
            );
            break;
        }
        assert!(Instant::now() < deadline, "replicas disagree: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_blocking_queries_and_bad_input() {
    let mut c = TestCluster::start(3, TUNING).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let f = c.others(leader);

    // --- compare-and-set: two concurrent updates with the same index, exactly one wins ---
    let r = c
        .put_instance(f[0], "cart", "c-1", &instance("10.0.0.9", 80))
        .await
        .expect("put");
    let modify = r.json::<Value>().await.expect("json")["modify_index"]
        .as_u64()
        .expect("index");
    let c = Arc::new(c);
    let mut tasks = vec![];
    for (k, idx) in [f[0], f[1]].into_iter().enumerate() {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.client
                .put(c.url(idx, "/v1/services/cart/instances/c-1"))
                .header("if-match", modify.to_string())
                .json(&instance("10.0.0.9", 81 + k as u16))
                .send()
                .await
                .expect("cas")
                .status()
                .as_u16()
        }));
    }
    let mut codes = vec![];
    for t in tasks {
        codes.push(t.await.expect("join"));
    }
    codes.sort();
    assert_eq!(codes, [200, 412], "exactly one CAS wins");
    let r = c
        .client
        .put(c.url(leader, "/v1/services/cart/instances/c-1"))
        .header("if-match", modify.to_string())
        .json(&instance("10.0.0.9", 99))
        .send()
        .await
        .expect("stale cas");
    assert_eq!(r.status(), 412);
    let p: Value = r.json().await.expect("problem");
    assert_eq!(p["type"], "precondition-failed");
    // Create-only.
    let r = c
        .client
        .put(c.url(f[1], "/v1/services/cart/instances/c-1"))
        .header("if-none-match", "*")
        .json(&instance("10.0.0.9", 99))
        .send()
        .await
        .expect("create-only");
    assert_eq!(r.status(), 412);
    let r = c
        .client
        .put(c.url(f[1], "/v1/services/cart/instances/c-2"))
        .header("if-none-match", "*")
        .json(&instance("10.0.0.9", 99))
        .send()
        .await
        .expect("create-only");
    assert_eq!(r.status(), 201);

    // --- blocking queries ---
    let (_, body, _) = c.get_json(f[1], "/v1/services/cart").await;
    let idx = body["index"].as_u64().expect("index");
    // No change: returns at `wait`.
    let t0 = Instant::now();
    let (status, _, _) = c
        .get_json(f[1], &format!("/v1/services/cart?index={idx}&wait=1s"))
        .await;
    let waited = t0.elapsed();
    assert_eq!(status, 200);
    assert!(
        waited >= Duration::from_millis(900),
        "blocked until wait ({waited:?})"
    );
    println!("blocking query without change returned after {waited:?}");
    // A change returns promptly.
    let c2 = c.clone();
    let f1 = f[1];
    let watcher = tokio::spawn(async move {
        let t0 = Instant::now();
        let (status, body, _) = c2
            .get_json(f1, &format!("/v1/services/cart?index={idx}&wait=30s"))
            .await;
        (status, body, t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c
        .put_instance(f[0], "cart", "c-3", &instance("10.0.0.10", 80))
        .await
        .expect("put");
    assert!(r.status().is_success());
    let (status, body, waited) = watcher.await.expect("join");
    assert_eq!(status, 200);
    assert!(body["index"].as_u64().expect("index") > idx);
    assert!(body["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .any(|i| i["id"] == "c-3"));
    assert!(
        waited < Duration::from_secs(10),
        "woke on change ({waited:?})"
    );
    println!("blocking query woke {waited:?} after start (write issued at 300 ms)");
    // A blocking query on an unrelated service does not wake for this write.
    let (_, other, _) = c.get_json(f[0], "/v1/services/nothing-here").await;
    let oidx = other["index"].as_u64().unwrap_or(0);
    let c3 = c.clone();
    let f0 = f[0];
    let w2 = tokio::spawn(async move {
        let t0 = Instant::now();
        c3.get_json(
            f0,
            &format!("/v1/services/nothing-here?index={oidx}&wait=1s"),
        )
        .await;
        t0.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.put_instance(f[1], "cart", "c-4", &instance("10.0.0.11", 80))
        .await
        .expect("put");
    assert!(w2.await.expect("join") >= Duration::from_millis(900));

    // --- bad input: clear 4xx problem+json naming the field; nothing changes ---
    let (_, before, _) = c.get_json(leader, "/v1/services").await;
    let before_index = before["index"].as_u64().expect("index");
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "bad service name",
            "/v1/services/Bad_Name/instances/x".into(),
            Some(instance("10.0.0.1", 80).to_string()),
            400,
            "service",
        ),
        (
            "too long service",
            format!("/v1/services/{}/instances/x", "a".repeat(64)),
            Some(instance("10.0.0.1", 80).to_string()),
            400,
            "service",
        ),
        (
            "bad id",
            "/v1/services/web/instances/bad%20id".into(),
            Some(instance("10.0.0.1", 80).to_string()),
            400,
            "id",
        ),
        (
            "port zero",
            "/v1/services/web/instances/w1".into(),
            Some(instance("10.0.0.1", 0).to_string()),
            400,
            "port",
        ),
        (
            "port too big",
            "/v1/services/web/instances/w1".into(),
            Some(r#"{"address":"10.0.0.1","port":70000}"#.into()),
            400,
            "port",
        ),
        (
            "malformed json",
            "/v1/services/web/instances/w1".into(),
            Some("{\"address\": ".into()),
            400,
            "address",
        ),
        (
            "unknown field",
            "/v1/services/web/instances/w1".into(),
            Some(r#"{"address":"10.0.0.1","port":80,"colour":"red"}"#.into()),
            400,
            "colour",
        ),
        (
            "bad address",
            "/v1/services/web/instances/w1".into(),
            Some(r#"{"address":"no spaces allowed","port":80}"#.into()),
            400,
            "address",
        ),
        (
            "bad ttl",
            "/v1/services/web/instances/w1".into(),
            Some(r#"{"address":"10.0.0.1","port":80,"ttl_seconds":0}"#.into()),
            400,
            "ttl_seconds",
        ),
        (
            "oversized body",
            "/v1/services/web/instances/w1".into(),
            Some(format!(
                r#"{{"address":"10.0.0.1","port":80,"meta":{{"k":"{}"}}}}"#,
                "x".repeat(200_000)
            )),
            413,
            "body",
        ),
    ];
    for (what, path, body, status, field) in cases {
        let mut req = c
            .client
            .put(c.url(f[0], &path))
            .header("content-type", "application/json");
        if let Some(b) = body {
            req = req.body(b);
        }
        let r = req.send().await.expect("request");
        assert_eq!(r.status().as_u16(), status, "{what}");
        assert_eq!(
            header(r.headers(), "content-type").as_deref(),
            Some("application/problem+json"),
            "{what}"
        );
        let p: Value = r.json().await.expect("problem json");
        assert_eq!(p["type"], "invalid-request", "{what}");
        assert_eq!(p["status"], status, "{what}");
        let named = p["field"].as_str().unwrap_or_default();
        assert!(
            named == field || named.starts_with(field),
            "{what}: field {named} should name {field}: {p}"
        );
        assert!(
            p["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}"
        );
    }
    // Unknown node id, invalid query parameter values, If-Match garbage.
    let r = c
        .client
        .delete(c.url(f[0], "/v1/cluster/members/42"))
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.expect("json")["type"], "not-found");
    let r = c
        .client
        .delete(c.url(f[0], "/v1/cluster/members/abc"))
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 400);
    let (status, p, _) = c
        .get_json(f[0], "/v1/services/cart?consistency=maybe")
        .await;
    assert_eq!((status, p["field"].as_str()), (400, Some("consistency")));
    let (status, p, _) = c
        .get_json(f[0], "/v1/services/cart?index=1&wait=forever")
        .await;
    assert_eq!((status, p["field"].as_str()), (400, Some("wait")));
    let r = c
        .client
        .put(c.url(f[0], "/v1/services/cart/instances/c-1"))
        .header("if-match", "yesterday")
        .json(&instance("10.0.0.9", 80))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 400);
    let r = c
        .client
        .delete(c.url(f[0], "/v1/services/cart/instances/never-was"))
        .send()
        .await
        .expect("del");
    assert_eq!(r.status(), 404);
    let (status, _, _) = c.get_json(f[0], "/v1/nope").await;
    assert_eq!(status, 404);
    let (_, after, _) = c.get_json(leader, "/v1/services").await;
    assert_eq!(
        after["index"].as_u64(),
        Some(before_index),
        "rejected requests changed nothing"
    );
    assert_eq!(after["services"], before["services"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_strangers_and_service_certs_on_the_raft_port() {
    let c = TestCluster::start(3, TUNING).await;
    let dir = c.dir.path();
    let ca = std::fs::read(dir.join("ca.pem")).expect("ca");

    // No client certificate: refused at the TLS layer.
    let bare = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("ca pem")])
        .build()
        .expect("client");
    let err = bare
        .get(c.url(0, "/v1/health/live"))
        .send()
        .await
        .expect_err("no client cert must fail");
    assert!(!err.is_status(), "refused before HTTP: {err}");

    // A certificate from another CA.
    let other = cairn::certs::CertAuthority::generate(common::TD, cairn::certs::Validity::days(1))
        .expect("ca");
    let other_dir = tempfile::tempdir().expect("tmp");
    let issued = other
        .issue(&cairn::certs::IssueRequest {
            identity: cairn::identity::Identity::Operator("admin".into()),
            trust_domain: common::TD.into(),
            ips: vec![],
            dns: vec![],
            validity: cairn::certs::Validity::days(1),
        })
        .expect("issue");
    cairn::certs::write_pem_files(other_dir.path(), "mallory", &issued).expect("write");
    std::fs::write(other_dir.path().join("ca.pem"), &ca).expect("ca copy");
    let mallory = common::client_for(other_dir.path(), "mallory");
    assert!(
        mallory
            .get(c.url(0, "/v1/health/live"))
            .send()
            .await
            .is_err(),
        "foreign CA refused"
    );

    // The admin (operator) certificate works on the API...
    let r = c
        .client
        .get(c.url(0, "/v1/health/live"))
        .send()
        .await
        .expect("live");
    assert_eq!(r.status(), 200);
    // ...but neither an operator nor a service certificate gets through the raft port.
    let issued =
        c.ca.issue(&cairn::certs::IssueRequest {
            identity: cairn::identity::Identity::Service("web".into()),
            trust_domain: common::TD.into(),
            ips: vec![],
            dns: vec![],
            validity: cairn::certs::Validity::days(1),
        })
        .expect("issue");
    cairn::certs::write_pem_files(dir, "svc-web", &issued).expect("write");
    let svc = common::client_for(dir, "svc-web");
    for (who, client) in [("service", &svc), ("operator", &c.client)] {
        let url = format!("https://{}/internal/probe", c.nodes[0].raft);
        let res = client.post(url).body(Vec::new()).send().await;
        assert!(
            res.is_err(),
            "{who} certificate must be refused on the raft port: {res:?}"
        );
    }
    // A service certificate may use the public API, within its policy (web discovers all).
    let r = svc
        .get(c.url(1, "/v1/services"))
        .send()
        .await
        .expect("services");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_loses_no_acknowledged_write_and_restarts_keep_everything() {
    let mut c = TestCluster::start(3, TUNING).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let c_arc_nodes: Vec<usize> = (0..3).collect();

    // Writers on every node, each recording acknowledged ids.
    let client = c.client.clone();
    let urls: Vec<String> = c_arc_nodes.iter().map(|&i| c.url(i, "")).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // (id, sent at, acknowledged at)
    let acked = Arc::new(std::sync::Mutex::new(
        Vec::<(String, Instant, Instant)>::new(),
    ));
    let mut writers = vec![];
    for w in 0..6 {
        let (client, urls, stop, acked) =
            (client.clone(), urls.clone(), stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("w{w}-{n}");
                n += 1;
                let url = format!(
                    "{}/v1/services/load/instances/{id}",
                    urls[(w + n) % urls.len()]
                );
                let sent = Instant::now();
                let res = client
                    .put(url)
                    .json(&instance("10.9.9.9", 9000))
                    .timeout(Duration::from_secs(6))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        acked.lock().expect("lock").push((id, sent, Instant::now()));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = acked.lock().expect("lock").len();
    assert!(
        before_kill > 10,
        "writes were flowing before the kill ({before_kill})"
    );
    let killed_at = Instant::now();
    c.kill(leader);
    let new_leader = c.wait_leader(Duration::from_secs(20)).await;
    assert_ne!(new_leader, leader);
    // First acknowledged write among those sent after the kill.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first_after = loop {
        let first = acked
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, sent, _)| *sent > killed_at)
            .map(|(_, _, at)| *at)
            .min();
        if let Some(t) = first {
            break t - killed_at;
        }
        assert!(
            Instant::now() < deadline,
            "no write succeeded within 20 s after the leader was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "leader kill: first write sent after kill -9 of node {} acknowledged {first_after:?} after the kill",
        leader + 1
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let acked: BTreeSet<String> = acked
        .lock()
        .expect("lock")
        .iter()
        .map(|(id, _, _)| id.clone())
        .collect();
    println!(
        "acknowledged writes: {} ({} before the kill)",
        acked.len(),
        before_kill
    );

    let ids = |body: &Value| -> BTreeSet<String> {
        body["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .filter_map(|i| i["id"].as_str().map(str::to_string))
            .collect()
    };
    let (_, body, _) = c.get_json(new_leader, "/v1/services/load").await;
    let present = ids(&body);
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // The killed node restarts and catches up: its local (stale) read has the new data.
    c.spawn(leader);
    let want = present.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = c
            .client
            .get(c.url(leader, "/v1/services/load?consistency=stale"))
            .send()
            .await;
        if let Ok(r) = got {
            if let Ok(b) = r.json::<Value>().await {
                if b["instances"].as_array().is_some_and(|a| a.len() >= want) {
                    assert!(acked.is_subset(&ids(&b)));
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "restarted node did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It missed more entries than the leader keeps behind its snapshot, so it caught up by
    // installing a snapshot sent over the raft port.
    assert!(
        c.log_text(leader).contains("snapshot installed"),
        "the restarted node caught up through a snapshot"
    );
    let status = c.status(new_leader).await.expect("status");
    assert!(
        status["snapshot_index"].as_u64().expect("snapshot") > 0,
        "snapshots were taken: {status}"
    );

    // Whole-cluster stop and restart: everything is still there.
    for i in 0..3 {
        c.stop(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    let l = c.wait_leader(Duration::from_secs(30)).await;
    for idx in [l, (l + 1) % 3] {
        let (status, body, _) = c.get_json(idx, "/v1/services/load").await;
        assert_eq!(status, 200);
        assert_eq!(
            ids(&body),
            present,
            "node {} has all data after a full restart",
            idx + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_survive_a_zone_and_answer_503_without_quorum() {
    let mut c = TestCluster::start(5, TUNING).await;
    // Nodes 1,2 are zone-a; 3,4 zone-b; 5 zone-c.
    let r = c
        .put_instance(4, "inventory", "before", &instance("10.0.0.1", 80))
        .await
        .expect("put");
    assert!(r.status().is_success());
    c.kill(0);
    c.kill(1);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    assert!(leader >= 2);
    for idx in 2..5 {
        let r = c
            .put_instance(
                idx,
                "inventory",
                &format!("after-{idx}"),
                &instance("10.0.0.2", 81),
            )
            .await
            .expect("put");
        assert!(
            r.status().is_success(),
            "write through node {} with zone-a down",
            idx + 1
        );
    }
    for idx in 2..5 {
        let (status, body, _) = c.get_json(idx, "/v1/services/inventory").await;
        assert_eq!(status, 200);
        assert_eq!(body["instances"].as_array().map(Vec::len), Some(4));
    }
    // A third node down: no quorum. Writes and linearizable reads fail fast with 503 no-quorum.
    c.kill(2);
    for idx in [3, 4] {
        let t0 = Instant::now();
        let r = c
            .put_instance(idx, "inventory", "nope", &instance("10.0.0.3", 82))
            .await
            .expect("put answered");
        let took = t0.elapsed();
        assert_eq!(r.status(), 503, "write without quorum");
        assert!(header(r.headers(), "retry-after").is_some());
        let p: Value = r.json().await.expect("problem");
        assert!(
            p["type"] == "no-quorum" || p["type"] == "unavailable",
            "{p}"
        );
        assert!(took < Duration::from_secs(8), "bounded answer ({took:?})");
        let t0 = Instant::now();
        let (status, p, _) = c.get_json(idx, "/v1/services/inventory").await;
        let took_read = t0.elapsed();
        assert_eq!(status, 503, "linearizable read without quorum: {p}");
        assert_eq!(p["type"], "no-quorum");
        assert!(
            took_read < Duration::from_secs(8),
            "bounded answer ({took_read:?})"
        );
        println!(
            "no quorum: node {} answered write 503 in {took:?}, read 503 in {took_read:?}",
            idx + 1
        );
        // Stale reads still answer from local state.
        let (status, body, h) = c
            .get_json(idx, "/v1/services/inventory?consistency=stale")
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["instances"].as_array().map(Vec::len), Some(4));
        assert!(header(&h, "x-cairn-last-contact").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_unless_renewed_and_survive_a_leader_change() {
    let mut c = TestCluster::start(3, TUNING).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let f = c.others(leader);
    let leased = |port: u16| json!({"address": "10.0.0.7", "port": port, "ttl_seconds": 3});
    for (id, port) in [("kept", 1), ("dropped", 2)] {
        let r = c
            .put_instance(f[0], "api", id, &leased(port))
            .await
            .expect("put");
        assert_eq!(r.status(), 201);
    }
    let r = c
        .put_instance(f[0], "api", "forever", &instance("10.0.0.7", 3))
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    // Renew `kept` through a follower for longer than its TTL; let `dropped` run out.
    let healthy_ids = |b: &Value| -> BTreeSet<String> {
        b["instances"]
            .as_array()
            .expect("arr")
            .iter()
            .filter_map(|i| i["id"].as_str().map(str::to_string))
            .collect()
    };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        let r = c
            .client
            .put(c.url(f[1], "/v1/services/api/instances/kept/heartbeat"))
            .send()
            .await
            .expect("heartbeat");
        assert_eq!(r.status(), 200, "renewal through a follower");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let (_, body, _) = c.get_json(f[1], "/v1/services/api?healthy=true").await;
    assert_eq!(
        healthy_ids(&body),
        BTreeSet::from(["forever".to_string(), "kept".to_string()])
    );
    let (_, inst, _) = c.get_json(f[0], "/v1/services/api/instances/dropped").await;
    assert_eq!(
        inst["health"], "critical",
        "expired through the log, visible on followers"
    );
    // Heartbeat on an instance without a lease is a clear error; on a missing one, 404.
    let r = c
        .client
        .put(c.url(f[0], "/v1/services/api/instances/forever/heartbeat"))
        .send()
        .await
        .expect("hb");
    assert_eq!(r.status(), 400);
    let r = c
        .client
        .put(c.url(f[0], "/v1/services/api/instances/ghost/heartbeat"))
        .send()
        .await
        .expect("hb");
    assert_eq!(r.status(), 404);

    // Kill the leader while `kept` is renewed: the new leader grants a full TTL, nothing is mass-expired.
    let r = c
        .client
        .put(c.url(f[0], "/v1/services/api/instances/kept/heartbeat"))
        .send()
        .await
        .expect("hb");
    assert_eq!(r.status(), 200);
    c.kill(leader);
    let new_leader = c.wait_leader(Duration::from_secs(20)).await;
    let survivor = c.others(new_leader)[0];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let r = c
            .client
            .put(c.url(survivor, "/v1/services/api/instances/kept/heartbeat"))
            .send()
            .await
            .expect("hb");
        assert_eq!(r.status(), 200, "renewal after the leader change");
        let (_, body, _) = c.get_json(survivor, "/v1/services/api?healthy=true").await;
        assert!(
            healthy_ids(&body).contains("kept"),
            "renewed lease never expires across a leader change"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // A revived instance: heartbeat on `dropped` brings it back.
    let r = c
        .client
        .put(c.url(survivor, "/v1/services/api/instances/dropped/heartbeat"))
        .send()
        .await
        .expect("hb");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.expect("json")["revived"], true);
    let (_, inst, _) = c
        .get_json(new_leader, "/v1/services/api/instances/dropped")
        .await;
    assert_eq!(inst["health"], "passing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_can_be_added_as_learners_promoted_and_removed() {
    let mut c = TestCluster::start(3, TUNING).await;
    c.put_instance(0, "early", "e1", &instance("10.0.0.1", 80))
        .await
        .expect("put");
    let idx = c.prepare_extra_node();
    c.spawn(idx);
    let (code, text) = c.add_member(1, idx, false).await;
    assert_eq!(code, 200, "{text}");
    let status = c.status(0).await.expect("status");
    let role = |s: &Value, id: u64| {
        s["members"]
            .as_array()
            .expect("m")
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["role"].clone())
    };
    assert_eq!(role(&status, 4), Some(json!("learner")));
    // The learner catches up: its local (stale) read has the data.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .client
            .get(c.url(idx, "/v1/services/early?consistency=stale"))
            .send()
            .await;
        if let Ok(r) = r {
            let b: Value = r.json().await.unwrap_or(Value::Null);
            if b["instances"].as_array().map(Vec::len) == Some(1) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "learner never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Promote it.
    let (code, text) = c.add_member(2, idx, true).await;
    assert_eq!(code, 200, "{text}");
    let status = c.status(idx).await.expect("status");
    assert_eq!(role(&status, 4), Some(json!("voter")));
    // The new voter serves linearizable reads.
    let (code, _, _) = c.get_json(idx, "/v1/services/early").await;
    assert_eq!(code, 200);
    // Hand leadership to the new voter through a follower, then remove it (a leader removal).
    let r = c
        .client
        .post(c.url(1, "/v1/cluster/transfer-leader"))
        .json(&json!({"to": 4}))
        .send()
        .await
        .expect("transfer");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(c.status(0).await.expect("status")["leader"], 4);
    let r = c
        .client
        .post(c.url(1, "/v1/cluster/transfer-leader"))
        .json(&json!({"to": 9}))
        .send()
        .await
        .expect("transfer");
    assert_eq!(r.status(), 404, "unknown voter");
    // Remove it again.
    let r = c
        .client
        .delete(c.url(0, "/v1/cluster/members/4"))
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let status = c.status(0).await.expect("status");
    assert_eq!(role(&status, 4), None);
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));
    let r = c
        .put_instance(0, "early", "e2", &instance("10.0.0.1", 81))
        .await
        .expect("put");
    assert!(
        r.status().is_success(),
        "cluster keeps writing after the removal"
    );

    // A learner can be removed too (it never becomes a voter).
    let idx5 = c.prepare_extra_node();
    c.spawn(idx5);
    let (code, text) = c.add_member(0, idx5, false).await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        role(&c.status(0).await.expect("status"), c.nodes[idx5].id),
        Some(json!("learner"))
    );
    let r = c
        .client
        .delete(c.url(1, &format!("/v1/cluster/members/{}", c.nodes[idx5].id)))
        .send()
        .await
        .expect("remove learner");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let status = c.status(0).await.expect("status");
    assert_eq!(role(&status, c.nodes[idx5].id), None);
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));
}
