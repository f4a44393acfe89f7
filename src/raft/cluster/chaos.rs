//! Planted bugs (the `chaos-bugs` cargo feature only): known ways to break linearizability,
//! switched on per node by `[chaos] bugs`, so the fault harness can show it catches each.
//! Nothing here is compiled into a normal build.

use super::{request_of, Cluster, ClusterError, Submitted, WriteOp};
use crate::config::PlantedBug;
use crate::raft::{Request, Response};

impl Cluster {
    pub(super) fn planted(&self, bug: PlantedBug) -> bool {
        self.inner.settings.planted_bugs.contains(&bug)
    }

    /// `early-ack`: answers a registry write with what applying it to the leader's current
    /// state would give, and lets raft commit it in the background (or lose it).
    pub(super) fn chaos_ack_before_commit(
        &self,
        req: &Request,
    ) -> Option<Result<Submitted, ClusterError>> {
        let Request::Registry(cmd) = req else {
            return None;
        };
        let (response, index) = self.inner.state.chaos_dry_run(cmd);
        let raft = self.inner.raft.clone();
        let req = req.clone();
        tokio::spawn(async move {
            let _ = raft.client_write(req).await;
        });
        Some(submitted(response, index))
    }

    /// `follower-apply`: applies a registry write to this follower's own state, outside the
    /// log, instead of forwarding it to the leader.
    pub(super) fn chaos_apply_here(
        &self,
        op: &WriteOp,
        caller: &str,
    ) -> Option<Result<Submitted, ClusterError>> {
        let Request::Registry(cmd) = request_of(op.clone(), caller, super::now_ms()) else {
            return None;
        };
        let (response, index) = self.inner.state.chaos_apply_unreplicated(&cmd);
        Some(submitted(response, index))
    }
}

fn submitted(response: Response, index: u64) -> Result<Submitted, ClusterError> {
    match response {
        Response::Denied(reason) => Err(ClusterError::Forbidden { reason }),
        response => Ok(Submitted { response, index }),
    }
}
