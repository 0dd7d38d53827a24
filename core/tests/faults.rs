//! Backup and restore against a store that fails: seeded retryable faults under the retry
//! decorator, a total outage, and puts whose response is lost after the object landed.
//!
//! Every store here is `RetryStore(FaultyStore(local filesystem))`, with small backoffs so the
//! tests stay fast. Print the fault counts with `--nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hoard_core::backup::{BackupOptions, BackupOutcome, ParentSelection, Source, backup};
use hoard_core::chunker::ChunkerParams;
use hoard_core::crypto::KdfParams;
use hoard_core::error::ObjectKind;
use hoard_core::faults::{Fault, FaultConfig, FaultHandle, FaultyStore, Op};
use hoard_core::index::IndexFile;
use hoard_core::repo::{InitOptions, RepoParams};
use hoard_core::restore::{RestoreOptions, RestoreSource, restore};
use hoard_core::store::{ObjectStoreBackend, RetryPolicy, RetryStore, Store};
use hoard_core::writer::WriterConfig;
use hoard_core::{Id, Password, Repository};
use hoard_testkit::{Entry, compare, manifest, random_bytes, text_bytes};

const COMPONENT: &str = "data";

fn password() -> Password {
    Password::new("fault-tolerant")
}

/// Small backoffs; `deadline` bounds each operation's retrying.
fn policy(deadline: Duration) -> RetryPolicy {
    RetryPolicy {
        max_attempts: 10_000,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
        deadline,
    }
}

/// The local filesystem backend (without fsync: these tests are about faults, not power loss).
fn backend(dir: &Path) -> ObjectStoreBackend {
    std::fs::create_dir_all(dir).unwrap();
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap();
    ObjectStoreBackend::new(Arc::new(fs), "", dir.display().to_string())
}

fn faulty(dir: &Path, cfg: FaultConfig, policy: RetryPolicy) -> (Arc<dyn Store>, Arc<FaultHandle>) {
    let f = FaultyStore::new(backend(dir), cfg);
    let handle = f.handle();
    (Arc::new(RetryStore::new(f, policy)), handle)
}

fn clean(dir: &Path) -> Arc<dyn Store> {
    Arc::new(RetryStore::new(backend(dir), policy(Duration::from_secs(5))))
}

async fn init(store: Arc<dyn Store>) -> Arc<Repository> {
    let opts = InitOptions {
        params: RepoParams {
            chunker: ChunkerParams { min: 16 * 1024, avg: 64 * 1024, max: 256 * 1024 },
            pack_size: 1024 * 1024,
            compression_level: 1,
            large_files: None,
        },
        kdf: KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 },
        allow_weak_kdf: true,
    };
    Arc::new(Repository::init(store, &password(), opts).await.unwrap())
}

async fn open(store: Arc<dyn Store>) -> Arc<Repository> {
    let repo = Repository::open(store, &password()).await.unwrap();
    repo.load_index().await.unwrap();
    Arc::new(repo)
}

fn options(src: &Path, parent: ParentSelection) -> BackupOptions {
    BackupOptions {
        sources: vec![Source::Path { name: COMPONENT.into(), path: src.to_path_buf() }],
        host: "fault-test".into(),
        parent,
        memory_budget: 0, // the minimum: one segment in flight
        read_concurrency: 2,
        writer: WriterConfig {
            workers: 2,
            upload_concurrency: Some(4),
            index_every_packs: 2,
            ..WriterConfig::default()
        },
        ..Default::default()
    }
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// About 4 MiB in a few directories: incompressible and text files, small files, an empty one.
fn make_tree(root: &Path) {
    for i in 0..4 {
        write(root, &format!("a/random{i}.bin"), &random_bytes(512 * 1024, i));
    }
    for i in 0..6 {
        write(root, &format!("b/text{i}.txt"), &text_bytes(100 * 1024, 100 + i));
    }
    write(root, "b/c/deep.bin", &random_bytes(1024 * 1024, 200));
    for i in 0..20 {
        write(root, &format!("small/s{i:02}"), &random_bytes(1000 + 500 * i as usize, 300 + i));
    }
    write(root, "empty", b"");
    std::os::unix::fs::symlink("b/text0.txt", root.join("link")).unwrap();
}

/// Rewrites one file, appends to another, adds a file and removes an older added one.
fn mutate(root: &Path, cycle: u64) {
    write(root, &format!("a/random{}.bin", cycle % 4), &random_bytes(512 * 1024, 1000 + cycle));
    let t = root.join(format!("b/text{}.txt", cycle % 6));
    let mut text = std::fs::read(&t).unwrap();
    text.extend_from_slice(&text_bytes(20 * 1024, 2000 + cycle));
    std::fs::write(&t, text).unwrap();
    write(root, &format!("new/n{cycle}"), &random_bytes(64 * 1024 + cycle as usize, 3000 + cycle));
    let _ = std::fs::remove_file(root.join(format!("new/n{}", cycle.wrapping_sub(3))));
}

fn root_of(out: &BackupOutcome) -> Id {
    out.snapshot.component(COMPONENT).unwrap().root
}

/// Restores `root` into a fresh directory and asserts it matches `expected` exactly.
async fn restore_and_compare(repo: &Arc<Repository>, root: Id, target: PathBuf, expected: &BTreeMap<Vec<u8>, Entry>) {
    let out = restore(Arc::clone(repo), RestoreSource::Tree(root), RestoreOptions::new(&target)).await.unwrap();
    assert!(out.failed.is_empty(), "restore failed for {:?}", out.failed);
    let diffs = compare(expected, &manifest(&target));
    assert!(diffs.is_empty(), "restore of {} differs:\n{}", root.short(), diffs.join("\n"));
    std::fs::remove_dir_all(&target).unwrap();
}

/// Every stored pack is named by exactly one index entry and every blob is indexed once:
/// no pack was written twice under different names and no blob was packed twice.
async fn assert_no_duplicates(repo: &Repository) {
    let packs = repo.list_ids("packs").await.unwrap();
    let mut listed = 0;
    let mut blob_entries = 0;
    for id in repo.list_ids("index").await.unwrap() {
        let raw = repo.load_file(ObjectKind::Index, "index", &id).await.unwrap();
        let file = IndexFile::decode(repo.keys(), &format!("index/{}", id.to_hex()), &raw).unwrap();
        listed += file.packs.len();
        blob_entries += file.blob_count();
    }
    let index = repo.index();
    assert_eq!(packs.len(), index.pack_count(), "packs stored vs packs indexed");
    assert_eq!(listed, index.pack_count(), "a pack is named by more than one index entry");
    assert_eq!(blob_entries, index.len(), "a blob is stored more than once");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Runs `f` on its own runtime. On a hang the guard inside `f` returns `Err`; the runtime is then
/// shut down without waiting for stuck blocking threads, so the test fails instead of hanging.
fn run_guarded<F: std::future::Future<Output = Result<(), String>>>(f: F) {
    let rt = runtime();
    let r = rt.block_on(f);
    rt.shutdown_background();
    if let Err(e) = r {
        panic!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_backup_restore_cycles_succeed_at_five_percent_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let repo_dir = tmp.path().join("repo");
    make_tree(&src);
    let cfg = FaultConfig {
        latency: Some((Duration::ZERO, Duration::from_millis(2))),
        timeout: Duration::from_millis(10),
        ..FaultConfig::new(0x5eed_0005, 0.05)
    };
    let (store, faults) = faulty(&repo_dir, cfg, policy(Duration::from_secs(10)));
    let mut repo = init(Arc::clone(&store)).await;
    let mut history = Vec::new();
    let started = Instant::now();
    for cycle in 0..20u64 {
        if cycle > 0 {
            mutate(&src, cycle);
        }
        if cycle % 5 == 4 {
            // A new process: open and load the index through the faulty store too.
            repo = open(Arc::clone(&store)).await;
        }
        let expected = manifest(&src);
        let out = backup(Arc::clone(&repo), options(&src, ParentSelection::Auto))
            .await
            .unwrap_or_else(|e| panic!("backup {cycle} failed: {e} ({})", faults.counters()));
        assert_eq!(out.snapshot.warnings, Vec::<String>::new());
        restore_and_compare(&repo, root_of(&out), tmp.path().join(format!("restore{cycle}")), &expected).await;
        history.push((root_of(&out), expected));
    }
    let c = faults.counters();
    eprintln!("20 cycles in {:?}: {c}", started.elapsed());
    assert!(c.injected() > 0, "no faults injected: the test proves nothing ({c})");
    for kind in Fault::ALL {
        assert!(c.of(kind) > 0, "no {kind:?} injected ({c})");
    }

    // Afterwards, without faults: a fresh open sees a consistent repository.
    let repo = open(clean(&repo_dir)).await;
    assert_no_duplicates(&repo).await;
    assert_eq!(repo.list_snapshots().await.unwrap().len(), 20);
    for (i, (root, expected)) in history.iter().enumerate().step_by(6) {
        restore_and_compare(&repo, *root, tmp.path().join(format!("final{i}")), expected).await;
    }
}

/// Outages: first every call fails, then (with a fresh repository object) every pack upload.
/// Backups must give up within the retry deadline, not hang, and leave the repository as it was.
#[test]
fn outage_fails_within_the_deadline_and_leaves_the_repository_intact() {
    run_guarded(async {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let repo_dir = tmp.path().join("repo");
        make_tree(&src);
        // Many directories after a large file (added below): the walker runs far ahead of the
        // tree finisher, which waits for that file.
        for i in 0..300 {
            std::fs::create_dir_all(src.join(format!("dirs/d{i:03}"))).unwrap();
        }
        let deadline = Duration::from_secs(2);
        let cfg = FaultConfig { timeout: Duration::from_millis(50), ..FaultConfig::new(0xdead, 0.0) };
        let (store, everything) = faulty(&repo_dir, cfg, policy(deadline));
        let repo = init(Arc::clone(&store)).await;
        let mut history = Vec::new();
        for cycle in 0..2 {
            mutate(&src, cycle);
            let expected = manifest(&src);
            let out = backup(Arc::clone(&repo), options(&src, ParentSelection::Auto)).await.unwrap();
            history.push((root_of(&out), expected));
        }

        // Larger than everything the writer pipeline holds, so the reader is still busy with it
        // when the uploads give up.
        write(&src, "a/big.bin", &random_bytes(12 * 1024 * 1024, 4242));
        mutate(&src, 2);
        let guarded = |repo: Arc<Repository>, parent: ParentSelection, what: &'static str| {
            let opts = options(&src, parent);
            async move {
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(10), backup(repo, opts))
                    .await
                    .map_err(|_| format!("backup during {what} still running after 10 s (hang)"))?;
                let e = r.err().ok_or_else(|| format!("backup during {what} succeeded"))?;
                eprintln!("backup during {what} failed after {:?}: {e}", t.elapsed());
                assert!(e.to_string().contains("injected"), "unexpected error: {e}");
                Ok::<_, String>(())
            }
        };

        // Every call fails: the backup cannot even take its lock.
        everything.set_rate(1.0);
        guarded(Arc::clone(&repo), ParentSelection::Auto, "a total outage").await?;
        eprintln!("total outage: {}", everything.counters());
        assert!(everything.counters().injected() > 0);
        everything.set_rate(0.0);

        // Only pack uploads fail: lock, index and snapshots work, the writer pipeline fails.
        let cfg = FaultConfig {
            ops: vec![Op::Put],
            key_prefix: Some("packs/".into()),
            timeout: Duration::from_millis(50),
            ..FaultConfig::new(0xbeef, 1.0)
        };
        let (store, packs_down) = faulty(&repo_dir, cfg, policy(deadline));
        let agent = open(store).await;
        guarded(Arc::clone(&agent), ParentSelection::None, "a pack upload outage").await?;
        eprintln!("pack upload outage: {}", packs_down.counters());
        assert!(packs_down.counters().injected() > 0);
        packs_down.set_rate(0.0);

        // Faults off: the repository opens, its index loads, earlier snapshots restore intact.
        let fresh = open(clean(&repo_dir)).await;
        assert_eq!(fresh.list_snapshots().await.unwrap().len(), 2);
        for (i, (root, expected)) in history.iter().enumerate() {
            restore_and_compare(&fresh, *root, tmp.path().join(format!("earlier{i}")), expected).await;
        }
        // A new backup succeeds with the repository object that lived through the outage (a
        // long-running agent), and what it wrote is complete for a fresh reader.
        let expected = manifest(&src);
        let out = backup(Arc::clone(&agent), options(&src, ParentSelection::Auto)).await.unwrap();
        let fresh = open(clean(&repo_dir)).await;
        assert_eq!(fresh.list_snapshots().await.unwrap().len(), 3);
        restore_and_compare(&fresh, root_of(&out), tmp.path().join("after"), &expected).await;
        Ok(())
    });
}

/// The first pack upload lands but its response is lost: the retry meets the stored object and
/// counts it as done. No error, no second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_put_response_is_retried_as_success_without_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let repo_dir = tmp.path().join("repo");
    make_tree(&src);
    init(clean(&repo_dir)).await;
    let cfg = FaultConfig {
        kinds: vec![Fault::LostResponse],
        key_prefix: Some("packs/".into()),
        max_faults: Some(1),
        ..FaultConfig::new(1, 1.0)
    };
    let (store, faults) = faulty(&repo_dir, cfg, policy(Duration::from_secs(5)));
    let repo = Arc::new(Repository::open(store, &password()).await.unwrap());
    let expected = manifest(&src);
    let out = backup(Arc::clone(&repo), options(&src, ParentSelection::Auto)).await.unwrap();
    assert_eq!(faults.counters().of(Fault::LostResponse), 1);
    assert_eq!(faults.counters().injected(), 1);
    let fresh = open(clean(&repo_dir)).await;
    assert_no_duplicates(&fresh).await;
    restore_and_compare(&fresh, root_of(&out), tmp.path().join("restore"), &expected).await;

    // Lost responses on every kind of object, a third of all calls.
    mutate(&src, 1);
    let cfg = FaultConfig { kinds: vec![Fault::LostResponse], ..FaultConfig::new(2, 0.3) };
    let (store, faults) = faulty(&repo_dir, cfg, policy(Duration::from_secs(5)));
    let repo = open(store).await;
    let expected = manifest(&src);
    let out = backup(Arc::clone(&repo), options(&src, ParentSelection::Auto)).await.unwrap();
    eprintln!("lost responses: {}", faults.counters());
    assert!(faults.counters().of(Fault::LostResponse) > 0);
    let fresh = open(clean(&repo_dir)).await;
    assert_no_duplicates(&fresh).await;
    assert_eq!(fresh.list_snapshots().await.unwrap().len(), 2);
    restore_and_compare(&fresh, root_of(&out), tmp.path().join("restore2"), &expected).await;
}

/// Packs are stored but their index file cannot be written, so the backup fails. A later backup
/// by the same repository object must not treat those blobs as persisted: a fresh reader only
/// knows what index files say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_index_write_leaves_no_unpersisted_blobs_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let repo_dir = tmp.path().join("repo");
    make_tree(&src);
    let cfg = FaultConfig {
        kinds: vec![Fault::ServerError],
        ops: vec![Op::Put],
        key_prefix: Some("index/".into()),
        ..FaultConfig::new(3, 0.0)
    };
    let (store, faults) = faulty(&repo_dir, cfg, policy(Duration::from_millis(300)));
    let repo = init(store).await;
    backup(Arc::clone(&repo), options(&src, ParentSelection::Auto)).await.unwrap();
    let packs_before = repo.list_ids("packs").await.unwrap().len();
    let indexes_before = repo.list_ids("index").await.unwrap().len();

    mutate(&src, 1);
    mutate(&src, 2);
    faults.set_rate(1.0);
    let e = backup(Arc::clone(&repo), options(&src, ParentSelection::Auto)).await.unwrap_err();
    eprintln!("backup failed as intended: {e} ({})", faults.counters());
    assert!(repo.list_ids("packs").await.unwrap().len() > packs_before, "no pack was stored before the failure");
    assert_eq!(repo.list_ids("index").await.unwrap().len(), indexes_before);

    faults.set_rate(0.0);
    let expected = manifest(&src);
    let out = backup(Arc::clone(&repo), options(&src, ParentSelection::Auto)).await.unwrap();
    let fresh = open(clean(&repo_dir)).await;
    restore_and_compare(&fresh, root_of(&out), tmp.path().join("restore"), &expected).await;
}
