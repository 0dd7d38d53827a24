//! A fake kubelet pod directory for node-agent tests: several pods with CSI, in-tree and
//! emptyDir volumes laid out as the kubelet does, hostile entries (volume directories that are
//! symlinks to another pod or to `/`, a CSI driver mismatch), and canary files planted
//! everywhere outside the volumes.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::{random_bytes, text_bytes};

/// How a volume is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletVolumeKind {
    /// A PVC bound to a CSI PV: `kubernetes.io~csi/<pv>/mount` plus `vol_data.json`.
    Csi {
        pv_name: String,
        driver: String,
    },
    /// A PVC bound to an in-tree PV: `kubernetes.io~<plugin>/<pv>`.
    InTree {
        pv_name: String,
        plugin: String,
    },
    EmptyDir,
    /// An inline (ephemeral) CSI volume: `kubernetes.io~csi/<volume-name>/mount`.
    CsiInline {
        driver: String,
    },
}

/// One volume of one pod.
#[derive(Debug, Clone)]
pub struct KubeletVolume {
    pub pod_uid: String,
    pub volume_name: String,
    pub kind: KubeletVolumeKind,
    /// The directory whose content is the volume (where the kubelet mounted it).
    pub data_dir: PathBuf,
}

/// What [`make_kubelet_tree`] built.
#[derive(Debug, Clone)]
pub struct KubeletTree {
    /// The pod directory (what `--kubelet-root` points at).
    pub root: PathBuf,
    /// Genuine volumes with data.
    pub volumes: Vec<KubeletVolume>,
    /// A genuine, empty CSI volume (a restore target).
    pub empty: KubeletVolume,
    /// Volumes whose directory (or a component above it) is a symlink or whose CSI metadata
    /// names another driver: every one must be refused.
    pub hostile: Vec<KubeletVolume>,
    /// Files outside every volume; their content must never appear in a snapshot.
    pub canaries: Vec<PathBuf>,
    /// The bytes every canary file contains (and nothing else does).
    pub canary_marker: Vec<u8>,
}

impl KubeletTree {
    /// The volume of `pod_uid` named `volume_name`, genuine or hostile.
    pub fn volume(&self, pod_uid: &str, volume_name: &str) -> Option<&KubeletVolume> {
        self.volumes
            .iter()
            .chain(std::iter::once(&self.empty))
            .chain(self.hostile.iter())
            .find(|v| v.pod_uid == pod_uid && v.volume_name == volume_name)
    }
}

/// Pod UIDs used by [`make_kubelet_tree`].
pub const POD_A: &str = "a0000000-0000-4000-8000-00000000000a";
pub const POD_B: &str = "b0000000-0000-4000-8000-00000000000b";
pub const POD_EVIL: &str = "e0000000-0000-4000-8000-00000000000e";
/// A pod directory that is itself a symlink to [`POD_A`].
pub const POD_LINK: &str = "f0000000-0000-4000-8000-00000000000f";
/// A pod whose `volumes` directory is a symlink to [`POD_A`]'s.
pub const POD_VOLUMES_LINK: &str = "c0000000-0000-4000-8000-00000000000c";

pub const CSI_DRIVER: &str = "csi.hoard.test";
pub const INLINE_DRIVER: &str = "inline.hoard.test";

fn vol_data(dir: &Path, driver: &str, spec_vol_id: &str) {
    let json = format!(
        r#"{{"attachmentID":"csi-0123","driverName":"{driver}","nodeName":"node-a","specVolID":"{spec_vol_id}","volumeHandle":"handle-{spec_vol_id}","volumeLifecycleMode":"Persistent"}}"#
    );
    std::fs::write(dir.join("vol_data.json"), json).unwrap();
}

/// Fills a volume with a small tree, plus symlinks that point at canaries (they must be stored
/// as links, never followed); as root, some entries belong to other users and groups.
fn fill(dir: &Path, seed: u64, outside_canary: &Path) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::write(dir.join("readme.txt"), text_bytes(10_000 + seed as usize, seed)).unwrap();
    std::fs::write(dir.join("sub/blob.bin"), random_bytes(300 * 1024 + seed as usize, seed + 100)).unwrap();
    std::fs::write(dir.join("sub/deeper/small"), format!("volume seed {seed}\n")).unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    symlink("../../canary", dir.join("link-to-pod-canary")).unwrap();
    symlink(outside_canary, dir.join("link-to-outside-canary")).unwrap();
    symlink("/", dir.join("link-to-root")).unwrap();
    // As root (CI), files of other owners: a restore that dropped ownership would differ.
    if rustix::process::geteuid().is_root() {
        for (p, uid, gid) in [
            ("readme.txt", 1000, 1000),
            ("sub/blob.bin", 2000 + seed as u32, 3000),
            ("sub/deeper", 4000, 4001),
            ("empty", 0, 5000),
            ("link-to-root", 6000, 6001),
        ] {
            std::os::unix::fs::lchown(dir.join(p), Some(uid), Some(gid)).unwrap();
        }
    }
}

/// Builds a kubelet pod directory at `root/pods` and returns its description.
///
/// Pods: [`POD_A`] (CSI PVC, emptyDir, inline CSI), [`POD_B`] (in-tree NFS PV, emptyDir, and
/// an empty CSI PVC), [`POD_EVIL`] (volume directories that are symlinks into pod A, to `/`
/// and to the kubelet root; a `mount` that is a symlink; a CSI driver mismatch), [`POD_LINK`]
/// (the pod directory is a symlink) and [`POD_VOLUMES_LINK`] (its `volumes` is a symlink).
pub fn make_kubelet_tree(root: &Path) -> KubeletTree {
    let pods = root.join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    let marker = format!("HOARD-CANARY-{:016x}", u64::from_le_bytes(random_bytes(8, 77)[..8].try_into().unwrap()));
    let mut canaries = Vec::new();
    let mut plant = |p: PathBuf| {
        std::fs::write(&p, format!("{marker} {}\n", p.display())).unwrap();
        canaries.push(p);
    };
    let outside = root.join("canary-outside");
    plant(outside.clone());
    plant(pods.join("canary"));

    let vols = |uid: &str| pods.join(uid).join("volumes");
    let mut volumes = Vec::new();
    let mut seed = 1;
    let add = |uid: &str, name: &str, kind: KubeletVolumeKind, canaries: &mut dyn FnMut(PathBuf)| {
        let base = vols(uid);
        let (plugin_dir, data_dir) = match &kind {
            KubeletVolumeKind::Csi { pv_name, driver } => {
                let d = base.join("kubernetes.io~csi").join(pv_name);
                std::fs::create_dir_all(d.join("mount")).unwrap();
                vol_data(&d, driver, pv_name);
                canaries(d.join("canary"));
                (base.join("kubernetes.io~csi"), d.join("mount"))
            }
            KubeletVolumeKind::CsiInline { driver } => {
                let d = base.join("kubernetes.io~csi").join(name);
                std::fs::create_dir_all(d.join("mount")).unwrap();
                vol_data(&d, driver, name);
                canaries(d.join("canary"));
                (base.join("kubernetes.io~csi"), d.join("mount"))
            }
            KubeletVolumeKind::InTree { pv_name, plugin } => {
                let p = base.join(plugin.replace('/', "~"));
                (p.clone(), p.join(pv_name))
            }
            KubeletVolumeKind::EmptyDir => {
                let p = base.join("kubernetes.io~empty-dir");
                (p.clone(), p.join(name))
            }
        };
        std::fs::create_dir_all(&data_dir).unwrap();
        if !plugin_dir.join("canary").exists() {
            canaries(plugin_dir.join("canary"));
        }
        if !base.join("canary").exists() {
            canaries(base.join("canary"));
            canaries(base.parent().unwrap().join("canary"));
        }
        KubeletVolume { pod_uid: uid.into(), volume_name: name.into(), kind, data_dir }
    };
    let mut planted = Vec::new();
    let mut collect = |p: PathBuf| planted.push(p);

    let csi = |pv: &str, driver: &str| KubeletVolumeKind::Csi { pv_name: pv.into(), driver: driver.into() };
    for (uid, name, kind) in [
        (POD_A, "data", csi("pvc-aaaa-0001", CSI_DRIVER)),
        (POD_A, "cache", KubeletVolumeKind::EmptyDir),
        (POD_A, "scratch", KubeletVolumeKind::CsiInline { driver: INLINE_DRIVER.into() }),
        (POD_B, "shared", KubeletVolumeKind::InTree { pv_name: "nfs-pv-b".into(), plugin: "kubernetes.io/nfs".into() }),
        (POD_B, "logs", KubeletVolumeKind::EmptyDir),
    ] {
        let v = add(uid, name, kind, &mut collect);
        volumes.push(v);
    }
    let empty = add(POD_B, "restore-target", csi("pvc-bbbb-0002", CSI_DRIVER), &mut collect);

    // Hostile pod: real directories where needed, then symlinks in place of volume directories.
    let evil = vols(POD_EVIL);
    let mut hostile = Vec::new();
    let link = |target: &Path, at: &Path| {
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        symlink(target, at).unwrap();
    };
    let a_cache = vols(POD_A).join("kubernetes.io~empty-dir/cache");
    let at = evil.join("kubernetes.io~empty-dir/other-pod");
    link(Path::new(&format!("../../../{POD_A}/volumes/kubernetes.io~empty-dir/cache")), &at);
    hostile.push(KubeletVolume {
        pod_uid: POD_EVIL.into(),
        volume_name: "other-pod".into(),
        kind: KubeletVolumeKind::EmptyDir,
        data_dir: at,
    });
    let at = evil.join("kubernetes.io~empty-dir/absolute-other-pod");
    link(&a_cache, &at);
    hostile.push(KubeletVolume {
        pod_uid: POD_EVIL.into(),
        volume_name: "absolute-other-pod".into(),
        kind: KubeletVolumeKind::EmptyDir,
        data_dir: at,
    });
    let at = evil.join("kubernetes.io~empty-dir/host-root");
    link(Path::new("/"), &at);
    hostile.push(KubeletVolume {
        pod_uid: POD_EVIL.into(),
        volume_name: "host-root".into(),
        kind: KubeletVolumeKind::EmptyDir,
        data_dir: at,
    });
    let at = evil.join("kubernetes.io~nfs/kubelet-root");
    link(Path::new("../../../.."), &at);
    hostile.push(KubeletVolume {
        pod_uid: POD_EVIL.into(),
        volume_name: "nfs-link".into(),
        kind: KubeletVolumeKind::InTree { pv_name: "kubelet-root".into(), plugin: "kubernetes.io/nfs".into() },
        data_dir: at,
    });
    // A CSI PV directory that is a symlink to pod A's PV directory (vol_data.json would match).
    let at = evil.join("kubernetes.io~csi/pvc-aaaa-0001");
    link(&vols(POD_A).join("kubernetes.io~csi/pvc-aaaa-0001"), &at);
    hostile.push(KubeletVolume {
        pod_uid: POD_EVIL.into(),
        volume_name: "stolen".into(),
        kind: csi("pvc-aaaa-0001", CSI_DRIVER),
        data_dir: at.join("mount"),
    });
    // A genuine CSI directory whose `mount` is a symlink to `/`.
    let d = evil.join("kubernetes.io~csi/pvc-evil-mount");
    std::fs::create_dir_all(&d).unwrap();
    vol_data(&d, CSI_DRIVER, "pvc-evil-mount");
    link(Path::new("/"), &d.join("mount"));
    hostile.push(KubeletVolume {
        pod_uid: POD_EVIL.into(),
        volume_name: "mount-link".into(),
        kind: csi("pvc-evil-mount", CSI_DRIVER),
        data_dir: d.join("mount"),
    });
    // A CSI volume mounted by another driver than the order will claim.
    let d = evil.join("kubernetes.io~csi/pvc-other-driver");
    std::fs::create_dir_all(d.join("mount")).unwrap();
    vol_data(&d, "other.csi.test", "pvc-other-driver");
    fill(&d.join("mount"), 99, &outside);
    hostile.push(KubeletVolume {
        pod_uid: POD_EVIL.into(),
        volume_name: "wrong-driver".into(),
        kind: csi("pvc-other-driver", CSI_DRIVER),
        data_dir: d.join("mount"),
    });
    // A symlinked vol_data.json (pointing at pod A's) is refused too.
    let d = evil.join("kubernetes.io~csi/pvc-aaaa-0001-copy");
    std::fs::create_dir_all(d.join("mount")).unwrap();
    link(&vols(POD_A).join("kubernetes.io~csi/pvc-aaaa-0001/vol_data.json"), &d.join("vol_data.json"));
    hostile.push(KubeletVolume {
        pod_uid: POD_EVIL.into(),
        volume_name: "vol-data-link".into(),
        kind: csi("pvc-aaaa-0001-copy", CSI_DRIVER),
        data_dir: d.join("mount"),
    });
    for p in [evil.join("canary"), evil.join("kubernetes.io~csi/canary"), pods.join(POD_EVIL).join("canary")] {
        collect(p);
    }
    // Whole pod directory, and a pod's volumes directory, as symlinks to pod A.
    symlink(POD_A, pods.join(POD_LINK)).unwrap();
    hostile.push(KubeletVolume {
        pod_uid: POD_LINK.into(),
        volume_name: "cache".into(),
        kind: KubeletVolumeKind::EmptyDir,
        data_dir: pods.join(POD_LINK).join("volumes/kubernetes.io~empty-dir/cache"),
    });
    std::fs::create_dir_all(pods.join(POD_VOLUMES_LINK)).unwrap();
    symlink(format!("../{POD_A}/volumes"), pods.join(POD_VOLUMES_LINK).join("volumes")).unwrap();
    hostile.push(KubeletVolume {
        pod_uid: POD_VOLUMES_LINK.into(),
        volume_name: "cache".into(),
        kind: KubeletVolumeKind::EmptyDir,
        data_dir: pods.join(POD_VOLUMES_LINK).join("volumes/kubernetes.io~empty-dir/cache"),
    });

    planted.sort();
    planted.dedup();
    for p in planted {
        plant(p);
    }
    for (i, v) in volumes.iter().enumerate() {
        seed += i as u64;
        fill(&v.data_dir, seed, &outside);
    }
    KubeletTree { root: pods, volumes, empty, hostile, canaries, canary_marker: marker.into_bytes() }
}

/// Every regular file below `dir` (not following symlinks) whose content contains `marker`.
pub fn files_containing(dir: &Path, marker: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && let Ok(data) = std::fs::read(e.path())
                && data.windows(marker.len()).any(|w| w == marker)
            {
                found.push(e.path());
            }
        }
    }
    found
}

/// A mount made by a test (tests run as root in CI); lazily unmounted when dropped, so a test
/// that fails halfway leaves nothing mounted.
#[derive(Debug)]
pub struct TestMount {
    pub path: PathBuf,
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn run_mount(args: &[&std::ffi::OsStr], at: &Path) -> Result<TestMount, String> {
    std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
    let out = std::process::Command::new("mount")
        .args(args)
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!("mount {}: {}", at.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(TestMount { path: at.to_path_buf() })
}

/// Mounts a fresh 16 MiB tmpfs (another filesystem) at `at`, creating the directory.
pub fn mount_tmpfs(at: &Path) -> Result<TestMount, String> {
    mount_tmpfs_sized(at, 16 << 20)
}

/// Mounts a fresh tmpfs of `bytes` at `at`, creating the directory: a small one is a full disk.
pub fn mount_tmpfs_sized(at: &Path, bytes: u64) -> Result<TestMount, String> {
    let size = format!("size={bytes}");
    run_mount(&["-t".as_ref(), "tmpfs".as_ref(), "-o".as_ref(), size.as_ref(), "tmpfs".as_ref()], at)
}

/// Resizes the tmpfs mounted at `at` (freeing space without touching its files).
pub fn resize_tmpfs(at: &Path, bytes: u64) -> Result<(), String> {
    let out = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size={bytes}")])
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!("remount {}: {}", at.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Bind-mounts directory `src` at `at` (same filesystem, same device: only the mount differs).
pub fn bind_mount(src: &Path, at: &Path) -> Result<TestMount, String> {
    run_mount(&["--bind".as_ref(), src.as_os_str()], at)
}

/// A mount a test needs: `None` (with a SKIP line) when mounting is not permitted here, unless
/// `CI` is set, where it fails the test instead.
pub fn mount_or_skip(r: Result<TestMount, String>) -> Option<TestMount> {
    match r {
        Ok(m) => Some(m),
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("cannot mount ({e}): in CI tests run as root and must be able to mount");
            }
            eprintln!("SKIP: cannot mount ({e}); run as root to test mounts inside volumes");
            None
        }
    }
}
