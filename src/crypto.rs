//! crypto: the keyring and the sealing/opening of every persisted byte; knows nothing of RocksDB, Raft or the registry.
//!
//! Two types: a [`Keyring`] (the key file: loaded once and permission-checked, edited by the
//! rotation operations, written atomically) and a [`Sealer`] (a cloneable handle that seals
//! records with the active data key and opens records sealed with any data key it holds; its
//! key set can be swapped while it is in use). Callers decide *what* is sealed and pass a
//! `context` that says *where* it lives; this module guarantees that a sealed record only opens
//! under the same context.
//!
//! # Key purposes
//!
//! Every key has one purpose, fixed when it is created:
//! - **data** keys seal the node's records. Exactly one of them is *active* (new records are
//!   sealed with it); the others are kept only to open older records until they are rewrapped.
//! - **backup** keys encrypt backup files. They are meant to be handed to the backup system
//!   ([`Keyring::export_backup_keys`]), so they never seal or open a record: a record naming a
//!   backup key is refused. At most one is *current* (new backups use it); older ones stay to
//!   open older backups. This module only hands out ready ciphers for them
//!   ([`Sealer::backup_cipher`], [`Keyring::backup_cipher`]); the backup file format is not its
//!   business.
//!
//! # Envelope format (version 1)
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! |      0 |    3 | magic `b"CRN"`                                               |
//! |      3 |    1 | format version, `1`                                          |
//! |      4 |    4 | key id, u32 big-endian                                       |
//! |      8 |   24 | XChaCha20 nonce, fresh from the OS RNG for every seal        |
//! |     32 |    n | ciphertext (same length as the plaintext)                    |
//! | 32 + n |   16 | Poly1305 tag                                                 |
//!
//! AEAD: XChaCha20-Poly1305. Associated data: the 8 header bytes (magic | version | key id)
//! followed by the caller's `context`. Binding the header means a record cannot be relabelled
//! with another key id or format version; binding the context (the storage layer passes column
//! family + record key) means a record copied to another place fails authentication instead of
//! being served as the wrong thing. The header has a fixed length, so `header ‖ context` is
//! unambiguous; the context itself must be unambiguous too (length-prefix its parts).
//!
//! Why a random nonce: 192 bits make collisions negligible for any number of records we will
//! ever write under one key, and it needs no counter that would have to survive crashes or be
//! agreed on by replicas. Sealing is therefore not deterministic; seal on the proposer or in the
//! storage layer, never inside the replicated state machine.
//!
//! # Keyring file format (version 2)
//!
//! ```json
//! {"version": 2, "active": 3, "backup": 4, "keys": [
//!   {"id": 1, "purpose": "data",   "key": "<base64 of 32 bytes>", "created_at": 1700000000},
//!   {"id": 3, "purpose": "data",   "key": "…", "created_at": 1710000000},
//!   {"id": 4, "purpose": "backup", "key": "…", "created_at": 1710000000}]}
//! ```
//!
//! Checked at load (and kept by every operation): between 1 and [`MAX_KEYS`] keys, unique ids;
//! `active` names a data key, and is `null` only when the keyring holds no data key at all (a
//! backup-only keyring, as exported for the backup system); `backup` is `null` or names a backup
//! key. Unknown fields are refused, named. Version 1 files (`{"version":1,"active":N,"keys":
//! [{"id","key","created_at"}]}`, written before key purposes existed) are still read: all their
//! keys are data keys. This build writes version 2 only, and older builds refuse version 2: a
//! version 1 file becomes version 2 the first time it is rewritten ([`Keyring::replace_file`]),
//! after which rolling the binary back needs the previous file.
//!
//! # Key rotation
//!
//! The key id travels in clear in every envelope ([`envelope_key_id`]). A rotation, per node:
//! 1. `cairn keyring rotate` loads the node's keyring file, [`Keyring::rotate`]s (a fresh data
//!    key, id = highest id + 1, becomes active; older keys stay) and writes the file back with
//!    [`Keyring::replace_file`].
//! 2. The node reloads the file into its running [`Sealer`] ([`Sealer::reload`]): new records
//!    are sealed with the new key, older records still open.
//! 3. A rewrap pass rewrites every record for which [`Sealer::needs_rewrap`] holds with
//!    [`Sealer::rewrap`]. A seal that started before the reload can still land a record under
//!    the old key after the pass went by, so removal waits for a scan that finds no record
//!    naming the old id.
//! 4. [`Keyring::remove`] the old key, write the file, reload again.
//!
//! **Nodes rotate independently.** Every node seals its own RocksDB records locally and nothing
//! sealed ever leaves a node: raft entries travel in clear (`storage::encode`d) inside mTLS and
//! each node seals them on append; a snapshot is opened by the node sending it
//! (`get_current_snapshot`), travels in clear inside mTLS, and is sealed again by the receiver
//! (`install_snapshot`). So a key id means something only on its own node: two nodes may hold
//! different keys under the same id, rotate in any order, on any schedule, and no node needs a
//! key before another starts sealing with it. Each node has its own keyring file; a rotation
//! edits that node's file only. (A shared file, as `cairn dev` and the tests use, works too.)
//! What independence costs: a node's data directory opens only with that node's keyring, so
//! keep a retired keyring file as long as any copy of the data directory sealed under its keys
//! exists. Backup keys are the exception to "local": they are shared on purpose, see below.
//!
//! # Reloading a running sealer
//!
//! [`Sealer::reload`] swaps the whole key set at once (one atomic pointer, `arc_swap`): every
//! seal or open uses one consistent key set, seal always the current active key, and neither
//! ever waits for a reload. A reload is refused when it would make records unreadable that no
//! operator decision could have made safe:
//! - a key id both keyrings hold with different bytes (or purpose): that is a wrong or foreign
//!   file, and every record under that id would stop opening;
//! - the new keyring drops the key in use as active: records sealed with it since the last
//!   reload cannot have been rewrapped yet (that needs the next active key loaded first). This
//!   is also what an old copy of the file looks like.
//!
//! Dropping any other key is the operator's decision (step 4 above) and is accepted; the
//! [`ReloadSummary`] says which ids were added and removed and whether the active key changed.
//! [`Keyring::replace_file`] applies the same two checks to the file it replaces, so a stale
//! keyring in memory or two rotations racing on one file cannot destroy a key.
//!
//! # Backup keys cross keyrings
//!
//! Unlike data keys, backup keys leave their node on purpose: a backup written on one node
//! may be opened by the backup system, which gets the backup keys (and no data key) with
//! [`Keyring::export_backup_keys`], or by another node a restore goes through (the restored
//! state then reaches the other nodes through the log, in clear like any entry, and each seals
//! it with its own data key). A backup file names its key by id (that is how
//! [`Sealer::backup_cipher_by_id`] finds it), so every keyring that may open a backup must
//! hold its key under the same id. [`Keyring::import_backup_key`] copies a backup key in
//! under its own id (to restore a backup another cluster took, or to give every node of this
//! cluster one shared backup key, made current with [`Keyring::set_current_backup`]); an id
//! already held by a different key is refused, never renamed. Here, unlike for data keys,
//! order matters: import a new shared backup key everywhere it may be opened *before* any
//! node makes it current.
//!
//! # Key material hygiene
//!
//! Raw keys are wiped from memory when a [`Keyring`] is dropped, the ciphers inside a [`Sealer`]
//! (and those handed out for backups) wipe theirs on drop (`chacha20poly1305`'s `zeroize`
//! feature), and the buffers used to read and write the key file are wiped after use. A
//! [`Sealer`] keeps its [`Keyring`] beside the ciphers (the ciphers hold the same bytes) so a
//! reload can compare keys; a replaced key set is wiped once the last operation using it ends.
//! This is best effort: copies the compiler makes on the stack are out of reach. `Debug`,
//! [`KeyringStatus`] and errors never show key bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chacha20poly1305::aead::{Generate, Key, KeyInit};
use chacha20poly1305::{AeadInOut, Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

/// First three bytes of every sealed record.
pub const ENVELOPE_MAGIC: [u8; 3] = *b"CRN";
/// The envelope format this build writes (and the only one it reads).
pub const ENVELOPE_VERSION: u8 = 1;
/// magic (3) + version (1) + key id (4).
const HEADER_LEN: usize = 8;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const BODY_OFFSET: usize = HEADER_LEN + NONCE_LEN;
/// Bytes a sealed record adds to its plaintext.
pub const ENVELOPE_OVERHEAD: usize = BODY_OFFSET + TAG_LEN;

/// The keyring file format this build writes; it also reads version 1.
pub const KEYRING_VERSION: u32 = 2;
/// Length of every key, in bytes (XChaCha20-Poly1305 uses 256-bit keys).
pub const KEY_LEN: usize = 32;
/// Most keys one keyring holds. Retired keys are meant to be removed after a rewrap; a keyring
/// that keeps growing is a rotation procedure that never finishes.
pub const MAX_KEYS: usize = 64;
/// A keyring file larger than this is not a keyring; refusing early keeps a mistaken path
/// (a log file, a device) from being read into memory.
const MAX_KEYRING_FILE_BYTES: u64 = 1024 * 1024;
/// Longest name from a key file that error messages repeat (an unknown field, an unknown
/// purpose). Longer ones are elided: a key pasted into the wrong place is 44 characters.
const MAX_ECHOED_NAME: usize = 16;

/// Errors of the crypto layer. All of them are fatal for the record, file or operation
/// concerned: retrying will not help. None of them carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The keyring file could not be read or written.
    #[error("keyring {}: {source}", .path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The keyring file is readable or writable by group or others.
    #[error(
        "keyring {} has mode {mode:04o}, which gives group or others access; run `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    InsecurePermissions {
        /// The keyring file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The keyring file is not a valid keyring.
    #[error("invalid keyring {}: {reason}", .path.display())]
    InvalidKeyring {
        /// The keyring file.
        path: PathBuf,
        /// What is wrong with it (never contains key material).
        reason: String,
    },
    /// The bytes are not a sealed record: too short, or the magic is wrong.
    #[error("not a sealed record: {reason}")]
    BadEnvelope {
        /// What is wrong with it.
        reason: String,
    },
    /// The record was sealed in an envelope format this build does not read.
    #[error("sealed record has envelope format version {version}; this build reads version {ENVELOPE_VERSION}")]
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
    /// The record names a key the keyring does not hold.
    #[error("record sealed with key id {key_id}, which the keyring does not have")]
    UnknownKey {
        /// The key id found in the envelope.
        key_id: u32,
    },
    /// The AEAD tag did not verify: the record, its header or its context changed.
    #[error("authentication failed: record was modified or moved")]
    Tampered,
    /// [`Keyring::write_new`] refuses to replace an existing file.
    #[error("{} already exists; refusing to overwrite a keyring", .path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A key was asked for one purpose but has the other (a record naming a backup key, a data
    /// key offered as a backup key).
    #[error("key {id} is a {purpose} key, not a {needed} key")]
    WrongPurpose {
        /// The key id.
        id: u32,
        /// Its purpose.
        purpose: KeyPurpose,
        /// The purpose the operation needs.
        needed: KeyPurpose,
    },
    /// A [`Sealer`] needs an active data key; this keyring has none (it holds backup keys only).
    #[error("keyring has no active data key: a backup-only keyring opens backups, it cannot seal records")]
    NoDataKey,
    /// [`Keyring::export_backup_keys`] on a keyring without backup keys.
    #[error("keyring holds no backup key; add one with `add_backup_key` first")]
    NoBackupKey,
    /// The operation names a key id the keyring does not hold.
    #[error("keyring has no key {id}")]
    NoSuchKey {
        /// The id asked for.
        id: u32,
    },
    /// [`Keyring::remove`] of the active data key.
    #[error("key {id} is the active data key; rotate, rewrap, then remove it")]
    RemoveActive {
        /// The active key id.
        id: u32,
    },
    /// [`Keyring::remove`] of the current backup key.
    #[error("key {id} is the current backup key; add a new backup key before removing it")]
    RemoveCurrentBackup {
        /// The current backup key id.
        id: u32,
    },
    /// [`Keyring::remove`] of the only key.
    #[error("key {id} is the only key; a keyring cannot be empty")]
    RemoveLastKey {
        /// The key id.
        id: u32,
    },
    /// Adding a key to a keyring that holds [`MAX_KEYS`] already.
    #[error("keyring already holds {MAX_KEYS} keys, the most it may; remove retired keys first")]
    TooManyKeys,
    /// Adding a key when the highest id, `u32::MAX`, is taken.
    #[error("key id {} is taken; there is no higher id for a new key", u32::MAX)]
    NoFreeKeyId,
    /// [`Keyring::import_backup_key`] of an id this keyring holds with a different key.
    #[error("key id {id} is already held here by a different key; refusing to import over it")]
    KeyIdTaken {
        /// The id.
        id: u32,
    },
    /// A new keyring holds a different key (bytes or purpose) under an id the current one has.
    #[error("key {id} differs from the key {id} in {current}; refusing it: records or backups under that id would become unreadable (wrong keyring file?)")]
    KeyChanged {
        /// The id.
        id: u32,
        /// The keyring compared against.
        current: KeySource,
    },
    /// A new keyring lacks the active data key of the current one.
    #[error("the new keyring drops key {id}, the active data key in {current}; records sealed with it would become unreadable (rotate and reload first, rewrap, then remove it)")]
    DropsActiveKey {
        /// The current active key id.
        id: u32,
        /// The keyring compared against.
        current: KeySource,
    },
    /// [`Keyring::replace_file`] could not give the new file the owner of the file it replaces.
    #[error("cannot give the new {} the owner of the file it replaces (uid {uid}, gid {gid}): {source}; run as that user or as root", .path.display())]
    Ownership {
        /// The keyring file.
        path: PathBuf,
        /// Owner of the replaced file.
        uid: u32,
        /// Group of the replaced file.
        gid: u32,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// What a key is for; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyPurpose {
    /// Seals the node's records.
    Data,
    /// Encrypts backup files; shared with the backup system, never used for records.
    Backup,
}

impl fmt::Display for KeyPurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyPurpose::Data => "data",
            KeyPurpose::Backup => "backup",
        })
    }
}

/// The keyring a new one was checked against, for [`CryptoError::KeyChanged`] and
/// [`CryptoError::DropsActiveKey`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The key set of a running [`Sealer`] (displays as "use": "in use").
    InUse,
    /// The keyring file about to be replaced.
    File(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::InUse => f.write_str("use"),
            KeySource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The set of keys a node seals and opens with, which data key is active and which backup key
/// is current.
///
/// Invariants (checked by every constructor, kept by every operation): 1 to [`MAX_KEYS`] keys
/// with unique ids; `active` names a data key, and is `None` only if there is no data key;
/// `backup` is `None` or names a backup key.
pub struct Keyring {
    active: Option<u32>,
    backup: Option<u32>,
    keys: BTreeMap<u32, KeyEntry>,
}

struct KeyEntry {
    purpose: KeyPurpose,
    material: KeyMaterial,
    /// Unix seconds; informational (rotation status), never used for decisions.
    created_at: u64,
}

impl KeyEntry {
    fn fresh(purpose: KeyPurpose) -> KeyEntry {
        let mut key = Key::<XChaCha20Poly1305>::generate();
        let mut material = KeyMaterial([0; KEY_LEN]);
        material.0.copy_from_slice(&key);
        wipe(&mut key);
        let created_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        KeyEntry {
            purpose,
            material,
            created_at,
        }
    }

    fn duplicate(&self) -> KeyEntry {
        KeyEntry {
            purpose: self.purpose,
            material: KeyMaterial(self.material.0),
            created_at: self.created_at,
        }
    }

    /// Same purpose and same bytes (compared without an early exit).
    fn same_key(&self, other: &KeyEntry) -> bool {
        let diff = (self.material.0.iter())
            .zip(other.material.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        self.purpose == other.purpose && diff == 0
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        let mut key = Key::<XChaCha20Poly1305>::from(self.material.0);
        let cipher = XChaCha20Poly1305::new(&key);
        wipe(&mut key);
        cipher
    }
}

/// 32 key bytes, wiped on drop.
struct KeyMaterial([u8; KEY_LEN]);

impl Drop for KeyMaterial {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// What [`Keyring::status`] and [`Sealer::status`] tell: ids, purposes, ages; never key bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyringStatus {
    /// The active data key (`None` in a backup-only keyring).
    pub active: Option<u32>,
    /// The current backup key, if any.
    pub backup: Option<u32>,
    /// Every key, by ascending id.
    pub keys: Vec<KeyStatus>,
}

/// One key in a [`KeyringStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyStatus {
    /// The key id.
    pub id: u32,
    /// What the key is for.
    pub purpose: KeyPurpose,
    /// When it was created, Unix seconds (informational).
    pub created_at: u64,
}

/// Reads only the version, so the file is then parsed (strictly) as that version.
#[derive(Deserialize)]
struct VersionProbe {
    version: u32,
}

/// The keyring file, version 1 (before key purposes): every key is a data key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFileV1 {
    #[allow(dead_code)] // checked by VersionProbe
    version: u32,
    active: u32,
    keys: Vec<KeyFileEntryV1>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileEntryV1 {
    id: u32,
    key: String,
    created_at: u64,
}

impl Drop for KeyFileEntryV1 {
    fn drop(&mut self) {
        wipe_vec(std::mem::take(&mut self.key).into_bytes());
    }
}

/// The keyring file, version 2, as JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    version: u32,
    active: Option<u32>,
    /// Written always (as `null` when there is none); a missing field reads as `null`.
    backup: Option<u32>,
    keys: Vec<KeyFileEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileEntry {
    id: u32,
    purpose: KeyPurpose,
    /// Standard base64 (with padding) of the 32 key bytes.
    key: String,
    /// Unix seconds.
    created_at: u64,
}

impl Drop for KeyFileEntry {
    fn drop(&mut self) {
        wipe_vec(std::mem::take(&mut self.key).into_bytes());
    }
}

impl Keyring {
    /// Loads and validates a keyring file (version 1 or 2).
    ///
    /// Refuses the file if group or others have any permission on it, before reading a byte.
    pub fn load(path: &Path) -> Result<Keyring, CryptoError> {
        Keyring::load_file(path, true)
    }

    /// A fresh keyring: one data key from the OS RNG, id 1, active; no backup key.
    pub fn generate() -> Keyring {
        let mut keys = BTreeMap::new();
        keys.insert(1, KeyEntry::fresh(KeyPurpose::Data));
        Keyring {
            active: Some(1),
            backup: None,
            keys,
        }
    }

    /// Writes the keyring to a new file with mode 0600; refuses to replace an existing file.
    ///
    /// The file appears complete or not at all: the JSON goes to a temporary file in the same
    /// directory, which is fsynced, then hard-linked to `path` and the directory fsynced. A
    /// link (unlike a rename) fails if `path` appeared meanwhile, so a keyring — without which
    /// every record sealed under it is lost — is never silently replaced.
    pub fn write_new(&self, path: &Path) -> Result<(), CryptoError> {
        if path.symlink_metadata().is_ok() {
            return Err(CryptoError::Exists {
                path: path.to_owned(),
            });
        }
        let (dir, tmp) = temp_path(path)?;
        let json = self.to_json();
        let written = write_private(&tmp, path, &json, None);
        wipe_vec(json);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let linked = fs::hard_link(&tmp, path);
        let removed = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(CryptoError::Exists {
                    path: path.to_owned(),
                })
            }
            Err(e) => return Err(io_error(path, e)),
        }
        removed.map_err(|e| io_error(&tmp, e))?;
        sync_dir(dir)
    }

    /// Atomically replaces the existing keyring file at `path` with this keyring (what
    /// `cairn keyring rotate`, `remove` and friends do after editing a loaded keyring).
    ///
    /// The existing file must be a keyring this one can succeed: every id both hold has the
    /// same key, and its active data key is kept (the checks of [`Sealer::reload`], against
    /// [`KeySource::File`]). So a keyring from another node, a stale copy, or a second
    /// rotation racing on the same file is refused instead of destroying a key. The existing
    /// file's permissions are not checked (a group-readable file is precisely one to replace).
    ///
    /// The new file has mode 0600 and the owner of the file it replaces, so a rotation run as
    /// root leaves a file the node's user can still read (refused if the owner cannot be kept;
    /// the group is kept where allowed). It is written to a
    /// temporary file in the same directory, fsynced, renamed over `path`, and the directory
    /// fsynced: a reader sees the old file or the new one, never a mix, and no temporary file
    /// remains. A symbolic link is refused rather than replaced by a regular file.
    ///
    /// This writes one node's file. Each node has its own keyring file and, because nothing
    /// sealed leaves a node (see the module docs), nodes rotate independently: distribute a
    /// file only where several nodes deliberately share one.
    pub fn replace_file(&self, path: &Path) -> Result<(), CryptoError> {
        let meta = path.symlink_metadata().map_err(|e| io_error(path, e))?;
        if meta.file_type().is_symlink() {
            return Err(CryptoError::InvalidKeyring {
                path: path.to_owned(),
                reason: "is a symbolic link; refusing to replace it (name the file it points to)"
                    .to_owned(),
            });
        }
        let existing = Keyring::load_file(path, false)?;
        check_successor(&existing, self, &KeySource::File(path.to_owned()))?;
        drop(existing);

        let (dir, tmp) = temp_path(path)?;
        let json = self.to_json();
        let written = write_private(&tmp, path, &json, Some((meta.uid(), meta.gid())));
        wipe_vec(json);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_error(path, e));
        }
        sync_dir(dir)
    }

    /// The id of the data key new records are sealed with; `None` in a backup-only keyring.
    pub fn active_id(&self) -> Option<u32> {
        self.active
    }

    /// The id of the backup key new backups are encrypted with, if any.
    pub fn backup_id(&self) -> Option<u32> {
        self.backup
    }

    /// The ids of every key held (data and backup), ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Adds a fresh data key (id = highest id + 1) and makes it active. Older keys stay, to
    /// open records sealed under them until they are rewrapped. Returns the new id.
    pub fn rotate(&mut self) -> Result<u32, CryptoError> {
        let id = self.insert_fresh(KeyPurpose::Data)?;
        self.active = Some(id);
        Ok(id)
    }

    /// Adds a fresh backup key (id = highest id + 1) and makes it the current backup key.
    /// Older backup keys stay, to open older backups. Returns the new id.
    pub fn add_backup_key(&mut self) -> Result<u32, CryptoError> {
        let id = self.insert_fresh(KeyPurpose::Backup)?;
        self.backup = Some(id);
        Ok(id)
    }

    /// Removes a key. Refuses the active data key, the current backup key and the last key.
    ///
    /// Removing a data key makes every record still sealed under it unreadable on this node:
    /// only remove it once a scan finds no record naming it (see the module docs). The id may
    /// be handed out again if it was the highest.
    pub fn remove(&mut self, id: u32) -> Result<(), CryptoError> {
        if !self.keys.contains_key(&id) {
            return Err(CryptoError::NoSuchKey { id });
        }
        if self.active == Some(id) {
            return Err(CryptoError::RemoveActive { id });
        }
        if self.backup == Some(id) {
            return Err(CryptoError::RemoveCurrentBackup { id });
        }
        if self.keys.len() == 1 {
            return Err(CryptoError::RemoveLastKey { id });
        }
        self.keys.remove(&id);
        Ok(())
    }

    /// Ids, purposes and ages of the keys, and which are active and current; no key bytes.
    pub fn status(&self) -> KeyringStatus {
        KeyringStatus {
            active: self.active,
            backup: self.backup,
            keys: (self.keys.iter())
                .map(|(id, entry)| KeyStatus {
                    id: *id,
                    purpose: entry.purpose,
                    created_at: entry.created_at,
                })
                .collect(),
        }
    }

    /// A keyring holding only the backup keys (same ids, same current backup key, no data key,
    /// no active key), to hand to the backup system. It loads and writes like any keyring,
    /// but cannot build a [`Sealer`].
    pub fn export_backup_keys(&self) -> Result<Keyring, CryptoError> {
        let keys: BTreeMap<u32, KeyEntry> = (self.keys.iter())
            .filter(|(_, entry)| entry.purpose == KeyPurpose::Backup)
            .map(|(id, entry)| (*id, entry.duplicate()))
            .collect();
        if keys.is_empty() {
            return Err(CryptoError::NoBackupKey);
        }
        Ok(Keyring {
            active: None,
            backup: self.backup,
            keys,
        })
    }

    /// Copies backup key `id` of `from` into this keyring under the same id (backup files name
    /// their key by id), without making it current: it is there to open backups, typically
    /// ones another cluster took. Importing a key already held is a no-op; an id held by a
    /// different key is refused ([`CryptoError::KeyIdTaken`]), never renamed.
    pub fn import_backup_key(&mut self, from: &Keyring, id: u32) -> Result<(), CryptoError> {
        let entry = from.keys.get(&id).ok_or(CryptoError::NoSuchKey { id })?;
        if entry.purpose != KeyPurpose::Backup {
            return Err(CryptoError::WrongPurpose {
                id,
                purpose: entry.purpose,
                needed: KeyPurpose::Backup,
            });
        }
        if let Some(held) = self.keys.get(&id) {
            return if held.same_key(entry) {
                Ok(())
            } else {
                Err(CryptoError::KeyIdTaken { id })
            };
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(CryptoError::TooManyKeys);
        }
        self.keys.insert(id, entry.duplicate());
        Ok(())
    }

    /// Makes backup key `id`, already held (typically imported), the one new backups use:
    /// how every node of a cluster comes to write backups under one shared key.
    pub fn set_current_backup(&mut self, id: u32) -> Result<(), CryptoError> {
        let entry = self.keys.get(&id).ok_or(CryptoError::NoSuchKey { id })?;
        if entry.purpose != KeyPurpose::Backup {
            return Err(CryptoError::WrongPurpose {
                id,
                purpose: entry.purpose,
                needed: KeyPurpose::Backup,
            });
        }
        self.backup = Some(id);
        Ok(())
    }

    /// Backup key `id` as a ready cipher, to open (or write) a backup file; `None` if the
    /// keyring has no such key or it is a data key. This is how the backup system, holding a
    /// backup-only keyring, opens backups.
    pub fn backup_cipher(&self, id: u32) -> Option<XChaCha20Poly1305> {
        (self.keys.get(&id))
            .filter(|entry| entry.purpose == KeyPurpose::Backup)
            .map(KeyEntry::cipher)
    }

    fn insert_fresh(&mut self, purpose: KeyPurpose) -> Result<u32, CryptoError> {
        if self.keys.len() >= MAX_KEYS {
            return Err(CryptoError::TooManyKeys);
        }
        let id = match self.keys.last_key_value() {
            Some((highest, _)) => highest.checked_add(1).ok_or(CryptoError::NoFreeKeyId)?,
            None => 1,
        };
        self.keys.insert(id, KeyEntry::fresh(purpose));
        Ok(id)
    }

    /// Reads and validates `path`; `require_private` is false only to read a file that is
    /// about to be replaced.
    fn load_file(path: &Path, require_private: bool) -> Result<Keyring, CryptoError> {
        let invalid = |reason: String| CryptoError::InvalidKeyring {
            path: path.to_owned(),
            reason,
        };
        // Check the metadata of the opened file, not of the path, so the file we check is
        // the file we read.
        let mut file = File::open(path).map_err(|e| io_error(path, e))?;
        let meta = file.metadata().map_err(|e| io_error(path, e))?;
        if !meta.is_file() {
            return Err(invalid("not a regular file".to_owned()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if require_private && mode & 0o077 != 0 {
            return Err(CryptoError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_KEYRING_FILE_BYTES {
            return Err(invalid(format!(
                "{} bytes; a keyring is at most {MAX_KEYRING_FILE_BYTES}",
                meta.len()
            )));
        }
        // Sized from the metadata so the buffer does not grow (and leave copies) while reading.
        let capacity = usize::try_from(meta.len()).unwrap_or(0) + 1;
        let mut bytes = Vec::with_capacity(capacity);
        let read = file.read_to_end(&mut bytes);
        let parsed = match read {
            Ok(_) => Keyring::parse(&bytes).map_err(invalid),
            Err(e) => Err(io_error(path, e)),
        };
        wipe_vec(bytes);
        parsed
    }

    /// Parses a key file of either version; the error never contains key material.
    fn parse(bytes: &[u8]) -> Result<Keyring, String> {
        let probe: VersionProbe =
            serde_json::from_slice(bytes).map_err(|e| json_reason(&e.to_string()))?;
        match probe.version {
            1 => {
                // Says so, since a v1 file with v2 fields is most likely a hand edit.
                let file: KeyringFileV1 =
                    parse_strict(bytes).map_err(|e| format!("version 1 file: {e}"))?;
                let entries = (file.keys.iter())
                    .map(|e| (e.id, KeyPurpose::Data, e.key.as_str(), e.created_at));
                Keyring::from_entries(Some(file.active), None, file.keys.len(), entries)
            }
            2 => {
                let file: KeyringFile = parse_strict(bytes)?;
                let entries =
                    (file.keys.iter()).map(|e| (e.id, e.purpose, e.key.as_str(), e.created_at));
                Keyring::from_entries(file.active, file.backup, file.keys.len(), entries)
            }
            v => Err(format!(
                "unsupported keyring version {v}; this build reads versions 1 and {KEYRING_VERSION}"
            )),
        }
    }

    /// Builds a keyring from parsed entries `(id, purpose, base64 key, created_at)` and checks
    /// every invariant.
    fn from_entries<'a>(
        active: Option<u32>,
        backup: Option<u32>,
        count: usize,
        entries: impl Iterator<Item = (u32, KeyPurpose, &'a str, u64)>,
    ) -> Result<Keyring, String> {
        // Counted before decoding, so an oversized file is refused before its keys are copied.
        if count == 0 {
            return Err("no keys".to_owned());
        }
        if count > MAX_KEYS {
            return Err(format!("{count} keys; a keyring holds at most {MAX_KEYS}"));
        }
        let mut keys = BTreeMap::new();
        for (id, purpose, encoded, created_at) in entries {
            if keys.contains_key(&id) {
                return Err(format!("key id {id} appears more than once"));
            }
            let material = decode_key(encoded).map_err(|why| format!("key id {id}: {why}"))?;
            keys.insert(
                id,
                KeyEntry {
                    purpose,
                    material,
                    created_at,
                },
            );
        }
        let keyring = Keyring {
            active,
            backup,
            keys,
        };
        keyring.check_roles()?;
        Ok(keyring)
    }

    /// The invariants on `active` and `backup`.
    fn check_roles(&self) -> Result<(), String> {
        let purpose = |id: u32| self.keys.get(&id).map(|e| e.purpose);
        match self.active {
            Some(id) => match purpose(id) {
                None => return Err(format!("active key id {id} is not among the keys")),
                Some(KeyPurpose::Backup) => {
                    return Err(format!(
                        "active names key id {id}, a backup key; it must name a data key"
                    ))
                }
                Some(KeyPurpose::Data) => {}
            },
            None => {
                let data = self
                    .keys
                    .iter()
                    .find(|(_, e)| e.purpose == KeyPurpose::Data);
                if let Some((id, _)) = data {
                    return Err(format!(
                        "active is null, but key id {id} is a data key; only a keyring without data keys has no active key"
                    ));
                }
            }
        }
        if let Some(id) = self.backup {
            match purpose(id) {
                None => return Err(format!("backup key id {id} is not among the keys")),
                Some(KeyPurpose::Data) => {
                    return Err(format!(
                        "backup names key id {id}, a data key; it must name a backup key"
                    ))
                }
                Some(KeyPurpose::Backup) => {}
            }
        }
        Ok(())
    }

    fn to_json(&self) -> Vec<u8> {
        let file = KeyringFile {
            version: KEYRING_VERSION,
            active: self.active,
            backup: self.backup,
            keys: (self.keys.iter())
                .map(|(id, entry)| KeyFileEntry {
                    id: *id,
                    purpose: entry.purpose,
                    key: BASE64.encode(entry.material.0),
                    created_at: entry.created_at,
                })
                .collect(),
        };
        // Generously pre-sized (an entry is about 150 bytes) so the buffer never reallocates
        // and leaves key copies behind.
        let mut out = Vec::with_capacity(256 + 256 * self.keys.len());
        serde_json::to_writer_pretty(&mut out, &file)
            .expect("serializing a keyring to memory cannot fail");
        out.push(b'\n');
        out
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("backup", &self.backup)
            .field("keys", &self.status().keys)
            .finish()
    }
}

/// `next` may replace `current` (a running key set, or a file about to be overwritten) only if
/// every id both hold names the same key and `current`'s active data key is kept; see the
/// module docs for why exactly these two.
fn check_successor(
    current: &Keyring,
    next: &Keyring,
    source: &KeySource,
) -> Result<(), CryptoError> {
    for (id, entry) in &next.keys {
        if let Some(held) = current.keys.get(id) {
            if !held.same_key(entry) {
                return Err(CryptoError::KeyChanged {
                    id: *id,
                    current: source.clone(),
                });
            }
        }
    }
    if let Some(id) = current.active {
        if !next.keys.contains_key(&id) {
            return Err(CryptoError::DropsActiveKey {
                id,
                current: source.clone(),
            });
        }
    }
    Ok(())
}

/// A cloneable handle that seals with the active data key and opens with any data key it
/// holds. Clones share one key set, which [`Sealer::reload`] swaps for all of them.
#[derive(Clone)]
pub struct Sealer {
    shared: Arc<SealerShared>,
}

struct SealerShared {
    /// Loaded (lock-free) once per operation, so an operation sees one key set throughout.
    current: ArcSwap<KeySet>,
    /// Serialises reloads, so each is checked against the key set it replaces. Seal and open
    /// never take it.
    reload: Mutex<()>,
}

/// One immutable key set. Invariant: `active` is `keyring.active`, a data key, and every key
/// of `keyring` has a cipher.
struct KeySet {
    active: u32,
    /// Kept for reload's comparisons and for status.
    keyring: Keyring,
    /// One initialised cipher per key, data and backup; each wipes its key on drop.
    ciphers: BTreeMap<u32, XChaCha20Poly1305>,
}

impl KeySet {
    fn new(keyring: Keyring) -> Result<KeySet, CryptoError> {
        let active = keyring.active.ok_or(CryptoError::NoDataKey)?;
        let ciphers = (keyring.keys.iter())
            .map(|(id, entry)| (*id, entry.cipher()))
            .collect();
        Ok(KeySet {
            active,
            keyring,
            ciphers,
        })
    }

    fn purpose(&self, id: u32) -> Option<KeyPurpose> {
        self.keyring.keys.get(&id).map(|e| e.purpose)
    }

    fn seal(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let key_id = self.active;
        let cipher =
            (self.ciphers.get(&key_id)).expect("the active key has a cipher (KeySet invariant)");
        let header = header(key_id);
        let nonce = XNonce::generate();
        let mut out = Vec::with_capacity(ENVELOPE_OVERHEAD + plaintext.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = cipher
            .encrypt_inout_detached(
                &nonce,
                &associated_data(&header, context),
                (&mut out[BODY_OFFSET..]).into(),
            )
            .expect("plaintext within XChaCha20-Poly1305's 256 GiB message limit");
        out.extend_from_slice(&tag);
        out
    }

    fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key_id = envelope_key_id(sealed)?;
        match self.purpose(key_id) {
            None => return Err(CryptoError::UnknownKey { key_id }),
            Some(KeyPurpose::Backup) => {
                return Err(CryptoError::WrongPurpose {
                    id: key_id,
                    purpose: KeyPurpose::Backup,
                    needed: KeyPurpose::Data,
                })
            }
            Some(KeyPurpose::Data) => {}
        }
        let cipher =
            (self.ciphers.get(&key_id)).expect("every key has a cipher (KeySet invariant)");
        let header = &sealed[..HEADER_LEN];
        let nonce =
            <&XNonce>::try_from(&sealed[HEADER_LEN..BODY_OFFSET]).expect("nonce slice is 24 bytes");
        let (body, tag) = sealed[BODY_OFFSET..].split_at(sealed.len() - BODY_OFFSET - TAG_LEN);
        let tag = <&Tag>::try_from(tag).expect("tag slice is 16 bytes");
        let mut plaintext = body.to_vec();
        // The AEAD checks the tag before decrypting, so on failure `plaintext` still holds
        // ciphertext; it is dropped without being returned.
        cipher
            .decrypt_inout_detached(
                nonce,
                &associated_data(header, context),
                plaintext.as_mut_slice().into(),
                tag,
            )
            .map_err(|_| CryptoError::Tampered)?;
        Ok(plaintext)
    }

    fn backup_cipher(&self, id: u32) -> Option<XChaCha20Poly1305> {
        match self.purpose(id) {
            Some(KeyPurpose::Backup) => self.ciphers.get(&id).cloned(),
            _ => None,
        }
    }
}

/// What a [`Sealer::reload`] changed. `Display` gives a one-line summary for the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReloadSummary {
    /// Ids the new keyring has and the previous one did not, ascending.
    pub added: Vec<u32>,
    /// Ids the previous keyring had and the new one does not, ascending.
    pub removed: Vec<u32>,
    /// The active data key before the reload.
    pub previous_active: u32,
    /// The active data key now.
    pub active: u32,
    /// The current backup key before the reload.
    pub previous_backup: Option<u32>,
    /// The current backup key now.
    pub backup: Option<u32>,
}

impl ReloadSummary {
    fn between(before: &KeySet, after: &KeySet) -> ReloadSummary {
        let (old, new) = (&before.keyring.keys, &after.keyring.keys);
        ReloadSummary {
            added: new
                .keys()
                .filter(|id| !old.contains_key(id))
                .copied()
                .collect(),
            removed: old
                .keys()
                .filter(|id| !new.contains_key(id))
                .copied()
                .collect(),
            previous_active: before.active,
            active: after.active,
            previous_backup: before.keyring.backup,
            backup: after.keyring.backup,
        }
    }

    /// Whether new records are now sealed with a different key.
    pub fn active_changed(&self) -> bool {
        self.previous_active != self.active
    }

    /// Whether the reload changed anything at all.
    pub fn changed(&self) -> bool {
        !self.added.is_empty()
            || !self.removed.is_empty()
            || self.active_changed()
            || self.previous_backup != self.backup
    }
}

impl fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backup = |b: Option<u32>| b.map_or("none".to_owned(), |id| id.to_string());
        write!(
            f,
            "keys added {:?}, removed {:?}; active key {} -> {}; backup key {} -> {}",
            self.added,
            self.removed,
            self.previous_active,
            self.active,
            backup(self.previous_backup),
            backup(self.backup)
        )
    }
}

impl Sealer {
    /// Takes the keyring; refuses one without an active data key (a backup-only keyring).
    pub fn new(keyring: Keyring) -> Result<Sealer, CryptoError> {
        Ok(Sealer {
            shared: Arc::new(SealerShared {
                current: ArcSwap::from_pointee(KeySet::new(keyring)?),
                reload: Mutex::new(()),
            }),
        })
    }

    /// Seals `plaintext` with the active data key, bound to `context` (see the module docs).
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        self.shared.current.load().seal(context, plaintext)
    }

    /// Opens a record sealed by [`Sealer::seal`] under the same `context`, with whichever data
    /// key its envelope names.
    ///
    /// Never returns unauthenticated bytes: any change to the record, its header or its
    /// context is an error. A key id this sealer does not hold is named in the error.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.shared.current.load().open(context, sealed)
    }

    /// Whether `sealed` should be rewrapped: its envelope names a key other than the active
    /// one. Also true for bytes that are not a well-formed envelope, so a rewrap pass reaches
    /// them and [`Sealer::rewrap`] reports what is wrong instead of the pass skipping them.
    pub fn needs_rewrap(&self, sealed: &[u8]) -> bool {
        envelope_key_id(sealed).map_or(true, |id| id != self.active_id())
    }

    /// Opens `sealed` (with the key it names) and seals the plaintext again with the active
    /// key, under the same `context`. Both steps use one key set, even across a reload.
    pub fn rewrap(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let set = self.shared.current.load();
        let plaintext = set.open(context, sealed)?;
        Ok(set.seal(context, &plaintext))
    }

    /// Swaps in a new key set for this handle and all its clones, without blocking seal or
    /// open; operations already running finish with the key set they started with.
    ///
    /// Refuses (and keeps the current key set) a keyring without an active data key, one
    /// holding a different key under an id in use ([`CryptoError::KeyChanged`]), and one that
    /// drops the active key ([`CryptoError::DropsActiveKey`]); see the module docs. Dropping
    /// other keys is accepted and reported in the summary: records under them no longer open.
    pub fn reload(&self, keyring: Keyring) -> Result<ReloadSummary, CryptoError> {
        let _serial = self.shared.reload.lock().unwrap_or_else(|p| p.into_inner());
        let next = KeySet::new(keyring)?;
        let current = self.shared.current.load_full();
        check_successor(&current.keyring, &next.keyring, &KeySource::InUse)?;
        let summary = ReloadSummary::between(&current, &next);
        self.shared.current.store(Arc::new(next));
        Ok(summary)
    }

    /// The id of the key new records are sealed with (at the moment of the call).
    pub fn active_id(&self) -> u32 {
        self.shared.current.load().active
    }

    /// The ids of every key held (data and backup), ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        self.shared.current.load().keyring.key_ids()
    }

    /// Ids, purposes and ages of the keys in use; no key bytes.
    pub fn status(&self) -> KeyringStatus {
        self.shared.current.load().keyring.status()
    }

    /// The current backup key and its id, as a ready cipher for writing a backup file; `None`
    /// if the keyring has no current backup key.
    pub fn backup_cipher(&self) -> Option<(u32, XChaCha20Poly1305)> {
        let set = self.shared.current.load();
        let id = set.keyring.backup?;
        set.backup_cipher(id).map(|cipher| (id, cipher))
    }

    /// Backup key `id` (current or older), to open a backup sealed with it; `None` if there
    /// is no such key or it is a data key.
    pub fn backup_cipher_by_id(&self, id: u32) -> Option<XChaCha20Poly1305> {
        self.shared.current.load().backup_cipher(id)
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.shared.current.load();
        f.debug_struct("Sealer")
            .field("active", &set.active)
            .field("backup", &set.keyring.backup)
            .field("key_ids", &set.keyring.key_ids())
            .finish()
    }
}

/// The key id a sealed record names, without opening it (for rotation status and rewrapping).
///
/// Checks the magic, the version and the minimum length, so `Ok` means the record is
/// well-formed enough to try opening — not that it is authentic.
pub fn envelope_key_id(sealed: &[u8]) -> Result<u32, CryptoError> {
    if sealed.len() < ENVELOPE_MAGIC.len() || sealed[..ENVELOPE_MAGIC.len()] != ENVELOPE_MAGIC {
        return Err(CryptoError::BadEnvelope {
            reason: "bad magic (expected \"CRN\")".to_owned(),
        });
    }
    let version = sealed
        .get(3)
        .copied()
        .ok_or_else(|| too_short(sealed.len()))?;
    if version != ENVELOPE_VERSION {
        return Err(CryptoError::UnsupportedVersion { version });
    }
    if sealed.len() < ENVELOPE_OVERHEAD {
        return Err(too_short(sealed.len()));
    }
    let id: [u8; 4] = sealed[4..HEADER_LEN].try_into().expect("4-byte slice");
    Ok(u32::from_be_bytes(id))
}

fn too_short(len: usize) -> CryptoError {
    CryptoError::BadEnvelope {
        reason: format!("{len} bytes, a sealed record has at least {ENVELOPE_OVERHEAD}"),
    }
}

fn header(key_id: u32) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..3].copy_from_slice(&ENVELOPE_MAGIC);
    h[3] = ENVELOPE_VERSION;
    h[4..].copy_from_slice(&key_id.to_be_bytes());
    h
}

fn associated_data(header: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + context.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(context);
    aad
}

/// Decodes one base64 key straight into a [`KeyMaterial`]; the error never echoes the input.
fn decode_key(encoded: &str) -> Result<KeyMaterial, String> {
    // base64 refuses an output slice smaller than its conservative estimate (33 for a
    // 32-byte key), hence the larger scratch buffer, wiped below.
    let mut scratch = [0u8; 48];
    let decoded = BASE64.decode_slice(encoded, &mut scratch);
    let result = match decoded {
        Ok(KEY_LEN) => {
            let mut material = KeyMaterial([0; KEY_LEN]);
            material.0.copy_from_slice(&scratch[..KEY_LEN]);
            Ok(material)
        }
        Ok(n) => Err(format!("key is {n} bytes, expected {KEY_LEN}")),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            Err(format!("key is longer than {KEY_LEN} bytes"))
        }
        Err(base64::DecodeSliceError::DecodeError(_)) => Err("key is not valid base64".to_owned()),
    };
    wipe(&mut scratch);
    result
}

/// Deserializes the whole of `bytes` as `T`, refusing unknown fields; the error names where
/// (`keys[2].purpose: …`) and never contains key material.
fn parse_strict<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut path = String::new();
        for segment in e.path().iter() {
            use serde_path_to_error::Segment;
            match segment {
                Segment::Seq { index } => path.push_str(&format!("[{index}]")),
                Segment::Map { key } | Segment::Enum { variant: key } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(echoable(key));
                }
                Segment::Unknown => path.push_str(".?"),
            }
        }
        let reason = json_reason(&e.inner().to_string());
        if path.is_empty() {
            reason
        } else {
            format!("{path}: {reason}")
        }
    })?;
    de.end().map_err(|e| json_reason(&e.to_string()))?;
    Ok(value)
}

/// A name from the file, if short enough to repeat in an error; `…` otherwise.
fn echoable(name: &str) -> &str {
    if name.chars().count() <= MAX_ECHOED_NAME {
        name
    } else {
        "…"
    }
}

/// A JSON error as a reason that cannot leak key material. serde quotes offending string
/// values in double quotes (`invalid type: string "…"`), always elided here, and names unknown
/// fields and variants in backquotes, elided when longer than [`MAX_ECHOED_NAME`]: a typo in a
/// field name is worth repeating, a key pasted into the wrong place is not.
fn json_reason(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['"', '`']) {
        out.push_str(&rest[..start]);
        let quote = &rest[start..start + 1];
        let after = &rest[start + 1..];
        let (inner, tail) = match after.find(quote) {
            Some(end) => (&after[..end], &after[end + 1..]),
            None => (after, ""),
        };
        let shown = if quote == "`" { echoable(inner) } else { "…" };
        out.push_str(quote);
        out.push_str(shown);
        out.push_str(quote);
        rest = tail;
    }
    out.push_str(rest);
    out
}

fn io_error(path: &Path, source: io::Error) -> CryptoError {
    CryptoError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The directory of `path` and a temporary file name beside it, unique to this process and
/// call (a leftover from a crashed run never blocks the next one).
fn temp_path(path: &Path) -> Result<(&Path, PathBuf), CryptoError> {
    let Some(name) = path.file_name() else {
        return Err(CryptoError::InvalidKeyring {
            path: path.to_owned(),
            reason: "path has no file name".to_owned(),
        });
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    Ok((dir, dir.join(tmp_name)))
}

/// Creates `tmp` (mode 0600, optionally owned by `owner`), writes `bytes` and fsyncs it.
/// `target` is the keyring file `tmp` will become, for error messages.
fn write_private(
    tmp: &Path,
    target: &Path,
    bytes: &[u8],
    owner: Option<(u32, u32)>,
) -> Result<(), CryptoError> {
    let io_err = |e| io_error(tmp, e);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io_err)?;
    // The umask can only remove bits from 0600; set it anyway so the result never depends on it.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err)?;
    if let Some((uid, gid)) = owner {
        let meta = file.metadata().map_err(io_err)?;
        if meta.uid() != uid {
            // The owner is who can read a 0600 file: not keeping it would lock the node out.
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(|source| {
                CryptoError::Ownership {
                    path: target.to_owned(),
                    uid,
                    gid,
                    source,
                }
            })?;
        } else if meta.gid() != gid {
            // The group of a 0600 file grants nothing; keep it if allowed, never fail on it.
            let _ = std::os::unix::fs::fchown(&file, None, Some(gid));
        }
    }
    file.write_all(bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

fn sync_dir(dir: &Path) -> Result<(), CryptoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

/// Overwrites `buf` with zeros in a way the optimiser may not elide.
fn wipe(buf: &mut [u8]) {
    for byte in buf.iter_mut() {
        // SAFETY: `byte` is a valid, aligned, exclusive reference to an initialised u8.
        unsafe { std::ptr::write_volatile(byte, 0) };
    }
    compiler_fence(Ordering::SeqCst);
}

/// Wipes the whole allocation of `v`, spare capacity included, then frees it.
fn wipe_vec(mut v: Vec<u8>) {
    v.resize(v.capacity(), 0);
    wipe(&mut v);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::time::{Duration, Instant};

    use chacha20poly1305::aead::Aead;
    use serde_json::json;

    use super::*;

    const DATA: KeyPurpose = KeyPurpose::Data;
    const BACKUP: KeyPurpose = KeyPurpose::Backup;
    const CTX: &[u8] = b"\x08registry\x00\x00\x00\x01";

    fn keyring_with(ids: &[u32], active: u32) -> Keyring {
        let keys = ids.iter().map(|id| (*id, KeyEntry::fresh(DATA))).collect();
        Keyring {
            active: Some(active),
            backup: None,
            keys,
        }
    }

    /// A keyring with fixed key bytes (`[id; 32]`), so two calls build the same keys.
    fn ring(keys: &[(u32, KeyPurpose)], active: Option<u32>, backup: Option<u32>) -> Keyring {
        let keys = keys
            .iter()
            .map(|&(id, purpose)| {
                let entry = KeyEntry {
                    purpose,
                    material: KeyMaterial([id as u8; KEY_LEN]),
                    created_at: 1_700_000_000 + u64::from(id),
                };
                (id, entry)
            })
            .collect();
        let keyring = Keyring {
            active,
            backup,
            keys,
        };
        keyring
            .check_roles()
            .expect("test keyring keeps the invariants");
        keyring
    }

    fn copy(keyring: &Keyring) -> Keyring {
        Keyring {
            active: keyring.active,
            backup: keyring.backup,
            keys: (keyring.keys.iter())
                .map(|(id, entry)| (*id, entry.duplicate()))
                .collect(),
        }
    }

    fn sealer(keyring: &Keyring) -> Sealer {
        Sealer::new(copy(keyring)).expect("keyring has an active data key")
    }

    fn write_mode(path: &Path, contents: &[u8], mode: u32) {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn base64_keys(keyring: &Keyring) -> Vec<String> {
        (keyring.keys.values())
            .map(|e| BASE64.encode(e.material.0))
            .collect()
    }

    #[test]
    fn round_trip() {
        let sealer = Sealer::new(Keyring::generate()).unwrap();
        for plaintext in [&b""[..], b"x", b"hello, registry", &[0xAB; 10_000]] {
            let sealed = sealer.seal(CTX, plaintext);
            assert_eq!(sealed.len(), plaintext.len() + ENVELOPE_OVERHEAD);
            assert_eq!(&sealed[..4], b"CRN\x01");
            assert_eq!(envelope_key_id(&sealed).unwrap(), 1);
            assert_eq!(sealer.open(CTX, &sealed).unwrap(), plaintext);
        }
    }

    #[test]
    fn wrong_context_fails() {
        let sealer = Sealer::new(Keyring::generate()).unwrap();
        let sealed = sealer.seal(b"cf=log|key=1", b"entry");
        for other in [
            &b"cf=log|key=2"[..],
            b"cf=snap|key=1",
            b"",
            b"cf=log|key=1\0",
        ] {
            assert!(matches!(
                sealer.open(other, &sealed),
                Err(CryptoError::Tampered)
            ));
        }
    }

    #[test]
    fn every_flipped_byte_fails() {
        // Two keys, so a flipped key id can land on a key that exists as well as on one
        // that does not.
        let sealer = Sealer::new(keyring_with(&[1, 3], 1)).unwrap();
        let sealed = sealer.seal(CTX, b"the payload under test");
        for pos in 0..sealed.len() {
            for bit in [0x01, 0x02, 0x80] {
                let mut bad = sealed.clone();
                bad[pos] ^= bit;
                let result = sealer.open(CTX, &bad);
                assert!(
                    result.is_err(),
                    "flip 0x{bit:02x} at byte {pos} opened: {result:?}"
                );
            }
        }
        let err = |pos: usize| {
            let mut bad = sealed.clone();
            bad[pos] ^= 0x02;
            sealer.open(CTX, &bad).unwrap_err()
        };
        assert!(matches!(err(0), CryptoError::BadEnvelope { .. }));
        assert!(matches!(
            err(3),
            CryptoError::UnsupportedVersion { version: 3 }
        ));
        assert!(matches!(err(7), CryptoError::Tampered)); // key id 1 -> 3: exists, header bound
        assert!(matches!(err(6), CryptoError::UnknownKey { key_id: 0x201 }));
        assert!(matches!(err(20), CryptoError::Tampered)); // nonce
        assert!(matches!(err(sealed.len() - 1), CryptoError::Tampered)); // tag
    }

    #[test]
    fn truncated_fails() {
        let sealer = Sealer::new(Keyring::generate()).unwrap();
        let sealed = sealer.seal(CTX, b"some bytes");
        for len in 0..sealed.len() {
            let result = sealer.open(CTX, &sealed[..len]);
            assert!(result.is_err(), "truncated to {len} opened");
        }
        assert!(matches!(
            sealer.open(CTX, &sealed[..2]),
            Err(CryptoError::BadEnvelope { .. })
        ));
        assert!(matches!(
            sealer.open(CTX, &sealed[..ENVELOPE_OVERHEAD - 1]),
            Err(CryptoError::BadEnvelope { .. })
        ));
        assert!(matches!(
            sealer.open(CTX, &sealed[..ENVELOPE_OVERHEAD]),
            Err(CryptoError::Tampered)
        ));
        let mut extended = sealed.clone();
        extended.push(0);
        assert!(matches!(
            sealer.open(CTX, &extended),
            Err(CryptoError::Tampered)
        ));
    }

    #[test]
    fn unknown_key_is_named() {
        let old = Sealer::new(keyring_with(&[7], 7)).unwrap();
        let sealed = old.seal(CTX, b"secret");
        let current = Sealer::new(keyring_with(&[1, 2], 2)).unwrap();
        let err = current.open(CTX, &sealed).unwrap_err();
        assert!(matches!(err, CryptoError::UnknownKey { key_id: 7 }));
        assert_eq!(
            err.to_string(),
            "record sealed with key id 7, which the keyring does not have"
        );
    }

    #[test]
    fn rotation_keeps_old_records_readable() {
        let sealed_v1 = sealer(&ring(&[(1, DATA), (2, DATA)], Some(1), None)).seal(CTX, b"old");
        let sealer = sealer(&ring(&[(1, DATA), (2, DATA)], Some(2), None));
        let sealed_v2 = sealer.seal(CTX, b"new");
        assert_eq!(envelope_key_id(&sealed_v1).unwrap(), 1);
        assert_eq!(envelope_key_id(&sealed_v2).unwrap(), 2);
        assert_eq!(sealer.open(CTX, &sealed_v1).unwrap(), b"old");
        assert_eq!(sealer.open(CTX, &sealed_v2).unwrap(), b"new");
    }

    #[test]
    fn seals_of_same_plaintext_differ() {
        let sealer = Sealer::new(Keyring::generate()).unwrap();
        let a = sealer.seal(CTX, b"same");
        let b = sealer.seal(CTX, b"same");
        assert_ne!(a, b);
        assert_ne!(a[HEADER_LEN..BODY_OFFSET], b[HEADER_LEN..BODY_OFFSET]);
    }

    #[test]
    fn record_naming_a_backup_key_is_refused() {
        // Key 2 seals as a data key in one keyring; the same bytes are a backup key in the other.
        let sealed = sealer(&ring(&[(1, DATA), (2, DATA)], Some(2), None)).seal(CTX, b"record");
        let sealer = sealer(&ring(&[(1, DATA), (2, BACKUP)], Some(1), Some(2)));
        let err = sealer.open(CTX, &sealed).unwrap_err();
        assert!(
            matches!(
                err,
                CryptoError::WrongPurpose {
                    id: 2,
                    purpose: KeyPurpose::Backup,
                    needed: KeyPurpose::Data
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "key 2 is a backup key, not a data key");
    }

    #[test]
    fn load_refuses_group_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let keyring = Keyring::generate();
        write_mode(&path, &keyring.to_json(), 0o644);
        let err = Keyring::load(&path).unwrap_err();
        assert!(
            matches!(&err, CryptoError::InsecurePermissions { mode: 0o644, .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("0644"), "{message}");
    }

    #[test]
    fn load_accepts_owner_only_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let keyring = keyring_with(&[4, 9], 9);
        write_mode(&path, &keyring.to_json(), 0o600);
        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.active_id(), Some(9));
        assert_eq!(loaded.key_ids(), vec![4, 9]);
        write_mode(&path, &keyring.to_json(), 0o400);
        assert!(Keyring::load(&path).is_ok());
    }

    #[test]
    fn version_1_file_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        // Exactly what the previous build wrote.
        let (k1, k2) = (BASE64.encode([1u8; KEY_LEN]), BASE64.encode([2u8; KEY_LEN]));
        let v1 = format!(
            "{{\n  \"version\": 1,\n  \"active\": 2,\n  \"keys\": [\n    {{\n      \"id\": 1,\n      \"key\": \"{k1}\",\n      \"created_at\": 1700000001\n    }},\n    {{\n      \"id\": 2,\n      \"key\": \"{k2}\",\n      \"created_at\": 1700000002\n    }}\n  ]\n}}\n"
        );
        write_mode(&path, v1.as_bytes(), 0o600);
        let loaded = Keyring::load(&path).unwrap();
        let expected = ring(&[(1, DATA), (2, DATA)], Some(2), None);
        assert_eq!(loaded.status(), expected.status());
        // Same keys: records sealed under either open with the loaded keyring.
        let old = sealer(&ring(&[(1, DATA), (2, DATA)], Some(1), None)).seal(CTX, b"v1 record");
        let sealer = Sealer::new(loaded).unwrap();
        assert_eq!(sealer.open(CTX, &old).unwrap(), b"v1 record");
        assert_eq!(sealer.active_id(), 2);

        // Rewriting it upgrades it to version 2, same keys.
        let mut keyring = Keyring::load(&path).unwrap();
        let new = keyring.rotate().unwrap();
        keyring.replace_file(&path).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["version"], 2);
        assert_eq!(json["keys"][0]["purpose"], "data");
        let reloaded = Keyring::load(&path).unwrap();
        assert_eq!(reloaded.key_ids(), vec![1, 2, new]);
        assert_eq!(
            Sealer::new(reloaded).unwrap().open(CTX, &old).unwrap(),
            b"v1 record"
        );
    }

    #[test]
    fn version_2_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let mut keyring = Keyring::generate();
        assert_eq!(keyring.add_backup_key().unwrap(), 2);
        assert_eq!(keyring.rotate().unwrap(), 3);
        assert_eq!(keyring.add_backup_key().unwrap(), 4);
        keyring.write_new(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(
            dir_entries(dir.path()),
            ["keyring.json"],
            "temporary file left behind"
        );

        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["version"], 2);
        assert_eq!(json["active"], 3);
        assert_eq!(json["backup"], 4);
        let purposes: Vec<_> = (json["keys"].as_array().unwrap().iter())
            .map(|k| {
                (
                    k["id"].as_u64().unwrap(),
                    k["purpose"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            purposes,
            [(1, "data"), (2, "backup"), (3, "data"), (4, "backup")]
                .map(|(i, p)| (i, p.to_owned()))
        );

        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.status(), keyring.status());
        assert_eq!(loaded.backup_id(), Some(4));
        for (id, entry) in &keyring.keys {
            assert!(
                loaded.keys[id].same_key(entry),
                "key {id} changed in the round trip"
            );
        }
        let sealed = sealer(&keyring).seal(CTX, b"across a restart");
        assert_eq!(
            Sealer::new(loaded).unwrap().open(CTX, &sealed).unwrap(),
            b"across a restart"
        );

        // A generated keyring writes `"backup": null`, and reads back the same.
        let plain = dir.path().join("plain.json");
        Keyring::generate().write_new(&plain).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&plain).unwrap()).unwrap();
        assert_eq!(json["backup"], serde_json::Value::Null);
        assert_eq!(Keyring::load(&plain).unwrap().backup_id(), None);
    }

    #[test]
    fn write_new_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        Keyring::generate().write_new(&path).unwrap();
        let before = fs::read(&path).unwrap();
        let err = Keyring::generate().write_new(&path).unwrap_err();
        assert!(matches!(err, CryptoError::Exists { .. }), "{err:?}");
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    #[test]
    fn load_validates_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let key = BASE64.encode([7u8; 32]);
        let short = BASE64.encode([7u8; 31]);
        let entry = |id: u32, purpose: &str| json!({"id": id, "purpose": purpose, "key": key, "created_at": 0});
        let v2 =
            |active: serde_json::Value, backup: serde_json::Value, keys: Vec<serde_json::Value>| {
                json!({"version": 2, "active": active, "backup": backup, "keys": keys}).to_string()
            };
        let null = serde_json::Value::Null;
        let mut cases = vec![
            // Version 1.
            (
                format!(
                    r#"{{"version":1,"active":2,"keys":[{{"id":1,"key":"{key}","created_at":0}}]}}"#
                ),
                "active key id 2 is not among the keys",
            ),
            (
                format!(
                    r#"{{"version":1,"active":1,"keys":[{{"id":1,"key":"{key}","created_at":0}},{{"id":1,"key":"{key}","created_at":0}}]}}"#
                ),
                "key id 1 appears more than once",
            ),
            (
                format!(
                    r#"{{"version":1,"active":1,"keys":[{{"id":1,"key":"{short}","created_at":0}}]}}"#
                ),
                "key id 1: key is 31 bytes",
            ),
            (
                r#"{"version":1,"active":1,"keys":[{"id":1,"key":"!!!","created_at":0}]}"#
                    .to_owned(),
                "base64",
            ),
            (
                r#"{"version":1,"active":1,"keys":[]}"#.to_owned(),
                "no keys",
            ),
            (
                r#"{"version":1,"active":1,"keys":[],"extra":1}"#.to_owned(),
                "unknown field `extra`",
            ),
            (
                format!(
                    r#"{{"version":1,"active":1,"keys":[{{"id":1,"purpose":"data","key":"{key}","created_at":0}}]}}"#
                ),
                "version 1 file: keys[0].purpose: unknown field `purpose`",
            ),
            (
                format!(r#"{{"version":1,"active":"{key}","keys":[]}}"#),
                "active: invalid type",
            ),
            // Either version.
            (
                r#"{"version":3,"active":1,"keys":[]}"#.to_owned(),
                "unsupported keyring version 3",
            ),
            (r#"{"active":1,"keys":[]}"#.to_owned(), "missing field `version`"),
            ("not json".to_owned(), "line 1"),
            // Version 2 invariants.
            (
                v2(json!(1), null.clone(), vec![entry(1, "data"), entry(1, "backup")]),
                "key id 1 appears more than once",
            ),
            (
                v2(json!(2), null.clone(), vec![entry(1, "data"), entry(2, "backup")]),
                "active names key id 2, a backup key; it must name a data key",
            ),
            (
                v2(json!(1), json!(1), vec![entry(1, "data"), entry(2, "backup")]),
                "backup names key id 1, a data key; it must name a backup key",
            ),
            (
                v2(json!(1), json!(9), vec![entry(1, "data")]),
                "backup key id 9 is not among the keys",
            ),
            (
                v2(json!(9), null.clone(), vec![entry(1, "data")]),
                "active key id 9 is not among the keys",
            ),
            (
                v2(null.clone(), json!(2), vec![entry(1, "data"), entry(2, "backup")]),
                "active is null, but key id 1 is a data key",
            ),
            (
                v2(json!(1), null.clone(), vec![entry(1, "data"), entry(2, "dta")]),
                "keys[1].purpose: unknown variant `dta`, expected `data` or `backup`",
            ),
            (
                // A key pasted into the purpose is not repeated.
                v2(json!(1), null.clone(), vec![entry(1, &key)]),
                "keys[0].purpose: unknown variant `…`",
            ),
            (
                json!({"version": 2, "active": 1, "backup": null, "keys": [entry(1, "data")], "rotated": true})
                    .to_string(),
                "unknown field `rotated`",
            ),
            (
                json!({"version": 2, "active": 1, "keys": [
                    {"id": 1, "purpose": "data", "key": key, "created_at": 0, "note": "x"}]})
                .to_string(),
                "keys[0].note: unknown field `note`",
            ),
            (
                // A key pasted as a field name is not repeated either.
                json!({"version": 2, "active": 1, "keys": [
                    {"id": 1, "purpose": "data", "key": key, "created_at": 0, key.clone(): 1}]})
                .to_string(),
                "keys[0].…: unknown field `…`",
            ),
            (
                json!({"version": 2, "active": 1, "keys": [{"id": 1, "key": key, "created_at": 0}]})
                    .to_string(),
                "keys[0]: missing field `purpose`",
            ),
            (v2(json!(1), null.clone(), vec![]), "no keys"),
            (
                v2(
                    json!(1),
                    null.clone(),
                    (1..=65).map(|id| entry(id, "data")).collect(),
                ),
                "65 keys; a keyring holds at most 64",
            ),
        ];
        // Trailing garbage after a valid document.
        cases.push((
            format!("{} x", v2(json!(1), null.clone(), vec![entry(1, "data")])),
            "trailing characters",
        ));
        for (json, expected) in cases {
            write_mode(&path, json.as_bytes(), 0o600);
            let err = Keyring::load(&path).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, CryptoError::InvalidKeyring { .. }),
                "{json}: {err:?}"
            );
            assert!(
                message.contains(expected),
                "{json}:\n  {message}\n  expected: {expected}"
            );
            assert!(
                !message.contains(&key[..20]),
                "key material in error: {message}"
            );
        }

        // The edge of the limits is fine: 64 keys, and a backup-only keyring.
        let ok = [
            v2(
                json!(1),
                null.clone(),
                (1..=64).map(|id| entry(id, "data")).collect(),
            ),
            v2(
                null.clone(),
                json!(2),
                vec![entry(2, "backup"), entry(3, "backup")],
            ),
            v2(null.clone(), null.clone(), vec![entry(2, "backup")]),
            json!({"version": 2, "active": 1, "keys": [entry(1, "data")]}).to_string(),
        ];
        for json in ok {
            write_mode(&path, json.as_bytes(), 0o600);
            Keyring::load(&path).unwrap_or_else(|e| panic!("{json}: {e}"));
        }
    }

    #[test]
    fn json_reason_elides_quoted_values() {
        let key = BASE64.encode([9u8; 32]);
        let cases = [
            (
                format!("invalid type: string \"{key}\", expected u32"),
                "invalid type: string \"…\", expected u32".to_owned(),
            ),
            (
                "unknown field `purpse`, expected one of `id`, `purpose`".to_owned(),
                "unknown field `purpse`, expected one of `id`, `purpose`".to_owned(),
            ),
            (
                format!("unknown variant `{key}`, expected `data` or `backup`"),
                "unknown variant `…`, expected `data` or `backup`".to_owned(),
            ),
            (
                format!("unterminated `{key}"),
                "unterminated `…`".to_owned(),
            ),
            (
                format!("unterminated \"{key}"),
                "unterminated \"…\"".to_owned(),
            ),
            ("no quotes at all".to_owned(), "no quotes at all".to_owned()),
        ];
        for (message, expected) in cases {
            assert_eq!(json_reason(&message), expected);
        }
    }

    #[test]
    fn rotate_seals_with_new_id_and_old_records_open() {
        let mut keyring = Keyring::generate();
        let sealer = sealer(&keyring);
        let old = sealer.seal(CTX, b"before rotation");
        assert!(!sealer.needs_rewrap(&old));

        let id = keyring.rotate().unwrap();
        assert_eq!(id, 2);
        assert_eq!(keyring.active_id(), Some(2));
        assert_eq!(keyring.key_ids(), [1, 2]);
        let summary = sealer.reload(copy(&keyring)).unwrap();
        assert_eq!(summary.added, [2]);
        assert!(summary.removed.is_empty());
        assert!(summary.active_changed());
        assert_eq!(
            summary.to_string(),
            "keys added [2], removed []; active key 1 -> 2; backup key none -> none"
        );

        let new = sealer.seal(CTX, b"after rotation");
        assert_eq!(envelope_key_id(&new).unwrap(), 2);
        assert_eq!(sealer.active_id(), 2);
        assert_eq!(sealer.open(CTX, &old).unwrap(), b"before rotation");
        assert_eq!(sealer.open(CTX, &new).unwrap(), b"after rotation");
        assert!(sealer.needs_rewrap(&old));
        assert!(!sealer.needs_rewrap(&new));

        // Ids grow past every key held, whatever its purpose.
        assert_eq!(keyring.add_backup_key().unwrap(), 3);
        assert_eq!(keyring.rotate().unwrap(), 4);
        assert_eq!(keyring.backup_id(), Some(3));
    }

    #[test]
    fn adding_keys_stops_at_the_limits() {
        let mut keyring = Keyring::generate();
        for _ in 1..MAX_KEYS {
            keyring.rotate().unwrap();
        }
        assert_eq!(keyring.key_ids().len(), MAX_KEYS);
        assert!(matches!(keyring.rotate(), Err(CryptoError::TooManyKeys)));
        assert!(matches!(
            keyring.add_backup_key(),
            Err(CryptoError::TooManyKeys)
        ));
        assert_eq!(
            keyring.active_id(),
            Some(64),
            "a refused rotation changes nothing"
        );

        let mut top = ring(&[(u32::MAX, DATA)], Some(u32::MAX), None);
        let err = top.rotate().unwrap_err();
        assert!(matches!(err, CryptoError::NoFreeKeyId), "{err:?}");
        assert_eq!(top.key_ids(), [u32::MAX]);
    }

    #[test]
    fn remove_refuses_active_current_backup_unknown_and_last() {
        let mut keyring = ring(
            &[(1, DATA), (2, DATA), (3, BACKUP), (4, BACKUP)],
            Some(2),
            Some(4),
        );
        let cases: [(u32, &str); 3] = [
            (
                2,
                "key 2 is the active data key; rotate, rewrap, then remove it",
            ),
            (
                4,
                "key 4 is the current backup key; add a new backup key before removing it",
            ),
            (9, "keyring has no key 9"),
        ];
        for (id, expected) in cases {
            let err = keyring.remove(id).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
        assert_eq!(keyring.key_ids(), [1, 2, 3, 4]);
        keyring.remove(1).unwrap();
        keyring.remove(3).unwrap();
        assert_eq!(keyring.key_ids(), [2, 4]);
        assert!(matches!(
            keyring.remove(1),
            Err(CryptoError::NoSuchKey { id: 1 })
        ));

        // In a backup-only keyring without a current backup key, the last key stays.
        let mut imported = ring(&[(5, BACKUP), (6, BACKUP)], None, None);
        imported.remove(5).unwrap();
        let err = imported.remove(6).unwrap_err();
        assert!(
            matches!(err, CryptoError::RemoveLastKey { id: 6 }),
            "{err:?}"
        );
    }

    /// The whole procedure of the module docs on a simulated store: rotate, reload, rewrap,
    /// scan, remove, reload.
    #[test]
    fn rewrap_then_remove_old_key() {
        let mut keyring = Keyring::generate();
        let sealer = sealer(&keyring);
        let mut store: BTreeMap<Vec<u8>, Vec<u8>> = (0u32..50)
            .map(|i| {
                let context = [b"logs\0".as_slice(), &u64::from(i).to_be_bytes()].concat();
                let sealed = sealer.seal(&context, format!("entry {i}").as_bytes());
                (context, sealed)
            })
            .collect();
        let old_id = keyring.active_id().unwrap();

        let new_id = keyring.rotate().unwrap();
        sealer.reload(copy(&keyring)).unwrap();
        for (context, sealed) in store.iter_mut() {
            if sealer.needs_rewrap(sealed) {
                *sealed = sealer.rewrap(context, sealed).unwrap();
            }
        }
        let by_key = |store: &BTreeMap<Vec<u8>, Vec<u8>>, id| {
            (store.values())
                .filter(|s| envelope_key_id(s).unwrap() == id)
                .count()
        };
        assert_eq!(
            by_key(&store, old_id),
            0,
            "the scan finds no record under the old key"
        );
        assert_eq!(by_key(&store, new_id), store.len());

        keyring.remove(old_id).unwrap();
        let summary = sealer.reload(copy(&keyring)).unwrap();
        assert_eq!(summary.removed, [old_id]);
        assert!(summary.added.is_empty());
        assert!(!summary.active_changed());
        assert_eq!(sealer.key_ids(), [new_id]);
        for (i, (context, sealed)) in store.iter().enumerate() {
            assert_eq!(
                sealer.open(context, sealed).unwrap(),
                format!("entry {i}").as_bytes()
            );
            assert!(!sealer.needs_rewrap(sealed));
        }
    }

    #[test]
    fn rewrap_keeps_the_context_and_reports_failures() {
        let keyring = ring(&[(1, DATA), (2, DATA)], Some(2), None);
        let old = sealer(&ring(&[(1, DATA), (2, DATA)], Some(1), None)).seal(CTX, b"payload");
        let sealer = sealer(&keyring);
        let rewrapped = sealer.rewrap(CTX, &old).unwrap();
        assert_eq!(envelope_key_id(&rewrapped).unwrap(), 2);
        assert_eq!(sealer.open(CTX, &rewrapped).unwrap(), b"payload");
        assert!(matches!(
            sealer.open(b"elsewhere", &rewrapped),
            Err(CryptoError::Tampered)
        ));
        // Wrong context, tampering, garbage: rewrap refuses, and needs_rewrap lets a pass reach them.
        assert!(matches!(
            sealer.rewrap(b"elsewhere", &old),
            Err(CryptoError::Tampered)
        ));
        let mut tampered = old.clone();
        tampered[40] ^= 1;
        assert!(matches!(
            sealer.rewrap(CTX, &tampered),
            Err(CryptoError::Tampered)
        ));
        for garbage in [
            &b""[..],
            b"CRN",
            b"not a record at all, just bytes......................",
        ] {
            assert!(sealer.needs_rewrap(garbage));
            assert!(matches!(
                sealer.rewrap(CTX, garbage),
                Err(CryptoError::BadEnvelope { .. })
            ));
        }
    }

    #[test]
    fn reload_while_sealing_and_opening() {
        // Two keyrings with the same keys and different active ids, swapped back and forth.
        let keyrings = [
            ring(&[(1, DATA), (2, DATA)], Some(1), None),
            ring(&[(1, DATA), (2, DATA)], Some(2), None),
        ];
        let sealer = sealer(&keyrings[0]);
        let before = sealer.seal(CTX, b"sealed before the reloads");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let workers: Vec<_> = (0..4u8)
            .map(|n| {
                let (sealer, stop, seen, before) =
                    (sealer.clone(), stop.clone(), seen.clone(), before.clone());
                std::thread::spawn(move || {
                    let context = [b"worker".as_slice(), &[n]].concat();
                    let mut ops = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let payload = ops.to_be_bytes();
                        let sealed = sealer.seal(&context, &payload);
                        assert_eq!(sealer.open(&context, &sealed).unwrap(), payload);
                        assert_eq!(
                            sealer.open(CTX, &before).unwrap(),
                            b"sealed before the reloads"
                        );
                        let rewrapped = sealer.rewrap(&context, &sealed).unwrap();
                        assert_eq!(sealer.open(&context, &rewrapped).unwrap(), payload);
                        let id = envelope_key_id(&sealed).unwrap();
                        seen[(id - 1) as usize].fetch_add(1, Ordering::Relaxed);
                        ops += 1;
                    }
                    ops
                })
            })
            .collect();
        let started = Instant::now();
        let mut reloads = 0usize;
        while started.elapsed() < Duration::from_millis(200) {
            let summary = sealer.reload(copy(&keyrings[(reloads + 1) % 2])).unwrap();
            assert!(summary.active_changed());
            assert!(summary.added.is_empty() && summary.removed.is_empty());
            reloads += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            let ops = worker.join().expect("a worker failed");
            assert!(ops > 0, "a worker never ran");
        }
        assert!(reloads > 10, "only {reloads} reloads");
        let [one, two] = [0, 1].map(|i| seen[i].load(Ordering::Relaxed));
        assert!(one > 0 && two > 0, "seals under key 1: {one}, key 2: {two}");
    }

    #[test]
    fn reload_refuses_changed_keys_and_dropping_the_active_one() {
        let current = ring(&[(1, DATA), (2, DATA), (3, BACKUP)], Some(2), Some(3));
        let sealer = sealer(&current);
        let record = sealer.seal(CTX, b"record");

        let mut changed_bytes = copy(&current);
        changed_bytes.keys.get_mut(&1).unwrap().material.0[31] ^= 1;
        let changed_purpose = ring(&[(1, DATA), (2, DATA), (3, DATA)], Some(2), None);
        let stale = ring(&[(1, DATA)], Some(1), None);
        let backup_only = current.export_backup_keys().unwrap();
        let cases = [
            (changed_bytes, "key 1 differs from the key 1 in use"),
            (changed_purpose, "key 3 differs from the key 3 in use"),
            (
                stale,
                "the new keyring drops key 2, the active data key in use",
            ),
            (backup_only, "keyring has no active data key"),
        ];
        for (keyring, expected) in cases {
            let err = sealer.reload(keyring).unwrap_err();
            assert!(err.to_string().starts_with(expected), "{err}");
        }
        // Nothing changed.
        assert_eq!(sealer.status(), current.status());
        assert_eq!(sealer.open(CTX, &record).unwrap(), b"record");
        assert_eq!(envelope_key_id(&sealer.seal(CTX, b"x")).unwrap(), 2);

        // The same keyring again is a no-op; moving the active key back is allowed.
        assert!(!sealer.reload(copy(&current)).unwrap().changed());
        let back = ring(&[(1, DATA), (2, DATA), (3, BACKUP)], Some(1), Some(3));
        let summary = sealer.reload(back).unwrap();
        assert_eq!((summary.previous_active, summary.active), (2, 1));
        assert_eq!(sealer.open(CTX, &record).unwrap(), b"record");
    }

    #[test]
    fn reload_that_removes_a_key_fails_old_records_naming_it() {
        let sealer = sealer(&ring(&[(1, DATA)], Some(1), None));
        let old = sealer.seal(CTX, b"under key 1");
        sealer
            .reload(ring(&[(1, DATA), (2, DATA)], Some(2), None))
            .unwrap();
        let summary = sealer.reload(ring(&[(2, DATA)], Some(2), None)).unwrap();
        assert_eq!(summary.removed, [1]);
        let err = sealer.open(CTX, &old).unwrap_err();
        assert!(
            matches!(err, CryptoError::UnknownKey { key_id: 1 }),
            "{err:?}"
        );
        assert!(err.to_string().contains("key id 1"), "{err}");
        // Every clone follows the reload.
        assert!(sealer.clone().open(CTX, &old).is_err());
    }

    #[test]
    fn export_backup_keys_has_no_data_keys_and_cannot_seal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup-keys.json");
        let mut keyring = Keyring::generate();
        let first = keyring.add_backup_key().unwrap();
        keyring.rotate().unwrap();
        let second = keyring.add_backup_key().unwrap();

        let exported = keyring.export_backup_keys().unwrap();
        let status = exported.status();
        assert_eq!(status.active, None);
        assert_eq!(status.backup, Some(second));
        assert_eq!(exported.key_ids(), [first, second]);
        assert!(
            status.keys.iter().all(|k| k.purpose == BACKUP),
            "{status:?}"
        );

        exported.write_new(&path).unwrap();
        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.status(), status);
        let err = Sealer::new(loaded).unwrap_err();
        assert!(matches!(err, CryptoError::NoDataKey), "{err:?}");

        // The backup system opens what the node's current backup key wrote.
        let (id, cipher) = sealer(&keyring).backup_cipher().unwrap();
        let nonce = XNonce::generate();
        let backup = cipher.encrypt(&nonce, &b"backup file"[..]).unwrap();
        let loaded = Keyring::load(&path).unwrap();
        let opened = loaded
            .backup_cipher(id)
            .unwrap()
            .decrypt(&nonce, &backup[..]);
        assert_eq!(opened.unwrap(), b"backup file");

        let err = Keyring::generate().export_backup_keys().unwrap_err();
        assert!(matches!(err, CryptoError::NoBackupKey), "{err:?}");
    }

    #[test]
    fn import_backup_key() {
        // Cluster A: data key 1, backup keys 2 (old) and 3 (current).
        let mut cluster_a = Keyring::generate();
        cluster_a.add_backup_key().unwrap();
        cluster_a.add_backup_key().unwrap();
        let shared = cluster_a.export_backup_keys().unwrap();
        let nonce = XNonce::generate();
        let backup = (cluster_a.backup_cipher(2).unwrap())
            .encrypt(&nonce, &b"taken by cluster A"[..])
            .unwrap();

        // A node of cluster B holds only id 1, its own data key.
        let mut node_b = Keyring::generate();
        node_b.import_backup_key(&shared, 2).unwrap();
        assert_eq!(node_b.key_ids(), [1, 2]);
        assert_eq!(
            node_b.backup_id(),
            None,
            "an imported key is not made current"
        );
        assert_eq!(node_b.active_id(), Some(1));
        let sealer = sealer(&node_b);
        let opened = (sealer.backup_cipher_by_id(2).unwrap()).decrypt(&nonce, &backup[..]);
        assert_eq!(opened.unwrap(), b"taken by cluster A");
        assert!(sealer.backup_cipher().is_none());

        // Made current, it is the one new backups use.
        let mut current = copy(&node_b);
        current.set_current_backup(2).unwrap();
        assert_eq!(current.backup_id(), Some(2));
        let (id, cipher) = Sealer::new(current).unwrap().backup_cipher().unwrap();
        assert_eq!(id, 2);
        assert_eq!(
            cipher.decrypt(&nonce, &backup[..]).unwrap(),
            b"taken by cluster A"
        );
        let mut refused = copy(&node_b);
        let err = refused.set_current_backup(1).unwrap_err();
        assert_eq!(err.to_string(), "key 1 is a data key, not a backup key");
        let err = refused.set_current_backup(9).unwrap_err();
        assert_eq!(err.to_string(), "keyring has no key 9");
        assert_eq!(refused.backup_id(), None);

        // Again: a no-op. Survives a file round trip.
        node_b.import_backup_key(&cluster_a, 2).unwrap();
        assert_eq!(node_b.key_ids(), [1, 2]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        node_b.write_new(&path).unwrap();
        let loaded = Keyring::load(&path).unwrap();
        let opened = (loaded.backup_cipher(2).unwrap()).decrypt(&nonce, &backup[..]);
        assert_eq!(opened.unwrap(), b"taken by cluster A");

        // Refused: a data key, an id `from` lacks, an id held here by a different key, a full
        // keyring. Nothing is imported by a refusal.
        let err = node_b.import_backup_key(&cluster_a, 1).unwrap_err();
        assert_eq!(err.to_string(), "key 1 is a data key, not a backup key");
        let err = node_b.import_backup_key(&cluster_a, 7).unwrap_err();
        assert_eq!(err.to_string(), "keyring has no key 7");
        let mut other = Keyring::generate();
        other.rotate().unwrap(); // its id 2 is a data key
        let err = other.import_backup_key(&shared, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "key id 2 is already held here by a different key; refusing to import over it"
        );
        let mut full = Keyring::generate();
        for _ in 1..MAX_KEYS {
            full.rotate().unwrap();
        }
        let far = ring(&[(100, DATA), (200, BACKUP)], Some(100), Some(200));
        let err = full.import_backup_key(&far, 200).unwrap_err();
        assert!(matches!(err, CryptoError::TooManyKeys), "{err:?}");
    }

    #[test]
    fn backup_cipher_round_trip() {
        let mut keyring = Keyring::generate();
        assert!(sealer(&keyring).backup_cipher().is_none());
        let old = keyring.add_backup_key().unwrap();
        let sealer = sealer(&keyring);
        let (id, cipher) = sealer.backup_cipher().unwrap();
        assert_eq!(id, old);
        let nonce = XNonce::generate();
        let written = cipher
            .encrypt(&nonce, &b"backup under the old key"[..])
            .unwrap();

        let new = keyring.add_backup_key().unwrap();
        let summary = sealer.reload(copy(&keyring)).unwrap();
        assert_eq!(
            (summary.previous_backup, summary.backup),
            (Some(old), Some(new))
        );
        let (id, cipher) = sealer.backup_cipher().unwrap();
        assert_eq!(id, new);
        let newer = cipher
            .encrypt(&nonce, &b"backup under the new key"[..])
            .unwrap();
        assert!(cipher.decrypt(&nonce, &written[..]).is_err(), "keys differ");

        let by_old = sealer.backup_cipher_by_id(old).unwrap();
        assert_eq!(
            by_old.decrypt(&nonce, &written[..]).unwrap(),
            b"backup under the old key"
        );
        assert_eq!(
            (keyring
                .backup_cipher(new)
                .unwrap()
                .decrypt(&nonce, &newer[..]))
            .unwrap(),
            b"backup under the new key"
        );
        // Data keys are never handed out as backup ciphers.
        assert!(sealer.backup_cipher_by_id(1).is_none());
        assert!(keyring.backup_cipher(1).is_none());
        assert!(keyring.backup_cipher(99).is_none());
    }

    #[test]
    fn status_json_has_no_key_bytes() {
        let mut keyring = Keyring::generate();
        keyring.add_backup_key().unwrap();
        keyring.rotate().unwrap();
        let secrets = base64_keys(&keyring);
        let sealer = sealer(&keyring);
        for status in [keyring.status(), sealer.status()] {
            let json = serde_json::to_value(&status).unwrap();
            assert_eq!(json["active"], 3);
            assert_eq!(json["backup"], 2);
            let keys = json["keys"].as_array().unwrap();
            assert_eq!(keys.len(), 3);
            assert_eq!(keys[1]["purpose"], "backup");
            assert!(keys[0]["created_at"].as_u64().unwrap() > 1_700_000_000);
            assert_eq!(
                keys[0].as_object().unwrap().keys().collect::<Vec<_>>(),
                ["created_at", "id", "purpose"]
            );
            let text = json.to_string();
            for secret in &secrets {
                assert!(!text.contains(secret.as_str()), "{text}");
                assert!(!text.contains(&secret[..12]), "{text}");
            }
        }
    }

    #[test]
    fn debug_never_prints_keys() {
        let mut keyring = keyring_with(&[1, 2], 2);
        keyring.add_backup_key().unwrap();
        let secrets: Vec<[u8; KEY_LEN]> = keyring.keys.values().map(|e| e.material.0).collect();
        let keyring_debug = format!("{keyring:?} {keyring:#?}");
        let sealer = Sealer::new(keyring).unwrap();
        let sealer_debug = format!("{sealer:?} {sealer:#?}");
        let summary = sealer.reload(keyring_with(&[9], 9)).unwrap_err();
        let error_debug = format!("{summary:?} {summary}");
        for debug in [&keyring_debug, &sealer_debug] {
            assert!(debug.contains("active"), "{debug}");
            assert!(debug.contains("backup"), "{debug}");
        }
        for debug in [&format!("{keyring_debug}{sealer_debug}"), &error_debug] {
            for secret in &secrets {
                assert!(!debug.contains(&BASE64.encode(secret)), "{debug}");
                let decimal = format!("{:?}", &secret[..4]);
                assert!(!debug.contains(decimal.trim_end_matches(']')), "{debug}");
                let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
                assert!(!debug.contains(&hex[..8]), "{debug}");
            }
        }
    }

    #[test]
    fn replace_file_writes_0600_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let mut keyring = Keyring::generate();
        keyring.write_new(&path).unwrap();
        // A group-readable file is replaced (and fixed), not refused.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let inode_before = fs::metadata(&path).unwrap().ino();

        let new = keyring.rotate().unwrap();
        keyring.replace_file(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(
            dir_entries(dir.path()),
            ["keyring.json"],
            "temporary file left behind"
        );
        assert_ne!(
            fs::metadata(&path).unwrap().ino(),
            inode_before,
            "renamed, not rewritten in place"
        );
        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.active_id(), Some(new));
        assert_eq!(loaded.status(), keyring.status());

        // Remove the retired key: the file follows.
        keyring.remove(1).unwrap();
        keyring.replace_file(&path).unwrap();
        assert_eq!(Keyring::load(&path).unwrap().key_ids(), [new]);
        assert_eq!(dir_entries(dir.path()), ["keyring.json"]);
    }

    #[test]
    fn replace_file_refuses_what_would_lose_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let on_disk = ring(&[(1, DATA), (2, DATA)], Some(2), None);
        on_disk.write_new(&path).unwrap();
        let before = fs::read(&path).unwrap();

        // Another node's keyring (same ids, other bytes); a stale copy (lacks active key 2);
        // a second rotation racing the first (its key 3 differs from the one written).
        let mut first = copy(&on_disk);
        first.rotate().unwrap();
        let mut racing = copy(&on_disk);
        racing.rotate().unwrap();
        first.replace_file(&path).unwrap();
        let after_first = fs::read(&path).unwrap();
        let cases = [
            (
                keyring_with(&[1, 2], 2),
                format!("key 1 differs from the key 1 in {}", path.display()),
            ),
            (
                ring(&[(1, DATA)], Some(1), None),
                format!(
                    "the new keyring drops key 3, the active data key in {}",
                    path.display()
                ),
            ),
            (
                racing,
                format!("key 3 differs from the key 3 in {}", path.display()),
            ),
        ];
        for (keyring, expected) in cases {
            let err = keyring.replace_file(&path).unwrap_err();
            assert!(err.to_string().starts_with(&expected), "{err}");
            assert_eq!(
                fs::read(&path).unwrap(),
                after_first,
                "file changed on a refusal"
            );
            assert_eq!(dir_entries(dir.path()), ["keyring.json"]);
        }
        assert_ne!(before, after_first);

        // No file to replace, or a symbolic link: refused.
        let missing = dir.path().join("missing.json");
        let err = first.replace_file(&missing).unwrap_err();
        assert!(
            matches!(&err, CryptoError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert!(!missing.exists());
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = first.replace_file(&link).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn replace_file_keeps_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let mut keyring = Keyring::generate();
        keyring.write_new(&path).unwrap();
        if fs::metadata(&path).unwrap().uid() != 0 {
            eprintln!("not root: cannot give the file another owner; skipped");
            return;
        }
        std::os::unix::fs::chown(&path, Some(4242), Some(4343)).unwrap();
        keyring.rotate().unwrap();
        keyring.replace_file(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
        assert_eq!(mode_of(&path), 0o600);
    }

    #[test]
    fn envelope_key_id_checks_header() {
        assert!(matches!(
            envelope_key_id(b""),
            Err(CryptoError::BadEnvelope { .. })
        ));
        assert!(matches!(
            envelope_key_id(b"XYZ\x01"),
            Err(CryptoError::BadEnvelope { .. })
        ));
        assert!(matches!(
            envelope_key_id(b"CRN"),
            Err(CryptoError::BadEnvelope { .. })
        ));
        assert!(matches!(
            envelope_key_id(b"CRN\x02"),
            Err(CryptoError::UnsupportedVersion { version: 2 })
        ));
        let mut record = header(0xDEAD_BEEF).to_vec();
        record.resize(ENVELOPE_OVERHEAD, 0);
        assert_eq!(envelope_key_id(&record).unwrap(), 0xDEAD_BEEF);
    }
}
