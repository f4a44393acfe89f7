//! Routes of the internal raft listener. Only node certificates get through its TLS handshake
//! (see `tls::TlsMaterial::raft_server_config`), so every caller here is a cluster node: openraft RPCs, and
//! cairn's forwarded writes, read-index requests, lease renewals and membership changes.

use std::time::{Duration, Instant};

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Extension;
use axum::Router;
use axum_server::tls::TlsInfo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::cluster::{ClusterError, Forwarded, ForwardedHeartbeat, ForwardedMember};
use super::{Cluster, SnapshotMeta, Vote};
use crate::identity::Identity;
use crate::storage::{decode, encode};

/// The largest body the raft listener accepts (snapshots travel in one body).
const MAX_RPC_BODY: usize = 1 << 30;

pub fn router(cluster: Cluster) -> Router {
    // Requests that speak for a caller are taken only from current members.
    let on_behalf = Router::new()
        .route("/internal/write", post(write))
        .route("/internal/heartbeat", post(heartbeat))
        .route("/internal/members", post(members))
        .route_layer(middleware::from_fn_with_state(
            cluster.clone(),
            members_only,
        ));
    Router::new()
        .merge(on_behalf)
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/pre-vote", post(pre_vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/transfer-leader", post(transfer_leader))
        .route("/internal/read-index", post(read_index))
        .route("/internal/leader-view", post(leader_view))
        .route("/internal/probe", post(probe))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_RPC_BODY))
        .with_state(cluster)
}

fn reply<T: Serialize>(value: &T) -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        encode(value),
    )
        .into_response()
}

/// An internal request that could not be decoded (a version mismatch between nodes, or a bug).
struct Undecodable;

impl IntoResponse for Undecodable {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, "undecodable request").into_response()
    }
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Undecodable> {
    decode(body).map_err(|e| {
        tracing::warn!(error = %e, "undecodable internal request");
        Undecodable
    })
}

/// A forwarded request from a node that is not a member (or not a node at all).
struct NotMember(String);

impl IntoResponse for NotMember {
    fn into_response(self) -> Response {
        (StatusCode::FORBIDDEN, self.0).into_response()
    }
}

/// The handshake admitted a node certificate of our trust domain; requests that speak for a
/// caller (writes, renewals, membership changes) must also come from a current member, so a
/// removed node's certificate cannot be used to act on anyone's behalf.
async fn members_only(
    State(c): State<Cluster>,
    tls: Option<Extension<Arc<TlsInfo>>>,
    req: Request,
    next: Next,
) -> Response {
    match from_member(&c, tls) {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

fn from_member(c: &Cluster, tls: Option<Extension<Arc<TlsInfo>>>) -> Result<(), NotMember> {
    let refuse = |why: String| {
        tracing::warn!(reason = %why, "refused a forwarded request");
        Err(NotMember(why))
    };
    let Some(Extension(tls)) = tls else {
        return refuse("no TLS session".into());
    };
    let Some(end_entity) = tls.peer_certificates.first() else {
        return refuse("no peer certificate".into());
    };
    match c.identities().of(end_entity) {
        Ok(Identity::Node(id)) if c.is_member(id) => Ok(()),
        Ok(identity) => refuse(format!("{identity} is not a member of this cluster")),
        Err(e) => refuse(e.to_string()),
    }
}

/// The deadline a forwarding node asked for, capped (a restore may take longer than a
/// request timeout; nothing may take longer than a restore).
fn budget(ms: u64, cluster: &Cluster) -> Instant {
    let cap = cluster
        .request_timeout()
        .max(super::cluster::RESTORE_TIMEOUT);
    Instant::now() + Duration::from_millis(ms).min(cap)
}

async fn append(State(c): State<Cluster>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    c.note_leader_contact();
    reply(&c.raft().append_entries(req).await)
}

async fn vote(State(c): State<Cluster>, body: Bytes) -> Response {
    match parse(&body) {
        Ok(req) => reply(&c.raft().vote(req).await),
        Err(e) => e.into_response(),
    }
}

async fn pre_vote(State(c): State<Cluster>, body: Bytes) -> Response {
    match parse(&body) {
        Ok(req) => reply(&c.raft().pre_vote(req).await),
        Err(e) => e.into_response(),
    }
}

async fn snapshot(State(c): State<Cluster>, body: Bytes) -> Response {
    let (vote, meta, data): (Vote, SnapshotMeta, Vec<u8>) = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    c.note_leader_contact();
    let snapshot = super::Snapshot {
        meta,
        snapshot: std::io::Cursor::new(data),
    };
    reply(&c.raft().install_full_snapshot(vote, snapshot).await)
}

async fn transfer_leader(State(c): State<Cluster>, body: Bytes) -> Response {
    match parse(&body) {
        Ok(req) => reply(&c.raft().handle_transfer_leader(req).await),
        Err(e) => e.into_response(),
    }
}

async fn write(State(c): State<Cluster>, body: Bytes) -> Response {
    let req: Forwarded = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // A node that is no longer leader answers NotLeader from raft itself (nothing appended).
    let deadline = budget(req.budget_ms, &c);
    reply(&c.write_local(req.op, &req.caller, deadline).await)
}

async fn read_index(State(c): State<Cluster>, body: Bytes) -> Response {
    let budget_ms: u64 = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    reply(&c.read_index_local(budget(budget_ms, &c)).await)
}

async fn heartbeat(State(c): State<Cluster>, body: Bytes) -> Response {
    let req: ForwardedHeartbeat = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let deadline = budget(req.budget_ms, &c);
    reply(
        &c.heartbeat_local(&req.service, &req.id, &req.caller, deadline)
            .await,
    )
}

async fn members(State(c): State<Cluster>, body: Bytes) -> Response {
    match parse::<ForwardedMember>(&body) {
        Ok(op) => reply(&c.membership_local(op).await),
        Err(e) => e.into_response(),
    }
}

async fn leader_view(State(c): State<Cluster>) -> Response {
    let view = c.leader_view().ok_or(ClusterError::NotLeader {
        leader: c.leader().map(|l| l.0),
    });
    reply(&view)
}

/// Used at cluster formation: is this node up, and has it joined a cluster already?
async fn probe(State(c): State<Cluster>) -> Response {
    let initialized = c.raft().is_initialized().await.unwrap_or(false);
    reply(&Probe {
        node_id: c.id(),
        initialized,
        tls: Some(c.tls_validity()),
        facts: c.facts_json(),
    })
}

/// Answer of `/internal/probe`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Probe {
    pub node_id: u64,
    pub initialized: bool,
    /// The node's own certificate validity (for the cluster status).
    pub tls: Option<crate::tls::CertValidity>,
    /// The node's facts (keyring, records per key, last backup) as JSON text.
    pub facts: String,
}
