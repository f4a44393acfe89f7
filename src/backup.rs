//! backup: the backup file format, a state snapshot streamed in authenticated chunks; knows nothing of Raft, RocksDB, HTTP or what the body means.
//!
//! The body is an opaque byte string (the serialized cluster state, produced elsewhere) that
//! may be gigabytes long, so nothing here holds it whole. [`encoder`] yields the file as a
//! sequence of buffers (what `GET /v1/snapshot` streams and [`write_file`] writes);
//! [`read_header`] reads the clear-text header without the key (`cairn snapshot inspect`, and
//! refusing a foreign cluster early); [`decoder`] yields the verified plaintext (restore);
//! [`verify`] checks a whole file and keeps nothing.
//!
//! # File format (version 1)
//!
//! | offset      | size | field                                                               |
//! |------------:|-----:|---------------------------------------------------------------------|
//! |           0 |    8 | magic `b"CAIRNBK\0"`                                                |
//! |           8 |    2 | format version, u16 big-endian, `1`                                 |
//! |          10 |    4 | header length `h`, u32 big-endian, at most 1 MiB                    |
//! |          14 |    h | header: UTF-8 JSON object, [`BackupHeader`] (unknown fields refused) |
//! |      14 + h |  ... | chunk 0, chunk 1, ..., chunk `k - 1`, back to back                  |
//!
//! With `c` = `chunk_size` (1 KiB ..= 16 MiB, default 64 KiB) and `n` = `plaintext_len`, both
//! from the header, the plaintext is cut into `k = max(1, ceil(n / c))` pieces of `c` bytes,
//! the last one shorter when `c` does not divide `n`; an empty plaintext is one empty chunk.
//! Chunk `i` on disk is the ciphertext of piece `i` (same length) followed by its 16-byte
//! Poly1305 tag. Nothing else is stored: no lengths per chunk, no trailer. So the file length
//! is fixed by the header, `14 + h + n + 16 k` ([`file_len`]): the server sends it as
//! `Content-Length` before streaming, and the reader checks it.
//!
//! # Chunk encryption: STREAM
//!
//! Each piece is one XChaCha20-Poly1305 message under the backup key, with
//!
//! - **nonce** (24 bytes) = `nonce_prefix` (19 bytes, fresh from the OS RNG for every file,
//!   hex in the header) ‖ `i` as u32 big-endian (4 bytes) ‖ last-chunk flag (1 byte: `0x01`
//!   for chunk `k - 1`, `0x00` for every other chunk);
//! - **associated data** = SHA-256 of file bytes `0 .. 14 + h`, i.e. of magic ‖ version ‖
//!   header length ‖ header bytes, exactly as they are on disk.
//!
//! This is the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár ("Online
//! Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015), with the
//! nonce layout that RustCrypto's `aead-stream` calls STREAM-BE32 (Tink's streaming AEAD has
//! nonces of the same shape). `aead` 0.6 no longer has a `stream` module: STREAM moved to
//! the separate `aead-stream` crate. On top of the AEAD, the construction is only the nonce
//! function below (`chunk_nonce`), so it is written out here. The persisted format is then
//! defined by this file alone, not by a crate's internals. `aead-stream` is only a
//! dev-dependency, for a test that checks interop byte for byte in both directions. Why each
//! part:
//!
//! - *Chunk index in the nonce:* a chunk that is moved, duplicated or dropped is opened under
//!   another index's nonce and fails authentication.
//! - *Last-chunk flag in the nonce:* a file cut at a chunk boundary ends in a chunk sealed as
//!   "not last", and nothing sealed as "last" can be followed by anything. So truncation and
//!   extension are caught by the cryptography even without trusting the length. Here the
//!   length is also checked, so those two are normally reported by length instead (saying
//!   which chunk is missing), and the flag is a second line of defence.
//! - *Header digest as associated data of every chunk:* the header travels in clear, because
//!   backup tooling and `inspect` read it without the key. But changing any byte of it (key
//!   id, lengths, cluster id...) makes chunk 0 fail. Until chunk 0 verifies, the header is a
//!   claim: the reader trusts it only for how many bytes to read, and those are bounded
//!   (a chunk is at most 16 MiB, the header at most 1 MiB).
//! - *Random prefix:* a nonce must never repeat under one key. Within a file the index keeps
//!   nonces distinct. Across files, 152 random bits make a repeat negligible, and so does
//!   sharing the key with [`crate::crypto`]'s records, whose nonces are 192 random bits. The
//!   prefix covers the 16 nonce bytes that XChaCha20 feeds to HChaCha20, so every file is in
//!   effect encrypted under its own subkey. The encoder, not the caller, draws the prefix:
//!   a caller that reused a header would otherwise reuse nonces, which would reveal the XOR
//!   of two plaintexts and allow forgeries.
//! - *Limits:* at most 2^32 chunks (the counter): 4 TiB at the smallest chunk size, 256 TiB
//!   at the default. XChaCha20-Poly1305's per-message limit (256 GiB) is far above a chunk.
//!
//! # What the reader promises
//!
//! A [`Decoder`] releases a chunk's plaintext only after that chunk has been authenticated.
//! It releases the last chunk only after confirming that nothing follows it. Any fault is an
//! error, never a short read that looks like the end. It does release earlier chunks before
//! later ones are checked, because that is what streaming means. So a restore must treat what
//! it has read as provisional until `read` returns `Ok(0)` (or [`Decoder::read_chunk`]
//! returns `None`). Memory is bounded by design: the header (at most 1 MiB) and one chunk
//! buffer (at most 16 MiB + 16 bytes, and no larger than the first chunk). Only when chunk 0
//! fails is a second chunk buffer allocated, to tell a modified header from a modified chunk
//! (see [`CorruptReason`]).
//!
//! Chunks are numbered from 0 everywhere, error messages included.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::iter::FusedIterator;
use std::ops::Range;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::Generate;
use chacha20poly1305::{AeadInOut, Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

/// First eight bytes of every backup file.
pub const MAGIC: [u8; 8] = *b"CAIRNBK\0";
/// The backup format this build writes (and the only one it reads).
pub const FORMAT_VERSION: u16 = 1;
/// Plaintext bytes per chunk unless the caller chooses otherwise: large enough that the
/// 16-byte tag per chunk is noise (0.02 %), small enough to stream with little memory.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Smallest allowed `chunk_size`. Below it, tags and per-chunk work dominate.
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// Largest allowed `chunk_size`. It bounds the buffer a reader allocates on the word of a
/// header that is not yet authenticated.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Largest allowed header. The header is read whole before anything is verified, so its
/// size must be bounded. Membership and counts need a few KiB.
pub const MAX_HEADER_LEN: u32 = 1024 * 1024;
/// Bytes each chunk adds to its plaintext: the Poly1305 tag.
pub const CHUNK_OVERHEAD: u64 = TAG_LEN as u64;
/// Length of the random per-file nonce prefix, in bytes (hex in the header, twice as many
/// characters).
pub const NONCE_PREFIX_LEN: usize = 19;

const TAG_LEN: usize = 16;
/// magic (8) + version (2) + header length (4).
const PREFIX_LEN: usize = 14;
/// The STREAM counter is a u32. A file may use every value, the last one for its last chunk.
const MAX_CHUNKS: u64 = 1 << 32;

/// Errors of the backup layer.
///
/// Only `Io`, `Body` and `File` can go away on retry (a network or disk hiccup). Every other
/// variant is a fact about the file or the input, and the same bytes will fail the same way.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading the backup stream failed.
    #[error("reading the backup failed: {0}")]
    Io(#[source] io::Error),
    /// A file-system operation of [`write_file`] failed.
    #[error("backup file {}: {source}", .path.display())]
    File {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading the plaintext given to the encoder failed.
    #[error("reading the state to back up failed: {0}")]
    Body(#[source] io::Error),
    /// The plaintext given to the encoder ended before `plaintext_len` bytes.
    #[error(
        "the state to back up ended after {found} bytes, but the header says plaintext_len = {expected}"
    )]
    BodyTooShort {
        /// `plaintext_len` from the header.
        expected: u64,
        /// Bytes the body produced.
        found: u64,
    },
    /// The plaintext given to the encoder has more than `plaintext_len` bytes.
    #[error("the state to back up is longer than the header's plaintext_len = {expected}")]
    BodyTooLong {
        /// `plaintext_len` from the header.
        expected: u64,
    },
    /// The file does not start with [`MAGIC`].
    #[error("not a cairn backup: the file does not start with the magic bytes \"CAIRNBK\\0\"")]
    NotABackup,
    /// The file is a backup in a format version this build does not read.
    #[error("backup has format version {0}; this build reads version {FORMAT_VERSION}")]
    UnsupportedVersion(u16),
    /// The header is malformed, or describes a file this format does not allow.
    #[error("invalid backup header: {0}")]
    BadHeader(String),
    /// The header names a backup key that the key lookup does not know.
    #[error("backup was encrypted with key id {id}, which the keyring does not have")]
    MissingKey {
        /// The header's `backup_key_id`.
        id: u32,
    },
    /// A chunk failed authentication.
    #[error("{}", corrupt_message(*.chunk, .reason))]
    Corrupt {
        /// The chunk that failed, numbered from 0.
        chunk: u64,
        /// What the failure most likely means.
        reason: CorruptReason,
    },
    /// The file ends before the header says it should.
    #[error("{}", truncated_message(*.found_len, .at))]
    Truncated {
        /// Bytes the file has.
        found_len: u64,
        /// Where it ends.
        at: TruncatedAt,
    },
    /// Bytes follow the last chunk.
    #[error(
        "backup has extra bytes after its last chunk (the header says the file is {expected_len} bytes)"
    )]
    TrailingData {
        /// The length the header implies.
        expected_len: u64,
    },
    /// A read after an earlier error. The decoder does not resume past a fault: its position
    /// in the stream is no longer known to be at a chunk boundary.
    #[error("an earlier read of this backup failed; the decoder cannot continue")]
    AlreadyFailed,
}

/// What a chunk's authentication failure most likely means.
///
/// A tag failure cannot tell whether the chunk was modified, the header it is bound to was
/// modified, or the key is wrong. When chunk 0 fails, the decoder also tries chunk 1 to narrow
/// it down: chunk 1 is bound to the same header and key, so if it verifies, only chunk 0 is bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptReason {
    /// A chunk after the first failed: it was modified, or chunks were reordered, duplicated
    /// or removed. The header and key are good, since chunk 0 verified under them.
    Modified,
    /// Chunk 0 failed but chunk 1 verified under the same header and key, so chunk 0 itself
    /// was modified or replaced.
    FirstChunkModified,
    /// Chunks 0 and 1 both failed: the header was modified, or the key with this id is not the
    /// key the file was written with. (Both chunks being modified, or swapped, looks the same.)
    HeaderOrKey {
        /// The header's `backup_key_id`.
        key_id: u32,
    },
    /// Chunk 0 failed and there was no intact chunk 1 to compare with. The header or chunk 0
    /// was modified, or the key is wrong.
    HeaderKeyOrChunk {
        /// The header's `backup_key_id`.
        key_id: u32,
    },
}

/// Where a truncated file ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TruncatedAt {
    /// Inside the fixed 14-byte prefix or the header JSON. `header_end` is the offset where the
    /// header should end. It is known once the length field has been read.
    Header {
        /// Offset of the first chunk, if the header length was read.
        header_end: Option<u64>,
    },
    /// At or inside chunk `chunk` (numbered from 0) of `chunks`. Every later chunk is missing.
    Chunk {
        /// The first chunk that is not complete.
        chunk: u64,
        /// How many chunks the header implies.
        chunks: u64,
        /// Whether some bytes of `chunk` are present.
        partial: bool,
        /// The file length the header implies.
        expected_len: u64,
    },
}

fn corrupt_message(chunk: u64, reason: &CorruptReason) -> String {
    match reason {
        CorruptReason::Modified => format!(
            "chunk {chunk} failed authentication: the file was modified or chunks were reordered"
        ),
        CorruptReason::FirstChunkModified => format!(
            "chunk {chunk} failed authentication: the first chunk was modified \
             (the header and the key are good: chunk 1 verified)"
        ),
        CorruptReason::HeaderOrKey { key_id } => format!(
            "header was modified, or key {key_id} is not the key this file was written with \
             (chunk {chunk} failed authentication, and so did chunk 1)"
        ),
        CorruptReason::HeaderKeyOrChunk { key_id } => format!(
            "header or chunk {chunk} was modified, or key {key_id} is not the key this file was \
             written with (chunk {chunk} failed authentication)"
        ),
    }
}

fn truncated_message(found_len: u64, at: &TruncatedAt) -> String {
    match *at {
        TruncatedAt::Header { .. } if found_len == 0 => {
            "backup is truncated: the file is empty".to_owned()
        }
        TruncatedAt::Header { header_end: None } => {
            format!("backup is truncated inside its 14-byte prefix (file is {found_len} bytes)")
        }
        TruncatedAt::Header {
            header_end: Some(end),
        } => format!(
            "backup is truncated inside its header (file is {found_len} bytes, the header ends at byte {end})"
        ),
        TruncatedAt::Chunk {
            chunk,
            chunks,
            partial,
            expected_len,
        } => {
            let last = chunks - 1;
            let what = match (partial, chunk == last) {
                (false, true) => format!("chunk {chunk} of {chunks} is missing"),
                (false, false) => format!("chunks {chunk} to {last} of {chunks} are missing"),
                (true, true) => format!("chunk {chunk} of {chunks} is incomplete"),
                (true, false) if chunk + 1 == last => {
                    format!("chunk {chunk} of {chunks} is incomplete and chunk {last} is missing")
                }
                (true, false) => format!(
                    "chunk {chunk} of {chunks} is incomplete and chunks {} to {last} are missing",
                    chunk + 1
                ),
            };
            format!(
                "backup is truncated: {what} (file is {found_len} bytes, header says {expected_len})"
            )
        }
    }
}

/// Callers that read a [`Decoder`] through `std::io` (a `BufReader`, a deserializer) get an
/// `io::Error` back. Converting it recovers the typed error the decoder put inside.
impl From<io::Error> for BackupError {
    fn from(e: io::Error) -> BackupError {
        if !e.get_ref().is_some_and(|inner| inner.is::<BackupError>()) {
            return BackupError::Io(e);
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<BackupError>()) {
            Some(Ok(backup)) => *backup,
            // Unreachable after the check above; rebuilt rather than panicking.
            Some(Err(other)) => BackupError::Io(io::Error::new(kind, other)),
            None => BackupError::Io(io::Error::from(kind)),
        }
    }
}

/// The decoder's errors reach `std::io` callers with the [`BackupError`] as the inner error
/// (`get_ref().downcast_ref::<BackupError>()`, or `BackupError::from`). Truncation maps to
/// `UnexpectedEof` and I/O errors keep their kind. Everything else is `InvalidData`.
impl From<BackupError> for io::Error {
    fn from(e: BackupError) -> io::Error {
        let kind = match &e {
            BackupError::Io(inner) | BackupError::Body(inner) => inner.kind(),
            BackupError::File { source, .. } => source.kind(),
            BackupError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// The clear-text header of a backup file (serialized as JSON, fields in this order).
///
/// Readable without the key, authenticated by every chunk (see the module docs). Build one
/// with [`BackupHeader::new`]. The encoder fills `nonce_prefix` and checks the rest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupHeader {
    /// Must equal the version in the file's binary prefix, [`FORMAT_VERSION`].
    pub format_version: u16,
    /// The cluster the state belongs to, so a restore can refuse a foreign backup early.
    pub cluster_id: String,
    /// Index of the last log entry applied to the state.
    pub last_log_index: u64,
    /// Term of that entry.
    pub last_log_term: u64,
    /// The cluster membership at that index. Opaque here: the caller fills and reads it.
    pub membership: serde_json::Value,
    /// When the backup was taken, in Unix seconds.
    pub created_at: u64,
    /// `created_at` as RFC 3339 UTC (`2024-02-29T12:00:00Z`), for humans. The encoder checks
    /// that it matches `created_at`, so that [`file_len`] computed before encoding stays exact.
    pub created_at_rfc3339: String,
    /// Object counts for humans and dashboards, e.g. `services`, `instances`, `roles`, `bindings`.
    pub counts: BTreeMap<String, u64>,
    /// Id of the backup key the chunks are encrypted with. The caller asserts that the cipher
    /// handed to the encoder is this key, because a cipher does not reveal its key.
    pub backup_key_id: u32,
    /// Plaintext bytes per chunk, [`MIN_CHUNK_SIZE`] ..= [`MAX_CHUNK_SIZE`].
    pub chunk_size: u32,
    /// Exact length of the plaintext body. The encoder refuses a body of any other length.
    pub plaintext_len: u64,
    /// The random per-file STREAM nonce prefix, [`NONCE_PREFIX_LEN`] bytes as lowercase hex.
    /// Leave it empty: the encoder draws a fresh one for every file and refuses a preset one.
    pub nonce_prefix: String,
}

impl BackupHeader {
    /// A header stamped with the current time and the default chunk size, with the nonce
    /// prefix left for the encoder.
    pub fn new(
        cluster_id: impl Into<String>,
        last_log_index: u64,
        last_log_term: u64,
        membership: serde_json::Value,
        counts: BTreeMap<String, u64>,
        backup_key_id: u32,
        plaintext_len: u64,
    ) -> BackupHeader {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        BackupHeader {
            format_version: FORMAT_VERSION,
            cluster_id: cluster_id.into(),
            last_log_index,
            last_log_term,
            membership,
            created_at: now,
            created_at_rfc3339: rfc3339_utc(now),
            counts,
            backup_key_id,
            chunk_size: DEFAULT_CHUNK_SIZE,
            plaintext_len,
            nonce_prefix: String::new(),
        }
    }

    /// Sets `created_at` and `created_at_rfc3339` together.
    pub fn with_created_at(mut self, unix_secs: u64) -> BackupHeader {
        self.created_at = unix_secs;
        self.created_at_rfc3339 = rfc3339_utc(unix_secs);
        self
    }
}

/// Counts from a [`verify`] run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyStats {
    /// Chunks verified (every chunk of the file).
    pub chunks: u64,
    /// Plaintext bytes they hold (the header's `plaintext_len`).
    pub plaintext_bytes: u64,
    /// Length of the file, header included.
    pub file_bytes: u64,
}

/// Where everything is in a file, derived from the header's `chunk_size` and `plaintext_len`
/// and the header's length on disk. Constructed only through [`Layout::new`], which enforces
/// the limits that make the arithmetic below overflow-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    chunk_size: u64,
    plaintext_len: u64,
    chunks: u64,
    file_len: u64,
}

impl Layout {
    fn new(chunk_size: u32, plaintext_len: u64, header_len: usize) -> Result<Layout, String> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(format!(
                "chunk_size {chunk_size} is outside the allowed {MIN_CHUNK_SIZE} ..= {MAX_CHUNK_SIZE} bytes"
            ));
        }
        if header_len > MAX_HEADER_LEN as usize {
            return Err(format!(
                "header is {header_len} bytes, more than the {MAX_HEADER_LEN}-byte limit"
            ));
        }
        let chunk_size = u64::from(chunk_size);
        let chunks = plaintext_len.div_ceil(chunk_size).max(1);
        if chunks > MAX_CHUNKS {
            return Err(format!(
                "plaintext_len {plaintext_len} needs {chunks} chunks of {chunk_size} bytes; \
                 the chunk counter allows at most 2^32"
            ));
        }
        // No overflow: chunks <= 2^32 and chunk_size <= 2^24 bound plaintext_len below 2^56,
        // the tags below 2^37 and the prefix plus header below 2^21.
        let file_len = (PREFIX_LEN + header_len) as u64 + plaintext_len + chunks * CHUNK_OVERHEAD;
        Ok(Layout {
            chunk_size,
            plaintext_len,
            chunks,
            file_len,
        })
    }

    /// Plaintext length of chunk `index` (< `chunks`). Chunk 0 is the largest.
    fn chunk_plain_len(&self, index: u64) -> usize {
        let start = index * self.chunk_size;
        let len = (self.plaintext_len - start).min(self.chunk_size);
        usize::try_from(len).expect("a chunk is at most 16 MiB")
    }

    fn is_last(&self, index: u64) -> bool {
        index + 1 == self.chunks
    }
}

/// The STREAM-BE32 nonce of chunk `index`: prefix ‖ index (u32 big-endian) ‖ last flag.
fn chunk_nonce(prefix: &[u8; NONCE_PREFIX_LEN], index: u64, last: bool) -> XNonce {
    let index = u32::try_from(index).expect("Layout caps a file at 2^32 chunks");
    let mut nonce = [0u8; 24];
    nonce[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    nonce[NONCE_PREFIX_LEN..NONCE_PREFIX_LEN + 4].copy_from_slice(&index.to_be_bytes());
    nonce[NONCE_PREFIX_LEN + 4] = u8::from(last);
    XNonce::from(nonce)
}

/// Encrypts `buf` (one chunk's plaintext) in place and appends its tag.
fn seal_chunk(key: &XChaCha20Poly1305, stream: &StreamParams, index: u64, buf: &mut Vec<u8>) {
    let nonce = chunk_nonce(&stream.nonce_prefix, index, stream.layout.is_last(index));
    let tag = key
        .encrypt_inout_detached(&nonce, &stream.aad, buf.as_mut_slice().into())
        .expect("a chunk (at most 16 MiB) is within XChaCha20-Poly1305's 256 GiB message limit");
    buf.extend_from_slice(&tag);
}

/// Authenticates and decrypts `sealed` (ciphertext ‖ tag, at least 16 bytes) in place.
/// Returns false, and leaves the ciphertext undecrypted, if the tag does not verify.
fn open_chunk(
    key: &XChaCha20Poly1305,
    stream: &StreamParams,
    index: u64,
    sealed: &mut [u8],
) -> bool {
    let nonce = chunk_nonce(&stream.nonce_prefix, index, stream.layout.is_last(index));
    let (ciphertext, tag) = sealed.split_at_mut(sealed.len() - TAG_LEN);
    let tag = <&Tag>::try_from(&*tag).expect("tag slice is 16 bytes");
    key.decrypt_inout_detached(&nonce, &stream.aad, ciphertext.into(), tag)
        .is_ok()
}

/// Everything chunk sealing and opening needs besides the key.
#[derive(Clone, Debug)]
struct StreamParams {
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    /// SHA-256 of the file's first `14 + h` bytes: the associated data of every chunk.
    aad: [u8; 32],
    layout: Layout,
}

fn header_digest(head: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, head);
    <[u8; 32]>::try_from(digest.as_ref()).expect("SHA-256 digests are 32 bytes")
}

fn header_json(header: &BackupHeader) -> Vec<u8> {
    serde_json::to_vec(header).expect("a BackupHeader always serializes: every map key is a string")
}

/// The length of the file that [`encoder`] produces for `header`, and the `Content-Length`
/// of `GET /v1/snapshot`.
///
/// It is exact whether or not the encoder has filled `nonce_prefix` yet, because in a file the
/// prefix always has `2 * NONCE_PREFIX_LEN` hex digits. So the server may call it before or
/// after [`encoder`]. [`Encoder::file_len`] gives the same value. Returns `u64::MAX` for a
/// header that [`encoder`] refuses (chunk size out of range, too many chunks), so use it
/// only for a header that is going to be encoded.
pub fn file_len(header: &BackupHeader) -> u64 {
    let header_len = if header.nonce_prefix.len() == 2 * NONCE_PREFIX_LEN {
        header_json(header).len()
    } else {
        let mut filled = header.clone();
        filled.nonce_prefix = "0".repeat(2 * NONCE_PREFIX_LEN);
        header_json(&filled).len()
    };
    Layout::new(header.chunk_size, header.plaintext_len, header_len)
        .map_or(u64::MAX, |l| l.file_len)
}

/// Streaming encoder: yields the backup file as byte buffers, first the prefix and header,
/// then one buffer per chunk (`chunk_size + 16` bytes, the last one possibly shorter).
///
/// It reads the plaintext from the body one chunk at a time, when asked for the next buffer.
/// So memory stays at one chunk, whatever the body's size. It checks that the body has
/// exactly `plaintext_len` bytes: a shorter body is an error at the chunk where it ends. A
/// longer one is an error in place of the last chunk, so no file that looks complete is
/// produced from a body of the wrong length. After an error the iterator ends. A consumer
/// that stops on the error therefore holds a file shorter than [`Encoder::file_len`], which
/// any reader refuses as truncated.
pub struct Encoder<R: Read> {
    body: R,
    key: XChaCha20Poly1305,
    header: BackupHeader,
    stream: StreamParams,
    /// Prefix and header bytes, until yielded.
    head: Option<Vec<u8>>,
    next_chunk: u64,
    finished: bool,
}

/// Starts encoding `body` as a backup with `header`, sealed with `key`.
///
/// The header must come from [`BackupHeader::new`] or match it: `format_version` =
/// [`FORMAT_VERSION`], `created_at_rfc3339` matching `created_at`, `chunk_size` within limits,
/// `nonce_prefix` empty. The encoder draws `nonce_prefix` from the OS RNG, so that no two files
/// share nonces. It fills it in the header it writes (see [`Encoder::header`]). `key` must be
/// the key named by `header.backup_key_id`. Nothing is read from `body` until the first chunk
/// is asked for.
pub fn encoder<R: Read>(
    header: BackupHeader,
    key: XChaCha20Poly1305,
    body: R,
) -> Result<Encoder<R>, BackupError> {
    encoder_with_prefix(header, key, body, <[u8; NONCE_PREFIX_LEN]>::generate())
}

/// [`encoder`] with a given nonce prefix. Private: only tests may choose the prefix, to get
/// reproducible files.
fn encoder_with_prefix<R: Read>(
    mut header: BackupHeader,
    key: XChaCha20Poly1305,
    body: R,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
) -> Result<Encoder<R>, BackupError> {
    if header.format_version != FORMAT_VERSION {
        return Err(BackupError::BadHeader(format!(
            "format_version is {}; this build writes version {FORMAT_VERSION}",
            header.format_version
        )));
    }
    if !header.nonce_prefix.is_empty() {
        return Err(BackupError::BadHeader(
            "nonce_prefix must be left empty: the encoder draws a fresh one for every file"
                .to_owned(),
        ));
    }
    let expected_time = rfc3339_utc(header.created_at);
    if header.created_at_rfc3339 != expected_time {
        return Err(BackupError::BadHeader(format!(
            "created_at_rfc3339 is {:?} but created_at {} is {expected_time}; set both with BackupHeader::with_created_at",
            header.created_at_rfc3339, header.created_at
        )));
    }
    header.nonce_prefix = hex::encode(nonce_prefix);
    let json = header_json(&header);
    let layout = Layout::new(header.chunk_size, header.plaintext_len, json.len())
        .map_err(BackupError::BadHeader)?;
    let header_len =
        u32::try_from(json.len()).expect("Layout::new checked the header is at most 1 MiB");
    let mut head = Vec::with_capacity(PREFIX_LEN + json.len());
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    head.extend_from_slice(&header_len.to_be_bytes());
    head.extend_from_slice(&json);
    let stream = StreamParams {
        nonce_prefix,
        aad: header_digest(&head),
        layout,
    };
    Ok(Encoder {
        body,
        key,
        header,
        stream,
        head: Some(head),
        next_chunk: 0,
        finished: false,
    })
}

impl<R: Read> Encoder<R> {
    /// The header as written, `nonce_prefix` filled.
    pub fn header(&self) -> &BackupHeader {
        &self.header
    }

    /// The exact length of the file this encoder yields, when it succeeds.
    pub fn file_len(&self) -> u64 {
        self.stream.layout.file_len
    }

    fn seal_next(&mut self) -> Result<Vec<u8>, BackupError> {
        let index = self.next_chunk;
        let layout = self.stream.layout;
        let len = layout.chunk_plain_len(index);
        let mut buf = Vec::with_capacity(len + TAG_LEN);
        buf.resize(len, 0);
        let got = read_full(&mut self.body, &mut buf).map_err(BackupError::Body)?;
        if got < len {
            return Err(BackupError::BodyTooShort {
                expected: layout.plaintext_len,
                found: index * layout.chunk_size + got as u64,
            });
        }
        if layout.is_last(index) {
            let mut extra = [0u8; 1];
            if read_full(&mut self.body, &mut extra).map_err(BackupError::Body)? > 0 {
                return Err(BackupError::BodyTooLong {
                    expected: layout.plaintext_len,
                });
            }
        }
        seal_chunk(&self.key, &self.stream, index, &mut buf);
        self.next_chunk += 1;
        Ok(buf)
    }
}

impl<R: Read> Iterator for Encoder<R> {
    type Item = Result<Vec<u8>, BackupError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        if let Some(head) = self.head.take() {
            return Some(Ok(head));
        }
        if self.next_chunk == self.stream.layout.chunks {
            self.finished = true;
            return None;
        }
        let item = self.seal_next();
        self.finished = item.is_err();
        Some(item)
    }
}

impl<R: Read> FusedIterator for Encoder<R> {}

impl<R: Read> fmt::Debug for Encoder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder")
            .field("header", &self.header)
            .field("next_chunk", &self.next_chunk)
            .field("chunks", &self.stream.layout.chunks)
            .finish_non_exhaustive()
    }
}

/// Writes a backup of `body` to `path` and returns the file's length.
///
/// The file appears complete or not at all, with mode 0600. The bytes go to a temporary file
/// in the same directory, which is fsynced, renamed over `path` (an older backup at `path` is
/// replaced atomically), and then the directory is fsynced. On error the temporary file is
/// removed and `path` is untouched.
pub fn write_file(
    path: &Path,
    header: BackupHeader,
    key: XChaCha20Poly1305,
    body: impl Read,
) -> Result<u64, BackupError> {
    let file_err = |p: &Path| {
        let p = p.to_owned();
        move |source| BackupError::File { path: p, source }
    };
    let encoder = encoder(header, key, body)?;
    let Some(name) = path.file_name() else {
        return Err(file_err(path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no file name",
        )));
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Pid plus random suffix: two writers of the same path, in this process or another,
    // never share a temporary file.
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".tmp-{}-{:016x}",
        std::process::id(),
        u64::generate()
    ));
    let tmp = dir.join(tmp_name);

    // Creating fails if the name exists, and then there is nothing of ours to clean up.
    let file = create_private(&tmp)?;
    let written = match write_synced(file, &tmp, encoder) {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(file_err(path)(e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err(dir))?;
    Ok(written)
}

/// Creates `tmp` with mode exactly 0600; fails if it exists.
fn create_private(tmp: &Path) -> Result<File, BackupError> {
    let file_err = |source| BackupError::File {
        path: tmp.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(file_err)?;
    // The umask can only clear bits of the mode above; set it exactly, so the result does not
    // depend on the process's umask.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(file_err)?;
    Ok(file)
}

/// Writes every buffer of `encoder` to `file` (at `tmp`) and fsyncs it.
fn write_synced<R: Read>(
    mut file: File,
    tmp: &Path,
    encoder: Encoder<R>,
) -> Result<u64, BackupError> {
    let file_err = |source| BackupError::File {
        path: tmp.to_owned(),
        source,
    };
    let expected = encoder.file_len();
    let mut written = 0u64;
    for buf in encoder {
        let buf = buf?;
        file.write_all(&buf).map_err(file_err)?;
        written += buf.len() as u64;
    }
    file.sync_all().map_err(file_err)?;
    debug_assert_eq!(
        written, expected,
        "the encoder yields exactly file_len bytes"
    );
    Ok(written)
}

/// What the reader learns from the prefix and header.
struct Head {
    header: BackupHeader,
    stream: StreamParams,
    /// Bytes of prefix and header, i.e. the offset of chunk 0.
    len: usize,
}

/// Reads only the prefix and header, without the key: for `inspect`, and to refuse a
/// foreign cluster before fetching keys or reading gigabytes.
///
/// Leaves `r` positioned at the first chunk. The header is checked for form (version, known
/// fields, chunk size, nonce prefix, limits) but is not authenticated: only a chunk proves it
/// untouched, so use [`verify`] or [`decoder`] before acting on its contents.
pub fn read_header<R: Read>(r: &mut R) -> Result<BackupHeader, BackupError> {
    read_head(r).map(|head| head.header)
}

fn read_head<R: Read>(r: &mut R) -> Result<Head, BackupError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let got = read_full(r, &mut prefix).map_err(BackupError::Io)?;
    let truncated = |found_len: usize, header_end: Option<u64>| BackupError::Truncated {
        found_len: found_len as u64,
        at: TruncatedAt::Header { header_end },
    };
    // Compare what there is of the magic first, so a short file that is not a backup at all
    // is reported as such, not as a truncated backup.
    let magic_len = got.min(MAGIC.len());
    if prefix[..magic_len] != MAGIC[..magic_len] {
        return Err(BackupError::NotABackup);
    }
    if got < 10 {
        return Err(truncated(got, None));
    }
    let version = u16::from_be_bytes([prefix[8], prefix[9]]);
    if version != FORMAT_VERSION {
        return Err(BackupError::UnsupportedVersion(version));
    }
    if got < PREFIX_LEN {
        return Err(truncated(got, None));
    }
    let header_len = u32::from_be_bytes([prefix[10], prefix[11], prefix[12], prefix[13]]);
    if header_len > MAX_HEADER_LEN {
        return Err(BackupError::BadHeader(format!(
            "header length field says {header_len} bytes, more than the {MAX_HEADER_LEN}-byte limit"
        )));
    }
    let header_end = PREFIX_LEN + header_len as usize;
    let mut head = Vec::with_capacity(header_end);
    head.extend_from_slice(&prefix);
    r.take(u64::from(header_len))
        .read_to_end(&mut head)
        .map_err(BackupError::Io)?;
    if head.len() < header_end {
        return Err(truncated(head.len(), Some(header_end as u64)));
    }
    let header: BackupHeader = serde_json::from_slice(&head[PREFIX_LEN..])
        .map_err(|e| BackupError::BadHeader(format!("not a version 1 header: {e}")))?;
    if header.format_version != version {
        return Err(BackupError::BadHeader(format!(
            "header says format_version {} but the file is version {version}",
            header.format_version
        )));
    }
    let nonce_prefix = parse_nonce_prefix(&header.nonce_prefix)?;
    let layout = Layout::new(header.chunk_size, header.plaintext_len, header_len as usize)
        .map_err(BackupError::BadHeader)?;
    let stream = StreamParams {
        nonce_prefix,
        aad: header_digest(&head),
        layout,
    };
    Ok(Head {
        header,
        stream,
        len: header_end,
    })
}

fn parse_nonce_prefix(hex_prefix: &str) -> Result<[u8; NONCE_PREFIX_LEN], BackupError> {
    let bad = || {
        BackupError::BadHeader(format!(
            "nonce_prefix must be {} hex digits, found {hex_prefix:?}",
            2 * NONCE_PREFIX_LEN
        ))
    };
    let bytes = hex::decode(hex_prefix).map_err(|_| bad())?;
    <[u8; NONCE_PREFIX_LEN]>::try_from(bytes.as_slice()).map_err(|_| bad())
}

/// Decrypting reader over a backup stream, positioned after the header (see [`decoder`]).
///
/// As a [`Read`] it yields the verified plaintext. Every fault (modified byte, reordered or
/// missing chunk, trailing bytes, I/O error) is an error, with the [`BackupError`] inside the
/// `io::Error`, and every later read fails too. `Ok(0)` means the whole file was read and
/// verified, and its length matches the header. [`Decoder::read_chunk`] gives the same
/// plaintext without copying, one chunk at a time, with typed errors. Plaintext is released
/// chunk by chunk, so treat it as provisional until the end (see the module docs).
///
/// Memory: one buffer the size of the first chunk, plus a second one only while diagnosing a
/// failure of chunk 0. The plaintext is not wiped from that buffer on drop: it is the state
/// the caller is reading into its own memory anyway. The cipher wipes its key on drop.
pub struct Decoder<R: Read> {
    inner: R,
    key: XChaCha20Poly1305,
    key_id: u32,
    stream: StreamParams,
    next_chunk: u64,
    /// Bytes read from `inner` so far, prefix and header included, for truncation reports.
    consumed: u64,
    /// The current chunk: ciphertext ‖ tag as read, then plaintext once verified.
    buf: Vec<u8>,
    /// Verified plaintext in `buf` not yet handed out.
    unread: Range<usize>,
    state: DecoderState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DecoderState {
    Reading,
    /// Every chunk verified and the stream ended where the header says.
    Finished,
    Failed,
}

/// Reads the header of `r`, finds its key with `keys` (by the header's `backup_key_id`) and
/// returns the header with a [`Decoder`] for the body.
///
/// Fails early with [`BackupError::MissingKey`] if `keys` does not know the id. The header is
/// authenticated only when the decoder verifies chunk 0.
pub fn decoder<R: Read>(
    mut r: R,
    keys: impl Fn(u32) -> Option<XChaCha20Poly1305>,
) -> Result<(BackupHeader, Decoder<R>), BackupError> {
    let Head {
        header,
        stream,
        len: head_len,
    } = read_head(&mut r)?;
    let key_id = header.backup_key_id;
    let key = keys(key_id).ok_or(BackupError::MissingKey { id: key_id })?;
    // Chunk 0 is the largest, so this one allocation serves the whole file.
    let buf = Vec::with_capacity(stream.layout.chunk_plain_len(0) + TAG_LEN);
    let decoder = Decoder {
        inner: r,
        key,
        key_id,
        stream,
        next_chunk: 0,
        consumed: head_len as u64,
        buf,
        unread: 0..0,
        state: DecoderState::Reading,
    };
    Ok((header, decoder))
}

impl<R: Read> Decoder<R> {
    /// The next piece of verified plaintext: the rest of the current chunk if a `read` left
    /// some, otherwise the next chunk (never empty). `None` once the whole file has been read
    /// and verified.
    pub fn read_chunk(&mut self) -> Result<Option<&[u8]>, BackupError> {
        if !self.fill()? {
            return Ok(None);
        }
        let range = std::mem::take(&mut self.unread);
        Ok(Some(&self.buf[range]))
    }

    /// The underlying reader. After `Ok(0)` / `None` it is at its end; after an error, at an
    /// unspecified position.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Makes sure `unread` is non-empty. Returns false at the verified end.
    fn fill(&mut self) -> Result<bool, BackupError> {
        while self.unread.is_empty() {
            match self.state {
                DecoderState::Finished => return Ok(false),
                DecoderState::Failed => return Err(BackupError::AlreadyFailed),
                DecoderState::Reading => {}
            }
            match self.load_next() {
                Ok(len) => self.unread = 0..len,
                Err(e) => {
                    self.state = DecoderState::Failed;
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    /// Reads, authenticates and decrypts the next chunk into `buf`; returns its plaintext length.
    fn load_next(&mut self) -> Result<usize, BackupError> {
        let layout = self.stream.layout;
        let index = self.next_chunk;
        let sealed_len = layout.chunk_plain_len(index) + TAG_LEN;
        // Within the capacity reserved in `decoder`: no chunk is larger than chunk 0.
        self.buf.resize(sealed_len, 0);
        let got = read_full(&mut self.inner, &mut self.buf).map_err(BackupError::Io)?;
        self.consumed += got as u64;
        if got < sealed_len {
            return Err(BackupError::Truncated {
                found_len: self.consumed,
                at: TruncatedAt::Chunk {
                    chunk: index,
                    chunks: layout.chunks,
                    partial: got > 0,
                    expected_len: layout.file_len,
                },
            });
        }
        if !open_chunk(&self.key, &self.stream, index, &mut self.buf) {
            let reason = if index == 0 {
                self.diagnose_first_chunk()
            } else {
                CorruptReason::Modified
            };
            return Err(BackupError::Corrupt {
                chunk: index,
                reason,
            });
        }
        self.next_chunk += 1;
        if layout.is_last(index) {
            // Confirm the end before releasing the last chunk, so that a reader that sees its
            // final bytes has a file that is valid through to the end.
            let mut extra = [0u8; 1];
            if read_full(&mut self.inner, &mut extra).map_err(BackupError::Io)? > 0 {
                return Err(BackupError::TrailingData {
                    expected_len: layout.file_len,
                });
            }
            self.state = DecoderState::Finished;
        }
        Ok(sealed_len - TAG_LEN)
    }

    /// Chunk 0 failed. Chunk 1, if there is one, is bound to the same header and key: if it
    /// verifies, chunk 0 alone was modified. This is the only place a second chunk buffer is
    /// allocated, and only on this error path. Its plaintext is dropped unreleased.
    fn diagnose_first_chunk(&mut self) -> CorruptReason {
        let key_id = self.key_id;
        let layout = self.stream.layout;
        if layout.chunks < 2 {
            return CorruptReason::HeaderKeyOrChunk { key_id };
        }
        let mut probe = vec![0u8; layout.chunk_plain_len(1) + TAG_LEN];
        match read_full(&mut self.inner, &mut probe) {
            Ok(n) if n == probe.len() => {
                if open_chunk(&self.key, &self.stream, 1, &mut probe) {
                    CorruptReason::FirstChunkModified
                } else {
                    CorruptReason::HeaderOrKey { key_id }
                }
            }
            _ => CorruptReason::HeaderKeyOrChunk { key_id },
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if !self.fill()? {
            return Ok(0);
        }
        let n = out.len().min(self.unread.len());
        let start = self.unread.start;
        out[..n].copy_from_slice(&self.buf[start..start + n]);
        self.unread.start += n;
        Ok(n)
    }
}

impl<R: Read> fmt::Debug for Decoder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("key_id", &self.key_id)
            .field("next_chunk", &self.next_chunk)
            .field("chunks", &self.stream.layout.chunks)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Verifies every chunk of a backup and keeps no plaintext; returns the header and counts.
///
/// `Ok` means the header is authentic, every chunk verified in order, and the file ends exactly
/// where the header says. By design this holds at most two chunk buffers, and the second only
/// while diagnosing a failed chunk 0 (see [`Decoder`]). So verifying a file of any size takes
/// at most about 2 × `chunk_size` + 1 MiB of memory.
pub fn verify<R: Read>(
    r: R,
    keys: impl Fn(u32) -> Option<XChaCha20Poly1305>,
) -> Result<(BackupHeader, VerifyStats), BackupError> {
    let (header, mut decoder) = decoder(r, keys)?;
    let mut plaintext_bytes = 0u64;
    while let Some(piece) = decoder.read_chunk()? {
        plaintext_bytes += piece.len() as u64;
    }
    let layout = decoder.stream.layout;
    debug_assert_eq!(decoder.consumed, layout.file_len);
    debug_assert_eq!(plaintext_bytes, layout.plaintext_len);
    let stats = VerifyStats {
        chunks: decoder.next_chunk,
        plaintext_bytes,
        file_bytes: decoder.consumed,
    };
    Ok((header, stats))
}

/// Reads until `buf` is full or the reader ends; returns the bytes read. Unlike `read_exact`,
/// it says how much was there, which the truncation reports need.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Formats Unix seconds as RFC 3339 UTC, `YYYY-MM-DDTHH:MM:SSZ`.
///
/// Written out rather than taken from a date crate: this is the only date the service
/// formats, and the conversion is a few lines of integer arithmetic. Years past 9999 (more
/// than 250 billion seconds from now) get more than four digits.
pub fn rfc3339_utc(unix_secs: u64) -> String {
    let (year, month, day) = civil_from_days(unix_secs / 86_400);
    let secs_of_day = unix_secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

/// (year, month 1-12, day 1-31) of the proleptic Gregorian calendar for a count of days since
/// 1970-01-01. Howard Hinnant's `civil_from_days`, restricted to non-negative day counts
/// (Unix seconds are unsigned), so that it needs only unsigned arithmetic. Days are counted
/// from 0000-03-01, so the leap day is the last day of each counted year, and the year is
/// split into 400-year eras of 146 097 days.
fn civil_from_days(days_since_epoch: u64) -> (u64, u64, u64) {
    let z = days_since_epoch + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z / 146_097;
    let day_of_era = z % 146_097; // 0 ..= 146_096
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // 0 ..= 399
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // 0 ..= 365
    let month_from_march = (5 * day_of_year + 2) / 153; // 0 ..= 11, March = 0
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::aead::{Key, KeyInit};
    use serde_json::json;
    use std::time::Instant;

    const KEY_ID: u32 = 3;
    const KIB: u32 = 1024;

    fn cipher(byte: u8) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&Key::<XChaCha20Poly1305>::from([byte; 32]))
    }

    /// The key lookup a restore would pass: knows `KEY_ID` only.
    fn keys(id: u32) -> Option<XChaCha20Poly1305> {
        (id == KEY_ID).then(|| cipher(1))
    }

    fn header(plaintext_len: u64, chunk_size: u32) -> BackupHeader {
        let counts = BTreeMap::from([("instances".to_owned(), 12), ("services".to_owned(), 3)]);
        // Single-key object: its serialization does not depend on serde_json's map order feature.
        let membership = json!({"voters": [1, 2, 3]});
        let mut h = BackupHeader::new(
            "cluster-a",
            42,
            7,
            membership,
            counts,
            KEY_ID,
            plaintext_len,
        )
        .with_created_at(1_709_208_000);
        h.chunk_size = chunk_size;
        h
    }

    fn pattern_byte(i: u64) -> u8 {
        (i.wrapping_mul(0x9E37_79B9) >> 11) as u8
    }

    fn plaintext(len: usize) -> Vec<u8> {
        (0..len as u64).map(pattern_byte).collect()
    }

    fn encode(h: BackupHeader, body: &[u8]) -> Vec<u8> {
        encoder(h, cipher(1), body)
            .expect("encoder")
            .collect::<Result<Vec<_>, _>>()
            .expect("encode")
            .concat()
    }

    /// A small file: 3.5 chunks of 1 KiB.
    fn sample() -> (BackupHeader, Vec<u8>, Vec<u8>) {
        let body = plaintext(3 * 1024 + 512);
        let h = header(body.len() as u64, KIB);
        let file = encode(h.clone(), &body);
        (h, body, file)
    }

    fn decode_all(file: &[u8]) -> Result<(BackupHeader, Vec<u8>), BackupError> {
        let (h, mut d) = decoder(file, keys)?;
        let mut out = Vec::new();
        while let Some(piece) = d.read_chunk()? {
            out.extend_from_slice(piece);
        }
        Ok((h, out))
    }

    fn check(file: &[u8]) -> Result<VerifyStats, BackupError> {
        verify(file, keys).map(|(_, stats)| stats)
    }

    /// Offset of the first chunk and the on-disk size of a full chunk.
    fn body_offset(file: &[u8]) -> usize {
        PREFIX_LEN + u32::from_be_bytes(file[10..14].try_into().unwrap()) as usize
    }

    fn chunk_ranges(file: &[u8], chunk_size: u32) -> Vec<Range<usize>> {
        let stride = chunk_size as usize + TAG_LEN;
        let mut start = body_offset(file);
        let mut ranges = Vec::new();
        while start < file.len() {
            let end = (start + stride).min(file.len());
            ranges.push(start..end);
            start = end;
        }
        ranges
    }

    /// A file with the given header JSON and body bytes, prefix computed.
    fn raw_file(version: u16, header_json: &[u8], body: &[u8]) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&version.to_be_bytes());
        f.extend_from_slice(&(header_json.len() as u32).to_be_bytes());
        f.extend_from_slice(header_json);
        f.extend_from_slice(body);
        f
    }

    fn header_value(file: &[u8]) -> serde_json::Value {
        serde_json::from_slice(&file[PREFIX_LEN..body_offset(file)]).unwrap()
    }

    #[test]
    fn round_trip_at_every_interesting_length() {
        for chunk_size in [KIB, DEFAULT_CHUNK_SIZE] {
            let c = chunk_size as usize;
            for len in [0, 1, c - 1, c, c + 1, 3 * c + c / 2] {
                let body = plaintext(len);
                let h = header(len as u64, chunk_size);
                let predicted = file_len(&h);
                let enc = encoder(h.clone(), cipher(1), body.as_slice()).unwrap();
                assert_eq!(
                    enc.file_len(),
                    predicted,
                    "file_len before encoding, len {len}"
                );
                assert_eq!(file_len(enc.header()), predicted, "file_len after encoding");
                let written = enc.header().clone();
                let file = enc.collect::<Result<Vec<_>, _>>().unwrap().concat();
                assert_eq!(file.len() as u64, predicted, "produced length, len {len}");

                let (read, out) = decode_all(&file).unwrap();
                assert_eq!(read, written);
                assert_eq!(out, body, "chunk {chunk_size} len {len}");

                let (_, mut d) = decoder(file.as_slice(), keys).unwrap();
                let mut via_read = Vec::new();
                d.read_to_end(&mut via_read).unwrap();
                assert_eq!(via_read, body);

                let stats = check(&file).unwrap();
                let chunks = (len as u64).div_ceil(u64::from(chunk_size)).max(1);
                assert_eq!(
                    stats,
                    VerifyStats {
                        chunks,
                        plaintext_bytes: len as u64,
                        file_bytes: predicted
                    }
                );
            }
        }
    }

    #[test]
    fn empty_plaintext_is_one_empty_chunk() {
        let file = encode(header(0, KIB), &[]);
        assert_eq!(file.len(), body_offset(&file) + TAG_LEN);
        assert_eq!(check(&file).unwrap().chunks, 1);
    }

    #[test]
    fn header_fields_survive_and_are_readable_without_key() {
        let (h, _, file) = sample();
        let read = read_header(&mut file.as_slice()).unwrap();
        assert_eq!(read.cluster_id, "cluster-a");
        assert_eq!(read.created_at_rfc3339, "2024-02-29T12:00:00Z");
        assert_eq!(read.nonce_prefix.len(), 2 * NONCE_PREFIX_LEN);
        let mut filled = h;
        filled.nonce_prefix = read.nonce_prefix.clone();
        assert_eq!(read, filled);
    }

    #[test]
    fn every_file_gets_a_fresh_nonce_prefix() {
        let a = encoder(header(10, KIB), cipher(1), &[0u8; 10][..]).unwrap();
        let b = encoder(header(10, KIB), cipher(1), &[0u8; 10][..]).unwrap();
        assert_ne!(a.header().nonce_prefix, b.header().nonce_prefix);
    }

    #[test]
    fn nonce_layout_is_prefix_counter_be_flag() {
        let prefix: [u8; NONCE_PREFIX_LEN] = core::array::from_fn(|i| i as u8 + 0xa0);
        let n = chunk_nonce(&prefix, 0x0102_0304, true);
        assert_eq!(&n[..19], &prefix);
        assert_eq!(&n[19..], &[1, 2, 3, 4, 1]);
        assert_eq!(chunk_nonce(&prefix, 5, false)[23], 0);
        assert_eq!(
            &chunk_nonce(&prefix, u64::from(u32::MAX), false)[19..23],
            &[0xff; 4]
        );
    }

    /// The chunks are standard STREAM-BE32: RustCrypto's independent implementation opens ours
    /// and we open theirs.
    #[test]
    fn chunks_interoperate_with_aead_stream_be32() {
        use aead_stream::{DecryptorBE32, EncryptorBE32};
        let prefix = [0x5a; NONCE_PREFIX_LEN];
        let body = plaintext(3 * 1024 + 100);
        let h = header(body.len() as u64, KIB);
        let buffers: Vec<Vec<u8>> =
            encoder_with_prefix(h.clone(), cipher(1), body.as_slice(), prefix)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let aad = header_digest(&buffers[0]);
        let (last, middle) = buffers[1..].split_last().unwrap();
        let mut theirs = DecryptorBE32::<XChaCha20Poly1305>::from_aead(cipher(1), (&prefix).into());
        let mut opened = Vec::new();
        for chunk in middle {
            let mut buf = chunk.clone();
            theirs.decrypt_next_in_place(&aad, &mut buf).unwrap();
            opened.extend_from_slice(&buf);
        }
        let mut buf = last.clone();
        theirs.decrypt_last_in_place(&aad, &mut buf).unwrap();
        opened.extend_from_slice(&buf);
        assert_eq!(opened, body);

        let mut sealer = EncryptorBE32::<XChaCha20Poly1305>::from_aead(cipher(1), (&prefix).into());
        let mut file = buffers[0].clone();
        let pieces: Vec<&[u8]> = body.chunks(1024).collect();
        let (last, middle) = pieces.split_last().unwrap();
        for piece in middle {
            let mut buf = piece.to_vec();
            sealer.encrypt_next_in_place(&aad, &mut buf).unwrap();
            file.extend_from_slice(&buf);
        }
        let mut buf = last.to_vec();
        sealer.encrypt_last_in_place(&aad, &mut buf).unwrap();
        file.extend_from_slice(&buf);
        assert_eq!(decode_all(&file).unwrap().1, body);
    }

    /// Pins format version 1 as produced by this code: any change to the layout, the header
    /// serialization or the chunk encryption changes this digest and must come with a new
    /// format version, or old backups become unreadable.
    #[test]
    fn format_v1_is_pinned() {
        let body = plaintext(2500);
        let h = header(body.len() as u64, KIB);
        let file: Vec<u8> = encoder_with_prefix(h, cipher(9), body.as_slice(), [0x11; 19])
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .concat();
        let digest = hex::encode(header_digest(&file));
        assert_eq!(
            digest,
            "2ae6147bbaf31429060a5606d2fd0449ebeb44eb6b4626a8cc29b6266e32c3e8"
        );
    }

    #[test]
    fn truncation_anywhere_is_refused_with_the_missing_part_named() {
        let (_, _, file) = sample();
        let offset = body_offset(&file);
        let stride = 1024 + TAG_LEN;
        let chunks = 4;
        for cut in 0..file.len() {
            let err = check(&file[..cut]).unwrap_err();
            let expected_at = if cut < PREFIX_LEN {
                TruncatedAt::Header { header_end: None }
            } else if cut < offset {
                TruncatedAt::Header {
                    header_end: Some(offset as u64),
                }
            } else {
                let rel = cut - offset;
                TruncatedAt::Chunk {
                    chunk: (rel / stride) as u64,
                    chunks,
                    partial: !rel.is_multiple_of(stride),
                    expected_len: file.len() as u64,
                }
            };
            match err {
                BackupError::Truncated { found_len, at } => {
                    assert_eq!(found_len, cut as u64, "cut {cut}");
                    assert_eq!(at, expected_at, "cut {cut}");
                }
                other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
            }
        }
    }

    #[test]
    fn truncation_messages_name_the_missing_chunks() {
        let (_, _, file) = sample();
        let ranges = chunk_ranges(&file, KIB);
        let total = file.len();
        let msg = |cut: usize| check(&file[..cut]).unwrap_err().to_string();
        assert_eq!(msg(0), "backup is truncated: the file is empty");
        assert_eq!(
            msg(5),
            "backup is truncated inside its 14-byte prefix (file is 5 bytes)"
        );
        assert!(msg(20).starts_with("backup is truncated inside its header (file is 20 bytes"));
        assert_eq!(
            msg(ranges[0].start),
            format!(
                "backup is truncated: chunks 0 to 3 of 4 are missing (file is {} bytes, header says {total})",
                ranges[0].start
            )
        );
        assert_eq!(
            msg(ranges[1].start + 10),
            format!(
                "backup is truncated: chunk 1 of 4 is incomplete and chunks 2 to 3 are missing \
                 (file is {} bytes, header says {total})",
                ranges[1].start + 10
            )
        );
        assert_eq!(
            msg(ranges[3].start),
            format!(
                "backup is truncated: chunk 3 of 4 is missing (file is {} bytes, header says {total})",
                ranges[3].start
            )
        );
        assert_eq!(
            msg(total - 1),
            format!(
                "backup is truncated: chunk 3 of 4 is incomplete (file is {} bytes, header says {total})",
                total - 1
            )
        );
        // The example from the operator docs.
        let example = BackupError::Truncated {
            found_len: 1_114_112,
            at: TruncatedAt::Chunk {
                chunk: 17,
                chunks: 40,
                partial: false,
                expected_len: 2_621_440,
            },
        };
        assert_eq!(
            example.to_string(),
            "backup is truncated: chunks 17 to 39 of 40 are missing (file is 1114112 bytes, header says 2621440)"
        );
    }

    #[test]
    fn a_removed_middle_chunk_is_refused() {
        let (_, _, file) = sample();
        let r = chunk_ranges(&file, KIB);
        let mut cut = file[..r[1].start].to_vec();
        cut.extend_from_slice(&file[r[2].start..]);
        let err = check(&cut).unwrap_err();
        assert!(
            matches!(
                err,
                BackupError::Corrupt {
                    chunk: 1,
                    reason: CorruptReason::Modified
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn every_flipped_byte_is_refused_with_the_right_error() {
        let (_, _, file) = sample();
        let offset = body_offset(&file);
        let ranges = chunk_ranges(&file, KIB);
        // 0x01 keeps header JSON printable (a different digit, letter or quote); 0x80 makes it
        // invalid UTF-8. In the chunks any flip is alike, so 0x80 is spent on the header only.
        for (mask, end) in [(0x01u8, file.len()), (0x80, offset)] {
            for i in 0..end {
                let mut bad = file.clone();
                bad[i] ^= mask;
                let err = check(&bad).expect_err("a flipped byte must be refused");
                let ok = match i {
                    0..=7 => matches!(err, BackupError::NotABackup),
                    8..=9 => matches!(err, BackupError::UnsupportedVersion(_)),
                    10..=13 => matches!(
                        err,
                        BackupError::BadHeader(_) | BackupError::Truncated { .. }
                    ),
                    _ if i < offset => matches!(
                        err,
                        BackupError::BadHeader(_)
                            | BackupError::MissingKey { .. }
                            | BackupError::Truncated { .. }
                            | BackupError::Corrupt {
                                chunk: 0,
                                reason: CorruptReason::HeaderOrKey { key_id: KEY_ID }
                            }
                    ),
                    _ => {
                        let chunk = ranges.iter().position(|r| r.contains(&i)).unwrap() as u64;
                        let reason = if chunk == 0 {
                            CorruptReason::FirstChunkModified
                        } else {
                            CorruptReason::Modified
                        };
                        matches!(err, BackupError::Corrupt { chunk: c, reason: r } if c == chunk && r == reason)
                    }
                };
                assert!(ok, "byte {i} ^ {mask:#04x}: unexpected {err:?}");
            }
        }
    }

    #[test]
    fn a_modified_header_value_fails_chunk_zero_as_header_modified() {
        let (_, _, file) = sample();
        let at = file.windows(9).position(|w| w == b"cluster-a").unwrap();
        let mut bad = file.clone();
        bad[at + 8] = b'b'; // cluster-b: still valid JSON, still a valid header
        let err = check(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                BackupError::Corrupt {
                    chunk: 0,
                    reason: CorruptReason::HeaderOrKey { key_id: KEY_ID }
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("header was modified"), "{err}");
    }

    #[test]
    fn single_chunk_file_with_bad_chunk_says_header_key_or_chunk() {
        let file = encode(header(100, KIB), &plaintext(100));
        let mut bad = file.clone();
        *bad.last_mut().unwrap() ^= 1;
        let err = check(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                BackupError::Corrupt {
                    chunk: 0,
                    reason: CorruptReason::HeaderKeyOrChunk { key_id: KEY_ID }
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn swapped_chunks_are_refused() {
        let (_, _, file) = sample();
        let r = chunk_ranges(&file, KIB);
        let mut bad = file.clone();
        bad[r[1].clone()].copy_from_slice(&file[r[2].clone()]);
        bad[r[2].clone()].copy_from_slice(&file[r[1].clone()]);
        let err = check(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                BackupError::Corrupt {
                    chunk: 1,
                    reason: CorruptReason::Modified
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "chunk 1 failed authentication: the file was modified or chunks were reordered"
        );

        let mut bad = file.clone();
        bad[r[0].clone()].copy_from_slice(&file[r[1].clone()]);
        bad[r[1].clone()].copy_from_slice(&file[r[0].clone()]);
        assert!(matches!(
            check(&bad).unwrap_err(),
            BackupError::Corrupt { chunk: 0, .. }
        ));
    }

    #[test]
    fn duplicated_chunks_are_refused() {
        let (_, _, file) = sample();
        let r = chunk_ranges(&file, KIB);
        let mut dup = file[..r[1].end].to_vec();
        dup.extend_from_slice(&file[r[1].clone()]);
        dup.extend_from_slice(&file[r[2].start..]);
        let err = check(&dup).unwrap_err();
        assert!(
            matches!(
                err,
                BackupError::Corrupt {
                    chunk: 2,
                    reason: CorruptReason::Modified
                }
            ),
            "{err:?}"
        );

        let mut dup_last = file.clone();
        dup_last.extend_from_slice(&file[r[3].clone()]);
        assert!(matches!(
            check(&dup_last).unwrap_err(),
            BackupError::TrailingData { expected_len } if expected_len == file.len() as u64
        ));
    }

    #[test]
    fn trailing_bytes_are_refused_before_the_last_chunk_is_released() {
        let (_, body, file) = sample();
        let mut long = file.clone();
        long.push(0);
        let err = check(&long).unwrap_err();
        assert!(matches!(err, BackupError::TrailingData { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "backup has extra bytes after its last chunk (the header says the file is {} bytes)",
                file.len()
            )
        );
        // Through `Read`: all but the last chunk come out, then the error, never `Ok(0)`.
        let (_, mut d) = decoder(long.as_slice(), keys).unwrap();
        let mut out = Vec::new();
        let io_err = d.read_to_end(&mut out).unwrap_err();
        assert_eq!(out, body[..3 * 1024]);
        assert!(matches!(
            BackupError::from(io_err),
            BackupError::TrailingData { .. }
        ));
    }

    #[test]
    fn unknown_key_id_is_missing_key_naming_the_id() {
        let body = plaintext(10);
        let mut h = header(10, KIB);
        h.backup_key_id = 7;
        let file = encode(h, &body);
        let err = check(&file).unwrap_err();
        assert!(matches!(err, BackupError::MissingKey { id: 7 }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "backup was encrypted with key id 7, which the keyring does not have"
        );
    }

    #[test]
    fn wrong_key_is_corrupt_at_chunk_zero() {
        let (_, _, file) = sample();
        let err = verify(file.as_slice(), |_| Some(cipher(2))).unwrap_err();
        assert!(
            matches!(
                err,
                BackupError::Corrupt {
                    chunk: 0,
                    reason: CorruptReason::HeaderOrKey { key_id: KEY_ID }
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "header was modified, or key 3 is not the key this file was written with \
             (chunk 0 failed authentication, and so did chunk 1)"
        );
    }

    #[test]
    fn first_chunk_modified_is_told_apart_from_header_modified() {
        let (_, _, file) = sample();
        let r = chunk_ranges(&file, KIB);
        let mut bad = file.clone();
        bad[r[0].start + 5] ^= 0x40;
        let err = check(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "chunk 0 failed authentication: the first chunk was modified \
             (the header and the key are good: chunk 1 verified)"
        );
    }

    #[test]
    fn header_with_unknown_field_is_refused() {
        let (_, _, file) = sample();
        let mut v = header_value(&file);
        v["compression"] = json!("zstd");
        let bad = raw_file(
            1,
            &serde_json::to_vec(&v).unwrap(),
            &file[body_offset(&file)..],
        );
        let err = read_header(&mut bad.as_slice()).unwrap_err();
        assert!(
            matches!(&err, BackupError::BadHeader(m) if m.contains("unknown field `compression`")),
            "{err:?}"
        );
    }

    #[test]
    fn header_with_chunk_size_out_of_range_is_refused() {
        let (_, _, file) = sample();
        for size in [0u64, 1023, 16 * 1024 * 1024 + 1, 100 * 1024 * 1024] {
            let mut v = header_value(&file);
            v["chunk_size"] = json!(size);
            let bad = raw_file(
                1,
                &serde_json::to_vec(&v).unwrap(),
                &file[body_offset(&file)..],
            );
            let err = read_header(&mut bad.as_slice()).unwrap_err();
            assert!(
                matches!(&err, BackupError::BadHeader(m) if m.contains("chunk_size")),
                "{size}: {err:?}"
            );
            let mut h = header(10, KIB);
            h.chunk_size = size as u32;
            assert!(matches!(
                encoder(h, cipher(1), &[0u8; 10][..]),
                Err(BackupError::BadHeader(_))
            ));
        }
    }

    #[test]
    fn header_length_over_1_mib_is_refused_before_reading_it() {
        let mut prefix = MAGIC.to_vec();
        prefix.extend_from_slice(&1u16.to_be_bytes());
        prefix.extend_from_slice(&(MAX_HEADER_LEN + 1).to_be_bytes());
        // Nothing follows the prefix: if the reader tried to read the header it would report
        // truncation, not BadHeader.
        let err = read_header(&mut prefix.as_slice()).unwrap_err();
        assert!(
            matches!(&err, BackupError::BadHeader(m) if m.contains("1048577")),
            "{err:?}"
        );
    }

    #[test]
    fn other_malformed_headers_are_refused() {
        let (_, _, file) = sample();
        let body = &file[body_offset(&file)..];
        let with = |field: &str, value: serde_json::Value| {
            let mut v = header_value(&file);
            v[field] = value;
            raw_file(1, &serde_json::to_vec(&v).unwrap(), body)
        };
        for bad in [
            with("format_version", json!(2)),
            with("nonce_prefix", json!("00")),
            with("nonce_prefix", json!("zz".repeat(19))),
            with("plaintext_len", json!(u64::MAX)),
            raw_file(1, b"not json", body),
            raw_file(1, b"", body),
        ] {
            let err = read_header(&mut bad.as_slice()).unwrap_err();
            assert!(matches!(err, BackupError::BadHeader(_)), "{err:?}");
        }
        let mut missing = header_value(&file);
        missing.as_object_mut().unwrap().remove("cluster_id");
        let bad = raw_file(1, &serde_json::to_vec(&missing).unwrap(), body);
        assert!(matches!(
            read_header(&mut bad.as_slice()),
            Err(BackupError::BadHeader(_))
        ));
    }

    #[test]
    fn other_versions_and_other_files_are_told_apart() {
        let (_, _, file) = sample();
        let mut v2 = file.clone();
        v2[8..10].copy_from_slice(&2u16.to_be_bytes());
        let err = check(&v2).unwrap_err();
        assert!(matches!(err, BackupError::UnsupportedVersion(2)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "backup has format version 2; this build reads version 1"
        );
        assert!(matches!(
            check(b"{\"not\": \"a backup\"}"),
            Err(BackupError::NotABackup)
        ));
        assert!(matches!(check(b"CAIX"), Err(BackupError::NotABackup)));
        assert!(matches!(
            check(b"CAIR"),
            Err(BackupError::Truncated { found_len: 4, .. })
        ));
    }

    #[test]
    fn encoder_refuses_headers_it_does_not_own() {
        let body = [0u8; 10];
        let mut preset = header(10, KIB);
        preset.nonce_prefix = "00".repeat(19);
        let mut stale_time = header(10, KIB);
        stale_time.created_at += 1;
        let mut v2 = header(10, KIB);
        v2.format_version = 2;
        let mut huge = header(10, KIB);
        huge.membership = json!("x".repeat(MAX_HEADER_LEN as usize));
        for h in [preset, stale_time, v2, huge] {
            let err = encoder(h, cipher(1), &body[..]).unwrap_err();
            assert!(matches!(err, BackupError::BadHeader(_)), "{err:?}");
        }
    }

    #[test]
    fn encoder_refuses_a_body_of_the_wrong_length() {
        let short = encoder(header(3000, KIB), cipher(1), &plaintext(2500)[..])
            .unwrap()
            .collect::<Vec<_>>();
        // head, chunks 0 and 1, then the error at chunk 2; nothing after it.
        assert_eq!(short.len(), 4);
        assert!(matches!(
            short[3],
            Err(BackupError::BodyTooShort {
                expected: 3000,
                found: 2500
            })
        ));

        let long = encoder(header(2048, KIB), cipher(1), &plaintext(2049)[..])
            .unwrap()
            .collect::<Vec<_>>();
        assert_eq!(long.len(), 3);
        assert!(matches!(
            long[2],
            Err(BackupError::BodyTooLong { expected: 2048 })
        ));
    }

    #[test]
    fn decoder_errors_reach_io_callers_typed_and_stay() {
        let (_, _, file) = sample();
        let r = chunk_ranges(&file, KIB);
        let mut bad = file.clone();
        bad[r[2].start] ^= 1;
        let (_, mut d) = decoder(bad.as_slice(), keys).unwrap();
        let mut sink = Vec::new();
        let err = io::copy(&mut d, &mut sink).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(
            err.get_ref().and_then(|e| e.downcast_ref::<BackupError>()),
            Some(BackupError::Corrupt { chunk: 2, .. })
        ));
        assert_eq!(sink.len(), 2048, "only verified chunks came out");
        // Never an EOF after an error.
        let again = d.read(&mut [0u8; 16]).unwrap_err();
        assert!(matches!(
            BackupError::from(again),
            BackupError::AlreadyFailed
        ));
        assert!(matches!(d.read_chunk(), Err(BackupError::AlreadyFailed)));

        let (_, mut d) = decoder(&file[..file.len() - 1], keys).unwrap();
        let err = io::copy(&mut d, &mut io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A reader that hands out at most 7 bytes per call and is interrupted every fifth call.
    struct Trickle<'a> {
        data: &'a [u8],
        calls: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(5) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(self.data.len()).min(1 + self.calls % 7);
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn short_and_interrupted_reads_are_handled() {
        let (_, body, file) = sample();
        let (_, mut d) = decoder(
            Trickle {
                data: &file,
                calls: 0,
            },
            keys,
        )
        .unwrap();
        let mut out = Vec::new();
        d.read_to_end(&mut out).unwrap();
        assert_eq!(out, body);
        let enc = encoder(
            header(body.len() as u64, KIB),
            cipher(1),
            Trickle {
                data: &body,
                calls: 0,
            },
        )
        .unwrap();
        let file2 = enc.collect::<Result<Vec<_>, _>>().unwrap().concat();
        assert_eq!(decode_all(&file2).unwrap().1, body);
    }

    /// Generates `len` pattern bytes without holding them.
    struct Pattern {
        pos: u64,
        len: u64,
    }

    impl Read for Pattern {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min((self.len - self.pos) as usize);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern_byte(self.pos + i as u64);
            }
            self.pos += n as u64;
            Ok(n)
        }
    }

    /// Reads an encoder's buffers as one stream: the file without the file.
    struct Chain<R: Read> {
        encoder: Encoder<R>,
        current: Vec<u8>,
        pos: usize,
    }

    impl<R: Read> Read for Chain<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            while self.pos == self.current.len() {
                match self.encoder.next() {
                    None => return Ok(0),
                    Some(next) => {
                        self.current = next?;
                        self.pos = 0;
                    }
                }
            }
            let n = buf.len().min(self.current.len() - self.pos);
            buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    /// Checks written bytes against the pattern as they arrive.
    struct PatternCheck {
        pos: u64,
    }

    impl Write for PatternCheck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            for (i, b) in buf.iter().enumerate() {
                assert_eq!(
                    *b,
                    pattern_byte(self.pos + i as u64),
                    "plaintext byte {}",
                    self.pos + i as u64
                );
            }
            self.pos += buf.len() as u64;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn large_backup_streams_through_in_bounded_memory() {
        // End to end (encode, then decode and compare as it streams), never held whole: the
        // body is generated, the file is streamed from encoder to decoder, and the output is
        // checked as it arrives. 50 MB in release builds. Debug builds run the unoptimized SIMD
        // intrinsics of chacha20/poly1305 at about 1.5 MB/s, where 50 MB would cost half a
        // minute of every test run, so they stream 5 MB (76 chunks) through the same path.
        let len: u64 = if cfg!(debug_assertions) {
            5_000_000
        } else {
            50_000_000
        };
        let h = header(len, DEFAULT_CHUNK_SIZE);
        let expected_len = file_len(&h);
        let started = Instant::now();
        let encoder = encoder(h, cipher(1), Pattern { pos: 0, len }).unwrap();
        let chain = Chain {
            encoder,
            current: Vec::new(),
            pos: 0,
        };
        let (_, mut d) = decoder(chain, keys).unwrap();
        let mut check = PatternCheck { pos: 0 };
        let copied = io::copy(&mut d, &mut check).unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(copied, len);
        assert!(d.into_inner().encoder.next().is_none());
        println!(
            "{} MB backup: encode + decode + check in {secs:.2} s, {:.1} MB/s ({expected_len} bytes on disk)",
            len / 1_000_000,
            len as f64 / 1e6 / secs,
        );
    }

    #[test]
    fn write_file_is_private_atomic_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster-a.cairnbk");
        let body = plaintext(5000);
        let h = header(5000, KIB);
        let expected = file_len(&h);
        let written = write_file(&path, h.clone(), cipher(1), body.as_slice()).unwrap();
        assert_eq!(written, expected);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), expected);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("cluster-a.cairnbk")]);
        let (read, stats) = verify(File::open(&path).unwrap(), keys).unwrap();
        assert_eq!(read.cluster_id, "cluster-a");
        assert_eq!(stats.plaintext_bytes, 5000);

        // A failed write leaves neither a temporary file nor a change to the existing backup.
        let err = write_file(&path, h, cipher(1), &body[..100]).unwrap_err();
        assert!(matches!(err, BackupError::BodyTooShort { .. }), "{err:?}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(verify(File::open(&path).unwrap(), keys).is_ok());
    }

    #[test]
    fn rfc3339_known_dates() {
        for (secs, expected) in [
            (0, "1970-01-01T00:00:00Z"),
            (86_399, "1970-01-01T23:59:59Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (951_868_800, "2000-03-01T00:00:00Z"),
            (1_709_208_000, "2024-02-29T12:00:00Z"),
            (1_735_689_599, "2024-12-31T23:59:59Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339_utc(secs), expected, "{secs}");
        }
        // Far future does not panic or overflow.
        assert!(rfc3339_utc(u64::MAX).ends_with('Z'));
    }

    #[test]
    fn civil_from_days_matches_a_day_by_day_calendar_walk() {
        // 1970-01-01 through 2500-12-31: covers the 2000 (leap) and 2100/2200/2300 (not leap)
        // century rules and more than one 400-year era.
        let is_leap =
            |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
        let month_len = |y: u64, m: u64| match m {
            2 if is_leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970, 1, 1);
        let mut days = 0u64;
        while y <= 2500 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            days += 1;
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
        // 531 years, 129 of them leap (every fourth, less 2100, 2200, 2300 and 2500).
        assert_eq!(days, 531 * 365 + 129);
    }
}
