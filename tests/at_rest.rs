//! Encryption at rest and tamper detection, through real processes: no registry string reaches
//! the data directory in clear (WAL, SST, anything), and one flipped byte in a stored record
//! stops the node with an error naming the record.

mod common;

use std::path::Path;
use std::time::Duration;

use cairn::crypto::{Keyring, Sealer};
use cairn::storage::{log_record_key, snapshot_record_key, Store};
use common::TestCluster;
use serde_json::json;

const SERVICE: &str = "zanzibar-quartz-seven";
const META_VALUE: &str = "periwinkle-octopus-42";
const ADDRESS: &str = "marmalade-host.example";

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_readable_on_disk_and_a_flipped_byte_stops_the_node() {
    let tuning = "[raft]\nheartbeat_ms = 100\nelection_min_ms = 800\nelection_max_ms = 1600\nsnapshot_every = 30\nmax_in_snapshot_log_to_keep = 5\n";
    let mut c = TestCluster::start(3, tuning).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let follower = c.others(leader)[0];
    let body = json!({"address": ADDRESS, "port": 8443, "meta": {"owner-note": META_VALUE}, "tags": [META_VALUE]});
    let r = c
        .put_instance(follower, SERVICE, "zq-1", &body)
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    // Enough further writes that snapshots are built (and the service is inside them) and the
    // early log is purged; the distinctive strings then live in the WAL, SSTs and snapshots.
    for k in 0..60 {
        let r = c
            .put_instance(
                follower,
                SERVICE,
                &format!("zq-{}", k + 2),
                &json!({"address": ADDRESS, "port": 9000 + k}),
            )
            .await
            .expect("put");
        assert!(r.status().is_success());
    }
    let status = c.status(leader).await.expect("status");
    assert!(
        status["snapshot_index"].as_u64().unwrap_or(0) > 0,
        "a snapshot was built: {status}"
    );
    for i in 0..3 {
        c.stop(i);
    }

    let mut checked = 0;
    for node in &c.nodes {
        let mut files = vec![];
        files_under(&node.data_dir, &mut files);
        assert!(
            files
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "log")),
            "a WAL file exists"
        );
        assert!(
            files
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "sst")),
            "an SST file exists"
        );
        for f in &files {
            let bytes = std::fs::read(f).expect("read");
            checked += bytes.len();
            for needle in [SERVICE, META_VALUE, ADDRESS, "owner-note"] {
                assert!(
                    !contains(&bytes, needle.as_bytes()),
                    "`{needle}` found in clear in {}",
                    f.display()
                );
            }
        }
    }
    println!("scanned {checked} bytes under 3 data dirs: no registry string in clear");

    // Flip one byte of the newest log record of node 1: it must refuse to start, naming it.
    let keyring = Keyring::load(&c.dir.path().join("keyring.json")).expect("keyring");
    let db_dir = c.nodes[0].data_dir.join("db");
    let (cf, key, original) = {
        let store =
            Store::open(&db_dir, Sealer::new(keyring).expect("sealer"), 1).expect("open store");
        let last = store.last_log_index().expect("read").expect("some log");
        let (cf, key) = log_record_key(last);
        let original = store.raw_get(cf, &key).expect("raw").expect("present");
        let mut tampered = original.clone();
        let mid = tampered.len() / 2;
        tampered[mid] ^= 0x20;
        store.raw_put(cf, &key, &tampered).expect("put");
        (cf, key, original)
    };
    c.spawn(0);
    let exit = c
        .wait_exit(0, Duration::from_secs(20))
        .expect("node 1 must exit on a tampered record");
    assert!(!exit.success());
    let log = c.log_text(0);
    let index = u64::from_be_bytes(key);
    assert!(
        log.contains(&format!("logs/{index}")),
        "the error names the record: {log}"
    );
    assert!(
        log.contains("authentication failed"),
        "the error says why: {log}"
    );

    // Put it back; then tamper with the stored snapshot instead.
    {
        let store = Store::open(
            &db_dir,
            Sealer::new(Keyring::load(&c.dir.path().join("keyring.json")).expect("k"))
                .expect("sealer"),
            1,
        )
        .expect("open");
        store.raw_put(cf, &key, &original).expect("restore");
        let (scf, skey) = snapshot_record_key();
        let mut snap = store
            .raw_get(scf, skey)
            .expect("raw")
            .expect("snapshot stored");
        let last = snap.len() - 3;
        snap[last] ^= 0x01;
        store.raw_put(scf, skey, &snap).expect("put");
    }
    c.spawn(0);
    let exit = c
        .wait_exit(0, Duration::from_secs(20))
        .expect("node 1 must exit on a tampered snapshot");
    assert!(!exit.success());
    assert!(
        c.log_text(0).contains("snapshots/current"),
        "names the snapshot record"
    );
}
