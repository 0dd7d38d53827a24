//! The storage abstraction: one small trait over `object_store`, and decorators around it.
//!
//! Guarantees callers rely on:
//! * `put` never overwrites: an existing key yields [`Error::AlreadyExists`]. Object names are
//!   content hashes, so a retried or duplicated `put` is harmless.
//! * A `put` that returns `Ok` is complete; readers never see a partial object (object stores
//!   commit whole objects; the filesystem backend writes a temporary file and renames it).
//! * Errors carry a [`Class`]: throttling, timeouts and 5xx answers are retryable; a full
//!   local filesystem (`ENOSPC`, `EDQUOT`) is a permanent I/O error ([`Error::is_no_space`]).
//!
//! * On the local filesystem, [`Store::get_ranges_once`] (a restore's pack reads) bypasses the
//!   page cache for large spans ([`crate::directread`]); everything else goes through
//!   `object_store` and the page cache.
//!
//! Decorators: [`RetryStore`] (bounded exponential backoff with jitter and an overall deadline),
//! [`crate::cache::CacheStore`] (local copies of a remote repository's index files and
//! snapshots), and in tests a fault injector (see `faults`).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use zeroize::{Zeroize, ZeroizeOnDrop};

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
    /// Stores a new object made of `parts` in order, like [`Store::put`] of their concatenation.
    /// Backends send or write the parts as they are (no joined copy); the default joins them.
    async fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        self.put(key, Bytes::from(parts.concat())).await
    }
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
    /// [`Store::get_ranges`] of bytes the caller reads once (a restore's pack data): backends
    /// may bypass their caches. Decorators forward it; the default is `get_ranges`.
    async fn get_ranges_once(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.get_ranges(key, ranges).await
    }
    /// Like [`Store::get_ranges`], for ranges of a pack that hold repository metadata (tree
    /// blobs): a cache decorator keeps them, every other decorator passes the call on.
    async fn get_metadata_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.get_ranges(key, ranges).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    async fn delete(&self, key: &str) -> Result<()>;
    /// Where the repository lives, without credentials.
    fn location(&self) -> String;
    /// The local file that is the object `key`, for a store that keeps objects as files on
    /// this machine and lets a writer publish one itself ([`crate::spool`]). `None`, the
    /// default, sends every write through [`Store::put_parts`]: decorators that must see each
    /// write's bytes (fault injection) keep it; others forward it, and gate such writes in
    /// [`Store::admit_local_write`].
    fn local_file(&self, _key: &str) -> Option<std::path::PathBuf> {
        None
    }
    /// Called before a writer publishes `len` bytes at [`Store::local_file`]`(key)` itself,
    /// bypassing `put_parts`: an error stops the write, a delay holds it. Decorators that gate
    /// writes (cancellation, rate limits) do here what they do in `put_parts`; forwarding ones
    /// forward. The default admits at once.
    async fn admit_local_write(&self, _key: &str, _len: u64) -> Result<()> {
        Ok(())
    }
}

/// A [`Store`] over any `object_store` implementation.
pub struct ObjectStoreBackend {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    location: String,
    /// The directory `inner` keeps its objects in, when it is the local filesystem: ranged reads
    /// of bytes read once are then done here, the large ones bypassing the page cache
    /// ([`crate::directread`]).
    local_root: Option<std::path::PathBuf>,
}

impl fmt::Debug for ObjectStoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectStoreBackend({})", self.location)
    }
}

fn classify(op: &'static str, key: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    // A full local filesystem: permanent, not a flaky store, and reported as such.
    if let Some(full) = crate::error::no_space_in(&e) {
        return Error::io(format!("storage {op} {key}"), full);
    }
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
        ObjectStoreBackend { inner, prefix, location, local_root: None }
    }

    /// Declares that `inner` is the local filesystem rooted at `root` (see `local_root`).
    pub fn with_local_root(mut self, root: std::path::PathBuf) -> Self {
        self.local_root = Some(root);
        self
    }

    /// Where a key lives on the local filesystem, for keys made only of plain names (every key
    /// hoard writes); `None` sends the request through `object_store`.
    fn local_path(&self, key: &str) -> Option<std::path::PathBuf> {
        let root = self.local_root.as_ref()?;
        let full = self.path(key);
        let plain = full.as_ref().split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        });
        plain.then(|| root.join(full.as_ref()))
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

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.inner
            .put_opts(&self.path(key), parts.into_iter().collect::<PutPayload>(), opts)
            .await
            .map(|_| ())
            .map_err(|e| classify("put", key, e))
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let r = self.inner.get(&self.path(key)).await.map_err(|e| classify("get", key, e))?;
        r.bytes().await.map_err(|e| classify("get", key, e))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path(key);
        match self.inner.get_range(&path, range.clone()).await {
            Ok(b) => Ok(b),
            // An empty object has no byte 0, so backends refuse any range of it; a bounded read
            // from the start of it is empty, not a storage failure.
            Err(e) if range.start == 0 && !matches!(e, object_store::Error::NotFound { .. }) => {
                match self.inner.head(&path).await {
                    Ok(meta) if meta.size == 0 => Ok(Bytes::new()),
                    _ => Err(classify("get", key, e)),
                }
            }
            Err(e) => Err(classify("get", key, e)),
        }
    }

    async fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(&self.path(key), ranges).await.map_err(|e| classify("get", key, e))
    }

    async fn get_ranges_once(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        if let Some(path) = self.local_path(key) {
            let ranges = ranges.to_vec();
            let read = tokio::task::spawn_blocking(move || crate::directread::read_ranges(&path, &ranges))
                .await
                .map_err(|e| Error::Internal(format!("ranged read of {key}: {e}")))?;
            return read.map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::ObjectNotFound(key.to_string()),
                _ => Error::io(format!("read {key}"), e),
            });
        }
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

    fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        self.local_path(key)
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
        self.put_parts(key, vec![data]).await
    }

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        let mut first = true;
        self.run(|| {
            let retry = !first;
            first = false;
            let parts = parts.clone();
            async move {
                match self.inner.put_parts(key, parts).await {
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

    async fn get_ranges_once(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.run(|| self.inner.get_ranges_once(key, ranges)).await
    }

    async fn get_metadata_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.run(|| self.inner.get_metadata_ranges(key, ranges)).await
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

    fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        self.inner.local_file(key)
    }

    async fn admit_local_write(&self, key: &str, len: u64) -> Result<()> {
        self.inner.admit_local_write(key, len).await
    }
}

#[async_trait]
impl Store for Arc<dyn Store> {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        (**self).put(key, data).await
    }
    async fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        (**self).put_parts(key, parts).await
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
    async fn get_ranges_once(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        (**self).get_ranges_once(key, ranges).await
    }
    async fn get_metadata_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        (**self).get_metadata_ranges(key, ranges).await
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
    fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        (**self).local_file(key)
    }
    async fn admit_local_write(&self, key: &str, len: u64) -> Result<()> {
        (**self).admit_local_write(key, len).await
    }
}

/// Explicit object-store credentials (e.g. from a Kubernetes Secret), used instead of the
/// process environment for locations of their provider (`scheme()`).
///
/// With a secret (access key, SAS token, service account key) the client is built from these
/// values alone (`::new()`), ignoring the environment. Without one (`S3`/`Azure` with every secret
/// `None`), the ambient credential chain of the environment signs the requests (web identity,
/// instance metadata, …) and only the settings given here (endpoint, region, account) apply.
///
/// `Debug` shows no secret; every value is overwritten in memory when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub enum Credentials {
    /// `s3://` locations.
    S3 {
        /// e.g. `http://minio.minio:9000`; `None` = AWS. An `http://` endpoint allows plain HTTP.
        endpoint: Option<String>,
        /// `None` = `us-east-1`.
        region: Option<String>,
        access_key_id: Option<String>,
        secret_access_key: Option<String>,
        session_token: Option<String>,
    },
    /// `az://` locations.
    Azure {
        /// The storage account.
        account: String,
        /// A shared key (base64), as the portal shows it.
        access_key: Option<String>,
        /// A SAS token (`sv=…&sig=…`, a leading `?` is fine); used when there is no access key.
        sas_token: Option<String>,
        /// For Azure Stack or an emulator, e.g. `http://127.0.0.1:10000/devstoreaccount1`; `None`
        /// = `https://<account>.blob.core.windows.net`. An `http://` endpoint allows plain HTTP.
        endpoint: Option<String>,
    },
    /// `gs://` locations.
    Gcs {
        /// A service account key file's content (JSON).
        service_account_json: String,
    },
}

impl Credentials {
    /// The location prefix these credentials are for: `s3://`, `az://` or `gs://`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Credentials::S3 { .. } => "s3://",
            Credentials::Azure { .. } => "az://",
            Credentials::Gcs { .. } => "gs://",
        }
    }

    fn provider(&self) -> &'static str {
        match self {
            Credentials::S3 { .. } => "S3",
            Credentials::Azure { .. } => "Azure",
            Credentials::Gcs { .. } => "GCS",
        }
    }

    /// The secret values (for scrubbing error text).
    fn secrets(&self) -> Vec<&str> {
        let v: Vec<Option<&str>> = match self {
            Credentials::S3 { access_key_id, secret_access_key, session_token, .. } => {
                vec![access_key_id.as_deref(), secret_access_key.as_deref(), session_token.as_deref()]
            }
            Credentials::Azure { access_key, sas_token, .. } => vec![access_key.as_deref(), sas_token.as_deref()],
            Credentials::Gcs { service_account_json } => vec![Some(service_account_json.as_str())],
        };
        v.into_iter().flatten().filter(|s| !s.is_empty()).collect()
    }

    /// Replaces every secret value that occurs in `text`.
    fn scrub(&self, text: String) -> String {
        self.secrets().into_iter().fold(text, |t, s| t.replace(s, "<redacted>"))
    }
}

fn redacted(s: &Option<String>) -> &'static str {
    if s.is_some() { "<redacted>" } else { "<none>" }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::S3 { endpoint, region, access_key_id, secret_access_key, session_token } => f
                .debug_struct("S3")
                .field("endpoint", endpoint)
                .field("region", region)
                .field("access_key_id", &redacted(access_key_id))
                .field("secret_access_key", &redacted(secret_access_key))
                .field("session_token", &redacted(session_token))
                .finish(),
            Credentials::Azure { account, access_key, sas_token, endpoint } => f
                .debug_struct("Azure")
                .field("account", account)
                .field("access_key", &redacted(access_key))
                .field("sas_token", &redacted(sas_token))
                .field("endpoint", endpoint)
                .finish(),
            Credentials::Gcs { .. } => f.debug_struct("Gcs").field("service_account_json", &"<redacted>").finish(),
        }
    }
}

/// Options for opening a store from a location string.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// S3 endpoint (e.g. a local S3-compatible server); otherwise taken from
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT`. Not used with [`Credentials::S3`], which names its
    /// own endpoint.
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    /// Create the directory of a filesystem repository if missing.
    pub create_dir: bool,
    pub retry: Option<RetryPolicy>,
    /// Explicit credentials instead of the environment's; they must be of the location's
    /// provider (otherwise opening fails with [`Error::InvalidArgument`]).
    pub credentials: Option<Credentials>,
}

const REMOTE_SCHEMES: [(&str, Provider); 3] =
    [("s3://", Provider::S3), ("gs://", Provider::Gcs), ("az://", Provider::Azure)];

/// Whether `location` names an object store over the network (S3, GCS, Azure), where a local
/// [`crate::cache::CacheStore`] saves requests.
pub fn is_remote(location: &str) -> bool {
    REMOTE_SCHEMES.iter().any(|(scheme, _)| location.starts_with(scheme))
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

#[derive(Debug, Clone, Copy)]
enum Provider {
    S3,
    Gcs,
    Azure,
}

/// A non-empty value.
fn given(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// The object store of `provider` with the process's ambient configuration (`from_env()`).
fn object_store_from_env(
    provider: Provider,
    bucket: &str,
    opts: &StoreOptions,
) -> object_store::Result<Arc<dyn ObjectStore>> {
    Ok(match provider {
        Provider::S3 => {
            let endpoint = opts.s3_endpoint.clone().or_else(|| std::env::var("HOARD_S3_ENDPOINT").ok());
            Arc::new(
                s3_builder(
                    object_store::aws::AmazonS3Builder::from_env(),
                    bucket,
                    endpoint,
                    opts.s3_region.clone(),
                    true,
                )
                .build()?,
            )
        }
        Provider::Gcs => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_client_options(client_options().with_allow_http(
                    std::env::var("GOOGLE_SERVICE_ACCOUNT_KEY").is_ok_and(|k| gcs_base_url_is_http(&k)),
                ))
                .with_retry(store_retry())
                .build()?,
        ),
        Provider::Azure => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(bucket)
                .with_client_options(client_options())
                .with_retry(store_retry())
                .build()?,
        ),
    })
}

/// Whether a GCS service account key names a plain-HTTP `gcs_base_url` (an emulator such as
/// fake-gcs-server, reached with `disable_oauth`): then, and only then, HTTP is allowed.
fn gcs_base_url_is_http(key_json: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Key {
        gcs_base_url: Option<String>,
    }
    serde_json::from_str::<Key>(key_json).ok().and_then(|k| k.gcs_base_url).is_some_and(|u| u.starts_with("http://"))
}

/// Bucket, endpoint (`http://` allows plain HTTP) and region on an S3 builder. `ambient`: the
/// builder came from the environment, whose endpoint and region count when none is given.
fn s3_builder(
    b: object_store::aws::AmazonS3Builder,
    bucket: &str,
    endpoint: Option<String>,
    region: Option<String>,
    ambient: bool,
) -> object_store::aws::AmazonS3Builder {
    let mut b = b.with_bucket_name(bucket).with_client_options(client_options()).with_retry(store_retry());
    if let Some(ep) = &endpoint {
        b = b.with_endpoint(ep);
    }
    let env = |k: &str| if ambient { std::env::var(k).ok() } else { None };
    let effective = endpoint.or_else(|| env("AWS_ENDPOINT_URL")).or_else(|| env("AWS_ENDPOINT"));
    if effective.as_deref().is_some_and(|e| e.starts_with("http://")) {
        b = b.with_allow_http(true);
    }
    if let Some(r) = &region {
        b = b.with_region(r);
    } else if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
        b = b.with_region("us-east-1");
    }
    b
}

/// The object store for explicit credentials (the caller checked that they fit the location's
/// scheme). Errors may quote what the builder says: the caller scrubs the secrets.
fn object_store_with(bucket: &str, creds: &Credentials, opts: &StoreOptions) -> Result<Arc<dyn ObjectStore>> {
    let bad = |e: object_store::Error| Error::InvalidArgument(e.to_string());
    let invalid = |m: &str| Error::InvalidArgument(m.to_string());
    match creds {
        Credentials::S3 { endpoint, region, access_key_id, secret_access_key, session_token } => {
            let (base, ambient) = match (given(access_key_id), given(secret_access_key)) {
                (Some(id), Some(secret)) => {
                    let mut b =
                        object_store::aws::AmazonS3Builder::new().with_access_key_id(id).with_secret_access_key(secret);
                    if let Some(t) = given(session_token) {
                        b = b.with_token(t);
                    }
                    (b, false)
                }
                // No key: the ambient chain signs (web identity, container or instance metadata).
                (None, None) if given(session_token).is_none() => {
                    (object_store::aws::AmazonS3Builder::from_env(), true)
                }
                _ => return Err(invalid("S3 credentials need both an access key id and a secret access key")),
            };
            let endpoint = given(endpoint).map(str::to_string);
            let region =
                given(region).map(str::to_string).or_else(|| if ambient { opts.s3_region.clone() } else { None });
            let b = s3_builder(base, bucket, endpoint, region, ambient);
            Ok(Arc::new(b.build().map_err(bad)?))
        }
        Credentials::Azure { account, access_key, sas_token, endpoint } => {
            if account.is_empty() {
                return Err(invalid("Azure credentials name no storage account"));
            }
            let (key, sas) = (given(access_key), given(sas_token));
            let mut b = if key.is_some() || sas.is_some() {
                object_store::azure::MicrosoftAzureBuilder::new()
            } else {
                // No secret: the ambient chain (workload identity, managed identity) signs.
                object_store::azure::MicrosoftAzureBuilder::from_env()
            };
            let endpoint = given(endpoint);
            let http = endpoint.is_some_and(|e| e.starts_with("http://"));
            b = b
                .with_account(account)
                .with_container_name(bucket)
                .with_client_options(client_options().with_allow_http(http))
                .with_retry(store_retry());
            if let Some(ep) = endpoint {
                b = b.with_endpoint(ep.to_string());
            }
            if let Some(k) = key {
                b = b.with_access_key(k);
            } else if let Some(s) = sas {
                b = b.with_config(object_store::azure::AzureConfigKey::SasKey, s);
            }
            Ok(Arc::new(b.build().map_err(bad)?))
        }
        Credentials::Gcs { service_account_json } => {
            if service_account_json.trim().is_empty() {
                return Err(invalid("the GCS service account key is empty"));
            }
            if bucket.is_empty() {
                return Err(invalid("the location names no bucket"));
            }
            // The key is parsed here (JSON, then its PEM private key); the parser's own message
            // could quote part of the key, so it is not passed on.
            let http = gcs_base_url_is_http(service_account_json);
            let s = object_store::gcp::GoogleCloudStorageBuilder::new()
                .with_service_account_key(service_account_json.as_str())
                .with_bucket_name(bucket)
                .with_client_options(client_options().with_allow_http(http))
                .with_retry(store_retry())
                .build()
                .map_err(|_| {
                    invalid("the GCS service account key is not a usable service account key file (JSON with client_email and a PEM private_key)")
                })?;
            Ok(Arc::new(s))
        }
    }
}

/// Whether a repository location names a directory (a path or `file://`), not an object store.
pub fn is_filesystem_location(location: &str) -> bool {
    location.strip_prefix("file://").unwrap_or(location).starts_with('/') || !location.contains(':')
}

fn store_retry() -> object_store::RetryConfig {
    // Our RetryStore does the patient retrying; keep the client's own loop short.
    object_store::RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(20), ..Default::default() }
}

fn open_backend(location: &str, opts: &StoreOptions) -> Result<ObjectStoreBackend> {
    let bad = |e: object_store::Error| Error::InvalidArgument(format!("repository {location}: {e}"));
    if let Some(c) = &opts.credentials
        && !location.starts_with(c.scheme())
    {
        return Err(Error::InvalidArgument(format!(
            "repository {location}: {} credentials do not fit this location (they are for {} locations)",
            c.provider(),
            c.scheme()
        )));
    }
    let remote = REMOTE_SCHEMES.into_iter().find_map(|(scheme, p)| location.strip_prefix(scheme).map(|rest| (p, rest)));
    if let Some((provider, rest)) = remote {
        let (bucket, prefix) = split_bucket(rest);
        let inner = match opts.credentials.as_ref() {
            Some(c) => object_store_with(&bucket, c, opts).map_err(|e| {
                let message = match e {
                    Error::InvalidArgument(m) => m,
                    other => other.to_string(),
                };
                // Builder errors name no secret as far as we know; make sure of it.
                Error::InvalidArgument(c.scrub(format!("repository {location}: {message}")))
            })?,
            None => object_store_from_env(provider, &bucket, opts).map_err(bad)?,
        };
        return Ok(ObjectStoreBackend::new(inner, &prefix, location.to_string()));
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
    Ok(ObjectStoreBackend::new(Arc::new(s), "", abs.display().to_string()).with_local_root(abs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_local_filesystem_is_a_permanent_no_space_error() {
        let e = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from_raw_os_error(libc::ENOSPC)),
        };
        let e = classify("put", "packs/ab", e);
        assert!(e.is_no_space(), "{e:?}");
        assert!(!e.is_retryable());
        let flaky = object_store::Error::Generic { store: "S3", source: "connection reset".into() };
        assert!(classify("put", "packs/ab", flaky).is_retryable());
    }

    #[tokio::test]
    async fn ranges_read_once_are_the_ranges_read_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_store(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        s.put("packs/ab/abcd", Bytes::from(data)).await.unwrap();
        // One span large enough to bypass the page cache, one small, one empty range.
        let ranges = [10..1_500_000, 2_999_000..3_000_000, 5..5, 1_499_990..1_500_010];
        assert_eq!(
            s.get_ranges_once("packs/ab/abcd", &ranges).await.unwrap(),
            s.get_ranges("packs/ab/abcd", &ranges).await.unwrap()
        );
        let first_byte = 0..1;
        let missing = s.get_ranges_once("packs/ab/none", std::slice::from_ref(&first_byte)).await;
        assert!(matches!(missing, Err(Error::ObjectNotFound(_))));
        let across_end = 2_999_999..3_000_001;
        let past_end = s.get_ranges_once("packs/ab/abcd", std::slice::from_ref(&across_end)).await.unwrap_err();
        assert!(!past_end.is_retryable(), "a short pack is not retried: {past_end}");
    }

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

    #[test]
    fn filesystem_locations_are_told_apart() {
        for l in ["/srv/repo", "file:///srv/repo", "repo", "./repo"] {
            assert!(is_filesystem_location(l), "{l}");
        }
        for l in ["s3://b/p", "gs://b", "az://c/p", "memory:"] {
            assert!(!is_filesystem_location(l), "{l}");
        }
    }

    #[tokio::test]
    async fn put_parts_stores_the_concatenation_and_is_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let parts = || vec![Bytes::from_static(b"ab"), Bytes::new(), Bytes::from(vec![b'c'; 5000])];
        let whole: Vec<u8> = parts().concat();
        let fs = open_store(dir.path().to_str().unwrap(), &StoreOptions::default()).unwrap();
        let mem = open_store("memory:", &StoreOptions::default()).unwrap();
        for s in [fs, mem] {
            s.put_parts("packs/ab/abd", parts()).await.unwrap();
            assert_eq!(&s.get("packs/ab/abd").await.unwrap()[..], &whole[..], "{}", s.location());
            assert!(matches!(s.put_parts("packs/ab/abd", parts()).await, Err(Error::AlreadyExists(_))));
            // Through the retry decorator too.
            let retry = RetryStore::new(Arc::clone(&s), RetryPolicy::default());
            retry.put_parts("packs/ab/abe", parts()).await.unwrap();
            assert_eq!(&s.get("packs/ab/abe").await.unwrap()[..], &whole[..]);
        }
    }

    /// A loopback HTTP server that answers every request 404 and reports each request head.
    fn not_found_server() -> (String, std::sync::mpsc::Receiver<String>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                if tx.send(head).is_err() {
                    return;
                }
            }
        });
        (url, rx)
    }

    fn with_creds(c: Credentials) -> StoreOptions {
        StoreOptions { credentials: Some(c), ..Default::default() }
    }

    fn s3_creds(endpoint: &str) -> Credentials {
        Credentials::S3 {
            endpoint: Some(endpoint.into()),
            region: Some("eu-west-3".into()),
            access_key_id: Some("AKIDEXPLICIT".into()),
            secret_access_key: Some("s3-secret-value".into()),
            session_token: Some("s3-session-token".into()),
        }
    }

    #[test]
    fn debug_redacts_every_secret() {
        let all = [
            s3_creds("http://127.0.0.1:9000"),
            Credentials::Azure {
                account: "acct".into(),
                access_key: Some("azure-key-value".into()),
                sas_token: Some("sv=2024&sig=azure-sas-value".into()),
                endpoint: None,
            },
            Credentials::Gcs { service_account_json: r#"{"private_key": "gcs-private-value"}"#.into() },
        ];
        let opts = with_creds(all[0].clone());
        let shown = format!("{all:?} {all:#?} {opts:?}");
        for secret in
            ["AKIDEXPLICIT", "s3-secret-value", "s3-session-token", "azure-key-value", "azure-sas-value", "gcs-private"]
        {
            assert!(!shown.contains(secret), "{secret} leaked in {shown}");
        }
        assert!(shown.contains("eu-west-3") && shown.contains("acct") && shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn credentials_of_another_provider_are_refused() {
        let gcs = Credentials::Gcs { service_account_json: "{}".into() };
        for (location, creds) in [
            ("s3://bucket/p", gcs.clone()),
            ("az://container/p", s3_creds("http://127.0.0.1:1")),
            (
                "gs://bucket",
                Credentials::Azure { account: "a".into(), access_key: None, sas_token: None, endpoint: None },
            ),
            ("/tmp", gcs.clone()),
            ("memory:", gcs),
        ] {
            let e = open_store(location, &with_creds(creds)).expect_err(location);
            assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("do not fit")), "{location}: {e}");
        }
    }

    /// Explicit S3 credentials: requests go to their endpoint (plain HTTP allowed), signed with
    /// their key for their region, whatever the environment says.
    #[tokio::test]
    async fn s3_credentials_sign_requests_to_their_endpoint() {
        let (url, heads) = not_found_server();
        let s = open_store("s3://bucket/pre/fix", &with_creds(s3_creds(&url))).unwrap();
        assert!(matches!(s.get("config").await, Err(Error::ObjectNotFound(_))));
        let head = heads.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(head.starts_with("GET /bucket/pre/fix/config "), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("credential=akidexplicit/") && lower.contains("/eu-west-3/s3/aws4_request"), "{head}");
        assert!(lower.contains("x-amz-security-token: s3-session-token"), "{head}");
        // A key id without its secret is refused, naming neither.
        let half = Credentials::S3 {
            endpoint: None,
            region: None,
            access_key_id: Some("AKIDHALF".into()),
            secret_access_key: None,
            session_token: None,
        };
        let e = open_store("s3://bucket", &with_creds(half)).expect_err("half a key");
        assert!(matches!(&e, Error::InvalidArgument(m) if !m.contains("AKIDHALF")), "{e}");
    }

    /// Explicit Azure credentials: shared-key signed requests to the endpoint override (path
    /// style, as Azurite and Azure Stack take them); a SAS token travels as the query.
    #[tokio::test]
    async fn azure_credentials_sign_requests_to_their_endpoint() {
        let (url, heads) = not_found_server();
        let key = Credentials::Azure {
            account: "acct".into(),
            access_key: Some("a2V5LWJ5dGVzLWZvci10ZXN0cw==".into()),
            sas_token: None,
            endpoint: Some(format!("{url}/acct")),
        };
        let s = open_store("az://container/pre", &with_creds(key)).unwrap();
        assert!(matches!(s.get("config").await, Err(Error::ObjectNotFound(_))));
        let head = heads.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(head.starts_with("GET /acct/container/pre/config "), "{head}");
        assert!(head.to_ascii_lowercase().contains("authorization: sharedkey acct:"), "{head}");

        let sas = Credentials::Azure {
            account: "acct".into(),
            access_key: None,
            sas_token: Some("?sv=2024-01-01&sp=rl&sig=c2lnbmF0dXJl".into()),
            endpoint: Some(format!("{url}/acct")),
        };
        let s = open_store("az://container", &with_creds(sas)).unwrap();
        assert!(matches!(s.get("config").await, Err(Error::ObjectNotFound(_))));
        let head = heads.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(head.starts_with("GET /acct/container/config?") && head.contains("sig=c2lnbmF0dXJl"), "{head}");

        // A key that is not base64: refused, and the message does not quote it.
        let broken = Credentials::Azure {
            account: "acct".into(),
            access_key: Some("not base64 at all!".into()),
            sas_token: None,
            endpoint: None,
        };
        let e = open_store("az://container", &with_creds(broken)).expect_err("bad key");
        assert!(matches!(&e, Error::InvalidArgument(m) if !m.contains("not base64 at all")), "{e}");
        let nobody = Credentials::Azure { account: String::new(), access_key: None, sas_token: None, endpoint: None };
        assert!(matches!(open_store("az://container", &with_creds(nobody)), Err(Error::InvalidArgument(_))));
    }

    /// GCS builder: a service account key is taken from the credentials (never from the
    /// environment), and a bad one is refused without quoting it; plain HTTP only for a key
    /// that names an `http://` emulator. (Round trips against fake-gcs-server: the CLI's and the
    /// agent's tests.)
    #[test]
    fn gcs_credentials_build_from_the_key() {
        // `disable_oauth` spares the test a real RSA key; the JSON is otherwise a key file's.
        let key = r#"{"private_key": "", "private_key_id": "kid", "client_email": "sa@p.iam.gserviceaccount.com",
                      "disable_oauth": true, "gcs_base_url": "https://127.0.0.1:1"}"#;
        let s = open_store("gs://bucket/pre", &with_creds(Credentials::Gcs { service_account_json: key.into() }))
            .expect("builds");
        assert_eq!(s.location(), "gs://bucket/pre");
        assert!(!gcs_base_url_is_http(key));
        assert!(gcs_base_url_is_http(&key.replace("https://", "http://")));
        assert!(!gcs_base_url_is_http("not json"));
        for bad in [r#"{"private_key": "gcs-secret-material"}"#, "gcs-secret-material", "  "] {
            let e = open_store("gs://bucket", &with_creds(Credentials::Gcs { service_account_json: bad.into() }))
                .expect_err(bad);
            assert!(matches!(&e, Error::InvalidArgument(m) if !m.contains("gcs-secret-material")), "{e}");
        }
    }

    #[test]
    fn credentials_are_zeroized() {
        let mut c = s3_creds("http://127.0.0.1:9000");
        c.zeroize();
        let Credentials::S3 { secret_access_key, access_key_id, .. } = &c else { panic!("variant") };
        assert!(secret_access_key.is_none() && access_key_id.is_none());
    }
}
