//! The Raft log's sync thread: an append writes its records and hands what it wrote
//! here; the thread makes it durable and reports each append, in order, to the
//! `LogFlushed` callback openraft gave with it.
//!
//! Why a thread of its own rather than one blocking task per append: the leader does not
//! wait for its own append any more (vendor/openraft, `Notify::LocalLogFlushed`), so
//! appends can queue up behind a sync. The thread takes everything queued, syncs each
//! file once (an `fdatasync` covers every write made before it) and then completes the
//! callbacks in the order of the appends: the leader counts its own log as durable up
//! to the last completed append, so an append must never be reported before an earlier
//! one.
//!
//! After a failed sync nothing written before it may be trusted (the kernel may have
//! dropped the dirty pages and a later sync can succeed without them), so the thread
//! fails that batch and everything after it.

use super::error::StoreError;
use super::log_file::Unsynced;
use mesh_core::raft_types::TypeConfig;
use openraft::storage::LogFlushed;
use std::sync::mpsc;
use std::time::Instant;

/// What an append or a drain is told when the thread is gone.
const STOPPED: &str = "the Raft log's sync thread has stopped";

/// Who waits for an append: openraft's `LogFlushed` (tests use a channel).
pub(crate) trait Flushed: Send + 'static {
    /// Reports the append durable, or why it is not.
    fn completed(self, result: Result<(), std::io::Error>);
}

impl Flushed for LogFlushed<TypeConfig> {
    fn completed(self, result: Result<(), std::io::Error>) {
        self.log_io_completed(result);
    }
}

/// A handle to the sync thread, cheap to clone; the thread ends when the last handle goes.
pub(crate) struct LogSync<F = LogFlushed<TypeConfig>> {
    jobs: mpsc::Sender<Job<F>>,
}

impl<F> Clone for LogSync<F> {
    fn clone(&self) -> Self {
        LogSync {
            jobs: self.jobs.clone(),
        }
    }
}

enum Job<F> {
    /// Records written by one append, and who waits for them.
    Append { unsynced: Unsynced, callback: F },
    /// Answered once every append queued before it is durable.
    Drain(tokio::sync::oneshot::Sender<Result<(), String>>),
}

impl<F: Flushed> LogSync<F> {
    /// Starts the sync thread.
    pub(crate) fn start() -> Result<LogSync<F>, StoreError> {
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || run(&queue))
            .map_err(|e| StoreError::LogSync(format!("cannot start the sync thread: {e}")))?;
        Ok(LogSync { jobs })
    }

    /// Queues an append's records; `callback` is completed once they are durable.
    pub(crate) fn append(&self, unsynced: Unsynced, callback: F) {
        let sent = self.jobs.send(Job::Append { unsynced, callback });
        // Unreachable while a handle exists (the thread only ends when all are gone), but
        // an append must never be left unanswered.
        if let Err(mpsc::SendError(Job::Append { callback, .. })) = sent {
            callback.completed(Err(std::io::Error::other(STOPPED)));
        }
    }

    /// Returns once every append queued before the call is durable (or reports the
    /// failed sync that means it never will be).
    pub(crate) async fn drain(&self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped = || StoreError::LogSync(STOPPED.into());
        self.jobs.send(Job::Drain(tx)).map_err(|_| stopped())?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(StoreError::LogSync)
    }
}

fn run<F: Flushed>(queue: &mpsc::Receiver<Job<F>>) {
    let mut failed: Option<String> = None;
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter());
        if failed.is_none() {
            failed = sync(&batch).err().map(|e| e.to_string());
        }
        for job in batch {
            let result = failed.clone().map_or(Ok(()), Err);
            match job {
                Job::Append { callback, .. } => {
                    callback.completed(result.map_err(std::io::Error::other));
                }
                Job::Drain(tx) => {
                    let _ = tx.send(result);
                }
            }
        }
    }
}

/// Syncs every file the batch's appends wrote, each once.
fn sync<F>(batch: &[Job<F>]) -> Result<(), StoreError> {
    let started = Instant::now();
    let mut files = Unsynced::default();
    let mut appends = 0;
    for job in batch {
        if let Job::Append { unsynced, .. } = job {
            files.merge(unsynced);
            appends += 1;
        }
    }
    if appends == 0 {
        return Ok(());
    }
    let result = files.sync();
    metrics::histogram!("mesh_raft_log_sync_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("mesh_raft_log_appends_per_sync").record(appends as f64);
    result
}

#[cfg(test)]
mod tests {
    use super::super::log_file::LogFiles;
    use super::*;
    use std::fs::File;

    /// Reports its append's number and outcome on a channel.
    struct Probe {
        n: u64,
        seen: mpsc::Sender<(u64, Result<(), String>)>,
    }

    impl Flushed for Probe {
        fn completed(self, result: Result<(), std::io::Error>) {
            let _ = self.seen.send((self.n, result.map_err(|e| e.to_string())));
        }
    }

    #[tokio::test]
    async fn appends_are_reported_in_order_and_a_drain_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = LogFiles::open(dir.path(), None).unwrap();
        let sync = LogSync::<Probe>::start().unwrap();
        let (seen, reports) = mpsc::channel();
        for n in 1..=200 {
            let unsynced = files.append([(n, vec![n as u8; 1000])]).unwrap();
            sync.append(
                unsynced,
                Probe {
                    n,
                    seen: seen.clone(),
                },
            );
        }
        sync.drain().await.unwrap();
        // Everything queued before the drain was reported by the time it returned.
        let got: Vec<_> = reports.try_iter().collect();
        let want: Vec<_> = (1..=200).map(|n| (n, Ok(()))).collect();
        assert_eq!(got, want);
        drop(files);
        assert_eq!(
            LogFiles::open(dir.path(), None)
                .unwrap()
                .read(1, 201)
                .unwrap()
                .len(),
            200
        );
    }

    #[tokio::test]
    async fn a_failed_sync_fails_its_append_and_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = LogFiles::open(dir.path(), None).unwrap();
        let sync = LogSync::<Probe>::start().unwrap();
        let (seen, reports) = mpsc::channel();
        let probe = |n| Probe {
            n,
            seen: seen.clone(),
        };
        sync.append(files.append([(1, b"one".to_vec())]).unwrap(), probe(1));
        sync.drain().await.unwrap();
        // `fdatasync` on a pipe fails (EINVAL): a stand-in for a disk that reports an error.
        let (_reader, writer) = std::io::pipe().unwrap();
        let pipe = File::from(std::os::fd::OwnedFd::from(writer));
        sync.append(Unsynced::of("a pipe".into(), pipe), probe(2));
        // A later append to a healthy file is not reported durable either: the failed
        // sync may have dropped pages that this one's sync would not write again.
        sync.append(files.append([(2, b"two".to_vec())]).unwrap(), probe(3));
        let err = sync.drain().await.unwrap_err().to_string();
        assert!(
            err.contains("cannot sync the Raft log file a pipe"),
            "{err}"
        );
        let got: Vec<_> = reports.try_iter().collect();
        assert_eq!(got[0], (1, Ok(())));
        assert_eq!(got.len(), 3, "{got:?}");
        for (n, result) in &got[1..] {
            let e = result.as_ref().unwrap_err();
            assert!(
                e.contains("cannot sync the Raft log file a pipe"),
                "append {n}: {e}"
            );
        }
    }
}
