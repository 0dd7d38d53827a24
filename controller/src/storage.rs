//! From a BackupStorage and a repository directory to what the agents and hoard-core need: a
//! location string and the object-store credentials, and the metadata object in the bucket
//! that lists the repositories (for repository sync).
//!
//! The metadata object is `<storage prefix>/hoard-meta/repositories.json`:
//!
//! ```json
//! {"version": 1, "repositories": [{"name": "app-repo", "namespace": "demo", "path": "demo/app-repo",
//!   "encryptionSecret": {"name": "repo-pass"}, "appRef": {...}, "deletionPolicy": "Delete"}]}
//! ```
//!
//! It holds names only, never a secret value: a fresh cluster needs the same encryption
//! Secrets to open the repositories it re-creates.

use std::collections::BTreeMap;

use hoard_api::agent::v1::{AzureCredentials, GcsCredentials, Repository as RepoMsg, S3Credentials};
use hoard_api::crd::{AppRef, BackupStorageSpec, DeletionPolicy, Provider, SecretRef};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Key of the metadata object, relative to the storage prefix.
pub const META_KEY: &str = "hoard-meta/repositories.json";

/// Secret keys for S3 credentials.
pub const S3_ACCESS_KEY: &str = "AWS_ACCESS_KEY_ID";
pub const S3_SECRET_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const S3_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
/// Secret keys for Azure credentials: the account's shared key, or else a SAS token.
pub const AZURE_ACCOUNT_KEY: &str = "AZURE_ACCOUNT_KEY";
pub const AZURE_SAS_TOKEN: &str = "AZURE_SAS_TOKEN";
/// Secret key for GCS credentials: a service account key file (JSON).
pub const GCS_SERVICE_ACCOUNT_JSON: &str = "GOOGLE_SERVICE_ACCOUNT_JSON";
/// Secret keys for a repository password, first found wins.
pub const PASSWORD_KEYS: [&str; 2] = ["HOARD_PASSWORD", "RESTIC_PASSWORD"];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub version: u32,
    #[serde(default)]
    pub repositories: Vec<MetaRepository>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaRepository {
    pub name: String,
    pub namespace: String,
    pub path: String,
    pub encryption_secret: SecretRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_ref: Option<AppRef>,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

impl Meta {
    /// Parses the metadata object (untrusted: it lies in the bucket, unauthenticated; the
    /// caller bounds its size from the listing). Entries are not validated here: sync applies
    /// the tenancy rules to each before using it.
    pub fn decode(bytes: &[u8]) -> Result<Meta> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Adds or replaces the entry for (namespace, name); returns whether anything changed.
    pub fn upsert(&mut self, entry: MetaRepository) -> bool {
        self.version = 1;
        match self.repositories.iter_mut().find(|r| r.name == entry.name && r.namespace == entry.namespace) {
            Some(r) if *r == entry => false,
            Some(r) => {
                *r = entry;
                true
            }
            None => {
                self.repositories.push(entry);
                self.repositories.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                true
            }
        }
    }

    pub fn remove(&mut self, namespace: &str, name: &str) -> bool {
        let before = self.repositories.len();
        self.repositories.retain(|r| !(r.namespace == namespace && r.name == name));
        before != self.repositories.len()
    }
}

/// The first path segment reserved for hoard's own objects in a storage.
pub const RESERVED_DIR: &str = "hoard-meta";

/// Multi-tenancy: where in a storage a repository of namespace `repo_ns` may live. The storage's
/// own namespace holds its credentials, so it owns the bucket and may use any directory; every
/// other namespace is confined to `<its namespace>/…`, which no other tenant can reach (a
/// namespace name has no `/`). `.`/`..`, empty segments and the reserved `hoard-meta/` are
/// refused for everyone. Returns the normalised path (no leading or trailing `/`).
pub fn confine_path(path: &str, repo_ns: &str, storage_ns: &str) -> Result<String> {
    let trimmed = path.trim_matches('/');
    let segments: Vec<&str> = trimmed.split('/').collect();
    if trimmed.is_empty() || segments.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return Err(Error::invalid("repository path", format!("{path:?} is empty or has empty, `.` or `..` segments")));
    }
    if segments[0] == RESERVED_DIR {
        return Err(Error::invalid("repository path", format!("{path:?} lies in the reserved {RESERVED_DIR}/")));
    }
    if repo_ns != storage_ns && (segments.len() < 2 || segments[0] != repo_ns) {
        return Err(Error::Forbidden(format!(
            "repository path {path:?} must lie under {repo_ns}/ in a BackupStorage of namespace {storage_ns}"
        )));
    }
    Ok(trimmed.to_string())
}

/// Whether two repository directories overlap (one is the other or lies inside it): two
/// repositories must never share objects, or a WipeOut of one would delete the other.
pub fn paths_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_matches('/'), b.trim_matches('/'));
    let inside =
        |outer: &str, inner: &str| inner == outer || inner.strip_prefix(outer).is_some_and(|r| r.starts_with('/'));
    inside(a, b) || inside(b, a)
}

impl Meta {
    /// Another repository whose directory overlaps `path`, if any.
    pub fn overlapping(&self, namespace: &str, name: &str, path: &str) -> Option<&MetaRepository> {
        self.repositories.iter().find(|r| !(r.namespace == namespace && r.name == name) && paths_overlap(&r.path, path))
    }
}

fn join(parts: &[&str]) -> String {
    parts.iter().map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()).collect::<Vec<_>>().join("/")
}

/// The storage root (no repository directory): where the metadata object lives.
pub fn root_location(spec: &BackupStorageSpec, allow_local: bool) -> Result<String> {
    location(spec, "", allow_local)
}

/// The location of repository `dir` in the storage, as agents and hoard-core take it.
pub fn location(spec: &BackupStorageSpec, dir: &str, allow_local: bool) -> Result<String> {
    let s = &spec.storage;
    let missing = || Error::invalid("BackupStorage", format!("provider {:?} has no settings block", s.provider));
    Ok(match s.provider {
        Provider::S3 => {
            let b = s.s3.as_ref().ok_or_else(missing)?;
            format!("s3://{}", join(&[&b.bucket, b.prefix.as_deref().unwrap_or(""), dir]))
        }
        Provider::Gcs => {
            let b = s.gcs.as_ref().ok_or_else(missing)?;
            format!("gs://{}", join(&[&b.bucket, b.prefix.as_deref().unwrap_or(""), dir]))
        }
        Provider::Azure => {
            let b = s.azure.as_ref().ok_or_else(missing)?;
            format!("az://{}", join(&[&b.container, b.prefix.as_deref().unwrap_or(""), dir]))
        }
        Provider::Local => {
            if !allow_local {
                return Err(Error::Forbidden(
                    "local storage needs the controller flag --allow-file-repositories".into(),
                ));
            }
            let b = s.local.as_ref().ok_or_else(missing)?;
            local_segment("mountPath", &b.mount_path)?;
            if let Some(sub) = b.sub_path.as_deref().filter(|p| !p.is_empty()) {
                local_segment("subPath", sub)?;
            }
            format!("/{}", join(&[&b.mount_path, b.sub_path.as_deref().unwrap_or(""), dir]))
        }
    })
}

/// What in a storage only an administrator may choose, if anything: the controller's and the
/// agents' own cloud identity (no `secretName`), or a filesystem path on every node (`local`).
/// A tenant who could choose either would reach whatever the platform can reach.
pub fn admin_only(spec: &BackupStorageSpec) -> Option<&'static str> {
    match spec.storage.provider {
        Provider::Local => Some("a `local` filesystem path"),
        _ if credentials_secret(spec).is_none() => Some("ambient credentials (no secretName)"),
        _ => None,
    }
}

/// Multi-tenancy: a storage that uses [`admin_only`] features must live in an admin namespace
/// (`admin`: whether `storage_ns` is one).
pub fn check_owner(spec: &BackupStorageSpec, storage_ns: &str, name: &str, admin: bool) -> Result<()> {
    match admin_only(spec) {
        Some(what) if !admin => Err(Error::Forbidden(format!(
            "BackupStorage {storage_ns}/{name} uses {what}: only storages in the controller's namespace or an \
             --admin-namespace may; give it a credentials Secret and an object-store bucket"
        ))),
        _ => Ok(()),
    }
}

/// A `local` storage's path part: no `.`, `..` or empty segments (the mount path is absolute).
fn local_segment(what: &str, value: &str) -> Result<()> {
    if value.trim_matches('/').split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(Error::invalid("BackupStorage", format!("local {what} {value:?} has empty, `.` or `..` segments")));
    }
    Ok(())
}

/// The name of the Secret holding the storage's credentials, if any.
pub fn credentials_secret(spec: &BackupStorageSpec) -> Option<&str> {
    let s = &spec.storage;
    match s.provider {
        Provider::S3 => s.s3.as_ref()?.secret_name.as_deref(),
        Provider::Gcs => s.gcs.as_ref()?.secret_name.as_deref(),
        Provider::Azure => s.azure.as_ref()?.secret_name.as_deref(),
        Provider::Local => None,
    }
}

/// A storage's object-store credentials as work orders carry them. The controller opens the
/// storage with the same values, through the same conversion as the agents
/// (`hoard_api::repository`). `Debug` of the messages redacts every secret.
#[derive(Debug, Clone)]
pub enum StorageCredentials {
    S3(S3Credentials),
    Azure(AzureCredentials),
    Gcs(GcsCredentials),
}

impl StorageCredentials {
    /// Puts them into an order's repository message.
    pub fn apply(&self, msg: &mut RepoMsg) {
        match self {
            StorageCredentials::S3(c) => msg.s3 = Some(c.clone()),
            StorageCredentials::Azure(c) => msg.azure = Some(c.clone()),
            StorageCredentials::Gcs(c) => msg.gcs = Some(c.clone()),
        }
    }
}

/// Credentials for the storage from its spec and, when it names one, its Secret (`(name, data)`,
/// data key → value):
///
/// * S3: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`;
///   endpoint and region from the spec.
/// * Azure: `AZURE_ACCOUNT_KEY` or `AZURE_SAS_TOKEN` (the key wins when both are set); account
///   and endpoint from the spec.
/// * GCS: `GOOGLE_SERVICE_ACCOUNT_JSON`.
///
/// Without a Secret the agents and the controller use their ambient credentials (workload
/// identity, instance metadata), still with the spec's endpoint, region and account. A Secret
/// that lacks the keys its provider needs is an error naming the missing keys (never a value).
pub fn credentials(
    spec: &BackupStorageSpec,
    secret: Option<(&str, &BTreeMap<String, String>)>,
) -> Result<Option<StorageCredentials>> {
    let s = &spec.storage;
    let get = |k: &str| secret.and_then(|(_, d)| d.get(k)).filter(|v| !v.is_empty()).cloned().unwrap_or_default();
    let lacks = |what: &str| {
        let name = secret.map(|(n, _)| n).unwrap_or_default();
        Error::invalid("BackupStorage", format!("Secret {name} has no {what}"))
    };
    Ok(match s.provider {
        Provider::S3 => {
            let Some(b) = s.s3.as_ref() else { return Ok(None) };
            let c = S3Credentials {
                endpoint: b.endpoint.clone().unwrap_or_default(),
                region: b.region.clone().unwrap_or_default(),
                access_key_id: get(S3_ACCESS_KEY),
                secret_access_key: get(S3_SECRET_KEY),
                session_token: get(S3_SESSION_TOKEN),
            };
            if secret.is_some() && (c.access_key_id.is_empty() || c.secret_access_key.is_empty()) {
                return Err(lacks(&format!("{S3_ACCESS_KEY} and {S3_SECRET_KEY}")));
            }
            Some(StorageCredentials::S3(c))
        }
        Provider::Azure => {
            let Some(b) = s.azure.as_ref() else { return Ok(None) };
            let c = AzureCredentials {
                account: b.storage_account.clone(),
                access_key: get(AZURE_ACCOUNT_KEY),
                sas_token: get(AZURE_SAS_TOKEN),
                endpoint: b.endpoint.clone().unwrap_or_default(),
            };
            if secret.is_some() && c.access_key.is_empty() && c.sas_token.is_empty() {
                return Err(lacks(&format!("{AZURE_ACCOUNT_KEY} or {AZURE_SAS_TOKEN}")));
            }
            Some(StorageCredentials::Azure(c))
        }
        Provider::Gcs => {
            if s.gcs.is_none() || secret.is_none() {
                // No settings to pass: ambient credentials.
                return Ok(None);
            }
            let c = GcsCredentials { service_account_json: get(GCS_SERVICE_ACCOUNT_JSON) };
            if c.service_account_json.is_empty() {
                return Err(lacks(GCS_SERVICE_ACCOUNT_JSON));
            }
            Some(StorageCredentials::Gcs(c))
        }
        Provider::Local => None,
    })
}

/// The repository password from an encryption Secret's data.
pub fn password(secret: &BTreeMap<String, String>, secret_name: &str) -> Result<String> {
    PASSWORD_KEYS.iter().find_map(|k| secret.get(*k).filter(|v| !v.is_empty()).cloned()).ok_or_else(|| {
        Error::invalid(
            "encryption secret",
            format!("Secret {secret_name} has neither HOARD_PASSWORD nor RESTIC_PASSWORD"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_api::crd::{AzureStorage, GcsStorage, LocalStorage, S3Storage, StorageBackend};

    fn s3(prefix: Option<&str>) -> BackupStorageSpec {
        BackupStorageSpec {
            storage: StorageBackend {
                provider: Provider::S3,
                s3: Some(S3Storage {
                    endpoint: Some("http://127.0.0.1:9000".into()),
                    bucket: "b".into(),
                    prefix: prefix.map(Into::into),
                    region: None,
                    secret_name: Some("creds".into()),
                }),
                gcs: None,
                azure: None,
                local: None,
            },
            usage_policy: Default::default(),
            default: false,
            deletion_policy: Default::default(),
        }
    }

    fn local(mount: &str, sub: Option<&str>) -> BackupStorageSpec {
        let mut spec = s3(None);
        spec.storage = StorageBackend {
            provider: Provider::Local,
            s3: None,
            gcs: None,
            azure: None,
            local: Some(LocalStorage { mount_path: mount.into(), sub_path: sub.map(Into::into) }),
        };
        spec
    }

    #[test]
    fn locations() {
        assert_eq!(location(&s3(Some("team/x")), "demo/app", false).expect("ok"), "s3://b/team/x/demo/app");
        assert_eq!(root_location(&s3(None), false).expect("ok"), "s3://b");
        let local = local("/mnt/backup", None);
        assert!(matches!(location(&local, "d", false), Err(Error::Forbidden(_))));
        assert_eq!(location(&local, "d", true).expect("ok"), "/mnt/backup/d");
    }

    #[test]
    fn ambient_credentials_and_local_paths_are_for_admin_namespaces() {
        let with_secret = s3(None);
        assert_eq!(admin_only(&with_secret), None);
        check_owner(&with_secret, "tenant", "s", false).expect("a tenant's storage with a Secret");
        let mut ambient = s3(None);
        ambient.storage.s3.as_mut().expect("s3").secret_name = None;
        let e = check_owner(&ambient, "tenant", "s", false).expect_err("ambient");
        assert!(matches!(e, Error::Forbidden(_)) && e.to_string().contains("ambient credentials"), "{e}");
        check_owner(&ambient, "hoard", "s", true).expect("an admin's ambient storage");
        let mut gcs_ambient = gcs();
        gcs_ambient.storage.gcs.as_mut().expect("gcs").secret_name = None;
        assert!(check_owner(&gcs_ambient, "tenant", "s", false).is_err());
        let local = local("/mnt/backup", None);
        assert!(check_owner(&local, "tenant", "s", false).expect_err("local").to_string().contains("local"));
        check_owner(&local, "hoard", "s", true).expect("an admin's local storage");
    }

    #[test]
    fn local_paths_with_dot_segments_are_refused() {
        assert_eq!(location(&local("/mnt/b", Some("team")), "d", true).expect("ok"), "/mnt/b/team/d");
        for (m, s) in [("/mnt/../etc", None), ("/mnt/b", Some("../../etc")), ("/mnt/./b", None), ("/mnt//b", None)] {
            let e = location(&local(m, s), "d", true).expect_err("dots");
            assert!(matches!(e, Error::Invalid { .. }), "{m} {s:?}: {e}");
        }
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn azure() -> BackupStorageSpec {
        let mut spec = s3(None);
        spec.storage = StorageBackend {
            provider: Provider::Azure,
            s3: None,
            gcs: None,
            azure: Some(AzureStorage {
                storage_account: "devstoreaccount1".into(),
                container: "c".into(),
                prefix: None,
                endpoint: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
                secret_name: Some("az".into()),
            }),
            local: None,
        };
        spec
    }

    fn gcs() -> BackupStorageSpec {
        let mut spec = s3(None);
        spec.storage = StorageBackend {
            provider: Provider::Gcs,
            s3: None,
            gcs: Some(GcsStorage { bucket: "b".into(), prefix: None, secret_name: Some("g".into()) }),
            azure: None,
            local: None,
        };
        spec
    }

    /// The message an order carries, and what hoard-core makes of it (the agent's conversion).
    fn converted(c: &StorageCredentials) -> hoard_core::store::Credentials {
        let mut msg = RepoMsg::default();
        c.apply(&mut msg);
        hoard_api::repository::credentials(&msg).expect("one kind").expect("set")
    }

    #[test]
    fn credentials_and_password() {
        let d = data(&[(S3_ACCESS_KEY, "id"), (S3_SECRET_KEY, "sk")]);
        let Some(StorageCredentials::S3(c)) = credentials(&s3(None), Some(("creds", &d))).expect("s3") else {
            panic!("s3 credentials")
        };
        assert_eq!((c.access_key_id.as_str(), c.endpoint.as_str()), ("id", "http://127.0.0.1:9000"));
        // No Secret: ambient credentials, the spec's endpoint still applies.
        let Some(StorageCredentials::S3(c)) = credentials(&s3(None), None).expect("ambient") else { panic!("s3") };
        assert!(c.access_key_id.is_empty() && c.endpoint == "http://127.0.0.1:9000");
        let e = credentials(&s3(None), Some(("creds", &data(&[(S3_ACCESS_KEY, "id")])))).expect_err("half");
        assert!(e.to_string().contains("Secret creds has no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), "{e}");
        let pw = [("RESTIC_PASSWORD".to_string(), "p".to_string())].into();
        assert_eq!(password(&pw, "s").expect("pw"), "p");
        let e = password(&Default::default(), "s").expect_err("none");
        assert!(e.to_string().contains("Secret s"));
    }

    #[test]
    fn azure_credentials_from_the_secret_and_spec() {
        let d = data(&[(AZURE_ACCOUNT_KEY, "a2V5"), (AZURE_SAS_TOKEN, "sv=1&sig=x")]);
        let c = credentials(&azure(), Some(("az", &d))).expect("azure").expect("set");
        let StorageCredentials::Azure(m) = &c else { panic!("azure") };
        assert_eq!((m.account.as_str(), m.access_key.as_str()), ("devstoreaccount1", "a2V5"));
        match converted(&c) {
            hoard_core::store::Credentials::Azure { ref account, ref access_key, ref endpoint, .. } => {
                assert_eq!(account, "devstoreaccount1");
                assert_eq!(access_key.as_deref(), Some("a2V5"));
                assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:10000/devstoreaccount1"));
            }
            ref other => panic!("{other:?}"),
        }
        // A SAS token alone will do.
        let sas = credentials(&azure(), Some(("az", &data(&[(AZURE_SAS_TOKEN, "sv=1&sig=x")])))).expect("sas");
        assert!(
            matches!(sas, Some(StorageCredentials::Azure(ref m)) if m.sas_token == "sv=1&sig=x" && m.access_key.is_empty())
        );
        let e = credentials(&azure(), Some(("az", &data(&[("OTHER", "v")])))).expect_err("nothing usable");
        assert!(e.to_string().contains("Secret az has no AZURE_ACCOUNT_KEY or AZURE_SAS_TOKEN"), "{e}");
        // No Secret: the account and endpoint still travel, for the ambient credential.
        let c = credentials(&azure(), None).expect("ambient").expect("settings");
        assert!(matches!(
            converted(&c),
            hoard_core::store::Credentials::Azure { access_key: None, sas_token: None, .. }
        ));
    }

    #[test]
    fn gcs_credentials_from_the_secret() {
        let json = r#"{"client_email": "sa@p.iam.gserviceaccount.com"}"#;
        let c =
            credentials(&gcs(), Some(("g", &data(&[(GCS_SERVICE_ACCOUNT_JSON, json)])))).expect("gcs").expect("set");
        assert!(
            matches!(converted(&c), hoard_core::store::Credentials::Gcs { ref service_account_json } if service_account_json == json)
        );
        let e = credentials(&gcs(), Some(("g", &data(&[])))).expect_err("missing");
        assert!(e.to_string().contains("Secret g has no GOOGLE_SERVICE_ACCOUNT_JSON"), "{e}");
        assert!(credentials(&gcs(), None).expect("ambient").is_none());
    }

    #[test]
    fn repository_paths_are_confined_to_their_namespace() {
        // The storage's own namespace may use any directory.
        assert_eq!(confine_path("/shared/app/", "team", "team").expect("owner"), "shared/app");
        // Another namespace only beneath its own name.
        assert_eq!(confine_path("demo/app", "demo", "team").expect("tenant"), "demo/app");
        for bad in ["other/app", "demo", "/demo", "app"] {
            assert!(matches!(confine_path(bad, "demo", "team"), Err(Error::Forbidden(_))), "{bad}");
        }
        // Nobody gets dot segments, empty segments or the reserved directory.
        for bad in ["", "/", "demo/../other/app", "demo/./app", "demo//app", "hoard-meta/x", "/hoard-meta"] {
            for (ns, sns) in [("demo", "team"), ("team", "team")] {
                assert!(matches!(confine_path(bad, ns, sns), Err(Error::Invalid { .. })), "{bad} in {ns}");
            }
        }
    }

    #[test]
    fn overlapping_repositories_are_found() {
        assert!(paths_overlap("demo/app", "demo/app"));
        assert!(paths_overlap("demo/app", "demo/app/sub"));
        assert!(paths_overlap("/demo/app/sub/", "demo/app"));
        assert!(!paths_overlap("demo/app", "demo/app2"));
        assert!(!paths_overlap("demo/a", "demo/b"));
        let mut m = Meta::default();
        let entry = |name: &str, path: &str| MetaRepository {
            name: name.into(),
            namespace: "demo".into(),
            path: path.into(),
            encryption_secret: SecretRef::new("pw"),
            app_ref: None,
            deletion_policy: DeletionPolicy::Delete,
        };
        m.upsert(entry("a", "demo/a"));
        assert!(m.overlapping("demo", "a", "demo/a").is_none(), "itself");
        assert_eq!(m.overlapping("demo", "b", "demo/a/b").map(|r| r.name.as_str()), Some("a"));
        assert!(m.overlapping("demo", "b", "demo/b").is_none());
    }

    #[test]
    fn meta_upsert_is_idempotent() {
        let mut m = Meta::default();
        let e = MetaRepository {
            name: "r".into(),
            namespace: "ns".into(),
            path: "ns/r".into(),
            encryption_secret: SecretRef::new("pw"),
            app_ref: None,
            deletion_policy: DeletionPolicy::Delete,
        };
        assert!(m.upsert(e.clone()));
        assert!(!m.upsert(e.clone()));
        let back: Meta = serde_json::from_str(&serde_json::to_string(&m).expect("json")).expect("parse");
        assert_eq!(back, m);
        assert!(m.remove("ns", "r"));
    }
}
