//! Backup: walk, read, chunk and hash next to the disk; hand blobs to the [`BlobWriter`].
//!
//! ```text
//! walkers ──FileJob──▶ readers (open beneath dir fd, read segments, FastCDC, keyed hash) ──▶ BlobSink
//!    └──DirPlan (children before parents)──▶ finisher (waits for file results, writes tree blobs)
//! ```
//! * Walk: a directory's entries are listed, stat'ed and compared with the parent snapshot's
//!   nodes; its files go to the readers as they are met, its subdirectories are walked after
//!   that. With a parent snapshot, several subdirectories are walked at once on a pool of
//!   `WALK_THREADS` threads (work stealing): the walk is then most of the work (cold no-change
//!   backup of the 1 GiB bench data, 8 alternating pairs: 0.375 s on one thread, 0.295 s on
//!   the pool, medians). Without one, the walk stays depth-first on one thread, so that the
//!   files of a directory are read, and packed, together: the restore of a tree first backed
//!   up by the pool took 1.70-2.10 s against 1.61-1.76 s (4 pairs). A directory's plan is
//!   sent after its subdirectories' plans; trees do not depend on the order (a tree lists its
//!   entries sorted by name).
//! * Confinement: every entry is opened relative to its parent's directory descriptor with
//!   `O_NOFOLLOW`; symlinks are recorded, never followed; FIFOs and devices are never opened.
//! * Bounded: the job and plan channels have fixed capacity, and file data in flight is bounded
//!   by a byte [`Budget`]: a segment is acquired before it is read and held until every blob cut
//!   from it is uploaded in a pack (queued for sealing, sealed, in the pack being built, in a
//!   queued or uploading pack). The budget may be shared with other backups
//!   ([`BackupOptions::budget`]), so one limit holds for all of them. Segment, carry and sealed
//!   blob buffers are recycled through one [`BufPool`] sized to the pipeline's fullest.
//! * Reads: with [`BackupOptions::io_uring`] and a kernel that allows it, file data of files of
//!   at least [`URING_MIN_FILE`] bytes is read through one io_uring thread per backup
//!   ([`crate::uring`]: large reads, one per reader thread in flight); otherwise, and for small
//!   files, with `pread`. Both give the same bytes, hence the same snapshot. With io_uring, a
//!   reader that finds several small files waiting opens up to 16 of them and brings them into
//!   the page cache with one submission before reading each ([`crate::uring::SmallFilePrefetch`]):
//!   a batch never waits for more files, and the data stored still comes from the plain reads.
//! * Direct reads: with [`BackupOptions::direct_io`], files of at least [`DIRECT_MIN_FILE`]
//!   bytes are read with `O_DIRECT` where the filesystem allows it: the kernel then moves the
//!   data straight into the segment buffer (no page-cache copy, which cost ~9 % of a backup's
//!   CPU), and a backup does not push the node's workloads out of the page cache. Reads are
//!   [`DIRECT_ALIGN`]-aligned in offset, length and buffer address; a read that cannot be (or
//!   that the filesystem refuses) switches that file back to ordinary reads. A large file
//!   (large-file chunker, no holes) read directly through io_uring is read one segment ahead
//!   of the chunker when the budget has room at once (`Ctx::chunk_prefetched`); measured on
//!   one 287 MiB file, cold: a dedup-only re-read 0.41-0.53 s against 0.63-0.73 s without.
//! * Sparse files: holes the file's map shows ([`fsmeta::data_regions`]) are recorded as holes
//!   without being read; each data region is chunked on its own.
//! * Incremental: a file whose size, mtime, ctime and inode match the parent snapshot's node,
//!   and whose blobs are all indexed, is not read again. A changed file is read whole, but where
//!   its parent node had a chunk at the same offset with the same bytes (same keyed hash), that
//!   chunk is taken without searching for its boundary ([`PreviousCuts`]): the same cuts as a
//!   search, for the CPU of the hash alone (after-mutate backup of the bench data: 1.24 -> 1.05
//!   CPU-seconds).
//! * A file that cannot be read, vanishes, or changes while read is a warning, not a failure.
//!   So is a path source that does not exist, when another source remains.
//! * Ordering: the snapshot is saved only after [`BlobWriter::finish`] has stored and indexed
//!   every blob it references.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, Sender, bounded};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::budget::Budget;
use crate::bufpool::BufPool;
use crate::chunker::{Chunker, Cut, PreviousCuts};
use crate::error::{Error, IoContext, Result};
use crate::fsmeta;
use crate::id::Id;
use crate::pack::BlobType;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::scan::{MetadataScan, ScanRoot, ScanRules};
use crate::snapshot::{Component, ComponentKind, Snapshot, Summary, valid_component_name};
use crate::spool::SpoolDir;
use crate::tree::{Extent, MAX_DEPTH, Node, NodeKind, Timestamp, Tree};
use crate::writer::{BlobSink, BlobWriter, WriterConfig};

/// Warnings kept in a snapshot; the count is always exact.
const MAX_RECORDED_WARNINGS: usize = 1000;

/// Files smaller than this are read with plain reads even when io_uring is on: their one or two
/// reads cost less than the hand-off to the ring thread.
pub const URING_MIN_FILE: u64 = 256 * 1024;

/// Small files are read in batches ([`crate::uring::SmallFilePrefetch`]) only when the soft
/// limit on open descriptors is at least this (the `hoard` CLI raises it to the hard limit).
const PREFETCH_MIN_NOFILE: u64 = 4096;

/// Files smaller than this are read through the page cache: a direct read of a small file costs
/// a disk round trip even when its data is cached, and saves little copying.
pub const DIRECT_MIN_FILE: u64 = 1024 * 1024;

/// Alignment of direct reads (offset, length, buffer address): the largest logical block size
/// in common use.
pub const DIRECT_ALIGN: usize = 4096;

/// How many bytes a direct read at `offset` into a buffer at address `dest` may ask for when
/// `want` bytes are wanted: `want` rounded down to [`DIRECT_ALIGN`], or `None` when the read
/// cannot be aligned (the caller reads through the page cache instead).
fn direct_read_len(offset: u64, dest: usize, want: usize) -> Option<usize> {
    let len = want / DIRECT_ALIGN * DIRECT_ALIGN;
    (offset.is_multiple_of(DIRECT_ALIGN as u64) && dest.is_multiple_of(DIRECT_ALIGN) && len > 0).then_some(len)
}

/// Smallest read segment: reads this large already run at the disk's pace, and a smaller
/// segment keeps the budget's granularity fine.
pub const MIN_SEGMENT: usize = 4 * 1024 * 1024;

/// The read segment for a chunker: its largest chunk and an eighth more, in whole MiB. The uncut
/// tail carried into the next segment is shorter than a largest chunk, so every segment reads
/// at least an eighth of a largest chunk of new data (usually far more: the carry averages
/// half a chunk). Two largest chunks per segment cost 16 MiB buffers for the default chunker,
/// most of a backup's resident memory, for no measurable speed.
fn segment_for(chunker: &Chunker) -> usize {
    let max = chunker.max_size();
    (max + max / 8).next_multiple_of(1024 * 1024).max(MIN_SEGMENT)
}

/// What to back up.
pub enum Source {
    /// A directory (or a single file) read from the local filesystem.
    Path { name: String, path: PathBuf },
    /// A byte stream stored as one file named like the component.
    Stream { name: String, reader: Box<dyn Read + Send> },
    /// A directory the caller opened (e.g. a volume resolved and confined by the node agent);
    /// nothing outside it is reachable. `origin` is recorded for display.
    Dir { name: String, dir: OwnedFd, origin: String },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Path { name, path } => write!(f, "Path({name}, {})", path.display()),
            Source::Stream { name, .. } => write!(f, "Stream({name})"),
            Source::Dir { name, origin, .. } => write!(f, "Dir({name}, {origin})"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub enum ParentSelection {
    /// The newest snapshot from the same host that has a component of the same name.
    #[default]
    Auto,
    None,
    Explicit(Id),
}

#[derive(Debug)]
pub struct BackupOptions {
    pub sources: Vec<Source>,
    pub host: String,
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub parent: ParentSelection,
    pub excludes: Vec<String>,
    /// When not empty, only what these patterns match (and the directories leading to it) is
    /// backed up; see [`Includes`]. Excludes still win.
    pub includes: Vec<String>,
    pub one_file_system: bool,
    /// Bytes of file data allowed in flight (read but not yet uploaded in a pack); at least one
    /// read segment (a largest chunk and an eighth, at least [`MIN_SEGMENT`]).
    pub memory_budget: usize,
    /// A budget shared with other backups (e.g. every order of a node agent); when set, it is
    /// used instead of a budget of `memory_budget` bytes for this backup alone.
    pub budget: Option<Arc<Budget>>,
    /// Read file data through io_uring where the kernel allows it (falls back to plain reads,
    /// logging once why); off: always plain reads.
    pub io_uring: bool,
    /// Read large files with `O_DIRECT` where the filesystem allows it (see the module docs);
    /// off: every read goes through the page cache.
    pub direct_io: bool,
    pub read_concurrency: usize,
    pub writer: WriterConfig,
    pub progress: Arc<Progress>,
    /// Progress totals (for an ETA). When the parent snapshot has a component for every path
    /// and directory source, its totals are the estimate and nothing more is read; otherwise
    /// the sources are walked a second time, metadata only, with several threads beside the
    /// backup ([`crate::scan`]), which on a cold cache also warms the metadata the walker
    /// needs next.
    pub scan_totals: bool,
    /// A metadata walk of the sources started before the repository was opened
    /// ([`start_warmup`]); it is stopped when the backup's own walk starts.
    pub warmup: Option<MetadataScan>,
    pub time: Option<DateTime<Utc>>,
    /// Called at the points where a concurrent change to a file matters; empty in production.
    pub hooks: RaceHooks,
}

/// A callback given a file's path below the component root.
pub type FileHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Callbacks at the moments a file can vanish or change under a backup, so tests can make that
/// happen deterministically instead of racing a concurrent writer.
#[derive(Clone, Default)]
pub struct RaceHooks {
    /// A reader is about to open the file (the walker has already listed and stat'ed it).
    pub before_open: Option<FileHook>,
    /// The file's content has been read; its metadata is checked again next.
    pub after_read: Option<FileHook>,
}

impl std::fmt::Debug for RaceHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaceHooks")
            .field("before_open", &self.before_open.is_some())
            .field("after_read", &self.after_read.is_some())
            .finish()
    }
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            sources: Vec::new(),
            host: crate::util::hostname(),
            tags: Vec::new(),
            labels: BTreeMap::new(),
            parent: ParentSelection::Auto,
            excludes: Vec::new(),
            includes: Vec::new(),
            one_file_system: false,
            memory_budget: 512 * 1024 * 1024,
            budget: None,
            io_uring: true,
            direct_io: true,
            read_concurrency: default_read_concurrency(),
            writer: WriterConfig::default(),
            progress: Arc::new(Progress::default()),
            scan_totals: true,
            warmup: None,
            time: None,
            hooks: RaceHooks::default(),
        }
    }
}

/// Files read at once by default: reading is I/O-bound (a thread mostly waits on the disk or
/// network filesystem), so more readers than cores help, with at least 4 on small machines.
pub fn default_read_concurrency() -> usize {
    crate::writer::default_workers().max(4)
}

#[derive(Debug)]
pub struct BackupOutcome {
    pub snapshot_id: Id,
    pub snapshot: Snapshot,
    /// Whether file data was read through io_uring (false: plain reads only).
    pub io_uring: bool,
    /// The most plaintext bytes of file data this backup had in flight at once (read, not yet
    /// uploaded); never more than the memory budget.
    pub data_in_flight_high_water: u64,
}

/// Exclude patterns: a pattern with a `/` matches the path below the component root, any other
/// pattern matches an entry's name at any depth.
#[derive(Debug, Clone)]
pub struct Excludes {
    by_name: GlobSet,
    by_path: GlobSet,
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Excludes> {
        let mut by_name = GlobSetBuilder::new();
        let mut by_path = GlobSetBuilder::new();
        for p in patterns {
            let p = p.trim();
            if p.is_empty() || p.starts_with('#') {
                continue;
            }
            let bad = |e: globset::Error| Error::InvalidArgument(format!("exclude pattern {p:?}: {e}"));
            if p.contains('/') {
                let g = GlobBuilder::new(p.trim_start_matches('/')).literal_separator(true).build().map_err(bad)?;
                by_path.add(g);
            } else {
                by_name.add(GlobBuilder::new(p).literal_separator(true).build().map_err(bad)?);
            }
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| Error::InvalidArgument(e.to_string()));
        Ok(Excludes { by_name: build(by_name)?, by_path: build(by_path)? })
    }

    /// `rel` is the path below the component root, without a leading `/`.
    pub fn is_excluded(&self, rel: &str, name: &str) -> bool {
        self.by_name.is_match(name) || self.by_path.is_match(rel)
    }
}

/// Include patterns, relative to the component root like [`Excludes`]: a pattern with a `/`
/// matches the path below the root (a leading `/` is optional), any other pattern an entry's
/// name at any depth. An entry they match is backed up, a directory with everything below it.
/// Any other directory is walked only if it could hold a match (every directory for a name
/// pattern; for a path pattern, one whose path matches the pattern's leading components) and
/// kept only if it then holds something; any other non-directory is left out.
#[derive(Debug, Clone, Default)]
pub struct Includes {
    by_name: GlobSet,
    by_path: GlobSet,
    /// The path patterns split at `/`, to tell whether a directory could hold a match.
    path_components: Vec<Vec<Segment>>,
    names: bool,
}

/// One `/`-separated component of a path pattern.
#[derive(Debug, Clone)]
enum Segment {
    /// `**`: any number of components.
    Any,
    Glob(globset::GlobMatcher),
}

impl Includes {
    pub fn new(patterns: &[String]) -> Result<Includes> {
        let mut by_name = GlobSetBuilder::new();
        let mut by_path = GlobSetBuilder::new();
        let mut path_components = Vec::new();
        let mut names = false;
        for p in patterns {
            let p = p.trim().trim_start_matches('/').trim_end_matches('/');
            if p.is_empty() {
                continue;
            }
            let glob = |g: &str| {
                GlobBuilder::new(g)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| Error::InvalidArgument(format!("include pattern {p:?}: {e}")))
            };
            if p.contains('/') {
                by_path.add(glob(p)?);
                by_path.add(glob(&format!("{p}/**"))?);
                let segments = p
                    .split('/')
                    .map(|seg| {
                        if seg == "**" {
                            Ok(Segment::Any)
                        } else {
                            glob(seg).map(|g| Segment::Glob(g.compile_matcher()))
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                path_components.push(segments);
            } else {
                by_name.add(glob(p)?);
                names = true;
            }
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| Error::InvalidArgument(e.to_string()));
        Ok(Includes { by_name: build(by_name)?, by_path: build(by_path)?, path_components, names })
    }

    /// No patterns: everything is included.
    pub fn is_empty(&self) -> bool {
        !self.names && self.path_components.is_empty()
    }

    /// Whether the entry is included, with everything below it. `rel` is the path below the
    /// component root, without a leading `/`.
    pub fn matches(&self, rel: &str, name: &str) -> bool {
        self.by_name.is_match(name) || self.by_path.is_match(rel)
    }

    /// Whether the directory `rel` (not itself matched) could hold an entry that matches.
    pub fn may_contain(&self, rel: &str) -> bool {
        if self.names {
            return true;
        }
        let dir: Vec<&str> = rel.split('/').collect();
        self.path_components.iter().any(|pattern| {
            for (i, part) in dir.iter().enumerate() {
                match pattern.get(i) {
                    None => return false,
                    Some(Segment::Any) => return true,
                    Some(Segment::Glob(g)) if !g.is_match(part) => return false,
                    Some(Segment::Glob(_)) => {}
                }
            }
            dir.len() < pattern.len()
        })
    }
}

/// Which entries of a directory the walk takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Selection {
    /// Everything (no include patterns, or an ancestor matched one).
    All,
    /// What the include patterns match or may hold a match.
    Matching,
}

impl Selection {
    /// `None`: leave the entry out; otherwise how to walk it if it is a directory.
    pub(crate) fn of(self, includes: Option<&Includes>, rel: &str, name: &str, is_dir: bool) -> Option<Selection> {
        match includes {
            _ if self == Selection::All => Some(Selection::All),
            None => Some(Selection::All),
            Some(inc) if inc.matches(rel, name) => Some(Selection::All),
            Some(inc) if is_dir && inc.may_contain(rel) => Some(Selection::Matching),
            Some(_) => None,
        }
    }
}

/// (device, inode) of a file.
type InodeKey = (u64, u64);

struct FileJob {
    dir: Arc<OwnedFd>,
    name: CString,
    rel: String,
    expected_inode: u64,
    /// The size the walk saw (it decides whether the file joins a batch of small files; the
    /// reader's own `fstat` decides everything else).
    size: u64,
    /// A changed file's previous version: its size and where it was cut.
    previous: Option<(u64, PreviousCuts)>,
    reply: Sender<FileOutcome>,
}

#[derive(Default)]
struct FileOutcome {
    content: Vec<Extent>,
    size: u64,
    xattrs: Vec<crate::tree::Xattr>,
    stat: Option<rustix::fs::Stat>,
    /// The file could not be backed up at all.
    skip: bool,
}

enum Pending {
    Ready,
    File(Receiver<FileOutcome>),
    Dir(u64),
}

struct DirPlan {
    seq: u64,
    nodes: Vec<(Node, Pending)>,
}

/// State shared by the walker, readers and finisher of one backup.
struct Ctx {
    repo: Arc<Repository>,
    sink: BlobSink,
    /// One sink per component, each counting the sealed bytes of the new blobs it adds (the
    /// component's `bytes_stored`); `component` is the index of the one being backed up.
    component_sinks: Vec<(BlobSink, Arc<AtomicU64>)>,
    component: AtomicUsize,
    chunker: Chunker,
    /// Chunker for files of at least the given size ([`crate::chunker::LargeFileChunking`]).
    large_chunker: Option<(u64, Chunker)>,
    budget: Arc<Budget>,
    /// Read segment for files cut by `chunker` ([`segment_for`]); `large_chunker`'s segment is
    /// `large_segment`.
    segment: usize,
    large_segment: usize,
    /// Segment buffers, and those of the uncut tails carried from one segment into the next,
    /// come from and go back to this pool (the blob writer's too).
    pool: Arc<BufPool>,
    /// Bytes of pooled segments alive at once (read, or with chunks not yet sealed): a few
    /// segments per sealing thread, so readers of large files do not run far ahead of sealing
    /// with megabytes each. Unlike the budget, released when the segment buffer is freed.
    segment_room: Arc<Budget>,
    progress: Arc<Progress>,
    /// The io_uring reader of this backup, when in use.
    uring: Option<crate::uring::UringReader>,
    direct_io: bool,
    handle: tokio::runtime::Handle,
    warnings: Mutex<Vec<String>>,
    warning_count: AtomicU64,
    excludes: Excludes,
    /// `None` when there are no include patterns.
    includes: Option<Includes>,
    one_file_system: bool,
    stats: SummaryCounters,
    hardlinks: Hardlinks,
    hooks: RaceHooks,
}

/// Longest a reader waits for another reader's read of the same inode before reading it too.
const LINK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Content of multiply-linked files read in this run, by (device, inode), and the inodes being
/// read now: a reader that opens another link of an inode being read waits for that read
/// (at most [`LINK_WAIT`]) instead of reading the same data again.
#[derive(Default)]
struct Hardlinks {
    state: Mutex<HashMap<InodeKey, LinkState>>,
    changed: std::sync::Condvar,
}

enum LinkState {
    Reading,
    Read(Timestamp, Vec<Extent>),
}

/// A reader's claim on an inode it reads; dropped without [`Hardlinks::record`], it lets the
/// next link's reader read the inode itself.
struct LinkClaim<'a> {
    links: &'a Hardlinks,
    key: InodeKey,
}

impl Hardlinks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InodeKey, LinkState>> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The content another link of `key` was read with at `mtime`; else a claim on reading it
    /// (`None` after waiting [`LINK_WAIT`] for another reader's read: read it unclaimed).
    fn content_or_claim(&self, key: InodeKey, mtime: Timestamp) -> Result<Vec<Extent>, Option<LinkClaim<'_>>> {
        let deadline = Instant::now() + LINK_WAIT;
        let mut state = self.lock();
        loop {
            match state.get(&key) {
                Some(LinkState::Read(t, content)) if *t == mtime => return Ok(content.clone()),
                Some(LinkState::Reading) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(None);
                    }
                    state = self.changed.wait_timeout(state, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                }
                _ => {
                    state.insert(key, LinkState::Reading);
                    return Err(Some(LinkClaim { links: self, key }));
                }
            }
        }
    }

    fn record(&self, key: InodeKey, mtime: Timestamp, content: Vec<Extent>) {
        self.lock().insert(key, LinkState::Read(mtime, content));
        self.changed.notify_all();
    }
}

impl Drop for LinkClaim<'_> {
    fn drop(&mut self) {
        let mut state = self.links.lock();
        if matches!(state.get(&self.key), Some(LinkState::Reading)) {
            state.remove(&self.key);
        }
        drop(state);
        self.links.changed.notify_all();
    }
}

#[derive(Default)]
struct SummaryCounters {
    files_new: AtomicU64,
    files_changed: AtomicU64,
    files_unmodified: AtomicU64,
    dirs: AtomicU64,
    other: AtomicU64,
    total_bytes: AtomicU64,
    bytes_read: AtomicU64,
}

impl SummaryCounters {
    fn take(&self) -> Summary {
        let t = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        Summary {
            files_new: t(&self.files_new),
            files_changed: t(&self.files_changed),
            files_unmodified: t(&self.files_unmodified),
            dirs: t(&self.dirs),
            other_entries: t(&self.other),
            total_bytes: t(&self.total_bytes),
            bytes_read: t(&self.bytes_read),
            ..Summary::default()
        }
    }
}

impl Ctx {
    /// The sink blobs of the component being backed up go to.
    fn component_sink(&self) -> &BlobSink {
        self.component_sinks.get(self.component.load(Ordering::Relaxed)).map_or(&self.sink, |(s, _)| s)
    }

    fn warn(&self, msg: String) {
        tracing::warn!("{msg}");
        self.warning_count.fetch_add(1, Ordering::Relaxed);
        self.progress.add_warning(&msg);
        let mut w = self.warnings.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() < MAX_RECORDED_WARNINGS {
            w.push(msg);
        }
    }

    fn load_tree(&self, id: &Id) -> Option<Tree> {
        match self.handle.block_on(self.repo.load_tree(id)) {
            Ok(t) => Some(t),
            Err(e) => {
                self.warn(format!("parent tree {} unusable, reading everything below it: {e}", id.short()));
                None
            }
        }
    }

    fn all_indexed(&self, content: &[Extent]) -> bool {
        let idx = self.repo.index();
        content.iter().all(|e| match e {
            Extent::Data { id, .. } => idx.contains(id),
            Extent::Hole { .. } => true,
        })
    }

    fn save_tree(&self, tree: &Tree) -> Result<Id> {
        let bytes = tree.encode()?;
        // Never write a tree that readers would refuse.
        if bytes.len() > crate::tree::MAX_TREE_LEN {
            return Err(Error::InvalidArgument(format!(
                "a directory with {} entries is too large for one tree blob ({} bytes)",
                tree.nodes.len(),
                bytes.len()
            )));
        }
        self.component_sink().add_bytes(BlobType::Tree, Bytes::from(bytes))
    }

    /// Reads a source into content extents: segments under the budget, FastCDC, hash, add.
    /// `size_hint`: the expected length; a small file then gets a small first buffer (and budget
    /// share) instead of a whole segment.
    /// `read(buf, max)` appends at most `max` bytes to `buf` and returns how many (0 at the end).
    /// With `align` above 1, every read starts at an `align`-aligned address of the buffer and
    /// asks for a multiple of `align` bytes (for direct reads); the segment's data then starts
    /// a few bytes into its buffer.
    fn chunk_stream(
        &self,
        chunker: &Chunker,
        segment: usize,
        size_hint: Option<u64>,
        align: usize,
        (previous, start): (&mut Option<PreviousCuts>, u64),
        mut read: impl FnMut(&mut Vec<u8>, usize) -> std::io::Result<usize>,
    ) -> Result<(Vec<Extent>, u64)> {
        let keys = Arc::clone(self.repo.keys());
        let mut extents: Vec<Extent> = Vec::new();
        let mut carry: Vec<u8> = Vec::new();
        let mut total = 0u64;
        let mut base = start;
        let mut first = size_hint;
        loop {
            // Room past the hint (and past alignment padding), so the end of the file is seen
            // in the same pass.
            let cap = first.take().map_or(segment, |h| (h as usize).saturating_add(4096 + 2 * align).min(segment));
            let guard = Arc::new(self.budget.acquire(cap));
            let room = (cap >= crate::bufpool::MIN_POOLED).then(|| self.segment_room.acquire(cap));
            let mut buf = self.pool.take(cap);
            let pad = if align > 1 { (align - (buf.as_ptr() as usize + carry.len()) % align) % align } else { 0 };
            buf.resize(pad, 0);
            buf.extend_from_slice(&carry);
            // Reads fill whole multiples of `align` from an aligned start.
            let limit = buf.len() + cap.saturating_sub(buf.len()) / align * align;
            let (n, eof) = self.fill(&mut buf, limit, &mut read)?;
            total += n;
            let data = self.pool.freeze_holding(buf, room).slice(pad..);
            let pos = self.cut(chunker, &keys, (&data, eof), (previous, base), &guard, &mut extents)?;
            base += pos as u64;
            if eof {
                break;
            }
            self.keep_carry(&mut carry, &data[pos..]);
        }
        self.pool.give(carry);
        Ok((extents, total))
    }

    /// Copies the uncut tail of a segment into `carry`, in a recycled buffer: a fresh
    /// allocation for every segment's tail was most of a backup's page faults.
    fn keep_carry(&self, carry: &mut Vec<u8>, tail: &[u8]) {
        if carry.capacity() < tail.len() {
            self.pool.give(std::mem::replace(carry, self.pool.take(tail.len())));
        }
        carry.clear();
        carry.extend_from_slice(tail);
    }

    /// Cuts `data` into chunks (up to the last cut its bytes decide, or to its end at `eof`),
    /// hands them to the sink holding `guard`, and returns how far it cut. `data` starts at
    /// file offset `base`; where the file's `previous` version had an unchanged chunk starting
    /// at the same offset, that chunk is taken on its hash alone ([`PreviousCuts`]).
    fn cut(
        &self,
        chunker: &Chunker,
        keys: &crate::crypto::Keys,
        (data, eof): (&Bytes, bool),
        (previous, base): (&mut Option<PreviousCuts>, u64),
        guard: &Arc<crate::budget::BudgetGuard>,
        extents: &mut Vec<Extent>,
    ) -> Result<usize> {
        let mut pos = 0;
        let mut reused = 0u64;
        loop {
            let known = previous.as_mut().and_then(|p| p.at(base + pos as u64));
            let Some(cut) = chunker.next_cut(&data[pos..], eof, known, |b| keys.blob_id(b)) else { break };
            let n = cut.chunk_len();
            let chunk = data.slice(pos..pos + n);
            pos += n;
            let id = match cut {
                Cut::Reused { id, .. } => {
                    reused += n as u64;
                    Some(id)
                }
                Cut::Searched { id, .. } => id,
            };
            if crate::util::is_zero(&chunk) {
                push_extent(extents, Extent::Hole { len: n as u64 });
                continue;
            }
            let id = id.unwrap_or_else(|| keys.blob_id(&chunk));
            self.component_sink().add(BlobType::Data, id, chunk, Some(Arc::clone(guard)))?;
            extents.push(Extent::Data { id, len: n as u32 });
        }
        self.progress.bytes_chunked.fetch_add(pos as u64, Ordering::Relaxed);
        self.progress.bytes_cut_as_before.fetch_add(reused, Ordering::Relaxed);
        Ok(pos)
    }

    /// Reads with `read` until `buf` holds `limit` bytes or the end is reached; returns the
    /// bytes read and whether the end was reached.
    fn fill(
        &self,
        buf: &mut Vec<u8>,
        limit: usize,
        read: &mut impl FnMut(&mut Vec<u8>, usize) -> std::io::Result<usize>,
    ) -> Result<(u64, bool)> {
        let mut total = 0u64;
        while buf.len() < limit {
            let before = buf.len();
            let n = read(buf, limit - before).map_err(|e| Error::io("read", e))?;
            debug_assert_eq!(buf.len(), before + n);
            if n == 0 {
                return Ok((total, true));
            }
            total += n as u64;
            self.count_read(n);
        }
        Ok((total, false))
    }

    fn count_read(&self, n: usize) {
        self.progress.add_bytes(n as u64);
        self.progress.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A segment buffer for [`Ctx::chunk_prefetched`]: `[pad][reserve][read area]`, the read
    /// area aligned for direct reads. `None` when `wait` is false and the budget has no room now.
    fn prefetch_segment(&self, segment: usize, reserve: usize, wait: bool) -> Option<PrefetchSegment> {
        let (guard, room) = if wait {
            (self.budget.acquire(segment), self.segment_room.acquire(segment))
        } else {
            (self.budget.try_acquire(segment)?, self.segment_room.try_acquire(segment)?)
        };
        let mut buf = self.pool.take(segment);
        let pad = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        buf.resize(pad + reserve, 0);
        let area = (buf.capacity() - buf.len()) / DIRECT_ALIGN * DIRECT_ALIGN;
        Some(PrefetchSegment { buf, data_start: pad + reserve, area, guard: Arc::new(guard), room })
    }

    /// [`Ctx::chunk_stream`] for a large file read directly through io_uring, from `offset` to
    /// its end: while one segment is cut and hashed, the next one is already being read, so the
    /// disk and the CPU work at once on the same file (one reader thread is otherwise the whole
    /// of a large file's critical path). The next read starts before the carry (the uncut tail,
    /// shorter than a largest chunk) is known, so each buffer keeps a largest chunk of room in
    /// front of its read area and the carry is copied in there. The read ahead takes budget only
    /// when it is free at once, never waiting for it while holding a segment. `read` (which
    /// advances `offset`) does every read that is not a full aligned read ahead: the first, the
    /// rest of a short one, and the file's unaligned tail.
    fn chunk_prefetched(
        &self,
        chunker: &Chunker,
        segment: usize,
        (ring, fd): (&crate::uring::UringReader, &Arc<OwnedFd>),
        offset: &std::cell::Cell<u64>,
        previous: &mut Option<PreviousCuts>,
        mut read: impl FnMut(&mut Vec<u8>, usize) -> std::io::Result<usize>,
    ) -> Result<(Vec<Extent>, u64)> {
        let keys = Arc::clone(self.repo.keys());
        let reserve = chunker.max_size().div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut extents: Vec<Extent> = Vec::new();
        let mut carry: Vec<u8> = Vec::new();
        let mut total = 0u64;
        let mut base = 0u64;
        let mut ahead: Option<(PrefetchSegment, crate::uring::PendingRead, u64)> = None;
        loop {
            let mut seg = match ahead.take() {
                Some((mut seg, pending, at)) => {
                    let (buf, r) =
                        pending.wait().ok_or_else(|| Error::Internal("the io_uring reader stopped mid-read".into()))?;
                    seg.buf = buf;
                    // A refused read is made again below, through `read`.
                    let n = r.unwrap_or(0);
                    offset.set(at + n as u64);
                    total += n as u64;
                    self.count_read(n);
                    self.progress.bytes_read_io_uring.fetch_add(n as u64, Ordering::Relaxed);
                    self.progress.bytes_read_ahead.fetch_add(n as u64, Ordering::Relaxed);
                    seg
                }
                None => self
                    .prefetch_segment(segment, reserve, true)
                    .ok_or_else(|| Error::Internal("no segment buffer".into()))?,
            };
            if carry.len() > seg.data_start || seg.area < DIRECT_ALIGN {
                return Err(Error::Internal("segment too small for read ahead".into()));
            }
            let limit = seg.data_start + seg.area;
            let (n, eof) = self.fill(&mut seg.buf, limit, &mut read)?;
            total += n;
            if !eof
                && offset.get().is_multiple_of(DIRECT_ALIGN as u64)
                && let Some(mut next) = self.prefetch_segment(segment, reserve, false)
            {
                let at = offset.get();
                let buf = std::mem::take(&mut next.buf);
                match ring.submit(fd, at, buf, next.area) {
                    Ok(pending) => ahead = Some((next, pending, at)),
                    Err(buf) => next.buf = buf,
                }
            }
            let start = seg.data_start - carry.len();
            seg.buf[start..seg.data_start].copy_from_slice(&carry);
            let data = self.pool.freeze_holding(seg.buf, seg.room).slice(start..);
            let pos = self.cut(chunker, &keys, (&data, eof), (previous, base), &seg.guard, &mut extents)?;
            base += pos as u64;
            if eof {
                break;
            }
            self.keep_carry(&mut carry, &data[pos..]);
        }
        self.pool.give(carry);
        Ok((extents, total))
    }

    /// Opens the job's file and checks that it is still the regular file the walk saw; `None`
    /// (with a warning) when it cannot be opened or was replaced.
    fn open_job(&self, job: &FileJob) -> Option<(OwnedFd, rustix::fs::Stat)> {
        if let Some(h) = &self.hooks.before_open {
            h(&job.rel);
        }
        let fd = match fsmeta::open_file_at(job.dir.as_fd(), &job.name) {
            Ok(fd) => fd,
            Err(e) => {
                self.warn(format!("{}: cannot open: {e}", job.rel));
                return None;
            }
        };
        let st = match rustix::fs::fstat(&fd) {
            Ok(st) => st,
            Err(e) => {
                self.warn(format!("{}: cannot stat: {e}", job.rel));
                return None;
            }
        };
        if fsmeta::kind_of(&st) != NodeKind::File || st.st_ino != job.expected_inode {
            self.warn(format!("{}: replaced while backing up, skipped", job.rel));
            return None;
        }
        Some((fd, st))
    }

    /// Reads and chunks a file [`Ctx::open_job`] opened.
    fn read_open_file(
        &self,
        job: &FileJob,
        fd: OwnedFd,
        st: &rustix::fs::Stat,
        previous: Option<(u64, PreviousCuts)>,
    ) -> FileOutcome {
        let st = *st;
        let xattrs = fsmeta::read_xattrs_fd(fd.as_fd());
        let key = (st.st_dev, st.st_ino);
        let mtime = Timestamp { sec: st.st_mtime, nsec: st.st_mtime_nsec as u32 };
        // Held while this reader reads a multiply-linked file; released on every way out.
        let mut _link_claim = None;
        if st.st_nlink > 1 {
            match self.hardlinks.content_or_claim(key, mtime) {
                Ok(content) => {
                    let size = content.iter().map(Extent::len).sum();
                    self.progress.add_bytes(size);
                    return FileOutcome { content, size, xattrs, stat: Some(st), skip: false };
                }
                Err(claim) => _link_claim = claim,
            }
        }
        let fd = Arc::new(fd);
        let uring = self.uring.as_ref().filter(|_| st.st_size >= URING_MIN_FILE as i64);
        let direct = std::cell::Cell::new(
            self.direct_io && st.st_size >= DIRECT_MIN_FILE as i64 && fsmeta::set_direct(&fd, true).is_ok(),
        );
        // Back to the page cache for the rest of this file.
        let stop_direct = || {
            direct.set(false);
            let _ = fsmeta::set_direct(&fd, false);
        };
        // Reads go from `offset` up to `region_end` (the end of the data region being read).
        let offset = std::cell::Cell::new(0u64);
        let region_end = std::cell::Cell::new(u64::MAX);
        let mut read = |buf: &mut Vec<u8>, max: usize| -> std::io::Result<usize> {
            let max = max.min(usize::try_from(region_end.get() - offset.get()).unwrap_or(usize::MAX));
            if max == 0 {
                return Ok(0);
            }
            let offset_now = offset.get();
            let mut max = max;
            if direct.get() {
                match direct_read_len(offset_now, buf.as_ptr() as usize + buf.len(), max) {
                    Some(len) => max = len,
                    // The unaligned tail of the file, or the read that finds its end.
                    None => stop_direct(),
                }
            }
            let read_once = |buf: &mut Vec<u8>| -> std::io::Result<usize> {
                let via_ring = match uring {
                    Some(u) => match u.read_at(&fd, offset_now, buf, max) {
                        // The ring thread failed (logged there): this and later reads use pread.
                        Err(e) if crate::uring::is_stopped(&e) => None,
                        r => Some(r),
                    },
                    None => None,
                };
                match via_ring {
                    Some(r) => {
                        let n = r?;
                        self.progress.bytes_read_io_uring.fetch_add(n as u64, Ordering::Relaxed);
                        Ok(n)
                    }
                    None => crate::uring::pread_append(&fd, buf, offset_now, max),
                }
            };
            let n = match read_once(buf) {
                // Refused as a direct read (a filesystem that accepts the flag but not the
                // read): once more through the page cache.
                Err(e) if direct.get() && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    stop_direct();
                    read_once(buf)?
                }
                r => r?,
            };
            offset.set(offset_now + n as u64);
            Ok(n)
        };
        // Chunk parameters depend on the size at open only, so re-backups cut the same chunks.
        let size = st.st_size.max(0) as u64;
        let (chunker, segment, large) = match &self.large_chunker {
            Some((min, c)) if size >= *min => (c, self.large_segment, true),
            _ => (&self.chunker, self.segment, false),
        };
        // Holes of sparse files are recorded without reading them (the kernel would make and
        // copy zero pages); a region is chunked on its own, so its cuts do not depend on data
        // before it.
        let mapped = fsmeta::data_regions(&fd, &st);
        let sparse = mapped.is_some();
        #[allow(clippy::single_range_in_vec_init)]
        let regions = mapped.unwrap_or_else(|| vec![0..u64::MAX]);
        // The previous version's cuts hold only where they were made the same way: the same
        // chunker (size class) and no regions (each region restarts the cuts).
        let same_chunker = |old_size: u64| match &self.large_chunker {
            Some((min, _)) => (old_size >= *min) == (size >= *min),
            None => true,
        };
        let mut previous = previous.filter(|(old_size, _)| !sparse && same_chunker(*old_size)).map(|(_, p)| p);
        let mut content: Vec<Extent> = Vec::new();
        let read_all = || -> Result<u64> {
            let mut pos = 0u64;
            for r in regions {
                if r.start > pos {
                    push_extent(&mut content, Extent::Hole { len: r.start - pos });
                    self.progress.add_bytes(r.start - pos);
                }
                offset.set(r.start);
                region_end.set(r.end);
                let hint = r.end.min(size).saturating_sub(r.start);
                let align = if direct.get() { DIRECT_ALIGN } else { 1 };
                let (extents, n) = match uring {
                    // One region from the start to the end: a large file with no holes.
                    Some(ring) if direct.get() && r.start == 0 && r.end == u64::MAX && large => {
                        self.chunk_prefetched(chunker, segment, (ring, &fd), &offset, &mut previous, &mut read)?
                    }
                    _ => self.chunk_stream(chunker, segment, Some(hint), align, (&mut previous, r.start), &mut read)?,
                };
                for e in extents {
                    push_extent(&mut content, e);
                }
                pos = r.start + n;
            }
            if sparse && pos < size {
                // A trailing hole (the last data region ended before the size).
                push_extent(&mut content, Extent::Hole { len: size - pos });
                self.progress.add_bytes(size - pos);
                pos = size;
            }
            Ok(pos)
        };
        match read_all() {
            Ok(size) => {
                if let Some(h) = &self.hooks.after_read {
                    h(&job.rel);
                }
                let after = rustix::fs::fstat(&*fd).ok();
                if let Some(a) = &after
                    && (a.st_size != st.st_size || a.st_mtime != st.st_mtime || a.st_mtime_nsec != st.st_mtime_nsec)
                {
                    self.warn(format!("{}: changed while being read; stored as read", job.rel));
                }
                if st.st_nlink > 1 {
                    self.hardlinks.record(key, mtime, content.clone());
                }
                FileOutcome { content, size, xattrs, stat: after.or(Some(st)), skip: false }
            }
            Err(e) => {
                if self.sink.has_failed() {
                    return FileOutcome { skip: true, ..Default::default() };
                }
                self.warn(format!("{}: read failed: {e}", job.rel));
                FileOutcome { skip: true, ..Default::default() }
            }
        }
    }
}

/// A segment buffer of [`Ctx::chunk_prefetched`] and the budget it holds.
struct PrefetchSegment {
    buf: Vec<u8>,
    /// Where the read area starts (the carry goes just before it).
    data_start: usize,
    /// Bytes the read area holds, a multiple of [`DIRECT_ALIGN`].
    area: usize,
    guard: Arc<crate::budget::BudgetGuard>,
    room: crate::budget::BudgetGuard,
}

/// Appends `e` to `content`, merging a hole into a hole before it.
fn push_extent(content: &mut Vec<Extent>, e: Extent) {
    match (content.last_mut(), &e) {
        (Some(Extent::Hole { len }), Extent::Hole { len: more }) => *len += more,
        _ => content.push(e),
    }
}

pub(crate) fn join_rel(rel: &str, name: &str) -> String {
    let mut path = String::with_capacity(rel.len() + 1 + name.len());
    set_rel(&mut path, rel, name);
    path
}

/// Makes `path` the path of `name` inside `rel` (`rel/name`, or `name` at the root), reusing
/// its allocation.
fn set_rel(path: &mut String, rel: &str, name: &str) {
    path.clear();
    if !rel.is_empty() {
        path.push_str(rel);
        path.push('/');
    }
    path.push_str(name);
}

/// Threads walking directories at once (rayon's work stealing spreads subdirectories over them).
/// The walk is syscalls (list, stat, open) and comparisons with the parent tree; on a no-change
/// backup it is most of the time after the key is derived, and on a cold cache most of its
/// threads wait for metadata reads, so it keeps several in flight. Measured on 2 cores with no
/// metadata scan beside it ([`progress_totals`]), cold no-change backups of the 2 GiB bench
/// data, 8 alternating runs each, medians: 4 threads 0.425 s, 8 threads 0.38 s, 16 threads
/// 0.345 s, 24 threads 0.345 s, 32 threads 0.375 s.
const WALK_THREADS: usize = 16;
/// Stack of a walking thread: a walk recurses once per directory level.
const WALK_STACK: usize = 256 * 1024 * 1024;

/// A directory's subdirectories whose parent trees are in memory at once. Each directory being
/// walked holds at most this many (the bench's directories have fewer, so each loads all of
/// its subtrees in one batch). Loading them all at once held the whole parent snapshot in
/// memory when several wide directories were walked at once: no-change backup of one million
/// files in 10 x 100 directories, peak RSS 693 MiB with 16 walking threads (350 MiB with 4).
const SUBTREES_AT_ONCE: usize = 32;

/// The threads of a parallel walk, or `None` when they cannot all start (e.g. an address-space
/// limit or strict overcommit refusing their stacks): the walk then stays depth-first on the
/// one walking thread, which is slower on a cold cache but makes the same tree.
fn walking_pool() -> Option<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(WALK_THREADS)
        .stack_size(WALK_STACK)
        .thread_name(|i| format!("hoard-walk-{i}"))
        .build()
        .inspect_err(|e| tracing::warn!("cannot start {WALK_THREADS} walking threads ({e}); walking on one"))
        .ok()
}

struct Walker<'a> {
    ctx: &'a Ctx,
    jobs: Sender<FileJob>,
    plans: Sender<DirPlan>,
    next_seq: AtomicU64,
    /// Walk subdirectories several at once (see the module docs: with a parent snapshot only).
    parallel: bool,
    root_dev: u64,
    /// With `one_file_system`: the root's mount, to stop at bind mounts of the same device too.
    root_mount: Option<crate::restore::MountKey>,
}

/// A subdirectory found by [`Walker::walk`], walked after its directory's other entries.
struct SubDir {
    /// Its node's position in the directory's node list.
    at: usize,
    name: CString,
    rel: String,
    /// Its tree in the parent snapshot, and that tree once loaded (just before it is walked).
    old_id: Option<Id>,
    old_tree: Option<Tree>,
    sel: Selection,
}

enum SubWalk {
    /// Walked: its plan's sequence number, and its extended attributes.
    Walked(u64, Vec<crate::tree::Xattr>),
    /// Could not be opened (warned): left out of the tree.
    Unreadable,
    /// Walked for include patterns, and nothing in it matched: left out, not counted.
    NoMatch,
}

impl Walker<'_> {
    /// Whether `name` in `dir` is on another mount than the root (unknown counts as another).
    fn other_mount(&self, dir: &OwnedFd, name: &CStr) -> bool {
        self.root_mount.is_some_and(|root| {
            crate::restore::MountKey::of_at(dir.as_fd(), name).map_or(true, |m| !m.same_mount(&root))
        })
    }

    /// Sends a directory's plan. A plan is sent only after the plans of all its subdirectories
    /// (they are walked first), so the finisher always meets children before their parent.
    fn emit(&self, nodes: Vec<(Node, Pending)>) -> Result<u64> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.plans.send(DirPlan { seq, nodes }).map_err(|_| Error::Internal("tree finisher stopped".into()))?;
        Ok(seq)
    }

    /// Loads the parent snapshot's trees of `subs` (some of one directory's subdirectories);
    /// several are fetched together. A tree that cannot be read is warned about and left out:
    /// everything below it is then read as new.
    fn load_old_trees(&self, subs: &mut [SubDir]) {
        let ctx = self.ctx;
        let ids: Vec<Id> = subs.iter().filter_map(|s| s.old_id).collect();
        if ids.len() < 2 {
            for sub in subs {
                sub.old_tree = sub.old_id.and_then(|id| ctx.load_tree(&id));
            }
            return;
        }
        let loaded = ctx.handle.block_on(ctx.repo.load_trees(&ids));
        let mut trees: HashMap<Id, Tree> = HashMap::with_capacity(ids.len());
        for (id, r) in ids.into_iter().zip(loaded) {
            match r {
                Ok(t) => {
                    trees.insert(id, t);
                }
                Err(e) => ctx.warn(format!("parent tree {} unusable, reading everything below it: {e}", id.short())),
            }
        }
        for sub in subs {
            // Cloned, not taken: identical subdirectories (empty ones, say) share one tree.
            sub.old_tree = sub.old_id.and_then(|id| trees.get(&id).cloned());
        }
    }

    fn walk_subdir(&self, dir: &OwnedFd, sub: SubDir) -> Result<SubWalk> {
        let fd = match fsmeta::open_dir_at(dir.as_fd(), &sub.name) {
            Ok(fd) => fd,
            Err(e) => {
                self.ctx.warn(format!("{}: cannot open directory: {e}", sub.rel));
                return Ok(SubWalk::Unreadable);
            }
        };
        let xattrs = fsmeta::read_xattrs_fd(fd.as_fd());
        Ok(match self.walk(Arc::new(fd), &sub.rel, sub.old_tree, sub.sel)? {
            Some(seq) => SubWalk::Walked(seq, xattrs),
            None => SubWalk::NoMatch,
        })
    }

    /// Emits the directory's plan and returns its sequence number; `None` (nothing emitted) for a
    /// directory walked only for include patterns that turned out to hold no match. Files are
    /// handed to the readers as they are listed; subdirectories are walked after the other
    /// entries, several at once when there are several (on the walking threads' pool). The
    /// parent snapshot's tree of the directory is consumed: unchanged files take their content
    /// lists from it instead of copying them.
    fn walk(&self, dir: Arc<OwnedFd>, rel: &str, mut parent: Option<Tree>, sel: Selection) -> Result<Option<u64>> {
        let ctx = self.ctx;
        if ctx.sink.has_failed() {
            return Err(Error::Internal("backup aborted".into()));
        }
        // Levels below the root (names cannot hold `/`): the walk holds one descriptor and one
        // stack frame per level, so subdirectories deeper than MAX_DEPTH are left out.
        let depth = if rel.is_empty() { 0 } else { rel.matches('/').count() + 1 };
        let names = match fsmeta::list_dir(dir.as_fd()) {
            Ok(n) => n,
            Err(e) if !rel.is_empty() => {
                ctx.warn(format!("{rel}: cannot list directory: {e}"));
                Vec::new()
            }
            Err(e) => return Err(Error::io("list backup root", e.into())),
        };
        let mut nodes = Vec::with_capacity(names.len());
        let mut subdirs: Vec<SubDir> = Vec::new();
        // One path buffer for the whole directory: `rel/` followed by each entry's name.
        let mut child_rel = String::with_capacity(rel.len() + 64);
        for cname in names {
            let name_str = String::from_utf8_lossy(cname.as_bytes());
            set_rel(&mut child_rel, rel, &name_str);
            if ctx.excludes.is_excluded(&child_rel, &name_str) {
                continue;
            }
            let st = match fsmeta::stat_at(dir.as_fd(), &cname) {
                Ok(st) => st,
                Err(e) => {
                    ctx.warn(format!("{child_rel}: cannot stat: {e}"));
                    continue;
                }
            };
            // The name is filled in below: moved from `cname` where nothing else needs it.
            let mut node = fsmeta::node_from_stat(Vec::new(), &st);
            let Some(child_sel) = sel.of(ctx.includes.as_ref(), &child_rel, &name_str, node.kind == NodeKind::Dir)
            else {
                continue;
            };
            let mut old = parent.as_mut().and_then(|t| t.find_mut(cname.as_bytes()));
            match node.kind {
                NodeKind::Dir => {
                    if depth >= MAX_DEPTH {
                        ctx.warn(format!(
                            "{child_rel}: deeper than {MAX_DEPTH} directory levels, not backed up (nor anything in it)"
                        ));
                        continue;
                    }
                    ctx.stats.dirs.fetch_add(1, Ordering::Relaxed);
                    if ctx.one_file_system && (st.st_dev != self.root_dev || self.other_mount(&dir, &cname)) {
                        if child_sel != Selection::All {
                            // Nothing below another mount is walked, so nothing in it can match.
                            ctx.stats.dirs.fetch_sub(1, Ordering::Relaxed);
                            continue;
                        }
                        node.subtree = Some(ctx.save_tree(&Tree::default())?);
                        node.name = cname.into_bytes();
                        nodes.push((node, Pending::Ready));
                        continue;
                    }
                    let old_id = old.filter(|o| o.kind == NodeKind::Dir).and_then(|o| o.subtree);
                    node.name = cname.as_bytes().to_vec();
                    subdirs.push(SubDir {
                        at: nodes.len(),
                        name: cname,
                        rel: child_rel.clone(),
                        old_id,
                        old_tree: None,
                        sel: child_sel,
                    });
                    nodes.push((node, Pending::Ready));
                }
                NodeKind::File => {
                    ctx.progress.set_current(&child_rel);
                    if let Some(o) = old.as_deref_mut()
                        && fsmeta::unchanged(o, &node)
                        && ctx.all_indexed(&o.content)
                    {
                        // Each parent node is matched by at most one entry (names are unique).
                        node.content = std::mem::take(&mut o.content);
                        node.xattrs = std::mem::take(&mut o.xattrs);
                        node.name = cname.into_bytes();
                        ctx.stats.files_unmodified.fetch_add(1, Ordering::Relaxed);
                        ctx.stats.total_bytes.fetch_add(node.size, Ordering::Relaxed);
                        ctx.progress.add_bytes(node.size);
                        ctx.progress.add_files(1);
                        nodes.push((node, Pending::Ready));
                        continue;
                    }
                    if old.is_some() {
                        ctx.stats.files_changed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        ctx.stats.files_new.fetch_add(1, Ordering::Relaxed);
                    }
                    let previous = old
                        .filter(|o| o.kind == NodeKind::File)
                        .and_then(|o| PreviousCuts::from_content(&o.content).map(|p| (o.size, p)));
                    node.name = cname.as_bytes().to_vec();
                    let (tx, rx) = bounded(1);
                    let job = FileJob {
                        dir: Arc::clone(&dir),
                        name: cname,
                        rel: child_rel.clone(),
                        expected_inode: st.st_ino,
                        size: node.size,
                        previous,
                        reply: tx,
                    };
                    self.jobs.send(job).map_err(|_| Error::Internal("file readers stopped".into()))?;
                    nodes.push((node, Pending::File(rx)));
                }
                NodeKind::Symlink => {
                    ctx.stats.other.fetch_add(1, Ordering::Relaxed);
                    match rustix::fs::readlinkat(dir.as_fd(), &cname, Vec::new()) {
                        Ok(t) => node.link_target = Some(serde_bytes::ByteBuf::from(t.into_bytes())),
                        Err(e) => {
                            ctx.warn(format!("{child_rel}: cannot read link: {e}"));
                            continue;
                        }
                    }
                    node.xattrs = fsmeta::read_xattrs_at(dir.as_fd(), &cname);
                    node.name = cname.into_bytes();
                    nodes.push((node, Pending::Ready));
                }
                _ => {
                    ctx.stats.other.fetch_add(1, Ordering::Relaxed);
                    node.xattrs = fsmeta::read_xattrs_at(dir.as_fd(), &cname);
                    node.name = cname.into_bytes();
                    nodes.push((node, Pending::Ready));
                }
            }
        }
        // Subdirectories go SUBTREES_AT_ONCE at a time: their parent trees are loaded together
        // (one ranged request per pack), walked, and dropped before the next ones are loaded.
        let mut left_out = Vec::new();
        let mut rest = subdirs;
        while !rest.is_empty() {
            let later = rest.split_off(rest.len().min(SUBTREES_AT_ONCE));
            let mut chunk = std::mem::replace(&mut rest, later);
            self.load_old_trees(&mut chunk);
            let at: Vec<usize> = chunk.iter().map(|sub| sub.at).collect();
            let walked: Vec<Result<SubWalk>> = if self.parallel && chunk.len() > 1 {
                use rayon::prelude::*;
                chunk.into_par_iter().map(|sub| self.walk_subdir(&dir, sub)).collect()
            } else {
                chunk.into_iter().map(|sub| self.walk_subdir(&dir, sub)).collect()
            };
            for (at, r) in at.into_iter().zip(walked) {
                match r? {
                    SubWalk::Walked(seq, xattrs) => {
                        let (node, pending) = &mut nodes[at];
                        node.xattrs = xattrs;
                        *pending = Pending::Dir(seq);
                    }
                    SubWalk::Unreadable => left_out.push(at),
                    SubWalk::NoMatch => {
                        ctx.stats.dirs.fetch_sub(1, Ordering::Relaxed);
                        left_out.push(at);
                    }
                }
            }
        }
        if !left_out.is_empty() {
            // `left_out` is in node order.
            let mut skip = left_out.into_iter().peekable();
            nodes =
                nodes.into_iter().enumerate().filter(|(i, _)| skip.next_if_eq(i).is_none()).map(|(_, n)| n).collect();
        }
        if nodes.is_empty() && sel == Selection::Matching && !rel.is_empty() {
            return Ok(None);
        }
        self.emit(nodes).map(Some)
    }
}

/// Receives directory plans in post-order and turns them into tree blobs.
fn finisher(ctx: &Ctx, plans: &Receiver<DirPlan>) -> Result<HashMap<u64, Id>> {
    let mut done: HashMap<u64, Id> = HashMap::new();
    for plan in plans.iter() {
        let mut tree = Tree { nodes: Vec::with_capacity(plan.nodes.len()) };
        for (mut node, pending) in plan.nodes {
            match pending {
                Pending::Ready => {}
                Pending::Dir(seq) => {
                    node.subtree = Some(done.remove(&seq).ok_or_else(|| Error::Internal("subtree missing".into()))?);
                }
                Pending::File(rx) => {
                    let Ok(out) = rx.recv() else {
                        return Err(Error::Internal("file reader vanished".into()));
                    };
                    if out.skip {
                        continue;
                    }
                    if let Some(st) = &out.stat {
                        node = {
                            let mut n = fsmeta::node_from_stat(node.name, st);
                            n.size = out.size;
                            n
                        };
                    }
                    node.size = out.size;
                    node.content = out.content;
                    node.xattrs = out.xattrs;
                    ctx.stats.total_bytes.fetch_add(node.size, Ordering::Relaxed);
                    ctx.progress.add_files(1);
                }
            }
            tree.nodes.push(node);
        }
        done.insert(plan.seq, ctx.save_tree(&tree)?);
    }
    Ok(done)
}

fn reader_loop(ctx: &Ctx, jobs: &Receiver<FileJob>) {
    // Batches of small files use a ring of this thread's own, set up at the first batch; none
    // without io_uring, or under a low limit on open descriptors (a batch holds its files open
    // together, and a file that cannot be opened is skipped with a warning).
    let batching = ctx.uring.is_some() && crate::util::nofile_limit().0 >= PREFETCH_MIN_NOFILE;
    let mut prefetch: Option<Option<crate::uring::SmallFilePrefetch>> = None;
    let is_small = |j: &FileJob| j.size < URING_MIN_FILE;
    // A job taken while filling a batch that does not belong in it: the next one to run.
    let mut held: Option<FileJob> = None;
    loop {
        let job = match held.take() {
            Some(j) => j,
            None => match jobs.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let mut batch = vec![job];
        if batching && is_small(&batch[0]) {
            // Only the small files already waiting join: a batch never waits for more work.
            let mut bytes = batch[0].size;
            while batch.len() < crate::uring::PREFETCH_FILES {
                match jobs.try_recv() {
                    Ok(j) if is_small(&j) && bytes + j.size <= crate::uring::PREFETCH_BYTES as u64 => {
                        bytes += j.size;
                        batch.push(j);
                    }
                    Ok(j) => {
                        held = Some(j);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        let ring = if batch.len() > 1 {
            prefetch.get_or_insert_with(|| crate::uring::SmallFilePrefetch::new().ok()).as_mut()
        } else {
            None
        };
        read_jobs(ctx, ring, batch);
    }
}

/// Opens the jobs' files; with `prefetch`, brings them into the page cache with one io_uring
/// submission; then reads each and sends its outcome to the walker. The prefetch changes when
/// the disk is read, not what is stored.
fn read_jobs(ctx: &Ctx, prefetch: Option<&mut crate::uring::SmallFilePrefetch>, jobs: Vec<FileJob>) {
    let opened: Vec<_> = jobs.iter().map(|job| if ctx.sink.has_failed() { None } else { ctx.open_job(job) }).collect();
    if let Some(p) = prefetch {
        let reads: Vec<_> = opened
            .iter()
            .flatten()
            .map(|(fd, st)| (fd.as_fd(), usize::try_from(st.st_size.max(0)).unwrap_or(usize::MAX)))
            .collect();
        let fetched = p.prefetch(&reads);
        ctx.progress.files_prefetched.fetch_add(fetched as u64, Ordering::Relaxed);
    }
    for (mut job, file) in jobs.into_iter().zip(opened) {
        let previous = job.previous.take();
        let out = match file {
            Some((fd, st)) if !ctx.sink.has_failed() => ctx.read_open_file(&job, fd, &st, previous),
            _ => FileOutcome { skip: true, ..Default::default() },
        };
        let _ = job.reply.send(out);
    }
}

/// Walks one directory source with reader and finisher threads; returns the root tree id and,
/// for a directory (not a single file), the directory's own node.
fn backup_path(ctx: &Ctx, path: &Path, parent_root: Option<Id>, read_concurrency: usize) -> Result<(Id, Option<Node>)> {
    let meta = std::fs::symlink_metadata(path).ctx(|| format!("backup source {}", path.display()))?;
    let (dir_path, only): (PathBuf, Option<Vec<u8>>) = if meta.is_dir() {
        (path.to_path_buf(), None)
    } else {
        use std::os::unix::ffi::OsStrExt;
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().ok_or_else(|| Error::InvalidArgument(format!("{} has no name", path.display())))?;
        (parent.to_path_buf(), Some(name.as_bytes().to_vec()))
    };
    let root = rustix::fs::open(
        &dir_path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ctx(|| format!("open {}", dir_path.display()))?;
    let root_node = match only {
        Some(_) => None,
        None => Some(root_dir_node(&root)?),
    };
    Ok((backup_root(ctx, root, only, parent_root, read_concurrency)?, root_node))
}

/// The node of a source directory itself: what `stat` and its extended attributes tell.
fn root_dir_node(root: &OwnedFd) -> Result<Node> {
    let st = rustix::fs::fstat(root).ctx(|| "stat backup root".into())?;
    let mut node = fsmeta::node_from_stat(Vec::new(), &st);
    node.xattrs = fsmeta::read_xattrs_fd(root.as_fd());
    Ok(node)
}

/// Walks an open directory (or, with `only`, just that entry of it); returns the root tree id.
fn backup_root(
    ctx: &Ctx,
    root: OwnedFd,
    only: Option<Vec<u8>>,
    parent_root: Option<Id>,
    read_concurrency: usize,
) -> Result<Id> {
    let root_dev = rustix::fs::fstat(&root).ctx(|| "stat backup root".into())?.st_dev;
    let root_mount = if ctx.one_file_system {
        Some(crate::restore::MountKey::of(root.as_fd()).ctx(|| "stat backup root".into())?)
    } else {
        None
    };
    let parent_tree = parent_root.and_then(|id| ctx.load_tree(&id));

    let (job_tx, job_rx) = bounded::<FileJob>(256);
    let (plan_tx, plan_rx) = bounded::<DirPlan>(256);
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..read_concurrency.max(1))
            .map(|_| {
                let rx = job_rx.clone();
                s.spawn(move || reader_loop(ctx, &rx))
            })
            .collect();
        drop(job_rx);
        // The finisher owns the receiving end: when it stops early (the writer failed), the
        // channel closes and a walker blocked on a full plan queue gets an error instead of
        // waiting forever.
        let fin = s.spawn(move || finisher(ctx, &plan_rx));
        let walked = std::thread::Builder::new()
            .stack_size(WALK_STACK)
            .spawn_scoped(s, move || -> Result<u64> {
                let pool = (parent_tree.is_some() && only.is_none()).then(walking_pool).flatten();
                let w = Walker {
                    ctx,
                    jobs: job_tx,
                    plans: plan_tx,
                    next_seq: AtomicU64::new(0),
                    parallel: pool.is_some(),
                    root_dev,
                    root_mount,
                };
                let root_fd = Arc::new(root);
                match only {
                    None => {
                        let sel = if ctx.includes.is_some() { Selection::Matching } else { Selection::All };
                        let walk = || {
                            w.walk(root_fd, "", parent_tree, sel)?
                                .ok_or_else(|| Error::Internal("root tree not emitted".into()))
                        };
                        match &pool {
                            Some(pool) => pool.install(walk),
                            None => walk(),
                        }
                    }
                    Some(name) => {
                        // A single file: a root tree holding just that entry.
                        let cname =
                            CString::new(name.clone()).map_err(|_| Error::InvalidArgument("NUL in name".into()))?;
                        let st = fsmeta::stat_at(root_fd.as_fd(), &cname).ctx(|| "stat backup source".into())?;
                        let node = fsmeta::node_from_stat(name, &st);
                        let (tx, rx) = bounded(1);
                        let rel = node.name_lossy();
                        w.jobs
                            .send(FileJob {
                                dir: root_fd,
                                name: cname,
                                rel,
                                expected_inode: st.st_ino,
                                size: node.size,
                                previous: None,
                                reply: tx,
                            })
                            .map_err(|_| Error::Internal("readers stopped".into()))?;
                        ctx.stats.files_new.fetch_add(1, Ordering::Relaxed);
                        w.emit(vec![(node, Pending::File(rx))])
                    }
                }
            })
            .map_err(|e| Error::io("spawn walker", e))?;
        let root_seq = walked.join().map_err(|_| Error::Internal("walker panicked".into()))?;
        let done = fin.join().map_err(|_| Error::Internal("finisher panicked".into()))?;
        for r in readers {
            let _ = r.join();
        }
        let root_seq = root_seq?;
        let mut done = done?;
        done.remove(&root_seq).ok_or_else(|| Error::Internal("root tree missing".into()))
    })
}

fn stream_tree(ctx: &Ctx, name: &str, mut reader: Box<dyn Read + Send>) -> Result<Id> {
    let read = |buf: &mut Vec<u8>, max: usize| -> std::io::Result<usize> {
        let start = buf.len();
        let want = (buf.capacity() - start).min(max);
        buf.resize(start + want, 0);
        let r = loop {
            match reader.read(&mut buf[start..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = *r.as_ref().unwrap_or(&0);
        buf.truncate(start + n);
        r
    };
    let (content, size) = ctx.chunk_stream(&ctx.chunker, ctx.segment, None, 1, (&mut None, 0), read)?;
    let now = Utc::now();
    let mut node = Node::new(name.as_bytes().to_vec(), NodeKind::File);
    node.mode = 0o600;
    node.uid = rustix::process::getuid().as_raw();
    node.gid = rustix::process::getgid().as_raw();
    node.size = size;
    node.mtime = Timestamp { sec: now.timestamp(), nsec: now.timestamp_subsec_nanos() };
    node.ctime = node.mtime;
    node.content = content;
    ctx.stats.files_new.fetch_add(1, Ordering::Relaxed);
    ctx.stats.total_bytes.fetch_add(size, Ordering::Relaxed);
    ctx.progress.add_files(1);
    ctx.save_tree(&Tree { nodes: vec![node] })
}

/// The component names of the sources that are walked (paths and directories, not streams).
fn walked_names(opts: &BackupOptions) -> Vec<&str> {
    opts.sources
        .iter()
        .filter_map(|s| match s {
            Source::Path { name, .. } | Source::Dir { name, .. } => Some(name.as_str()),
            Source::Stream { .. } => None,
        })
        .collect()
}

async fn find_parent(repo: &Repository, opts: &BackupOptions) -> Result<Option<(Id, Snapshot)>> {
    match &opts.parent {
        ParentSelection::None => Ok(None),
        ParentSelection::Explicit(id) => Ok(Some((*id, repo.load_snapshot(id).await?))),
        ParentSelection::Auto => {
            let names = walked_names(opts);
            if names.is_empty() {
                return Ok(None);
            }
            let snaps = repo.list_snapshots().await?;
            Ok(snaps
                .into_iter()
                .rev()
                .find(|(_, s)| s.host == opts.host && names.iter().any(|n| s.component(n).is_some())))
        }
    }
}

/// Gives the backup its progress totals (see [`BackupOptions::scan_totals`]): the parent
/// snapshot's, as an estimate, when it has a component for every path and directory source,
/// else those of a metadata scan, which is returned (it runs until dropped or done).
///
/// With a parent for every source the walk runs on [`WALK_THREADS`] threads and keeps enough
/// metadata reads in flight itself, so the scan's second pass over the same entries only cost
/// CPU: cold no-change backups of the 2 GiB bench data, 8 alternating runs each, medians:
/// 0.41 s and 0.67 CPU-seconds with the scan (4 walking threads), 0.345 s and 0.55 without it
/// (16 walking threads); without it on 4 walking threads, 0.425 s. After-mutate backups of the
/// 1 GiB data (6 runs each): 0.845 s with the scan, 0.865 s without it.
fn progress_totals(opts: &BackupOptions, parent: Option<&Snapshot>) -> Result<Option<MetadataScan>> {
    if !opts.scan_totals {
        return Ok(None);
    }
    let walked = walked_names(opts);
    if walked.is_empty() {
        return Ok(None);
    }
    let from_parent = parent.and_then(|p| walked.iter().map(|n| p.component(n)).collect::<Option<Vec<_>>>());
    if let Some(components) = from_parent {
        let p = &opts.progress;
        let files: u64 =
            components.iter().map(|c| c.stats.files_new + c.stats.files_changed + c.stats.files_unmodified).sum();
        let bytes: u64 = components.iter().map(|c| c.stats.total_bytes).sum();
        p.files_total.store(files, Ordering::Relaxed);
        p.bytes_total.store(bytes, Ordering::Relaxed);
        p.totals_estimated.store(true, Ordering::Relaxed);
        p.totals_known.store(true, Ordering::Relaxed);
        return Ok(None);
    }
    start_scan(opts).map(Some)
}

/// Starts walking the sources' metadata in the background (list and stat; nothing is read
/// and nothing is counted in `opts.progress`), so that the kernel's directory and inode caches
/// fill while the repository is opened: the key derivation and the index and parent loads
/// leave a core idle for much of their time, and its threads run only then
/// ([`MetadataScan::start_idle`]). Give the handle to [`BackupOptions::warmup`]; the backup
/// stops it when its own walk starts (two walks at once only cost CPU, see
/// [`progress_totals`]). Cold no-change backups of the 2 GiB bench data, the same build with
/// and without it, two sets of 8 alternating runs, medians: 220.9 -> 211.7 ms and 220.9 ->
/// 211.4 ms. Left running beside the walk it cost more than it saved (225 ms), and at normal
/// priority it made the backup slower (250 ms). Peak RSS, reached during the key
/// derivation, grows by 0.3-0.5 MiB (the scan's code and stacks).
pub fn start_warmup(opts: &BackupOptions) -> Result<MetadataScan> {
    let (roots, rules) = scan_plan(opts)?;
    Ok(MetadataScan::start_idle(roots, rules))
}

/// Starts the metadata scan of `opts`' path and directory sources, with its excludes, includes
/// and mount boundary; it runs until the returned handle is dropped or the walk is complete.
/// A directory source's descriptor is duplicated, not taken.
fn start_scan(opts: &BackupOptions) -> Result<MetadataScan> {
    let (roots, rules) = scan_plan(opts)?;
    Ok(MetadataScan::start(roots, rules, Arc::clone(&opts.progress)))
}

/// The roots and rules of a metadata scan of `opts`' path and directory sources.
fn scan_plan(opts: &BackupOptions) -> Result<(Vec<ScanRoot>, ScanRules)> {
    let excludes = Excludes::new(&opts.excludes)?;
    let includes = Some(Includes::new(&opts.includes)?).filter(|i| !i.is_empty());
    let roots = opts
        .sources
        .iter()
        .filter_map(|s| match s {
            Source::Path { path, .. } => Some(ScanRoot::Path(path.clone())),
            Source::Dir { dir, .. } => rustix::io::fcntl_dupfd_cloexec(dir, 0).ok().map(ScanRoot::Dir),
            Source::Stream { .. } => None,
        })
        .collect();
    let rules = ScanRules { excludes: Some(excludes), includes, one_file_system: opts.one_file_system };
    Ok((roots, rules))
}

/// Takes the path sources that do not exist out of `opts` and returns a warning for each, as
/// restic does: one missing path among several should not cost the backup of the others. When
/// no source is left, the first missing one is the error. Only "not found" is forgiven; a path
/// that exists but cannot be read still fails the backup.
fn drop_missing_sources(mut opts: BackupOptions) -> Result<(BackupOptions, Vec<String>)> {
    let mut missing = Vec::new();
    let mut first_error = None;
    let mut kept = Vec::with_capacity(opts.sources.len());
    for s in std::mem::take(&mut opts.sources) {
        if let Source::Path { path, .. } = &s
            && let Err(e) = std::fs::symlink_metadata(path)
            && e.kind() == std::io::ErrorKind::NotFound
        {
            missing.push(format!("backup source {} does not exist; skipped", path.display()));
            first_error.get_or_insert_with(|| Error::io(format!("backup source {}", path.display()), e));
            continue;
        }
        kept.push(s);
    }
    if kept.is_empty()
        && let Some(e) = first_error
    {
        return Err(e);
    }
    opts.sources = kept;
    Ok((opts, missing))
}

/// Backs up every source into one snapshot. A path source that does not exist is a warning
/// when another source remains ([`drop_missing_sources`]).
pub async fn backup(repo: Arc<Repository>, opts: BackupOptions) -> Result<BackupOutcome> {
    let started = Instant::now();
    if opts.sources.is_empty() {
        return Err(Error::InvalidArgument("nothing to back up".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for s in &opts.sources {
        let name = match s {
            Source::Path { name, .. } | Source::Stream { name, .. } | Source::Dir { name, .. } => name,
        };
        if !valid_component_name(name) || !seen.insert(name.clone()) {
            return Err(Error::InvalidArgument(format!("component name {name:?} is invalid or repeated")));
        }
    }
    let (opts, missing) = drop_missing_sources(opts)?;
    let lock = crate::lock::LockGuard::acquire(Arc::clone(&repo), false).await?;
    let result = backup_locked(&repo, opts, missing, started, &lock).await;
    match result {
        Ok(out) => {
            // The snapshot is saved; a lock left behind only delays others until it is stale.
            if let Err(e) = lock.release().await {
                tracing::warn!("could not remove the lock: {e}");
            }
            Ok(out)
        }
        Err(e) => {
            let _ = lock.release().await;
            Err(e)
        }
    }
}

async fn backup_locked(
    repo: &Arc<Repository>,
    mut opts: BackupOptions,
    missing: Vec<String>,
    started: Instant,
    lock: &crate::lock::LockGuard,
) -> Result<BackupOutcome> {
    // Load the index under the lock, so nothing a concurrent prune removed is used for dedup.
    repo.load_index().await?;
    let adopted = crate::prune::align_index_with_packs(repo, Some(&lock.lease())).await?;
    if adopted > 0 {
        tracing::info!("indexed {adopted} packs left by an interrupted backup");
    }
    let parent = find_parent(repo, &opts).await?;
    tracing::debug!("index and parent loaded after {:?}", started.elapsed());
    // Held to the end of the backup; dropping it stops a scan that is still going.
    let _scan = progress_totals(&opts, parent.as_ref().map(|(_, s)| s))?;
    // The walk starts now: the warm-up has done what it could.
    drop(opts.warmup.take());
    let excludes = Excludes::new(&opts.excludes)?;
    let includes = Some(Includes::new(&opts.includes)?).filter(|i| !i.is_empty());
    let chunker = repo.chunker()?;
    let large_chunker = repo.large_file_chunker()?;
    let segment = segment_for(&chunker);
    let large_segment = large_chunker.as_ref().map_or(segment, |(_, c)| segment_for(c));
    let mut writer_cfg = opts.writer.clone();
    writer_cfg.lease = Some(lock.lease());
    writer_cfg.progress = Some(Arc::clone(&opts.progress));
    let uring = if !opts.io_uring {
        None
    } else if let Err(why) = crate::uring::available() {
        tracing::debug!("plain reads: {why}");
        None
    } else {
        match crate::uring::UringReader::start(opts.read_concurrency) {
            Ok(u) => Some(u),
            Err(e) => {
                // Available at the probe but not now (e.g. locked-memory limits): plain reads.
                tracing::warn!("cannot start an io_uring reader ({e}); this backup uses plain reads");
                None
            }
        }
    };
    let io_uring = uring.is_some();
    let budget = match &opts.budget {
        Some(b) => Arc::clone(b),
        None => Budget::new(opts.memory_budget.max(segment)),
    };
    let sealing_threads = writer_cfg.workers.max(1);
    let room = (sealing_threads + 1) * segment;
    let segment_room = Budget::new(room);
    // One pool for segments, carries and sealed blobs, keeping about what the pipeline has
    // alive at its fullest: the segment room and the packs being built and stored. Measured
    // on the 2 GiB bench dataset (initial backup, peak RSS / page faults): no pool for
    // carries and sealed blobs 150-190 MiB / 47k (glibc's arenas kept freed blocks); a 48 MiB
    // pool 93 MiB / 311k (+3 s of system time refaulting); 72 MiB 112-117 MiB / 120-140k;
    // 96 MiB 135-140 MiB / 70k. On a store that spools packs to files no pack is held, and
    // the pool keeps two packs' worth for the sealed blobs on their way to the staging file
    // (initial backup, 3 alternating pairs; three packs' worth against two: 2 GiB 5.68-6.60 s
    // 93-99 MiB against 5.43-5.89 s 79-83 MiB; 1 GiB 2.73-3.02 s 92-95 MiB against 2.63-2.84 s
    // 75-76 MiB; one pack's worth: 74 MiB, but 375k page faults and 0.3-0.5 s slower).
    let packs_alive = if SpoolDir::for_store(&**repo.store()).is_some() {
        crate::writer::SPOOLED_PACKS_POOLED
    } else {
        writer_cfg.uploads_for(repo) + 1
    };
    let pool = BufPool::with_min(room + packs_alive * repo.params().pack_size as usize, crate::bufpool::MAPPED_MIN);
    writer_cfg.pool = Some(Arc::clone(&pool));
    let writer = BlobWriter::start(Arc::clone(repo), writer_cfg);
    let wstats = writer.stats();
    let sink = writer.sink();
    let component_sinks: Vec<_> = (0..opts.sources.len())
        .map(|_| {
            let stored = Arc::new(AtomicU64::new(0));
            (sink.counting_sealed(Arc::clone(&stored)), stored)
        })
        .collect();
    let stored_per_component: Vec<_> = component_sinks.iter().map(|(_, c)| Arc::clone(c)).collect();
    let ctx = Arc::new(Ctx {
        repo: Arc::clone(repo),
        sink,
        component_sinks,
        component: AtomicUsize::new(0),
        chunker,
        large_chunker,
        budget,
        segment,
        large_segment,
        pool,
        segment_room,
        progress: Arc::clone(&opts.progress),
        uring,
        direct_io: opts.direct_io,
        handle: tokio::runtime::Handle::current(),
        warnings: Mutex::new(Vec::new()),
        warning_count: AtomicU64::new(0),
        excludes: excludes.clone(),
        includes: includes.clone(),
        one_file_system: opts.one_file_system,
        stats: SummaryCounters::default(),
        hardlinks: Hardlinks::default(),
        hooks: opts.hooks.clone(),
    });
    for m in missing {
        ctx.warn(m);
    }

    let mut components = Vec::new();
    let mut summary = Summary::default();
    let sources = std::mem::take(&mut opts.sources);
    let read_concurrency = opts.read_concurrency;
    for (i, source) in sources.into_iter().enumerate() {
        // Set before the component's threads start, which then see it.
        ctx.component.store(i, Ordering::Relaxed);
        let component_started = Instant::now();
        let blobs_before = wstats.blobs_new.load(Ordering::Relaxed);
        let bytes_before = wstats.bytes_new.load(Ordering::Relaxed);
        let warnings_before = ctx.warning_count.load(Ordering::Relaxed);
        let ctx2 = Arc::clone(&ctx);
        let parent_root = match &source {
            Source::Path { name, .. } | Source::Dir { name, .. } => {
                parent.as_ref().and_then(|(_, s)| s.component(name)).map(|c| c.root)
            }
            Source::Stream { .. } => None,
        };
        let (name, kind, origin, result) = match source {
            Source::Path { name, path } => {
                let origin = std::path::absolute(&path).unwrap_or(path.clone()).display().to_string();
                let r =
                    tokio::task::spawn_blocking(move || backup_path(&ctx2, &path, parent_root, read_concurrency)).await;
                (name, ComponentKind::Tree, origin, r)
            }
            Source::Dir { name, dir, origin } => {
                let r = tokio::task::spawn_blocking(move || {
                    let node = root_dir_node(&dir)?;
                    Ok((backup_root(&ctx2, dir, None, parent_root, read_concurrency)?, Some(node)))
                })
                .await;
                (name, ComponentKind::Tree, origin, r)
            }
            Source::Stream { name, reader } => {
                let n = name.clone();
                let r = tokio::task::spawn_blocking(move || Ok((stream_tree(&ctx2, &n, reader)?, None))).await;
                (name, ComponentKind::Stream, "stdin".to_string(), r)
            }
        };
        tracing::debug!(component = name, "walked after {:?}", started.elapsed());
        let (root, root_node) = match result.map_err(|e| Error::Internal(format!("backup task: {e}")))? {
            Ok(root) => root,
            Err(e) => {
                drop(ctx);
                // Index whatever was stored, then report the first cause.
                let finished = writer.finish().await;
                return Err(finished.err().unwrap_or(e));
            }
        };
        let mut stats = ctx.stats.take();
        // Components are backed up one after another and a blob is counted new when it is
        // added, so these differences are the component's own. Its stored bytes are counted
        // as its blobs are sealed, which may be after this: they are read once the writer is
        // done.
        stats.blobs_new = wstats.blobs_new.load(Ordering::Relaxed) - blobs_before;
        stats.bytes_new = wstats.bytes_new.load(Ordering::Relaxed) - bytes_before;
        stats.warnings = ctx.warning_count.load(Ordering::Relaxed) - warnings_before;
        stats.duration_ms = component_started.elapsed().as_millis() as u64;
        summary.add(&stats);
        components.push(Component { name, kind, root, source: origin, stats, root_node });
    }
    let warnings = std::mem::take(&mut *ctx.warnings.lock().unwrap_or_else(|p| p.into_inner()));
    let warning_count = ctx.warning_count.load(Ordering::Relaxed);
    drop(ctx);
    writer.finish().await?;
    for (c, stored) in components.iter_mut().zip(&stored_per_component) {
        c.stats.bytes_stored = stored.load(Ordering::Relaxed);
    }

    summary.blobs_new = wstats.blobs_new.load(Ordering::Relaxed);
    summary.bytes_new = wstats.bytes_new.load(Ordering::Relaxed);
    summary.bytes_stored = wstats.bytes_stored.load(Ordering::Relaxed);
    summary.warnings = warning_count;
    summary.duration_ms = started.elapsed().as_millis() as u64;
    opts.progress.bytes_stored.store(summary.bytes_stored, Ordering::Relaxed);
    let snapshot = Snapshot {
        time: opts.time.unwrap_or_else(Utc::now),
        host: opts.host.clone(),
        username: crate::util::username(),
        tags: opts.tags.clone(),
        labels: opts.labels.clone(),
        parent: parent.map(|(id, _)| id),
        components,
        summary,
        warnings,
        program_version: format!("hoard {}", env!("CARGO_PKG_VERSION")),
    };
    test_pause("HOARD_TEST_PAUSE_BEFORE_SNAPSHOT").await;
    // The lease must have held throughout: otherwise a prune may have removed blobs we dedup'd.
    lock.check()?;
    test_pause("HOARD_TEST_PAUSE_AFTER_LEASE_CHECK").await;
    let snapshot_id = repo.save_snapshot(&snapshot).await?;
    // A freeze between the check and the write's completion may have let the lease lapse: the
    // snapshot is valid only if it became visible while the lease still held.
    if let Err(e) = lock.check() {
        if let Err(d) = repo.delete_snapshot(&snapshot_id).await {
            tracing::error!(
                "could not take back snapshot {} written after the lock was lost: {d}",
                snapshot_id.short()
            );
        }
        return Err(e);
    }
    let data_in_flight_high_water = wstats.budgeted_high_water.load(Ordering::SeqCst);
    Ok(BackupOutcome { snapshot_id, snapshot, io_uring, data_in_flight_high_water })
}

/// Test hook for deterministic races: when the environment variable `var` names a file path,
/// creates that file (holding this process id) and waits, at most 120 s, until it is removed.
/// Unset in normal use; costs one environment lookup.
async fn test_pause(var: &str) {
    let Some(path) = std::env::var_os(var) else { return };
    let path = PathBuf::from(path);
    if let Err(e) = std::fs::write(&path, std::process::id().to_string()) {
        tracing::warn!("{var}: cannot create {}: {e}", path.display());
        return;
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    while path.exists() && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn includes(p: &[&str]) -> Includes {
        Includes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("patterns")
    }

    #[test]
    fn direct_reads_are_aligned_or_not_made() {
        const A: usize = DIRECT_ALIGN;
        assert_eq!(direct_read_len(0, 8 * A, 4 * 1024 * 1024), Some(4 * 1024 * 1024));
        assert_eq!(direct_read_len(3 * A as u64, 0, 5 * A + 17), Some(5 * A));
        // Less than one block wanted, or an unaligned offset or buffer: not direct.
        assert_eq!(direct_read_len(0, 0, A - 1), None);
        assert_eq!(direct_read_len(100, 0, 4 * A), None);
        assert_eq!(direct_read_len(0, 16, 4 * A), None);
    }

    #[test]
    fn include_patterns_match_paths_and_names() {
        let inc = includes(&["/conf/*.yaml", "data/db", "*.sql", ""]);
        assert!(!inc.is_empty() && includes(&["", "  "]).is_empty());
        assert!(inc.matches("conf/app.yaml", "app.yaml"));
        assert!(!inc.matches("conf/sub/app.yaml", "app.yaml"), "* stays within a component");
        assert!(inc.matches("data/db", "db") && inc.matches("data/db/x/y", "y"), "a directory with all below");
        assert!(!inc.matches("data/dbx", "dbx") && !inc.matches("data", "data"));
        assert!(inc.matches("deep/in/dump.sql", "dump.sql"));
        assert!(Includes::new(&["a/[".to_string()]).is_err());
    }

    #[test]
    fn directories_that_could_hold_a_match_are_walked() {
        let inc = includes(&["conf/*.yaml", "srv/*/logs/**/*.log", "a/b/c"]);
        for dir in ["conf", "srv", "srv/web", "srv/web/logs", "srv/web/logs/2024/01", "a", "a/b"] {
            assert!(inc.may_contain(dir), "{dir}");
        }
        for dir in ["conf/sub", "other", "srv/web/cache", "a/x", "a/b/c/d"] {
            assert!(!inc.may_contain(dir), "{dir}");
        }
        // A name pattern can match at any depth: every directory is walked.
        assert!(includes(&["*.yaml"]).may_contain("any/where"));
        assert!(includes(&["**/x"]).may_contain("any/where"));
    }

    #[test]
    fn selection_keeps_matches_whole_and_walks_towards_them() {
        let inc = includes(&["conf/*.yaml"]);
        let m = Selection::Matching;
        assert_eq!(m.of(Some(&inc), "conf", "conf", true), Some(Selection::Matching));
        assert_eq!(m.of(Some(&inc), "conf/a.yaml", "a.yaml", false), Some(Selection::All));
        assert_eq!(m.of(Some(&inc), "conf/a.ini", "a.ini", false), None);
        assert_eq!(m.of(Some(&inc), "logs", "logs", true), None);
        assert_eq!(Selection::All.of(Some(&inc), "logs/x", "x", false), Some(Selection::All));
        assert_eq!(m.of(None, "logs/x", "x", false), Some(Selection::All));
    }
}
