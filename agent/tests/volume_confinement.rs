//! Volume resolution against a fake kubelet tree: genuine volumes open, hostile layouts are
//! refused, and no generated identity ever opens anything but a genuine volume directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

use common::{NODE, identity};
use hoard_agent::volume::{KubeletRoot, VolumeError, plan};
use hoard_api::agent::v1::volume_identity::Source;
use hoard_api::agent::v1::{EmptyDirSource, PersistentVolumeSource, persistent_volume_source::Plugin};
use hoard_testkit::{kubelet, make_kubelet_tree};

fn dev_ino(fd: &std::os::fd::OwnedFd) -> (u64, u64) {
    let st = rustix::fs::fstat(fd).unwrap();
    (st.st_dev, st.st_ino)
}

#[test]
fn genuine_volumes_open_and_hostile_ones_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = make_kubelet_tree(tmp.path());
    let root = KubeletRoot::open(&tree.root).unwrap();
    for v in tree.volumes.iter().chain(std::iter::once(&tree.empty)) {
        let p = plan(&identity(v), NODE).unwrap();
        let open = root.open_volume(&p).unwrap_or_else(|e| panic!("{}: {e}", v.volume_name));
        let m = std::fs::metadata(&v.data_dir).unwrap();
        assert_eq!(dev_ino(&open.dir), (m.dev(), m.ino()), "{}", v.volume_name);
    }
    for v in &tree.hostile {
        let r = plan(&identity(v), NODE).and_then(|p| root.open_volume(&p));
        match r {
            Err(VolumeError::Refused(_)) => {}
            other => panic!("{} of {} was not refused: {other:?}", v.volume_name, v.pod_uid),
        }
    }
    // A volume that does not exist is "not found", and a wrong node is refused before any I/O.
    let mut id = identity(&tree.volumes[1]);
    id.volume_name = "absent".into();
    assert!(matches!(root.open_volume(&plan(&id, NODE).unwrap()), Err(VolumeError::NotFound(_))));
    assert!(matches!(plan(&identity(&tree.volumes[0]), "node-b"), Err(VolumeError::WrongNode { .. })));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

    /// Identities built from hostile pieces (traversal, absolute names, NUL, slashes, other
    /// pods' UIDs, names of symlinked entries) either fail or open exactly a genuine volume
    /// directory of the pod they name.
    #[test]
    fn generated_identities_are_refused_or_confined(
        uid_pick in 0usize..8,
        name in "(data|cache|scratch|shared|logs|restore-target|other-pod|host-root|mount-link|\\.\\.|\\.|/|/etc|\\.\\./\\.\\.|[a-z]{1,4}/\\.\\.|[a-z]{0,3}\\x00[a-z]{0,3}|\\PC{0,12})",
        pv in "(pvc-aaaa-0001|pvc-bbbb-0002|nfs-pv-b|kubelet-root|pvc-evil-mount|pvc-other-driver|pvc-aaaa-0001-copy|\\.\\.|/|\\.|[a-z.]{1,6}|\\PC{0,10})",
        kind in 0u8..4,
        node in "(node-a|node-b|\\.\\.|)",
    ) {
        thread_local! {
            static TREE: (tempfile::TempDir, hoard_testkit::KubeletTree) = {
                let tmp = tempfile::tempdir().unwrap();
                let tree = make_kubelet_tree(tmp.path());
                (tmp, tree)
            };
        }
        TREE.with(|(_, tree)| {
            let uids = [
                kubelet::POD_A, kubelet::POD_B, kubelet::POD_EVIL, kubelet::POD_LINK, kubelet::POD_VOLUMES_LINK,
                "../a0000000-0000-4000-8000-00000000000a", "/", "a0000000-0000-4000-8000-00000000000a/..",
            ];
            let root = KubeletRoot::open(&tree.root).unwrap();
            let mut id = identity(&tree.volumes[0]);
            id.node_name = node.clone();
            id.pod_uid = uids[uid_pick].to_string();
            id.volume_name = name.clone();
            id.source = Some(match kind {
                0 => Source::EmptyDir(EmptyDirSource {}),
                1 => Source::Pvc(PersistentVolumeSource {
                    pv_name: pv.clone(), plugin: Some(Plugin::CsiDriver(kubelet::CSI_DRIVER.into())), ..Default::default()
                }),
                2 => Source::Pvc(PersistentVolumeSource {
                    pv_name: pv.clone(), plugin: Some(Plugin::InTreePlugin("kubernetes.io/nfs".into())), ..Default::default()
                }),
                _ => Source::CsiInline(hoard_api::agent::v1::CsiInlineSource { driver: kubelet::INLINE_DRIVER.into() }),
            });
            if let Ok(open) = plan(&id, NODE).and_then(|p| root.open_volume(&p)) {
                let genuine: HashSet<(u64, u64)> = tree
                    .volumes
                    .iter()
                    .chain(std::iter::once(&tree.empty))
                    .filter(|v| v.pod_uid == id.pod_uid)
                    .map(|v| { let m = std::fs::metadata(&v.data_dir).unwrap(); (m.dev(), m.ino()) })
                    .collect();
                assert!(genuine.contains(&dev_ino(&open.dir)), "{id:?} opened {}", open.path.display());
                assert_eq!(id.node_name, NODE);
            }
        });
    }
}
