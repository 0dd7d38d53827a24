//! Mounts inside and above volumes, with real mounts (tests run as root; without the right to
//! mount they skip, except in CI): a backup order stops at the volume root's mount (a tmpfs and
//! a bind mount inside the volume are stored as empty directories), a restore order writes
//! nothing into a mount inside its target, and a mount on the way to the volume directory is
//! refused while the volume directory itself may be a mount point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use hoard_agent::volume::{KubeletRoot, VolumeError, plan};
use hoard_api::agent::v1::{BackupOrder, Phase, RestoreOrder};
use hoard_testkit::kubelet::{TestMount, bind_mount, files_containing, mount_or_skip, mount_tmpfs};
use hoard_testkit::{KubeletVolume, KubeletVolumeKind, make_kubelet_tree, make_test_pki, manifest};

const LONG: Duration = Duration::from_secs(120);

fn phase(p: &hoard_api::agent::v1::Progress) -> Phase {
    Phase::try_from(p.phase).unwrap()
}

/// Path, content hash and mtime of an entry.
type Seen = (Vec<u8>, Option<[u8; 32]>, (i64, u64));

/// (path, content, mtime) of every entry below `dir`, for "untouched" checks.
fn state(dir: &Path) -> Vec<Seen> {
    manifest(dir).into_iter().map(|(p, e)| (p, e.content, e.mtime)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_stop_at_mounts_inside_the_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = make_kubelet_tree(&tmp.path().join("kubelet"));
    let marker = tree.canary_marker.clone();
    // Outside every volume, on the same filesystem: what the bind mounts show.
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(outside.join("nested")).unwrap();
    std::fs::write(outside.join("secret"), [&marker[..], b" outside/secret"].concat()).unwrap();
    std::fs::write(outside.join("nested/deep"), [&marker[..], b" outside/nested/deep"].concat()).unwrap();
    let src = &tree.volumes[1];
    let mut mounts: Vec<TestMount> = Vec::new();
    let Some(m) = mount_or_skip(mount_tmpfs(&src.data_dir.join("inner-tmpfs"))) else { return };
    mounts.push(m);
    std::fs::write(src.data_dir.join("inner-tmpfs/on-tmpfs"), [&marker[..], b" tmpfs"].concat()).unwrap();
    mounts.push(bind_mount(&outside, &src.data_dir.join("sub/inner-bind")).unwrap());

    let pki = make_test_pki(&tmp.path().join("pki"), NODE);
    let repo_dir = tmp.path().join("repo");
    init_repo(&repo_dir).await;
    let agent = Agent::start(&tree.root, &pki, &tmp.path().join("work"), &[]);
    let mut client = agent.client(&pki).await;
    let order = BackupOrder {
        order_id: "mounts-backup".into(),
        volume: Some(identity(src)),
        repository: Some(repo_msg(&repo_dir)),
        ..Default::default()
    };
    let done = finish(client.backup(order).await, LONG).await.unwrap();
    assert_eq!(phase(&done), Phase::Done, "{done:?}");
    let snapshot = done.result.unwrap().snapshot_id;
    let repo = open_repo(&repo_dir).await;
    let restored = tmp.path().join("restored");
    core_restore(&repo, &snapshot, &restored).await;
    let found = files_containing(&restored, &marker);
    assert!(found.is_empty(), "the snapshot holds files from mounts inside the volume: {found:?}");
    // The mount points themselves are kept, as empty directories; the rest of the volume is there.
    for d in ["inner-tmpfs", "sub/inner-bind"] {
        let p = restored.join(d);
        assert!(p.is_dir(), "{d} missing");
        assert_eq!(std::fs::read_dir(&p).unwrap().count(), 0, "{d} is not empty in the snapshot");
    }
    assert_eq!(
        std::fs::read(restored.join("sub/deeper/small")).unwrap(),
        std::fs::read(src.data_dir.join("sub/deeper/small")).unwrap()
    );

    // Restore with overwrite into a volume whose `sub` is a tmpfs and whose `inner-tmpfs` is a
    // bind mount of the outside directory: nothing is written into either.
    let target = &tree.empty.data_dir;
    let Some(m) = mount_or_skip(mount_tmpfs(&target.join("sub"))) else { return };
    mounts.push(m);
    std::fs::write(target.join("sub/mine"), b"tmpfs content").unwrap();
    mounts.push(bind_mount(&outside, &target.join("inner-tmpfs")).unwrap());
    let (sub_before, outside_before) = (state(&target.join("sub")), state(&outside));
    let order = RestoreOrder {
        order_id: "mounts-restore".into(),
        volume: Some(identity(&tree.empty)),
        repository: Some(repo_msg(&repo_dir)),
        snapshot: snapshot.clone(),
        overwrite: hoard_api::agent::v1::Overwrite::Always as i32,
        ..Default::default()
    };
    let ev = finish(client.restore(order).await, LONG).await.unwrap();
    assert_eq!(phase(&ev), Phase::Failed, "{ev:?}");
    let failed = &ev.result.as_ref().unwrap().failed_files;
    for d in ["sub", "inner-tmpfs"] {
        assert!(failed.iter().any(|f| f.starts_with(&format!("{d}:")) && f.contains("mount point")), "{d}: {failed:?}");
    }
    assert_eq!(state(&target.join("sub")), sub_before, "restore wrote into the tmpfs inside the target");
    assert_eq!(state(&outside), outside_before, "restore wrote through the bind mount");
    // Everything not below a mount was restored.
    assert_eq!(
        std::fs::read(target.join("readme.txt")).unwrap(),
        std::fs::read(src.data_dir.join("readme.txt")).unwrap()
    );
    drop(mounts);
}

/// A mount above the volume directory (over a pod's `volumes`) is refused; a volume directory
/// that is itself a mount point (a memory emptyDir, an NFS volume) opens, and backs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_above_the_volume_is_refused_the_volume_itself_may_be_one() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = make_kubelet_tree(&tmp.path().join("kubelet"));
    let uid = "d0000000-0000-4000-8000-00000000000d";
    let volumes = tree.root.join(uid).join("volumes");
    let mut mounts = Vec::new();
    let Some(m) = mount_or_skip(mount_tmpfs(&volumes)) else { return };
    mounts.push(m);
    let data_dir = volumes.join("kubernetes.io~empty-dir/under-mount");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("f"), b"x").unwrap();
    let above = KubeletVolume {
        pod_uid: uid.into(),
        volume_name: "under-mount".into(),
        kind: KubeletVolumeKind::EmptyDir,
        data_dir,
    };
    let root = KubeletRoot::open(&tree.root).unwrap();
    match root.open_volume(&plan(&identity(&above), NODE).unwrap()) {
        Err(VolumeError::Refused(why)) => assert!(why.contains("mount point"), "{why}"),
        other => panic!("a mount above the volume was not refused: {other:?}"),
    }

    // The volume directory itself a tmpfs: opens and backs up.
    let own = &tree.volumes[4];
    assert_eq!(own.kind, KubeletVolumeKind::EmptyDir);
    let Some(m) = mount_or_skip(mount_tmpfs(&own.data_dir)) else { return };
    mounts.push(m);
    std::fs::write(own.data_dir.join("in-memory"), b"memory emptyDir").unwrap();
    root.open_volume(&plan(&identity(own), NODE).unwrap()).expect("a volume directory that is a mount point");
    let pki = make_test_pki(&tmp.path().join("pki"), NODE);
    let repo_dir = tmp.path().join("repo");
    init_repo(&repo_dir).await;
    let agent = Agent::start(&tree.root, &pki, &tmp.path().join("work"), &[]);
    let mut client = agent.client(&pki).await;
    let order = BackupOrder {
        order_id: "own-mount".into(),
        volume: Some(identity(own)),
        repository: Some(repo_msg(&repo_dir)),
        ..Default::default()
    };
    let done = finish(client.backup(order).await, LONG).await.unwrap();
    assert_eq!(phase(&done), Phase::Done, "{done:?}");
    let repo = open_repo(&repo_dir).await;
    let restored = tmp.path().join("restored");
    core_restore(&repo, &done.result.unwrap().snapshot_id, &restored).await;
    assert_eq!(std::fs::read(restored.join("in-memory")).unwrap(), b"memory emptyDir");
    drop(mounts);
}
