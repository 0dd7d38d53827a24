//! What an order does: open the repository with the order's credentials, then back up, restore
//! or verify through hoard-core. The store is wrapped so that cancelling the order makes every
//! further storage request fail, which stops the core pipelines at their next upload or fetch.

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hoard_api::agent::v1::{self as pb, Phase};
use hoard_core::backup::{BackupOptions, Source};
use hoard_core::restore::{Fidelity, Overwrite, RestoreOptions, RestoreSource};
use hoard_core::store::{ObjectInfo, Store};
use hoard_core::{Password, Repository};

use crate::metrics::Metrics;
use crate::orders::{CancelToken, JobError, OrderCtx};
use crate::volume::OpenVolume;

/// Snapshot label holding the order id; makes a re-sent backup order find its snapshot even
/// after the agent restarted.
pub const ORDER_LABEL: &str = "hoard.dev/order-id";

/// Node-wide settings every job sees.
#[derive(Debug, Clone)]
pub struct JobEnv {
    pub node_name: String,
    /// File data in flight, one budget for all running orders of the node.
    pub budget: Arc<hoard_core::budget::Budget>,
    /// Backups read through io_uring (flag on and the kernel allows it).
    pub io_uring: bool,
    pub allow_file_repositories: bool,
    /// Restore and verify orders are refused (`--backup-only`: the chart's
    /// `agent.restore.enabled=false`, whose container can read but not write).
    pub backup_only: bool,
    pub scratch_dir: PathBuf,
    /// Local copies of remote repositories' index files and snapshots, shared by all orders;
    /// none: no cache.
    pub cache: Option<Arc<hoard_core::cache::CacheDir>>,
    pub metrics: Arc<Metrics>,
    /// Node-wide upload bandwidth limit shared by all orders.
    pub upload_limit: Option<Arc<RateLimit>>,
}

/// A node-wide byte-rate limit: each upload reserves its share of time on one shared clock.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_second: u64,
    next_free: std::sync::Mutex<tokio::time::Instant>,
}

impl RateLimit {
    pub fn new(bytes_per_second: u64) -> Option<Arc<RateLimit>> {
        (bytes_per_second > 0).then(|| {
            Arc::new(RateLimit { bytes_per_second, next_free: std::sync::Mutex::new(tokio::time::Instant::now()) })
        })
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        let done = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + cost;
            *next
        };
        tokio::time::sleep_until(done).await;
    }
}

/// Fails every request once the order is cancelled (lock removal still goes through), and
/// holds uploads, spooled packs included, to the node's bandwidth limit.
#[derive(Debug)]
struct CancelStore {
    inner: Arc<dyn Store>,
    cancel: Arc<CancelToken>,
    limit: Option<Arc<RateLimit>>,
}

impl CancelStore {
    fn check(&self) -> hoard_core::Result<()> {
        if self.cancel.is_cancelled() { Err(hoard_core::Error::Cancelled) } else { Ok(()) }
    }

    /// Admits a write of `len` bytes: fails once cancelled, waits for the bandwidth limit.
    async fn admit(&self, len: u64) -> hoard_core::Result<()> {
        self.check()?;
        if let Some(l) = &self.limit {
            tokio::select! {
                _ = l.take(len) => {}
                _ = self.cancel.cancelled() => return Err(hoard_core::Error::Cancelled),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for CancelStore {
    async fn put(&self, key: &str, data: Bytes) -> hoard_core::Result<()> {
        self.admit(data.len() as u64).await?;
        self.inner.put(key, data).await
    }
    async fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> hoard_core::Result<()> {
        self.admit(parts.iter().map(|p| p.len() as u64).sum()).await?;
        self.inner.put_parts(key, parts).await
    }
    async fn get(&self, key: &str) -> hoard_core::Result<Bytes> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> hoard_core::Result<Bytes> {
        self.check()?;
        self.inner.get_range(key, range).await
    }
    async fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> hoard_core::Result<Vec<Bytes>> {
        self.check()?;
        self.inner.get_ranges(key, ranges).await
    }
    async fn get_ranges_once(&self, key: &str, ranges: &[Range<u64>]) -> hoard_core::Result<Vec<Bytes>> {
        self.check()?;
        self.inner.get_ranges_once(key, ranges).await
    }
    async fn get_metadata_ranges(&self, key: &str, ranges: &[Range<u64>]) -> hoard_core::Result<Vec<Bytes>> {
        self.check()?;
        self.inner.get_metadata_ranges(key, ranges).await
    }
    async fn list(&self, prefix: &str) -> hoard_core::Result<Vec<ObjectInfo>> {
        self.check()?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> hoard_core::Result<()> {
        self.inner.delete(key).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
    // Spooled packs (file repositories) pass the same gate before they are published.
    fn local_file(&self, key: &str) -> Option<PathBuf> {
        self.inner.local_file(key)
    }
    async fn admit_local_write(&self, key: &str, len: u64) -> hoard_core::Result<()> {
        self.admit(len).await?;
        self.inner.admit_local_write(key, len).await
    }
}

/// Overwrites the order's secrets (password, object-store credentials) in memory once the job
/// no longer needs them; the opened repository keeps only what it derived from them.
pub fn wipe(repo: &mut Option<pb::Repository>) {
    use zeroize::Zeroize;
    if let Some(r) = repo {
        r.password.zeroize();
        if let Some(s) = &mut r.s3 {
            s.access_key_id.zeroize();
            s.secret_access_key.zeroize();
            s.session_token.zeroize();
        }
        if let Some(a) = &mut r.azure {
            a.access_key.zeroize();
            a.sas_token.zeroize();
        }
        if let Some(g) = &mut r.gcs {
            g.service_account_json.zeroize();
        }
    }
}

/// An order message that carries repository credentials.
pub trait Secrets {
    /// Overwrites the credentials in place (the repository location stays).
    fn wipe_secrets(&mut self);
}

macro_rules! secrets_in_repository {
    ($($t:ty),*) => {$(
        impl Secrets for $t {
            fn wipe_secrets(&mut self) {
                wipe(&mut self.repository);
            }
        }
    )*};
}
secrets_in_repository!(pb::BackupOrder, pb::RestoreOrder, pb::VerifyOrder);

/// Holds an order from the moment it is received: its credentials are overwritten when the
/// guard is dropped, on every path (run, refused, attached to an earlier run of the same id,
/// refused while draining, cancelled while queued), and the wipe is counted.
pub struct Wiped<T: Secrets> {
    inner: T,
    counter: Option<prometheus_client::metrics::counter::Counter>,
}

impl<T: Secrets> Wiped<T> {
    pub fn new(inner: T, counter: Option<prometheus_client::metrics::counter::Counter>) -> Self {
        Wiped { inner, counter }
    }
}

impl<T: Secrets> std::ops::Deref for Wiped<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: Secrets> std::ops::DerefMut for Wiped<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: Secrets> Drop for Wiped<T> {
    fn drop(&mut self) {
        self.inner.wipe_secrets();
        if let Some(c) = &self.counter {
            c.inc();
        }
    }
}

impl<T: Secrets> std::fmt::Debug for Wiped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wiped(<order>)")
    }
}

/// The order's bytes without its credentials: what identifies it (same order id and same
/// content = the same order, even after the credentials were rotated).
pub fn public_encoding<T: Secrets + Clone + prost::Message>(order: &T) -> Vec<u8> {
    let mut public = order.clone();
    public.wipe_secrets();
    public.encode_to_vec()
}

fn invalid(msg: impl Into<String>) -> JobError {
    JobError::new("invalid", msg)
}

/// Builds the store an order names, with the order's own credentials when it carries them
/// (the same conversion the controller uses: `hoard_api::repository`).
fn open_store(env: &JobEnv, repo: &pb::Repository) -> Result<Arc<dyn Store>, JobError> {
    let loc = repo.location.as_str();
    let remote = hoard_core::store::is_remote(loc);
    if !remote {
        if loc == "memory:" || loc.is_empty() {
            return Err(invalid("the order names no repository"));
        }
        if !env.allow_file_repositories {
            return Err(JobError::new(
                "refused",
                "filesystem repositories are disabled on this agent (--allow-file-repositories)",
            ));
        }
    }
    let opts = hoard_api::repository::store_options(repo).map_err(|e| invalid(e.to_string()))?;
    // Error text names the location and the problem, never a secret (hoard-core scrubs it).
    let store = hoard_core::store::open_store(loc, &opts).map_err(JobError::from)?;
    Ok(match &env.cache {
        Some(cache) if remote => Arc::new(hoard_core::cache::CacheStore::new(store, Arc::clone(cache))),
        _ => store,
    })
}

async fn open_repository(
    env: &JobEnv,
    repo: Option<&pb::Repository>,
    cancel: &Arc<CancelToken>,
) -> Result<Arc<Repository>, JobError> {
    let repo = repo.ok_or_else(|| invalid("the order names no repository"))?;
    let inner = open_store(env, repo)?;
    let store: Arc<dyn Store> =
        Arc::new(CancelStore { inner, cancel: Arc::clone(cancel), limit: env.upload_limit.clone() });
    let password = Password::new(repo.password.as_bytes().to_vec());
    Ok(Arc::new(Repository::open(store, &password).await?))
}

fn stats_of(s: &hoard_core::snapshot::Summary) -> pb::Stats {
    pb::Stats {
        files_new: s.files_new,
        files_changed: s.files_changed,
        files_unmodified: s.files_unmodified,
        dirs: s.dirs,
        total_bytes: s.total_bytes,
        bytes_read: s.bytes_read,
        bytes_new: s.bytes_new,
        bytes_stored: s.bytes_stored,
        duration_ms: s.duration_ms,
        ..Default::default()
    }
}

/// Component name and snapshot host for a backup order.
fn naming(order: &pb::BackupOrder) -> (String, String) {
    let id = order.volume.clone().unwrap_or_default();
    let component = if order.component.is_empty() { id.volume_name.clone() } else { order.component.clone() };
    let host = if !order.host.is_empty() {
        order.host.clone()
    } else {
        match &id.source {
            Some(pb::volume_identity::Source::Pvc(p)) if !id.namespace.is_empty() && !p.claim_name.is_empty() => {
                format!("{}/pvc/{}", id.namespace, p.claim_name)
            }
            _ if !id.namespace.is_empty() && !id.pod_name.is_empty() => format!("{}/{}", id.namespace, id.pod_name),
            _ => format!("{}/{}", id.pod_uid, id.volume_name),
        }
    };
    (component, host)
}

/// Backs up the opened volume into a new snapshot, or returns the snapshot an earlier run of
/// the same order already made.
pub async fn backup(
    env: JobEnv,
    ctx: OrderCtx,
    mut order: Wiped<pb::BackupOrder>,
    vol: OpenVolume,
) -> Result<pb::Result, JobError> {
    let (component, host) = naming(&order);
    let id = order.volume.clone().unwrap_or_default();
    let mut labels = order.labels.clone();
    labels.insert(ORDER_LABEL.into(), ctx.order_id.clone());
    labels.insert("hoard.dev/node".into(), env.node_name.clone());
    labels.insert("hoard.dev/pod-uid".into(), id.pod_uid.clone());
    labels.insert("hoard.dev/volume".into(), id.volume_name.clone());
    if !id.namespace.is_empty() {
        labels.insert("hoard.dev/namespace".into(), id.namespace.clone());
    }
    if let Some(pb::volume_identity::Source::Pvc(p)) = &id.source {
        labels.insert("hoard.dev/pv".into(), p.pv_name.clone());
        if !p.claim_name.is_empty() {
            labels.insert("hoard.dev/pvc".into(), p.claim_name.clone());
        }
    }
    let mut opts = BackupOptions {
        sources: vec![Source::Dir { name: component, dir: vol.dir, origin: vol.plan.display.clone() }],
        host,
        tags: order.tags.clone(),
        labels: labels.into_iter().collect(),
        excludes: order.excludes.clone(),
        includes: order.includes.clone(),
        budget: Some(Arc::clone(&env.budget)),
        io_uring: env.io_uring,
        read_concurrency: 2,
        progress: Arc::clone(&ctx.progress),
        // The volume root's mount is the boundary: a mount inside the volume (reachable through
        // mount propagation) belongs to someone else and is stored as an empty directory.
        one_file_system: true,
        ..BackupOptions::default()
    };
    // Warms the volume's metadata while the key is derived and the repository opened.
    opts.warmup = Some(hoard_core::backup::start_warmup(&opts)?);
    let repo = open_repository(&env, order.repository.as_ref(), &ctx.cancel).await;
    wipe(&mut order.repository);
    let repo = repo?;
    let existing = repo.list_snapshots().await?;
    if let Some((id, snap)) = existing.iter().find(|(_, s)| s.labels.get(ORDER_LABEL) == Some(&ctx.order_id)) {
        tracing::info!(order_id = ctx.order_id, snapshot = %id, "order already completed earlier; not backing up again");
        return Ok(pb::Result { snapshot_id: id.to_hex(), stats: Some(stats_of(&snap.summary)), ..Default::default() });
    }
    drop(existing);
    ctx.set_phase(Phase::Running);
    // The core backup future is not `Send` (it borrows its sources across awaits), so it runs
    // on a blocking thread that drives it on this runtime.
    let handle = tokio::runtime::Handle::current();
    let out = tokio::task::spawn_blocking(move || handle.block_on(hoard_core::backup::backup(repo, opts)))
        .await
        .map_err(|e| JobError::new("permanent", format!("backup task: {e}")))??;
    // Byte counters reach the metrics live, from the order's progress (orders.rs).
    tracing::info!(order_id = ctx.order_id, io_uring = out.io_uring, snapshot = %out.snapshot_id, "backup stored");
    Ok(pb::Result {
        snapshot_id: out.snapshot_id.to_hex(),
        stats: Some(stats_of(&out.snapshot.summary)),
        failed_files: Vec::new(),
    })
}

/// What to restore, from a restore or verify order.
#[derive(Debug)]
struct RestoreSpec<'a> {
    repo: Option<&'a pb::Repository>,
    snapshot: &'a str,
    component: &'a str,
    includes: Vec<String>,
    excludes: Vec<String>,
    /// Everything the snapshot records; otherwise a confined restore (`Fidelity::Confined`).
    full_metadata: bool,
    overwrite: Overwrite,
}

/// Restores one component of a snapshot below `target` (a directory the caller opened).
async fn restore_into(
    env: &JobEnv,
    ctx: &OrderCtx,
    spec: RestoreSpec<'_>,
    target: (PathBuf, OwnedFd),
) -> Result<pb::Result, JobError> {
    use std::sync::atomic::Ordering;
    let repo = open_repository(env, spec.repo, &ctx.cancel).await?;
    let which = if spec.snapshot.is_empty() { "latest" } else { spec.snapshot };
    let (id, snap) = repo.find_snapshot(which, &hoard_core::repo::SnapshotFilter::default()).await?;
    let component = spec.component;
    let comp = if component.is_empty() {
        match snap.components.as_slice() {
            [only] => only.clone(),
            _ => return Err(invalid(format!("snapshot {} has several components; name one", id.short()))),
        }
    } else {
        snap.component(component)
            .cloned()
            .ok_or_else(|| invalid(format!("snapshot {} has no component {component:?}", id.short())))?
    };
    let s = &comp.stats;
    ctx.progress.files_total.store(s.files_new + s.files_changed + s.files_unmodified, Ordering::Relaxed);
    ctx.progress.bytes_total.store(s.total_bytes, Ordering::Relaxed);
    ctx.progress.totals_known.store(true, Ordering::Relaxed);
    ctx.set_phase(Phase::Running);
    let mut opts = RestoreOptions::new(target.0);
    opts.target_dir = Some(target.1);
    opts.includes = spec.includes;
    opts.excludes = spec.excludes;
    opts.workers = 4;
    opts.progress = Arc::clone(&ctx.progress);
    // Nothing is written into a mount inside the target (see hoard-core's restore).
    opts.one_file_system = true;
    // A workload's volume gets no set-id bits, device nodes, file capabilities or root-owned
    // entries unless the controller says an administrator allowed them for its namespace.
    opts.fidelity = if spec.full_metadata { Fidelity::Full } else { Fidelity::Confined };
    opts.overwrite = spec.overwrite;
    let out = hoard_core::restore::restore(repo, RestoreSource::Tree(comp.root), opts).await?;
    let result = pb::Result {
        snapshot_id: id.to_hex(),
        stats: Some(pb::Stats { files_restored: out.files, bytes_restored: out.bytes, ..Default::default() }),
        failed_files: out.failed.iter().map(|(p, why)| format!("{p}: {why}")).collect(),
    };
    if ctx.cancel.is_cancelled() {
        return Err(JobError::new("cancelled", "restore stopped"));
    }
    if !out.failed.is_empty() {
        return Err(JobError {
            class: "permanent",
            message: if out.target_full {
                format!("{} files could not be restored: the volume is full", out.failed.len())
            } else {
                format!("{} files could not be restored", out.failed.len())
            },
            result: Some(Box::new(result)),
        });
    }
    Ok(result)
}

/// Left in a volume while a restore order writes into it: names the order, so that the same
/// order re-sent after an agent crash may continue in the volume it already partly filled.
pub const RESTORE_MARKER: &str = ".hoard-restore-in-progress";

/// The entries of the volume other than an ext4 `lost+found` directory; 0 when the volume
/// holds this order's marker (an interrupted run of this order filled it: it continues).
fn foreign_entries(dir: &OwnedFd, order_id: &str) -> Result<usize, JobError> {
    use std::os::fd::AsFd;
    if read_marker(dir).as_deref() == Some(order_id) {
        return Ok(0);
    }
    let names = hoard_core::fsmeta::list_dir(dir.as_fd())
        .map_err(|e| JobError::new("permanent", format!("cannot list the volume: {e}")))?;
    let mut n = 0;
    for name in names {
        let b = name.as_bytes();
        if b == b"lost+found"
            && hoard_core::fsmeta::stat_at(dir.as_fd(), &name)
                .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory)
        {
            continue;
        }
        n += 1;
    }
    Ok(n)
}

/// The order id in the volume's restore marker (a regular file of at most 1 KiB, not followed
/// if it is a link).
fn read_marker(dir: &OwnedFd) -> Option<String> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::openat(
        dir,
        RESTORE_MARKER,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile || st.st_size > 1024 {
        return None;
    }
    let mut buf = vec![0u8; 1024];
    let n = rustix::io::read(&fd, &mut buf).ok()?;
    String::from_utf8(buf[..n].to_vec()).ok()
}

fn write_marker(dir: &OwnedFd, order_id: &str) -> Result<(), JobError> {
    use rustix::fs::{Mode, OFlags};
    let failed = |e: rustix::io::Errno| JobError::new("permanent", format!("cannot write the restore marker: {e}"));
    // A link or other non-file of that name is replaced, never followed.
    let _ = rustix::fs::unlinkat(dir, RESTORE_MARKER, rustix::fs::AtFlags::empty());
    let fd = rustix::fs::openat(
        dir,
        RESTORE_MARKER,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(failed)?;
    rustix::io::write(&fd, order_id.as_bytes()).map_err(failed)?;
    Ok(())
}

/// Restores into a volume: refuses a volume with foreign content unless the order allows
/// overwriting; marks the volume while writing (see [`RESTORE_MARKER`]).
pub async fn restore(
    env: JobEnv,
    ctx: OrderCtx,
    mut order: Wiped<pb::RestoreOrder>,
    vol: OpenVolume,
) -> Result<pb::Result, JobError> {
    let r = restore_in_volume(&env, &ctx, &order, vol).await;
    wipe(&mut order.repository);
    r
}

async fn restore_in_volume(
    env: &JobEnv,
    ctx: &OrderCtx,
    order: &pb::RestoreOrder,
    vol: OpenVolume,
) -> Result<pb::Result, JobError> {
    let policy = Overwrite::from(order.overwrite());
    fill_volume(ctx, policy, vol, |overwrite, vol| async move {
        let spec = RestoreSpec {
            repo: order.repository.as_ref(),
            snapshot: &order.snapshot,
            component: &order.component,
            includes: order.includes.clone(),
            excludes: order.excludes.clone(),
            full_metadata: order.full_metadata,
            overwrite,
        };
        restore_into(env, ctx, spec, (vol.path, vol.dir)).await
    })
    .await
}

/// Writes into a volume through `fill`: refuses a volume with foreign content under
/// [`Overwrite::Never`]; marks the volume while writing (see [`RESTORE_MARKER`]) and hands
/// `fill` the policy to write with — a resumed order rewrites its partial files (their time
/// is not yet the source's); a fresh one with Never found the volume empty (but for
/// `lost+found`, merged into).
async fn fill_volume<F, Fut>(
    ctx: &OrderCtx,
    policy: Overwrite,
    vol: OpenVolume,
    fill: F,
) -> Result<pb::Result, JobError>
where
    F: FnOnce(Overwrite, OpenVolume) -> Fut,
    Fut: std::future::Future<Output = Result<pb::Result, JobError>>,
{
    // The same order after a crash: what it wrote completely (size and time set) is kept.
    let resumed = read_marker(&vol.dir).as_deref() == Some(ctx.order_id.as_str());
    let foreign = foreign_entries(&vol.dir, &ctx.order_id)?;
    if foreign > 0 && policy == Overwrite::Never {
        return Err(JobError::new(
            "refused",
            format!(
                "the volume is not empty ({foreign} entries); set overwrite (IfChanged, IfNewer or Always) to restore into it"
            ),
        ));
    }
    write_marker(&vol.dir, &ctx.order_id)?;
    let marker_dir = rustix::io::fcntl_dupfd_cloexec(&vol.dir, 0)
        .map_err(|e| JobError::new("permanent", format!("volume descriptor: {e}")))?;
    let r = fill(if resumed && policy != Overwrite::Always { Overwrite::IfChanged } else { policy }, vol).await;
    // Finished one way or another (done, failed, cancelled): only a crash leaves the marker.
    if let Err(e) = rustix::fs::unlinkat(&marker_dir, RESTORE_MARKER, rustix::fs::AtFlags::empty()) {
        tracing::warn!(order_id = ctx.order_id, "cannot remove the restore marker: {e}");
    }
    r
}

/// Copies one volume of this node into another (a VolumeSnapshot's clone into an existing
/// claim), with the restore's overwrite, marker and fidelity rules.
pub async fn copy(
    _env: JobEnv,
    ctx: OrderCtx,
    order: pb::CopyOrder,
    source: OpenVolume,
    vol: OpenVolume,
) -> Result<pb::Result, JobError> {
    let policy = Overwrite::from(order.overwrite());
    let fidelity = if order.full_metadata { Fidelity::Full } else { Fidelity::Confined };
    let ctx = &ctx;
    fill_volume(ctx, policy, vol, |overwrite, vol| async move {
        ctx.set_phase(Phase::Running);
        let started = std::time::Instant::now();
        let (progress, cancel) = (Arc::clone(&ctx.progress), Arc::clone(&ctx.cancel));
        let opts = hoard_core::mirror::MirrorOptions { overwrite, fidelity };
        let out = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsFd;
            hoard_core::mirror::mirror(source.dir.as_fd(), vol.dir.as_fd(), opts, &progress, &|| cancel.is_cancelled())
        })
        .await
        .map_err(|e| JobError::new("permanent", format!("copy task: {e}")))??;
        if out.cancelled {
            return Err(JobError::new("cancelled", "copy stopped"));
        }
        let stats = pb::Stats {
            files_restored: out.files,
            bytes_restored: out.bytes,
            duration_ms: started.elapsed().as_millis() as u64,
            ..Default::default()
        };
        let result = pb::Result {
            snapshot_id: String::new(),
            stats: Some(stats),
            failed_files: out.failed.iter().map(|(p, why)| format!("{p}: {why}")).collect(),
        };
        if out.failed.is_empty() {
            return Ok(result);
        }
        let failed = out.failed.len() as u64 + out.more_failed;
        let full = if out.target_full { ": the volume is full" } else { "" };
        Err(JobError {
            class: "permanent",
            message: format!("{failed} entries could not be copied{full}"),
            result: Some(Box::new(result)),
        })
    })
    .await
}

/// Restores into a fresh scratch directory, requires every file to restore, then removes it.
pub async fn verify(env: JobEnv, ctx: OrderCtx, mut order: Wiped<pb::VerifyOrder>) -> Result<pb::Result, JobError> {
    use rustix::fs::{Mode, OFlags};
    let name = format!("verify-{}", &blake3::hash(ctx.order_id.as_bytes()).to_hex()[..16]);
    let dir = env.scratch_dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&env.scratch_dir)
        .and_then(|_| std::fs::create_dir(&dir))
        .map_err(|e| JobError::new("permanent", format!("scratch directory {}: {e}", dir.display())))?;
    let r = async {
        let fd = rustix::fs::open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| JobError::new("permanent", format!("scratch directory: {e}")))?;
        let spec = RestoreSpec {
            repo: order.repository.as_ref(),
            snapshot: &order.snapshot,
            component: &order.component,
            includes: Vec::new(),
            excludes: Vec::new(),
            // Verification needs the data, not privileges, in the agent's scratch directory.
            full_metadata: false,
            // A fresh directory.
            overwrite: Overwrite::Never,
        };
        restore_into(&env, &ctx, spec, (dir.clone(), fd)).await
    }
    .await;
    wipe(&mut order.repository);
    let d = dir.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(d)).await;
    r
}
