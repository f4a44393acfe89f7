//! cairn: a secure internal service registry.
//!
//! A cluster of 3 or 5 nodes replicates an encrypted registry log with Raft (openraft),
//! keeps the log, vote and snapshots in RocksDB, and serves linearizable queries on every
//! node over an mTLS HTTPS API.
//!
//! Map of the crate, bottom layer first (each module's first doc line says what it must not know):
//! - [`registry`]: the domain — services, instances, commands, the pure state machine.
//! - [`authz`]: actions, roles, bindings and the pure, default-deny policy evaluation.
//! - [`backup`]: the backup file format — a versioned header and a chunked STREAM of
//!   XChaCha20-Poly1305 over the state.
//! - [`crypto`]: the keyring and the sealing of every persisted byte.
//! - [`config`]: the typed node configuration, loaded and validated once.
//! - [`identity`]: SPIFFE identities taken from certificates.
//! - [`token`]: JWT bearer tokens, verified against a JWKS and mapped to identities.
//! - [`tls`]: rustls configurations for the two listeners and the peers, reloaded on change.
//! - [`reload`]: watches files (and SIGHUP) and reloads what changed.
//! - [`certs`]: the offline certificate authority (`cairn certs`).
//! - [`storage`]: RocksDB — raft log, vote, snapshots; all on-disk encoding lives here.
//! - [`raft`]: the openraft type config, the mTLS peer network and the internal RPC routes.
//! - [`snapshot`]: takes consistent backups of the cluster state and opens them for restore.
//! - [`api`]: the public HTTP API; the one place that maps errors to HTTP statuses.
//! - [`node`]: the composition root that wires one node together.
//! - [`client`]: the HTTPS client behind the CLI's client commands.
//! - [`dev`]: `cairn dev`, a throwaway local cluster.
//! - [`bench`]: `cairn bench`, the load generator that compares cairn with etcd.

pub mod api;
pub mod authz;
pub mod backup;
pub mod bench;
pub mod certs;
pub mod client;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod identity;
pub mod node;
pub mod raft;
pub mod registry;
pub mod reload;
pub mod snapshot;
pub mod storage;
pub mod tls;
pub mod token;
