//! Restoring a hostile snapshot — tree entries named `..`, `/etc/x`, `a/b`, duplicated names —
//! written straight into a repository with the library, bypassing the backup path's checks:
//! the restore refuses them and writes nothing outside the target.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use hoard_core::crypto::KdfParams;
use hoard_core::pack::BlobType;
use hoard_core::repo::{InitOptions, Password, Repository};
use hoard_core::restore::{RestoreOptions, RestoreSource, restore};
use hoard_core::store::{StoreOptions, open_store};
use hoard_core::tree::{Extent, Node, NodeKind, Tree};
use hoard_core::writer::{BlobWriter, WriterConfig};

fn local_store(dir: &std::path::Path) -> Arc<dyn hoard_core::store::Store> {
    open_store(dir.join("repo").to_str().unwrap(), &StoreOptions { create_dir: true, ..Default::default() }).unwrap()
}

/// A repository on `store` with a cheap key slot (8 MiB × 1 pass).
async fn init_repo(store: Arc<dyn hoard_core::store::Store>) -> Arc<Repository> {
    let kdf = KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 };
    Arc::new(
        Repository::init(store, &Password::new("pw"), InitOptions { kdf, allow_weak_kdf: true, ..Default::default() })
            .await
            .unwrap(),
    )
}

/// A new repository under `dir/repo`, with its store.
async fn new_repo(dir: &std::path::Path) -> (Arc<dyn hoard_core::store::Store>, Arc<Repository>) {
    let store = local_store(dir);
    (Arc::clone(&store), init_repo(store).await)
}

fn file(name: &[u8], id: hoard_core::Id, len: u32) -> Node {
    let mut n = Node::new(name.to_vec(), NodeKind::File);
    n.mode = 0o644;
    n.size = len as u64;
    n.content = vec![Extent::Data { id, len }];
    n
}

#[tokio::test]
async fn hostile_names_never_escape_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, repo) = new_repo(tmp.path()).await;
    let writer = BlobWriter::start(Arc::clone(&repo), WriterConfig::default());
    let sink = writer.sink();
    let payload = b"owned".to_vec();
    let s2 = sink.clone();
    let data_id =
        tokio::task::spawn_blocking(move || s2.add_bytes(BlobType::Data, Bytes::from(payload))).await.unwrap().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let escape_abs = format!("{}/escaped", outside.display());
    let hostile: Vec<Vec<u8>> = vec![
        b"..".to_vec(),
        b"../outside-escaped".to_vec(),
        escape_abs.into_bytes(),
        b"a/b".to_vec(),
        b".".to_vec(),
        b"".to_vec(),
        b"nul\0name".to_vec(),
    ];
    let mut roots = Vec::new();
    for name in &hostile {
        // Trees encoded without validation, as an attacker with the key could write them.
        let t = Tree { nodes: vec![file(name, data_id, 5)] };
        let s2 = sink.clone();
        let bytes = t.encode().unwrap();
        roots.push(
            tokio::task::spawn_blocking(move || s2.add_bytes(BlobType::Tree, Bytes::from(bytes)))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // Duplicated names: a symlink to the outside, then a directory of the same name.
    let mut link = Node::new(b"dup".to_vec(), NodeKind::Symlink);
    link.link_target = Some(serde_bytes::ByteBuf::from(outside.to_str().unwrap().as_bytes().to_vec()));
    let inner = Tree { nodes: vec![file(b"victim", data_id, 5)] };
    let s2 = sink.clone();
    let inner_bytes = inner.encode().unwrap();
    let inner_id = tokio::task::spawn_blocking(move || s2.add_bytes(BlobType::Tree, Bytes::from(inner_bytes)))
        .await
        .unwrap()
        .unwrap();
    let mut dir = Node::new(b"dup".to_vec(), NodeKind::Dir);
    dir.mode = 0o755;
    dir.subtree = Some(inner_id);
    let dup = Tree { nodes: vec![link, dir] };
    let s2 = sink.clone();
    let dup_bytes = dup.encode().unwrap();
    roots.push(
        tokio::task::spawn_blocking(move || s2.add_bytes(BlobType::Tree, Bytes::from(dup_bytes)))
            .await
            .unwrap()
            .unwrap(),
    );
    drop(sink);
    writer.finish().await.unwrap();

    for (i, root) in roots.iter().enumerate() {
        let target = tmp.path().join(format!("target{i}"));
        let r = restore(Arc::clone(&repo), RestoreSource::Tree(*root), RestoreOptions::new(&target)).await;
        // Refused as a damaged tree.
        let e = r.expect_err("a hostile tree must be refused");
        assert!(e.to_string().contains("unsafe") || e.to_string().contains("order"), "{e}");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "something was written outside: case {i}");
        assert!(!tmp.path().join("outside-escaped").exists());
    }
}

/// A tenant who can write into the target races the restore: right after the agent creates a
/// FIFO, the tenant replaces it with a symlink to a file of someone else's. Setting the FIFO's
/// mode must not change that file (the hook stands for the tenant, deterministically).
#[tokio::test]
async fn a_special_file_swapped_for_a_symlink_does_not_redirect_chmod() {
    use std::os::unix::fs::PermissionsExt;

    let tmp = tempfile::tempdir().unwrap();
    let (_, repo) = new_repo(tmp.path()).await;
    let writer = BlobWriter::start(Arc::clone(&repo), WriterConfig::default());
    let sink = writer.sink();
    let mut fifo = Node::new(b"pipe".to_vec(), NodeKind::Fifo);
    fifo.mode = 0o4777; // what a crafted snapshot would ask for
    let tree = Tree { nodes: vec![fifo] }.encode().unwrap();
    let root =
        tokio::task::spawn_blocking(move || sink.add_bytes(BlobType::Tree, Bytes::from(tree))).await.unwrap().unwrap();
    writer.finish().await.unwrap();

    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"secret").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let target = tmp.path().join("target");
    let mut opts = RestoreOptions::new(&target);
    let (t, v) = (target.clone(), victim.clone());
    opts.hooks.after_create_special = Some(Arc::new(move |rel: &str| {
        let p = t.join(rel.trim_start_matches('/'));
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&v, &p).unwrap();
    }));
    let outcome = restore(Arc::clone(&repo), RestoreSource::Tree(root), opts).await.unwrap();

    let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "the restore changed the mode of a file the symlink points to");
    assert!(
        outcome.warnings.iter().any(|w| w.contains("replaced while being restored")),
        "the swap is reported: {:?}",
        outcome.warnings
    );
}

/// Key slots live in the bucket. A bucket writer plants slots that ask Argon2id for 4 GiB ×
/// 64 passes (the old ceiling) and for 512 MiB × 16 (within the ceilings, but costly), named to
/// be listed before the real slot. Opening must neither try the first nor derive the second
/// before the cheap real slot: it finishes at once instead of allocating gigabytes for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_costly_key_slots_are_not_tried_first() {
    use hoard_core::crypto::KeySlot;
    use hoard_core::store::Store;

    let tmp = tempfile::tempdir().unwrap();
    let (store, repo) = new_repo(tmp.path()).await;
    let real = repo.key_id().to_hex();
    let real_slot: KeySlot = serde_json::from_slice(&store.get(&format!("keys/{real}")).await.unwrap()).unwrap();
    for (memory_kib, iterations) in [(4 * 1024 * 1024, 64), (512 * 1024, 16)] {
        // A wrong wrapped key: the slot opens nothing, it only costs its derivation.
        let mut planted = real_slot.clone();
        planted.kdf = KdfParams { memory_kib, iterations, parallelism: 4 };
        let name = (0u32..)
            .find_map(|i| {
                planted.salt = [i.to_le_bytes().to_vec(), vec![7; 28]].concat();
                let bytes = serde_json::to_vec_pretty(&planted).unwrap();
                let id = hoard_core::Id::of_bytes(&bytes).to_hex();
                (id < real).then_some((id, bytes))
            })
            .unwrap();
        store.put(&format!("keys/{}", name.0), Bytes::from(name.1)).await.unwrap();
    }
    let opened = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        Repository::open(Arc::clone(&store), &Password::new("pw")),
    )
    .await
    .expect("open derived a planted slot's key (minutes of Argon2id over gigabytes) before the real one")
    .unwrap();
    assert_eq!(opened.key_id().to_hex(), real);
}

/// A crafted snapshot restored by root into a tenant's volume: a set-user-id root binary with
/// a file capability, a device node, a `trusted.*` attribute. A confined restore (the agent's
/// default) recreates none of them and gives root's files to the volume's owner; a full one
/// (the CLI's default, a user restoring their own data) recreates everything.
#[tokio::test]
async fn a_confined_restore_recreates_no_privilege() {
    use hoard_core::restore::Fidelity;
    use hoard_core::tree::Xattr;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    if !rustix::process::geteuid().is_root() {
        assert!(std::env::var("CI").is_err(), "this test restores as root; CI runs it as root");
        eprintln!("SKIP: not root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_, repo) = new_repo(tmp.path()).await;
    // VFS_CAP_REVISION_2 with the effective bit, CAP_NET_RAW permitted.
    let mut cap = 0x0200_0001u32.to_le_bytes().to_vec();
    cap.extend(0x2000u32.to_le_bytes());
    cap.extend([0u8; 12]);
    let mut suid = Node::new(b"suid".to_vec(), NodeKind::File);
    suid.mode = 0o4755;
    suid.xattrs = vec![
        Xattr { name: b"security.capability".to_vec(), value: cap },
        Xattr { name: b"trusted.note".to_vec(), value: b"t".to_vec() },
        Xattr { name: b"user.keep".to_vec(), value: b"u".to_vec() },
    ];
    let mut dev = Node::new(b"null".to_vec(), NodeKind::CharDevice);
    dev.mode = 0o666;
    dev.rdev = rustix::fs::makedev(1, 3);
    let mut sgid_dir = Node::new(b"shared".to_vec(), NodeKind::Dir);
    sgid_dir.mode = 0o2775;
    let writer = BlobWriter::start(Arc::clone(&repo), WriterConfig::default());
    let sink = writer.sink();
    let root = tokio::task::spawn_blocking(move || {
        sgid_dir.subtree =
            Some(sink.add_bytes(BlobType::Tree, Bytes::from(Tree::default().encode().unwrap())).unwrap());
        let tree = Tree { nodes: vec![dev, sgid_dir, suid] }.encode().unwrap();
        sink.add_bytes(BlobType::Tree, Bytes::from(tree)).unwrap()
    })
    .await
    .unwrap();
    writer.finish().await.unwrap();

    let xattr = |p: &std::path::Path, name: &str| {
        let mut buf = [0u8; 64];
        rustix::fs::getxattr(p, name, &mut buf).ok().map(|n| buf[..n].to_vec())
    };
    for fidelity in [Fidelity::Full, Fidelity::Confined] {
        let target = tmp.path().join(format!("{fidelity:?}"));
        std::fs::create_dir(&target).unwrap();
        // The tenant's volume: owned by the pod's user.
        rustix::fs::chown(&target, Some(rustix::fs::Uid::from_raw(1234)), Some(rustix::fs::Gid::from_raw(1234)))
            .unwrap();
        let mut opts = RestoreOptions::new(&target);
        opts.fidelity = fidelity;
        let out = restore(Arc::clone(&repo), RestoreSource::Tree(root), opts).await.unwrap();
        let f = target.join("suid");
        let meta = std::fs::metadata(&f).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let shared_mode = std::fs::metadata(target.join("shared")).unwrap().permissions().mode() & 0o7777;
        let device = std::fs::symlink_metadata(target.join("null")).map(|m| m.file_type().is_char_device());
        match fidelity {
            Fidelity::Full => {
                assert_eq!((mode, shared_mode, meta.uid()), (0o4755, 0o2775, 0), "{:?}", out.warnings);
                assert!(xattr(&f, "security.capability").is_some(), "file capability restored");
                assert_eq!(xattr(&f, "trusted.note").as_deref(), Some(&b"t"[..]));
                assert!(device.unwrap(), "device node restored");
            }
            Fidelity::Confined => {
                assert_eq!((mode, shared_mode), (0o755, 0o775), "set-id bits cleared: {:?}", out.warnings);
                assert_eq!((meta.uid(), meta.gid()), (1234, 1234), "root's file belongs to the volume's owner");
                assert_eq!(xattr(&f, "security.capability"), None, "no file capability");
                assert_eq!(xattr(&f, "trusted.note"), None);
                assert_eq!(xattr(&f, "user.keep").as_deref(), Some(&b"u"[..]), "ordinary attributes kept");
                assert!(device.is_err(), "no device node");
                let w = out.warnings.join("\n");
                for expected in [
                    "null: confined restore: device node not restored",
                    "suid: confined restore",
                    "shared: confined restore",
                ] {
                    assert!(w.contains(expected), "warning {expected:?} missing:\n{w}");
                }
            }
        }
    }
}

/// Records which keys were downloaded whole.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn hoard_core::store::Store>,
    gets: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl hoard_core::store::Store for Recording {
    async fn put(&self, key: &str, data: Bytes) -> hoard_core::Result<()> {
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> hoard_core::Result<Bytes> {
        self.gets.lock().unwrap().push(key.to_string());
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> hoard_core::Result<Bytes> {
        self.inner.get_range(key, range).await
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
}

/// A bucket writer plants a 20 MiB object among the snapshots (well named: the hash of its
/// bytes). Listing snapshots reports it damaged from its listed size, without downloading it.
#[tokio::test]
async fn an_oversized_planted_snapshot_is_refused_from_the_listing() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recording { inner: local_store(tmp.path()), gets: Default::default() });
    let store: Arc<dyn hoard_core::store::Store> = rec.clone();
    let repo = init_repo(Arc::clone(&store)).await;
    let planted = Bytes::from(vec![7u8; 20 * 1024 * 1024]);
    let key = format!("snapshots/{}", hoard_core::Id::of_bytes(&planted).to_hex());
    store.put(&key, planted).await.unwrap();

    assert!(repo.list_snapshots().await.unwrap().is_empty());
    let damaged = repo.damaged();
    assert!(damaged.iter().any(|d| d.object == key && d.reason.contains("not downloaded")), "{damaged:?}");
    assert!(!rec.gets.lock().unwrap().contains(&key), "the oversized object was downloaded");
}

/// A bucket writer replaces `config` with 20 MiB. Opening reads at most one byte more than a
/// config may hold and refuses it.
#[tokio::test]
async fn an_oversized_config_is_never_downloaded_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recording { inner: local_store(tmp.path()), gets: Default::default() });
    let store: Arc<dyn hoard_core::store::Store> = rec.clone();
    init_repo(Arc::clone(&store)).await;
    store.delete("config").await.unwrap();
    store.put("config", Bytes::from(vec![b' '; 20 * 1024 * 1024])).await.unwrap();
    rec.gets.lock().unwrap().clear();

    let e = Repository::open(Arc::clone(&store), &Password::new("pw")).await.unwrap_err();
    assert!(matches!(e, hoard_core::Error::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("too large"), "{e}");
    assert!(!rec.gets.lock().unwrap().iter().any(|k| k == "config"), "the oversized config was downloaded");
}

/// New key slots have a floor (memory × passes ≥ 19 MiB × 2) unless a weak one is asked for;
/// existing weak slots still open.
#[tokio::test]
async fn new_key_slots_are_not_weaker_than_the_floor() {
    let tmp = tempfile::tempdir().unwrap();
    let weak = KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 };
    let e = Repository::init(
        local_store(tmp.path()),
        &Password::new("pw"),
        InitOptions { kdf: weak, ..Default::default() },
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("too weak"), "{e}");
    assert!(!tmp.path().join("repo/config").exists(), "nothing written");

    let (store, repo) = new_repo(tmp.path()).await;
    let e = repo.add_key(&Password::new("other"), weak, false).await.unwrap_err();
    assert!(e.to_string().contains("too weak"), "{e}");
    let floor = KdfParams { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 };
    repo.add_key(&Password::new("other"), floor, false).await.unwrap();
    Repository::open(Arc::clone(&store), &Password::new("other")).await.unwrap();
    Repository::open(store, &Password::new("pw")).await.expect("the weak slot made on request still opens");
}

/// A wipe deletes the repository's own objects and nothing else that shares its location
/// (another application's files, look-alike names), and a password that does not open the
/// repository cannot start one.
#[tokio::test]
async fn a_wipe_deletes_only_the_repositorys_own_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, repo) = new_repo(tmp.path()).await;
    let writer = BlobWriter::start(Arc::clone(&repo), WriterConfig::default());
    let sink = writer.sink();
    tokio::task::spawn_blocking(move || sink.add_bytes(BlobType::Data, Bytes::from_static(b"some data")))
        .await
        .unwrap()
        .unwrap();
    writer.finish().await.unwrap();
    let foreign = [
        "app/database.db",
        "packs/README",
        "packs/zz/not-a-pack",
        "keys/backup-of-my-ssh-key",
        "snapshots/2026-12-01.tar",
        "configuration.yaml",
    ];
    for k in foreign {
        store.put(k, Bytes::from_static(b"not hoard's")).await.unwrap();
    }
    let ours: Vec<String> =
        store.list("").await.unwrap().into_iter().map(|o| o.key).filter(|k| !foreign.contains(&k.as_str())).collect();
    assert!(ours.iter().any(|k| k.starts_with("packs/")) && ours.contains(&"config".to_string()), "{ours:?}");
    assert!(ours.iter().all(|k| hoard_core::repo::wipe_rank(k).is_some()), "{ours:?}");

    assert!(
        Repository::open(Arc::clone(&store), &Password::new("wrong")).await.is_err(),
        "no wipe without the password"
    );
    let repo = Arc::into_inner(repo).expect("sole owner");
    let wiped = repo.wipe().await.unwrap();
    assert_eq!(wiped.objects, ours.len());
    let left: Vec<String> = store.list("").await.unwrap().into_iter().map(|o| o.key).collect();
    let mut want: Vec<String> = foreign.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(left, want);
}

/// A planted 20 MiB lock object is reported damaged from its listed size, never downloaded,
/// and a snapshot named by its id is read with a bounded range.
#[tokio::test]
async fn oversized_locks_and_snapshots_are_never_downloaded_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recording { inner: local_store(tmp.path()), gets: Default::default() });
    let store: Arc<dyn hoard_core::store::Store> = rec.clone();
    let repo = init_repo(Arc::clone(&store)).await;
    let planted = Bytes::from(vec![9u8; 20 * 1024 * 1024]);
    let id = hoard_core::Id::of_bytes(&planted);
    for dir in ["locks", "snapshots"] {
        store.put(&format!("{dir}/{}", id.to_hex()), planted.clone()).await.unwrap();
    }

    let locks = hoard_core::lock::list_locks(&repo).await.unwrap();
    let (_, planted_lock) = locks.iter().find(|(l, _)| *l == id).expect("listed");
    let e = planted_lock.as_ref().unwrap_err();
    assert!(e.to_string().contains("not downloaded"), "{e}");
    let e = repo.load_snapshot(&id).await.unwrap_err();
    assert!(matches!(e, hoard_core::Error::Corrupt { .. }), "{e}");
    let gets = rec.gets.lock().unwrap();
    assert!(!gets.iter().any(|k| k.ends_with(&id.to_hex())), "downloaded whole: {gets:?}");
}

/// An emptied `config` is damage (exit code 14 in the CLI), not a storage failure to retry.
#[tokio::test]
async fn an_empty_config_is_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let store = local_store(tmp.path());
    init_repo(Arc::clone(&store)).await;
    store.delete("config").await.unwrap();
    store.put("config", Bytes::new()).await.unwrap();
    let e = Repository::open(store, &Password::new("pw")).await.unwrap_err();
    assert!(matches!(e, hoard_core::Error::Corrupt { .. }), "{e:?}");
}
