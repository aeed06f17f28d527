//! The entries most recently appended to the Raft log, kept decoded.
//!
//! Right after an append the leader reads each new entry back once per follower (to
//! replicate it) and once more to apply it, and a follower once to apply it: each read
//! was a `pread` and a bincode decode of the whole entry (every task's inputs). From
//! here a read is a clone, which shares the commands (`Request::commands` is an
//! `Arc`). The log store keeps this in step with the files under the same lock: an
//! append adds at the end, a truncate cuts the tail, a purge the head; a read outside
//! it goes to the files.

use mesh_core::raft_types::Entry;
use std::collections::VecDeque;

/// Entries kept at most. Replication and apply read what was appended moments ago
/// (the proposer keeps two entries in flight), so a few hundred cover a follower that
/// lags a little; one further behind reads the files.
const MAX_ENTRIES: usize = 256;
/// Encoded bytes kept at most (entries are up to 1 MiB each): bounds the memory the
/// copy holds beyond the state (it shares the inputs with the state, not the specs).
const MAX_BYTES: usize = 8 << 20;

/// Contiguous entries, the last of which is the last entry of the log (when any).
#[derive(Default)]
pub(crate) struct Recent {
    /// Each entry with its encoded size.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Recent {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// An entry just appended to the log, `size` bytes encoded. One that does not
    /// follow the last one kept starts afresh.
    pub(crate) fn push(&mut self, entry: Entry, size: usize) {
        if self.last().is_some_and(|l| l + 1 != entry.log_id.index) {
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.entries.len() > MAX_ENTRIES || (self.bytes > MAX_BYTES && self.entries.len() > 1)
        {
            let (_, size) = self.entries.pop_front().expect("not empty");
            self.bytes -= size;
        }
    }

    /// The entries `lo..hi` if this holds all of them that the log has (the log ends
    /// at the last one kept); `None` sends the read to the files.
    pub(crate) fn get(&self, lo: u64, hi: u64) -> Option<Vec<Entry>> {
        let (first, last) = (self.first()?, self.last()?);
        let hi = hi.min(last + 1);
        if lo >= hi {
            return Some(Vec::new());
        }
        if lo < first {
            return None;
        }
        let from = (lo - first) as usize;
        let to = (hi - first) as usize;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }

    /// The log was cut back: entries from `since` on are gone.
    pub(crate) fn truncate(&mut self, since: u64) {
        while self.last().is_some_and(|l| l >= since) {
            let (_, size) = self.entries.pop_back().expect("not empty");
            self.bytes -= size;
        }
    }

    /// The log was purged: entries up to `upto` are gone.
    pub(crate) fn purge(&mut self, upto: u64) {
        while self.first().is_some_and(|f| f <= upto) {
            let (_, size) = self.entries.pop_front().expect("not empty");
            self.bytes -= size;
        }
    }

    /// Forget everything (after a failed write, whose effect on the files is unknown).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::raft_types::LogId;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn reads_inside_the_kept_range_are_served_and_others_go_to_the_files() {
        let mut r = Recent::default();
        assert_eq!(indexes(r.get(1, 5)), None, "nothing kept");
        for i in 10..20 {
            r.push(entry(i), 100);
        }
        assert_eq!(indexes(r.get(12, 15)), Some(vec![12, 13, 14]));
        assert_eq!(
            indexes(r.get(18, u64::MAX)),
            Some(vec![18, 19]),
            "the log ends at the last kept"
        );
        assert_eq!(indexes(r.get(25, 30)), Some(vec![]), "past the end");
        assert_eq!(indexes(r.get(9, 12)), None, "starts before the first kept");
    }

    #[test]
    fn truncate_purge_and_a_gap_keep_it_in_step_with_the_log() {
        let mut r = Recent::default();
        for i in 1..=10 {
            r.push(entry(i), 100);
        }
        r.truncate(8);
        assert_eq!(indexes(r.get(1, u64::MAX)), Some((1..8).collect()));
        r.push(entry(8), 100);
        r.purge(3);
        assert_eq!(indexes(r.get(4, u64::MAX)), Some((4..9).collect()));
        assert_eq!(indexes(r.get(3, 5)), None);
        r.push(entry(20), 100);
        assert_eq!(indexes(r.get(4, u64::MAX)), None, "a gap starts afresh");
        assert_eq!(indexes(r.get(20, 21)), Some(vec![20]));
    }

    #[test]
    fn it_stays_within_its_bounds() {
        let mut r = Recent::default();
        for i in 1..=(MAX_ENTRIES as u64 + 10) {
            r.push(entry(i), 10);
        }
        assert_eq!(r.entries.len(), MAX_ENTRIES);
        assert_eq!(r.first(), Some(11));
        r.push(entry(MAX_ENTRIES as u64 + 11), MAX_BYTES);
        assert_eq!(
            r.entries.len(),
            1,
            "one entry over the byte bound is still kept"
        );
        assert_eq!(r.bytes, MAX_BYTES);
    }
}
