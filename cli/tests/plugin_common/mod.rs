//! Helpers for running the real `kubectl-hoard` binary against the real API server of
//! `hack/kube/up.sh` (`HOARD_TEST_KUBECONFIG`) and repositories on the real S3 server of
//! `hack/s3-up.sh` (`HOARD_TEST_S3_ENDPOINT`). No controller runs: tests write status themselves.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use hoard_testkit::kube::TestCluster;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub const PASSWORD: &str = "plugin test password 7d1c";
pub const S3_KEY_ID: &str = "testing";
pub const S3_SECRET: &str = "testing";

/// The cluster with hoard's CRDs applied, or `None` (skip) outside CI.
pub async fn cluster() -> Option<TestCluster> {
    let c = TestCluster::connect().await?;
    c.apply_crds(&hoard_api::crd::definitions()).await;
    Some(c)
}

pub fn plugin_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kubectl-hoard")
}

pub fn hoard_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hoard")
}

/// Runs `kubectl-hoard --kubeconfig K -n NS ARGS…`.
pub fn kh(c: &TestCluster, ns: &str, args: &[&str]) -> Output {
    let out = Command::new(plugin_bin())
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["-n", ns])
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if std::env::var("HOARD_TEST_VERBOSE").is_ok() {
        eprintln!(
            "$ kubectl hoard {args:?} -n {ns}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs and requires the exit code.
pub fn kh_expect(c: &TestCluster, ns: &str, args: &[&str], code: i32) -> Output {
    let out = kh(c, ns, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "kubectl hoard {args:?} -n {ns} exited {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(o), stderr(o)))
}

/// Creates a namespaced object from JSON (apiVersion/kind are filled in by the type).
pub async fn create<K>(c: &TestCluster, ns: &str, v: serde_json::Value) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(v).unwrap();
    Api::<K>::namespaced(c.client.clone(), ns).create(&PostParams::default(), &obj).await.unwrap()
}

/// Writes `status` through the status subresource, as the controller would.
pub async fn set_status<K>(c: &TestCluster, ns: &str, name: &str, status: serde_json::Value)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(c.client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({ "status": status })))
        .await
        .unwrap();
}

pub async fn get<K>(c: &TestCluster, ns: &str, name: &str) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(c.client.clone(), ns).get(name).await.unwrap()
}

/// A BackupConfiguration `name` for Deployment `app` with the given sessions, each writing to
/// repository `<name>-repo`.
pub fn configuration(name: &str, sessions: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "target": {"kind": "Deployment", "name": "app"},
            "backends": [{"name": "s3", "storageRef": {"name": "store"}}],
            "sessions": sessions.iter().map(|s| serde_json::json!({
                "name": s,
                "scheduler": {"schedule": "@daily"},
                "repositories": [{"name": format!("{name}-repo"), "backend": "s3", "encryptionSecret": {"name": "enc"}}],
            })).collect::<Vec<_>>(),
        }
    })
}

pub fn repository(name: &str, storage: &str, path: &str, secret: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name},
        "spec": {"storageRef": {"name": storage}, "path": path, "encryptionSecret": {"name": secret}}
    })
}

pub fn snapshot(name: &str, repository: &str, backup_session: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name},
        "spec": {"repository": repository, "session": "nightly", "backupSession": backup_session,
                 "appRef": {"kind": "Deployment", "name": "app", "namespace": "x"}}
    })
}

pub fn backup_session(name: &str, config: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name},
        "spec": {"invoker": {"apiGroup": "hoard.dev", "kind": "BackupConfiguration", "name": config}, "session": "nightly"}
    })
}

pub fn secret(name: &str, data: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "stringData": data.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
    }))
    .unwrap()
}

pub async fn create_secret(c: &TestCluster, ns: &str, name: &str, data: &[(&str, &str)]) {
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.client.clone(), ns)
        .create(&PostParams::default(), &secret(name, data))
        .await
        .unwrap();
}

/// A repository on the test S3 server, made with the `hoard` binary, holding one snapshot.
#[derive(Debug, Clone)]
pub struct S3Repo {
    pub endpoint: String,
    pub bucket: String,
    /// The BackupStorage prefix.
    pub prefix: String,
    /// The Repository path under the prefix.
    pub path: String,
}

impl S3Repo {
    pub fn location(&self) -> String {
        format!("s3://{}/{}/{}", self.bucket, self.prefix, self.path)
    }

    pub fn hoard(&self, args: &[&str]) -> Output {
        Command::new(hoard_bin())
            .arg("--repo")
            .arg(self.location())
            .args(args)
            .env("HOARD_PASSWORD", PASSWORD)
            .env("HOARD_S3_ENDPOINT", &self.endpoint)
            // Not the user's cache directory.
            .env("HOARD_CACHE_DIR", std::env::temp_dir().join("hoard-test-cache"))
            .env("AWS_ACCESS_KEY_ID", S3_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env("AWS_REGION", "us-east-1")
            .env_remove("HOARD_PASSWORD_FILE")
            .env_remove("HOARD_REPOSITORY")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `hoard init` and one backup of `data`.
    pub fn create(endpoint: &str, prefix: &str, path: &str, data: &Path) -> S3Repo {
        let r = S3Repo {
            endpoint: endpoint.to_string(),
            bucket: "hoard-test".into(),
            prefix: prefix.into(),
            path: path.into(),
        };
        let out = r.hoard(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf"]);
        assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
        let out = r.hoard(&["backup", data.to_str().unwrap(), "--name", "data", "--host", "app"]);
        assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
        r
    }

    /// The object-store client for this bucket (explicit credentials, nothing from the environment).
    pub fn object_store(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(S3_KEY_ID)
            .with_secret_access_key(S3_SECRET)
            .build()
            .unwrap()
    }

    /// Creates the Secrets, BackupStorage `store` and Repository `repo_name` that point at it.
    pub async fn register(&self, c: &TestCluster, ns: &str, repo_name: &str) {
        create_secret(c, ns, "s3-creds", &[("AWS_ACCESS_KEY_ID", S3_KEY_ID), ("AWS_SECRET_ACCESS_KEY", S3_SECRET)])
            .await;
        create_secret(c, ns, "enc", &[("RESTIC_PASSWORD", PASSWORD)]).await;
        create::<hoard_api::crd::BackupStorage>(
            c,
            ns,
            serde_json::json!({
                "metadata": {"name": "store"},
                "spec": {"storage": {"provider": "s3", "s3": {
                    "endpoint": self.endpoint, "bucket": self.bucket, "prefix": self.prefix,
                    "region": "us-east-1", "secretName": "s3-creds"}}}
            }),
        )
        .await;
        create::<hoard_api::crd::Repository>(c, ns, repository(repo_name, "store", &self.path, "enc")).await;
    }
}

/// A small directory tree to back up.
pub fn sample_tree(dir: &Path) -> PathBuf {
    let root = dir.join("data");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a.txt"), hoard_testkit::text_bytes(20_000, 1)).unwrap();
    std::fs::write(root.join("sub/b.bin"), hoard_testkit::random_bytes(300_000, 2)).unwrap();
    root
}

pub fn unique(prefix: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{:x}", std::process::id(), t & 0xffff_ffff)
}
