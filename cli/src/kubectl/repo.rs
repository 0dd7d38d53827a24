//! `kubectl hoard repo check|unlock|keys list REPOSITORY`: opens a cluster's repository on this
//! machine and runs the same code as `hoard check|unlock|key list` ([`crate::ops`]).
//!
//! The chain is Repository (`spec.storageRef`, `spec.path`, `spec.encryptionSecret`) →
//! BackupStorage (`spec.storage`: s3, gcs, azure or local) → the storage's credential Secret
//! (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`,
//! `GOOGLE_SERVICE_ACCOUNT_JSON`, `AZURE_ACCOUNT_KEY`) → the encryption Secret
//! (`HOARD_PASSWORD`, else `RESTIC_PASSWORD`). Secret values go to the store client and the key
//! derivation only; no message ever contains one.

use crate::errln;
use std::sync::Arc;

use hoard_api::crd::{BackupStorage, Provider, Repository as RepositoryObject, StorageBackend};
use hoard_core::store::{Credentials, Store, StoreOptions};
use hoard_core::{Password, Repository};
use k8s_openapi::api::core::v1::Secret;

use super::cmds::get;
use super::error::{BACKUP_STORAGE, PluginError, REPOSITORY, SECRET};
use super::print::Output;
use super::{Ctx, KeysAction, RepoAction};

pub async fn run(ctx: &Ctx, action: RepoAction) -> anyhow::Result<u8> {
    let json = ctx.output == Output::Json;
    match action {
        RepoAction::Check { repository, read_data, read_data_subset } => {
            let repo = open(ctx, &repository, json).await?;
            crate::ops::check(repo, read_data, read_data_subset.as_deref(), json).await
        }
        RepoAction::Unlock { repository, remove_all } => {
            let repo = open(ctx, &repository, json).await?;
            crate::ops::unlock(&repo, remove_all, json).await
        }
        RepoAction::Keys { action: KeysAction::List { repository } } => {
            let repo = open(ctx, &repository, json).await?;
            crate::ops::key_list(&repo, json).await
        }
    }
}

/// Where a cluster's repository lives and what opens it. `Debug` shows no secret.
pub struct Resolved {
    /// `s3://bucket/prefix/path` and the like, for messages.
    pub location: String,
    pub store: Arc<dyn Store>,
    pub password: Password,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved").field("location", &self.location).finish_non_exhaustive()
    }
}

async fn open(ctx: &Ctx, name: &str, json: bool) -> anyhow::Result<Arc<Repository>> {
    let r = resolve(ctx, name).await?;
    if !json {
        errln!("repository {}/{name}: {}", ctx.namespace, r.location);
    }
    Ok(Arc::new(Repository::open(r.store, &r.password).await?))
}

/// One key of a Secret, as text. Errors name the Secret, the key and who refers to it.
async fn secret_value(
    ctx: &Ctx,
    ns: &str,
    secret: &str,
    keys: &[&str],
    referrer: &str,
) -> Result<Option<String>, PluginError> {
    let s: Secret = get(ctx, ns, secret, &SECRET).await?;
    let data = s.data.unwrap_or_default();
    let string_data = s.string_data.unwrap_or_default();
    for k in keys {
        if let Some(v) = data.get(*k) {
            // Like the controller: a trailing newline (a Secret made from a file) is not part of it.
            return String::from_utf8(v.0.clone()).map(|v| Some(v.trim_end_matches(['\n', '\r']).to_string())).map_err(
                |_| {
                    PluginError::Unsupported(format!(
                        "key {k} of secret \"{secret}\" in namespace \"{ns}\" ({referrer}) is not UTF-8 text"
                    ))
                },
            );
        }
        if let Some(v) = string_data.get(*k) {
            return Ok(Some(v.trim_end_matches(['\n', '\r']).to_string()));
        }
    }
    Ok(None)
}

async fn required(ctx: &Ctx, ns: &str, secret: &str, keys: &[&str], referrer: &str) -> Result<String, PluginError> {
    secret_value(ctx, ns, secret, keys, referrer).await?.ok_or_else(|| {
        PluginError::Unsupported(format!(
            "secret \"{secret}\" in namespace \"{ns}\" ({referrer}) has no key {}; add it with: kubectl edit secret {secret} -n {ns}",
            keys.join(" or ")
        ))
    })
}

fn join_path(parts: &[Option<&str>]) -> String {
    parts.iter().flatten().map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()).collect::<Vec<_>>().join("/")
}

/// Reads the Repository, its BackupStorage and both Secrets, and builds the store.
pub async fn resolve(ctx: &Ctx, name: &str) -> Result<Resolved, PluginError> {
    let ns = ctx.namespace.as_str();
    let repo: RepositoryObject = get(ctx, ns, name, &REPOSITORY).await?;
    let storage_ns = repo.spec.storage_ref.namespace_or(ns).to_string();
    let storage_name = repo.spec.storage_ref.name.clone();
    let storage: BackupStorage = get(ctx, &storage_ns, &storage_name, &BACKUP_STORAGE).await?;
    let referrer = format!("backupstorage \"{storage_name}\"");
    let bad = |what: &str| {
        PluginError::Unsupported(format!(
            "backupstorage \"{storage_name}\" in namespace \"{storage_ns}\": {what}; inspect it with: kubectl get backupstorages {storage_name} -n {storage_ns} -o yaml"
        ))
    };
    let StorageBackend { provider, s3, gcs, azure, local } = storage.spec.storage;
    // The same credentials the controller hands the agents (hoard-core builds every client);
    // without a Secret, this machine's own (environment, profile, instance role).
    let (location, credentials) = match provider {
        Provider::S3 => {
            let s3 = s3.ok_or_else(|| bad("provider s3 without spec.storage.s3"))?;
            let (mut id, mut key, mut token) = (None, None, None);
            if let Some(secret) = &s3.secret_name {
                id = Some(required(ctx, &storage_ns, secret, &["AWS_ACCESS_KEY_ID"], &referrer).await?);
                key = Some(required(ctx, &storage_ns, secret, &["AWS_SECRET_ACCESS_KEY"], &referrer).await?);
                token = secret_value(ctx, &storage_ns, secret, &["AWS_SESSION_TOKEN"], &referrer).await?;
            }
            let location = format!("s3://{}/{}", s3.bucket, join_path(&[s3.prefix.as_deref(), Some(&repo.spec.path)]));
            let creds = Credentials::S3 {
                endpoint: s3.endpoint,
                region: s3.region,
                access_key_id: id,
                secret_access_key: key,
                session_token: token,
            };
            (location, Some(creds))
        }
        Provider::Gcs => {
            let g = gcs.ok_or_else(|| bad("provider gcs without spec.storage.gcs"))?;
            let creds = match &g.secret_name {
                Some(secret) => {
                    let json = required(ctx, &storage_ns, secret, &["GOOGLE_SERVICE_ACCOUNT_JSON"], &referrer).await?;
                    Some(Credentials::Gcs { service_account_json: json })
                }
                None => None,
            };
            (format!("gs://{}/{}", g.bucket, join_path(&[g.prefix.as_deref(), Some(&repo.spec.path)])), creds)
        }
        Provider::Azure => {
            let az = azure.ok_or_else(|| bad("provider azure without spec.storage.azure"))?;
            let (mut key, mut sas) = (None, None);
            if let Some(secret) = &az.secret_name {
                key = secret_value(ctx, &storage_ns, secret, &["AZURE_ACCOUNT_KEY"], &referrer).await?;
                sas = secret_value(ctx, &storage_ns, secret, &["AZURE_SAS_TOKEN"], &referrer).await?;
                if key.is_none() && sas.is_none() {
                    required(ctx, &storage_ns, secret, &["AZURE_ACCOUNT_KEY", "AZURE_SAS_TOKEN"], &referrer).await?;
                }
            }
            let location =
                format!("az://{}/{}", az.container, join_path(&[az.prefix.as_deref(), Some(&repo.spec.path)]));
            let creds = Credentials::Azure {
                account: az.storage_account,
                access_key: key,
                sas_token: sas,
                endpoint: az.endpoint,
            };
            (location, Some(creds))
        }
        Provider::Local => {
            let l = local.ok_or_else(|| bad("provider local without spec.storage.local"))?;
            let path = format!("/{}", join_path(&[Some(&l.mount_path), l.sub_path.as_deref(), Some(&repo.spec.path)]));
            if !std::path::Path::new(&path).is_dir() {
                return Err(PluginError::Unsupported(format!(
                    "repository \"{name}\" is on a filesystem the agents mount at {}; it is not mounted here ({path} is missing); run `hoard check --repo {path}` where it is mounted",
                    l.mount_path
                )));
            }
            (path, None)
        }
    };
    let opts = StoreOptions { credentials, ..Default::default() };
    // hoard-core's errors name no secret.
    let store =
        hoard_core::store::open_store(&location, &opts).map_err(|e| bad(&format!("cannot open {location}: {e}")))?;
    let enc_ns = repo.spec.encryption_secret.namespace_or(ns).to_string();
    let enc = &repo.spec.encryption_secret.name;
    let password = required(
        ctx,
        &enc_ns,
        enc,
        // The controller's order: HOARD_PASSWORD wins when both are set.
        &["HOARD_PASSWORD", "RESTIC_PASSWORD"],
        &format!("repository \"{name}\" spec.encryptionSecret"),
    )
    .await?;
    Ok(Resolved { location, store, password: Password::new(password) })
}
