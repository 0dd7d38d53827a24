//! Restore: recreate a tree below a target directory, confined to it.
//!
//! * Confinement: the target is opened once; every entry is created relative to its parent's
//!   descriptor with `O_NOFOLLOW`/`O_EXCL` (names are validated single components), so a hostile
//!   snapshot or a pre-planted symlink in the target cannot write outside it.
//! * Content is planned by pack: the walker collects the blobs of a batch of files (at most
//!   [`MAX_BATCH_FILES`] files and [`MAX_BATCH_BLOBS`] blobs), groups them by pack in offset
//!   order, and a pool of workers fetches each pack's blobs with one `Store::get_ranges_once`
//!   call per job reading at most [`MAX_JOB_BYTES`] (on a filesystem: one open and one direct
//!   read per span of nearby blobs, all into one buffer; on object stores: few coalesced ranged
//!   requests), several packs at once.
//!   A blob is fetched once per batch however many files use it, then authenticated,
//!   decompressed and written at each of its offsets by the same worker; a job's blobs are
//!   opened in file order, so that adjacent bytes of a file make one write. Holes (and all-zero
//!   pages) are not written, so sparse files stay sparse.
//! * Jobs for files written through the page cache and jobs for files written directly wait in
//!   separate queues (`JobQueues`): the first are CPU work, the second wait on the disk, and
//!   [`CACHED_WORKERS`] extra workers run the first while the others wait for the disk.
//! * Files of at least [`crate::backup::DIRECT_MIN_FILE`] bytes are written with `O_DIRECT`
//!   where the filesystem takes it ([`RestoreOptions::direct_io`]): their data extents are
//!   reserved up front, workers gather adjacent blobs into whole aligned blocks
//!   ([`crate::blockwrite`]) and writer threads write them, and each split block its last
//!   piece completes, while the workers go on (a worker never waits for a direct write). A
//!   restore then neither copies every byte into the page cache nor evicts the node's cached
//!   data.
//! * Copies: a blob with one target in such a file is decrypted (and decompressed) straight
//!   into the gathering buffer; other blobs into a per-worker buffer kept between blobs up to
//!   [`crate::repo::SCRATCH_KEEP`] bytes. Nothing is allocated per blob below that size.
//! * Metadata (owner when root, mode, xattrs, times) is applied after content; a directory's
//!   after everything inside it is done.
//! * Every blob is authenticated and checked against its id. A file whose data cannot be read
//!   (missing or damaged pack, damaged blob) is listed in [`RestoreOutcome::failed`]; only the
//!   files using the affected blobs fail, and the rest of the restore continues. A file that
//!   fails because the target's device or quota is full also sets
//!   [`RestoreOutcome::target_full`]; [`RestoreOutcome::bytes`] counts restored files only.
//! * Existing entries: [`RestoreOptions::overwrite`] decides whether an entry of the target with
//!   the name of one being restored is replaced or left alone ([`gives_way`], pure); existing
//!   directories are merged into. With [`RestoreOptions::delete`], entries of a restored
//!   directory that the snapshot lacks are removed (confined, never across a mount). A file
//!   whose content could not be restored is removed, not left zero-filled under its real name.
//!   [`plan`] tells, without writing, what a restore would create, replace, keep and delete.
//! * Mounts: with [`RestoreOptions::one_file_system`], an existing directory in the target that
//!   is on another mount than the target root (a bind mount or another filesystem mounted
//!   inside it) is never descended into: that entry fails, nothing is written below it.
//! * Bounded: the plans of at most [`MAX_BATCHES_IN_FLIGHT`] batches being fetched and one being
//!   built exist at once (the walker creates later files while workers write earlier ones),
//!   pack jobs wait in two bounded channels, each worker holds one job's bytes and at
//!   most [`STAGE_BUFFERS`] buffers of gathered blocks;
//!   descriptors are held only for directories and files with pending work.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender, bounded};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::blockwrite::{self, AlignedBuf, BlockFile};
use crate::directread::ReadFootprint;
use crate::error::{Error, IoContext, Result};
use crate::fsmeta;
use crate::id::Id;
use crate::index::BlobLocation;
use crate::progress::Progress;
use crate::repo::{Repository, pack_key};
use crate::tree::{Extent, MAX_DEPTH, Node, NodeKind, Tree};

/// Skipped existing entries listed by path in [`RestoreOutcome::skipped_paths`].
pub const MAX_LISTED_SKIPS: usize = 100;
/// Most files in one planning batch (each holds a descriptor until its content is written).
pub const MAX_BATCH_FILES: usize = 1024;
/// Most distinct blobs in one planning batch.
pub const MAX_BATCH_BLOBS: usize = 16 * 1024;
/// Batches planned and handed to the workers but not yet written (see `BatchGate`).
pub const MAX_BATCHES_IN_FLIGHT: usize = 8;
/// Pack jobs waiting for a worker (the batch gate bounds what they hold).
pub const MAX_QUEUED_JOBS: usize = 1024;
/// Most bytes one pack job reads, counted as a filesystem read takes them: its blobs in whole
/// blocks, with the gaps between blobs read along ([`ReadFootprint`]); a larger blob is a job of
/// its own. That is what a worker holds in memory at once, and it fits one read buffer
/// ([`crate::directread::MAX_SPAN`], 2 MiB). 8 MiB jobs took 12-20 MiB more peak memory than
/// 4 MiB ones, and 4 MiB ones 5-7 MiB more than 2 MiB ones, in the same time. Jobs of 4 MiB of
/// stored bytes often spilled into a second read buffer: restoring the bench's mutated 2 GiB
/// snapshot peaked at 80.2 MiB against 75.5 with 4 MiB jobs counted this way (medians of 5
/// alternating cold runs, same wall and CPU time).
pub const MAX_JOB_BYTES: u64 = crate::directread::MAX_SPAN as u64;
/// Bytes of whole blocks a worker gathers for one direct write (see [`crate::blockwrite`]).
pub const STAGE_BYTES: usize = 2 * 1024 * 1024;
/// Buffers of [`STAGE_BYTES`] a worker owns: one it fills, the others being written.
pub const STAGE_BUFFERS: usize = 2;
/// Threads writing gathered blocks (direct writes wait for the disk).
pub const WRITERS: usize = 4;
/// Workers that take only jobs for files written through the page cache (see `JobQueues`).
pub const CACHED_WORKERS: usize = 2;

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
    /// Write files of at least [`crate::backup::DIRECT_MIN_FILE`] bytes with `O_DIRECT` where
    /// the filesystem allows it, bypassing the page cache (see [`crate::blockwrite`]).
    pub direct_io: bool,
    pub hooks: RestoreRaceHooks,
    pub fidelity: Fidelity,
    /// What happens to an entry of the target that has the name of an entry being restored.
    pub overwrite: Overwrite,
    /// Remove entries of the restored directories that the snapshot does not have (restic's
    /// `--delete`); excluded paths are left alone, and include patterns are refused with it.
    pub delete: bool,
    /// Metadata for the target directory itself (a component's [`crate::snapshot::Component::root_node`]),
    /// applied after everything in it, as for any restored directory.
    pub root_node: Option<Node>,
}

/// Whether an existing entry of the target gives way to the snapshot's entry of the same name
/// (restic's `--overwrite` choices). A skipped entry is counted in [`RestoreOutcome::skipped`];
/// an existing directory is always merged into, never replaced or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overwrite {
    /// Existing entries are left as they are (the default of the CLI and of the cluster).
    #[default]
    Never,
    /// Replaced unless it is the same kind of entry with the same size and modification time
    /// (an interrupted restore's partial file has its final size but not yet its time).
    IfChanged,
    /// Replaced when the snapshot's entry was modified later than the existing one.
    IfNewer,
    /// Always replaced.
    Always,
}

/// What restore knows of an existing entry when deciding ([`gives_way`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Existing {
    pub kind: NodeKind,
    pub size: u64,
    pub mtime: crate::tree::Timestamp,
}

impl Existing {
    pub(crate) fn of(st: &rustix::fs::Stat) -> Existing {
        Existing {
            kind: fsmeta::kind_of(st),
            size: st.st_size as u64,
            mtime: crate::tree::Timestamp { sec: st.st_mtime, nsec: st.st_mtime_nsec as u32 },
        }
    }
}

/// Pure: whether `existing` is replaced by the snapshot's `node` under `policy`.
pub fn gives_way(policy: Overwrite, existing: &Existing, node: &Node) -> bool {
    match policy {
        Overwrite::Never => false,
        Overwrite::Always => true,
        Overwrite::IfNewer => (node.mtime.sec, node.mtime.nsec) > (existing.mtime.sec, existing.mtime.nsec),
        Overwrite::IfChanged => {
            existing.kind != node.kind
                || existing.mtime != node.mtime
                || (node.kind == NodeKind::File && existing.size != node.size)
        }
    }
}

/// How much of what a snapshot records a restore recreates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fidelity {
    /// Everything: owners, set-id bits, device nodes, all extended attributes. For a user
    /// restoring their own data (the CLI's default).
    #[default]
    Full,
    /// What a workload's volume may receive without bypassing Pod Security (the agent's
    /// default): no device nodes; set-user-id and set-group-id bits cleared; no `security.*` or
    /// `trusted.*` extended attributes (file capabilities, SELinux labels); owner or group 0
    /// becomes the target root directory's. Each left-out item is a warning.
    Confined,
}

/// Callbacks at the moments someone else could change the target under a restore, so tests
/// can do it deterministically instead of racing.
#[derive(Clone, Default)]
pub struct RestoreRaceHooks {
    /// A FIFO, socket or device node has just been created (path relative to the target);
    /// its owner, mode and times are set next.
    pub after_create_special: Option<crate::backup::FileHook>,
}

impl std::fmt::Debug for RestoreRaceHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreRaceHooks").field("after_create_special", &self.after_create_special.is_some()).finish()
    }
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
            direct_io: true,
            hooks: RestoreRaceHooks::default(),
            fidelity: Fidelity::Full,
            overwrite: Overwrite::default(),
            delete: false,
            root_node: None,
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
    /// Content bytes of the files restored (those in `failed` not counted).
    pub bytes: u64,
    /// Files whose content could not be restored, with the reason; paths as the snapshot names
    /// them (`/component/dir/file` when `match_prefix` names the component).
    pub failed: Vec<(String, String)>,
    /// Some of `failed` failed because the target's device or quota is full.
    pub target_full: bool,
    /// How many of `failed` failed because the repository could not provide their data
    /// (`check --read-data` tells more); the others were refused by the target.
    pub failed_from_repository: u64,
    /// Metadata that could not be applied and skipped entries.
    pub warnings: Vec<String>,
    /// Existing entries left as they are under [`RestoreOptions::overwrite`].
    pub skipped: u64,
    /// The first [`MAX_LISTED_SKIPS`] of them, as the snapshot names them (`/component/path`
    /// when the restore's `match_prefix` names the component).
    pub skipped_paths: Vec<String>,
    /// Entries removed under [`RestoreOptions::delete`] (a directory counts once).
    pub deleted: u64,
    /// The first [`MAX_LISTED_SKIPS`] of them, as the snapshot would name them.
    pub deleted_paths: Vec<String>,
    /// Files written in whole blocks past the page cache (`O_DIRECT`) to the end.
    pub direct_files: u64,
    /// Files opened for direct writes whose filesystem refused one of them, so that they were
    /// finished through the page cache (same content, more system time).
    pub direct_refused: u64,
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
    /// Set when the file is written in whole blocks (with `O_DIRECT`).
    blocks: Option<BlockFile>,
    failed: Mutex<Option<String>>,
    /// The failure was the repository's: it could not provide the file's data (missing,
    /// damaged or unreadable), as opposed to the target refusing a write.
    from_repository: std::sync::atomic::AtomicBool,
    /// The failure was a full device or quota.
    no_space: std::sync::atomic::AtomicBool,
    /// Content bytes handed to writes; counted in the outcome only if the file is restored.
    written: AtomicU64,
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

    /// A write of the file's content failed.
    fn mark_write_failed(&self, e: impl Into<std::io::Error>) {
        let e = e.into();
        if crate::error::is_no_space(&e) {
            self.no_space.store(true, Ordering::Relaxed);
        }
        self.mark_failed(format!("write: {e}"));
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

/// Blobs of one pack in offset order, fetched with one `get_ranges_once` call.
struct PackJob {
    pack: Id,
    blobs: Vec<BlobJob>,
    /// The batch stays in flight until its last job is done.
    _batch: Arc<BatchTicket>,
}

/// Pack jobs by how their files are written. Jobs for files written with `O_DIRECT` keep the
/// disk busy and leave the CPU half idle; jobs for files written through the page cache (small
/// files: creation, page-cache copies, metadata) are CPU work and barely touch the disk. In one
/// queue the second kind waits for the first (a tree's small files often come after its large
/// ones); in two queues, [`CACHED_WORKERS`] workers run it in the first kind's idle time, and
/// the other workers take it whenever no direct job is waiting.
struct JobQueues {
    direct: Sender<PackJob>,
    cached: Sender<PackJob>,
}

impl JobQueues {
    fn send(&self, job: PackJob) -> Result<(), crossbeam_channel::SendError<PackJob>> {
        let direct = job.blobs.iter().flat_map(|b| &b.targets).any(|t| t.file.blocks.is_some());
        if direct { self.direct.send(job) } else { self.cached.send(job) }
    }
}

/// The receiving ends of [`JobQueues`], for one worker (generic for its tests).
struct JobSource<T> {
    direct: Option<Receiver<T>>,
    cached: Option<Receiver<T>>,
}

impl<T> JobSource<T> {
    /// The next job, from `direct` while it has one waiting; `None` once both queues are closed
    /// and empty.
    fn next(&mut self) -> Option<T> {
        loop {
            if let Some(d) = &self.direct
                && let Ok(job) = d.try_recv()
            {
                return Some(job);
            }
            let (direct, cached) = match (&self.direct, &self.cached) {
                (None, None) => return None,
                (Some(d), None) => return d.recv().ok(),
                (None, Some(c)) => return c.recv().ok(),
                (Some(d), Some(c)) => (d, c),
            };
            crossbeam_channel::select! {
                recv(direct) -> job => match job {
                    Ok(job) => return Some(job),
                    Err(_) => self.direct = None,
                },
                recv(cached) -> job => match job {
                    Ok(job) => return Some(job),
                    Err(_) => self.cached = None,
                },
            }
        }
    }
}

/// Batches whose jobs are queued or running, at most [`MAX_BATCHES_IN_FLIGHT`]: the walker
/// creates the files of later batches while workers write earlier ones (file creation and
/// writing overlap), and the descriptors held stay bounded.
#[derive(Default)]
struct BatchGate {
    in_flight: Mutex<usize>,
    left: std::sync::Condvar,
}

impl BatchGate {
    /// Waits until fewer than [`MAX_BATCHES_IN_FLIGHT`] batches are in flight; the ticket
    /// counts one more until it is dropped.
    fn enter(self: &Arc<Self>) -> Arc<BatchTicket> {
        let mut n = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= MAX_BATCHES_IN_FLIGHT {
            n = self.left.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Arc::new(BatchTicket(Arc::clone(self)))
    }
}

struct BatchTicket(Arc<BatchGate>);

impl Drop for BatchTicket {
    fn drop(&mut self) {
        *self.0.in_flight.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.left.notify_all();
    }
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
    direct_io: bool,
    hooks: RestoreRaceHooks,
    /// Set once the target root is open (a confined restore needs its owner).
    meta: std::sync::OnceLock<fsmeta::MetaPolicy>,
    overwrite: Overwrite,
    delete: bool,
}

impl Ctx {
    /// Until the root is open nothing is written; confined is the safe answer meanwhile.
    fn meta(&self) -> fsmeta::MetaPolicy {
        self.meta.get().copied().unwrap_or(fsmeta::MetaPolicy { as_root: self.as_root, confined: Some((0, 0)) })
    }

    fn confined(&self) -> bool {
        self.meta().confined.is_some()
    }
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

    /// Whether the existing entry `name` of `dir` is left alone for `node`: true after counting
    /// it as skipped. An entry that vanished meanwhile, or cannot be examined, is not skipped
    /// (creating the entry then reports what is wrong).
    fn keeps_existing(&self, dir: &OwnedFd, name: &CString, node: &Node, rel: &str) -> bool {
        if self.overwrite == Overwrite::Always {
            return false;
        }
        let Ok(st) = fsmeta::stat_at(dir.as_fd(), name) else { return false };
        let existing = Existing::of(&st);
        // A directory is merged into, never replaced.
        if existing.kind == NodeKind::Dir && node.kind == NodeKind::Dir {
            return false;
        }
        if gives_way(self.overwrite, &existing, node) {
            return false;
        }
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        o.skipped += 1;
        if o.skipped_paths.len() < MAX_LISTED_SKIPS {
            o.skipped_paths.push(self.snapshot_path(rel));
        }
        drop(o);
        self.progress.add_files(1);
        true
    }

    /// Records a failed entry, named as the snapshot names it.
    fn fail(&self, rel: &str, why: String) {
        let path = self.snapshot_path(rel);
        tracing::error!("{path}: {why}");
        // Shown live among the recent warnings (and counted with them).
        self.progress.add_warning(&format!("{path}: {why}"));
        self.outcome.lock().unwrap_or_else(|p| p.into_inner()).failed.push((path, why));
    }

    /// [`Ctx::fail`] for an I/O error; a full device or quota marks the outcome `target_full`.
    fn fail_io(&self, rel: &str, what: &str, e: impl Into<std::io::Error>) {
        let e = e.into();
        self.fail_for_space(rel, format!("{what}: {e}"), crate::error::is_no_space(&e));
    }

    /// [`Ctx::fail`], marking the outcome `target_full` when the target had no space.
    fn fail_for_space(&self, rel: &str, why: String, no_space: bool) {
        if no_space {
            self.outcome.lock().unwrap_or_else(|p| p.into_inner()).target_full = true;
        }
        self.fail(rel, why);
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

    /// `rel` (below the restore root) as the snapshot names it, `/component/dir/file`, when
    /// `match_prefix` names where the root is; else `rel` itself (relative to the target).
    fn snapshot_path(&self, rel: &str) -> String {
        let rel = rel.trim_start_matches('/');
        if self.match_prefix.is_empty() { rel.to_string() } else { format!("/{}/{rel}", self.match_prefix) }
    }

    /// Under [`RestoreOptions::delete`]: removes the entries of `dir` that `tree` does not have,
    /// except excluded ones; a mount point is never removed nor descended into.
    fn delete_extras(&self, dir: &DirState, tree: &Tree) {
        let names = match fsmeta::list_dir(dir.fd.as_fd()) {
            Ok(n) => n,
            Err(e) => return self.fail(&dir.rel, format!("cannot list to delete what the snapshot lacks: {e}")),
        };
        for name in extras(names, tree) {
            let lossy = String::from_utf8_lossy(name.as_bytes()).into_owned();
            let rel = if dir.rel.is_empty() { lossy.clone() } else { format!("{}/{lossy}", dir.rel) };
            if self.excludes.is_match(&self.match_path(&rel), &lossy) {
                continue;
            }
            match remove_entry(&dir.fd, &name, 0) {
                Ok(()) => {
                    let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
                    o.deleted += 1;
                    if o.deleted_paths.len() < MAX_LISTED_SKIPS {
                        o.deleted_paths.push(self.snapshot_path(&rel));
                    }
                }
                Err(e) => self.fail(&rel, format!("cannot delete: {e}")),
            }
        }
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

/// Pure: the names of a directory's entries that `tree` does not have, in listing order.
fn extras(listed: Vec<CString>, tree: &Tree) -> Vec<CString> {
    let wanted: HashSet<&[u8]> = tree.nodes.iter().map(|n| n.name.as_slice()).collect();
    listed.into_iter().filter(|n| !wanted.contains(n.as_bytes())).collect()
}

/// Removes `name` from `dir`, a directory with everything in it, confined: nothing is
/// followed, and a directory on another mount (a mount point) is refused, not descended into.
fn remove_entry(dir: &OwnedFd, name: &CString, depth: usize) -> rustix::io::Result<()> {
    let st = fsmeta::stat_at(dir.as_fd(), name)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty());
    }
    if depth >= MAX_DEPTH || !MountKey::of(dir.as_fd())?.same_mount(&MountKey::of_at(dir.as_fd(), name)?) {
        return Err(rustix::io::Errno::BUSY);
    }
    let sub = fsmeta::open_dir_at(dir.as_fd(), name)?;
    for child in fsmeta::list_dir(sub.as_fd())? {
        remove_entry(&sub, &child, depth + 1)?;
    }
    rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::REMOVEDIR)
}

fn finish_dir(ctx: &Ctx, dir: &Arc<DirState>) {
    if dir.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    if let Some(node) = &dir.node {
        let meta = ctx.meta();
        for e in fsmeta::apply_fd(&dir.fd, node, &meta).into_iter().chain(meta.left_out(node)) {
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
    if let Some(blocks) = &f.blocks
        && !f.has_failed()
        && let Err(e) = blocks.finish(&f.fd)
    {
        f.mark_write_failed(e);
    }
    let failed = f.failed.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(why) => {
            // Not left full-size and zero-filled under its real name, as if restored.
            let why = match CString::new(f.node.name.clone())
                .map(|n| rustix::fs::unlinkat(&f.dir.fd, n.as_c_str(), AtFlags::empty()))
            {
                Ok(Ok(())) => format!("{why} (the partial file was removed)"),
                _ => why,
            };
            if f.from_repository.load(Ordering::Relaxed) {
                ctx.count(|o| o.failed_from_repository += 1);
            }
            ctx.fail_for_space(&f.rel, why, f.no_space.load(Ordering::Relaxed))
        }
        None => {
            let meta = ctx.meta();
            for e in fsmeta::apply_fd(&f.fd, &f.node, &meta).into_iter().chain(meta.left_out(&f.node)) {
                ctx.warn(format!("{}: {e}", f.rel));
            }
            // A refused direct write turns the descriptor's flag off (`blockwrite::write_blocks`).
            let direct = f
                .blocks
                .as_ref()
                .map(|_| rustix::fs::fcntl_getfl(&f.fd).is_ok_and(|flags| flags.contains(rustix::fs::OFlags::DIRECT)));
            ctx.count(|o| {
                o.files += 1;
                match direct {
                    Some(true) => o.direct_files += 1,
                    Some(false) => o.direct_refused += 1,
                    None => {}
                }
            });
            ctx.bytes.fetch_add(f.written.load(Ordering::Relaxed), Ordering::Relaxed);
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
    jobs: JobQueues,
    gate: Arc<BatchGate>,
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
        if self.ctx.delete {
            self.ctx.delete_extras(dir, tree);
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
        if !create_first {
            if ctx.keeps_existing(&dir.fd, &name, node, &rel) {
                return Ok(());
            }
            if let Err(e) = clear_name(&dir.fd, &name) {
                ctx.fail(&rel, format!("cannot replace existing entry: {e}"));
                return Ok(());
            }
        }
        match node.kind {
            NodeKind::Dir => {
                // One descriptor and one stack frame per level: a crafted snapshot's depth bomb
                // stops here (the same limit as the backup's).
                if rel.trim_start_matches('/').matches('/').count() >= MAX_DEPTH {
                    ctx.warn(format!(
                        "{rel}: deeper than {MAX_DEPTH} directory levels, not restored (nor anything in it)"
                    ));
                    return Ok(());
                }
                let mkdir = || rustix::fs::mkdirat(&dir.fd, name.as_c_str(), Mode::from_raw_mode(0o700));
                let made = match mkdir() {
                    Err(rustix::io::Errno::EXIST) if ctx.keeps_existing(&dir.fd, &name, node, &rel) => return Ok(()),
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
                    ctx.fail_io(&rel, "mkdir", e);
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
                    ctx.fail_io(&rel, "symlink", e);
                    return Ok(());
                }
                let meta = ctx.meta();
                for e in fsmeta::apply_at(dir.fd.as_fd(), &name, node, &meta).into_iter().chain(meta.left_out(node)) {
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
                if is_dev && ctx.confined() {
                    ctx.warn(format!("{rel}: confined restore: device node not restored"));
                    return Ok(());
                }
                if let Err(e) = rustix::fs::mknodat(&dir.fd, name.as_c_str(), ft, Mode::from_raw_mode(0o600), node.rdev)
                {
                    ctx.fail_io(&rel, "mknod", e);
                    return Ok(());
                }
                if let Some(h) = &ctx.hooks.after_create_special {
                    h(&rel);
                }
                let meta = ctx.meta();
                for e in fsmeta::apply_at(dir.fd.as_fd(), &name, node, &meta).into_iter().chain(meta.left_out(node)) {
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
            // Something is in the way: left alone, or removed (never a directory) and tried once more.
            Err(rustix::io::Errno::EXIST) if ctx.keeps_existing(&dir.fd, &name, node, &rel) => return,
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
                ctx.fail_io(&rel, "create", e);
                return;
            }
        };
        if node.size > 0
            && let Err(e) = rustix::fs::ftruncate(&fd, node.size)
        {
            ctx.fail_io(&rel, "set size", e);
            return;
        }
        let blocks =
            (ctx.direct_io && node.size >= crate::backup::DIRECT_MIN_FILE && fsmeta::set_direct(&fd, true).is_ok())
                .then(|| BlockFile::new(node.size));
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
        if blocks.is_some() {
            blockwrite::preallocate(&fd, data.iter().map(|&(offset, _, len)| offset..offset + len as u64));
        }
        dir.pending.fetch_add(1, Ordering::AcqRel);
        let file = Arc::new(FileState {
            fd,
            node: node.clone(),
            rel,
            dir: Arc::clone(dir),
            remaining: AtomicUsize::new(data.len().max(1)),
            blocks,
            failed: Mutex::new(None),
            no_space: Default::default(),
            from_repository: Default::default(),
            written: AtomicU64::new(0),
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
                    file.from_repository.store(true, Ordering::Relaxed);
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
        let ticket = self.gate.enter();
        let mut by_pack: HashMap<Id, Vec<BlobJob>> = HashMap::new();
        for (_, b) in batch.blobs {
            by_pack.entry(b.loc.pack).or_default().push(b);
        }
        for pack in batch.packs {
            let Some(mut blobs) = by_pack.remove(&pack) else { continue };
            blobs.sort_by_key(|b| b.loc.offset);
            let mut job = PackJob { pack, blobs: Vec::new(), _batch: Arc::clone(&ticket) };
            let mut footprint = ReadFootprint::default();
            for b in blobs {
                let range = b.loc.offset as u64..b.loc.offset as u64 + b.loc.stored_len as u64;
                if !job.blobs.is_empty() && footprint.with(&range) > MAX_JOB_BYTES {
                    let next = PackJob { pack, blobs: Vec::new(), _batch: Arc::clone(&ticket) };
                    let full = std::mem::replace(&mut job, next);
                    if self.jobs.send(full).is_err() {
                        return;
                    }
                    footprint = ReadFootprint::default();
                }
                footprint.add(&range);
                job.blobs.push(b);
            }
            if !job.blobs.is_empty() && self.jobs.send(job).is_err() {
                return;
            }
        }
    }
}

/// Gives up one target because the repository could not provide its data: the file fails
/// with `why` (the first reason is kept).
fn give_up(ctx: &Ctx, t: &Target, why: &str) {
    t.file.from_repository.store(true, Ordering::Relaxed);
    t.file.mark_failed(why.to_string());
    finish_file(ctx, &t.file);
}

fn write_target(ctx: &Ctx, t: &Target, plain: &[u8], id: &Id, stage: &mut Stage<'_>) {
    if plain.len() != t.len as usize {
        give_up(ctx, t, &format!("blob {} has the wrong length", id.short()));
        return;
    }
    if t.file.has_failed() {
        finish_file(ctx, &t.file);
        return;
    }
    if t.file.blocks.is_some() {
        stage.put(t, plain);
        return;
    }
    match blockwrite::write_sparse(&t.file.fd, plain, t.offset) {
        Ok(()) => {
            t.file.written.fetch_add(t.len as u64, Ordering::Relaxed);
            ctx.progress.add_bytes(t.len as u64);
        }
        Err(e) => t.file.mark_write_failed(e),
    }
    finish_file(ctx, &t.file);
}

/// Targets whose bytes are being written: each is finished when the last holder lets go (the
/// worker's [`Stage`] at the end of its pack job, or a [`WriteOrder`] once written), so a file's
/// metadata is applied only after all of its bytes are on their way to the disk.
struct Finisher<'a> {
    ctx: &'a Ctx,
    files: Mutex<Vec<Arc<FileState>>>,
}

impl Drop for Finisher<'_> {
    fn drop(&mut self) {
        for f in self.files.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            finish_file(self.ctx, &f);
        }
    }
}

/// Whole blocks of one file for a writer thread.
struct WriteOrder<'a> {
    file: Arc<FileState>,
    blocks: OrderBlocks,
    _finisher: Arc<Finisher<'a>>,
}

enum OrderBlocks {
    /// Blocks a worker gathered: `range` of the file, from `buf`, whose first byte is at file
    /// offset `buf_start`; the buffer then goes back to its worker through `home`.
    Gathered { buf: AlignedBuf, buf_start: u64, range: std::ops::Range<u64>, home: Sender<AlignedBuf> },
    /// A split block its last piece completed.
    Completed(blockwrite::CompleteBlock),
}

impl WriteOrder<'_> {
    /// Writes the blocks (unless the file has failed) and hands a worker's buffer back.
    fn write(self) {
        let file = &self.file;
        let result = match &self.blocks {
            _ if file.has_failed() => Ok(()),
            OrderBlocks::Gathered { buf, buf_start, range, .. } => {
                let at = |offset: u64| (offset - buf_start) as usize;
                blockwrite::write_blocks(&file.fd, &buf.as_slice()[at(range.start)..at(range.end)], range.start)
            }
            OrderBlocks::Completed(block) => match &file.blocks {
                Some(blocks) => blocks.write_block(&file.fd, block),
                None => Ok(()),
            },
        };
        if let Err(e) = result {
            file.mark_write_failed(e);
        }
        if let OrderBlocks::Gathered { buf, home, .. } = self.blocks {
            let _ = home.send(buf);
        }
    }
}

/// Writes orders until every worker has gone.
fn writer(orders: &Receiver<WriteOrder<'_>>) {
    for order in orders.iter() {
        order.write();
    }
}

/// A worker's run of adjacent blobs of one file written in whole blocks (see
/// [`crate::blockwrite`]), gathered into buffers of [`STAGE_BYTES`] that writer threads write
/// while the worker goes on with the next blobs. Only the run's first and last blocks can be
/// split with other runs; blocks between adjacent blobs are whole here.
///
/// Bounded: a worker owns at most [`STAGE_BUFFERS`] buffers (one filling, the others with the
/// writers) and waits for one to come back before it gathers more.
struct Stage<'a> {
    ctx: &'a Ctx,
    orders: Sender<WriteOrder<'a>>,
    home: (Sender<AlignedBuf>, Receiver<AlignedBuf>),
    owned: usize,
    buf: Option<AlignedBuf>,
    file: Option<Arc<FileState>>,
    /// File offset of the buffer's first byte (aligned).
    start: u64,
    /// Bytes before the run's first byte (when it does not begin a block).
    skip: usize,
    /// Bytes in the buffer, `skip` included.
    len: usize,
    /// The targets of the current pack job.
    finisher: Option<Arc<Finisher<'a>>>,
}

impl<'a> Stage<'a> {
    fn new(ctx: &'a Ctx, orders: Sender<WriteOrder<'a>>) -> Stage<'a> {
        Stage {
            ctx,
            orders,
            home: crossbeam_channel::bounded(STAGE_BUFFERS),
            owned: 0,
            buf: None,
            file: None,
            start: 0,
            skip: 0,
            len: 0,
            finisher: None,
        }
    }

    /// The current pack job's finisher.
    fn finisher(&mut self) -> &Arc<Finisher<'a>> {
        let ctx = self.ctx;
        self.finisher.get_or_insert_with(|| Arc::new(Finisher { ctx, files: Mutex::new(Vec::new()) }))
    }

    fn take_buf(&mut self) -> AlignedBuf {
        if let Ok(b) = self.home.1.try_recv() {
            return b;
        }
        if self.owned < STAGE_BUFFERS {
            self.owned += 1;
            return AlignedBuf::new_huge(STAGE_BYTES);
        }
        // Every order hands its buffer back once written (see `writer`).
        self.home.1.recv().unwrap_or_else(|_| AlignedBuf::new(STAGE_BYTES))
    }

    /// Hands `blocks` of file `f` to a writer: a direct write waits for the disk, and the worker
    /// goes on meanwhile.
    fn send(&mut self, f: &Arc<FileState>, blocks: OrderBlocks) {
        let order = WriteOrder { file: Arc::clone(f), blocks, _finisher: Arc::clone(self.finisher()) };
        // Writers outlive the workers; should they be gone, write here.
        if let Err(crossbeam_channel::SendError(order)) = self.orders.send(order) {
            order.write();
        }
    }

    /// Hands the whole blocks gathered to a writer. With `closing`, the run ends: its last
    /// split block goes to the file; otherwise that block's bytes start the next buffer.
    fn write_out(&mut self, closing: bool) {
        let Some(f) = self.file.clone() else { return };
        let run = self.start + self.skip as u64..self.start + self.len as u64;
        let [head, body, tail] = blockwrite::split(run.start, run.end - run.start);
        let buf_start = self.start;
        let at = |offset: u64| (offset - buf_start) as usize;
        let mut completed = [None, None];
        if let (Some(blocks), Some(buf)) = (&f.blocks, &self.buf)
            && !f.has_failed()
        {
            let bytes = buf.as_slice();
            completed[0] = blocks.put_piece(head.start, &bytes[at(head.start)..at(head.end)]);
            if closing {
                completed[1] = blocks.put_piece(tail.start, &bytes[at(tail.start)..at(tail.end)]);
            }
        }
        for block in completed.into_iter().flatten() {
            self.send(&f, OrderBlocks::Completed(block));
        }
        let carried = if closing { 0..0 } else { at(tail.start)..at(tail.end) };
        if !body.is_empty()
            && let Some(buf) = self.buf.take()
        {
            let mut next = self.take_buf();
            next.as_mut_slice()[..carried.len()].copy_from_slice(&buf.as_slice()[carried.clone()]);
            self.buf = Some(next);
            let home = self.home.0.clone();
            self.send(&f, OrderBlocks::Gathered { buf, buf_start: self.start, range: body, home });
        } else if let Some(buf) = &mut self.buf {
            buf.as_mut_slice().copy_within(carried.clone(), 0);
        }
        self.start += carried.start as u64;
        self.skip = 0;
        self.len = carried.len();
        if closing {
            self.file = None;
        }
    }

    /// Ends the pack job: the run is closed, and its targets are finished once written.
    fn flush(&mut self) {
        self.write_out(true);
        self.finisher = None;
    }

    /// Continues the run with target `t` when it is the next bytes of the same file, otherwise
    /// closes the run and starts another at `t`.
    fn begin(&mut self, t: &Target) {
        let continues =
            self.file.as_ref().is_some_and(|f| Arc::ptr_eq(f, &t.file)) && self.start + self.len as u64 == t.offset;
        if !continues {
            self.write_out(true);
            if self.buf.is_none() {
                self.buf = Some(self.take_buf());
            }
            self.file = Some(Arc::clone(&t.file));
            self.start = blockwrite::align_down(t.offset);
            self.skip = (t.offset - self.start) as usize;
            self.len = self.skip;
        }
    }

    /// Takes one target of a file written in whole blocks (see [`Stage::begin`]).
    fn put(&mut self, t: &Target, plain: &[u8]) {
        self.begin(t);
        let mut src = plain;
        while !src.is_empty() {
            if self.len == STAGE_BYTES {
                self.write_out(false);
            }
            let Some(buf) = &mut self.buf else { break };
            let n = (STAGE_BYTES - self.len).min(src.len());
            buf.as_mut_slice()[self.len..self.len + n].copy_from_slice(&src[..n]);
            self.len += n;
            src = &src[n..];
        }
        self.taken(t);
    }

    /// Where target `t`'s bytes go in the buffer, to be filled in place (saving a copy) and then
    /// taken with [`Stage::commit`] (or left: the next bytes overwrite them). `None` when they
    /// do not fit in the buffer.
    fn reserve(&mut self, t: &Target) -> Option<&mut [u8]> {
        self.begin(t);
        let len = t.len as usize;
        // Only a run past its first block boundary is written out early: its carried tail then
        // starts on a boundary, so the buffer stays aligned with the file.
        if STAGE_BYTES - self.len < len && self.len > blockwrite::ALIGN {
            self.write_out(false);
        }
        let start = self.len;
        let buf = self.buf.as_mut()?;
        buf.as_mut_slice().get_mut(start..start + len)
    }

    /// Takes the bytes [`Stage::reserve`] gave for target `t`, now filled in.
    fn commit(&mut self, t: &Target) {
        self.len += t.len as usize;
        self.taken(t);
    }

    /// Counts target `t` as staged; it is finished when the pack job's blocks are written.
    fn taken(&mut self, t: &Target) {
        t.file.written.fetch_add(t.len as u64, Ordering::Relaxed);
        self.ctx.progress.add_bytes(t.len as u64);
        self.finisher().files.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::clone(&t.file));
    }
}

/// Fetches a pack job's blobs in one `get_ranges_once` call, opens each and writes it to its
/// targets.
/// `plain`: the worker's buffer for blobs that are not opened into the stage.
fn run_job(ctx: &Ctx, job: PackJob, stage: &mut Stage<'_>, plain: &mut Vec<u8>) {
    let ranges: Vec<std::ops::Range<u64>> =
        job.blobs.iter().map(|b| b.loc.offset as u64..b.loc.offset as u64 + b.loc.stored_len as u64).collect();
    let fetched = ctx.handle.block_on(ctx.repo.store().get_ranges_once(&pack_key(&job.pack), &ranges));
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
    // Blobs are opened in file order, not pack order: a pack interleaves the chunks of files
    // (and of parts of large files) read at the same time, and blobs taken in file order make
    // long runs of adjacent bytes, so a stage gathers large writes instead of one per chunk.
    let mut order: Vec<usize> = (0..job.blobs.len()).collect();
    order.sort_by_key(|&i| job.blobs[i].targets.first().map(|t| (Arc::as_ptr(&t.file) as usize, t.offset)));
    for i in order {
        let (b, sealed) = (&job.blobs[i], &datas[i]);
        let loc = &b.loc;
        if sealed.len() != loc.stored_len as usize {
            let why = format!("pack {} is truncated", job.pack.short());
            b.targets.iter().for_each(|t| give_up(ctx, t, &why));
            continue;
        }
        if b.targets.iter().all(|t| t.file.has_failed()) {
            b.targets.iter().for_each(|t| give_up(ctx, t, ""));
            continue;
        }
        // A blob with one target in a file written in whole blocks is opened straight into the
        // stage's buffer.
        if let [t] = b.targets.as_slice()
            && t.file.blocks.is_some()
            && t.len == loc.raw_len
            && let Some(dest) = stage.reserve(t)
        {
            match ctx.repo.unseal_blob_into(&b.id, loc.ty, loc.compression, sealed, dest) {
                Ok(()) => stage.commit(t),
                Err(e) => give_up(ctx, t, &e.to_string()),
            }
            continue;
        }
        if plain.len() < loc.raw_len as usize {
            plain.resize(loc.raw_len as usize, 0);
        }
        let bytes = &mut plain[..loc.raw_len as usize];
        match ctx.repo.unseal_blob_into(&b.id, loc.ty, loc.compression, sealed, bytes) {
            Ok(()) => b.targets.iter().for_each(|t| write_target(ctx, t, bytes, &b.id, stage)),
            Err(e) => b.targets.iter().for_each(|t| give_up(ctx, t, &e.to_string())),
        }
        if plain.len() > crate::repo::SCRATCH_KEEP {
            *plain = Vec::new();
        }
    }
}

fn worker<'a>(ctx: &'a Ctx, mut jobs: JobSource<PackJob>, orders: Sender<WriteOrder<'a>>) {
    let mut stage = Stage::new(ctx, orders);
    let mut plain = Vec::new();
    while let Some(job) = jobs.next() {
        run_job(ctx, job, &mut stage, &mut plain);
        stage.flush();
    }
}

impl Ctx {
    async fn new(repo: Arc<Repository>, opts: &RestoreOptions) -> Result<Ctx> {
        if repo.index().is_empty() {
            repo.load_index().await?;
        }
        if opts.delete && !opts.includes.is_empty() {
            return Err(Error::InvalidArgument(
                "deleting what the snapshot does not have is refused with include patterns (use excludes)".into(),
            ));
        }
        let includes = if opts.includes.is_empty() { None } else { Some(Patterns::new(&opts.includes)?) };
        Ok(Ctx {
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
            direct_io: opts.direct_io,
            hooks: opts.hooks.clone(),
            meta: std::sync::OnceLock::new(),
            overwrite: opts.overwrite,
            delete: opts.delete,
        })
    }
}

/// Restores `source` into `opts.target` (created if missing).
pub async fn restore(repo: Arc<Repository>, source: RestoreSource, mut opts: RestoreOptions) -> Result<RestoreOutcome> {
    let ctx = Arc::new(Ctx::new(repo, &opts).await?);
    let fidelity = opts.fidelity;
    let one_file_system = opts.one_file_system;
    let target = opts.target.clone();
    let target_dir = opts.target_dir.take();
    let root_node = opts.root_node.take();
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
        let confined = match fidelity {
            Fidelity::Full => None,
            Fidelity::Confined => {
                let st = rustix::fs::fstat(&root_fd).ctx(|| format!("stat {}", target.display()))?;
                Some((st.st_uid, st.st_gid))
            }
        };
        let _ = ctx.meta.set(fsmeta::MetaPolicy { as_root: ctx.as_root, confined });
        let root = Arc::new(DirState {
            fd: root_fd,
            node: root_node,
            rel: String::new(),
            pending: AtomicUsize::new(1),
            parent: None,
        });
        let (direct_tx, direct_rx) = bounded::<PackJob>(MAX_QUEUED_JOBS);
        let (cached_tx, cached_rx) = bounded::<PackJob>(MAX_QUEUED_JOBS);
        // Each file of a batch holds a descriptor until written, in the batches in flight and
        // the one being built: stay well inside the limit.
        let batches = MAX_BATCHES_IN_FLIGHT as u64 + 1;
        let batch_files =
            ((crate::util::nofile_limit().0.saturating_sub(64) / batches) as usize).clamp(16, MAX_BATCH_FILES);
        std::thread::scope(|s| {
            let (orders_tx, orders_rx) = bounded::<WriteOrder<'_>>(WRITERS);
            for _ in 0..WRITERS {
                let orders_rx = orders_rx.clone();
                std::thread::Builder::new()
                    .name("restore-writer".into())
                    .spawn_scoped(s, move || writer(&orders_rx))
                    .map_err(|e| Error::io("spawn restore writer", e))?;
            }
            drop(orders_rx);
            let handles: Vec<_> = (0..workers + CACHED_WORKERS)
                .map(|i| {
                    let jobs =
                        JobSource { direct: (i < workers).then(|| direct_rx.clone()), cached: Some(cached_rx.clone()) };
                    let orders_tx = orders_tx.clone();
                    std::thread::Builder::new()
                        .name("restore-worker".into())
                        .spawn_scoped(s, move || worker(ctx, jobs, orders_tx))
                        .map_err(|e| Error::io("spawn restore worker", e))
                })
                .collect::<Result<_>>()?;
            drop(orders_tx);
            drop((direct_rx, cached_rx));
            let walked = std::thread::Builder::new()
                .name("restore-walker".into())
                .stack_size(256 * 1024 * 1024)
                .spawn_scoped(s, || {
                    let w = Walker {
                        ctx,
                        jobs: JobQueues { direct: direct_tx, cached: cached_tx },
                        gate: Arc::new(BatchGate::default()),
                        batch: RefCell::new(Batch::default()),
                        batch_files,
                    };
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

/// What a restore would do to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Create,
    Replace,
    Keep,
    Delete,
}

/// What [`plan`] found: per kind of change, how many and (the first [`MAX_PLANNED_PATHS`]) which
/// paths, as the snapshot names them. Directories that exist and are merged into are not listed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestorePlan {
    pub create: u64,
    pub replace: u64,
    pub keep: u64,
    pub delete: u64,
    pub changes: Vec<(Change, String)>,
}

/// Paths [`RestorePlan::changes`] lists at most.
pub const MAX_PLANNED_PATHS: usize = 10_000;

impl RestorePlan {
    fn note(&mut self, change: Change, path: String) {
        *match change {
            Change::Create => &mut self.create,
            Change::Replace => &mut self.replace,
            Change::Keep => &mut self.keep,
            Change::Delete => &mut self.delete,
        } += 1;
        if self.changes.len() < MAX_PLANNED_PATHS {
            self.changes.push((change, path));
        }
    }
}

/// A dry run: what restoring `source` with `opts` would create, replace, keep and delete in
/// `opts.target`, which is only read (a missing target: everything is created). The same
/// selection ([`RestoreOptions::includes`], excludes) and the same decisions ([`gives_way`],
/// [`RestoreOptions::delete`]) as [`restore`].
pub async fn plan(repo: Arc<Repository>, source: RestoreSource, opts: RestoreOptions) -> Result<RestorePlan> {
    let ctx = Ctx::new(repo, &opts).await?;
    let target = opts.target.clone();
    let target_dir = opts.target_dir;
    tokio::task::spawn_blocking(move || {
        let root = match target_dir {
            Some(fd) => Some(fd),
            // Only read, and not through a symlink planted at the target's name.
            None => match rustix::fs::open(
                &target,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => Some(fd),
                Err(rustix::io::Errno::NOENT) => None,
                Err(e) => return Err(Error::io(format!("open {}", target.display()), e.into())),
            },
        };
        let mut out = RestorePlan::default();
        match &source {
            RestoreSource::Tree(id) => plan_dir(&ctx, root.as_ref(), &ctx.load_tree(id)?, "", false, 0, &mut out)?,
            RestoreSource::Node(node) => {
                let tree = Tree { nodes: vec![node.clone()] };
                plan_dir(&ctx, root.as_ref(), &tree, "", ctx.includes.is_none(), 0, &mut out)?
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| Error::Internal(format!("restore plan: {e}")))?
}

/// [`plan`] for one directory: `dir` is its existing counterpart in the target, if any.
fn plan_dir(
    ctx: &Ctx,
    dir: Option<&OwnedFd>,
    tree: &Tree,
    rel: &str,
    included: bool,
    depth: usize,
    out: &mut RestorePlan,
) -> Result<()> {
    for node in &tree.nodes {
        let name_lossy = node.name_lossy();
        let crel = if rel.is_empty() { name_lossy } else { format!("{rel}/{name_lossy}") };
        if ctx.excluded(&crel, node) || !crate::tree::valid_name(&node.name) {
            continue;
        }
        let matched = included || ctx.include_matches(&crel, node);
        if !(matched || (node.kind == NodeKind::Dir && ctx.selected_below(node, &crel)?)) {
            continue;
        }
        let Ok(name) = CString::new(node.name.clone()) else { continue };
        let existing = dir.and_then(|d| fsmeta::stat_at(d.as_fd(), &name).ok()).map(|st| Existing::of(&st));
        let mut sub_dir = None;
        match existing {
            None => out.note(Change::Create, ctx.snapshot_path(&crel)),
            Some(e) if e.kind == NodeKind::Dir && node.kind == NodeKind::Dir => {
                sub_dir = dir.and_then(|d| fsmeta::open_dir_at(d.as_fd(), &name).ok());
            }
            Some(e) if gives_way(ctx.overwrite, &e, node) => out.note(Change::Replace, ctx.snapshot_path(&crel)),
            Some(_) => {
                out.note(Change::Keep, ctx.snapshot_path(&crel));
                continue;
            }
        }
        if node.kind == NodeKind::Dir
            && depth < MAX_DEPTH
            && let Some(sub) = node.subtree
        {
            plan_dir(ctx, sub_dir.as_ref(), &ctx.load_tree(&sub)?, &crel, matched, depth + 1, out)?;
        }
    }
    if ctx.delete
        && let Some(d) = dir
    {
        let names = fsmeta::list_dir(d.as_fd()).map_err(|e| Error::io(format!("list {rel}"), e.into()))?;
        for name in extras(names, tree) {
            let lossy = String::from_utf8_lossy(name.as_bytes()).into_owned();
            let crel = if rel.is_empty() { lossy.clone() } else { format!("{rel}/{lossy}") };
            if !ctx.excludes.is_match(&ctx.match_path(&crel), &lossy) {
                out.note(Change::Delete, ctx.snapshot_path(&crel));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Timestamp;

    #[test]
    fn extras_are_the_listed_names_the_tree_lacks() {
        let tree =
            Tree { nodes: vec![Node::new(b"a".to_vec(), NodeKind::File), Node::new(b"c".to_vec(), NodeKind::Dir)] };
        let listed = ["a", "b", "c", "d"].map(|n| CString::new(n).unwrap()).to_vec();
        assert_eq!(extras(listed, &tree), vec![CString::new("b").unwrap(), CString::new("d").unwrap()]);
    }

    #[test]
    fn each_overwrite_policy_decides_as_documented() {
        let at = |sec| Timestamp { sec, nsec: 0 };
        let mut node = Node::new(b"f".to_vec(), NodeKind::File);
        node.size = 10;
        node.mtime = at(100);
        let same = Existing { kind: NodeKind::File, size: 10, mtime: at(100) };
        let older = Existing { mtime: at(50), ..same };
        let newer = Existing { mtime: at(150), ..same };
        let resized = Existing { size: 11, ..same };
        let a_link = Existing { kind: NodeKind::Symlink, ..same };
        for e in [same, older, newer, resized, a_link] {
            assert!(!gives_way(Overwrite::Never, &e, &node), "{e:?}");
            assert!(gives_way(Overwrite::Always, &e, &node), "{e:?}");
        }
        assert!(!gives_way(Overwrite::IfChanged, &same, &node));
        for e in [older, newer, resized, a_link] {
            assert!(gives_way(Overwrite::IfChanged, &e, &node), "{e:?}");
        }
        assert!(gives_way(Overwrite::IfNewer, &older, &node));
        for e in [same, newer, resized] {
            assert!(!gives_way(Overwrite::IfNewer, &e, &node), "{e:?}");
        }
        // Sizes of other kinds mean nothing: a symlink with the same time is unchanged.
        let mut link = Node::new(b"l".to_vec(), NodeKind::Symlink);
        link.mtime = at(100);
        assert!(!gives_way(Overwrite::IfChanged, &Existing { size: 3, ..a_link }, &link));
    }

    #[test]
    fn workers_take_direct_jobs_first_and_stop_when_both_queues_close() {
        let (direct_tx, direct_rx) = bounded::<u32>(8);
        let (cached_tx, cached_rx) = bounded::<u32>(8);
        for j in [10, 11] {
            cached_tx.send(j).unwrap();
        }
        for j in [1, 2] {
            direct_tx.send(j).unwrap();
        }
        let mut both = JobSource { direct: Some(direct_rx.clone()), cached: Some(cached_rx.clone()) };
        let mut cached_only = JobSource { direct: None, cached: Some(cached_rx) };
        assert_eq!((both.next(), both.next()), (Some(1), Some(2)));
        assert_eq!(cached_only.next(), Some(10));
        assert_eq!(both.next(), Some(11), "with no direct job waiting, a cached one");
        // A job sent later, while the worker waits, still reaches it.
        let late = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            direct_tx.send(3).unwrap();
        });
        assert_eq!(both.next(), Some(3));
        late.join().unwrap();
        drop(cached_tx);
        assert_eq!(both.next(), None, "both queues closed and empty");
        assert_eq!(cached_only.next(), None);
        drop(direct_rx);
    }

    #[test]
    fn batch_gate_admits_a_bounded_number_of_batches() {
        let gate = Arc::new(BatchGate::default());
        let mut tickets: Vec<_> = (0..MAX_BATCHES_IN_FLIGHT).map(|_| gate.enter()).collect();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waiting = Arc::clone(&gate);
        let t = std::thread::spawn(move || {
            let ticket = waiting.enter();
            tx.send(()).unwrap();
            drop(ticket);
        });
        // Full: the next batch waits...
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err());
        // ...until one in flight is done (all of its jobs dropped).
        let last = tickets.pop().unwrap();
        let job_copy = Arc::clone(&last);
        drop(last);
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "a job still holds it");
        drop(job_copy);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert_eq!(*gate.in_flight.lock().unwrap(), MAX_BATCHES_IN_FLIGHT - 1);
    }
}
