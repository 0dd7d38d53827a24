//! The blob writer: dedup, compress, seal, pack, upload, index.
//!
//! ```text
//! add() ─▶ [dedup: index + in-flight set] ─▶ workers (compress, seal) ─▶ packer ─▶ uploads ─▶ index
//! ```
//! * Bounded: the job and packer channels hold a fixed number of blobs, at most
//!   `upload_concurrency` packs are finished and not yet stored (the packer waits for a slot
//!   before it hands a pack over, so none waits in a queue), and callers pass a budget
//!   guard with each blob that is held until the pack holding the blob is uploaded: queued,
//!   sealed, packed, queued-pack and uploading bytes all count against the caller's budget.
//! * Spooling: on a store that keeps objects as local files ([`crate::spool`]), the packer
//!   writes each sealed blob to the open pack's staging file as it comes, and the blob's
//!   buffer and budget go back then; a finished pack is published, not put, once the store
//!   admits it ([`crate::store::Store::admit_local_write`]), so no pack is held in memory
//!   (2 GiB bench data, cold: initial backup peak RSS 116-121 -> 79-83 MiB, no slower;
//!   after-mutate backup 81-84 -> 74.5 MiB).
//! * No deadlock under a small budget: when someone waits for budget and no blob has arrived for
//!   [`PRESSURE_POLL`], the packer uploads its partial pack (releasing its guards) instead of
//!   waiting for a full pack that cannot come. Tree blobs (added without a guard) are outside
//!   the budget.
//! * Ordering: a blob is added to the in-memory index only after its pack is stored; an index
//!   file is written only after every pack it names is stored (every `index_every_packs` packs and
//!   at [`BlobWriter::finish`]). A crash leaves at worst packs no index names.
//! * A blob is never queued twice: the first `add` of an id wins, later ones are dedup hits.
//! * Tree packs: tree blobs and data blobs never share a pack; the packer keeps one open pack
//!   of each. A snapshot's trees are then read from a few dense packs (`ls`, `diff`, `check`,
//!   restore planning, a backup's parent) instead of being picked out of its data packs. Bench
//!   repository (2 GiB, 3.7k trees), cold cache, 6 alternating runs, medians: `ls -l latest`
//!   0.77 -> 0.58 s, `check` 0.76 -> 0.55 s; cold no-change backups (8 pairs) and restores
//!   (3 pairs) unchanged within the host's noise. On a store that does not spool, the open
//!   tree pack's blobs (outside the budget, as trees always were) stay in memory until it fills.
//! * CPU work runs on dedicated threads, never on the async runtime.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, bounded};
use tokio::sync::mpsc;

use crate::budget::BudgetGuard;
use crate::bufpool::BufPool;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{IndexFile, IndexPack};
use crate::pack::{BlobType, Compression, PackBuilder, PackEntry, SealedBlob};
use crate::repo::{Repository, pack_key};
use crate::spool::{SpoolDir, SpooledPack};

/// How long the packer waits for the next blob before checking whether its partial pack holds
/// budget others wait for.
pub const PRESSURE_POLL: std::time::Duration = std::time::Duration::from_millis(25);

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub workers: usize,
    /// Packs uploaded at once; `None`: [`upload_concurrency_for`] the repository's location.
    pub upload_concurrency: Option<usize>,
    /// Write an index file after this many packs, so an interrupted run can reuse them.
    pub index_every_packs: usize,
    /// The writer's repository lock: no index file is written once its lease is lost (a
    /// concurrent prune may have deleted the packs it would name).
    pub lease: Option<crate::lock::Lease>,
    /// Live counters to update as packs are stored (`bytes_stored`).
    pub progress: Option<Arc<crate::progress::Progress>>,
    /// Where sealed blobs' buffers come from (e.g. shared with the backup's read segments, so
    /// one limit holds for both); `None`: a pool of the writer's own.
    pub pool: Option<Arc<BufPool>>,
}

impl WriterConfig {
    /// Packs uploaded at once to `repo`'s store with this configuration.
    pub fn uploads_for(&self, repo: &Repository) -> usize {
        self.upload_concurrency.unwrap_or_else(|| upload_concurrency_for(&repo.store().location())).max(1)
    }
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            workers: default_workers(),
            upload_concurrency: None,
            index_every_packs: 8,
            lease: None,
            progress: None,
            pool: None,
        }
    }
}

/// Sealing threads by default: compression and encryption are CPU-bound, one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// Packs uploaded at once by default: uploads are network-bound (mostly waiting on round trips),
/// so more than one per core pays off, with at least 4 on small machines.
pub fn default_upload_concurrency() -> usize {
    default_workers().max(4)
}

/// Packs' worth of sealed-blob buffers a pool keeps when packs are spooled to files (measured
/// in `backup`: three were no faster, one refaulted).
pub const SPOOLED_PACKS_POOLED: usize = 2;

/// Packs written at once to a repository on a filesystem: a local write is bounded by the disk,
/// not by round trips (measured on the bench dataset, when packs were still stored from
/// memory: 2 kept the pace of 4 with ~30 MiB less peak RSS).
pub const FILESYSTEM_UPLOAD_CONCURRENCY: usize = 2;

/// Default packs in flight for a repository at `location` (as [`crate::store::Store::location`]
/// gives it): [`FILESYSTEM_UPLOAD_CONCURRENCY`] on a filesystem, else
/// [`default_upload_concurrency`].
pub fn upload_concurrency_for(location: &str) -> usize {
    if crate::store::is_filesystem_location(location) {
        FILESYSTEM_UPLOAD_CONCURRENCY
    } else {
        default_upload_concurrency()
    }
}

/// Counters the writer keeps; read them for progress and summaries.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub blobs_new: AtomicU64,
    pub bytes_new: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub packs: AtomicU64,
    pub dedup_hits: AtomicU64,
    /// Plaintext bytes of budgeted blobs added but not yet uploaded in a pack.
    pub budgeted_in_flight: AtomicU64,
    /// The most `budgeted_in_flight` ever reached.
    pub budgeted_high_water: AtomicU64,
    /// Packs uploaded before they were full because someone waited for budget.
    pub pressure_flushes: AtomicU64,
}

struct Job {
    ty: BlobType,
    id: Id,
    data: Bytes,
    guard: Option<Arc<BudgetGuard>>,
    /// Gets the sealed length (the bytes the blob takes in its pack), from the sink that
    /// added it ([`BlobSink::counting_sealed`]).
    sealed_into: Option<Arc<AtomicU64>>,
}

/// A sealed blob on its way to the packer, still holding its budget.
struct Sealed {
    blob: SealedBlob,
    guard: Option<Arc<BudgetGuard>>,
}

/// A finished pack's bytes: in memory, or in a staging file of a filesystem store.
enum PackBody {
    Parts(Vec<Bytes>),
    Spooled(SpooledPack),
}

/// A finished pack on its way to the store; its guards are released once it is stored.
struct OutPack {
    id: Id,
    len: u64,
    entries: Vec<PackEntry>,
    body: PackBody,
    /// One of the `upload_concurrency` slots, held until the pack is stored.
    slot: BudgetGuard,
    guards: Vec<Arc<BudgetGuard>>,
    /// Plaintext bytes of its budgeted blobs (for [`WriterStats::budgeted_in_flight`]).
    budgeted: u64,
}

struct Shared {
    repo: Arc<Repository>,
    lease: Option<crate::lock::Lease>,
    in_flight: Mutex<HashSet<Id>>,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    stats: Arc<WriterStats>,
    progress: Option<Arc<crate::progress::Progress>>,
    /// Buffers of sealed blobs, back in the pool once their pack is stored (or, spooling,
    /// once written to the staging file).
    sealed_pool: Arc<BufPool>,
    /// Where packs are staged when the store keeps objects as local files.
    spool: Option<SpoolDir>,
}

impl Shared {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn take_error(&self) -> Error {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| Error::Internal("blob writer stopped".into()))
    }
}

/// Handle for adding blobs; cheap to clone across threads.
#[derive(Clone)]
pub struct BlobSink {
    shared: Arc<Shared>,
    jobs: Sender<Job>,
    sealed_into: Option<Arc<AtomicU64>>,
}

impl std::fmt::Debug for BlobSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlobSink")
    }
}

impl BlobSink {
    /// Adds a blob whose id the caller computed; blocks while the pipeline is full.
    /// Returns whether the blob was new.
    pub fn add(&self, ty: BlobType, id: Id, data: Bytes, guard: Option<Arc<BudgetGuard>>) -> Result<bool> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.shared.failure_description());
        }
        if self.shared.repo.index().contains(&id) {
            self.shared.stats.dedup_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        if !self.shared.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
            self.shared.stats.dedup_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let stats = &self.shared.stats;
        stats.blobs_new.fetch_add(1, Ordering::Relaxed);
        stats.bytes_new.fetch_add(data.len() as u64, Ordering::Relaxed);
        if guard.is_some() {
            let now = stats.budgeted_in_flight.fetch_add(data.len() as u64, Ordering::SeqCst) + data.len() as u64;
            stats.budgeted_high_water.fetch_max(now, Ordering::SeqCst);
        }
        let job = Job { ty, id, data, guard, sealed_into: self.sealed_into.clone() };
        self.jobs.send(job).map_err(|_| self.shared.failure_description())?;
        Ok(true)
    }

    /// A sink like this one whose new blobs add their sealed length (compressed, encrypted:
    /// what each takes in its pack, pack headers aside) to `counter` once sealed. Packs mix
    /// the blobs of several callers, so this is how one caller's share of the stored bytes is
    /// known; it is complete when [`BlobWriter::finish`] returns.
    pub fn counting_sealed(&self, counter: Arc<AtomicU64>) -> BlobSink {
        BlobSink { sealed_into: Some(counter), ..self.clone() }
    }

    /// Hashes and adds a blob.
    pub fn add_bytes(&self, ty: BlobType, data: Bytes) -> Result<Id> {
        let id = self.shared.repo.keys().blob_id(&data);
        self.add(ty, id, data, None)?;
        Ok(id)
    }

    pub fn repo(&self) -> &Arc<Repository> {
        &self.shared.repo
    }

    pub fn has_failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn failure_description(&self) -> Error {
        match &*self.error.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Error::Internal(format!("blob writer failed: {e}")),
            None => Error::Internal("blob writer stopped".into()),
        }
    }
}

/// Owns the writer's threads and upload task.
pub struct BlobWriter {
    sink: Option<BlobSink>,
    workers: Vec<JoinHandle<()>>,
    packer: Option<JoinHandle<()>>,
    uploader: Option<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlobWriter")
    }
}

impl BlobWriter {
    /// Starts the pipeline. Must be called from within a tokio runtime.
    pub fn start(repo: Arc<Repository>, cfg: WriterConfig) -> BlobWriter {
        let workers_n = cfg.workers.max(1);
        let stats = Arc::new(WriterStats::default());
        let uploads = cfg.uploads_for(&repo);
        let pack_size = repo.params().pack_size as usize;
        let spool = SpoolDir::for_store(&**repo.store());
        // Sealed bytes alive at once: the open pack, the packs being stored and the blobs in the
        // channels, in buffers up to a quarter larger than asked for; spooling, only the blobs
        // on their way to the staging file (kept: two packs' worth, as in a backup).
        let packs_alive = if spool.is_some() { SPOOLED_PACKS_POOLED } else { uploads + 2 };
        let sealed_pool =
            cfg.pool.clone().unwrap_or_else(|| BufPool::with_min(packs_alive * pack_size, crate::bufpool::MAPPED_MIN));
        let shared = Arc::new(Shared {
            repo: Arc::clone(&repo),
            lease: cfg.lease.clone(),
            in_flight: Mutex::new(HashSet::new()),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            stats,
            progress: cfg.progress.clone(),
            sealed_pool,
            spool,
        });
        let (job_tx, job_rx) = bounded::<Job>(workers_n * 2);
        let (sealed_tx, sealed_rx) = bounded::<Sealed>(workers_n * 2);
        let (pack_tx, pack_rx) = mpsc::channel::<OutPack>(1);

        let level = repo.params().compression_level;
        let workers = (0..workers_n)
            .map(|i| {
                let rx = job_rx.clone();
                let tx = sealed_tx.clone();
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("hoard-seal-{i}"))
                    .spawn(move || seal_worker(&shared, level, &rx, &tx))
                    .map_err(|e| Error::io("spawn worker", e))
            })
            .filter_map(|r| r.ok())
            .collect();
        drop(sealed_tx);

        let upload_slots = crate::budget::Budget::new(uploads);
        let packer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("hoard-packer".into())
                .spawn(move || packer(&shared, pack_size, &upload_slots, &sealed_rx, &pack_tx))
                .ok()
        };

        let uploader = {
            let shared = Arc::clone(&shared);
            tokio::spawn(uploader(shared, pack_rx, uploads, cfg.index_every_packs.max(1)))
        };

        BlobWriter {
            sink: Some(BlobSink { shared: Arc::clone(&shared), jobs: job_tx, sealed_into: None }),
            workers,
            packer,
            uploader: Some(uploader),
            shared,
        }
    }

    pub fn sink(&self) -> BlobSink {
        #[allow(clippy::expect_used)]
        self.sink.clone().expect("sink is present until finish")
    }

    pub fn stats(&self) -> Arc<WriterStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Flushes everything: the last pack, outstanding uploads, the final index file.
    /// Every blob added before this call is indexed when it returns `Ok`.
    pub async fn finish(mut self) -> Result<()> {
        self.sink.take();
        let workers = std::mem::take(&mut self.workers);
        let packer = self.packer.take();
        tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
            if let Some(p) = packer {
                let _ = p.join();
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("join pipeline: {e}")))?;
        if let Some(u) = self.uploader.take() {
            u.await.map_err(|e| Error::Internal(format!("join uploader: {e}")))?;
        }
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.shared.take_error());
        }
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Abandoned without finish (an error path): stop everything, write nothing more.
        self.shared.failed.store(true, Ordering::SeqCst);
        if let Some(u) = self.uploader.take() {
            u.abort();
        }
    }
}

/// Chunks smaller than this are compressed without a sample first: zstd gives up on random
/// input by itself at several GiB/s, while a 16 KiB sample costs 12 % more work on a 128 KiB
/// chunk that does compress (measured: the sample was net loss once large files got 128 KiB
/// chunks).
const SAMPLE_FROM: usize = 1024 * 1024;

/// Whether zstd is worth trying: a sample from the middle must shrink noticeably.
fn looks_compressible(data: &[u8], compressor: &mut zstd::bulk::Compressor<'_>) -> bool {
    const SAMPLE: usize = 16 * 1024;
    if data.len() < SAMPLE_FROM {
        return true;
    }
    let mid = data.len() / 2;
    let sample = &data[mid - SAMPLE / 2..mid + SAMPLE / 2];
    match compressor.compress(sample) {
        Ok(c) => c.len() < SAMPLE * 97 / 100,
        Err(_) => true,
    }
}

fn seal_worker(shared: &Shared, level: i32, jobs: &Receiver<Job>, out: &Sender<Sealed>) {
    let keys = Arc::clone(shared.repo.keys());
    let mut compressor = if level > 0 { zstd::bulk::Compressor::new(level).ok() } else { None };
    let mut sample_compressor = zstd::bulk::Compressor::new(1).ok();
    // One output buffer per worker, reused: no allocation (and no page faults) per blob.
    let mut scratch: Vec<u8> = Vec::new();
    for job in jobs.iter() {
        if shared.failed.load(Ordering::Relaxed) {
            continue; // drain so senders never block forever
        }
        let mut compression = Compression::None;
        if let (Some(c), Some(s)) = (compressor.as_mut(), sample_compressor.as_mut())
            && (job.ty == BlobType::Tree || looks_compressible(&job.data, s))
        {
            scratch.clear();
            scratch.reserve(zstd::zstd_safe::compress_bound(job.data.len()));
            if c.compress_to_buffer(&job.data, &mut scratch).is_ok() && scratch.len() < job.data.len() {
                compression = Compression::Zstd;
            }
        }
        let payload: &[u8] = if compression == Compression::Zstd { &scratch } else { &job.data };
        let mut bytes = shared.sealed_pool.take(payload.len() + crate::crypto::SEAL_OVERHEAD);
        keys.seal_blob(job.ty.seal_type(), &job.id, payload, &mut bytes);
        let bytes = shared.sealed_pool.freeze(bytes);
        let blob = SealedBlob { ty: job.ty, compression, id: job.id, raw_len: job.data.len() as u32, bytes };
        if let Some(c) = &job.sealed_into {
            c.fetch_add(blob.bytes.len() as u64, Ordering::Relaxed);
        }
        // The plaintext goes now; the budget stays with the blob until its pack is stored.
        let Job { guard, .. } = job;
        if out.send(Sealed { blob, guard }).is_err() {
            return;
        }
    }
}

/// The pack being built and the budget its blobs hold.
struct OpenPack {
    builder: PackBuilder,
    guards: Vec<Arc<BudgetGuard>>,
    budgeted: u64,
    /// The staging file the blobs are written to, when the store spools.
    spooled: Option<SpooledPack>,
}

impl OpenPack {
    fn add(&mut self, s: Sealed, shared: &Shared) -> Result<()> {
        let raw_len = s.blob.raw_len as u64;
        if let Some(spool) = &shared.spool {
            let file = match &mut self.spooled {
                Some(f) => f,
                None => self.spooled.insert(spool.create()?),
            };
            file.append(&s.blob.bytes)?;
            self.builder.add_written(&s.blob);
            // Written out: the blob's memory and budget go back now (`s` is dropped here).
            if s.guard.is_some() {
                shared.stats.budgeted_in_flight.fetch_sub(raw_len, Ordering::SeqCst);
            }
            return Ok(());
        }
        self.builder.add(s.blob);
        if let Some(g) = s.guard {
            self.budgeted += raw_len;
            // Consecutive blobs usually share their reader's segment guard: keep one clone.
            if !self.guards.last().is_some_and(|l| Arc::ptr_eq(l, &g)) {
                self.guards.push(g);
            }
        }
        Ok(())
    }

    /// Seals the header and hands back the finished pack.
    fn finish(&mut self, keys: &crate::crypto::Keys) -> Result<(Id, u64, Vec<PackEntry>, PackBody)> {
        match self.spooled.take() {
            None => {
                let p = self.builder.finish(keys)?;
                Ok((p.id, p.len, p.entries, PackBody::Parts(p.parts)))
            }
            Some(mut file) => {
                let trailer = self.builder.finish_trailer(keys)?;
                file.append(&trailer.bytes)?;
                if file.len() != trailer.pack_len {
                    return Err(Error::Internal(format!(
                        "spooled pack holds {} bytes, its header describes {}",
                        file.len(),
                        trailer.pack_len
                    )));
                }
                Ok((file.id(), trailer.pack_len, trailer.entries, PackBody::Spooled(file)))
            }
        }
    }

    /// Whether someone waits for budget this pack holds.
    fn blocks_others(&self) -> bool {
        self.guards.iter().any(|g| g.budget().has_waiters())
    }
}

fn packer(
    shared: &Shared,
    pack_size: usize,
    upload_slots: &Arc<crate::budget::Budget>,
    blobs: &Receiver<Sealed>,
    packs: &mpsc::Sender<OutPack>,
) {
    let keys = Arc::clone(shared.repo.keys());
    // One open pack per blob type (see the module docs: tree packs).
    let mut open: [OpenPack; 2] = std::array::from_fn(|_| OpenPack {
        builder: PackBuilder::default(),
        guards: Vec::new(),
        budgeted: 0,
        spooled: None,
    });
    let flush = |open: &mut OpenPack| -> bool {
        // Finished packs are memory until stored: never more of them than uploads run.
        let slot = upload_slots.acquire(1);
        match open.finish(&keys) {
            Ok((id, len, entries, body)) => {
                let guards = std::mem::take(&mut open.guards);
                let out = OutPack { id, len, entries, body, slot, guards, budgeted: open.budgeted };
                open.budgeted = 0;
                packs.blocking_send(out).is_ok()
            }
            Err(e) => {
                shared.fail(e);
                false
            }
        }
    };
    loop {
        let s = match blobs.recv_timeout(PRESSURE_POLL) {
            Ok(s) => s,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                for pack in &mut open {
                    // Readers wait for budget that only this partial pack can give back.
                    if !pack.builder.is_empty() && !shared.failed.load(Ordering::Relaxed) && pack.blocks_others() {
                        shared.stats.pressure_flushes.fetch_add(1, Ordering::Relaxed);
                        if !flush(pack) {
                            shared.failed.store(true, Ordering::SeqCst);
                        }
                    }
                }
                continue;
            }
        };
        if shared.failed.load(Ordering::Relaxed) {
            continue;
        }
        let pack = &mut open[usize::from(s.blob.ty == BlobType::Tree)];
        if let Err(e) = pack.add(s, shared) {
            shared.fail(e);
            continue;
        }
        if pack.builder.len() >= pack_size && !flush(pack) {
            shared.failed.store(true, Ordering::SeqCst);
        }
    }
    for pack in &mut open {
        if !pack.builder.is_empty() && !shared.failed.load(Ordering::Relaxed) && !flush(pack) {
            shared.failed.store(true, Ordering::SeqCst);
        }
    }
}

async fn uploader(shared: Arc<Shared>, mut packs: mpsc::Receiver<OutPack>, concurrency: usize, index_every: usize) {
    let mut uploads = tokio::task::JoinSet::new();
    let mut pending = IndexFile::default();
    let finish_one =
        |r: std::result::Result<Result<IndexPack>, tokio::task::JoinError>, pending: &mut IndexFile| match r {
            Ok(Ok(p)) => pending.packs.push(p),
            Ok(Err(e)) => shared.fail(e),
            Err(e) => shared.fail(Error::Internal(format!("upload task: {e}"))),
        };
    loop {
        tokio::select! {
            biased;
            Some(r) = uploads.join_next(), if !uploads.is_empty() => {
                finish_one(r, &mut pending);
            }
            next = packs.recv(), if uploads.len() < concurrency => {
                let Some(OutPack { id, len, entries, body, slot, guards, budgeted }) = next else { break };
                let shared = Arc::clone(&shared);
                uploads.spawn(async move {
                    let key = pack_key(&id);
                    match store_pack(shared.repo.store(), &key, body).await {
                        Ok(()) | Err(Error::AlreadyExists(_)) => {}
                        Err(e) => return Err(e),
                    }
                    let ip = IndexPack::from_entries(id, &entries);
                    shared.repo.index_mut().add_pack(&ip);
                    {
                        let mut f = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                        for e in &entries { f.remove(&e.id); }
                    }
                    // Stored: count the bytes out before the budget is given back, so the
                    // counter never runs ahead of the budget.
                    shared.stats.budgeted_in_flight.fetch_sub(budgeted, Ordering::SeqCst);
                    drop(guards);
                    drop(slot);
                    shared.stats.bytes_stored.fetch_add(len, Ordering::Relaxed);
                    if let Some(p) = &shared.progress {
                        p.bytes_stored.fetch_add(len, Ordering::Relaxed);
                    }
                    shared.stats.packs.fetch_add(1, Ordering::Relaxed);
                    Ok(ip)
                });
            }
        }
        if pending.packs.len() >= index_every && !shared.failed.load(Ordering::SeqCst) {
            write_index(&shared, &mut pending).await;
        }
    }
    while let Some(r) = uploads.join_next().await {
        finish_one(r, &mut pending);
    }
    // Even after a failure, index what was stored so a retry can reuse it.
    if !pending.packs.is_empty() {
        write_index(&shared, &mut pending).await;
    }
}

/// Stores a finished pack under `key`: puts its parts, or publishes its staging file.
async fn store_pack(store: &Arc<dyn crate::store::Store>, key: &str, body: PackBody) -> Result<()> {
    match body {
        PackBody::Parts(parts) => store.put_parts(key, parts).await,
        PackBody::Spooled(file) => {
            let target = store
                .local_file(key)
                .ok_or_else(|| Error::Internal(format!("the store has no local file for {key}")))?;
            store.admit_local_write(key, file.len()).await?;
            tokio::task::spawn_blocking(move || file.publish(&target))
                .await
                .map_err(|e| Error::Internal(format!("publish {key}: {e}")))?
        }
    }
}

async fn write_index(shared: &Shared, pending: &mut IndexFile) {
    let file = std::mem::take(pending);
    if let Err(e) = save_index_under_lease(&shared.repo, &file, shared.lease.as_ref()).await {
        shared.fail(e);
    }
}

/// Writes an index file only while `lease` holds, checking before and after the write: if the
/// lease lapsed while the write was under way (the process frozen in between), a prune may have
/// deleted packs the file names, so the file is taken back and its packs stay unindexed
/// leftovers. Does not merge the file into the in-memory index.
pub(crate) async fn save_index_under_lease(
    repo: &Repository,
    file: &IndexFile,
    lease: Option<&crate::lock::Lease>,
) -> Result<Id> {
    if let Some(l) = lease {
        l.check()?;
    }
    let id = repo.save_file("index", file.encode(repo.keys())?).await?;
    if let Some(l) = lease
        && let Err(e) = l.check()
    {
        let _ = repo.store().delete(&format!("index/{}", id.to_hex())).await;
        return Err(e);
    }
    Ok(id)
}
