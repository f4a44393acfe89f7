//! config: the typed node configuration, loaded and validated once; knows nothing of the modules that use it.
//!
//! One TOML file per node. Precedence: file < `CAIRN_*` environment < command-line flags.
//! All three are merged into one TOML document *before* it is deserialized, so a field may
//! come from any layer (a shared file can leave `node_id` to a flag), `deny_unknown_fields`
//! sees every key, and every error names where the bad value came from: the file's line and
//! column, the environment variable, or the field.
//!
//! Environment: `CAIRN_<KEY>` sets a top-level key (`CAIRN_NODE_ID=3`, `CAIRN_LOG=debug`), a
//! double underscore nests (`CAIRN_LISTEN__API=127.0.0.1:7400`, `CAIRN_RAFT__HEARTBEAT_MS=100`).
//! Keys are checked against the schema first: an unknown one is an error naming the variable.
//! A string field takes the value verbatim; any other field parses it as a TOML value (`100`,
//! `true`, `[...]`, `{...}`). Variables in [`IGNORED_ENV`] belong to the CLI and are skipped.
//!
//! Paths written in the file are relative to the file's directory; paths from the environment
//! or flags are relative to the working directory, as a shell user expects. After loading,
//! every path is absolute.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

/// Default for [`RaftTuning::heartbeat_ms`].
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
/// Default for [`RaftTuning::election_min_ms`].
///
/// After the last heartbeat, followers refuse to vote for `election_max_ms` (openraft's leader
/// lease), so a candidate whose first timeout falls inside it tries again one timeout later:
/// a leader's loss costs about `election_min_ms + election_max_ms` of write unavailability
/// (measured 0.9-1.0 s with these values, etcd's defaults give 1.0-1.2 s on the same machine).
/// Clusters spread over distant zones set them higher (see `cluster-config/`).
pub const DEFAULT_ELECTION_MIN_MS: u64 = 300;
/// Default for [`RaftTuning::election_max_ms`].
pub const DEFAULT_ELECTION_MAX_MS: u64 = 600;
/// Default for [`RaftTuning::snapshot_every`]: etcd's `--snapshot-count`. Taking a snapshot
/// holds nothing up, but encodes, seals and writes the whole registry: about a second of one
/// core at 160 000 instances, so at thousands of writes a second a smaller value spends a
/// large share of the CPU on snapshots. The price is a longer log replay at restart.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100_000;
/// Default for [`RaftTuning::max_in_snapshot_log_to_keep`].
pub const DEFAULT_MAX_IN_SNAPSHOT_LOG_TO_KEEP: u64 = 1000;
/// Default for [`Limits::max_body_bytes`]: 64 KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Default for [`Limits::request_timeout_ms`].
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5000;
/// Default for [`Limits::max_wait_seconds`].
pub const DEFAULT_MAX_WAIT_SECONDS: u64 = 300;
/// Default for [`LeaseTuning::check_interval_ms`].
pub const DEFAULT_CHECK_INTERVAL_MS: u64 = 250;
/// Default for [`LeaseTuning::reap_after_seconds`].
pub const DEFAULT_REAP_AFTER_SECONDS: u64 = 3600;
/// Default for [`TlsFiles::reload_interval_ms`].
pub const DEFAULT_RELOAD_INTERVAL_MS: u64 = 2000;
/// Default for [`Jwt::identity_claim`].
pub const DEFAULT_IDENTITY_CLAIM: &str = "sub";
/// Default for [`Jwt::leeway_seconds`].
pub const DEFAULT_LEEWAY_SECONDS: u64 = 30;
/// Default for [`Config::log`].
pub const DEFAULT_LOG: &str = "info";
/// The largest initial membership accepted (Raft clusters beyond 7 voters only get slower).
pub const MAX_MEMBERS: usize = 7;
/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "CAIRN_";
/// `CAIRN_*` variables that are not config keys and are skipped: the CLI's own (`--config`
/// and the client flags that `cairn dev` tells users to export). Without this, a server
/// started from a shell that has them set would refuse to start.
pub const IGNORED_ENV: &[&str] = &[
    "CAIRN_CONFIG",
    "CAIRN_ENDPOINTS",
    "CAIRN_CA",
    "CAIRN_CERT",
    "CAIRN_KEY",
];

/// One node's configuration, as loaded and validated by [`Config::load`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id in the cluster (at least 1); must appear in `members`.
    pub node_id: u64,
    /// This node's zone (a DNS label, e.g. `zone-a`); `near=` queries prefer it.
    pub zone: String,
    /// Directory holding the node's RocksDB data; everything in it is sealed.
    pub data_dir: PathBuf,
    /// SPIFFE trust domain of the cluster's identities, e.g. `cairn.local` (no scheme).
    pub trust_domain: String,
    /// The node's own addresses: the public API and the internal raft port.
    pub listen: Listen,
    /// The node's certificate files.
    pub tls: TlsFiles,
    /// The keyring file (mode 0600, outside `data_dir`).
    pub keyring: PathBuf,
    /// The initial cluster members, this node included.
    pub members: Vec<Member>,
    /// Raft timing and log compaction.
    #[serde(default)]
    pub raft: RaftTuning,
    /// Request limits of the public API.
    #[serde(default)]
    pub limits: Limits,
    /// Lease expiry and reaping.
    #[serde(default)]
    pub leases: LeaseTuning,
    /// Access control: the policy applied at first cluster start.
    #[serde(default)]
    pub acl: Acl,
    /// JWT bearer tokens accepted on the API (absent: certificates only).
    #[serde(default)]
    pub jwt: Option<Jwt>,
    /// Scheduled backups, taken by the leader (absent: none).
    #[serde(default)]
    pub backup: Option<BackupSchedule>,
    /// Planted bugs for the fault harness; refused unless built with `chaos-bugs`.
    #[serde(default)]
    pub chaos: Chaos,
    /// `tracing` filter directive, e.g. `info` or `info,cairn::raft=debug`.
    #[serde(default = "default_log")]
    pub log: String,
}

/// The two listeners of a node. Both bind the node's own address (one IP, two ports), so
/// the node's traffic can be told apart by address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Public HTTPS API (client certificates or tokens).
    pub api: SocketAddr,
    /// Internal raft port (node certificates only).
    pub raft: SocketAddr,
    /// The raft address peers dial, when it is not `raft` itself (a proxy or NAT between the
    /// nodes); this node's `members` entry must name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_advertise: Option<SocketAddr>,
}

/// PEM files of the node's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate(s), trusted for peers and clients.
    pub ca: PathBuf,
    /// This node's certificate chain (SPIFFE ID `spiffe://<trust_domain>/node/<node_id>`).
    pub cert: PathBuf,
    /// This node's private key (mode 0600).
    pub key: PathBuf,
    /// Whether the API listener demands a client certificate: `required`, or `optional`
    /// (a caller without one must then present a bearer token; needs `[jwt]`).
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// How often the certificate, key, CA and JWKS files are checked for changes, in
    /// milliseconds; SIGHUP reloads at once.
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

impl TlsFiles {
    /// [`TlsFiles::reload_interval_ms`] as a duration.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms)
    }
}

/// The API listener's client-certificate mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Every connection presents a certificate of the CA.
    #[default]
    Required,
    /// TLS without a client certificate is accepted; such callers need a bearer token.
    Optional,
}

/// Access control settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    /// A TOML policy (roles and bindings) applied once, when the cluster first starts;
    /// later changes go through `/v1/acl` and are never overwritten by this file.
    pub policy_file: Option<PathBuf>,
}

/// How bearer tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    /// JWKS file with the issuer's public keys (EdDSA, ES256, RS256); reloaded on change.
    pub jwks: PathBuf,
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim (one of the token's audiences).
    pub audience: String,
    /// The claim naming the caller: `service/<name>`, `operator/<name>`, or a SPIFFE ID of
    /// this trust domain.
    #[serde(default = "default_identity_claim")]
    pub identity_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway_seconds")]
    pub leeway_seconds: u64,
}

/// Scheduled backups: the leader writes a verified backup file into `dir` every
/// `interval_seconds` and keeps the newest `keep`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSchedule {
    /// Directory for the backup files (created 0700 if missing; keep it off the data disk).
    pub dir: PathBuf,
    /// Seconds between backups.
    #[serde(default = "default_backup_interval")]
    pub interval_seconds: u64,
    /// How many of the newest backups to keep.
    #[serde(default = "default_backup_keep")]
    pub keep: usize,
}

/// Bugs planted on purpose so the fault harness (`jepsen-like`) can show it catches them.
/// Only a build with the `chaos-bugs` cargo feature accepts a non-empty list; a normal build
/// refuses the config, so no production node can run one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Chaos {
    pub bugs: Vec<PlantedBug>,
}

/// One planted bug (see [`Chaos`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlantedBug {
    /// Linearizable reads answer from local state without a ReadIndex round.
    StaleReads,
    /// The leader acknowledges a write before it is committed (and applied).
    EarlyAck,
    /// A follower applies a write to its own state instead of forwarding it to the leader.
    FollowerApply,
}

impl PlantedBug {
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::StaleReads => "stale-reads",
            PlantedBug::EarlyAck => "early-ack",
            PlantedBug::FollowerApply => "follower-apply",
        }
    }
}

/// Whether this build may run planted bugs (the `chaos-bugs` cargo feature).
pub const PLANTED_BUGS_BUILD: bool = cfg!(feature = "chaos-bugs");

/// Default for [`BackupSchedule::interval_seconds`].
pub const DEFAULT_BACKUP_INTERVAL_SECONDS: u64 = 3600;
/// Default for [`BackupSchedule::keep`].
pub const DEFAULT_BACKUP_KEEP: usize = 24;

fn default_backup_interval() -> u64 {
    DEFAULT_BACKUP_INTERVAL_SECONDS
}

fn default_backup_keep() -> usize {
    DEFAULT_BACKUP_KEEP
}

fn default_reload_interval_ms() -> u64 {
    DEFAULT_RELOAD_INTERVAL_MS
}

fn default_identity_claim() -> String {
    DEFAULT_IDENTITY_CLAIM.to_owned()
}

fn default_leeway_seconds() -> u64 {
    DEFAULT_LEEWAY_SECONDS
}

/// One initial cluster member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The member's node id (at least 1, unique).
    pub id: u64,
    /// The member's public API address.
    pub api: SocketAddr,
    /// The member's raft address (same IP as `api`).
    pub raft: SocketAddr,
    /// The member's zone (a DNS label).
    pub zone: String,
}

/// Raft timing and log compaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    /// Leader heartbeat interval, in milliseconds.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout, in milliseconds (> 2 × heartbeat).
    pub election_min_ms: u64,
    /// Upper bound of the randomized election timeout, in milliseconds (> election_min_ms).
    pub election_max_ms: u64,
    /// Take a snapshot every this many applied log entries.
    pub snapshot_every: u64,
    /// Log entries kept after a snapshot, so slightly lagging followers need no snapshot.
    pub max_in_snapshot_log_to_keep: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            election_min_ms: DEFAULT_ELECTION_MIN_MS,
            election_max_ms: DEFAULT_ELECTION_MAX_MS,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            max_in_snapshot_log_to_keep: DEFAULT_MAX_IN_SNAPSHOT_LOG_TO_KEEP,
        }
    }
}

impl RaftTuning {
    /// [`RaftTuning::heartbeat_ms`] as a duration.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

/// Request limits of the public API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest a request waits (e.g. for a quorum) before it is answered 503, in milliseconds.
    pub request_timeout_ms: u64,
    /// Longest `wait=` a blocking query may ask for, in seconds.
    pub max_wait_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            max_wait_seconds: DEFAULT_MAX_WAIT_SECONDS,
        }
    }
}

impl Limits {
    /// [`Limits::request_timeout_ms`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// [`Limits::max_wait_seconds`] as a duration.
    pub fn max_wait(&self) -> Duration {
        Duration::from_secs(self.max_wait_seconds)
    }
}

/// Lease expiry and reaping, run by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseTuning {
    /// How often the leader looks for expired leases, in milliseconds.
    pub check_interval_ms: u64,
    /// An instance whose lease stays expired (Critical) this long is removed, in seconds.
    pub reap_after_seconds: u64,
}

impl Default for LeaseTuning {
    fn default() -> Self {
        LeaseTuning {
            check_interval_ms: DEFAULT_CHECK_INTERVAL_MS,
            reap_after_seconds: DEFAULT_REAP_AFTER_SECONDS,
        }
    }
}

impl LeaseTuning {
    /// [`LeaseTuning::check_interval_ms`] as a duration.
    pub fn check_interval(&self) -> Duration {
        Duration::from_millis(self.check_interval_ms)
    }

    /// [`LeaseTuning::reap_after_seconds`] as a duration.
    pub fn reap_after(&self) -> Duration {
        Duration::from_secs(self.reap_after_seconds)
    }
}

fn default_log() -> String {
    DEFAULT_LOG.to_owned()
}

/// Values from command-line flags; they win over the file and the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--log`.
    pub log: Option<String>,
    /// `--node-id`.
    pub node_id: Option<u64>,
}

/// Why a configuration was refused. All are fatal: fix the input and restart.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", .path.display())]
    Io {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The config file is not valid TOML, or a value in it has the wrong shape.
    #[error("cannot parse config file {}: {message}", .path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// toml's message, prefixed with `line L, column C` when known.
        message: String,
    },
    /// A `CAIRN_*` environment variable names no config key, or its value does not fit.
    #[error("invalid environment variable `{var}`: {message}")]
    Env {
        /// The variable, e.g. `CAIRN_RAFT__HEARTBEAT_MS`.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A field failed validation.
    #[error("invalid config field `{field}`: {message}")]
    Invalid {
        /// Dotted path of the field, e.g. `listen.raft` or `members[2].id`.
        field: String,
        /// What is wrong, and where the value came from when not from the file.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    /// Loads `path`, applies `CAIRN_*` variables from the process environment, then
    /// `overrides`, resolves relative paths and validates the result.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        // `vars_os`, not `vars`: an unrelated non-UTF-8 variable must not panic the server.
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())));
        Config::load_with_env(path, overrides, env)
    }

    /// [`Config::load`] with the environment given explicitly (tests, `cairn dev`).
    pub fn load_with_env(
        path: &Path,
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let settings = Settings::collect(env, overrides)?;
        let mut config = settings.deserialize(path, &text)?;
        let absolute = std::path::absolute(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = absolute.parent().unwrap_or(Path::new("/"));
        let annotate = |e| settings.annotate(e);
        config
            .resolve_paths(base_dir, &settings)
            .map_err(annotate)?;
        config.validate().map_err(annotate)?;
        Ok(config)
    }

    /// The initial member with this id.
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    fn path_fields(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
        let mut fields = vec![
            ("data_dir", &mut self.data_dir),
            ("tls.ca", &mut self.tls.ca),
            ("tls.cert", &mut self.tls.cert),
            ("tls.key", &mut self.tls.key),
            ("keyring", &mut self.keyring),
        ];
        if let Some(p) = &mut self.acl.policy_file {
            fields.push(("acl.policy_file", p));
        }
        if let Some(jwt) = &mut self.jwt {
            fields.push(("jwt.jwks", &mut jwt.jwks));
        }
        if let Some(b) = &mut self.backup {
            fields.push(("backup.dir", &mut b.dir));
        }
        fields
    }

    fn resolve_paths(&mut self, base_dir: &Path, settings: &Settings) -> Result<(), ConfigError> {
        for (field, path) in self.path_fields() {
            if path.as_os_str().is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
            if path.is_absolute() {
                continue;
            }
            *path = if settings.origin_of(field).is_some() {
                std::path::absolute(&*path).map_err(|e| {
                    invalid(
                        field,
                        format!("cannot make {} absolute: {e}", path.display()),
                    )
                })?
            } else {
                base_dir.join(&*path)
            };
        }
        Ok(())
    }

    /// Every rule, in field order; the first violation wins. Paths are absolute by now.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(invalid("node_id", "must be at least 1"));
        }
        check_dns_label("zone", &self.zone)?;
        check_trust_domain(&self.trust_domain)?;

        check_own_addr("listen.api", self.listen.api)?;
        check_own_addr("listen.raft", self.listen.raft)?;
        if let Some(advertised) = self.listen.raft_advertise {
            check_own_addr("listen.raft_advertise", advertised)?;
        }
        if self.listen.api == self.listen.raft {
            return Err(invalid(
                "listen.raft",
                format!("must differ from listen.api ({})", self.listen.api),
            ));
        }
        if self.listen.api.ip() != self.listen.raft.ip() {
            return Err(invalid(
                "listen.raft",
                format!(
                    "must be on the same IP as listen.api ({}): both listeners bind the node's own address",
                    self.listen.api.ip()
                ),
            ));
        }

        check_file("tls.ca", &self.tls.ca, false)?;
        check_file("tls.cert", &self.tls.cert, false)?;
        check_file("tls.key", &self.tls.key, true)?;
        check_file("keyring", &self.keyring, true)?;
        if best_effort_canonical(&self.keyring).starts_with(best_effort_canonical(&self.data_dir)) {
            return Err(invalid(
                "keyring",
                format!(
                    "{} is inside data_dir ({}); keep the key apart from the data it protects",
                    self.keyring.display(),
                    self.data_dir.display()
                ),
            ));
        }

        if let Some(policy) = &self.acl.policy_file {
            check_file("acl.policy_file", policy, false)?;
        }
        self.validate_jwt()?;
        if let Some(b) = &self.backup {
            if b.interval_seconds == 0 {
                return Err(invalid("backup.interval_seconds", "must be at least 1"));
            }
            if b.keep == 0 {
                return Err(invalid("backup.keep", "must be at least 1"));
            }
            if best_effort_canonical(&b.dir).starts_with(best_effort_canonical(&self.data_dir)) {
                return Err(invalid(
                    "backup.dir",
                    format!(
                        "{} is inside data_dir; a backup must survive losing the data directory",
                        b.dir.display()
                    ),
                ));
            }
        }
        if !self.chaos.bugs.is_empty() && !PLANTED_BUGS_BUILD {
            return Err(invalid(
                "chaos.bugs",
                "this build has no planted bugs: they exist only in test builds with the \
                 `chaos-bugs` cargo feature, for the fault harness",
            ));
        }
        self.validate_members()?;
        self.validate_tuning()?;

        if self.log.trim().is_empty() {
            return Err(invalid("log", "must not be empty (e.g. `info`)"));
        }
        Ok(())
    }

    fn validate_jwt(&self) -> Result<(), ConfigError> {
        let Some(jwt) = &self.jwt else {
            if self.tls.client_auth == ClientAuth::Optional {
                return Err(invalid(
                    "tls.client_auth",
                    "is `optional`, which needs [jwt]: callers without a certificate must present a token",
                ));
            }
            return Ok(());
        };
        check_file("jwt.jwks", &jwt.jwks, false)?;
        for (field, value) in [
            ("jwt.issuer", &jwt.issuer),
            ("jwt.audience", &jwt.audience),
            ("jwt.identity_claim", &jwt.identity_claim),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
        }
        if jwt.leeway_seconds > 300 {
            return Err(invalid(
                "jwt.leeway_seconds",
                format!(
                    "is {}, at most 300 (5 minutes) of clock skew is tolerated",
                    jwt.leeway_seconds
                ),
            ));
        }
        Ok(())
    }

    fn validate_members(&self) -> Result<(), ConfigError> {
        let n = self.members.len();
        if n == 0 || n > MAX_MEMBERS {
            return Err(invalid(
                "members",
                format!("has {n} members; a cluster starts with 1 to {MAX_MEMBERS}"),
            ));
        }
        let mut ids = BTreeSet::new();
        let mut addrs: BTreeMap<SocketAddr, String> = BTreeMap::new();
        for (i, m) in self.members.iter().enumerate() {
            let field = |name: &str| format!("members[{i}].{name}");
            if m.id == 0 {
                return Err(invalid(field("id"), "must be at least 1"));
            }
            if !ids.insert(m.id) {
                return Err(invalid(
                    field("id"),
                    format!("node id {} appears more than once", m.id),
                ));
            }
            check_own_addr(&field("api"), m.api)?;
            check_own_addr(&field("raft"), m.raft)?;
            if m.api.ip() != m.raft.ip() {
                return Err(invalid(
                    field("raft"),
                    format!(
                        "must be on the same IP as members[{i}].api ({})",
                        m.api.ip()
                    ),
                ));
            }
            for (name, addr) in [("api", m.api), ("raft", m.raft)] {
                if let Some(previous) = addrs.insert(addr, field(name)) {
                    return Err(invalid(field(name), format!("{addr} is also {previous}")));
                }
            }
            check_dns_label(&field("zone"), &m.zone)?;
        }
        let Some((i, me)) = self
            .members
            .iter()
            .enumerate()
            .find(|(_, m)| m.id == self.node_id)
        else {
            return Err(invalid(
                "members",
                format!("must include this node (node_id {})", self.node_id),
            ));
        };
        let raft_dialed = match self.listen.raft_advertise {
            Some(a) => (a, "advertises", "listen.raft_advertise"),
            None => (self.listen.raft, "listens on", "listen.raft"),
        };
        for (name, (addr, how, source), member) in [
            ("api", (self.listen.api, "listens on", "listen.api"), me.api),
            ("raft", raft_dialed, me.raft),
        ] {
            if addr != member {
                let node_id = self.node_id;
                let message = format!(
                    "is {member}, but this node (node_id {node_id}) {how} {addr} ({source}); \
                     peers dial the member address"
                );
                return Err(invalid(format!("members[{i}].{name}"), message));
            }
        }
        if me.zone != self.zone {
            return Err(invalid(
                format!("members[{i}].zone"),
                format!("is `{}`, but this node's zone is `{}`", me.zone, self.zone),
            ));
        }
        Ok(())
    }

    fn validate_tuning(&self) -> Result<(), ConfigError> {
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            return Err(invalid("raft.heartbeat_ms", "must be at least 1"));
        }
        if r.heartbeat_ms.saturating_mul(2) >= r.election_min_ms {
            return Err(invalid(
                "raft.election_min_ms",
                format!(
                    "is {}, must be more than twice raft.heartbeat_ms ({}) so a follower misses two heartbeats before it calls an election",
                    r.election_min_ms, r.heartbeat_ms
                ),
            ));
        }
        if r.election_min_ms >= r.election_max_ms {
            return Err(invalid(
                "raft.election_max_ms",
                format!(
                    "is {}, must be greater than raft.election_min_ms ({}) so election timeouts are randomized",
                    r.election_max_ms, r.election_min_ms
                ),
            ));
        }
        let at_least_one = [
            ("raft.snapshot_every", r.snapshot_every),
            ("limits.request_timeout_ms", self.limits.request_timeout_ms),
            ("limits.max_wait_seconds", self.limits.max_wait_seconds),
            ("leases.check_interval_ms", self.leases.check_interval_ms),
            ("leases.reap_after_seconds", self.leases.reap_after_seconds),
            ("tls.reload_interval_ms", self.tls.reload_interval_ms),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.limits.max_body_bytes == 0 {
            return Err(invalid("limits.max_body_bytes", "must be at least 1"));
        }
        Ok(())
    }
}

/// Where a value came from, when not from the file.
#[derive(Debug, Clone)]
enum Origin {
    Env(String),
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// One value from the environment or a flag, to be merged into the file's table.
#[derive(Debug)]
struct Setting {
    origin: Origin,
    /// Key path, e.g. `["raft", "heartbeat_ms"]`.
    key: Vec<String>,
    text: String,
    /// Taken as a string as is, rather than parsed as a TOML value.
    verbatim: bool,
    /// What the schema expects here, for the error when `text` does not parse.
    expected: &'static str,
}

/// The environment and flag layers, in the order they apply (later wins).
#[derive(Debug)]
struct Settings(Vec<Setting>);

impl Settings {
    fn collect(
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Settings, ConfigError> {
        let schema = schema();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(var, _)| var.starts_with(ENV_PREFIX) && !IGNORED_ENV.contains(&var.as_str()))
            .collect();
        // Sorted so the result does not depend on the environment's order, and a whole table
        // (`CAIRN_RAFT`) applies before the keys inside it (`CAIRN_RAFT__HEARTBEAT_MS`).
        env.sort();
        let mut settings = Vec::with_capacity(env.len() + 3);
        for (var, text) in env {
            let env_err = |message: String| ConfigError::Env {
                var: var.clone(),
                message,
            };
            let key: Vec<String> = var[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .split("__")
                .map(str::to_owned)
                .collect();
            if key.iter().any(String::is_empty) {
                return Err(env_err(
                    "empty key; use CAIRN_<KEY>, with __ between nested keys".to_owned(),
                ));
            }
            let (verbatim, expected) = match schema_entry(&schema, &key).map_err(env_err)? {
                toml::Value::String(_) => (true, "a string"),
                toml::Value::Integer(_) => (false, "an integer"),
                toml::Value::Float(_) => (false, "a number"),
                toml::Value::Boolean(_) => (false, "`true` or `false`"),
                toml::Value::Datetime(_) => (false, "a TOML datetime"),
                toml::Value::Array(_) => (false, "a TOML array"),
                toml::Value::Table(_) => (false, "a TOML inline table"),
            };
            settings.push(Setting {
                origin: Origin::Env(var),
                key,
                text,
                verbatim,
                expected,
            });
        }
        let flag = |flag, key: &str, text: String, verbatim| Setting {
            origin: Origin::Flag(flag),
            key: vec![key.to_owned()],
            text,
            verbatim,
            expected: if verbatim { "a string" } else { "an integer" },
        };
        if let Some(id) = overrides.node_id {
            settings.push(flag("--node-id", "node_id", id.to_string(), false));
        }
        if let Some(dir) = &overrides.data_dir {
            let text = dir
                .to_str()
                .ok_or_else(|| invalid("data_dir", "--data-dir is not valid UTF-8"))?;
            settings.push(flag("--data-dir", "data_dir", text.to_owned(), true));
        }
        if let Some(log) = &overrides.log {
            settings.push(flag("--log", "log", log.clone(), true));
        }
        Ok(Settings(settings))
    }

    /// Parses the file, merges the settings into it and deserializes the result.
    ///
    /// Spans tell the layers apart in errors: values from the file keep their spans; each
    /// setting's value gets a span of its own just past the end of the file, so an error
    /// reported at that span belongs to that setting.
    fn deserialize(&self, path: &Path, text: &str) -> Result<Config, ConfigError> {
        let parse_err = |e: &toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: describe(text, e),
        };
        let mut root = DeTable::parse(text)
            .map_err(|e| parse_err(&e))?
            .into_inner();
        for (i, setting) in self.0.iter().enumerate() {
            let span = setting_span(text, i);
            let value = if setting.verbatim {
                DeValue::String(Cow::Borrowed(setting.text.as_str()))
            } else {
                let parsed = DeValue::parse(setting.text.trim()).map_err(|e| {
                    let mut message = format!("`{}` is not {}", setting.text, setting.expected);
                    // For a scalar the parser's complaint ("string values must be quoted")
                    // only distracts; for an array or table it says where the syntax broke.
                    if setting.expected.starts_with("a TOML") {
                        message = format!("{message}: {}", e.message());
                    }
                    self.error(i, message)
                })?;
                parsed.into_inner()
            };
            self.insert(&mut root, i, span, value)?;
        }
        let root = Spanned::new(root_span(text), root);
        Config::deserialize(toml::de::Deserializer::from(root)).map_err(|e| match e.span() {
            Some(span) if span.start > text.len() => {
                match setting_index(text, &span).and_then(|i| self.0.get(i).map(|_| i)) {
                    Some(i) => self.error(i, e.message().to_owned()),
                    // The root table: e.g. a missing field, which has no position.
                    None => ConfigError::Parse {
                        path: path.to_owned(),
                        message: e.message().to_owned(),
                    },
                }
            }
            _ => parse_err(&e),
        })
    }

    fn insert<'i>(
        &'i self,
        root: &mut DeTable<'i>,
        i: usize,
        span: Range<usize>,
        value: DeValue<'i>,
    ) -> Result<(), ConfigError> {
        let setting = &self.0[i];
        let (last, parents) = setting
            .key
            .split_last()
            .expect("keys are non-empty (checked in collect)");
        let mut table = root;
        for (depth, segment) in parents.iter().enumerate() {
            let entry = table
                .entry(Spanned::new(span.clone(), Cow::Borrowed(segment.as_str())))
                .or_insert_with(|| Spanned::new(span.clone(), DeValue::Table(DeTable::new())));
            table = match entry.get_mut() {
                DeValue::Table(t) => t,
                _ => {
                    let name = setting.key[..=depth].join(".");
                    let child = &setting.key[depth + 1];
                    let message = format!(
                        "`{name}` is set to a non-table value elsewhere, \
                         so `{name}.{child}` cannot be set"
                    );
                    return Err(self.error(i, message));
                }
            };
        }
        table.insert(
            Spanned::new(span.clone(), Cow::Borrowed(last.as_str())),
            respan(value, &span),
        );
        Ok(())
    }

    fn error(&self, i: usize, message: String) -> ConfigError {
        let setting = &self.0[i];
        match &setting.origin {
            Origin::Env(var) => ConfigError::Env {
                var: var.clone(),
                message,
            },
            Origin::Flag(flag) => invalid(
                setting.key.join("."),
                format!("{message} (from flag {flag})"),
            ),
        }
    }

    /// The last setting that set `field` or a table containing it.
    fn origin_of(&self, field: &str) -> Option<&Origin> {
        self.0.iter().rev().find_map(|s| {
            let key = s.key.join(".");
            let covers = field == key
                || field
                    .strip_prefix(key.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['));
            covers.then_some(&s.origin)
        })
    }

    /// Says where an invalid value came from, when not from the file.
    fn annotate(&self, e: ConfigError) -> ConfigError {
        match e {
            ConfigError::Invalid { field, message } => match self.origin_of(&field) {
                Some(origin) => ConfigError::Invalid {
                    message: format!("{message} (from {origin})"),
                    field,
                },
                None => ConfigError::Invalid { field, message },
            },
            other => other,
        }
    }
}

/// The root table's span: past the end of the file, before the settings' spans.
fn root_span(text: &str) -> Range<usize> {
    text.len() + 1..text.len() + 1
}

fn setting_span(text: &str, i: usize) -> Range<usize> {
    let start = text.len() + 2 + 2 * i;
    start..start + 1
}

fn setting_index(text: &str, span: &Range<usize>) -> Option<usize> {
    span.start
        .checked_sub(text.len() + 2)
        .map(|offset| offset / 2)
}

/// Gives a setting's value, and everything inside it, the setting's span.
fn respan<'i>(value: DeValue<'i>, span: &Range<usize>) -> Spanned<DeValue<'i>> {
    let value = match value {
        DeValue::Array(items) => {
            let mut out = DeArray::new();
            for item in items {
                out.push(respan(item.into_inner(), span));
            }
            DeValue::Array(out)
        }
        DeValue::Table(table) => {
            let mut out = DeTable::new();
            for (k, v) in table {
                out.insert(
                    Spanned::new(span.clone(), k.into_inner()),
                    respan(v.into_inner(), span),
                );
            }
            DeValue::Table(out)
        }
        leaf => leaf,
    };
    Spanned::new(span.clone(), value)
}

/// A toml error on one line, with the file position when it points into the file.
fn describe(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) if span.start <= text.len() => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {}", e.message())
        }
        _ => e.message().to_owned(),
    }
}

/// Every key a config can have, taken from the types themselves: a sample config serialized.
fn schema() -> toml::Table {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let sample = Config {
        node_id: 1,
        zone: String::new(),
        data_dir: PathBuf::new(),
        trust_domain: String::new(),
        listen: Listen {
            api: addr,
            raft: addr,
            raft_advertise: Some(addr),
        },
        tls: TlsFiles {
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_auth: ClientAuth::default(),
            reload_interval_ms: DEFAULT_RELOAD_INTERVAL_MS,
        },
        keyring: PathBuf::new(),
        members: Vec::new(),
        raft: RaftTuning::default(),
        limits: Limits::default(),
        leases: LeaseTuning::default(),
        // Optional sections are filled in so that their keys are part of the schema.
        acl: Acl {
            policy_file: Some(PathBuf::new()),
        },
        jwt: Some(Jwt {
            jwks: PathBuf::new(),
            issuer: String::new(),
            audience: String::new(),
            identity_claim: default_identity_claim(),
            leeway_seconds: DEFAULT_LEEWAY_SECONDS,
        }),
        backup: Some(BackupSchedule {
            dir: PathBuf::new(),
            interval_seconds: DEFAULT_BACKUP_INTERVAL_SECONDS,
            keep: DEFAULT_BACKUP_KEEP,
        }),
        chaos: Chaos::default(),
        log: default_log(),
    };
    match toml::Value::try_from(&sample) {
        Ok(toml::Value::Table(table)) => table,
        other => unreachable!("Config serializes to a TOML table, got {other:?}"),
    }
}

fn schema_entry<'s>(schema: &'s toml::Table, key: &[String]) -> Result<&'s toml::Value, String> {
    let mut table = schema;
    for (depth, segment) in key.iter().enumerate() {
        let name = key[..=depth].join(".");
        let value = table.get(segment).ok_or_else(|| {
            format!("no config key `{name}` (use CAIRN_<KEY>, with __ between nested keys)")
        })?;
        match key.get(depth + 1) {
            None => return Ok(value),
            Some(next) => {
                table = value
                    .as_table()
                    .ok_or_else(|| format!("`{name}` has no key `{next}`: it is not a table"))?;
            }
        }
    }
    unreachable!("keys are non-empty (checked in collect)")
}

fn check_dns_label(field: &str, value: &str) -> Result<(), ConfigError> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if value.is_empty()
        || value.len() > 63
        || !ok_chars
        || value.starts_with('-')
        || value.ends_with('-')
    {
        return Err(invalid(
            field,
            format!("`{value}` is not a DNS label (1-63 characters of a-z, 0-9 and '-', not starting or ending with '-')"),
        ));
    }
    Ok(())
}

fn check_trust_domain(value: &str) -> Result<(), ConfigError> {
    let field = "trust_domain";
    if value.contains("://") || value.starts_with("spiffe:") {
        return Err(invalid(
            field,
            format!("`{value}` has a scheme; give the bare domain, e.g. `cairn.local`"),
        ));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    if value.is_empty() || value.len() > 255 || !value.split('.').all(label_ok) {
        return Err(invalid(
            field,
            format!("`{value}` is not a trust domain (dot-separated labels of a-z, 0-9, '-' and '_', e.g. `cairn.local`)"),
        ));
    }
    Ok(())
}

/// An address peers dial and the node binds: a concrete IP and a fixed port.
fn check_own_addr(field: &str, addr: SocketAddr) -> Result<(), ConfigError> {
    if addr.ip().is_unspecified() {
        return Err(invalid(
            field,
            format!("{addr} is a wildcard; give the node's own address, which peers dial"),
        ));
    }
    if addr.port() == 0 {
        return Err(invalid(
            field,
            format!("{addr} has port 0; peers need a fixed port"),
        ));
    }
    Ok(())
}

/// The file must exist and be a regular file; a secret must also be closed to group/others.
fn check_file(field: &str, path: &Path, secret: bool) -> Result<(), ConfigError> {
    let meta = fs::metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            invalid(field, format!("{} does not exist", path.display()))
        } else {
            invalid(field, format!("cannot read {}: {e}", path.display()))
        }
    })?;
    if !meta.is_file() {
        return Err(invalid(
            field,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if secret && mode & 0o077 != 0 {
        return Err(invalid(
            field,
            format!(
                "{} has mode {mode:04o}, which gives group or others access to a secret; run `chmod 600 {}`",
                path.display(),
                path.display()
            ),
        ));
    }
    Ok(())
}

/// `path` with symlinks resolved as far as it exists, and `.`/`..` resolved lexically beyond.
fn best_effort_canonical(path: &Path) -> PathBuf {
    for ancestor in path.ancestors() {
        let Ok(mut out) = ancestor.canonicalize() else {
            continue;
        };
        let rest = path.strip_prefix(ancestor).unwrap_or(Path::new(""));
        for component in rest.components() {
            match component {
                Component::ParentDir => {
                    out.pop();
                }
                Component::Normal(part) => out.push(part),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        return out;
    }
    path.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with certificate, key and keyring files, and a valid config for node 1 of
    /// three that refers to them with relative paths.
    struct Fixture {
        dir: tempfile::TempDir,
        config: toml::Table,
    }

    const EXAMPLE: &str = r#"
node_id = 1
zone = "zone-a"
data_dir = "data"
trust_domain = "cairn.local"
keyring = "secrets/keyring.json"

[listen]
api = "127.0.0.1:7401"
raft = "127.0.0.1:7501"

[tls]
ca = "tls/ca.pem"
cert = "tls/node-1.pem"
key = "secrets/node-1.key"

[[members]]
id = 1
api = "127.0.0.1:7401"
raft = "127.0.0.1:7501"
zone = "zone-a"

[[members]]
id = 2
api = "127.0.0.2:7401"
raft = "127.0.0.2:7501"
zone = "zone-b"

[[members]]
id = 3
api = "127.0.0.3:7401"
raft = "127.0.0.3:7501"
zone = "zone-c"

[raft]
heartbeat_ms = 120
"#;

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            for (file, mode) in [
                ("tls/ca.pem", 0o644),
                ("tls/node-1.pem", 0o644),
                ("secrets/node-1.key", 0o600),
                ("secrets/keyring.json", 0o600),
            ] {
                let path = dir.path().join(file);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(&path, "x").unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            }
            Fixture {
                dir,
                config: toml::from_str(EXAMPLE).unwrap(),
            }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn load_with(
            &self,
            overrides: &Overrides,
            env: &[(&str, &str)],
        ) -> Result<Config, ConfigError> {
            let path = self.path("node-1.toml");
            fs::write(&path, toml::to_string(&self.config).unwrap()).unwrap();
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            Config::load_with_env(&path, overrides, env)
        }

        fn load(&self) -> Result<Config, ConfigError> {
            self.load_with(&Overrides::default(), &[])
        }
    }

    fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
        let (parents, last) = key
            .rsplit_once('.')
            .map_or((None, key), |(p, l)| (Some(p), l));
        let mut t = table;
        for segment in parents.into_iter().flat_map(|p| p.split('.')) {
            t = match segment.split_once('[') {
                Some((name, index)) => {
                    let index: usize = index.trim_end_matches(']').parse().unwrap();
                    t[name].as_array_mut().unwrap()[index]
                        .as_table_mut()
                        .unwrap()
                }
                None => t
                    .entry(segment)
                    .or_insert_with(|| toml::Table::new().into())
                    .as_table_mut()
                    .unwrap(),
            };
        }
        t.insert(last.to_owned(), value);
    }

    fn field_of(e: &ConfigError) -> &str {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn full_example_parses_with_defaults_and_resolved_paths() {
        let f = Fixture::new();
        let c = f.load().unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.zone, "zone-a");
        assert_eq!(c.trust_domain, "cairn.local");
        assert_eq!(c.listen.api, "127.0.0.1:7401".parse().unwrap());
        assert_eq!(c.listen.raft, "127.0.0.1:7501".parse().unwrap());
        assert_eq!(c.members.len(), 3);
        assert_eq!(c.member(2).unwrap().zone, "zone-b");
        assert!(c.member(4).is_none());
        assert_eq!(c.raft.heartbeat_ms, 120);
        assert_eq!(c.raft.election_min_ms, DEFAULT_ELECTION_MIN_MS);
        assert_eq!(c.raft.snapshot_every, DEFAULT_SNAPSHOT_EVERY);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.limits.max_body_bytes, 65_536);
        assert_eq!(c.leases, LeaseTuning::default());
        assert_eq!(c.log, "info");
        // Relative paths in the file are relative to the file's directory.
        assert_eq!(c.data_dir, f.path("data"));
        assert_eq!(c.tls.ca, f.path("tls/ca.pem"));
        assert_eq!(c.tls.cert, f.path("tls/node-1.pem"));
        assert_eq!(c.tls.key, f.path("secrets/node-1.key"));
        assert_eq!(c.keyring, f.path("secrets/keyring.json"));
    }

    #[test]
    fn each_rule_names_its_field() {
        use toml::Value as V;
        let s = |v: &str| V::String(v.to_owned());
        let cases: Vec<(&str, &str, V, &str)> = vec![
            ("node id zero", "node_id", V::Integer(0), "node_id"),
            ("zone not a label", "zone", s("Zone_A"), "zone"),
            ("zone empty", "zone", s(""), "zone"),
            ("zone leading hyphen", "zone", s("-a"), "zone"),
            (
                "trust domain with scheme",
                "trust_domain",
                s("spiffe://cairn.local"),
                "trust_domain",
            ),
            (
                "trust domain with port",
                "trust_domain",
                s("cairn.local:8443"),
                "trust_domain",
            ),
            (
                "trust domain empty label",
                "trust_domain",
                s("cairn..local"),
                "trust_domain",
            ),
            ("data dir empty", "data_dir", s(""), "data_dir"),
            (
                "listen wildcard",
                "listen.api",
                s("0.0.0.0:7401"),
                "listen.api",
            ),
            (
                "listen port 0",
                "listen.raft",
                s("127.0.0.1:0"),
                "listen.raft",
            ),
            (
                "listeners equal",
                "listen.raft",
                s("127.0.0.1:7401"),
                "listen.raft",
            ),
            (
                "listeners on two IPs",
                "listen.raft",
                s("127.0.0.9:7501"),
                "listen.raft",
            ),
            ("ca missing", "tls.ca", s("tls/missing.pem"), "tls.ca"),
            ("cert missing", "tls.cert", s("tls/missing.pem"), "tls.cert"),
            ("cert is a directory", "tls.cert", s("tls"), "tls.cert"),
            (
                "key missing",
                "tls.key",
                s("secrets/missing.key"),
                "tls.key",
            ),
            (
                "keyring missing",
                "keyring",
                s("secrets/missing.json"),
                "keyring",
            ),
            (
                "keyring inside data dir",
                "data_dir",
                s("secrets"),
                "keyring",
            ),
            (
                "keyring inside data dir via ..",
                "data_dir",
                s("tls/../secrets/../secrets"),
                "keyring",
            ),
            (
                "keyring inside data dir, dir not yet created",
                "data_dir",
                s("secrets/sub/.."),
                "keyring",
            ),
            ("no members", "members", V::Array(vec![]), "members"),
            (
                "member id zero",
                "members[1].id",
                V::Integer(0),
                "members[1].id",
            ),
            (
                "member id repeated",
                "members[2].id",
                V::Integer(2),
                "members[2].id",
            ),
            (
                "member raft equals another's api",
                "members[2].raft",
                s("127.0.0.3:7401"),
                "members[2].raft",
            ),
            (
                "member on two IPs",
                "members[1].raft",
                s("127.0.0.9:7501"),
                "members[1].raft",
            ),
            (
                "member wildcard",
                "members[1].api",
                s("[::]:7401"),
                "members[1].api",
            ),
            (
                "member zone bad",
                "members[2].zone",
                s("zone c"),
                "members[2].zone",
            ),
            ("this node missing", "node_id", V::Integer(9), "members"),
            (
                "this node's api differs",
                "members[0].api",
                s("127.0.0.1:7402"),
                "members[0].api",
            ),
            (
                "this node's raft differs",
                "members[0].raft",
                s("127.0.0.1:7502"),
                "members[0].raft",
            ),
            (
                "this node's zone differs",
                "members[0].zone",
                s("zone-b"),
                "members[0].zone",
            ),
            (
                "heartbeat zero",
                "raft.heartbeat_ms",
                V::Integer(0),
                "raft.heartbeat_ms",
            ),
            (
                "election min too small",
                "raft.heartbeat_ms",
                V::Integer(500),
                "raft.election_min_ms",
            ),
            (
                "election range empty",
                "raft.election_max_ms",
                V::Integer(DEFAULT_ELECTION_MIN_MS as i64),
                "raft.election_max_ms",
            ),
            (
                "snapshot every zero",
                "raft.snapshot_every",
                V::Integer(0),
                "raft.snapshot_every",
            ),
            (
                "body limit zero",
                "limits.max_body_bytes",
                V::Integer(0),
                "limits.max_body_bytes",
            ),
            (
                "timeout zero",
                "limits.request_timeout_ms",
                V::Integer(0),
                "limits.request_timeout_ms",
            ),
            (
                "max wait zero",
                "limits.max_wait_seconds",
                V::Integer(0),
                "limits.max_wait_seconds",
            ),
            (
                "lease check zero",
                "leases.check_interval_ms",
                V::Integer(0),
                "leases.check_interval_ms",
            ),
            (
                "reap zero",
                "leases.reap_after_seconds",
                V::Integer(0),
                "leases.reap_after_seconds",
            ),
            ("log empty", "log", s(" "), "log"),
        ];
        for (name, key, value, expected) in cases {
            let mut f = Fixture::new();
            set(&mut f.config, key, value);
            let err = f.load().expect_err(name);
            assert_eq!(field_of(&err), expected, "{name}: {err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid config field `{expected}`: ")),
                "{name}: {err}"
            );
        }

        // A member reusing an earlier member's address (the whole member replaced, so its
        // own two addresses still share an IP).
        let mut f = Fixture::new();
        let clash: toml::Table = toml::from_str(
            "id = 3\napi = \"127.0.0.2:7401\"\nraft = \"127.0.0.2:7502\"\nzone = \"zone-c\"",
        )
        .unwrap();
        f.config["members"].as_array_mut().unwrap()[2] = clash.into();
        let err = f.load().unwrap_err();
        assert_eq!(field_of(&err), "members[2].api", "{err}");
        assert!(err.to_string().contains("is also members[1].api"), "{err}");

        let mut f = Fixture::new();
        let member = f.config["members"].as_array().unwrap()[2].clone();
        let members = f.config["members"].as_array_mut().unwrap();
        for (i, port) in (3..8).enumerate() {
            let mut m = member.as_table().unwrap().clone();
            m.insert("id".into(), V::Integer(4 + i as i64));
            m.insert("api".into(), s(&format!("127.0.0.{port}:7400")));
            members.push(m.into());
        }
        let err = f.load().unwrap_err();
        assert_eq!(field_of(&err), "members", "{err}");
        assert!(err.to_string().contains("8 members"), "{err}");
    }

    #[test]
    fn an_advertised_raft_address_is_what_this_node_s_member_entry_names() {
        let mut f = Fixture::new();
        let proxy = toml::Value::String("127.0.0.1:7601".into());
        set(&mut f.config, "listen.raft_advertise", proxy.clone());
        let e = f.load().unwrap_err();
        assert_eq!(field_of(&e), "members[0].raft");
        assert!(e.to_string().contains("advertises 127.0.0.1:7601"), "{e}");
        set(&mut f.config, "members[0].raft", proxy);
        let c = f.load().unwrap();
        assert_eq!(c.listen.raft, "127.0.0.1:7501".parse().unwrap());
        assert_eq!(
            c.listen.raft_advertise,
            Some("127.0.0.1:7601".parse().unwrap())
        );
        let wildcard = toml::Value::String("0.0.0.0:7601".into());
        set(&mut f.config, "listen.raft_advertise", wildcard);
        assert_eq!(field_of(&f.load().unwrap_err()), "listen.raft_advertise");
    }

    #[test]
    fn planted_bugs_are_refused_unless_built_for_them() {
        let mut f = Fixture::new();
        let bugs = toml::Value::Array(vec![toml::Value::String("stale-reads".into())]);
        set(&mut f.config, "chaos.bugs", bugs);
        let loaded = f.load();
        if PLANTED_BUGS_BUILD {
            assert_eq!(loaded.unwrap().chaos.bugs, vec![PlantedBug::StaleReads]);
        } else {
            let e = loaded.unwrap_err();
            assert_eq!(field_of(&e), "chaos.bugs");
            assert!(e.to_string().contains("chaos-bugs"), "{e}");
        }
        set(&mut f.config, "chaos.bugs", toml::Value::Array(Vec::new()));
        assert!(f.load().unwrap().chaos.bugs.is_empty());
        let unknown = toml::Value::Array(vec![toml::Value::String("lose-data".into())]);
        set(&mut f.config, "chaos.bugs", unknown);
        assert!(f.load().unwrap_err().to_string().contains("lose-data"));
    }

    #[test]
    fn insecure_secrets_are_refused() {
        for (file, field) in [
            ("secrets/node-1.key", "tls.key"),
            ("secrets/keyring.json", "keyring"),
        ] {
            for mode in [0o640, 0o604, 0o660] {
                let f = Fixture::new();
                fs::set_permissions(f.path(file), fs::Permissions::from_mode(mode)).unwrap();
                let err = f.load().unwrap_err();
                assert_eq!(field_of(&err), field, "{err}");
                let message = err.to_string();
                assert!(
                    message.contains(&f.path(file).display().to_string()),
                    "{message}"
                );
                assert!(message.contains(&format!("{mode:04o}")), "{message}");
            }
        }
        // Owner-only read is fine; public certificates may be world-readable.
        let f = Fixture::new();
        fs::set_permissions(
            f.path("secrets/node-1.key"),
            fs::Permissions::from_mode(0o400),
        )
        .unwrap();
        f.load().unwrap();
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let f = Fixture::new();
        let env = [
            ("CAIRN_LOG", "debug"),                   // plain
            ("CAIRN_RAFT__HEARTBEAT_MS", "100"),      // nested, numeric
            ("CAIRN_LIMITS__MAX_WAIT_SECONDS", "60"), // nested table absent from the file
            ("CAIRN_DATA_DIR", "/var/lib/cairn-env"),
            ("CAIRN_CONFIG", "/ignored.toml"),
            ("CAIRN_ENDPOINTS", "127.0.0.11:7400"),
            ("CAIRN_KEY", "/client/admin-key.pem"),
            ("PATH", "/usr/bin"),
            ("cairn_lowercase", "ignored"),
        ];
        let c = f.load_with(&Overrides::default(), &env).unwrap();
        assert_eq!(c.log, "debug");
        assert_eq!(c.raft.heartbeat_ms, 100);
        assert_eq!(c.raft.election_min_ms, DEFAULT_ELECTION_MIN_MS);
        assert_eq!(c.limits.max_wait_seconds, 60);
        assert_eq!(c.limits.request_timeout_ms, DEFAULT_REQUEST_TIMEOUT_MS);
        assert_eq!(c.data_dir, Path::new("/var/lib/cairn-env"));

        let flags = Overrides {
            data_dir: Some("/var/lib/cairn-flag".into()),
            log: Some("warn".into()),
            node_id: None,
        };
        let c = f.load_with(&flags, &env).unwrap();
        assert_eq!(c.log, "warn");
        assert_eq!(c.data_dir, Path::new("/var/lib/cairn-flag"));
        assert_eq!(c.raft.heartbeat_ms, 100);
    }

    #[test]
    fn node_id_from_env_then_flag() {
        let f = Fixture::new();
        // The environment turns this file into node 2's config.
        let env = [
            ("CAIRN_NODE_ID", "2"),
            ("CAIRN_ZONE", "zone-b"),
            ("CAIRN_LISTEN__API", "127.0.0.2:7401"),
            ("CAIRN_LISTEN__RAFT", "127.0.0.2:7501"),
        ];
        let c = f.load_with(&Overrides::default(), &env).unwrap();
        assert_eq!((c.node_id, c.zone.as_str()), (2, "zone-b"));
        assert_eq!(c.listen.api, "127.0.0.2:7401".parse().unwrap());

        // The flag beats the environment.
        let flag = Overrides {
            node_id: Some(1),
            ..Overrides::default()
        };
        let c = f.load_with(&flag, &[("CAIRN_NODE_ID", "3")]).unwrap();
        assert_eq!(c.node_id, 1);

        // A shared file may leave node_id to the flag.
        let mut f = Fixture::new();
        f.config.remove("node_id");
        assert!(matches!(f.load(), Err(ConfigError::Parse { .. })));
        assert_eq!(f.load_with(&flag, &[]).unwrap().node_id, 1);
    }

    #[test]
    fn env_errors_name_the_variable() {
        let f = Fixture::new();
        let cases = [
            (("CAIRN_BOGUS", "1"), "no config key `bogus`"),
            (("CAIRN_RAFT__BOGUS", "1"), "no config key `raft.bogus`"),
            (("CAIRN_LOG__LEVEL", "1"), "`log` has no key `level`"),
            (("CAIRN_RAFT__", "1"), "empty key"),
            (("CAIRN_NODE_ID", "three"), "`three` is not an integer"),
            (("CAIRN_MEMBERS", "[{ id = 1 "), "is not a TOML array: "),
            (("CAIRN_NODE_ID", "-3"), "u64"),
            (("CAIRN_LISTEN__API", "localhost"), "socket address"),
            (
                ("CAIRN_RAFT", "{ heartbeat_ms = 100, bogus = 1 }"),
                "unknown field `bogus`",
            ),
        ];
        for ((var, value), expected) in cases {
            let err = f
                .load_with(&Overrides::default(), &[(var, value)])
                .unwrap_err();
            match &err {
                ConfigError::Env {
                    var: named,
                    message,
                } => {
                    assert_eq!(named, var, "{err}");
                    assert!(message.contains(expected), "{var}={value}: {err}");
                }
                other => panic!("{var}={value}: expected an env error, got {other:?}"),
            }
        }
        // A whole table from the environment works too.
        let c = f
            .load_with(
                &Overrides::default(),
                &[("CAIRN_RAFT", "{ heartbeat_ms = 100 }")],
            )
            .unwrap();
        assert_eq!(c.raft.heartbeat_ms, 100);
        assert_eq!(c.raft.election_max_ms, DEFAULT_ELECTION_MAX_MS);
    }

    #[test]
    fn invalid_values_from_env_or_flags_say_so() {
        let f = Fixture::new();
        let err = f
            .load_with(&Overrides::default(), &[("CAIRN_NODE_ID", "0")])
            .unwrap_err();
        assert_eq!(field_of(&err), "node_id");
        assert!(
            err.to_string()
                .contains("environment variable CAIRN_NODE_ID"),
            "{err}"
        );
        let flags = Overrides {
            log: Some(String::new()),
            ..Overrides::default()
        };
        let err = f.load_with(&flags, &[]).unwrap_err();
        assert_eq!(field_of(&err), "log");
        assert!(err.to_string().contains("flag --log"), "{err}");
    }

    #[test]
    fn relative_paths_from_env_are_relative_to_the_working_directory() {
        let f = Fixture::new();
        let c = f
            .load_with(&Overrides::default(), &[("CAIRN_DATA_DIR", "rel-data")])
            .unwrap();
        assert_eq!(
            c.data_dir,
            std::env::current_dir().unwrap().join("rel-data")
        );
    }

    #[test]
    fn unknown_field_in_file_is_a_parse_error_with_position() {
        let mut f = Fixture::new();
        set(&mut f.config, "raft.heartbeat", toml::Value::Integer(1));
        let err = f.load().unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        assert!(message.contains("unknown field `heartbeat`"), "{message}");
        assert!(message.contains("line "), "{message}");

        let mut f = Fixture::new();
        set(&mut f.config, "colour", toml::Value::Integer(1));
        assert!(f
            .load()
            .unwrap_err()
            .to_string()
            .contains("unknown field `colour`"));
    }

    #[test]
    fn syntax_and_type_errors_give_line_and_column() {
        let f = Fixture::new();
        let path = f.path("bad.toml");
        let load = |text: &str| {
            fs::write(&path, text).unwrap();
            Config::load_with_env(&path, &Overrides::default(), Vec::new())
                .unwrap_err()
                .to_string()
        };
        let message = load("node_id = 1\nzone = \"zone-a\n");
        assert!(message.contains("line 2"), "{message}");
        let message = load(&EXAMPLE.replace("heartbeat_ms = 120", "heartbeat_ms = \"fast\""));
        assert!(message.contains("line 36"), "{message}");
        assert!(message.contains("invalid type"), "{message}");
        let message =
            load(&EXAMPLE.replace("api = \"127.0.0.1:7401\"\nraft", "api = \"nowhere\"\nraft"));
        assert!(message.contains("line 9, column 7"), "{message}");
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = Config::load_with_env(
            Path::new("/nonexistent/cairn.toml"),
            &Overrides::default(),
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/cairn.toml"), "{err}");
    }
}
