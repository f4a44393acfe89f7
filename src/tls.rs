//! tls: rustls configurations for the API listener, the raft listener and peer clients, all following one reloadable [`TlsMaterial`]; knows nothing of routes, Raft or the registry.
//!
//! Both listeners ask for a client certificate that chains to the cluster CA bundle. The
//! raft listener goes further and refuses, during the handshake, every certificate whose
//! SPIFFE identity is not a node of this trust domain, so no request from a service or
//! operator ever reaches a raft route.
//!
//! Hot reload: [`TlsMaterial`] keeps the node's certified key and the trust built from the
//! CA bundle behind one `ArcSwap`. The configs and the peer client built from it hold small
//! resolvers and verifiers that read the current value on every handshake, so
//! [`TlsMaterial::reload`] changes what *new* handshakes present and trust without
//! rebuilding a config, a listener or a client. Established connections are untouched: they
//! keep the keys they negotiated. A reload validates the candidate completely before the
//! swap and swaps certificate, key and bundle together; a failed reload changes nothing.
//!
//! Session resumption is off on both sides, on purpose. A resumed session skips certificate
//! verification, and rustls refuses to resume across a change of verifier only by comparing
//! verifier pointers — ours never change pointer — so a client whose CA was just dropped from
//! the bundle could otherwise resume its way back in. A full handshake costs one P-256
//! signature and a verification; our connections are pooled and long-lived.
//!
//! Server configs and the peer client's rustls config carry the ring provider explicitly;
//! [`api_client`] uses reqwest's own rustls setup, which reads the process-wide provider
//! that [`install_crypto_provider`] sets.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, InconsistentKeys,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::identity::{self, Identity, IdentityError};

/// How long an unused pooled connection is kept open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often an idle peer connection is pinged, so a dead peer is noticed and the
/// connection replaced instead of swallowing the next request.
const PEER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Why TLS material could not be loaded or reloaded, or a config or client not built.
/// Every variant about a file names it.
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
    /// The PEM holds something that is not a well-formed X.509 certificate.
    #[error("{path}: not an X.509 certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    /// A certificate of the CA bundle cannot be used as a trust anchor.
    #[error("{path}: bad CA certificate: {reason}")]
    BadCa { path: PathBuf, reason: String },
    /// The private key is not one the ring provider can sign with.
    #[error("{path}: unusable private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{key}: this key does not belong to the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: certificate is not valid before {not_before} (unix seconds)")]
    NotYetValid { path: PathBuf, not_before: u64 },
    #[error("{path}: certificate expired at {not_after} (unix seconds)")]
    Expired { path: PathBuf, not_after: u64 },
    /// The node certificate has no usable SPIFFE identity in the trust domain.
    #[error("{path}: {source}")]
    NoIdentity {
        path: PathBuf,
        source: IdentityError,
    },
    /// The node certificate does not chain to the CA bundle for `usage` (`server` or
    /// `client`; a node certificate must serve both).
    #[error("{cert}: not a valid {usage} certificate under the CA bundle {ca}: {reason}")]
    Untrusted {
        cert: PathBuf,
        ca: PathBuf,
        usage: &'static str,
        reason: String,
    },
    /// A reload found a certificate of another identity: who a node is never changes while
    /// it runs.
    #[error(
        "{path}: names {found}, but this node is {loaded}; a reload cannot change the identity"
    )]
    IdentityChanged {
        path: PathBuf,
        loaded: Identity,
        found: Identity,
    },
    #[error("tls configuration: {0}")]
    Rustls(String),
    #[error("https client: {0}")]
    Client(String),
}

/// The PEM files of one node: the CA bundle (one or more CA certificates), the node's
/// certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The three paths, e.g. for a file watcher.
    pub fn paths(&self) -> Vec<PathBuf> {
        vec![self.ca.clone(), self.cert.clone(), self.key.clone()]
    }
}

/// Whether the API listener demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A handshake without a client certificate fails (`certificate_required`).
    Required,
    /// A handshake without a client certificate succeeds (the request is then anonymous);
    /// a certificate that is presented must still chain to the CA bundle.
    Optional,
}

/// What [`TlsMaterial::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The three files hold the bytes already in service.
    Unchanged,
    /// New material is in service for new handshakes.
    Reloaded { identity: Identity, not_after: u64 },
}

impl fmt::Display for ReloadOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadOutcome::Unchanged => f.write_str("unchanged"),
            ReloadOutcome::Reloaded {
                identity,
                not_after,
            } => write!(f, "{identity}, valid until {not_after} (unix seconds)"),
        }
    }
}

/// The certificate in service, for status endpoints and expiry alerts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertValidity {
    /// The node's identity, e.g. `node/1`.
    pub identity: String,
    /// End of the node certificate's validity, unix seconds.
    pub not_after: u64,
    /// Seconds from now until `not_after`; negative once expired.
    pub remaining_seconds: i64,
    /// The trusted CAs, in bundle order.
    pub ca: Vec<CaInfo>,
    /// When this material went into service, unix seconds.
    pub loaded_at: u64,
}

/// One CA of the trust bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaInfo {
    /// The CA's subject, e.g. `CN=cairn CA prod.example`. During a rotation the old and
    /// the new CA usually share it; `not_after` tells them apart.
    pub subject: String,
    /// End of the CA certificate's validity, unix seconds.
    pub not_after: u64,
}

/// The node's TLS material — certified key, CA bundle and the verifiers built from it — as a
/// cheap cloneable handle. Every config and client built from it follows [`reload`](Self::reload).
#[derive(Clone)]
pub struct TlsMaterial {
    shared: Arc<Shared>,
}

struct Shared {
    files: TlsFiles,
    trust_domain: String,
    /// The identity loaded at start; every reload must keep it.
    identity: Identity,
    /// Read lock-free on every handshake; replaced whole by a successful reload.
    current: ArcSwap<Loaded>,
    /// Serialises reloads, so the compare with `current` and the swap cannot interleave
    /// with another reload (a watcher tick and a SIGHUP, say).
    reloading: Mutex<()>,
}

/// One consistent generation of material: everything here came from the same three reads.
struct Loaded {
    /// SHA-256 of the files' bytes, to tell "unchanged" without keeping the key's bytes twice.
    digests: [[u8; 32]; 3],
    certified_key: Arc<CertifiedKey>,
    /// Demands a certificate chaining to the bundle, in date, with clientAuth.
    client_verifier: Arc<dyn ClientCertVerifier>,
    /// Chain, dates, serverAuth and the name the client dialled.
    server_verifier: Arc<WebPkiServerVerifier>,
    identity: Identity,
    not_after: u64,
    ca: Vec<CaInfo>,
    loaded_at: u64,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key: only what names the material.
        f.debug_struct("TlsMaterial")
            .field("files", &self.files)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads and validates the three files: the certificate parses, names one SPIFFE
    /// identity in `trust_domain`, is in date, matches the key, and chains to the bundle
    /// both as a server and as a client certificate (nodes are both).
    pub fn load(files: TlsFiles, trust_domain: &str) -> Result<TlsMaterial, TlsError> {
        let loaded = Loaded::read(&files, trust_domain)?;
        Ok(TlsMaterial {
            shared: Arc::new(Shared {
                identity: loaded.identity.clone(),
                current: ArcSwap::from_pointee(loaded),
                files,
                trust_domain: trust_domain.to_string(),
                reloading: Mutex::new(()),
            }),
        })
    }

    /// Re-reads the three files and, if their bytes changed, validates them as
    /// [`load`](Self::load) does and additionally insists on the same identity; only then
    /// swaps all three into service at once. On error the material in service stays.
    ///
    /// A reload that catches files mid-rotation (new certificate, old key) fails with
    /// [`TlsError::KeyMismatch`]; calling again once the writer is done succeeds.
    pub fn reload(&self) -> Result<ReloadOutcome, TlsError> {
        let shared = &self.shared;
        let _serial = shared
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let bytes = FileBytes::read(&shared.files)?;
        if bytes.digests() == shared.current.load().digests {
            return Ok(ReloadOutcome::Unchanged);
        }
        let next = Loaded::parse(&shared.files, &bytes, &shared.trust_domain)?;
        if next.identity != shared.identity {
            return Err(TlsError::IdentityChanged {
                path: shared.files.cert.clone(),
                loaded: shared.identity.clone(),
                found: next.identity,
            });
        }
        let outcome = ReloadOutcome::Reloaded {
            identity: next.identity.clone(),
            not_after: next.not_after,
        };
        shared.current.store(Arc::new(next));
        Ok(outcome)
    }

    /// The identity named by the certificate (fixed for the material's life).
    pub fn identity(&self) -> &Identity {
        &self.shared.identity
    }

    /// The files this material is read from.
    pub fn files(&self) -> &TlsFiles {
        &self.shared.files
    }

    /// The certificate and CAs in service now.
    pub fn validity(&self) -> CertValidity {
        let current = self.shared.current.load();
        let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
        CertValidity {
            identity: current.identity.to_string(),
            not_after: current.not_after,
            remaining_seconds: i64::try_from(current.not_after)
                .unwrap_or(i64::MAX)
                .saturating_sub(now),
            ca: current.ca.clone(),
            loaded_at: current.loaded_at,
        }
    }

    /// The public API listener: a client certificate that chains to the bundle is admitted
    /// (who may do what is decided per request from [`peer_identity`]); with
    /// [`ClientAuth::Optional`] a client without one is admitted too. ALPN `h2`, `http/1.1`.
    pub fn api_server_config(&self, client_auth: ClientAuth) -> Result<ServerConfig, TlsError> {
        self.server_config(CurrentClientVerifier {
            shared: self.shared.clone(),
            mandatory: client_auth == ClientAuth::Required,
            nodes_only: false,
        })
    }

    /// The raft listener: a client certificate is required, and the handshake fails for any
    /// that does not name `Identity::Node(_)` in the trust domain.
    pub fn raft_server_config(&self) -> Result<ServerConfig, TlsError> {
        self.server_config(CurrentClientVerifier {
            shared: self.shared.clone(),
            mandatory: true,
            nodes_only: true,
        })
    }

    /// The client a node uses to call its peers' raft listeners: trusts only the CA bundle
    /// in service, presents the node certificate in service, binds `local_ip` so the node's
    /// traffic can be told apart, and speaks HTTP/2 directly (our listeners offer `h2`),
    /// multiplexing all calls to a peer over one pooled connection. `timeout` bounds
    /// connecting and, unless a request sets its own (`RequestBuilder::timeout`, e.g. for
    /// snapshots), each whole request. Pooled connections survive a reload; new ones use
    /// the new material.
    pub fn peer_client(
        &self,
        local_ip: IpAddr,
        timeout: Duration,
    ) -> Result<reqwest::Client, TlsError> {
        let mut tls = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CurrentServerVerifier {
                shared: self.shared.clone(),
            }))
            .with_client_cert_resolver(Arc::new(CurrentCertifiedKey {
                shared: self.shared.clone(),
            }));
        // reqwest sets no ALPN on a preconfigured rustls config; our listeners pick h2 by it.
        tls.alpn_protocols = vec![b"h2".to_vec()];
        tls.resumption = Resumption::disabled();
        common_builder(timeout)
            // Takes `impl Any`: a `rustls::ClientConfig` of another rustls version than
            // reqwest's is not recognised and `build` fails with "unknown TLS backend".
            .tls_backend_preconfigured(tls)
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

    fn server_config(&self, verifier: CurrentClientVerifier) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(CurrentCertifiedKey {
                shared: self.shared.clone(),
            }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // No resumption (see the module doc). Also keeps the API and raft listeners from
        // ever sharing sessions.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }
}

/// Installs rustls's ring provider as the process default, which reqwest needs (it is
/// built without a provider of its own). Idempotent; if another provider was installed
/// first, that one stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The client behind the CLI: trusts only the CAs in `ca`, presents the given certificate,
/// negotiates HTTP/2 or HTTP/1.1 by ALPN. `timeout` bounds connecting and each request.
/// Static: it reads the files once.
pub fn api_client(
    ca: &Path,
    cert: &Path,
    key: &Path,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
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
    common_builder(timeout)
        .tls_certs_only(roots)
        .identity(identity)
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

/// The bytes of the three files, read once so everything validated comes from one read.
struct FileBytes {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl FileBytes {
    fn read(files: &TlsFiles) -> Result<FileBytes, TlsError> {
        Ok(FileBytes {
            ca: read(&files.ca)?,
            cert: read(&files.cert)?,
            key: read(&files.key)?,
        })
    }

    fn digests(&self) -> [[u8; 32]; 3] {
        [&self.ca, &self.cert, &self.key].map(|bytes| {
            let mut out = [0; 32];
            out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
            out
        })
    }
}

impl Loaded {
    fn read(files: &TlsFiles, trust_domain: &str) -> Result<Loaded, TlsError> {
        Loaded::parse(files, &FileBytes::read(files)?, trust_domain)
    }

    /// Validates everything a handshake will rely on, so a bad file fails here, with its
    /// name, rather than in every handshake after the swap.
    fn parse(files: &TlsFiles, bytes: &FileBytes, trust_domain: &str) -> Result<Loaded, TlsError> {
        let provider = provider();
        let now = UnixTime::now();

        let mut roots = RootCertStore::empty();
        let mut ca = Vec::new();
        for der in parse_certs(&files.ca, &bytes.ca)? {
            let bad_ca = |reason: String| TlsError::BadCa {
                path: files.ca.clone(),
                reason,
            };
            let (_, parsed) =
                x509_parser::parse_x509_certificate(&der).map_err(|e| bad_ca(e.to_string()))?;
            ca.push(CaInfo {
                subject: parsed.subject().to_string(),
                not_after: unix_seconds(parsed.validity().not_after.timestamp()),
            });
            roots.add(der).map_err(|e| bad_ca(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Rustls(format!("client verifier: {e}")))?;
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Rustls(format!("server verifier: {e}")))?;

        let chain = parse_certs(&files.cert, &bytes.cert)?;
        let (_, end_entity) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| {
            TlsError::BadCertificate {
                path: files.cert.clone(),
                reason: e.to_string(),
            }
        })?;
        let identity = identity::identity_from_cert(&chain[0], trust_domain).map_err(|source| {
            TlsError::NoIdentity {
                path: files.cert.clone(),
                source,
            }
        })?;
        let not_before = unix_seconds(end_entity.validity().not_before.timestamp());
        let not_after = unix_seconds(end_entity.validity().not_after.timestamp());
        if now.as_secs() < not_before {
            return Err(TlsError::NotYetValid {
                path: files.cert.clone(),
                not_before,
            });
        }
        if now.as_secs() > not_after {
            return Err(TlsError::Expired {
                path: files.cert.clone(),
                not_after,
            });
        }

        let key = parse_key(&files.key, &bytes.key)?;
        let signing_key =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| TlsError::BadKey {
                    path: files.key.clone(),
                    reason: e.to_string(),
                })?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        match certified_key.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::KeyMismatch {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                })
            }
            Err(e) => {
                return Err(TlsError::BadKey {
                    path: files.key.clone(),
                    reason: format!("cannot check it against {}: {e}", files.cert.display()),
                })
            }
        }

        let (end_entity, intermediates) = certified_key
            .cert
            .split_first()
            .expect("parse_certs returns at least one certificate");
        let untrusted = |usage, e: rustls::Error| TlsError::Untrusted {
            cert: files.cert.clone(),
            ca: files.ca.clone(),
            usage,
            reason: e.to_string(),
        };
        client_verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| untrusted("client", e))?;
        // The server verifier would also check a name, and which names peers dial is not
        // this module's knowledge; this is the same chain, date and serverAuth check without it.
        let parsed = ParsedCertificate::try_from(end_entity).map_err(|e| untrusted("server", e))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| untrusted("server", e))?;

        Ok(Loaded {
            digests: bytes.digests(),
            certified_key: Arc::new(certified_key),
            client_verifier,
            server_verifier,
            identity,
            not_after,
            ca,
            loaded_at: unix_now(),
        })
    }
}

/// Presents the certified key in service, as a server and as a client.
#[derive(Debug)]
struct CurrentCertifiedKey {
    shared: Arc<Shared>,
}

impl ResolvesServerCert for CurrentCertifiedKey {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.shared.current.load().certified_key.clone())
    }
}

impl ResolvesClientCert for CurrentCertifiedKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.shared.current.load().certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates with the verifier of the bundle in service, so a bundle
/// change applies to the next handshake. With `nodes_only` it then insists on a node
/// identity, so the refusal happens at the handshake rather than in each raft route.
#[derive(Debug)]
struct CurrentClientVerifier {
    shared: Arc<Shared>,
    mandatory: bool,
    nodes_only: bool,
}

impl ClientCertVerifier for CurrentClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    /// Empty on purpose: the trait lends the hints out of `&self`, and the bundle in
    /// service can change under it, so no borrow of it can be returned. An empty list tells
    /// a client to send whatever certificate it has, and every client of ours has exactly
    /// one. (A static hint list would go stale at the first CA rotation.)
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Chain, dates and clientAuth first: only a certificate of our CA has a name worth reading.
        let verified = self
            .shared
            .current
            .load()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        if !self.nodes_only {
            return Ok(verified);
        }
        match identity::identity_from_cert(end_entity, &self.shared.trust_domain) {
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
        self.shared
            .current
            .load()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.shared
            .current
            .load()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.shared
            .current
            .load()
            .client_verifier
            .supported_verify_schemes()
    }
}

/// Verifies peers' server certificates with the verifier of the bundle in service.
#[derive(Debug)]
struct CurrentServerVerifier {
    shared: Arc<Shared>,
}

impl ServerCertVerifier for CurrentServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.shared
            .current
            .load()
            .server_verifier
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.shared
            .current
            .load()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.shared
            .current
            .load()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.shared
            .current
            .load()
            .server_verifier
            .supported_verify_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What both clients share: HTTPS only, no redirects, bounded waits, no Nagle.
fn common_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_nodelay(true)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// X.509 times before 1970 clamp to 0; none of ours are.
fn unix_seconds(timestamp: i64) -> u64 {
    u64::try_from(timestamp).unwrap_or(0)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use crate::certs::{write_pem_files, CertAuthority, IssueRequest, IssuedCert, Validity};

    const TD: &str = "cairn.test";
    const TIMEOUT: Duration = Duration::from_secs(5);
    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A CA and node 1's files (`ca.pem`, `node.pem`, `node-key.pem`) in a temp dir. Tests
    /// replace files the way an operator or cert-manager would: write aside, rename over.
    struct Pki {
        dir: tempfile::TempDir,
        ca: CertAuthority,
        ca_validity: Validity,
        files: TlsFiles,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().expect("tempdir");
            let ca_validity = Validity::days(1);
            let ca = CertAuthority::generate(TD, ca_validity).expect("ca");
            let files = TlsFiles {
                ca: dir.path().join("ca.pem"),
                cert: dir.path().join("node.pem"),
                key: dir.path().join("node-key.pem"),
            };
            write_bundle(&files.ca, &[&ca]);
            install(&files, &issue(&ca, Identity::Node(1), Validity::days(1)));
            Pki {
                dir,
                ca,
                ca_validity,
                files,
            }
        }

        fn material(&self) -> TlsMaterial {
            TlsMaterial::load(self.files.clone(), TD).expect("load")
        }

        /// Another node's files, with a bundle file of its own holding this CA.
        fn node_files(&self, stem: &str, identity: Identity) -> TlsFiles {
            let files = TlsFiles {
                ca: self.dir.path().join(format!("{stem}-ca.pem")),
                cert: self.dir.path().join(format!("{stem}.pem")),
                key: self.dir.path().join(format!("{stem}-key.pem")),
            };
            write_bundle(&files.ca, &[&self.ca]);
            install(&files, &issue(&self.ca, identity, Validity::days(1)));
            files
        }

        /// Files for the CLI's static client, trusting node 1's bundle as it is now.
        fn client_files(&self, ca: &CertAuthority, stem: &str, identity: Identity) -> TlsFiles {
            let (cert, key) = write_pem_files(
                self.dir.path(),
                stem,
                &issue(ca, identity, Validity::days(1)),
            )
            .expect("write");
            TlsFiles {
                ca: self.files.ca.clone(),
                cert,
                key,
            }
        }

        fn client(&self, files: &TlsFiles) -> reqwest::Client {
            api_client(&files.ca, &files.cert, &files.key, TIMEOUT).expect("client")
        }
    }

    fn issue(ca: &CertAuthority, identity: Identity, validity: Validity) -> IssuedCert {
        ca.issue(&IssueRequest {
            identity,
            trust_domain: TD.to_string(),
            ips: vec![LOCALHOST],
            dns: vec![],
            validity,
        })
        .expect("issue")
    }

    fn expired() -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(2 * 86_400),
            not_after: now - Duration::from_secs(86_400),
        }
    }

    fn unix(time: SystemTime) -> u64 {
        time.duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    }

    /// Replaces `path` atomically, as a rotation tool does.
    fn replace(path: &Path, bytes: &[u8]) {
        let tmp = path.with_extension("new");
        fs::write(&tmp, bytes).expect("write");
        fs::rename(&tmp, path).expect("rename");
    }

    fn install(files: &TlsFiles, cert: &IssuedCert) {
        replace(&files.cert, cert.cert_pem.as_bytes());
        replace(&files.key, cert.key_pem.as_bytes());
    }

    fn write_bundle(path: &Path, cas: &[&CertAuthority]) {
        let pem: String = cas.iter().map(|ca| ca.cert_pem()).collect();
        replace(path, pem.as_bytes());
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("certificate")
            .to_vec()
    }

    fn reloaded(material: &TlsMaterial) {
        match material.reload() {
            Ok(ReloadOutcome::Reloaded { .. }) => {}
            other => panic!("expected Reloaded, got {other:?}"),
        }
    }

    // --- raw TLS: an echo server and a rustls client, to watch single connections ---

    type Conn = tokio_rustls::client::TlsStream<TcpStream>;

    /// Accepts TLS on 127.0.0.1:0 with `config` and echoes every byte back.
    async fn serve_echo(config: ServerConfig) -> SocketAddr {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let (mut rx, mut tx) = tokio::io::split(tls);
                        let _ = tokio::io::copy(&mut rx, &mut tx).await;
                    }
                });
            }
        });
        addr
    }

    /// A rustls client trusting `roots` and presenting `cert` if given. Resumption is on
    /// (the rustls default), so a refusal after a reload also shows that the server did not
    /// let an earlier session resume.
    fn raw_client(roots: &[&CertAuthority], cert: Option<&IssuedCert>) -> TlsConnector {
        let mut store = RootCertStore::empty();
        for ca in roots {
            store.add(der(&ca.cert_pem()).into()).expect("root");
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(store);
        let config = match cert {
            Some(cert) => builder
                .with_client_auth_cert(
                    vec![der(&cert.cert_pem).into()],
                    PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key"),
                )
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        TlsConnector::from(Arc::new(config))
    }

    /// Connects and completes one echo round trip: in TLS 1.3 the server judges the client
    /// certificate after the client considers the handshake done, so only a reply proves
    /// that the server admitted it.
    async fn open(client: &TlsConnector, addr: SocketAddr) -> Result<Conn, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut conn = client
            .connect(ServerName::from(LOCALHOST), tcp)
            .await
            .map_err(|e| e.to_string())?;
        ping(&mut conn).await?;
        Ok(conn)
    }

    async fn ping(conn: &mut Conn) -> Result<(), String> {
        conn.write_all(b"ping").await.map_err(|e| e.to_string())?;
        conn.flush().await.map_err(|e| e.to_string())?;
        let mut echo = [0; 4];
        conn.read_exact(&mut echo)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(&echo, b"ping");
        Ok(())
    }

    /// The end-entity certificate the server presented on `conn`.
    fn server_cert(conn: &Conn) -> Vec<u8> {
        conn.get_ref()
            .1
            .peer_certificates()
            .expect("server certificate")[0]
            .to_vec()
    }

    // --- HTTPS: an axum-server app and reqwest clients ---

    /// Serves on 127.0.0.1:0, always 200: `GET /` answers `<identity> <peer ip> <alpn>`,
    /// `GET /cert` the client certificate's SHA-256 in hex. Every refusal a test sees comes
    /// from the TLS layer.
    async fn serve(config: ServerConfig) -> SocketAddr {
        let listener = std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route(
                "/",
                get(
                    |Extension(tls): Extension<Arc<TlsInfo>>,
                     ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                        let identity = match peer_identity(&tls.peer_certificates, TD) {
                            Ok(identity) => identity.to_string(),
                            Err(e) => format!("none({e})"),
                        };
                        let alpn =
                            String::from_utf8_lossy(tls.alpn_protocol.as_deref().unwrap_or(b""))
                                .into_owned();
                        format!("{identity} {} {alpn}", peer.ip())
                    },
                ),
            )
            .route(
                "/cert",
                get(|Extension(tls): Extension<Arc<TlsInfo>>| async move {
                    tls.peer_certificates
                        .first()
                        .map(|cert| sha256_hex(cert))
                        .unwrap_or_default()
                }),
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

    fn sha256_hex(bytes: &[u8]) -> String {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    async fn get_path(
        client: &reqwest::Client,
        addr: SocketAddr,
        path: &str,
    ) -> Result<String, String> {
        let response = client
            .get(format!("https://{addr}{path}"))
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        assert_eq!(response.status(), 200);
        response.text().await.map_err(|e| error_chain(&e))
    }

    async fn get_body(client: &reqwest::Client, addr: SocketAddr) -> Result<String, String> {
        get_path(client, addr, "/").await
    }

    /// Asserts the attempt failed in the handshake, with the alert or reason expected.
    fn assert_refused<T: fmt::Debug>(result: Result<T, String>, reason: &str) {
        match result {
            Ok(value) => panic!("expected a TLS refusal ({reason}), got {value:?}"),
            Err(e) => assert!(e.contains(reason), "expected {reason}, got: {e}"),
        }
    }

    #[tokio::test]
    async fn reload_serves_the_new_certificate_and_keeps_open_connections() {
        let pki = Pki::new();
        let material = pki.material();
        let addr = serve_echo(
            material
                .api_server_config(ClientAuth::Required)
                .expect("config"),
        )
        .await;
        let client = raw_client(
            &[&pki.ca],
            Some(&issue(
                &pki.ca,
                Identity::Service("web".into()),
                Validity::days(1),
            )),
        );
        let cert_a = CertificateDer::from_pem_file(&pki.files.cert)
            .expect("cert a")
            .to_vec();
        let mut before = open(&client, addr).await.expect("connection before");
        assert_eq!(server_cert(&before), cert_a);

        let cert_b = issue(&pki.ca, Identity::Node(1), Validity::days(2));
        install(&pki.files, &cert_b);
        match material.reload().expect("reload") {
            ReloadOutcome::Reloaded {
                identity,
                not_after,
            } => {
                assert_eq!(identity, Identity::Node(1));
                assert_eq!(not_after, material.validity().not_after);
            }
            ReloadOutcome::Unchanged => panic!("the certificate changed"),
        }

        let after = open(&client, addr).await.expect("connection after");
        assert_eq!(server_cert(&after), der(&cert_b.cert_pem));
        // The connection from before the reload carries on with certificate A.
        ping(&mut before).await.expect("old connection still works");
        ping(&mut before).await.expect("old connection still works");
        assert_eq!(server_cert(&before), cert_a);
        assert_eq!(material.reload().expect("again"), ReloadOutcome::Unchanged);
    }

    #[tokio::test]
    async fn ca_rotation_changes_which_client_certificates_are_admitted() {
        // Both CAs carry the same name, as a rotated CA usually does: only signatures tell
        // them apart.
        let pki = Pki::new();
        let ca2 = CertAuthority::generate(TD, Validity::days(2)).expect("ca2");
        let material = pki.material();
        let addr = serve_echo(
            material
                .api_server_config(ClientAuth::Required)
                .expect("config"),
        )
        .await;
        // The clients trust both CAs for the server's certificate, so only the server's
        // bundle decides who gets in.
        let web = Identity::Service("web".into());
        let of_ca1 = raw_client(
            &[&pki.ca, &ca2],
            Some(&issue(&pki.ca, web.clone(), Validity::days(1))),
        );
        let of_ca2 = raw_client(&[&pki.ca, &ca2], Some(&issue(&ca2, web, Validity::days(1))));

        open(&of_ca1, addr).await.expect("CA1 client, bundle CA1");
        assert_refused(open(&of_ca2, addr).await, "DecryptError");

        write_bundle(&pki.files.ca, &[&pki.ca, &ca2]);
        reloaded(&material);
        open(&of_ca1, addr)
            .await
            .expect("CA1 client, bundle CA1+CA2");
        let mut kept = open(&of_ca2, addr)
            .await
            .expect("CA2 client, bundle CA1+CA2");

        // The node moves to a CA2 certificate, then the bundle drops CA1. The CA1 client
        // holds sessions from before; it must not resume its way in.
        install(
            &pki.files,
            &issue(&ca2, Identity::Node(1), Validity::days(1)),
        );
        reloaded(&material);
        write_bundle(&pki.files.ca, &[&ca2]);
        reloaded(&material);
        assert_refused(open(&of_ca1, addr).await, "DecryptError");
        open(&of_ca2, addr).await.expect("CA2 client, bundle CA2");
        ping(&mut kept).await.expect("old connection still works");
    }

    /// A file change that must not be taken: what to write (`None` removes the file), the
    /// file the error must name, and the error expected.
    struct BadChange {
        name: &'static str,
        writes: Vec<(PathBuf, Option<String>)>,
        names: PathBuf,
        expect: fn(&TlsError) -> bool,
    }

    #[tokio::test]
    async fn a_failed_reload_keeps_the_material_in_service() {
        let pki = Pki::new();
        let material = pki.material();
        let addr = serve_echo(
            material
                .api_server_config(ClientAuth::Required)
                .expect("config"),
        )
        .await;
        let client = raw_client(
            &[&pki.ca],
            Some(&issue(
                &pki.ca,
                Identity::Service("web".into()),
                Validity::days(1),
            )),
        );
        let served = CertificateDer::from_pem_file(&pki.files.cert)
            .expect("cert")
            .to_vec();
        let good: Vec<(PathBuf, Vec<u8>)> = pki
            .files
            .paths()
            .into_iter()
            .map(|path| {
                let bytes = fs::read(&path).expect("read");
                (path, bytes)
            })
            .collect();
        let in_service = material.validity();

        let TlsFiles { ca, cert, key } = pki.files.clone();
        let node1 = |validity| issue(&pki.ca, Identity::Node(1), validity);
        let fresh = node1(Validity::days(2));
        let other = node1(Validity::days(2));
        let soon = SystemTime::now() + Duration::from_secs(3600);
        let future = node1(Validity {
            not_before: soon,
            not_after: soon + Duration::from_secs(86_400),
        });
        let stale = node1(expired());
        let node2 = issue(&pki.ca, Identity::Node(2), Validity::days(1));
        let service = issue(&pki.ca, Identity::Service("web".into()), Validity::days(1));
        let foreign = pki
            .ca
            .issue(&IssueRequest {
                identity: Identity::Node(1),
                trust_domain: "other.test".to_string(),
                ips: vec![LOCALHOST],
                dns: vec![],
                validity: Validity::days(1),
            })
            .expect("issue");
        let other_ca = CertAuthority::generate("other.test", Validity::days(1)).expect("ca");
        let twin_ca = CertAuthority::generate(TD, Validity::days(1)).expect("twin ca");
        let of_other_ca = issue(&other_ca, Identity::Node(1), Validity::days(1));
        let of_twin_ca = issue(&twin_ca, Identity::Node(1), Validity::days(1));
        let pair = |c: &IssuedCert| {
            vec![
                (cert.clone(), Some(c.cert_pem.clone())),
                (key.clone(), Some(c.key_pem.clone())),
            ]
        };
        let cases = [
            BadChange {
                name: "a key that is not the certificate's",
                writes: vec![
                    (cert.clone(), Some(fresh.cert_pem.clone())),
                    (key.clone(), Some(other.key_pem.clone())),
                ],
                names: key.clone(),
                expect: |e| matches!(e, TlsError::KeyMismatch { .. }),
            },
            BadChange {
                name: "only the certificate replaced so far",
                writes: vec![(cert.clone(), Some(fresh.cert_pem.clone()))],
                names: key.clone(),
                expect: |e| matches!(e, TlsError::KeyMismatch { .. }),
            },
            BadChange {
                name: "garbage instead of a certificate",
                writes: vec![(cert.clone(), Some("garbage\n".into()))],
                names: cert.clone(),
                expect: |e| matches!(e, TlsError::NoCertificate { .. }),
            },
            BadChange {
                name: "broken PEM",
                writes: vec![(
                    cert.clone(),
                    Some("-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n".into()),
                )],
                names: cert.clone(),
                expect: |e| matches!(e, TlsError::BadPem { .. }),
            },
            BadChange {
                name: "PEM that is not X.509",
                writes: vec![(
                    cert.clone(),
                    Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()),
                )],
                names: cert.clone(),
                expect: |e| matches!(e, TlsError::BadCertificate { .. }),
            },
            BadChange {
                name: "garbage instead of a key",
                writes: vec![(key.clone(), Some("garbage\n".into()))],
                names: key.clone(),
                expect: |e| matches!(e, TlsError::NoPrivateKey { .. }),
            },
            BadChange {
                name: "a missing key",
                writes: vec![(key.clone(), None)],
                names: key.clone(),
                expect: |e| matches!(e, TlsError::Io { .. }),
            },
            BadChange {
                name: "a missing bundle",
                writes: vec![(ca.clone(), None)],
                names: ca.clone(),
                expect: |e| matches!(e, TlsError::Io { .. }),
            },
            BadChange {
                name: "garbage instead of a bundle",
                writes: vec![(ca.clone(), Some("garbage\n".into()))],
                names: ca.clone(),
                expect: |e| matches!(e, TlsError::NoCertificate { .. }),
            },
            BadChange {
                name: "an expired certificate",
                writes: pair(&stale),
                names: cert.clone(),
                expect: |e| matches!(e, TlsError::Expired { .. }),
            },
            BadChange {
                name: "a certificate not valid yet",
                writes: pair(&future),
                names: cert.clone(),
                expect: |e| matches!(e, TlsError::NotYetValid { .. }),
            },
            BadChange {
                name: "another node's certificate",
                writes: pair(&node2),
                names: cert.clone(),
                expect: |e| {
                    matches!(
                        e,
                        TlsError::IdentityChanged {
                            loaded: Identity::Node(1),
                            found: Identity::Node(2),
                            ..
                        }
                    )
                },
            },
            BadChange {
                name: "a node of another trust domain",
                writes: pair(&foreign),
                names: cert.clone(),
                expect: |e| {
                    matches!(
                        e,
                        TlsError::NoIdentity {
                            source: IdentityError::WrongTrustDomain { .. },
                            ..
                        }
                    )
                },
            },
            BadChange {
                name: "a certificate without serverAuth",
                writes: pair(&service),
                names: cert.clone(),
                expect: |e| {
                    matches!(
                        e,
                        TlsError::Untrusted {
                            usage: "server",
                            ..
                        }
                    )
                },
            },
            BadChange {
                name: "a certificate of another CA",
                writes: pair(&of_other_ca),
                names: cert.clone(),
                expect: |e| {
                    matches!(
                        e,
                        TlsError::Untrusted {
                            usage: "client",
                            ..
                        }
                    )
                },
            },
            BadChange {
                name: "a certificate of a CA with our CA's name",
                writes: pair(&of_twin_ca),
                names: cert.clone(),
                expect: |e| {
                    matches!(
                        e,
                        TlsError::Untrusted {
                            usage: "client",
                            ..
                        }
                    )
                },
            },
            BadChange {
                name: "a bundle without the certificate's CA",
                writes: vec![(ca.clone(), Some(other_ca.cert_pem()))],
                names: ca.clone(),
                expect: |e| matches!(e, TlsError::Untrusted { .. }),
            },
        ];

        for case in cases {
            for (path, contents) in &case.writes {
                match contents {
                    Some(pem) => replace(path, pem.as_bytes()),
                    None => fs::remove_file(path).expect("remove"),
                }
            }
            let error = match material.reload() {
                Err(error) => error,
                Ok(outcome) => panic!("{}: reload succeeded: {outcome:?}", case.name),
            };
            assert!((case.expect)(&error), "{}: got {error:?}", case.name);
            let message = error.to_string();
            assert!(
                message.contains(&case.names.display().to_string()),
                "{}: {message:?} does not name {}",
                case.name,
                case.names.display()
            );
            let conn = open(&client, addr).await.expect(case.name);
            assert_eq!(server_cert(&conn), served, "{}", case.name);
            let validity = material.validity();
            assert_eq!(
                (validity.not_after, validity.loaded_at, validity.ca),
                (
                    in_service.not_after,
                    in_service.loaded_at,
                    in_service.ca.clone()
                ),
                "{}",
                case.name
            );

            for (path, bytes) in &good {
                replace(path, bytes);
            }
            assert_eq!(
                material.reload().expect("restored"),
                ReloadOutcome::Unchanged,
                "{}",
                case.name
            );
        }
    }

    #[tokio::test]
    async fn peer_client_follows_a_rotation_without_being_rebuilt() {
        let pki = Pki::new();
        let server = pki.material();
        let peer_files = pki.node_files("node-2", Identity::Node(2));
        let peer = TlsMaterial::load(peer_files.clone(), TD).expect("peer material");
        // One config, three listeners: each address forces the client into a new connection.
        let config = server.raft_server_config().expect("config");
        let first = serve(config.clone()).await;
        let second = serve(config.clone()).await;
        let third = serve(config).await;
        let client = peer.peer_client(LOCALHOST, TIMEOUT).expect("peer client");
        let peer_cert_1 =
            sha256_hex(&CertificateDer::from_pem_file(&peer_files.cert).expect("cert"));
        assert_eq!(
            get_body(&client, first).await.expect("before"),
            "node/2 127.0.0.1 h2"
        );

        // CA2 arrives. Node 1 moves first: it trusts both and presents a CA2 certificate.
        let ca2 = CertAuthority::generate(TD, Validity::days(2)).expect("ca2");
        write_bundle(&pki.files.ca, &[&pki.ca, &ca2]);
        install(
            &pki.files,
            &issue(&ca2, Identity::Node(1), Validity::days(1)),
        );
        reloaded(&server);
        // The peer still trusts CA1 only and refuses the new certificate on a new connection;
        // its pooled connection from before goes on working.
        assert_refused(get_body(&client, second).await, "invalid peer certificate");
        get_body(&client, first).await.expect("pooled connection");

        // The peer's bundle catches up: the same client now accepts node 1.
        write_bundle(&peer_files.ca, &[&pki.ca, &ca2]);
        reloaded(&peer);
        assert_eq!(
            get_path(&client, second, "/cert")
                .await
                .expect("after bundle"),
            peer_cert_1
        );

        // Both finish: CA2 certificates, CA2-only bundles.
        let peer_cert_2 = issue(&ca2, Identity::Node(2), Validity::days(1));
        install(&peer_files, &peer_cert_2);
        reloaded(&peer);
        write_bundle(&pki.files.ca, &[&ca2]);
        write_bundle(&peer_files.ca, &[&ca2]);
        reloaded(&server);
        reloaded(&peer);
        assert_eq!(
            get_path(&client, third, "/cert")
                .await
                .expect("after rotation"),
            sha256_hex(&der(&peer_cert_2.cert_pem))
        );
        assert_eq!(
            get_body(&client, third).await.expect("after rotation"),
            "node/2 127.0.0.1 h2"
        );
        get_body(&client, first).await.expect("pooled connection");
    }

    #[tokio::test]
    async fn a_watcher_reloads_the_material_when_the_files_are_replaced() {
        let pki = Pki::new();
        let material = pki.material();
        let (_stop, stop) = tokio::sync::watch::channel(false);
        let reload = {
            let material = material.clone();
            move || {
                material
                    .reload()
                    .map(|outcome| outcome.to_string())
                    .map_err(|e| error_chain(&e))
            }
        };
        let _watcher = crate::reload::spawn_watcher(
            "tls",
            pki.files.paths(),
            Duration::from_millis(50),
            reload,
            stop,
        );
        let renewed = Validity::days(2);
        install(&pki.files, &issue(&pki.ca, Identity::Node(1), renewed));
        for _ in 0..100 {
            if material.validity().not_after == unix(renewed.not_after) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the watcher did not reload the renewed certificate");
    }

    #[tokio::test]
    async fn api_listener_admits_a_certificate_of_the_ca() {
        let pki = Pki::new();
        let material = pki.material();
        let addr = serve(
            material
                .api_server_config(ClientAuth::Required)
                .expect("config"),
        )
        .await;
        let service = pki.client_files(&pki.ca, "payments", Identity::Service("payments".into()));
        let body = get_body(&pki.client(&service), addr)
            .await
            .expect("request");
        assert_eq!(body, "service/payments 127.0.0.1 h2");
        let operator = pki.client_files(&pki.ca, "alice", Identity::Operator("alice".into()));
        let body = get_body(&pki.client(&operator), addr)
            .await
            .expect("request");
        assert_eq!(body, "operator/alice 127.0.0.1 h2");
    }

    #[tokio::test]
    async fn optional_client_auth_admits_anonymous_clients_but_no_strangers() {
        let pki = Pki::new();
        let material = pki.material();
        let optional = serve(
            material
                .api_server_config(ClientAuth::Optional)
                .expect("config"),
        )
        .await;
        let required = serve(
            material
                .api_server_config(ClientAuth::Required)
                .expect("config"),
        )
        .await;

        install_crypto_provider();
        let ca = fs::read(&pki.files.ca).expect("read ca");
        let anonymous = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("ca")])
            .build()
            .expect("client");
        assert_eq!(
            get_body(&anonymous, optional).await.expect("anonymous"),
            "none(no client certificate was presented) 127.0.0.1 h2"
        );
        assert_refused(get_body(&anonymous, required).await, "CertificateRequired");

        let web = Identity::Service("web".into());
        let member = pki.client(&pki.client_files(&pki.ca, "web", web.clone()));
        for addr in [optional, required] {
            assert_eq!(
                get_body(&member, addr).await.expect("member"),
                "service/web 127.0.0.1 h2"
            );
        }

        // An impostor CA with our CA's very name: the signature check refuses it. A CA with
        // another name: no issuer is found.
        let twin = CertAuthority::generate(TD, Validity::days(1)).expect("twin ca");
        let other = CertAuthority::generate("other.test", Validity::days(1)).expect("other ca");
        for (ca, alert) in [(&twin, "DecryptError"), (&other, "UnknownCA")] {
            let stray = pki.client(&pki.client_files(ca, "stray", web.clone()));
            for addr in [optional, required] {
                assert_refused(get_body(&stray, addr).await, alert);
            }
        }
    }

    #[tokio::test]
    async fn api_listener_refuses_an_expired_certificate() {
        let pki = Pki::new();
        let material = pki.material();
        let addr = serve(
            material
                .api_server_config(ClientAuth::Required)
                .expect("config"),
        )
        .await;
        let (cert, key) = write_pem_files(
            pki.dir.path(),
            "old",
            &issue(&pki.ca, Identity::Service("payments".into()), expired()),
        )
        .expect("write");
        let old = api_client(&pki.files.ca, &cert, &key, TIMEOUT).expect("client");
        assert_refused(get_body(&old, addr).await, "CertificateExpired");
    }

    #[tokio::test]
    async fn raft_listener_admits_nodes_only() {
        let pki = Pki::new();
        let addr = serve(pki.material().raft_server_config().expect("config")).await;
        let node2 = pki.client_files(&pki.ca, "node-2", Identity::Node(2));
        let body = get_body(&pki.client(&node2), addr)
            .await
            .expect("node request");
        assert_eq!(body, "node/2 127.0.0.1 h2");

        let service = pki.client_files(&pki.ca, "payments", Identity::Service("payments".into()));
        assert_refused(get_body(&pki.client(&service), addr).await, "AccessDenied");
        let operator = pki.client_files(&pki.ca, "alice", Identity::Operator("alice".into()));
        assert_refused(get_body(&pki.client(&operator), addr).await, "AccessDenied");
    }

    #[tokio::test]
    async fn raft_listener_refuses_a_node_of_another_trust_domain() {
        let pki = Pki::new();
        let addr = serve(pki.material().raft_server_config().expect("config")).await;
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
        let foreign = api_client(&pki.files.ca, &cert, &key, TIMEOUT).expect("client");
        assert_refused(get_body(&foreign, addr).await, "CertificateUnknown");
    }

    #[tokio::test]
    async fn peer_client_binds_the_local_address_and_speaks_h2() {
        let pki = Pki::new();
        let addr = serve(pki.material().raft_server_config().expect("config")).await;
        let node2 = pki.node_files("node-2", Identity::Node(2));
        let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let client = TlsMaterial::load(node2, TD)
            .expect("material")
            .peer_client(local, TIMEOUT)
            .expect("peer client");
        for _ in 0..3 {
            let body = get_body(&client, addr).await.expect("request");
            assert_eq!(body, "node/2 127.0.0.2 h2");
        }
    }

    #[test]
    fn validity_reports_the_certificate_and_the_bundle() {
        let pki = Pki::new();
        let ca2_validity = Validity::days(3);
        let ca2 = CertAuthority::generate(TD, ca2_validity).expect("ca2");
        let cert_validity = Validity::days(2);
        install(
            &pki.files,
            &issue(&pki.ca, Identity::Node(1), cert_validity),
        );
        write_bundle(&pki.files.ca, &[&pki.ca, &ca2]);
        let before = unix(SystemTime::now());
        let material = pki.material();
        let after = unix(SystemTime::now());

        let validity = material.validity();
        assert_eq!(validity.identity, "node/1");
        assert_eq!(validity.not_after, unix(cert_validity.not_after));
        assert!(
            (validity.remaining_seconds - 2 * 86_400).abs() <= 5,
            "{}",
            validity.remaining_seconds
        );
        assert!((before..=after).contains(&validity.loaded_at));
        let subject = "CN=cairn CA cairn.test".to_string();
        assert_eq!(
            validity.ca,
            vec![
                CaInfo {
                    subject: subject.clone(),
                    not_after: unix(pki.ca_validity.not_after),
                },
                CaInfo {
                    subject,
                    not_after: unix(ca2_validity.not_after),
                },
            ]
        );
        let json = serde_json::to_value(&validity).expect("json");
        assert_eq!(json["identity"], "node/1");
        assert_eq!(json["ca"][1]["not_after"], unix(ca2_validity.not_after));
        for field in ["not_after", "remaining_seconds", "loaded_at"] {
            assert!(json[field].is_number(), "{field}");
        }

        // A reload reports the new facts.
        write_bundle(&pki.files.ca, &[&pki.ca]);
        reloaded(&material);
        assert_eq!(material.validity().ca.len(), 1);
    }

    #[test]
    fn loading_reports_which_file_is_wrong() {
        let pki = Pki::new();
        let missing = pki.dir.path().join("missing.pem");
        let with = |cert: &Path, key: &Path| TlsFiles {
            ca: pki.files.ca.clone(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        };
        let load = |files| TlsMaterial::load(files, TD);
        match load(with(&missing, &pki.files.key)) {
            Err(TlsError::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected Io, got {other:?}"),
        }
        // A key file holds no certificate, a certificate file no key.
        match load(with(&pki.files.key, &pki.files.key)) {
            Err(TlsError::NoCertificate { path }) => assert_eq!(path, pki.files.key),
            other => panic!("expected NoCertificate, got {other:?}"),
        }
        match load(with(&pki.files.cert, &pki.files.cert)) {
            Err(TlsError::NoPrivateKey { path }) => assert_eq!(path, pki.files.cert),
            other => panic!("expected NoPrivateKey, got {other:?}"),
        }
        // A key that is not the certificate's.
        let other = pki.node_files("node-9", Identity::Node(9));
        match load(with(&pki.files.cert, &other.key)) {
            Err(TlsError::KeyMismatch { cert, key }) => {
                assert_eq!((cert, key), (pki.files.cert.clone(), other.key));
            }
            other => panic!("expected KeyMismatch, got {other:?}"),
        }
        // An expired certificate is refused at start, not at every handshake.
        install(&pki.files, &issue(&pki.ca, Identity::Node(1), expired()));
        assert!(matches!(
            load(pki.files.clone()),
            Err(TlsError::Expired { .. })
        ));
    }

    #[test]
    fn peer_identity_reads_the_end_entity() {
        let pki = Pki::new();
        let node = CertificateDer::from_pem_file(&pki.files.cert).expect("node cert");
        let ca = CertificateDer::from_pem_file(&pki.files.ca).expect("ca cert");
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
