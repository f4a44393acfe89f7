//! identity: SPIFFE identities taken from X.509 certificates; knows nothing of HTTP, Raft or storage.
//!
//! Every principal is named by exactly one SPIFFE ID in its certificate's URI SAN:
//! `spiffe://<trust-domain>/node/<id>`, `.../service/<name>` or `.../operator/<name>`.
//! Parsing is strict and canonical — one spelling per identity — so the text form
//! (`node/3`, `service/payments`) can be stored as an owner and compared byte for byte.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use x509_parser::extensions::GeneralName;

/// Who is on the other end of a connection, as named by its certificate.
///
/// The `Display` form (`node/3`, `service/payments`, `operator/alice`) is the stable
/// owner string recorded as `registered_by`; `FromStr` parses it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A cluster member; ids start at 1.
    Node(u64),
    /// A workload that registers and discovers instances; the name is a DNS label.
    Service(String),
    /// A human or automation acting on the cluster; the name is a DNS label.
    Operator(String),
}

impl Identity {
    /// The SPIFFE ID of this identity in `trust_domain`, e.g. `spiffe://prod.example/node/3`.
    pub fn spiffe_uri(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/{self}")
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node/{id}"),
            Identity::Service(name) => write!(f, "service/{name}"),
            Identity::Operator(name) => write!(f, "operator/{name}"),
        }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Parses the `Display` form (`node/3`, `service/payments`, `operator/alice`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_path(s).map_err(|reason| IdentityError::Malformed {
            uri: s.to_string(),
            reason,
        })
    }
}

/// Why a certificate or a SPIFFE ID does not name an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The DER bytes are not one well-formed X.509 certificate.
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    /// The peer presented no certificate at all.
    #[error("no client certificate was presented")]
    NoPeerCertificate,
    /// The certificate has no `spiffe://` URI SAN.
    #[error("certificate carries no spiffe:// URI SAN")]
    NoSpiffeId,
    /// The certificate has more than one `spiffe://` URI SAN; exactly one is allowed.
    #[error("certificate carries {0} spiffe:// URI SANs, exactly one is allowed")]
    SeveralSpiffeIds(usize),
    /// The SPIFFE ID belongs to another trust domain.
    #[error("trust domain {found:?} is not {expected:?}")]
    WrongTrustDomain { found: String, expected: String },
    /// The text is not a canonical SPIFFE ID (or identity) of a known kind.
    #[error("malformed identity {uri:?}: {reason}")]
    Malformed { uri: String, reason: &'static str },
}

/// Parses `spiffe://<trust_domain>/<kind>/<name>`, refusing other trust domains and any
/// non-canonical spelling (upper case, leading zeros, extra segments, query, fragment).
pub fn parse_spiffe(uri: &str, trust_domain: &str) -> Result<Identity, IdentityError> {
    let malformed = |reason| IdentityError::Malformed {
        uri: uri.to_string(),
        reason,
    };
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| malformed("does not start with spiffe://"))?;
    let (found, path) = rest
        .split_once('/')
        .ok_or_else(|| malformed("has no path after the trust domain"))?;
    if found != trust_domain {
        return Err(IdentityError::WrongTrustDomain {
            found: found.to_string(),
            expected: trust_domain.to_string(),
        });
    }
    parse_path(path).map_err(malformed)
}

/// Checks that `trust_domain` is a SPIFFE trust domain name: 1–255 characters of
/// `a-z0-9.-_`.
pub fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    let valid = !trust_domain.is_empty()
        && trust_domain.len() <= 255
        && trust_domain
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(IdentityError::Malformed {
            uri: trust_domain.to_string(),
            reason: "a trust domain is 1-255 characters of a-z0-9.-_",
        })
    }
}

/// The identity named by the certificate's single `spiffe://` URI SAN.
///
/// This reads names only; it does not verify the chain, dates or key usages (the TLS
/// handshake does that before anyone asks who the peer is).
pub fn identity_from_cert(der: &[u8], trust_domain: &str) -> Result<Identity, IdentityError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::BadCertificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    // Count case-insensitively so that `SPIFFE://...` is refused as malformed rather than
    // silently ignored next to a second, well-spelled ID.
    let spiffe_ids: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if has_spiffe_scheme(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match spiffe_ids.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [uri] => parse_spiffe(uri, trust_domain),
        several => Err(IdentityError::SeveralSpiffeIds(several.len())),
    }
}

/// Certificates whose identity was already read, kept by their DER bytes.
const CERT_IDENTITY_CACHE: usize = 4096;

/// [`identity_from_cert`] for one trust domain, remembered per certificate. A connection sends
/// many requests over one handshake, and parsing its certificate again for each cost about 2%
/// of a loaded node's CPU (perf). The function is pure in the DER bytes and the trust domain,
/// so a remembered answer is the same answer; refusals are not remembered. Bounded: the memo
/// starts over when full. Cheap to clone (shared).
#[derive(Clone)]
pub struct CertIdentities {
    trust_domain: Arc<str>,
    seen: Arc<Mutex<HashMap<Box<[u8]>, Identity>>>,
}

impl CertIdentities {
    pub fn new(trust_domain: &str) -> CertIdentities {
        CertIdentities {
            trust_domain: trust_domain.into(),
            seen: Arc::default(),
        }
    }

    /// The identity named by the certificate `der` (see [`identity_from_cert`]).
    pub fn of(&self, der: &[u8]) -> Result<Identity, IdentityError> {
        let lock = || self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = lock().get(der) {
            return Ok(known.clone());
        }
        let identity = identity_from_cert(der, &self.trust_domain)?;
        let mut seen = lock();
        if seen.len() >= CERT_IDENTITY_CACHE {
            seen.clear();
        }
        seen.insert(der.into(), identity.clone());
        Ok(identity)
    }
}

fn has_spiffe_scheme(uri: &str) -> bool {
    uri.get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
}

/// Parses `<kind>/<name>`, the part shared by the SPIFFE path and the `Display` form.
fn parse_path(path: &str) -> Result<Identity, &'static str> {
    let (kind, name) = path
        .split_once('/')
        .ok_or("expected <kind>/<name> with kind node, service or operator")?;
    match kind {
        "node" => parse_node_id(name).map(Identity::Node),
        "service" => check_label(name).map(|()| Identity::Service(name.to_string())),
        "operator" => check_label(name).map(|()| Identity::Operator(name.to_string())),
        _ => Err("unknown kind, expected node, service or operator"),
    }
}

/// A node id is a decimal u64 >= 1 without leading zeros (one spelling per node).
fn parse_node_id(s: &str) -> Result<u64, &'static str> {
    const REASON: &str = "a node id is a decimal number from 1 without leading zeros";
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(REASON);
    }
    s.parse::<u64>().map_err(|_| REASON)
}

/// Service and operator names are DNS labels: 1–63 characters of `a-z0-9-`, not starting
/// or ending with `-`.
fn check_label(s: &str) -> Result<(), &'static str> {
    let valid = (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && !s.starts_with('-')
        && !s.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err("a name is a DNS label: 1-63 characters of a-z0-9-, no leading or trailing -")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    const TD: &str = "cairn.test";

    /// A self-signed certificate with the given URI SANs (chains are not this module's concern).
    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("ia5 uri")));
        }
        let key = KeyPair::generate().expect("key");
        params
            .self_signed(&key)
            .expect("self-signed")
            .der()
            .to_vec()
    }

    #[test]
    fn display_spiffe_uri_and_from_str_round_trip() {
        let cases = [
            (Identity::Node(3), "node/3"),
            (Identity::Node(u64::MAX), "node/18446744073709551615"),
            (Identity::Service("payments".into()), "service/payments"),
            (Identity::Operator("alice".into()), "operator/alice"),
        ];
        for (identity, text) in cases {
            assert_eq!(identity.to_string(), text);
            assert_eq!(text.parse::<Identity>().expect(text), identity);
            let uri = identity.spiffe_uri(TD);
            assert_eq!(uri, format!("spiffe://{TD}/{text}"));
            assert_eq!(parse_spiffe(&uri, TD).expect(&uri), identity);
        }
    }

    #[test]
    fn malformed_ids_are_refused() {
        let bad = [
            "spiffe://cairn.test/node/0",
            "spiffe://cairn.test/node/01",
            "spiffe://cairn.test/node/-1",
            "spiffe://cairn.test/node/+1",
            "spiffe://cairn.test/node/1x",
            "spiffe://cairn.test/node/18446744073709551616",
            "spiffe://cairn.test/node/",
            "spiffe://cairn.test/node/1/extra",
            "spiffe://cairn.test/service/Bad_Name",
            "spiffe://cairn.test/service/Payments",
            "spiffe://cairn.test/service/",
            "spiffe://cairn.test/service/-lead",
            "spiffe://cairn.test/service/trail-",
            "spiffe://cairn.test/service/payments?x=1",
            "spiffe://cairn.test/service/payments#frag",
            "spiffe://cairn.test/service/pay%6dents",
            "spiffe://cairn.test/operator/alice/",
            "spiffe://cairn.test/other/x",
            "spiffe://cairn.test/node",
            "spiffe://cairn.test",
            "SPIFFE://cairn.test/node/1",
            "http://cairn.test/node/1",
            "node/1",
            "",
        ];
        for uri in bad {
            match parse_spiffe(uri, TD) {
                Err(IdentityError::Malformed { uri: got, .. }) => assert_eq!(got, uri),
                other => panic!("{uri:?}: expected Malformed, got {other:?}"),
            }
        }
        let long = format!("spiffe://{TD}/service/{}", "a".repeat(64));
        assert!(matches!(
            parse_spiffe(&long, TD),
            Err(IdentityError::Malformed { .. })
        ));
        let longest = format!("spiffe://{TD}/service/{}", "a".repeat(63));
        assert!(parse_spiffe(&longest, TD).is_ok());
    }

    #[test]
    fn display_form_rejects_what_spiffe_rejects() {
        for text in [
            "node/0",
            "service/Bad_Name",
            "other/x",
            "operator",
            "node/1/2",
        ] {
            assert!(text.parse::<Identity>().is_err(), "{text}");
        }
    }

    #[test]
    fn other_trust_domain_is_refused() {
        match parse_spiffe("spiffe://evil.test/node/1", TD) {
            Err(IdentityError::WrongTrustDomain { found, expected }) => {
                assert_eq!(found, "evil.test");
                assert_eq!(expected, TD);
            }
            other => panic!("expected WrongTrustDomain, got {other:?}"),
        }
        // A suffix or prefix of the trust domain is another trust domain.
        assert!(matches!(
            parse_spiffe("spiffe://cairn.test.evil/node/1", TD),
            Err(IdentityError::WrongTrustDomain { .. })
        ));
    }

    #[test]
    fn trust_domain_names_are_checked() {
        for good in ["cairn.test", "prod-eu_1.example"] {
            assert!(check_trust_domain(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Cairn.test",
            "cairn/test",
            "cairn test",
            &"a".repeat(256),
        ] {
            assert!(check_trust_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn certificate_with_one_spiffe_id_names_its_identity() {
        let der = cert_with_uris(&["https://docs.example/x", "spiffe://cairn.test/node/7"]);
        assert_eq!(
            identity_from_cert(&der, TD).expect("node"),
            Identity::Node(7)
        );
    }

    #[test]
    fn certificate_without_spiffe_id_is_refused() {
        let der = cert_with_uris(&[]);
        assert!(matches!(
            identity_from_cert(&der, TD),
            Err(IdentityError::NoSpiffeId)
        ));
        // Other URI schemes are not identities.
        let der = cert_with_uris(&["http://cairn.test/node/1"]);
        assert!(matches!(
            identity_from_cert(&der, TD),
            Err(IdentityError::NoSpiffeId)
        ));
    }

    #[test]
    fn certificate_with_several_spiffe_ids_is_refused() {
        let der = cert_with_uris(&["spiffe://cairn.test/node/1", "spiffe://cairn.test/node/2"]);
        assert!(matches!(
            identity_from_cert(&der, TD),
            Err(IdentityError::SeveralSpiffeIds(2))
        ));
        // An upper-case scheme still counts, so it cannot hide next to a valid ID.
        let der = cert_with_uris(&["spiffe://cairn.test/node/1", "SPIFFE://cairn.test/node/2"]);
        assert!(matches!(
            identity_from_cert(&der, TD),
            Err(IdentityError::SeveralSpiffeIds(2))
        ));
    }

    #[test]
    fn certificate_from_other_trust_domain_is_refused() {
        let der = cert_with_uris(&["spiffe://evil.test/node/1"]);
        assert!(matches!(
            identity_from_cert(&der, TD),
            Err(IdentityError::WrongTrustDomain { .. })
        ));
    }

    #[test]
    fn certificate_with_malformed_spiffe_id_is_refused() {
        let der = cert_with_uris(&["spiffe://cairn.test/service/Bad_Name"]);
        assert!(matches!(
            identity_from_cert(&der, TD),
            Err(IdentityError::Malformed { .. })
        ));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            identity_from_cert(b"not a certificate", TD),
            Err(IdentityError::BadCertificate(_))
        ));
        let mut der = cert_with_uris(&["spiffe://cairn.test/node/1"]);
        der.push(0);
        assert!(matches!(
            identity_from_cert(&der, TD),
            Err(IdentityError::BadCertificate(_))
        ));
    }

    #[test]
    fn remembered_identities_are_those_of_their_certificates() {
        let ids = CertIdentities::new(TD);
        let node = cert_with_uris(&["spiffe://cairn.test/node/7"]);
        let web = cert_with_uris(&["spiffe://cairn.test/service/web"]);
        for _ in 0..2 {
            assert_eq!(ids.of(&node).expect("node"), Identity::Node(7));
            assert_eq!(ids.of(&web).expect("web"), Identity::Service("web".into()));
        }
        // Refusals are answered afresh each time, and another trust domain has its own memo.
        let none = cert_with_uris(&[]);
        for _ in 0..2 {
            assert!(matches!(ids.of(&none), Err(IdentityError::NoSpiffeId)));
        }
        let other = CertIdentities::new("other.test");
        assert!(
            other.of(&node).is_err(),
            "a cairn.test certificate in other.test"
        );
        assert_eq!(ids.of(&node).expect("node"), Identity::Node(7));
        // A changed byte is another certificate, never a remembered one.
        let mut tampered = node.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(ids.seen.lock().unwrap().get(&tampered[..]).is_none());
    }
}
