//! Proves the store (log files, snapshot file, sled): it passes openraft's storage
//! suite, as a leader's store and as a follower's, keeps log, vote, committed id and
//! snapshot across a reopen (and rebuilds the state from them), reports corrupt
//! records as errors instead of panicking, and tells state viewers about applies.

use mesh_core::command::{Command, Request};
use mesh_core::raft_types::{Entry, LogId, TypeConfig, Vote};
use mesh_core::{Fingerprint, NodeId, Timestamp};
use mesh_node::store::{LogStore, StateMachineStore, Store, StoreError};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine, StorageHelper};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, StorageError, StorageIOError,
};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use tempfile::TempDir;

/// The Raft id the stores below are opened as: the writer of every entry [`log_id`]
/// makes, so their appends are a leader's, synced by the log's sync thread.
const ME: u64 = 1;

/// Each store in its own temporary directory, removed when the suite drops the guard,
/// opened as node `.0`.
struct TempStores(u64);

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for TempStores {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let store = Store::open(dir.path(), self.0).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, store.log, store.state_machine))
    }
}

#[test]
fn passes_the_openraft_storage_suite() {
    Suite::test_all(TempStores(ME)).expect("openraft storage suite");
}

/// Opened as a node that wrote none of the suite's entries, every append is a
/// follower's, synced on the appending thread.
#[test]
fn passes_the_openraft_storage_suite_as_a_follower() {
    Suite::test_all(TempStores(u64::MAX)).expect("openraft storage suite");
}

fn log_id(index: u64) -> LogId {
    openraft::testing::log_id(1, 1, index)
}

fn membership(index: u64) -> Entry {
    let voters = BTreeSet::from([1]);
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], None)),
    }
}

fn register(index: u64, node: u64, addr: &str) -> Entry {
    let command = Command::RegisterNode {
        node: NodeId(node),
        fingerprint: Fingerprint::of_ed25519(&[node as u8; 32]),
        addr: addr.to_string(),
        capabilities: Default::default(),
    };
    let request = Request {
        now: Timestamp(index),
        commands: vec![command].into(),
    };
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(request),
    }
}

/// sled releases its directory lock a moment after the last handle drops (its flusher
/// thread winds down), so a reopen in the same process may need a few tries.
fn retry_lock<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> T {
    let mut tries = 0;
    loop {
        match open() {
            Ok(value) => return value,
            Err(e) if tries < 50 && e.to_string().contains("lock") => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("reopen failed: {e}"),
        }
    }
}

fn reopen(dir: &Path) -> Store {
    retry_lock(|| Store::open(dir, ME))
}

#[tokio::test]
async fn reopen_restores_log_vote_committed_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    // Over sled's ~128 KiB inline limit: were the snapshot in sled, it would go through
    // sled's blob files.
    let big_addr = "x".repeat(300 * 1024);
    let entries = vec![
        membership(0),
        register(1, 1, "a"),
        register(2, 2, &big_addr),
        register(3, 3, "c"),
        register(4, 4, "d"),
    ];
    let vote = Vote::new(3, 1);
    let snapshot_meta = {
        let Store {
            mut log,
            mut state_machine,
        } = Store::open(dir.path(), ME).unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_vote(&vote).await.unwrap();
        state_machine.apply(entries[..3].to_vec()).await.unwrap();
        let snapshot = state_machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        log.save_committed(Some(log_id(4))).await.unwrap();
        snapshot.meta
    };
    let payloads = snapshot_files(dir.path());
    assert_eq!(payloads.len(), 1, "one payload file: {payloads:?}");
    assert!(std::fs::metadata(&payloads[0]).unwrap().len() > big_addr.len() as u64);
    let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
    assert_eq!(blobs, 0, "nothing large goes into sled");

    let Store {
        mut log,
        mut state_machine,
    } = reopen(dir.path());
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(4)));
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
    let current = state_machine
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("the snapshot survives");
    assert_eq!(current.meta, snapshot_meta);

    let (applied, membership) = state_machine.applied_state().await.unwrap();
    assert_eq!(
        applied,
        Some(log_id(2)),
        "applied state comes back from the snapshot"
    );
    assert_eq!(membership.log_id(), &Some(log_id(0)));
    let view = state_machine.view();
    assert_eq!(view.read(|s| s.nodes.len()), 2);
    assert_eq!(*view.changes().borrow(), 2);

    // What openraft does at start-up: re-apply the committed entries after the snapshot.
    StorageHelper::new(&mut log, &mut state_machine)
        .get_initial_state()
        .await
        .unwrap();
    assert_eq!(
        state_machine.applied_state().await.unwrap().0,
        Some(log_id(4))
    );
    assert_eq!(view.read(|s| s.nodes.len()), 4);
    assert_eq!(
        view.read(|s| s.nodes[&NodeId(2)].addr.len()),
        big_addr.len()
    );
}

/// Overwrites one key of one tree of a closed store.
fn poke(dir: &Path, tree: &str, key: &[u8], value: &[u8]) {
    let db = retry_lock(|| sled::open(dir));
    db.open_tree(tree).unwrap().insert(key, value).unwrap();
    db.flush().unwrap();
}

#[tokio::test]
async fn corrupt_log_record_fails_open_naming_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = Store::open(dir.path(), ME).unwrap().log;
        log.blocking_append([membership(1), register(2, 1, "a"), register(3, 2, "b")])
            .await
            .unwrap();
    }
    let segment = dir.path().join("log").join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&segment).unwrap();
    // The second record starts after the first record's 16-byte header and payload.
    let first_len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    let second = 16 + first_len;
    bytes[second + 20] ^= 0x55;
    std::fs::write(&segment, &bytes).unwrap();
    match retry_lock(|| match Store::open(dir.path(), ME) {
        Err(StoreError::Open { path, source }) => Err(StoreError::Open { path, source }),
        other => Ok(other),
    }) {
        Err(e @ StoreError::LogCorrupt { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&segment.display().to_string()), "{text}");
            assert!(text.contains(&format!("at byte {second}")), "{text}");
            assert!(text.contains("--join TOKEN"), "{text}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a corrupt log record must not open"),
    }
}

#[tokio::test]
async fn corrupt_vote_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), ME).unwrap());
    poke(dir.path(), "meta", b"vote", b"\x63");
    let mut log = reopen(dir.path()).log;
    let err = log.read_vote().await.unwrap_err().to_string();
    assert!(err.contains("`meta` at key vote"), "{err}");
}

/// A data directory written before the log had files of its own keeps its entries.
#[tokio::test]
async fn a_log_kept_in_sled_moves_into_the_log_files() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), ME).unwrap());
    let old = [membership(1), register(2, 1, "a"), register(3, 2, "b")];
    for entry in &old {
        poke(
            dir.path(),
            "log",
            &entry.log_id.index.to_be_bytes(),
            &mesh_core::codec::encode(entry).unwrap(),
        );
    }
    let mut log = reopen(dir.path()).log;
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), old.to_vec());
    drop(log);
    let db = retry_lock(|| sled::open(dir.path()));
    assert!(db.open_tree("log").unwrap().is_empty(), "moved, not copied");
    drop(db);
    // And they stay in the files.
    let mut log = reopen(dir.path()).log;
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), old.to_vec());
}

/// The snapshot payload files in a store directory, sorted.
fn snapshot_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("snapshot"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// A store holding a membership entry applied and snapshotted; returns the payload.
async fn snapshotted(dir: &Path) -> Vec<u8> {
    let mut sm = Store::open(dir, ME).unwrap().state_machine;
    sm.apply([membership(1), register(2, 1, "a")])
        .await
        .unwrap();
    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    snapshot.snapshot.into_inner()
}

/// Opens a store that is expected to fail for reasons other than sled's lock.
fn open_err(dir: &Path) -> StoreError {
    match retry_lock(|| match Store::open(dir, ME) {
        Err(StoreError::Open { path, source }) => Err(StoreError::Open { path, source }),
        other => Ok(other),
    }) {
        Err(e) => e,
        Ok(_) => panic!("a store with a damaged snapshot must not open"),
    }
}

#[tokio::test]
async fn a_damaged_or_missing_snapshot_file_fails_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    snapshotted(dir.path()).await;
    let file = snapshot_files(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    match open_err(dir.path()) {
        e @ StoreError::SnapshotCorrupt { .. } => {
            let shown = e.to_string();
            assert!(shown.contains(&file.display().to_string()), "{shown}");
            assert!(shown.contains("checksum"), "{shown}");
        }
        e => panic!("unexpected error: {e}"),
    }
    std::fs::remove_file(&file).unwrap();
    match open_err(dir.path()) {
        e @ StoreError::SnapshotCorrupt { .. } => assert!(e.to_string().contains("missing")),
        e => panic!("unexpected error: {e}"),
    }
}

#[tokio::test]
async fn a_corrupt_file_record_fails_open_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    snapshotted(dir.path()).await;
    poke(dir.path(), "snapshot", b"file", b"\x01\xff\xff");
    match open_err(dir.path()) {
        e @ StoreError::Corrupt {
            tree: "snapshot", ..
        } => assert!(e.to_string().contains("key file"), "{e}"),
        e => panic!("unexpected error: {e}"),
    }
}

#[tokio::test]
async fn only_the_current_snapshot_file_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = Store::open(dir.path(), ME).unwrap().state_machine;
    sm.apply([membership(1)]).await.unwrap();
    for index in 2..5 {
        sm.apply([register(index, index, "a")]).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snapshot_files(dir.path()).len(), 1, "older files removed");
    }
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(4)));
    drop(sm);
    // Leftovers of a crash: a torn .tmp and a file written but never named.
    let snap = dir.path().join("snapshot");
    std::fs::write(snap.join("00000000000000000099.snap.tmp"), b"torn").unwrap();
    std::fs::write(snap.join("00000000000000000098.snap"), b"unnamed").unwrap();
    let mut sm = reopen(dir.path()).state_machine;
    assert_eq!(
        snapshot_files(dir.path()).len(),
        1,
        "open removes what nobody names"
    );
    assert_eq!(sm.view().read(|s| s.nodes.len()), 3);
    let again = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(again.meta, current.meta);
}

#[tokio::test]
async fn a_payload_kept_in_sled_by_older_versions_moves_into_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let payload = snapshotted(dir.path()).await;
    // Rewrite the store into the old layout: the payload under `data`, no file.
    let db = retry_lock(|| sled::open(dir.path()));
    let tree = db.open_tree("snapshot").unwrap();
    tree.insert("data", payload.as_slice()).unwrap();
    tree.remove("file").unwrap();
    db.flush().unwrap();
    drop((tree, db));
    for file in snapshot_files(dir.path()) {
        std::fs::remove_file(file).unwrap();
    }

    let mut sm = reopen(dir.path()).state_machine;
    assert_eq!(sm.view().read(|s| s.nodes.len()), 1, "state loaded");
    let files = snapshot_files(dir.path());
    assert_eq!(files.len(), 1);
    assert_eq!(std::fs::read(&files[0]).unwrap(), payload);
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.snapshot.into_inner(), payload);
    drop(sm);
    let db = retry_lock(|| sled::open(dir.path()));
    let tree = db.open_tree("snapshot").unwrap();
    assert!(tree.get("data").unwrap().is_none(), "moved, not copied");
    assert!(tree.get("file").unwrap().is_some());
}

#[tokio::test]
async fn changes_fire_after_apply_and_install() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<mesh_node::store::StateView>();

    let leader_dir = tempfile::tempdir().unwrap();
    let mut leader = Store::open(leader_dir.path(), ME).unwrap().state_machine;
    let mut changes = leader.view().changes();
    assert_eq!(*changes.borrow_and_update(), 0);
    leader
        .apply([membership(1), register(2, 1, "a")])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*changes.borrow_and_update(), 2);
    assert_eq!(leader.view().read(|s| s.nodes.len()), 1);

    let follower_dir = tempfile::tempdir().unwrap();
    let mut follower = Store::open(follower_dir.path(), ME).unwrap().state_machine;
    let mut follower_changes = follower.view().changes();
    let snapshot = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    follower
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), follower_changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*follower_changes.borrow(), 2);
    assert_eq!(follower.view().read(|s| s.nodes.len()), 1);
}
