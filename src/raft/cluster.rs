//! The [`Cluster`] facade: what the public API asks of the replicated core. Any node serves any
//! request — writes and renewals run on the leader (forwarded over the raft listener when this
//! node is a follower), linearizable reads wait for a ReadIndex confirmed by the leader.
//!
//! Every call is bounded by the request timeout: without a quorum the answer is
//! [`ClusterError::NoQuorum`], never a hang. A write that times out may still commit later (its
//! outcome is unknown to the caller, as with any consensus system).

#[cfg(feature = "chaos-bugs")]
mod chaos;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::errors::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::type_config::async_runtime::watch::WatchReceiver;
use openraft::Instant as _;
use openraft::{ChangeMembers, ReadPolicy, ServerState};
use serde::{Deserialize, Serialize};

use super::leases::Leases;
use super::network::{PeerError, Peers};
use super::read_batch::ReadBatcher;
use super::{BackupState, Member, Raft, Request, Response};
use crate::authz::{AclCommand, AclOutcome, Action, Resource};
use crate::config::PlantedBug;
use crate::identity::{CertIdentities, Identity};
use crate::registry::{Command, Health, InstanceSpec, LeaseRef, Outcome, Precondition};
use crate::storage::SharedState;
use crate::tls::{CertValidity, TlsMaterial};

/// A write as the API receives it; the leader turns it into a [`Command`] stamped with its clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WriteOp {
    Register {
        service: String,
        id: String,
        spec: InstanceSpec,
        precondition: Precondition,
    },
    Deregister {
        service: String,
        id: String,
        precondition: Precondition,
    },
    /// A policy change (roles, bindings, bootstrap).
    Acl(AclCommand),
    /// Replace the registry and policy with a backup's.
    Restore {
        state: Box<BackupState>,
        only_if_empty: bool,
    },
    /// Name the cluster (first proposal wins).
    SetClusterId { id: String },
}

/// How long a restore may take end to end (it carries the whole state in one entry).
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// The applied result of a registry write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteOutcome {
    pub outcome: Outcome,
    /// Log index of the entry that carried the write.
    pub index: u64,
}

/// The applied result of a policy change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AclWriteOutcome {
    pub outcome: AclOutcome,
    /// Log index of the entry that carried the change.
    pub index: u64,
}

/// What the state machine answered for any proposed request (travels between nodes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Submitted {
    response: Response,
    index: u64,
}

/// The result of a lease renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatOutcome {
    pub ttl_seconds: u32,
    /// True when the instance was Critical and this renewal revived it (through the log).
    pub revived: bool,
}

/// Why the cluster could not answer. Travels between nodes, so it is serializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ClusterError {
    /// No leader could confirm the request with a quorum within the request timeout.
    #[error("no quorum: {reason}")]
    NoQuorum { reason: String },
    /// The request may or may not have taken effect, or this node cannot serve it now.
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    /// The node asked is not (or no longer) the leader; the caller retries.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A conflicting operation is in progress (e.g. another membership change).
    #[error("conflict: {reason}")]
    Conflict { reason: String },
    /// The caller may not do this (decided by the leader's policy or ownership check).
    #[error("forbidden: {reason}")]
    Forbidden { reason: String },
}

/// Timing knobs for the facade.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Upper bound for any request, including the time to find that there is no quorum.
    pub request_timeout: Duration,
    pub lease_check_interval: Duration,
    pub reap_after: Duration,
    /// The SPIFFE trust domain, to read peer node certificates.
    pub trust_domain: String,
    /// Bugs planted for the fault harness (empty unless built with `chaos-bugs`).
    pub planted_bugs: Vec<PlantedBug>,
}

/// One member in [`ClusterStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    pub api: String,
    pub raft: String,
    pub zone: String,
    /// `voter` or `learner`.
    pub role: String,
    /// Milliseconds since the leader last heard from it (known on the leader, or fetched from it).
    pub last_contact_ms: Option<u64>,
    /// Highest log index known replicated to it (leader's view).
    pub match_index: Option<u64>,
    /// The member's certificate and trusted CAs with their remaining validity, as the
    /// member itself reports them (absent if it did not answer in time).
    pub tls: Option<CertValidity>,
    /// Other facts the member reports about itself: its keyring (active key id, keys),
    /// records per key id, its last scheduled backup.
    #[serde(default)]
    pub node: BTreeMap<String, serde_json::Value>,
}

/// `GET /v1/cluster/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    /// SHA-256 of the encoded registry and policy at `digest_index`: replicas that applied the same log
    /// report the same digest (the state machine is deterministic).
    pub state_digest: String,
    pub digest_index: u64,
    pub members: Vec<MemberStatus>,
}

/// The leader's view of its followers, served to followers for their status page.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LeaderView {
    pub last_contact_ms: BTreeMap<u64, Option<u64>>,
    pub match_index: BTreeMap<u64, Option<u64>>,
}

struct Inner {
    id: u64,
    raft: Raft,
    state: SharedState,
    peers: Peers,
    leases: Leases,
    settings: ClusterSettings,
    /// This node's certificate material (its validity is reported in the status).
    tls: TlsMaterial,
    /// Facts this node reports about itself in the status (see [`Cluster::set_fact`]).
    facts: Mutex<BTreeMap<String, serde_json::Value>>,
    /// When this node last received an append-entries from a leader.
    last_leader_contact: Mutex<Option<Instant>>,
    /// On a follower: reads share requests to the leader they are for.
    reads: Mutex<Option<(u64, Arc<ReadBatcher>)>>,
    /// On the leader: every read-index request (its own and its followers') shares one
    /// quorum round.
    leader_reads: Arc<ReadBatcher>,
    /// Peers' identities from their certificates (shared with the API listener).
    identities: CertIdentities,
}

/// Cheap cloneable handle on the node's replicated core.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// How often a node without a known leader re-checks while waiting for an election.
const LEADER_POLL: Duration = Duration::from_millis(50);

/// A forwarded request gives the leader this much less time than the caller has left, so the
/// leader's own answer (e.g. no-quorum) arrives before the forwarding call times out.
const FORWARD_MARGIN: Duration = Duration::from_millis(300);

fn budget_ms(deadline: Instant) -> u64 {
    millis(remaining(deadline).saturating_sub(FORWARD_MARGIN))
}

/// The log entry for a client write: the caller becomes the owner (or the deregistering
/// identity) and the leader's clock stamps it.
fn request_of(op: WriteOp, caller: &str, now_ms: u64) -> Request {
    match op {
        WriteOp::Register {
            service,
            id,
            spec,
            precondition,
        } => Request::Registry(Command::Register {
            service,
            id,
            spec,
            owner: caller.to_string(),
            precondition,
            now_ms,
        }),
        WriteOp::Deregister {
            service,
            id,
            precondition,
        } => Request::Registry(Command::Deregister {
            service,
            id,
            precondition,
            now_ms,
            by: caller.to_string(),
        }),
        WriteOp::Acl(cmd) => Request::Acl {
            cmd,
            by: caller.to_string(),
        },
        WriteOp::Restore {
            state,
            only_if_empty,
        } => Request::Restore {
            state,
            by: caller.to_string(),
            now_ms,
            only_if_empty,
        },
        WriteOp::SetClusterId { id } => Request::SetClusterId { id },
    }
}

impl Cluster {
    pub fn new(
        id: u64,
        raft: Raft,
        state: SharedState,
        peers: Peers,
        settings: ClusterSettings,
        tls: TlsMaterial,
    ) -> Cluster {
        let identities = CertIdentities::new(&settings.trust_domain);
        Cluster {
            inner: Arc::new(Inner {
                id,
                raft,
                state,
                peers,
                leases: Leases::default(),
                settings,
                tls,
                facts: Mutex::new(BTreeMap::new()),
                last_leader_contact: Mutex::new(None),
                reads: Mutex::new(None),
                leader_reads: Arc::default(),
                identities,
            }),
        }
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The applied state (read side).
    pub fn state(&self) -> &SharedState {
        &self.inner.state
    }

    /// Reads peers' identities from their certificates, in this node's trust domain.
    pub fn identities(&self) -> &CertIdentities {
        &self.inner.identities
    }

    /// Whether `id` is in the current membership (voter or learner).
    pub fn is_member(&self, id: u64) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        m.membership_config.membership().get_node(&id).is_some()
    }

    pub fn request_timeout(&self) -> Duration {
        self.inner.settings.request_timeout
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.settings.request_timeout
    }

    /// The current leader as this node knows it, with its address.
    pub fn leader(&self) -> Option<(u64, Member)> {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    fn leader_term(&self) -> Option<u64> {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        (m.state == ServerState::Leader && m.current_leader == Some(self.inner.id))
            .then_some(m.current_term)
    }

    /// Waits (bounded) until some leader is known.
    async fn leader_by(&self, deadline: Instant) -> Result<(u64, Member), ClusterError> {
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() + LEADER_POLL > deadline {
                return Err(ClusterError::NoQuorum {
                    reason: "no leader elected".into(),
                });
            }
            tokio::time::sleep(LEADER_POLL).await;
        }
    }

    /// Records that a leader just reached this node (called by the append-entries handler).
    pub(crate) fn note_leader_contact(&self) {
        *self
            .inner
            .last_leader_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// How long ago this node heard from the leader: 0 on the leader itself, `None` if never.
    pub fn last_contact_ms(&self) -> Option<u64> {
        if self.leader_term().is_some() {
            return Some(0);
        }
        let last = *self
            .inner
            .last_leader_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        last.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    // ---- writes ----

    /// Executes a registry write on the leader, forwarding it if needed, and returns the
    /// applied outcome. `caller` is the authenticated identity; the state machine checks its
    /// permission again at the entry's log position.
    pub async fn write(&self, op: WriteOp, caller: &str) -> Result<WriteOutcome, ClusterError> {
        let s = self.submit(op, caller).await?;
        match s.response {
            Response::Registry(outcome) => Ok(WriteOutcome {
                outcome: *outcome,
                index: s.index,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Executes a policy change on the leader (forwarded if needed).
    pub async fn acl_write(
        &self,
        cmd: AclCommand,
        caller: &str,
    ) -> Result<AclWriteOutcome, ClusterError> {
        let s = self.submit(WriteOp::Acl(cmd), caller).await?;
        match s.response {
            Response::Acl(outcome) => Ok(AclWriteOutcome {
                outcome,
                index: s.index,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Replaces the cluster state with `state` (a decoded backup) through the log. Returns
    /// whether it was applied (`only_if_empty` skips a cluster that has data) and its index.
    pub async fn restore(
        &self,
        state: BackupState,
        caller: &str,
        only_if_empty: bool,
    ) -> Result<(bool, u64), ClusterError> {
        let op = WriteOp::Restore {
            state: Box::new(state),
            only_if_empty,
        };
        let s = self
            .submit_by(op, caller, Instant::now() + RESTORE_TIMEOUT)
            .await?;
        match s.response {
            Response::Restored { applied } => Ok((applied, s.index)),
            other => Err(unexpected(&other)),
        }
    }

    /// Proposes the cluster's id; the first one applied wins.
    pub async fn set_cluster_id(&self, id: String, caller: &str) -> Result<(), ClusterError> {
        self.submit(WriteOp::SetClusterId { id }, caller)
            .await
            .map(|_| ())
    }

    async fn submit(&self, op: WriteOp, caller: &str) -> Result<Submitted, ClusterError> {
        self.submit_by(op, caller, self.deadline()).await
    }

    async fn submit_by(
        &self,
        op: WriteOp,
        caller: &str,
        deadline: Instant,
    ) -> Result<Submitted, ClusterError> {
        loop {
            let (leader, node) = self.leader_by(deadline).await?;
            #[cfg(feature = "chaos-bugs")]
            if leader != self.inner.id && self.planted(PlantedBug::FollowerApply) {
                if let Some(applied) = self.chaos_apply_here(&op, caller) {
                    return applied;
                }
            }
            let res = if leader == self.inner.id {
                self.write_local(op.clone(), caller, deadline).await
            } else {
                let req = Forwarded {
                    caller: caller.to_string(),
                    budget_ms: budget_ms(deadline),
                    op: op.clone(),
                };
                self.forward(&node, "/internal/write", &req, deadline).await
            };
            match res {
                Err(ClusterError::NotLeader { .. }) if Instant::now() + LEADER_POLL < deadline => {
                    tokio::time::sleep(LEADER_POLL).await;
                }
                other => return settle(other),
            }
        }
    }

    /// Proposes `op` through this node's raft, which must be the leader. The caller string is
    /// the authenticated identity (from the TLS layer, or from a forwarding node's request).
    pub(crate) async fn write_local(
        &self,
        op: WriteOp,
        caller: &str,
        deadline: Instant,
    ) -> Result<Submitted, ClusterError> {
        let req = request_of(op, caller, now_ms());
        #[cfg(feature = "chaos-bugs")]
        if self.planted(PlantedBug::EarlyAck) {
            if let Some(acked) = self.chaos_ack_before_commit(&req) {
                return acked;
            }
        }
        self.propose_request(req, deadline).await
    }

    /// Proposes a registry command of the leader's own (lease expiry, revival).
    async fn propose(&self, cmd: Command, deadline: Instant) -> Result<WriteOutcome, ClusterError> {
        let s = self
            .propose_request(Request::Registry(cmd), deadline)
            .await?;
        match s.response {
            Response::Registry(outcome) => Ok(WriteOutcome {
                outcome: *outcome,
                index: s.index,
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn propose_request(
        &self,
        req: Request,
        deadline: Instant,
    ) -> Result<Submitted, ClusterError> {
        let fut = self.inner.raft.client_write(req);
        match tokio::time::timeout(remaining(deadline), fut).await {
            Err(_) => Err(ClusterError::NoQuorum {
                reason: "write not committed within the request timeout".into(),
            }),
            Ok(Ok(resp)) => match resp.data {
                Response::Denied(reason) => Err(ClusterError::Forbidden { reason }),
                response => Ok(Submitted {
                    response,
                    index: resp.log_id.index,
                }),
            },
            Ok(Err(e)) => Err(write_error(e)),
        }
    }

    async fn forward<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        leader: &Member,
        path: &str,
        req: &Req,
        deadline: Instant,
    ) -> Result<Resp, ClusterError> {
        let res: Result<Result<Resp, ClusterError>, PeerError> = self
            .inner
            .peers
            .call(&leader.raft, path, req, remaining(deadline))
            .await;
        match res {
            Ok(r) => r,
            // Never delivered: safe to retry once the leader is known again.
            Err(e @ PeerError::Unreachable { .. }) => {
                tracing::debug!(error = %e, "leader unreachable; waiting for a new leader");
                Err(ClusterError::NotLeader { leader: None })
            }
            Err(e) => {
                tracing::warn!(error = %e, path, "forwarding to the leader failed");
                Err(ClusterError::Unavailable {
                    reason: "the leader did not answer; the outcome is unknown".into(),
                })
            }
        }
    }

    // ---- reads ----

    /// A linearizable read barrier: returns once this node's applied state includes every write
    /// acknowledged before the call (ReadIndex confirmed by a quorum heartbeat on the leader).
    /// Concurrent barriers share rounds ([`ReadBatcher`]): on the leader one quorum round, on
    /// a follower one request to the leader it currently knows.
    pub async fn read_barrier(&self) -> Result<u64, ClusterError> {
        #[cfg(feature = "chaos-bugs")]
        if self.planted(PlantedBug::StaleReads) {
            return Ok(self.inner.state.applied_index());
        }
        let deadline = self.deadline();
        loop {
            let (leader, node) = self.leader_by(deadline).await?;
            let res = if leader == self.inner.id {
                self.read_index_local(deadline).await
            } else {
                self.read_index_from(leader, node, deadline).await
            };
            match res {
                Ok(index) => {
                    let wait = self.inner.state.wait_applied(index);
                    return match tokio::time::timeout(remaining(deadline), wait).await {
                        Ok(()) => Ok(index),
                        Err(_) => Err(ClusterError::Unavailable {
                            reason: format!("node is catching up (read index {index})"),
                        }),
                    };
                }
                Err(ClusterError::NotLeader { .. }) if Instant::now() + LEADER_POLL < deadline => {
                    tokio::time::sleep(LEADER_POLL).await;
                }
                Err(e) => return settle(Err(e)),
            }
        }
    }

    /// On a follower: a read index from `leader`, shared with the other reads waiting for the
    /// same leader. Reads for a newly known leader never queue behind a round that is stuck
    /// on the old one.
    async fn read_index_from(
        &self,
        leader: u64,
        node: Member,
        deadline: Instant,
    ) -> Result<u64, ClusterError> {
        let batcher = {
            let mut current = self.inner.reads.lock().unwrap_or_else(|p| p.into_inner());
            match &*current {
                Some((id, b)) if *id == leader => b.clone(),
                _ => {
                    let b = Arc::new(ReadBatcher::default());
                    *current = Some((leader, b.clone()));
                    b
                }
            }
        };
        let me = self.clone();
        let round = batcher.read_index(move || {
            let (me, node) = (me.clone(), node.clone());
            async move {
                let deadline = me.deadline();
                let budget_ms = millis(remaining(deadline));
                me.forward(&node, "/internal/read-index", &budget_ms, deadline)
                    .await
            }
        });
        match tokio::time::timeout(remaining(deadline), round).await {
            Ok(r) => r,
            Err(_) => Err(ClusterError::NoQuorum {
                reason: "no read index from the leader within the request timeout".into(),
            }),
        }
    }

    /// On the leader: confirms leadership with a quorum and returns the read index. Requests
    /// from this node and its followers share quorum rounds.
    pub(crate) async fn read_index_local(&self, deadline: Instant) -> Result<u64, ClusterError> {
        let me = self.clone();
        let round = self.inner.leader_reads.read_index(move || {
            let me = me.clone();
            async move { me.read_index_raft().await }
        });
        match tokio::time::timeout(remaining(deadline), round).await {
            Ok(r) => r,
            Err(_) => Err(ClusterError::NoQuorum {
                reason: "leadership not confirmed by a quorum in time".into(),
            }),
        }
    }

    /// One ReadIndex round through openraft (bounded by the request timeout).
    async fn read_index_raft(&self) -> Result<u64, ClusterError> {
        let fut = self.inner.raft.get_read_linearizer(ReadPolicy::ReadIndex);
        match tokio::time::timeout(self.request_timeout(), fut).await {
            Err(_) => Err(ClusterError::NoQuorum {
                reason: "leadership not confirmed by a quorum in time".into(),
            }),
            Ok(Ok(lin)) => Ok(lin.read_log_id().index()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(ClusterError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e)))) => {
                Err(ClusterError::NoQuorum {
                    reason: e.to_string(),
                })
            }
            Ok(Err(e)) => Err(ClusterError::Unavailable {
                reason: e.to_string(),
            }),
        }
    }

    // ---- leases ----

    /// Renews the lease of an instance (on the leader; forwarded otherwise). Not logged unless
    /// the instance had expired, in which case it is revived through the log.
    pub async fn heartbeat(
        &self,
        service: &str,
        id: &str,
        caller: &str,
    ) -> Result<HeartbeatOutcome, ClusterError> {
        let deadline = self.deadline();
        loop {
            let (leader, node) = self.leader_by(deadline).await?;
            let res = if leader == self.inner.id {
                self.heartbeat_local(service, id, caller, deadline).await
            } else {
                let req = ForwardedHeartbeat {
                    caller: caller.to_string(),
                    budget_ms: budget_ms(deadline),
                    service: service.to_string(),
                    id: id.to_string(),
                };
                self.forward(&node, "/internal/heartbeat", &req, deadline)
                    .await
            };
            match res {
                Err(ClusterError::NotLeader { .. }) if Instant::now() + LEADER_POLL < deadline => {
                    tokio::time::sleep(LEADER_POLL).await;
                }
                other => return settle(other),
            }
        }
    }

    pub(crate) async fn heartbeat_local(
        &self,
        service: &str,
        id: &str,
        caller: &str,
        deadline: Instant,
    ) -> Result<HeartbeatOutcome, ClusterError> {
        // Each pass confirms leadership afresh; a pass ends early only while the keeper's
        // expiry of this lease is in flight (see the Passing arm).
        loop {
            let Some(term) = self.leader_term() else {
                return Err(ClusterError::NotLeader {
                    leader: self.leader().map(|l| l.0),
                });
            };
            // A leader cut off from the majority still believes it leads until its own election
            // timeout; a renewal it acknowledged then would be unknown to the new leader, which
            // would expire the instance inside its acknowledged TTL. So a renewal is acknowledged
            // only after a quorum confirms this leadership (the ReadIndex round of reads), and
            // only in the term it was confirmed for. Found by jepsen-like's lease workload.
            self.read_index_local(deadline).await?;
            if self.leader_term() != Some(term) {
                return Err(ClusterError::NotLeader {
                    leader: self.leader().map(|l| l.0),
                });
            }
            // The leader's applied state holds every acknowledged registration and policy change
            // (client_write returns after apply on the leader), so these checks are current.
            // Renewals are not logged, so the leader is where they are authorized.
            let inst = {
                let s = self.inner.state.read();
                let who: Identity = caller.parse().map_err(|_| ClusterError::Forbidden {
                    reason: format!("{caller:?} is not an identity"),
                })?;
                let resource = Resource::Service(service);
                s.policy
                    .authorize(&who, Action::Heartbeat, resource)
                    .map_err(|d| ClusterError::Forbidden {
                        reason: d.to_string(),
                    })?;
                let inst = s.registry.instance(service, id).cloned();
                if let Some(i) = &inst {
                    if i.registered_by != caller && !s.policy.allows(&who, Action::Admin, resource)
                    {
                        return Err(ClusterError::Forbidden {
                            reason: not_owner(service, id, &i.registered_by),
                        });
                    }
                }
                inst
            };
            let Some(inst) = inst else {
                return Err(ClusterError::NotFound {
                    what: format!("instance {service}/{id}"),
                });
            };
            let Some(ttl_seconds) = inst.ttl_seconds else {
                return Err(ClusterError::Invalid {
                    field: "ttl_seconds".into(),
                    message: "instance was registered without a lease; nothing to renew".into(),
                });
            };
            match inst.health {
                Health::Passing => {
                    if self
                        .inner
                        .leases
                        .renew(term, &inst, Instant::now())
                        .is_some()
                    {
                        return Ok(HeartbeatOutcome {
                            ttl_seconds,
                            revived: false,
                        });
                    }
                    // The keeper has proposed this lease's expiry: acknowledging a plain renewal
                    // now would be undone when it commits. Wait for it, then renew or revive.
                    // Found by jepsen-like's lease workload under the net nemesis.
                    if Instant::now() + LEADER_POLL >= deadline {
                        return Err(ClusterError::Unavailable {
                            reason: "the lease is being expired; retry".into(),
                        });
                    }
                    tokio::time::sleep(LEADER_POLL).await;
                }
                Health::Critical => {
                    let lease = LeaseRef {
                        service: inst.service,
                        id: inst.id,
                        modify_index: inst.modify_index,
                    };
                    let res = self
                        .propose(
                            Command::Revive {
                                lease,
                                now_ms: now_ms(),
                            },
                            deadline,
                        )
                        .await?;
                    return match res.outcome {
                        Outcome::Leases { changed: 1 } => Ok(HeartbeatOutcome {
                            ttl_seconds,
                            revived: true,
                        }),
                        // Changed in between (re-registered or removed): let the client retry.
                        _ => Err(ClusterError::Conflict {
                            reason: "instance changed during renewal; retry".into(),
                        }),
                    };
                }
            }
        }
    }

    /// Time left on a lease, when this node is the leader tracking it.
    pub fn lease_remaining(&self, service: &str, id: &str) -> Option<Duration> {
        self.leader_term()?;
        self.inner.leases.remaining(service, id, Instant::now())
    }

    /// The lease keeper: on the leader, proposes expiry for leases past their deadline and
    /// removal of instances critical for longer than `reap_after`. Runs until `shutdown`.
    pub async fn run_lease_keeper(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.inner.settings.lease_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let term = self.leader_term();
            // The walk covers every leased instance: it runs on a copy (O(1), the maps are
            // persistent) so applies never wait for it.
            let due = {
                let registry = self.inner.state.read().registry.clone();
                self.inner.leases.tick(
                    term,
                    &registry,
                    Instant::now(),
                    now_ms(),
                    self.inner.settings.reap_after,
                )
            };
            let deadline = self.deadline();
            if !due.expired.is_empty() {
                let n = due.expired.len();
                // Renewals of these wait until the expiry is applied. If it is not known to
                // be, the marks stay (the entry may still commit) until a later proposal
                // applies or the term changes.
                self.inner.leases.mark_expiring(&due.expired);
                match self
                    .propose(
                        Command::ExpireLeases {
                            leases: due.expired.clone(),
                            now_ms: now_ms(),
                        },
                        deadline,
                    )
                    .await
                {
                    Ok(_) => {
                        self.inner.leases.clear_expiring(&due.expired);
                        tracing::info!(count = n, "leases expired");
                    }
                    Err(e) => tracing::warn!(error = %e, "lease expiry not committed; will retry"),
                }
            }
            if !due.reap.is_empty() {
                let n = due.reap.len();
                match self
                    .propose(
                        Command::Reap {
                            leases: due.reap,
                            now_ms: now_ms(),
                        },
                        deadline,
                    )
                    .await
                {
                    Ok(_) => tracing::info!(count = n, "expired instances reaped"),
                    Err(e) => tracing::warn!(error = %e, "reap not committed; will retry"),
                }
            }
        }
    }

    // ---- membership ----

    /// Adds a node: first as a learner (it catches up), then, if `voter`, promotes it.
    pub async fn add_member(
        &self,
        id: u64,
        member: Member,
        voter: bool,
    ) -> Result<ClusterStatus, ClusterError> {
        // Catching up a new node may take longer than one request timeout.
        let deadline = Instant::now() + self.inner.settings.request_timeout * 6;
        self.membership(ForwardedMember::Add { id, member, voter }, deadline)
            .await?;
        Ok(self.status().await)
    }

    /// Runs a membership operation on the leader: here, or forwarded to it.
    async fn membership(&self, op: ForwardedMember, deadline: Instant) -> Result<(), ClusterError> {
        let (leader, node) = self.leader_by(deadline).await?;
        if leader == self.inner.id {
            self.membership_local(op).await
        } else {
            settle(
                self.forward(&node, "/internal/members", &op, deadline)
                    .await,
            )
        }
    }

    /// A membership operation on this node, which must be the leader.
    pub(crate) async fn membership_local(&self, op: ForwardedMember) -> Result<(), ClusterError> {
        if self.leader_term().is_none() {
            return Err(ClusterError::NotLeader {
                leader: self.leader().map(|l| l.0),
            });
        }
        match op {
            ForwardedMember::Add { id, member, voter } => {
                self.add_member_local(id, member, voter).await
            }
            ForwardedMember::Remove { id } => self.remove_member_local(id).await,
            ForwardedMember::TransferLeader { to } => self.transfer_leader_local(to).await,
        }
    }

    async fn add_member_local(
        &self,
        id: u64,
        member: Member,
        voter: bool,
    ) -> Result<(), ClusterError> {
        let raft = &self.inner.raft;
        if raft.voter_ids().any(|v| v == id) {
            return Err(ClusterError::Conflict {
                reason: format!("node {id} is already a voter"),
            });
        }
        raft.add_learner(id, member, true)
            .await
            .map_err(write_error)?;
        if voter {
            raft.change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                .await
                .map_err(write_error)?;
        }
        tracing::info!(node = id, voter, "member added");
        Ok(())
    }

    /// Removes a node (voter or learner) from the cluster.
    pub async fn remove_member(&self, id: u64) -> Result<ClusterStatus, ClusterError> {
        self.membership(ForwardedMember::Remove { id }, self.deadline())
            .await?;
        Ok(self.status().await)
    }

    async fn remove_member_local(&self, id: u64) -> Result<(), ClusterError> {
        let raft = &self.inner.raft;
        let is_voter = raft.voter_ids().any(|v| v == id);
        let is_learner = raft.learner_ids().any(|v| v == id);
        if !is_voter && !is_learner {
            return Err(ClusterError::NotFound {
                what: format!("member {id}"),
            });
        }
        if is_voter {
            if raft.voter_ids().count() <= 1 {
                return Err(ClusterError::Conflict {
                    reason: "cannot remove the last voter".into(),
                });
            }
            // `retain = false` drops the node entirely in the same change; a second change
            // is not possible when the node removed is this leader (it steps down).
            raft.change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                .await
                .map_err(write_error)?;
        } else {
            raft.change_membership(ChangeMembers::RemoveNodes([id].into()), false)
                .await
                .map_err(write_error)?;
        }
        tracing::info!(node = id, "member removed");
        Ok(())
    }

    /// Hands leadership to voter `to` and waits (bounded) until it has taken over.
    pub async fn transfer_leader(&self, to: u64) -> Result<ClusterStatus, ClusterError> {
        let deadline = self.deadline();
        self.membership(ForwardedMember::TransferLeader { to }, deadline)
            .await?;
        loop {
            if self.leader().map(|l| l.0) == Some(to) {
                return Ok(self.status().await);
            }
            if Instant::now() + LEADER_POLL > deadline {
                return Err(ClusterError::Unavailable {
                    reason: format!("node {to} did not take over within the request timeout"),
                });
            }
            tokio::time::sleep(LEADER_POLL).await;
        }
    }

    async fn transfer_leader_local(&self, to: u64) -> Result<(), ClusterError> {
        let raft = &self.inner.raft;
        if !raft.voter_ids().any(|v| v == to) {
            return Err(ClusterError::NotFound {
                what: format!("voter {to}"),
            });
        }
        if to == self.inner.id {
            return Ok(());
        }
        raft.trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| ClusterError::Unavailable {
                reason: format!("raft stopped: {e}"),
            })?;
        tracing::info!(to, "leadership transfer requested");
        Ok(())
    }

    // ---- status ----

    pub(crate) fn leader_view(&self) -> Option<LeaderView> {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        let heartbeat = m.heartbeat.as_ref()?;
        let mut view = LeaderView::default();
        view.last_contact_ms.insert(self.inner.id, Some(0));
        for (id, at) in heartbeat {
            let ms = at.as_ref().map(|t| millis((*t).into_inner().elapsed()));
            view.last_contact_ms
                .insert(*id, if *id == self.inner.id { Some(0) } else { ms });
        }
        if let Some(rep) = m.replication.as_ref() {
            for (id, matched) in rep {
                view.match_index
                    .insert(*id, matched.as_ref().map(|l| l.index));
            }
        }
        Some(view)
    }

    pub async fn status(&self) -> ClusterStatus {
        let (digest_index, state_digest) = {
            let s = self.inner.state.read();
            let bytes = crate::storage::encode(&(&s.registry, &s.policy));
            let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
            (
                s.last_applied.map_or(0, |l| l.index),
                hex::encode(digest.as_ref()),
            )
        };
        let (mut status, leader_node) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow_watched();
            let membership = m.membership_config.membership();
            let voters: Vec<u64> = membership.voter_ids().collect();
            let members = membership
                .nodes()
                .map(|(id, n)| MemberStatus {
                    id: *id,
                    api: n.api.clone(),
                    raft: n.raft.clone(),
                    zone: n.zone.clone(),
                    role: if voters.contains(id) {
                        "voter"
                    } else {
                        "learner"
                    }
                    .to_string(),
                    last_contact_ms: None,
                    match_index: None,
                    tls: None,
                    node: BTreeMap::new(),
                })
                .collect();
            let leader_node = m
                .current_leader
                .and_then(|l| membership.get_node(&l).cloned().map(|n| (l, n)));
            let state = match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            };
            (
                ClusterStatus {
                    node_id: self.inner.id,
                    state: state.to_string(),
                    leader: m.current_leader,
                    term: m.current_term,
                    commit_index: m.cluster_committed.as_ref().map_or(0, |l| l.index),
                    applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
                    last_log_index: m.last_log_index.unwrap_or(0),
                    snapshot_index: m.snapshot.as_ref().map_or(0, |l| l.index),
                    state_digest,
                    digest_index,
                    members,
                },
                leader_node,
            )
        };
        let view = match (self.leader_view(), leader_node) {
            (Some(v), _) => Some(v),
            (None, Some((_, node))) => {
                let deadline = Instant::now() + Duration::from_secs(1);
                self.forward::<_, LeaderView>(&node, "/internal/leader-view", &(), deadline)
                    .await
                    .ok()
            }
            (None, None) => None,
        };
        if let Some(view) = view {
            for m in &mut status.members {
                m.last_contact_ms = view.last_contact_ms.get(&m.id).copied().flatten();
                m.match_index = view.match_index.get(&m.id).copied().flatten();
            }
        }
        // Each member reports its own certificate validity; ask them all at once.
        let probes = status.members.iter().map(|m| {
            let (id, raft) = (m.id, m.raft.clone());
            async move {
                if id == self.inner.id {
                    return (Some(self.inner.tls.validity()), self.facts_json());
                }
                let probe: Result<super::Probe, _> = self
                    .inner
                    .peers
                    .call(&raft, "/internal/probe", &(), Duration::from_secs(1))
                    .await;
                match probe {
                    Ok(p) => (p.tls, p.facts),
                    Err(_) => (None, String::new()),
                }
            }
        });
        let answers = futures::future::join_all(probes).await;
        for (m, (tls, facts)) in status.members.iter_mut().zip(answers) {
            m.tls = tls;
            m.node = serde_json::from_str(&facts).unwrap_or_default();
        }
        status
    }

    /// This node's certificate validity.
    pub fn tls_validity(&self) -> CertValidity {
        self.inner.tls.validity()
    }

    /// Records a fact this node reports in every member's view of the status.
    pub fn set_fact(&self, key: &str, value: serde_json::Value) {
        self.inner
            .facts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), value);
    }

    /// This node's facts, as JSON text (it travels in the bincode-encoded probe answer).
    pub fn facts_json(&self) -> String {
        let facts = self.inner.facts.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_string(&*facts).unwrap_or_default()
    }

    /// Whether this node is the leader now.
    pub fn is_leader(&self) -> bool {
        self.leader_term().is_some()
    }
}

/// The final answer of a retry loop: still having no reachable leader when time runs out
/// means no quorum (a `NotLeader` request was never applied, so the outcome is known).
fn settle<T>(r: Result<T, ClusterError>) -> Result<T, ClusterError> {
    match r {
        Err(ClusterError::NotLeader { leader }) => Err(ClusterError::NoQuorum {
            reason: match leader {
                Some(id) => format!("leader {id} did not answer in time"),
                None => "no reachable leader".into(),
            },
        }),
        other => other,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn write_error(
    e: RaftError<super::TypeConfig, ClientWriteError<super::TypeConfig>>,
) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ClusterError::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => ClusterError::Unavailable {
            reason: "leader changed while the write was in flight; the outcome is unknown".into(),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => ClusterError::Conflict {
            reason: e.to_string(),
        },
        RaftError::APIError(e) => ClusterError::Unavailable {
            reason: e.to_string(),
        },
        RaftError::Fatal(e) => ClusterError::Unavailable {
            reason: format!("raft stopped: {e}"),
        },
    }
}

/// Why a caller other than the owner may not change an instance.
pub fn not_owner(service: &str, id: &str, owner: &str) -> String {
    format!(
        "instance {service}/{id} is registered by {owner}; only that identity or an admin of service {service:?} may change it"
    )
}

fn unexpected(r: &Response) -> ClusterError {
    tracing::error!(response = ?r, "state machine answered with an unexpected response kind");
    ClusterError::Unavailable {
        reason: "unexpected response from the state machine".into(),
    }
}

/// A write forwarded by a follower: the caller's authenticated identity travels with it, and
/// the leader accepts it only over the raft listener (node certificates only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Forwarded {
    pub caller: String,
    pub budget_ms: u64,
    pub op: WriteOp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ForwardedHeartbeat {
    pub caller: String,
    pub budget_ms: u64,
    pub service: String,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardedMember {
    Add {
        id: u64,
        member: Member,
        voter: bool,
    },
    Remove {
        id: u64,
    },
    TransferLeader {
        to: u64,
    },
}
