//! The harness's HTTPS client for cairn's public API, and the one place where an HTTP answer
//! (or the lack of one) is classified: applied, definitely not applied, or unknown. It knows
//! the API's paths, JSON shapes and error semantics (README "Using the API"), and nothing of
//! histories, workloads or checkers.
//!
//! Classification of a call ([`CallError`]):
//! * a connection that could not be established (refused, TLS handshake never finished
//!   within the connect timeout) → [`CallError::NotSent`]: the server never saw the request;
//! * a 4xx answer → [`CallError::Rejected`]: the server refused it, nothing was applied;
//! * a 5xx answer (503 `no-quorum` / `unavailable`) → [`CallError::Unavailable`]: for a write
//!   the outcome is unknown — the entry may already be in the log and commit later;
//! * a timeout or a connection lost after sending → [`CallError::Lost`]: unknown as well.
//!
//! Automatic retries are disabled (`retry::never`): a transparently re-sent write could take
//! effect twice, at two different instants, which no single-op history can describe.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// Where clients connect from. Node traffic is told apart by its source address (each node
/// binds its own 127.0.0.(10+i)); binding clients to 127.0.0.1 keeps them outside every
/// partition rule, so a partition cuts nodes from each other but never a client from its node.
pub const CLIENT_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

/// The files a client presents: the cluster CA and an operator certificate with its key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Installs ring as rustls's process-wide provider (reqwest is built without one). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why a call did not produce the answer it asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No connection: the request never reached the server.
    #[error("not sent: {0}")]
    NotSent(String),
    /// A 4xx answer: refused, nothing applied.
    #[error("{status} {kind}: {detail}")]
    Rejected {
        status: u16,
        kind: String,
        detail: String,
    },
    /// A 5xx answer: for a write, the outcome is unknown.
    #[error("{status} {kind}: {detail}")]
    Unavailable {
        status: u16,
        kind: String,
        detail: String,
    },
    /// Timed out or lost the connection after sending: unknown.
    #[error("lost: {0}")]
    Lost(String),
}

impl CallError {
    /// True when the call certainly had no effect on the server's state.
    pub fn definitely_not_applied(&self) -> bool {
        matches!(self, CallError::NotSent(_) | CallError::Rejected { .. })
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            CallError::Rejected { status, .. } | CallError::Unavailable { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    /// A short stable label for counting (`503 no-quorum`, `timeout`, `refused`...).
    pub fn label(&self) -> String {
        match self {
            CallError::NotSent(_) => "not-sent".into(),
            CallError::Rejected { status, kind, .. }
            | CallError::Unavailable { status, kind, .. } => {
                format!("{status} {kind}")
            }
            CallError::Lost(m) if m.contains("timed out") => "timeout".into(),
            CallError::Lost(_) => "lost".into(),
        }
    }
}

/// An instance as the API returns it (only the fields the harness reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceView {
    pub id: String,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub modify_index: u64,
    /// `passing` or `critical`.
    pub health: String,
}

impl InstanceView {
    /// The register value the harness stores in `meta.v`.
    pub fn value(&self) -> Option<&str> {
        self.meta.get(VALUE_META).map(String::as_str)
    }
}

/// Bound on one membership call (adding a node includes its catch-up).
pub const MEMBERSHIP_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The metadata key that carries the harness's register value.
pub const VALUE_META: &str = "v";

/// What the harness writes for an instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceSpec {
    pub address: String,
    pub port: u16,
    pub meta: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u32>,
}

impl InstanceSpec {
    /// An instance carrying `value` in `meta.v`.
    pub fn with_value(value: &str, ttl_seconds: Option<u32>) -> Self {
        InstanceSpec {
            address: "10.0.0.1".into(),
            port: 80,
            meta: BTreeMap::from([(VALUE_META.to_owned(), value.to_owned())]),
            ttl_seconds,
        }
    }
}

/// A write's condition on the current instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match: <modify_index>`.
    IfMatch(u64),
    /// `If-None-Match: *` (create-only).
    IfAbsent,
}

/// `GET /v1/cluster/status`, the fields the harness uses.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Status {
    pub node_id: u64,
    pub state: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub applied_index: u64,
    pub state_digest: String,
    pub digest_index: u64,
    #[serde(default)]
    pub members: Vec<MemberView>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MemberView {
    pub id: u64,
    pub role: String,
}

/// A member to add with `POST /v1/cluster/members`.
#[derive(Debug, Clone, Serialize)]
pub struct NewMember {
    pub id: u64,
    pub api: String,
    pub raft: String,
    pub zone: String,
    pub voter: bool,
}

#[derive(Debug, Deserialize)]
struct Problem {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    detail: String,
}

#[derive(Debug, Deserialize)]
struct InstanceList {
    instances: Vec<InstanceView>,
}

/// A client bound to one node. Cheap to clone (the connection pool is shared by clones).
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    node: SocketAddr,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api").field("node", &self.node).finish()
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

impl Api {
    /// A client of the node whose API listens on `node`. `timeout` bounds each request;
    /// `connect_timeout` bounds establishing a connection (TCP + TLS), after which a request
    /// counts as never sent.
    pub fn new(
        tls: &TlsFiles,
        node: SocketAddr,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> anyhow::Result<Api> {
        install_crypto_provider();
        let ca = reqwest::Certificate::from_pem_bundle(&read(&tls.ca)?)
            .with_context(|| format!("{}: not a PEM certificate bundle", tls.ca.display()))?;
        let mut identity = read(&tls.cert)?;
        identity.push(b'\n');
        identity.extend_from_slice(&read(&tls.key)?);
        let identity = reqwest::Identity::from_pem(&identity)
            .with_context(|| format!("{}: not a certificate and key", tls.cert.display()))?;
        let http = reqwest::Client::builder()
            .https_only(true)
            .tls_certs_only(ca)
            .identity(identity)
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .local_address(CLIENT_SOURCE)
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .tcp_nodelay(true)
            .build()
            .context("cannot build the HTTPS client")?;
        Ok(Api {
            http,
            base: format!("https://{node}"),
            node,
        })
    }

    pub fn node(&self) -> SocketAddr {
        self.node
    }

    fn instance_path(service: &str, id: &str) -> String {
        format!("/v1/services/{service}/instances/{id}")
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        configure: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<(StatusCode, SuccessBody), CallError> {
        let req = configure(self.http.request(method, format!("{}{path}", self.base)));
        let resp = req.send().await.map_err(transport_error)?;
        let status = resp.status();
        let body = resp.bytes().await;
        if status.is_success() {
            // The status arrived: the call took effect even if the body was cut short.
            return Ok((status, SuccessBody(body.map(|b| b.to_vec()).ok())));
        }
        let problem: Option<Problem> = body.ok().and_then(|b| serde_json::from_slice(&b).ok());
        let (kind, detail) =
            problem.map_or_else(|| (String::new(), String::new()), |p| (p.kind, p.detail));
        let code = status.as_u16();
        Err(if status.is_client_error() {
            CallError::Rejected {
                status: code,
                kind,
                detail,
            }
        } else {
            CallError::Unavailable {
                status: code,
                kind,
                detail,
            }
        })
    }

    /// `GET` one instance; `Ok(None)` on 404.
    pub async fn get_instance(
        &self,
        service: &str,
        id: &str,
        stale: bool,
    ) -> Result<Option<InstanceView>, CallError> {
        let mut path = Self::instance_path(service, id);
        if stale {
            path.push_str("?consistency=stale");
        }
        match self.call(Method::GET, &path, |r| r).await {
            Ok((_, body)) => body.json().map(Some),
            Err(CallError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT` (register or update) one instance. Returns its new `modify_index` when the body
    /// could be read.
    pub async fn put_instance(
        &self,
        service: &str,
        id: &str,
        spec: &InstanceSpec,
        precondition: Precondition,
    ) -> Result<Option<u64>, CallError> {
        let path = Self::instance_path(service, id);
        let (_, body) = self
            .call(Method::PUT, &path, |r| {
                let r = r.json(spec);
                match precondition {
                    Precondition::None => r,
                    Precondition::IfMatch(i) => r.header(reqwest::header::IF_MATCH, i.to_string()),
                    Precondition::IfAbsent => r.header(reqwest::header::IF_NONE_MATCH, "*"),
                }
            })
            .await?;
        Ok(body.json::<InstanceView>().ok().map(|i| i.modify_index))
    }

    /// `DELETE` one instance. `Ok(false)` when it was already absent (404): a delete of an
    /// absent instance succeeded as far as the register is concerned.
    pub async fn delete_instance(&self, service: &str, id: &str) -> Result<bool, CallError> {
        match self
            .call(Method::DELETE, &Self::instance_path(service, id), |r| r)
            .await
        {
            Ok(_) => Ok(true),
            Err(CallError::Rejected { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `PUT .../heartbeat`: renews the instance's lease.
    pub async fn heartbeat(&self, service: &str, id: &str) -> Result<(), CallError> {
        let path = format!("{}/heartbeat", Self::instance_path(service, id));
        self.call(Method::PUT, &path, |r| r).await.map(|_| ())
    }

    /// `GET /v1/services/{service}`: every instance (linearizable unless `stale`).
    pub async fn list(&self, service: &str, stale: bool) -> Result<Vec<InstanceView>, CallError> {
        let mut path = format!("/v1/services/{service}");
        if stale {
            path.push_str("?consistency=stale");
        }
        let (_, body) = self.call(Method::GET, &path, |r| r).await?;
        Ok(body.json::<InstanceList>()?.instances)
    }

    pub async fn status(&self) -> Result<Status, CallError> {
        let (_, body) = self.call(Method::GET, "/v1/cluster/status", |r| r).await?;
        body.json()
    }

    /// Adding a node waits for it to catch up (the server allows 6 request timeouts), so this
    /// call gets [`MEMBERSHIP_CALL_TIMEOUT`] instead of the client's usual timeout.
    pub async fn add_member(&self, member: &NewMember) -> Result<(), CallError> {
        self.call(Method::POST, "/v1/cluster/members", |r| {
            r.json(member).timeout(MEMBERSHIP_CALL_TIMEOUT)
        })
        .await
        .map(|_| ())
    }

    pub async fn remove_member(&self, id: u64) -> Result<(), CallError> {
        self.call(Method::DELETE, &format!("/v1/cluster/members/{id}"), |r| r)
            .await
            .map(|_| ())
    }
}

/// The full chain of an error, so "connection refused" is not hidden behind "error sending
/// request".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn transport_error(e: reqwest::Error) -> CallError {
    let text = chain(&e);
    if e.is_connect() {
        CallError::NotSent(text)
    } else if e.is_timeout() {
        CallError::Lost(format!("timed out: {text}"))
    } else {
        CallError::Lost(text)
    }
}

/// A success body, which may be missing if the connection broke after the status line.
struct SuccessBody(Option<Vec<u8>>);

impl SuccessBody {
    /// Decodes the body; a missing or malformed body is `Lost` (the call succeeded, but what
    /// it said is not known).
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, CallError> {
        let bytes = self
            .0
            .as_deref()
            .ok_or_else(|| CallError::Lost("response body lost".into()))?;
        serde_json::from_slice(bytes)
            .map_err(|e| CallError::Lost(format!("undecodable response body: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refused_connections_and_4xx_are_definitely_not_applied() {
        let rejected = CallError::Rejected {
            status: 412,
            kind: "precondition-failed".into(),
            detail: String::new(),
        };
        let unavailable = CallError::Unavailable {
            status: 503,
            kind: "no-quorum".into(),
            detail: String::new(),
        };
        assert!(CallError::NotSent("refused".into()).definitely_not_applied());
        assert!(rejected.definitely_not_applied());
        assert!(!unavailable.definitely_not_applied());
        assert!(!CallError::Lost("timed out".into()).definitely_not_applied());
        assert_eq!(unavailable.label(), "503 no-quorum");
        assert_eq!(CallError::Lost("timed out: x".into()).label(), "timeout");
    }

    #[test]
    fn instance_views_read_the_value_from_meta() {
        let v: InstanceView = serde_json::from_str(
            r#"{"id":"r1","meta":{"v":"p3-17"},"modify_index":9,"health":"passing","port":80}"#,
        )
        .expect("parse");
        assert_eq!(v.value(), Some("p3-17"));
        let spec = serde_json::to_value(InstanceSpec::with_value("x", None)).expect("json");
        assert_eq!(spec["meta"]["v"], "x");
        assert!(spec.get("ttl_seconds").is_none());
    }
}
