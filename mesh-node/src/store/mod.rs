//! The store: the Raft log in files of its own (`log_file.rs`), the last snapshot's
//! payload in a file of its own (`snapshot_file.rs`); vote, committed and purged log
//! ids and the snapshot's meta in one `sled::Db`.
//!
//! Nothing is acknowledged to openraft before it is on stable storage: a log append is
//! reported by the log's sync thread (`log_sync.rs`) after an `fdatasync` of its log file
//! (one for all the appends queued at the time), a snapshot payload after `fdatasync`s of
//! its file, every sled write path after the barrier in `durable.rs`, once per batch.

mod durable;
mod error;
mod log;
mod log_file;
mod log_sync;
mod recent;
mod snapshot_file;
mod state_machine;

pub use error::StoreError;
pub use log::LogStore;
pub use state_machine::{StateMachineStore, StateView};

use std::path::Path;

/// Where versions before the log files kept Raft log entries (big-endian index keys);
/// moved into the files on open.
const LOG_TREE: &str = "log";
/// The Raft log's segment files, inside the store directory.
const LOG_DIR: &str = "log";
/// Vote, committed and purged log ids.
const META_TREE: &str = "meta";
/// The last snapshot: its meta, which payload file holds it, and the snapshot sequence
/// number. (Before the payload had a file of its own, the payload too.)
const SNAPSHOT_TREE: &str = "snapshot";
/// The snapshot payload files, inside the store directory.
const SNAPSHOT_DIR: &str = "snapshot";

/// The node's storage: both halves openraft needs, sharing one sled database.
pub struct Store {
    /// The Raft log (also its own log reader).
    pub log: LogStore,
    /// The state machine, holding the applied state in memory.
    pub state_machine: StateMachineStore,
}

impl Store {
    /// Opens (creating if missing) the store in `dir` and loads the last snapshot into
    /// memory. sled locks the directory: one `Store` per directory per process. `me` is
    /// the node's Raft id: the log tells a follower's appends (entries other leaders wrote)
    /// from its own by it.
    pub fn open(dir: &Path, me: u64) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.to_path_buf(),
                source,
            })?;
        let tree = |name: &'static str| {
            db.open_tree(name)
                .map_err(StoreError::sled("opening a tree"))
        };
        let (log, meta, snapshots) = (tree(LOG_TREE)?, tree(META_TREE)?, tree(SNAPSHOT_TREE)?);
        let durable = durable::Durable::open(db.clone(), dir)?;
        Ok(Store {
            log: LogStore::open(&dir.join(LOG_DIR), me, log, meta, durable.clone())?,
            state_machine: StateMachineStore::open(
                snapshots,
                snapshot_file::SnapshotFiles::open(&dir.join(SNAPSHOT_DIR))?,
                durable,
            )?,
        })
    }
}

/// Creates `dir` if it is missing and makes its name durable in its parent.
fn create_dir_durably(dir: &Path) -> Result<(), StoreError> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(StoreError::file_io("create", dir))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Makes a directory's listing durable (new, renamed and removed names).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::file_io("sync the directory", dir))
}

/// The names in `dir`, sorted (tests of the store's files).
#[cfg(test)]
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}
