//! Depth bombs: a volume (or a crafted snapshot) with tens of thousands of nested directories.
//! Backup and restore stop at [`MAX_DEPTH`] levels with a warning naming the directory, keep
//! one descriptor per level at most, and never exhaust their stacks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use hoard_core::backup::{BackupOptions, ParentSelection, Source, backup};
use hoard_core::crypto::KdfParams;
use hoard_core::pack::BlobType;
use hoard_core::repo::{InitOptions, Password, Repository};
use hoard_core::restore::{RestoreOptions, RestoreSource, restore};
use hoard_core::store::{StoreOptions, open_store};
use hoard_core::tree::{MAX_DEPTH, Node, NodeKind, Tree};
use hoard_core::writer::{BlobWriter, WriterConfig};
use rustix::fs::{Mode, OFlags};

const LEVELS: usize = 50_000;

async fn repo(dir: &Path) -> Arc<Repository> {
    let store =
        open_store(dir.join("repo").to_str().unwrap(), &StoreOptions { create_dir: true, ..Default::default() })
            .unwrap();
    let kdf = KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 };
    Arc::new(
        Repository::init(store, &Password::new("pw"), InitOptions { kdf, allow_weak_kdf: true, ..Default::default() })
            .await
            .unwrap(),
    )
}

fn open_dir(dir: &OwnedFd, name: &str) -> Option<OwnedFd> {
    rustix::fs::openat(dir, name, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()
}

/// `<root>/d/d/.../d`, `levels` deep (built with one descriptor at a time), with a file
/// `marker` at depth 10 and at the bottom.
fn nest(root: &Path, levels: usize) {
    std::fs::create_dir_all(root).unwrap();
    let mut fd = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    for level in 1..=levels {
        rustix::fs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
        fd = open_dir(&fd, "d").unwrap();
        if level == 10 || level == levels {
            let f =
                rustix::fs::openat(&fd, "marker", OFlags::CREATE | OFlags::WRONLY, Mode::from_raw_mode(0o644)).unwrap();
            rustix::io::write(&f, format!("level {level}\n").as_bytes()).unwrap();
        }
    }
}

/// How many `d` levels are below `root`, and at which levels a `marker` file is.
fn depth_of(root: &Path) -> (usize, Vec<usize>) {
    let mut fd = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    let mut levels = 0;
    let mut markers = Vec::new();
    while let Some(next) = open_dir(&fd, "d") {
        fd = next;
        levels += 1;
        if rustix::fs::statat(&fd, "marker", rustix::fs::AtFlags::empty()).is_ok() {
            markers.push(levels);
        }
    }
    (levels, markers)
}

/// Deletes a chain made by [`nest`] without recursion: each level's `d` is moved up to `parent`
/// before the level is removed (std's `remove_dir_all` recurses once per level).
fn remove_chain(parent: &Path, top: &str) {
    let mut cur = parent.join(top);
    for i in 0.. {
        for e in std::fs::read_dir(&cur).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "d" {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        let next = parent.join(format!(".up{i}"));
        let has_child = std::fs::rename(cur.join("d"), &next).is_ok();
        std::fs::remove_dir(&cur).unwrap();
        if !has_child {
            break;
        }
        cur = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_nested_50000_deep_is_backed_up_to_the_depth_limit_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    nest(&src, LEVELS);
    let repo = repo(tmp.path()).await;
    let opts = BackupOptions {
        sources: vec![Source::Path { name: "data".into(), path: src.clone() }],
        host: "depth-test".into(),
        parent: ParentSelection::None,
        scan_totals: true,
        writer: WriterConfig { workers: 2, ..WriterConfig::default() },
        ..Default::default()
    };
    let out = backup(Arc::clone(&repo), opts).await.expect("a deep tree is backed up, not a failure");
    let warned: Vec<_> = out.snapshot.warnings.iter().filter(|w| w.contains("levels")).collect();
    assert_eq!(warned.len(), 1, "one warning for the directory at the limit: {:?}", out.snapshot.warnings);
    assert!(warned[0].contains(&MAX_DEPTH.to_string()), "{warned:?}");

    let target = tmp.path().join("target");
    let root = out.snapshot.component("data").unwrap().root;
    let r = restore(Arc::clone(&repo), RestoreSource::Tree(root), RestoreOptions::new(&target)).await.unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    let (levels, markers) = depth_of(&target);
    assert_eq!(levels, MAX_DEPTH, "the snapshot holds the levels down to the limit");
    assert_eq!(markers, vec![10], "files above the limit are kept, those below it are not");
    remove_chain(tmp.path(), "src");
    remove_chain(tmp.path(), "target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_snapshot_nested_50000_deep_is_restored_to_the_depth_limit_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo(tmp.path()).await;
    let writer = BlobWriter::start(Arc::clone(&repo), WriterConfig::default());
    let sink = writer.sink();
    // Bottom up: each tree holds one directory `d` whose subtree is the previous tree. Trees
    // must differ to be distinct blobs, so each level also names its depth in a symlink.
    let root = tokio::task::spawn_blocking(move || {
        let mut below = None;
        for level in (1..=LEVELS).rev() {
            let mut link = Node::new(b"level".to_vec(), NodeKind::Symlink);
            link.link_target = Some(serde_bytes::ByteBuf::from(level.to_string().into_bytes()));
            let mut nodes = Vec::new();
            if let Some(id) = below {
                let mut d = Node::new(b"d".to_vec(), NodeKind::Dir);
                d.mode = 0o755;
                d.subtree = Some(id);
                nodes.push(d);
            }
            nodes.push(link);
            let bytes = Tree { nodes }.encode().unwrap();
            below = Some(sink.add_bytes(BlobType::Tree, Bytes::from(bytes)).unwrap());
        }
        let mut top = Node::new(b"d".to_vec(), NodeKind::Dir);
        top.mode = 0o755;
        top.subtree = below;
        let bytes = Tree { nodes: vec![top] }.encode().unwrap();
        sink.add_bytes(BlobType::Tree, Bytes::from(bytes)).unwrap()
    })
    .await
    .unwrap();
    writer.finish().await.unwrap();

    let target = tmp.path().join("target");
    let r = restore(Arc::clone(&repo), RestoreSource::Tree(root), RestoreOptions::new(&target))
        .await
        .expect("a deep snapshot is restored down to the limit, not a failure");
    let warned: Vec<_> = r.warnings.iter().filter(|w| w.contains("levels")).collect();
    assert_eq!(warned.len(), 1, "one warning for the directory at the limit: {:?}", r.warnings);
    let (levels, _) = depth_of(&target);
    assert_eq!(levels, MAX_DEPTH, "restored down to the limit");
    remove_chain(tmp.path(), "target");
}
