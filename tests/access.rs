//! Access control through real processes, real TLS handshakes and real tokens: identities
//! from certificates and bearer JWTs, the replicated default-deny policy, scoped discovery,
//! ownership, and the negative cases (each a test of its own).
//!
//! Every cluster bootstraps `cairn::dev::DEV_POLICY`: `operator/admin` is admin, every
//! `service/<name>` manages and discovers its own service, `service/web` also discovers all.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use cairn::certs::Validity;
use cairn::identity::Identity;
use common::{client_for, instance, issue, TestCluster, TD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{json, Value};

const TUNING: &str = "[raft]\nheartbeat_ms = 100\nelection_min_ms = 800\nelection_max_ms = 1600\n\n[limits]\nrequest_timeout_ms = 4000\n";

/// A service certificate `service-<name>` in the cluster's directory, and a client using it.
fn service_client(c: &TestCluster, name: &str) -> reqwest::Client {
    let stem = format!("service-{name}");
    issue(
        &c.ca,
        c.dir.path(),
        &stem,
        Identity::Service(name.into()),
        vec![],
    );
    client_for(c.dir.path(), &stem)
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let r = req.send().await.expect("request reaches the server");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn assert_problem(got: &(StatusCode, Value), status: u16, kind: &str, detail_has: &str) {
    let (s, body) = got;
    assert_eq!(s.as_u16(), status, "{body}");
    assert_eq!(body["type"], kind, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(detail_has),
        "detail {detail:?} should mention {detail_has:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_manages_only_its_own_instances_and_sees_only_its_scope() {
    let c = TestCluster::start(3, TUNING).await;
    let api = service_client(&c, "api");
    let web = service_client(&c, "web");
    let put = |client: &reqwest::Client, node: usize, svc: &str, id: &str| {
        client
            .put(c.url(node, &format!("/v1/services/{svc}/instances/{id}")))
            .json(&instance("10.0.0.1", 80))
    };

    // Its own service, through a follower or the leader alike.
    for node in 0..3 {
        let (s, body) = send(put(&api, node, "api", &format!("a{node}"))).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        assert_eq!(body["registered_by"], "service/api");
    }
    let (s, _) = send(put(&web, 1, "web", "w1")).await;
    assert_eq!(s, StatusCode::CREATED);
    // Another's service: refused, naming the permission and the resource.
    let got = send(put(&api, 2, "web", "w2")).await;
    assert_problem(
        &got,
        403,
        "forbidden",
        "service/api may not register on service \"web\"",
    );
    let got = send(api.delete(c.url(0, "/v1/services/web/instances/w1"))).await;
    assert_problem(&got, 403, "forbidden", "may not deregister");

    // An instance of its own service that another identity registered: api may deregister
    // instances of `api`, but not this one.
    let mut leased = instance("10.0.0.9", 81);
    leased["ttl_seconds"] = json!(60);
    let (s, _) = send(
        c.client
            .put(c.url(0, "/v1/services/api/instances/by-admin"))
            .json(&leased),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let got = send(api.put(c.url(2, "/v1/services/api/instances/by-admin/heartbeat"))).await;
    assert_problem(&got, 403, "forbidden", "registered by operator/admin");
    let got = send(api.delete(c.url(1, "/v1/services/api/instances/by-admin"))).await;
    assert_problem(&got, 403, "forbidden", "registered by operator/admin");
    let got = send(put(&api, 2, "api", "by-admin")).await;
    assert_problem(&got, 403, "forbidden", "registered by operator/admin");
    // The admin overrides ownership; the instance stays the admin's, and api's own too.
    let (s, _) = send(c.client.delete(c.url(2, "/v1/services/api/instances/a0"))).await;
    assert_eq!(s, StatusCode::OK);

    // Discovery: api sees only `api` in the list; web (discover-all) sees both.
    let (_, list) = send(api.get(c.url(1, "/v1/services"))).await;
    let names: Vec<&str> = list["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["api"], "{list}");
    let (_, list) = send(web.get(c.url(2, "/v1/services"))).await;
    assert_eq!(list["services"].as_array().map(Vec::len), Some(2), "{list}");

    // A query outside the scope is 403 whether or not the service exists: no existence leak.
    let existing = send(api.get(c.url(0, "/v1/services/web"))).await;
    let missing = send(api.get(c.url(0, "/v1/services/ghost"))).await;
    assert_problem(&existing, 403, "forbidden", "may not discover");
    assert_problem(&missing, 403, "forbidden", "may not discover");
    assert_eq!(
        existing.1["detail"].as_str().map(|d| d.replace("web", "X")),
        missing.1["detail"]
            .as_str()
            .map(|d| d.replace("ghost", "X")),
        "the two refusals are alike"
    );
    let got = send(api.get(c.url(0, "/v1/services/web/instances/w1"))).await;
    assert_problem(&got, 403, "forbidden", "may not discover");
    // A blocking query outside the scope is refused at once, not after the wait.
    let t = std::time::Instant::now();
    let got = send(api.get(c.url(1, "/v1/services/web?index=1&wait=5s"))).await;
    assert_problem(&got, 403, "forbidden", "may not discover");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Inside the scope, the same query works.
    let (s, body) = send(api.get(c.url(1, "/v1/services/api"))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["instances"].as_array().map(Vec::len), Some(3));

    // Cluster operations need admin.
    let got = send(web.get(c.url(0, "/v1/cluster/status"))).await;
    assert_problem(
        &got,
        403,
        "forbidden",
        "service/web may not admin on the cluster",
    );
    let got = send(web.get(c.url(0, "/v1/acl/roles"))).await;
    assert_problem(&got, 403, "forbidden", "may not admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_through_one_node_is_enforced_on_every_node() {
    let c = TestCluster::start(3, TUNING).await;
    let api = service_client(&c, "api");
    let query_web = |node: usize| api.get(c.url(node, "/v1/services/web"));
    for node in 0..3 {
        assert_eq!(send(query_web(node)).await.0, StatusCode::FORBIDDEN);
    }

    // Through node 1: a role that lets api read web, bound to api.
    let role = json!({"rules": [{"actions": ["discover"], "services": ["web"]}]});
    let (s, body) = send(c.client.put(c.url(0, "/v1/acl/roles/read-web")).json(&role)).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let binding = json!({"identities": ["service/api"], "roles": ["read-web"]});
    let (s, body) = send(
        c.client
            .put(c.url(0, "/v1/acl/bindings/api-reads-web"))
            .json(&binding),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // Enforced at once on the other nodes (a linearizable read sees the change).
    for node in [1, 2] {
        let (s, body) = send(query_web(node)).await;
        assert_eq!(s, StatusCode::OK, "node {}: {body}", node + 1);
    }
    // Still not allowed: registering on web.
    let got = send(
        api.put(c.url(2, "/v1/services/web/instances/x"))
            .json(&instance("10.0.0.1", 1)),
    )
    .await;
    assert_problem(&got, 403, "forbidden", "may not register");

    // Narrow the role through node 3; nodes 1 and 2 enforce it.
    let role = json!({"rules": [{"actions": ["discover"], "services": ["web-canary"]}]});
    let (s, body) = send(c.client.put(c.url(2, "/v1/acl/roles/read-web")).json(&role)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    for node in [0, 1] {
        assert_eq!(send(query_web(node)).await.0, StatusCode::FORBIDDEN);
    }
    // A role still bound cannot be deleted; the binding can, then the role.
    let got = send(c.client.delete(c.url(1, "/v1/acl/roles/read-web"))).await;
    assert_problem(&got, 409, "conflict", "api-reads-web");
    let (s, _) = send(c.client.delete(c.url(1, "/v1/acl/bindings/api-reads-web"))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = send(c.client.delete(c.url(1, "/v1/acl/roles/read-web"))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = send(c.client.get(c.url(2, "/v1/acl/roles/read-web"))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");

    // Bad policy input: a clear error naming the field, and nothing changes.
    let before = send(c.client.get(c.url(0, "/v1/acl/roles"))).await.1;
    for (body, field) in [
        (
            json!({"rules": [{"actions": ["fly"], "services": ["web"]}]}),
            "rules[0].actions",
        ),
        (
            json!({"rules": [{"actions": ["discover"], "services": ["we*b"]}]}),
            "rules[0].services[0]",
        ),
        (
            json!({"rules": [{"actions": ["snapshot"], "services": ["web"]}]}),
            "rules[0]",
        ),
        (json!({"name": "other", "rules": []}), "name"),
    ] {
        let (s, problem) = send(c.client.put(c.url(1, "/v1/acl/roles/bad")).json(&body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {problem}");
        let got = problem["field"].as_str().unwrap_or_default();
        assert!(
            got.starts_with(field),
            "{body}: field {got:?}, wanted {field:?}"
        );
    }
    let binding = json!({"identities": ["service/api"], "roles": ["no-such-role"]});
    let (s, problem) = send(c.client.put(c.url(1, "/v1/acl/bindings/b")).json(&binding)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(
        send(c.client.get(c.url(0, "/v1/acl/roles"))).await.1,
        before
    );

    // whoami needs no permission and shows the caller's own grants.
    let (s, me) = send(api.get(c.url(1, "/v1/acl/whoami"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me["identity"], "service/api");
    assert_eq!(me["authenticated_by"], "certificate");
    assert_eq!(me["grants"][0]["role"], "service-self", "{me}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_survives_a_full_restart_and_is_not_rebootstrapped() {
    let mut c = TestCluster::start(3, TUNING).await;
    let api = service_client(&c, "api");
    // An operator change after the bootstrap: api loses its own service.
    let (s, _) = send(c.client.delete(c.url(0, "/v1/acl/bindings/services"))).await;
    assert_eq!(s, StatusCode::OK);
    for i in 0..3 {
        c.stop(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_leader(Duration::from_secs(30)).await;
    // Every node still has the policy file; the changed policy is kept, not overwritten.
    let (s, body) = send(c.client.get(c.url(1, "/v1/acl/bindings/services"))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    let got = send(api.get(c.url(2, "/v1/services/api"))).await;
    assert_problem(&got, 403, "forbidden", "may not discover");
}

// ---- negative tests: certificates ----

/// A client presenting `dir/<stem>.pem`, trusting the cluster CA.
fn client_with_cert(c: &TestCluster, dir: &Path, stem: &str) -> reqwest::Client {
    cairn::tls::install_crypto_provider();
    cairn::tls::api_client(
        &c.dir.path().join("ca.pem"),
        &dir.join(format!("{stem}.pem")),
        &dir.join(format!("{stem}-key.pem")),
        Duration::from_secs(10),
    )
    .expect("client")
}

/// Signs a certificate with the cluster CA with the given URI SANs and validity, bypassing
/// cairn's issuer (which only makes well-formed certificates).
fn custom_cert(c: &TestCluster, stem: &str, uris: &[&str], validity: Validity) {
    let d = c.dir.path();
    let ca_pem = std::fs::read_to_string(d.join("ca.pem")).expect("ca");
    let ca_key = std::fs::read_to_string(d.join("ca-key.pem")).expect("ca key");
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&ca_pem, rcgen::KeyPair::from_pem(&ca_key).expect("key"))
            .expect("issuer");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().expect("uri")))
        .collect();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let issued = cairn::certs::IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    cairn::certs::write_pem_files(d, stem, &issued).expect("write");
}

async fn refused_at_handshake(client: &reqwest::Client, url: String) {
    let err = client.get(url).send().await.expect_err("must be refused");
    assert!(!err.is_status(), "refused before HTTP: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_is_refused() {
    let c = TestCluster::start(1, "").await;
    let ca = std::fs::read(c.dir.path().join("ca.pem")).expect("ca");
    let bare = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("ca pem")])
        .build()
        .expect("client");
    refused_at_handshake(&bare, c.url(0, "/v1/health/live")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let c = TestCluster::start(1, "").await;
    let other = cairn::certs::CertAuthority::generate(TD, Validity::days(1)).expect("ca");
    let d = tempfile::tempdir().expect("tmp");
    issue(
        &other,
        d.path(),
        "mallory",
        Identity::Operator("admin".into()),
        vec![],
    );
    let mallory = client_with_cert(&c, d.path(), "mallory");
    refused_at_handshake(&mallory, c.url(0, "/v1/health/live")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    let c = TestCluster::start(1, "").await;
    let now = SystemTime::now();
    let expired = Validity {
        not_before: now - Duration::from_secs(2 * 86_400),
        not_after: now - Duration::from_secs(86_400),
    };
    custom_cert(
        &c,
        "expired",
        &[&format!("spiffe://{TD}/operator/admin")],
        expired,
    );
    let client = client_with_cert(&c, c.dir.path(), "expired");
    refused_at_handshake(&client, c.url(0, "/v1/health/live")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_a_spiffe_id_is_refused() {
    let c = TestCluster::start(1, "").await;
    custom_cert(
        &c,
        "anonymous",
        &["https://example.com/admin"],
        Validity::days(1),
    );
    let client = client_with_cert(&c, c.dir.path(), "anonymous");
    let got = send(client.get(c.url(0, "/v1/services"))).await;
    assert_problem(&got, 401, "unauthenticated", "no spiffe:// URI SAN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_with_two_spiffe_ids_is_refused() {
    let c = TestCluster::start(1, "").await;
    let uris = [
        format!("spiffe://{TD}/service/api"),
        format!("spiffe://{TD}/operator/admin"),
    ];
    custom_cert(&c, "two", &[&uris[0], &uris[1]], Validity::days(1));
    let client = client_with_cert(&c, c.dir.path(), "two");
    let got = send(client.get(c.url(0, "/v1/services"))).await;
    assert_problem(&got, 401, "unauthenticated", "2 spiffe:// URI SANs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_trust_domain_is_refused() {
    let c = TestCluster::start(1, "").await;
    custom_cert(
        &c,
        "foreign",
        &["spiffe://evil.example/operator/admin"],
        Validity::days(1),
    );
    let client = client_with_cert(&c, c.dir.path(), "foreign");
    let got = send(client.get(c.url(0, "/v1/services"))).await;
    assert_problem(&got, 401, "unauthenticated", "trust domain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_certificate_is_refused_on_the_raft_port() {
    let c = TestCluster::start(1, "").await;
    for client in [service_client(&c, "web"), c.client.clone()] {
        let url = format!("https://{}/internal/probe", c.nodes[0].raft);
        let res = client.post(url).body(Vec::new()).send().await;
        assert!(
            res.is_err(),
            "refused at the raft port's handshake: {res:?}"
        );
    }
    // A forwarded write over the raft port needs a node certificate: the service certificate
    // cannot even speak there, let alone claim to forward someone's request.
    let svc = service_client(&c, "web");
    let url = format!("https://{}/internal/write", c.nodes[0].raft);
    assert!(svc.post(url).body(vec![1, 2, 3]).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_identity_header_is_ignored() {
    let c = TestCluster::start(1, "").await;
    let api = service_client(&c, "api");
    let forged = [
        ("x-cairn-caller", "operator/admin"),
        ("x-cairn-identity", "operator/admin"),
        ("x-forwarded-user", "operator/admin"),
        ("x-spiffe-id", "spiffe://cairn.test/operator/admin"),
        (
            "x-forwarded-client-cert",
            "URI=spiffe://cairn.test/operator/admin",
        ),
    ];
    let with_headers = |mut req: reqwest::RequestBuilder| {
        for (k, v) in forged {
            req = req.header(k, v);
        }
        req
    };
    let (_, me) = send(with_headers(api.get(c.url(0, "/v1/acl/whoami")))).await;
    assert_eq!(me["identity"], "service/api", "{me}");
    let got = send(with_headers(api.get(c.url(0, "/v1/cluster/status")))).await;
    assert_problem(&got, 403, "forbidden", "service/api may not admin");
    // Nor as a query parameter.
    let got = send(api.get(c.url(0, "/v1/services/web?caller=operator/admin"))).await;
    assert_eq!(
        got.0.as_u16(),
        400,
        "unknown parameters are refused: {}",
        got.1
    );
    // An Authorization header that is not a valid bearer token is refused, never ignored.
    let got = send(
        api.get(c.url(0, "/v1/services"))
            .header("authorization", "Basic YWRtaW46YWRtaW4="),
    )
    .await;
    assert_problem(&got, 401, "unauthenticated", "Bearer");
}

// ---- negative tests: tokens ----

const ISSUER: &str = "https://idp.cairn.test";
const AUDIENCE: &str = "cairn";

/// An Ed25519 signing key and its JWK.
struct SigningKey {
    kid: String,
    pkcs8: Vec<u8>,
    public: Vec<u8>,
}

impl SigningKey {
    fn new(kid: &str) -> SigningKey {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pkcs8");
        SigningKey {
            kid: kid.into(),
            public: pair.public_key().as_ref().to_vec(),
            pkcs8: pkcs8.as_ref().to_vec(),
        }
    }

    fn jwk(&self) -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
               "kid": self.kid, "x": b64(&self.public)})
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&self.pkcs8)).expect("sign")
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(sub: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now(), "exp": now() + 300})
}

/// A 1-node cluster whose API accepts connections without a client certificate and bearer
/// tokens signed by the returned key.
async fn token_cluster() -> (TestCluster, SigningKey) {
    let key = SigningKey::new("idp-1");
    let jwt = format!(
        "[jwt]\njwks = \"jwks.json\"\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\nleeway_seconds = 5\n"
    );
    let mut c = TestCluster::create_with_tls(
        1,
        &jwt,
        "client_auth = \"optional\"\nreload_interval_ms = 200",
    );
    let jwks = json!({"keys": [key.jwk()]});
    std::fs::write(c.dir.path().join("jwks.json"), jwks.to_string()).expect("jwks");
    c.spawn(0);
    c.wait_leader(Duration::from_secs(30)).await;
    (c, key)
}

/// A client with no certificate, trusting the cluster CA.
fn anonymous(c: &TestCluster) -> reqwest::Client {
    let ca = std::fs::read(c.dir.path().join("ca.pem")).expect("ca");
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("ca pem")])
        .build()
        .expect("client")
}

async fn with_token(c: &TestCluster, client: &reqwest::Client, token: &str) -> (StatusCode, Value) {
    send(client.get(c.url(0, "/v1/acl/whoami")).bearer_auth(token)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_authenticates_without_a_client_certificate() {
    let (c, key) = token_cluster().await;
    let client = anonymous(&c);
    let (s, me) = with_token(&c, &client, &key.sign(&claims("service/api"))).await;
    assert_eq!(s, StatusCode::OK, "{me}");
    assert_eq!(me["identity"], "service/api");
    assert_eq!(me["authenticated_by"], "token");
    // The token's identity is subject to the policy like any other.
    let token = key.sign(&claims("service/api"));
    let (s, _) = send(
        client
            .put(c.url(0, "/v1/services/api/instances/t1"))
            .bearer_auth(&token)
            .json(&instance("10.0.0.1", 80)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let got = send(client.get(c.url(0, "/v1/services/web")).bearer_auth(&token)).await;
    assert_problem(&got, 403, "forbidden", "service/api may not discover");
    // With neither a certificate nor a token: 401, saying what is missing.
    let got = send(client.get(c.url(0, "/v1/services"))).await;
    assert_problem(&got, 401, "unauthenticated", "no credential");

    // The issuer rotates its signing key: the JWKS file is replaced, and the node follows
    // without a restart (old tokens stop working, new ones work).
    let next = SigningKey::new("idp-2");
    let jwks = json!({"keys": [next.jwk()]});
    let path = c.dir.path().join("jwks.json");
    std::fs::write(path.with_extension("tmp"), jwks.to_string()).expect("jwks");
    std::fs::rename(path.with_extension("tmp"), &path).expect("replace jwks");
    let new_token = next.sign(&claims("service/api"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while with_token(&c, &client, &new_token).await.0 != StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "the new JWKS was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = with_token(&c, &client, &key.sign(&claims("service/api"))).await;
    assert_problem(&got, 401, "unauthenticated", "idp-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_alg_none_is_refused() {
    let (c, _) = token_cluster().await;
    let header = b64(json!({"alg": "none", "kid": "idp-1"})
        .to_string()
        .as_bytes());
    let body = b64(claims("operator/admin").to_string().as_bytes());
    let got = with_token(&c, &anonymous(&c), &format!("{header}.{body}.")).await;
    assert_problem(&got, 401, "unauthenticated", "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_audience_is_refused() {
    let (c, key) = token_cluster().await;
    let mut cl = claims("operator/admin");
    cl["aud"] = json!("billing");
    let got = with_token(&c, &anonymous(&c), &key.sign(&cl)).await;
    assert_problem(&got, 401, "unauthenticated", "audience");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let (c, key) = token_cluster().await;
    let mut cl = claims("operator/admin");
    cl["iat"] = json!(now() - 600);
    cl["exp"] = json!(now() - 60);
    let got = with_token(&c, &anonymous(&c), &key.sign(&cl)).await;
    assert_problem(&got, 401, "unauthenticated", "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_by_an_unknown_key_is_refused() {
    let (c, _) = token_cluster().await;
    let client = anonymous(&c);
    // A key the JWKS does not list...
    let stranger = SigningKey::new("idp-2");
    let got = with_token(&c, &client, &stranger.sign(&claims("operator/admin"))).await;
    assert_problem(&got, 401, "unauthenticated", "idp-2");
    // ...and another key claiming the listed kid.
    let impostor = SigningKey::new("idp-1");
    let got = with_token(&c, &client, &impostor.sign(&claims("operator/admin"))).await;
    assert_problem(&got, 401, "unauthenticated", "signature");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_token_signed_with_the_public_key_is_refused() {
    let (c, key) = token_cluster().await;
    let client = anonymous(&c);
    let jwks = std::fs::read(c.dir.path().join("jwks.json")).expect("jwks");
    // Every form an attacker might feed the HMAC: raw key bytes, the JWK, the JWKS file.
    for secret in [key.public.clone(), key.jwk().to_string().into_bytes(), jwks] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.clone());
        let token = jsonwebtoken::encode(
            &header,
            &claims("operator/admin"),
            &EncodingKey::from_secret(&secret).expect("hmac key"),
        )
        .expect("sign");
        let got = with_token(&c, &client, &token).await;
        assert_problem(&got, 401, "unauthenticated", "HS256");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_bound_token_over_another_certificate_is_refused() {
    let (c, key) = token_cluster().await;
    let api = service_client(&c, "api");
    let web = service_client(&c, "web");
    let pem = std::fs::read(c.dir.path().join("service-api.pem")).expect("pem");
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
        .map(|d: rustls::pki_types::CertificateDer<'static>| d.as_ref().to_vec())
        .expect("der");
    let mut cl = claims("operator/admin");
    cl["cnf"] = json!({"x5t#S256": cairn::token::cert_thumbprint(&der)});
    let token = key.sign(&cl);
    // Over the certificate it is bound to: accepted (the token's identity is the caller).
    let (s, me) = with_token(&c, &api, &token).await;
    assert_eq!(s, StatusCode::OK, "{me}");
    assert_eq!(me["identity"], "operator/admin");
    // Over another certificate, or none: refused.
    let got = with_token(&c, &web, &token).await;
    assert_problem(&got, 401, "unauthenticated", "certificate");
    let got = with_token(&c, &anonymous(&c), &token).await;
    assert_problem(&got, 401, "unauthenticated", "certificate");
}
