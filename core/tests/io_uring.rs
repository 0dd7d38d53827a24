//! The io_uring reader against plain reads, and direct reads against reads through the page
//! cache: the same input gives the same snapshot trees, and both restore byte-identical. Also:
//! backups sharing one memory budget, sparse files, batches of small files, and linked files
//! read once by concurrent readers.
//!
//! On hosts without io_uring the tests fail unless `HOARD_TEST_NO_IO_URING` is set (then the
//! io_uring side is a second plain-read run, and says so).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hoard_core::backup::{
    BackupOptions, BackupOutcome, DIRECT_MIN_FILE, ParentSelection, Source, URING_MIN_FILE, backup,
};
use hoard_core::budget::Budget;
use hoard_core::crypto::KdfParams;
use hoard_core::progress::Progress;
use hoard_core::repo::InitOptions;
use hoard_core::restore::{RestoreOptions, RestoreSource, restore};
use hoard_core::store::{StoreOptions, open_store};
use hoard_core::{Password, Repository};
use hoard_testkit::{compare, make_fidelity_fixture, manifest, random_bytes, text_bytes};

fn io_uring_expected() -> bool {
    match hoard_core::uring::available() {
        Ok(()) => true,
        Err(why) => {
            assert!(std::env::var_os("HOARD_TEST_NO_IO_URING").is_some(), "io_uring unavailable: {why}");
            eprintln!("SKIPPED io_uring side: {why}");
            false
        }
    }
}

async fn init(dir: &Path) -> Arc<Repository> {
    let store = open_store(dir.to_str().unwrap(), &StoreOptions { create_dir: true, ..Default::default() }).unwrap();
    let opts = InitOptions {
        kdf: KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 },
        allow_weak_kdf: true,
        ..Default::default()
    };
    Arc::new(Repository::init(store, &Password::new("uring"), opts).await.unwrap())
}

/// The fidelity fixture plus files around the io_uring threshold and one spanning several
/// read segments.
fn make_source(root: &Path) {
    make_fidelity_fixture(root);
    let d = root.join("uring");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("big.bin"), random_bytes(40 * 1024 * 1024 + 123, 7)).unwrap();
    std::fs::write(d.join("at-threshold.bin"), random_bytes(URING_MIN_FILE as usize, 8)).unwrap();
    std::fs::write(d.join("below-threshold.txt"), text_bytes(URING_MIN_FILE as usize - 1, 9)).unwrap();
    for i in 0..6 {
        std::fs::write(d.join(format!("mid-{i}.bin")), random_bytes(700 * 1024 + i, 20 + i as u64)).unwrap();
    }
}

/// Bytes read of regular files of at least `URING_MIN_FILE` bytes below `dir`, each inode once:
/// whole files, and the data regions of sparse ones (holes are not read).
fn bytes_at_or_above_threshold(dir: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for (rel, e) in manifest(dir) {
        if e.kind != "file" || e.size < URING_MIN_FILE || !seen.insert(e.inode) {
            continue;
        }
        let path = dir.join(std::os::unix::ffi::OsStrExt::from_bytes(&rel[..]) as &std::ffi::OsStr);
        let fd = std::os::fd::OwnedFd::from(std::fs::File::open(path).unwrap());
        let st = rustix::fs::fstat(&fd).unwrap();
        total += match hoard_core::fsmeta::data_regions(&fd, &st) {
            Some(regions) => regions.iter().map(|r| r.end - r.start).sum(),
            None => e.size,
        };
    }
    total
}

async fn run(repo: &Arc<Repository>, src: &Path, io_uring: bool) -> (BackupOutcome, Arc<Progress>) {
    run_with(repo, src, |o| o.io_uring = io_uring).await
}

/// A backup of `src` without a parent, with options changed by `set`.
async fn run_with(
    repo: &Arc<Repository>,
    src: &Path,
    set: impl FnOnce(&mut BackupOptions),
) -> (BackupOutcome, Arc<Progress>) {
    let progress = Arc::new(Progress::default());
    let mut opts = BackupOptions {
        sources: vec![Source::Path { name: "data".into(), path: src.to_path_buf() }],
        host: "uring-test".into(),
        parent: ParentSelection::None,
        read_concurrency: 3,
        memory_budget: 64 * 1024 * 1024,
        progress: Arc::clone(&progress),
        ..Default::default()
    };
    set(&mut opts);
    (backup(Arc::clone(repo), opts).await.unwrap(), progress)
}

async fn restore_to(repo: &Arc<Repository>, out: &BackupOutcome, target: &Path) {
    let root = out.snapshot.components[0].root;
    let r = restore(Arc::clone(repo), RestoreSource::Tree(root), RestoreOptions::new(target)).await.unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_and_plain_reads_make_the_same_snapshot() {
    let expect_ring = io_uring_expected();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src);
    let repo = init(&tmp.path().join("repo")).await;

    let (ring, ring_p) = run(&repo, &src, true).await;
    let (plain, plain_p) = run(&repo, &src, false).await;

    assert_eq!(ring.io_uring, expect_ring);
    assert!(!plain.io_uring);
    assert_eq!(plain_p.bytes_read_io_uring.load(Ordering::Relaxed), 0);
    let big_files = bytes_at_or_above_threshold(&src);
    assert!(big_files > 40 * 1024 * 1024, "{big_files}");
    let via_ring = ring_p.bytes_read_io_uring.load(Ordering::Relaxed);
    if expect_ring {
        assert_eq!(via_ring, big_files, "bytes read through io_uring");
    }
    // Stage counters agree with each other and with the summary.
    for (o, p) in [(&ring, &ring_p), (&plain, &plain_p)] {
        let read = p.bytes_read.load(Ordering::Relaxed);
        assert_eq!(read, o.snapshot.summary.bytes_read);
        assert_eq!(p.bytes_chunked.load(Ordering::Relaxed), read);
        assert_eq!(p.bytes_stored.load(Ordering::Relaxed), o.snapshot.summary.bytes_stored);
        assert_eq!(o.snapshot.summary.warnings, 0, "{:?}", o.snapshot.warnings);
    }
    // Same input, same repository keys: the same trees, down to the root id.
    assert_eq!(ring.snapshot.components[0].root, plain.snapshot.components[0].root);
    assert_eq!(ring.snapshot.summary.bytes_read, plain.snapshot.summary.bytes_read);
    assert_eq!(plain.snapshot.summary.bytes_new, 0, "the second run found everything deduplicated");

    let before = manifest(&src);
    for (name, o) in [("ring", &ring), ("plain", &plain)] {
        let t = tmp.path().join(name);
        restore_to(&repo, o, &t).await;
        let diffs = compare(&before, &manifest(&t));
        assert!(diffs.is_empty(), "{name}: {}", diffs.join("\n"));
    }
}

/// Small files that wait for a reader are opened together and read into the page cache with one
/// io_uring submission per batch; the files are then read as without it, so the snapshot is the
/// one plain reads make. The reader is held on its first file for a moment so that the walk
/// queues the rest (batches only take files already waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_are_prefetched_in_batches() {
    let expect_ring = io_uring_expected();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut nonempty = 0u64;
    for d in 0..4 {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..100usize {
            let seed = (d * 1000 + i) as u64;
            let len = match i {
                0 => 0,
                1 => URING_MIN_FILE as usize - 1,
                _ => 1 + (i * 7919 + d * 131) % 20_000,
            };
            let data = if i % 3 == 0 { random_bytes(len, seed) } else { text_bytes(len, seed) };
            std::fs::write(dir.join(format!("f{i:03}")), data).unwrap();
            nonempty += u64::from(len > 0);
        }
    }
    // One large file among them: it is read on its own, between batches.
    std::fs::write(src.join("d1/large.bin"), random_bytes(URING_MIN_FILE as usize + 1, 99)).unwrap();
    let repo = init(&tmp.path().join("repo")).await;

    let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ring, ring_p) = run_with(&repo, &src, |o| {
        o.read_concurrency = 1;
        o.hooks.before_open = Some(Arc::new(move |_: &str| {
            if !held.swap(true, Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        }));
    })
    .await;
    let (plain, plain_p) = run(&repo, &src, false).await;

    let prefetched = ring_p.files_prefetched.load(Ordering::Relaxed);
    assert_eq!(plain_p.files_prefetched.load(Ordering::Relaxed), 0);
    if expect_ring {
        // All but the files of a first or last batch of one, and of batches cut short by the
        // large file.
        let slack = 3 * hoard_core::uring::PREFETCH_FILES as u64;
        assert!(prefetched + slack >= nonempty && prefetched <= nonempty, "{prefetched} of {nonempty}");
    } else {
        assert_eq!(prefetched, 0);
    }
    for o in [&ring, &plain] {
        assert_eq!(o.snapshot.summary.warnings, 0, "{:?}", o.snapshot.warnings);
    }
    assert_eq!(ring.snapshot.components[0].root, plain.snapshot.components[0].root);
    assert_eq!(ring.snapshot.summary.bytes_read, plain.snapshot.summary.bytes_read);
    assert_eq!(ring_p.bytes_read.load(Ordering::Relaxed), ring.snapshot.summary.bytes_read);
    let t = tmp.path().join("restored");
    restore_to(&repo, &ring, &t).await;
    let diffs = compare(&manifest(&src), &manifest(&t));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// Many links of one inode, read by several readers at once (small ones in batches, large
/// ones through the ring): the data is read once; the other links wait for that read and take
/// its content. The reader of the first link is held until the others have been handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_files_are_read_once_by_concurrent_readers() {
    io_uring_expected();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    let small = text_bytes(5000, 1);
    let large = random_bytes(URING_MIN_FILE as usize * 3, 2);
    std::fs::write(src.join("a/small"), &small).unwrap();
    std::fs::write(src.join("a/large"), &large).unwrap();
    for i in 0..12 {
        std::fs::hard_link(src.join("a/small"), src.join(format!("a/small-{i:02}"))).unwrap();
        std::fs::hard_link(src.join("a/large"), src.join(format!("a/large-{i:02}"))).unwrap();
    }
    let repo = init(&tmp.path().join("repo")).await;
    for io_uring in [true, false] {
        let first = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let (out, p) = run_with(&repo, &src, |o| {
            o.io_uring = io_uring;
            o.read_concurrency = 4;
            // The first reader of each inode is slow, so the other links' readers find it busy.
            o.hooks.after_read = Some(Arc::new(move |rel: &str| {
                let group = if rel.contains("small") { "small" } else { "large" };
                if first.lock().unwrap().insert(group) {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }));
        })
        .await;
        assert_eq!(out.snapshot.summary.warnings, 0, "{:?}", out.snapshot.warnings);
        let once = (small.len() + large.len()) as u64;
        assert_eq!(p.bytes_read.load(Ordering::Relaxed), once, "io_uring {io_uring}: each inode read once");
        let t = tmp.path().join(format!("restored-{io_uring}"));
        restore_to(&repo, &out, &t).await;
        let diffs = compare(&manifest(&src), &manifest(&t));
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    }
}

/// Two backups at once under one budget of a single segment: both finish (no deadlock between
/// them) and every byte of the budget comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_share_one_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = init(&tmp.path().join("repo")).await;
    let budget = Budget::new(16 * 1024 * 1024);
    let mut tasks = Vec::new();
    for i in 0..2u64 {
        let src = tmp.path().join(format!("src{i}"));
        std::fs::create_dir_all(&src).unwrap();
        for j in 0..4u64 {
            std::fs::write(src.join(format!("f{j}")), random_bytes(9 * 1024 * 1024, 100 * i + j)).unwrap();
        }
        let opts = BackupOptions {
            sources: vec![Source::Path { name: format!("data{i}"), path: src.clone() }],
            host: format!("h{i}"),
            parent: ParentSelection::None,
            budget: Some(Arc::clone(&budget)),
            // Ignored when a shared budget is given.
            memory_budget: usize::MAX,
            read_concurrency: 2,
            ..Default::default()
        };
        let repo = Arc::clone(&repo);
        tasks.push(tokio::spawn(async move {
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || handle.block_on(backup(repo, opts))).await.unwrap().unwrap()
        }));
    }
    for t in tasks {
        let out = t.await.unwrap();
        assert_eq!(out.snapshot.summary.bytes_read, 4 * 9 * 1024 * 1024);
    }
    assert_eq!(budget.in_use(), 0);
}

/// Holes of a sparse file are recorded from the file's map (`SEEK_DATA`/`SEEK_HOLE`), not read;
/// the restore is byte-identical and sparse again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_of_sparse_files_are_not_read() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    const MIB: u64 = 1024 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let f = std::fs::File::create(src.join("disk.img")).unwrap();
    f.write_all_at(&random_bytes(4096, 1), 0).unwrap();
    f.write_all_at(&text_bytes(MIB as usize, 2), 20 * MIB).unwrap();
    f.write_all_at(&random_bytes(8192, 3), 40 * MIB + 12_288).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let repo = init(&tmp.path().join("repo")).await;
    for io_uring in [true, false] {
        let (out, progress) = run(&repo, &src, io_uring).await;
        let read = out.snapshot.summary.bytes_read;
        // Each data island is read with at most its merged neighbourhood (holes under MIN_HOLE).
        let data = 4096 + MIB + 8192;
        assert!(read >= data && read <= data + 3 * hoard_core::fsmeta::MIN_HOLE, "read {read} bytes");
        assert_eq!(out.snapshot.summary.total_bytes, 64 * MIB);
        assert_eq!(progress.bytes_chunked.load(Ordering::Relaxed), read);
        let t = tmp.path().join(format!("restored-{io_uring}"));
        restore_to(&repo, &out, &t).await;
        let diffs = compare(&manifest(&src), &manifest(&t));
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
        let allocated = std::fs::metadata(t.join("disk.img")).unwrap().blocks() * 512;
        assert!(allocated < 8 * MIB, "restored file allocates {allocated} bytes");
    }
}

/// Bytes of `path` in the page cache, from util-linux `fincore`.
fn cached_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux) is needed by this test");
    assert!(out.status.success(), "fincore: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Writes the file to disk and drops it from the page cache.
fn evict(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
}

/// Files of at least `DIRECT_MIN_FILE` bytes are read with O_DIRECT where the filesystem allows
/// it: the snapshot is the same as with reads through the page cache, every size (aligned or
/// not, one or several segments, sparse) restores byte-identical, and the page cache is left
/// alone, where reads through it fill it (which shows the measurement can tell them apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reads_make_the_same_snapshot_and_leave_the_page_cache_alone() {
    use std::os::unix::fs::FileExt;
    const MIB: usize = 1024 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let large = [
        ("aligned.bin", random_bytes(2 * MIB, 1)),
        ("tail.txt", text_bytes(3 * MIB + 123, 2)),
        ("threshold.bin", random_bytes(DIRECT_MIN_FILE as usize, 3)),
        ("segments.bin", random_bytes(40 * MIB + 4097, 4)),
    ];
    for (name, data) in &large {
        std::fs::write(src.join(name), data).unwrap();
    }
    std::fs::write(src.join("small.txt"), text_bytes(DIRECT_MIN_FILE as usize - 1, 5)).unwrap();
    // Sparse, with a data region that ends on an unaligned size.
    let f = std::fs::File::create(src.join("sparse.img")).unwrap();
    f.write_all_at(&random_bytes(MIB, 6), 0).unwrap();
    f.write_all_at(&text_bytes(MIB + 77, 7), 8 * MIB as u64).unwrap();
    drop(f);
    let mut names: Vec<&str> = large.iter().map(|(n, _)| *n).collect();
    names.push("sparse.img");
    let direct_here = {
        let f = std::fs::File::open(src.join("aligned.bin")).unwrap();
        hoard_core::fsmeta::set_direct(&std::os::fd::OwnedFd::from(f), true).is_ok()
    };
    if !direct_here {
        eprintln!("NOTE: this filesystem refuses O_DIRECT; checking the page-cache fallback only");
    }
    let repo = init(&tmp.path().join("repo")).await;
    let mut roots = Vec::new();
    for direct_io in [true, false] {
        for n in &names {
            evict(&src.join(n));
        }
        let (out, _) = run_with(&repo, &src, |o| o.direct_io = direct_io).await;
        assert_eq!(out.snapshot.summary.warnings, 0, "{:?}", out.snapshot.warnings);
        let cached: u64 = names.iter().map(|n| cached_bytes(&src.join(n))).sum();
        let read: u64 = large.iter().map(|(_, d)| d.len() as u64).sum::<u64>() + 2 * MIB as u64;
        if direct_io && direct_here {
            // At most the unaligned tails (and the pages next to them) went through the cache.
            assert!(cached <= 8 * 4096 * names.len() as u64, "{cached} bytes cached after direct reads");
        } else {
            assert!(cached >= read, "{cached} bytes cached after reading {read} through the page cache");
        }
        let t = tmp.path().join(format!("restored-{direct_io}"));
        restore_to(&repo, &out, &t).await;
        let diffs = compare(&manifest(&src), &manifest(&t));
        assert!(diffs.is_empty(), "direct_io {direct_io}: {}", diffs.join("\n"));
        roots.push(out.snapshot.components[0].root);
    }
    assert_eq!(roots[0], roots[1], "direct and page-cache reads gave different trees");
}

/// A large file read directly through io_uring is read one segment ahead of the chunker when the
/// budget has room, and one segment at a time (no deadlock) when the budget holds just one; the
/// trees are the same either way and the budget is all given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_are_read_ahead_within_the_budget() {
    if !io_uring_expected() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Past the large-file threshold (32 MiB), with an unaligned tail; half of it compresses.
    let mut data = random_bytes(24 * 1024 * 1024, 11);
    data.extend(text_bytes(24 * 1024 * 1024 + 4321, 12));
    std::fs::write(src.join("table.db"), &data).unwrap();
    let direct_here = {
        let f = std::fs::File::open(src.join("table.db")).unwrap();
        hoard_core::fsmeta::set_direct(&std::os::fd::OwnedFd::from(f), true).is_ok()
    };
    let repo = init(&tmp.path().join("repo")).await;
    let mut roots = Vec::new();
    // One 4 MiB segment of budget (the large-file segment), then plenty.
    for budget_bytes in [4 * 1024 * 1024, 256 * 1024 * 1024] {
        let budget = Budget::new(budget_bytes);
        let (out, progress) = run_with(&repo, &src, |o| o.budget = Some(Arc::clone(&budget))).await;
        assert_eq!(out.snapshot.summary.bytes_read, data.len() as u64);
        let ahead = progress.bytes_read_ahead.load(Ordering::Relaxed);
        if budget_bytes == 4 * 1024 * 1024 || !direct_here {
            assert_eq!(ahead, 0, "read ahead without budget room (or without direct reads)");
        } else {
            assert!(ahead > data.len() as u64 / 2, "only {ahead} bytes read ahead");
        }
        assert_eq!(budget.in_use(), 0);
        let t = tmp.path().join(format!("restored-{budget_bytes}"));
        restore_to(&repo, &out, &t).await;
        assert_eq!(std::fs::read(t.join("table.db")).unwrap(), data);
        roots.push(out.snapshot.components[0].root);
    }
    assert_eq!(roots[0], roots[1]);
}
