//! The snapshot payload in a file of its own: `<store dir>/snapshot/<seq, 20 digits>.snap`.
//!
//! Why not sled: a payload of ~100 MB (100,000 tasks) stored as a sled value becomes one
//! blob file written in one go and synced by the barrier in one go. On a saturated 2-core
//! machine that held the Raft log's `fdatasync` (and with it the leader's writes and the
//! followers' AppendEntries answers) for 0.4-0.8 s: long enough for spurious elections
//! (docs/benchmarks.md, "Spurious elections under saturation"). Here the payload is
//! written in chunks of [`CHUNK`] bytes, each followed by `fdatasync`, so the device never
//! has more than one chunk of snapshot queued ahead of a log sync.
//!
//! A write goes `<name>.tmp` chunk by chunk, `fsync`, rename to `<name>`, `fsync` of the
//! directory. The caller then names the file in sled (a [`PayloadFile`]: name, length,
//! crc32), makes that durable, and only then removes older files. A crash at any step
//! leaves the previously named snapshot whole; files nobody names (a `.tmp`, a file
//! written but not yet named, an older one not yet removed) are removed at the next
//! open.

use super::{create_dir_durably, sync_dir, StoreError};
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Bytes written between two `fdatasync`s.
pub(crate) const CHUNK: usize = 4 << 20;
const SUFFIX: &str = ".snap";
const TMP: &str = ".tmp";

/// What sled records about the current payload file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PayloadFile {
    /// The file's name inside the snapshot directory.
    pub(crate) name: String,
    /// Its length in bytes.
    pub(crate) len: u64,
    /// crc32 of its contents.
    pub(crate) crc32: u32,
}

/// The snapshot directory.
pub(crate) struct SnapshotFiles {
    dir: PathBuf,
}

impl SnapshotFiles {
    /// Opens (creating if missing) the snapshot directory.
    pub(crate) fn open(dir: &Path) -> Result<SnapshotFiles, StoreError> {
        create_dir_durably(dir)?;
        Ok(SnapshotFiles {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the file `name` lies.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `data` durably as the payload file for snapshot sequence number `seq`.
    pub(crate) fn write(&self, seq: u64, data: &[u8]) -> Result<PayloadFile, StoreError> {
        let name = format!("{seq:020}{SUFFIX}");
        let (path, tmp) = (self.path(&name), self.path(&format!("{name}{TMP}")));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(StoreError::file_io("create", &tmp))?;
        for chunk in data.chunks(CHUNK) {
            file.write_all(chunk)
                .and_then(|()| file.sync_data())
                .map_err(StoreError::file_io("write", &tmp))?;
        }
        file.sync_all().map_err(StoreError::file_io("sync", &tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(StoreError::file_io("rename into place", &tmp))?;
        sync_dir(&self.dir)?;
        Ok(PayloadFile {
            name,
            len: data.len() as u64,
            crc32: crc32fast::hash(data),
        })
    }

    /// Opens a payload file. An open handle still reads the file after a writer
    /// removes it, so readers only need the record and this open to be consistent.
    pub(crate) fn open_payload(&self, file: &PayloadFile) -> Result<fs::File, StoreError> {
        let path = self.path(&file.name);
        match fs::File::open(&path) {
            Ok(handle) => Ok(handle),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::SnapshotCorrupt {
                path,
                problem: "missing, but the store names it".into(),
            }),
            Err(source) => Err(StoreError::file_io("open", &path)(source)),
        }
    }

    /// Reads an opened payload file whole and checks its length and checksum.
    pub(crate) fn read_payload(
        &self,
        file: &PayloadFile,
        mut handle: fs::File,
    ) -> Result<Vec<u8>, StoreError> {
        let path = self.path(&file.name);
        let mut data = Vec::with_capacity(file.len as usize);
        handle
            .read_to_end(&mut data)
            .map_err(StoreError::file_io("read", &path))?;
        let corrupt = |problem: String| StoreError::SnapshotCorrupt {
            path: path.clone(),
            problem,
        };
        if data.len() as u64 != file.len {
            return Err(corrupt(format!(
                "holds {} bytes, {} were written",
                data.len(),
                file.len
            )));
        }
        if crc32fast::hash(&data) != file.crc32 {
            return Err(corrupt(
                "its checksum does not match what was written".into(),
            ));
        }
        Ok(data)
    }

    /// Removes every payload file (and leftover `.tmp`) except `keep`; other names in
    /// the directory are left alone.
    pub(crate) fn remove_all_but(&self, keep: Option<&str>) -> Result<(), StoreError> {
        let entries = fs::read_dir(&self.dir).map_err(StoreError::file_io("list", &self.dir))?;
        let mut removed = false;
        for entry in entries {
            let entry = entry.map_err(StoreError::file_io("list", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = name.ends_with(SUFFIX) || name.ends_with(&format!("{SUFFIX}{TMP}"));
            if !ours || Some(name) == keep {
                continue;
            }
            match fs::remove_file(entry.path()) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::file_io("remove", &entry.path())(source)),
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::file_names as names;
    use super::*;

    impl SnapshotFiles {
        fn read(&self, file: &PayloadFile) -> Result<Vec<u8>, StoreError> {
            let handle = self.open_payload(file)?;
            self.read_payload(file, handle)
        }
    }

    #[test]
    fn a_payload_of_several_chunks_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(&dir.path().join("snapshot")).unwrap();
        let data: Vec<u8> = (0..CHUNK * 2 + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let file = files.write(3, &data).unwrap();
        assert_eq!(file.name, "00000000000000000003.snap");
        assert_eq!(file.len, data.len() as u64);
        assert_eq!(files.read(&file).unwrap(), data);
        assert_eq!(
            names(&dir.path().join("snapshot")),
            std::slice::from_ref(&file.name),
            "no .tmp left"
        );
        let empty = files.write(4, &[]).unwrap();
        assert_eq!(files.read(&empty).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn a_changed_short_or_missing_file_is_corrupt_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        let file = files.write(1, b"the whole state").unwrap();
        let path = files.path(&file.name);

        fs::write(&path, b"the whole stat!").unwrap();
        let e = files.read(&file).unwrap_err();
        assert!(matches!(&e, StoreError::SnapshotCorrupt { path: p, .. } if *p == path));
        assert!(e.to_string().contains("checksum"), "{e}");

        fs::write(&path, b"the whole").unwrap();
        let e = files.read(&file).unwrap_err();
        assert!(
            e.to_string().contains("holds 9 bytes, 15 were written"),
            "{e}"
        );

        fs::remove_file(&path).unwrap();
        let e = files.read(&file).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(e.to_string().contains("rejoin"), "says how to recover: {e}");
    }

    #[test]
    fn removing_keeps_the_named_file_and_foreign_names() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        let old = files.write(1, b"old").unwrap();
        let current = files.write(2, b"current").unwrap();
        fs::write(dir.path().join("00000000000000000003.snap.tmp"), b"torn").unwrap();
        fs::write(dir.path().join("README"), b"an operator's note").unwrap();

        files.remove_all_but(Some(&current.name)).unwrap();
        assert_eq!(names(dir.path()), ["00000000000000000002.snap", "README"]);
        assert!(files.read(&old).is_err());
        assert_eq!(files.read(&current).unwrap(), b"current");

        files.remove_all_but(None).unwrap();
        assert_eq!(names(dir.path()), ["README"]);
    }
}
