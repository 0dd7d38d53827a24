//! The backup pipeline under pressure and races, against the real filesystem store:
//!
//! * the memory budget bounds every byte of file data in flight, from read to upload, even when
//!   uploads are the bottleneck (a store that answers slowly);
//! * a budget smaller than one pack does not deadlock (the packer uploads a partial pack when
//!   readers wait for budget it holds); on a store that spools packs to files, blobs give their
//!   budget back once written and packs fill to their target, and each pack passes the store's
//!   admission (the agent's cancellation and rate limit) before it is published;
//! * a file that changes while it is read, or vanishes between the walk and the open, is a
//!   warning and the rest of the snapshot is intact (made deterministic with [`RaceHooks`]);
//! * include patterns keep what they match and the directories leading to it; excludes win;
//! * a changed file's unchanged chunks are taken where its previous version cut them, and the
//!   snapshot is the same as one cut from scratch;
//! * a backup with a parent (subdirectories walked in parallel) makes the same tree as one
//!   without (walked depth-first on one thread).
//! * progress totals are the parent's (an estimate, no metadata scan) when the parent covers
//!   every source, and counted otherwise.
//! * a directory wider than the walk's batch of parent trees finds every one of them.
//! * tree blobs and data blobs are stored in packs of their own, spooled or held in memory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hoard_core::backup::{BackupOptions, BackupOutcome, ParentSelection, RaceHooks, Source, backup};
use hoard_core::chunker::{ChunkerParams, LargeFileChunking};
use hoard_core::crypto::KdfParams;
use hoard_core::faults::{FaultConfig, FaultyStore};
use hoard_core::repo::{InitOptions, RepoParams};
use hoard_core::restore::{RestoreOptions, RestoreSource, restore};
use hoard_core::store::{ObjectStoreBackend, RetryPolicy, RetryStore, Store};
use hoard_core::writer::WriterConfig;
use hoard_core::{Password, Repository};
use hoard_testkit::random_bytes;

const MIB: usize = 1024 * 1024;
/// The smallest budget a backup uses: one read segment (16 MiB with these chunk sizes).
const SEGMENT: usize = 16 * MIB;

/// A filesystem store whose every call takes `latency` (none: answers at once).
fn store(dir: &Path, latency: Option<(Duration, Duration)>) -> Arc<dyn Store> {
    std::fs::create_dir_all(dir).unwrap();
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap();
    let backend = ObjectStoreBackend::new(Arc::new(fs), "", dir.display().to_string());
    let slow = FaultyStore::new(backend, FaultConfig { latency, ..FaultConfig::new(1, 0.0) });
    Arc::new(RetryStore::new(slow, RetryPolicy::default()))
}

async fn init(store: Arc<dyn Store>, pack_size: u32) -> Arc<Repository> {
    let opts = InitOptions {
        params: RepoParams {
            chunker: ChunkerParams { min: 64 * 1024, avg: 256 * 1024, max: 1024 * 1024 },
            pack_size,
            compression_level: 1,
            large_files: None,
        },
        kdf: KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 },
        allow_weak_kdf: true,
    };
    Arc::new(Repository::init(store, &Password::new("pw"), opts).await.unwrap())
}

fn options(src: &Path, memory_budget: usize, uploads: usize) -> BackupOptions {
    BackupOptions {
        sources: vec![Source::Path { name: "data".into(), path: src.to_path_buf() }],
        host: "pipeline-test".into(),
        parent: ParentSelection::None,
        memory_budget,
        read_concurrency: 3,
        scan_totals: false,
        writer: WriterConfig { workers: 2, upload_concurrency: Some(uploads), ..WriterConfig::default() },
        ..Default::default()
    }
}

/// `count` files of `len` random bytes in `<dir>/src` (seeds from `seed` up); returns the directory.
fn random_files(dir: &Path, count: u64, len: usize, seed: u64) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..count {
        std::fs::write(src.join(format!("f{i}")), random_bytes(len, seed + i)).unwrap();
    }
    src
}

/// Backs up with a deadline, so a deadlocked pipeline fails the test instead of hanging it.
async fn backup_within(repo: &Arc<Repository>, opts: BackupOptions, secs: u64) -> BackupOutcome {
    tokio::time::timeout(Duration::from_secs(secs), backup(Arc::clone(repo), opts))
        .await
        .unwrap_or_else(|_| panic!("backup did not finish within {secs} s (pipeline deadlocked?)"))
        .unwrap()
}

async fn restore_and_compare(repo: &Arc<Repository>, out: &BackupOutcome, src: &Path, target: &Path) {
    let root = out.snapshot.component("data").unwrap().root;
    let r = restore(Arc::clone(repo), RestoreSource::Tree(root), RestoreOptions::new(target)).await.unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        assert!(std::fs::read(e.path()).unwrap() == std::fs::read(target.join(e.file_name())).unwrap(), "{e:?}");
    }
}

/// 80 MiB through a 16 MiB budget while each store call takes 150–250 ms: uploads are the
/// bottleneck, so without the budget covering sealed, packed and uploading blobs the readers
/// would run far ahead (about 16 MiB more were in flight before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_bounds_data_in_flight_until_uploaded() {
    let tmp = tempfile::tempdir().unwrap();
    let src = random_files(tmp.path(), 5, 16 * MIB, 0);
    let slow = Some((Duration::from_millis(150), Duration::from_millis(250)));
    let repo = init(store(&tmp.path().join("repo"), slow), 2 * MIB as u32).await;
    let out = backup_within(&repo, options(&src, SEGMENT, 4), 120).await;
    assert_eq!(out.snapshot.summary.warnings, 0, "{:?}", out.snapshot.warnings);
    assert!(out.snapshot.summary.bytes_new >= 80 * MIB as u64);
    let hw = out.data_in_flight_high_water;
    assert!(hw > 0, "the writer tracked nothing in flight");
    assert!(hw <= SEGMENT as u64, "{hw} bytes were in flight with a budget of {SEGMENT}");
    restore_and_compare(&repo, &out, &src, &tmp.path().join("r")).await;
}

/// Packs of 64 MiB with a 16 MiB budget: no pack can fill before the readers run out of budget,
/// so the packer must upload partial packs when readers wait; the backup completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_smaller_than_a_pack_does_not_deadlock() {
    let tmp = tempfile::tempdir().unwrap();
    let src = random_files(tmp.path(), 3, 20 * MIB, 10);
    let repo = init(store(&tmp.path().join("repo"), None), 64 * MIB as u32).await;
    let out = backup_within(&repo, options(&src, SEGMENT, 2), 60).await;
    assert!(out.data_in_flight_high_water <= SEGMENT as u64);
    // 60 MiB in packs of at most the budget: several packs, none near the 64 MiB target.
    let packs = repo.list_ids("packs").await.unwrap();
    assert!(packs.len() >= 4, "{} packs", packs.len());
    restore_and_compare(&repo, &out, &src, &tmp.path().join("r")).await;
}

/// The same 64 MiB packs and 16 MiB budget, on the plain filesystem store, which spools: each
/// sealed blob is written to the pack's staging file and gives its memory and budget back at
/// once, so readers never wait on the open pack and the packs fill to their target instead of
/// being cut short (above: 4 or more). Every pack's bytes match its name and header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooling_store_fills_packs_larger_than_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let src = random_files(tmp.path(), 3, 20 * MIB, 20);
    let dir = tmp.path().join("repo");
    let opts = hoard_core::store::StoreOptions { create_dir: true, ..Default::default() };
    let fs_store = hoard_core::store::open_store(dir.to_str().unwrap(), &opts).unwrap();
    assert!(hoard_core::spool::SpoolDir::for_store(&*fs_store).is_some());
    let repo = init(fs_store, 64 * MIB as u32).await;
    let out = backup_within(&repo, options(&src, SEGMENT, 2), 60).await;
    assert!(out.data_in_flight_high_water <= SEGMENT as u64);
    let packs = repo.list_ids("packs").await.unwrap();
    // 60 MiB of blobs and the snapshot's tree: one data pack, one tree pack.
    assert!(packs.len() <= 2, "{} packs: partial packs were cut", packs.len());
    let staging: Vec<_> =
        walkdir(&dir.join("packs")).into_iter().filter(|p| p.to_string_lossy().contains('#')).collect();
    assert!(staging.is_empty(), "staging files left: {staging:?}");
    let report = hoard_core::check::check(
        Arc::clone(&repo),
        hoard_core::check::CheckOptions { read_data_fraction: 1.0, concurrency: 2 },
    )
    .await
    .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    restore_and_compare(&repo, &out, &src, &tmp.path().join("r")).await;
}

/// A store that spools (forwards `local_file`) and gates spooled writes the way the agent's
/// cancellation store does: it records each admitted write and refuses those after `admit`.
#[derive(Debug)]
struct GateStore {
    inner: Arc<dyn Store>,
    admit: usize,
    admitted: std::sync::Mutex<Vec<(String, u64)>>,
    refused: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Store for GateStore {
    async fn put(&self, key: &str, data: bytes::Bytes) -> hoard_core::Result<()> {
        self.inner.put(key, data).await
    }
    async fn put_parts(&self, key: &str, parts: Vec<bytes::Bytes>) -> hoard_core::Result<()> {
        self.inner.put_parts(key, parts).await
    }
    async fn get(&self, key: &str) -> hoard_core::Result<bytes::Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> hoard_core::Result<bytes::Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn get_ranges(&self, key: &str, ranges: &[std::ops::Range<u64>]) -> hoard_core::Result<Vec<bytes::Bytes>> {
        self.inner.get_ranges(key, ranges).await
    }
    async fn list(&self, prefix: &str) -> hoard_core::Result<Vec<hoard_core::store::ObjectInfo>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> hoard_core::Result<()> {
        self.inner.delete(key).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
    fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        self.inner.local_file(key)
    }
    async fn admit_local_write(&self, key: &str, len: u64) -> hoard_core::Result<()> {
        let mut admitted = self.admitted.lock().unwrap();
        if admitted.len() >= self.admit {
            self.refused.lock().unwrap().push(key.to_string());
            return Err(hoard_core::Error::Cancelled);
        }
        admitted.push((key.to_string(), len));
        Ok(())
    }
}

/// Pack files (not staging files) under `repo`'s packs directory, as key and length.
fn pack_files(repo: &Path) -> Vec<(String, u64)> {
    let mut packs: Vec<_> = walkdir(&repo.join("packs"))
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains('#'))
        .map(|p| {
            let key = p.strip_prefix(repo).unwrap().to_string_lossy().into_owned();
            (key, std::fs::metadata(&p).unwrap().len())
        })
        .collect();
    packs.sort();
    packs
}

/// Spooled packs bypass `put_parts`, so a decorator that gates writes sees each one, with its
/// exact length, in `admit_local_write` before it is published; a refusal stops the backup
/// with the decorator's error, publishes nothing more and leaves no staging file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_packs_are_admitted_by_the_store_before_they_are_published() {
    let tmp = tempfile::tempdir().unwrap();
    let src = random_files(tmp.path(), 3, 8 * MIB, 30);
    for (name, admit) in [("all", usize::MAX), ("two", 2)] {
        let dir = tmp.path().join(name);
        let opts = hoard_core::store::StoreOptions { create_dir: true, ..Default::default() };
        let fs_store = hoard_core::store::open_store(dir.to_str().unwrap(), &opts).unwrap();
        let gate =
            Arc::new(GateStore { inner: fs_store, admit, admitted: Default::default(), refused: Default::default() });
        let repo = init(Arc::clone(&gate) as Arc<dyn Store>, 4 * MIB as u32).await;
        let result =
            tokio::time::timeout(Duration::from_secs(60), backup(Arc::clone(&repo), options(&src, SEGMENT, 2)))
                .await
                .expect("backup did not finish within 60 s");
        let mut admitted = gate.admitted.lock().unwrap().clone();
        admitted.sort();
        let on_disk = pack_files(&dir);
        assert_eq!(on_disk, admitted, "{name}: published packs and admitted writes differ");
        let staging: Vec<_> =
            walkdir(&dir.join("packs")).into_iter().filter(|p| p.to_string_lossy().contains('#')).collect();
        assert!(staging.is_empty(), "{name}: staging files left: {staging:?}");
        if admit == usize::MAX {
            let out = result.unwrap();
            // 24 MiB of random data in 4 MiB packs, and the tree's pack.
            assert!(admitted.len() >= 6, "{name}: only {} packs admitted", admitted.len());
            assert!(gate.refused.lock().unwrap().is_empty());
            restore_and_compare(&repo, &out, &src, &tmp.path().join("r")).await;
        } else {
            let err = result.expect_err("a refused pack must fail the backup");
            assert!(matches!(err, hoard_core::Error::Cancelled), "{err:?}");
            assert_eq!(admitted.len(), 2);
            assert!(!gate.refused.lock().unwrap().is_empty());
            assert!(repo.list_snapshots().await.unwrap().is_empty());
        }
    }
}

fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn hook(f: impl Fn(&str) + Send + Sync + 'static) -> Option<hoard_core::backup::FileHook> {
    Some(Arc::new(f))
}

/// A file appended to after it was read but before its metadata is checked again: a warning,
/// the content stored as read; the other files are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_changed_while_read_is_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let original = random_bytes(300_000, 1);
    std::fs::write(src.join("growing.log"), &original).unwrap();
    std::fs::write(src.join("steady"), random_bytes(100_000, 2)).unwrap();
    let repo = init(store(&tmp.path().join("repo"), None), 4 * MIB as u32).await;
    let mut opts = options(&src, SEGMENT, 2);
    let path = src.join("growing.log");
    opts.hooks = RaceHooks {
        after_read: hook(move |rel| {
            if rel == "growing.log" {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
                f.write_all(b"a line written during the backup\n").unwrap();
            }
        }),
        ..Default::default()
    };
    let out = backup_within(&repo, opts, 60).await;
    assert_eq!(out.snapshot.summary.warnings, 1, "{:?}", out.snapshot.warnings);
    assert!(
        out.snapshot.warnings[0].contains("growing.log")
            && out.snapshot.warnings[0].contains("changed while being read"),
        "{:?}",
        out.snapshot.warnings
    );
    let target = tmp.path().join("r");
    let root = out.snapshot.component("data").unwrap().root;
    restore(Arc::clone(&repo), RestoreSource::Tree(root), RestoreOptions::new(&target)).await.unwrap();
    assert_eq!(std::fs::read(target.join("growing.log")).unwrap(), original, "stored as read");
    assert_eq!(std::fs::read(target.join("steady")).unwrap(), std::fs::read(src.join("steady")).unwrap());
}

/// A file removed after the walk listed it but before a reader opens it: a warning, the file is
/// absent from the snapshot, the rest is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_vanishing_before_open_is_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/ephemeral.tmp"), b"here a moment").unwrap();
    std::fs::write(src.join("d/kept"), b"kept").unwrap();
    let repo = init(store(&tmp.path().join("repo"), None), 4 * MIB as u32).await;
    let mut opts = options(&src, SEGMENT, 2);
    let path = src.join("d/ephemeral.tmp");
    opts.hooks = RaceHooks {
        before_open: hook(move |rel| {
            if rel == "d/ephemeral.tmp" {
                std::fs::remove_file(&path).unwrap();
            }
        }),
        ..Default::default()
    };
    let out = backup_within(&repo, opts, 60).await;
    assert_eq!(out.snapshot.summary.warnings, 1, "{:?}", out.snapshot.warnings);
    assert!(
        out.snapshot.warnings[0].contains("d/ephemeral.tmp") && out.snapshot.warnings[0].contains("cannot open"),
        "{:?}",
        out.snapshot.warnings
    );
    let target = tmp.path().join("r");
    let root = out.snapshot.component("data").unwrap().root;
    restore(Arc::clone(&repo), RestoreSource::Tree(root), RestoreOptions::new(&target)).await.unwrap();
    assert!(!target.join("d/ephemeral.tmp").exists());
    assert_eq!(std::fs::read(target.join("d/kept")).unwrap(), b"kept");
}

/// Include patterns: matches are kept (a matching directory whole), the directories leading to
/// them too, nothing else; directories walked for a name pattern that hold no match are not
/// stored; excludes win over includes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn includes_keep_matches_and_the_way_to_them() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for d in ["conf/sub", "data/db/sub", "logs", "dump", "empty"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    for f in [
        "conf/app.yaml",
        "conf/app.ini",
        "conf/sub/deep.yaml",
        "data/db/file1",
        "data/db/sub/file2",
        "data/other",
        "logs/a.log",
        "top.sql",
        "dump/x.sql",
        "dump/skip.tmp",
    ] {
        std::fs::write(src.join(f), f.as_bytes()).unwrap();
    }
    let repo = init(store(&tmp.path().join("repo"), None), 4 * MIB as u32).await;
    let mut opts = options(&src, SEGMENT, 2);
    opts.includes = ["/conf/*.yaml", "data/db/", "*.sql"].map(String::from).to_vec();
    opts.excludes = vec!["data/db/sub".into()];
    opts.scan_totals = true;
    let out = backup_within(&repo, opts, 60).await;
    let root = out.snapshot.component("data").unwrap().root;
    let mut paths = Vec::new();
    hoard_core::browse::walk(&repo, root, String::new(), &mut |p: &str, _: &hoard_core::tree::Node| {
        paths.push(p.to_string())
    })
    .await
    .unwrap();
    paths.sort();
    assert_eq!(
        paths,
        ["/conf", "/conf/app.yaml", "/data", "/data/db", "/data/db/file1", "/dump", "/dump/x.sql", "/top.sql"],
    );
    let s = &out.snapshot.summary;
    assert_eq!((s.files_new, s.dirs), (4, 4), "{s:?}");
}

/// A re-backup of edited files (page overwrites, an append) with the parent's cuts gives the
/// same tree as a backup that searches every boundary again, and skips the search for most of
/// the bytes. Three files: one above the large-file threshold (read directly, through io_uring
/// where the kernel allows it), one below it, and one that was sparse (chunked region by region)
/// and has its hole filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_files_are_cut_as_before_and_as_from_scratch() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let opts = InitOptions {
        params: RepoParams {
            chunker: ChunkerParams { min: 64 * 1024, avg: 256 * 1024, max: 1024 * 1024 },
            pack_size: 4 * MIB as u32,
            compression_level: 1,
            large_files: Some(LargeFileChunking {
                min_file_size: 8 * MIB as u64,
                chunker: ChunkerParams { min: 16 * 1024, avg: 64 * 1024, max: 256 * 1024 },
            }),
        },
        kdf: KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 },
        allow_weak_kdf: true,
    };
    let repo =
        Arc::new(Repository::init(store(&tmp.path().join("repo"), None), &Password::new("pw"), opts).await.unwrap());
    let mut large = random_bytes(20 * MIB, 31);
    let mut small = random_bytes(3 * MIB, 32);
    std::fs::write(src.join("large.db"), &large).unwrap();
    std::fs::write(src.join("small.db"), &small).unwrap();
    let sparse_path = src.join("sparse.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&sparse_path).unwrap();
        f.write_all_at(&random_bytes(4 * MIB, 34), 0).unwrap();
        f.write_all_at(&random_bytes(4 * MIB, 35), 8 * MIB as u64).unwrap();
    }
    backup_within(&repo, options(&src, 64 * MIB, 2), 120).await;

    for at in [1_000_000, 7_340_032, 15_000_000] {
        large[at..at + 4096].fill(0x5a);
    }
    large.extend_from_slice(&random_bytes(10_000, 33));
    small[2_000_000..2_000_100].fill(1);
    std::fs::write(src.join("large.db"), &large).unwrap();
    std::fs::write(src.join("small.db"), &small).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&sparse_path).unwrap();
        f.write_all_at(&random_bytes(4 * MIB, 36), 4 * MIB as u64).unwrap();
    }

    let progress = Arc::new(hoard_core::progress::Progress::default());
    let with_parent =
        BackupOptions { parent: ParentSelection::Auto, progress: Arc::clone(&progress), ..options(&src, 64 * MIB, 2) };
    let again = backup_within(&repo, with_parent, 120).await;
    let as_before = progress.bytes_cut_as_before.load(std::sync::atomic::Ordering::Relaxed);
    let chunked = progress.bytes_chunked.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(chunked, (large.len() + small.len() + 12 * MIB) as u64, "the edited files are read again");
    assert!(as_before * 10 >= chunked * 7, "only {as_before} of {chunked} bytes cut as before");

    let fresh_progress = Arc::new(hoard_core::progress::Progress::default());
    let from_scratch = backup_within(
        &repo,
        BackupOptions { progress: Arc::clone(&fresh_progress), ..options(&src, 64 * MIB, 2) },
        120,
    )
    .await;
    assert_eq!(fresh_progress.bytes_cut_as_before.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(
        again.snapshot.component("data").unwrap().root,
        from_scratch.snapshot.component("data").unwrap().root,
        "the tree cut with the parent's boundaries differs from the one cut from scratch"
    );
    restore_and_compare(&repo, &again, &src, &tmp.path().join("restored")).await;
}

/// Tree blobs never share a pack with data blobs, on a store that spools packs to files and on
/// one that holds them in memory: several data packs of 1 MiB, the trees of 40 directories in a
/// pack of their own, and the snapshot restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_and_data_never_share_a_pack() {
    use hoard_core::pack::BlobType;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for d in 0..40u64 {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), random_bytes(100_000, 900 + d)).unwrap();
    }
    let spooling = {
        let dir = tmp.path().join("spooling");
        let opts = hoard_core::store::StoreOptions { create_dir: true, ..Default::default() };
        hoard_core::store::open_store(dir.to_str().unwrap(), &opts).unwrap()
    };
    assert!(hoard_core::spool::SpoolDir::for_store(&*spooling).is_some());
    let in_memory = store(&tmp.path().join("in-memory"), None);
    assert!(hoard_core::spool::SpoolDir::for_store(&*in_memory).is_none());
    for (name, store) in [("spooling", spooling), ("in memory", in_memory)] {
        let repo = init(store, MIB as u32).await;
        let out = backup_within(&repo, options(&src, 64 * MIB, 2), 120).await;
        let mut types: std::collections::HashMap<_, Vec<BlobType>> = std::collections::HashMap::new();
        for (_, loc) in repo.index().iter() {
            types.entry(loc.pack).or_default().push(loc.ty);
        }
        let kind = |ty| types.values().filter(|t| t.iter().all(|&x| x == ty)).count();
        let (data_packs, tree_packs) = (kind(BlobType::Data), kind(BlobType::Tree));
        assert_eq!(data_packs + tree_packs, types.len(), "{name}: a pack holds trees and data: {types:?}");
        assert!(data_packs >= 3, "{name}: {data_packs} data packs");
        assert_eq!(tree_packs, 1, "{name}: {tree_packs} tree packs");
        let trees: usize = types.values().flatten().filter(|&&t| t == BlobType::Tree).count();
        assert_eq!(trees, 41, "{name}: the root's tree and one per directory");
        let target = tmp.path().join(format!("restored-{}", name.replace(' ', "-")));
        let root = out.snapshot.component("data").unwrap().root;
        let r = restore(Arc::clone(&repo), RestoreSource::Tree(root), RestoreOptions::new(&target)).await.unwrap();
        assert!(r.failed.is_empty(), "{name}: {:?}", r.failed);
        assert_eq!(std::fs::read(target.join("d7/f")).unwrap(), random_bytes(100_000, 907), "{name}");
    }
}

/// The parallel walk of an incremental backup and the one-thread walk of a backup without a
/// parent give the same root tree, over nested directories with files, symlinks, an empty
/// directory, changed, added and removed files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_and_depth_first_walks_make_the_same_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for a in 0..4 {
        for b in 0..3 {
            let d = src.join(format!("a{a}")).join(format!("b{b}"));
            std::fs::create_dir_all(d.join("empty")).unwrap();
            for f in 0..5 {
                std::fs::write(d.join(format!("f{f}")), random_bytes(1000 + 300 * f, (a * 100 + b * 10 + f) as u64))
                    .unwrap();
            }
            std::os::unix::fs::symlink(format!("f{b}"), d.join("link")).unwrap();
        }
    }
    std::fs::write(src.join("top"), b"top").unwrap();
    let repo = init(store(&tmp.path().join("repo"), None), 4 * MIB as u32).await;
    backup_within(&repo, options(&src, 64 * MIB, 2), 120).await;

    std::fs::write(src.join("a1/b2/f3"), b"changed").unwrap();
    std::fs::write(src.join("a3/b0/new"), b"added").unwrap();
    std::fs::remove_file(src.join("a2/b1/f0")).unwrap();
    std::fs::create_dir_all(src.join("a0/b0/deeper/still")).unwrap();
    std::fs::write(src.join("a0/b0/deeper/still/x"), b"x").unwrap();

    let with_parent = BackupOptions { parent: ParentSelection::Auto, ..options(&src, 64 * MIB, 2) };
    let parallel = backup_within(&repo, with_parent, 120).await;
    let depth_first = backup_within(&repo, options(&src, 64 * MIB, 2), 120).await;
    let root = |o: &BackupOutcome| o.snapshot.component("data").unwrap().root;
    assert_eq!(root(&parallel), root(&depth_first));
    let target = tmp.path().join("restored");
    let r =
        restore(Arc::clone(&repo), RestoreSource::Tree(root(&parallel)), RestoreOptions::new(&target)).await.unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(std::fs::read(target.join("a0/b0/deeper/still/x")).unwrap(), b"x");
    assert_eq!(std::fs::read(target.join("a1/b2/f3")).unwrap(), b"changed");
    assert!(!target.join("a2/b1/f0").exists());
}

/// Progress totals: a backup whose parent snapshot covers every source takes the parent's
/// totals as its estimate and runs no metadata scan (a scan would count the files added since);
/// a source the parent lacks brings the scan back, and its totals are then not estimated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_come_from_the_parent_when_it_covers_every_source() {
    use std::sync::atomic::Ordering::Relaxed;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for d in 0..3 {
        std::fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for f in 0..4 {
            std::fs::write(src.join(format!("d{d}/f{f}")), random_bytes(500 + 100 * f, (d * 10 + f) as u64)).unwrap();
        }
    }
    let repo = init(store(&tmp.path().join("repo"), None), 4 * MIB as u32).await;
    let with_totals = |sources: Vec<Source>| BackupOptions {
        sources,
        parent: ParentSelection::Auto,
        scan_totals: true,
        progress: Arc::new(hoard_core::progress::Progress::default()),
        ..options(&src, 64 * MIB, 2)
    };
    let data = || Source::Path { name: "data".into(), path: src.clone() };

    let first = with_totals(vec![data()]);
    let progress = Arc::clone(&first.progress);
    let first = backup_within(&repo, first, 120).await;
    assert!(!progress.totals_estimated.load(Relaxed), "no parent: the totals are counted");
    let parent_bytes = first.snapshot.summary.total_bytes;

    std::fs::write(src.join("d0/new1"), b"new file one").unwrap();
    std::fs::write(src.join("d1/new2"), b"new file two").unwrap();
    let second = with_totals(vec![data()]);
    let progress = Arc::clone(&second.progress);
    let second = backup_within(&repo, second, 120).await;
    let s = &second.snapshot.summary;
    assert_eq!((s.files_new, s.files_unmodified), (2, 12), "{s:?}");
    let snap = progress.snapshot();
    assert!(snap.totals_estimated);
    assert_eq!((snap.files_total, snap.bytes_total), (Some(12), Some(parent_bytes)), "the parent's totals");

    let extra = tmp.path().join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("e"), b"extra").unwrap();
    let third = with_totals(vec![data(), Source::Path { name: "extra".into(), path: extra }]);
    let progress = Arc::clone(&third.progress);
    backup_within(&repo, third, 120).await;
    assert!(!progress.totals_estimated.load(Relaxed), "the parent lacks a source: the totals are counted");
}

/// A directory with more subdirectories than the walk loads parent trees for at once (32): the
/// later ones still find their parent trees (their files count as unmodified, none is read
/// again), identical subdirectories share one tree, and the tree equals a depth-first walk's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_directories_find_every_parent_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for d in 0..70u64 {
        let dir = src.join(format!("wide/d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        if d % 10 == 9 {
            continue; // empty: seven subdirectories with one and the same tree
        }
        for f in 0..2 {
            std::fs::write(dir.join(format!("f{f}")), random_bytes(700, d * 10 + f)).unwrap();
        }
    }
    let repo = init(store(&tmp.path().join("repo"), None), 4 * MIB as u32).await;
    let first = backup_within(&repo, options(&src, 64 * MIB, 2), 120).await;
    assert_eq!(first.snapshot.summary.files_new, 126);

    std::fs::write(src.join("wide/d55/f1"), b"changed").unwrap();
    let with_parent = BackupOptions { parent: ParentSelection::Auto, ..options(&src, 64 * MIB, 2) };
    let incremental = backup_within(&repo, with_parent, 120).await;
    let s = &incremental.snapshot.summary;
    assert_eq!((s.files_unmodified, s.files_changed, s.files_new, s.warnings), (125, 1, 0, 0), "{s:?}");
    assert_eq!(s.bytes_read, 7, "only the changed file is read: {s:?}");
    let depth_first = backup_within(&repo, options(&src, 64 * MIB, 2), 120).await;
    let root = |o: &BackupOutcome| o.snapshot.component("data").unwrap().root;
    assert_eq!(root(&incremental), root(&depth_first));
}
