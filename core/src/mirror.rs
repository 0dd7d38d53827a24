//! `mirror`: one directory tree copied into another on the same machine, with no repository in
//! between — how a CSI VolumeSnapshot's clone is restored into an existing volume.
//!
//! Guarantees:
//! * Confined on both sides: every entry is reached from its parent's descriptor by one name,
//!   nothing is followed (a symlink is copied as a symlink), and neither side's walk crosses
//!   into another mount (a mount point in the source is left out with a warning; a directory
//!   of the target on another mount is not written into).
//! * Existing entries of the target follow the restore's [`Overwrite`] policy ([`gives_way`]);
//!   an existing directory is merged into, never replaced.
//! * Metadata follows the restore's [`Fidelity`]: a confined copy clears set-id bits, leaves
//!   out device nodes and `security.*`/`trusted.*` attributes, and gives root-owned entries the
//!   target root's owner. Each left-out item is a warning.
//! * A file is written under its name with its final size and time only at its end, so a
//!   re-run with [`Overwrite::IfChanged`] redoes exactly the files an interrupted run left
//!   unfinished. A file that fails is removed, never left half-written under its name.
//! * Bounded: one directory listing per level (at most [`MAX_DEPTH`] levels), one copy buffer;
//!   file data moves with `copy_file_range` where the kernel allows it. Hard links are copied
//!   as separate files.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::error::{Error, Result};
use crate::fsmeta::{self, MetaPolicy};
use crate::progress::Progress;
use crate::restore::{Existing, Fidelity, MountKey, Overwrite, gives_way};
use crate::tree::{MAX_DEPTH, Node, NodeKind};

/// Bytes moved per `copy_file_range` call (and the size of the fallback buffer).
const COPY_STEP: usize = 8 << 20;
/// Stack of the walking thread: it recurses once per directory level.
const WALK_STACK: usize = 64 << 20;
/// Most failures and warnings kept by name (the rest are counted).
const MAX_LISTED: usize = 1000;

#[derive(Debug, Clone, Copy)]
pub struct MirrorOptions {
    pub overwrite: Overwrite,
    pub fidelity: Fidelity,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MirrorOutcome {
    pub files: u64,
    pub dirs: u64,
    /// Symlinks, FIFOs and device nodes.
    pub other: u64,
    pub bytes: u64,
    /// Entries of the target left as they were (the overwrite policy kept them).
    pub skipped: u64,
    pub warnings: Vec<String>,
    /// `(path, why)` of entries not copied.
    pub failed: Vec<(String, String)>,
    /// Failures beyond the listed ones.
    pub more_failed: u64,
    /// A write failed because the target is full.
    pub target_full: bool,
    /// The walk stopped because `cancelled` said so.
    pub cancelled: bool,
}

/// Copies everything in `source` into `target` (both open directories). Per-entry problems are
/// in the outcome; the error is for roots that cannot be examined. `cancelled` is asked before
/// each entry and between file segments.
pub fn mirror(
    source: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    opts: MirrorOptions,
    progress: &Progress,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<MirrorOutcome> {
    let io = |what: &str, e: rustix::io::Errno| Error::io(what, e.into());
    let confined = match opts.fidelity {
        Fidelity::Full => None,
        Fidelity::Confined => {
            let st = rustix::fs::fstat(target).map_err(|e| io("stat the target", e))?;
            Some((st.st_uid, st.st_gid))
        }
    };
    let mut walk = Walk {
        opts,
        meta: MetaPolicy { as_root: crate::util::is_root(), confined },
        progress,
        cancelled,
        source_mount: MountKey::of(source).map_err(|e| io("stat the source", e))?,
        target_mount: MountKey::of(target).map_err(|e| io("stat the target", e))?,
        out: MirrorOutcome::default(),
        buf: Vec::new(),
    };
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("hoard-mirror".into())
            .stack_size(WALK_STACK)
            .spawn_scoped(s, || {
                walk.dir(source, target, "", 0);
                walk.out
            })
            .map_err(|e| Error::io("start the copy thread", e))?
            .join()
            .map_err(|_| Error::Internal("the copy thread panicked".into()))
    })
}

struct Walk<'a> {
    opts: MirrorOptions,
    meta: MetaPolicy,
    progress: &'a Progress,
    cancelled: &'a (dyn Fn() -> bool + Sync),
    source_mount: MountKey,
    target_mount: MountKey,
    out: MirrorOutcome,
    buf: Vec<u8>,
}

impl Walk<'_> {
    fn warn(&mut self, msg: String) {
        self.progress.add_warning(&msg);
        if self.out.warnings.len() < MAX_LISTED {
            self.out.warnings.push(msg);
        }
    }

    fn fail(&mut self, rel: &str, why: String) {
        self.progress.add_warning(&format!("{rel}: {why}"));
        if self.out.failed.len() < MAX_LISTED {
            self.out.failed.push((rel.to_string(), why));
        } else {
            self.out.more_failed += 1;
        }
    }

    fn fail_io(&mut self, rel: &str, what: &str, e: rustix::io::Errno) {
        if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT {
            self.out.target_full = true;
        }
        self.fail(rel, format!("{what}: {e}"));
    }

    fn apply_meta_warnings(&mut self, rel: &str, errs: Vec<String>, node: &Node) {
        for e in errs.into_iter().chain(self.meta.left_out(node)) {
            self.warn(format!("{rel}: {e}"));
        }
    }

    /// Copies the entries of `src` into `dst`, `rel` being their path below the roots.
    fn dir(&mut self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, rel: &str, depth: usize) {
        let names = match fsmeta::list_dir(src) {
            Ok(n) => n,
            Err(e) => return self.fail_io(if rel.is_empty() { "." } else { rel }, "list", e),
        };
        for name in names {
            if (self.cancelled)() {
                self.out.cancelled = true;
                return;
            }
            let child = if rel.is_empty() {
                String::from_utf8_lossy(name.as_bytes()).into_owned()
            } else {
                format!("{rel}/{}", String::from_utf8_lossy(name.as_bytes()))
            };
            self.progress.set_current(&child);
            self.entry(src, dst, &name, &child, depth);
        }
    }

    fn entry(&mut self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, name: &CString, rel: &str, depth: usize) {
        let st = match fsmeta::stat_at(src, name) {
            Ok(st) => st,
            // Gone since the listing (a clone does not change; a live source might).
            Err(rustix::io::Errno::NOENT) => return,
            Err(e) => return self.fail_io(rel, "stat", e),
        };
        let node = fsmeta::node_from_stat(name.as_bytes().to_vec(), &st);
        let existing = match fsmeta::stat_at(dst, name) {
            Ok(st) => Some(st),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return self.fail_io(rel, "stat in the target", e),
        };
        if node.kind == NodeKind::Dir {
            return self.subdir(src, dst, name, rel, node, existing.as_ref(), depth);
        }
        if let Some(ex) = &existing {
            if FileType::from_raw_mode(ex.st_mode) == FileType::Directory {
                return self
                    .fail(rel, "a directory of the target has this name (directories are never replaced)".into());
            }
            if !gives_way(self.opts.overwrite, &Existing::of(ex), &node) {
                self.out.skipped += 1;
                return;
            }
            if let Err(e) = rustix::fs::unlinkat(dst, name.as_c_str(), AtFlags::empty()) {
                return self.fail_io(rel, "remove the existing entry", e);
            }
        }
        match node.kind {
            NodeKind::File => self.file(src, dst, name, rel, node),
            NodeKind::Symlink => self.symlink(src, dst, name, rel, node),
            _ => self.special(src, dst, name, rel, node),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn subdir(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &CString,
        rel: &str,
        mut node: Node,
        existing: Option<&rustix::fs::Stat>,
        depth: usize,
    ) {
        if depth >= MAX_DEPTH {
            return self
                .warn(format!("{rel}: deeper than {MAX_DEPTH} directory levels, not copied (nor anything in it)"));
        }
        if !MountKey::of_at(src, name).is_ok_and(|m| m.same_mount(&self.source_mount)) {
            return self.warn(format!("{rel}: a mount point in the source, not copied"));
        }
        match existing.map(|st| FileType::from_raw_mode(st.st_mode)) {
            Some(FileType::Directory) => {}
            Some(_) => {
                let ex = Existing::of(existing.expect("matched Some"));
                if !gives_way(self.opts.overwrite, &ex, &node) {
                    self.out.skipped += 1;
                    return;
                }
                if let Err(e) = rustix::fs::unlinkat(dst, name.as_c_str(), AtFlags::empty()) {
                    return self.fail_io(rel, "remove the existing entry", e);
                }
                if let Err(e) = rustix::fs::mkdirat(dst, name.as_c_str(), Mode::from_raw_mode(0o700)) {
                    return self.fail_io(rel, "mkdir", e);
                }
            }
            None => {
                if let Err(e) = rustix::fs::mkdirat(dst, name.as_c_str(), Mode::from_raw_mode(0o700)) {
                    return self.fail_io(rel, "mkdir", e);
                }
            }
        }
        let sub_src = match fsmeta::open_dir_at(src, name) {
            Ok(fd) => fd,
            Err(e) => return self.fail_io(rel, "open", e),
        };
        // O_NOFOLLOW | O_DIRECTORY: a symlink swapped in for the directory is refused here.
        let sub_dst = match fsmeta::open_dir_at(dst, name) {
            Ok(fd) => fd,
            Err(e) => return self.fail_io(rel, "open in the target", e),
        };
        if !MountKey::of(sub_dst.as_fd()).is_ok_and(|m| m.same_mount(&self.target_mount)) {
            return self.warn(format!("{rel}: a mount point in the target, not written into"));
        }
        node.xattrs = fsmeta::read_xattrs_fd(sub_src.as_fd());
        self.out.dirs += 1;
        self.dir(sub_src.as_fd(), sub_dst.as_fd(), rel, depth + 1);
        let errs = fsmeta::apply_fd(&sub_dst, &node, &self.meta);
        self.apply_meta_warnings(rel, errs, &node);
    }

    fn file(&mut self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, name: &CString, rel: &str, mut node: Node) {
        let from = match fsmeta::open_file_at(src, name) {
            Ok(fd) => fd,
            Err(e) => return self.fail_io(rel, "open", e),
        };
        // Pinned: the data must come from the entry that was statted.
        match rustix::fs::fstat(&from) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
                node = Node { xattrs: fsmeta::read_xattrs_fd(from.as_fd()), ..fsmeta::node_from_stat(node.name, &st) };
            }
            Ok(_) => return self.fail(rel, "replaced while being copied".into()),
            Err(e) => return self.fail_io(rel, "stat", e),
        }
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let to = match rustix::fs::openat(dst, name.as_c_str(), flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => fd,
            Err(e) => return self.fail_io(rel, "create", e),
        };
        match self.copy_data(&from, &to, node.size) {
            Ok(n) => {
                let errs = fsmeta::apply_fd(&to, &node, &self.meta);
                self.apply_meta_warnings(rel, errs, &node);
                self.out.files += 1;
                self.out.bytes += n;
                self.progress.add_files(1);
            }
            Err(e) => {
                drop(to);
                let _ = rustix::fs::unlinkat(dst, name.as_c_str(), AtFlags::empty());
                if e == rustix::io::Errno::CANCELED {
                    self.out.cancelled = true;
                } else {
                    self.fail_io(rel, "copy (the partial file was removed)", e);
                }
            }
        }
    }

    /// The file's data regions (holes stay holes), then its size. Bytes copied.
    fn copy_data(&mut self, from: &OwnedFd, to: &OwnedFd, size: u64) -> rustix::io::Result<u64> {
        let st = rustix::fs::fstat(from)?;
        let regions = fsmeta::data_regions(from, &st).unwrap_or_else(|| std::iter::once(0..size).collect());
        let mut copied = 0;
        for r in regions {
            let mut pos = r.start;
            while pos < r.end {
                if (self.cancelled)() {
                    return Err(rustix::io::Errno::CANCELED);
                }
                let want = (r.end - pos).min(COPY_STEP as u64) as usize;
                let n = self.copy_segment(from, to, pos, want)?;
                if n == 0 {
                    // Shorter than it was statted (a live source): what is there is copied.
                    break;
                }
                pos += n as u64;
                copied += n as u64;
                self.progress.add_bytes(n as u64);
            }
        }
        rustix::fs::ftruncate(to, size)?;
        Ok(copied)
    }

    fn copy_segment(&mut self, from: &OwnedFd, to: &OwnedFd, pos: u64, len: usize) -> rustix::io::Result<usize> {
        let (mut off_in, mut off_out) = (pos, pos);
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), len) {
            Ok(n) => return Ok(n),
            // Across filesystems on old kernels, or filesystems without it: read and write.
            Err(rustix::io::Errno::XDEV | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {}
            Err(e) => return Err(e),
        }
        self.buf.resize(len, 0);
        let n = rustix::io::pread(from, &mut self.buf[..len], pos)?;
        let mut done = 0;
        while done < n {
            done += rustix::io::pwrite(to, &self.buf[done..n], pos + done as u64)?;
        }
        Ok(n)
    }

    fn symlink(&mut self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, name: &CStr, rel: &str, node: Node) {
        let target = match rustix::fs::readlinkat(src, name, Vec::new()) {
            Ok(t) => t,
            Err(e) => return self.fail_io(rel, "readlink", e),
        };
        if let Err(e) = rustix::fs::symlinkat(target.as_c_str(), dst, name) {
            return self.fail_io(rel, "symlink", e);
        }
        let errs = fsmeta::apply_at(dst, name, &node, &self.meta);
        self.apply_meta_warnings(rel, errs, &node);
        self.out.other += 1;
    }

    fn special(&mut self, _src: BorrowedFd<'_>, dst: BorrowedFd<'_>, name: &CStr, rel: &str, node: Node) {
        let (ft, is_dev) = match node.kind {
            NodeKind::Fifo => (FileType::Fifo, false),
            NodeKind::Socket => return self.warn(format!("{rel}: a socket, not copied")),
            NodeKind::CharDevice => (FileType::CharacterDevice, true),
            _ => (FileType::BlockDevice, true),
        };
        if is_dev && (self.meta.confined.is_some() || !self.meta.as_root) {
            return self.warn(format!("{rel}: device node not copied (confined copy or not root)"));
        }
        if let Err(e) = rustix::fs::mknodat(dst, name, ft, Mode::from_raw_mode(0o600), node.rdev) {
            return self.fail_io(rel, "mknod", e);
        }
        let errs = fsmeta::apply_at(dst, name, &node, &self.meta);
        self.apply_meta_warnings(rel, errs, &node);
        self.out.other += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    use std::path::Path;

    fn open(p: &Path) -> OwnedFd {
        rustix::fs::open(p, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).expect("open dir")
    }

    fn run(src: &Path, dst: &Path, overwrite: Overwrite, fidelity: Fidelity) -> MirrorOutcome {
        let progress = Progress::default();
        mirror(open(src).as_fd(), open(dst).as_fd(), MirrorOptions { overwrite, fidelity }, &progress, &|| false)
            .expect("mirror")
    }

    fn set_mtime(p: &Path, sec: i64) {
        let t = rustix::fs::Timespec { tv_sec: sec, tv_nsec: 0 };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            p,
            &rustix::fs::Timestamps { last_access: t, last_modification: t },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .expect("utimes");
    }

    #[test]
    fn copies_files_directories_links_and_holes_with_their_metadata() {
        let src = tempfile::tempdir().expect("tmp");
        let dst = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(src.path().join("a/b")).expect("mkdir");
        std::fs::write(src.path().join("a/b/f.txt"), b"hello").expect("write");
        std::fs::set_permissions(src.path().join("a/b/f.txt"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
        set_mtime(&src.path().join("a/b/f.txt"), 1_600_000_000);
        symlink("../../../outside", src.path().join("a/link")).expect("symlink");
        let sparse = std::fs::File::create(src.path().join("sparse")).expect("create");
        sparse.set_len(64 << 20).expect("set_len");
        std::os::unix::fs::FileExt::write_at(&sparse, b"end", (64 << 20) - 3).expect("write_at");
        drop(sparse);
        let big: Vec<u8> = (0..(COPY_STEP + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(src.path().join("big"), &big).expect("write");

        let out = run(src.path(), dst.path(), Overwrite::Never, Fidelity::Full);
        assert!(out.failed.is_empty(), "{:?}", out.failed);
        assert_eq!((out.files, out.dirs, out.other), (3, 2, 1));
        assert_eq!(std::fs::read(dst.path().join("a/b/f.txt")).expect("read"), b"hello");
        let meta = std::fs::metadata(dst.path().join("a/b/f.txt")).expect("stat");
        assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o640, 1_600_000_000));
        assert_eq!(std::fs::read_link(dst.path().join("a/link")).expect("link"), Path::new("../../../outside"));
        assert_eq!(std::fs::read(dst.path().join("big")).expect("read"), big);
        let copy = std::fs::metadata(dst.path().join("sparse")).expect("stat");
        assert_eq!(copy.len(), 64 << 20);
        assert!(copy.blocks() * 512 < 8 << 20, "the hole stays a hole: {} blocks", copy.blocks());
        let sparse_bytes = out.bytes - 5 - big.len() as u64;
        assert!(sparse_bytes < 1 << 20, "only the sparse file's data regions are copied: {sparse_bytes}");
    }

    #[test]
    fn existing_entries_follow_the_overwrite_policy() {
        let src = tempfile::tempdir().expect("tmp");
        let dst = tempfile::tempdir().expect("tmp");
        for (name, sec) in [("old", 1_000), ("new", 3_000), ("same", 2_000)] {
            std::fs::write(src.path().join(name), format!("snapshot {name}")).expect("write");
            set_mtime(&src.path().join(name), sec);
            std::fs::write(dst.path().join(name), format!("live {name}!")).expect("write");
            set_mtime(&dst.path().join(name), 2_000);
        }
        std::fs::write(src.path().join("same"), b"snapshot same").expect("write");
        std::fs::write(dst.path().join("same"), b"snapshot same").expect("write");
        set_mtime(&src.path().join("same"), 2_000);
        set_mtime(&dst.path().join("same"), 2_000);
        let read = |n: &str| std::fs::read_to_string(dst.path().join(n)).expect("read");

        let out = run(src.path(), dst.path(), Overwrite::Never, Fidelity::Full);
        assert_eq!((out.files, out.skipped), (0, 3));
        assert_eq!(read("old"), "live old!");
        let out = run(src.path(), dst.path(), Overwrite::IfNewer, Fidelity::Full);
        assert_eq!((out.files, out.skipped), (1, 2));
        assert_eq!((read("new").as_str(), read("old").as_str()), ("snapshot new", "live old!"));
        let out = run(src.path(), dst.path(), Overwrite::IfChanged, Fidelity::Full);
        assert_eq!((out.files, out.skipped), (1, 2), "new now matches; same always did");
        assert_eq!(read("old"), "snapshot old");
        std::fs::write(dst.path().join("same"), b"changed in place").expect("write");
        let out = run(src.path(), dst.path(), Overwrite::Always, Fidelity::Full);
        assert_eq!((out.files, out.skipped), (3, 0));
        assert_eq!(read("same"), "snapshot same");
    }

    #[test]
    fn a_symlink_in_the_target_is_replaced_never_followed() {
        let src = tempfile::tempdir().expect("tmp");
        let dst = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(src.path().join("d")).expect("mkdir");
        std::fs::write(src.path().join("d/f"), b"data").expect("write");
        std::fs::write(src.path().join("g"), b"data").expect("write");
        // The target holds links where the source has a directory and a file.
        symlink(outside.path(), dst.path().join("d")).expect("symlink");
        symlink(outside.path().join("g"), dst.path().join("g")).expect("symlink");

        let out = run(src.path(), dst.path(), Overwrite::Always, Fidelity::Full);
        assert!(out.failed.is_empty(), "{:?}", out.failed);
        assert_eq!(std::fs::read_dir(outside.path()).expect("ls").count(), 0, "nothing written through a link");
        assert!(std::fs::symlink_metadata(dst.path().join("d")).expect("stat").is_dir());
        assert_eq!(std::fs::read(dst.path().join("d/f")).expect("read"), b"data");
        assert!(std::fs::symlink_metadata(dst.path().join("g")).expect("stat").is_file());

        // With Never, the links stay and nothing goes through them either.
        let dst = tempfile::tempdir().expect("tmp");
        symlink(outside.path(), dst.path().join("d")).expect("symlink");
        let out = run(src.path(), dst.path(), Overwrite::Never, Fidelity::Full);
        assert_eq!(out.skipped, 1);
        assert_eq!(std::fs::read_dir(outside.path()).expect("ls").count(), 0);
    }

    #[test]
    fn a_confined_copy_clears_set_id_bits() {
        let src = tempfile::tempdir().expect("tmp");
        let dst = tempfile::tempdir().expect("tmp");
        std::fs::write(src.path().join("tool"), b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(src.path().join("tool"), std::fs::Permissions::from_mode(0o4755)).expect("chmod");
        let out = run(src.path(), dst.path(), Overwrite::Never, Fidelity::Confined);
        let mode = std::fs::metadata(dst.path().join("tool")).expect("stat").mode() & 0o7777;
        assert_eq!(mode, 0o755);
        assert!(out.warnings.iter().any(|w| w.contains("set-user-id")), "{:?}", out.warnings);
    }

    #[test]
    fn cancelling_stops_the_walk_and_leaves_no_partial_file() {
        let src = tempfile::tempdir().expect("tmp");
        let dst = tempfile::tempdir().expect("tmp");
        std::fs::write(src.path().join("a"), vec![1u8; COPY_STEP * 3]).expect("write");
        let progress = Progress::default();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        // Let the walk reach the file and its first segment, then cancel.
        let cancel = || calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 2;
        let opts = MirrorOptions { overwrite: Overwrite::Never, fidelity: Fidelity::Full };
        let out = mirror(open(src.path()).as_fd(), open(dst.path()).as_fd(), opts, &progress, &cancel).expect("mirror");
        assert!(out.cancelled);
        assert!(!dst.path().join("a").exists(), "the partial file is removed");
    }
}
