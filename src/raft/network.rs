//! The peer network: one persistent mTLS HTTP/2 client per node (bound to the node's own
//! address), carrying openraft RPCs and cairn's internal calls as `storage::encode`d bodies.

use std::future::Future;
use std::io::Cursor;
use std::time::Duration;

use openraft::errors::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Member, Snapshot, TypeConfig, Vote};
use crate::storage::{decode, encode};
use crate::tls::error_chain;

/// Why a call to a peer failed. `Unreachable` means the request was never delivered (safe to
/// retry anything); the others leave its effect unknown.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("peer {addr}: {reason}")]
    Network { addr: String, reason: String },
    #[error("peer {addr} answered HTTP {status}")]
    Status { addr: String, status: u16 },
    #[error("peer {addr} sent an undecodable answer: {reason}")]
    Decode { addr: String, reason: String },
}

/// The shared peer client (cheap to clone; connections are pooled and reused).
#[derive(Clone)]
pub struct Peers {
    client: reqwest::Client,
}

impl Peers {
    pub fn new(client: reqwest::Client) -> Peers {
        Peers { client }
    }

    /// POSTs `req` to `https://{raft_addr}{path}` and decodes the answer.
    pub async fn call<Req, Resp>(
        &self,
        raft_addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        self.call_encoded(raft_addr, path, encode(req), timeout)
            .await
    }

    /// [`Peers::call`] with a request already encoded.
    pub async fn call_encoded<Resp>(
        &self,
        raft_addr: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, PeerError>
    where
        Resp: DeserializeOwned,
    {
        let url = format!("https://{raft_addr}{path}");
        let addr = || raft_addr.to_string();
        let resp = self
            .client
            .post(&url)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    PeerError::Unreachable {
                        addr: addr(),
                        reason: error_chain(&e),
                    }
                } else {
                    PeerError::Network {
                        addr: addr(),
                        reason: error_chain(&e),
                    }
                }
            })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(PeerError::Status {
                addr: addr(),
                status: status.as_u16(),
            });
        }
        let body = resp.bytes().await.map_err(|e| PeerError::Network {
            addr: addr(),
            reason: error_chain(&e),
        })?;
        decode(&body).map_err(|reason| PeerError::Decode {
            addr: addr(),
            reason,
        })
    }
}

/// Builds openraft's per-target clients on top of [`Peers`].
pub struct NetworkFactory {
    peers: Peers,
}

impl NetworkFactory {
    pub fn new(peers: Peers) -> NetworkFactory {
        NetworkFactory { peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, _target: u64, node: &Member) -> PeerNetwork {
        PeerNetwork {
            addr: node.raft.clone(),
            peers: self.peers.clone(),
        }
    }
}

/// openraft's view of one peer.
pub struct PeerNetwork {
    addr: String,
    peers: Peers,
}

impl PeerNetwork {
    async fn rpc<Req, Resp>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        // A large entry (a restore carries the whole state) needs time to be sent, decoded,
        // sealed and written on the follower: the deadline grows with the payload, at a rate
        // (2 MB/s) far below what any build of ours achieves.
        let body = encode(req);
        let timeout = timeout + Duration::from_millis(body.len() as u64 / 2_000);
        let res: Result<Resp, RaftError<TypeConfig>> = self
            .peers
            .call_encoded(&self.addr, path, body, timeout)
            .await
            .map_err(|e| match e {
                PeerError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        // A remote RaftError means the peer's raft core is not serving (e.g. shutting down):
        // back off like an unreachable peer.
        res.map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc("/raft/append", &req, option.soft_ttl()).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc("/raft/vote", &req, option.soft_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc("/raft/pre-vote", &req, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let req = (vote, snapshot.meta, snapshot.snapshot.into_inner());
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = self.rpc("/raft/snapshot", &req, option.hard_ttl()) => Ok(res?),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc("/raft/transfer-leader", &req, option.soft_ttl())
            .await
    }
}
