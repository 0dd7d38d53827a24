//! Repository access (location, credentials, password from Secrets), the Repository reconciler
//! (initialise in the bucket, record it in the storage's metadata object, status from the
//! Snapshot objects, WipeOut on deletion) and the BackupStorage reconciler (reachability and
//! repository sync: Repository and Snapshot objects re-created from what the bucket holds).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hoard_api::agent::v1::Repository as RepoMsg;
use hoard_api::crd::{
    BackupStorage, ComponentPhase, ComponentStatus, DeletionPolicy, Repository, RepositoryPhase, RepositorySpec,
    Snapshot, SnapshotInfo, SnapshotPhase, StoragePhase, StoredRepository,
};
use hoard_core::store::Store;
use hoard_core::{Password, Repository as CoreRepo};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::error::{Error, Result, is_not_found};
use crate::schedule::{fmt_time, parse_time};
use crate::storage::{self, Meta, MetaRepository, StorageCredentials};
use crate::{Context, FIELD_MANAGER, REPOSITORY_LABEL, SNAPSHOT_LABEL, apply_status};

pub const FINALIZER: &str = "hoard.dev/wipe-out";

/// Everything needed to open a repository. Holds secrets: `Debug` redacts them.
#[derive(Clone)]
pub struct Access {
    pub location: String,
    /// The storage's root (where its metadata object lives).
    pub root: String,
    pub password: String,
    /// The storage's object-store credentials (`None`: ambient, or a filesystem storage).
    pub credentials: Option<StorageCredentials>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").field("location", &self.location).finish_non_exhaustive()
    }
}

impl Access {
    pub fn message(&self) -> RepoMsg {
        let mut msg =
            RepoMsg { location: self.location.clone(), password: self.password.clone(), ..Default::default() };
        if let Some(c) = &self.credentials {
            c.apply(&mut msg);
        }
        msg
    }

    /// The repository's object store.
    pub fn store(&self) -> Result<Arc<dyn Store>> {
        open_store(&self.location, self.credentials.as_ref())
    }

    /// The storage root's object store.
    pub fn root_store(&self) -> Result<Arc<dyn Store>> {
        open_store(&self.root, self.credentials.as_ref())
    }

    pub fn password(&self) -> Password {
        Password::new(self.password.as_bytes().to_vec())
    }

    /// Opens the (existing) repository.
    pub async fn open(&self) -> Result<CoreRepo> {
        Ok(CoreRepo::open(self.store()?, &self.password()).await?)
    }
}

/// Reads the storage a repository names, checks that the repository's namespace may use it,
/// and returns how to reach the storage root (`dir` empty) or a directory in it.
pub async fn storage_access(
    ctx: &Context,
    storage_ns: &str,
    storage_name: &str,
    user_ns: &str,
    dir: &str,
) -> Result<(BackupStorage, String, Option<StorageCredentials>)> {
    let api: Api<BackupStorage> = Api::namespaced(ctx.client.clone(), storage_ns);
    let bs = match api.get(storage_name).await {
        Ok(b) => b,
        Err(e) if is_not_found(&e) => {
            return Err(Error::NotFound(format!("BackupStorage {storage_ns}/{storage_name}")));
        }
        Err(e) => return Err(e.into()),
    };
    storage::check_owner(&bs.spec, storage_ns, storage_name, ctx.config.is_admin_namespace(storage_ns))?;
    admits(ctx, &bs.spec.usage_policy, storage_ns, user_ns, &format!("BackupStorage {storage_ns}/{storage_name}"))
        .await?;
    let location = storage::location(&bs.spec, dir, ctx.config.allow_file_repositories)?;
    let credentials = storage_credentials(ctx, storage_ns, &bs).await?;
    Ok((bs, location, credentials))
}

/// The storage's credentials, from its Secret (in the storage's namespace) when it names one.
async fn storage_credentials(
    ctx: &Context,
    storage_ns: &str,
    bs: &BackupStorage,
) -> Result<Option<StorageCredentials>> {
    match storage::credentials_secret(&bs.spec) {
        Some(secret) => {
            let data = ctx.secret_data(storage_ns, secret).await?;
            storage::credentials(&bs.spec, Some((secret, &data)))
        }
        None => storage::credentials(&bs.spec, None),
    }
}

/// Multi-tenancy: `user_ns` may use an object of `owner_ns` only if its usage policy admits it.
pub async fn admits(
    ctx: &Context,
    policy: &hoard_api::crd::UsagePolicy,
    owner_ns: &str,
    user_ns: &str,
    what: &str,
) -> Result<()> {
    let labels = if owner_ns == user_ns {
        BTreeMap::new()
    } else {
        let ns: Api<Namespace> = Api::all(ctx.client.clone());
        ns.get(user_ns).await?.metadata.labels.unwrap_or_default()
    };
    if policy.admits(owner_ns, user_ns, &labels) {
        Ok(())
    } else {
        Err(Error::Forbidden(format!("{what} does not admit namespace {user_ns} (spec.usagePolicy)")))
    }
}

/// Multi-tenancy: a Secret an object names must live in that object's namespace. The controller
/// reads Secrets with its own rights, so honouring another namespace here would let any tenant
/// borrow a neighbour's password.
pub fn same_namespace_secret<'a>(secret: &'a hoard_api::crd::SecretRef, ns: &'a str, field: &str) -> Result<&'a str> {
    match secret.namespace.as_deref().filter(|n| !n.is_empty()) {
        Some(other) if other != ns => Err(Error::Forbidden(format!(
            "{field} names Secret {other}/{}: a Secret must be in the namespace {ns} of the object that uses it",
            secret.name
        ))),
        _ => Ok(ns),
    }
}

/// How to open `repo` (its storage must admit the repository's namespace).
pub async fn access(ctx: &Context, repo: &Repository) -> Result<Access> {
    let ns = repo.namespace().unwrap_or_default();
    let storage_ns = repo.spec.storage_ref.namespace_or(&ns).to_string();
    storage::confine_path(&repo.spec.path, &ns, &storage_ns)?;
    let (storage, location, credentials) =
        storage_access(ctx, &storage_ns, &repo.spec.storage_ref.name, &ns, &repo.spec.path).await?;
    let root = storage::root_location(&storage.spec, ctx.config.allow_file_repositories)?;
    let secret_ns = same_namespace_secret(&repo.spec.encryption_secret, &ns, "encryptionSecret")?;
    let data = ctx.secret_data(secret_ns, &repo.spec.encryption_secret.name).await?;
    let password = storage::password(&data, &repo.spec.encryption_secret.name)?;
    Ok(Access { location, root, password, credentials })
}

/// Opens the object store behind a location with the storage's credentials, exactly as an agent
/// opens it from an order (`hoard_api::repository`, then hoard-core). A filesystem location's
/// directory is created when missing.
pub fn open_store(location: &str, credentials: Option<&StorageCredentials>) -> Result<Arc<dyn Store>> {
    let mut msg = RepoMsg { location: location.to_string(), ..Default::default() };
    if let Some(c) = credentials {
        c.apply(&mut msg);
    }
    let mut opts =
        hoard_api::repository::store_options(&msg).map_err(|e| Error::invalid("storage credentials", e.to_string()))?;
    opts.create_dir = true;
    Ok(hoard_core::store::open_store(location, &opts)?)
}

/// Opens the repository, creating it when the location holds none. Two initialisations racing
/// (the Repository reconciler and a session starting) are fine: the loser finds the config the
/// winner wrote (create-only put) and opens the repository instead.
pub async fn open_or_init(a: &Access) -> Result<(CoreRepo, bool)> {
    let store = a.store()?;
    let pw = a.password();
    match CoreRepo::open(Arc::clone(&store), &pw).await {
        Ok(r) => Ok((r, false)),
        Err(hoard_core::Error::RepositoryNotFound(_)) => {
            match CoreRepo::init(Arc::clone(&store), &pw, hoard_core::repo::InitOptions::default()).await {
                Ok(r) => Ok((r, true)),
                Err(hoard_core::Error::AlreadyExists(_)) => Ok((CoreRepo::open(store, &pw).await?, false)),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Most `hoard-meta/repositories.json` may hold: thousands of repositories fit in far less.
const MAX_META_LEN: u64 = 4 * 1024 * 1024;

/// Reads the storage's metadata object (empty when absent).
pub async fn read_meta(store: &dyn Store) -> Result<Meta> {
    // Unauthenticated and in the bucket: its listed size is checked before it is downloaded.
    let listed = store.list(storage::META_KEY).await?;
    if let Some(o) = listed.iter().find(|o| o.key == storage::META_KEY)
        && o.size > MAX_META_LEN
    {
        return Err(Error::Invalid {
            what: storage::META_KEY.to_string(),
            reason: format!("{} bytes is more than the metadata object may hold ({MAX_META_LEN})", o.size),
        });
    }
    match store.get(storage::META_KEY).await {
        Ok(b) => Meta::decode(&b),
        Err(hoard_core::Error::ObjectNotFound(_)) => Ok(Meta::default()),
        Err(e) => Err(e.into()),
    }
}

/// Replaces the metadata object. Only the leader writes it, so delete-then-put does not race
/// with another writer (hoard-core's `Store::put` is create-only; a reader can briefly see no
/// object between the two calls — see docs/controller.md).
pub async fn write_meta(store: &dyn Store, meta: &Meta) -> Result<()> {
    let body = Bytes::from(serde_json::to_vec_pretty(meta)?);
    match store.delete(storage::META_KEY).await {
        Ok(()) | Err(hoard_core::Error::ObjectNotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    store.put(storage::META_KEY, body).await?;
    Ok(())
}

async fn storage_root(ctx: &Context, repo: &Repository) -> Result<Arc<dyn Store>> {
    let ns = repo.namespace().unwrap_or_default();
    let storage_ns = repo.spec.storage_ref.namespace_or(&ns).to_string();
    let (_, root, credentials) = storage_access(ctx, &storage_ns, &repo.spec.storage_ref.name, &ns, "").await?;
    open_store(&root, credentials.as_ref())
}

/// Makes sure the repository exists in the bucket and is listed in the metadata object. A
/// repository whose directory overlaps another one's listed there is refused before anything
/// is written.
pub async fn ensure_initialised(ctx: &Context, repo: &Repository) -> Result<CoreRepo> {
    let a = access(ctx, repo).await?;
    let root = a.root_store()?;
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    refuse_overlap(&read_meta(&*root).await?, &ns, &name, &repo.spec.path)?;
    let (core, created) = open_or_init(&a).await?;
    if created {
        ctx.event(repo, false, "Initialised", format!("created repository at {}", a.location)).await;
    }
    let entry = MetaRepository {
        name,
        namespace: ns,
        path: repo.spec.path.clone(),
        encryption_secret: repo.spec.encryption_secret.clone(),
        app_ref: repo.spec.app_ref.clone(),
        deletion_policy: repo.spec.deletion_policy,
    };
    let _meta_guard = ctx.meta_lock.lock().await;
    let mut meta = read_meta(&*root).await?;
    refuse_overlap(&meta, &entry.namespace, &entry.name, &entry.path)?;
    if meta.upsert(entry) {
        write_meta(&*root, &meta).await?;
    }
    Ok(core)
}

fn refuse_overlap(meta: &Meta, ns: &str, name: &str, path: &str) -> Result<()> {
    match meta.overlapping(ns, name, path) {
        Some(other) => Err(Error::Forbidden(format!(
            "repository path {path:?} overlaps repository {}/{} at {:?} in the same storage",
            other.namespace, other.name, other.path
        ))),
        None => Ok(()),
    }
}

pub async fn reconcile_repository(repo: Arc<Repository>, ctx: Arc<Context>) -> Result<Action> {
    let ns = repo.namespace().unwrap_or_default();
    let api: Api<Repository> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, repo, |event| async {
        match event {
            Finalizer::Apply(r) => apply_repository(&r, &ctx).await,
            Finalizer::Cleanup(r) => cleanup_repository(&r, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Transient(other.to_string()),
    })
}

async fn apply_repository(repo: &Repository, ctx: &Context) -> Result<Action> {
    let ns = repo.namespace().unwrap_or_default();
    let api: Api<Repository> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.now();
    let old = repo.status.clone().unwrap_or_default();
    let (phase, condition, core) = match ensure_initialised(ctx, repo).await {
        Ok(core) => (RepositoryPhase::Ready, None, Some(Arc::new(core))),
        Err(e) => {
            tracing::warn!(repository = repo.name_any(), namespace = ns, "repository not ready: {e}");
            (RepositoryPhase::NotReady, Some(e), None)
        }
    };
    // Status from the Snapshot objects (cheap; the bucket is not listed on every pass).
    let snaps: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let lp = ListParams::default().labels(&format!("{REPOSITORY_LABEL}={}", repo.name_any()));
    let mut list = snaps.list(&lp).await?.items;
    list.sort_by_key(|s| std::cmp::Reverse(s.status.as_ref().and_then(|s| s.snapshot_time.clone())));
    let ok: Vec<&Snapshot> =
        list.iter().filter(|s| s.status.as_ref().and_then(|s| s.phase) == Some(SnapshotPhase::Succeeded)).collect();
    let recent: Vec<SnapshotInfo> = list
        .iter()
        .take(5)
        .map(|s| SnapshotInfo {
            name: s.name_any(),
            phase: s.status.as_ref().and_then(|s| s.phase),
            session: s.spec.backup_session.clone(),
            size: s.status.as_ref().and_then(|s| s.size),
            snapshot_time: s.status.as_ref().and_then(|s| s.snapshot_time.clone()),
        })
        .collect();
    let last_backup = ok.first().and_then(|s| s.status.as_ref().and_then(|s| s.snapshot_time.clone()));

    // The structural check and the stored size, each only when due.
    let mut checked = Integrity {
        integrity: old.integrity,
        last_check_time: old.last_check_time.clone(),
        problems: old.integrity_problems.clone(),
    };
    let mut total_size = old.total_size;
    if let Some(core) = &core {
        let last_check = old.last_check_time.as_deref().and_then(parse_time);
        let check_ran = check_due(last_check, now, ctx.config.check_interval);
        if check_ran {
            match verify(Arc::clone(core)).await {
                Ok(report) => checked = Integrity::from_report(&report, now),
                Err(e) => tracing::warn!(repository = repo.name_any(), namespace = ns, "check did not finish: {e}"),
            }
        }
        if check_ran || total_size.is_none() || last_backup != old.last_backup_time {
            match core.store().list("").await {
                Ok(objects) => total_size = Some(objects.iter().map(|o| o.size).sum()),
                Err(e) => tracing::warn!(repository = repo.name_any(), namespace = ns, "size not measured: {e}"),
            }
        }
    }
    let mut status = json!({
        "phase": phase,
        "snapshotCount": ok.len(),
        "size": ok.iter().filter_map(|s| s.status.as_ref().and_then(|s| s.size)).sum::<u64>(),
        "recentSnapshots": recent,
        "integrityProblems": checked.problems,
    });
    if let Some(t) = &last_backup {
        status["lastBackupTime"] = json!(t);
    }
    if let Some(n) = total_size {
        status["totalSize"] = json!(n);
    }
    if let Some(i) = checked.integrity {
        status["integrity"] = json!(i);
    }
    if let Some(t) = &checked.last_check_time {
        status["lastCheckTime"] = json!(t);
    }
    let (cstatus, reason, message) = match &condition {
        None => ("True", "Initialised", "the repository exists in its storage".to_string()),
        Some(e) => ("False", "NotReady", e.to_string()),
    };
    status["conditions"] = json!([{
        "type": "Ready", "status": cstatus, "reason": reason, "message": message,
        "lastTransitionTime": fmt_time(now),
    }]);
    apply_status(&api, repo, status).await?;
    if old.phase != Some(phase) {
        ctx.event(repo, phase != RepositoryPhase::Ready, &format!("{phase:?}"), message).await;
    }
    match (old.integrity, checked.integrity) {
        (prev, Some(false)) if prev != Some(false) => {
            let note = format!(
                "the check found {} damaged object(s), e.g. {}; run `kubectl hoard repo check` (see docs/cli.md)",
                checked.problems.len(),
                checked.problems.first().map(String::as_str).unwrap_or("?")
            );
            ctx.event(repo, true, "IntegrityCheckFailed", note).await;
        }
        (Some(false), Some(true)) => ctx.event(repo, false, "IntegrityRestored", "the check found no damage").await,
        _ => {}
    }
    match condition {
        // Recorded in status; the error policy backs off (exponentially, bounded).
        Some(e) => Err(e),
        None => {
            let interval = ctx.config.check_interval;
            let wake = if interval.is_zero() { REPOSITORY_PASS } else { REPOSITORY_PASS.min(interval) };
            Ok(Action::requeue(wake.max(Duration::from_secs(1))))
        }
    }
}

/// A Ready repository's periodic pass.
pub const REPOSITORY_PASS: Duration = Duration::from_secs(600);
/// Bound on one structural check.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether the structural check is due: never with a zero interval, at once when it never ran.
pub fn check_due(
    last: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
    interval: Duration,
) -> bool {
    if interval.is_zero() {
        return false;
    }
    match last {
        None => true,
        Some(t) => (now - t).to_std().is_ok_and(|age| age >= interval),
    }
}

/// What status records of the last structural check.
#[derive(Debug, Clone, PartialEq)]
struct Integrity {
    integrity: Option<bool>,
    last_check_time: Option<String>,
    problems: Vec<String>,
}

/// At most this many lines of `integrityProblems`: damaged objects first, then (at least half
/// of them when there is damage) the snapshots and files it affects.
const MAX_PROBLEMS: usize = 10;
/// Files named per affected snapshot (the count says how many there are).
const FILES_NAMED: usize = 3;

impl Integrity {
    fn from_report(r: &hoard_core::check::CheckReport, now: chrono::DateTime<chrono::Utc>) -> Self {
        let affected: Vec<String> = r
            .affected
            .iter()
            .take(MAX_PROBLEMS / 2)
            .map(|(snapshot, files)| {
                let short: String = snapshot.chars().take(8).collect();
                let named: Vec<&str> = files.iter().take(FILES_NAMED).map(String::as_str).collect();
                let more = if files.len() > FILES_NAMED { ", …" } else { "" };
                format!("snapshot {short}: {} file(s) affected: {}{more}", files.len(), named.join(", "))
            })
            .collect();
        let damaged =
            r.errors.iter().take(MAX_PROBLEMS - affected.len()).map(|p| format!("{}: {}", p.object, p.message));
        Integrity {
            integrity: Some(r.errors.is_empty()),
            last_check_time: Some(fmt_time(now)),
            problems: damaged.chain(affected).collect(),
        }
    }
}

/// The structural check (no data read), bounded by [`CHECK_TIMEOUT`].
async fn verify(core: Arc<CoreRepo>) -> Result<hoard_core::check::CheckReport> {
    let opts = hoard_core::check::CheckOptions { read_data_fraction: 0.0, concurrency: 4 };
    match tokio::time::timeout(CHECK_TIMEOUT, hoard_core::check::check(core, opts)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::Transient(format!("the check did not finish within {CHECK_TIMEOUT:?}"))),
    }
}

/// WipeOut removes the repository's data; Delete keeps it. Either way the metadata entry goes.
async fn cleanup_repository(repo: &Repository, ctx: &Context) -> Result<Action> {
    let ns = repo.namespace().unwrap_or_default();
    match storage_root(ctx, repo).await {
        Ok(root) => {
            if repo.spec.deletion_policy == DeletionPolicy::WipeOut {
                let a = access(ctx, repo).await?;
                let meta = read_meta(&*root).await?;
                match wipe_out(&a, &meta, &ns, &repo.name_any(), &repo.spec.path).await {
                    Ok(note) => ctx.event(repo, false, "WipedOut", note).await,
                    Err(e) => {
                        ctx.event(repo, true, "WipeOutRefused", e.to_string()).await;
                        return Err(e);
                    }
                }
            }
            let _meta_guard = ctx.meta_lock.lock().await;
            let mut meta = read_meta(&*root).await?;
            if meta.remove(&ns, &repo.name_any()) {
                write_meta(&*root, &meta).await?;
            }
        }
        // The storage is gone: nothing left to clean.
        Err(Error::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    Ok(Action::await_change())
}

/// WipeOut of one repository: only with its password (the repository must open), only when no
/// other repository listed in the storage overlaps its directory, and only the repository's
/// own objects ([`hoard_core::repo::wipe_rank`]); other objects at the location stay. A
/// location holding no repository has nothing to wipe. Returns what to say in the event.
pub async fn wipe_out(a: &Access, meta: &Meta, ns: &str, name: &str, path: &str) -> Result<String> {
    let refused = |why: String| {
        Error::Forbidden(format!(
            "WipeOut refused, nothing deleted: {why}. To delete the object and keep the data, set \
             spec.deletionPolicy: Delete"
        ))
    };
    if let Some(other) = meta.overlapping(ns, name, path) {
        return Err(refused(format!(
            "its directory {path:?} overlaps repository {}/{} at {:?}",
            other.namespace, other.name, other.path
        )));
    }
    let core = match CoreRepo::open(a.store()?, &a.password()).await {
        Ok(core) => core,
        Err(hoard_core::Error::RepositoryNotFound(_)) => {
            return Ok(format!("no repository at {}: nothing to wipe", a.location));
        }
        Err(e) if e.is_retryable() => return Err(e.into()),
        Err(e) => {
            return Err(refused(format!("the repository at {} does not open with its password: {e}", a.location)));
        }
    };
    let wiped = core.wipe().await?;
    Ok(format!(
        "removed the repository's {} objects ({} bytes) from {}; other objects there were left alone",
        wiped.objects, wiped.bytes, a.location
    ))
}

/// Finalizer on Snapshot objects whose deletion policy is WipeOut.
pub const SNAPSHOT_FINALIZER: &str = "hoard.dev/wipe-out-snapshot";

/// Snapshot objects with `deletionPolicy: WipeOut` carry [`SNAPSHOT_FINALIZER`]; deleting one
/// forgets its repository snapshots (every component) and starts a prune. With `Delete` only
/// the object goes and the data stays, to be found again by repository sync.
pub async fn reconcile_snapshot(snap: Arc<Snapshot>, ctx: Arc<Context>) -> Result<Action> {
    let ns = snap.namespace().unwrap_or_default();
    let has_finalizer = snap.finalizers().iter().any(|f| f == SNAPSHOT_FINALIZER);
    if snap.spec.deletion_policy != DeletionPolicy::WipeOut && !has_finalizer {
        return Ok(Action::await_change());
    }
    let api: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, SNAPSHOT_FINALIZER, snap, |event| async {
        match event {
            Finalizer::Apply(_) => Ok(Action::await_change()),
            Finalizer::Cleanup(s) => wipe_snapshot(&s, &ctx).await.map(|()| Action::await_change()),
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Transient(other.to_string()),
    })
}

async fn wipe_snapshot(snap: &Snapshot, ctx: &Context) -> Result<()> {
    let ns = snap.namespace().unwrap_or_default();
    if snap.spec.deletion_policy != DeletionPolicy::WipeOut {
        return Ok(());
    }
    let repos: Api<Repository> = Api::namespaced(ctx.client.clone(), &ns);
    // A repository that is gone, or going, settles its data by its own deletion policy.
    let Some(repo) = repos.get_opt(&snap.spec.repository).await?.filter(|r| r.metadata.deletion_timestamp.is_none())
    else {
        return Ok(());
    };
    let ids: Vec<hoard_core::Id> = snap
        .status
        .iter()
        .flat_map(|s| s.components.values())
        .filter_map(|c| c.snapshot_id.as_deref())
        .filter_map(|id| hoard_core::Id::from_hex(id).ok())
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let a = access(ctx, &repo).await?;
    let core = a.open().await?;
    // Ones already forgotten (by retention, which prunes on its own) are not counted again.
    let present: std::collections::BTreeSet<String> =
        core.store().list("snapshots/").await?.into_iter().map(|o| o.key).collect();
    let mut forgotten = 0;
    for id in ids.iter().filter(|id| present.contains(&format!("snapshots/{}", id.to_hex()))) {
        core.delete_snapshot(id).await?;
        forgotten += 1;
    }
    if forgotten > 0 {
        let note =
            format!("Snapshot {} deleted: forgot {forgotten} repository snapshot(s); prune follows", snap.name_any());
        ctx.event(&repo, false, "SnapshotWipedOut", note).await;
        spawn_prune(Arc::new(core), repo.name_any());
    }
    Ok(())
}

/// Bound on one prune run.
pub const PRUNE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Prune as its own bounded task, after snapshots were forgotten: nobody waits for it, and a
/// failure is logged (the next prune picks up what this one left).
pub fn spawn_prune(core: Arc<CoreRepo>, name: String) {
    tokio::spawn(async move {
        let opts = hoard_core::prune::PruneOptions { max_unused: 0.05, dry_run: false };
        match tokio::time::timeout(PRUNE_TIMEOUT, hoard_core::prune::prune(core, opts)).await {
            Ok(Ok(o)) => tracing::info!(repository = name, packs_removed = o.packs_removed, "pruned"),
            Ok(Err(e)) => tracing::warn!(repository = name, "prune failed: {e}"),
            Err(_) => tracing::warn!(repository = name, "prune did not finish in {PRUNE_TIMEOUT:?}; stopped"),
        }
    });
}

/// BackupStorage: reachable? which repositories does its metadata list, and do objects exist
/// for them here? Missing Repository objects (and their Snapshot objects) are re-created.
pub async fn reconcile_storage(bs: Arc<BackupStorage>, ctx: Arc<Context>) -> Result<Action> {
    let ns = bs.namespace().unwrap_or_default();
    let api: Api<BackupStorage> = Api::namespaced(ctx.client.clone(), &ns);
    let was = bs.status.as_ref().and_then(|s| s.phase);
    let result = sync_storage(&bs, &ctx).await;
    let (phase, repos, message) = match &result {
        Ok(r) => (StoragePhase::Ready, r.clone(), "the storage is reachable".to_string()),
        Err(e) => (StoragePhase::NotReady, Vec::new(), e.to_string()),
    };
    let status = json!({
        "phase": phase,
        "repositories": repos,
        "conditions": [{
            "type": "Ready", "status": if result.is_ok() {"True"} else {"False"},
            "reason": if result.is_ok() {"Reachable"} else {"NotReady"}, "message": message,
            "lastTransitionTime": fmt_time(ctx.now()),
        }],
    });
    apply_status(&api, &*bs, status).await?;
    if was != Some(phase) {
        ctx.event(&*bs, phase != StoragePhase::Ready, &format!("{phase:?}"), message).await;
    }
    match result {
        // An entry waiting for its namespace (to exist, or to consent) is looked at again soon.
        Ok(r) if r.iter().any(|s| !s.synced) => Ok(Action::requeue(Duration::from_secs(30))),
        Ok(_) => Ok(Action::requeue(Duration::from_secs(300))),
        // Recorded in status; the error policy backs off (exponentially, bounded).
        Err(e) => Err(e),
    }
}

async fn sync_storage(bs: &BackupStorage, ctx: &Context) -> Result<Vec<StoredRepository>> {
    let ns = bs.namespace().unwrap_or_default();
    storage::check_owner(&bs.spec, &ns, &bs.name_any(), ctx.config.is_admin_namespace(&ns))?;
    let root = storage::root_location(&bs.spec, ctx.config.allow_file_repositories)?;
    let credentials = storage_credentials(ctx, &ns, bs).await?;
    let store = open_store(&root, credentials.as_ref())?;
    let meta = read_meta(&*store).await?;
    let mut out = Vec::new();
    for entry in &meta.repositories {
        let mut stored = StoredRepository {
            name: entry.name.clone(),
            namespace: entry.namespace.clone(),
            path: entry.path.clone(),
            synced: false,
            error: None,
        };
        match sync_repository(ctx, bs, entry).await {
            Ok(()) => stored.synced = true,
            Err(e) => stored.error = Some(e.to_string()),
        }
        out.push(stored);
    }
    Ok(out)
}

/// Re-creates the Repository object for `entry` if missing, then a Snapshot object for every
/// Snapshot the repository holds that has no object here.
async fn sync_repository(ctx: &Context, bs: &BackupStorage, entry: &MetaRepository) -> Result<()> {
    let ns = Api::<Namespace>::all(ctx.client.clone());
    if ns.get_opt(&entry.namespace).await?.is_none() {
        return Err(Error::NotFound(format!("namespace {}", entry.namespace)));
    }
    // The bucket is not trusted to place repositories: the same tenancy rules as for a
    // Repository a user writes.
    let storage_ns = bs.namespace().unwrap_or_default();
    storage::confine_path(&entry.path, &entry.namespace, &storage_ns)?;
    same_namespace_secret(&entry.encryption_secret, &entry.namespace, "encryptionSecret")?;
    let what = format!("BackupStorage {storage_ns}/{}", bs.name_any());
    admits(ctx, &bs.spec.usage_policy, &storage_ns, &entry.namespace, &what).await?;
    let repos: Api<Repository> = Api::namespaced(ctx.client.clone(), &entry.namespace);
    let repo = match repos.get_opt(&entry.name).await? {
        Some(r) => r,
        None => {
            if entry.namespace != storage_ns {
                sync_consent(ctx, &storage_ns, &bs.name_any(), entry).await?;
            }
            let spec = RepositorySpec {
                app_ref: entry.app_ref.clone(),
                storage_ref: hoard_api::crd::ObjectRef { name: bs.name_any(), namespace: Some(storage_ns) },
                path: entry.path.clone(),
                encryption_secret: entry.encryption_secret.clone(),
                deletion_policy: entry.deletion_policy,
                paused: false,
                usage_policy: None,
            };
            let obj = Repository::new(&entry.name, spec);
            let r = repos.patch(&entry.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
            ctx.event(&r, false, "Synced", "re-created from the storage's metadata object").await;
            r
        }
    };
    sync_snapshots(ctx, &repo).await
}

/// The annotation by which a namespace lets a storage of another namespace re-create its
/// repositories: on the encryption Secret the metadata entry names, a comma-separated list of
/// `<storage namespace>/<storage name>`.
pub const SYNC_CONSENT_ANNOTATION: &str = "hoard.dev/repository-sync-from";

/// Multi-tenancy: the bucket's metadata object is written by whoever holds the storage's
/// credentials. Before it may create a Repository in another namespace (which would then be
/// opened, or initialised, with that namespace's password), that namespace must have said so
/// on the very Secret the entry names.
async fn sync_consent(ctx: &Context, storage_ns: &str, storage_name: &str, entry: &MetaRepository) -> Result<()> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(ctx.client.clone(), &entry.namespace);
    let secret = entry.encryption_secret.name.as_str();
    let wanted = format!("{storage_ns}/{storage_name}");
    let consented = secrets.get_opt(secret).await?.is_some_and(|s| {
        s.annotations().get(SYNC_CONSENT_ANNOTATION).is_some_and(|v| v.split(',').any(|item| item.trim() == wanted))
    });
    if consented {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "namespace {} has not consented to repository sync from BackupStorage {wanted}: annotate its Secret \
             {secret} with {SYNC_CONSENT_ANNOTATION}={wanted}",
            entry.namespace
        )))
    }
}

async fn sync_snapshots(ctx: &Context, repo: &Repository) -> Result<()> {
    let ns = repo.namespace().unwrap_or_default();
    let core = access(ctx, repo).await?.open().await?;
    let snaps = core.list_snapshots().await?;
    // Group the repository snapshots by the Snapshot object they were made for.
    let mut by_object: BTreeMap<String, Vec<(hoard_core::Id, hoard_core::snapshot::Snapshot)>> = BTreeMap::new();
    for (id, s) in snaps {
        let name =
            s.labels.get(SNAPSHOT_LABEL).cloned().unwrap_or_else(|| format!("{}-{}", repo.name_any(), id.short()));
        by_object.entry(name).or_default().push((id, s));
    }
    let api: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
    for (name, parts) in by_object {
        if api.get_opt(&name).await?.is_some() {
            continue;
        }
        let first = &parts[0].1;
        let obj = Snapshot::new(
            &name,
            hoard_api::crd::SnapshotSpec {
                repository: repo.name_any(),
                session: first.labels.get(crate::SESSION_LABEL).cloned(),
                backup_session: None,
                app_ref: repo.spec.app_ref.clone(),
                deletion_policy: DeletionPolicy::Delete,
            },
        );
        let mut obj = obj;
        obj.metadata.labels = Some([(REPOSITORY_LABEL.to_string(), repo.name_any())].into());
        obj.metadata.owner_references = repo.controller_owner_ref(&()).map(|o| vec![o]);
        let created = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
        let mut components = BTreeMap::new();
        let mut size = 0;
        let mut time = first.time;
        for (id, s) in &parts {
            let comp = s.labels.get(crate::retention::COMPONENT_LABEL).cloned().unwrap_or_else(|| id.short());
            size += s.summary.total_bytes;
            time = time.max(s.time);
            components.insert(
                comp,
                ComponentStatus {
                    phase: Some(ComponentPhase::Succeeded),
                    snapshot_id: Some(id.to_hex()),
                    size: Some(s.summary.total_bytes),
                    ..Default::default()
                },
            );
        }
        let status = json!({
            "phase": SnapshotPhase::Succeeded,
            "snapshotTime": fmt_time(time),
            "size": size,
            "totalComponents": components.len(),
            "components": components,
        });
        apply_status(&api, &created, status).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_check_runs_when_due_and_never_when_off() {
        let now = chrono::Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).single().expect("time");
        let day = Duration::from_secs(86_400);
        assert!(check_due(None, now, day), "never checked");
        assert!(!check_due(Some(now - chrono::Duration::hours(23)), now, day));
        assert!(check_due(Some(now - chrono::Duration::hours(24)), now, day));
        assert!(!check_due(None, now, Duration::ZERO), "0s turns it off");
        assert!(!check_due(Some(now + chrono::Duration::hours(1)), now, day), "a future time is not due");
    }

    #[test]
    fn secrets_of_other_namespaces_are_refused() {
        let mut r = hoard_api::crd::SecretRef::new("pw");
        assert_eq!(same_namespace_secret(&r, "demo", "encryptionSecret").expect("own"), "demo");
        r.namespace = Some("demo".into());
        assert_eq!(same_namespace_secret(&r, "demo", "encryptionSecret").expect("named own"), "demo");
        r.namespace = Some(String::new());
        assert_eq!(same_namespace_secret(&r, "demo", "encryptionSecret").expect("empty = own"), "demo");
        r.namespace = Some("bank".into());
        let e = same_namespace_secret(&r, "demo", "encryptionSecret").expect_err("foreign");
        assert!(matches!(e, Error::Forbidden(_)), "{e}");
        assert!(e.to_string().contains("bank/pw"), "{e}");
    }

    fn fs_access(dir: &std::path::Path, password: &str) -> Access {
        Access {
            location: dir.join("tenant/repo").to_string_lossy().into_owned(),
            root: dir.to_string_lossy().into_owned(),
            password: password.into(),
            credentials: None,
        }
    }

    fn meta_entry(ns: &str, name: &str, path: &str) -> MetaRepository {
        MetaRepository {
            name: name.into(),
            namespace: ns.into(),
            path: path.into(),
            encryption_secret: hoard_api::crd::SecretRef::new("pw"),
            app_ref: None,
            deletion_policy: DeletionPolicy::WipeOut,
        }
    }

    /// A location with a repository and another application's objects beside it.
    async fn shared_location(dir: &std::path::Path) -> Arc<dyn Store> {
        let a = fs_access(dir, "right");
        let store = a.store().expect("store");
        let opts = hoard_core::repo::InitOptions {
            kdf: hoard_core::crypto::KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 },
            allow_weak_kdf: true,
            ..Default::default()
        };
        CoreRepo::init(Arc::clone(&store), &a.password(), opts).await.expect("init");
        store.put("their-app/data.db", Bytes::from_static(b"not hoard's")).await.expect("put");
        store
    }

    async fn keys(store: &Arc<dyn Store>) -> Vec<String> {
        store.list("").await.expect("list").into_iter().map(|o| o.key).collect()
    }

    #[tokio::test]
    async fn wipe_out_needs_the_password_and_deletes_only_the_repository() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = shared_location(tmp.path()).await;
        let before = keys(&store).await;
        let meta = Meta { version: 1, repositories: vec![meta_entry("tenant", "repo", "tenant/repo")] };

        let e =
            wipe_out(&fs_access(tmp.path(), "wrong"), &meta, "tenant", "repo", "tenant/repo").await.expect_err("wrong");
        assert!(matches!(e, Error::Forbidden(_)) && e.to_string().contains("does not open"), "{e}");
        assert_eq!(keys(&store).await, before, "nothing deleted");

        let note =
            wipe_out(&fs_access(tmp.path(), "right"), &meta, "tenant", "repo", "tenant/repo").await.expect("wipe");
        assert!(note.contains("other objects there were left alone"), "{note}");
        assert_eq!(keys(&store).await, vec!["their-app/data.db".to_string()]);

        // Again (a retried finalizer): nothing left to wipe, not an error.
        let note =
            wipe_out(&fs_access(tmp.path(), "right"), &meta, "tenant", "repo", "tenant/repo").await.expect("again");
        assert!(note.contains("nothing to wipe"), "{note}");
    }

    #[tokio::test]
    async fn wipe_out_refuses_a_directory_another_repository_overlaps() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = shared_location(tmp.path()).await;
        let before = keys(&store).await;
        let meta = Meta {
            version: 1,
            repositories: vec![
                meta_entry("tenant", "repo", "tenant/repo"),
                meta_entry("tenant", "inner", "tenant/repo/x"),
            ],
        };
        let e = wipe_out(&fs_access(tmp.path(), "right"), &meta, "tenant", "repo", "tenant/repo")
            .await
            .expect_err("overlap");
        assert!(e.to_string().contains("overlaps repository tenant/inner"), "{e}");
        assert_eq!(keys(&store).await, before, "nothing deleted");
    }

    #[test]
    fn integrity_lists_at_most_ten_problems() {
        let now = chrono::Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).single().expect("time");
        let mut report = hoard_core::check::CheckReport::default();
        assert_eq!(Integrity::from_report(&report, now).integrity, Some(true));
        report.errors = (0..12)
            .map(|i| hoard_core::check::Problem { object: format!("packs/{i}"), message: "damaged".into() })
            .collect();
        let i = Integrity::from_report(&report, now);
        assert_eq!((i.integrity, i.problems.len()), (Some(false), 10));
        assert_eq!(i.problems[0], "packs/0: damaged");
        // The snapshots and files the damage reaches are named too, within the same bound.
        report.affected = (0..7)
            .map(|i| (format!("{i}abcdef0123456789"), (0..5).map(|f| format!("/db/{f}.dat")).collect()))
            .collect();
        let i = Integrity::from_report(&report, now);
        assert_eq!(i.problems.len(), 10);
        assert_eq!(i.problems[4], "packs/4: damaged");
        assert_eq!(i.problems[5], "snapshot 0abcdef0: 5 file(s) affected: /db/0.dat, /db/1.dat, /db/2.dat, …");
    }
}
