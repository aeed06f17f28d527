//! The Raft log half of the store: entries in the log files of `log_file.rs`; vote,
//! committed and purged log ids in sled's `meta` tree.

use super::durable::Durable;
use super::error::{self, RaftStorageError, StoreError};
use super::log_file::LogFiles;
use super::log_sync::LogSync;
use super::recent::Recent;
use super::{LOG_TREE, META_TREE};
use mesh_core::codec::{decode, encode};
use mesh_core::raft_types::{Entry, LogId, TypeConfig, Vote};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
/// The committed log id is stored at most this often (see `save_committed`).
const SAVE_COMMITTED_EVERY: Duration = Duration::from_secs(1);
/// Stored before the entries are deleted, so a crash mid-purge still knows where the log starts.
const PURGED: &str = "purged";

/// The Raft log: entries in their own files, the vote and the committed and purged log
/// ids in sled's `meta` tree.
///
/// Cloning shares the same files; openraft uses a clone as its log reader.
#[derive(Clone)]
pub struct LogStore {
    log: Arc<Mutex<Log>>,
    meta: sled::Tree,
    durable: Durable,
    sync: LogSync,
    /// This node's Raft id: entries another leader wrote are a follower's, synced on the
    /// caller's thread (see `log_sync.rs`).
    me: u64,
    /// When `save_committed` last wrote to sled.
    committed_saved: Option<Instant>,
}

/// The files and the recent entries kept decoded, changed together.
struct Log {
    files: LogFiles,
    recent: Recent,
}

impl LogStore {
    /// Opens the log files in `dir`. Entries an older version kept in sled's `log` tree
    /// move into the files first (once: the tree is emptied afterwards).
    pub(crate) fn open(
        dir: &Path,
        me: u64,
        old_log: sled::Tree,
        meta: sled::Tree,
        durable: Durable,
    ) -> Result<LogStore, StoreError> {
        let purged: Option<LogId> = read_meta(&meta, PURGED)?;
        let mut files = LogFiles::open(dir, purged.map(|p| p.index))?;
        if !old_log.is_empty() {
            let mut moved = Vec::new();
            for kv in old_log.iter() {
                let (key, value) = kv.map_err(StoreError::sled("reading the old log tree"))?;
                let inconsistent = |key: String, problem: String| StoreError::Inconsistent {
                    tree: LOG_TREE,
                    key,
                    problem,
                };
                let index = <[u8; 8]>::try_from(&key[..])
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        inconsistent(format!("{key:02x?}"), "a log key must be 8 bytes".into())
                    })?;
                let entry = decode_entry(index, &value)
                    .map_err(|problem| inconsistent(format!("index {index}"), problem))?;
                if purged.is_none_or(|p| entry.log_id.index > p.index) {
                    moved.push((entry.log_id.index, value.to_vec()));
                }
            }
            let count = moved.len();
            files.append(moved)?.sync()?;
            old_log
                .clear()
                .map_err(StoreError::sled("clearing the old log tree"))?;
            tracing::info!(
                entries = count,
                "moved the Raft log out of sled into its own files"
            );
        }
        Ok(LogStore {
            log: Arc::new(Mutex::new(Log {
                files,
                recent: Recent::default(),
            })),
            meta,
            durable,
            sync: LogSync::start()?,
            me,
            committed_saved: None,
        })
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        // Every mutation leaves the index consistent with the files or returns an error
        // before touching it, so a panic elsewhere does not invalidate it.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>, StoreError> {
        read_meta(&self.meta, key)
    }

    fn write_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), StoreError> {
        let bytes = encode(value).map_err(StoreError::encode(key))?;
        self.meta
            .insert(key, bytes)
            .map_err(StoreError::sled("writing the meta tree"))?;
        Ok(())
    }

    fn entries(&self, range: (Bound<&u64>, Bound<&u64>)) -> Result<Vec<Entry>, StoreError> {
        let lo = match range.0 {
            Bound::Included(a) => *a,
            Bound::Excluded(a) => a.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let hi = match range.1 {
            Bound::Included(b) => b.saturating_add(1),
            Bound::Excluded(b) => *b,
            Bound::Unbounded => u64::MAX,
        };
        if lo >= hi {
            return Ok(Vec::new());
        }
        let log = self.log();
        if let Some(entries) = log.recent.get(lo, hi) {
            return Ok(entries);
        }
        let files = &log.files;
        files
            .read(lo, hi)?
            .into_iter()
            .map(|(index, bytes)| {
                decode_entry(index, &bytes).map_err(|problem| files.corrupt(index, problem))
            })
            .collect()
    }
}

fn read_meta<T: DeserializeOwned>(
    meta: &sled::Tree,
    key: &'static str,
) -> Result<Option<T>, StoreError> {
    let Some(bytes) = meta
        .get(key)
        .map_err(StoreError::sled("reading the meta tree"))?
    else {
        return Ok(None);
    };
    let value = decode(&bytes).map_err(|source| StoreError::Corrupt {
        tree: META_TREE,
        key: key.into(),
        source,
    })?;
    Ok(Some(value))
}

/// Decodes the entry stored for `index` and checks that it is that index's entry;
/// the error says what is wrong, the caller says where.
fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, String> {
    let entry: Entry = decode(bytes).map_err(|e| format!("the entry does not decode: {e}"))?;
    if entry.log_id.index != index {
        return Err(format!("index {index} holds entry {}", entry.log_id));
    }
    Ok(entry)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        self.entries((range.start_bound(), range.end_bound()))
            .map_err(error::read_logs)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let purged: Option<LogId> = self.read_meta(PURGED).map_err(error::read_logs)?;
        let last = {
            let log = self.log();
            let files = &log.files;
            match files.last().map_err(error::read_logs)? {
                Some((index, bytes)) => Some(
                    decode_entry(index, &bytes)
                        .map_err(|problem| error::read_logs(files.corrupt(index, problem)))?
                        .log_id,
                ),
                None => None,
            }
        };
        // After a crash mid-purge entries at or below `purged` may remain; they do not count.
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.max(purged),
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), RaftStorageError> {
        // A leader does not wait for its own appends (`append`), so some may still be
        // syncing when it steps down or starts an election. They are durable before the
        // vote changes: whatever this node answers or counts under the new vote (a log it
        // claims in an election, a log it reports matching to a new leader, its own log
        // as a new leader) is on disk.
        self.sync.drain().await.map_err(error::write_vote)?;
        self.write_meta(VOTE, vote).map_err(error::write_vote)?;
        self.durable.barrier().await.map_err(error::write_vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, RaftStorageError> {
        self.read_meta(VOTE).map_err(error::read_vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        // No barrier of its own: openraft only uses the stored committed id to apply
        // sooner after a restart, and tolerates one that lags (the leader commits the
        // rest again). It becomes durable with the next sled barrier (a vote, a purge, a
        // stored snapshot) or sled's own fsync every 500 ms, which keeps the write path
        // at one fdatasync, the log's.
        //
        // Nor is it written on every commit: a sled insert per commit was 2 % of a
        // follower's CPU, and it kept sled dirty, so sled's background flush wrote to the
        // disk every 500 ms under load, beside the log's syncs. The stored id then trails
        // the last commit by less than `SAVE_COMMITTED_EVERY` of commits; a restart
        // applies up to it and learns the rest from the leader.
        if self
            .committed_saved
            .is_some_and(|at| at.elapsed() < SAVE_COMMITTED_EVERY)
        {
            return Ok(());
        }
        self.committed_saved = Some(Instant::now());
        self.write_meta(COMMITTED, &committed)
            .map_err(error::write_store)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        let committed = self
            .read_meta::<Option<LogId>>(COMMITTED)
            .map_err(error::read_store)?
            .flatten();
        // A leader commits with its followers' copies while its own append may still be
        // syncing, so after a power loss the stored committed id can point past the end
        // of this node's log (the entries are durable on a majority elsewhere). Never
        // report more than the log holds: openraft applies up to it on start.
        let last = self.get_log_state().await?.last_log_id;
        Ok(match (committed, last) {
            (Some(c), Some(l)) if c.index > l.index => Some(l),
            (Some(_), None) => None,
            (c, _) => c,
        })
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut records = Vec::new();
        let mut kept = Vec::new();
        let mut replicated = true;
        for entry in entries {
            replicated &= entry.log_id.leader_id.node_id != self.me;
            let bytes = encode(&entry)
                .map_err(StoreError::encode("a log entry"))
                .map_err(error::write_logs)?;
            let index = entry.log_id.index;
            kept.push((entry, bytes.len()));
            records.push((index, bytes));
        }
        let written = Instant::now();
        let unsynced = {
            let mut log = self.log();
            match log.files.append(records) {
                Ok(unsynced) => {
                    for (entry, size) in kept {
                        log.recent.push(entry, size);
                    }
                    unsynced
                }
                Err(e) => {
                    log.recent.clear();
                    return Err(error::write_logs(e));
                }
            }
        };
        metrics::histogram!("mesh_raft_log_write_seconds").record(written.elapsed().as_secs_f64());
        // openraft treats the entries as persisted once the callback fires, after the
        // sync. A follower waits for it before it answers, so it syncs here, without the
        // hand-off to the sync thread and back; the leader replicates meanwhile and counts
        // itself in a quorum only when the thread fires it.
        if replicated {
            self.sync.append_here(unsynced, callback);
        } else {
            self.sync.append(unsynced, callback);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        let mut log = self.log();
        log.recent.truncate(log_id.index);
        log.files.truncate(log_id.index).map_err(error::write_logs)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        // The purge point is durable before any file goes, so a reopen skips what remains.
        self.write_meta(PURGED, &log_id)
            .map_err(error::write_logs)?;
        self.durable.barrier().await.map_err(error::write_logs)?;
        let mut log = self.log();
        log.recent.purge(log_id.index);
        log.files.purge(log_id.index).map_err(error::write_logs)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Store, LOG_DIR};
    use super::*;

    #[tokio::test]
    async fn a_committed_id_past_the_end_of_the_log_reads_as_its_last_entry() {
        use openraft::{CommittedLeaderId, EntryPayload};
        let log_id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), 1).unwrap());
        // Entries 1-3 survived; a power loss took 4 and 5, which the leader had already
        // committed with its followers' copies and stored as committed.
        let mut files = LogFiles::open(&dir.path().join(LOG_DIR), None).unwrap();
        let entries = (1..=3).map(|i| {
            let entry = Entry {
                log_id: log_id(i),
                payload: EntryPayload::Blank,
            };
            (i, encode(&entry).unwrap())
        });
        files.append(entries).unwrap().sync().unwrap();
        drop(files);
        let mut log = Store::open(dir.path(), 1).unwrap().log;
        log.write_meta(COMMITTED, &Some(log_id(5))).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(3)));
        log.write_meta(COMMITTED, &Some(log_id(2))).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2)));
    }

    #[tokio::test]
    async fn the_committed_id_is_stored_at_most_once_per_interval() {
        use openraft::CommittedLeaderId;
        let log_id = |index| Some(LogId::new(CommittedLeaderId::new(1, 1), index));
        let dir = tempfile::tempdir().unwrap();
        let mut log = Store::open(dir.path(), 1).unwrap().log;
        let stored = |log: &LogStore| log.read_meta::<Option<LogId>>(COMMITTED).unwrap().flatten();
        log.save_committed(log_id(1)).await.unwrap();
        assert_eq!(stored(&log), log_id(1), "the first is stored");
        log.save_committed(log_id(2)).await.unwrap();
        assert_eq!(
            stored(&log),
            log_id(1),
            "the next, within the interval, is not"
        );
        log.committed_saved = Some(Instant::now() - SAVE_COMMITTED_EVERY);
        log.save_committed(log_id(3)).await.unwrap();
        assert_eq!(stored(&log), log_id(3), "once the interval passed, it is");
    }

    #[tokio::test]
    async fn an_entry_that_does_not_decode_is_reported_with_its_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), 1).unwrap());
        // A record whose frame and checksum are sound but whose payload is no entry.
        let mut files = LogFiles::open(&dir.path().join(LOG_DIR), None).unwrap();
        files
            .append([(1, b"\x01not an entry".to_vec())])
            .unwrap()
            .sync()
            .unwrap();
        drop(files);
        let mut log = Store::open(dir.path(), 1).unwrap().log;
        let err = log.try_get_log_entries(..).await.unwrap_err().to_string();
        assert!(err.contains(&format!("{:020}.seg at byte 0", 1)), "{err}");
        assert!(err.contains("the entry does not decode"), "{err}");
        let err = log.get_log_state().await.unwrap_err().to_string();
        assert!(err.contains("the entry does not decode"), "{err}");
    }
}
