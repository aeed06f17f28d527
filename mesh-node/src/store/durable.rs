//! The durability barrier: after it returns, everything written to sled so far survives
//! a power loss, not only a process crash.
//!
//! Why sled's own `flush` is not enough (read in sled 0.34.7's source):
//! - `flush` writes the log buffers into the single data file `<dir>/db` with `pwrite`
//!   and then calls `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`
//!   (`pagecache/iobuf.rs`). That pushes the pages to the device but neither flushes the
//!   device's write cache nor writes the file's metadata (its size, for a file that
//!   grew). A real `fsync` of `db` only happens in sled's background flusher, every
//!   500 ms (`flusher.rs`), and when a segment is reused.
//! - Values too big for a segment slot (about 128 KiB at the default 512 KiB segments)
//!   are written to their own file `<dir>/blobs/<lsn>` with `create_new` + `write_all`
//!   and are never synced, nor is the `blobs` directory that names them
//!   (`pagecache/blob_io.rs`). The Raft log and the snapshot payload have files of their
//!   own (`log_file.rs`, `snapshot_file.rs`), so little lands there now, but the barrier
//!   still covers it.
//! - sled writes `<dir>/conf` without a sync, and renames its recovery snapshots
//!   (`<dir>/snap.*`) without syncing `<dir>`.
//!
//! So the barrier flushes sled, then syncs through handles of our own (fsync acts on the
//! inode, not on the descriptor, and sled locks `db` with `flock`, which a second
//! descriptor neither takes nor releases): every blob file that is new or has grown since
//! the last barrier, the `blobs` directory when its listing changed, `db` itself
//! (`fdatasync`), and `<dir>` when its listing changed. Callers run it once per batch of
//! writes (a vote, a purge point, a stored snapshot), never once per record.
//!
//! What it cannot close: sled decides internally when a segment's old contents may be
//! overwritten using `sync_file_range` as its notion of "stable". A power loss in the
//! window between such a decision and our next barrier could, on a drive with a
//! volatile cache, lose a page sled had relocated in the background. Closing that
//! needs a log file of our own (design brief, option two).

use super::StoreError;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// A handle to the barrier, cheap to clone; every store part shares one.
#[derive(Clone)]
pub(crate) struct Durable {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    dir: PathBuf,
    /// `<dir>/db`, opened once at open.
    data_file: File,
    synced: Mutex<Synced>,
}

/// What the previous barrier made durable, so the next one syncs only what changed.
#[derive(Default)]
struct Synced {
    /// Blob file name -> length when it was synced. A blob listed while sled was still
    /// writing it has a shorter length then, so it is synced again once complete.
    blobs: BTreeMap<OsString, u64>,
    dir_names: BTreeSet<OsString>,
}

impl Durable {
    /// Opens the handle on sled's data file and makes everything already in `dir`
    /// durable, including the directory entries sled created when it made the database.
    pub(crate) fn open(db: sled::Db, dir: &Path) -> Result<Durable, StoreError> {
        let db_path = dir.join("db");
        let data_file = File::open(&db_path).map_err(|source| StoreError::Sync {
            path: db_path,
            source,
        })?;
        let inner = Inner {
            db,
            dir: dir.to_path_buf(),
            data_file,
            synced: Mutex::default(),
        };
        sync_file(&dir.join("conf"))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        // `Synced` starts empty, so this first barrier syncs every blob and both directories.
        inner.sync()?;
        Ok(Durable {
            inner: Arc::new(inner),
        })
    }

    /// [`Durable::barrier`] on the calling thread, for work that is already blocking
    /// (opening the store).
    pub(crate) fn barrier_blocking(&self) -> Result<(), StoreError> {
        self.inner.sync()
    }

    /// Returns once every write made before the call is on stable storage.
    pub(crate) async fn barrier(&self) -> Result<(), StoreError> {
        let inner = Arc::clone(&self.inner);
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || inner.sync())
            .await
            .map_err(StoreError::SyncTask)?;
        metrics::histogram!("mesh_store_barrier_seconds").record(started.elapsed().as_secs_f64());
        result
    }
}

impl Inner {
    fn sync(&self) -> Result<(), StoreError> {
        // `Tree::flush` is what `flush_async` runs on sled's own thread pool; calling it
        // here keeps the whole barrier on one blocking thread.
        self.db.flush().map_err(StoreError::sled("flushing sled"))?;
        // Only a cache of what is already durable: after a panic elsewhere it is still valid.
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);

        let blobs_dir = self.dir.join("blobs");
        let mut blobs = BTreeMap::new();
        for (name, path) in list(&blobs_dir)? {
            // sled deletes blobs it no longer needs at any time; a vanished one needs no sync.
            let len = match std::fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Sync { path, source }),
            };
            if synced.blobs.get(&name) != Some(&len) {
                match File::open(&path).and_then(|f| f.sync_data()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(StoreError::Sync { path, source }),
                }
            }
            blobs.insert(name, len);
        }
        if !blobs.keys().eq(synced.blobs.keys()) {
            sync_dir(&blobs_dir)?;
        }
        synced.blobs = blobs;

        self.data_file
            .sync_data()
            .map_err(|source| StoreError::Sync {
                path: self.dir.join("db"),
                source,
            })?;

        let dir_names: BTreeSet<OsString> =
            list(&self.dir)?.into_iter().map(|(name, _)| name).collect();
        if dir_names != synced.dir_names {
            sync_dir(&self.dir)?;
            synced.dir_names = dir_names;
        }
        Ok(())
    }
}

fn list(dir: &Path) -> Result<Vec<(OsString, PathBuf)>, StoreError> {
    let err = |source| StoreError::Sync {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::read_dir(dir)
        .map_err(err)?
        .map(|entry| entry.map(|e| (e.file_name(), e.path())).map_err(err))
        .collect()
}

fn sync_file(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Sync {
            path: path.to_path_buf(),
            source,
        })
}

/// On Linux a directory is synced through a read-only descriptor of it.
fn sync_dir(path: &Path) -> Result<(), StoreError> {
    sync_file(path)
}
