//! token: JWT bearer tokens — the JWKS, signature and claim checks, and the mapping of a claim to an Identity; knows nothing of HTTP, TLS configs, policy or Raft.
//!
//! The JWS work (splitting, base64url, signatures, `exp`/`nbf`/`iss`/`aud`) is done by the
//! `jsonwebtoken` crate; this module decides *which* key and algorithm it may use. `verify`
//! runs its checks in this order, and nothing about the claims is reported before the
//! signature holds:
//!
//! 1. the header parses and names EdDSA, ES256 or RS256 (`none` and HMAC never get further);
//! 2. the key is the one named by `kid` (or the only key), and its family and JWK `alg`
//!    fit the header's `alg` — the token cannot choose how its own key is interpreted;
//! 3. signature, then `exp`, `nbf`, `iss`, `aud`, `iat`;
//! 4. the RFC 8705 certificate binding (`cnf.x5t#S256`), if the token carries one;
//! 5. the identity claim, in short form (`service/x`) or as a SPIFFE ID; nodes are refused.
//!
//! Keys are parsed into `DecodingKey`s when the JWKS is (re)loaded, so `verify` does no I/O.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::identity::{self, Identity};

/// The only algorithms accepted: one per key family, so a key never verifies two ways.
const ALLOWED: [Algorithm; 3] = [Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256];
/// Longer tokens are refused before any decoding, which bounds what `verify` allocates.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// A JWKS is a handful of public keys; anything this large is not one.
const MAX_JWKS_BYTES: u64 = 1024 * 1024;
/// Clock skew beyond this is a broken clock, not skew; it also keeps `now - leeway` sane.
const MAX_LEEWAY: Duration = Duration::from_secs(600);
/// At least 2048 bits by policy, at most what the RSA backend accepts; checked at load so
/// a bad key fails loudly there instead of failing every signature later.
const RSA_MODULUS_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;
/// RFC 7518 §6.3.2 private members; `k` (symmetric) is refused by key type instead.
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "oth"];
/// Header values echoed in errors (`kid`, `alg`) are cut to this many characters.
const MAX_ECHO_CHARS: usize = 64;

/// What a token must satisfy; built by the caller from the node config.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// A JWKS JSON file (`{"keys": [...]}`) holding the issuer's public keys only.
    pub jwks: PathBuf,
    /// The required `iss`, compared byte for byte.
    pub issuer: String,
    /// A value that the token's `aud` (a string or an array) must contain.
    pub audience: String,
    /// The claim naming the caller, e.g. `sub`.
    pub identity_claim: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in whole seconds, at most 10 minutes.
    pub leeway: Duration,
    /// The trust domain of identities written as `spiffe://<trust_domain>/service/x`.
    pub trust_domain: String,
}

/// Why a token was refused, or why a JWKS or the settings cannot be used.
///
/// `Jwks` and `Settings` come from `load`/`reload` and are the operator's to fix; every
/// other variant is the client's, and its message says what to change. No message
/// repeats the token; header values (`kid`, `alg`) are shortened before they are echoed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {alg:?} is not allowed; tokens must be signed with EdDSA, ES256 or RS256")]
    AlgorithmNotAllowed { alg: String },
    #[error("{}", unknown_key(.kid))]
    UnknownKey { kid: Option<String> },
    #[error("algorithm {alg} does not fit the {kty} key named by the token's kid")]
    KeyMismatch { alg: String, kty: String },
    #[error("the token's signature does not verify with the key it names")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf or iat is in the future)")]
    NotYetValid,
    #[error("wrong issuer: the token's iss is not the issuer this cluster trusts")]
    WrongIssuer,
    #[error("wrong audience: the token's aud does not contain {expected:?}")]
    WrongAudience { expected: String },
    #[error("the token has no {claim:?} claim")]
    MissingClaim { claim: String },
    #[error("the token's identity claim is not a cairn identity: {reason}")]
    BadIdentity { reason: String },
    #[error("tokens cannot name a node; nodes authenticate with certificates only")]
    NodeIdentity,
    #[error("certificate binding failed: {reason}")]
    CertificateBinding { reason: &'static str },
    #[error("JWKS {path:?} cannot be used: {reason}")]
    Jwks { path: PathBuf, reason: String },
    #[error("token settings: {reason}")]
    Settings { reason: &'static str },
}

fn unknown_key(kid: &Option<String>) -> String {
    match kid {
        Some(kid) => format!("no trusted key has kid {kid:?}"),
        None => "the token has no kid and the trusted key set holds several keys".to_string(),
    }
}

/// Checks bearer tokens against the keys of one JWKS file.
///
/// A cheap handle: clones share the key set, and `reload` swaps it for all of them.
#[derive(Clone)]
pub struct TokenVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    settings: TokenSettings,
    /// Readers clone the `Arc` and drop the lock at once; `reload` replaces it whole, so a
    /// verification sees either the old set or the new one, never a mix.
    keys: RwLock<Arc<KeySet>>,
}

struct KeySet {
    keys: Vec<TrustedKey>,
}

/// One JWK, reduced at load time to the single algorithm it may verify.
struct TrustedKey {
    kid: Option<String>,
    alg: Algorithm,
    kty: &'static str,
    decoding: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("jwks", &self.inner.settings.jwks)
            .field("issuer", &self.inner.settings.issuer)
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

impl TokenVerifier {
    /// Checks the settings and reads the JWKS; any unusable key fails the whole load.
    pub fn load(settings: TokenSettings) -> Result<TokenVerifier, TokenError> {
        // With both or neither of jsonwebtoken's backend features enabled it has no
        // provider and panics on first use; say so here instead.
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            let reason = "jsonwebtoken has no crypto backend (enable exactly rust_crypto)";
            return Err(TokenError::Settings { reason });
        }
        check_settings(&settings)?;
        let keys = read_jwks(&settings)?;
        tracing::info!(path = %settings.jwks.display(), keys = keys.keys.len(), "jwks loaded");
        Ok(TokenVerifier {
            inner: Arc::new(Inner {
                settings,
                keys: RwLock::new(Arc::new(keys)),
            }),
        })
    }

    /// Re-reads the JWKS file and puts its keys in service, returning how many.
    ///
    /// On any error nothing changes: a half-written or broken file during key rotation
    /// must not lock every client out.
    pub fn reload(&self) -> Result<usize, TokenError> {
        let keys = read_jwks(&self.inner.settings)?;
        let count = keys.keys.len();
        {
            // A poisoned lock still holds a whole `Arc`: the only write is a single store.
            let mut current = self
                .inner
                .keys
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            *current = Arc::new(keys);
        }
        tracing::info!(path = %self.inner.settings.jwks.display(), keys = count, "jwks reloaded");
        Ok(count)
    }

    /// The `kid`s of the keys in service, in file order (a lone key without `kid` has none).
    pub fn key_ids(&self) -> Vec<String> {
        self.current()
            .keys
            .iter()
            .filter_map(|key| key.kid.clone())
            .collect()
    }

    /// Verifies `token` and returns the identity it names.
    ///
    /// `client_cert_der` is the leaf certificate of the connection, if any; a token with
    /// `cnf.x5t#S256` is accepted only over the certificate it was bound to.
    pub fn verify(
        &self,
        token: &str,
        client_cert_der: Option<&[u8]>,
    ) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!(
                "a token is at most {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| header_error(token, &e))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAllowed {
                alg: alg_name(header.alg),
            });
        }
        let keys = self.current();
        let key = keys.select(header.kid.as_deref())?;
        // The key, not the token, decides the algorithm: this is what stops an RS256 or
        // ES256 header from being checked against a key of another family.
        if key.alg != header.alg {
            return Err(TokenError::KeyMismatch {
                alg: alg_name(header.alg),
                kty: key.kty.to_string(),
            });
        }
        let claims =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &key.validation)
                .map_err(|e| self.claim_error(&e))?
                .claims;
        self.check_issuer(&claims)?;
        self.check_issued_at(&claims)?;
        check_binding(&claims, client_cert_der)?;
        self.identity_of(&claims)
    }

    fn current(&self) -> Arc<KeySet> {
        let current = self
            .inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&current)
    }

    fn claim_error(&self, error: &JwtError) -> TokenError {
        let malformed = |reason: &str| TokenError::Malformed(reason.to_string());
        match error.kind() {
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
            ErrorKind::InvalidAudience => TokenError::WrongAudience {
                expected: self.inner.settings.audience.clone(),
            },
            ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim {
                claim: claim.clone(),
            },
            ErrorKind::InvalidClaimFormat(claim) => {
                TokenError::Malformed(format!("claim {claim:?} has the wrong type"))
            }
            ErrorKind::InvalidToken => {
                malformed("not a compact JWS, or a crit/b64 header that is not supported")
            }
            ErrorKind::Base64(_) => malformed("a part is not base64url without padding"),
            ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                malformed("the claims are not a JSON object")
            }
            ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidAlgorithm => {
                // Keys are checked at load, so this is a bug or a backend change; the
                // client cannot fix it, and to them the token simply does not verify.
                tracing::warn!(error = %error, "a trusted key was refused by the jwt backend");
                TokenError::BadSignature
            }
            _ => malformed("the token cannot be verified"),
        }
    }

    /// `jsonwebtoken` also accepts `iss` as an array with one matching member; RFC 7519
    /// makes `iss` a single string, and one spelling is what we compare.
    fn check_issuer(&self, claims: &Map<String, Value>) -> Result<(), TokenError> {
        match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.inner.settings.issuer => Ok(()),
            _ => Err(TokenError::WrongIssuer),
        }
    }

    /// `jsonwebtoken` does not look at `iat`; one from the future means a broken issuer.
    fn check_issued_at(&self, claims: &Map<String, Value>) -> Result<(), TokenError> {
        let Some(iat) = claims.get("iat") else {
            return Ok(());
        };
        let iat = iat
            .as_f64()
            .filter(|iat| iat.is_finite() && *iat >= 0.0)
            .ok_or_else(|| TokenError::Malformed("claim \"iat\" has the wrong type".into()))?;
        let latest = jsonwebtoken::get_current_timestamp() + self.inner.settings.leeway.as_secs();
        if iat > latest as f64 {
            return Err(TokenError::NotYetValid);
        }
        Ok(())
    }

    fn identity_of(&self, claims: &Map<String, Value>) -> Result<Identity, TokenError> {
        let settings = &self.inner.settings;
        let name = &settings.identity_claim;
        let value = claims.get(name).ok_or_else(|| TokenError::MissingClaim {
            claim: name.clone(),
        })?;
        let text = value.as_str().ok_or_else(|| TokenError::BadIdentity {
            reason: format!("claim {name:?} is not a string"),
        })?;
        let identity = if text.starts_with("spiffe://") {
            identity::parse_spiffe(text, &settings.trust_domain)
        } else {
            Identity::from_str(text)
        }
        .map_err(|e| TokenError::BadIdentity {
            reason: e.to_string(),
        })?;
        match identity {
            Identity::Node(_) => Err(TokenError::NodeIdentity),
            other => Ok(other),
        }
    }
}

impl KeySet {
    /// With several keys the token must say which one; a lone key serves tokens without `kid`.
    fn select(&self, kid: Option<&str>) -> Result<&TrustedKey, TokenError> {
        match (kid, self.keys.as_slice()) {
            (Some(kid), keys) => keys
                .iter()
                .find(|key| key.kid.as_deref() == Some(kid))
                .ok_or_else(|| TokenError::UnknownKey {
                    kid: Some(echo(kid)),
                }),
            (None, [only]) => Ok(only),
            (None, _) => Err(TokenError::UnknownKey { kid: None }),
        }
    }
}

/// The base64url-no-pad SHA-256 of a certificate's DER: RFC 8705's `x5t#S256`.
pub fn cert_thumbprint(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// RFC 8705 §3.1: a token carrying `cnf` is usable only over the certificate it names.
fn check_binding(claims: &Map<String, Value>, cert_der: Option<&[u8]>) -> Result<(), TokenError> {
    let refuse = |reason| Err(TokenError::CertificateBinding { reason });
    let Some(cnf) = claims.get("cnf") else {
        return Ok(());
    };
    let Some(cnf) = cnf.as_object() else {
        return refuse("cnf is not a JSON object");
    };
    // An unknown confirmation method cannot be checked, so it cannot be ignored either.
    let thumbprint = match cnf.get("x5t#S256") {
        Some(Value::String(thumbprint)) => thumbprint,
        Some(_) => return refuse("cnf x5t#S256 is not a string"),
        None => return refuse("unknown confirmation method; only cnf x5t#S256 is supported"),
    };
    let Some(der) = cert_der else {
        return refuse("the token is bound to a client certificate and none was presented");
    };
    let expected = match URL_SAFE_NO_PAD.decode(thumbprint) {
        Ok(bytes) if bytes.len() == ring::digest::SHA256_OUTPUT_LEN => bytes,
        _ => return refuse("cnf x5t#S256 is not a base64url SHA-256 digest"),
    };
    // A thumbprint of a public certificate is no secret, so a plain comparison of two
    // fixed-size digests leaks nothing worth a constant-time one.
    if ring::digest::digest(&ring::digest::SHA256, der).as_ref() != expected.as_slice() {
        return refuse("the client certificate is not the one the token is bound to");
    }
    Ok(())
}

/// Turns a header that `jsonwebtoken` cannot parse into a reason. Its `Algorithm` enum
/// has no `none`, so `alg: none` (or any unknown name) fails there as bad JSON; read the
/// name back only to say which algorithm was refused — never to verify anything.
fn header_error(token: &str, error: &JwtError) -> TokenError {
    #[derive(Deserialize)]
    struct AlgOnly {
        alg: String,
    }
    let named = token
        .split('.')
        .next()
        .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok())
        .and_then(|json| serde_json::from_slice::<AlgOnly>(&json).ok())
        .filter(|header| Algorithm::from_str(&header.alg).is_err());
    match (named, error.kind()) {
        (Some(header), _) => TokenError::AlgorithmNotAllowed {
            alg: echo(&header.alg),
        },
        (None, ErrorKind::InvalidToken) => {
            TokenError::Malformed("not a compact JWS of three base64url parts".into())
        }
        (None, _) => TokenError::Malformed("the header is not base64url JSON naming an alg".into()),
    }
}

fn alg_name(alg: Algorithm) -> String {
    // `Algorithm`'s Debug form is its JOSE name (`EdDSA`, `HS256`, ...).
    format!("{alg:?}")
}

/// Shortens a client-supplied header value before it goes into an error message.
fn echo(value: &str) -> String {
    value.chars().take(MAX_ECHO_CHARS).collect()
}

fn check_settings(settings: &TokenSettings) -> Result<(), TokenError> {
    let problems = [
        (settings.issuer.is_empty(), "issuer is empty"),
        (settings.audience.is_empty(), "audience is empty"),
        (
            settings.identity_claim.is_empty(),
            "identity_claim is empty",
        ),
        (
            settings.leeway > MAX_LEEWAY,
            "leeway is longer than 10 minutes",
        ),
        (
            identity::check_trust_domain(&settings.trust_domain).is_err(),
            "trust_domain is not a SPIFFE trust domain name",
        ),
    ];
    match problems.iter().find(|(bad, _)| *bad) {
        Some((_, reason)) => Err(TokenError::Settings { reason }),
        None => Ok(()),
    }
}

/// Reads and checks the whole JWKS; one unusable key refuses the file, so a typo in a
/// rotation is noticed at once rather than when that key's first token arrives.
fn read_jwks(settings: &TokenSettings) -> Result<KeySet, TokenError> {
    #[derive(Deserialize)]
    struct JwksFile {
        keys: Vec<Map<String, Value>>,
    }
    let path = &settings.jwks;
    let refuse = |reason: String| TokenError::Jwks {
        path: path.clone(),
        reason,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|file| file.take(MAX_JWKS_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| refuse(format!("cannot be read: {e}")))?;
    if bytes.len() as u64 > MAX_JWKS_BYTES {
        return Err(refuse(format!("is larger than {MAX_JWKS_BYTES} bytes")));
    }
    let file: JwksFile = serde_json::from_slice(&bytes)
        .map_err(|e| refuse(format!("is not a JWKS ({{\"keys\": [...]}}): {e}")))?;
    if file.keys.is_empty() {
        return Err(refuse("holds no keys".into()));
    }
    let several = file.keys.len() > 1;
    let mut keys: Vec<TrustedKey> = Vec::with_capacity(file.keys.len());
    for (index, member) in file.keys.into_iter().enumerate() {
        let label = match member.get("kid").and_then(Value::as_str) {
            Some(kid) => format!("key {index} (kid {kid:?})"),
            None => format!("key {index}"),
        };
        let key = trusted_key(member, settings).map_err(|e| refuse(format!("{label}: {e}")))?;
        if several && key.kid.is_none() {
            return Err(refuse(format!(
                "{label}: has no kid; every key of a set of several needs one"
            )));
        }
        if key.kid.is_some() && keys.iter().any(|other| other.kid == key.kid) {
            return Err(refuse(format!("{label}: the kid is used twice")));
        }
        keys.push(key);
    }
    Ok(KeySet { keys })
}

/// Maps one JWK to the one algorithm it may verify: OKP/Ed25519 → EdDSA, EC/P-256 →
/// ES256, RSA → RS256. Anything else, and any private member, is refused.
fn trusted_key(member: Map<String, Value>, settings: &TokenSettings) -> Result<TrustedKey, String> {
    if let Some(private) = PRIVATE_MEMBERS.iter().find(|m| member.contains_key(**m)) {
        return Err(format!(
            "holds private key material ({private:?}); the JWKS must hold public keys only"
        ));
    }
    let jwk: Jwk =
        serde_json::from_value(Value::Object(member)).map_err(|e| format!("is not a JWK: {e}"))?;
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Err("has a use other than \"sig\"".into());
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("has key_ops without \"verify\"".into());
        }
    }
    if jwk.common.key_id.as_deref() == Some("") {
        return Err("has an empty kid".into());
    }
    let (alg, kty, decoding) = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            check_length(&p.x, "x", 32)?;
            let key = DecodingKey::from_ed_components(&p.x);
            (Algorithm::EdDSA, "OKP", key)
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            check_length(&p.x, "x", 32)?;
            check_length(&p.y, "y", 32)?;
            let key = DecodingKey::from_ec_components(&p.x, &p.y);
            (Algorithm::ES256, "EC", key)
        }
        AlgorithmParameters::RSA(p) => {
            check_rsa(&p.n, &p.e)?;
            let key = DecodingKey::from_rsa_components(&p.n, &p.e);
            (Algorithm::RS256, "RSA", key)
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            let curve = &p.curve;
            return Err(format!("OKP curve {curve:?} is not supported; use Ed25519"));
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let curve = &p.curve;
            return Err(format!("EC curve {curve:?} is not supported; use P-256"));
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("is a symmetric (oct) key; HMAC tokens are not accepted".into());
        }
        _ => return Err("has an unsupported kty; use OKP (Ed25519), EC (P-256) or RSA".into()),
    };
    let decoding = decoding.map_err(|e| format!("cannot be decoded: {e}"))?;
    if let Some(declared) = jwk.common.key_algorithm {
        if declared != KeyAlgorithm::from(alg) {
            return Err(format!(
                "declares alg {declared}; a {kty} key verifies {alg:?} only"
            ));
        }
    }
    // Verifying an empty signature makes the backend parse the key: a point that is not
    // on the curve fails here as a key error instead of as a bad signature on every token.
    if let Err(e) = jsonwebtoken::crypto::verify("", b"", &decoding, alg) {
        return Err(format!("is not a valid {kty} public key: {e}"));
    }
    Ok(TrustedKey {
        kid: jwk.common.key_id.clone(),
        alg,
        kty,
        decoding,
        validation: validation(alg, settings),
    })
}

fn validation(alg: Algorithm, settings: &TokenSettings) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_exp = true;
    // Off by default in jsonwebtoken.
    validation.validate_nbf = true;
    validation.validate_aud = true;
    validation.set_issuer(&[&settings.issuer]);
    validation.set_audience(&[&settings.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation
}

fn decode_member(value: &str, name: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| format!("member {name:?} is not base64url without padding"))
}

/// The Ed25519 backend slices the first 32 bytes and would panic on fewer; P-256 wants
/// exactly 32-byte coordinates.
fn check_length(value: &str, name: &str, len: usize) -> Result<(), String> {
    if decode_member(value, name)?.len() != len {
        return Err(format!("member {name:?} is not {len} bytes"));
    }
    Ok(())
}

/// The RSA backend parses `n` and `e` only while verifying; refuse here what it would
/// refuse there (and keys too short to trust).
fn check_rsa(n: &str, e: &str) -> Result<(), String> {
    let bits = |bytes: &[u8]| match bytes.iter().position(|b| *b != 0) {
        Some(first) => (bytes.len() - first) * 8 - bytes[first].leading_zeros() as usize,
        None => 0,
    };
    let is_odd = |bytes: &[u8]| bytes.last().is_some_and(|b| b & 1 == 1);
    let n = decode_member(n, "n")?;
    let e = decode_member(e, "e")?;
    if !RSA_MODULUS_BITS.contains(&bits(&n)) || !is_odd(&n) {
        return Err(format!(
            "is not an RSA modulus of {} to {} bits",
            RSA_MODULUS_BITS.start(),
            RSA_MODULUS_BITS.end()
        ));
    }
    if !(2..=33).contains(&bits(&e)) || !is_odd(&e) {
        return Err("has an RSA exponent that is not odd, at least 3 and below 2^33".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use serde_json::json;
    use TokenError as E;

    const ISS: &str = "https://issuer.cairn.test";
    const AUD: &str = "cairn";
    const LEEWAY: u64 = 30;
    /// `openssl genrsa -traditional 2048`: ring cannot generate RSA keys, and the RSA
    /// backend is far too slow at it in a debug build.
    const RSA_PEM: &str = include_str!("../tests/fixtures/jwt-rsa-test-key.pem");

    /// `refused!(result, Pattern if guard)`: the result is an error of that shape.
    macro_rules! refused {
        ($result:expr, $pattern:pat $(if $guard:expr)?) => {
            match $result {
                Err($pattern) $(if $guard)? => {}
                other => panic!("expected {}, got {other:?}", stringify!($pattern)),
            }
        };
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// A signing key, the JWK of its public half, and the public key as the bytes an
    /// attacker would try as an HMAC secret. Ed25519 and P-256 JWKs are built from ring's
    /// public key bytes, so a JWK bug in `jsonwebtoken` is not mirrored by the test.
    struct TestKey {
        kid: String,
        alg: Algorithm,
        encoding: EncodingKey,
        jwk: Value,
        public: Vec<u8>,
    }

    fn ed25519(kid: &str) -> TestKey {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("ed25519 key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed25519 pkcs8");
        let public = pair.public_key().as_ref().to_vec();
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&public), "kid": kid});
        let encoding = EncodingKey::from_ed_der(pkcs8.as_ref());
        let (kid, alg) = (kid.into(), Algorithm::EdDSA);
        TestKey {
            kid,
            alg,
            encoding,
            jwk,
            public,
        }
    }

    fn p256(kid: &str) -> TestKey {
        let (rng, alg) = (SystemRandom::new(), &ECDSA_P256_SHA256_FIXED_SIGNING);
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("p256 key");
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("p256 pkcs8");
        let public = pair.public_key().as_ref().to_vec(); // 04 || x || y
        let (x, y) = (b64(&public[1..33]), b64(&public[33..]));
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid,
                         "alg": "ES256", "use": "sig"});
        let encoding = EncodingKey::from_ec_der(pkcs8.as_ref());
        let (kid, alg) = (kid.into(), Algorithm::ES256);
        TestKey {
            kid,
            alg,
            encoding,
            jwk,
            public,
        }
    }

    fn rsa(kid: &str) -> TestKey {
        let pem: String = RSA_PEM
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD.decode(pem);
        let encoding = EncodingKey::from_rsa_der(&der.expect("fixture is PEM"));
        let jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).expect("rsa jwk");
        let jwk = with(serde_json::to_value(jwk).expect("json"), "kid", json!(kid));
        let (kid, alg, public) = (kid.into(), Algorithm::RS256, jwk.to_string().into_bytes());
        TestKey {
            kid,
            alg,
            encoding,
            jwk,
            public,
        }
    }

    fn claims(identity: &str) -> Value {
        json!({"iss": ISS, "aud": AUD, "sub": identity, "iat": now(), "exp": now() + 300})
    }

    /// `claims` with `name` set to `value`, or removed when `value` is null.
    fn with(claims: Value, name: &str, value: Value) -> Value {
        let mut claims = claims;
        let map = claims.as_object_mut().expect("an object");
        match value {
            Value::Null => map.remove(name),
            value => map.insert(name.into(), value),
        };
        claims
    }

    fn sign_as(key: &TestKey, kid: Option<&str>, alg: Algorithm, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, &key.encoding).expect("sign")
    }

    fn sign(key: &TestKey, claims: &Value) -> String {
        sign_as(key, Some(&key.kid), key.alg, claims)
    }

    fn settings(jwks: PathBuf) -> TokenSettings {
        TokenSettings {
            jwks,
            issuer: ISS.into(),
            audience: AUD.into(),
            identity_claim: "sub".into(),
            leeway: Duration::from_secs(LEEWAY),
            trust_domain: "cairn.test".into(),
        }
    }

    fn write_jwks(path: &std::path::Path, keys: &[&Value]) {
        std::fs::write(path, json!({ "keys": keys }).to_string()).expect("write jwks");
    }

    /// Loads a verifier over `keys`; the directory lives as long as the verifier is used.
    fn load(keys: &[&Value]) -> (tempfile::TempDir, Result<TokenVerifier, TokenError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        write_jwks(&dir.path().join("jwks.json"), keys);
        let verifier = TokenVerifier::load(settings(dir.path().join("jwks.json")));
        (dir, verifier)
    }

    /// Three trusted keys, one per family.
    struct World {
        ed: TestKey,
        ec: TestKey,
        rsa: TestKey,
        dir: tempfile::TempDir,
        verifier: TokenVerifier,
    }

    impl World {
        fn verify(&self, token: &str) -> Result<Identity, TokenError> {
            self.verifier.verify(token, None)
        }
    }

    fn world() -> World {
        let (ed, ec, rsa) = (ed25519("ed-1"), p256("ec-1"), rsa("rsa-1"));
        let (dir, verifier) = load(&[&ed.jwk, &ec.jwk, &rsa.jwk]);
        let verifier = verifier.expect("load");
        World {
            ed,
            ec,
            rsa,
            dir,
            verifier,
        }
    }

    fn service(name: &str) -> Identity {
        Identity::Service(name.into())
    }

    #[test]
    fn eddsa_token_in_short_form_is_accepted() {
        let w = world();
        let token = sign(&w.ed, &claims("service/payments"));
        assert_eq!(w.verify(&token).expect("ok"), service("payments"));
    }

    #[test]
    fn es256_token_in_spiffe_form_is_accepted() {
        let w = world();
        let token = sign(&w.ec, &claims("spiffe://cairn.test/operator/alice"));
        let alice = Identity::Operator("alice".into());
        assert_eq!(w.verify(&token).expect("ok"), alice);
    }

    #[test]
    fn rs256_token_with_audience_array_is_accepted() {
        let w = world();
        let audiences = json!(["other", AUD]);
        let token = sign(&w.rsa, &with(claims("service/billing"), "aud", audiences));
        assert_eq!(w.verify(&token).expect("ok"), service("billing"));
    }

    #[test]
    fn alg_none_is_refused() {
        let w = world();
        let body = b64(claims("service/x").to_string().as_bytes());
        let headers = [
            json!({"alg": "none"}),
            json!({"alg": "none", "kid": "ed-1"}),
        ];
        for header in headers {
            let token = format!("{}.{body}.", b64(header.to_string().as_bytes()));
            refused!(w.verify(&token), E::AlgorithmNotAllowed { alg } if alg == "none");
        }
    }

    #[test]
    fn wrong_audience_is_refused() {
        let w = world();
        for aud in [json!("someone-else"), json!(["a", "b"]), json!([])] {
            let token = sign(&w.ed, &with(claims("service/x"), "aud", aud));
            refused!(w.verify(&token), E::WrongAudience { expected } if expected == AUD);
        }
    }

    #[test]
    fn wrong_issuer_is_refused() {
        let w = world();
        // An array holding the issuer passes jsonwebtoken's check; it must not pass ours.
        let issuers = [
            json!("https://evil.test"),
            json!([ISS, "https://evil.test"]),
        ];
        for iss in issuers {
            let token = sign(&w.ed, &with(claims("service/x"), "iss", iss));
            refused!(w.verify(&token), E::WrongIssuer);
        }
    }

    #[test]
    fn expired_beyond_leeway_is_refused_and_within_leeway_accepted() {
        let w = world();
        let old = with(claims("service/x"), "iat", json!(now() - 600));
        let token = sign(&w.ec, &with(old.clone(), "exp", json!(now() - LEEWAY - 30)));
        refused!(w.verify(&token), E::Expired);
        let token = sign(&w.ec, &with(old.clone(), "exp", json!(now() - LEEWAY / 2)));
        assert_eq!(w.verify(&token).expect("within leeway"), service("x"));
        let token = sign(&w.ec, &with(old, "exp", Value::Null));
        refused!(w.verify(&token), E::MissingClaim { claim } if claim == "exp");
    }

    #[test]
    fn nbf_or_iat_in_the_future_is_refused() {
        let w = world();
        let soon = |name, at| sign(&w.ed, &with(claims("service/x"), name, json!(at)));
        refused!(w.verify(&soon("nbf", now() + LEEWAY + 60)), E::NotYetValid);
        assert!(
            w.verify(&soon("nbf", now() + LEEWAY / 2)).is_ok(),
            "within leeway"
        );
        refused!(w.verify(&soon("iat", now() + 3600)), E::NotYetValid);
    }

    #[test]
    fn unknown_kid_is_refused() {
        let w = world();
        let token = sign(&ed25519("ghost"), &claims("service/x"));
        refused!(w.verify(&token), E::UnknownKey { kid: Some(kid) } if kid == "ghost");
        // With several keys a token must name one.
        let token = sign_as(&w.ed, None, Algorithm::EdDSA, &claims("service/x"));
        refused!(w.verify(&token), E::UnknownKey { kid: None });
    }

    #[test]
    fn other_key_under_a_trusted_kid_is_a_bad_signature() {
        let w = world();
        for (impostor, kid) in [(ed25519("x"), "ed-1"), (p256("x"), "ec-1")] {
            let token = sign_as(&impostor, Some(kid), impostor.alg, &claims("service/x"));
            refused!(w.verify(&token), E::BadSignature);
        }
    }

    #[test]
    fn lone_key_serves_tokens_without_kid() {
        let ed = ed25519("only");
        let (_dir, verifier) = load(&[&ed.jwk]);
        let verifier = verifier.expect("load");
        let token = sign_as(&ed, None, Algorithm::EdDSA, &claims("service/x"));
        assert_eq!(verifier.verify(&token, None).expect("ok"), service("x"));
        assert_eq!(verifier.key_ids(), ["only"]);
    }

    #[test]
    fn hmac_signed_with_the_public_key_is_refused() {
        let w = world();
        // The classic confusion attack: HMAC keyed with bytes the attacker can read.
        let prefix = [
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        let spki = [&prefix[..], &w.ed.public].concat(); // Ed25519 SubjectPublicKeyInfo
        let body = base64::engine::general_purpose::STANDARD.encode(&spki);
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n");
        let secrets = [
            ("ed-1", w.ed.public.clone()),
            ("ed-1", spki),
            ("ed-1", pem.into_bytes()),
            ("ed-1", w.ed.jwk.to_string().into_bytes()),
            ("ec-1", w.ec.public.clone()),
            ("rsa-1", w.rsa.public.clone()),
        ];
        for (kid, secret) in secrets {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                let mut header = Header::new(alg);
                header.kid = Some(kid.into());
                let key = EncodingKey::from_secret(&secret).expect("hmac key");
                let token = encode(&header, &claims("service/x"), &key).expect("sign");
                refused!(w.verify(&token), E::AlgorithmNotAllowed { alg: a } if a == alg_name(alg));
            }
        }
    }

    #[test]
    fn header_alg_of_another_family_than_the_key_is_refused() {
        let w = world();
        let cases = [
            (&w.rsa, "ec-1", Algorithm::RS256, "EC"),
            (&w.ec, "ed-1", Algorithm::ES256, "OKP"),
            (&w.ed, "rsa-1", Algorithm::EdDSA, "RSA"),
        ];
        for (signer, kid, alg, kty) in cases {
            let token = sign_as(signer, Some(kid), alg, &claims("service/x"));
            let fits = |a: &str, k: &str| a == alg_name(alg) && k == kty;
            refused!(w.verify(&token), E::KeyMismatch { alg, kty } if fits(&alg, &kty));
        }
    }

    /// A world, a token bound to the first of two fresh certificates, and both certificates.
    fn bound() -> (World, String, Vec<u8>, Vec<u8>) {
        let cert = |name: &str| {
            let certified = rcgen::generate_simple_self_signed(vec![name.into()]).expect("cert");
            certified.cert.der().to_vec()
        };
        let (w, mine, other) = (world(), cert("a.cairn.test"), cert("b.cairn.test"));
        let cnf = json!({"x5t#S256": cert_thumbprint(&mine)});
        let token = sign(&w.ed, &with(claims("service/x"), "cnf", cnf));
        (w, token, mine, other)
    }

    #[test]
    fn bound_token_over_its_certificate_is_accepted() {
        let (w, token, mine, _) = bound();
        assert_eq!(
            w.verifier.verify(&token, Some(&mine)).expect("ok"),
            service("x")
        );
    }

    #[test]
    fn bound_token_over_another_certificate_is_refused() {
        let (w, token, _, other) = bound();
        let result = w.verifier.verify(&token, Some(&other));
        refused!(result, E::CertificateBinding { reason } if reason.contains("not the one"));
    }

    #[test]
    fn bound_token_without_a_certificate_is_refused() {
        let (w, token, _, _) = bound();
        refused!(w.verify(&token), E::CertificateBinding { reason } if reason.contains("none"));
    }

    #[test]
    fn unknown_confirmation_method_is_refused() {
        let (w, _, mine, _) = bound();
        for cnf in [
            json!({"jkt": "abc"}),
            json!("x"),
            json!({"x5t#S256": "short"}),
        ] {
            let token = sign(&w.ed, &with(claims("service/x"), "cnf", cnf));
            refused!(
                w.verifier.verify(&token, Some(&mine)),
                E::CertificateBinding { .. }
            );
        }
    }

    #[test]
    fn thumbprint_is_base64url_sha256() {
        // SHA-256 of the empty string, RFC 4648 §5 alphabet, no padding.
        let empty = "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU";
        assert_eq!(cert_thumbprint(b""), empty);
    }

    #[test]
    fn token_naming_a_node_is_refused() {
        let w = world();
        for name in ["node/1", "spiffe://cairn.test/node/1"] {
            refused!(w.verify(&sign(&w.ed, &claims(name))), E::NodeIdentity);
        }
    }

    #[test]
    fn missing_identity_claim_is_refused() {
        let w = world();
        let token = sign(&w.ed, &with(claims("service/x"), "sub", Value::Null));
        refused!(w.verify(&token), E::MissingClaim { claim } if claim == "sub");
    }

    #[test]
    fn malformed_identity_claim_is_refused() {
        let w = world();
        let bad = [
            json!("service/Bad_Name"),
            json!("payments"),
            json!("spiffe://evil.test/service/x"),
            json!("SPIFFE://cairn.test/service/x"),
            json!(42),
        ];
        for sub in bad {
            let token = sign(&w.ed, &with(claims("service/x"), "sub", sub));
            refused!(w.verify(&token), E::BadIdentity { .. });
        }
    }

    #[test]
    fn malformed_tokens_are_refused_without_echoing_them() {
        let w = world();
        let good = sign(&w.ed, &claims("service/x"));
        let (head, signature) = good.rsplit_once('.').expect("three parts");
        let cases = [
            String::new(),
            "not-a-token".into(),
            format!("{good}.extra"),
            format!("{head}.!!!"),
            "x".repeat(MAX_TOKEN_BYTES + 1),
        ];
        for token in &cases {
            refused!(w.verify(token), E::Malformed(_));
        }
        let swapped = if signature.starts_with('A') { 'B' } else { 'A' };
        let error = w.verify(&format!("{head}.{swapped}{}", &signature[1..]));
        let error = error.expect_err("tampered signature");
        assert!(matches!(error, E::BadSignature), "{error:?}");
        assert!(!error.to_string().contains(&signature[1..]));
    }

    fn load_error(keys: &[&Value]) -> String {
        match load(keys).1 {
            Err(error @ E::Jwks { .. }) => error.to_string(),
            other => panic!("expected a Jwks error, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn jwks_with_private_key_material_is_refused() {
        let jwk = with(ed25519("ed").jwk, "d", json!(b64(&[7; 32])));
        let reason = load_error(&[&jwk]);
        assert!(reason.contains("private key material"), "{reason}");
        assert!(reason.contains("\"ed\""), "names the key: {reason}");
    }

    #[test]
    fn unusable_jwks_files_are_refused() {
        let ed = ed25519("ed").jwk;
        let anonymous = with(p256("x").jwk, "kid", Value::Null);
        let mislabelled = with(ed25519("ed2").jwk, "alg", json!("ES256"));
        let off_curve = with(p256("ec").jwk, "y", json!(b64(&[1; 32])));
        let p384 = json!({"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"});
        let short_ed = json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"});
        let cases = [
            (vec![], "no keys"),
            (vec![json!({"kty": "oct", "k": "c2VjcmV0"})], "symmetric"),
            (vec![p384], "P384"),
            (vec![short_ed], "32 bytes"),
            (
                vec![json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})],
                "RSA modulus",
            ),
            (vec![ed.clone(), anonymous], "has no kid"),
            (vec![ed.clone(), ed], "used twice"),
            (vec![mislabelled], "declares alg ES256"),
            (vec![off_curve], "not a valid EC public key"),
        ];
        for (keys, expected) in cases {
            let reason = load_error(&keys.iter().collect::<Vec<_>>());
            assert!(reason.contains(expected), "{expected:?} not in {reason:?}");
        }
        let missing = TokenVerifier::load(settings("/nonexistent/jwks.json".into()));
        refused!(missing, E::Jwks { .. });
        let mut bad = settings("/unused".into());
        bad.leeway = Duration::from_secs(3600);
        refused!(TokenVerifier::load(bad), E::Settings { .. });
    }

    #[test]
    fn reload_keeps_old_keys_on_error_and_swaps_on_success() {
        let w = world();
        let (path, shared) = (w.dir.path().join("jwks.json"), w.verifier.clone());
        let old = sign(&w.ed, &claims("service/x"));

        std::fs::write(&path, "{ not json").expect("write");
        refused!(w.verifier.reload(), E::Jwks { .. });
        assert!(
            shared.verify(&old, None).is_ok(),
            "old keys stay in service"
        );
        assert_eq!(shared.key_ids(), ["ed-1", "ec-1", "rsa-1"]);

        let next = ed25519("ed-2");
        write_jwks(&path, &[&next.jwk, &w.rsa.jwk]);
        assert_eq!(w.verifier.reload().expect("reload"), 2);
        assert_eq!(shared.key_ids(), ["ed-2", "rsa-1"]);
        assert!(shared
            .verify(&sign(&next, &claims("service/x")), None)
            .is_ok());
        refused!(shared.verify(&old, None), E::UnknownKey { .. });
    }
}
