//! api: the public HTTPS API (`/v1`), and the one place that maps errors to HTTP statuses and
//! RFC 9457 problem documents. Talks to the replicated core only through [`Cluster`]; never to
//! openraft or RocksDB directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use axum_server::tls::TlsInfo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::authz::{AclCommand, AclOutcome, Action, Binding, Resource, Role};
use crate::crypto::Sealer;
use crate::identity::{self, Identity};
use crate::raft::{not_owner, Cluster, ClusterError, Member, WriteOp};
use crate::registry::{self, Filter, InstanceSpec, Outcome, Precondition, ValidationError};
use crate::snapshot::{self, SnapshotError};
use crate::token::TokenVerifier;

pub const HEADER_INDEX: &str = "x-cairn-index";
pub const HEADER_LEADER: &str = "x-cairn-leader";
pub const HEADER_LAST_CONTACT: &str = "x-cairn-last-contact";

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub cluster: Cluster,
    /// Reads callers' identities from their certificates, in this node's trust domain.
    pub identities: identity::CertIdentities,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Cap on `wait=` of blocking queries.
    pub max_wait: Duration,
    /// Bearer-token verification; `None` when the node accepts certificates only.
    pub tokens: Option<Arc<TokenVerifier>>,
    /// The node's keyring handle: backups are encrypted with its backup key.
    pub sealer: Sealer,
    /// The newest backup this node's schedule wrote and verified (reported in the status).
    pub last_backup: Arc<std::sync::Mutex<Option<snapshot::BackupRun>>>,
}

/// The largest backup file `POST /v1/snapshot/restore` accepts.
pub const MAX_RESTORE_BYTES: usize = 1 << 30;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
struct Caller {
    identity: Identity,
    /// `certificate` or `token`.
    via: &'static str,
}

impl Caller {
    /// The stable `kind/name` form recorded as owner and passed to the replicated core.
    fn name(&self) -> String {
        self.identity.to_string()
    }
}

/// Every way a request can fail, mapped to a status and a stable problem `type` in
/// [`IntoResponse`] below — the only place that does so.
#[derive(Debug)]
pub enum ApiError {
    Invalid {
        field: String,
        message: String,
    },
    PayloadTooLarge {
        limit: usize,
    },
    Unauthenticated {
        reason: String,
    },
    /// The caller is known but the policy (or ownership) does not allow this.
    Forbidden {
        reason: String,
    },
    NotFound {
        what: String,
    },
    MethodNotAllowed,
    PreconditionFailed {
        detail: String,
        current_index: Option<u64>,
    },
    Conflict {
        reason: String,
    },
    NoQuorum {
        reason: String,
    },
    Unavailable {
        reason: String,
    },
}

#[derive(Serialize)]
struct Problem {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_index: Option<u64>,
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::NoQuorum { reason } => ApiError::NoQuorum { reason },
            ClusterError::Unavailable { reason } => ApiError::Unavailable { reason },
            ClusterError::NotLeader { .. } => ApiError::Unavailable {
                reason: "leader changed; retry".into(),
            },
            ClusterError::NotFound { what } => ApiError::NotFound { what },
            ClusterError::Invalid { field, message } => ApiError::Invalid { field, message },
            ClusterError::Conflict { reason } => ApiError::Conflict { reason },
            ClusterError::Forbidden { reason } => ApiError::Forbidden { reason },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, title) = match &self {
            ApiError::Invalid { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
            ),
            ApiError::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid-request",
                "Request body too large",
            ),
            ApiError::Unauthenticated { .. } => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Unauthenticated",
            ),
            ApiError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid-request",
                "Method not allowed",
            ),
            ApiError::PreconditionFailed { .. } => (
                StatusCode::PRECONDITION_FAILED,
                "precondition-failed",
                "Precondition failed",
            ),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::NoQuorum { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "no-quorum", "No quorum")
            }
            ApiError::Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Unavailable",
            ),
        };
        let (detail, field, current_index) = match self {
            ApiError::Invalid { field, message } => {
                (format!("{field}: {message}"), Some(field), None)
            }
            ApiError::PayloadTooLarge { limit } => (
                format!("request body exceeds the limit of {limit} bytes"),
                Some("body".to_string()),
                None,
            ),
            ApiError::Unauthenticated { reason } => (reason, None, None),
            ApiError::Forbidden { reason } => (reason, None, None),
            ApiError::NotFound { what } => (format!("{what} not found"), None, None),
            ApiError::MethodNotAllowed => {
                ("method not allowed on this resource".into(), None, None)
            }
            ApiError::PreconditionFailed {
                detail,
                current_index,
            } => (detail, None, current_index),
            ApiError::Conflict { reason } => (reason, None, None),
            ApiError::NoQuorum { reason } | ApiError::Unavailable { reason } => {
                (reason, None, None)
            }
        };
        let problem = Problem {
            kind,
            title,
            status: status.as_u16(),
            detail,
            field,
            current_index,
        };
        let mut resp = (status, Json(problem)).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The public router. Every route requires an authenticated caller.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{service}", get(query_service))
        .route(
            "/v1/services/{service}/instances/{id}",
            put(register).delete(deregister).get(get_instance),
        )
        .route(
            "/v1/services/{service}/instances/{id}/heartbeat",
            put(heartbeat),
        )
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/members", post(add_member))
        .route(
            "/v1/cluster/members/{id}",
            axum::routing::delete(remove_member),
        )
        .route("/v1/cluster/transfer-leader", post(transfer_leader))
        .route("/v1/snapshot", get(get_snapshot))
        .route("/v1/snapshot/restore", post(restore_snapshot))
        .route("/v1/acl/whoami", get(whoami))
        .route("/v1/acl/roles", get(list_roles))
        .route(
            "/v1/acl/roles/{name}",
            get(get_role).put(put_role).delete(delete_role),
        )
        .route("/v1/acl/bindings", get(list_bindings))
        .route(
            "/v1/acl/bindings/{name}",
            get(get_binding).put(put_binding).delete(delete_binding),
        )
        .route("/v1/health/live", get(live))
        .route("/v1/health/ready", get(ready))
        .fallback(|| async {
            ApiError::NotFound {
                what: "resource".into(),
            }
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    api.layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), cairn_headers))
        .with_state(state)
}

/// Establishes who is calling, from a bearer token (when one is sent) or else from the client
/// certificate's SPIFFE ID (its chain was verified by the TLS handshake). Identity is never
/// taken from any other header, a parameter or the body.
async fn authenticate(
    State(s): State<ApiState>,
    tls: Option<Extension<Arc<TlsInfo>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let leaf = tls
        .as_ref()
        .and_then(|Extension(t)| t.peer_certificates.first().cloned());
    let caller = match bearer_token(req.headers()) {
        Err(e) => Err(e),
        Ok(Some(token)) => match &s.tokens {
            None => Err(ApiError::Unauthenticated {
                reason: "bearer tokens are not accepted by this cluster (no [jwt] configured); use a client certificate".into(),
            }),
            Some(v) => v
                .verify(token, leaf.as_deref())
                .map(|identity| Caller {
                    identity,
                    via: "token",
                })
                .map_err(|e| ApiError::Unauthenticated {
                    reason: format!("bearer token: {e}"),
                }),
        },
        Ok(None) => match &leaf {
            None => Err(ApiError::Unauthenticated {
                reason: "no credential: present a client certificate or a bearer token".into(),
            }),
            Some(der) => s
                .identities
                .of(der)
                .map(|identity| Caller {
                    identity,
                    via: "certificate",
                })
                .map_err(|e| ApiError::Unauthenticated {
                    reason: format!("client certificate: {e}"),
                }),
        },
    };
    match caller {
        Ok(caller) => {
            tracing::debug!(principal = %caller.identity, via = caller.via, method = %req.method(), path = %req.uri().path(), "request");
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => {
            tracing::info!(error = ?e, path = %req.uri().path(), "unauthenticated request");
            e.into_response()
        }
    }
}

/// The token of an `Authorization: Bearer` header; other schemes are refused, not ignored.
fn bearer_token(headers: &HeaderMap) -> ApiResult<Option<&str>> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = |reason: &str| ApiError::Unauthenticated {
        reason: reason.into(),
    };
    let value = value
        .to_str()
        .map_err(|_| bad("Authorization header is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(bad("Authorization must be `Bearer <token>`")),
    }
}

/// The pre-check of a write, before it is proposed (the state machine decides again at the
/// entry's log position). A node that is catching up may not have applied a grant yet, so a
/// local denial is confirmed after a read barrier before it is answered 403.
async fn authorize_write(
    s: &ApiState,
    caller: &Caller,
    action: Action,
    resource: Resource<'_>,
) -> ApiResult<()> {
    if authorize(s, caller, action, resource).is_ok() {
        return Ok(());
    }
    s.cluster.read_barrier().await?;
    authorize(s, caller, action, resource)
}

/// Checks the policy as this node has applied it. Linearizable reads call this after their
/// read barrier, so the policy is as current as the data; writes are checked again by the
/// state machine at their log position.
fn authorize(
    s: &ApiState,
    caller: &Caller,
    action: Action,
    resource: Resource<'_>,
) -> ApiResult<()> {
    s.cluster
        .state()
        .read()
        .policy
        .authorize(&caller.identity, action, resource)
        .map_err(|d| ApiError::Forbidden {
            reason: d.to_string(),
        })
}

/// Adds `X-Cairn-Leader` and (unless a handler set a more specific one) `X-Cairn-Index` to
/// every response, errors included.
async fn cairn_headers(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let leader = s
        .cluster
        .leader()
        .map_or_else(|| "none".to_string(), |(id, _)| id.to_string());
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&leader) {
        h.insert(HeaderName::from_static(HEADER_LEADER), v);
    }
    if !h.contains_key(HEADER_INDEX) {
        let index = s.cluster.state().read().registry.index();
        h.insert(
            HeaderName::from_static(HEADER_INDEX),
            HeaderValue::from(index),
        );
    }
    resp
}

fn with_index(mut resp: Response, index: u64) -> Response {
    resp.headers_mut().insert(
        HeaderName::from_static(HEADER_INDEX),
        HeaderValue::from(index),
    );
    resp
}

/// Reads a JSON body under the size limit; errors name the offending field.
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> ApiResult<T> {
    let bytes: Bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "body".to_string()
        } else {
            path
        };
        ApiError::Invalid {
            field,
            message: e.into_inner().to_string(),
        }
    })
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v).map_err(|e| ApiError::Invalid {
        field: "query".into(),
        message: e.body_text(),
    })
}

fn validate_names(service: &str, id: Option<&str>) -> ApiResult<()> {
    registry::validate_service_name(service)?;
    if let Some(id) = id {
        registry::validate_instance_id(id)?;
    }
    Ok(())
}

fn precondition(headers: &HeaderMap) -> ApiResult<Precondition> {
    let if_match = headers.get(header::IF_MATCH);
    let if_none = headers.get(header::IF_NONE_MATCH);
    match (if_match, if_none) {
        (Some(_), Some(_)) => Err(ApiError::Invalid {
            field: "If-Match".into(),
            message: "If-Match and If-None-Match cannot be combined".into(),
        }),
        (Some(v), None) => {
            let text = v.to_str().unwrap_or_default().trim().trim_matches('"');
            text.parse::<u64>()
                .map(Precondition::IfMatch)
                .map_err(|_| ApiError::Invalid {
                    field: "If-Match".into(),
                    message: "expected the instance's modify_index (an unsigned integer)".into(),
                })
        }
        (None, Some(v)) if v.as_bytes() == b"*" => Ok(Precondition::IfAbsent),
        (None, Some(_)) => Err(ApiError::Invalid {
            field: "If-None-Match".into(),
            message: "only `*` (create-only) is supported".into(),
        }),
        (None, None) => Ok(Precondition::None),
    }
}

fn etag(index: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{index}\"")).expect("digits are a valid header value")
}

fn outcome_response(
    outcome: Outcome,
    index: u64,
    precondition: Precondition,
    (service, id): (&str, &str),
) -> ApiResult<Response> {
    match outcome {
        Outcome::Registered { instance, created } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut resp = (status, Json(&instance)).into_response();
            resp.headers_mut()
                .insert(header::ETAG, etag(instance.modify_index));
            Ok(with_index(resp, index))
        }
        Outcome::Deregistered { instance } => {
            Ok(with_index(Json(&instance).into_response(), index))
        }
        Outcome::PreconditionFailed { current_index } => {
            let detail = match (precondition, current_index) {
                (Precondition::IfAbsent, _) => {
                    "instance already exists (If-None-Match: *)".to_string()
                }
                (_, Some(i)) => format!("instance modify_index is {i}"),
                (_, None) => "instance does not exist".to_string(),
            };
            Err(ApiError::PreconditionFailed {
                detail,
                current_index,
            })
        }
        Outcome::NotFound => Err(ApiError::NotFound {
            what: "instance".into(),
        }),
        Outcome::NotOwner { owner } => Err(ApiError::Forbidden {
            reason: not_owner(service, id, &owner),
        }),
        Outcome::Invalid(v) => Err(v.into()),
        Outcome::Leases { .. } => Err(ApiError::Unavailable {
            reason: "unexpected outcome".into(),
        }),
    }
}

async fn register(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((service, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    validate_names(&service, Some(&id))?;
    authorize_write(&s, &caller, Action::Register, Resource::Service(&service)).await?;
    let precondition = precondition(&headers)?;
    let spec: InstanceSpec = read_json(body, s.max_body_bytes).await?;
    spec.validate()?;
    let res = s
        .cluster
        .write(
            WriteOp::Register {
                service: service.clone(),
                id: id.clone(),
                spec,
                precondition,
            },
            &caller.name(),
        )
        .await?;
    outcome_response(res.outcome, res.index, precondition, (&service, &id))
}

async fn deregister(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((service, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    validate_names(&service, Some(&id))?;
    authorize_write(&s, &caller, Action::Deregister, Resource::Service(&service)).await?;
    let precondition = precondition(&headers)?;
    let res = s
        .cluster
        .write(
            WriteOp::Deregister {
                service: service.clone(),
                id: id.clone(),
                precondition,
            },
            &caller.name(),
        )
        .await?;
    outcome_response(res.outcome, res.index, precondition, (&service, &id))
}

async fn heartbeat(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((service, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    validate_names(&service, Some(&id))?;
    authorize_write(&s, &caller, Action::Heartbeat, Resource::Service(&service)).await?;
    let res = s.cluster.heartbeat(&service, &id, &caller.name()).await?;
    Ok(Json(res).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    consistency: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceParams {
    consistency: Option<String>,
    healthy: Option<bool>,
    tag: Option<String>,
    zone: Option<String>,
    near: Option<String>,
    index: Option<u64>,
    wait: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consistency {
    Linearizable,
    Stale,
}

fn consistency(v: Option<&str>) -> ApiResult<Consistency> {
    match v {
        None | Some("linearizable") | Some("default") => Ok(Consistency::Linearizable),
        Some("stale") => Ok(Consistency::Stale),
        Some(other) => Err(ApiError::Invalid {
            field: "consistency".into(),
            message: format!("`{other}` is not one of linearizable, stale"),
        }),
    }
}

/// Runs the read barrier the consistency level asks for; returns headers to add.
async fn barrier(s: &ApiState, c: Consistency) -> ApiResult<Vec<(HeaderName, HeaderValue)>> {
    match c {
        Consistency::Linearizable => {
            s.cluster.read_barrier().await?;
            Ok(vec![])
        }
        Consistency::Stale => {
            let v = s
                .cluster
                .last_contact_ms()
                .map_or_else(|| "never".to_string(), |ms| ms.to_string());
            let v = HeaderValue::from_str(&v).expect("digits or `never`");
            Ok(vec![(HeaderName::from_static(HEADER_LAST_CONTACT), v)])
        }
    }
}

fn add_headers(mut resp: Response, extra: Vec<(HeaderName, HeaderValue)>) -> Response {
    for (k, v) in extra {
        resp.headers_mut().insert(k, v);
    }
    resp
}

/// Parses `wait=`: `30s`, `500ms`, `2m`, or plain seconds.
fn parse_wait(v: &str, max: Duration) -> ApiResult<Duration> {
    let bad = || ApiError::Invalid {
        field: "wait".into(),
        message: format!("`{v}` is not a duration like 30s, 500ms or 2m"),
    };
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    Ok(d.min(max))
}

#[derive(Serialize)]
struct ServicesBody {
    index: u64,
    services: Vec<registry::ServiceSummary>,
}

/// Lists only the services the caller may discover: the rest are not hinted at.
async fn list_services(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<ReadParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    let extra = barrier(&s, consistency(p.consistency.as_deref())?).await?;
    let body = {
        let st = s.cluster.state().read();
        let mut services = st.registry.services();
        services.retain(|svc| {
            st.policy.allows(
                &caller.identity,
                Action::Discover,
                Resource::Service(&svc.name),
            )
        });
        ServicesBody {
            index: st.registry.index(),
            services,
        }
    };
    let index = body.index;
    Ok(with_index(
        add_headers(Json(body).into_response(), extra),
        index,
    ))
}

#[derive(Serialize)]
struct ServiceBody {
    service: String,
    index: u64,
    instances: Vec<registry::Instance>,
}

async fn query_service(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(service): Path<String>,
    q: Result<Query<ServiceParams>, QueryRejection>,
) -> ApiResult<Response> {
    validate_names(&service, None)?;
    let p = query(q)?;
    let c = consistency(p.consistency.as_deref())?;
    let wait = match &p.wait {
        Some(w) => Some(parse_wait(w, s.max_wait)?),
        None => None,
    };
    if wait.is_some() && p.index.is_none() {
        return Err(ApiError::Invalid {
            field: "wait".into(),
            message: "wait needs index=N".into(),
        });
    }
    let extra = barrier(&s, c).await?;
    // 403 whether or not the service exists: a caller learns nothing outside its scope.
    authorize(&s, &caller, Action::Discover, Resource::Service(&service))?;
    let filter = Filter {
        healthy: p.healthy,
        tag: p.tag,
        zone: p.zone,
        near: p.near,
    };
    if let Some(seen) = p.index {
        // Blocking query: return as soon as the service's index moves past `seen`, or at the
        // timeout (default 5 minutes capped by max_wait) with the unchanged result.
        let deadline = Instant::now() + wait.unwrap_or(s.max_wait);
        let mut applied = s.cluster.state().subscribe();
        loop {
            if s.cluster.state().read().registry.service_index(&service) > seen {
                break;
            }
            match tokio::time::timeout_at(deadline.into(), applied.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => break,
            }
        }
    }
    // A blocking query may have waited across a policy change: decide again on what is sent.
    authorize(&s, &caller, Action::Discover, Resource::Service(&service))?;
    let body = {
        let st = s.cluster.state().read();
        ServiceBody {
            index: st.registry.service_index(&service),
            instances: st.registry.instances(&service, &filter),
            service,
        }
    };
    let index = body.index;
    Ok(with_index(
        add_headers(Json(body).into_response(), extra),
        index,
    ))
}

async fn get_instance(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((service, id)): Path<(String, String)>,
    q: Result<Query<ReadParams>, QueryRejection>,
) -> ApiResult<Response> {
    validate_names(&service, Some(&id))?;
    let p = query(q)?;
    let extra = barrier(&s, consistency(p.consistency.as_deref())?).await?;
    authorize(&s, &caller, Action::Discover, Resource::Service(&service))?;
    let inst = s
        .cluster
        .state()
        .read()
        .registry
        .instance(&service, &id)
        .cloned();
    let inst = inst.ok_or_else(|| ApiError::NotFound {
        what: format!("instance {service}/{id}"),
    })?;
    let mut resp = Json(&inst).into_response();
    resp.headers_mut()
        .insert(header::ETAG, etag(inst.modify_index));
    Ok(with_index(add_headers(resp, extra), inst.modify_index))
}

/// Membership changes are not entries the state machine authorizes, so the admin check runs
/// on a policy brought up to date by a read barrier: a revoked admin cannot use a lagging node.
async fn admin_barrier(s: &ApiState, caller: &Caller) -> ApiResult<()> {
    s.cluster.read_barrier().await?;
    authorize(s, caller, Action::Admin, Resource::Cluster)
}

async fn cluster_status(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    authorize(&s, &caller, Action::Admin, Resource::Cluster)?;
    let mut status = serde_json::to_value(s.cluster.status().await).unwrap_or_default();
    let last_backup = s
        .last_backup
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(obj) = status.as_object_mut() {
        obj.insert(
            "cluster_id".into(),
            json!(s.cluster.state().read().cluster_id),
        );
        obj.insert("last_backup".into(), json!(last_backup));
    }
    Ok(Json(status).into_response())
}

/// Body of `POST /v1/cluster/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMember {
    id: u64,
    api: String,
    raft: String,
    zone: String,
    #[serde(default = "yes")]
    voter: bool,
}

fn yes() -> bool {
    true
}

async fn add_member(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> ApiResult<Response> {
    admin_barrier(&s, &caller).await?;
    let m: AddMember = read_json(body, s.max_body_bytes).await?;
    if m.id == 0 {
        return Err(ApiError::Invalid {
            field: "id".into(),
            message: "node ids start at 1".into(),
        });
    }
    for (field, addr) in [("api", &m.api), ("raft", &m.raft)] {
        addr.parse::<SocketAddr>().map_err(|_| ApiError::Invalid {
            field: field.into(),
            message: format!("`{addr}` is not ip:port"),
        })?;
    }
    registry::validate_service_name(&m.zone).map_err(|e| ApiError::Invalid {
        field: "zone".into(),
        message: e.message,
    })?;
    let member = Member {
        api: m.api,
        raft: m.raft,
        zone: m.zone,
    };
    Ok(Json(s.cluster.add_member(m.id, member, m.voter).await?).into_response())
}

async fn remove_member(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    admin_barrier(&s, &caller).await?;
    let id: u64 = id.parse().map_err(|_| ApiError::Invalid {
        field: "id".into(),
        message: format!("`{id}` is not a node id"),
    })?;
    Ok(Json(s.cluster.remove_member(id).await?).into_response())
}

/// Body of `POST /v1/cluster/transfer-leader`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferLeader {
    to: u64,
}

async fn transfer_leader(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> ApiResult<Response> {
    admin_barrier(&s, &caller).await?;
    let t: TransferLeader = read_json(body, s.max_body_bytes).await?;
    Ok(Json(s.cluster.transfer_leader(t.to).await?).into_response())
}

// ---- access control ----

#[derive(Serialize)]
struct Grant<'a> {
    binding: &'a str,
    role: &'a str,
    rules: &'a [crate::authz::Rule],
}

/// Who the caller is and which roles apply to it; needs no permission (it reveals only the
/// caller's own grants).
async fn whoami(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    let st = s.cluster.state().read();
    let grants: Vec<Grant<'_>> = st
        .policy
        .bindings()
        .filter(|b| b.matches(&caller.identity))
        .flat_map(|b| {
            b.roles.iter().filter_map(|r| {
                st.policy.role(r).map(|role| Grant {
                    binding: &b.name,
                    role: &role.name,
                    rules: &role.rules,
                })
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "identity": caller.name(),
        "authenticated_by": caller.via,
        "grants": grants,
    }))
    .into_response())
}

async fn list_roles(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    s.cluster.read_barrier().await?;
    authorize(&s, &caller, Action::Admin, Resource::Cluster)?;
    let roles: Vec<Role> = s.cluster.state().read().policy.roles().cloned().collect();
    Ok(Json(serde_json::json!({ "roles": roles })).into_response())
}

async fn get_role(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    s.cluster.read_barrier().await?;
    authorize(&s, &caller, Action::Admin, Resource::Cluster)?;
    let role = s.cluster.state().read().policy.role(&name).cloned();
    let role = role.ok_or_else(|| ApiError::NotFound {
        what: format!("role {name:?}"),
    })?;
    Ok(Json(role).into_response())
}

async fn list_bindings(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    s.cluster.read_barrier().await?;
    authorize(&s, &caller, Action::Admin, Resource::Cluster)?;
    let bindings: Vec<Binding> = s
        .cluster
        .state()
        .read()
        .policy
        .bindings()
        .cloned()
        .collect();
    Ok(Json(serde_json::json!({ "bindings": bindings })).into_response())
}

async fn get_binding(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    s.cluster.read_barrier().await?;
    authorize(&s, &caller, Action::Admin, Resource::Cluster)?;
    let binding = s.cluster.state().read().policy.binding(&name).cloned();
    let binding = binding.ok_or_else(|| ApiError::NotFound {
        what: format!("binding {name:?}"),
    })?;
    Ok(Json(binding).into_response())
}

/// A role or binding body; its `name` defaults to the one in the path.
async fn named_body<T: DeserializeOwned>(s: &ApiState, name: &str, body: Body) -> ApiResult<T> {
    let mut v: serde_json::Value = read_json(body, s.max_body_bytes).await?;
    if let Some(obj) = v.as_object_mut() {
        obj.entry("name").or_insert_with(|| name.into());
    }
    from_value(v)
}

/// The body's `name`, if given, must be the one in the path.
fn same_name(path: &str, body: &str) -> ApiResult<()> {
    if body == path {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            field: "name".into(),
            message: format!("is {body:?} but the path names {path:?}"),
        })
    }
}

async fn put_role(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    authorize_write(&s, &caller, Action::Admin, Resource::Cluster).await?;
    let role: Role = named_body(&s, &name, body).await?;
    same_name(&name, &role.name)?;
    role.validate()?;
    acl_write(&s, &caller, AclCommand::PutRole(role)).await
}

async fn delete_role(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    authorize_write(&s, &caller, Action::Admin, Resource::Cluster).await?;
    acl_write(&s, &caller, AclCommand::DeleteRole { name }).await
}

async fn put_binding(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    authorize_write(&s, &caller, Action::Admin, Resource::Cluster).await?;
    let binding: Binding = named_body(&s, &name, body).await?;
    same_name(&name, &binding.name)?;
    binding.validate()?;
    acl_write(&s, &caller, AclCommand::PutBinding(binding)).await
}

async fn delete_binding(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    authorize_write(&s, &caller, Action::Admin, Resource::Cluster).await?;
    acl_write(&s, &caller, AclCommand::DeleteBinding { name }).await
}

async fn acl_write(s: &ApiState, caller: &Caller, cmd: AclCommand) -> ApiResult<Response> {
    let res = s.cluster.acl_write(cmd, &caller.name()).await?;
    let status = match res.outcome {
        AclOutcome::RolePut { created: true } | AclOutcome::BindingPut { created: true } => {
            StatusCode::CREATED
        }
        AclOutcome::RolePut { .. }
        | AclOutcome::BindingPut { .. }
        | AclOutcome::RoleDeleted
        | AclOutcome::BindingDeleted
        | AclOutcome::Bootstrapped { .. } => StatusCode::OK,
        AclOutcome::NotFound { what } => return Err(ApiError::NotFound { what }),
        AclOutcome::Conflict { reason } => return Err(ApiError::Conflict { reason }),
        AclOutcome::Invalid(v) => return Err(v.into()),
    };
    Ok(with_index(
        (status, Json(serde_json::json!({ "index": res.index }))).into_response(),
        res.index,
    ))
}

/// Deserializes an already-parsed JSON body, naming the offending field on error.
fn from_value<T: DeserializeOwned>(v: serde_json::Value) -> ApiResult<T> {
    serde_path_to_error::deserialize(v).map_err(|e| ApiError::Invalid {
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

// ---- backups ----

fn snapshot_error(e: SnapshotError) -> ApiError {
    match e {
        SnapshotError::Cluster(c) => c.into(),
        SnapshotError::Backup(b) => ApiError::Invalid {
            field: "body".into(),
            message: b.to_string(),
        },
        SnapshotError::Body(m) => ApiError::Invalid {
            field: "body".into(),
            message: m,
        },
        e @ (SnapshotError::ForeignCluster { .. } | SnapshotError::NoBackupKey) => {
            ApiError::Conflict {
                reason: e.to_string(),
            }
        }
        e @ SnapshotError::NoClusterId => ApiError::Unavailable {
            reason: e.to_string(),
        },
        SnapshotError::Io { path, source } => {
            tracing::error!(path = %path.display(), error = %source, "backup i/o");
            ApiError::Unavailable {
                reason: "backup i/o failed on this node".into(),
            }
        }
    }
}

/// Streams a backup file of the state as of a read barrier; `Content-Length` is exact, so a
/// backup job can tell a complete download from a cut one.
async fn get_snapshot(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    s.cluster.read_barrier().await?;
    authorize(&s, &caller, Action::Snapshot, Resource::Cluster)?;
    let taken = snapshot::take(&s.cluster, &s.sealer)
        .await
        .map_err(snapshot_error)?;
    let len = taken.file_len();
    let index = taken.header.last_log_index;
    let name = format!(
        "cairn-{}-{}.backup",
        taken.header.cluster_id.get(..8).unwrap_or("cluster"),
        index
    );
    let encoder = taken
        .encoder()
        .map_err(|e| snapshot_error(SnapshotError::Backup(e)))?;
    // Encryption is CPU work: a blocking thread feeds the body through a small channel, so
    // at most a few chunks are in memory beyond the state copy itself.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        for piece in encoder {
            let item = piece.map(Bytes::from).map_err(std::io::Error::other);
            if tx.blocking_send(item).is_err() {
                tracing::info!("backup download abandoned by the client");
                break;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    tracing::info!(principal = %caller.identity, index, bytes = len, "backup served");
    Ok(with_index(resp, index))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreParams {
    force: Option<bool>,
}

/// Replaces the whole cluster state with a backup, through the log. The file is verified
/// completely (every chunk) and checked against this cluster's id before anything changes.
async fn restore_snapshot(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<RestoreParams>, QueryRejection>,
    body: Body,
) -> ApiResult<Response> {
    let p = query(q)?;
    s.cluster.read_barrier().await?;
    authorize(&s, &caller, Action::Snapshot, Resource::Cluster)?;
    let bytes = axum::body::to_bytes(body, MAX_RESTORE_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            limit: MAX_RESTORE_BYTES,
        })?;
    // The clear header first: a file of another cluster is refused before any decryption.
    let header = crate::backup::read_header(&mut &bytes[..])
        .map_err(|e| snapshot_error(SnapshotError::Backup(e)))?;
    let ours = s.cluster.state().read().cluster_id.clone();
    snapshot::check_cluster(&header, ours.as_deref(), p.force.unwrap_or(false))
        .map_err(snapshot_error)?;
    let sealer = s.sealer.clone();
    let (header, state) =
        tokio::task::spawn_blocking(move || snapshot::decode(std::io::Cursor::new(bytes), &sealer))
            .await
            .map_err(|e| ApiError::Unavailable {
                reason: format!("restore task failed: {e}"),
            })?
            .map_err(snapshot_error)?;
    let instances = state.registry.instance_count();
    let (_, index) = s.cluster.restore(state, &caller.name(), false).await?;
    tracing::info!(principal = %caller.identity, index, instances, from = %header.cluster_id, "backup restored");
    Ok(with_index(
        Json(json!({
            "index": index,
            "restored": {
                "cluster_id": header.cluster_id,
                "last_log_index": header.last_log_index,
                "created_at": header.created_at_rfc3339,
                "counts": header.counts,
            },
        }))
        .into_response(),
        index,
    ))
}

async fn live() -> Response {
    Json(BTreeMap::from([("status", "live")])).into_response()
}

/// Ready when a leader is known and this node has applied what it knows is committed.
async fn ready(State(s): State<ApiState>) -> ApiResult<Response> {
    if s.cluster.leader().is_none() {
        return Err(ApiError::Unavailable {
            reason: "no leader known".into(),
        });
    }
    Ok(Json(BTreeMap::from([("status", "ready")])).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_error_maps_to_its_documented_status_and_type() {
        let cases = [
            (
                ApiError::Invalid {
                    field: "port".into(),
                    message: "bad".into(),
                },
                400,
                "invalid-request",
            ),
            (
                ApiError::PayloadTooLarge { limit: 10 },
                413,
                "invalid-request",
            ),
            (
                ApiError::Unauthenticated {
                    reason: "no cert".into(),
                },
                401,
                "unauthenticated",
            ),
            (
                ApiError::NotFound {
                    what: "instance".into(),
                },
                404,
                "not-found",
            ),
            (ApiError::MethodNotAllowed, 405, "invalid-request"),
            (
                ApiError::PreconditionFailed {
                    detail: "x".into(),
                    current_index: Some(3),
                },
                412,
                "precondition-failed",
            ),
            (ApiError::Conflict { reason: "x".into() }, 409, "conflict"),
            (ApiError::NoQuorum { reason: "x".into() }, 503, "no-quorum"),
            (
                ApiError::Unavailable { reason: "x".into() },
                503,
                "unavailable",
            ),
        ];
        for (err, status, kind) in cases {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status, "{kind}");
            let h = resp.headers();
            assert_eq!(
                h.get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
                Some(&b"application/problem+json"[..])
            );
            assert_eq!(
                h.contains_key(header::RETRY_AFTER),
                status == 503,
                "Retry-After only on 503"
            );
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .expect("body");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["type"], kind);
            assert_eq!(v["status"], status);
            assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));
        }
    }

    #[test]
    fn cluster_errors_keep_their_meaning() {
        let e: ApiError = ClusterError::NoQuorum { reason: "r".into() }.into();
        assert!(matches!(e, ApiError::NoQuorum { .. }));
        let e: ApiError = ClusterError::NotLeader { leader: Some(2) }.into();
        assert!(
            matches!(e, ApiError::Unavailable { .. }),
            "never a 4xx: the client may retry"
        );
        let e: ApiError = ClusterError::Invalid {
            field: "ttl_seconds".into(),
            message: "m".into(),
        }
        .into();
        assert!(matches!(e, ApiError::Invalid { field, .. } if field == "ttl_seconds"));
    }

    #[test]
    fn wait_durations_parse_and_cap() {
        let max = Duration::from_secs(300);
        assert_eq!(parse_wait("30s", max).ok(), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_wait("500ms", max).ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_wait("2m", max).ok(), Some(Duration::from_secs(120)));
        assert_eq!(parse_wait("7", max).ok(), Some(Duration::from_secs(7)));
        assert_eq!(parse_wait("1000m", max).ok(), Some(max));
        for bad in ["", "s", "10h", "-1s", "1.5s"] {
            assert!(parse_wait(bad, max).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn preconditions_parse() {
        let mut h = HeaderMap::new();
        assert_eq!(precondition(&h).ok(), Some(Precondition::None));
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"12\""));
        assert_eq!(precondition(&h).ok(), Some(Precondition::IfMatch(12)));
        h.insert(header::IF_MATCH, HeaderValue::from_static("abc"));
        assert!(
            matches!(precondition(&h), Err(ApiError::Invalid { field, .. }) if field == "If-Match")
        );
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert_eq!(precondition(&h).ok(), Some(Precondition::IfAbsent));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"3\""));
        assert!(precondition(&h).is_err());
    }
}
