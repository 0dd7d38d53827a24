//! Healing a damaged repository: `repair packs` and `repair snapshots`.
//!
//! * [`repair_packs`] downloads every indexed pack (or the ones named), and for each one that is
//!   missing, truncated or does not hash to its name, salvages the blobs that still decrypt and
//!   verify into new packs. One new index file then supersedes all others: it names every intact
//!   pack and the new ones, and leaves out the damaged packs, which are deleted last. A blob that
//!   could not be salvaged is no longer indexed, so the next backup stores it anew from its source
//!   (a backup never deduplicates against a blob the index does not name, and re-reads an
//!   unchanged file whose blobs are not all indexed).
//! * [`repair_snapshots`] rewrites the snapshots that still reference data the index does not
//!   hold (the source was gone when backing up again): files whose content is incomplete and
//!   directories whose listing is lost are left out. Never silently: the new snapshot is tagged
//!   `repaired`, names its original in the label `hoard.dev/repaired-from`, and lists every path
//!   it left out in its warnings. The original is deleted only when asked (`forget`).
//!
//! Both run under the **exclusive lock** and order their effects as prune does — new packs and
//! their index first, then the superseding index or snapshot, deletions last — so an interruption
//! at any point loses nothing that was intact; running the repair again finishes the job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Serialize;

use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{IndexBlob, IndexFile, IndexPack, group_by_pack};
use crate::lock::LockGuard;
use crate::pack::BlobType;
use crate::repo::{Repository, pack_key};
use crate::tree::{Extent, NodeKind, Tree};
use crate::writer::{BlobSink, BlobWriter, WriterConfig};

/// Tag of a snapshot [`repair_snapshots`] wrote.
pub const REPAIRED_TAG: &str = "repaired";
/// Label naming the snapshot a repaired one replaces.
pub const REPAIRED_FROM_LABEL: &str = "hoard.dev/repaired-from";

/// Largest pack downloaded whole (packs are normally `pack_size`, at most one blob more).
const MAX_PACK_READ: u64 = 256 * 1024 * 1024;
/// Packs downloaded at once: each is held in memory while its blobs are verified and its
/// salvage written.
const PACKS_AT_ONCE: usize = 2;
/// Left-out paths recorded in one repaired snapshot's warnings; the rest are counted.
const MAX_RECORDED_PATHS: usize = 1000;

/// What a pack turned out to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PackState {
    /// Hashes to its name: exactly what was written.
    Intact,
    /// The index names it; the store does not hold it.
    Missing,
    /// Held, but not what was written (the reason says how).
    Damaged(String),
}

/// One pack's verdict: blobs that still verify (plaintext) and blobs that are lost.
#[derive(Debug)]
pub struct Salvage {
    pub state: PackState,
    pub salvaged: Vec<(Id, BlobType, Vec<u8>)>,
    pub lost: Vec<Id>,
}

/// Pure: judges a pack from its bytes (`None`: missing) against the blobs the index places in
/// it. `whole` says whether `data` is the entire object (else only a prefix was read, and the
/// pack is damaged by its size alone). A damaged pack's blobs are each decrypted and verified
/// against their id; those that pass are salvaged.
pub fn salvage_pack(keys: &Keys, pack: &Id, data: Option<&[u8]>, whole: bool, blobs: &[IndexBlob]) -> Salvage {
    let Some(data) = data else {
        return Salvage { state: PackState::Missing, salvaged: Vec::new(), lost: blobs.iter().map(|b| b.id).collect() };
    };
    let needed = blobs.iter().map(|b| b.offset as u64 + b.stored_len as u64).max().unwrap_or(0);
    let state = if !whole {
        PackState::Damaged("larger than any pack hoard writes".into())
    } else if (data.len() as u64) < needed + 4 {
        PackState::Damaged(format!("truncated to {} bytes (its blobs end at byte {needed})", data.len()))
    } else if Id::of_bytes(data) != *pack {
        PackState::Damaged("content does not match its name".into())
    } else {
        return Salvage { state: PackState::Intact, salvaged: Vec::new(), lost: Vec::new() };
    };
    let mut salvaged = Vec::new();
    let mut lost = Vec::new();
    for b in blobs {
        let range = b.offset as usize..b.offset as usize + b.stored_len as usize;
        let plain = data
            .get(range)
            .and_then(|sealed| crate::repo::unseal_blob(keys, &b.id, b.ty, b.compression, b.raw_len, sealed).ok());
        match plain {
            Some(p) => salvaged.push((b.id, b.ty, p)),
            None => lost.push(b.id),
        }
    }
    Salvage { state, salvaged, lost }
}

#[derive(Debug, Clone, Default)]
pub struct PackRepairOptions {
    /// Only these packs (all indexed packs when empty).
    pub packs: Vec<Id>,
    /// Report what would be done; change nothing.
    pub dry_run: bool,
}

/// A pack that was not intact, and what became of its blobs.
#[derive(Debug, Clone, Serialize)]
pub struct RepairedPack {
    /// `packs/ab/ab12…`.
    pub pack: String,
    pub state: PackState,
    /// Blobs that still verify, written to new packs.
    pub blobs_salvaged: usize,
    /// Blobs an intact pack also holds: nothing to do for them.
    pub blobs_elsewhere: usize,
    /// Blobs with no good copy left.
    pub blobs_lost: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PackRepairOutcome {
    pub packs_read: usize,
    pub damaged: Vec<RepairedPack>,
    /// Blobs no intact pack holds any more: stored again by the next backup of their source.
    pub blobs_lost: usize,
    pub packs_written: u64,
    pub packs_removed: usize,
    pub index_files_removed: usize,
}

/// Salvages what damaged packs still hold and drops the rest from the index (see the module
/// docs). A damaged index file is refused: `repair index` rebuilds it first.
pub async fn repair_packs(repo: Arc<Repository>, opts: PackRepairOptions) -> Result<PackRepairOutcome> {
    let lock = LockGuard::acquire(Arc::clone(&repo), true).await?;
    let r = repair_packs_locked(&repo, &opts, &lock).await;
    let released = lock.release().await;
    let out = r?;
    released?;
    Ok(out)
}

async fn repair_packs_locked(
    repo: &Arc<Repository>,
    opts: &PackRepairOptions,
    lock: &LockGuard,
) -> Result<PackRepairOutcome> {
    let files = repo.current_index_files_strict().await.map_err(|e| match e {
        Error::Corrupt { kind, name, reason } => Error::Corrupt {
            kind,
            name,
            reason: format!("{reason}; run `hoard repair index` first, then `hoard repair packs`"),
        },
        e => e,
    })?;
    repo.load_index_strict().await?;
    let old_index_files: Vec<Id> = repo.list_ids("index").await?;
    // Every copy of every blob, per pack (the master index keeps only a blob's first copy).
    let mut by_pack: BTreeMap<Id, Vec<IndexBlob>> = BTreeMap::new();
    for (_, f) in &files {
        for p in &f.packs {
            by_pack.entry(p.id).or_default().extend(p.blobs.iter().cloned());
        }
    }
    for blobs in by_pack.values_mut() {
        blobs.sort_by_key(|b| (b.id, b.offset));
        blobs.dedup_by_key(|b| b.id);
    }
    drop(files);
    let unknown: Vec<String> = opts.packs.iter().filter(|p| !by_pack.contains_key(p)).map(|p| p.to_hex()).collect();
    if !unknown.is_empty() {
        return Err(Error::InvalidArgument(format!("no indexed pack is named {}", unknown.join(", "))));
    }
    let selected: Vec<Id> = if opts.packs.is_empty() { by_pack.keys().copied().collect() } else { opts.packs.clone() };
    let listed: HashMap<String, u64> =
        repo.store().list("packs/").await?.into_iter().map(|o| (o.key, o.size)).collect();

    let mut out = PackRepairOutcome::default();
    let mut bad_packs: HashSet<Id> = HashSet::new();
    // (pack, state, salvaged ids, lost ids) of each pack that is not intact.
    let mut damaged: Vec<(Id, PackState, Vec<Id>, Vec<Id>)> = Vec::new();
    // 1. Salvaged blobs go into new packs as soon as they are verified, so memory holds at most
    // PACKS_AT_ONCE packs. One that also has an intact copy elsewhere is stored once more
    // (prune reclaims it); waiting to know would mean holding every salvaged blob.
    let mut writer: Option<BlobWriter> = None;
    let mut verdicts = futures::stream::iter(selected)
        .map(|pack| {
            let blobs = by_pack.get(&pack).cloned().unwrap_or_default();
            let size = listed.get(&pack_key(&pack)).copied();
            let repo = Arc::clone(repo);
            async move {
                let read = read_for_salvage(&repo, &pack, size, &blobs).await?;
                let keys = Arc::clone(repo.keys());
                tokio::task::spawn_blocking(move || {
                    let (data, whole) = match &read {
                        Some((d, w)) => (Some(&d[..]), *w),
                        None => (None, true),
                    };
                    (pack, salvage_pack(&keys, &pack, data, whole, &blobs))
                })
                .await
                .map_err(|e| Error::Internal(format!("verify pack: {e}")))
            }
        })
        .buffered(PACKS_AT_ONCE);
    while let Some(v) = verdicts.next().await {
        let (pack, s) = v?;
        out.packs_read += 1;
        if s.state == PackState::Intact {
            continue;
        }
        bad_packs.insert(pack);
        damaged.push((pack, s.state, s.salvaged.iter().map(|(id, _, _)| *id).collect(), s.lost));
        if opts.dry_run || s.salvaged.is_empty() {
            continue;
        }
        let w = writer.get_or_insert_with(|| {
            // A writer that dedups only against what it writes now.
            *repo.index_mut() = crate::index::MasterIndex::default();
            BlobWriter::start(Arc::clone(repo), WriterConfig { lease: Some(lock.lease()), ..WriterConfig::default() })
        });
        let sink = w.sink();
        tokio::task::spawn_blocking(move || {
            s.salvaged.into_iter().try_for_each(|(id, ty, plain)| sink.add(ty, id, Bytes::from(plain), None).map(drop))
        })
        .await
        .map_err(|e| Error::Internal(format!("salvage: {e}")))??;
    }
    drop(verdicts);
    let mut new_packs: Vec<IndexPack> = Vec::new();
    if let Some(w) = writer {
        let stats = w.stats();
        w.finish().await?;
        out.packs_written = stats.packs.load(std::sync::atomic::Ordering::Relaxed);
        // The in-memory index now holds exactly the new packs.
        new_packs = group_by_pack(repo.index().iter());
    }
    if bad_packs.is_empty() {
        return Ok(out);
    }
    // A blob with an intact copy in a kept pack is not lost.
    let kept_blobs: HashSet<Id> = by_pack
        .iter()
        .filter(|(p, _)| !bad_packs.contains(p))
        .flat_map(|(_, blobs)| blobs.iter().map(|b| b.id))
        .collect();
    let salvaged_ids: HashSet<Id> = damaged.iter().flat_map(|(_, _, saved, _)| saved.iter().copied()).collect();
    let mut lost_blobs: HashSet<Id> = HashSet::new();
    for (pack, state, saved, lost) in damaged {
        let elsewhere = saved.iter().chain(&lost).filter(|id| kept_blobs.contains(id)).count();
        let lost: Vec<Id> =
            lost.into_iter().filter(|id| !kept_blobs.contains(id) && !salvaged_ids.contains(id)).collect();
        out.damaged.push(RepairedPack {
            pack: pack_key(&pack),
            state,
            blobs_salvaged: saved.iter().filter(|id| !kept_blobs.contains(id)).count(),
            blobs_elsewhere: elsewhere,
            blobs_lost: lost.len(),
        });
        lost_blobs.extend(lost);
    }
    out.blobs_lost = lost_blobs.len();
    if opts.dry_run {
        return Ok(out);
    }

    // 2. One index for every intact pack and the new ones, superseding every old index file;
    // 3. the old index files.
    let mut full = IndexFile { supersedes: old_index_files, packs: new_packs };
    full.packs
        .extend(by_pack.into_iter().filter(|(p, _)| !bad_packs.contains(p)).map(|(id, blobs)| IndexPack { id, blobs }));
    out.index_files_removed = crate::prune::supersede_index(repo, lock, full).await?;
    // 4. The damaged packs.
    for p in &bad_packs {
        let key = pack_key(p);
        if listed.contains_key(&key) {
            repo.store().delete(&key).await?;
            out.packs_removed += 1;
        }
    }
    repo.load_index().await?;
    Ok(out)
}

/// A pack's bytes for [`salvage_pack`]: `None` when missing, else the bytes and whether they are
/// the whole object. An object larger than any pack is read only as far as its blobs reach.
async fn read_for_salvage(
    repo: &Repository,
    pack: &Id,
    size: Option<u64>,
    blobs: &[IndexBlob],
) -> Result<Option<(Bytes, bool)>> {
    let Some(size) = size else { return Ok(None) };
    let key = pack_key(pack);
    if size <= MAX_PACK_READ {
        return match repo.store().get(&key).await {
            Ok(b) => Ok(Some((b, true))),
            Err(Error::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        };
    }
    let needed = blobs.iter().map(|b| b.offset as u64 + b.stored_len as u64).max().unwrap_or(0);
    let end = needed.min(size).min(MAX_PACK_READ);
    Ok(Some((repo.store().get_range(&key, 0..end).await?, false)))
}

#[derive(Debug, Clone, Default)]
pub struct SnapshotRepairOptions {
    /// Only these snapshots (all when empty).
    pub snapshots: Vec<Id>,
    /// Delete each original once its repaired snapshot is written.
    pub forget: bool,
    /// Report what would be done; change nothing.
    pub dry_run: bool,
}

/// A snapshot that referenced lost data.
#[derive(Debug, Clone, Serialize)]
pub struct RepairedSnapshot {
    pub original: String,
    /// The rewritten snapshot (`None` in a dry run).
    pub repaired: Option<String>,
    /// Paths left out, as the snapshot names them (`/component/dir/file`); a directory whose
    /// listing was lost ends in `/`.
    pub left_out: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotRepairOutcome {
    pub snapshots_checked: usize,
    pub repaired: Vec<RepairedSnapshot>,
    pub forgotten: usize,
}

/// Rewrites snapshots that reference data the index does not hold (see the module docs). Run
/// after `repair packs`: a blob that is indexed but damaged is not detected here. A damaged index
/// file is refused, as everything it names would look lost.
pub async fn repair_snapshots(repo: Arc<Repository>, opts: SnapshotRepairOptions) -> Result<SnapshotRepairOutcome> {
    let lock = LockGuard::acquire(Arc::clone(&repo), true).await?;
    let r = repair_snapshots_locked(&repo, &opts, &lock).await;
    let released = lock.release().await;
    let out = r?;
    released?;
    Ok(out)
}

async fn repair_snapshots_locked(
    repo: &Arc<Repository>,
    opts: &SnapshotRepairOptions,
    lock: &LockGuard,
) -> Result<SnapshotRepairOutcome> {
    repo.load_index_strict().await?;
    let mut snapshots = repo.list_snapshots().await?;
    if !opts.snapshots.is_empty() {
        snapshots.retain(|(id, _)| opts.snapshots.contains(id));
    }
    let mut out = SnapshotRepairOutcome { snapshots_checked: snapshots.len(), ..Default::default() };
    let writer = (!opts.dry_run).then(|| {
        BlobWriter::start(Arc::clone(repo), WriterConfig { lease: Some(lock.lease()), ..WriterConfig::default() })
    });
    let mut rewriter = Rewriter { repo, sink: writer.as_ref().map(BlobWriter::sink), memo: HashMap::new() };
    let mut rewritten = Vec::new();
    for (id, snap) in snapshots {
        let mut new = snap.clone();
        let mut left_out = Vec::new();
        for c in &mut new.components {
            let r = rewriter.rewrite(c.root).await?;
            left_out.extend(r.left_out.iter().map(|p| format!("/{}/{p}", c.name)));
            c.root = r.id;
        }
        if left_out.is_empty() {
            continue;
        }
        // A component whose root listing was lost reads `/name/` (not `/name//`).
        for p in &mut left_out {
            if p.ends_with("//") {
                p.pop();
            }
        }
        if !new.tags.iter().any(|t| t == REPAIRED_TAG) {
            new.tags.push(REPAIRED_TAG.into());
        }
        new.labels.insert(REPAIRED_FROM_LABEL.into(), id.to_hex());
        new.warnings.extend(
            left_out.iter().take(MAX_RECORDED_PATHS).map(|p| format!("repair: left out {p} (its data was lost)")),
        );
        if left_out.len() > MAX_RECORDED_PATHS {
            new.warnings.push(format!("repair: and {} more paths left out", left_out.len() - MAX_RECORDED_PATHS));
        }
        rewritten.push((id, new, left_out));
    }
    drop(rewriter);
    if let Some(w) = writer {
        // Every new tree is indexed before a snapshot names it.
        w.finish().await?;
    }
    for (id, new, left_out) in rewritten {
        let repaired = if opts.dry_run {
            None
        } else {
            lock.check()?;
            let new_id = repo.save_snapshot(&new).await?;
            if opts.forget {
                repo.delete_snapshot(&id).await?;
                out.forgotten += 1;
            }
            Some(new_id.to_hex())
        };
        out.repaired.push(RepairedSnapshot { original: id.to_hex(), repaired, left_out });
    }
    Ok(out)
}

/// A tree after repair: its (possibly new) id and the paths below it left out, relative to it.
#[derive(Debug, Clone)]
struct Rewritten {
    id: Id,
    left_out: Vec<String>,
}

struct Rewriter<'a> {
    repo: &'a Repository,
    /// Where new trees go; `None` in a dry run (ids are computed, nothing is written).
    sink: Option<BlobSink>,
    /// Trees already rewritten: shared subtrees are rewritten once.
    memo: HashMap<Id, Rewritten>,
}

impl Rewriter<'_> {
    fn rewrite(&mut self, tree_id: Id) -> BoxFuture<'_, Result<Rewritten>> {
        Box::pin(async move {
            if let Some(r) = self.memo.get(&tree_id) {
                return Ok(r.clone());
            }
            let r = match self.repo.load_tree(&tree_id).await {
                Ok(tree) => self.rewrite_nodes(tree_id, tree).await?,
                // The listing is lost: an empty directory stands in for it.
                Err(Error::Corrupt { .. } | Error::Missing { .. }) => {
                    Rewritten { id: self.save(&Tree::default()).await?, left_out: vec![String::new()] }
                }
                Err(e) => return Err(e),
            };
            self.memo.insert(tree_id, r.clone());
            Ok(r)
        })
    }

    async fn rewrite_nodes(&mut self, tree_id: Id, mut tree: Tree) -> Result<Rewritten> {
        let mut left_out = Vec::new();
        let mut nodes = Vec::with_capacity(tree.nodes.len());
        for mut node in std::mem::take(&mut tree.nodes) {
            let name = node.name_lossy();
            match node.kind {
                NodeKind::File if !self.all_indexed(&node.content) => {
                    left_out.push(name);
                    continue;
                }
                NodeKind::Dir => {
                    if let Some(sub) = node.subtree {
                        let r = self.rewrite(sub).await?;
                        left_out.extend(r.left_out.iter().map(|p| format!("{name}/{p}")));
                        node.subtree = Some(r.id);
                    }
                }
                _ => {}
            }
            nodes.push(node);
        }
        if left_out.is_empty() {
            return Ok(Rewritten { id: tree_id, left_out });
        }
        tree.nodes = nodes;
        Ok(Rewritten { id: self.save(&tree).await?, left_out })
    }

    fn all_indexed(&self, content: &[Extent]) -> bool {
        let idx = self.repo.index();
        content.iter().all(|e| match e {
            Extent::Data { id, .. } => idx.contains(id),
            Extent::Hole { .. } => true,
        })
    }

    async fn save(&self, tree: &Tree) -> Result<Id> {
        let bytes = Bytes::from(tree.encode()?);
        match &self.sink {
            None => Ok(self.repo.keys().blob_id(&bytes)),
            Some(sink) => {
                let sink = sink.clone();
                tokio::task::spawn_blocking(move || sink.add_bytes(BlobType::Tree, bytes))
                    .await
                    .map_err(|e| Error::Internal(format!("save tree: {e}")))?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::crypto::SecretKey;
    use crate::pack::{Compression, PackBuilder, SealedBlob};

    fn keys() -> Keys {
        Keys::from_master(SecretKey([7; 32]))
    }

    /// A pack of three data blobs as the writer lays it out, and the index's view of it.
    fn pack_of_three(keys: &Keys) -> (Id, Vec<u8>, Vec<IndexBlob>) {
        let mut b = PackBuilder::default();
        for n in 0..3u8 {
            let plain = vec![n; 1000];
            let id = keys.blob_id(&plain);
            let mut sealed = Vec::new();
            keys.seal_blob(BlobType::Data.seal_type(), &id, &plain, &mut sealed);
            b.add(SealedBlob {
                ty: BlobType::Data,
                compression: Compression::None,
                id,
                raw_len: 1000,
                bytes: Bytes::from(sealed),
            });
        }
        let p = b.finish(keys).unwrap();
        (p.id, p.to_vec(), IndexPack::from_entries(p.id, &p.entries).blobs)
    }

    #[test]
    fn an_intact_pack_is_left_alone_and_a_missing_one_loses_every_blob() {
        let k = keys();
        let (id, data, blobs) = pack_of_three(&k);
        let s = salvage_pack(&k, &id, Some(&data), true, &blobs);
        assert_eq!(s.state, PackState::Intact);
        assert!(s.salvaged.is_empty() && s.lost.is_empty());
        let s = salvage_pack(&k, &id, None, true, &blobs);
        assert_eq!(s.state, PackState::Missing);
        assert_eq!(s.lost.len(), 3);
    }

    #[test]
    fn a_flipped_bit_loses_only_the_blob_it_hit() {
        let k = keys();
        let (id, mut data, blobs) = pack_of_three(&k);
        data[blobs[1].offset as usize + 40] ^= 0x10;
        let s = salvage_pack(&k, &id, Some(&data), true, &blobs);
        assert_eq!(s.state, PackState::Damaged("content does not match its name".into()));
        assert_eq!(s.lost, vec![blobs[1].id]);
        let saved: Vec<(Id, Vec<u8>)> = s.salvaged.into_iter().map(|(id, _, p)| (id, p)).collect();
        assert_eq!(saved, vec![(blobs[0].id, vec![0; 1000]), (blobs[2].id, vec![2; 1000])]);
    }

    #[test]
    fn a_truncated_pack_keeps_the_blobs_before_the_cut() {
        let k = keys();
        let (id, data, blobs) = pack_of_three(&k);
        let cut = blobs[2].offset as usize + 10;
        let s = salvage_pack(&k, &id, Some(&data[..cut]), true, &blobs);
        assert!(
            matches!(&s.state, PackState::Damaged(r) if r.starts_with(&format!("truncated to {cut} bytes"))),
            "{:?}",
            s.state
        );
        assert_eq!(s.lost, vec![blobs[2].id]);
        assert_eq!(s.salvaged.len(), 2);
        // A prefix of an oversized object is damaged by its size alone; what it holds is kept.
        let s = salvage_pack(&k, &id, Some(&data), false, &blobs);
        assert_eq!(s.state, PackState::Damaged("larger than any pack hoard writes".into()));
        assert_eq!(s.salvaged.len(), 3);
    }

    #[test]
    fn a_blob_swapped_for_another_of_the_same_length_is_lost() {
        let k = keys();
        let (id, mut data, blobs) = pack_of_three(&k);
        let (a, b) = (blobs[0].offset as usize, blobs[1].offset as usize);
        let len = blobs[0].stored_len as usize;
        let first = data[a..a + len].to_vec();
        data.copy_within(b..b + len, a);
        data[b..b + len].copy_from_slice(&first);
        let s = salvage_pack(&k, &id, Some(&data), true, &blobs);
        assert_eq!(s.lost, vec![blobs[0].id, blobs[1].id]);
        assert_eq!(s.salvaged.len(), 1);
    }
}
