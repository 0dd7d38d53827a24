//! Test support: deterministic data, a filesystem fixture with every kind of entry, manifests
//! that capture content and metadata for comparison, and service discovery for tests that need
//! a real server (S3, databases, an API server).
//!
//! Manifests walk with directory descriptors, so trees deeper than `PATH_MAX` work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

pub mod certs;
#[cfg(feature = "kube")]
pub mod kube;
pub mod kubelet;
pub use certs::{TestPki, make_cluster_pki, make_test_pki};
pub use kubelet::{KubeletTree, KubeletVolume, KubeletVolumeKind, make_kubelet_tree};

/// Deterministic pseudo-random bytes (xorshift64*), incompressible.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    if x == 0 {
        x = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Deterministic text-like bytes (compressible).
pub fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    let words = ["alpha ", "beta ", "gamma ", "delta ", "backup ", "restore ", "volume ", "kubernetes\n"];
    let r = random_bytes(len / 4 + 8, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(words[(r[i % r.len()] % 8) as usize].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Where a test's real service lives: `Some(value)` of the variable, or `None` (skip) outside
/// CI. In CI (`CI=true`) a missing service is a failure, never a skip.
pub fn require_service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{var} is not set: in CI the service must be running (see .ci/run)");
            }
            eprintln!("SKIP: {var} not set; start the service (hack/s3-up.sh) to run this test");
            None
        }
    }
}

fn c(name: &str) -> CString {
    CString::new(name).unwrap()
}

fn set_times(dir: BorrowedFd<'_>, name: &CStr, sec: i64, nsec: i64) {
    let t = rustix::fs::Timespec { tv_sec: sec, tv_nsec: nsec as _ };
    rustix::fs::utimensat(
        dir,
        name,
        &rustix::fs::Timestamps { last_access: t, last_modification: t },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// What [`make_fidelity_fixture`] managed to create (some kinds need root).
#[derive(Debug, Default)]
pub struct FixtureInfo {
    pub devices: bool,
    pub ownership: bool,
    pub xattrs: bool,
    pub deep_path_len: usize,
}

/// Builds a tree with every kind of entry hoard must preserve: regular, empty and sparse files,
/// hardlinks, symlinks (dangling and non-UTF-8), FIFOs, a socket, device nodes (root), odd modes,
/// owners (root), nanosecond times, xattrs, non-UTF-8 names, empty directories and a path deeper
/// than `PATH_MAX`.
pub fn make_fidelity_fixture(root: &Path) -> FixtureInfo {
    use std::io::Write;
    let mut info = FixtureInfo::default();
    std::fs::create_dir_all(root).unwrap();
    let w = |p: &str, data: &[u8]| std::fs::File::create(root.join(p)).unwrap().write_all(data).unwrap();
    std::fs::create_dir_all(root.join("docs/nested/empty")).unwrap();
    std::fs::create_dir_all(root.join("emptydir")).unwrap();
    w("docs/readme.txt", &text_bytes(20_000, 1));
    w("docs/nested/data.bin", &random_bytes(3 * 1024 * 1024 + 17, 2));
    w("empty", b"");
    w("script.sh", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(root.join("script.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    w("private", b"secret-ish");
    std::fs::set_permissions(root.join("private"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Sparse: data, a 40 MiB hole, data, trailing hole.
    {
        let f =
            std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(root.join("sparse.img")).unwrap();
        rustix::io::pwrite(&f, &random_bytes(8192, 3), 0).unwrap();
        rustix::io::pwrite(&f, &random_bytes(4096, 4), 40 * 1024 * 1024).unwrap();
        f.set_len(64 * 1024 * 1024).unwrap();
    }
    // Hardlinks within and across directories.
    w("docs/linked.txt", &text_bytes(5000, 5));
    std::fs::hard_link(root.join("docs/linked.txt"), root.join("linked-again.txt")).unwrap();
    std::fs::hard_link(root.join("docs/linked.txt"), root.join("docs/nested/linked-third.txt")).unwrap();
    // Symlinks: relative, absolute, dangling, non-UTF-8 target.
    std::os::unix::fs::symlink("docs/readme.txt", root.join("to-readme")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(b"bad\xffname"), root.join("weird-target")).unwrap();
    // Non-UTF-8 name.
    std::fs::write(root.join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt")), b"latin-1 name").unwrap();
    // Special files.
    let dir = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
    rustix::fs::mknodat(&dir, "fifo", FileType::Fifo, Mode::from_raw_mode(0o640), 0).unwrap();
    {
        let sock = std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();
        drop(sock);
    }
    if rustix::fs::mknodat(
        &dir,
        "null-device",
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .is_ok()
    {
        info.devices = true;
    }
    // Owners (needs root).
    if rustix::process::geteuid().is_root() {
        rustix::fs::chownat(
            &dir,
            "private",
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(5678)),
            AtFlags::empty(),
        )
        .unwrap();
        rustix::fs::chownat(
            &dir,
            "dangling",
            Some(rustix::fs::Uid::from_raw(4321)),
            Some(rustix::fs::Gid::from_raw(8765)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        info.ownership = true;
    }
    // Xattrs.
    let f = rustix::fs::openat(&dir, "docs", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
    if rustix::fs::fsetxattr(&f, "user.hoard.test", b"dir-attr", rustix::fs::XattrFlags::empty()).is_ok() {
        let f = rustix::fs::openat(&dir, "private", OFlags::RDONLY, Mode::empty()).unwrap();
        rustix::fs::fsetxattr(&f, "user.hoard.one", b"1", rustix::fs::XattrFlags::empty()).unwrap();
        rustix::fs::fsetxattr(&f, "user.hoard.binary", &[0u8, 255, 7], rustix::fs::XattrFlags::empty()).unwrap();
        info.xattrs = true;
    }
    // A path longer than PATH_MAX.
    let mut cur: OwnedFd =
        rustix::fs::openat(&dir, "emptydir", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
    let seg = "d".repeat(200);
    let mut len = 0;
    for _ in 0..30 {
        rustix::fs::mkdirat(&cur, seg.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        cur = rustix::fs::openat(&cur, seg.as_str(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        len += seg.len() + 1;
    }
    let mut deep =
        rustix::fs::openat(&cur, "deep.txt", OFlags::WRONLY | OFlags::CREATE, Mode::from_raw_mode(0o644)).unwrap();
    rustix::io::write(&mut deep, b"deep down").unwrap();
    info.deep_path_len = len;
    // Nanosecond times, set last (children first so directory times stick).
    for (name, sec, nsec) in
        [("private", 1_600_000_000, 123_456_789), ("empty", 1_500_000_000, 1), ("dangling", 1_400_000_000, 999_999_999)]
    {
        set_times(dir.as_fd(), &c(name), sec, nsec);
    }
    set_times(dir.as_fd(), &c("docs"), 1_650_000_000, 42);
    info
}

/// One entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u64),
    pub size: u64,
    pub content: Option<[u8; 32]>,
    pub link_target: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub nlink: u64,
    pub rdev: u64,
    /// Allocated 512-byte blocks (files only).
    pub blocks: u64,
    /// Identifies hardlink groups within one manifest.
    pub inode: u64,
}

fn kind_name(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "chardev",
        FileType::BlockDevice => "blockdev",
        FileType::Unknown => "unknown",
    }
}

fn xattrs_of(fd: BorrowedFd<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut list = Vec::with_capacity(4096);
    if rustix::fs::flistxattr(fd, rustix::buffer::spare_capacity(&mut list)).is_err() {
        return Vec::new();
    }
    let mut out: Vec<_> = list
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let mut v = Vec::with_capacity(65536);
            let cn = CString::new(n).unwrap();
            rustix::fs::fgetxattr(fd, cn.as_c_str(), rustix::buffer::spare_capacity(&mut v)).unwrap();
            (n.to_vec(), v)
        })
        .collect();
    out.sort();
    out
}

/// Walks `root` (not following symlinks) and records every entry by relative path.
pub fn manifest(root: &Path) -> BTreeMap<Vec<u8>, Entry> {
    let mut out = BTreeMap::new();
    let dir = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
    walk(dir, Vec::new(), &mut out);
    out
}

fn walk(dir: OwnedFd, prefix: Vec<u8>, out: &mut BTreeMap<Vec<u8>, Entry>) {
    let mut names = Vec::new();
    let mut d = rustix::fs::Dir::read_from(&dir).unwrap();
    while let Some(e) = d.read() {
        let e = e.unwrap();
        let n = e.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(n);
        }
    }
    names.sort();
    for name in names {
        let cname = CString::new(name.clone()).unwrap();
        let st = rustix::fs::statat(&dir, cname.as_c_str(), AtFlags::SYMLINK_NOFOLLOW).unwrap();
        let ft = FileType::from_raw_mode(st.st_mode);
        let mut path = prefix.clone();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&name);
        let mut e = Entry {
            kind: kind_name(ft),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            size: if ft == FileType::RegularFile { st.st_size as u64 } else { 0 },
            content: None,
            link_target: None,
            xattrs: Vec::new(),
            nlink: if ft == FileType::Directory { 0 } else { st.st_nlink },
            rdev: st.st_rdev,
            blocks: if ft == FileType::RegularFile { st.st_blocks as u64 } else { 0 },
            inode: st.st_ino,
        };
        match ft {
            FileType::RegularFile => {
                let f = rustix::fs::openat(&dir, cname.as_c_str(), OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty())
                    .unwrap();
                let mut h = blake3::Hasher::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = rustix::io::read(&f, &mut buf[..]).unwrap();
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                e.content = Some(*h.finalize().as_bytes());
                e.xattrs = xattrs_of(f.as_fd());
            }
            FileType::Symlink => {
                e.link_target = Some(rustix::fs::readlinkat(&dir, cname.as_c_str(), Vec::new()).unwrap().into_bytes());
            }
            FileType::Directory => {
                let sub = rustix::fs::openat(
                    &dir,
                    cname.as_c_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                    Mode::empty(),
                )
                .unwrap();
                e.xattrs = xattrs_of(sub.as_fd());
                out.insert(path.clone(), e);
                walk(sub, path, out);
                continue;
            }
            _ => {}
        }
        out.insert(path, e);
    }
}

/// Allocated 512-byte blocks two copies of a file may differ by and still count as the same
/// allocation (64 KiB).
const BLOCK_SLACK: u64 = 128;

/// Differences between two manifests, ignoring inode numbers (hardlink groups are compared by
/// shape: entries sharing an inode in `a` must share one in `b`). Empty means identical.
pub fn compare(a: &BTreeMap<Vec<u8>, Entry>, b: &BTreeMap<Vec<u8>, Entry>) -> Vec<String> {
    let mut diffs = Vec::new();
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    for (p, ea) in a {
        match b.get(p) {
            None => diffs.push(format!("missing: {}", show(p))),
            Some(eb) => {
                let mut x = ea.clone();
                let mut y = eb.clone();
                x.inode = 0;
                y.inode = 0;
                // A freshly written source may still hold a block or two of speculative
                // preallocation; holes, which this check is for, are far larger.
                if x.blocks.abs_diff(y.blocks) <= BLOCK_SLACK {
                    y.blocks = x.blocks;
                }
                if x != y {
                    diffs.push(format!("differs: {}\n  source:   {x:?}\n  restored: {y:?}", show(p)));
                }
            }
        }
    }
    for p in b.keys() {
        if !a.contains_key(p) {
            diffs.push(format!("extra: {}", show(p)));
        }
    }
    let groups = |m: &BTreeMap<Vec<u8>, Entry>| {
        let mut g: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for (p, e) in m {
            if e.kind == "file" && e.nlink > 1 {
                g.entry(e.inode).or_default().push(p.clone());
            }
        }
        let mut v: Vec<Vec<Vec<u8>>> = g.into_values().collect();
        v.sort();
        v
    };
    if groups(a) != groups(b) {
        diffs.push(format!("hardlink groups differ: {:?} vs {:?}", groups(a), groups(b)));
    }
    diffs
}
