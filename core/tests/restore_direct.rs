//! Restores of large files written in whole blocks with `O_DIRECT` (the default) and through
//! the page cache give the same files: content, size, holes and modification times, for files
//! whose blobs repeat (one blob written at several offsets), that hold holes and zero runs, and
//! whose last block is short. Against the real filesystem store, in a temporary directory; in
//! CI the filesystem must accept `O_DIRECT`, so that the direct path is the one tested.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hoard_core::backup::{BackupOptions, ParentSelection, Source, backup};
use hoard_core::chunker::ChunkerParams;
use hoard_core::crypto::KdfParams;
use hoard_core::repo::{InitOptions, RepoParams};
use hoard_core::restore::{RestoreOptions, RestoreSource, restore};
use hoard_core::store::{ObjectStoreBackend, Store};
use hoard_core::{Password, Repository};
use hoard_testkit::random_bytes;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn write_at(path: &Path, size: u64, parts: &[(u64, &[u8])]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (offset, data) in parts {
        rustix::io::pwrite(&f, data, *offset).unwrap();
    }
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000 + size)).unwrap();
}

fn make_source(src: &Path) {
    std::fs::create_dir_all(src).unwrap();
    // The same MiB twice (its blobs are written at two offsets each), zeros, random bytes,
    // and an odd size.
    let a = random_bytes(MIB, 1);
    let b = random_bytes(3 * MIB + 4321, 2);
    let zeros = vec![0u8; 300 * KIB];
    let mut repeated = Vec::new();
    repeated.extend_from_slice(&a);
    repeated.extend_from_slice(&a);
    repeated.extend_from_slice(&zeros);
    repeated.extend_from_slice(&b);
    write_at(&src.join("repeated.db"), repeated.len() as u64, &[(0, &repeated)]);
    // Holes before, between and after data that starts and ends off block boundaries.
    let c = random_bytes(700 * KIB + 3, 3);
    let d = random_bytes(5 * KIB, 4);
    write_at(&src.join("sparse.img"), 16 * MIB as u64 + 17, &[(2 * MIB as u64 + 17, &c), (9 * MIB as u64 + 1, &d)]);
    // Just over the size from which files are written directly.
    write_at(&src.join("edge.bin"), MIB as u64 + 1, &[(0, &random_bytes(MIB + 1, 5))]);
    write_at(&src.join("small.txt"), 3000, &[(0, &random_bytes(3000, 6))]);
}

/// Small chunks: many blob boundaries inside blocks.
fn small_chunks() -> RepoParams {
    RepoParams {
        chunker: ChunkerParams { min: 16 * KIB as u32, avg: 64 * KIB as u32, max: 256 * KIB as u32 },
        pack_size: 2 * MIB as u32,
        compression_level: 1,
        large_files: None,
    }
}

async fn repository(dir: &Path, params: RepoParams) -> Arc<Repository> {
    std::fs::create_dir_all(dir).unwrap();
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap();
    let store: Arc<dyn Store> = Arc::new(ObjectStoreBackend::new(Arc::new(fs), "", dir.display().to_string()));
    let opts = InitOptions {
        params,
        kdf: KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 },
        allow_weak_kdf: true,
    };
    Arc::new(Repository::init(store, &Password::new("pw"), opts).await.unwrap())
}

/// Backs up `src` as component `data`; the root tree of the snapshot.
async fn backup_root(repo: &Arc<Repository>, src: &Path) -> hoard_core::Id {
    let opts = BackupOptions {
        sources: vec![Source::Path { name: "data".into(), path: src.to_path_buf() }],
        host: "direct-test".into(),
        parent: ParentSelection::None,
        scan_totals: false,
        ..Default::default()
    };
    let out = backup(Arc::clone(repo), opts).await.unwrap();
    assert_eq!(out.snapshot.summary.warnings, 0, "{:?}", out.snapshot.warnings);
    out.snapshot.component("data").unwrap().root
}

/// Whether `dir`'s filesystem takes `O_DIRECT`; in CI it must, so that the direct path is the
/// one tested.
fn direct_io_or_say_skipped(dir: &Path, what: &str) -> bool {
    let direct = takes_direct_io(dir);
    if !direct {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "the test directory's filesystem refuses O_DIRECT");
        eprintln!("SKIPPED {what}: {} refuses O_DIRECT", dir.display());
    }
    direct
}

/// Whether `dir`'s filesystem takes `O_DIRECT` for a file written there.
fn takes_direct_io(dir: &Path) -> bool {
    let f: std::os::fd::OwnedFd = std::fs::File::create(dir.join("probe")).unwrap().into();
    hoard_core::fsmeta::set_direct(&f, true).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_cached_restores_give_the_same_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src);
    let takes_direct = direct_io_or_say_skipped(tmp.path(), "the direct half");
    let repo = repository(&tmp.path().join("repo"), small_chunks()).await;
    let root = backup_root(&repo, &src).await;
    for direct_io in [true, false] {
        let target = tmp.path().join(format!("restored-{direct_io}"));
        let mut ropts = RestoreOptions::new(&target);
        ropts.direct_io = direct_io;
        let r = restore(Arc::clone(&repo), RestoreSource::Tree(root), ropts).await.unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        // Three files reach the size from which files are written directly.
        let direct = if direct_io && takes_direct { 3 } else { 0 };
        assert_eq!((r.direct_files, r.direct_refused), (direct, 0), "direct {direct_io}");
        for name in ["repeated.db", "sparse.img", "edge.bin", "small.txt"] {
            let (a, b) = (src.join(name), target.join(name));
            let (ma, mb) = (std::fs::metadata(&a).unwrap(), std::fs::metadata(&b).unwrap());
            assert_eq!(ma.len(), mb.len(), "{name} (direct {direct_io}): size");
            assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "{name} (direct {direct_io}): content");
            assert_eq!(ma.modified().unwrap(), mb.modified().unwrap(), "{name} (direct {direct_io}): mtime");
        }
        // Holes stay holes: 705 KiB of data in a 16 MiB file.
        let allocated = std::fs::metadata(target.join("sparse.img")).unwrap().blocks() * 512;
        assert!(allocated < 2 * MIB as u64, "sparse.img (direct {direct_io}): {allocated} bytes allocated");
    }
}

/// Blobs larger than the restore's staging buffer (chunks of up to 8 MiB, the default chunker)
/// keep direct writes aligned: no file falls back to the page cache because a write was
/// refused. (A run written out before its first block boundary once misaligned the rest.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blobs_keep_direct_writes_aligned() {
    let tmp = tempfile::tempdir().unwrap();
    if !direct_io_or_say_skipped(tmp.path(), "the test") {
        return;
    }
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut names = Vec::new();
    for i in 0..6u64 {
        // Odd sizes, so that blobs start off block boundaries.
        let size = (5 + 2 * i as usize) * MIB + 777 * i as usize + 1;
        let name = format!("medium-{i}.bin");
        write_at(&src.join(&name), size as u64, &[(0, &random_bytes(size, 10 + i))]);
        names.push(name);
    }
    let params = RepoParams { large_files: None, ..RepoParams::default() };
    assert!(params.chunker.max as usize >= 8 * MIB, "the default chunker's blobs reach 8 MiB");
    let repo = repository(&tmp.path().join("repo"), params).await;
    let root = backup_root(&repo, &src).await;
    let target = tmp.path().join("restored");
    let r = restore(Arc::clone(&repo), RestoreSource::Tree(root), RestoreOptions::new(&target)).await.unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!((r.direct_files, r.direct_refused), (names.len() as u64, 0));
    for name in &names {
        assert!(std::fs::read(src.join(name)).unwrap() == std::fs::read(target.join(name)).unwrap(), "{name}");
    }
}

/// Opening a blob into a caller's buffer (what restore does for most blobs) gives what
/// `unseal_blob` gives, for stored and compressed blobs of sizes on both sides of the kept
/// scratch, and refuses every damaged or mismatched blob.
#[tokio::test]
async fn blobs_unseal_into_a_buffer_like_into_a_vec() {
    use hoard_core::pack::{BlobType, Compression};
    let tmp = tempfile::tempdir().unwrap();
    let repo = repository(&tmp.path().join("repo"), small_chunks()).await;
    let keys = repo.keys();
    let seal = |id: &hoard_core::Id, payload: &[u8]| {
        let mut sealed = Vec::new();
        keys.seal_blob(BlobType::Data.seal_type(), id, payload, &mut sealed);
        sealed
    };
    let text = |n: usize| (0..n).map(|i| b"abcdefgh"[(i * 7 / 13) % 8]).collect::<Vec<u8>>();
    for (plain, compression) in [
        (random_bytes(70_000, 1), Compression::None),
        (text(70_000), Compression::Zstd),
        (text(3 * MIB), Compression::Zstd),
        (text(100), Compression::Zstd),
    ] {
        let id = keys.blob_id(&plain);
        let payload = match compression {
            Compression::None => plain.clone(),
            Compression::Zstd => zstd::bulk::compress(&plain, 1).unwrap(),
        };
        let sealed = seal(&id, &payload);
        let raw_len = plain.len() as u32;
        let mut out = vec![0u8; plain.len()];
        repo.unseal_blob_into(&id, BlobType::Data, compression, &sealed, &mut out).unwrap();
        assert_eq!(out, plain);
        assert_eq!(repo.unseal_blob(&id, BlobType::Data, compression, raw_len, &sealed).unwrap(), plain);
        // A flipped byte, another type, a buffer of the wrong length.
        let mut flipped = sealed.clone();
        flipped[sealed.len() / 2] ^= 1;
        assert!(repo.unseal_blob_into(&id, BlobType::Data, compression, &flipped, &mut out).is_err());
        assert!(repo.unseal_blob_into(&id, BlobType::Tree, compression, &sealed, &mut out).is_err());
        for len in [plain.len() - 1, plain.len() + 1] {
            let mut wrong = vec![0u8; len];
            assert!(repo.unseal_blob_into(&id, BlobType::Data, compression, &sealed, &mut wrong).is_err(), "{len}");
        }
    }
    // Sealed correctly but with content that is not the id's: refused after opening.
    let (plain, other) = (text(5000), random_bytes(5000, 9));
    let id = keys.blob_id(&plain);
    let mut out = vec![0u8; 5000];
    let err = repo.unseal_blob_into(&id, BlobType::Data, Compression::None, &seal(&id, &other), &mut out);
    assert!(err.unwrap_err().to_string().contains("does not match its id"));
    // A compressed payload that is not zstd.
    let err = repo.unseal_blob_into(&id, BlobType::Data, Compression::Zstd, &seal(&id, &other), &mut out);
    assert!(err.unwrap_err().to_string().contains("decompression"));
}
