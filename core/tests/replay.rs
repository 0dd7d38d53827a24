//! A bucket writer without the key replays objects: an index file whose packs a prune deleted,
//! or a real pack's header on a swapped body under a new name. The next backup must not
//! dedup against blobs that are gone or altered: what it writes restores byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use hoard_core::backup::{BackupOptions, BackupOutcome, ParentSelection, Source, backup};
use hoard_core::crypto::KdfParams;
use hoard_core::repo::{InitOptions, Password, Repository};
use hoard_core::restore::{RestoreOptions, RestoreSource, restore};
use hoard_core::store::{Store, StoreOptions, open_store};
use hoard_core::writer::WriterConfig;
use hoard_testkit::random_bytes;

fn store(dir: &Path) -> Arc<dyn Store> {
    open_store(dir.join("repo").to_str().unwrap(), &StoreOptions { create_dir: true, ..Default::default() }).unwrap()
}

async fn backup_src(repo: &Arc<Repository>, src: &Path) -> BackupOutcome {
    let opts = BackupOptions {
        sources: vec![Source::Path { name: "data".into(), path: src.to_path_buf() }],
        host: "replay-test".into(),
        parent: ParentSelection::None,
        scan_totals: false,
        writer: WriterConfig { workers: 2, ..WriterConfig::default() },
        ..Default::default()
    };
    backup(Arc::clone(repo), opts).await.unwrap()
}

/// Restores the backup and compares it with `src`; the error text if it cannot.
async fn restores_intact(repo: &Arc<Repository>, out: &BackupOutcome, src: &Path, target: &Path) -> Result<(), String> {
    let root = out.snapshot.component("data").unwrap().root;
    let r = restore(Arc::clone(repo), RestoreSource::Tree(root), RestoreOptions::new(target))
        .await
        .map_err(|e| e.to_string())?;
    if !r.failed.is_empty() {
        return Err(format!("{:?}", r.failed));
    }
    let same = std::fs::read(src.join("x")).unwrap() == std::fs::read(target.join("x")).map_err(|e| e.to_string())?;
    if same { Ok(()) } else { Err("restored content differs".into()) }
}

async fn keys(store: &Arc<dyn Store>, prefix: &str) -> Vec<String> {
    store.list(prefix).await.unwrap().into_iter().map(|o| o.key).collect()
}

/// A repository with one backup of `src/x`, and its store.
async fn setup(tmp: &Path) -> (Arc<dyn Store>, std::path::PathBuf) {
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("x"), random_bytes(300 * 1024, 42)).unwrap();
    let store = store(tmp);
    let kdf = KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 };
    let repo = Arc::new(
        Repository::init(
            Arc::clone(&store),
            &Password::new("pw"),
            InitOptions { kdf, allow_weak_kdf: true, ..Default::default() },
        )
        .await
        .unwrap(),
    );
    backup_src(&repo, &src).await;
    (store, src)
}

/// What `forget --prune` of everything leaves: no snapshot, pack or index file.
async fn forget_everything(store: &Arc<dyn Store>) {
    for prefix in ["snapshots/", "packs/", "index/"] {
        for k in keys(store, prefix).await {
            store.delete(&k).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_index_naming_deleted_packs_is_not_deduplicated_against() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, src) = setup(tmp.path()).await;
    let mut old_index = Vec::new();
    for k in keys(&store, "index/").await {
        old_index.push((k.clone(), store.get(&k).await.unwrap()));
    }
    forget_everything(&store).await;
    for (k, bytes) in old_index {
        store.put(&k, bytes).await.unwrap();
    }

    let repo = Arc::new(Repository::open(Arc::clone(&store), &Password::new("pw")).await.unwrap());
    let out = backup_src(&repo, &src).await;
    restores_intact(&repo, &out, &src, &tmp.path().join("target"))
        .await
        .expect("the backup after the replay must hold its data, not point at deleted packs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_with_a_real_header_and_a_swapped_body_is_not_adopted() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, src) = setup(tmp.path()).await;
    let packs = keys(&store, "packs/").await;
    let mut forged = Vec::new();
    for k in &packs {
        let mut bytes = store.get(k).await.unwrap().to_vec();
        bytes[100] ^= 0xff; // inside the first blob; the header at the end still decrypts
        // Any well-formed name will do: the bucket writer cannot make it the content's hash.
        let name = hoard_core::Id::of_bytes(k.as_bytes()).to_hex();
        forged.push((format!("packs/{}/{name}", &name[..2]), Bytes::from(bytes)));
    }
    forget_everything(&store).await;
    for (k, bytes) in forged {
        store.put(&k, bytes).await.unwrap();
    }

    let repo = Arc::new(Repository::open(Arc::clone(&store), &Password::new("pw")).await.unwrap());
    let out = backup_src(&repo, &src).await;
    restores_intact(&repo, &out, &src, &tmp.path().join("target"))
        .await
        .expect("the backup must not reuse blobs of a pack whose body was swapped");
}
