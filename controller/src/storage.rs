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

use hoard_api::agent::v1::S3Credentials;
use hoard_api::crd::{AppRef, BackupStorageSpec, DeletionPolicy, Provider, SecretRef};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Key of the metadata object, relative to the storage prefix.
pub const META_KEY: &str = "hoard-meta/repositories.json";

/// Secret keys for S3 credentials.
pub const S3_ACCESS_KEY: &str = "AWS_ACCESS_KEY_ID";
pub const S3_SECRET_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const S3_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
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
            format!("/{}", join(&[&b.mount_path, b.sub_path.as_deref().unwrap_or(""), dir]))
        }
    })
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

/// S3 credentials for an order from the storage spec and its Secret's data (key → value).
pub fn s3_credentials(
    spec: &BackupStorageSpec,
    secret: &std::collections::BTreeMap<String, String>,
) -> Option<S3Credentials> {
    let b = spec.storage.s3.as_ref()?;
    let get = |k: &str| secret.get(k).cloned().unwrap_or_default();
    Some(S3Credentials {
        endpoint: b.endpoint.clone().unwrap_or_default(),
        region: b.region.clone().unwrap_or_default(),
        access_key_id: get(S3_ACCESS_KEY),
        secret_access_key: get(S3_SECRET_KEY),
        session_token: get(S3_SESSION_TOKEN),
    })
}

/// The repository password from an encryption Secret's data.
pub fn password(secret: &std::collections::BTreeMap<String, String>, secret_name: &str) -> Result<String> {
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
    use hoard_api::crd::{LocalStorage, S3Storage, StorageBackend};

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

    #[test]
    fn locations() {
        assert_eq!(location(&s3(Some("team/x")), "demo/app", false).expect("ok"), "s3://b/team/x/demo/app");
        assert_eq!(root_location(&s3(None), false).expect("ok"), "s3://b");
        let mut local = s3(None);
        local.storage = StorageBackend {
            provider: Provider::Local,
            s3: None,
            gcs: None,
            azure: None,
            local: Some(LocalStorage { mount_path: "/mnt/backup".into(), sub_path: None }),
        };
        assert!(matches!(location(&local, "d", false), Err(Error::Forbidden(_))));
        assert_eq!(location(&local, "d", true).expect("ok"), "/mnt/backup/d");
    }

    #[test]
    fn credentials_and_password() {
        let data =
            [(S3_ACCESS_KEY.to_string(), "id".to_string()), (S3_SECRET_KEY.to_string(), "sk".to_string())].into();
        let c = s3_credentials(&s3(None), &data).expect("s3");
        assert_eq!((c.access_key_id.as_str(), c.endpoint.as_str()), ("id", "http://127.0.0.1:9000"));
        let pw = [("RESTIC_PASSWORD".to_string(), "p".to_string())].into();
        assert_eq!(password(&pw, "s").expect("pw"), "p");
        let e = password(&Default::default(), "s").expect_err("none");
        assert!(e.to_string().contains("Secret s"));
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
