//! storage: RocksDB holds the raft log, the vote and snapshots, every value sealed; all
//! on-disk and wire encoding lives here. Knows nothing of HTTP, TLS or the API.
//!
//! The state machine applies registry commands, policy changes and restores; each is
//! authorized here, at its log position, with the pure [`crate::authz`] evaluation against
//! the policy at that same position (so this module uses `authz` and `identity`, beyond the
//! `registry` and `crypto` of DESIGN.md's table: the decision must be part of the apply).
//!
//! Layout (one RocksDB database, three column families):
//!
//! | cf          | key                        | value (sealed, see [`crate::crypto`])           |
//! |-------------|----------------------------|--------------------------------------------------|
//! | `logs`      | log index, u64 big-endian  | one openraft entry                               |
//! | `meta`      | `vote`, `committed`, `last_purged`, `node_id` | the named value              |
//! | `snapshots` | `current`                  | snapshot meta + registry and policy state        |
//!
//! Every value is `seal(context = cf | 0x00 | key, ENCODING_V1 | bincode(value))`, so a record
//! cannot be read after one byte changes, and cannot be moved to another key or column family.
//! Keys hold no registry data (indices and fixed names only).
//!
//! Durability contract with openraft: `save_vote` and `truncate_after` return only after an
//! fsync; `append` writes its whole batch as one RocksDB `WriteBatch` (readable on return) and
//! hands the completion to the [`Syncer`] thread, which fsyncs the WAL once for every batch
//! queued since its last sync (group commit) and only then reports the batch flushed. The
//! registry itself lives in memory; the log plus the newest snapshot rebuild it on restart.
//!
//! A snapshot (tens of megabytes for a large registry) bypasses the WAL: it is written to the
//! `snapshots` memtable and flushed to its own SST and blob file, and counts as stored once
//! that flush is durable. It takes its own lock, so the log's appends and WAL syncs never queue
//! behind it (they did: a 30 MB synced snapshot write stalled every write in the cluster).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock, RwLockReadGuard};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, FlushOptions, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::authz::{self, AclCommand, Action, Policy, Resource};
use crate::crypto::{CryptoError, Sealer};
use crate::identity::Identity;
use crate::raft::{
    BackupState, Entry, LogId, Request, Response, Snapshot, SnapshotMeta, StoredMembership,
    TypeConfig, Vote,
};
use crate::registry::{Command, Registry};

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const CF_SNAPSHOTS: &str = "snapshots";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_NODE_ID: &[u8] = b"node_id";
const KEY_SNAPSHOT: &[u8] = b"current";

/// Version byte in front of every plaintext before sealing; bump when an encoding changes.
const ENCODING_V1: u8 = 1;

/// What can go wrong below openraft. Integrity failures are fatal for the node: it must not
/// serve data it cannot authenticate.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("record {cf}/{key} cannot be opened: {source}")]
    Integrity {
        cf: &'static str,
        key: String,
        #[source]
        source: CryptoError,
    },
    #[error("record {cf}/{key} cannot be decoded: {reason}")]
    Decode {
        cf: &'static str,
        key: String,
        reason: String,
    },
    #[error("data directory belongs to node {found}, but this node is {expected}")]
    NodeIdMismatch { found: u64, expected: u64 },
    #[error("log is not contiguous: expected index {expected}, found {found}")]
    Hole { expected: u64, found: u64 },
}

impl From<StorageError> for io::Error {
    fn from(e: StorageError) -> Self {
        let kind = match e {
            StorageError::Integrity { .. }
            | StorageError::Decode { .. }
            | StorageError::Hole { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Encodes a value as `ENCODING_V1 | bincode`: the one encoding used on disk and on the wire.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![ENCODING_V1];
    // Encoding into a Vec cannot fail for our types (no maps with non-string keys issues in bincode).
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .expect("bincode encoding into a Vec does not fail");
    out
}

/// Decodes what [`encode`] produced; refuses unknown versions and trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&ENCODING_V1, body)) => {
            let (v, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map_err(|e| e.to_string())?;
            if used != body.len() {
                return Err(format!("{} trailing bytes", body.len() - used));
            }
            Ok(v)
        }
        Some((v, _)) => Err(format!("unknown encoding version {v}")),
        None => Err("empty record".to_string()),
    }
}

fn key_display(key: &[u8]) -> String {
    if key.len() == 8 {
        u64::from_be_bytes(key.try_into().expect("8 bytes")).to_string()
    } else {
        String::from_utf8_lossy(key).into_owned()
    }
}

/// A cloneable handle on the database and the sealer. The only type that touches RocksDB.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    sealer: Sealer,
    /// Serializes writes to `logs` and `meta` with the rewrap pass, which re-reads a record
    /// under it before replacing it, so a rewrap never resurrects or clobbers a record written
    /// meanwhile.
    write_lock: Arc<Mutex<()>>,
    /// The same for `snapshots`, which no batch shares with another column family: a snapshot
    /// being stored never holds up the log.
    snapshot_lock: Arc<Mutex<()>>,
}

/// A record as RocksDB holds it: key and sealed value.
type RawRecord = (Box<[u8]>, Box<[u8]>);

/// What a rewrap pass did, and how many records each key id seals afterwards.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RewrapReport {
    /// Records re-sealed under the active key in this pass.
    pub rewrapped: u64,
    /// Records per key id after the pass (all under the active key once a pass completes).
    pub records_per_key: BTreeMap<u32, u64>,
}

impl Store {
    /// Opens (or creates) the database under `dir` for node `node_id`. A directory created for
    /// another node id is refused: reusing it would make this node vote with someone else's log.
    pub fn open(dir: &Path, sealer: Sealer, node_id: u64) -> Result<Store, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Keep RocksDB's own info log small; it never contains values.
        opts.set_keep_log_file_num(4);
        // Snapshot values go to blob files: compactions move a few bytes of reference, never
        // the snapshot itself, and a superseded blob file is deleted whole.
        let mut snapshot_opts = Options::default();
        snapshot_opts.set_enable_blob_files(true);
        snapshot_opts.set_min_blob_size(64 * 1024);
        snapshot_opts.set_enable_blob_gc(true);
        // The log is written once, read back mostly while still in the memtable, and deleted
        // after the next snapshot: 16 MiB memtables (RocksDB's default is 64) keep resident
        // memory down at the cost of more, smaller flushes.
        let mut log_opts = Options::default();
        log_opts.set_write_buffer_size(16 << 20);
        let cfs = [
            ColumnFamilyDescriptor::new(CF_LOGS, log_opts),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_SNAPSHOTS, snapshot_opts),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let store = Store {
            db: Arc::new(db),
            sealer,
            write_lock: Arc::new(Mutex::new(())),
            snapshot_lock: Arc::new(Mutex::new(())),
        };
        match store.get::<u64>(CF_META, KEY_NODE_ID)? {
            Some(found) if found != node_id => {
                return Err(StorageError::NodeIdMismatch {
                    found,
                    expected: node_id,
                })
            }
            Some(_) => {}
            None => store.write(store.batch_put(CF_META, KEY_NODE_ID, &node_id)?, true)?,
        }
        Ok(store)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    fn context(cf: &str, key: &[u8]) -> Vec<u8> {
        let mut c = Vec::with_capacity(cf.len() + 1 + key.len());
        c.extend_from_slice(cf.as_bytes());
        c.push(0);
        c.extend_from_slice(key);
        c
    }

    fn seal<T: Serialize>(&self, cf: &str, key: &[u8], value: &T) -> Vec<u8> {
        self.sealer.seal(&Self::context(cf, key), &encode(value))
    }

    fn open_value<T: DeserializeOwned>(
        &self,
        cf: &'static str,
        key: &[u8],
        sealed: &[u8],
    ) -> Result<T, StorageError> {
        let plain = self
            .sealer
            .open(&Self::context(cf, key), sealed)
            .map_err(|source| StorageError::Integrity {
                cf,
                key: key_display(key),
                source,
            })?;
        decode(&plain).map_err(|reason| StorageError::Decode {
            cf,
            key: key_display(key),
            reason,
        })
    }

    fn get<T: DeserializeOwned>(
        &self,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self.db.get_cf(self.cf(cf), key)? {
            Some(sealed) => self.open_value(cf, key, &sealed).map(Some),
            None => Ok(None),
        }
    }

    fn batch_put<T: Serialize>(
        &self,
        cf: &str,
        key: &[u8],
        value: &T,
    ) -> Result<WriteBatch, StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(cf), key, self.seal(cf, key, value));
        Ok(batch)
    }

    /// The lock that serializes writes to `cf` with the rewrap pass.
    fn lock_for(&self, cf: &str) -> std::sync::MutexGuard<'_, ()> {
        let lock = if cf == CF_SNAPSHOTS {
            &self.snapshot_lock
        } else {
            &self.write_lock
        };
        lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a batch to `logs` and/or `meta` (never `snapshots`: see [`Store::put_snapshot`]).
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let _guard = self.lock_for(CF_LOGS);
        self.write_locked(batch, sync)
    }

    /// Stores `stored` as the current snapshot, durably, without the WAL: the value goes to
    /// the `snapshots` memtable, which is then flushed (SST and blob file synced, then the
    /// manifest) before this returns. A crash before that leaves the previous snapshot, and
    /// the log it needs, in place.
    fn put_snapshot(&self, stored: &StoredSnapshot) -> Result<(), StorageError> {
        let sealed = self.seal(CF_SNAPSHOTS, KEY_SNAPSHOT, stored);
        let _guard = self.lock_for(CF_SNAPSHOTS);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_SNAPSHOTS), KEY_SNAPSHOT, sealed);
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        self.db.flush_cf_opt(self.cf(CF_SNAPSHOTS), &fo)?;
        Ok(())
    }

    fn write_locked(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// The sealer (its keyring is reloaded in place when the key file changes).
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Re-seals, under the active key, every record sealed with another one, `batch_size`
    /// records per synced write. Safe while the node runs: each batch re-reads its records
    /// under the write lock and skips any that changed or disappeared since they were read
    /// (the log may have been appended, truncated or purged meanwhile). Once a pass finishes
    /// without error, no record needs a retired key, which may then be removed.
    pub fn rewrap(&self, batch_size: usize) -> Result<RewrapReport, StorageError> {
        let mut rewrapped = 0;
        for cf in [CF_LOGS, CF_META, CF_SNAPSHOTS] {
            let mut pending: Vec<RawRecord> = Vec::new();
            for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
                let (key, sealed) = item?;
                if self.sealer.needs_rewrap(&sealed) {
                    pending.push((key, sealed));
                    if pending.len() >= batch_size.max(1) {
                        rewrapped += self.rewrap_batch(cf, &mut pending)?;
                    }
                }
            }
            rewrapped += self.rewrap_batch(cf, &mut pending)?;
        }
        Ok(RewrapReport {
            rewrapped,
            records_per_key: self.records_per_key()?,
        })
    }

    fn rewrap_batch(
        &self,
        cf: &'static str,
        pending: &mut Vec<RawRecord>,
    ) -> Result<u64, StorageError> {
        if pending.is_empty() {
            return Ok(0);
        }
        let _guard = self.lock_for(cf);
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for (key, old) in pending.drain(..) {
            let current = self.db.get_cf(self.cf(cf), &key)?;
            if current.as_deref() != Some(&old[..]) {
                continue;
            }
            let resealed =
                self.sealer
                    .rewrap(&Self::context(cf, &key), &old)
                    .map_err(|source| StorageError::Integrity {
                        cf,
                        key: key_display(&key),
                        source,
                    })?;
            batch.put_cf(self.cf(cf), &key, resealed);
            n += 1;
        }
        self.write_locked(batch, true)?;
        Ok(n)
    }

    /// How many records each key id seals (read from the envelopes; nothing is opened).
    pub fn records_per_key(&self) -> Result<BTreeMap<u32, u64>, StorageError> {
        let mut counts = BTreeMap::new();
        for cf in [CF_LOGS, CF_META, CF_SNAPSHOTS] {
            for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
                let (key, sealed) = item?;
                let id = crate::crypto::envelope_key_id(&sealed).map_err(|source| {
                    StorageError::Integrity {
                        cf,
                        key: key_display(&key),
                        source,
                    }
                })?;
                *counts.entry(id).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// Writes `batch` with an fsync, off the async executor.
    async fn write_synced(&self, batch: WriteBatch) -> Result<(), io::Error> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.write(batch, true))
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::from)
    }

    /// Test and tooling access: overwrite one raw (sealed) value.
    #[doc(hidden)]
    pub fn raw_put(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(cf), key, value);
        let _guard = self.lock_for(cf);
        self.write_locked(batch, true)
    }

    /// Test and tooling access: read one raw (sealed) value.
    #[doc(hidden)]
    pub fn raw_get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// Flushes memtables to SST files (at clean shutdown, so a restart replays little WAL).
    pub fn flush(&self) -> Result<(), StorageError> {
        for cf in [CF_LOGS, CF_META, CF_SNAPSHOTS] {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }

    /// The index of the last stored log entry (tooling and tests).
    #[doc(hidden)]
    pub fn last_log_index(&self) -> Result<Option<u64>, StorageError> {
        let mut it = self.db.iterator_cf(self.cf(CF_LOGS), IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (key, _) = item?;
                Ok(key.as_ref().try_into().ok().map(u64::from_be_bytes))
            }
            None => Ok(None),
        }
    }

    /// Reads and authenticates every record in the database; used by `cairn` at startup so a
    /// tampered byte stops the node before it serves anything. Returns the record count.
    pub fn verify_all(&self) -> Result<u64, StorageError> {
        let mut n = 0;
        for cf in [CF_LOGS, CF_META, CF_SNAPSHOTS] {
            for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
                let (key, sealed) = item?;
                self.sealer
                    .open(&Self::context(cf, &key), &sealed)
                    .map_err(|source| StorageError::Integrity {
                        cf,
                        key: key_display(&key),
                        source,
                    })?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Column family and key of the log entry at `index`; exposed for tamper tests.
#[doc(hidden)]
pub fn log_record_key(index: u64) -> (&'static str, [u8; 8]) {
    (CF_LOGS, index.to_be_bytes())
}

/// Column family and key of the stored snapshot; exposed for tamper tests.
#[doc(hidden)]
pub fn snapshot_record_key() -> (&'static str, &'static [u8]) {
    (CF_SNAPSHOTS, KEY_SNAPSHOT)
}

/// The fsync thread behind [`LogStore::append`]: one `SyncWAL` covers every batch queued since
/// the previous one, and completions are reported in submission order.
///
/// The last [`LogStore`] clone to go joins the thread, so the database is never closed (or the
/// process torn down) while a sync is still running on it.
#[derive(Clone)]
struct Syncer {
    inner: Arc<SyncerThread>,
}

struct SyncerThread {
    tx: Option<mpsc::Sender<IOFlushed<TypeConfig>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SyncerThread {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once it has reported what was queued.
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!("wal sync thread panicked");
            }
        }
    }
}

impl Syncer {
    fn start(db: Arc<DB>) -> Syncer {
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        let handle = std::thread::Builder::new()
            .name("cairn-wal-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut pending = vec![first];
                    pending.extend(rx.try_iter());
                    let res = db.flush_wal(true);
                    for callback in pending {
                        let r = match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(io::Error::other(format!("wal sync failed: {e}"))),
                        };
                        callback.io_completed(r);
                    }
                    if let Err(e) = res {
                        tracing::error!(error = %e, "wal sync failed");
                    }
                }
            })
            .expect("spawn wal sync thread");
        Syncer {
            inner: Arc::new(SyncerThread {
                tx: Some(tx),
                handle: Some(handle),
            }),
        }
    }

    fn submit(&self, callback: IOFlushed<TypeConfig>) {
        let sent = match &self.inner.tx {
            Some(tx) => tx.send(callback).map_err(|mpsc::SendError(cb)| cb),
            None => Err(callback),
        };
        if let Err(callback) = sent {
            callback.io_completed(Err(io::Error::other("wal sync thread stopped")));
        }
    }
}

/// openraft's log store: the log, the vote and the committed pointer.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
    syncer: Syncer,
}

impl LogStore {
    pub fn new(store: Store) -> LogStore {
        let syncer = Syncer::start(store.db.clone());
        LogStore { store, syncer }
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let mut it = self
            .store
            .db
            .iterator_cf(self.store.cf(CF_LOGS), IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (key, sealed) = item?;
                let entry: Entry = self.store.open_value(CF_LOGS, &key, &sealed)?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let start_key = start.to_be_bytes();
        let mut out = Vec::new();
        let it = self.store.db.iterator_cf(
            self.store.cf(CF_LOGS),
            IteratorMode::From(&start_key, Direction::Forward),
        );
        for item in it {
            let (key, sealed) = item.map_err(StorageError::from)?;
            let index =
                u64::from_be_bytes(key.as_ref().try_into().map_err(|_| StorageError::Decode {
                    cf: CF_LOGS,
                    key: format!("{key:?}"),
                    reason: "log key is not 8 bytes".into(),
                })?);
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = self.store.open_value(CF_LOGS, &key, &sealed)?;
            if let Some(prev) = out.last().map(|e: &Entry| e.log_id.index) {
                if index != prev + 1 {
                    return Err(StorageError::Hole {
                        expected: prev + 1,
                        found: index,
                    }
                    .into());
                }
            }
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.store.get(CF_META, KEY_VOTE)?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.store.get(CF_META, KEY_LAST_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // A vote must be on disk before openraft acts on it, or a restart could vote twice.
        let batch = self.store.batch_put(CF_META, KEY_VOTE, vote)?;
        self.store.write_synced(batch).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not synced: WAL order guarantees the entries it points at are durable whenever it is,
        // and a lost pointer only means re-learning the commit from the leader.
        let batch = self.store.batch_put(CF_META, KEY_COMMITTED, &committed)?;
        Ok(self.store.write(batch, false)?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self
            .store
            .get::<Option<LogId>>(CF_META, KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let cf = self.store.cf(CF_LOGS);
        for entry in entries {
            let key = entry.log_id.index.to_be_bytes();
            batch.put_cf(cf, key, self.store.seal(CF_LOGS, &key, &entry));
        }
        // Readable as soon as this returns; durable once the syncer reports it.
        self.store.write(batch, false)?;
        self.syncer.submit(callback);
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.store.cf(CF_LOGS),
            from.to_be_bytes(),
            u64::MAX.to_be_bytes(),
        );
        // Synced so a conflicting tail cannot come back after a crash behind a newer vote.
        self.store.write_synced(batch).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // One batch: the purge pointer and the deletion are atomic, so the log never has a gap
        // between last_purged and the first stored entry.
        let mut batch = self.store.batch_put(CF_META, KEY_LAST_PURGED, &log_id)?;
        batch.delete_range_cf(
            self.store.cf(CF_LOGS),
            0u64.to_be_bytes(),
            (log_id.index + 1).to_be_bytes(),
        );
        Ok(self.store.write(batch, false)?)
    }
}

/// The in-memory state every node applies the log to.
#[derive(Debug, Default, Clone)]
pub struct SmState {
    pub registry: Registry,
    /// The access policy, replicated with the registry and part of every snapshot.
    pub policy: Policy,
    /// Set once, by the first `SetClusterId` entry after the cluster forms; backups carry it
    /// so a restore can refuse a file of another cluster.
    pub cluster_id: Option<String>,
    /// Whether a restore has ever been applied (so `--restore-from` runs at most once).
    pub restored: bool,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// A cloneable read handle on the applied state, plus a watch of the applied log index
/// (blocking queries and follower reads wait on it).
#[derive(Clone)]
pub struct SharedState {
    inner: Arc<RwLock<SmState>>,
    applied: Arc<watch::Sender<u64>>,
}

impl SharedState {
    fn new(state: SmState) -> SharedState {
        let index = state.last_applied.map_or(0, |l| l.index);
        SharedState {
            inner: Arc::new(RwLock::new(state)),
            applied: Arc::new(watch::channel(index).0),
        }
    }

    /// Reads the state under the lock; never hold the guard across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, SmState> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The index of the last applied log entry.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Notified after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Waits until the local state has applied `index`.
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.subscribe();
        // The sender lives as long as any SharedState clone, which we hold.
        let _ = rx.wait_for(|applied| *applied >= index).await;
    }

    fn replace(&self, state: SmState) {
        let index = state.last_applied.map_or(0, |l| l.index);
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.applied.send_replace(index);
    }
}

/// Planted bugs (`chaos-bugs` builds only; see `raft::cluster::chaos`).
#[cfg(feature = "chaos-bugs")]
impl SharedState {
    /// What applying `cmd` as the next entry would answer, computed on a copy of the state.
    pub fn chaos_dry_run(&self, cmd: &Command) -> (Response, u64) {
        let mut copy = self.read().clone();
        let index = self.applied_index() + 1;
        (apply_registry(&mut copy, index, cmd), index)
    }

    /// Applies `cmd` to this node's state only, outside the log, at the applied index.
    pub fn chaos_apply_unreplicated(&self, cmd: &Command) -> (Response, u64) {
        let index = self.applied_index();
        let mut s = self.inner.write().unwrap_or_else(|p| p.into_inner());
        (apply_registry(&mut s, index, cmd), index)
    }
}

/// The snapshot body: what a snapshot restores besides openraft's meta.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    registry: Registry,
    policy: Policy,
    cluster_id: Option<String>,
    restored: bool,
}

/// The stored form of the newest snapshot.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// openraft's state machine: applies entries to the in-memory registry, builds and installs
/// snapshots (stored sealed in RocksDB).
pub struct StateMachine {
    store: Store,
    state: SharedState,
    snapshots_built: Arc<AtomicU64>,
}

impl StateMachine {
    /// Loads the newest stored snapshot, if any; openraft then replays the committed log after it.
    pub fn open(store: Store) -> Result<StateMachine, StorageError> {
        let mut state = SmState::default();
        if let Some(snap) = store.get::<StoredSnapshot>(CF_SNAPSHOTS, KEY_SNAPSHOT)? {
            let body: SnapshotBody = decode(&snap.data).map_err(|reason| StorageError::Decode {
                cf: CF_SNAPSHOTS,
                key: key_display(KEY_SNAPSHOT),
                reason,
            })?;
            state = SmState {
                registry: body.registry,
                policy: body.policy,
                cluster_id: body.cluster_id,
                restored: body.restored,
                last_applied: snap.meta.last_log_id,
                membership: snap.meta.last_membership,
            };
        }
        Ok(StateMachine {
            state: SharedState::new(state),
            store,
            snapshots_built: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn shared(&self) -> SharedState {
        self.state.clone()
    }
}

/// A registry command, authorized against the policy at the same log position: every
/// replica decides alike, and a permission revoked by an earlier entry is never used.
fn apply_registry(s: &mut SmState, index: u64, cmd: &Command) -> Response {
    match authz::check_command(&s.policy, cmd) {
        Ok(may_override_owner) => Response::Registry(Box::new(s.registry.apply_as(
            index,
            cmd,
            may_override_owner,
        ))),
        Err(denied) => Response::Denied(denied.to_string()),
    }
}

/// A policy change: `admin` on the cluster is needed, except for the bootstrap, which nodes
/// propose from their config (and which applies only to a never-changed policy).
fn apply_acl(s: &mut SmState, cmd: &AclCommand, by: &str) -> Response {
    let allowed = match (cmd, by.parse::<Identity>()) {
        (AclCommand::Bootstrap(_), Ok(Identity::Node(_))) => Ok(()),
        (_, Ok(who)) => s.policy.authorize(&who, Action::Admin, Resource::Cluster),
        (_, Err(_)) => Err(authz::Denied {
            identity: format!("{by:?}"),
            action: Action::Admin,
            resource: Resource::Cluster.to_string(),
        }),
    };
    match allowed {
        Ok(()) => Response::Acl(s.policy.apply(cmd)),
        Err(denied) => Response::Denied(denied.to_string()),
    }
}

/// A restore: the caller needs `snapshot` on the cluster, except a node restoring into a
/// cluster that is still empty (`cairn server --restore-from`). Replaces registry and policy
/// in one entry, so every replica switches at the same log position.
fn apply_restore(
    s: &mut SmState,
    index: u64,
    state: &BackupState,
    by: &str,
    now_ms: u64,
    only_if_empty: bool,
) -> Response {
    let allowed = match by.parse::<Identity>() {
        Ok(Identity::Node(_)) if only_if_empty => Ok(()),
        Ok(who) => s
            .policy
            .authorize(&who, Action::Snapshot, Resource::Cluster),
        Err(_) => Err(authz::Denied {
            identity: format!("{by:?}"),
            action: Action::Snapshot,
            resource: Resource::Cluster.to_string(),
        }),
    };
    if let Err(denied) = allowed {
        return Response::Denied(denied.to_string());
    }
    if only_if_empty && (s.restored || s.registry.index() != 0) {
        return Response::Restored { applied: false };
    }
    s.registry.restore(index, &state.registry, now_ms);
    s.policy = state.policy.clone();
    s.restored = true;
    Response::Restored { applied: true }
}

/// Builds a snapshot from a point-in-time copy of the state (taken under the read lock, so it
/// never mixes two applied indices), then stores it durably.
pub struct SnapshotBuilder {
    store: Store,
    state: SharedState,
    built: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = io::Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Applies wait only for the copy, which is O(1) (the registry's maps are persistent);
        // encoding, sealing and the durable write (hundreds of milliseconds for a large
        // registry) run off the lock and off the async runtime.
        let t0 = std::time::Instant::now();
        let (meta, body) = {
            let s = self.state.read();
            let meta = SnapshotMeta {
                last_log_id: s.last_applied,
                last_membership: s.membership.clone(),
            };
            let body = SnapshotBody {
                registry: s.registry.clone(),
                policy: s.policy.clone(),
                cluster_id: s.cluster_id.clone(),
                restored: s.restored,
            };
            (meta, body)
        };
        let store = self.store.clone();
        let stored_meta = meta.clone();
        let stored =
            tokio::task::spawn_blocking(move || -> Result<StoredSnapshot, StorageError> {
                let stored = StoredSnapshot {
                    meta: stored_meta,
                    data: encode(&body),
                };
                store.put_snapshot(&stored)?;
                Ok(stored)
            })
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::from)?;
        self.built.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            last_log_index = meta.last_log_id.map_or(0, |l| l.index),
            bytes = stored.data.len(),
            took_ms = t0.elapsed().as_millis(),
            "snapshot built"
        );
        Ok(Snapshot {
            meta,
            snapshot: io::Cursor::new(stored.data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = io::Cursor<Vec<u8>>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let s = self.state.read();
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut last = None;
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = {
                let mut s = self.state.inner.write().unwrap_or_else(|p| p.into_inner());
                s.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Response::None,
                    EntryPayload::Normal(Request::Registry(cmd)) => {
                        apply_registry(&mut s, entry.log_id.index, &cmd)
                    }
                    EntryPayload::Normal(Request::Acl { cmd, by }) => apply_acl(&mut s, &cmd, &by),
                    EntryPayload::Normal(Request::Restore {
                        state,
                        by,
                        now_ms,
                        only_if_empty,
                    }) => apply_restore(
                        &mut s,
                        entry.log_id.index,
                        &state,
                        &by,
                        now_ms,
                        only_if_empty,
                    ),
                    EntryPayload::Normal(Request::SetClusterId { id }) => {
                        if s.cluster_id.is_none() {
                            s.cluster_id = Some(id);
                        }
                        Response::None
                    }
                    EntryPayload::Membership(m) => {
                        s.membership = StoredMembership::new(Some(entry.log_id), m);
                        Response::None
                    }
                }
            };
            last = Some(entry.log_id.index);
            if let Some(r) = responder {
                r.send(response);
            }
        }
        if let Some(index) = last {
            self.state.applied.send_replace(index);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            state: self.state.clone(),
            built: self.snapshots_built.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = decode(&data).map_err(|reason| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("received snapshot cannot be decoded: {reason}"),
            )
        })?;
        // Durable first, then visible: a crash in between restarts from the new snapshot.
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.put_snapshot(&stored))
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::from)?;
        self.state.replace(SmState {
            registry: body.registry,
            policy: body.policy,
            cluster_id: body.cluster_id,
            restored: body.restored,
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        });
        tracing::info!(
            last_log_index = meta.last_log_id.map_or(0, |l| l.index),
            "snapshot installed"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self
            .store
            .get::<StoredSnapshot>(CF_SNAPSHOTS, KEY_SNAPSHOT)?
            .map(|s| Snapshot {
                meta: s.meta,
                snapshot: io::Cursor::new(s.data),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keyring;
    use openraft::testing::log::{StoreBuilder, Suite};

    fn sealer() -> Sealer {
        Sealer::new(Keyring::generate()).expect("a fresh keyring has a data key")
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), openraft::StorageError<TypeConfig>>
        {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path(), sealer(), 1).expect("open store");
            let sm = StateMachine::open(store.clone()).expect("open sm");
            Ok((dir, LogStore::new(store), sm))
        }
    }

    #[test]
    fn passes_openraft_storage_suite() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            Suite::test_all(Builder)
                .await
                .expect("openraft storage suite")
        });
    }

    fn blank(term: u64, index: u64) -> Entry {
        openraft::testing::blank_ent::<TypeConfig>(term, 1, index)
    }

    #[tokio::test]
    async fn flipped_byte_in_log_record_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), sealer(), 1).expect("open");
        let mut log = LogStore::new(store.clone());
        let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        let cb = IOFlushed::<TypeConfig>::signal(tx);
        log.append([blank(1, 1), blank(1, 2)], cb)
            .await
            .expect("append");
        rx.await.expect("flushed").expect("flush ok");
        assert_eq!(log.try_get_log_entries(1..3).await.expect("read").len(), 2);

        let (cf, key) = log_record_key(2);
        let mut raw = store.raw_get(cf, &key).expect("raw").expect("present");
        let last = raw.len() - 1;
        raw[last] ^= 0x01;
        store.raw_put(cf, &key, &raw).expect("put");
        let err = log
            .try_get_log_entries(1..3)
            .await
            .expect_err("tampered record must not be read");
        assert!(
            err.to_string().contains("logs/2"),
            "error names the record: {err}"
        );
        assert!(store.verify_all().is_err());

        // A record moved to another key fails too (context binds cf + key).
        let good = store
            .raw_get(cf, &log_record_key(1).1)
            .expect("raw")
            .expect("present");
        store.raw_put(cf, &key, &good).expect("put");
        assert!(log.try_get_log_entries(2..3).await.is_err());
    }

    #[tokio::test]
    async fn refuses_data_dir_of_another_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = sealer();
        drop(Store::open(dir.path(), s.clone(), 1).expect("open"));
        match Store::open(dir.path(), s, 2) {
            Err(StorageError::NodeIdMismatch {
                found: 1,
                expected: 2,
            }) => {}
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("another node's data dir must be refused"),
        }
    }

    #[test]
    fn encoding_is_versioned() {
        let bytes = encode(&42u64);
        assert_eq!(bytes[0], ENCODING_V1);
        assert_eq!(decode::<u64>(&bytes), Ok(42));
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        assert!(decode::<u64>(&wrong).unwrap_err().contains("version 9"));
        let mut longer = bytes;
        longer.push(0);
        assert!(decode::<u64>(&longer).unwrap_err().contains("trailing"));
    }
}
