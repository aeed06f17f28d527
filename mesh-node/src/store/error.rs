//! What can go wrong in the store, and how it is reported to openraft.

use mesh_core::codec::CodecError;
use openraft::{StorageError, StorageIOError};
use std::path::PathBuf;

/// A store failure. Variants say who is at fault: the disk or filesystem (`CreateDir`,
/// `Open`, `Sled`, `Sync`), bytes on disk that no longer decode (`Corrupt`,
/// `Inconsistent`), or a snapshot that came in unusable (`Snapshot`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// sled refused to open the database.
    #[error("cannot open the sled database in {path}: {source} (is another mesh-node using this data directory?)")]
    Open {
        /// The data directory.
        path: PathBuf,
        /// What sled said.
        source: sled::Error,
    },
    /// A sled read or write failed.
    #[error("sled failed while {doing}: {source}")]
    Sled {
        /// What the store was doing.
        doing: &'static str,
        /// What sled said.
        source: sled::Error,
    },
    /// Making a file durable failed: nothing written since the last barrier may be trusted.
    #[error("cannot sync {path} to disk: {source}")]
    Sync {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A store task on a blocking thread (a disk sync, a snapshot encoding) died.
    #[error("a store task on a blocking thread failed: {0}")]
    SyncTask(#[source] tokio::task::JoinError),
    /// The Raft log's sync thread could not make appends durable: a sync failed (nothing
    /// written since may be trusted) or the thread is gone.
    #[error("the Raft log's sync failed: {0}")]
    LogSync(String),
    /// A record on disk does not decode.
    #[error("corrupt record in sled tree `{tree}` at key {key}: {source}")]
    Corrupt {
        /// The sled tree.
        tree: &'static str,
        /// The key, readable.
        key: String,
        /// Why it does not decode.
        source: CodecError,
    },
    /// A record on disk decodes but contradicts where it is stored.
    #[error("corrupt record in sled tree `{tree}` at key {key}: {problem}")]
    Inconsistent {
        /// The sled tree.
        tree: &'static str,
        /// The key, readable.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// A value could not be encoded (a bug, not a disk fault).
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// What the codec said.
        source: CodecError,
    },
    /// A snapshot handed to `install_snapshot` cannot be used.
    #[error("snapshot {id} is unusable: {problem}")]
    Snapshot {
        /// The snapshot id.
        id: String,
        /// What is wrong.
        problem: String,
    },
    /// Reading, writing or removing one of the store's own files (a Raft log segment,
    /// the snapshot file) failed.
    #[error("cannot {doing} {path}: {source}")]
    FileIo {
        /// What the store was doing.
        doing: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A Raft log file holds bytes that are not the records the store wrote.
    #[error("corrupt Raft log file {path} at byte {offset}: {problem} (the node cannot trust this data directory: restore it from a backup, or wipe it and rejoin with `mesh-node run --join TOKEN`)")]
    LogCorrupt {
        /// The log file.
        path: PathBuf,
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong.
        problem: String,
    },
    /// The snapshot file is missing or does not hold what the store recorded about it.
    #[error("corrupt snapshot file {path}: {problem} (the node cannot trust this data directory: restore it from a backup, or wipe it and rejoin with `mesh-node run --join TOKEN`)")]
    SnapshotCorrupt {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The in-memory state lock was poisoned by a panic during an earlier apply.
    #[error("the state machine lock is poisoned: an earlier apply panicked")]
    Poisoned,
}

impl StoreError {
    pub(crate) fn sled(doing: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
        move |source| StoreError::Sled { doing, source }
    }

    pub(crate) fn file_io(
        doing: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::FileIo {
            doing,
            path,
            source,
        }
    }

    pub(crate) fn encode(what: &'static str) -> impl FnOnce(CodecError) -> StoreError {
        move |source| StoreError::Encode { what, source }
    }
}

/// The error type openraft's storage traits return.
pub(crate) type RaftStorageError = StorageError<u64>;

// openraft classifies storage errors by subject; these keep the call sites to one word.
pub(crate) fn read_logs(e: StoreError) -> RaftStorageError {
    StorageIOError::read_logs(&e).into()
}
pub(crate) fn write_logs(e: StoreError) -> RaftStorageError {
    StorageIOError::write_logs(&e).into()
}
pub(crate) fn read_vote(e: StoreError) -> RaftStorageError {
    StorageIOError::read_vote(&e).into()
}
pub(crate) fn write_vote(e: StoreError) -> RaftStorageError {
    StorageIOError::write_vote(&e).into()
}
pub(crate) fn read_store(e: StoreError) -> RaftStorageError {
    StorageIOError::read(&e).into()
}
pub(crate) fn write_store(e: StoreError) -> RaftStorageError {
    StorageIOError::write(&e).into()
}
pub(crate) fn read_state_machine(e: StoreError) -> RaftStorageError {
    StorageIOError::read_state_machine(&e).into()
}
pub(crate) fn write_state_machine(e: StoreError) -> RaftStorageError {
    StorageIOError::write_state_machine(&e).into()
}
pub(crate) fn read_snapshot(e: StoreError) -> RaftStorageError {
    StorageIOError::read_snapshot(None, &e).into()
}
pub(crate) fn write_snapshot(e: StoreError) -> RaftStorageError {
    StorageIOError::write_snapshot(None, &e).into()
}
