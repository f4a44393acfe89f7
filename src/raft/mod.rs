//! raft: the openraft type config, the mTLS peer network, the internal RPC routes, and the
//! [`Cluster`] facade the API calls (writes, forwarding, read barriers, leases, membership).
//! Knows nothing of the public HTTP API's routes or status codes.

mod cluster;
mod leases;
mod network;
mod read_batch;
mod rpc;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::authz::{AclCommand, AclOutcome, Policy};
use crate::registry::{Command, Outcome, Registry};

pub use cluster::{
    not_owner, AclWriteOutcome, Cluster, ClusterError, ClusterSettings, ClusterStatus,
    HeartbeatOutcome, MemberStatus, WriteOp, WriteOutcome,
};
pub use network::{NetworkFactory, PeerError, Peers};
pub use rpc::{router as rpc_router, Probe};

openraft::declare_raft_types!(
    /// cairn's openraft types: registry commands as the application data, [`Member`] as node info.
    pub TypeConfig:
        D = Request,
        R = Response,
        Node = Member,
);

pub type Raft = openraft::Raft<TypeConfig, crate::storage::StateMachine>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, std::io::Cursor<Vec<u8>>>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;

/// A replicated request: the application data of a log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A registry command; its caller (in the command) is authorized at apply time.
    Registry(Command),
    /// A policy change by `by` (an identity in `kind/name` form), authorized at apply time:
    /// `admin` on the cluster, or a node for the bootstrap.
    Acl { cmd: AclCommand, by: String },
    /// Replaces the registry and the policy with a backup's, authorized at apply time
    /// (`snapshot` on the cluster; a node only with `only_if_empty`, for `--restore-from`).
    Restore {
        state: Box<BackupState>,
        by: String,
        /// Proposer's clock: restored leases and reap timers start from it.
        now_ms: u64,
        /// Apply only to a cluster that has never held an instance nor been restored.
        only_if_empty: bool,
    },
    /// Names the cluster once, right after it forms; later proposals change nothing.
    SetClusterId { id: String },
}

/// The replicated state a backup carries and a restore installs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupState {
    pub registry: Registry,
    pub policy: Policy,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Registry(c) => write!(f, "registry:{c}"),
            Request::Acl { cmd, by } => write!(f, "acl:{cmd} by {by}"),
            Request::Restore { state, by, .. } => write!(
                f,
                "restore ({} instances) by {by}",
                state.registry.instance_count()
            ),
            Request::SetClusterId { id } => write!(f, "set-cluster-id {id}"),
        }
    }
}

/// What applying a [`Request`] (or a blank/membership entry) produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    None,
    Registry(Box<Outcome>),
    Acl(AclOutcome),
    /// `applied` is false when `only_if_empty` found a cluster with data.
    Restored {
        applied: bool,
    },
    /// The policy at this log position does not let the caller do this; nothing changed.
    Denied(String),
}

/// A cluster member as openraft stores it in the membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Public API address, `ip:port`.
    pub api: String,
    /// Internal raft address, `ip:port`.
    pub raft: String,
    /// Failure zone.
    pub zone: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "api={} raft={} zone={}", self.api, self.raft, self.zone)
    }
}
