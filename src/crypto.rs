//! crypto: the keyring and the sealing/opening of every persisted byte; knows nothing of RocksDB, Raft or the registry.
//!
//! Two types: a [`Keyring`] (the key file, loaded once and permission-checked) and a [`Sealer`]
//! (a cloneable handle that seals records with the active key and opens records sealed with any
//! key the keyring holds). Callers decide *what* is sealed and pass a `context` that says *where*
//! it lives; this module guarantees that a sealed record only opens under the same context.
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
//! # Key rotation
//!
//! The key id travels in clear in every envelope ([`envelope_key_id`]). Rotation adds a key and
//! makes it active: new seals use it, records sealed under older ids still open as long as the
//! keyring keeps those keys, until they are rewrapped.
//!
//! # Key material hygiene
//!
//! Raw keys are wiped from memory when a [`Keyring`] is dropped, the ciphers inside a [`Sealer`]
//! wipe theirs on drop (`chacha20poly1305`'s `zeroize` feature), and the buffers used to read
//! and write the key file are wiped after use. This is best effort: copies the compiler makes
//! on the stack are out of reach. `Debug` never prints key bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// The keyring file format this build reads and writes.
pub const KEYRING_VERSION: u32 = 1;
/// Length of every key, in bytes (XChaCha20-Poly1305 uses 256-bit keys).
pub const KEY_LEN: usize = 32;
/// A keyring file larger than this is not a keyring; refusing early keeps a mistaken path
/// (a log file, a device) from being read into memory.
const MAX_KEYRING_FILE_BYTES: u64 = 1024 * 1024;

/// Errors of the crypto layer. All of them are fatal for the record or file concerned:
/// retrying will not help.
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
}

/// The set of keys a node seals and opens with, and which of them is active.
///
/// Invariants (checked by every constructor): at least one key, unique ids, the active id is
/// among them.
pub struct Keyring {
    active: u32,
    keys: BTreeMap<u32, KeyEntry>,
}

struct KeyEntry {
    material: KeyMaterial,
    /// Unix seconds; informational (rotation status), never used for decisions.
    created_at: u64,
}

/// 32 key bytes, wiped on drop.
struct KeyMaterial([u8; KEY_LEN]);

impl Drop for KeyMaterial {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// The keyring file, as JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    version: u32,
    active: u32,
    keys: Vec<KeyFileEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileEntry {
    id: u32,
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
    /// Loads and validates a keyring file.
    ///
    /// Refuses the file if group or others have any permission on it, before reading a byte.
    pub fn load(path: &Path) -> Result<Keyring, CryptoError> {
        let io_err = |source| CryptoError::Io {
            path: path.to_owned(),
            source,
        };
        let invalid = |reason: String| CryptoError::InvalidKeyring {
            path: path.to_owned(),
            reason,
        };
        // Check the metadata of the opened file, not of the path, so the file we check is
        // the file we read.
        let mut file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(invalid("not a regular file".to_owned()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
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
        let parsed = read.map_err(io_err).and_then(|_| {
            serde_json::from_slice::<KeyringFile>(&bytes).map_err(|e| invalid(json_reason(&e)))
        });
        wipe_vec(bytes);
        Keyring::from_file(parsed?).map_err(invalid)
    }

    /// A fresh keyring: one key from the OS RNG, id 1, active.
    pub fn generate() -> Keyring {
        let mut key = Key::<XChaCha20Poly1305>::generate();
        let mut material = KeyMaterial([0; KEY_LEN]);
        material.0.copy_from_slice(&key);
        wipe(&mut key);
        let created_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut keys = BTreeMap::new();
        keys.insert(
            1,
            KeyEntry {
                material,
                created_at,
            },
        );
        Keyring { active: 1, keys }
    }

    /// Writes the keyring to a new file with mode 0600; refuses to replace an existing file.
    ///
    /// The file appears complete or not at all: the JSON goes to a temporary file in the same
    /// directory, which is fsynced, then hard-linked to `path` and the directory fsynced. A
    /// link (unlike a rename) fails if `path` appeared meanwhile, so a keyring — without which
    /// every record sealed under it is lost — is never silently replaced.
    pub fn write_new(&self, path: &Path) -> Result<(), CryptoError> {
        let io_err = |p: &Path| {
            let p = p.to_owned();
            move |source| CryptoError::Io { path: p, source }
        };
        if path.symlink_metadata().is_ok() {
            return Err(CryptoError::Exists {
                path: path.to_owned(),
            });
        }
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
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dir.join(tmp_name);

        let json = self.to_json();
        let written = write_synced(&tmp, &json);
        wipe_vec(json);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&tmp)(e));
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
            Err(e) => return Err(io_err(path)(e)),
        }
        removed.map_err(io_err(&tmp))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    }

    /// The id of the key new records are sealed with.
    pub fn active_id(&self) -> u32 {
        self.active
    }

    /// The ids of every key held, ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    fn from_file(file: KeyringFile) -> Result<Keyring, String> {
        if file.version != KEYRING_VERSION {
            return Err(format!(
                "unsupported keyring version {}; this build reads version {KEYRING_VERSION}",
                file.version
            ));
        }
        if file.keys.is_empty() {
            return Err("no keys".to_owned());
        }
        let mut keys = BTreeMap::new();
        for entry in &file.keys {
            if keys.contains_key(&entry.id) {
                return Err(format!("key id {} appears more than once", entry.id));
            }
            let material =
                decode_key(&entry.key).map_err(|why| format!("key id {}: {why}", entry.id))?;
            keys.insert(
                entry.id,
                KeyEntry {
                    material,
                    created_at: entry.created_at,
                },
            );
        }
        if !keys.contains_key(&file.active) {
            return Err(format!(
                "active key id {} is not among the keys",
                file.active
            ));
        }
        Ok(Keyring {
            active: file.active,
            keys,
        })
    }

    fn to_json(&self) -> Vec<u8> {
        let file = KeyringFile {
            version: KEYRING_VERSION,
            active: self.active,
            keys: self
                .keys
                .iter()
                .map(|(id, entry)| KeyFileEntry {
                    id: *id,
                    key: BASE64.encode(entry.material.0),
                    created_at: entry.created_at,
                })
                .collect(),
        };
        // Generously pre-sized so the buffer never reallocates and leaves key copies behind.
        let mut out = Vec::with_capacity(256 + 160 * self.keys.len());
        serde_json::to_writer_pretty(&mut out, &file)
            .expect("serializing a keyring to memory cannot fail");
        out.push(b'\n');
        out
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<_> = self
            .keys
            .iter()
            .map(|(id, entry)| KeyInfo {
                id: *id,
                created_at: entry.created_at,
            })
            .collect();
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("keys", &keys)
            .finish()
    }
}

/// What `Debug` shows of a key: never its bytes.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug only
struct KeyInfo {
    id: u32,
    created_at: u64,
}

/// A cloneable handle that seals with the active key and opens with any key of the keyring.
#[derive(Clone)]
pub struct Sealer {
    inner: Arc<SealerInner>,
}

struct SealerInner {
    active: u32,
    /// One initialised cipher per key; each wipes its key on drop.
    ciphers: BTreeMap<u32, XChaCha20Poly1305>,
}

impl Sealer {
    /// Takes the keyring; its raw key bytes are wiped once the ciphers are built.
    pub fn new(keyring: Keyring) -> Sealer {
        let ciphers = keyring
            .keys
            .iter()
            .map(|(id, entry)| {
                let mut key = Key::<XChaCha20Poly1305>::from(entry.material.0);
                let cipher = XChaCha20Poly1305::new(&key);
                wipe(&mut key);
                (*id, cipher)
            })
            .collect();
        Sealer {
            inner: Arc::new(SealerInner {
                active: keyring.active,
                ciphers,
            }),
        }
    }

    /// Seals `plaintext` with the active key, bound to `context` (see the module docs).
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let key_id = self.inner.active;
        let cipher = self
            .inner
            .ciphers
            .get(&key_id)
            .expect("the active key is in the keyring (Keyring invariant)");
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

    /// Opens a record sealed by [`Sealer::seal`] under the same `context`.
    ///
    /// Never returns unauthenticated bytes: any change to the record, its header or its
    /// context is an error.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key_id = envelope_key_id(sealed)?;
        let cipher = self
            .inner
            .ciphers
            .get(&key_id)
            .ok_or(CryptoError::UnknownKey { key_id })?;
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

    /// The id of the key new records are sealed with.
    pub fn active_id(&self) -> u32 {
        self.inner.active
    }

    /// The ids of every key this sealer can open with, ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        self.inner.ciphers.keys().copied().collect()
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("active", &self.inner.active)
            .field("key_ids", &self.key_ids())
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

/// A JSON error as a reason that cannot leak key material: serde quotes offending string
/// values (`invalid type: string "…"`), and a misplaced key would be one of them.
fn json_reason(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let mut out = String::with_capacity(message.len());
    let mut in_quotes = false;
    for c in message.chars() {
        if c == '"' {
            if !in_quotes {
                out.push_str("\"…");
            }
            in_quotes = !in_quotes;
        }
        if !in_quotes {
            out.push(c);
        }
    }
    out
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // The umask can only remove bits from 0600; set it anyway so the result never depends on it.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
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
    use super::*;

    fn keyring_with(ids: &[u32], active: u32) -> Keyring {
        let keys = ids
            .iter()
            .map(|id| {
                let mut material = KeyMaterial([0; KEY_LEN]);
                material
                    .0
                    .copy_from_slice(&Key::<XChaCha20Poly1305>::generate());
                (
                    *id,
                    KeyEntry {
                        material,
                        created_at: 1_700_000_000,
                    },
                )
            })
            .collect();
        Keyring { active, keys }
    }

    fn write_mode(path: &Path, contents: &[u8], mode: u32) {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    const CTX: &[u8] = b"\x08registry\x00\x00\x00\x01";

    #[test]
    fn round_trip() {
        let sealer = Sealer::new(Keyring::generate());
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
        let sealer = Sealer::new(Keyring::generate());
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
        let sealer = Sealer::new(keyring_with(&[1, 3], 1));
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
        let sealer = Sealer::new(Keyring::generate());
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
        let old = Sealer::new(keyring_with(&[7], 7));
        let sealed = old.seal(CTX, b"secret");
        let current = Sealer::new(keyring_with(&[1, 2], 2));
        let err = current.open(CTX, &sealed).unwrap_err();
        assert!(matches!(err, CryptoError::UnknownKey { key_id: 7 }));
        assert_eq!(
            err.to_string(),
            "record sealed with key id 7, which the keyring does not have"
        );
    }

    #[test]
    fn rotation_keeps_old_records_readable() {
        let raw = [(1u32, [1u8; KEY_LEN]), (2, [2u8; KEY_LEN])];
        let keyring = |active| Keyring {
            active,
            keys: raw
                .iter()
                .map(|(id, k)| {
                    let entry = KeyEntry {
                        material: KeyMaterial(*k),
                        created_at: 0,
                    };
                    (*id, entry)
                })
                .collect(),
        };
        let sealed_v1 = Sealer::new(keyring(1)).seal(CTX, b"old");
        let sealer = Sealer::new(keyring(2));
        let sealed_v2 = sealer.seal(CTX, b"new");
        assert_eq!(envelope_key_id(&sealed_v1).unwrap(), 1);
        assert_eq!(envelope_key_id(&sealed_v2).unwrap(), 2);
        assert_eq!(sealer.open(CTX, &sealed_v1).unwrap(), b"old");
        assert_eq!(sealer.open(CTX, &sealed_v2).unwrap(), b"new");
    }

    #[test]
    fn seals_of_same_plaintext_differ() {
        let sealer = Sealer::new(Keyring::generate());
        let a = sealer.seal(CTX, b"same");
        let b = sealer.seal(CTX, b"same");
        assert_ne!(a, b);
        assert_ne!(a[HEADER_LEN..BODY_OFFSET], b[HEADER_LEN..BODY_OFFSET]);
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
        assert_eq!(loaded.active_id(), 9);
        assert_eq!(loaded.key_ids(), vec![4, 9]);
        write_mode(&path, &keyring.to_json(), 0o400);
        assert!(Keyring::load(&path).is_ok());
    }

    #[test]
    fn write_new_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let keyring = Keyring::generate();
        keyring.write_new(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let entries: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(entries.len(), 1, "temporary file left behind");

        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["active"], 1);
        assert_eq!(json["keys"][0]["id"], 1);

        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.active_id(), keyring.active_id());
        assert_eq!(loaded.key_ids(), keyring.key_ids());
        let sealed = Sealer::new(keyring).seal(CTX, b"across a restart");
        assert_eq!(
            Sealer::new(loaded).open(CTX, &sealed).unwrap(),
            b"across a restart"
        );
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
        let cases = [
            (
                format!(
                    r#"{{"version":2,"active":1,"keys":[{{"id":1,"key":"{key}","created_at":0}}]}}"#
                ),
                "version 2",
            ),
            (
                format!(
                    r#"{{"version":1,"active":2,"keys":[{{"id":1,"key":"{key}","created_at":0}}]}}"#
                ),
                "active key id 2",
            ),
            (
                format!(
                    r#"{{"version":1,"active":1,"keys":[{{"id":1,"key":"{key}","created_at":0}},{{"id":1,"key":"{key}","created_at":0}}]}}"#
                ),
                "more than once",
            ),
            (
                format!(
                    r#"{{"version":1,"active":1,"keys":[{{"id":1,"key":"{short}","created_at":0}}]}}"#
                ),
                "31 bytes",
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
                "unknown field",
            ),
            (
                format!(r#"{{"version":1,"active":"{key}","keys":[]}}"#),
                "invalid type",
            ),
            ("not json".to_owned(), "line 1"),
        ];
        for (json, expected) in cases {
            write_mode(&path, json.as_bytes(), 0o600);
            let err = Keyring::load(&path).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, CryptoError::InvalidKeyring { .. }),
                "{json}: {err:?}"
            );
            assert!(message.contains(expected), "{json}: {message}");
            assert!(
                !message.contains(&key[..20]),
                "key material in error: {message}"
            );
        }
    }

    #[test]
    fn debug_never_prints_keys() {
        let keyring = keyring_with(&[1, 2], 2);
        let secrets: Vec<[u8; KEY_LEN]> = keyring.keys.values().map(|e| e.material.0).collect();
        let keyring_debug = format!("{keyring:?} {keyring:#?}");
        let sealer = Sealer::new(keyring);
        let sealer_debug = format!("{sealer:?} {sealer:#?}");
        for debug in [keyring_debug, sealer_debug] {
            assert!(debug.contains("active"), "{debug}");
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
