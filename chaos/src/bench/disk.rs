//! What the machine's disk allows: durable 1 KiB appends, as each node's Raft log
//! makes them (a `pwrite` over preallocated zeros, then `fdatasync`), from one writer
//! and then from three at once, each with a file of its own, as the three nodes of a
//! mesh (or the three members of etcd) on one machine do.
//!
//! Every commit on three nodes is one sync on each, and a client that waits for each
//! commit cannot share a sync between two of them. Where the disk takes one flush at a
//! time (three writers together make no more syncs per second than one), one client's
//! commits per second are bounded by a third of the three writers' syncs per second,
//! for Mesh and etcd alike: `compare-etcd` prints that bound beside its one-client
//! figures (docs/benchmarks.md, "One flush at a time").

use crate::load::percentile_ms;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// One record: about a one-task entry of the Raft log with its header.
const RECORD: usize = 1100;
/// Zeros written ahead of the records at once, as the log's active segment does.
const PREALLOCATE: u64 = 4 << 20;

/// Syncs of `writers` threads at once over a measured time.
#[derive(Debug, Clone, Serialize)]
pub struct Syncs {
    pub writers: usize,
    /// Appends made durable per second, all writers together.
    pub per_sec: f64,
    /// One append's `pwrite` + `fdatasync`, microseconds.
    pub p50_us: f64,
    pub p90_us: f64,
}

/// The disk under one writer and under three.
#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub one: Syncs,
    pub three: Syncs,
    /// Commits per second one closed-loop client can get from a 3-node cluster on this
    /// disk: a third of three writers' syncs per second.
    pub one_client_bound: f64,
}

impl std::fmt::Display for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "1 writer {:.0} syncs/s (p50 {:.0} µs), 3 writers {:.0} syncs/s in all \
             (p50 {:.0} µs each): one client on 3 nodes gets at most ~{:.0} commits/s",
            self.one.per_sec,
            self.one.p50_us,
            self.three.per_sec,
            self.three.p50_us,
            self.one_client_bound
        )
    }
}

/// Measure in a fresh directory under `parent`, `each` long per writer count.
pub fn measure(parent: &Path, each: Duration) -> Result<Disk> {
    let dir = tempfile::tempdir_in(parent)
        .with_context(|| format!("cannot make a directory in {}", parent.display()))?;
    let one = syncs(dir.path(), 1, each)?;
    let three = syncs(dir.path(), 3, each)?;
    Ok(Disk {
        one_client_bound: three.per_sec / 3.0,
        one,
        three,
    })
}

/// `writers` threads, each appending to a file of its own and syncing every record.
fn syncs(dir: &Path, writers: usize, each: Duration) -> Result<Syncs> {
    let files = (0..writers)
        .map(|i| {
            let path = dir.join(format!("writer-{writers}-{i}.seg"));
            let file = File::options()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            // Blocks the file already has: a record's sync flushes data, not a new size.
            file.write_all_at(&vec![0; PREALLOCATE as usize], 0)?;
            file.sync_all()?;
            Ok(file)
        })
        .collect::<Result<Vec<File>>>()?;
    let started = Instant::now();
    let took: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .iter()
            .map(|file| scope.spawn(move || append_until(file, started + each)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a writer thread panicked"))
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut all: Vec<u64> = took.into_iter().flatten().collect();
    all.sort_unstable();
    Ok(Syncs {
        writers,
        per_sec: all.len() as f64 / elapsed,
        p50_us: percentile_ms(&all, 0.5) * 1000.0,
        p90_us: percentile_ms(&all, 0.9) * 1000.0,
    })
}

/// Durable appends to `file` until `until`; how long each took, in microseconds.
fn append_until(file: &File, until: Instant) -> std::io::Result<Vec<u64>> {
    let record = [b'x'; RECORD];
    let mut took = Vec::new();
    let mut at = 0u64;
    while Instant::now() < until {
        if at + RECORD as u64 > PREALLOCATE {
            at = 0;
        }
        let t = Instant::now();
        file.write_all_at(&record, at)?;
        file.sync_data()?;
        took.push(t.elapsed().as_micros() as u64);
        at += RECORD as u64;
    }
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_are_counted_for_every_writer_and_the_bound_is_a_third_of_three() {
        let dir = tempfile::tempdir().unwrap();
        let disk = measure(dir.path(), Duration::from_millis(200)).unwrap();
        assert_eq!((disk.one.writers, disk.three.writers), (1, 3));
        for s in [&disk.one, &disk.three] {
            assert!(s.per_sec > 0.0, "{s:?}");
            assert!(s.p50_us > 0.0 && s.p50_us <= s.p90_us, "{s:?}");
        }
        assert_eq!(disk.one_client_bound, disk.three.per_sec / 3.0);
        // The files go with the measurement's directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
