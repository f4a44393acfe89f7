//! Logical clients: each is single-threaded (one op at a time), bound to one node, and runs
//! one workload's ops until told to stop. A client whose op ended `info` continues under a
//! fresh process id, so no process ever has two ops whose outcome overlaps. Every completed
//! op also goes to `ops.jsonl` (workload, function, node, latency, outcome) for the summary
//! and the latency plot. Knows nothing of faults or checkers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::Api;
use crate::cluster::NodeInfo;
use crate::recorder::Journal;
use crate::workload::lease::LeaseClient;
use crate::workload::register::RegisterClient;
use crate::workload::set::SetClient;

/// How an operation ended, as the history records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Took effect (or, for a read, observed what it returned).
    Ok,
    /// Definitely took no effect.
    Fail,
    /// Unknown: may take effect at any time after its invoke.
    Info,
}

/// One completed operation (any workload), for statistics and the latency plot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    pub workload: String,
    pub f: String,
    pub process: u64,
    pub node: u64,
    /// ns on the run clock.
    pub invoke: u64,
    pub complete: u64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Hands out process ids; never the same one twice in a run.
#[derive(Debug, Clone, Default)]
pub struct ProcessIds(Arc<AtomicU64>);

impl ProcessIds {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// What a client knows about itself while running an op.
pub struct ClientCtx {
    /// The client's index (stable across process ids).
    pub index: usize,
    pub node: NodeInfo,
    pub api: Api,
    /// The current process id.
    pub process: u64,
    ids: ProcessIds,
    ops: Journal<OpRecord>,
}

impl ClientCtx {
    pub fn new(
        index: usize,
        node: NodeInfo,
        api: Api,
        ids: ProcessIds,
        ops: Journal<OpRecord>,
    ) -> ClientCtx {
        let process = ids.next();
        ClientCtx {
            index,
            node,
            api,
            process,
            ids,
            ops,
        }
    }

    /// Records a completed op in `ops.jsonl`.
    pub fn done(
        &self,
        workload: &str,
        f: &str,
        invoke: u64,
        complete: u64,
        outcome: Outcome,
        error: Option<String>,
    ) {
        let rec = OpRecord {
            workload: workload.to_owned(),
            f: f.to_owned(),
            process: self.process,
            node: self.node.id,
            invoke,
            complete,
            outcome,
            error,
        };
        self.ops.record(|_| rec);
    }
}

/// The workload a client runs.
pub enum WorkloadClient {
    Register(RegisterClient),
    Set(SetClient),
    Lease(LeaseClient),
}

/// Pause after a failed or unknown op, so a client facing a dead node does not spin.
const BACKOFF: Duration = Duration::from_millis(100);

/// Runs ops until `stop` turns true. An op in flight is always finished (each is bounded by
/// the client's timeout), so the history has no dangling invokes.
pub async fn run(mut ctx: ClientCtx, mut workload: WorkloadClient, stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let outcome = match &mut workload {
            WorkloadClient::Register(c) => c.step(&ctx).await,
            WorkloadClient::Set(c) => c.step(&ctx).await,
            WorkloadClient::Lease(c) => c.step(&ctx, &stop).await,
        };
        match outcome {
            Outcome::Ok => tokio::task::yield_now().await,
            Outcome::Fail => tokio::time::sleep(BACKOFF).await,
            Outcome::Info => {
                ctx.process = ctx.ids.next();
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}
