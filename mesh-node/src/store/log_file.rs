//! The Raft log's own files: append-only segments of checksummed records, made durable
//! with one `fdatasync` per appended batch.
//!
//! Why not sled (see `durable.rs`): a sled barrier is sled's `flush` (a `pwrite` and a
//! `sync_file_range` that waits for the device) and then our `fdatasync`, two device
//! waits plus directory listings and hand-offs between sled's threads, on every append,
//! on the leader and again on each follower before it answers. It also leaves the
//! power-loss window sled's background page relocation opens. A log of our own is one
//! `pwrite` and one `fdatasync`.
//!
//! Layout: `<store dir>/log/<index of the segment's first record, 20 digits>.seg`. A
//! record is `[payload length: u32 LE][crc32 of index and payload: u32 LE][index: u64
//! LE][payload]`. Indexes only grow, within a segment and from one segment to the next
//! (Raft appends consecutive indexes; openraft's storage suite also appends across
//! gaps, which the log keeps). A new segment starts when the active one passes
//! `SEGMENT_BYTES` or a purge removed it; creating one syncs the directory.
//!
//! Preallocation: the active segment's file is kept ahead of its records by writing
//! zeros in steps of [`PREALLOCATE`] bytes. A record written over blocks the file
//! already has changes no metadata, so its `fdatasync` flushes data alone and skips the
//! filesystem journal (on this project's ext4 test machine, a 1 KiB record's sync p50
//! ~115 µs instead of ~160-200 µs when each write grows the file; etcd's WAL does the
//! same). The zeros after the last record read as "no record here" (an all-zero header).
//! A segment is cut to its records' length before the next one is created, so only the
//! last segment has a zero tail.
//!
//! Recovery (`open`) reads every segment and checks every record. The tail of the last
//! segment may hold a record a crash cut short (an incomplete header or payload, a zeroed
//! header, or a checksum that fails on a record that is followed only by zeros or has a
//! sector of zeros, see `torn`): the write was never
//! acknowledged, so the file is cut back to the last whole record. Anything else that
//! does not check out (a bad record with more data after it, an index that does not grow)
//! is corruption, reported with the file and byte offset, never repaired silently.
//!
//! Purging deletes whole segments below the purge point; the caller makes the purged log
//! id durable first, so records at or below it that survive (a deletion lost with the
//! directory's metadata in a power loss) are skipped by the next `open`.

use super::{create_dir_durably, sync_dir, StoreError};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes before each record's payload.
const HEADER: usize = 16;
/// A segment is closed once it grows past this.
const SEGMENT_BYTES: u64 = 64 << 20;
/// The active segment's file grows in steps of this many zeroed bytes.
const PREALLOCATE: u64 = 4 << 20;
/// The unit a device writes whole, for telling a torn write from damage.
const SECTOR: usize = 512;
const SUFFIX: &str = ".seg";

struct Segment {
    /// Index of the segment's first record (its name).
    first: u64,
    /// Index of its last record.
    last: Option<u64>,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes of whole records.
    len: u64,
    /// The file's length: `len` plus the zeroed bytes preallocated after the records.
    size: u64,
}

/// Where a live record lies.
#[derive(Clone, Copy)]
struct Pos {
    /// The `first` of its segment.
    segment: u64,
    offset: u64,
    len: u32,
}

/// The log's segments and an in-memory index of where each live record is.
pub(crate) struct LogFiles {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// Live records by index.
    positions: BTreeMap<u64, Pos>,
}

/// Files an append wrote to: the append is durable once `sync` returns.
#[must_use = "an append is not durable until it is synced"]
#[derive(Default)]
pub(crate) struct Unsynced(Vec<(PathBuf, Arc<File>)>);

impl Unsynced {
    /// Writes to `file` at `path`, to be synced (tests of the sync thread).
    #[cfg(test)]
    pub(crate) fn of(path: PathBuf, file: File) -> Unsynced {
        Unsynced(vec![(path, Arc::new(file))])
    }

    /// Adds the files `other` wrote that `self` does not hold yet. Files are told apart
    /// by their open handle, not their path: a segment name can be used again after a
    /// truncate removed the file, and the new file needs its own sync.
    pub(crate) fn merge(&mut self, other: &Unsynced) {
        for (path, file) in &other.0 {
            if !self.0.iter().any(|(_, f)| Arc::ptr_eq(f, file)) {
                self.0.push((path.clone(), Arc::clone(file)));
            }
        }
    }

    /// `fdatasync` every file written (in practice one).
    pub(crate) fn sync(self) -> Result<(), StoreError> {
        for (path, file) in self.0 {
            file.sync_data()
                .map_err(StoreError::file_io("sync the Raft log file", &path))?;
        }
        Ok(())
    }
}

fn segment_name(first: u64) -> String {
    format!("{first:020}{SUFFIX}")
}

fn checksum(index: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(index);
    h.update(payload);
    h.finalize()
}

fn encode_record(out: &mut Vec<u8>, index: u64, payload: &[u8]) {
    let index = index.to_le_bytes();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(&index, payload).to_le_bytes());
    out.extend_from_slice(&index);
    out.extend_from_slice(payload);
}

/// One record read back from a segment's bytes.
enum Parsed {
    Record {
        index: u64,
        len: u32,
    },
    /// The bytes end mid-record, or the header is zeroed: an unfinished write.
    Torn,
    /// A whole record whose checksum fails.
    BadChecksum,
}

fn parse(bytes: &[u8]) -> Parsed {
    if bytes.len() < HEADER || bytes[..HEADER].iter().all(|b| *b == 0) {
        return Parsed::Torn;
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let (len, crc) = (word(0), word(4));
    let Some(payload) = bytes.get(HEADER..HEADER + len as usize) else {
        return Parsed::Torn;
    };
    if checksum(&bytes[8..16], payload) != crc {
        return Parsed::BadChecksum;
    }
    let index = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    Parsed::Record { index, len }
}

impl LogFiles {
    /// Opens (creating) the log in `dir`, skipping records at or below `purged`, and
    /// cuts back a torn tail left by a crash.
    pub(crate) fn open(dir: &Path, purged: Option<u64>) -> Result<LogFiles, StoreError> {
        create_dir_durably(dir)?;
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(StoreError::file_io("list", dir))? {
            let entry = entry.map_err(StoreError::file_io("list", dir))?;
            let name = entry.file_name();
            let Some(first) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            names.push((first, entry.path()));
        }
        names.sort();

        let mut log = LogFiles {
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            positions: BTreeMap::new(),
        };
        let mut previous: Option<u64> = None;
        let count = names.len();
        for (n, (first, path)) in names.into_iter().enumerate() {
            let last_segment = n + 1 == count;
            let bytes = fs::read(&path).map_err(StoreError::file_io("read", &path))?;
            let corrupt = |offset: usize, problem: String| StoreError::LogCorrupt {
                path: path.clone(),
                offset: offset as u64,
                problem,
            };
            let mut offset = 0;
            let mut last = None;
            while offset < bytes.len() {
                let rest = &bytes[offset..];
                match parse(rest) {
                    Parsed::Record { index, len } => {
                        if purged.is_none_or(|p| index > p) {
                            if index < first || previous.is_some_and(|p| index <= p) {
                                return Err(corrupt(
                                    offset,
                                    format!(
                                        "record for index {index} after index {} in a segment that starts at {first}",
                                        previous.map_or("none".into(), |p| p.to_string())
                                    ),
                                ));
                            }
                            log.positions.insert(
                                index,
                                Pos {
                                    segment: first,
                                    offset: offset as u64,
                                    len,
                                },
                            );
                            previous = Some(index);
                        }
                        last = Some(index);
                        offset += HEADER + len as usize;
                    }
                    Parsed::Torn if last_segment => break,
                    Parsed::BadChecksum if last_segment && torn(&bytes, offset) => break,
                    Parsed::Torn => {
                        return Err(corrupt(offset, "the segment ends mid-record".into()))
                    }
                    Parsed::BadChecksum => {
                        return Err(corrupt(offset, "the record's checksum fails".into()))
                    }
                }
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(StoreError::file_io("open", &path))?;
            // After the records: nothing, the preallocated zeros, or an unfinished write.
            let mut size = bytes.len() as u64;
            if let Some(dirty) = bytes[offset..].iter().rposition(|b| *b != 0) {
                tracing::warn!(
                    path = %path.display(),
                    offset,
                    dropped = dirty + 1,
                    "cutting off an unfinished write at the end of the Raft log (a crash interrupted it before it was acknowledged)"
                );
                file.set_len(offset as u64)
                    .and_then(|()| file.sync_data())
                    .map_err(StoreError::file_io("cut back", &path))?;
                size = offset as u64;
            }
            log.segments.push(Segment {
                first,
                last,
                path,
                file: Arc::new(file),
                len: offset as u64,
                size,
            });
        }
        Ok(log)
    }

    /// Index and payload of the last live record.
    pub(crate) fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let Some(last) = self.positions.keys().next_back().copied() else {
            return Ok(None);
        };
        Ok(self.read(last, last + 1)?.pop())
    }

    /// Appends records with growing indexes, above every index in the log. They are readable at once and durable after the returned `sync`.
    pub(crate) fn append(
        &mut self,
        records: impl IntoIterator<Item = (u64, Vec<u8>)>,
    ) -> Result<Unsynced, StoreError> {
        let mut touched: Vec<(PathBuf, Arc<File>)> = Vec::new();
        let mut buf = Vec::new();
        for (index, payload) in records {
            // Above the last live record. Raft never appends at or below the purge point,
            // but openraft's storage suite does (after `get_initial_state` purged a log
            // that lagged the state machine): such a record is written but counts as
            // purged, so a reopen skips it.
            let last = self.positions.keys().next_back().copied();
            if let Some(last) = last.filter(|l| index <= *l) {
                return Err(StoreError::LogCorrupt {
                    path: self.dir.clone(),
                    offset: 0,
                    problem: format!(
                        "refusing to append index {index}: the log already reaches index {last}"
                    ),
                });
            }
            let roll = self
                .segments
                .last()
                .is_none_or(|s| s.len + buf.len() as u64 >= SEGMENT_BYTES);
            if roll {
                self.write_out(&mut buf, &mut touched)?;
                self.new_segment(index)?;
            }
            let active = self.segments.last_mut().expect("a segment exists");
            self.positions.insert(
                index,
                Pos {
                    segment: active.first,
                    offset: active.len + buf.len() as u64,
                    len: payload.len() as u32,
                },
            );
            encode_record(&mut buf, index, &payload);
            active.last = Some(index);
        }
        self.write_out(&mut buf, &mut touched)?;
        Ok(Unsynced(touched))
    }

    /// Writes `buf` at the end of the active segment.
    fn write_out(
        &mut self,
        buf: &mut Vec<u8>,
        touched: &mut Vec<(PathBuf, Arc<File>)>,
    ) -> Result<(), StoreError> {
        if buf.is_empty() {
            return Ok(());
        }
        let active = self.segments.last_mut().expect("a segment exists");
        let end = active.len + buf.len() as u64;
        // Records, then (when they pass the file's end) zeros up to the next step.
        let size = active.size.max(end.next_multiple_of(PREALLOCATE));
        active
            .file
            .write_all_at(buf, active.len)
            .and_then(|()| write_zeros(&active.file, end.max(active.size), size))
            .map_err(StoreError::file_io("write the Raft log file", &active.path))?;
        active.len = end;
        active.size = size;
        buf.clear();
        if !touched.iter().any(|(p, _)| *p == active.path) {
            touched.push((active.path.clone(), Arc::clone(&active.file)));
        }
        Ok(())
    }

    fn new_segment(&mut self, first: u64) -> Result<(), StoreError> {
        // An empty segment left at the end (created just before a crash, or cut back
        // to nothing) whose name does not fit makes way for the new one.
        while self
            .segments
            .last()
            .is_some_and(|s| s.len == 0 && s.first >= first)
        {
            let s = self.segments.pop().expect("checked");
            fs::remove_file(&s.path).map_err(StoreError::file_io("remove", &s.path))?;
        }
        if let Some(last) = self.segments.last().filter(|s| s.first >= first) {
            return Err(StoreError::LogCorrupt {
                path: last.path.clone(),
                offset: 0,
                problem: format!("a segment for index {first} would come after it"),
            });
        }
        if let Some(previous) = self.segments.last_mut() {
            // Everything before the new segment is synced before the new name can count,
            // and without its preallocated zeros: only the last segment has a zero tail.
            previous
                .file
                .set_len(previous.len)
                .and_then(|()| previous.file.sync_data())
                .map_err(StoreError::file_io(
                    "close the Raft log file",
                    &previous.path,
                ))?;
            previous.size = previous.len;
        }
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(StoreError::file_io("create", &path))?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            first,
            last: None,
            path,
            file: Arc::new(file),
            len: 0,
            size: 0,
        });
        Ok(())
    }

    /// The error for a live record whose payload is not what the log stored: names its
    /// file and offset.
    pub(crate) fn corrupt(&self, index: u64, problem: String) -> StoreError {
        let (path, offset) = match self.positions.get(&index) {
            Some(pos) => (self.segment(pos.segment).path.clone(), pos.offset),
            None => (self.dir.clone(), 0),
        };
        StoreError::LogCorrupt {
            path,
            offset,
            problem,
        }
    }

    fn segment(&self, first: u64) -> &Segment {
        let at = self
            .segments
            .binary_search_by_key(&first, |s| s.first)
            .expect("every position points into a known segment");
        &self.segments[at]
    }

    /// Payloads of the live records with index in `lo..hi`, checksums checked.
    pub(crate) fn read(&self, lo: u64, hi: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if lo >= hi {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (&index, &pos) in self.positions.range(lo..hi) {
            let segment = self.segment(pos.segment);
            let mut bytes = vec![0; HEADER + pos.len as usize];
            segment
                .file
                .read_exact_at(&mut bytes, pos.offset)
                .map_err(StoreError::file_io("read the Raft log file", &segment.path))?;
            let corrupt = |problem: &str| StoreError::LogCorrupt {
                path: segment.path.clone(),
                offset: pos.offset,
                problem: problem.into(),
            };
            match parse(&bytes) {
                Parsed::Record { index: found, len } if found == index && len == pos.len => {}
                Parsed::Record { .. } => return Err(corrupt("the record changed on disk")),
                Parsed::Torn => return Err(corrupt("the record is cut short")),
                Parsed::BadChecksum => return Err(corrupt("the record's checksum fails")),
            }
            bytes.drain(..HEADER);
            out.push((index, bytes));
        }
        Ok(out)
    }

    /// Removes the records from `since` on (a conflicting suffix), durably.
    pub(crate) fn truncate(&mut self, since: u64) -> Result<(), StoreError> {
        let removed = self.positions.split_off(&since);
        let Some((_, &cut)) = removed.iter().next() else {
            return Ok(());
        };
        let mut dropped = false;
        while self.segments.last().is_some_and(|s| s.first > cut.segment) {
            let s = self.segments.pop().expect("checked");
            fs::remove_file(&s.path).map_err(StoreError::file_io("remove", &s.path))?;
            dropped = true;
        }
        let before = self.positions.keys().next_back().copied();
        let s = self
            .segments
            .last_mut()
            .expect("the segment holding `since`");
        s.file
            .set_len(cut.offset)
            .and_then(|()| s.file.sync_data())
            .map_err(StoreError::file_io("truncate", &s.path))?;
        s.len = cut.offset;
        s.size = cut.offset;
        s.last = before.filter(|b| *b >= s.first);
        if dropped {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Forgets the records up to and including `upto` and deletes the segments that hold
    /// nothing else. The caller has made `upto` durable as the purge point first.
    pub(crate) fn purge(&mut self, upto: u64) -> Result<(), StoreError> {
        self.positions = self.positions.split_off(&(upto + 1));
        let before = self.segments.len();
        while self
            .segments
            .first()
            .is_some_and(|s| s.last.is_none_or(|l| l <= upto) && (s.len > 0 || s.first <= upto))
        {
            let s = self.segments.remove(0);
            fs::remove_file(&s.path).map_err(StoreError::file_io("remove", &s.path))?;
        }
        if self.segments.len() != before {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// Whether the record at `offset` of the last segment, whose checksum fails, is a write
/// a crash interrupted rather than damage to an acknowledged record: nothing but zeros
/// follows it, or one of its sectors still reads as the preallocated zeros. A batch
/// overwrites preallocated blocks in place, and a power loss may keep some of its
/// sectors and not others (the sector test is etcd's WAL's). No append is written
/// before the previous one's sync returns, so all that follows a torn record is
/// unacknowledged too.
fn torn(bytes: &[u8], offset: usize) -> bool {
    let end = record_end(&bytes[offset..]).map_or(bytes.len(), |len| offset + len);
    zeroed(&bytes[end.min(bytes.len())..])
        || (offset.next_multiple_of(SECTOR)..end.min(bytes.len()))
            .step_by(SECTOR)
            .any(|at| bytes.get(at..at + SECTOR).is_some_and(zeroed))
}

fn zeroed(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| *b == 0)
}

/// Writes zeros over `from..to` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64);
        file.write_all_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// Where the record at the start of `bytes` would end, when its header is whole.
fn record_end(bytes: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
    Some(HEADER + len as usize)
}

#[cfg(test)]
mod tests {
    use super::super::file_names as segment_files;
    use super::*;

    #[test]
    fn merge_keeps_every_open_file_even_under_one_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000001.seg");
        let old = File::create(&path).unwrap();
        fs::remove_file(&path).unwrap();
        let new = File::create(&path).unwrap();
        let mut all = Unsynced::of(path.clone(), old);
        let again = Unsynced(vec![(path.clone(), Arc::clone(&all.0[0].1))]);
        all.merge(&again);
        assert_eq!(all.0.len(), 1, "the same open file is synced once");
        all.merge(&Unsynced::of(path, new));
        assert_eq!(
            all.0.len(),
            2,
            "a file recreated under the old name needs its own sync"
        );
    }

    fn payload(index: u64) -> Vec<u8> {
        format!("entry {index}")
            .repeat(index as usize % 7 + 1)
            .into_bytes()
    }

    fn append(log: &mut LogFiles, range: std::ops::Range<u64>) {
        log.append(range.map(|i| (i, payload(i))))
            .unwrap()
            .sync()
            .unwrap();
    }

    /// A fresh log directory holding the records of `range`, synced.
    fn log_of(range: std::ops::Range<u64>) -> (tempfile::TempDir, LogFiles) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogFiles::open(dir.path(), None).unwrap();
        append(&mut log, range);
        (dir, log)
    }

    fn indexes(log: &LogFiles) -> Vec<u64> {
        log.read(0, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|(i, p)| {
                assert_eq!(p, payload(i));
                i
            })
            .collect()
    }

    #[test]
    fn records_survive_a_reopen_and_reads_clamp_to_the_live_range() {
        let (dir, log) = log_of(0..10);
        drop(log);
        let log = LogFiles::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&log), (0..10).collect::<Vec<_>>());
        assert_eq!(log.read(3, 5).unwrap().len(), 2);
        assert_eq!(log.read(8, 100).unwrap().len(), 2);
        assert_eq!(log.last().unwrap().unwrap().0, 9);
    }

    #[test]
    fn an_append_out_of_sequence_is_refused() {
        let (_dir, mut log) = log_of(5..8);
        let err = log.append([(7, payload(7))]).err().unwrap().to_string();
        assert!(err.contains("the log already reaches index 7"), "{err}");
        log.purge(10).unwrap();
        // A gap is kept as a gap (openraft's storage suite appends across one).
        append(&mut log, 12..13);
        append(&mut log, 14..15);
        assert_eq!(indexes(&log), vec![12, 14]);
    }

    #[test]
    fn truncate_then_append_rewrites_the_tail_durably() {
        let (dir, mut log) = log_of(1..10);
        log.truncate(6).unwrap();
        assert_eq!(indexes(&log), (1..6).collect::<Vec<_>>());
        append(&mut log, 6..8);
        drop(log);
        let log = LogFiles::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&log), (1..8).collect::<Vec<_>>());
    }

    #[test]
    fn purge_deletes_whole_segments_and_reopen_skips_purged_records() {
        let (dir, mut log) = log_of(0..5);
        // Purging everything leaves no segment; the next append starts a new one.
        log.purge(4).unwrap();
        assert!(segment_files(dir.path()).is_empty());
        append(&mut log, 5..9);
        log.purge(6).unwrap();
        assert_eq!(indexes(&log), vec![7, 8]);
        assert_eq!(segment_files(dir.path()), vec![segment_name(5)]);
        drop(log);
        let log = LogFiles::open(dir.path(), Some(6)).unwrap();
        assert_eq!(indexes(&log), vec![7, 8]);
        // A log purged past its end continues where the purge says.
        let mut log = log;
        log.purge(20).unwrap();
        assert_eq!(indexes(&log), Vec::<u64>::new());
        append(&mut log, 21..23);
        drop(log);
        let log = LogFiles::open(dir.path(), Some(20)).unwrap();
        assert_eq!(indexes(&log), vec![21, 22]);
    }

    /// The bytes of the records of `range` as a segment holds them.
    fn encoded(range: std::ops::Range<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for i in range {
            encode_record(&mut out, i, &payload(i));
        }
        out
    }

    /// Puts `bytes` into the file at `at` (over its preallocated zeros), as a write a
    /// crash interrupted leaves them.
    fn write_at(path: &Path, at: usize, bytes: &[u8]) {
        let mut file = fs::read(path).unwrap();
        file[at..at + bytes.len()].copy_from_slice(bytes);
        fs::write(path, &file).unwrap();
    }

    #[test]
    fn the_active_segment_is_preallocated_with_zeros_that_reopen_as_no_records() {
        let (dir, mut log) = log_of(0..4);
        let path = dir.path().join(segment_name(0));
        let bytes = fs::read(&path).unwrap();
        let records = encoded(0..4);
        assert_eq!(bytes.len() as u64, PREALLOCATE);
        assert_eq!(&bytes[..records.len()], &records[..]);
        assert!(zeroed(&bytes[records.len()..]));
        drop(log);
        // Reopening keeps the zeros (no cut, no warning) and appends over them.
        log = LogFiles::open(dir.path(), None).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), PREALLOCATE);
        append(&mut log, 4..6);
        drop(log);
        let log = LogFiles::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&log), (0..6).collect::<Vec<_>>());
        assert_eq!(
            &fs::read(&path).unwrap()[..encoded(0..6).len()],
            &encoded(0..6)[..]
        );
    }

    #[test]
    fn a_closed_segment_is_cut_to_its_records_and_only_the_last_has_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogFiles::open(dir.path(), None).unwrap();
        let big = |i: u64| vec![i as u8 + 1; 1 << 20];
        // A segment takes records while it is below SEGMENT_BYTES: 64 of 1 MiB and a header.
        let per_segment = SEGMENT_BYTES >> 20;
        for i in 0..=per_segment {
            log.append([(i, big(i))]).unwrap().sync().unwrap();
        }
        assert_eq!(
            segment_files(dir.path()),
            vec![segment_name(0), segment_name(per_segment)]
        );
        let first = fs::metadata(dir.path().join(segment_name(0)))
            .unwrap()
            .len();
        assert_eq!(first, per_segment * (HEADER as u64 + (1 << 20)));
        let last = fs::metadata(dir.path().join(segment_name(per_segment)))
            .unwrap()
            .len();
        assert_eq!(
            last,
            (HEADER as u64 + (1 << 20)).next_multiple_of(PREALLOCATE)
        );
        drop(log);
        let log = LogFiles::open(dir.path(), None).unwrap();
        let read = log.read(0, u64::MAX).unwrap();
        assert_eq!(read.len() as u64, per_segment + 1);
        assert!(read.iter().all(|(i, p)| *p == big(*i)));
    }

    #[test]
    fn a_torn_tail_is_cut_back_and_the_log_goes_on() {
        let (dir, log) = log_of(0..4);
        drop(log);
        let path = dir.path().join(segment_name(0));
        let whole = encoded(0..4);
        // Half of a fifth record written over the preallocated zeros, as a crash
        // mid-write leaves it.
        let half = &encoded(4..5)[..encoded(4..5).len() / 2];
        write_at(&path, whole.len(), half);
        let mut log = LogFiles::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&log), (0..4).collect::<Vec<_>>());
        assert_eq!(fs::read(&path).unwrap(), whole);
        append(&mut log, 4..6);
        drop(log);
        // A file without zeros (as older versions wrote it) that ends mid-record.
        let mut legacy = encoded(0..6);
        legacy.extend_from_slice(half);
        fs::write(&path, &legacy).unwrap();
        let mut log = LogFiles::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&log), (0..6).collect::<Vec<_>>());
        assert_eq!(fs::read(&path).unwrap(), encoded(0..6));
        append(&mut log, 6..7);
        drop(log);
        // A zeroed tail of any length (a file extended but its blocks never written).
        let mut zeroed = encoded(0..7);
        zeroed.extend_from_slice(&[0; 100]);
        fs::write(&path, &zeroed).unwrap();
        let log = LogFiles::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&log), (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn a_batch_torn_by_a_power_loss_is_cut_back_from_its_first_unwritten_sector() {
        let (dir, log) = log_of(0..2);
        drop(log);
        let path = dir.path().join(segment_name(0));
        let kept = encoded(0..2);
        // A batch of two records, the first spanning several sectors, of which one
        // sector never reached the disk while the second record did.
        let mut batch = Vec::new();
        encode_record(&mut batch, 2, &[7; 3000]);
        encode_record(&mut batch, 3, &payload(3));
        let mut torn = batch.clone();
        let hole = (kept.len() + HEADER).next_multiple_of(SECTOR) - kept.len();
        torn[hole..hole + SECTOR].fill(0);
        write_at(&path, kept.len(), &torn);
        let mut log = LogFiles::open(dir.path(), None).unwrap();
        assert_eq!(indexes(&log), vec![0, 1]);
        assert_eq!(fs::read(&path).unwrap(), kept);
        append(&mut log, 2..3);
        // The same damage with no zeroed sector (a flipped byte) is corruption.
        drop(log);
        let mut flipped = batch;
        flipped[HEADER + 100] ^= 0xff;
        write_at(&path, kept.len(), &flipped);
        let err = LogFiles::open(dir.path(), None).err().unwrap().to_string();
        assert!(err.contains("the record's checksum fails"), "{err}");
    }

    #[test]
    fn a_bad_record_before_the_tail_is_corruption() {
        let (dir, log) = log_of(0..4);
        drop(log);
        let path = dir.path().join(segment_name(0));
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER + 2] ^= 0xff; // inside the first record's payload
        fs::write(&path, &bytes).unwrap();
        let err = LogFiles::open(dir.path(), None).err().unwrap().to_string();
        assert!(
            err.contains("at byte 0: the record's checksum fails"),
            "{err}"
        );
        assert!(err.contains(&segment_name(0)), "{err}");
    }

    #[test]
    fn a_truncated_and_purged_log_reopens_to_the_same_records() {
        let (dir, mut log) = log_of(0..3);
        log.truncate(1).unwrap();
        append(&mut log, 1..3);
        log.purge(2).unwrap();
        append(&mut log, 3..5);
        assert_eq!(indexes(&log), vec![3, 4]);
        drop(log);
        let log = LogFiles::open(dir.path(), Some(2)).unwrap();
        assert_eq!(indexes(&log), vec![3, 4]);
    }
}
