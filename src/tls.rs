//! tls: rustls configurations for the API listener, the raft listener and peer clients; knows nothing of routes, Raft or the registry.
//!
//! Both listeners demand a client certificate that chains to the cluster CA. The raft
//! listener goes further and refuses, during the handshake, every certificate whose SPIFFE
//! identity is not a node of this trust domain, so no request from a service or operator
//! ever reaches a raft route. Server configs carry the ring provider explicitly; reqwest
//! reads rustls's process-wide provider, which [`install_crypto_provider`] sets.
//!
//! Hot reload: build a fresh config with the same function and hand it to
//! `axum_server::tls_rustls::RustlsConfig::reload_from_config` (new handshakes only);
//! rebuild clients.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tracing::warn;

use crate::identity::{self, Identity, IdentityError};

/// How long an unused pooled connection is kept open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often an idle peer connection is pinged, so a dead peer is noticed and the
/// connection replaced instead of swallowing the next request.
const PEER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Why TLS material could not be loaded or a config or client not built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoPrivateKey { path: PathBuf },
    #[error("{path}: invalid PEM: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("tls configuration: {0}")]
    Rustls(String),
    #[error("https client: {0}")]
    Client(String),
}

/// The PEM files of one node: the cluster CA, the node's certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Installs rustls's ring provider as the process default, which reqwest needs (it is
/// built without a provider of its own). Idempotent; if another provider was installed
/// first, that one stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The public API listener: any client certificate that chains to the CA is admitted;
/// who may do what is decided per request from [`peer_identity`]. ALPN `h2`, `http/1.1`.
pub fn api_server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    server_config(files, ca_client_verifier(&files.ca)?)
}

/// The raft listener: like [`api_server_config`], but the handshake fails for any client
/// certificate that does not name `Identity::Node(_)` in `trust_domain`.
pub fn raft_server_config(files: &TlsFiles, trust_domain: &str) -> Result<ServerConfig, TlsError> {
    let verifier = NodeOnlyVerifier {
        inner: ca_client_verifier(&files.ca)?,
        trust_domain: trust_domain.to_string(),
    };
    server_config(files, Arc::new(verifier))
}

/// The client a node uses to call its peers' raft listeners: trusts only the cluster CA,
/// presents the node certificate, binds `local_ip` so the node's traffic can be told apart,
/// and speaks HTTP/2 directly (our listeners offer `h2`), multiplexing all calls to a peer
/// over one pooled connection. `timeout` bounds connecting and, unless a request sets its
/// own (`RequestBuilder::timeout`, e.g. for snapshots), each whole request.
pub fn peer_client(
    files: &TlsFiles,
    local_ip: IpAddr,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    client_builder(&files.ca, &files.cert, &files.key, timeout)?
        .local_address(local_ip)
        // Proxies would hide the bound address and are never wanted between nodes.
        .no_proxy()
        .http2_prior_knowledge()
        .http2_keep_alive_interval(PEER_KEEPALIVE_INTERVAL)
        .http2_keep_alive_timeout(timeout)
        .http2_keep_alive_while_idle(true)
        .build()
        .map_err(client_error)
}

/// The client behind the CLI: trusts only the cluster CA, presents the given certificate,
/// negotiates HTTP/2 or HTTP/1.1 by ALPN. `timeout` bounds connecting and each request.
pub fn api_client(
    ca: &Path,
    cert: &Path,
    key: &Path,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    client_builder(ca, cert, key, timeout)?
        .build()
        .map_err(client_error)
}

/// The identity of a TLS peer from its certificate chain as the handshake saw it (the
/// end-entity certificate comes first), e.g. `axum_server::tls::TlsInfo::peer_certificates`.
/// The chain was verified by the handshake; this only reads the name.
pub fn peer_identity<C: AsRef<[u8]>>(
    der_chain: &[C],
    trust_domain: &str,
) -> Result<Identity, IdentityError> {
    let end_entity = der_chain.first().ok_or(IdentityError::NoPeerCertificate)?;
    identity::identity_from_cert(end_entity.as_ref(), trust_domain)
}

/// Wraps the CA chain check and then insists on a node identity, so the refusal happens
/// at the handshake rather than in each raft route.
#[derive(Debug)]
struct NodeOnlyVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for NodeOnlyVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Chain, dates and clientAuth first: only a certificate of our CA has a name worth reading.
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match identity::identity_from_cert(end_entity, &self.trust_domain) {
            Ok(Identity::Node(_)) => Ok(verified),
            Ok(identity) => {
                warn!(%identity, "raft listener refused a certificate that is not a node's");
                // Sends the `access_denied` alert: a valid certificate, not allowed here.
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
            Err(error) => {
                warn!(%error, "raft listener refused a certificate without a node identity");
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(error)),
                )))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Demands a client certificate chaining to the CA in `ca` (with clientAuth, in date).
fn ca_client_verifier(ca: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Rustls(format!("{}: bad CA certificate: {e}", ca.display())))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Rustls(format!("client verifier: {e}")))
}

fn server_config(
    files: &TlsFiles,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, TlsError> {
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            TlsError::Rustls(format!(
                "{} with {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn client_builder(
    ca: &Path,
    cert: &Path,
    key: &Path,
    timeout: Duration,
) -> Result<reqwest::ClientBuilder, TlsError> {
    install_crypto_provider();
    let ca_pem = read(ca)?;
    parse_certs(ca, &ca_pem)?;
    let roots = reqwest::Certificate::from_pem_bundle(&ca_pem)
        .map_err(|e| TlsError::Client(format!("{}: {}", ca.display(), error_chain(&e))))?;
    // Parse here too so a wrong file gets a clear error instead of reqwest's generic one.
    let mut identity_pem = read(cert)?;
    parse_certs(cert, &identity_pem)?;
    let key_pem = read(key)?;
    parse_key(key, &key_pem)?;
    identity_pem.push(b'\n');
    identity_pem.extend_from_slice(&key_pem);
    let identity = reqwest::Identity::from_pem(&identity_pem).map_err(client_error)?;
    Ok(reqwest::Client::builder()
        .tls_certs_only(roots)
        .identity(identity)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_nodelay(true))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(path, &read(path)?)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(path, &read(path)?)
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        e => pem_error(path, e),
    })
}

fn pem_error(path: &Path, e: pem::Error) -> TlsError {
    TlsError::BadPem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn client_error(e: reqwest::Error) -> TlsError {
    TlsError::Client(error_chain(&e))
}

/// `reqwest::Error`'s own message is terse ("builder error"); the cause is in its sources.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use axum::{Extension, Router};
    use axum_server::tls::TlsInfo;
    use axum_server::tls_rustls::RustlsConfig;

    use crate::certs::{write_pem_files, CertAuthority, IssueRequest, IssuedCert, Validity};

    const TD: &str = "cairn.test";
    const TIMEOUT: Duration = Duration::from_secs(5);
    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A CA, node 1's files (the server side) and a temp dir for more certificates.
    struct Pki {
        dir: tempfile::TempDir,
        ca: CertAuthority,
        ca_path: PathBuf,
        node: TlsFiles,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().expect("tempdir");
            let ca = CertAuthority::generate(TD, Validity::days(1)).expect("ca");
            let ca_pem = IssuedCert {
                cert_pem: ca.cert_pem(),
                key_pem: ca.key_pem(),
            };
            let (ca_path, _) = write_pem_files(dir.path(), "ca", &ca_pem).expect("write ca");
            let mut pki = Pki {
                node: TlsFiles {
                    ca: ca_path.clone(),
                    cert: PathBuf::new(),
                    key: PathBuf::new(),
                },
                dir,
                ca,
                ca_path,
            };
            pki.node = pki.issue("node-1", Identity::Node(1), Validity::days(1));
            pki
        }

        fn issue(&self, stem: &str, identity: Identity, validity: Validity) -> TlsFiles {
            issue_with(
                &self.ca,
                &self.ca_path,
                self.dir.path(),
                stem,
                identity,
                validity,
            )
        }

        fn client(&self, files: &TlsFiles) -> reqwest::Client {
            api_client(&files.ca, &files.cert, &files.key, TIMEOUT).expect("client")
        }
    }

    fn issue_with(
        ca: &CertAuthority,
        ca_path: &Path,
        dir: &Path,
        stem: &str,
        identity: Identity,
        validity: Validity,
    ) -> TlsFiles {
        let cert = ca
            .issue(&IssueRequest {
                identity,
                trust_domain: TD.to_string(),
                ips: vec![LOCALHOST],
                dns: vec![],
                validity,
            })
            .expect("issue");
        let (cert, key) = write_pem_files(dir, stem, &cert).expect("write");
        TlsFiles {
            ca: ca_path.to_path_buf(),
            cert,
            key,
        }
    }

    /// Serves `GET /` on 127.0.0.1:0 answering `<identity> <peer ip> <alpn>`, always 200,
    /// so every refusal a test sees comes from the TLS layer.
    async fn serve(config: ServerConfig) -> SocketAddr {
        let listener = std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route(
            "/",
            get(
                |Extension(tls): Extension<Arc<TlsInfo>>,
                 ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                    let identity = match peer_identity(&tls.peer_certificates, TD) {
                        Ok(identity) => identity.to_string(),
                        Err(e) => format!("none({e})"),
                    };
                    let alpn = String::from_utf8_lossy(tls.alpn_protocol.as_deref().unwrap_or(b""))
                        .into_owned();
                    format!("{identity} {} {alpn}", peer.ip())
                },
            ),
        );
        let server =
            axum_server::from_tcp_rustls(listener, RustlsConfig::from_config(Arc::new(config)))
                .expect("server");
        tokio::spawn(async move {
            server
                .serve(app.into_make_service_with_connect_info::<SocketAddr>())
                .await
        });
        addr
    }

    async fn get_body(client: &reqwest::Client, addr: SocketAddr) -> Result<String, String> {
        let response = client
            .get(format!("https://{addr}/"))
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        assert_eq!(response.status(), 200);
        response.text().await.map_err(|e| error_chain(&e))
    }

    /// Asserts the request failed in the handshake, with the alert the server should send.
    fn assert_refused(result: Result<String, String>, alert: &str) {
        match result {
            Ok(body) => panic!("expected a TLS refusal ({alert}), got 200 {body:?}"),
            Err(e) => assert!(e.contains(alert), "expected alert {alert}, got: {e}"),
        }
    }

    #[tokio::test]
    async fn api_listener_admits_a_certificate_of_the_ca() {
        let pki = Pki::new();
        let addr = serve(api_server_config(&pki.node).expect("config")).await;
        let service = pki.issue(
            "payments",
            Identity::Service("payments".into()),
            Validity::days(1),
        );
        let body = get_body(&pki.client(&service), addr)
            .await
            .expect("request");
        assert_eq!(body, "service/payments 127.0.0.1 h2");
        let operator = pki.issue(
            "alice",
            Identity::Operator("alice".into()),
            Validity::days(1),
        );
        let body = get_body(&pki.client(&operator), addr)
            .await
            .expect("request");
        assert_eq!(body, "operator/alice 127.0.0.1 h2");
    }

    #[tokio::test]
    async fn api_listener_refuses_a_client_without_certificate() {
        let pki = Pki::new();
        let addr = serve(api_server_config(&pki.node).expect("config")).await;
        install_crypto_provider();
        let ca = fs::read(&pki.ca_path).expect("read ca");
        let anonymous = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("ca")])
            .build()
            .expect("client");
        assert_refused(get_body(&anonymous, addr).await, "CertificateRequired");
    }

    #[tokio::test]
    async fn api_listener_refuses_a_certificate_of_another_ca() {
        let pki = Pki::new();
        let addr = serve(api_server_config(&pki.node).expect("config")).await;
        // An impostor CA with our CA's very name: the signature check refuses it.
        let twin = CertAuthority::generate(TD, Validity::days(1)).expect("twin ca");
        let stray = issue_with(
            &twin,
            &pki.ca_path,
            pki.dir.path(),
            "stray",
            Identity::Service("payments".into()),
            Validity::days(1),
        );
        assert_refused(get_body(&pki.client(&stray), addr).await, "DecryptError");
        // A CA with another name: no issuer is found.
        let other = CertAuthority::generate("other.test", Validity::days(1)).expect("other ca");
        let stray = issue_with(
            &other,
            &pki.ca_path,
            pki.dir.path(),
            "stray",
            Identity::Service("payments".into()),
            Validity::days(1),
        );
        assert_refused(get_body(&pki.client(&stray), addr).await, "UnknownCA");
    }

    #[tokio::test]
    async fn api_listener_refuses_an_expired_certificate() {
        let pki = Pki::new();
        let addr = serve(api_server_config(&pki.node).expect("config")).await;
        let now = std::time::SystemTime::now();
        let expired = Validity {
            not_before: now - Duration::from_secs(2 * 86_400),
            not_after: now - Duration::from_secs(86_400),
        };
        let old = pki.issue("old", Identity::Service("payments".into()), expired);
        assert_refused(
            get_body(&pki.client(&old), addr).await,
            "CertificateExpired",
        );
    }

    #[tokio::test]
    async fn raft_listener_admits_nodes_only() {
        let pki = Pki::new();
        let addr = serve(raft_server_config(&pki.node, TD).expect("config")).await;
        let node2 = pki.issue("node-2", Identity::Node(2), Validity::days(1));
        let body = get_body(&pki.client(&node2), addr)
            .await
            .expect("node request");
        assert_eq!(body, "node/2 127.0.0.1 h2");

        let service = pki.issue(
            "payments",
            Identity::Service("payments".into()),
            Validity::days(1),
        );
        assert_refused(get_body(&pki.client(&service), addr).await, "AccessDenied");
        let operator = pki.issue(
            "alice",
            Identity::Operator("alice".into()),
            Validity::days(1),
        );
        assert_refused(get_body(&pki.client(&operator), addr).await, "AccessDenied");
    }

    #[tokio::test]
    async fn raft_listener_refuses_a_node_of_another_trust_domain() {
        let pki = Pki::new();
        let addr = serve(raft_server_config(&pki.node, TD).expect("config")).await;
        // Signed by our CA, so only the identity check can refuse it.
        let cert = pki
            .ca
            .issue(&IssueRequest {
                identity: Identity::Node(2),
                trust_domain: "other.test".to_string(),
                ips: vec![],
                dns: vec![],
                validity: Validity::days(1),
            })
            .expect("issue");
        let (cert, key) = write_pem_files(pki.dir.path(), "foreign", &cert).expect("write");
        let foreign = TlsFiles {
            ca: pki.ca_path.clone(),
            cert,
            key,
        };
        assert_refused(
            get_body(&pki.client(&foreign), addr).await,
            "CertificateUnknown",
        );
    }

    #[tokio::test]
    async fn peer_client_binds_the_local_address_and_speaks_h2() {
        let pki = Pki::new();
        let addr = serve(raft_server_config(&pki.node, TD).expect("config")).await;
        let node2 = pki.issue("node-2", Identity::Node(2), Validity::days(1));
        let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let client = peer_client(&node2, local, TIMEOUT).expect("peer client");
        for _ in 0..3 {
            let body = get_body(&client, addr).await.expect("request");
            assert_eq!(body, "node/2 127.0.0.2 h2");
        }
    }

    #[test]
    fn loading_reports_which_file_is_wrong() {
        let pki = Pki::new();
        let missing = pki.dir.path().join("missing.pem");
        let with = |cert: &Path, key: &Path| TlsFiles {
            ca: pki.ca_path.clone(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        };
        match api_server_config(&with(&missing, &pki.node.key)) {
            Err(TlsError::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected Io, got {other:?}"),
        }
        // A key file holds no certificate, a certificate file no key.
        match api_server_config(&with(&pki.node.key, &pki.node.key)) {
            Err(TlsError::NoCertificate { path }) => assert_eq!(path, pki.node.key),
            other => panic!("expected NoCertificate, got {other:?}"),
        }
        match raft_server_config(&with(&pki.node.cert, &pki.node.cert), TD) {
            Err(TlsError::NoPrivateKey { path }) => assert_eq!(path, pki.node.cert),
            other => panic!("expected NoPrivateKey, got {other:?}"),
        }
        match peer_client(&with(&pki.node.cert, &pki.node.cert), LOCALHOST, TIMEOUT) {
            Err(TlsError::NoPrivateKey { path }) => assert_eq!(path, pki.node.cert),
            other => panic!("expected NoPrivateKey, got {other:?}"),
        }
        // A key that is not the certificate's.
        let other = pki.issue("node-9", Identity::Node(9), Validity::days(1));
        assert!(matches!(
            api_server_config(&with(&pki.node.cert, &other.key)),
            Err(TlsError::Rustls(_))
        ));
    }

    #[test]
    fn peer_identity_reads_the_end_entity() {
        let pki = Pki::new();
        let node = CertificateDer::from_pem_file(&pki.node.cert).expect("node cert");
        let ca = CertificateDer::from_pem_file(&pki.ca_path).expect("ca cert");
        assert_eq!(
            peer_identity(&[node.clone(), ca.clone()], TD).expect("identity"),
            Identity::Node(1)
        );
        assert!(matches!(
            peer_identity(&[ca, node], TD),
            Err(IdentityError::NoSpiffeId)
        ));
        assert!(matches!(
            peer_identity::<Vec<u8>>(&[], TD),
            Err(IdentityError::NoPeerCertificate)
        ));
    }
}
