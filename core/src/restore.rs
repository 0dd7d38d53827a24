//! Restore: recreate a tree below a target directory, confined to it.
//!
//! * Confinement: the target is opened once; every entry is created relative to its parent's
//!   descriptor with `O_NOFOLLOW`/`O_EXCL` (names are validated single components), so a hostile
//!   snapshot or a pre-planted symlink in the target cannot write outside it.
//! * Content is planned by pack: the walker collects the blobs of a batch of files (at most
//!   [`MAX_BATCH_FILES`] files and [`MAX_BATCH_BLOBS`] blobs), groups them by pack in offset
//!   order, and a pool of workers fetches each pack's blobs with one `Store::get_ranges` call per
//!   job of at most [`MAX_JOB_BYTES`] (on a filesystem: one open and one read per run of
//!   adjacent blobs; on object stores: few coalesced ranged requests), several packs at once.
//!   A blob is fetched once per batch however many files use it, then authenticated,
//!   decompressed and written at each of its offsets by the same worker. Holes (and all-zero
//!   pages) are not written, so sparse files stay sparse.
//! * Metadata (owner when root, mode, xattrs, times) is applied after content; a directory's
//!   after everything inside it is done.
//! * Every blob is authenticated and checked against its id. A file whose data cannot be read
//!   (missing or damaged pack, damaged blob) is listed in [`RestoreOutcome::failed`]; only the
//!   files using the affected blobs fail, and the rest of the restore continues.
//! * Mounts: with [`RestoreOptions::one_file_system`], an existing directory in the target that
//!   is on another mount than the target root (a bind mount or another filesystem mounted
//!   inside it) is never descended into: that entry fails, nothing is written below it.
//! * Bounded: the plan of at most two batches exists at once (one being built, one being
//!   fetched), pack jobs wait in a bounded channel, and each worker holds one job's bytes;
//!   descriptors are held only for directories and files with pending work.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, bounded};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::error::{Error, IoContext, Result};
use crate::fsmeta;
use crate::id::Id;
use crate::index::BlobLocation;
use crate::progress::Progress;
use crate::repo::{Repository, pack_key};
use crate::tree::{Extent, Node, NodeKind, Tree};

/// Most files in one planning batch (each holds a descriptor until its content is written).
pub const MAX_BATCH_FILES: usize = 1024;
/// Most distinct blobs in one planning batch.
pub const MAX_BATCH_BLOBS: usize = 16 * 1024;
/// Most stored bytes one pack job fetches (what a worker holds in memory at once, plus one blob);
/// 4 MiB keeps a restore's peak below the key derivation's, 8 MiB took 12-20 MiB more.
pub const MAX_JOB_BYTES: u64 = 4 * 1024 * 1024;
const PAGE: usize = 4096;

#[derive(Debug)]
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Glob patterns on paths below the restore root; empty means everything.
    pub includes: Vec<String>,
    pub excludes: Vec<String>,
    /// Snapshot path of what is restored (e.g. `/app/conf`); patterns match paths below it.
    pub match_prefix: String,
    pub workers: usize,
    pub progress: Arc<Progress>,
    /// An already opened target directory (confined by the caller); `target` is then only
    /// used in messages.
    pub target_dir: Option<OwnedFd>,
    /// Never write into an existing directory that is on another mount than the target root.
    pub one_file_system: bool,
}

impl RestoreOptions {
    pub fn new(target: impl Into<PathBuf>) -> Self {
        RestoreOptions {
            target: target.into(),
            includes: Vec::new(),
            excludes: Vec::new(),
            match_prefix: String::new(),
            workers: (crate::writer::default_workers() * 2).max(4),
            progress: Arc::new(Progress::default()),
            target_dir: None,
            one_file_system: false,
        }
    }
}

/// Which mount a file is on: its device and, where the kernel reports it (statx
/// `STATX_MNT_ID`, Linux 5.8+), the mount id, which also tells apart bind mounts of one
/// filesystem (they share the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountKey {
    dev: u64,
    mnt: Option<u64>,
}

impl MountKey {
    /// The mount of `name` in `dir` (not following a symlink); `name` empty: `dir` itself.
    pub fn of_at(dir: std::os::fd::BorrowedFd<'_>, name: &std::ffi::CStr) -> rustix::io::Result<MountKey> {
        use rustix::fs::{StatxFlags, statx};
        let flags = if name.is_empty() { AtFlags::EMPTY_PATH } else { AtFlags::SYMLINK_NOFOLLOW };
        match statx(dir, name, flags, StatxFlags::MNT_ID) {
            Ok(x) => Ok(MountKey {
                dev: rustix::fs::makedev(x.stx_dev_major, x.stx_dev_minor),
                mnt: (x.stx_mask & StatxFlags::MNT_ID.bits() != 0).then_some(x.stx_mnt_id),
            }),
            // No statx (old kernel, seccomp): the device alone.
            Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {
                let st = if name.is_empty() { rustix::fs::fstat(dir)? } else { fsmeta::stat_at(dir, name)? };
                Ok(MountKey { dev: st.st_dev, mnt: None })
            }
            Err(e) => Err(e),
        }
    }

    /// The mount of an open file or directory.
    pub fn of(fd: std::os::fd::BorrowedFd<'_>) -> rustix::io::Result<MountKey> {
        MountKey::of_at(fd, c"")
    }

    /// Same device, and the same mount where both mount ids are known.
    pub fn same_mount(&self, other: &MountKey) -> bool {
        self.dev == other.dev && (self.mnt.is_none() || other.mnt.is_none() || self.mnt == other.mnt)
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreOutcome {
    pub files: u64,
    pub dirs: u64,
    pub other: u64,
    pub bytes: u64,
    /// Files whose content could not be restored, with the reason.
    pub failed: Vec<(String, String)>,
    /// Metadata that could not be applied and skipped entries.
    pub warnings: Vec<String>,
}

/// What to restore.
#[derive(Debug, Clone)]
pub enum RestoreSource {
    /// The contents of a tree, directly into the target.
    Tree(Id),
    /// One node (file, link, …, or a directory with its subtree) into `target/<name>`.
    Node(Node),
}

struct DirState {
    fd: OwnedFd,
    node: Option<Node>,
    rel: String,
    /// 1 while the walker is inside, plus one per child with pending work.
    pending: AtomicUsize,
    parent: Option<Arc<DirState>>,
}

struct FileState {
    fd: OwnedFd,
    node: Node,
    rel: String,
    dir: Arc<DirState>,
    /// Data extents not yet written or given up.
    remaining: AtomicUsize,
    failed: Mutex<Option<String>>,
}

impl FileState {
    fn has_failed(&self) -> bool {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn mark_failed(&self, why: String) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
    }
}

/// Where the first copy of a multiply-linked file was restored.
type FirstLink = (Arc<DirState>, CString);

/// Where one blob's plaintext is written.
struct Target {
    file: Arc<FileState>,
    offset: u64,
    len: u32,
}

/// One blob, fetched once and written to each of its targets.
struct BlobJob {
    id: Id,
    loc: BlobLocation,
    targets: Vec<Target>,
}

/// Blobs of one pack in offset order, fetched with one `get_ranges` call.
struct PackJob {
    pack: Id,
    blobs: Vec<BlobJob>,
}

/// The content plan of a batch of files.
#[derive(Default)]
struct Batch {
    files: usize,
    blobs: HashMap<Id, BlobJob>,
    /// Packs in the order the walk first needed them.
    packs: Vec<Id>,
    seen_packs: HashSet<Id>,
}

struct Ctx {
    repo: Arc<Repository>,
    handle: tokio::runtime::Handle,
    as_root: bool,
    includes: Option<Patterns>,
    excludes: Patterns,
    /// Snapshot path of the restore root (e.g. `app/conf`), prefixed to paths for matching.
    match_prefix: String,
    progress: Arc<Progress>,
    outcome: Mutex<RestoreOutcome>,
    bytes: AtomicU64,
    /// First restored path of multiply-linked files, by (device, inode).
    links: Mutex<HashMap<(u64, u64), FirstLink>>,
    /// With `one_file_system`: the target root's mount (set once the root is open).
    root_mount: std::sync::OnceLock<MountKey>,
}

/// Include or exclude patterns. A pattern with a `/` matches snapshot paths (as `ls` shows them,
/// the leading `/` optional) and everything below; any other pattern matches entry names.
#[derive(Debug)]
struct Patterns {
    by_name: GlobSet,
    by_path: GlobSet,
}

impl Patterns {
    fn new(patterns: &[String]) -> Result<Patterns> {
        let mut by_name = GlobSetBuilder::new();
        let mut by_path = GlobSetBuilder::new();
        let glob = |p: &str| {
            GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| Error::InvalidArgument(format!("pattern {p:?}: {e}")))
        };
        for p in patterns {
            let p = p.trim().trim_start_matches('/').trim_end_matches('/');
            if p.is_empty() {
                continue;
            }
            if p.contains('/') {
                by_path.add(glob(p)?);
                by_path.add(glob(&format!("{p}/**"))?);
            } else {
                by_name.add(glob(p)?);
            }
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| Error::InvalidArgument(e.to_string()));
        Ok(Patterns { by_name: build(by_name)?, by_path: build(by_path)? })
    }

    fn is_match(&self, path: &str, name: &str) -> bool {
        self.by_name.is_match(name) || self.by_path.is_match(path)
    }
}

impl Ctx {
    fn warn(&self, msg: String) {
        tracing::warn!("{msg}");
        self.progress.add_warning(&msg);
        self.outcome.lock().unwrap_or_else(|p| p.into_inner()).warnings.push(msg);
    }

    fn fail(&self, rel: &str, why: String) {
        tracing::error!("{rel}: {why}");
        // Shown live among the recent warnings (and counted with them).
        self.progress.add_warning(&format!("{rel}: {why}"));
        self.outcome.lock().unwrap_or_else(|p| p.into_inner()).failed.push((rel.to_string(), why));
    }

    fn count(&self, f: impl FnOnce(&mut RestoreOutcome)) {
        f(&mut self.outcome.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn load_tree(&self, id: &Id) -> Result<Tree> {
        self.handle.block_on(self.repo.load_tree(id))
    }

    fn match_path(&self, rel: &str) -> String {
        if self.match_prefix.is_empty() { rel.to_string() } else { format!("{}/{rel}", self.match_prefix) }
    }

    fn excluded(&self, rel: &str, node: &Node) -> bool {
        self.excludes.is_match(&self.match_path(rel), &node.name_lossy())
    }

    fn include_matches(&self, rel: &str, node: &Node) -> bool {
        self.includes.as_ref().is_none_or(|inc| inc.is_match(&self.match_path(rel), &node.name_lossy()))
    }

    /// Whether something beneath directory `node` is selected by the include patterns.
    fn selected_below(&self, node: &Node, rel: &str) -> Result<bool> {
        if node.kind != NodeKind::Dir {
            return Ok(false);
        }
        let Some(sub) = node.subtree else { return Ok(false) };
        let tree = self.load_tree(&sub)?;
        for child in &tree.nodes {
            let crel = format!("{rel}/{}", child.name_lossy());
            if !self.excluded(&crel, child)
                && (self.include_matches(&crel, child) || self.selected_below(child, &crel)?)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn finish_dir(ctx: &Ctx, dir: &Arc<DirState>) {
    if dir.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    if let Some(node) = &dir.node {
        for e in fsmeta::apply_fd(&dir.fd, node, ctx.as_root) {
            ctx.warn(format!("{}: {e}", dir.rel));
        }
    }
    if let Some(p) = &dir.parent {
        finish_dir(ctx, p);
    }
}

fn finish_file(ctx: &Ctx, f: &Arc<FileState>) {
    if f.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    let failed = f.failed.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(why) => ctx.fail(&f.rel, why),
        None => {
            for e in fsmeta::apply_fd(&f.fd, &f.node, ctx.as_root) {
                ctx.warn(format!("{}: {e}", f.rel));
            }
            ctx.count(|o| o.files += 1);
            ctx.progress.add_files(1);
        }
    }
    finish_dir(ctx, &f.dir);
}

/// Removes a non-directory entry in the way; leaves directories alone.
fn clear_name(dir: &OwnedFd, name: &CString) -> rustix::io::Result<Option<FileType>> {
    match fsmeta::stat_at(dir.as_fd(), name) {
        Ok(st) => {
            let ft = FileType::from_raw_mode(st.st_mode);
            if ft != FileType::Directory {
                rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty())?;
                return Ok(None);
            }
            Ok(Some(ft))
        }
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

struct Walker<'a> {
    ctx: &'a Ctx,
    jobs: crossbeam_channel::Sender<PackJob>,
    batch: RefCell<Batch>,
    batch_files: usize,
}

impl Walker<'_> {
    /// `included`: an ancestor matched the include patterns, so everything below is restored.
    fn restore_tree(&self, dir: &Arc<DirState>, tree: &Tree, included: bool) -> Result<()> {
        let rel_of = |node: &Node| {
            if dir.rel.is_empty() { node.name_lossy() } else { format!("{}/{}", dir.rel, node.name_lossy()) }
        };
        // The subtrees of this directory's children, fetched together (one request per pack).
        let subs: Vec<Id> = tree
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Dir && !self.ctx.excluded(&rel_of(n), n))
            .filter_map(|n| n.subtree)
            .collect();
        let mut prefetched: HashMap<Id, Result<Tree>> = if subs.len() > 1 {
            let trees = self.ctx.handle.block_on(self.ctx.repo.load_trees(&subs));
            subs.into_iter().zip(trees).collect()
        } else {
            HashMap::new()
        };
        for node in &tree.nodes {
            let rel = rel_of(node);
            if self.ctx.excluded(&rel, node) {
                continue;
            }
            let matched = included || self.ctx.include_matches(&rel, node);
            if matched || (node.kind == NodeKind::Dir && self.ctx.selected_below(node, &rel)?) {
                let pre = node.subtree.and_then(|id| prefetched.remove(&id));
                self.restore_node(dir, node, rel, matched, pre)?;
            }
        }
        Ok(())
    }

    /// `prefetched`: the node's subtree, when already loaded.
    fn restore_node(
        &self,
        dir: &Arc<DirState>,
        node: &Node,
        rel: String,
        included: bool,
        prefetched: Option<Result<Tree>>,
    ) -> Result<()> {
        let ctx = self.ctx;
        if !crate::tree::valid_name(&node.name) {
            ctx.warn(format!("{rel}: unsafe name, skipped"));
            return Ok(());
        }
        let Ok(name) = CString::new(node.name.clone()) else { return Ok(()) };
        // Files and directories are created first and only on EEXIST is the entry in the way
        // examined (one syscall per entry into an empty target instead of two); hard links and
        // other kinds clear the name first.
        let create_first = node.kind == NodeKind::Dir || (node.kind == NodeKind::File && node.links <= 1);
        if !create_first && let Err(e) = clear_name(&dir.fd, &name) {
            ctx.fail(&rel, format!("cannot replace existing entry: {e}"));
            return Ok(());
        }
        match node.kind {
            NodeKind::Dir => {
                let mkdir = || rustix::fs::mkdirat(&dir.fd, name.as_c_str(), Mode::from_raw_mode(0o700));
                let made = match mkdir() {
                    Err(rustix::io::Errno::EXIST) => match clear_name(&dir.fd, &name) {
                        Ok(Some(_)) => Ok(()), // an existing directory is reused
                        Ok(None) => mkdir(),
                        Err(e) => {
                            ctx.fail(&rel, format!("cannot replace existing entry: {e}"));
                            return Ok(());
                        }
                    },
                    other => other,
                };
                if let Err(e) = made {
                    ctx.fail(&rel, format!("mkdir: {e}"));
                    return Ok(());
                }
                let fd = match fsmeta::open_dir_at(dir.fd.as_fd(), &name) {
                    Ok(fd) => fd,
                    Err(e) => {
                        ctx.fail(&rel, format!("open directory: {e}"));
                        return Ok(());
                    }
                };
                if let Some(root) = ctx.root_mount.get() {
                    match MountKey::of(fd.as_fd()) {
                        Ok(m) if m.same_mount(root) => {}
                        Ok(_) => {
                            ctx.fail(
                                &rel,
                                "is a mount point (another filesystem or a bind mount): not restored into".into(),
                            );
                            return Ok(());
                        }
                        Err(e) => {
                            ctx.fail(&rel, format!("stat directory: {e}"));
                            return Ok(());
                        }
                    }
                }
                ctx.count(|o| o.dirs += 1);
                dir.pending.fetch_add(1, Ordering::AcqRel);
                let child = Arc::new(DirState {
                    fd,
                    node: Some(node.clone()),
                    rel,
                    pending: AtomicUsize::new(1),
                    parent: Some(Arc::clone(dir)),
                });
                if let Some(sub) = node.subtree {
                    match prefetched.unwrap_or_else(|| ctx.load_tree(&sub)) {
                        Ok(tree) => self.restore_tree(&child, &tree, included)?,
                        Err(e) => ctx.fail(&child.rel, format!("directory listing unreadable: {e}")),
                    }
                }
                finish_dir(ctx, &child);
            }
            NodeKind::File => self.restore_file(dir, node, name, rel),
            NodeKind::Symlink => {
                let target = node.link_target.as_ref().map(|t| t.to_vec()).unwrap_or_default();
                let Ok(target) = CString::new(target) else {
                    ctx.warn(format!("{rel}: link target contains NUL, skipped"));
                    return Ok(());
                };
                if let Err(e) = rustix::fs::symlinkat(target.as_c_str(), &dir.fd, name.as_c_str()) {
                    ctx.fail(&rel, format!("symlink: {e}"));
                    return Ok(());
                }
                for e in fsmeta::apply_at(dir.fd.as_fd(), &name, node, ctx.as_root) {
                    ctx.warn(format!("{rel}: {e}"));
                }
                ctx.count(|o| o.other += 1);
            }
            NodeKind::Fifo | NodeKind::Socket | NodeKind::CharDevice | NodeKind::BlockDevice => {
                let ft = match node.kind {
                    NodeKind::Fifo => FileType::Fifo,
                    NodeKind::Socket => FileType::Socket,
                    NodeKind::CharDevice => FileType::CharacterDevice,
                    _ => FileType::BlockDevice,
                };
                let is_dev = matches!(node.kind, NodeKind::CharDevice | NodeKind::BlockDevice);
                if is_dev && !ctx.as_root {
                    ctx.warn(format!("{rel}: device nodes are restored only as root, skipped"));
                    return Ok(());
                }
                if let Err(e) = rustix::fs::mknodat(&dir.fd, name.as_c_str(), ft, Mode::from_raw_mode(0o600), node.rdev)
                {
                    ctx.fail(&rel, format!("mknod: {e}"));
                    return Ok(());
                }
                for e in fsmeta::apply_at(dir.fd.as_fd(), &name, node, ctx.as_root) {
                    ctx.warn(format!("{rel}: {e}"));
                }
                ctx.count(|o| o.other += 1);
            }
        }
        Ok(())
    }

    fn restore_file(&self, dir: &Arc<DirState>, node: &Node, name: CString, rel: String) {
        let ctx = self.ctx;
        if node.links > 1 {
            let key = (node.device, node.inode);
            let mut links = ctx.links.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((first_dir, first_name)) = links.get(&key) {
                match rustix::fs::linkat(
                    &first_dir.fd,
                    first_name.as_c_str(),
                    &dir.fd,
                    name.as_c_str(),
                    AtFlags::empty(),
                ) {
                    Ok(()) => {
                        ctx.count(|o| o.files += 1);
                        ctx.progress.add_files(1);
                        return;
                    }
                    Err(e) => ctx.warn(format!("{rel}: hard link failed ({e}), restoring a copy")),
                }
            } else {
                links.insert(key, (Arc::clone(dir), name.clone()));
            }
        }
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let create = || rustix::fs::openat(&dir.fd, name.as_c_str(), flags, Mode::from_raw_mode(0o600));
        let created = match create() {
            // Something is in the way: remove it (never a directory) and try once more.
            Err(rustix::io::Errno::EXIST) => match clear_name(&dir.fd, &name) {
                Ok(_) => create(),
                Err(e) => {
                    ctx.fail(&rel, format!("cannot replace existing entry: {e}"));
                    return;
                }
            },
            other => other,
        };
        let fd = match created {
            Ok(fd) => fd,
            Err(e) => {
                ctx.fail(&rel, format!("create: {e}"));
                return;
            }
        };
        if node.size > 0
            && let Err(e) = rustix::fs::ftruncate(&fd, node.size)
        {
            ctx.fail(&rel, format!("set size: {e}"));
            return;
        }
        let data: Vec<(u64, Id, u32)> = {
            let mut offset = 0u64;
            let mut data = Vec::new();
            for e in &node.content {
                if let Extent::Data { id, len } = e {
                    data.push((offset, *id, *len));
                }
                offset += e.len();
            }
            data
        };
        dir.pending.fetch_add(1, Ordering::AcqRel);
        let file = Arc::new(FileState {
            fd,
            node: node.clone(),
            rel,
            dir: Arc::clone(dir),
            remaining: AtomicUsize::new(data.len().max(1)),
            failed: Mutex::new(None),
        });
        if data.is_empty() {
            finish_file(ctx, &file);
            return;
        }
        let mut missing = 0;
        let full = {
            let mut batch = self.batch.borrow_mut();
            let index = ctx.repo.index();
            for (offset, id, len) in data {
                let Some(loc) = index.get(&id) else {
                    file.mark_failed(format!("blob {} is not in the index", id.short()));
                    missing += 1;
                    continue;
                };
                if batch.seen_packs.insert(loc.pack) {
                    batch.packs.push(loc.pack);
                }
                let target = Target { file: Arc::clone(&file), offset, len };
                batch.blobs.entry(id).or_insert_with(|| BlobJob { id, loc, targets: Vec::new() }).targets.push(target);
            }
            batch.files += 1;
            batch.files >= self.batch_files || batch.blobs.len() >= MAX_BATCH_BLOBS
        };
        for _ in 0..missing {
            finish_file(ctx, &file);
        }
        if full {
            self.flush();
        }
    }

    /// Turns the current batch into pack jobs (packs in walk order, blobs in offset order) and
    /// hands them to the workers; blocks while the job queue is full.
    fn flush(&self) {
        let batch = std::mem::take(&mut *self.batch.borrow_mut());
        let mut by_pack: HashMap<Id, Vec<BlobJob>> = HashMap::new();
        for (_, b) in batch.blobs {
            by_pack.entry(b.loc.pack).or_default().push(b);
        }
        for pack in batch.packs {
            let Some(mut blobs) = by_pack.remove(&pack) else { continue };
            blobs.sort_by_key(|b| b.loc.offset);
            let mut job = PackJob { pack, blobs: Vec::new() };
            let mut bytes = 0u64;
            for b in blobs {
                let len = b.loc.stored_len as u64;
                if !job.blobs.is_empty() && bytes + len > MAX_JOB_BYTES {
                    let full = std::mem::replace(&mut job, PackJob { pack, blobs: Vec::new() });
                    if self.jobs.send(full).is_err() {
                        return;
                    }
                    bytes = 0;
                }
                bytes += len;
                job.blobs.push(b);
            }
            if !job.blobs.is_empty() && self.jobs.send(job).is_err() {
                return;
            }
        }
    }
}

/// Writes `data` at `offset`, skipping whole zero pages so they stay holes.
fn write_sparse(fd: &OwnedFd, data: &[u8], offset: u64) -> rustix::io::Result<()> {
    let mut pos = 0;
    while pos < data.len() {
        // Skip zero pages.
        while pos + PAGE <= data.len() && crate::util::is_zero(&data[pos..pos + PAGE]) {
            pos += PAGE;
        }
        if pos >= data.len() {
            break;
        }
        let mut end = pos + PAGE;
        while end < data.len() && !(end + PAGE <= data.len() && crate::util::is_zero(&data[end..end + PAGE])) {
            end += PAGE;
        }
        let end = end.min(data.len());
        let mut done = pos;
        while done < end {
            match rustix::io::pwrite(fd, &data[done..end], offset + done as u64) {
                Ok(0) => return Err(rustix::io::Errno::NOSPC),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        pos = end;
    }
    Ok(())
}

/// Gives up one target: the file fails with `why` (the first reason is kept).
fn give_up(ctx: &Ctx, t: &Target, why: &str) {
    t.file.mark_failed(why.to_string());
    finish_file(ctx, &t.file);
}

fn write_target(ctx: &Ctx, t: &Target, plain: &[u8], id: &Id) {
    if plain.len() != t.len as usize {
        give_up(ctx, t, &format!("blob {} has the wrong length", id.short()));
        return;
    }
    if !t.file.has_failed() {
        match write_sparse(&t.file.fd, plain, t.offset) {
            Ok(()) => {
                ctx.bytes.fetch_add(t.len as u64, Ordering::Relaxed);
                ctx.progress.add_bytes(t.len as u64);
            }
            Err(e) => t.file.mark_failed(format!("write: {e}")),
        }
    }
    finish_file(ctx, &t.file);
}

/// Fetches a pack job's blobs in one `get_ranges` call, opens each and writes it to its targets.
fn run_job(ctx: &Ctx, job: PackJob) {
    let ranges: Vec<std::ops::Range<u64>> =
        job.blobs.iter().map(|b| b.loc.offset as u64..b.loc.offset as u64 + b.loc.stored_len as u64).collect();
    let fetched = ctx.handle.block_on(ctx.repo.store().get_ranges(&pack_key(&job.pack), &ranges));
    let datas = match fetched {
        Ok(d) if d.len() == ranges.len() => d,
        other => {
            let why = match other {
                Err(e) => format!("pack {}: {e}", job.pack.short()),
                Ok(_) => format!("pack {}: short answer to a ranged read", job.pack.short()),
            };
            for t in job.blobs.iter().flat_map(|b| &b.targets) {
                give_up(ctx, t, &why);
            }
            return;
        }
    };
    for (b, sealed) in job.blobs.iter().zip(datas) {
        let plain = if sealed.len() != b.loc.stored_len as usize {
            Err(format!("pack {} is truncated", job.pack.short()))
        } else if b.targets.iter().all(|t| t.file.has_failed()) {
            Err(String::new())
        } else {
            ctx.repo.unseal_blob(&b.id, b.loc.ty, b.loc.compression, b.loc.raw_len, &sealed).map_err(|e| e.to_string())
        };
        match plain {
            Ok(plain) => {
                for t in &b.targets {
                    write_target(ctx, t, &plain, &b.id);
                }
            }
            Err(why) => {
                for t in &b.targets {
                    give_up(ctx, t, &why);
                }
            }
        }
    }
}

fn worker(ctx: &Ctx, jobs: &Receiver<PackJob>) {
    for job in jobs.iter() {
        run_job(ctx, job);
    }
}

/// Restores `source` into `opts.target` (created if missing).
pub async fn restore(repo: Arc<Repository>, source: RestoreSource, mut opts: RestoreOptions) -> Result<RestoreOutcome> {
    if repo.index().is_empty() {
        repo.load_index().await?;
    }
    let includes = if opts.includes.is_empty() { None } else { Some(Patterns::new(&opts.includes)?) };
    let ctx = Arc::new(Ctx {
        repo,
        handle: tokio::runtime::Handle::current(),
        as_root: crate::util::is_root(),
        includes,
        excludes: Patterns::new(&opts.excludes)?,
        match_prefix: opts.match_prefix.trim_matches('/').to_string(),
        progress: Arc::clone(&opts.progress),
        outcome: Mutex::new(RestoreOutcome::default()),
        bytes: AtomicU64::new(0),
        links: Mutex::new(HashMap::new()),
        root_mount: std::sync::OnceLock::new(),
    });
    let one_file_system = opts.one_file_system;
    let target = opts.target.clone();
    let target_dir = opts.target_dir.take();
    let workers = opts.workers.max(1);
    let ctx2 = Arc::clone(&ctx);
    tokio::task::spawn_blocking(move || -> Result<()> {
        let ctx = &*ctx2;
        let root_fd = match target_dir {
            Some(fd) => fd,
            None => {
                std::fs::create_dir_all(&target).ctx(|| format!("create {}", target.display()))?;
                rustix::fs::open(&target, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                    .ctx(|| format!("open {}", target.display()))?
            }
        };
        if one_file_system {
            let m = MountKey::of(root_fd.as_fd()).ctx(|| format!("stat {}", target.display()))?;
            let _ = ctx.root_mount.set(m);
        }
        let root = Arc::new(DirState {
            fd: root_fd,
            node: None,
            rel: String::new(),
            pending: AtomicUsize::new(1),
            parent: None,
        });
        let (tx, rx) = bounded::<PackJob>(workers * 2);
        // Each file of a batch holds a descriptor until written: stay well inside the limit.
        let batch_files = ((crate::util::nofile_limit().0.saturating_sub(64) / 4) as usize).clamp(16, MAX_BATCH_FILES);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    let rx = rx.clone();
                    std::thread::Builder::new()
                        .name("restore-worker".into())
                        .spawn_scoped(s, move || worker(ctx, &rx))
                        .map_err(|e| Error::io("spawn restore worker", e))
                })
                .collect::<Result<_>>()?;
            drop(rx);
            let walked = std::thread::Builder::new()
                .name("restore-walker".into())
                .stack_size(256 * 1024 * 1024)
                .spawn_scoped(s, || {
                    let w = Walker { ctx, jobs: tx, batch: RefCell::new(Batch::default()), batch_files };
                    let r = match &source {
                        RestoreSource::Tree(id) => ctx.load_tree(id).and_then(|t| w.restore_tree(&root, &t, false)),
                        RestoreSource::Node(node) => {
                            let rel = node.name_lossy();
                            w.restore_node(&root, node, rel, ctx.includes.is_none(), None)
                        }
                    };
                    w.flush();
                    drop(w);
                    finish_dir(ctx, &root);
                    r
                })
                .map_err(|e| Error::io("spawn restore walker", e))?;
            let r = walked.join().map_err(|_| Error::Internal("restore walker panicked".into()))?;
            for h in handles {
                let _ = h.join();
            }
            r
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("restore task: {e}")))??;
    let mut out = std::mem::take(&mut *ctx.outcome.lock().unwrap_or_else(|p| p.into_inner()));
    out.bytes = ctx.bytes.load(Ordering::Relaxed);
    Ok(out)
}
