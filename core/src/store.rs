//! The storage abstraction: one small trait over `object_store`, and decorators around it.
//!
//! Guarantees callers rely on:
//! * `put` never overwrites: an existing key yields [`Error::AlreadyExists`]. Object names are
//!   content hashes, so a retried or duplicated `put` is harmless.
//! * A `put` that returns `Ok` is complete; readers never see a partial object (object stores
//!   commit whole objects; the filesystem backend writes a temporary file and renames it).
//! * Errors carry a [`Class`]: throttling, timeouts and 5xx answers are retryable.
//!
//! Decorators: [`RetryStore`] (bounded exponential backoff with jitter and an overall deadline),
//! and in tests a fault injector (see `faults`).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Class, Error, Result};

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the repository root, e.g. `packs/ab/ab12…`.
    pub key: String,
    pub size: u64,
}

#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Stores a new object; fails with [`Error::AlreadyExists`] if the key exists.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;
    async fn get(&self, key: &str) -> Result<Bytes>;
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes>;
    /// Several ranges of one object, returned in the order asked. Backends read them with one
    /// open (filesystem) or as few coalesced requests as they can (object stores); the default
    /// issues one `get_range` per range.
    async fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            out.push(self.get_range(key, r.clone()).await?);
        }
        Ok(out)
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    async fn delete(&self, key: &str) -> Result<()>;
    /// Where the repository lives, without credentials.
    fn location(&self) -> String;
}

/// A [`Store`] over any `object_store` implementation.
pub struct ObjectStoreBackend {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    location: String,
}

impl fmt::Debug for ObjectStoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectStoreBackend({})", self.location)
    }
}

fn classify(op: &'static str, key: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Error::ObjectNotFound(key.to_string()),
        E::AlreadyExists { .. } | E::Precondition { .. } => Error::AlreadyExists(key.to_string()),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } | E::InvalidPath { .. } | E::NotSupported { .. } => {
            Error::Storage { op, key: key.to_string(), message: e.to_string(), class: Class::Permanent }
        }
        other => {
            // Generic covers network errors, 5xx, throttling and timeouts: worth retrying.
            Error::Storage { op, key: key.to_string(), message: other.to_string(), class: Class::Retryable }
        }
    }
}

impl ObjectStoreBackend {
    pub fn new(inner: Arc<dyn ObjectStore>, prefix: &str, location: String) -> Self {
        let prefix = prefix.trim_matches('/').to_string();
        ObjectStoreBackend { inner, prefix, location }
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() { ObjPath::from(key) } else { ObjPath::from(format!("{}/{key}", self.prefix)) }
    }

    fn strip<'a>(&self, full: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(&self.prefix).map(|s| s.trim_start_matches('/')).unwrap_or(full)
        }
    }
}

#[async_trait]
impl Store for ObjectStoreBackend {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.inner
            .put_opts(&self.path(key), PutPayload::from_bytes(data), opts)
            .await
            .map(|_| ())
            .map_err(|e| classify("put", key, e))
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let r = self.inner.get(&self.path(key)).await.map_err(|e| classify("get", key, e))?;
        r.bytes().await.map_err(|e| classify("get", key, e))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.inner.get_range(&self.path(key), range).await.map_err(|e| classify("get", key, e))
    }

    async fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(&self.path(key), ranges).await.map_err(|e| classify("get", key, e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let p = self.path(prefix.trim_end_matches('/'));
        let metas: Vec<object_store::ObjectMeta> =
            self.inner.list(Some(&p)).try_collect().await.map_err(|e| classify("list", prefix, e))?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .map(|m| ObjectInfo { key: self.strip(m.location.as_ref()).to_string(), size: m.size })
            // Temporary files of an interrupted filesystem write are not objects.
            .filter(|o| !o.key.contains('#'))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify("delete", key, e)),
        }
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

/// Retry policy for [`RetryStore`].
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// No retry starts after this much time has passed since the first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            deadline: Duration::from_secs(120),
        }
    }
}

/// Retries retryable errors with exponential backoff and full jitter.
#[derive(Debug)]
pub struct RetryStore<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S: Store> RetryStore<S> {
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        RetryStore { inner, policy }
    }

    async fn run<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = Result<T>> + Send,
        T: Send,
    {
        let start = Instant::now();
        let mut backoff = self.policy.initial_backoff;
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_retryable() && attempt < self.policy.max_attempts => {
                    let mut r = [0u8; 4];
                    crate::crypto::fill_random(&mut r);
                    let jitter = backoff.mul_f64(u32::from_le_bytes(r) as f64 / u32::MAX as f64);
                    if start.elapsed() + jitter > self.policy.deadline {
                        return Err(e);
                    }
                    tracing::debug!(attempt, error = %e, "retrying storage operation");
                    tokio::time::sleep(jitter).await;
                    backoff = (backoff * 2).min(self.policy.max_backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl<S: Store> Store for RetryStore<S> {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let mut first = true;
        self.run(|| {
            let retry = !first;
            first = false;
            let data = data.clone();
            async move {
                match self.inner.put(key, data).await {
                    // A retried put whose earlier attempt landed: the object is there, by content name.
                    Err(Error::AlreadyExists(_)) if retry => Ok(()),
                    other => other,
                }
            }
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.run(|| self.inner.get(key)).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.run(|| self.inner.get_range(key, range.clone())).await
    }

    async fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.run(|| self.inner.get_ranges(key, ranges)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.run(|| self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.run(|| self.inner.delete(key)).await
    }

    fn location(&self) -> String {
        self.inner.location()
    }
}

#[async_trait]
impl Store for Arc<dyn Store> {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        (**self).put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes> {
        (**self).get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        (**self).get_range(key, range).await
    }
    async fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        (**self).get_ranges(key, ranges).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        (**self).list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        (**self).delete(key).await
    }
    fn location(&self) -> String {
        (**self).location()
    }
}

/// Options for opening a store from a location string.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// S3 endpoint (e.g. a local S3-compatible server); otherwise taken from
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT`.
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    /// Create the directory of a filesystem repository if missing.
    pub create_dir: bool,
    pub retry: Option<RetryPolicy>,
}

/// Opens a store: `/path` or `file:///path` (local filesystem), `s3://bucket/prefix`,
/// `gs://bucket/prefix`, `az://container/prefix`, or `memory:` (tests). Wrapped in [`RetryStore`].
pub fn open_store(location: &str, opts: &StoreOptions) -> Result<Arc<dyn Store>> {
    let retry = opts.retry.unwrap_or_default();
    let backend = open_backend(location, opts)?;
    Ok(Arc::new(RetryStore::new(backend, retry)))
}

fn split_bucket(rest: &str) -> (String, String) {
    let mut it = rest.splitn(2, '/');
    let bucket = it.next().unwrap_or_default().to_string();
    let prefix = it.next().unwrap_or_default().trim_matches('/').to_string();
    (bucket, prefix)
}

fn client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_timeout(Duration::from_secs(60))
        .with_connect_timeout(Duration::from_secs(10))
}

fn store_retry() -> object_store::RetryConfig {
    // Our RetryStore does the patient retrying; keep the client's own loop short.
    object_store::RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(20), ..Default::default() }
}

fn open_backend(location: &str, opts: &StoreOptions) -> Result<ObjectStoreBackend> {
    let bad = |e: object_store::Error| Error::InvalidArgument(format!("repository {location}: {e}"));
    if let Some(rest) = location.strip_prefix("s3://") {
        let (bucket, prefix) = split_bucket(rest);
        let mut b = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_client_options(client_options())
            .with_retry(store_retry());
        let endpoint = opts.s3_endpoint.clone().or_else(|| std::env::var("HOARD_S3_ENDPOINT").ok());
        if let Some(ep) = &endpoint {
            b = b.with_endpoint(ep);
        }
        let effective =
            endpoint.or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()).or_else(|| std::env::var("AWS_ENDPOINT").ok());
        if effective.as_deref().is_some_and(|e| e.starts_with("http://")) {
            b = b.with_allow_http(true);
        }
        if let Some(r) = &opts.s3_region {
            b = b.with_region(r);
        } else if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            b = b.with_region("us-east-1");
        }
        let s = b.build().map_err(bad)?;
        return Ok(ObjectStoreBackend::new(Arc::new(s), &prefix, location.to_string()));
    }
    if let Some(rest) = location.strip_prefix("gs://") {
        let (bucket, prefix) = split_bucket(rest);
        let s = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(&bucket)
            .with_client_options(client_options())
            .with_retry(store_retry())
            .build()
            .map_err(bad)?;
        return Ok(ObjectStoreBackend::new(Arc::new(s), &prefix, location.to_string()));
    }
    if let Some(rest) = location.strip_prefix("az://") {
        let (container, prefix) = split_bucket(rest);
        let s = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_container_name(&container)
            .with_client_options(client_options())
            .with_retry(store_retry())
            .build()
            .map_err(bad)?;
        return Ok(ObjectStoreBackend::new(Arc::new(s), &prefix, location.to_string()));
    }
    if location == "memory:" {
        return Ok(ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "", location.to_string()));
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    if path.contains("://") {
        return Err(Error::InvalidArgument(format!("unsupported repository scheme in {location}")));
    }
    let dir = std::path::Path::new(path);
    if opts.create_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {path}"), e))?;
    }
    if !dir.is_dir() {
        return Err(Error::RepositoryNotFound(location.to_string()));
    }
    let abs = std::fs::canonicalize(dir).map_err(|e| Error::io(format!("resolve {path}"), e))?;
    // fsync files and their directories: the write order (packs, index, snapshot) must survive
    // a power loss, not only a crash of the process.
    let s = object_store::local::LocalFileSystem::new_with_prefix(&abs).map_err(bad)?.with_fsync(true);
    Ok(ObjectStoreBackend::new(Arc::new(s), "", abs.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_is_create_only_and_list_is_relative() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
        s.put("packs/ab/abc", Bytes::from_static(b"x")).await.unwrap();
        assert!(matches!(s.put("packs/ab/abc", Bytes::from_static(b"y")).await, Err(Error::AlreadyExists(_))));
        assert_eq!(s.get("packs/ab/abc").await.unwrap(), Bytes::from_static(b"x"));
        let l = s.list("packs/").await.unwrap();
        assert_eq!(l, vec![ObjectInfo { key: "packs/ab/abc".into(), size: 1 }]);
        assert!(matches!(s.get("nope").await, Err(Error::ObjectNotFound(_))));
        s.delete("packs/ab/abc").await.unwrap();
        assert!(s.list("packs/").await.unwrap().is_empty());
    }
}
