//! A repository: the store, its keys and parameters, and the merged index.
//!
//! Object layout under the repository root:
//! `config`, `keys/<id>`, `packs/<xx>/<id>`, `index/<id>`, `snapshots/<id>`, `locks/<id>`.
//! Every object name except `config` is the BLAKE3 of the object's stored bytes, so objects are
//! immutable and a damaged object is recognisable by its name alone.
//!
//! Loading is tolerant of damage where that is safe: [`Repository::load_index`] and
//! [`Repository::list_snapshots`] skip a damaged or vanished index or snapshot object (a
//! warning; [`Repository::damaged`] lists them), so one bad object does not block restoring the
//! rest. The `_strict` variants fail instead, for prune, which deletes what they do not name.

use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::chunker::{Chunker, ChunkerParams, LargeFileChunking};
use crate::crypto::{KdfParams, KeySlot, Keys, SealType, SecretKey};
use crate::error::{Error, ObjectKind, Result};
use crate::id::Id;
use crate::index::{IndexFile, MasterIndex};
use crate::pack::{BlobType, Compression};
use crate::snapshot::Snapshot;
use crate::store::{ObjectInfo, Store};
use crate::tree::Tree;

pub const FORMAT_VERSION: u32 = 1;
const MAX_CONFIG_LEN: usize = 64 * 1024;
const MAX_KEY_LEN: usize = 64 * 1024;
const LIST_CONCURRENCY: usize = 16;

/// A password, wiped from memory when dropped.
#[derive(Clone)]
pub struct Password(Zeroizing<Vec<u8>>);

impl Password {
    pub fn new(p: impl Into<Vec<u8>>) -> Self {
        Password(Zeroizing::new(p.into()))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

/// Repository parameters chosen at `init`; sealed inside `config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoParams {
    pub chunker: ChunkerParams,
    /// Target pack size in bytes.
    pub pack_size: u32,
    /// zstd level for blobs; 0 turns compression off.
    pub compression_level: i32,
    /// Finer chunking for large files (absent in repositories made before it existed, which
    /// chunk every file with `chunker`; hoard versions that do not know the field ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub large_files: Option<LargeFileChunking>,
}

impl RepoParams {
    /// Decodes the parameters sealed in `config` (JSON) and validates them.
    pub fn decode(json: &[u8]) -> Result<RepoParams> {
        let params: RepoParams = serde_json::from_slice(json)
            .map_err(|e| Error::corrupt(ObjectKind::Config, "config", format!("parameters: {e}")))?;
        params.validate().map_err(|e| Error::corrupt(ObjectKind::Config, "config", e.to_string()))?;
        Ok(params)
    }

    pub fn validate(&self) -> Result<()> {
        self.chunker.validate()?;
        if let Some(l) = &self.large_files {
            l.validate()?;
        }
        if !(1024 * 1024..=512 * 1024 * 1024).contains(&self.pack_size) {
            return Err(Error::InvalidArgument("pack size must be between 1 MiB and 512 MiB".into()));
        }
        if !(0..=22).contains(&self.compression_level) {
            return Err(Error::InvalidArgument("compression level must be between 0 (off) and 22".into()));
        }
        Ok(())
    }
}

impl Default for RepoParams {
    fn default() -> Self {
        let chunker = ChunkerParams::default();
        RepoParams {
            chunker,
            pack_size: 16 * 1024 * 1024,
            compression_level: 1,
            large_files: LargeFileChunking::default_for(&chunker),
        }
    }
}

/// The public part of `config`: format version and repository id, plus the sealed parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigFile {
    pub version: u32,
    pub id: Id,
    #[serde(with = "crate::crypto::hex_bytes")]
    pub sealed: Vec<u8>,
}

impl ConfigFile {
    /// Decodes `config` as read from the store: at most 64 KiB, this format version, and
    /// exactly the canonical bytes hoard writes (anything else is damage or tampering).
    pub fn decode(raw: &[u8]) -> Result<ConfigFile> {
        if raw.len() > MAX_CONFIG_LEN {
            return Err(Error::corrupt(ObjectKind::Config, "config", "too large"));
        }
        let config: ConfigFile = serde_json::from_slice(raw).map_err(|e| {
            // A config from a newer format may not parse; report the version if it is readable.
            if let Some(v) = serde_json::from_slice::<serde_json::Value>(raw)
                .ok()
                .and_then(|v| v.get("version").and_then(|v| v.as_u64()))
                && v != FORMAT_VERSION as u64
            {
                return Error::UnsupportedVersion {
                    found: u32::try_from(v).unwrap_or(u32::MAX),
                    supported: FORMAT_VERSION,
                };
            }
            Error::corrupt(ObjectKind::Config, "config", format!("undecodable: {e}"))
        })?;
        if config.version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { found: config.version, supported: FORMAT_VERSION });
        }
        if config.encode().ok().as_deref() != Some(raw) {
            return Err(Error::corrupt(ObjectKind::Config, "config", "not in canonical form (damaged or edited)"));
        }
        Ok(config)
    }

    /// The canonical bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(e.to_string()))
    }
}

#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    pub params: RepoParams,
    pub kdf: KdfParams,
    /// Accept a key slot below [`KdfParams::MIN_NEW_COST`] (tests, throwaway repositories).
    pub allow_weak_kdf: bool,
}

pub fn pack_key(id: &Id) -> String {
    let h = id.to_hex();
    format!("packs/{}/{h}", &h[..2])
}

/// An open repository. Shared between threads as `Arc<Repository>`.
pub struct Repository {
    store: Arc<dyn Store>,
    keys: Arc<Keys>,
    id: Id,
    params: RepoParams,
    key_id: Id,
    index: RwLock<MasterIndex>,
    damaged: Mutex<Vec<Damaged>>,
}

/// An object a tolerant load skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    /// E.g. `index/ab12…` or `snapshots/cd34…`.
    pub object: String,
    pub reason: String,
}

/// Good objects, and damaged ones named `dir/<id>` with their error.
type Split<T> = (Vec<(Id, T)>, Vec<(String, Error)>);

/// The index files readers use, in id order: a file superseded by another present file (written
/// by prune or repair) is left out, its content being in the newer one, which may have dropped
/// deleted packs. Id order gives a deterministic "first copy wins" whatever the download order.
fn current_files(mut files: Vec<(Id, IndexFile)>) -> Vec<(Id, IndexFile)> {
    let superseded: std::collections::HashSet<Id> =
        files.iter().flat_map(|(_, f)| f.supersedes.iter().copied()).collect();
    files.retain(|(id, _)| !superseded.contains(id));
    files.sort_by_key(|(id, _)| *id);
    files
}

/// Splits loaded objects into the good ones and the damaged or vanished ones (named
/// `dir/<id>`); any other error (the store failing) is returned.
fn split_damaged<T>(loaded: Vec<(Id, Result<T>)>, dir: &str) -> Result<Split<T>> {
    let mut good = Vec::new();
    let mut damaged = Vec::new();
    for (id, r) in loaded {
        match r {
            Ok(v) => good.push((id, v)),
            Err(e @ (Error::Corrupt { .. } | Error::Missing { .. })) => {
                damaged.push((format!("{dir}/{}", id.to_hex()), e))
            }
            Err(e) => return Err(e),
        }
    }
    damaged.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((good, damaged))
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repository({}, {})", self.id.short(), self.store.location())
    }
}

impl Repository {
    /// Creates a repository in an empty location.
    pub async fn init(store: Arc<dyn Store>, password: &Password, opts: InitOptions) -> Result<Repository> {
        opts.params.validate()?;
        opts.kdf.validate_new(opts.allow_weak_kdf)?;
        match store.get("config").await {
            Ok(_) => return Err(Error::RepositoryExists(store.location())),
            Err(Error::ObjectNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let master = SecretKey::random();
        let id = Id::random();
        let slot = KeySlot::wrap(&master, password.as_bytes(), &id, opts.kdf)?;
        let keys = Arc::new(Keys::from_master(master));
        let params_json = serde_json::to_vec(&opts.params).map_err(|e| Error::Internal(e.to_string()))?;
        let config =
            ConfigFile { version: FORMAT_VERSION, id, sealed: keys.seal_meta(SealType::Config, &params_json)? };
        let key_id = save_key_slot(&*store, &slot).await?;
        let cfg = config.encode()?;
        store.put("config", Bytes::from(cfg)).await?;
        Ok(Repository {
            store,
            keys,
            id,
            params: opts.params,
            key_id,
            index: RwLock::default(),
            damaged: Mutex::default(),
        })
    }

    /// Opens a repository, trying every key slot with the password. Touches nothing on failure.
    pub async fn open(store: Arc<dyn Store>, password: &Password) -> Result<Repository> {
        // The config is in the bucket, hostile ground: at most one byte more than it may hold
        // is downloaded (a bounded range), whatever its size.
        let raw = match store.get_range("config", 0..MAX_CONFIG_LEN as u64 + 1).await {
            Ok(b) => b,
            Err(Error::ObjectNotFound(_)) => return Err(Error::RepositoryNotFound(store.location())),
            Err(e) => return Err(e),
        };
        let config = ConfigFile::decode(&raw)?;
        let slots = list_key_slots(&*store).await?;
        if slots.is_empty() {
            return Err(Error::Missing { kind: ObjectKind::Key, name: "keys/".into() });
        }
        // Key derivation is deliberately slow CPU work: it runs on a blocking thread, so the
        // runtime goes on with other tasks meanwhile.
        let password = password.clone();
        let repo_id = config.id;
        let found = tokio::task::spawn_blocking(move || unwrap_any_slot(&slots, &password, &repo_id))
            .await
            .map_err(|e| Error::Internal(format!("key derivation stopped: {e}")))?;
        let Some((key_id, master)) = found else {
            return Err(Error::WrongPassword);
        };
        let keys = Arc::new(Keys::from_master(master));
        let params_json = keys.open_meta(SealType::Config, ObjectKind::Config, "config", &config.sealed)?;
        let params = RepoParams::decode(&params_json)?;
        Ok(Repository {
            store,
            keys,
            id: config.id,
            params,
            key_id,
            index: RwLock::default(),
            damaged: Mutex::default(),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }
    pub fn id(&self) -> Id {
        self.id
    }
    pub fn params(&self) -> &RepoParams {
        &self.params
    }
    /// The key slot that opened this repository.
    pub fn key_id(&self) -> Id {
        self.key_id
    }

    pub fn chunker(&self) -> Result<Chunker> {
        Chunker::new(self.params.chunker, self.keys.chunker_seed())
    }

    /// The chunker for large files and the size from which it applies, if the repository has one.
    pub fn large_file_chunker(&self) -> Result<Option<(u64, Chunker)>> {
        self.params
            .large_files
            .map(|l| Ok((l.min_file_size, Chunker::new(l.chunker, self.keys.chunker_seed())?)))
            .transpose()
    }

    pub fn index(&self) -> std::sync::RwLockReadGuard<'_, MasterIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, MasterIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an object named by the hash of its bytes under `dir/`; returns the id.
    pub async fn save_file(&self, dir: &str, bytes: Vec<u8>) -> Result<Id> {
        let id = Id::of_bytes(&bytes);
        match self.store.put(&format!("{dir}/{}", id.to_hex()), Bytes::from(bytes)).await {
            Ok(()) | Err(Error::AlreadyExists(_)) => Ok(id),
            Err(e) => Err(e),
        }
    }

    /// Reads an object and checks that its bytes hash to its name.
    pub async fn load_file(&self, kind: ObjectKind, dir: &str, id: &Id) -> Result<Bytes> {
        let key = format!("{dir}/{}", id.to_hex());
        let bytes = match self.store.get(&key).await {
            Ok(b) => b,
            Err(Error::ObjectNotFound(_)) => return Err(Error::Missing { kind, name: key }),
            Err(e) => return Err(e),
        };
        if Id::of_bytes(&bytes) != *id {
            return Err(Error::corrupt(kind, key, "content does not match its name"));
        }
        Ok(bytes)
    }

    /// Ids and listed sizes of all objects under `dir/` whose names are well-formed ids.
    pub async fn list_sized(&self, dir: &str) -> Result<Vec<(Id, u64)>> {
        let objs = self.store.list(&format!("{dir}/")).await?;
        Ok(objs
            .iter()
            .filter_map(|o| Some((o.key.rsplit('/').next().and_then(|n| Id::from_hex(n).ok())?, o.size)))
            .collect())
    }

    /// Like [`Repository::load_file`], but at most `max` + 1 bytes are read (a bounded range):
    /// for objects named without a listing at hand.
    pub async fn load_bounded(&self, kind: ObjectKind, dir: &str, id: &Id, max: usize) -> Result<Bytes> {
        let key = format!("{dir}/{}", id.to_hex());
        let bytes = match self.store.get_range(&key, 0..max as u64 + 1).await {
            Ok(b) => b,
            Err(Error::ObjectNotFound(_)) => return Err(Error::Missing { kind, name: key }),
            Err(e) => return Err(e),
        };
        if bytes.len() > max {
            return Err(Error::corrupt(kind, key, "more than such an object may hold"));
        }
        if Id::of_bytes(&bytes) != *id {
            return Err(Error::corrupt(kind, key, "content does not match its name"));
        }
        Ok(bytes)
    }

    /// Like [`Repository::load_file`], but an object the listing says is larger than `max` is
    /// refused without downloading it: the bucket is hostile ground.
    pub(crate) async fn load_listed(
        &self,
        kind: ObjectKind,
        dir: &str,
        id: &Id,
        size: u64,
        max: usize,
    ) -> Result<Bytes> {
        if size > max as u64 {
            let key = format!("{dir}/{}", id.to_hex());
            return Err(Error::corrupt(
                kind,
                key,
                format!("{size} bytes is more than such an object may hold; not downloaded"),
            ));
        }
        self.load_file(kind, dir, id).await
    }

    /// Ids of all objects under `dir/` whose names are well-formed ids.
    pub async fn list_ids(&self, dir: &str) -> Result<Vec<Id>> {
        let objs = self.store.list(&format!("{dir}/")).await?;
        Ok(objs.iter().filter_map(|o| o.key.rsplit('/').next().and_then(|n| Id::from_hex(n).ok())).collect())
    }

    /// Loads every index file into the master index, skipping damaged or vanished ones: their
    /// blobs count as absent (a backup stores them again, which is safe). Each skipped file is a
    /// warning and is listed by [`Repository::damaged`]. Store errors still fail.
    pub async fn load_index(&self) -> Result<()> {
        let (files, damaged) = self.read_index_files().await?;
        self.note_damage(damaged);
        self.install_index(files);
        Ok(())
    }

    /// Reloads the index without the packs `fault` finds wrong (missing, truncated), judged on
    /// every copy an index file names — not only the first copy the master index keeps — so a
    /// blob with an intact copy elsewhere stays indexed there. Returns the packs left out.
    pub async fn reload_index_without<F: Copy + Eq>(
        &self,
        fault: impl Fn(&crate::index::IndexPack) -> Option<F>,
    ) -> Result<std::collections::HashMap<Id, F>> {
        let (files, damaged) = self.read_index_files().await?;
        self.note_damage(damaged);
        let mut faults = std::collections::HashMap::new();
        let mut files = current_files(files);
        for (_, f) in &mut files {
            f.packs.retain(|p| match fault(p) {
                Some(x) => {
                    faults.insert(p.id, x);
                    false
                }
                None => true,
            });
        }
        self.install_index(files);
        Ok(faults)
    }

    /// Like [`Repository::load_index`], but any damaged index file is an error: for callers that
    /// delete what the index does not name (prune).
    pub async fn load_index_strict(&self) -> Result<()> {
        let files = self.current_index_files_strict().await?;
        self.install_index(files);
        Ok(())
    }

    /// Every index file readers use (superseded ones left out), in id order; any damaged index
    /// file is an error. For repairs that rewrite the index from its files.
    pub(crate) async fn current_index_files_strict(&self) -> Result<Vec<(Id, IndexFile)>> {
        let (files, mut damaged) = self.read_index_files().await?;
        if !damaged.is_empty() {
            return Err(damaged.swap_remove(0).1);
        }
        Ok(current_files(files))
    }

    async fn read_index_files(&self) -> Result<Split<IndexFile>> {
        let listed = self.list_sized("index").await?;
        let loaded: Vec<(Id, Result<IndexFile>)> = futures::stream::iter(listed)
            .map(|(id, size)| async move {
                let max = crate::index::MAX_INDEX_LEN;
                let r = match self.load_listed(ObjectKind::Index, "index", &id, size, max).await {
                    Ok(raw) => IndexFile::decode(&self.keys, &format!("index/{}", id.to_hex()), &raw),
                    Err(e) => Err(e),
                };
                (id, r)
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .collect()
            .await;
        split_damaged(loaded, "index")
    }

    fn install_index(&self, files: Vec<(Id, IndexFile)>) {
        let files = current_files(files);
        let mut idx = self.index_mut();
        *idx = MasterIndex::default();
        for (id, f) in &files {
            idx.add_file(*id, f);
        }
    }

    /// Records skipped objects (once each) and warns about them.
    fn note_damage(&self, damaged: Vec<(String, Error)>) {
        let mut d = self.damaged.lock().unwrap_or_else(|p| p.into_inner());
        for (object, e) in damaged {
            if d.iter().any(|x| x.object == object) {
                continue;
            }
            tracing::warn!("skipping damaged {object}: {e} (run `hoard check`)");
            d.push(Damaged { object, reason: e.to_string() });
        }
    }

    /// Index and snapshot objects the tolerant loads skipped as damaged, so far.
    pub fn damaged(&self) -> Vec<Damaged> {
        self.damaged.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads, authenticates, decompresses and verifies one blob.
    pub async fn read_blob(&self, id: &Id) -> Result<Vec<u8>> {
        let loc = self.index().get(id).ok_or_else(|| Error::Missing { kind: ObjectKind::Blob, name: id.to_hex() })?;
        let range = loc.offset as u64..loc.offset as u64 + loc.stored_len as u64;
        let key = pack_key(&loc.pack);
        let read = match loc.ty {
            BlobType::Tree => self
                .store
                .get_metadata_ranges(&key, &[range])
                .await
                .and_then(|mut r| r.pop().ok_or_else(|| Error::Internal(format!("no range returned from {key}")))),
            BlobType::Data => self.store.get_range(&key, range).await,
        };
        let sealed = match read {
            Ok(b) => b,
            Err(Error::ObjectNotFound(k)) => return Err(Error::Missing { kind: ObjectKind::Pack, name: k }),
            Err(e) => return Err(e),
        };
        self.unseal_blob(id, loc.ty, loc.compression, loc.raw_len, &sealed)
    }

    /// Opens a sealed blob and checks its content against its id ([`unseal_blob`]).
    pub fn unseal_blob(
        &self,
        id: &Id,
        ty: BlobType,
        compression: Compression,
        raw_len: u32,
        sealed: &[u8],
    ) -> Result<Vec<u8>> {
        unseal_blob(&self.keys, id, ty, compression, raw_len, sealed)
    }

    /// [`Repository::unseal_blob`] into `out` ([`unseal_blob_into`]).
    pub fn unseal_blob_into(
        &self,
        id: &Id,
        ty: BlobType,
        compression: Compression,
        sealed: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        unseal_blob_into(&self.keys, id, ty, compression, sealed, out)
    }

    /// Reads several blobs, one ranged request per pack (`Store::get_ranges`), several packs at
    /// once; results in the order of `ids`. A missing or unreadable pack fails only the blobs in
    /// it.
    pub async fn read_blobs(&self, ids: &[Id]) -> Vec<Result<Vec<u8>>> {
        let mut out: Vec<Option<Result<Vec<u8>>>> = (0..ids.len()).map(|_| None).collect();
        let mut by_pack: std::collections::HashMap<Id, Vec<(usize, crate::index::BlobLocation)>> =
            std::collections::HashMap::new();
        {
            let idx = self.index();
            for (i, id) in ids.iter().enumerate() {
                match idx.get(id) {
                    Some(loc) => by_pack.entry(loc.pack).or_default().push((i, loc)),
                    None => out[i] = Some(Err(Error::Missing { kind: ObjectKind::Blob, name: id.to_hex() })),
                }
            }
        }
        let fetched: Vec<(PackBlobs, Result<Vec<Bytes>>)> = futures::stream::iter(by_pack)
            .map(|(pack, mut blobs)| async move {
                blobs.sort_by_key(|(_, l)| l.offset);
                let ranges: Vec<_> =
                    blobs.iter().map(|(_, l)| l.offset as u64..l.offset as u64 + l.stored_len as u64).collect();
                // Tree blobs only: a cache may keep them (`Store::get_metadata_ranges`).
                let key = pack_key(&pack);
                let read = if blobs.iter().all(|(_, l)| l.ty == BlobType::Tree) {
                    self.store.get_metadata_ranges(&key, &ranges).await
                } else {
                    self.store.get_ranges(&key, &ranges).await
                };
                let r = match read {
                    Err(Error::ObjectNotFound(k)) => Err(Error::Missing { kind: ObjectKind::Pack, name: k }),
                    other => other,
                };
                (blobs, r)
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .collect()
            .await;
        for (blobs, r) in fetched {
            match r {
                Ok(datas) => {
                    for ((i, loc), sealed) in blobs.into_iter().zip(datas) {
                        out[i] = Some(self.unseal_blob(&ids[i], loc.ty, loc.compression, loc.raw_len, &sealed));
                    }
                }
                Err(e) => {
                    // Every blob of the pack gets the same (typed) error.
                    for (i, _) in blobs.iter().skip(1) {
                        out[*i] = Some(Err(same_error(&e)));
                    }
                    if let Some((i, _)) = blobs.first() {
                        out[*i] = Some(Err(e));
                    }
                }
            }
        }
        out.into_iter().map(|o| o.unwrap_or_else(|| Err(Error::Internal("blob not fetched".into())))).collect()
    }

    /// Loads several trees with [`Repository::read_blobs`]; results in the order of `ids`.
    pub async fn load_trees(&self, ids: &[Id]) -> Vec<Result<Tree>> {
        self.read_blobs(ids).await.into_iter().zip(ids).map(|(r, id)| r.and_then(|d| Tree::decode(id, &d))).collect()
    }

    pub async fn load_tree(&self, id: &Id) -> Result<Tree> {
        let data = self.read_blob(id).await?;
        Tree::decode(id, &data)
    }

    pub async fn save_snapshot(&self, snap: &Snapshot) -> Result<Id> {
        self.save_file("snapshots", snap.encode(&self.keys)?).await
    }

    pub async fn load_snapshot(&self, id: &Id) -> Result<Snapshot> {
        let raw = self.load_bounded(ObjectKind::Snapshot, "snapshots", id, crate::snapshot::MAX_SNAPSHOT_LEN).await?;
        Snapshot::decode(&self.keys, &format!("snapshots/{}", id.to_hex()), &raw)
    }

    /// All readable snapshots, oldest first. A damaged or vanished snapshot object is skipped
    /// with a warning and listed by [`Repository::damaged`]; store errors still fail.
    pub async fn list_snapshots(&self) -> Result<Vec<(Id, Snapshot)>> {
        let (snaps, damaged) = self.read_snapshots().await?;
        self.note_damage(damaged.into_iter().map(|(id, e)| (format!("snapshots/{}", id.to_hex()), e)).collect());
        Ok(snaps)
    }

    /// Like [`Repository::list_snapshots`], but any damaged snapshot is an error: for callers
    /// that delete what no snapshot references (prune).
    pub async fn list_snapshots_strict(&self) -> Result<Vec<(Id, Snapshot)>> {
        let (snaps, mut damaged) = self.read_snapshots().await?;
        if !damaged.is_empty() {
            return Err(damaged.swap_remove(0).1);
        }
        Ok(snaps)
    }

    async fn read_snapshots(&self) -> Result<(Vec<(Id, Snapshot)>, Vec<(Id, Error)>)> {
        let listed = self.list_sized("snapshots").await?;
        let loaded: Vec<(Id, Result<Snapshot>)> = futures::stream::iter(listed)
            .map(|(id, size)| async move {
                let max = crate::snapshot::MAX_SNAPSHOT_LEN;
                let r = match self.load_listed(ObjectKind::Snapshot, "snapshots", &id, size, max).await {
                    Ok(raw) => Snapshot::decode(&self.keys, &format!("snapshots/{}", id.to_hex()), &raw),
                    Err(e) => Err(e),
                };
                (id, r)
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .collect()
            .await;
        let mut snaps = Vec::new();
        let mut damaged = Vec::new();
        for (id, r) in loaded {
            match r {
                Ok(s) => snaps.push((id, s)),
                Err(e @ (Error::Corrupt { .. } | Error::Missing { .. })) => damaged.push((id, e)),
                Err(e) => return Err(e),
            }
        }
        damaged.sort_by_key(|(id, _)| *id);
        snaps.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok((snaps, damaged))
    }

    /// Resolves `latest` or a unique id prefix, among snapshots that pass `filter`. An id prefix
    /// that only a damaged snapshot matches fails with that snapshot's damage.
    pub async fn find_snapshot(&self, spec: &str, filter: &SnapshotFilter) -> Result<(Id, Snapshot)> {
        let (snaps, damaged) = self.read_snapshots().await?;
        let found = select_snapshot(snaps, spec, filter);
        if matches!(found, Err(Error::SnapshotNotFound(_))) && spec != "latest" {
            let spec_l = spec.to_ascii_lowercase();
            if let Some((_, e)) =
                damaged.into_iter().find(|(id, _)| !spec_l.is_empty() && id.to_hex().starts_with(&spec_l))
            {
                return Err(e);
            }
        } else {
            self.note_damage(damaged.into_iter().map(|(id, e)| (format!("snapshots/{}", id.to_hex()), e)).collect());
        }
        found
    }

    pub async fn delete_snapshot(&self, id: &Id) -> Result<()> {
        self.store.delete(&format!("snapshots/{}", id.to_hex())).await
    }

    /// Adds a key slot for another password; returns its id. `allow_weak`: accept parameters
    /// below [`KdfParams::MIN_NEW_COST`].
    pub async fn add_key(&self, password: &Password, kdf: KdfParams, allow_weak: bool) -> Result<Id> {
        kdf.validate_new(allow_weak)?;
        let slot = KeySlot::wrap(self.keys.master(), password.as_bytes(), &self.id, kdf)?;
        save_key_slot(&*self.store, &slot).await
    }

    pub async fn list_keys(&self) -> Result<Vec<(Id, Result<KeySlot>)>> {
        list_key_slots(&*self.store).await
    }

    /// Removes a key slot. The slot that opened this repository cannot be removed, so at least
    /// one key known to work always remains (use `change_password` to replace it).
    pub async fn remove_key(&self, id: &Id) -> Result<()> {
        let slots = self.list_keys().await?;
        if !slots.iter().any(|(s, _)| s == id) {
            return Err(Error::InvalidArgument(format!("no key {}", id.short())));
        }
        if *id == self.key_id {
            return Err(Error::InvalidArgument(
                "refusing to remove the key in use: it may be the last one that works; open the repository with another key to remove it".into(),
            ));
        }
        self.store.delete(&format!("keys/{}", id.to_hex())).await
    }

    /// Replaces the current key slot with one for a new password; returns the new slot's id.
    /// The new slot is written before the old one is deleted.
    pub async fn change_password(&mut self, new: &Password, kdf: KdfParams, allow_weak: bool) -> Result<Id> {
        let id = self.add_key(new, kdf, allow_weak).await?;
        self.store.delete(&format!("keys/{}", self.key_id.to_hex())).await?;
        self.key_id = id;
        Ok(id)
    }
}

/// What [`Repository::wipe`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wiped {
    pub objects: usize,
    pub bytes: u64,
}

impl Repository {
    /// Deletes every object of this repository, and only those: keys of the repository layout
    /// ([`wipe_rank`]); anything else at the location stays. Data goes first, the key slots and
    /// `config` last, so a wipe that stops half-way leaves a repository the same password still
    /// opens, and running it again finishes the job. Takes the open repository: opening it with
    /// its password is the proof that the caller owns what is deleted.
    pub async fn wipe(self) -> Result<Wiped> {
        let mut objects: Vec<(u8, ObjectInfo)> =
            self.store.list("").await?.into_iter().filter_map(|o| wipe_rank(&o.key).map(|r| (r, o))).collect();
        objects.sort_by(|a, b| (a.0, &a.1.key).cmp(&(b.0, &b.1.key)));
        let mut wiped = Wiped::default();
        for (_, o) in objects {
            match self.store.delete(&o.key).await {
                Ok(()) => {
                    wiped.objects += 1;
                    wiped.bytes += o.size;
                }
                Err(Error::ObjectNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(wiped)
    }
}

/// Opens a sealed blob as stored in a pack (`raw_len` and `compression` from its index
/// entry) and checks its content against its id. Decompression never writes more than
/// `raw_len` bytes.
pub fn unseal_blob(
    keys: &Keys,
    id: &Id,
    ty: BlobType,
    compression: Compression,
    raw_len: u32,
    sealed: &[u8],
) -> Result<Vec<u8>> {
    let plain = match compression {
        Compression::None => keys.open_blob(ty.seal_type(), id, sealed)?,
        Compression::Zstd => with_payload(keys, ty, id, sealed, |payload| {
            decompress(payload, raw_len as usize)
                .map_err(|e| Error::corrupt(ObjectKind::Blob, id.to_hex(), format!("decompression: {e}")))
        })?,
    };
    if plain.len() != raw_len as usize || keys.blob_id(&plain) != *id {
        return Err(Error::corrupt(ObjectKind::Blob, id.to_hex(), "content does not match its id"));
    }
    Ok(plain)
}

/// [`unseal_blob`] into `out`, which must be exactly the blob's recorded raw
/// length: the blob is decrypted straight into `out`, or into a per-thread buffer that it is
/// decompressed from, so no allocation or copy is made per blob. Checked like
/// `unseal_blob` (authenticated, length, id); on an error `out` holds garbage.
pub fn unseal_blob_into(
    keys: &Keys,
    id: &Id,
    ty: BlobType,
    compression: Compression,
    sealed: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let corrupt = |why: String| Error::corrupt(ObjectKind::Blob, id.to_hex(), why);
    match compression {
        Compression::None => {
            if sealed.len() != out.len() + crate::crypto::SEAL_OVERHEAD {
                return Err(corrupt("stored length does not match its recorded length".into()));
            }
            keys.open_blob_into(ty.seal_type(), id, sealed, out)?;
        }
        Compression::Zstd => with_payload(keys, ty, id, sealed, |payload| match decompress_into(payload, out) {
            Ok(n) if n == out.len() => Ok(()),
            Ok(n) => Err(corrupt(format!("decompressed to {n} bytes, {} recorded", out.len()))),
            Err(e) => Err(corrupt(format!("decompression: {e}"))),
        })?,
    }
    if keys.blob_id(out) != *id {
        return Err(corrupt("content does not match its id".into()));
    }
    Ok(())
}

/// Where a key stands in a wipe's order if it belongs to the repository layout, `None` for
/// anything else: packs (`packs/<2 hex>/<64 hex>`, the first two matching), then index files,
/// snapshots and locks, then key slots (`<dir>/<64 hex>`), then `config`.
pub fn wipe_rank(key: &str) -> Option<u8> {
    let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if key == "config" {
        return Some(3);
    }
    let (dir, rest) = key.split_once('/')?;
    match dir {
        "packs" => {
            let (prefix, name) = rest.split_once('/')?;
            (hex64(name) && name.starts_with(prefix) && prefix.len() == 2).then_some(0)
        }
        "index" | "snapshots" | "locks" => hex64(rest).then_some(1),
        "keys" => hex64(rest).then_some(2),
        _ => None,
    }
}

/// Blobs wanted from one pack: (position in the caller's list, location).
type PackBlobs = Vec<(usize, crate::index::BlobLocation)>;

/// A copy of a storage-level error (errors are not `Clone`); other kinds become `Internal`.
fn same_error(e: &Error) -> Error {
    match e {
        Error::Missing { kind, name } => Error::Missing { kind: *kind, name: name.clone() },
        Error::ObjectNotFound(k) => Error::ObjectNotFound(k.clone()),
        Error::Corrupt { kind, name, reason } => {
            Error::Corrupt { kind: *kind, name: name.clone(), reason: reason.clone() }
        }
        Error::Storage { op, key, message, class } => {
            Error::Storage { op, key: key.clone(), message: message.clone(), class: *class }
        }
        other => Error::Internal(other.to_string()),
    }
}

thread_local! {
    /// One zstd context per thread, reused across blobs.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Scratch buffers up to this size are kept between blobs; larger ones are freed after use, so
/// a few big blobs do not leave every thread holding their size.
pub const SCRATCH_KEEP: usize = 1024 * 1024;

/// Runs `f` with a blob's decrypted payload in a per-thread buffer (kept between blobs up to
/// [`SCRATCH_KEEP`] bytes, so small blobs cost no allocation).
fn with_payload<T>(keys: &Keys, ty: BlobType, id: &Id, sealed: &[u8], f: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
    thread_local! {
        static PAYLOAD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let Some(len) = sealed.len().checked_sub(crate::crypto::SEAL_OVERHEAD) else {
        return Err(Error::corrupt(ObjectKind::Blob, id.to_hex(), "shorter than its seal"));
    };
    PAYLOAD.with(|cell| {
        // A nested use on this thread (none today) gets its own buffer instead of a panic.
        let mut own = Vec::new();
        let mut guard = cell.try_borrow_mut();
        let buf = match &mut guard {
            Ok(b) => &mut **b,
            Err(_) => &mut own,
        };
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let result = keys.open_blob_into(ty.seal_type(), id, sealed, &mut buf[..len]).and_then(|()| f(&buf[..len]));
        if buf.len() > SCRATCH_KEEP {
            *buf = Vec::new();
        }
        result
    })
}

/// Runs `f` with this thread's zstd context, reused across blobs.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(std::io::Error::other)?;
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => f(d),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

/// Decompresses at most `capacity` bytes (the blob's recorded length, itself bounded).
fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    with_decompressor(|d| d.decompress(data, capacity))
}

/// Decompresses into `out`, failing if the frame is larger; returns the bytes written.
fn decompress_into(data: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    with_decompressor(|d| d.decompress_to_buffer(data, out))
}

async fn save_key_slot(store: &dyn Store, slot: &KeySlot) -> Result<Id> {
    let bytes = serde_json::to_vec_pretty(slot).map_err(|e| Error::Internal(e.to_string()))?;
    let id = Id::of_bytes(&bytes);
    store.put(&format!("keys/{}", id.to_hex()), Bytes::from(bytes)).await?;
    Ok(id)
}

/// Per process: the key slot that last opened each repository, tried first next time.
fn last_opened_slot() -> &'static Mutex<std::collections::HashMap<Id, Id>> {
    static LAST: std::sync::OnceLock<Mutex<std::collections::HashMap<Id, Id>>> = std::sync::OnceLock::new();
    LAST.get_or_init(Mutex::default)
}

/// The first slot that `password` opens, with the master key it wraps. Slots are tried in this
/// order: the one that last opened this repository in this process, then cheapest derivation
/// first, so a costly slot planted in the bucket is tried last (and one beyond the ceilings of
/// [`KdfParams::validate`] never).
fn unwrap_any_slot(slots: &[(Id, Result<KeySlot>)], password: &Password, repo_id: &Id) -> Option<(Id, SecretKey)> {
    let last = last_opened_slot().lock().unwrap_or_else(|p| p.into_inner()).get(repo_id).copied();
    let mut order: Vec<&(Id, Result<KeySlot>)> = slots.iter().collect();
    order.sort_by_key(|(id, slot)| (Some(*id) != last, slot.as_ref().map_or(u64::MAX, |s| s.kdf.cost()), *id));
    for (slot_id, slot) in order {
        let slot = match slot {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("skipping key slot {}: {e}", slot_id.short());
                continue;
            }
        };
        if let Err(e) = slot.kdf.validate() {
            tracing::warn!("skipping key slot {}: {e}", slot_id.short());
            continue;
        }
        match slot.unwrap_key(password.as_bytes(), repo_id) {
            Ok(Some(master)) => {
                last_opened_slot().lock().unwrap_or_else(|p| p.into_inner()).insert(*repo_id, *slot_id);
                return Some((*slot_id, master));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("skipping key slot {}: {e}", slot_id.short()),
        }
    }
    None
}

async fn list_key_slots(store: &dyn Store) -> Result<Vec<(Id, Result<KeySlot>)>> {
    let objs = store.list("keys/").await?;
    let mut out = Vec::new();
    for o in objs {
        let Some(id) = o.key.rsplit('/').next().and_then(|n| Id::from_hex(n).ok()) else { continue };
        // The listing's size first: an oversized object is not downloaded.
        if o.size > MAX_KEY_LEN as u64 {
            out.push((id, Err(Error::corrupt(ObjectKind::Key, &o.key, "too large for a key slot"))));
            continue;
        }
        let raw = store.get(&o.key).await?;
        let slot = if raw.len() > MAX_KEY_LEN || Id::of_bytes(&raw) != id {
            Err(Error::corrupt(ObjectKind::Key, &o.key, "content does not match its name"))
        } else {
            serde_json::from_slice::<KeySlot>(&raw)
                .map_err(|e| Error::corrupt(ObjectKind::Key, &o.key, format!("undecodable: {e}")))
        };
        out.push((id, slot));
    }
    Ok(out)
}

/// Which snapshots `latest` and listings consider.
#[derive(Debug, Clone, Default)]
pub struct SnapshotFilter {
    pub host: Option<String>,
    pub tags: Vec<String>,
}

impl SnapshotFilter {
    pub fn matches(&self, s: &Snapshot) -> bool {
        self.host.as_ref().is_none_or(|h| &s.host == h) && self.tags.iter().all(|t| s.tags.contains(t))
    }
}

/// Pure selection of a snapshot by `latest` or id prefix.
pub fn select_snapshot(snaps: Vec<(Id, Snapshot)>, spec: &str, filter: &SnapshotFilter) -> Result<(Id, Snapshot)> {
    let mut candidates: Vec<(Id, Snapshot)> = snaps.into_iter().filter(|(_, s)| filter.matches(s)).collect();
    if spec == "latest" {
        return candidates.pop().ok_or_else(|| Error::SnapshotNotFound(spec.to_string()));
    }
    let spec_l = spec.to_ascii_lowercase();
    if spec_l.is_empty() || !spec_l.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::SnapshotNotFound(spec.to_string()));
    }
    let mut matching: Vec<(Id, Snapshot)> =
        candidates.into_iter().filter(|(id, _)| id.to_hex().starts_with(&spec_l)).collect();
    match matching.len() {
        0 => Err(Error::SnapshotNotFound(spec.to_string())),
        1 => Ok(matching.remove(0)),
        _ => Err(Error::AmbiguousSnapshot(spec.to_string())),
    }
}
