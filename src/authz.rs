//! authz: who may do what — actions, name patterns, roles, bindings, and the pure policy evaluation; the policy is replicated data whose commands the state machine applies. Knows nothing of HTTP, Raft, storage, clocks or I/O.
//!
//! A [`Policy`] holds roles (sets of [`Rule`]s: actions on service-name patterns) and
//! bindings (identity patterns granted roles). Evaluation is default-deny: a request is
//! allowed iff some binding matching the caller names a role with a rule that grants the
//! action on a pattern matching the resource. `admin` grants every action on its rule's
//! services; only the pattern `*` matches [`Resource::Cluster`], so cluster actions need
//! `*`.
//!
//! # Contract
//!
//! [`Policy::apply`] is a pure function of `(policy, command)`, like the registry's state
//! machine: only `BTreeMap`s, no clock or I/O, and it re-validates every command, so an
//! invalid one changes nothing. Everything stored in a policy passed that validation; the
//! matchers below rely on it only for speed, never for safety (an unexpected pattern
//! matches no valid name). Serde forms carry no skipped fields, so bincode can encode them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::registry::{self, Command, ValidationError};

/// Most rules in one role, service patterns in one rule, identity patterns or roles in one
/// binding. Bounds keep one command well under the request body limit.
pub const MAX_ITEMS: usize = 64;
/// Most roles, and most bindings, a policy holds; keeps the replicated state small.
pub const MAX_ENTRIES: usize = 1024;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_LEN: usize = 256;

const SELF_PATTERN: &str = "{self}";
const SERVICE_PATTERN_RULES: &str = "must be \"*\", \"{self}\", a service name (1-63 characters \
    of a-z, 0-9 and '-', not starting or ending with '-'), or the start of one followed by a \
    single trailing '*' (e.g. \"pay-*\")";
const IDENTITY_PATTERN_RULES: &str = "must be \"*\", \"<kind>/*\", an identity such as \
    \"service/payments\", \"operator/alice\" or \"node/3\", or \"service/<prefix>*\" / \
    \"operator/<prefix>*\"; kind is service, operator or node";
const CLUSTER_WIDE: &str = "snapshot and audit are cluster-wide: use services = [\"*\"]";

/// Something a caller may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Read, query or watch a service's instances.
    Discover,
    /// Register or update an instance of a service.
    Register,
    /// Remove an instance of a service.
    Deregister,
    /// Renew the lease of an instance of a service.
    Heartbeat,
    /// Everything on the rule's services, including overriding instance ownership; on
    /// `*` also the cluster (membership, leader transfer, policy changes, snapshot, audit).
    Admin,
    /// Take a snapshot (cluster-wide).
    Snapshot,
    /// Read the audit log (cluster-wide).
    Audit,
}

impl Action {
    /// Every action, in order.
    pub const ALL: [Action; 7] = [
        Action::Discover,
        Action::Register,
        Action::Deregister,
        Action::Heartbeat,
        Action::Admin,
        Action::Snapshot,
        Action::Audit,
    ];

    /// The lowercase name, as in policy files and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Discover => "discover",
            Action::Register => "register",
            Action::Deregister => "deregister",
            Action::Heartbeat => "heartbeat",
            Action::Admin => "admin",
            Action::Snapshot => "snapshot",
            Action::Audit => "audit",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Action`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action {0:?}: expected discover, register, deregister, heartbeat, admin, snapshot or audit")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAction(s.to_string()))
    }
}

/// What an action is performed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// One service, by name.
    Service(&'a str),
    /// The cluster itself; only the service pattern `*` matches it.
    Cluster,
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Service(name) => write!(f, "service {name:?}"),
            Resource::Cluster => f.write_str("the cluster"),
        }
    }
}

/// A refused request: who asked for what. Safe to show the caller (it names only them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{identity} may not {action} on {resource}")]
pub struct Denied {
    /// The caller, in `Display` form (or quoted, if it did not parse as an identity).
    pub identity: String,
    /// What it asked to do.
    pub action: Action,
    /// What on, in `Display` form of [`Resource`].
    pub resource: String,
}

/// Whether a name pattern (`*`, `pay-*`, `payments`; the part after `kind/` of an identity
/// pattern) matches `name`. A trailing `*` matches any rest, including none.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

fn service_matches(pattern: &str, who: &Identity, resource: Resource<'_>) -> bool {
    match resource {
        Resource::Cluster => pattern == "*",
        // Only a service is ever "itself": an operator or node named like a service must
        // not inherit what the service may do.
        Resource::Service(name) if pattern == SELF_PATTERN => {
            matches!(who, Identity::Service(own) if own == name)
        }
        Resource::Service(name) => name_matches(pattern, name),
    }
}

fn identity_matches(pattern: &str, who: &Identity) -> bool {
    if pattern == "*" {
        return true;
    }
    let Some((kind, rest)) = pattern.split_once('/') else {
        return false;
    };
    match who {
        Identity::Service(name) => kind == "service" && name_matches(rest, name),
        Identity::Operator(name) => kind == "operator" && name_matches(rest, name),
        // Node ids are numbers: `node/*` or one id, never a prefix.
        Identity::Node(id) => kind == "node" && (rest == "*" || is_node_id(rest, *id)),
    }
}

/// `text` is the canonical decimal spelling of `id` (no sign, no leading zero), compared
/// without allocating.
fn is_node_id(text: &str, id: u64) -> bool {
    !text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit()) && text.parse() == Ok(id)
}

/// The start of a DNS label: 1–62 chars of `a-z0-9-`, not starting with `-` (a trailing
/// `-` is fine: `pay-*`). 62 so that at least one character can follow.
fn is_label_prefix(s: &str) -> bool {
    (1..=62).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

fn check_service_pattern(p: &str) -> Result<(), &'static str> {
    let valid = p == "*"
        || p == SELF_PATTERN
        || match p.strip_suffix('*') {
            Some(prefix) => is_label_prefix(prefix),
            None => registry::validate_service_name(p).is_ok(),
        };
    valid.then_some(()).ok_or(SERVICE_PATTERN_RULES)
}

fn check_identity_pattern(p: &str) -> Result<(), &'static str> {
    let valid = p == "*"
        || match p.split_once('/') {
            Some(("service" | "operator" | "node", "*")) => true,
            Some(("service" | "operator", rest)) if rest.ends_with('*') => {
                rest.strip_suffix('*').is_some_and(is_label_prefix)
            }
            // identity.rs owns the canonical spelling of names and node ids.
            _ => p.parse::<Identity>().is_ok(),
        };
    valid.then_some(()).ok_or(IDENTITY_PATTERN_RULES)
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

/// Puts `prefix.` in front of the field of an error from a nested item.
fn nested(prefix: &str, e: ValidationError) -> ValidationError {
    invalid(format!("{prefix}.{}", e.field), e.message)
}

/// Role and binding names are DNS labels, spelled as service names are. Field `field`.
fn check_name(field: &str, name: &str) -> Result<(), ValidationError> {
    registry::validate_service_name(name).map_err(|e| invalid(field, e.message))
}

fn check_description(description: &str) -> Result<(), ValidationError> {
    // Control characters would corrupt logs and terminal output.
    if description.chars().count() > MAX_DESCRIPTION_LEN
        || description.chars().any(char::is_control)
    {
        return Err(invalid(
            "description",
            "must be at most 256 characters, without control characters",
        ));
    }
    Ok(())
}

fn check_count(field: &str, len: usize, what: &str) -> Result<(), ValidationError> {
    if (1..=MAX_ITEMS).contains(&len) {
        Ok(())
    } else {
        Err(invalid(field, format!("must hold 1-{MAX_ITEMS} {what}")))
    }
}

/// Some actions on the services matching any of some patterns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// What is allowed; `admin` implies every action.
    pub actions: BTreeSet<Action>,
    /// Service-name patterns: `*`, `{self}`, `payments`, `pay-*`.
    pub services: Vec<String>,
}

impl Rule {
    /// Checks the rule; fields are `actions`, `services`, `services[i]`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.actions.is_empty() {
            return Err(invalid("actions", "must hold at least one action"));
        }
        check_count("services", self.services.len(), "service patterns")?;
        for (i, p) in self.services.iter().enumerate() {
            check_service_pattern(p).map_err(|m| invalid(format!("services[{i}]"), m))?;
        }
        let cluster_wide =
            self.actions.contains(&Action::Snapshot) || self.actions.contains(&Action::Audit);
        if cluster_wide && self.services != ["*"] {
            return Err(invalid("actions", CLUSTER_WIDE));
        }
        Ok(())
    }

    fn allows(&self, who: &Identity, action: Action, resource: Resource<'_>) -> bool {
        (self.actions.contains(&action) || self.actions.contains(&Action::Admin))
            && self
                .services
                .iter()
                .any(|p| service_matches(p, who, resource))
    }
}

/// A named set of rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// A DNS label, unique in the policy.
    pub name: String,
    /// Free text for humans, at most 256 characters.
    #[serde(default)]
    pub description: String,
    /// 1–64 rules; the role allows what any of them allows.
    pub rules: Vec<Rule>,
}

impl Role {
    /// Checks the role; fields are `name`, `description`, `rules`, `rules[i].…`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_name("name", &self.name)?;
        check_description(&self.description)?;
        check_count("rules", self.rules.len(), "rules")?;
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate()
                .map_err(|e| nested(&format!("rules[{i}]"), e))?;
        }
        Ok(())
    }
}

/// Grants roles to every identity matching any of some patterns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// A DNS label, unique in the policy.
    pub name: String,
    /// Free text for humans, at most 256 characters.
    #[serde(default)]
    pub description: String,
    /// 1–64 identity patterns: `*`, `service/*`, `operator/alice`, `service/pay-*`, `node/3`.
    pub identities: Vec<String>,
    /// 1–64 role names; each must exist when the binding is put.
    pub roles: Vec<String>,
}

impl Binding {
    /// Checks the binding on its own (not whether its roles exist); fields are `name`,
    /// `description`, `identities`, `identities[i]`, `roles`, `roles[i]`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_name("name", &self.name)?;
        check_description(&self.description)?;
        check_count("identities", self.identities.len(), "identity patterns")?;
        for (i, p) in self.identities.iter().enumerate() {
            check_identity_pattern(p).map_err(|m| invalid(format!("identities[{i}]"), m))?;
        }
        check_count("roles", self.roles.len(), "role names")?;
        for (i, role) in self.roles.iter().enumerate() {
            check_name(&format!("roles[{i}]"), role)?;
        }
        Ok(())
    }

    /// Checks that every role named exists; field `roles[i]`.
    fn check_roles_exist(&self, exists: impl Fn(&str) -> bool) -> Result<(), ValidationError> {
        match self.roles.iter().enumerate().find(|(_, r)| !exists(r)) {
            Some((i, role)) => Err(invalid(
                format!("roles[{i}]"),
                format!("no role named {role:?}"),
            )),
            None => Ok(()),
        }
    }

    /// Whether `who` matches one of this binding's identity patterns.
    pub fn matches(&self, who: &Identity) -> bool {
        self.identities.iter().any(|p| identity_matches(p, who))
    }
}

/// The bootstrap policy file (TOML): `[[roles]]` and `[[bindings]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Roles, unique by name.
    #[serde(default)]
    pub roles: Vec<Role>,
    /// Bindings, unique by name, naming roles of this file.
    #[serde(default)]
    pub bindings: Vec<Binding>,
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    /// Not TOML, or not the shape of a policy (unknown field, wrong type).
    #[error("policy file is not a valid policy document: {0}")]
    Syntax(#[from] toml::de::Error),
    /// Well-formed, but an item breaks a rule; the field is its path (`roles[0].name`).
    #[error("policy file: {0}")]
    Invalid(#[from] ValidationError),
}

impl PolicyFile {
    /// Parses and validates a policy file.
    pub fn from_toml(text: &str) -> Result<PolicyFile, PolicyFileError> {
        let file: PolicyFile = toml::from_str(text)?;
        file.validate()?;
        Ok(file)
    }

    /// Checks every item, unique names and that bindings name roles of this file; the
    /// field is the path of the first offending item (`bindings[1].roles[0]`).
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (field, len) in [
            ("roles", self.roles.len()),
            ("bindings", self.bindings.len()),
        ] {
            if len > MAX_ENTRIES {
                return Err(invalid(field, format!("at most {MAX_ENTRIES} {field}")));
            }
        }
        let mut roles = BTreeMap::new();
        for (i, role) in self.roles.iter().enumerate() {
            let path = format!("roles[{i}]");
            role.validate().map_err(|e| nested(&path, e))?;
            if let Some(j) = roles.insert(role.name.as_str(), i) {
                return Err(invalid(
                    format!("{path}.name"),
                    format!("duplicate role name {:?}, also roles[{j}]", role.name),
                ));
            }
        }
        let mut bindings = BTreeMap::new();
        for (i, binding) in self.bindings.iter().enumerate() {
            let path = format!("bindings[{i}]");
            binding
                .validate()
                .and_then(|()| binding.check_roles_exist(|r| roles.contains_key(r)))
                .map_err(|e| nested(&path, e))?;
            if let Some(j) = bindings.insert(binding.name.as_str(), i) {
                return Err(invalid(
                    format!("{path}.name"),
                    format!(
                        "duplicate binding name {:?}, also bindings[{j}]",
                        binding.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// One replicated change to the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AclCommand {
    /// Create or replace a role.
    PutRole(Role),
    /// Remove the role `name`; refused while a binding names it.
    DeleteRole { name: String },
    /// Create or replace a binding; its roles must exist.
    PutBinding(Binding),
    /// Remove the binding `name`.
    DeleteBinding { name: String },
    /// Install the policy file, only if the policy was never bootstrapped or changed.
    Bootstrap(PolicyFile),
}

impl fmt::Display for AclCommand {
    /// A short form for logs: the kind and the name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AclCommand::PutRole(role) => write!(f, "put-role {}", role.name),
            AclCommand::DeleteRole { name } => write!(f, "delete-role {name}"),
            AclCommand::PutBinding(binding) => write!(f, "put-binding {}", binding.name),
            AclCommand::DeleteBinding { name } => write!(f, "delete-binding {name}"),
            AclCommand::Bootstrap(file) => write!(
                f,
                "bootstrap ({} roles, {} bindings)",
                file.roles.len(),
                file.bindings.len()
            ),
        }
    }
}

/// The result of applying one [`AclCommand`]; only the first five can be changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AclOutcome {
    /// The role is stored; `created` is false for a replacement.
    RolePut { created: bool },
    /// The role is gone.
    RoleDeleted,
    /// The binding is stored; `created` is false for a replacement.
    BindingPut { created: bool },
    /// The binding is gone.
    BindingDeleted,
    /// `applied` is false if the policy had already been bootstrapped or changed.
    Bootstrapped { applied: bool },
    /// Delete of something absent (`what` is e.g. `role "ops"`); nothing changed.
    NotFound { what: String },
    /// The command would break the policy (a role still bound, a full policy); `reason`
    /// names the items involved. Nothing changed.
    Conflict { reason: String },
    /// The command is invalid; nothing changed.
    Invalid(ValidationError),
}

impl AclOutcome {
    /// Whether the command changed the policy.
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            AclOutcome::RolePut { .. }
                | AclOutcome::RoleDeleted
                | AclOutcome::BindingPut { .. }
                | AclOutcome::BindingDeleted
                | AclOutcome::Bootstrapped { applied: true }
        )
    }
}

/// The replicated access policy. The default is empty and not bootstrapped: it denies
/// everything, to everyone.
///
/// Invariants, kept by [`Policy::apply`]: every role and binding is valid and stored under
/// its own name; every role a binding names exists; a policy that is not bootstrapped is
/// empty. Its serde form is part of the snapshot and deterministic (only `BTreeMap`s).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    roles: BTreeMap<String, Role>,
    bindings: BTreeMap<String, Binding>,
    /// Set by the first change of any kind, so a bootstrap file (applied by every node at
    /// start-up) never overwrites a policy an operator has managed since.
    bootstrapped: bool,
}

impl Policy {
    /// `Ok` iff some binding matching `who` names a role with a rule granting `action` (or
    /// `admin`) on a pattern matching `resource`. Allocates only to describe a denial.
    pub fn authorize(
        &self,
        who: &Identity,
        action: Action,
        resource: Resource<'_>,
    ) -> Result<(), Denied> {
        if self.allows(who, action, resource) {
            Ok(())
        } else {
            Err(Denied {
                identity: who.to_string(),
                action,
                resource: resource.to_string(),
            })
        }
    }

    /// [`authorize`](Self::authorize) as a boolean, e.g. to filter a list of services.
    pub fn allows(&self, who: &Identity, action: Action, resource: Resource<'_>) -> bool {
        self.bindings
            .values()
            .filter(|b| b.matches(who))
            .flat_map(|b| &b.roles)
            .filter_map(|name| self.roles.get(name))
            .flat_map(|role| &role.rules)
            .any(|rule| rule.allows(who, action, resource))
    }

    /// Every role, by name.
    pub fn roles(&self) -> impl Iterator<Item = &Role> {
        self.roles.values()
    }

    /// One role.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// Every binding, by name.
    pub fn bindings(&self) -> impl Iterator<Item = &Binding> {
        self.bindings.values()
    }

    /// One binding.
    pub fn binding(&self, name: &str) -> Option<&Binding> {
        self.bindings.get(name)
    }

    /// Whether a bootstrap file was installed or the policy was ever changed.
    pub fn is_bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    /// Applies one command.
    ///
    /// Contract: a pure function of `(self, cmd)`; the same inputs give the same policy and
    /// outcome on every replica. The command is re-validated here (the API validates
    /// first, but the log must not be able to corrupt the policy): an outcome that is not
    /// [`is_change`](AclOutcome::is_change) leaves the policy exactly as it was. Every
    /// change sets `bootstrapped`.
    pub fn apply(&mut self, cmd: &AclCommand) -> AclOutcome {
        let outcome = match cmd {
            AclCommand::PutRole(role) => self.put_role(role),
            AclCommand::DeleteRole { name } => self.delete_role(name),
            AclCommand::PutBinding(binding) => self.put_binding(binding),
            AclCommand::DeleteBinding { name } => self.delete_binding(name),
            AclCommand::Bootstrap(file) => self.bootstrap(file),
        };
        if outcome.is_change() {
            self.bootstrapped = true;
        }
        outcome
    }

    fn put_role(&mut self, role: &Role) -> AclOutcome {
        if let Err(e) = role.validate() {
            return AclOutcome::Invalid(e);
        }
        let created = !self.roles.contains_key(&role.name);
        if created && self.roles.len() >= MAX_ENTRIES {
            return AclOutcome::Conflict {
                reason: format!("the policy already holds {MAX_ENTRIES} roles"),
            };
        }
        self.roles.insert(role.name.clone(), role.clone());
        AclOutcome::RolePut { created }
    }

    fn delete_role(&mut self, name: &str) -> AclOutcome {
        if let Err(e) = check_name("name", name) {
            return AclOutcome::Invalid(e);
        }
        if !self.roles.contains_key(name) {
            return AclOutcome::NotFound {
                what: format!("role {name:?}"),
            };
        }
        let users: Vec<String> = self
            .bindings
            .values()
            .filter(|b| b.roles.iter().any(|r| r == name))
            .map(|b| format!("{:?}", b.name))
            .collect();
        if !users.is_empty() {
            return AclOutcome::Conflict {
                reason: format!(
                    "role {name:?} is named by bindings {}; change or delete them first",
                    users.join(", ")
                ),
            };
        }
        self.roles.remove(name);
        AclOutcome::RoleDeleted
    }

    fn put_binding(&mut self, binding: &Binding) -> AclOutcome {
        if let Err(e) = binding
            .validate()
            .and_then(|()| binding.check_roles_exist(|r| self.roles.contains_key(r)))
        {
            return AclOutcome::Invalid(e);
        }
        let created = !self.bindings.contains_key(&binding.name);
        if created && self.bindings.len() >= MAX_ENTRIES {
            return AclOutcome::Conflict {
                reason: format!("the policy already holds {MAX_ENTRIES} bindings"),
            };
        }
        self.bindings.insert(binding.name.clone(), binding.clone());
        AclOutcome::BindingPut { created }
    }

    fn delete_binding(&mut self, name: &str) -> AclOutcome {
        if let Err(e) = check_name("name", name) {
            return AclOutcome::Invalid(e);
        }
        match self.bindings.remove(name) {
            Some(_) => AclOutcome::BindingDeleted,
            None => AclOutcome::NotFound {
                what: format!("binding {name:?}"),
            },
        }
    }

    fn bootstrap(&mut self, file: &PolicyFile) -> AclOutcome {
        if self.bootstrapped {
            return AclOutcome::Bootstrapped { applied: false };
        }
        // An invalid file leaves the policy unbootstrapped, so a corrected one still applies.
        if let Err(e) = file.validate() {
            return AclOutcome::Invalid(e);
        }
        // Not bootstrapped implies empty (every change bootstraps), so this replaces nothing.
        self.roles = file
            .roles
            .iter()
            .map(|r| (r.name.clone(), r.clone()))
            .collect();
        self.bindings = file
            .bindings
            .iter()
            .map(|b| (b.name.clone(), b.clone()))
            .collect();
        AclOutcome::Bootstrapped { applied: true }
    }
}

/// The apply-time gate for a registry command: `Ok(may_override_owner)` if its caller may
/// run it, where `may_override_owner` is whether the caller has `admin` on the service.
///
/// Run by every replica at the command's log position against the policy at that same
/// position, so all replicas decide alike even if the policy changed after the proposal.
/// `Register` needs `register` by `owner`, `Deregister` needs `deregister` by `by`; a caller
/// that does not parse as an identity is denied. Lease commands come only from the leader
/// and are not checked.
pub fn check_command(policy: &Policy, cmd: &Command) -> Result<bool, Denied> {
    let (service, caller, action) = match cmd {
        Command::Register { service, owner, .. } => (service, owner, Action::Register),
        Command::Deregister { service, by, .. } => (service, by, Action::Deregister),
        Command::ExpireLeases { .. } | Command::Revive { .. } | Command::Reap { .. } => {
            return Ok(false)
        }
    };
    let resource = Resource::Service(service);
    let Ok(who) = caller.parse::<Identity>() else {
        return Err(Denied {
            // Quoted: the text is not a known identity and may hold anything.
            identity: format!("{caller:?}"),
            action,
            resource: resource.to_string(),
        });
    };
    policy.authorize(&who, action, resource)?;
    Ok(policy.allows(&who, Action::Admin, resource))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{InstanceSpec, LeaseRef, Precondition};
    use Action::*;

    const EXAMPLE: &str = r#"
[[roles]]
name = "admin"
rules = [{ actions = ["admin"], services = ["*"] }]
[[roles]]
name = "service-self"
description = "a service manages and discovers its own instances"
rules = [{ actions = ["register", "deregister", "heartbeat", "discover"], services = ["{self}"] }]
[[bindings]]
name = "operators"
identities = ["operator/admin"]
roles = ["admin"]
[[bindings]]
name = "services"
identities = ["service/*"]
roles = ["service-self"]
"#;

    fn id(text: &str) -> Identity {
        text.parse().expect(text)
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    /// `rule("admin discover", "pay-* web")`.
    fn rule(actions: &str, services: &str) -> Rule {
        let actions = actions.split_whitespace().map(|a| a.parse().expect(a));
        let services = words(services);
        Rule {
            actions: actions.collect(),
            services,
        }
    }

    fn role(name: &str, rules: &[Rule]) -> Role {
        let (name, rules) = (name.to_owned(), rules.to_vec());
        let description = String::new();
        Role {
            name,
            description,
            rules,
        }
    }

    /// `binding("ops", "operator/* node/1", "admin reader")`.
    fn binding(name: &str, identities: &str, roles: &str) -> Binding {
        let (name, description) = (name.to_owned(), String::new());
        let (identities, roles) = (words(identities), words(roles));
        Binding {
            name,
            description,
            identities,
            roles,
        }
    }

    fn file(roles: Vec<Role>, bindings: Vec<Binding>) -> PolicyFile {
        PolicyFile { roles, bindings }
    }

    fn bootstrapped(file: PolicyFile) -> Policy {
        let mut p = Policy::default();
        let out = p.apply(&AclCommand::Bootstrap(file));
        assert_eq!(out, AclOutcome::Bootstrapped { applied: true });
        p
    }

    fn field_of(r: Result<(), ValidationError>) -> String {
        r.expect_err("invalid").field
    }

    fn example_file() -> PolicyFile {
        PolicyFile::from_toml(EXAMPLE).expect("the example parses")
    }

    fn delete_role(name: &str) -> AclCommand {
        let name = name.to_owned();
        AclCommand::DeleteRole { name }
    }

    fn delete_binding(name: &str) -> AclCommand {
        let name = name.to_owned();
        AclCommand::DeleteBinding { name }
    }

    #[test]
    fn service_patterns() {
        let long = ["a".repeat(63), format!("{}*", "a".repeat(62))];
        let good = "* {self} payments pay-* pay* p* 1* a self";
        for p in good.split(' ').chain(long.iter().map(String::as_str)) {
            assert_eq!(check_service_pattern(p), Ok(()), "{p:?}");
        }
        let too_long = ["a".repeat(64), format!("{}*", "a".repeat(63))];
        let bad = "** pay** *pay p*y -pay* Pay* pay_* pay- -pay Payments pay.x {self}* {Self} \
                   {other} service/payments";
        let odd = ["", "pay ments", &too_long[0], &too_long[1]];
        for p in bad.split(' ').chain(odd) {
            let got = check_service_pattern(p);
            assert_eq!(got, Err(SERVICE_PATTERN_RULES), "{p:?}");
        }
    }

    #[test]
    fn identity_patterns() {
        let good = "* service/* operator/* node/* service/payments operator/alice node/3 \
                    node/18446744073709551615 service/pay-* service/p* operator/sre-*";
        for p in good.split(' ') {
            assert_eq!(check_identity_pattern(p), Ok(()), "{p:?}");
        }
        let bad = "** */* service service/ service/** service/*pay service/Pay* service/-pay* \
                   service/pay- Service/payments user/alice node/0 node/01 node/+1 node/1* node/x \
                   node/18446744073709551616 node/1/2 operator/alice/ spiffe://cairn/node/1";
        for p in bad.split(' ').chain(["", "service/pay ments"]) {
            let got = check_identity_pattern(p);
            assert_eq!(got, Err(IDENTITY_PATTERN_RULES), "{p:?}");
        }
    }

    #[test]
    fn actions_display_parse_and_serde_alike() {
        for a in Action::ALL {
            assert_eq!(a.to_string().parse::<Action>(), Ok(a));
            let json = serde_json::to_string(&a).expect("json");
            assert_eq!(json, format!("\"{a}\""));
        }
        let unknown = "Admin".parse::<Action>();
        assert_eq!(unknown, Err(UnknownAction("Admin".into())));
    }

    #[test]
    fn item_validation_names_the_field() {
        let ok = [rule("discover", "*")];
        let described = |d: String| Role {
            description: d,
            ..role("r", &[rule("discover", "*")])
        };
        let many = "p ".repeat(65);
        let cases = [
            (role("R", &ok), "name", "1-63"),
            (role("", &ok), "name", "1-63"),
            (role("r", &[]), "rules", "1-64 rules"),
            (role("r", &vec![ok[0].clone(); 65]), "rules", "1-64 rules"),
            (role("r", &[rule("", "*")]), "rules[0].actions", "one"),
            (
                role("r", &[rule("discover", "")]),
                "rules[0].services",
                "1-64",
            ),
            (
                role("r", &[rule("audit", &many)]),
                "rules[0].services",
                "1-64",
            ),
            (
                role("r", &[rule("snapshot", "pay-*")]),
                "rules[0].actions",
                CLUSTER_WIDE,
            ),
            (
                role("r", &[rule("audit admin", "* w")]),
                "rules[0].actions",
                CLUSTER_WIDE,
            ),
            (described("x".repeat(257)), "description", "256"),
            (described("a\nb".into()), "description", "control"),
        ];
        for (r, field, message) in cases {
            let e = r.validate().expect_err(field);
            assert_eq!(e.field, field, "{r:?}");
            assert!(e.message.contains(message), "{e}");
        }
        let nested = role("r", &[ok[0].clone(), rule("admin", "web ok p**")]);
        let want = invalid("rules[1].services[2]", SERVICE_PATTERN_RULES);
        assert_eq!(nested.validate(), Err(want));
        assert_eq!(described("é".repeat(256)).validate(), Ok(()));
        let cluster = role("r", &[rule("snapshot audit admin", "*")]);
        assert_eq!(cluster.validate(), Ok(()));

        assert_eq!(binding("b", "* node/1", "r").validate(), Ok(()));
        for (b, field) in [
            (binding("-b", "*", "r"), "name"),
            (binding("b", "", "r"), "identities"),
            (binding("b", "* nobody", "r"), "identities[1]"),
            (binding("b", "*", ""), "roles"),
            (binding("b", "*", "r Bad"), "roles[1]"),
        ] {
            let e = b.validate().expect_err(field);
            assert_eq!(e.field, field, "{b:?}");
        }
    }

    #[test]
    fn policy_file_example_parses_and_evaluates() {
        let f = example_file();
        assert_eq!(f.roles[0], role("admin", &[rule("admin", "*")]));
        let description = "a service manages and discovers its own instances";
        assert_eq!(f.roles[1].description, description);
        let services = binding("services", "service/*", "service-self");
        assert_eq!(f.bindings[1], services);
        let p = bootstrapped(f);
        let pay = Resource::Service("payments");
        assert!(p.allows(&id("operator/admin"), Snapshot, Resource::Cluster));
        assert!(p.allows(&id("service/payments"), Heartbeat, pay));
        assert!(!p.allows(&id("service/payments"), Admin, pay));
        assert!(!p.allows(&id("service/web"), Discover, pay));
        assert!(!p.allows(&id("operator/alice"), Discover, pay));
    }

    #[test]
    fn policy_file_errors_name_the_path() {
        let a =
            "[[roles]]\nname = \"a\"\nrules = [{ actions = [\"admin\"], services = [\"*\"] }]\n";
        let bind = |name: &str, roles: &str| {
            format!("[[bindings]]\nname = \"{name}\"\nidentities = [\"*\"]\nroles = [{roles}]\n")
        };
        let (b, b2, ghost) = (
            bind("b", "\"a\""),
            bind("B", "\"a\""),
            bind("b", "\"a\", \"z\""),
        );
        let cases = [
            (format!("{a}{a}"), "roles[1].name"),
            (
                a.replace("\"*\"", "\"x\", \"Y\""),
                "roles[0].rules[0].services[1]",
            ),
            (format!("{a}{ghost}"), "bindings[0].roles[1]"),
            (b.clone(), "bindings[0].roles[0]"),
            (format!("{a}{b}{b}"), "bindings[1].name"),
            (format!("{a}{b2}"), "bindings[0].name"),
        ];
        for (text, field) in cases {
            match PolicyFile::from_toml(&text) {
                Err(PolicyFileError::Invalid(e)) => assert_eq!(e.field, field, "{e}"),
                other => panic!("{field}: {other:?}"),
            }
        }
        // Order does not matter: bindings may come first.
        assert!(PolicyFile::from_toml(&format!("{b}{a}")).is_ok());
        let syntax = [
            a.replace("rules", "rule"),
            a.replace("admin", "read"),
            "roles = 3".into(),
            "[[roles]\n".into(),
            "owner = \"x\"".into(),
        ];
        for text in syntax {
            let out = PolicyFile::from_toml(&text);
            let ok = matches!(out, Err(PolicyFileError::Syntax(_)));
            assert!(ok, "{text}: {out:?}");
        }
        let empty = PolicyFile::from_toml("").expect("empty");
        assert_eq!(empty, PolicyFile::default());
    }

    /// The example plus an admin of `pay-*`, an auditor and a reader of one service.
    fn representative() -> Policy {
        let mut f = example_file();
        f.roles.extend([
            role("pay-admin", &[rule("admin", "pay-*")]),
            role("reader", &[rule("discover", "*")]),
            role("backup", &[rule("snapshot audit", "*")]),
            role("web-reader", &[rule("discover", "web")]),
        ]);
        f.bindings.extend([
            binding("pay-team", "operator/pat", "pay-admin"),
            binding("auditors", "operator/audit", "backup reader"),
            binding("carol", "operator/carol", "web-reader"),
        ]);
        bootstrapped(f)
    }

    /// One letter per action in `Action::ALL` order, `.` where denied.
    fn row(p: &Policy, who: &Identity, resource: Resource<'_>) -> String {
        let letters = Action::ALL.iter().zip("drghasu".chars());
        let letter = |(a, c): (&Action, char)| if p.allows(who, *a, resource) { c } else { '.' };
        letters.map(letter).collect()
    }

    #[test]
    fn evaluation_table() {
        let p = representative();
        let services = ["payments", "pay-x", "web"].map(Resource::Service);
        let (all, none) = ("drghasu", ".......");
        // Columns: the cluster, then `services`.
        let table: [(&str, [&str; 4]); 8] = [
            ("operator/admin", [all, all, all, all]),
            // admin on pay-* is everything there, but not the cluster, nor "payments".
            ("operator/pat", [none, none, all, none]),
            ("operator/audit", ["d....su"; 4]),
            // Bound to a role whose only rule is for another service.
            ("operator/carol", [none, none, none, "d......"]),
            ("operator/nobody", [none; 4]),
            ("service/payments", [none, "drgh...", none, none]),
            ("service/web", [none, none, none, "drgh..."]),
            ("node/1", [none; 4]),
        ];
        for (who, expected) in table {
            let who = id(who);
            let columns = std::iter::once(Resource::Cluster).chain(services);
            for (resource, want) in columns.zip(expected) {
                assert_eq!(row(&p, &who, resource), want, "{who} on {resource}");
            }
        }
        let denied = p.authorize(&id("service/web"), Register, services[0]);
        let shown = "service/web may not register on service \"payments\"";
        assert_eq!(denied.expect_err("denied").to_string(), shown);
        let denied = p.authorize(&id("operator/bob"), Admin, Resource::Cluster);
        let shown = "operator/bob may not admin on the cluster";
        assert_eq!(denied.expect_err("denied").to_string(), shown);
        assert_eq!(p.authorize(&id("operator/pat"), Admin, services[1]), Ok(()));
    }

    #[test]
    fn empty_policy_denies_everything() {
        let p = Policy::default();
        assert!(!p.is_bootstrapped());
        for who in ["node/1", "node/2", "service/payments", "operator/admin"] {
            for r in [Resource::Cluster, Resource::Service("payments")] {
                assert_eq!(row(&p, &id(who), r), ".......", "{who}");
            }
        }
        // Roles without bindings grant nothing either.
        let p = bootstrapped(file(vec![role("all", &[rule("admin", "*")])], vec![]));
        assert_eq!(row(&p, &id("operator/admin"), Resource::Cluster), ".......");
    }

    /// `(who, action, service, allowed)` spot checks of `{self}`, prefixes and combinations.
    #[test]
    fn self_prefixes_and_combined_bindings() {
        let mut f = example_file();
        f.roles.extend([
            role("pay-reader", &[rule("discover", "pay* web")]),
            role("dash", &[rule("register", "pay-*"), rule("heartbeat", "x")]),
        ]);
        f.bindings.extend([
            binding("a", "service/pay-* operator/alice", "pay-reader"),
            binding("b", "service/pay-ui", "dash"),
            binding("c", "node/2 operator/payments", "pay-reader dash"),
        ]);
        let p = bootstrapped(f);
        let cases = [
            // {self}: only the service itself, never a prefix, operator or node.
            ("service/payments", Deregister, "payments", true),
            ("service/pay", Deregister, "payments", false),
            ("service/payments", Deregister, "pay", false),
            ("service/web", Register, "payments", false),
            ("operator/payments", Register, "payments", false),
            ("node/2", Register, "2", false),
            // pay* matches pay itself; pay-* does not match payments.
            ("service/pay-ui", Discover, "pay", true),
            ("service/pay-ui", Discover, "payments", true),
            ("service/pay-ui", Register, "pay-x", true),
            ("service/pay-ui", Register, "payments", false),
            ("service/pay-api", Register, "pay-x", false),
            // service/pay-* does not match service/payments.
            ("service/payments", Discover, "web", false),
            ("operator/alice", Discover, "web", true),
            ("operator/alice", Discover, "db", false),
            // Two roles through one binding.
            ("node/2", Heartbeat, "x", true),
            ("node/2", Discover, "pay", true),
            ("node/2", Register, "x", false),
            ("node/1", Discover, "pay", false),
        ];
        for (who, action, service, want) in cases {
            let got = p.allows(&id(who), action, Resource::Service(service));
            assert_eq!(got, want, "{who} {action} {service}");
        }
        let me = id("service/payments");
        assert!(!p.allows(&me, Register, Resource::Cluster));
        assert!(!p.allows(&id("node/2"), Discover, Resource::Cluster));
    }

    /// The spec, transcribed naively on the identity's text form: a binding matching the
    /// caller, a rule with the action or admin, a pattern matching the resource.
    fn oracle(model: &[(String, Vec<Rule>)], who: &str, action: Action, r: Resource) -> bool {
        let identity_ok = |p: &str| match p.strip_suffix('*') {
            Some(prefix) => who.starts_with(prefix),
            None => who == p,
        };
        let service_ok = |p: &String| match r {
            Resource::Cluster => p == "*",
            Resource::Service(name) => {
                (p == "{self}" && who == format!("service/{name}"))
                    || p.strip_suffix('*').is_some_and(|x| name.starts_with(x))
                    || p == name
            }
        };
        let rule_ok = |rule: &Rule| {
            let acts = &rule.actions;
            (acts.contains(&action) || acts.contains(&Admin))
                && rule.services.iter().any(service_ok)
        };
        model
            .iter()
            .any(|(ids, rules)| ids.split(' ').any(identity_ok) && rules.iter().any(rule_ok))
    }

    #[test]
    fn small_universe_matches_oracle() {
        let action_sets = ["discover", "register heartbeat", "admin", "snapshot"];
        let service_lists = ["*", "{self}", "pay*", "pay-* web", "payments"];
        let patterns = "* service/* operator/* node/* service/pay* operator/alice node/1";
        let rules: Vec<Rule> = action_sets
            .iter()
            .flat_map(|a| service_lists.map(|s| rule(a, s)))
            .filter(|r| r.validate().is_ok())
            .collect();
        assert_eq!(rules.len(), 16, "snapshot only on *");
        let choices: Vec<(&Rule, &str)> = patterns
            .split(' ')
            .flat_map(|p| rules.iter().map(move |r| (r, p)))
            .collect();
        let whos = "node/1 node/2 service/pay service/payments service/web operator/alice \
                    operator/pay";
        let whos: Vec<(Identity, &str)> = whos.split(' ').map(|w| (id(w), w)).collect();
        let services = ["pay", "payments", "pay-x", "web", "other"].map(Resource::Service);
        let resources: Vec<Resource> = services.into_iter().chain([Resource::Cluster]).collect();
        // Models: no rule; one rule; two rules each in its own role and binding; two rules
        // in one role, bound to both identity patterns by one binding.
        let mut models: Vec<Vec<(String, Vec<Rule>)>> = vec![vec![]];
        // Bindings and rules combine symmetrically, so each unordered pair is enough.
        for (i, &(r1, p1)) in choices.iter().enumerate() {
            models.push(vec![(p1.into(), vec![r1.clone()])]);
            for &(r2, p2) in &choices[i..] {
                let apart = [(p1.into(), vec![r1.clone()]), (p2.into(), vec![r2.clone()])];
                models.push(apart.to_vec());
                models.push(vec![(format!("{p1} {p2}"), vec![r1.clone(), r2.clone()])]);
            }
        }
        let (mut allowed, mut total) = (0usize, 0usize);
        for model in &models {
            let mut p = Policy::default();
            for (i, (identities, rules)) in model.iter().enumerate() {
                let name = format!("r{i}");
                let put = p.apply(&AclCommand::PutRole(role(&name, rules)));
                assert!(put.is_change());
                let b = binding(&format!("b{i}"), identities, &name);
                assert!(p.apply(&AclCommand::PutBinding(b)).is_change());
            }
            for (who, text) in &whos {
                for (action, &r) in Action::ALL
                    .into_iter()
                    .flat_map(|a| resources.iter().map(move |r| (a, r)))
                {
                    let want = oracle(model, text, action, r);
                    let got = p.allows(who, action, r);
                    assert_eq!(got, want, "{model:?} {text} {action} {r}");
                    allowed += usize::from(want);
                    total += 1;
                }
            }
        }
        // Both answers must be common, or agreeing on them proves little.
        let balanced = allowed > total / 20 && allowed < total / 2;
        assert!(balanced, "{allowed} of {total}");
    }

    #[test]
    fn puts_upsert_and_deletes_check_use() {
        let mut p = Policy::default();
        let put_role = |r: &Role| AclCommand::PutRole(r.clone());
        let (created, replaced) = (
            AclOutcome::RolePut { created: true },
            AclOutcome::RolePut { created: false },
        );
        let admin = role("admin", &[rule("admin", "*")]);
        assert_eq!(p.apply(&put_role(&admin)), created);
        assert!(p.is_bootstrapped());
        let described = Role {
            description: "all of it".into(),
            ..admin
        };
        assert_eq!(p.apply(&put_role(&described)), replaced);
        assert_eq!(p.role("admin"), Some(&described));
        let ops = AclCommand::PutBinding(binding("ops", "operator/*", "admin"));
        assert_eq!(p.apply(&ops), AclOutcome::BindingPut { created: true });
        assert_eq!(p.apply(&ops), AclOutcome::BindingPut { created: false });
        p.apply(&AclCommand::PutBinding(binding("more", "node/1", "admin")));
        let names: Vec<&str> = p.bindings().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["more", "ops"]);
        let ops_roles = p.binding("ops").map(|b| b.roles.clone());
        assert_eq!(ops_roles, Some(words("admin")));

        match p.apply(&delete_role("admin")) {
            AclOutcome::Conflict { reason } => assert!(reason.contains("\"more\", \"ops\"")),
            other => panic!("{other:?}"),
        }
        for name in ["ops", "more"] {
            assert_eq!(p.apply(&delete_binding(name)), AclOutcome::BindingDeleted);
        }
        assert_eq!(p.apply(&delete_role("admin")), AclOutcome::RoleDeleted);
        assert_eq!(p.roles().count() + p.bindings().count(), 0);
        // An emptied policy stays operator-managed.
        let out = p.apply(&AclCommand::Bootstrap(example_file()));
        assert_eq!(out, AclOutcome::Bootstrapped { applied: false });
    }

    #[test]
    fn failed_commands_change_nothing() {
        let mut p = bootstrapped(example_file());
        let before = p.clone();
        let not_found = |what: &str| AclOutcome::NotFound { what: what.into() };
        let bound = "role \"service-self\" is named by bindings \"services\"; change or delete \
                     them first";
        let cases = [
            (
                AclCommand::PutRole(role("x", &[rule("audit", "pay-*")])),
                AclOutcome::Invalid(invalid("rules[0].actions", CLUSTER_WIDE)),
            ),
            (
                AclCommand::PutBinding(binding("x", "service/*", "admin ghost")),
                AclOutcome::Invalid(invalid("roles[1]", "no role named \"ghost\"")),
            ),
            (
                AclCommand::PutBinding(binding("x", "services/*", "admin")),
                AclOutcome::Invalid(invalid("identities[0]", IDENTITY_PATTERN_RULES)),
            ),
            (delete_role("ghost"), not_found("role \"ghost\"")),
            (delete_binding("ghost"), not_found("binding \"ghost\"")),
            (
                delete_role("service-self"),
                AclOutcome::Conflict {
                    reason: bound.into(),
                },
            ),
            (
                AclCommand::Bootstrap(PolicyFile::default()),
                AclOutcome::Bootstrapped { applied: false },
            ),
        ];
        for (cmd, want) in cases {
            let out = p.apply(&cmd);
            assert_eq!(out, want, "{cmd}");
            assert!(!out.is_change());
            assert_eq!(p, before, "{cmd}");
        }
        for cmd in [delete_binding("Bad"), delete_role("")] {
            let out = p.apply(&cmd);
            let ok = matches!(&out, AclOutcome::Invalid(e) if e.field == "name");
            assert!(ok, "{out:?}");
        }
        assert_eq!(p, before);
    }

    #[test]
    fn a_full_policy_refuses_new_entries_only() {
        let roles: Vec<Role> = (0..MAX_ENTRIES)
            .map(|i| role(&format!("r{i}"), &[rule("discover", "*")]))
            .collect();
        let bindings = vec![binding("b", "*", "r0")];
        let too_many = file(vec![roles[0].clone(); MAX_ENTRIES + 1], vec![]);
        assert_eq!(field_of(too_many.validate()), "roles");
        let mut p = bootstrapped(file(roles.clone(), bindings));
        let before = p.clone();
        let new = AclCommand::PutRole(role("new", &roles[0].rules));
        assert!(matches!(p.apply(&new), AclOutcome::Conflict { .. }));
        assert_eq!(p, before);
        let replace = AclCommand::PutRole(roles[1].clone());
        assert_eq!(p.apply(&replace), AclOutcome::RolePut { created: false });
    }

    #[test]
    fn bootstrap_applies_once_and_only_to_a_fresh_policy() {
        let mut p = Policy::default();
        // An invalid file is refused and leaves room for a corrected one.
        let mut broken = example_file();
        broken.bindings[0].roles[0] = "ghost".into();
        match p.apply(&AclCommand::Bootstrap(broken)) {
            AclOutcome::Invalid(e) => assert_eq!(e.field, "bindings[0].roles[0]"),
            other => panic!("{other:?}"),
        }
        assert_eq!(p, Policy::default());
        let boot = AclCommand::Bootstrap(example_file());
        let (applied, ignored) = (
            AclOutcome::Bootstrapped { applied: true },
            AclOutcome::Bootstrapped { applied: false },
        );
        assert_eq!(p.apply(&boot), applied);
        assert!(p.is_bootstrapped());
        assert!(p.roles().eq(example_file().roles.iter()));
        let once = p.clone();
        assert_eq!(p.apply(&boot), ignored);
        assert_eq!(p, once);

        // An operator change before any bootstrap wins over the file.
        let mut managed = Policy::default();
        managed.apply(&AclCommand::PutRole(role("mine", &[rule("discover", "*")])));
        let state = managed.clone();
        assert_eq!(managed.apply(&boot), ignored);
        assert_eq!(managed, state);
    }

    fn bincode_round_trip<T>(value: &T) -> Vec<u8>
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(value, config).expect("encode");
        let (decoded, used): (T, usize) =
            bincode::serde::decode_from_slice(&bytes, config).expect("decode");
        assert_eq!((&decoded, used), (value, bytes.len()));
        bytes
    }

    #[test]
    fn json_and_toml_round_trips() {
        let r = role("self", &[rule("heartbeat register", "{self}")]);
        let json = r#"{"name":"self","description":"","rules":[{"actions":["register","heartbeat"],"services":["{self}"]}]}"#;
        assert_eq!(serde_json::to_string(&r).expect("json"), json);
        let short = json.replace(r#""description":"","#, "");
        let parsed: Role = serde_json::from_str(&short).expect("description defaults");
        assert_eq!(parsed, r);
        let b = r#"{"name":"b","identities":["*"],"roles":["r"]}"#;
        let b: Binding = serde_json::from_str(b).expect("binding");
        assert_eq!(b, binding("b", "*", "r"));
        for typo in [
            r#"{"name":"x","rules":[],"extra":1}"#,
            r#"{"name":"x","rules":[{"actions":[],"services":[],"service":[]}]}"#,
        ] {
            assert!(serde_json::from_str::<Role>(typo).is_err(), "{typo}");
        }
        let p = representative();
        let text = serde_json::to_string(&p).expect("json");
        assert_eq!(serde_json::from_str::<Policy>(&text).expect("policy"), p);
        let f = example_file();
        let text = toml::to_string(&f).expect("toml");
        assert_eq!(PolicyFile::from_toml(&text).expect("reparse"), f);
    }

    #[test]
    fn bincode_round_trips_and_command_display() {
        let bytes = bincode_round_trip(&representative());
        // The same history gives the same bytes; a different one, different bytes.
        assert_eq!(bincode_round_trip(&representative()), bytes);
        assert_ne!(bincode_round_trip(&bootstrapped(example_file())), bytes);
        bincode_round_trip(&Policy::default());
        let commands = [
            (AclCommand::PutRole(role("admin", &[])), "put-role admin"),
            (delete_role("admin"), "delete-role admin"),
            (
                AclCommand::PutBinding(binding("ops", "", "")),
                "put-binding ops",
            ),
            (delete_binding("ops"), "delete-binding ops"),
            (
                AclCommand::Bootstrap(example_file()),
                "bootstrap (2 roles, 2 bindings)",
            ),
        ];
        for (cmd, shown) in commands {
            bincode_round_trip(&cmd);
            assert_eq!(cmd.to_string(), shown, "display names only");
        }
        bincode_round_trip(&AclOutcome::Invalid(invalid("name", "bad")));
    }

    /// `Register` if `verb` is "register", else `Deregister`, by `caller` on `service`.
    fn write(verb: &str, service: &str, caller: &str) -> Command {
        let (service, id, caller) = (service.to_owned(), "i1".to_owned(), caller.to_owned());
        let (precondition, now_ms) = (Precondition::None, 1);
        if verb != "register" {
            return Command::Deregister {
                service,
                id,
                precondition,
                now_ms,
                by: caller,
            };
        }
        let spec = InstanceSpec {
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: BTreeMap::new(),
            zone: None,
            ttl_seconds: None,
        };
        Command::Register {
            service,
            id,
            spec,
            owner: caller,
            precondition,
            now_ms,
        }
    }

    #[test]
    fn check_command_gates_registry_writes() {
        let p = representative();
        // verb, service, caller, expected: `own` Ok(false), `override` Ok(true), `denied`.
        let table = "
            register   payments service/payments own
            deregister payments service/payments own
            register   payments operator/admin    override
            deregister pay-x    operator/pat      override
            register   payments service/web       denied
            deregister payments operator/pat      denied
            register   web      operator/carol    denied
            deregister payments spiffe://cairn/service/payments denied
            register   payments operator/admin/x  denied";
        for line in table.lines().filter(|l| !l.trim().is_empty()) {
            let [verb, service, caller, expected] = line.split_whitespace().collect::<Vec<_>>()[..]
            else {
                panic!("bad table line {line:?}")
            };
            let cmd = write(verb, service, caller);
            let got = check_command(&p, &cmd);
            match expected {
                "own" => assert_eq!(got, Ok(false), "{line}"),
                "override" => assert_eq!(got, Ok(true), "{line}"),
                _ => {
                    let d = got.expect_err(line);
                    let quoted = format!("{caller:?}");
                    let shown = if caller.parse::<Identity>().is_ok() {
                        caller
                    } else {
                        &quoted
                    };
                    assert_eq!((d.identity.as_str(), d.action.as_str()), (shown, verb));
                    assert_eq!(d.resource, Resource::Service(service).to_string());
                }
            }
        }
        let own = write("register", "payments", "service/payments");
        assert!(check_command(&Policy::default(), &own).is_err());
        let empty = write("deregister", "payments", "");
        assert_eq!(
            check_command(&p, &empty).expect_err("empty").identity,
            "\"\""
        );
        let lease = LeaseRef {
            service: "payments".into(),
            id: "i1".into(),
            modify_index: 1,
        };
        let leases = vec![lease.clone()];
        for cmd in [
            Command::ExpireLeases {
                leases: leases.clone(),
                now_ms: 1,
            },
            Command::Revive { lease, now_ms: 1 },
            Command::Reap { leases, now_ms: 1 },
        ] {
            assert_eq!(check_command(&Policy::default(), &cmd), Ok(false), "{cmd}");
        }
    }
}
