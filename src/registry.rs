//! registry: the domain — services, instances, commands and the pure, deterministic state machine; knows nothing of Raft, storage, tokio, I/O, clocks or randomness.
//!
//! # Contract
//!
//! [`Registry::apply`] is a pure function of `(state, log index, command)`. Every replica
//! that applies the same log holds a registry that serializes to the same bytes, so:
//!
//! - time enters only as `now_ms` inside a [`Command`], stamped by the leader that proposed
//!   it; nothing here reads a clock, draws a random number or performs I/O;
//! - every collection is a `BTreeMap`/`BTreeSet` or a `Vec` in command order, never a
//!   `HashMap`, so iteration order and serialized bytes do not depend on a hash seed;
//! - the Raft log index of the entry becomes the `create_index`/`modify_index` of what it
//!   touches and the state's [`Registry::index`]; commands that change nothing (a failed
//!   precondition, an invalid command, a stale lease reference) leave every index where it
//!   was, so blocking queries only wake for real changes;
//! - `apply` re-validates what it is given: the API validates first, but a command that
//!   reaches the log through any other path must still not corrupt the state.
//!
//! Leases are not replicated per renewal (DESIGN decision 4): the leader keeps deadlines in
//! memory and proposes [`Command::ExpireLeases`], [`Command::Revive`] and [`Command::Reap`]
//! with the `modify_index` it observed, so a registration that lands in between always wins.
//!
//! The serde form of [`Registry`] is the snapshot payload; the storage layer wraps it in a
//! versioned, sealed envelope. Serde attributes that skip fields (`skip_serializing_if`) are
//! deliberately absent: they break non-self-describing encodings such as bincode.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use imbl::OrdMap;

use serde::{Deserialize, Serialize};

/// Most tags one instance may carry. With [`MAX_TAG_LEN`] this bounds tags at ~32 KiB
/// (64 × 128 chars × 4 bytes), which keeps one log entry well under the request body limit.
pub const MAX_TAGS: usize = 64;
/// Most metadata entries one instance may carry. With [`MAX_META_KEY_LEN`] and
/// [`MAX_META_VALUE_LEN`] this bounds metadata at 40 KiB.
pub const MAX_META: usize = 64;
/// Longest tag, in characters.
pub const MAX_TAG_LEN: usize = 128;
/// Longest metadata key, in characters (keys are ASCII, so also bytes).
pub const MAX_META_KEY_LEN: usize = 128;
/// Longest metadata value, in bytes of UTF-8.
pub const MAX_META_VALUE_LEN: usize = 512;
/// Longest service name (and zone): one DNS label.
pub const MAX_SERVICE_NAME_LEN: usize = 63;
/// Longest instance id.
pub const MAX_INSTANCE_ID_LEN: usize = 128;
/// Longest address: the longest DNS name.
pub const MAX_ADDRESS_LEN: usize = 253;
/// Longest lease: one day. Longer leases hide dead instances for too long to be useful.
pub const MAX_TTL_SECONDS: u32 = 86_400;

/// A refused input, naming the field (`service`, `id`, `address`, `tags[3]`, `meta.<key>`, …)
/// so the API can return it in an `invalid-request` problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The offending field, in the request body's terms.
    pub field: String,
    /// What is wrong with it; never echoes secrets, only the caller's own input.
    pub message: String,
}

impl ValidationError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// True for one DNS label as this registry accepts it: 1–63 chars of `a-z0-9-`, not
/// starting or ending with `-`. Lowercase only, so names compare byte-for-byte.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SERVICE_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// True for `[A-Za-z0-9._-]+`, the alphabet of instance ids and metadata keys.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Validates a service name: a DNS label, 1–63 chars of `a-z0-9-`, not starting or ending
/// with `-` (it doubles as a DNS name under the registry's DNS zone). Field `service`.
pub fn validate_service_name(name: &str) -> Result<(), ValidationError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(ValidationError::new(
            "service",
            "must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
        ))
    }
}

/// Validates an instance id: 1–128 chars of `A-Za-z0-9._-`. Field `id`.
pub fn validate_instance_id(id: &str) -> Result<(), ValidationError> {
    if id.len() <= MAX_INSTANCE_ID_LEN && is_token(id) {
        Ok(())
    } else {
        Err(ValidationError::new(
            "id",
            "must be 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
        ))
    }
}

/// Validates an address: an IPv4/IPv6 literal, or a DNS hostname (RFC 1123 labels of
/// `A-Za-z0-9-`, 1–63 chars each, 1–253 chars in all). Field `address`.
fn validate_address(address: &str) -> Result<(), ValidationError> {
    let bad = |message: &str| Err(ValidationError::new("address", message));
    if address.is_empty() || address.len() > MAX_ADDRESS_LEN {
        return bad("must be 1-253 characters");
    }
    if address.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !address.split('.').all(label_ok) {
        return bad("must be an IP address or a DNS hostname");
    }
    // An all-numeric last label ("10.0.0.256", "1.2.3") is a mistyped IP, not a hostname:
    // resolvers would treat it as a number, so refuse it rather than register garbage.
    let last = address.rsplit('.').next().unwrap_or(address);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return bad("must be an IP address or a DNS hostname");
    }
    Ok(())
}

/// Body of `PUT /v1/services/{service}/instances/{id}`: what a client asks to register.
///
/// Unknown fields are refused so a typo (`ttl: 30`) fails loudly instead of silently
/// registering an instance without a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// IP literal or DNS hostname clients connect to.
    pub address: String,
    /// TCP/UDP port, 1–65535.
    pub port: u16,
    /// Free-form labels used by the `tag` filter, in the client's order; no duplicates.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form key/value metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// The zone the instance runs in (a DNS label), used by the `zone` and `near` filters.
    #[serde(default)]
    pub zone: Option<String>,
    /// Lease length; `None` means the instance lives until deregistered.
    #[serde(default)]
    pub ttl_seconds: Option<u32>,
}

impl InstanceSpec {
    /// Checks every field against the documented limits; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_address(&self.address)?;
        if self.port == 0 {
            return Err(ValidationError::new("port", "must be 1-65535"));
        }
        self.validate_tags()?;
        self.validate_meta()?;
        if let Some(zone) = &self.zone {
            if !is_dns_label(zone) {
                return Err(ValidationError::new(
                    "zone",
                    "must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
                ));
            }
        }
        if let Some(ttl) = self.ttl_seconds {
            if ttl == 0 || ttl > MAX_TTL_SECONDS {
                return Err(ValidationError::new("ttl_seconds", "must be 1-86400"));
            }
        }
        Ok(())
    }

    fn validate_tags(&self) -> Result<(), ValidationError> {
        if self.tags.len() > MAX_TAGS {
            return Err(ValidationError::new(
                "tags",
                format!("at most {MAX_TAGS} tags"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, tag) in self.tags.iter().enumerate() {
            let field = || format!("tags[{i}]");
            let len = tag.chars().count();
            if len == 0 || len > MAX_TAG_LEN {
                return Err(ValidationError::new(field(), "must be 1-128 characters"));
            }
            // Control characters would corrupt logs, DNS TXT answers and terminal output.
            if tag.chars().any(char::is_control) {
                return Err(ValidationError::new(
                    field(),
                    "must not contain control characters",
                ));
            }
            if !seen.insert(tag.as_str()) {
                return Err(ValidationError::new(field(), "duplicate tag"));
            }
        }
        Ok(())
    }

    fn validate_meta(&self) -> Result<(), ValidationError> {
        if self.meta.len() > MAX_META {
            return Err(ValidationError::new(
                "meta",
                format!("at most {MAX_META} entries"),
            ));
        }
        for (key, value) in &self.meta {
            if key.len() > MAX_META_KEY_LEN || !is_token(key) {
                // The key is not a safe field name, so name the map and show a short,
                // escaped prefix of the key rather than echoing arbitrary bytes.
                let shown: String = key.chars().take(32).collect();
                return Err(ValidationError::new(
                    "meta",
                    format!(
                        "key {shown:?} must be 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
                    ),
                ));
            }
            if value.len() > MAX_META_VALUE_LEN {
                return Err(ValidationError::new(
                    format!("meta.{key}"),
                    "must be at most 512 bytes",
                ));
            }
        }
        Ok(())
    }
}

/// Health of an instance as the registry knows it. There are no active checks: an instance
/// is `Passing` while its lease (if any) is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Registered and, if leased, renewed in time.
    Passing,
    /// Its lease expired; it stays listed (filterable) until reaped or renewed.
    Critical,
}

/// A registered instance of a service, as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Service name (a DNS label).
    pub service: String,
    /// Instance id, unique within the service.
    pub id: String,
    /// IP literal or DNS hostname.
    pub address: String,
    /// Port, 1–65535.
    pub port: u16,
    /// Tags in the order registered.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Zone, if declared.
    pub zone: Option<String>,
    /// Lease length, if leased.
    pub ttl_seconds: Option<u32>,
    /// Passing, or Critical once its lease expired.
    pub health: Health,
    /// Log index of the registration that created it; kept across updates.
    pub create_index: u64,
    /// Log index of the last change to it; the value `If-Match` compares against.
    pub modify_index: u64,
    /// Identity (SPIFFE ID) that created it; kept across updates, used for ownership checks.
    pub registered_by: String,
    /// Leader time of creation, unix milliseconds.
    pub created_at_ms: u64,
    /// Leader time of the last change, unix milliseconds.
    pub updated_at_ms: u64,
}

/// A condition on the current instance that a write requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precondition {
    /// Unconditional.
    None,
    /// `If-Match: n`: the instance must exist with `modify_index == n`.
    IfMatch(u64),
    /// `If-None-Match: *`: the instance must not exist.
    IfAbsent,
}

/// An instance as the leader's lease keeper saw it; a lease command only acts on the
/// instance if it has not changed since (`modify_index` still equal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRef {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// The `modify_index` the leader observed.
    pub modify_index: u64,
}

/// One replicated command. Proposed by the leader, which stamps `now_ms` (unix millis).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Register or update an instance (upsert), under a precondition.
    Register {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// What to register.
        spec: InstanceSpec,
        /// Identity of the caller (`service/web`); becomes `registered_by` on creation, and
        /// must equal it on an update unless the caller may override ownership.
        owner: String,
        /// `If-Match` / `If-None-Match`.
        precondition: Precondition,
        /// Leader time.
        now_ms: u64,
    },
    /// Remove an instance, under a precondition.
    Deregister {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// `If-Match` / `If-None-Match`.
        precondition: Precondition,
        /// Leader time.
        now_ms: u64,
        /// Identity of the caller; must equal the instance's `registered_by` unless the
        /// caller may override ownership.
        by: String,
    },
    /// Leader-detected lease expiry: marks each listed instance Critical, only if its
    /// modify_index still equals the one given (a re-registration in between wins).
    ExpireLeases {
        /// The instances whose lease deadline passed.
        leases: Vec<LeaseRef>,
        /// Leader time.
        now_ms: u64,
    },
    /// A heartbeat for a Critical instance brings it back to Passing (again guarded by
    /// modify_index).
    Revive {
        /// The instance that was renewed.
        lease: LeaseRef,
        /// Leader time.
        now_ms: u64,
    },
    /// Remove the listed instances, which the leader found Critical for longer than its
    /// reap interval (guarded by modify_index; a Passing instance is never reaped).
    Reap {
        /// The instances to remove.
        leases: Vec<LeaseRef>,
        /// Leader time.
        now_ms: u64,
    },
}

impl fmt::Display for Command {
    /// A short form for logs: the kind and the names, never tags, metadata or addresses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Register { service, id, .. } => write!(f, "register {service}/{id}"),
            Command::Deregister { service, id, .. } => write!(f, "deregister {service}/{id}"),
            Command::ExpireLeases { leases, .. } => {
                write!(f, "expire-leases ({} instances)", leases.len())
            }
            Command::Revive { lease, .. } => write!(f, "revive {}/{}", lease.service, lease.id),
            Command::Reap { leases, .. } => write!(f, "reap ({} instances)", leases.len()),
        }
    }
}

/// The result of applying one command; returned to the proposer through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The instance after the write; `created` is false for an update.
    Registered {
        /// The stored instance.
        instance: Instance,
        /// Whether it did not exist before.
        created: bool,
    },
    /// The instance as it was when removed.
    Deregistered {
        /// The removed instance.
        instance: Instance,
    },
    /// The precondition did not hold; nothing changed.
    PreconditionFailed {
        /// The instance's current modify_index, `None` if absent.
        current_index: Option<u64>,
    },
    /// Deregister of an instance that does not exist; nothing changed.
    NotFound,
    /// The instance belongs to another identity and the caller may not override that;
    /// nothing changed.
    NotOwner {
        /// The instance's `registered_by`.
        owner: String,
    },
    /// `apply` re-validates defensively; an invalid command changes nothing.
    Invalid(ValidationError),
    /// ExpireLeases / Revive / Reap: how many instances changed.
    Leases {
        /// Number of instances changed (marked, revived or removed).
        changed: u32,
    },
}

impl Outcome {
    /// Whether the command changed the state (and so moved the indices).
    fn is_change(&self) -> bool {
        match self {
            Outcome::Registered { .. } | Outcome::Deregistered { .. } => true,
            Outcome::Leases { changed } => *changed > 0,
            Outcome::PreconditionFailed { .. }
            | Outcome::NotFound
            | Outcome::NotOwner { .. }
            | Outcome::Invalid(_) => false,
        }
    }
}

/// One service: its instances and the index of its last change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ServiceEntry {
    /// Instances by id. Shared with every copy of the registry (see [`Registry`]); a change
    /// copies the path to one leaf and the `Arc`s in it, never the instances themselves.
    instances: OrdMap<String, Arc<Instance>>,
    /// Log index of the last change to this service, including deletions. The entry is kept
    /// after its last instance goes, so a blocking query on the service sees the deletion
    /// (and never sees the index go back to 0). These tombstones are a few bytes per service
    /// name ever used; the set of service names is small and operator-controlled.
    index: u64,
}

/// Query filters of `GET /v1/services/{service}`; all that are set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// `Some(true)`: Passing only; `Some(false)`: Critical only; `None`: both.
    pub healthy: Option<bool>,
    /// Only instances carrying this tag (exact match).
    pub tag: Option<String>,
    /// Only instances in this zone.
    pub zone: Option<String>,
    /// Order only: instances in this zone first, then the rest, each group by id.
    pub near: Option<String>,
}

impl Filter {
    fn matches(&self, i: &Instance) -> bool {
        let healthy_ok = match self.healthy {
            None => true,
            Some(want) => (i.health == Health::Passing) == want,
        };
        let tag_ok = self
            .tag
            .as_ref()
            .is_none_or(|t| i.tags.iter().any(|x| x == t));
        let zone_ok = self
            .zone
            .as_ref()
            .is_none_or(|z| i.zone.as_ref() == Some(z));
        healthy_ok && tag_ok && zone_ok
    }
}

/// One line of `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Service name.
    pub name: String,
    /// Number of instances, any health.
    pub instances: usize,
    /// Number of Passing instances.
    pub passing: usize,
    /// Log index of the last change to the service.
    pub index: u64,
}

/// The replicated registry: every service and instance, plus the modify index.
///
/// The maps are persistent B-trees (`imbl::OrdMap`): a clone is O(1) and shares structure
/// with the original, so a snapshot copies the state under the lock in constant time, however
/// large the registry. Their serde form is that of sorted maps, like `BTreeMap`'s: the
/// snapshot payload is deterministic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    /// Services by name, including emptied ones (see [`ServiceEntry::index`]).
    services: OrdMap<String, ServiceEntry>,
    /// Log index of the last change to any service.
    index: u64,
}

impl Registry {
    /// An empty registry at index 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one command from the log entry at `index`.
    ///
    /// Contract: a pure function of `(self, index, cmd)` — no clock, RNG or I/O; the same
    /// inputs give the same state and outcome on every replica. `index` becomes the
    /// `create_index`/`modify_index` of what the command touches, the service's index and the
    /// state's [`index`](Self::index). A command that changes nothing (invalid, failed
    /// precondition, not found, stale lease references) moves no index. Raft log indices
    /// only grow, so for a changing command `index > self.index()` (debug-asserted).
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Outcome {
        self.apply_as(index, cmd, false)
    }

    /// [`Registry::apply`], where `may_override_owner` lets the caller change an instance
    /// registered by another identity (an admin of that service, as the proposer's policy
    /// decided at the same log position, so every node decides the same).
    pub fn apply_as(&mut self, index: u64, cmd: &Command, may_override_owner: bool) -> Outcome {
        let before = self.index;
        let outcome = self.dispatch(index, cmd, may_override_owner);
        // A replayed or reordered entry would silently rewrite history with an older index;
        // catch it in tests. Non-changing commands may carry any index.
        // (Builds with planted bugs rewrite history on purpose: `chaos-bugs`.)
        debug_assert!(
            !outcome.is_change() || index > before || cfg!(feature = "chaos-bugs"),
            "log index {index} does not move past the registry index {before}"
        );
        outcome
    }

    fn dispatch(&mut self, index: u64, cmd: &Command, may_override_owner: bool) -> Outcome {
        match cmd {
            Command::Register {
                service,
                id,
                spec,
                owner,
                precondition,
                now_ms,
            } => self.register(
                index,
                service,
                id,
                spec,
                owner,
                *precondition,
                *now_ms,
                may_override_owner,
            ),
            Command::Deregister {
                service,
                id,
                precondition,
                now_ms: _,
                by,
            } => self.deregister(index, service, id, *precondition, by, may_override_owner),
            Command::ExpireLeases { leases, now_ms } => {
                self.apply_leases(index, leases, *now_ms, LeaseAction::Expire)
            }
            Command::Revive { lease, now_ms } => self.apply_leases(
                index,
                std::slice::from_ref(lease),
                *now_ms,
                LeaseAction::Revive,
            ),
            Command::Reap { leases, now_ms } => {
                self.apply_leases(index, leases, *now_ms, LeaseAction::Reap)
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // the fields of Command::Register, destructured once
    fn register(
        &mut self,
        index: u64,
        service: &str,
        id: &str,
        spec: &InstanceSpec,
        owner: &str,
        precondition: Precondition,
        now_ms: u64,
        may_override_owner: bool,
    ) -> Outcome {
        if let Err(e) = validate_service_name(service)
            .and_then(|()| validate_instance_id(id))
            .and_then(|()| spec.validate())
        {
            return Outcome::Invalid(e);
        }
        let current = self.instance(service, id);
        // Ownership before the precondition: a stranger learns nothing about the index.
        if let Some(c) = current {
            if c.registered_by != owner && !may_override_owner {
                return Outcome::NotOwner {
                    owner: c.registered_by.clone(),
                };
            }
        }
        let current_index = current.map(|i| i.modify_index);
        let holds = match precondition {
            Precondition::None => true,
            Precondition::IfMatch(n) => current_index == Some(n),
            Precondition::IfAbsent => current.is_none(),
        };
        if !holds {
            return Outcome::PreconditionFailed { current_index };
        }
        // Ownership and creation time survive updates; everything the spec carries is
        // replaced, and a re-registration is also a renewal, so health returns to Passing.
        let (created, create_index, created_at_ms, registered_by) = match current {
            Some(c) => (
                false,
                c.create_index,
                c.created_at_ms,
                c.registered_by.clone(),
            ),
            None => (true, index, now_ms, owner.to_owned()),
        };
        let instance = Instance {
            service: service.to_owned(),
            id: id.to_owned(),
            address: spec.address.clone(),
            port: spec.port,
            tags: spec.tags.clone(),
            meta: spec.meta.clone(),
            zone: spec.zone.clone(),
            ttl_seconds: spec.ttl_seconds,
            health: Health::Passing,
            create_index,
            modify_index: index,
            registered_by,
            created_at_ms,
            updated_at_ms: now_ms,
        };
        let entry = self.touch(index, service);
        entry
            .instances
            .insert(id.to_owned(), Arc::new(instance.clone()));
        Outcome::Registered { instance, created }
    }

    /// Deregister. An absent instance is `NotFound` unless the caller sent `If-Match`, which
    /// fails as a precondition (RFC 9110: `If-Match` is false when nothing exists), matching
    /// Register. `If-None-Match: *` on a present instance fails as a precondition; on an
    /// absent one it is `NotFound`.
    fn deregister(
        &mut self,
        index: u64,
        service: &str,
        id: &str,
        precondition: Precondition,
        by: &str,
        may_override_owner: bool,
    ) -> Outcome {
        if let Err(e) = validate_service_name(service).and_then(|()| validate_instance_id(id)) {
            return Outcome::Invalid(e);
        }
        let current = self.instance(service, id);
        if let Some(c) = current {
            if c.registered_by != by && !may_override_owner {
                return Outcome::NotOwner {
                    owner: c.registered_by.clone(),
                };
            }
        }
        let current_index = current.map(|i| i.modify_index);
        match (precondition, current_index) {
            (Precondition::IfMatch(n), cur) if cur != Some(n) => {
                return Outcome::PreconditionFailed { current_index: cur };
            }
            (Precondition::IfAbsent, Some(cur)) => {
                return Outcome::PreconditionFailed {
                    current_index: Some(cur),
                };
            }
            (_, None) => return Outcome::NotFound,
            _ => {}
        }
        let removed = self
            .services
            .get_mut(service)
            .and_then(|s| s.instances.remove(id));
        match removed {
            Some(instance) => {
                self.touch(index, service);
                Outcome::Deregistered {
                    instance: Arc::unwrap_or_clone(instance),
                }
            }
            // Presence was checked above; kept total rather than panicking.
            None => Outcome::NotFound,
        }
    }

    fn apply_leases(
        &mut self,
        index: u64,
        leases: &[LeaseRef],
        now_ms: u64,
        action: LeaseAction,
    ) -> Outcome {
        let mut changed: u32 = 0;
        for lease in leases {
            let Some(current) = self.instance(&lease.service, &lease.id) else {
                continue;
            };
            // The guard: the leader saw this exact version. Anything newer (a
            // re-registration, a deregister + register) means its observation is stale.
            if current.modify_index != lease.modify_index {
                continue;
            }
            let applies = match action {
                // An instance without a lease cannot expire; an already Critical one
                // needs no change (and must not get a fresh modify_index for nothing).
                LeaseAction::Expire => {
                    current.health == Health::Passing && current.ttl_seconds.is_some()
                }
                LeaseAction::Revive => current.health == Health::Critical,
                // Only expired instances are reaped; a Passing one is alive.
                LeaseAction::Reap => current.health == Health::Critical,
            };
            if !applies {
                continue;
            }
            let entry = self.touch(index, &lease.service);
            match action {
                LeaseAction::Reap => {
                    entry.instances.remove(&lease.id);
                }
                LeaseAction::Expire | LeaseAction::Revive => {
                    if let Some(i) = entry.instances.get_mut(&lease.id).map(Arc::make_mut) {
                        i.health = if action == LeaseAction::Expire {
                            Health::Critical
                        } else {
                            Health::Passing
                        };
                        i.modify_index = index;
                        i.updated_at_ms = now_ms;
                    }
                }
            }
            changed = changed.saturating_add(1);
        }
        Outcome::Leases { changed }
    }

    /// Records a change to `service` at `index` and returns its entry, creating it if
    /// needed. Every mutation goes through here, so the indices cannot be forgotten.
    fn touch(&mut self, index: u64, service: &str) -> &mut ServiceEntry {
        // Several instances may be touched by one command (lease batches), so the
        // "indices only move forward" check lives in `apply`, once per command.
        self.index = index;
        let entry = self.services.entry(service.to_owned()).or_default();
        entry.index = index;
        entry
    }

    /// Replaces the whole registry by `restored` (a backup), as the log entry at `index`.
    ///
    /// Indices only move forward, so watchers see the change: every instance's
    /// `modify_index`, every service's index (those removed by the restore stay as
    /// tombstones) and the registry's index become `index`; `create_index` is kept unless it
    /// would exceed `index`. `updated_at_ms` becomes the proposer's `now_ms`, so restored
    /// leases and reap timers start afresh (the leader's lease table keys deadlines by
    /// `modify_index`, so each lease gets a full TTL). Pure, like [`Registry::apply`].
    pub fn restore(&mut self, index: u64, restored: &Registry, now_ms: u64) {
        let mut services: OrdMap<String, ServiceEntry> = OrdMap::new();
        for name in self.services.keys() {
            services.insert(
                name.clone(),
                ServiceEntry {
                    instances: OrdMap::new(),
                    index,
                },
            );
        }
        for (name, entry) in &restored.services {
            let instances = entry
                .instances
                .iter()
                .map(|(id, inst)| {
                    let mut inst = Instance::clone(inst);
                    inst.modify_index = index;
                    inst.create_index = inst.create_index.min(index);
                    inst.updated_at_ms = now_ms;
                    (id.clone(), Arc::new(inst))
                })
                .collect();
            services.insert(name.clone(), ServiceEntry { instances, index });
        }
        self.services = services;
        self.index = index;
    }

    /// The instances of every service, in name order (for comparing states and backups).
    pub fn all_instances(&self) -> impl Iterator<Item = &Instance> {
        self.services
            .values()
            .flat_map(|s| s.instances.values().map(Arc::as_ref))
    }

    /// Number of services with at least one instance.
    pub fn service_count(&self) -> usize {
        self.services
            .values()
            .filter(|s| !s.instances.is_empty())
            .count()
    }

    /// Log index of the last change to any service (`X-Cairn-Index`); 0 if none yet.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Log index of the last change to `service`, including the deletion of its last
    /// instance; 0 if the service never existed. Blocking queries wait for it to pass `N`.
    pub fn service_index(&self, service: &str) -> u64 {
        self.services.get(service).map_or(0, |s| s.index)
    }

    /// One instance, if registered.
    pub fn instance(&self, service: &str, id: &str) -> Option<&Instance> {
        self.services
            .get(service)?
            .instances
            .get(id)
            .map(Arc::as_ref)
    }

    /// The instances of `service` that pass `filter`, sorted by id; with `filter.near`, the
    /// instances in that zone come first, then the rest, each group sorted by id.
    pub fn instances(&self, service: &str, filter: &Filter) -> Vec<Instance> {
        let Some(entry) = self.services.get(service) else {
            return Vec::new();
        };
        // OrdMap iteration is already in id order; the partition is stable.
        let matching = entry
            .instances
            .values()
            .filter(|i| filter.matches(i))
            .map(|i| Instance::clone(i));
        match &filter.near {
            None => matching.collect(),
            Some(near) => {
                let (mut same, rest): (Vec<Instance>, Vec<Instance>) =
                    matching.partition(|i| i.zone.as_ref() == Some(near));
                same.extend(rest);
                same
            }
        }
    }

    /// Every service with at least one instance, sorted by name.
    pub fn services(&self) -> Vec<ServiceSummary> {
        self.services
            .iter()
            .filter(|(_, s)| !s.instances.is_empty())
            .map(|(name, s)| ServiceSummary {
                name: name.clone(),
                instances: s.instances.len(),
                passing: s
                    .instances
                    .values()
                    .filter(|i| i.health == Health::Passing)
                    .count(),
                index: s.index,
            })
            .collect()
    }

    /// Instances with a lease (`ttl_seconds` set), in (service, id) order; the leader's lease
    /// keeper walks these to grant deadlines after an election.
    pub fn leased(&self) -> impl Iterator<Item = &Instance> {
        self.services
            .values()
            .flat_map(|s| s.instances.values().map(Arc::as_ref))
            .filter(|i| i.ttl_seconds.is_some())
    }

    /// Number of registered instances across all services.
    pub fn instance_count(&self) -> usize {
        self.services.values().map(|s| s.instances.len()).sum()
    }
}

/// What a lease command does to each instance it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseAction {
    Expire,
    Revive,
    Reap,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            address: "10.0.0.1".into(),
            port: 8080,
            tags: vec!["v1".into()],
            meta: BTreeMap::from([("version".to_owned(), "1.2.3".to_owned())]),
            zone: Some("zone-a".into()),
            ttl_seconds: Some(30),
        }
    }

    fn register(service: &str, id: &str, spec: InstanceSpec, pre: Precondition) -> Command {
        Command::Register {
            service: service.into(),
            id: id.into(),
            spec,
            owner: "service/web".into(),
            precondition: pre,
            now_ms: 1_000,
        }
    }

    fn lease_ref(r: &Registry, service: &str, id: &str) -> LeaseRef {
        LeaseRef {
            service: service.into(),
            id: id.into(),
            modify_index: r
                .instance(service, id)
                .expect("instance exists")
                .modify_index,
        }
    }

    fn expire(leases: Vec<LeaseRef>) -> Command {
        Command::ExpireLeases {
            leases,
            now_ms: 5_000,
        }
    }

    fn bytes(r: &Registry) -> Vec<u8> {
        bincode::serde::encode_to_vec(r, bincode::config::standard()).expect("encode")
    }

    // ---- validators ----

    #[test]
    fn service_names() {
        let long = "a".repeat(63);
        let too_long = "a".repeat(64);
        for good in ["a", "web", "web-api", "x1", "1x", long.as_str()] {
            assert_eq!(validate_service_name(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "-web",
            "web-",
            "Web",
            "web_api",
            "web.api",
            "wéb",
            "web api",
            too_long.as_str(),
        ] {
            let e = validate_service_name(bad).expect_err(bad);
            assert_eq!(e.field, "service", "{bad:?}");
        }
    }

    #[test]
    fn instance_ids() {
        let long = "i".repeat(128);
        let too_long = "i".repeat(129);
        for good in [
            "i",
            "web-1",
            "Web_1.prod",
            "-x-",
            "10.0.0.1_80",
            long.as_str(),
        ] {
            assert_eq!(validate_instance_id(good), Ok(()), "{good:?}");
        }
        for bad in ["", "a/b", "a:b", "a b", "ä", too_long.as_str()] {
            let e = validate_instance_id(bad).expect_err(bad);
            assert_eq!(e.field, "id", "{bad:?}");
        }
    }

    #[test]
    fn spec_validation_names_the_field() {
        assert_eq!(spec().validate(), Ok(()));
        let no_lease = InstanceSpec {
            ttl_seconds: None,
            zone: None,
            ..spec()
        };
        assert_eq!(no_lease.validate(), Ok(()));

        type Mutate = fn(&mut InstanceSpec);
        let good: &[(&str, Mutate)] = &[
            ("ipv6", |s| s.address = "fd00::1".into()),
            ("hostname", |s| s.address = "db-1.eu.example.com".into()),
            ("upper host", |s| s.address = "DB.example".into()),
            ("port max", |s| s.port = 65535),
            ("ttl min", |s| s.ttl_seconds = Some(1)),
            ("ttl max", |s| s.ttl_seconds = Some(86_400)),
            ("max tags", |s| {
                s.tags = (0..MAX_TAGS).map(|i| format!("t{i}")).collect()
            }),
            ("unicode tag", |s| s.tags = vec!["é".repeat(128)]),
            ("max meta", |s| {
                s.meta = (0..MAX_META)
                    .map(|i| (format!("k{i}"), "v".into()))
                    .collect()
            }),
            ("max meta value", |s| {
                s.meta = BTreeMap::from([("k".into(), "v".repeat(512))])
            }),
            ("empty meta value", |s| {
                s.meta = BTreeMap::from([("k".into(), String::new())])
            }),
        ];
        for (name, mutate) in good {
            let mut s = spec();
            mutate(&mut s);
            assert_eq!(s.validate(), Ok(()), "{name}");
        }

        let bad: &[(&str, &str, Mutate)] = &[
            ("address", "empty", |s| s.address = String::new()),
            ("address", "too long", |s| {
                s.address = format!("{}.com", "a.".repeat(125))
            }),
            ("address", "label too long", |s| {
                s.address = format!("{}.com", "a".repeat(64))
            }),
            ("address", "bad ip", |s| s.address = "10.0.0.256".into()),
            ("address", "numeric tld", |s| s.address = "1.2.3".into()),
            ("address", "underscore", |s| {
                s.address = "db_1.example".into()
            }),
            ("address", "with port", |s| s.address = "10.0.0.1:80".into()),
            ("address", "url", |s| s.address = "http://x".into()),
            ("address", "empty label", |s| s.address = "a..b".into()),
            ("address", "dash label", |s| s.address = "-a.example".into()),
            ("port", "zero", |s| s.port = 0),
            ("tags", "too many", |s| {
                s.tags = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect()
            }),
            ("tags[1]", "empty", |s| {
                s.tags = vec!["a".into(), String::new()]
            }),
            ("tags[0]", "too long", |s| s.tags = vec!["t".repeat(129)]),
            ("tags[0]", "control", |s| s.tags = vec!["a\nb".into()]),
            ("tags[2]", "duplicate", |s| {
                s.tags = vec!["a".into(), "b".into(), "a".into()]
            }),
            ("meta", "too many", |s| {
                s.meta = (0..=MAX_META)
                    .map(|i| (format!("k{i}"), "v".into()))
                    .collect()
            }),
            ("meta", "bad key", |s| {
                s.meta = BTreeMap::from([("a b".into(), "v".into())])
            }),
            ("meta", "empty key", |s| {
                s.meta = BTreeMap::from([(String::new(), "v".into())])
            }),
            ("meta", "long key", |s| {
                s.meta = BTreeMap::from([("k".repeat(129), "v".into())])
            }),
            ("meta.k", "long value", |s| {
                s.meta = BTreeMap::from([("k".into(), "v".repeat(513))])
            }),
            ("zone", "upper", |s| s.zone = Some("Zone-A".into())),
            ("zone", "empty", |s| s.zone = Some(String::new())),
            ("ttl_seconds", "zero", |s| s.ttl_seconds = Some(0)),
            ("ttl_seconds", "over a day", |s| {
                s.ttl_seconds = Some(86_401)
            }),
        ];
        for (field, name, mutate) in bad {
            let mut s = spec();
            mutate(&mut s);
            let e = s.validate().expect_err(name);
            assert_eq!(e.field, *field, "{name}: {e}");
        }
    }

    #[test]
    fn spec_json_defaults_and_unknown_fields() {
        let s: InstanceSpec =
            serde_json::from_str(r#"{"address":"10.0.0.1","port":80}"#).expect("minimal body");
        assert!(s.tags.is_empty() && s.meta.is_empty());
        assert_eq!((s.zone, s.ttl_seconds), (None, None));
        let typo = serde_json::from_str::<InstanceSpec>(r#"{"address":"a","port":80,"ttl":30}"#);
        assert!(typo.is_err(), "unknown field must be refused");
        let health: Health = serde_json::from_str(r#""critical""#).expect("lowercase");
        assert_eq!(health, Health::Critical);
    }

    // ---- register ----

    #[test]
    fn register_creates_then_updates_keeping_origin() {
        let mut r = Registry::new();
        let Outcome::Registered { instance, created } =
            r.apply(3, &register("web", "w1", spec(), Precondition::None))
        else {
            panic!("not registered")
        };
        assert!(created);
        assert_eq!((instance.create_index, instance.modify_index), (3, 3));
        assert_eq!(
            (instance.created_at_ms, instance.updated_at_ms),
            (1_000, 1_000)
        );
        assert_eq!(instance.registered_by, "service/web");
        assert_eq!(instance.health, Health::Passing);
        assert_eq!(r.instance("web", "w1"), Some(&instance));
        assert_eq!((r.index(), r.service_index("web")), (3, 3));

        let update = Command::Register {
            service: "web".into(),
            id: "w1".into(),
            spec: InstanceSpec {
                port: 9090,
                ..spec()
            },
            owner: "operator/admin".into(),
            precondition: Precondition::None,
            now_ms: 2_000,
        };
        // Another identity may not touch it...
        let before = r.clone();
        assert_eq!(
            r.apply(7, &update),
            Outcome::NotOwner {
                owner: "service/web".into()
            }
        );
        assert_eq!(r, before);
        // ...unless it may override ownership (an admin); ownership stays with the creator.
        let Outcome::Registered { instance, created } = r.apply_as(7, &update, true) else {
            panic!("not updated")
        };
        assert!(!created);
        assert_eq!(instance.port, 9090);
        assert_eq!((instance.create_index, instance.modify_index), (3, 7));
        assert_eq!(
            (instance.created_at_ms, instance.updated_at_ms),
            (1_000, 2_000)
        );
        assert_eq!(instance.registered_by, "service/web");
        assert_eq!((r.index(), r.service_index("web")), (7, 7));
        assert_eq!(r.instance_count(), 1);
    }

    #[test]
    fn register_if_match() {
        let mut r = Registry::new();
        // Absent: If-Match cannot hold, and nothing is created.
        assert_eq!(
            r.apply(1, &register("web", "w1", spec(), Precondition::IfMatch(1))),
            Outcome::PreconditionFailed {
                current_index: None
            }
        );
        assert_eq!(r, Registry::new());

        r.apply(2, &register("web", "w1", spec(), Precondition::None));
        let before = r.clone();
        assert_eq!(
            r.apply(3, &register("web", "w1", spec(), Precondition::IfMatch(1))),
            Outcome::PreconditionFailed {
                current_index: Some(2)
            }
        );
        assert_eq!(r, before, "a failed CAS changes nothing");

        let out = r.apply(4, &register("web", "w1", spec(), Precondition::IfMatch(2)));
        assert!(
            matches!(out, Outcome::Registered { created: false, ref instance } if instance.modify_index == 4)
        );
        // The old index is now stale.
        assert!(matches!(
            r.apply(5, &register("web", "w1", spec(), Precondition::IfMatch(2))),
            Outcome::PreconditionFailed {
                current_index: Some(4)
            }
        ));
    }

    #[test]
    fn register_if_absent_is_create_only() {
        let mut r = Registry::new();
        let out = r.apply(1, &register("web", "w1", spec(), Precondition::IfAbsent));
        assert!(matches!(out, Outcome::Registered { created: true, .. }));
        let before = r.clone();
        assert_eq!(
            r.apply(2, &register("web", "w1", spec(), Precondition::IfAbsent)),
            Outcome::PreconditionFailed {
                current_index: Some(1)
            }
        );
        assert_eq!(r, before);
    }

    #[test]
    fn invalid_commands_change_nothing() {
        let mut r = Registry::new();
        r.apply(1, &register("web", "w1", spec(), Precondition::None));
        let before = r.clone();
        let cases = [
            (register("Web", "w1", spec(), Precondition::None), "service"),
            (register("web", "w/1", spec(), Precondition::None), "id"),
            (
                register(
                    "web",
                    "w1",
                    InstanceSpec { port: 0, ..spec() },
                    Precondition::None,
                ),
                "port",
            ),
            (
                Command::Deregister {
                    service: "web".into(),
                    id: "".into(),
                    precondition: Precondition::None,
                    now_ms: 1,
                    by: "service/web".into(),
                },
                "id",
            ),
        ];
        for (i, (cmd, field)) in cases.iter().enumerate() {
            match r.apply(10 + i as u64, cmd) {
                Outcome::Invalid(e) => assert_eq!(e.field, *field),
                other => panic!("{cmd}: {other:?}"),
            }
            assert_eq!(r, before, "{cmd}");
        }
    }

    // ---- deregister ----

    fn deregister(id: &str, pre: Precondition) -> Command {
        Command::Deregister {
            service: "web".into(),
            id: id.into(),
            precondition: pre,
            now_ms: 3_000,
            by: "service/web".into(),
        }
    }

    #[test]
    fn restore_replaces_everything_and_moves_every_index_forward() {
        let mut backup = Registry::new();
        backup.apply(3, &register("web", "w1", spec(), Precondition::None));
        backup.apply(4, &register("db", "d1", spec(), Precondition::None));
        let mut r = Registry::new();
        r.apply(1, &register("web", "w9", spec(), Precondition::None));
        r.apply(2, &register("cache", "c1", spec(), Precondition::None));
        r.restore(10, &backup, 77_000);
        assert_eq!(r.index(), 10);
        // What the backup had, and nothing else; every index at 10 (removed services too).
        let ids: Vec<(&str, &str)> = r
            .all_instances()
            .map(|i| (i.service.as_str(), i.id.as_str()))
            .collect();
        assert_eq!(ids, [("db", "d1"), ("web", "w1")]);
        for svc in ["web", "db", "cache"] {
            assert_eq!(r.service_index(svc), 10, "{svc}");
        }
        let w1 = r.instance("web", "w1").expect("restored");
        assert_eq!(
            (w1.create_index, w1.modify_index, w1.updated_at_ms),
            (3, 10, 77_000)
        );
        assert_eq!(w1.registered_by, "service/web");
        assert_eq!(r.service_count(), 2);
        // A CAS against the backup's index no longer matches: the restore was a change.
        let cas = register("web", "w1", spec(), Precondition::IfMatch(3));
        assert!(matches!(
            r.apply(11, &cas),
            Outcome::PreconditionFailed { .. }
        ));
    }

    #[test]
    fn only_the_owner_or_an_override_deregisters() {
        let mut r = Registry::new();
        r.apply(1, &register("web", "w1", spec(), Precondition::None));
        let before = r.clone();
        let stranger = Command::Deregister {
            service: "web".into(),
            id: "w1".into(),
            precondition: Precondition::IfMatch(1),
            now_ms: 2_000,
            by: "service/api".into(),
        };
        // Refused before the precondition is even looked at.
        assert_eq!(
            r.apply(2, &stranger),
            Outcome::NotOwner {
                owner: "service/web".into()
            }
        );
        assert_eq!(r, before);
        assert!(matches!(
            r.apply_as(2, &stranger, true),
            Outcome::Deregistered { .. }
        ));
        assert_eq!(r.instance_count(), 0);
    }

    #[test]
    fn deregister_paths() {
        let mut r = Registry::new();
        assert_eq!(
            r.apply(1, &deregister("w1", Precondition::None)),
            Outcome::NotFound
        );
        assert_eq!(r, Registry::new(), "not found moves no index");

        r.apply(2, &register("web", "w1", spec(), Precondition::None));
        r.apply(3, &register("web", "w2", spec(), Precondition::None));
        let before = r.clone();
        assert_eq!(
            r.apply(4, &deregister("w1", Precondition::IfMatch(9))),
            Outcome::PreconditionFailed {
                current_index: Some(2)
            }
        );
        assert_eq!(
            r.apply(5, &deregister("w1", Precondition::IfAbsent)),
            Outcome::PreconditionFailed {
                current_index: Some(2)
            }
        );
        assert_eq!(
            r.apply(6, &deregister("gone", Precondition::IfMatch(2))),
            Outcome::PreconditionFailed {
                current_index: None
            }
        );
        assert_eq!(
            r.apply(7, &deregister("gone", Precondition::IfAbsent)),
            Outcome::NotFound
        );
        assert_eq!(r, before);

        match r.apply(8, &deregister("w1", Precondition::IfMatch(2))) {
            Outcome::Deregistered { instance } => assert_eq!(instance.id, "w1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.instance("web", "w1"), None);
        assert_eq!((r.index(), r.service_index("web")), (8, 8));
        assert!(matches!(
            r.apply(9, &deregister("w2", Precondition::None)),
            Outcome::Deregistered { .. }
        ));
        assert_eq!(r.instance_count(), 0);
    }

    #[test]
    fn service_index_survives_deletion() {
        let mut r = Registry::new();
        assert_eq!(r.service_index("web"), 0);
        r.apply(1, &register("web", "w1", spec(), Precondition::None));
        r.apply(2, &register("db", "d1", spec(), Precondition::None));
        assert_eq!(
            r.service_index("web"),
            1,
            "other services' changes don't count"
        );
        r.apply(3, &deregister("w1", Precondition::None));
        assert_eq!(r.service_index("web"), 3);
        assert_eq!(r.service_index("db"), 2);
        let names: Vec<String> = r.services().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["db"], "an emptied service is not listed");
        assert!(r.instances("web", &Filter::default()).is_empty());
    }

    // ---- leases ----

    #[test]
    fn expiry_is_guarded_by_modify_index() {
        let mut r = Registry::new();
        r.apply(1, &register("web", "w1", spec(), Precondition::None));
        r.apply(2, &register("web", "w2", spec(), Precondition::None));
        r.apply(
            3,
            &register(
                "web",
                "static",
                InstanceSpec {
                    ttl_seconds: None,
                    ..spec()
                },
                Precondition::None,
            ),
        );
        let w1 = lease_ref(&r, "web", "w1");
        let w2 = lease_ref(&r, "web", "w2");
        let static_ref = lease_ref(&r, "web", "static");
        // w2 re-registers after the leader observed it: its expiry must lose.
        r.apply(4, &register("web", "w2", spec(), Precondition::None));
        let missing = LeaseRef {
            service: "web".into(),
            id: "nope".into(),
            modify_index: 1,
        };

        let out = r.apply(5, &expire(vec![w1, w2, static_ref, missing]));
        assert_eq!(out, Outcome::Leases { changed: 1 });
        let i1 = r.instance("web", "w1").expect("w1");
        assert_eq!(
            (i1.health, i1.modify_index, i1.updated_at_ms),
            (Health::Critical, 5, 5_000)
        );
        assert_eq!(i1.create_index, 1);
        let i2 = r.instance("web", "w2").expect("w2");
        assert_eq!((i2.health, i2.modify_index), (Health::Passing, 4));
        assert_eq!(
            r.instance("web", "static").expect("static").health,
            Health::Passing
        );
        assert_eq!((r.index(), r.service_index("web")), (5, 5));

        // A second expiry of the same (now Critical) version changes nothing, moves nothing.
        let before = r.clone();
        let again = lease_ref(&r, "web", "w1");
        assert_eq!(
            r.apply(6, &expire(vec![again])),
            Outcome::Leases { changed: 0 }
        );
        assert_eq!(r, before);
    }

    #[test]
    fn revive_and_reregister_restore_passing() {
        let mut r = Registry::new();
        r.apply(1, &register("web", "w1", spec(), Precondition::None));
        let stale = lease_ref(&r, "web", "w1");
        // Reviving a Passing instance is a no-op.
        let before = r.clone();
        let revive = |lease| Command::Revive {
            lease,
            now_ms: 9_000,
        };
        assert_eq!(
            r.apply(2, &revive(stale.clone())),
            Outcome::Leases { changed: 0 }
        );
        assert_eq!(r, before);

        r.apply(3, &expire(vec![stale.clone()]));
        // The pre-expiry version is stale now.
        assert_eq!(r.apply(4, &revive(stale)), Outcome::Leases { changed: 0 });
        let current = lease_ref(&r, "web", "w1");
        assert_eq!(r.apply(5, &revive(current)), Outcome::Leases { changed: 1 });
        let i = r.instance("web", "w1").expect("w1");
        assert_eq!(
            (i.health, i.modify_index, i.updated_at_ms),
            (Health::Passing, 5, 9_000)
        );

        // A re-registration of a Critical instance also brings it back.
        r.apply(6, &expire(vec![lease_ref(&r, "web", "w1")]));
        r.apply(7, &register("web", "w1", spec(), Precondition::None));
        assert_eq!(r.instance("web", "w1").expect("w1").health, Health::Passing);
    }

    #[test]
    fn reap_removes_only_critical_matching() {
        let mut r = Registry::new();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            r.apply(
                1 + i as u64,
                &register("web", id, spec(), Precondition::None),
            );
        }
        let refs = vec![lease_ref(&r, "web", "a"), lease_ref(&r, "web", "b")];
        r.apply(4, &expire(refs));
        let a = lease_ref(&r, "web", "a");
        let b_stale = lease_ref(&r, "web", "b");
        r.apply(5, &register("web", "b", spec(), Precondition::None)); // b came back
        let c_passing = lease_ref(&r, "web", "c");

        let reap = Command::Reap {
            leases: vec![a, b_stale, c_passing],
            now_ms: 60_000,
        };
        assert_eq!(r.apply(6, &reap), Outcome::Leases { changed: 1 });
        assert_eq!(r.instance("web", "a"), None);
        assert!(r.instance("web", "b").is_some() && r.instance("web", "c").is_some());
        assert_eq!((r.index(), r.service_index("web")), (6, 6));

        let before = r.clone();
        assert_eq!(r.apply(7, &reap), Outcome::Leases { changed: 0 });
        assert_eq!(r, before);
    }

    #[test]
    fn leased_lists_only_instances_with_ttl() {
        let mut r = Registry::new();
        r.apply(1, &register("web", "w1", spec(), Precondition::None));
        let no_ttl = InstanceSpec {
            ttl_seconds: None,
            ..spec()
        };
        r.apply(2, &register("web", "w2", no_ttl, Precondition::None));
        r.apply(3, &register("api", "a1", spec(), Precondition::None));
        let ids: Vec<(&str, &str)> = r
            .leased()
            .map(|i| (i.service.as_str(), i.id.as_str()))
            .collect();
        assert_eq!(ids, [("api", "a1"), ("web", "w1")]);
        assert_eq!(r.instance_count(), 3);
    }

    // ---- queries ----

    fn zoned(zone: Option<&str>, tags: &[&str]) -> InstanceSpec {
        InstanceSpec {
            zone: zone.map(str::to_owned),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            ..spec()
        }
    }

    fn query_fixture() -> Registry {
        let mut r = Registry::new();
        let rows = [
            ("e", Some("zone-b"), &["v2"][..]),
            ("d", Some("zone-a"), &["v1"][..]),
            ("c", None, &["v1", "v2"][..]),
            ("b", Some("zone-b"), &[][..]),
            ("a", Some("zone-a"), &["v2"][..]),
        ];
        for (i, (id, zone, tags)) in rows.iter().enumerate() {
            r.apply(
                1 + i as u64,
                &register("web", id, zoned(*zone, tags), Precondition::None),
            );
        }
        // "d" expires.
        let d = lease_ref(&r, "web", "d");
        r.apply(10, &expire(vec![d]));
        r
    }

    fn ids(v: Vec<Instance>) -> Vec<String> {
        v.into_iter().map(|i| i.id).collect()
    }

    #[test]
    fn filters() {
        let r = query_fixture();
        let q = |f: Filter| ids(r.instances("web", &f));
        assert_eq!(q(Filter::default()), ["a", "b", "c", "d", "e"]);
        let healthy = |h| Filter {
            healthy: Some(h),
            ..Filter::default()
        };
        assert_eq!(q(healthy(true)), ["a", "b", "c", "e"]);
        assert_eq!(q(healthy(false)), ["d"]);
        let tag = Filter {
            tag: Some("v2".into()),
            ..Filter::default()
        };
        assert_eq!(q(tag), ["a", "c", "e"]);
        let zone = Filter {
            zone: Some("zone-a".into()),
            ..Filter::default()
        };
        assert_eq!(q(zone), ["a", "d"]);
        let combined = Filter {
            healthy: Some(true),
            tag: Some("v1".into()),
            ..Filter::default()
        };
        assert_eq!(q(combined), ["c"]);
        assert!(r.instances("nope", &Filter::default()).is_empty());
    }

    #[test]
    fn near_puts_same_zone_first_each_group_by_id() {
        let r = query_fixture();
        let near = |z: &str| Filter {
            near: Some(z.into()),
            ..Filter::default()
        };
        assert_eq!(
            ids(r.instances("web", &near("zone-b"))),
            ["b", "e", "a", "c", "d"]
        );
        assert_eq!(
            ids(r.instances("web", &near("zone-a"))),
            ["a", "d", "b", "c", "e"]
        );
        assert_eq!(
            ids(r.instances("web", &near("zone-x"))),
            ["a", "b", "c", "d", "e"]
        );
        let near_healthy = Filter {
            healthy: Some(true),
            ..near("zone-a")
        };
        assert_eq!(ids(r.instances("web", &near_healthy)), ["a", "b", "c", "e"]);
    }

    #[test]
    fn services_summary() {
        let mut r = query_fixture();
        r.apply(11, &register("api", "a1", spec(), Precondition::None));
        assert_eq!(
            r.services(),
            [
                ServiceSummary {
                    name: "api".into(),
                    instances: 1,
                    passing: 1,
                    index: 11
                },
                ServiceSummary {
                    name: "web".into(),
                    instances: 5,
                    passing: 4,
                    index: 10
                },
            ]
        );
    }

    // ---- determinism and snapshots ----

    fn script() -> Vec<Command> {
        let mut meta = BTreeMap::new();
        for k in ["zz", "aa", "mm", "b.c", "A-1"] {
            meta.insert(k.to_owned(), format!("value-{k}"));
        }
        vec![
            register("web", "w2", spec(), Precondition::None),
            register(
                "api",
                "a1",
                InstanceSpec { meta, ..spec() },
                Precondition::IfAbsent,
            ),
            register(
                "web",
                "w1",
                zoned(Some("zone-b"), &["x", "y"]),
                Precondition::None,
            ),
            register("db", "d1", spec(), Precondition::None),
            expire(vec![LeaseRef {
                service: "web".into(),
                id: "w2".into(),
                modify_index: 1,
            }]),
            deregister("w1", Precondition::IfMatch(3)),
            Command::Reap {
                leases: vec![LeaseRef {
                    service: "web".into(),
                    id: "w2".into(),
                    modify_index: 5,
                }],
                now_ms: 99_000,
            },
        ]
    }

    #[test]
    fn same_log_gives_identical_bytes_and_snapshots_round_trip() {
        let (mut a, mut b) = (Registry::new(), Registry::new());
        let mut outcomes = Vec::new();
        for (i, cmd) in script().iter().enumerate() {
            let index = 1 + i as u64;
            let out = a.apply(index, cmd);
            assert_eq!(b.apply(index, cmd), out, "{cmd}");
            outcomes.push(out);
        }
        // The script must really have exercised every path, or the test proves little.
        assert!(matches!(outcomes[4], Outcome::Leases { changed: 1 }));
        assert!(matches!(outcomes[5], Outcome::Deregistered { .. }));
        assert!(matches!(outcomes[6], Outcome::Leases { changed: 1 }));
        assert_eq!(a.index(), 7);

        assert_eq!(bytes(&a), bytes(&b));
        let (decoded, _): (Registry, usize) =
            bincode::serde::decode_from_slice(&bytes(&a), bincode::config::standard())
                .expect("decode");
        assert_eq!(decoded, a);
        assert_eq!(bytes(&decoded), bytes(&a));
        // A different history gives different bytes (the encoding is not trivially constant).
        b.apply(8, &register("web", "w9", spec(), Precondition::None));
        assert_ne!(bytes(&a), bytes(&b));
    }

    #[test]
    fn commands_round_trip_through_bincode() {
        for cmd in script() {
            let enc =
                bincode::serde::encode_to_vec(&cmd, bincode::config::standard()).expect("encode");
            let (dec, _): (Command, usize) =
                bincode::serde::decode_from_slice(&enc, bincode::config::standard())
                    .expect("decode");
            assert_eq!(dec, cmd);
        }
    }

    #[test]
    fn display_hides_payload() {
        let mut s = spec();
        s.meta.insert("secret".into(), "hunter2".into());
        let shown = register("web", "w1", s, Precondition::None).to_string();
        assert_eq!(shown, "register web/w1");
        assert!(!shown.contains("hunter2") && !shown.contains("10.0.0.1"));
        assert_eq!(expire(vec![]).to_string(), "expire-leases (0 instances)");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "does not move past")]
    fn index_must_move_forward() {
        let mut r = Registry::new();
        r.apply(5, &register("web", "w1", spec(), Precondition::None));
        r.apply(5, &register("web", "w2", spec(), Precondition::None));
    }

    // ---- persistent maps ----

    #[test]
    fn a_copy_keeps_its_state_while_the_original_changes() {
        let mut r = Registry::new();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            r.apply(
                i as u64 + 1,
                &register("web", id, spec(), Precondition::None),
            );
        }
        let copy = r.clone();
        let before = bytes(&copy);
        r.apply(4, &register("web", "d", spec(), Precondition::None));
        r.apply(5, &register("api", "x", spec(), Precondition::None));
        let lease = lease_ref(&r, "web", "a");
        r.apply(6, &expire(vec![lease]));
        r.apply(
            7,
            &Command::Deregister {
                service: "web".into(),
                id: "b".into(),
                precondition: Precondition::None,
                now_ms: 1_000,
                by: "service/web".into(),
            },
        );
        assert_eq!(bytes(&copy), before, "the copy saw a later change");
        assert_eq!(copy.index(), 3);
        assert_eq!(
            copy.instance("web", "a").map(|i| i.health),
            Some(Health::Passing)
        );
        assert!(copy.instance("web", "b").is_some());
        assert!(copy.instance("web", "d").is_none());
        assert_eq!(
            r.instance("web", "a").map(|i| i.health),
            Some(Health::Critical)
        );
        assert!(r.instance("web", "b").is_none());
    }

    /// Snapshots and backup files written before the maps became persistent must still
    /// decode, and new ones must decode in older builds: the encoding is that of sorted maps.
    #[test]
    fn serde_form_is_that_of_sorted_maps() {
        #[derive(Serialize)]
        struct OldEntry {
            instances: BTreeMap<String, Instance>,
            index: u64,
        }
        #[derive(Serialize)]
        struct OldRegistry {
            services: BTreeMap<String, OldEntry>,
            index: u64,
        }
        let mut r = Registry::new();
        // Inserted out of order: both forms must sort.
        for (i, (service, id)) in [("web", "b"), ("api", "z"), ("web", "a"), ("db", "m")]
            .into_iter()
            .enumerate()
        {
            r.apply(
                i as u64 + 1,
                &register(service, id, spec(), Precondition::None),
            );
        }
        let mut old = OldRegistry {
            services: BTreeMap::new(),
            index: r.index(),
        };
        for service in ["api", "db", "web"] {
            old.services.insert(
                service.into(),
                OldEntry {
                    instances: r
                        .instances(service, &Filter::default())
                        .into_iter()
                        .map(|i| (i.id.clone(), i))
                        .collect(),
                    index: r.service_index(service),
                },
            );
        }
        let old_bytes =
            bincode::serde::encode_to_vec(&old, bincode::config::standard()).expect("encode");
        assert_eq!(bytes(&r), old_bytes);
        let (decoded, _): (Registry, usize) =
            bincode::serde::decode_from_slice(&old_bytes, bincode::config::standard())
                .expect("decode");
        assert_eq!(decoded, r);
    }
}
