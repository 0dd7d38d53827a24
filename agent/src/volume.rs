//! From a volume identity to an open, confined directory under the kubelet pod directory.
//!
//! Two steps, so the rules can be tested without a filesystem:
//! * [`plan`] validates the identity (node, pod UID, names, plugin) and derives the path
//!   components below the kubelet root; it never sees a path from the order.
//! * [`KubeletRoot::open_volume`] opens the kubelet root once (at startup) and then each
//!   component with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//!   relative to the previous one, so a symlink anywhere on the way (a volume directory
//!   pointing at another pod, at `/`, a `mount` link) is refused, never followed. The
//!   components above the volume directory are also opened with `RESOLVE_NO_XDEV`: a mount
//!   on the way (over a pod's `volumes`, say) is refused. The volume directory itself is
//!   normally a mount point (CSI `.../mount`, NFS, a memory emptyDir), so it may be one; what
//!   is mounted inside the volume is kept out by the backup and restore walks (hoard-core's
//!   `one_file_system`), which stop at the volume root's mount.
//!
//! Layout (kubelet's, `~` stands for `/` in plugin names):
//! ```text
//! <root>/<pod-uid>/volumes/kubernetes.io~csi/<pv-name>/mount         PVC, CSI driver
//! <root>/<pod-uid>/volumes/kubernetes.io~csi/<pv-name>/vol_data.json  driverName, specVolID
//! <root>/<pod-uid>/volumes/kubernetes.io~<plugin>/<pv-name>          PVC, in-tree plugin
//! <root>/<pod-uid>/volumes/kubernetes.io~empty-dir/<volume-name>     emptyDir
//! <root>/<pod-uid>/volumes/kubernetes.io~csi/<volume-name>/mount     CSI inline volume
//! ```
//! For CSI volumes `vol_data.json` must name the driver and volume the order names, so an order
//! cannot pass one driver's volume off as another's.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use hoard_api::agent::v1::{VolumeIdentity, persistent_volume_source::Plugin, volume_identity::Source};
use rustix::fs::{Mode, OFlags, ResolveFlags};

/// In-tree plugins whose volumes hold workload data. Everything else (secret, configMap,
/// projected, downwardAPI, hostPath, gitRepo, …) is refused.
pub const IN_TREE_PLUGINS: &[&str] = &[
    "kubernetes.io/aws-ebs",
    "kubernetes.io/azure-disk",
    "kubernetes.io/azure-file",
    "kubernetes.io/cephfs",
    "kubernetes.io/cinder",
    "kubernetes.io/fc",
    "kubernetes.io/gce-pd",
    "kubernetes.io/glusterfs",
    "kubernetes.io/iscsi",
    "kubernetes.io/local-volume",
    "kubernetes.io/nfs",
    "kubernetes.io/portworx-volume",
    "kubernetes.io/rbd",
    "kubernetes.io/vsphere-volume",
];

const CSI_DIR: &str = "kubernetes.io~csi";
const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
pub const MAX_VOL_DATA: usize = 64 * 1024;

/// Why a volume identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// The identity is malformed (bad UID, unsafe or invalid name, unknown kind).
    #[error("invalid volume identity: {0}")]
    Invalid(String),
    /// The volume is on another node.
    #[error("volume is on node {requested:?}, this agent serves {ours:?}")]
    WrongNode { requested: String, ours: String },
    /// Nothing at the derived location.
    #[error("volume not found: {0}")]
    NotFound(String),
    /// Something is there but may not be used (a symlink, not a directory, a driver mismatch).
    #[error("volume refused: {0}")]
    Refused(String),
    #[error("volume {path}: {message}")]
    Io { path: String, message: String },
}

impl VolumeError {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            VolumeError::Invalid(_) => "invalid",
            VolumeError::WrongNode { .. } => "wrong_node",
            VolumeError::NotFound(_) => "not_found",
            VolumeError::Refused(_) => "refused",
            VolumeError::Io { .. } => "io",
        }
    }
}

/// The kind of volume, as resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    CsiPersistent,
    InTreePersistent,
    EmptyDir,
    CsiInline,
}

/// A validated identity: the path components below the kubelet root, and what to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlan {
    pub kind: VolumeKind,
    /// `[pod-uid, "volumes", plugin-dir, name]`, plus `"mount"` for CSI.
    pub components: Vec<String>,
    /// CSI only: (driverName, specVolID) that `vol_data.json` must record.
    pub csi_check: Option<(String, String)>,
    /// Human-readable identity for logs and snapshot provenance.
    pub display: String,
}

impl VolumePlan {
    /// The path below the kubelet root, for messages.
    pub fn relative_path(&self) -> String {
        self.components.join("/")
    }
}

/// A Kubernetes object UID: a lowercase or uppercase hex UUID, 8-4-4-4-12.
pub fn valid_uid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// DNS-1123 label: 1–63 of `[a-z0-9-]`, starting and ending alphanumeric (pod volume names).
pub fn valid_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// DNS-1123 subdomain: 1–253 of `[a-z0-9.-]`, dot-separated labels (PV, node and driver
/// names). Excludes `.`, `..`, `/`, NUL and every other byte that could change a path.
pub fn valid_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
        })
}

/// CSI driver names: like a subdomain but up to 63 characters (CSI spec); case-insensitive.
fn valid_driver(s: &str) -> bool {
    s.len() <= 63 && valid_subdomain(&s.to_ascii_lowercase())
}

fn invalid(what: &str, value: &str) -> VolumeError {
    // Quote with escapes so NUL or control bytes in hostile input stay visible and harmless.
    VolumeError::Invalid(format!("{what} {:?}", value.chars().take(80).collect::<String>()))
}

/// Validates `id` for the agent of node `ours` and derives where the volume lives.
pub fn plan(id: &VolumeIdentity, ours: &str) -> Result<VolumePlan, VolumeError> {
    if !valid_subdomain(&id.node_name) {
        return Err(invalid("node name", &id.node_name));
    }
    if id.node_name != ours {
        return Err(VolumeError::WrongNode { requested: id.node_name.clone(), ours: ours.to_string() });
    }
    if !valid_uid(&id.pod_uid) {
        return Err(invalid("pod UID", &id.pod_uid));
    }
    if !valid_label(&id.volume_name) {
        return Err(invalid("volume name", &id.volume_name));
    }
    let base =
        |plugin_dir: &str, name: &str| vec![id.pod_uid.clone(), "volumes".into(), plugin_dir.into(), name.into()];
    let (kind, mut components, csi_check) = match &id.source {
        None => return Err(VolumeError::Invalid("volume source is missing (pvc, empty_dir or csi_inline)".into())),
        Some(Source::EmptyDir(_)) => (VolumeKind::EmptyDir, base(EMPTY_DIR, &id.volume_name), None),
        Some(Source::CsiInline(c)) => {
            if !valid_driver(&c.driver) {
                return Err(invalid("CSI driver", &c.driver));
            }
            let check = Some((c.driver.clone(), id.volume_name.clone()));
            (VolumeKind::CsiInline, base(CSI_DIR, &id.volume_name), check)
        }
        Some(Source::Pvc(p)) => {
            if !valid_subdomain(&p.pv_name) {
                return Err(invalid("PV name", &p.pv_name));
            }
            match &p.plugin {
                None => return Err(VolumeError::Invalid("PVC source names neither a CSI driver nor a plugin".into())),
                Some(Plugin::CsiDriver(d)) => {
                    if !valid_driver(d) {
                        return Err(invalid("CSI driver", d));
                    }
                    (VolumeKind::CsiPersistent, base(CSI_DIR, &p.pv_name), Some((d.clone(), p.pv_name.clone())))
                }
                Some(Plugin::InTreePlugin(name)) => {
                    if !IN_TREE_PLUGINS.contains(&name.as_str()) {
                        return Err(invalid("in-tree volume plugin (not a data volume plugin)", name));
                    }
                    let dir = name.replace('/', "~");
                    (VolumeKind::InTreePersistent, base(&dir, &p.pv_name), None)
                }
            }
        }
    };
    if csi_check.is_some() {
        components.push("mount".into());
    }
    // Defence in depth: whatever the rules above allow must be single, ordinary components.
    for c in &components {
        if c.is_empty() || c == "." || c == ".." || c.contains('/') || c.contains('\0') {
            return Err(invalid("path component", c));
        }
    }
    let source = match kind {
        VolumeKind::CsiPersistent | VolumeKind::InTreePersistent => {
            format!("pv {}", components[3])
        }
        VolumeKind::EmptyDir => "emptyDir".to_string(),
        VolumeKind::CsiInline => "csi inline".to_string(),
    };
    let display = format!("node {} pod {} volume {} ({source})", id.node_name, id.pod_uid, id.volume_name);
    Ok(VolumePlan { kind, components, csi_check, display })
}

/// The kubelet pod directory, opened once.
#[derive(Debug)]
pub struct KubeletRoot {
    fd: OwnedFd,
    path: PathBuf,
}

/// An opened, confined volume directory.
#[derive(Debug)]
pub struct OpenVolume {
    pub dir: OwnedFd,
    pub plan: VolumePlan,
    /// `<kubelet-root>/<relative path>`, for messages only; never opened by path.
    pub path: PathBuf,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// Whether opening a component may cross into another mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mounts {
    /// The component must be on the same mount as its parent (`RESOLVE_NO_XDEV`).
    Same,
    /// The component may be a mount point (the volume directory).
    MayCross,
}

fn open_beneath(dir: BorrowedFd<'_>, name: &str, flags: OFlags, mounts: Mounts) -> rustix::io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| rustix::io::Errno::INVAL)?;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = if mounts == Mounts::Same { RESOLVE.union(ResolveFlags::NO_XDEV) } else { RESOLVE };
    match rustix::fs::openat2(dir, cname.as_c_str(), flags, Mode::empty(), resolve) {
        // Kernels before 5.6 (or sandboxes without openat2): a validated single component
        // opened with O_NOFOLLOW gives the same guarantee; a device change stands in for
        // RESOLVE_NO_XDEV (it misses bind mounts of the same filesystem).
        Err(rustix::io::Errno::NOSYS) => {
            let fd = rustix::fs::openat(dir, cname.as_c_str(), flags, Mode::empty())?;
            if mounts == Mounts::Same && rustix::fs::fstat(&fd)?.st_dev != rustix::fs::fstat(dir)?.st_dev {
                return Err(rustix::io::Errno::XDEV);
            }
            Ok(fd)
        }
        r => r,
    }
}

impl KubeletRoot {
    /// Opens the kubelet pod directory (e.g. `/var/lib/kubelet/pods`).
    pub fn open(path: &Path) -> std::io::Result<KubeletRoot> {
        let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(KubeletRoot { fd, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the volume `plan` names, one component at a time, refusing symlinks.
    pub fn open_volume(&self, plan: &VolumePlan) -> Result<OpenVolume, VolumeError> {
        let mut cur: Option<OwnedFd> = None;
        let mut done = String::new();
        for (i, comp) in plan.components.iter().enumerate() {
            if !done.is_empty() {
                done.push('/');
            }
            done.push_str(comp);
            // Before opening `mount`, check the CSI volume's vol_data.json beside it.
            if comp == "mount"
                && i == plan.components.len() - 1
                && let (Some(dir), Some((driver, vol))) = (cur.as_ref(), plan.csi_check.as_ref())
            {
                check_vol_data(dir.as_fd(), driver, vol, &done)?;
            }
            let parent = cur.as_ref().map(|f| f.as_fd()).unwrap_or(self.fd.as_fd());
            let last = i == plan.components.len() - 1;
            let mounts = if last { Mounts::MayCross } else { Mounts::Same };
            let fd = open_beneath(parent, comp, OFlags::RDONLY | OFlags::DIRECTORY, mounts).map_err(|e| match e {
                rustix::io::Errno::NOENT => VolumeError::NotFound(done.clone()),
                rustix::io::Errno::LOOP => VolumeError::Refused(format!("{done} is a symbolic link")),
                // A single validated component cannot escape BENEATH: EXDEV is a mount crossing.
                rustix::io::Errno::XDEV => {
                    VolumeError::Refused(format!("{done} is a mount point above the volume directory"))
                }
                rustix::io::Errno::NOTDIR => VolumeError::Refused(format!("{done} is not a directory")),
                other => VolumeError::Io { path: done.clone(), message: other.to_string() },
            })?;
            cur = Some(fd);
        }
        let dir = cur.ok_or_else(|| VolumeError::Invalid("empty plan".into()))?;
        Ok(OpenVolume { dir, plan: plan.clone(), path: self.path.join(plan.relative_path()) })
    }
}

/// What the agent takes from a CSI volume's `vol_data.json` (written by the kubelet, in a
/// directory whose parent a tenant's pod may write: treated as hostile bytes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolData {
    pub driver_name: String,
    pub spec_vol_id: String,
}

/// Parses `vol_data.json`: a JSON object at most [`MAX_VOL_DATA`] bytes long; `driverName`
/// and `specVolID` are taken when they are strings (missing or other types read as empty).
pub fn parse_vol_data(bytes: &[u8]) -> Result<VolData, String> {
    if bytes.len() > MAX_VOL_DATA {
        return Err("too large".into());
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
    Ok(VolData { driver_name: field("driverName"), spec_vol_id: field("specVolID") })
}

/// Reads `vol_data.json` beside `mount` and checks it names `driver` and `vol`.
fn check_vol_data(dir: BorrowedFd<'_>, driver: &str, vol: &str, at: &str) -> Result<(), VolumeError> {
    let refused = |why: String| VolumeError::Refused(format!("{at}: {why}"));
    let fd = open_beneath(dir, "vol_data.json", OFlags::RDONLY, Mounts::Same).map_err(|e| match e {
        rustix::io::Errno::NOENT => refused("no vol_data.json beside the CSI mount".into()),
        other => refused(format!("vol_data.json: {other}")),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| refused(format!("vol_data.json: {e}")))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(refused("vol_data.json is not a regular file".into()));
    }
    let mut buf = vec![0u8; MAX_VOL_DATA + 1];
    let mut len = 0;
    while len < buf.len() {
        let n = rustix::io::read(&fd, &mut buf[len..]).map_err(|e| refused(format!("vol_data.json: {e}")))?;
        if n == 0 {
            break;
        }
        len += n;
    }
    if len > MAX_VOL_DATA {
        return Err(refused("vol_data.json is too large".into()));
    }
    let VolData { driver_name: found_driver, spec_vol_id: found_vol } =
        parse_vol_data(&buf[..len]).map_err(|e| refused(format!("vol_data.json: {e}")))?;
    if found_driver != driver {
        return Err(refused(format!("mounted by CSI driver {found_driver:?}, the order names {driver:?}")));
    }
    if found_vol != vol {
        return Err(refused(format!("holds volume {found_vol:?}, the order names {vol:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_api::agent::v1::{CsiInlineSource, EmptyDirSource, PersistentVolumeSource};

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn vol_data_is_a_bounded_json_object() {
        let v = parse_vol_data(br#"{"driverName":"d","specVolID":"pv","nodeName":"n"}"#).expect("valid");
        assert_eq!(v, VolData { driver_name: "d".into(), spec_vol_id: "pv".into() });
        let v = parse_vol_data(br#"{"driverName":7}"#).expect("an object");
        assert_eq!(v, VolData::default(), "non-string fields read as empty");
        assert!(parse_vol_data(b"[1,2]").is_err());
        assert!(parse_vol_data(b"\"d\"").is_err());
        let mut big = br#"{"driverName":""#.to_vec();
        big.resize(MAX_VOL_DATA, b'a');
        big.extend_from_slice(br#""}"#);
        assert_eq!(parse_vol_data(&big).expect_err("oversized"), "too large");
    }

    fn empty_dir(name: &str) -> VolumeIdentity {
        VolumeIdentity {
            node_name: "node-a".into(),
            pod_uid: UID.into(),
            volume_name: name.into(),
            source: Some(Source::EmptyDir(EmptyDirSource {})),
            ..Default::default()
        }
    }

    fn pvc(pv: &str, plugin: Plugin) -> VolumeIdentity {
        VolumeIdentity {
            node_name: "node-a".into(),
            pod_uid: UID.into(),
            volume_name: "data".into(),
            source: Some(Source::Pvc(PersistentVolumeSource {
                claim_name: "data-0".into(),
                pv_name: pv.into(),
                plugin: Some(plugin),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn plans_each_kind() {
        let p = plan(&empty_dir("cache"), "node-a").unwrap();
        assert_eq!(p.relative_path(), format!("{UID}/volumes/kubernetes.io~empty-dir/cache"));
        let p = plan(&pvc("pvc-123", Plugin::CsiDriver("ebs.csi.aws.com".into())), "node-a").unwrap();
        assert_eq!(p.relative_path(), format!("{UID}/volumes/kubernetes.io~csi/pvc-123/mount"));
        assert_eq!(p.csi_check, Some(("ebs.csi.aws.com".into(), "pvc-123".into())));
        let p = plan(&pvc("nfs-pv", Plugin::InTreePlugin("kubernetes.io/nfs".into())), "node-a").unwrap();
        assert_eq!(p.relative_path(), format!("{UID}/volumes/kubernetes.io~nfs/nfs-pv"));
        let mut inline = empty_dir("scratch");
        inline.source = Some(Source::CsiInline(CsiInlineSource { driver: "inline.csi.example".into() }));
        let p = plan(&inline, "node-a").unwrap();
        assert_eq!(p.relative_path(), format!("{UID}/volumes/kubernetes.io~csi/scratch/mount"));
    }

    #[test]
    fn refuses_bad_identities() {
        assert!(matches!(plan(&empty_dir("cache"), "node-b"), Err(VolumeError::WrongNode { .. })));
        for name in ["", ".", "..", "../x", "a/b", "/etc", "a\0b", "UPPER", "-x", "x-", &"a".repeat(64)] {
            assert!(matches!(plan(&empty_dir(name), "node-a"), Err(VolumeError::Invalid(_))), "{name:?}");
        }
        for pv in ["..", ".", "a/..", "/", "a..b", ".a", "a\0", &"a".repeat(254)] {
            let id = pvc(pv, Plugin::CsiDriver("d.example".into()));
            assert!(matches!(plan(&id, "node-a"), Err(VolumeError::Invalid(_))), "{pv:?}");
        }
        for plugin in [
            "kubernetes.io/host-path",
            "kubernetes.io/secret",
            "kubernetes.io/configmap",
            "kubernetes.io/projected",
            "kubernetes.io/csi",
            "kubernetes.io/empty-dir",
            "kubernetes.io/../nfs",
            "nfs",
        ] {
            let id = pvc("pv", Plugin::InTreePlugin(plugin.into()));
            assert!(matches!(plan(&id, "node-a"), Err(VolumeError::Invalid(_))), "{plugin}");
        }
        let mut id = empty_dir("cache");
        id.pod_uid = "../0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1".into();
        assert!(matches!(plan(&id, "node-a"), Err(VolumeError::Invalid(_))));
        id.source = None;
        id.pod_uid = UID.into();
        assert!(matches!(plan(&id, "node-a"), Err(VolumeError::Invalid(_))));
    }

    #[test]
    fn uid_syntax() {
        assert!(valid_uid(UID));
        assert!(valid_uid(&UID.to_uppercase()));
        assert!(!valid_uid(&UID[1..]));
        assert!(!valid_uid(&UID.replace('-', "/")));
        assert!(!valid_uid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1g0"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// Whatever the identity, a plan's components are single ordinary names, and exactly
        /// the documented shape.
        #[test]
        fn any_accepted_plan_is_confined(
            node in "(node-a|node-b|\\PC{0,12})",
            uid in "(0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0|[0-9a-f./-]{30,40}|\\PC{0,40})",
            vol in "([a-z0-9-]{1,8}|\\.\\.|\\.|/[a-z]{1,5}|[a-z]{1,3}/\\.\\./[a-z]{1,3}|\\PC{0,10}|[a-z]{1,3}\\x00[a-z]{1,3})",
            pv in "([a-z0-9.-]{1,12}|\\.\\.|/|\\PC{0,10})",
            kind in 0u8..5,
        ) {
            let mut id = empty_dir(&vol);
            id.node_name = node;
            id.pod_uid = uid;
            id.source = match kind {
                0 => Some(Source::EmptyDir(EmptyDirSource {})),
                1 => Some(Source::CsiInline(CsiInlineSource { driver: pv.clone() })),
                2 => Some(Source::Pvc(PersistentVolumeSource { pv_name: pv.clone(), plugin: Some(Plugin::CsiDriver("d.example".into())), ..Default::default() })),
                3 => Some(Source::Pvc(PersistentVolumeSource { pv_name: pv.clone(), plugin: Some(Plugin::InTreePlugin("kubernetes.io/nfs".into())), ..Default::default() })),
                _ => None,
            };
            if let Ok(p) = plan(&id, "node-a") {
                proptest::prop_assert!(p.components.len() == 4 || p.components.len() == 5);
                proptest::prop_assert!(valid_uid(&p.components[0]));
                proptest::prop_assert_eq!(&p.components[1], "volumes");
                for c in &p.components {
                    proptest::prop_assert!(!c.is_empty() && c != "." && c != ".." && !c.contains('/') && !c.contains('\0'));
                }
                proptest::prop_assert_eq!(&id.node_name, "node-a");
            }
        }
    }
}
