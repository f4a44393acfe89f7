//! A measurement, not a test of speed: write and linearizable-read throughput through a
//! follower at 1 and 64 concurrent clients, printed as ops/s and as a ratio measured in the
//! same run (group commit is what makes the ratio large). Run with
//! `cargo test --test throughput -- --ignored --nocapture` (`NODES=1` for a single node, which
//! separates the replication round from the rest of the write path).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{instance, TestCluster};

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Write,
    Read,
    StaleRead,
}

async fn run(c: &Arc<TestCluster>, node: usize, clients: usize, per_client: usize, op: Op) -> f64 {
    let t0 = Instant::now();
    let mut tasks = vec![];
    for k in 0..clients {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..per_client {
                let ok = if op == Op::Write {
                    c.put_instance(
                        node,
                        "bench",
                        &format!("c{k}-{n}"),
                        &instance("10.0.0.1", 80),
                    )
                    .await
                    .is_ok_and(|r| r.status().is_success())
                } else {
                    let q = if op == Op::StaleRead {
                        "?consistency=stale"
                    } else {
                        ""
                    };
                    let url = c.url(node, &format!("/v1/services/bench/instances/c0-0{q}"));
                    c.client
                        .get(url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                };
                assert!(ok, "request failed");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    (clients * per_client) as f64 / t0.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run explicitly"]
async fn write_and_read_throughput_by_concurrency() {
    let n: usize = std::env::var("NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut c = TestCluster::start(n, "").await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let follower = c.others(leader).first().copied().unwrap_or(leader);
    let c = Arc::new(c);
    let wl = run(&c, leader, 1, 200, Op::Write).await;
    let w1 = run(&c, follower, 1, 200, Op::Write).await;
    let w64 = run(&c, follower, 64, 50, Op::Write).await;
    let r1 = run(&c, follower, 1, 200, Op::Read).await;
    let r64 = run(&c, follower, 64, 50, Op::Read).await;
    let s1 = run(&c, follower, 1, 200, Op::StaleRead).await;
    println!("writes on the leader:  1 client {wl:.0}/s");
    println!(
        "writes via a follower:  1 client {w1:.0}/s, 64 clients {w64:.0}/s (x{:.1})",
        w64 / w1
    );
    println!(
        "linearizable reads via a follower:  1 client {r1:.0}/s, 64 clients {r64:.0}/s (x{:.1})",
        r64 / r1
    );
    println!("stale reads (no raft round):  1 client {s1:.0}/s");
}
