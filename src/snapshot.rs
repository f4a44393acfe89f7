//! snapshot: backups of the cluster state — takes a consistent copy as of a read barrier,
//! frames it as a [`backup`](crate::backup) file under the keyring's backup key, and opens such
//! files for inspection and restore. Knows nothing of HTTP routes or RocksDB.
//!
//! The body of a backup file is `storage::encode(&BackupState)` (versioned bincode of the
//! registry and the policy). The header carries the cluster id, the log position, the
//! membership and counts, in clear but authenticated by every chunk.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::XChaCha20Poly1305;

use crate::backup::{self, BackupError, BackupHeader};
use crate::crypto::Sealer;
use crate::raft::{BackupState, Cluster, ClusterError};
use crate::storage;

/// Why a backup could not be taken, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The cluster could not serve a consistent copy (no quorum, catching up, ...).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The keyring holds no backup key (`cairn keyring add-backup-key`).
    #[error("the keyring has no backup key; add one with `cairn keyring add-backup-key`")]
    NoBackupKey,
    /// The file is not a valid backup (corrupt, truncated, foreign key, ...).
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The authenticated body does not decode as cluster state (a bug or a future version).
    #[error("backup body cannot be decoded: {0}")]
    Body(String),
    /// The backup belongs to another cluster.
    #[error("backup is of cluster {found}, this is cluster {ours}; restore with force to replace this cluster's state anyway")]
    ForeignCluster { found: String, ours: String },
    /// The cluster has no id yet (it is still forming).
    #[error("the cluster has no id yet; retry once it has formed")]
    NoClusterId,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A consistent copy of the state, ready to be written as a backup file.
pub struct Taken {
    pub header: BackupHeader,
    pub body: Vec<u8>,
    pub cipher: XChaCha20Poly1305,
}

impl Taken {
    /// The exact length of the file (for `Content-Length`).
    pub fn file_len(&self) -> u64 {
        backup::file_len(&self.header)
    }

    /// The file as a sequence of buffers, encrypted chunk by chunk.
    pub fn encoder(self) -> Result<backup::Encoder<io::Cursor<Vec<u8>>>, BackupError> {
        backup::encoder(self.header, self.cipher, io::Cursor::new(self.body))
    }

    /// Writes the file atomically (temp file, fsync, rename), mode 0600; returns its length.
    pub fn write_file(self, path: &Path) -> Result<u64, BackupError> {
        backup::write_file(path, self.header, self.cipher, io::Cursor::new(self.body))
    }
}

/// Copies the state after a linearizable read barrier, so the backup holds every write
/// acknowledged before the call, whichever node serves it.
pub async fn take(cluster: &Cluster, sealer: &Sealer) -> Result<Taken, SnapshotError> {
    let (key_id, cipher) = sealer.backup_cipher().ok_or(SnapshotError::NoBackupKey)?;
    cluster.read_barrier().await?;
    let (state, cluster_id, log_id, membership) = {
        let s = cluster.state().read();
        let state = BackupState {
            registry: s.registry.clone(),
            policy: s.policy.clone(),
        };
        let membership =
            serde_json::to_value(s.membership.membership()).unwrap_or(serde_json::Value::Null);
        (state, s.cluster_id.clone(), s.last_applied, membership)
    };
    let cluster_id = cluster_id.ok_or(SnapshotError::NoClusterId)?;
    let body = storage::encode(&state);
    let counts = BTreeMap::from([
        (
            "services".to_string(),
            state.registry.service_count() as u64,
        ),
        (
            "instances".to_string(),
            state.registry.instance_count() as u64,
        ),
        ("roles".to_string(), state.policy.roles().count() as u64),
        (
            "bindings".to_string(),
            state.policy.bindings().count() as u64,
        ),
    ]);
    let header = BackupHeader::new(
        cluster_id,
        log_id.map_or(0, |l| l.index),
        log_id.map_or(0, |l| l.leader_id.term),
        membership,
        counts,
        key_id,
        body.len() as u64,
    );
    Ok(Taken {
        header,
        body,
        cipher,
    })
}

/// Verifies and decodes a backup read from `r` with the keyring's backup keys.
pub fn decode(r: impl Read, sealer: &Sealer) -> Result<(BackupHeader, BackupState), SnapshotError> {
    let (header, mut decoder) = backup::decoder(r, |id| sealer.backup_cipher_by_id(id))?;
    let mut body = Vec::with_capacity(usize::try_from(header.plaintext_len).unwrap_or(0));
    while let Some(piece) = decoder.read_chunk()? {
        body.extend_from_slice(piece);
    }
    let state: BackupState = storage::decode(&body).map_err(SnapshotError::Body)?;
    Ok((header, state))
}

/// [`decode`] of a file.
pub fn open_file(
    path: &Path,
    sealer: &Sealer,
) -> Result<(BackupHeader, BackupState), SnapshotError> {
    let file = File::open(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(BufReader::new(file), sealer)
}

/// Refuses a backup of another cluster unless `force`.
pub fn check_cluster(
    header: &BackupHeader,
    ours: Option<&str>,
    force: bool,
) -> Result<(), SnapshotError> {
    match ours {
        _ if force => Ok(()),
        Some(ours) if ours == header.cluster_id => Ok(()),
        Some(ours) => Err(SnapshotError::ForeignCluster {
            found: header.cluster_id.clone(),
            ours: ours.to_string(),
        }),
        None => Err(SnapshotError::NoClusterId),
    }
}

/// What a scheduled backup run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupRun {
    pub path: PathBuf,
    pub bytes: u64,
    pub last_log_index: u64,
    pub created_at: u64,
}

/// Takes a backup into `dir` as `cairn-<cluster>-<index>-<time>.backup`, reads it back to
/// verify every chunk, then keeps only the newest `keep` backups of this naming scheme.
pub async fn scheduled(
    cluster: &Cluster,
    sealer: &Sealer,
    dir: &Path,
    keep: usize,
) -> Result<BackupRun, SnapshotError> {
    let taken = take(cluster, sealer).await?;
    let created_at = taken.header.created_at;
    let index = taken.header.last_log_index;
    let name = format!(
        "cairn-{}-{created_at:010}-{index:012}.backup",
        short(&taken.header.cluster_id)
    );
    let path = dir.join(name);
    let dir_owned = dir.to_path_buf();
    let sealer = sealer.clone();
    let path2 = path.clone();
    // Encryption, fsync and the verification read are blocking work.
    let bytes = tokio::task::spawn_blocking(move || -> Result<u64, SnapshotError> {
        fs::create_dir_all(&dir_owned).map_err(|source| SnapshotError::Io {
            path: dir_owned.clone(),
            source,
        })?;
        let bytes = taken.write_file(&path2)?;
        let file = File::open(&path2).map_err(|source| SnapshotError::Io {
            path: path2.clone(),
            source,
        })?;
        backup::verify(BufReader::new(file), |id| sealer.backup_cipher_by_id(id))?;
        prune(&dir_owned, keep)?;
        Ok(bytes)
    })
    .await
    .map_err(|e| SnapshotError::Body(format!("backup task failed: {e}")))??;
    Ok(BackupRun {
        path,
        bytes,
        last_log_index: index,
        created_at,
    })
}

fn short(cluster_id: &str) -> &str {
    cluster_id.get(..8).unwrap_or(cluster_id)
}

/// Deletes all but the newest `keep` files named `cairn-*.backup` (names sort by time).
fn prune(dir: &Path, keep: usize) -> Result<(), SnapshotError> {
    let io_err = |source| SnapshotError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(io_err)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("cairn-") && n.ends_with(".backup"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep);
    for name in names.into_iter().take(excess) {
        fs::remove_file(dir.join(&name)).map_err(io_err)?;
    }
    Ok(())
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
