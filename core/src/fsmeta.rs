//! Filesystem metadata: from `stat` to [`Node`] and back, all relative to directory descriptors.
//!
//! Everything here works on `(directory fd, single name)` pairs and never follows a symlink, so
//! callers that hold a descriptor of a root can neither read nor write outside it.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};

use crate::tree::{Node, NodeKind, Timestamp, Xattr};

/// Cap on one xattr value and on the number of xattrs per entry we record.
const MAX_XATTR_VALUE: usize = 64 * 1024;
const MAX_XATTRS: usize = 256;

pub fn kind_of(st: &Stat) -> NodeKind {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => NodeKind::File,
        FileType::Directory => NodeKind::Dir,
        FileType::Symlink => NodeKind::Symlink,
        FileType::Fifo => NodeKind::Fifo,
        FileType::Socket => NodeKind::Socket,
        FileType::CharacterDevice => NodeKind::CharDevice,
        FileType::BlockDevice => NodeKind::BlockDevice,
        FileType::Unknown => NodeKind::File,
    }
}

/// A node with everything `stat` tells; content, subtree, link target and xattrs are left empty.
pub fn node_from_stat(name: Vec<u8>, st: &Stat) -> Node {
    let kind = kind_of(st);
    let mut n = Node::new(name, kind);
    n.mode = st.st_mode & 0o7777;
    n.uid = st.st_uid;
    n.gid = st.st_gid;
    n.size = if kind == NodeKind::File { st.st_size.max(0) as u64 } else { 0 };
    n.mtime = Timestamp { sec: st.st_mtime, nsec: st.st_mtime_nsec as u32 };
    n.ctime = Timestamp { sec: st.st_ctime, nsec: st.st_ctime_nsec as u32 };
    n.inode = st.st_ino;
    n.device = st.st_dev;
    n.links = st.st_nlink;
    if matches!(kind, NodeKind::CharDevice | NodeKind::BlockDevice) {
        n.rdev = st.st_rdev;
    }
    n
}

/// Whether a file looks unchanged against a node from an earlier snapshot.
pub fn unchanged(old: &Node, new: &Node) -> bool {
    old.kind == NodeKind::File
        && new.kind == NodeKind::File
        && old.size == new.size
        && old.mtime == new.mtime
        && old.ctime == new.ctime
        && old.inode == new.inode
}

fn parse_names(list: &[u8]) -> Vec<Vec<u8>> {
    list.split(|&b| b == 0).filter(|n| !n.is_empty()).map(|n| n.to_vec()).collect()
}

/// Reads xattrs with the given list and get calls (fd- or path-based).
fn read_xattrs_with(
    list: impl FnOnce(&mut Vec<u8>) -> rustix::io::Result<usize>,
    get: impl Fn(&CStr, &mut Vec<u8>) -> rustix::io::Result<usize>,
) -> Vec<Xattr> {
    let mut names = Vec::with_capacity(1024);
    if !matches!(list(&mut names), Ok(n) if n > 0) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for name in parse_names(&names).into_iter().take(MAX_XATTRS) {
        let Ok(cname) = std::ffi::CString::new(name.clone()) else { continue };
        let mut value = Vec::with_capacity(MAX_XATTR_VALUE);
        if get(&cname, &mut value).is_ok() {
            out.push(Xattr { name, value });
        }
    }
    out
}

/// Extended attributes of an open file or directory. Errors (no support, no permission) yield
/// what could be read.
pub fn read_xattrs_fd(fd: BorrowedFd<'_>) -> Vec<Xattr> {
    read_xattrs_with(
        |buf| rustix::fs::flistxattr(fd, rustix::buffer::spare_capacity(buf)),
        |name, buf| rustix::fs::fgetxattr(fd, name, rustix::buffer::spare_capacity(buf)),
    )
}

/// Extended attributes of an entry that cannot be opened for reading (symlinks, devices),
/// through `/proc/self/fd/<dirfd>/<name>` without following a final symlink.
pub fn read_xattrs_at(dir: BorrowedFd<'_>, name: &CStr) -> Vec<Xattr> {
    use std::os::fd::AsRawFd;
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    let Ok(path) = std::ffi::CString::new(path) else { return Vec::new() };
    read_xattrs_with(
        |buf| rustix::fs::llistxattr(path.as_c_str(), rustix::buffer::spare_capacity(buf)),
        |xname, buf| rustix::fs::lgetxattr(path.as_c_str(), xname, rustix::buffer::spare_capacity(buf)),
    )
}

/// Holes shorter than this are read like data: a seek pair costs more than reading them.
pub const MIN_HOLE: u64 = 256 * 1024;
/// Data regions beyond which a file's map is not used (it is read whole instead).
const MAX_REGIONS: usize = 1 << 16;

/// Whether a file has fewer allocated blocks than bytes (it has holes, or is compressed).
pub fn is_sparse(st: &Stat) -> bool {
    (st.st_blocks.max(0) as u64).saturating_mul(512) < st.st_size.max(0) as u64
}

/// The data regions of a sparse file in offset order, found with `SEEK_DATA`/`SEEK_HOLE`, with
/// holes under [`MIN_HOLE`] merged into the data around them. `None`: read the whole file (it
/// is not sparse, the filesystem cannot tell, or the map is too fragmented).
pub fn data_regions(fd: &OwnedFd, st: &Stat) -> Option<Vec<std::ops::Range<u64>>> {
    use rustix::fs::{SeekFrom, seek};
    if !is_sparse(st) {
        return None;
    }
    let size = st.st_size.max(0) as u64;
    let mut regions = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match seek(fd, SeekFrom::Data(pos)) {
            Ok(s) => s,
            // No data after `pos`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return None,
        };
        if start >= size {
            break;
        }
        let end = seek(fd, SeekFrom::Hole(start)).ok()?.clamp(start + 1, size);
        regions.push(start..end);
        if regions.len() > MAX_REGIONS {
            return None;
        }
        pos = end;
    }
    Some(merge_small_holes(regions, size, MIN_HOLE))
}

/// Merges data regions (sorted, disjoint, within `0..size`) whose gap is under `min_hole`; a
/// leading or trailing hole under `min_hole` joins its neighbour too.
pub fn merge_small_holes(regions: Vec<std::ops::Range<u64>>, size: u64, min_hole: u64) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::with_capacity(regions.len());
    for r in regions {
        match out.last_mut() {
            Some(last) if r.start - last.end < min_hole => last.end = r.end,
            None if r.start < min_hole => out.push(0..r.end),
            _ => out.push(r),
        }
    }
    if let Some(last) = out.last_mut()
        && size - last.end < min_hole
    {
        last.end = size;
    }
    out
}

/// Opens a directory entry for reading without following symlinks or blocking on FIFOs.
pub fn open_file_at(dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    match rustix::fs::openat(dir, name, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => rustix::fs::openat(dir, name, flags, Mode::empty()),
        other => other,
    }
}

/// Turns `O_DIRECT` on or off for an open file; fails where the filesystem does not support it.
pub fn set_direct(fd: &OwnedFd, on: bool) -> rustix::io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    let wanted = if on { flags | OFlags::DIRECT } else { flags - OFlags::DIRECT };
    if wanted == flags { Ok(()) } else { rustix::fs::fcntl_setfl(fd, wanted) }
}

pub fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, name, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => rustix::fs::openat(dir, name, flags, Mode::empty()),
        other => other,
    }
}

pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> rustix::io::Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
}

/// Names in a directory (without `.` and `..`), sorted bytewise.
pub fn list_dir(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<std::ffi::CString>> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut names = Vec::new();
    while let Some(entry) = d.read() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        names.push(name.to_owned());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

fn timespec(t: Timestamp) -> Timespec {
    Timespec { tv_sec: t.sec, tv_nsec: t.nsec as _ }
}

fn times(n: &Node) -> Timestamps {
    // Access time is not recorded; set it to the modification time.
    Timestamps { last_access: timespec(n.mtime), last_modification: timespec(n.mtime) }
}

/// Which recorded metadata a restore recreates, and whether it may change owners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaPolicy {
    /// The process may change owners (it is root).
    pub as_root: bool,
    /// A confined restore, with the owner (uid, gid) of the target's root directory: set-user-id
    /// and set-group-id bits are cleared, `security.*` and `trusted.*` extended attributes
    /// (file capabilities, SELinux labels) are left out, and an owner or group 0 becomes the
    /// target root's. `None`: everything as recorded.
    pub confined: Option<(u32, u32)>,
}

impl MetaPolicy {
    fn owner(&self, n: &Node) -> (u32, u32) {
        match self.confined {
            Some((uid, gid)) => (if n.uid == 0 { uid } else { n.uid }, if n.gid == 0 { gid } else { n.gid }),
            None => (n.uid, n.gid),
        }
    }

    fn mode(&self, n: &Node) -> u32 {
        if self.confined.is_some() { n.mode & 0o1777 } else { n.mode & 0o7777 }
    }

    fn xattr_allowed(&self, name: &[u8]) -> bool {
        self.confined.is_none() || !(name.starts_with(b"security.") || name.starts_with(b"trusted."))
    }

    /// What a confined restore leaves out of `n`, for the restore's warnings.
    pub fn left_out(&self, n: &Node) -> Option<String> {
        self.confined?;
        let mut out = Vec::new();
        if n.mode & 0o6000 != 0 {
            out.push("set-user-id/set-group-id bits".to_string());
        }
        let xattrs: Vec<String> = n
            .xattrs
            .iter()
            .filter(|x| !self.xattr_allowed(&x.name))
            .map(|x| String::from_utf8_lossy(&x.name).into_owned())
            .collect();
        if !xattrs.is_empty() {
            out.push(format!("extended attributes {}", xattrs.join(", ")));
        }
        (!out.is_empty()).then(|| format!("confined restore: {} not restored", out.join(" and ")))
    }
}

/// Applies owner (when root), mode, xattrs and times to an open file or directory, within
/// `policy`. Returns a description of what failed, if anything.
pub fn apply_fd(fd: impl AsFd, n: &Node, policy: &MetaPolicy) -> Vec<String> {
    let fd = fd.as_fd();
    let as_root = policy.as_root;
    let mut errs = Vec::new();
    let (uid, gid) = policy.owner(n);
    if as_root
        && let Err(e) =
            rustix::fs::fchown(fd, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
    {
        errs.push(format!("chown: {e}"));
    }
    for x in n.xattrs.iter().filter(|x| policy.xattr_allowed(&x.name)) {
        if let Ok(name) = std::ffi::CString::new(x.name.clone())
            && let Err(e) = rustix::fs::fsetxattr(fd, name.as_c_str(), &x.value, rustix::fs::XattrFlags::empty())
            // Security and system namespaces need privileges; not having them is not an error.
            && (e != rustix::io::Errno::PERM || as_root)
        {
            errs.push(format!("xattr {}: {e}", String::from_utf8_lossy(&x.name)));
        }
    }
    // chown clears set-id bits, so the mode comes after it.
    if let Err(e) = rustix::fs::fchmod(fd, Mode::from_raw_mode(policy.mode(n))) {
        errs.push(format!("chmod: {e}"));
    }
    if let Err(e) = rustix::fs::futimens(fd, &times(n)) {
        errs.push(format!("utimes: {e}"));
    }
    errs
}

/// Applies owner, mode and times to an entry that is not opened for data (symlinks, devices,
/// FIFOs, sockets). The entry is pinned first with `O_PATH | O_NOFOLLOW` and must still be of
/// `n`'s kind: if someone swapped it (for a symlink, say) after it was created, nothing is set.
/// The mode is set through the pinned descriptor (`/proc/self/fd/N`, as glibc's
/// `fchmodat(AT_SYMLINK_NOFOLLOW)` does), so it never lands on a link's target.
pub fn apply_at(dir: BorrowedFd<'_>, name: &CStr, n: &Node, policy: &MetaPolicy) -> Vec<String> {
    let mut errs = Vec::new();
    let pinned = match rustix::fs::openat(dir, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            errs.push(format!("open: {e}"));
            return errs;
        }
    };
    match rustix::fs::fstat(&pinned) {
        Ok(st) if kind_of(&st) == n.kind => {}
        Ok(st) => {
            errs.push(format!(
                "replaced while being restored (now {:?}, expected {:?}): owner, mode and times not set",
                kind_of(&st),
                n.kind
            ));
            return errs;
        }
        Err(e) => {
            errs.push(format!("stat: {e}"));
            return errs;
        }
    }
    let (uid, gid) = policy.owner(n);
    if policy.as_root
        && let Err(e) = rustix::fs::chownat(
            &pinned,
            c"",
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::EMPTY_PATH,
        )
    {
        errs.push(format!("chown: {e}"));
    }
    // Symlinks have no mode of their own on Linux.
    if n.kind != NodeKind::Symlink {
        let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&pinned));
        if let Err(e) = rustix::fs::chmodat(
            rustix::fs::CWD,
            proc_path.as_str(),
            Mode::from_raw_mode(policy.mode(n)),
            AtFlags::empty(),
        ) {
            errs.push(format!("chmod (through {proc_path}): {e}"));
        }
    }
    if let Err(e) = rustix::fs::utimensat(dir, name, &times(n), AtFlags::SYMLINK_NOFOLLOW) {
        errs.push(format!("utimes: {e}"));
    }
    errs
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod region_tests {
    use super::*;

    #[test]
    fn small_holes_merge_and_large_ones_stay() {
        const K: u64 = 1024;
        let m = |r: Vec<std::ops::Range<u64>>, size| merge_small_holes(r, size, 256 * K);
        assert_eq!(m(vec![], 10 * K), Vec::<std::ops::Range<u64>>::new());
        assert_eq!(m(vec![4 * K..8 * K], 1024 * K), vec![0..8 * K]);
        assert_eq!(m(vec![512 * K..600 * K, 700 * K..800 * K], 1024 * K), vec![512 * K..1024 * K]);
        assert_eq!(
            m(vec![0..4 * K, 1024 * K..1028 * K, 4096 * K..4100 * K], 8192 * K),
            vec![0..4 * K, 1024 * K..1028 * K, 4096 * K..4100 * K]
        );
    }

    #[test]
    fn holes_of_a_sparse_file_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = std::fs::File::create(&path).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        f.set_len(16 << 20).unwrap();
        f.sync_all().unwrap();
        let fd = OwnedFd::from(std::fs::File::open(&path).unwrap());
        let st = rustix::fs::fstat(&fd).unwrap();
        assert!(is_sparse(&st), "the test directory's filesystem keeps holes (ext4, xfs, tmpfs)");
        let regions = data_regions(&fd, &st).expect("a sparse file on a filesystem with SEEK_DATA");
        assert_eq!(regions.len(), 1, "{regions:?}");
        assert!(regions[0].start <= 4 << 20 && regions[0].end >= (4 << 20) + 4096, "{regions:?}");
        assert!(regions[0].end < 16 << 20, "the trailing hole is not data: {regions:?}");
    }
}
