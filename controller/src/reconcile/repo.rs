//! Repository access (location, credentials, password from Secrets), the Repository reconciler
//! (initialise in the bucket, record it in the storage's metadata object, status from the
//! Snapshot objects, WipeOut on deletion) and the BackupStorage reconciler (reachability and
//! repository sync: Repository and Snapshot objects re-created from what the bucket holds).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hoard_api::agent::v1::{Repository as RepoMsg, S3Credentials};
use hoard_api::crd::{
    BackupStorage, ComponentPhase, ComponentStatus, DeletionPolicy, Repository, RepositoryPhase, RepositorySpec,
    Snapshot, SnapshotInfo, SnapshotPhase, StoragePhase, StoredRepository,
};
use hoard_core::store::{ObjectStoreBackend, RetryPolicy, RetryStore, Store, StoreOptions};
use hoard_core::{Password, Repository as CoreRepo};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::error::{Error, Result, is_not_found};
use crate::schedule::fmt_time;
use crate::storage::{self, Meta, MetaRepository};
use crate::{Context, FIELD_MANAGER, REPOSITORY_LABEL, SNAPSHOT_LABEL, apply_status};

pub const FINALIZER: &str = "hoard.dev/wipe-out";

/// Everything needed to open a repository. Holds secrets: `Debug` redacts them.
#[derive(Clone)]
pub struct Access {
    pub location: String,
    pub password: String,
    pub s3: Option<S3Credentials>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").field("location", &self.location).finish_non_exhaustive()
    }
}

impl Access {
    pub fn message(&self) -> RepoMsg {
        RepoMsg { location: self.location.clone(), password: self.password.clone(), s3: self.s3.clone() }
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
) -> Result<(BackupStorage, String, Option<S3Credentials>)> {
    let api: Api<BackupStorage> = Api::namespaced(ctx.client.clone(), storage_ns);
    let bs = match api.get(storage_name).await {
        Ok(b) => b,
        Err(e) if is_not_found(&e) => {
            return Err(Error::NotFound(format!("BackupStorage {storage_ns}/{storage_name}")));
        }
        Err(e) => return Err(e.into()),
    };
    admits(ctx, &bs.spec.usage_policy, storage_ns, user_ns, &format!("BackupStorage {storage_ns}/{storage_name}"))
        .await?;
    let location = storage::location(&bs.spec, dir, ctx.config.allow_file_repositories)?;
    let s3 = match storage::credentials_secret(&bs.spec) {
        Some(secret) => storage::s3_credentials(&bs.spec, &ctx.secret_data(storage_ns, secret).await?),
        None => storage::s3_credentials(&bs.spec, &BTreeMap::new()),
    };
    Ok((bs, location, s3))
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

/// How to open `repo` (its storage must admit the repository's namespace).
pub async fn access(ctx: &Context, repo: &Repository) -> Result<Access> {
    let ns = repo.namespace().unwrap_or_default();
    let storage_ns = repo.spec.storage_ref.namespace_or(&ns).to_string();
    let (_, location, s3) = storage_access(ctx, &storage_ns, &repo.spec.storage_ref.name, &ns, &repo.spec.path).await?;
    let secret_ns = repo.spec.encryption_secret.namespace_or(&ns).to_string();
    let data = ctx.secret_data(&secret_ns, &repo.spec.encryption_secret.name).await?;
    let password = storage::password(&data, &repo.spec.encryption_secret.name)?;
    Ok(Access { location, password, s3 })
}

/// Opens the object store behind a location, with explicit S3 credentials when given.
pub fn open_store(location: &str, s3: Option<&S3Credentials>) -> Result<Arc<dyn Store>> {
    let creds = s3.filter(|c| !c.access_key_id.is_empty() || !c.endpoint.is_empty());
    if let (Some(rest), Some(c)) = (location.strip_prefix("s3://"), creds) {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let client = object_store::ClientOptions::new()
            .with_timeout(Duration::from_secs(60))
            .with_connect_timeout(Duration::from_secs(10))
            .with_allow_http(c.endpoint.starts_with("http://"));
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_client_options(client)
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(20),
                ..Default::default()
            })
            .with_region(if c.region.is_empty() { "us-east-1" } else { &c.region });
        if !c.endpoint.is_empty() {
            b = b.with_endpoint(&c.endpoint);
        }
        if !c.access_key_id.is_empty() {
            b = b.with_access_key_id(&c.access_key_id).with_secret_access_key(&c.secret_access_key);
        }
        if !c.session_token.is_empty() {
            b = b.with_token(&c.session_token);
        }
        // The builder's error text never includes the secret.
        let s = b.build().map_err(|e| Error::invalid("S3 storage", e.to_string()))?;
        let backend = ObjectStoreBackend::new(Arc::new(s), prefix, location.to_string());
        return Ok(Arc::new(RetryStore::new(backend, RetryPolicy::default())));
    }
    Ok(hoard_core::store::open_store(location, &StoreOptions { create_dir: true, ..Default::default() })?)
}

/// Opens the repository, creating it when the location holds none. Two initialisations racing
/// (the Repository reconciler and a session starting) are fine: the loser finds the config the
/// winner wrote (create-only put) and opens the repository instead.
pub async fn open_or_init(a: &Access) -> Result<(CoreRepo, bool)> {
    let store = open_store(&a.location, a.s3.as_ref())?;
    let pw = Password::new(a.password.as_bytes().to_vec());
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

/// Reads the storage's metadata object (empty when absent).
pub async fn read_meta(store: &dyn Store) -> Result<Meta> {
    match store.get(storage::META_KEY).await {
        Ok(b) => Ok(serde_json::from_slice(&b)?),
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
    let (_, root, s3) = storage_access(ctx, &storage_ns, &repo.spec.storage_ref.name, &ns, "").await?;
    open_store(&root, s3.as_ref())
}

/// Makes sure the repository exists in the bucket and is listed in the metadata object.
pub async fn ensure_initialised(ctx: &Context, repo: &Repository) -> Result<CoreRepo> {
    let a = access(ctx, repo).await?;
    let (core, created) = open_or_init(&a).await?;
    if created {
        ctx.event(repo, false, "Initialised", format!("created repository at {}", a.location)).await;
    }
    let root = storage_root(ctx, repo).await?;
    let mut meta = read_meta(&*root).await?;
    let entry = MetaRepository {
        name: repo.name_any(),
        namespace: repo.namespace().unwrap_or_default(),
        path: repo.spec.path.clone(),
        encryption_secret: repo.spec.encryption_secret.clone(),
        app_ref: repo.spec.app_ref.clone(),
        deletion_policy: repo.spec.deletion_policy,
    };
    if meta.upsert(entry) {
        write_meta(&*root, &meta).await?;
    }
    Ok(core)
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
    let (phase, condition) = match ensure_initialised(ctx, repo).await {
        Ok(_) => (RepositoryPhase::Ready, None),
        Err(e) => {
            tracing::warn!(repository = repo.name_any(), namespace = ns, "repository not ready: {e}");
            (RepositoryPhase::NotReady, Some(e))
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
    let mut status = json!({
        "phase": phase,
        "snapshotCount": ok.len(),
        "size": ok.iter().filter_map(|s| s.status.as_ref().and_then(|s| s.size)).sum::<u64>(),
        "recentSnapshots": recent,
    });
    if let Some(t) = ok.first().and_then(|s| s.status.as_ref().and_then(|s| s.snapshot_time.clone())) {
        status["lastBackupTime"] = json!(t);
    }
    let (cstatus, reason, message) = match &condition {
        None => ("True", "Initialised", "the repository exists in its storage".to_string()),
        Some(e) => ("False", "NotReady", e.to_string()),
    };
    status["conditions"] = json!([{
        "type": "Ready", "status": cstatus, "reason": reason, "message": message,
        "lastTransitionTime": fmt_time(ctx.now()),
    }]);
    apply_status(&api, repo, status).await?;
    match condition {
        // Recorded in status; the error policy backs off (exponentially, bounded).
        Some(e) => Err(e),
        None => Ok(Action::requeue(Duration::from_secs(600))),
    }
}

/// WipeOut removes the repository's data; Delete keeps it. Either way the metadata entry goes.
async fn cleanup_repository(repo: &Repository, ctx: &Context) -> Result<Action> {
    let ns = repo.namespace().unwrap_or_default();
    match storage_root(ctx, repo).await {
        Ok(root) => {
            if repo.spec.deletion_policy == DeletionPolicy::WipeOut {
                let a = access(ctx, repo).await?;
                let store = open_store(&a.location, a.s3.as_ref())?;
                let objects = store.list("").await?;
                for o in &objects {
                    match store.delete(&o.key).await {
                        Ok(()) | Err(hoard_core::Error::ObjectNotFound(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                ctx.event(repo, false, "WipedOut", format!("removed {} objects from {}", objects.len(), a.location))
                    .await;
            }
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

/// BackupStorage: reachable? which repositories does its metadata list, and do objects exist
/// for them here? Missing Repository objects (and their Snapshot objects) are re-created.
pub async fn reconcile_storage(bs: Arc<BackupStorage>, ctx: Arc<Context>) -> Result<Action> {
    let ns = bs.namespace().unwrap_or_default();
    let api: Api<BackupStorage> = Api::namespaced(ctx.client.clone(), &ns);
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
    match result {
        Ok(_) => Ok(Action::requeue(Duration::from_secs(300))),
        // Recorded in status; the error policy backs off (exponentially, bounded).
        Err(e) => Err(e),
    }
}

async fn sync_storage(bs: &BackupStorage, ctx: &Context) -> Result<Vec<StoredRepository>> {
    let ns = bs.namespace().unwrap_or_default();
    let root = storage::root_location(&bs.spec, ctx.config.allow_file_repositories)?;
    let s3 = match storage::credentials_secret(&bs.spec) {
        Some(secret) => storage::s3_credentials(&bs.spec, &ctx.secret_data(&ns, secret).await?),
        None => storage::s3_credentials(&bs.spec, &BTreeMap::new()),
    };
    let store = open_store(&root, s3.as_ref())?;
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
    let repos: Api<Repository> = Api::namespaced(ctx.client.clone(), &entry.namespace);
    let repo = match repos.get_opt(&entry.name).await? {
        Some(r) => r,
        None => {
            let storage_ns = bs.namespace().unwrap_or_default();
            let spec = RepositorySpec {
                app_ref: entry.app_ref.clone(),
                storage_ref: hoard_api::crd::ObjectRef { name: bs.name_any(), namespace: Some(storage_ns) },
                path: entry.path.clone(),
                encryption_secret: entry.encryption_secret.clone(),
                deletion_policy: entry.deletion_policy,
                paused: false,
            };
            let obj = Repository::new(&entry.name, spec);
            let r = repos.patch(&entry.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
            ctx.event(&r, false, "Synced", "re-created from the storage's metadata object").await;
            r
        }
    };
    sync_snapshots(ctx, &repo).await
}

async fn sync_snapshots(ctx: &Context, repo: &Repository) -> Result<()> {
    let ns = repo.namespace().unwrap_or_default();
    let a = access(ctx, repo).await?;
    let store = open_store(&a.location, a.s3.as_ref())?;
    let core = CoreRepo::open(store, &Password::new(a.password.as_bytes().to_vec())).await?;
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
