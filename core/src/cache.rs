//! A local copy of a remote repository's index files, snapshots and tree blobs.
//!
//! Every command on a remote repository lists and reads all index files, and listing snapshots
//! reads every snapshot: one request per object, each time. An incremental backup also reads
//! the parent snapshot's tree blobs, one ranged request per pack for each directory it walks.
//! [`CacheStore`] keeps those in a local directory so that later commands only list them.
//!
//! Guarantees:
//! * Only immutable data is kept: `index/<id>` and `snapshots/<id>`, whose names are the BLAKE3
//!   of their bytes, and the ranges of packs (`packs/<id>`, never rewritten) that the
//!   repository reads as metadata ([`Store::get_metadata_ranges`]: tree blobs, still sealed).
//!   Bytes that do not hash to their name are never kept (the reader then reports the
//!   repository's object damaged, as without a cache), and a kept copy is used only while it
//!   still hashes to its name (a range: to the checksum kept after it); otherwise it is dropped
//!   and the object fetched again.
//! * Never ahead of the repository: listings always come from it. A kept copy that a listing no
//!   longer names (deleted by a prune elsewhere; for ranges, their pack) is removed then, and
//!   `delete` removes it too. Every backup lists the packs, so ranges of pruned packs go at the
//!   next backup.
//! * Best effort: a cache that cannot be read or written (full disk, permissions) is passed by;
//!   the repository stays the source of truth and the command works as without a cache.
//! * No partial copy under a real name: copies are written to a temporary name and renamed.
//! * Bounded when asked: a [`CacheDir`] with a limit keeps no copy that would take the bytes it
//!   holds past the limit (counted at start, then as copies come and go).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::id::Id;
use crate::store::{ObjectInfo, Store};

/// The directories whose objects are kept.
const CACHED_DIRS: [&str; 2] = ["index", "snapshots"];

/// Where kept pack ranges live: `ranges/<pack id>/<start>-<end>`.
const RANGES_DIR: &str = "ranges";

/// Bytes of the checksum (BLAKE3 of the range) written after each kept range.
const RANGE_SUM: usize = 32;

/// The pack a `packs/<shard>/<id>` key names.
fn pack_of(key: &str) -> Option<Id> {
    let rest = key.strip_prefix("packs/")?;
    let (_, name) = rest.split_once('/')?;
    Id::from_hex(name).ok()
}

fn range_file(pack_dir: &Path, range: &Range<u64>) -> PathBuf {
    pack_dir.join(format!("{}-{}", range.start, range.end))
}

/// A kept range, when its copy is whole and matches its checksum; a bad copy is removed.
fn read_range_copy(cache: &CacheDir, path: &Path, range: &Range<u64>) -> Option<Bytes> {
    let mut data = std::fs::read(path).ok()?;
    let len = usize::try_from(range.end.checked_sub(range.start)?).ok()?;
    if data.len() == len + RANGE_SUM && Id::of_bytes(&data[..len]).0[..] == data[len..] {
        data.truncate(len);
        return Some(Bytes::from(data));
    }
    tracing::debug!("cached range {} does not match its checksum; fetching it again", path.display());
    cache.remove(path);
    None
}

/// A kept object, when its copy still hashes to its name; a bad copy is removed.
fn read_named_copy(cache: &CacheDir, path: &Path, id: &Id) -> Option<Bytes> {
    let bytes = std::fs::read(path).ok()?;
    if Id::of_bytes(&bytes) == *id {
        return Some(Bytes::from(bytes));
    }
    tracing::debug!("cached copy {} does not match its name; fetching it again", path.display());
    cache.remove(path);
    None
}

/// Writes a copy made of `parts` at `path`, if the cache has room: under a temporary name
/// first, then linked create-only (a copy another reader kept first is not counted twice).
fn write_copy(cache: &CacheDir, path: &Path, parts: &[&[u8]]) {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return };
    if !cache.reserve(len) {
        tracing::debug!("cache {} is full; not keeping {}", cache.root.display(), path.display());
        return;
    }
    // Unique per write: concurrent readers of one object (an agent's orders) each write their
    // own temporary file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = parent.join(format!(".{}.tmp{}-{n}", name.to_string_lossy(), std::process::id()));
    let written = (|| -> std::io::Result<()> {
        // Owner only, like the password file: the objects are sealed, but their number and
        // sizes are nobody else's business.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        for p in parts {
            file.write_all(p)?;
        }
        drop(file);
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    if let Err(e) = written {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            tracing::debug!("cannot keep {} in the cache: {e}", path.display());
        }
        cache.release(len);
    }
}

/// A cache directory shared by the stores that use it (an agent's orders), and the bytes it
/// holds.
#[derive(Debug)]
pub struct CacheDir {
    root: PathBuf,
    limit: Option<u64>,
    used: AtomicU64,
}

impl CacheDir {
    /// The cache at `root`, holding at most `limit` bytes of copies (none: no bound). Counts
    /// what `root` already holds.
    pub fn new(root: PathBuf, limit: Option<u64>) -> Arc<CacheDir> {
        let used = limit.map(|_| bytes_under(&root, 3)).unwrap_or(0);
        Arc::new(CacheDir { root, limit, used: AtomicU64::new(used) })
    }

    /// Bytes of copies held, as counted.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserves `len` bytes for a new copy; false when that would pass the limit.
    fn reserve(&self, len: u64) -> bool {
        let Some(limit) = self.limit else { return true };
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| u.checked_add(len).filter(|&n| n <= limit))
            .is_ok()
    }

    fn release(&self, len: u64) {
        if self.limit.is_some() {
            let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(len)));
        }
    }

    /// Removes a copy, or a directory of copies (one level: a pack's ranges), and gives their
    /// bytes back.
    fn remove(&self, path: &Path) {
        let Ok(m) = std::fs::symlink_metadata(path) else { return };
        if m.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                for e in entries.flatten() {
                    self.remove(&e.path());
                }
            }
            let _ = std::fs::remove_dir(path);
        } else if std::fs::remove_file(path).is_ok() {
            self.release(m.len());
        }
    }

    /// Removes the entries of `dir` that `keep` (given an entry's name) refuses.
    fn evict(&self, dir: &Path, keep: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        // Bounded by the directory's size: one pass.
        for e in entries.flatten() {
            if !keep(&e.file_name().to_string_lossy()) {
                self.remove(&e.path());
            }
        }
    }
}

/// Bytes of the files below `dir`, `depth` levels down at most.
fn bytes_under(dir: &Path, depth: usize) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() && depth > 0 => bytes_under(&e.path(), depth - 1),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

/// A [`Store`] decorator keeping index files and snapshots in a local directory.
#[derive(Debug)]
pub struct CacheStore<S> {
    inner: S,
    cache: Arc<CacheDir>,
    dir: PathBuf,
}

impl<S: Store> CacheStore<S> {
    /// Caches `inner`'s objects in `cache`, in a directory of their own named after the
    /// store's location (so that several repositories can share one cache).
    pub fn new(inner: S, cache: Arc<CacheDir>) -> CacheStore<S> {
        let dir = cache.root.join(&Id::of_bytes(inner.location().as_bytes()).to_hex()[..32]);
        CacheStore { inner, cache, dir }
    }

    /// Where this repository's copies live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The copy's path and the id the object's bytes must hash to, for a key that is kept.
    fn slot(&self, key: &str) -> Option<(PathBuf, Id)> {
        let (dir, name) = key.split_once('/')?;
        if !CACHED_DIRS.contains(&dir) {
            return None;
        }
        let id = Id::from_hex(name).ok()?;
        Some((self.dir.join(dir).join(name), id))
    }

    async fn read_copy(&self, path: &Path, id: &Id) -> Option<Bytes> {
        let (cache, path, id) = (Arc::clone(&self.cache), path.to_path_buf(), *id);
        tokio::task::spawn_blocking(move || read_named_copy(&cache, &path, &id)).await.ok().flatten()
    }

    /// Runs `f` on the cache directory off the async runtime, and waits for it.
    async fn blocking(&self, f: impl FnOnce(&CacheDir) + Send + 'static) {
        let cache = Arc::clone(&self.cache);
        let _ = tokio::task::spawn_blocking(move || f(&cache)).await;
    }

    async fn keep(&self, path: &Path, id: &Id, bytes: &Bytes) {
        if Id::of_bytes(bytes) != *id {
            return;
        }
        let (path, bytes) = (path.to_path_buf(), bytes.clone());
        self.blocking(move |cache| write_copy(cache, &path, &[&bytes])).await;
    }

    fn ranges_of(&self, pack: &Id) -> PathBuf {
        self.dir.join(RANGES_DIR).join(pack.to_hex())
    }

    /// Removes the kept ranges of the packs under `prefix` that `listed` lacks.
    async fn evict_unlisted_ranges(&self, prefix: &str, listed: &[ObjectInfo]) {
        let packs: std::collections::HashSet<Id> = listed.iter().filter_map(|o| pack_of(&o.key)).collect();
        let (dir, prefix) = (self.dir.join(RANGES_DIR), prefix.to_string());
        self.blocking(move |cache| {
            cache.evict(&dir, |name| {
                Id::from_hex(name)
                    .is_ok_and(|id| !crate::repo::pack_key(&id).starts_with(&prefix) || packs.contains(&id))
            })
        })
        .await;
    }

    /// Removes the copies under `dir` that `listed` (the repository's listing of it) lacks, and
    /// temporary files left behind.
    async fn evict_unlisted(&self, dir: &str, listed: &[ObjectInfo]) {
        let names: std::collections::HashSet<String> =
            listed.iter().filter_map(|o| Some(o.key.strip_prefix(dir)?.strip_prefix('/')?.to_string())).collect();
        let dir = self.dir.join(dir);
        self.blocking(move |cache| cache.evict(&dir, |name| !name.starts_with('.') && names.contains(name))).await;
    }
}

#[async_trait]
impl<S: Store> Store for CacheStore<S> {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let slot = self.slot(key);
        let kept = slot.as_ref().map(|_| data.clone());
        self.inner.put(key, data).await?;
        if let (Some((path, id)), Some(bytes)) = (slot, kept) {
            self.keep(&path, &id, &bytes).await;
        }
        Ok(())
    }

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        self.inner.put_parts(key, parts).await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let Some((path, id)) = self.slot(key) else { return self.inner.get(key).await };
        if let Some(bytes) = self.read_copy(&path, &id).await {
            return Ok(bytes);
        }
        let bytes = self.inner.get(key).await?;
        self.keep(&path, &id, &bytes).await;
        Ok(bytes)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.inner.get_range(key, range).await
    }

    async fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(key, ranges).await
    }

    async fn get_ranges_once(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges_once(key, ranges).await
    }

    async fn get_metadata_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let Some(pack) = pack_of(key) else { return self.inner.get_metadata_ranges(key, ranges).await };
        let dir = self.ranges_of(&pack);
        // One blocking task for the whole batch: a directory's subtrees are many small files.
        let (cache, d, wanted) = (Arc::clone(&self.cache), dir.clone(), ranges.to_vec());
        let mut found: Vec<Option<Bytes>> = tokio::task::spawn_blocking(move || {
            wanted.iter().map(|r| read_range_copy(&cache, &range_file(&d, r), r)).collect()
        })
        .await
        .unwrap_or_else(|_| vec![None; ranges.len()]);
        let missing: Vec<usize> = (0..ranges.len()).filter(|&i| found[i].is_none()).collect();
        if !missing.is_empty() {
            let want: Vec<Range<u64>> = missing.iter().map(|&i| ranges[i].clone()).collect();
            let fetched = self.inner.get_metadata_ranges(key, &want).await?;
            // Only whole ranges are kept; a short answer goes to the reader as it is.
            let keep: Vec<(PathBuf, Bytes)> = want
                .iter()
                .zip(&fetched)
                .filter(|(r, b)| b.len() as u64 == r.end - r.start)
                .map(|(r, b)| (range_file(&dir, r), b.clone()))
                .collect();
            self.blocking(move |cache| {
                for (path, bytes) in keep {
                    write_copy(cache, &path, &[&bytes, &Id::of_bytes(&bytes).0]);
                }
            })
            .await;
            for (i, bytes) in missing.into_iter().zip(fetched) {
                found[i] = Some(bytes);
            }
        }
        found
            .into_iter()
            .collect::<Option<Vec<Bytes>>>()
            .ok_or_else(|| crate::error::Error::Internal(format!("{key}: fewer ranges returned than asked")))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let listed = self.inner.list(prefix).await?;
        let dir = prefix.trim_end_matches('/');
        if CACHED_DIRS.contains(&dir) {
            self.evict_unlisted(dir, &listed).await;
        } else if prefix.starts_with("packs") {
            self.evict_unlisted_ranges(prefix, &listed).await;
        }
        Ok(listed)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await?;
        let copy = self.slot(key).map(|(path, _)| path).or_else(|| pack_of(key).map(|pack| self.ranges_of(&pack)));
        if let Some(path) = copy {
            self.blocking(move |cache| cache.remove(&path)).await;
        }
        Ok(())
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn local_file(&self, key: &str) -> Option<PathBuf> {
        self.inner.local_file(key)
    }

    async fn admit_local_write(&self, key: &str, len: u64) -> Result<()> {
        self.inner.admit_local_write(key, len).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::store::{StoreOptions, open_store};

    /// Counts the reads that reach the repository.
    #[derive(Debug)]
    struct Counting {
        inner: Arc<dyn Store>,
        gets: AtomicUsize,
        /// Ranges read.
        ranged: AtomicUsize,
    }

    #[async_trait]
    impl Store for Counting {
        async fn put(&self, key: &str, data: Bytes) -> Result<()> {
            self.inner.put(key, data).await
        }
        async fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
            self.inner.put_parts(key, parts).await
        }
        async fn get(&self, key: &str) -> Result<Bytes> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.inner.get(key).await
        }
        async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
            self.inner.get_range(key, range).await
        }
        async fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
            self.ranged.fetch_add(ranges.len(), Ordering::SeqCst);
            self.inner.get_ranges(key, ranges).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<()> {
            self.inner.delete(key).await
        }
        fn location(&self) -> String {
            self.inner.location()
        }
    }

    fn setup(root: &Path) -> (Arc<Counting>, CacheStore<Arc<dyn Store>>) {
        let remote = Arc::new(Counting {
            inner: open_store("memory:", &StoreOptions::default()).unwrap(),
            gets: AtomicUsize::new(0),
            ranged: AtomicUsize::new(0),
        });
        let cache = CacheStore::new(Arc::clone(&remote) as Arc<dyn Store>, CacheDir::new(root.to_path_buf(), None));
        (remote, cache)
    }

    fn named(dir: &str, content: &[u8]) -> (String, Bytes) {
        (format!("{dir}/{}", Id::of_bytes(content).to_hex()), Bytes::copy_from_slice(content))
    }

    #[tokio::test]
    async fn kept_objects_are_read_from_the_copy_and_others_from_the_repository() {
        let tmp = tempfile::tempdir().unwrap();
        let (remote, cache) = setup(tmp.path());
        let (snap, snap_bytes) = named("snapshots", b"a snapshot");
        cache.put(&snap, snap_bytes.clone()).await.unwrap();
        let (index, index_bytes) = named("index", b"an index file");
        remote.inner.put(&index, index_bytes.clone()).await.unwrap();
        let (pack, pack_bytes) = named("packs/ab", b"a pack");
        cache.put(&pack, pack_bytes.clone()).await.unwrap();

        // Put through the cache: read from the copy at once.
        assert_eq!(cache.get(&snap).await.unwrap(), snap_bytes);
        assert_eq!(remote.gets.load(Ordering::SeqCst), 0);
        // Written elsewhere: fetched once, then from the copy.
        for _ in 0..3 {
            assert_eq!(cache.get(&index).await.unwrap(), index_bytes);
        }
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);
        // Packs (and config, keys, locks) are not kept.
        for _ in 0..2 {
            assert_eq!(cache.get(&pack).await.unwrap(), pack_bytes);
        }
        assert_eq!(remote.gets.load(Ordering::SeqCst), 3);
        assert!(!cache.dir().join("packs").exists());
    }

    #[tokio::test]
    async fn a_bounded_cache_keeps_nothing_past_its_limit_and_counts_what_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let remote: Arc<dyn Store> = open_store("memory:", &StoreOptions::default()).unwrap();
        let dir = CacheDir::new(tmp.path().to_path_buf(), Some(250));
        let cache = CacheStore::new(Arc::clone(&remote), Arc::clone(&dir));
        let objects: Vec<_> = (0..3u8).map(|i| named("index", &[i; 100])).collect();
        for (key, bytes) in &objects {
            cache.put(key, bytes.clone()).await.unwrap();
        }
        // Two fit in 250 bytes; the third is not kept but still stored and readable.
        assert_eq!(dir.used(), 200);
        let kept: Vec<_> = objects.iter().filter(|(k, _)| cache.dir().join(k).exists()).collect();
        assert_eq!(kept.len(), 2);
        assert_eq!(cache.get(&objects[2].0).await.unwrap(), objects[2].1);
        // A delete gives its bytes back, and the next object is kept.
        cache.delete(&objects[0].0).await.unwrap();
        assert_eq!(dir.used(), 100);
        cache.get(&objects[2].0).await.unwrap();
        assert!(cache.dir().join(&objects[2].0).exists());
        assert_eq!(dir.used(), 200);
        // Kept again (two readers of one object): counted once.
        let (path, id) = cache.slot(&objects[2].0).unwrap();
        cache.keep(&path, &id, &objects[2].1).await;
        assert_eq!(dir.used(), 200);
        // A new CacheDir over the same directory counts what is there.
        assert_eq!(CacheDir::new(tmp.path().to_path_buf(), Some(250)).used(), 200);
    }

    #[tokio::test]
    async fn copies_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (_, cache) = setup(tmp.path());
        let (snap, bytes) = named("snapshots", b"a snapshot");
        cache.put(&snap, bytes).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(cache.dir()), 0o700);
        assert_eq!(mode(&cache.dir().join("snapshots")), 0o700);
        assert_eq!(mode(&cache.dir().join(&snap)), 0o600);
    }

    #[tokio::test]
    async fn a_damaged_copy_is_fetched_again_and_damaged_objects_are_never_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (remote, cache) = setup(tmp.path());
        let (index, bytes) = named("index", b"index content");
        remote.inner.put(&index, bytes.clone()).await.unwrap();
        cache.get(&index).await.unwrap();
        let copy = cache.dir().join(&index);
        std::fs::write(&copy, b"flipped").unwrap();
        assert_eq!(cache.get(&index).await.unwrap(), bytes);
        assert_eq!(remote.gets.load(Ordering::SeqCst), 2);
        assert_eq!(std::fs::read(&copy).unwrap(), bytes, "the copy was not repaired");

        // An object whose bytes do not match its name is returned as it is (the reader reports
        // it) and not kept.
        let wrong = format!("snapshots/{}", Id::of_bytes(b"other").to_hex());
        remote.inner.put(&wrong, Bytes::from_static(b"not that")).await.unwrap();
        assert_eq!(cache.get(&wrong).await.unwrap(), Bytes::from_static(b"not that"));
        assert!(!cache.dir().join(&wrong).exists());
    }

    /// A pack with two tree-like ranges and data between them.
    async fn pack_of_ranges(remote: &Counting) -> (String, Bytes, [Range<u64>; 2]) {
        let content: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let key = crate::repo::pack_key(&Id::of_bytes(&content));
        remote.inner.put(&key, Bytes::from(content.clone())).await.unwrap();
        (key, Bytes::from(content), [100..400, 2000..2100])
    }

    #[tokio::test]
    async fn metadata_ranges_are_kept_checked_and_fetched_again_when_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let (remote, cache) = setup(tmp.path());
        let (key, content, ranges) = pack_of_ranges(&remote).await;
        let expect: Vec<Bytes> = ranges.iter().map(|r| content.slice(r.start as usize..r.end as usize)).collect();
        for _ in 0..3 {
            assert_eq!(cache.get_metadata_ranges(&key, &ranges).await.unwrap(), expect);
        }
        assert_eq!(remote.ranged.load(Ordering::SeqCst), 2, "fetched once each, then from the copies");
        // Ordinary ranged reads (data) are neither kept nor served from copies.
        cache.get_ranges(&key, &ranges).await.unwrap();
        assert_eq!(remote.ranged.load(Ordering::SeqCst), 4);

        // A damaged copy: only that range is fetched again, and its copy is repaired.
        let pack = pack_of(&key).unwrap();
        let copy = range_file(&cache.dir().join(RANGES_DIR).join(pack.to_hex()), &ranges[1]);
        let mut bytes = std::fs::read(&copy).unwrap();
        bytes[7] ^= 1;
        std::fs::write(&copy, &bytes).unwrap();
        assert_eq!(cache.get_metadata_ranges(&key, &ranges).await.unwrap(), expect);
        assert_eq!(remote.ranged.load(Ordering::SeqCst), 5);
        assert_eq!(cache.get_metadata_ranges(&key, &ranges).await.unwrap(), expect);
        assert_eq!(remote.ranged.load(Ordering::SeqCst), 5, "the copy was not repaired");

        // A short answer (a range past the end) is returned as it is and not kept.
        let past: Range<u64> = 4000..4200;
        assert_eq!(cache.get_metadata_ranges(&key, std::slice::from_ref(&past)).await.unwrap()[0].len(), 96);
        assert!(!range_file(&cache.dir().join(RANGES_DIR).join(pack.to_hex()), &past).exists());
    }

    #[tokio::test]
    async fn ranges_of_packs_deleted_elsewhere_go_at_the_next_listing_of_packs() {
        let tmp = tempfile::tempdir().unwrap();
        let (remote, cache) = setup(tmp.path());
        let (gone, _, ranges) = pack_of_ranges(&remote).await;
        let kept = crate::repo::pack_key(&Id::of_bytes(b"another pack"));
        remote.inner.put(&kept, Bytes::from(vec![9u8; 3000])).await.unwrap();
        cache.get_metadata_ranges(&gone, &ranges).await.unwrap();
        cache.get_metadata_ranges(&kept, &ranges).await.unwrap();
        let dir_of = |key: &str| cache.dir().join(RANGES_DIR).join(pack_of(key).unwrap().to_hex());
        assert!(dir_of(&gone).is_dir() && dir_of(&kept).is_dir());

        // Another host's prune deletes `gone`; a listing of one shard leaves other shards alone.
        remote.inner.delete(&gone).await.unwrap();
        let other_shard = ["packs/", if gone.starts_with("packs/00") { "ff" } else { "00" }, "/"].concat();
        cache.list(&other_shard).await.unwrap();
        assert!(dir_of(&gone).is_dir());
        cache.list("packs/").await.unwrap();
        assert!(!dir_of(&gone).exists() && dir_of(&kept).is_dir());
        // A delete through the cache removes the pack's ranges.
        cache.delete(&kept).await.unwrap();
        assert!(!dir_of(&kept).exists());
    }

    #[tokio::test]
    async fn copies_of_objects_deleted_elsewhere_go_at_the_next_listing() {
        let tmp = tempfile::tempdir().unwrap();
        let (remote, cache) = setup(tmp.path());
        let (a, a_bytes) = named("snapshots", b"snapshot a");
        let (b, b_bytes) = named("snapshots", b"snapshot b");
        cache.put(&a, a_bytes).await.unwrap();
        cache.put(&b, b_bytes).await.unwrap();
        std::fs::write(cache.dir().join("snapshots/.leftover.tmp1"), b"x").unwrap();
        // Another host's forget deletes `a`.
        remote.inner.delete(&a).await.unwrap();
        let listed = cache.list("snapshots/").await.unwrap();
        assert_eq!(listed.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), [b.as_str()]);
        let left: Vec<_> = std::fs::read_dir(cache.dir().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [b.strip_prefix("snapshots/").unwrap()]);
        // And a delete through the cache removes the copy.
        cache.delete(&b).await.unwrap();
        assert!(!cache.dir().join(&b).exists());
    }

    #[tokio::test]
    async fn an_unusable_cache_directory_is_passed_by() {
        let tmp = tempfile::tempdir().unwrap();
        // A file where the cache directory should be: nothing can be kept.
        let root = tmp.path().join("not-a-dir");
        std::fs::write(&root, b"").unwrap();
        let (remote, cache) = setup(&root);
        let (index, bytes) = named("index", b"index content");
        cache.put(&index, bytes.clone()).await.unwrap();
        for _ in 0..2 {
            assert_eq!(cache.get(&index).await.unwrap(), bytes);
        }
        assert_eq!(remote.gets.load(Ordering::SeqCst), 2);
        assert_eq!(cache.list("index/").await.unwrap().len(), 1);
    }
}
