//! The Raft log half of the store: entries, vote, committed and purged log ids.

use super::durable::Durable;
use super::error::{self, RaftStorageError, StoreError};
use super::{LOG_TREE, META_TREE};
use mesh_core::codec::{decode, encode};
use mesh_core::raft_types::{Entry, LogId, TypeConfig, Vote};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
/// Stored before the entries are deleted, so a crash mid-purge still knows where the log starts.
const PURGED: &str = "purged";

/// The Raft log in sled: tree `log` keyed by the big-endian index (so key order is index
/// order), tree `meta` for the vote and the committed and purged log ids.
///
/// Cloning shares the same trees; openraft uses a clone as its log reader.
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    durable: Durable,
}

impl LogStore {
    pub(crate) fn new(log: sled::Tree, meta: sled::Tree, durable: Durable) -> LogStore {
        LogStore { log, meta, durable }
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self
            .meta
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

    fn write_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), StoreError> {
        let bytes = encode(value).map_err(StoreError::encode(key))?;
        self.meta
            .insert(key, bytes)
            .map_err(StoreError::sled("writing the meta tree"))?;
        Ok(())
    }

    fn entries(&self, range: (Bound<&u64>, Bound<&u64>)) -> Result<Vec<Entry>, StoreError> {
        let empty = match range {
            (Bound::Included(a), Bound::Included(b)) => a > b,
            (Bound::Included(a), Bound::Excluded(b)) | (Bound::Excluded(a), Bound::Included(b)) => {
                a >= b
            }
            (Bound::Excluded(a), Bound::Excluded(b)) => a.saturating_add(1) >= *b,
            _ => false,
        };
        if empty {
            return Ok(Vec::new());
        }
        let keys = (
            range.0.map(|i| i.to_be_bytes()),
            range.1.map(|i| i.to_be_bytes()),
        );
        self.log
            .range(keys)
            .map(|kv| {
                let (key, value) = kv.map_err(StoreError::sled("reading the log"))?;
                decode_entry(&key, &value)
            })
            .collect()
    }

    /// Removes every entry in `range`, in one atomic sled batch.
    fn remove(&self, range: impl RangeBounds<[u8; 8]>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in self.log.range(range).keys() {
            batch.remove(key.map_err(StoreError::sled("listing log keys"))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(StoreError::sled("deleting log entries"))
    }
}

/// Decodes a log record and checks that it sits under its own index.
fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, StoreError> {
    let index = <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Inconsistent {
            tree: LOG_TREE,
            key: format!("{key:02x?}"),
            problem: "a log key must be 8 bytes".into(),
        })?;
    let entry: Entry = decode(value).map_err(|source| StoreError::Corrupt {
        tree: LOG_TREE,
        key: format!("index {index}"),
        source,
    })?;
    if entry.log_id.index != index {
        return Err(StoreError::Inconsistent {
            tree: LOG_TREE,
            key: format!("index {index}"),
            problem: format!("it holds entry {}", entry.log_id),
        });
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
        let last = match self
            .log
            .last()
            .map_err(StoreError::sled("reading the last log entry"))
            .map_err(error::read_logs)?
        {
            Some((key, value)) => {
                Some(decode_entry(&key, &value).map_err(error::read_logs)?.log_id)
            }
            None => None,
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
        self.write_meta(VOTE, vote).map_err(error::write_vote)?;
        self.durable.barrier().await.map_err(error::write_vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, RaftStorageError> {
        self.read_meta(VOTE).map_err(error::read_vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        // No barrier of its own: openraft only uses the stored committed id to apply
        // sooner after a restart, and tolerates one that lags (the leader commits the
        // rest again). It becomes durable with the next append's barrier, which keeps
        // one fdatasync per batch of entries on the write path.
        self.write_meta(COMMITTED, &committed)
            .map_err(error::write_store)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        Ok(self
            .read_meta::<Option<LogId>>(COMMITTED)
            .map_err(error::read_store)?
            .flatten())
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
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = encode(&entry)
                .map_err(StoreError::encode("a log entry"))
                .map_err(error::write_logs)?;
            batch.insert(&entry.log_id.index.to_be_bytes()[..], bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(StoreError::sled("appending to the log"))
            .map_err(error::write_logs)?;
        // openraft treats the entries as persisted once the callback fires: only after the barrier.
        match self.durable.barrier().await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(error::write_logs(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.remove(log_id.index.to_be_bytes()..)
            .map_err(error::write_logs)?;
        self.durable.barrier().await.map_err(error::write_logs)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.write_meta(PURGED, &log_id)
            .map_err(error::write_logs)?;
        self.remove(..=log_id.index.to_be_bytes())
            .map_err(error::write_logs)?;
        self.durable.barrier().await.map_err(error::write_logs)
    }
}
