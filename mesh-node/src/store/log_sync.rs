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
//! A follower's append is synced on the caller's thread instead ([`LogSync::append_here`]):
//! the follower answers the leader only once its append is durable, so it has nothing
//! to do meanwhile, and handing the sync to the thread and being woken by it again put
//! two thread wake-ups on every commit's path (on a machine whose cores are busy, each
//! can wait for a core). Syncing here keeps the order: it is only done when no append
//! is queued for the thread, and otherwise the append is queued behind them. It holds
//! a runtime thread for the sync, so on a slow disk the follower's other work waits.
//!
//! After a failed sync nothing written before it may be trusted (the kernel may have
//! dropped the dirty pages and a later sync can succeed without them), so every append
//! after it fails too, on either path.

use super::error::StoreError;
use super::log_file::Unsynced;
use mesh_core::raft_types::TypeConfig;
use openraft::storage::LogFlushed;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A sync slower than this is logged (at debug): a follower's answer waits for it, and
/// the leader gives an AppendEntries 50 ms.
const SLOW_SYNC: Duration = Duration::from_millis(25);

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
    shared: Arc<Shared>,
}

impl<F> Clone for LogSync<F> {
    fn clone(&self) -> Self {
        LogSync {
            jobs: self.jobs.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// What the thread and the appends that sync on their caller's thread both see.
#[derive(Default)]
struct Shared {
    /// Appends handed to the thread and not yet reported.
    queued: AtomicUsize,
    /// The first failed sync, if any: every append after it fails with it.
    failed: Mutex<Option<String>>,
}

impl Shared {
    fn failed(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Syncs `files` unless an earlier sync failed; a failure is kept for every later one.
    fn sync(&self, files: Unsynced, appends: usize) -> Result<(), String> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        let started = Instant::now();
        let result = files.sync();
        let took = started.elapsed();
        metrics::histogram!("mesh_raft_log_sync_seconds").record(took.as_secs_f64());
        if took > SLOW_SYNC {
            tracing::debug!(
                appends,
                took_ms = took.as_millis() as u64,
                "the Raft log's sync was slow"
            );
        }
        metrics::histogram!("mesh_raft_log_appends_per_sync").record(appends as f64);
        result.map_err(|e| {
            let e = e.to_string();
            let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
            failed.get_or_insert(e).clone()
        })
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
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || run(&queue, &thread_shared))
            .map_err(|e| StoreError::LogSync(format!("cannot start the sync thread: {e}")))?;
        Ok(LogSync { jobs, shared })
    }

    /// Queues an append's records for the thread; `callback` is completed once they are
    /// durable.
    pub(crate) fn append(&self, unsynced: Unsynced, callback: F) {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        let sent = self.jobs.send(Job::Append { unsynced, callback });
        // Unreachable while a handle exists (the thread only ends when all are gone), but
        // an append must never be left unanswered.
        if let Err(mpsc::SendError(Job::Append { callback, .. })) = sent {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            callback.completed(Err(std::io::Error::other(STOPPED)));
        }
    }

    /// Syncs an append's records on the caller's thread and completes `callback` before
    /// it returns, unless appends are still queued for the thread: then it is queued
    /// behind them ([`LogSync::append`]), so that appends are reported in order.
    pub(crate) fn append_here(&self, unsynced: Unsynced, callback: F) {
        // Appends come one at a time (openraft's `&mut` log store), and the thread only
        // lowers the count, after it reported: nothing can be queued after this check.
        if self.shared.queued.load(Ordering::Acquire) > 0 {
            return self.append(unsynced, callback);
        }
        let result = self.shared.sync(unsynced, 1);
        callback.completed(result.map_err(std::io::Error::other));
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

fn run<F: Flushed>(queue: &mpsc::Receiver<Job<F>>, shared: &Shared) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter());
        let result = sync(&batch, shared);
        for job in batch {
            match job {
                Job::Append { callback, .. } => {
                    callback.completed(result.clone().map_err(std::io::Error::other));
                    shared.queued.fetch_sub(1, Ordering::AcqRel);
                }
                Job::Drain(tx) => {
                    let _ = tx.send(result.clone());
                }
            }
        }
    }
}

/// Syncs every file the batch's appends wrote, each once.
fn sync<F>(batch: &[Job<F>], shared: &Shared) -> Result<(), String> {
    let mut files = Unsynced::default();
    let mut appends = 0;
    for job in batch {
        if let Job::Append { unsynced, .. } = job {
            files.merge(unsynced);
            appends += 1;
        }
    }
    if appends == 0 {
        return shared.failed().map_or(Ok(()), Err);
    }
    shared.sync(files, appends)
}

#[cfg(test)]
mod tests {
    use super::super::log_file::LogFiles;
    use super::*;
    use std::fs::File;

    type Report = (u64, Result<(), String>);

    /// Reports its append's number and outcome on a channel.
    struct Probe {
        n: u64,
        seen: mpsc::Sender<Report>,
    }

    impl Flushed for Probe {
        fn completed(self, result: Result<(), std::io::Error>) {
            let _ = self.seen.send((self.n, result.map_err(|e| e.to_string())));
        }
    }

    /// Log files in a temporary directory, a sync thread, and the reports of its appends.
    struct Rig {
        dir: tempfile::TempDir,
        files: LogFiles,
        sync: LogSync<Probe>,
        seen: mpsc::Sender<Report>,
        reports: mpsc::Receiver<Report>,
    }

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let files = LogFiles::open(dir.path(), None).unwrap();
            let (seen, reports) = mpsc::channel();
            Rig {
                dir,
                files,
                sync: LogSync::start().unwrap(),
                seen,
                reports,
            }
        }

        /// Writes record `n` (its payload `bytes`), to be synced.
        fn write(&mut self, n: u64, bytes: &[u8]) -> Unsynced {
            self.files.append([(n, bytes.to_vec())]).unwrap()
        }

        fn probe(&self, n: u64) -> Probe {
            Probe {
                n,
                seen: self.seen.clone(),
            }
        }

        /// The reports received so far.
        fn reports(&self) -> Vec<Report> {
            self.reports.try_iter().collect()
        }

        /// Drains, which must fail with [`failing_file`]'s error; the reports by then.
        async fn drain_failing(&self) -> Vec<Report> {
            let err = self.sync.drain().await.unwrap_err().to_string();
            assert!(
                err.contains("cannot sync the Raft log file a pipe"),
                "{err}"
            );
            self.reports()
        }
    }

    /// `fdatasync` on a pipe fails (EINVAL): a stand-in for a disk that reports an error.
    fn failing_file() -> Unsynced {
        let (_reader, writer) = std::io::pipe().unwrap();
        Unsynced::of(
            "a pipe".into(),
            File::from(std::os::fd::OwnedFd::from(writer)),
        )
    }

    /// Every report is the failing file's error.
    fn assert_failed_by_the_pipe(reports: &[Report]) {
        for (n, result) in reports {
            let e = result.as_ref().unwrap_err();
            assert!(
                e.contains("cannot sync the Raft log file a pipe"),
                "append {n}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn appends_are_reported_in_order_and_a_drain_waits_for_them() {
        let mut rig = Rig::new();
        for n in 1..=200 {
            let unsynced = rig.write(n, &[n as u8; 1000]);
            rig.sync.append(unsynced, rig.probe(n));
        }
        rig.sync.drain().await.unwrap();
        // Everything queued before the drain was reported by the time it returned.
        let want: Vec<_> = (1..=200).map(|n| (n, Ok(()))).collect();
        assert_eq!(rig.reports(), want);
        let Rig { dir, files, .. } = rig;
        drop(files);
        let reopened = LogFiles::open(dir.path(), None).unwrap();
        assert_eq!(reopened.read(1, 201).unwrap().len(), 200);
    }

    #[tokio::test]
    async fn a_failed_sync_fails_its_append_and_every_later_one() {
        let mut rig = Rig::new();
        let one = rig.write(1, b"one");
        rig.sync.append(one, rig.probe(1));
        rig.sync.drain().await.unwrap();
        rig.sync.append(failing_file(), rig.probe(2));
        // A later append to a healthy file is not reported durable either: the failed
        // sync may have dropped pages that this one's sync would not write again.
        let two = rig.write(2, b"two");
        rig.sync.append(two, rig.probe(3));
        let got = rig.drain_failing().await;
        assert_eq!(got[0], (1, Ok(())));
        assert_eq!(got.len(), 3, "{got:?}");
        assert_failed_by_the_pipe(&got[1..]);
    }

    #[tokio::test]
    async fn an_append_synced_here_is_reported_before_it_returns_and_after_queued_ones() {
        let mut rig = Rig::new();
        // Nothing queued: synced and reported on this thread, before the call returns.
        let one = rig.write(1, b"one");
        rig.sync.append_here(one, rig.probe(1));
        assert_eq!(rig.reports(), [(1, Ok(()))]);
        // Appends queued for the thread go first; one asked to sync here waits its turn.
        for n in 2..=50 {
            let unsynced = rig.write(n, &[n as u8; 1000]);
            rig.sync.append(unsynced, rig.probe(n));
        }
        let last = rig.write(51, b"last");
        rig.sync.append_here(last, rig.probe(51));
        rig.sync.drain().await.unwrap();
        let want: Vec<_> = (2..=51).map(|n| (n, Ok(()))).collect();
        assert_eq!(rig.reports(), want);
        assert_eq!(rig.sync.shared.queued.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_sync_failed_here_fails_every_later_append_on_either_path() {
        let mut rig = Rig::new();
        rig.sync.append_here(failing_file(), rig.probe(1));
        let one = rig.write(1, b"one");
        rig.sync.append_here(one, rig.probe(2));
        let two = rig.write(2, b"two");
        rig.sync.append(two, rig.probe(3));
        let got = rig.drain_failing().await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_failed_by_the_pipe(&got);
    }
}
