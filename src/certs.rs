//! certs: the offline certificate authority — creates the cluster CA and issues node, service and operator certificates; knows nothing of the running server.
//!
//! Used by `cairn certs init|issue`, by `cairn dev` and by tests. Every leaf carries
//! exactly one SPIFFE ID (see [`crate::identity`]); keys are ECDSA P-256.

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::identity::{self, Identity, IdentityError};

/// Why a CA could not be created or loaded, or a certificate not issued or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The request names an invalid identity, trust domain, SAN or validity period.
    #[error("invalid certificate request: {0}")]
    InvalidRequest(String),
    #[error("{path}: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("{path}: not a CA certificate")]
    NotCa { path: PathBuf },
    #[error("{key}: this key does not belong to the CA certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: private key is readable by group or others (mode {mode:o}); chmod 600 it")]
    InsecureKeyFile { path: PathBuf, mode: u32 },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from an hour ago (tolerates clock skew between nodes) for `days` days from now.
    pub fn days(days: u32) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }

    fn check(&self) -> Result<(), CertError> {
        if self.not_after <= self.not_before {
            return Err(CertError::InvalidRequest(
                "validity ends before it begins".to_string(),
            ));
        }
        Ok(())
    }
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub identity: Identity,
    pub trust_domain: String,
    /// IP SANs: the addresses a node is reached at (peers check them against the URL host).
    pub ips: Vec<IpAddr>,
    /// DNS SANs.
    pub dns: Vec<String>,
    pub validity: Validity,
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// The cluster CA: its certificate and signing key (`Debug` elides the key).
#[derive(Debug)]
pub struct CertAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertAuthority {
    /// Creates a self-signed CA for `trust_domain` with a fresh P-256 key. The CA may sign
    /// leaf certificates only (path length 0).
    pub fn generate(trust_domain: &str, validity: Validity) -> Result<Self, CertError> {
        identity::check_trust_domain(trust_domain).map_err(invalid)?;
        validity.check()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("cairn CA {trust_domain}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = validity.not_before.into();
        params.not_after = validity.not_after.into();
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA to issue more certificates. Refuses a key file readable by
    /// group or others, a certificate that is not a CA, and a key that is not the CA's.
    pub fn load(cert_pem_path: &Path, key_pem_path: &Path) -> Result<Self, CertError> {
        let cert_pem = read_to_string(cert_pem_path)?;
        check_key_file_mode(key_pem_path)?;
        let key_pem = read_to_string(key_pem_path)?;

        let der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CertError::BadPem {
                path: cert_pem_path.to_path_buf(),
                reason: format!("no PEM certificate: {e}"),
            })?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::BadPem {
                path: cert_pem_path.to_path_buf(),
                reason: format!("not an X.509 certificate: {e}"),
            })?;
        if !parsed.is_ca() {
            return Err(CertError::NotCa {
                path: cert_pem_path.to_path_buf(),
            });
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::BadPem {
            path: key_pem_path.to_path_buf(),
            reason: format!("no PKCS#8 private key: {e}"),
        })?;
        // A wrong key would sign certificates that no verifier accepts; say so now.
        if parsed.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(CertError::KeyMismatch {
                cert: cert_pem_path.to_path_buf(),
                key: key_pem_path.to_path_buf(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)?;
        Ok(CertAuthority { cert_pem, issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PEM (PKCS#8). Keep it offline.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf certificate with a fresh key: one SPIFFE URI SAN plus the requested IP
    /// and DNS SANs, key usage digitalSignature; node certificates are good for serverAuth
    /// and clientAuth (nodes serve and call each other), the others for clientAuth only.
    pub fn issue(&self, req: &IssueRequest) -> Result<IssuedCert, CertError> {
        identity::check_trust_domain(&req.trust_domain).map_err(invalid)?;
        req.validity.check()?;
        let uri = req.identity.spiffe_uri(&req.trust_domain);
        // Round-trip through the parser: never issue a certificate that no listener accepts.
        if identity::parse_spiffe(&uri, &req.trust_domain).map_err(invalid)? != req.identity {
            return Err(CertError::InvalidRequest(format!(
                "{uri} does not parse back to {}",
                req.identity
            )));
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, req.identity.to_string());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match req.identity {
            Identity::Node(_) => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Identity::Service(_) | Identity::Operator(_) => {
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            }
        };
        params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        params
            .subject_alt_names
            .extend(req.ips.iter().copied().map(SanType::IpAddress));
        for dns in &req.dns {
            let name = dns
                .as_str()
                .try_into()
                .map_err(|_| CertError::InvalidRequest(format!("DNS name {dns:?} is not ASCII")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params.not_before = req.validity.not_before.into();
        params.not_after = req.validity.not_after.into();
        params.use_authority_key_identifier_extension = true;

        // The serial number is derived from the fresh public key, so it is unique per leaf.
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `<dir>/<stem>.pem` (mode 0644) and `<dir>/<stem>-key.pem` (mode 0600), creating
/// `dir` (mode 0700) if needed. Each file is written to a temporary file created with its
/// final mode, synced, then renamed over the target: the key is never readable by others,
/// not even for a moment, and a crash leaves either the old file or the new one. Existing
/// files are replaced; callers that must not clobber check first.
pub fn write_pem_files(
    dir: &Path,
    stem: &str,
    cert: &IssuedCert,
) -> Result<(PathBuf, PathBuf), CertError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}-key.pem"));
    write_atomically(&key_path, cert.key_pem.as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let io_err = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io_err(io::Error::other("not a file path")))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(e)),
        _ => {}
    }
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; set it exactly (never wider than asked).
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

fn read_to_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn check_key_file_mode(path: &Path) -> Result<(), CertError> {
    let mode = fs::metadata(path)
        .map_err(|source| CertError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(CertError::InsecureKeyFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn invalid(e: IdentityError) -> CertError {
    CertError::InvalidRequest(e.to_string())
}

/// Writes the CA as `<dir>/ca.pem` and `<dir>/ca-key.pem` (0600), like [`write_pem_files`].
pub fn write_ca_files(dir: &Path, ca: &CertAuthority) -> Result<(PathBuf, PathBuf), CertError> {
    let issued = IssuedCert {
        cert_pem: ca.cert_pem(),
        key_pem: ca.key_pem(),
    };
    write_pem_files(dir, "ca", &issued)
}

/// Writes a trust bundle: the CA certificates of `inputs`, in order, into `out` (mode 0644,
/// atomically). Used during a CA rotation, when nodes and clients trust the old and the
/// new CA side by side. Each input must hold CA certificates only; returns how many.
pub fn write_bundle(out: &Path, inputs: &[PathBuf]) -> Result<usize, CertError> {
    let mut bundle = String::new();
    let mut count = 0;
    for path in inputs {
        let pem = read_to_string(path)?;
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::BadPem {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(CertError::BadPem {
                path: path.clone(),
                reason: "no certificate found".into(),
            });
        }
        for der in &certs {
            let (_, cert) =
                x509_parser::parse_x509_certificate(der).map_err(|e| CertError::BadPem {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if !cert.is_ca() {
                return Err(CertError::NotCa { path: path.clone() });
            }
            bundle.push_str(&pem_encode(der));
            count += 1;
        }
    }
    write_atomically(out, bundle.as_bytes(), 0o644)?;
    Ok(count)
}

fn pem_encode(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use rustls::pki_types::UnixTime;
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use x509_parser::extensions::GeneralName;

    const TD: &str = "cairn.test";

    fn request(identity: Identity) -> IssueRequest {
        IssueRequest {
            identity,
            trust_domain: TD.to_string(),
            ips: vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))],
            dns: vec!["node3.cairn.test".to_string()],
            validity: Validity::days(1),
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem certificate")
    }

    /// (IP SANs, DNS SANs, serverAuth, clientAuth) of a certificate.
    fn sans_and_ekus(pem: &str) -> (Vec<IpAddr>, Vec<String>, bool, bool) {
        let der = der(pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let mut ips = Vec::new();
        let mut dns = Vec::new();
        let san = cert.subject_alternative_name().expect("san").expect("san");
        for name in &san.value.general_names {
            match name {
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("v4")))
                }
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
        let eku = cert.extended_key_usage().expect("eku").expect("eku");
        (ips, dns, eku.value.server_auth, eku.value.client_auth)
    }

    /// Verifies `leaf` against `ca` the way the listeners do (webpki, clientAuth).
    fn verifies(ca: &CertAuthority, leaf: &IssuedCert) -> bool {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(der(&ca.cert_pem())).expect("root");
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
        verifier
            .verify_client_cert(&der(&leaf.cert_pem), &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn node_certificate_names_the_node_with_its_sans_and_both_ekus() {
        let ca = CertAuthority::generate(TD, Validity::days(1)).expect("ca");
        let cert = ca.issue(&request(Identity::Node(3))).expect("issue");
        let der = der(&cert.cert_pem);
        assert_eq!(
            identity::identity_from_cert(&der, TD).expect("identity"),
            Identity::Node(3)
        );
        let (ips, dns, server_auth, client_auth) = sans_and_ekus(&cert.cert_pem);
        assert_eq!(ips, vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))]);
        assert_eq!(dns, vec!["node3.cairn.test".to_string()]);
        assert!(server_auth && client_auth);
        assert!(verifies(&ca, &cert));
    }

    #[test]
    fn service_and_operator_certificates_are_client_only() {
        let ca = CertAuthority::generate(TD, Validity::days(1)).expect("ca");
        for identity in [
            Identity::Service("payments".into()),
            Identity::Operator("alice".into()),
        ] {
            let mut req = request(identity.clone());
            req.ips.clear();
            req.dns.clear();
            let cert = ca.issue(&req).expect("issue");
            assert_eq!(
                identity::identity_from_cert(&der(&cert.cert_pem), TD).expect("identity"),
                identity
            );
            let (_, _, server_auth, client_auth) = sans_and_ekus(&cert.cert_pem);
            assert!(client_auth && !server_auth, "{identity}");
            assert!(verifies(&ca, &cert));
        }
    }

    #[test]
    fn loaded_ca_issues_certificates_that_verify_against_the_original() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::generate(TD, Validity::days(1)).expect("ca");
        let ca_files = IssuedCert {
            cert_pem: ca.cert_pem(),
            key_pem: ca.key_pem(),
        };
        let (cert_path, key_path) = write_pem_files(dir.path(), "ca", &ca_files).expect("write");
        let loaded = CertAuthority::load(&cert_path, &key_path).expect("load");
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let leaf = loaded.issue(&request(Identity::Node(1))).expect("issue");
        assert!(verifies(&ca, &leaf));
        // A leaf of another CA does not verify: the check above means something.
        let other = CertAuthority::generate(TD, Validity::days(1)).expect("other ca");
        assert!(!verifies(&other, &leaf));
    }

    #[test]
    fn load_refuses_a_key_that_is_not_the_cas() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::generate(TD, Validity::days(1)).expect("ca");
        let other = CertAuthority::generate(TD, Validity::days(1)).expect("other");
        let mixed = IssuedCert {
            cert_pem: ca.cert_pem(),
            key_pem: other.key_pem(),
        };
        let (cert_path, key_path) = write_pem_files(dir.path(), "ca", &mixed).expect("write");
        assert!(matches!(
            CertAuthority::load(&cert_path, &key_path),
            Err(CertError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn load_refuses_a_leaf_as_ca_and_a_world_readable_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::generate(TD, Validity::days(1)).expect("ca");
        let leaf = ca.issue(&request(Identity::Node(1))).expect("issue");
        let (cert_path, key_path) = write_pem_files(dir.path(), "leaf", &leaf).expect("write");
        assert!(matches!(
            CertAuthority::load(&cert_path, &key_path),
            Err(CertError::NotCa { .. })
        ));

        let ca_files = IssuedCert {
            cert_pem: ca.cert_pem(),
            key_pem: ca.key_pem(),
        };
        let (cert_path, key_path) = write_pem_files(dir.path(), "ca", &ca_files).expect("write");
        fs::set_permissions(&key_path, Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            CertAuthority::load(&cert_path, &key_path),
            Err(CertError::InsecureKeyFile { mode: 0o644, .. })
        ));
    }

    #[test]
    fn written_files_have_their_modes_and_can_be_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        let ca = CertAuthority::generate(TD, Validity::days(1)).expect("ca");
        let first = ca.issue(&request(Identity::Node(1))).expect("issue");
        let (cert_path, key_path) = write_pem_files(&out, "node-1", &first).expect("write");
        assert_eq!(cert_path, out.join("node-1.pem"));
        assert_eq!(key_path, out.join("node-1-key.pem"));
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&cert_path), 0o644);
        assert_eq!(mode(&key_path), 0o600);
        assert_eq!(mode(&out), 0o700);

        let second = ca.issue(&request(Identity::Node(1))).expect("issue");
        write_pem_files(&out, "node-1", &second).expect("rewrite");
        assert_eq!(fs::read_to_string(&key_path).expect("read"), second.key_pem);
        assert_eq!(mode(&key_path), 0o600);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&out).expect("ls").count(), 2);
    }

    #[test]
    fn invalid_requests_are_refused() {
        let ca = CertAuthority::generate(TD, Validity::days(1)).expect("ca");
        let mut bad_name = request(Identity::Service("Bad_Name".into()));
        bad_name.ips.clear();
        let mut bad_node = request(Identity::Node(0));
        bad_node.ips.clear();
        let mut bad_td = request(Identity::Node(1));
        bad_td.trust_domain = "Cairn/Test".into();
        let mut backwards = request(Identity::Node(1));
        backwards.validity = Validity {
            not_before: backwards.validity.not_after,
            not_after: backwards.validity.not_before,
        };
        let mut bad_dns = request(Identity::Node(1));
        bad_dns.dns = vec!["nœud.test".into()];
        for req in [bad_name, bad_node, bad_td, backwards, bad_dns] {
            assert!(
                matches!(ca.issue(&req), Err(CertError::InvalidRequest(_))),
                "{req:?}"
            );
        }
        assert!(matches!(
            CertAuthority::generate("bad domain", Validity::days(1)),
            Err(CertError::InvalidRequest(_))
        ));
    }

    #[test]
    fn issued_cert_debug_hides_the_key() {
        let ca = CertAuthority::generate(TD, Validity::days(1)).expect("ca");
        let cert = ca.issue(&request(Identity::Node(1))).expect("issue");
        let shown = format!("{cert:?} {ca:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }
}
