//! Packs written piece by piece into a repository on a local filesystem.
//!
//! A filesystem store needs no pack in memory: the packer appends each sealed blob to a staging
//! file as the blob comes and publishes the file under the pack's key once the pack is full.
//! A pack then costs the memory of one blob instead of the whole pack, for the open pack and for
//! each pack being stored.
//!
//! Guarantees:
//! * The same bytes and the same name as a pack assembled in memory: the name is the BLAKE3 of
//!   the bytes, hashed as they are written.
//! * Durable before published: [`SpooledPack::publish`] fsyncs the file, creates the key's
//!   directory if needed (and fsyncs its parent), links the file under the key and fsyncs the
//!   key's directory before it returns. Create-only: an object already under the key (the same
//!   bytes, since the key is their hash) stays, and publishing reports
//!   [`Error::AlreadyExists`].
//! * Invisible until published: staging files are named `packs/spool#<digits>`, a name that
//!   listings skip like the staging files of other interrupted writes.
//! * A staging file that is not published (an error, a dropped writer) is removed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::store::Store;

/// The directory, as a key, that holds packs and their staging files.
const PACKS: &str = "packs";

/// Where a store's spooled packs are staged, when it keeps objects as local files.
#[derive(Debug, Clone)]
pub struct SpoolDir {
    dir: PathBuf,
}

impl SpoolDir {
    /// The spool of `store`, or `None` when its objects are not local files it lets a writer
    /// publish (see [`Store::local_file`]).
    pub fn for_store(store: &dyn Store) -> Option<SpoolDir> {
        store.local_file(PACKS).map(|dir| SpoolDir { dir })
    }

    /// Opens a new, empty staging file.
    pub fn create(&self) -> Result<SpooledPack> {
        let mut created_dir = false;
        // Bounded: a name is taken only by a concurrent writer, and each try draws a new one.
        for _ in 0..16 {
            let path = self.dir.join(format!("spool#{}", u64::from_le_bytes(random_bytes()) >> 1));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok(SpooledPack { file, path, hasher: blake3::Hasher::new(), len: 0 }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !created_dir => {
                    create_dir_durably(&self.dir)?;
                    created_dir = true;
                }
                Err(e) => return Err(Error::io(format!("create pack staging file in {}", self.dir.display()), e)),
            }
        }
        Err(Error::Internal(format!("no free staging file name in {}", self.dir.display())))
    }
}

fn random_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    crate::crypto::fill_random(&mut b);
    b
}

/// A pack being written to a staging file.
#[derive(Debug)]
pub struct SpooledPack {
    file: File,
    path: PathBuf,
    hasher: blake3::Hasher,
    len: u64,
}

impl SpooledPack {
    /// Appends bytes of the pack.
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).map_err(|e| Error::io(format!("write {}", self.path.display()), e))?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The name of the bytes written so far (the pack's id once its trailer is written).
    pub fn id(&self) -> Id {
        Id(*self.hasher.finalize().as_bytes())
    }

    /// Makes the file durable and links it at `target` (blocking: run it off the async
    /// runtime). The staging file is gone afterwards, published or not.
    pub fn publish(self, target: &Path) -> Result<()> {
        let at = |what: &str, e| Error::io(format!("{what} {}", target.display()), e);
        self.file.sync_all().map_err(|e| at("fsync pack for", e))?;
        let dir = target
            .parent()
            .ok_or_else(|| Error::Internal(format!("pack path {} has no directory", target.display())))?;
        let linked = match std::fs::hard_link(&self.path, target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_dir_durably(dir)?;
                std::fs::hard_link(&self.path, target)
            }
            r => r,
        };
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(target.display().to_string()));
            }
            Err(e) => return Err(at("publish pack as", e)),
        }
        sync_dir(dir)
        // Drop removes the staging name; the pack stays under `target`.
    }
}

impl Drop for SpooledPack {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates `dir` (and missing parents) and fsyncs the parent of each directory created, so
/// the new entries survive a power loss.
fn create_dir_durably(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    // Bounded by the path's depth.
    while !d.exists() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    for m in missing.iter().rev() {
        match std::fs::create_dir(m) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("create {}", m.display()), e)),
        }
        if let Some(parent) = m.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(format!("fsync {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreOptions, open_store};

    fn local_store(dir: &Path) -> std::sync::Arc<dyn Store> {
        let opts = StoreOptions { create_dir: true, ..Default::default() };
        #[allow(clippy::unwrap_used)]
        open_store(dir.to_str().unwrap(), &opts).unwrap()
    }

    #[tokio::test]
    async fn a_published_pack_is_the_object_its_hash_names_and_nothing_else_is_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = local_store(tmp.path());
        let spool = SpoolDir::for_store(&*store).expect("a filesystem store spools");
        let mut pack = spool.create().unwrap();
        pack.append(b"first blob ").unwrap();
        pack.append(b"second blob").unwrap();
        assert_eq!(pack.len(), 22);
        let id = pack.id();
        assert_eq!(id, Id::of_parts(&[b"first blob ".as_slice(), b"second blob"]));
        // A staging file is not an object.
        assert!(store.list("packs").await.unwrap().is_empty());
        let key = crate::repo::pack_key(&id);
        pack.publish(&store.local_file(&key).unwrap()).unwrap();
        assert_eq!(&store.get(&key).await.unwrap()[..], b"first blob second blob");
        let listed: Vec<String> = store.list("packs").await.unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(listed, vec![key]);
        let left: Vec<_> =
            std::fs::read_dir(tmp.path().join("packs")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "only the pack's directory is left, no staging file: {left:?}");
    }

    #[tokio::test]
    async fn publishing_onto_an_existing_object_keeps_it_and_removes_the_staging_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = local_store(tmp.path());
        let spool = SpoolDir::for_store(&*store).unwrap();
        store.put("packs/ab/existing", bytes::Bytes::from_static(b"stored before")).await.unwrap();
        let mut pack = spool.create().unwrap();
        pack.append(b"other bytes").unwrap();
        let err = pack.publish(&store.local_file("packs/ab/existing").unwrap()).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        assert_eq!(&store.get("packs/ab/existing").await.unwrap()[..], b"stored before");
        let names: Vec<_> =
            std::fs::read_dir(tmp.path().join("packs")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ab")]);
    }

    #[test]
    fn a_dropped_pack_leaves_no_staging_file() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = SpoolDir { dir: tmp.path().join("packs") };
        let mut pack = spool.create().unwrap();
        pack.append(&[7u8; 4096]).unwrap();
        assert_eq!(std::fs::read_dir(tmp.path().join("packs")).unwrap().count(), 1);
        drop(pack);
        assert_eq!(std::fs::read_dir(tmp.path().join("packs")).unwrap().count(), 0);
    }

    #[test]
    fn a_write_the_filesystem_refuses_is_an_io_error() {
        // /dev/full takes the open and refuses every write with ENOSPC: a full disk.
        let file = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let mut pack =
            SpooledPack { file, path: PathBuf::from("/nonexistent/spool#1"), hasher: blake3::Hasher::new(), len: 0 };
        let err = pack.append(b"data").unwrap_err();
        match err {
            Error::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(28), "ENOSPC"),
            other => panic!("expected an I/O error, got {other}"),
        }
    }

    #[tokio::test]
    async fn decorators_that_must_see_writes_do_not_spool() {
        let tmp = tempfile::tempdir().unwrap();
        let faulty = crate::faults::FaultyStore::new(local_store(tmp.path()), crate::faults::FaultConfig::new(1, 0.0));
        assert!(SpoolDir::for_store(&faulty).is_none());
        let retry = crate::store::RetryStore::new(local_store(tmp.path()), crate::store::RetryPolicy::default());
        assert!(SpoolDir::for_store(&retry).is_some());
    }
}
