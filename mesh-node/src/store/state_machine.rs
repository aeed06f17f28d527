//! The state machine half of the store: `MeshState` in memory; the last snapshot's meta
//! in sled, its payload in a file of its own (`snapshot_file.rs`).
//!
//! The state itself is not written on every apply. It is durable as the last snapshot
//! plus the committed log: after a restart `Store::open` loads the snapshot and openraft
//! re-applies the committed entries after it (`read_committed`).

use super::durable::Durable;
use super::error::{self, RaftStorageError, StoreError};
use super::snapshot_file::{PayloadFile, SnapshotFiles};
use super::SNAPSHOT_TREE;
use mesh_core::codec::{decode, encode};
use mesh_core::raft_types::{Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig};
use mesh_core::{MeshState, Response};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot};
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::sync::watch;

const SNAPSHOT_META: &str = "meta";
/// The [`PayloadFile`] holding the payload of the snapshot `meta` describes.
const SNAPSHOT_FILE: &str = "file";
/// Where data directories written before the payload file kept the payload; moved into
/// a file on open.
const LEGACY_SNAPSHOT_DATA: &str = "data";
/// The last snapshot sequence number, so snapshot ids stay unique across restarts.
const SNAPSHOT_SEQ: &str = "seq";

/// The applied state; a snapshot's payload is this, encoded with the codec.
#[derive(Default)]
struct Applied {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: MeshState,
}

/// The snapshot payload as written: borrowed fields so building one copies nothing.
type PayloadRef<'a> = (&'a Option<LogId>, &'a StoredMembership, &'a MeshState);
type Payload = (Option<LogId>, StoredMembership, MeshState);

/// A read-only view of the applied state for the rest of the node (API handlers,
/// scheduler, metrics). Cheap to clone.
#[derive(Clone)]
pub struct StateView {
    applied: Arc<RwLock<Applied>>,
    changes: Arc<watch::Sender<u64>>,
}

impl StateView {
    /// Runs `f` on the current state under a read lock; keep `f` short, applies wait for it.
    pub fn read<R>(&self, f: impl FnOnce(&MeshState) -> R) -> R {
        // A poisoned lock means an apply panicked; openraft stops the node then, and
        // readers may still look at the state until it does.
        let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
        f(&applied.state)
    }

    /// A copy of the applied state and the index of the last entry applied to it, taken
    /// under the read lock. Cheap next to encoding the state (tasks, idempotency keys
    /// and blobs are shared, not copied), so a caller that encodes the copy holds up
    /// neither applies nor other readers while it does.
    pub fn copy(&self) -> (u64, MeshState) {
        let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
        (
            applied.last_applied.map_or(0, |id| id.index),
            applied.state.clone(),
        )
    }

    /// Notified after each apply and snapshot install with the last applied log index
    /// (0 before any).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The openraft state machine over `MeshState`. Cloning shares the same state; openraft
/// uses a clone as the snapshot builder.
#[derive(Clone)]
pub struct StateMachineStore {
    view: StateView,
    snapshots: sled::Tree,
    files: Arc<SnapshotFiles>,
    durable: Durable,
    seq: Arc<AtomicU64>,
    /// Serializes snapshot stores (a build and an install may overlap): a slow build
    /// must not overwrite a newer installed snapshot, and a store removes the files
    /// older than its own. Held for the whole payload write (seconds for a large
    /// state), so it is async and readers never take it.
    store_lock: Arc<tokio::sync::Mutex<()>>,
    /// Pairs a change of the sled record (or a removal of old files) with readers'
    /// read of the record and open of the file it names. Held for moments only.
    record_lock: Arc<Mutex<()>>,
}

impl StateMachineStore {
    /// Loads the stored snapshot, if any, as the applied state, after moving a payload
    /// older versions kept in sled into its file and removing files nobody names.
    pub(crate) fn open(
        snapshots: sled::Tree,
        files: SnapshotFiles,
        durable: Durable,
    ) -> Result<StateMachineStore, StoreError> {
        let mut seq = match snapshots
            .get(SNAPSHOT_SEQ)
            .map_err(StoreError::sled("reading the snapshot tree"))?
        {
            Some(bytes) => decode(&bytes).map_err(|source| corrupt(SNAPSHOT_SEQ, source))?,
            None => 0,
        };
        if let Some(data) = snapshots
            .get(LEGACY_SNAPSHOT_DATA)
            .map_err(StoreError::sled("reading the snapshot tree"))?
        {
            seq += 1;
            let file = files.write(seq, &data)?;
            let mut batch = record(&file, seq)?;
            batch.remove(LEGACY_SNAPSHOT_DATA);
            snapshots.apply_batch(batch).map_err(StoreError::sled(
                "moving the snapshot payload into its file",
            ))?;
            durable.barrier_blocking()?;
            tracing::info!(file = %files.path(&file.name).display(), bytes = file.len, "moved the snapshot payload out of sled into its own file");
        }
        let record_lock = Arc::default();
        let stored = read_snapshot(&snapshots, &files, &record_lock)?;
        files.remove_all_but(stored.as_ref().map(|s| s.file.name.as_str()))?;
        let applied = match stored {
            Some(stored) => {
                let (last_applied, membership, state) = decode_payload(&stored.data, &stored.meta)
                    .map_err(|problem| StoreError::SnapshotCorrupt {
                        path: files.path(&stored.file.name),
                        problem,
                    })?;
                Applied {
                    last_applied,
                    membership,
                    state,
                }
            }
            None => Applied::default(),
        };
        let (changes, _) = watch::channel(applied.last_applied.map_or(0, |id| id.index));
        Ok(StateMachineStore {
            view: StateView {
                applied: Arc::new(RwLock::new(applied)),
                changes: Arc::new(changes),
            },
            snapshots,
            files: Arc::new(files),
            durable,
            seq: Arc::new(AtomicU64::new(seq)),
            store_lock: Arc::default(),
            record_lock,
        })
    }

    /// A view of the applied state for readers outside Raft.
    pub fn view(&self) -> StateView {
        self.view.clone()
    }

    /// Writes the payload file and names it in sled, unless a newer snapshot is already
    /// stored; returns the file's name if it was stored. The caller holds `store_lock`.
    fn write_snapshot(
        snapshots: &sled::Tree,
        files: &SnapshotFiles,
        record_lock: &Mutex<()>,
        seq: &AtomicU64,
        meta: &SnapshotMeta,
        data: &[u8],
    ) -> Result<Option<String>, StoreError> {
        if let Some(stored) = read_meta(snapshots)? {
            if stored.last_log_id > meta.last_log_id {
                return Ok(None);
            }
        }
        let file = files.write(seq.fetch_add(1, Ordering::SeqCst) + 1, data)?;
        // The highest number handed out so far, ids of builds still running included.
        let mut batch = record(&file, seq.load(Ordering::SeqCst))?;
        batch.insert(
            SNAPSHOT_META,
            encode(meta).map_err(StoreError::encode("snapshot meta"))?,
        );
        let _record = record_lock.lock().unwrap_or_else(PoisonError::into_inner);
        snapshots
            .apply_batch(batch)
            .map_err(StoreError::sled("storing a snapshot"))?;
        Ok(Some(file.name))
    }

    /// Stores a snapshot durably unless a newer one is already stored; hands `data` back.
    async fn store_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        let _store = self.store_lock.lock().await;
        // Writing a large payload is blocking work, and so is removing the old file.
        let (snapshots, files) = (self.snapshots.clone(), Arc::clone(&self.files));
        let (record_lock, seq) = (Arc::clone(&self.record_lock), Arc::clone(&self.seq));
        let meta_owned = meta.clone();
        let (written, data) = tokio::task::spawn_blocking(move || {
            let written =
                Self::write_snapshot(&snapshots, &files, &record_lock, &seq, &meta_owned, &data);
            (written, data)
        })
        .await
        .map_err(StoreError::SyncTask)?;
        let Some(name) = written? else {
            return Ok(data);
        };
        // The meta naming the new file is durable before the old file goes.
        self.durable.barrier().await?;
        let (files, record_lock) = (Arc::clone(&self.files), Arc::clone(&self.record_lock));
        tokio::task::spawn_blocking(move || {
            let _record = record_lock.lock().unwrap_or_else(PoisonError::into_inner);
            files.remove_all_but(Some(&name))
        })
        .await
        .map_err(StoreError::SyncTask)??;
        Ok(data)
    }
}

/// A stored snapshot: its meta, the file holding its payload, and the payload.
struct Stored {
    meta: SnapshotMeta,
    file: PayloadFile,
    data: Vec<u8>,
}

/// A batch that names `file` as the payload and stores the sequence number `seq`.
fn record(file: &PayloadFile, seq: u64) -> Result<sled::Batch, StoreError> {
    let mut batch = sled::Batch::default();
    batch.insert(
        SNAPSHOT_FILE,
        encode(file).map_err(StoreError::encode("snapshot file record"))?,
    );
    batch.insert(
        SNAPSHOT_SEQ,
        encode(&seq).map_err(StoreError::encode("snapshot seq"))?,
    );
    Ok(batch)
}

fn corrupt(key: &str, source: mesh_core::codec::CodecError) -> StoreError {
    StoreError::Corrupt {
        tree: SNAPSHOT_TREE,
        key: key.into(),
        source,
    }
}

fn read_meta(snapshots: &sled::Tree) -> Result<Option<SnapshotMeta>, StoreError> {
    match snapshots
        .get(SNAPSHOT_META)
        .map_err(StoreError::sled("reading the snapshot tree"))?
    {
        Some(bytes) => Ok(Some(
            decode(&bytes).map_err(|source| corrupt(SNAPSHOT_META, source))?,
        )),
        None => Ok(None),
    }
}

/// The stored snapshot's meta and the file record naming its payload, if any.
fn read_record(snapshots: &sled::Tree) -> Result<Option<(SnapshotMeta, PayloadFile)>, StoreError> {
    let Some(meta) = read_meta(snapshots)? else {
        return Ok(None);
    };
    let file: PayloadFile = match snapshots
        .get(SNAPSHOT_FILE)
        .map_err(StoreError::sled("reading the snapshot tree"))?
    {
        Some(bytes) => decode(&bytes).map_err(|source| corrupt(SNAPSHOT_FILE, source))?,
        None => {
            return Err(StoreError::Inconsistent {
                tree: SNAPSHOT_TREE,
                key: SNAPSHOT_FILE.into(),
                problem: format!("missing, but meta names snapshot {}", meta.snapshot_id),
            })
        }
    };
    Ok(Some((meta, file)))
}

/// The stored snapshot, if any. `record_lock` is held only while the record is read
/// and its file opened: the open handle reads the payload even if a store removes the
/// file meanwhile.
fn read_snapshot(
    snapshots: &sled::Tree,
    files: &SnapshotFiles,
    record_lock: &Mutex<()>,
) -> Result<Option<Stored>, StoreError> {
    let opened = {
        let _record = record_lock.lock().unwrap_or_else(PoisonError::into_inner);
        match read_record(snapshots)? {
            Some((meta, file)) => {
                let handle = files.open_payload(&file)?;
                Some((meta, file, handle))
            }
            None => None,
        }
    };
    let Some((meta, file, handle)) = opened else {
        return Ok(None);
    };
    let data = files.read_payload(&file, handle)?;
    Ok(Some(Stored { meta, file, data }))
}

/// Decodes a snapshot payload and checks it against its meta.
fn decode_payload(data: &[u8], meta: &SnapshotMeta) -> Result<Payload, String> {
    let payload: Payload = decode(data).map_err(|e| e.to_string())?;
    if payload.0 != meta.last_log_id || payload.1 != meta.last_membership {
        return Err(format!(
            "the payload holds state up to {:?}, the meta says {:?}",
            payload.0, meta.last_log_id
        ));
    }
    Ok(payload)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        // Cloning the state is cheap next to encoding it (tasks, idempotency keys,
        // inputs and outputs are shared, not copied), so the read lock, which applies
        // and every reader wait on, is held only for the clone. Encoding (O(state))
        // runs on a blocking thread so that the runtime's workers keep serving Raft and
        // clients. Readers waiting on the lock block their worker thread: the clone's
        // time (`mesh_snapshot_clone_seconds`) shows in `mesh_runtime_lag_seconds`.
        let started = std::time::Instant::now();
        let (last_applied, membership, state) = {
            let applied = self
                .view
                .applied
                .read()
                .map_err(|_| error::read_state_machine(StoreError::Poisoned))?;
            (
                applied.last_applied,
                applied.membership.clone(),
                applied.state.clone(),
            )
        };
        let cloned = started.elapsed();
        metrics::histogram!("mesh_snapshot_clone_seconds").record(cloned.as_secs_f64());
        let tasks = state.tasks.len();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{seq}", id.leader_id.term, id.index),
            None => format!("0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership.clone(),
            snapshot_id,
        };
        let data = tokio::task::spawn_blocking(move || {
            let payload: PayloadRef<'_> = (&last_applied, &membership, &state);
            encode(&payload).map_err(StoreError::encode("the state machine"))
        })
        .await
        .map_err(StoreError::SyncTask)
        .and_then(|r| r)
        .map_err(error::write_snapshot)?;
        let data = self
            .store_snapshot(&meta, data)
            .await
            .map_err(error::write_snapshot)?;
        metrics::counter!("mesh_snapshots_built_total").increment(1);
        tracing::info!(
            snapshot = %meta.snapshot_id,
            tasks,
            bytes = data.len(),
            clone_ms = cloned.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "built a snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), RaftStorageError> {
        let applied = self
            .view
            .applied
            .read()
            .map_err(|_| error::read_state_machine(StoreError::Poisoned))?;
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (responses, index) = {
            let mut applied = self
                .view
                .applied
                .write()
                .map_err(|_| error::write_state_machine(StoreError::Poisoned))?;
            let mut responses = Vec::new();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                responses.push(match entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(request) => applied.state.apply_request(&request),
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        Response::default()
                    }
                });
            }
            (responses, applied.last_applied.map_or(0, |id| id.index))
        };
        if !responses.is_empty() {
            self.view.changes.send_replace(index);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachineStore {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let data = snapshot.into_inner();
        let bytes = data.len();
        // Decoding is O(state) (a 100,000-task state: 0.3-0.6 s, `cargo bench -p
        // mesh-core --bench apply`), so like encoding it runs on a blocking thread: this
        // is openraft's state machine worker, on the runtime that answers the leader.
        let meta_owned = meta.clone();
        let (decoded, data) =
            tokio::task::spawn_blocking(move || (decode_payload(&data, &meta_owned), data))
                .await
                .map_err(|e| error::read_snapshot(StoreError::SyncTask(e)))?;
        let (last_applied, membership, state) = decoded.map_err(|problem| {
            error::read_snapshot(StoreError::Snapshot {
                id: meta.snapshot_id.clone(),
                problem,
            })
        })?;
        // Durable first: if storing fails, the in-memory state is left as it was.
        self.store_snapshot(meta, data)
            .await
            .map_err(error::write_snapshot)?;
        let index = last_applied.map_or(0, |id| id.index);
        let replaced = {
            let mut applied = self
                .view
                .applied
                .write()
                .map_err(|_| error::write_state_machine(StoreError::Poisoned))?;
            std::mem::replace(
                &mut *applied,
                Applied {
                    last_applied,
                    membership,
                    state,
                },
            )
        };
        // Freeing the old state is O(state) too.
        tokio::task::spawn_blocking(move || drop(replaced));
        self.view.changes.send_replace(index);
        metrics::counter!("mesh_snapshots_installed_total").increment(1);
        tracing::info!(snapshot = %meta.snapshot_id, bytes, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        // Not behind `store_lock`: this runs on openraft's state machine worker, where
        // waiting for a payload write would hold up every apply.
        let (snapshots, files) = (self.snapshots.clone(), Arc::clone(&self.files));
        let record_lock = Arc::clone(&self.record_lock);
        let stored =
            tokio::task::spawn_blocking(move || read_snapshot(&snapshots, &files, &record_lock))
                .await
                .map_err(StoreError::SyncTask)
                .and_then(|r| r)
                .map_err(error::read_snapshot)?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
