//! Prune and index repair.
//!
//! Safety protocol (documented in docs/repository-format.md): prune and repair run under an
//! **exclusive lock**; writers hold shared locks with the lease rule of [`crate::lock`]. No
//! grace-period deletion is mixed in. Under the exclusive lock no writer can be between its
//! dedup lookup and its snapshot write without holding a fresh shared lock, so every blob that
//! no snapshot references is garbage.
//!
//! Order of effects, so that an interruption at any point loses nothing a snapshot references:
//! 1. repacked blobs are written to new packs, and an index file naming them is written;
//! 2. a new index file describing every kept pack is written, superseding all old index files;
//! 3. old index files are deleted;
//! 4. unused and repacked packs are deleted;
//! 5. on a local filesystem, staging files of killed writers (`…#n`, `packs/spool#n`) are
//!    removed: under the exclusive lock no live writer has one.
//!
//! [`plan`] is pure: it decides from blob usage and pack contents what to keep, repack and delete.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use crate::error::{Error, ObjectKind, Result};
use crate::id::Id;
use crate::index::{IndexFile, IndexPack, group_by_pack};
use crate::lock::LockGuard;
use crate::pack;
use crate::repo::{Repository, pack_key};
use crate::store::ObjectInfo;
use crate::tree::{Extent, NodeKind};
use crate::writer::{BlobWriter, WriterConfig};

/// What one pack holds, for planning.
#[derive(Debug, Clone)]
pub struct PackUsage {
    pub id: Id,
    /// (blob id, stored length, used?)
    pub blobs: Vec<(Id, u32, bool)>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PrunePlan {
    /// Packs kept as they are.
    pub keep: Vec<Id>,
    /// Packs whose used blobs are copied to new packs, then deleted.
    pub repack: Vec<Id>,
    /// Packs with no used blob (or in no index), deleted.
    pub delete: Vec<Id>,
    pub used_bytes: u64,
    pub unused_bytes: u64,
    /// Unused bytes that remain after the plan runs.
    pub unused_after: u64,
    pub repack_bytes: u64,
}

/// Plans a prune. Packs with no used blob are deleted. Partly used packs are repacked, most
/// wasteful first, until unused bytes left are at most `max_unused` × used bytes. A blob stored in
/// several packs counts as used once: later copies are unused.
pub fn plan(packs: &[PackUsage], unindexed: &[Id], max_unused: f64) -> PrunePlan {
    let mut p = PrunePlan::default();
    let mut partial: Vec<(Id, u64, u64)> = Vec::new(); // (pack, used, unused)
    for pk in packs {
        let used: u64 = pk.blobs.iter().filter(|b| b.2).map(|b| b.1 as u64).sum();
        let unused: u64 = pk.blobs.iter().filter(|b| !b.2).map(|b| b.1 as u64).sum();
        p.used_bytes += used;
        p.unused_bytes += unused;
        if used == 0 {
            p.delete.push(pk.id);
        } else if unused == 0 {
            p.keep.push(pk.id);
        } else {
            partial.push((pk.id, used, unused));
        }
    }
    p.delete.extend_from_slice(unindexed);
    let allowed = (p.used_bytes as f64 * max_unused.max(0.0)) as u64;
    let mut remaining: u64 = partial.iter().map(|x| x.2).sum();
    // Most wasteful (highest unused share) first; ties by id for a deterministic plan.
    partial.sort_by_key(|&(id, used, unused)| (std::cmp::Reverse(unused * 1_000_000 / (used + unused)), id));
    for (id, used, unused) in partial {
        if remaining > allowed {
            p.repack.push(id);
            p.repack_bytes += used;
            remaining -= unused;
        } else {
            p.keep.push(id);
        }
    }
    p.unused_after = remaining;
    p.keep.sort();
    p.repack.sort();
    p.delete.sort();
    p
}

#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    pub max_unused: f64,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneOutcome {
    pub plan: PrunePlan,
    pub packs_written: u64,
    pub index_files_removed: usize,
    pub packs_removed: usize,
    /// Staging files of interrupted writes removed (local filesystem repositories only).
    pub staging_files_removed: usize,
}

/// Every blob (data and tree) referenced by any snapshot; fails if any snapshot is damaged (its
/// blobs would otherwise count as unused).
pub async fn used_blobs(repo: &Repository) -> Result<HashSet<Id>> {
    let mut used = HashSet::new();
    let mut stack: Vec<Id> = Vec::new();
    for (_, s) in repo.list_snapshots_strict().await? {
        stack.extend(s.components.iter().map(|c| c.root));
    }
    while let Some(t) = stack.pop() {
        if !used.insert(t) {
            continue;
        }
        let tree = repo.load_tree(&t).await?;
        for n in &tree.nodes {
            if n.kind == NodeKind::Dir
                && let Some(sub) = n.subtree
            {
                stack.push(sub);
            }
            for e in &n.content {
                if let Extent::Data { id, .. } = e {
                    used.insert(*id);
                }
            }
        }
    }
    Ok(used)
}

/// Removes unreferenced data. Needs the exclusive lock; refuses when any snapshot is unreadable.
pub async fn prune(repo: Arc<Repository>, opts: PruneOptions) -> Result<PruneOutcome> {
    let lock = LockGuard::acquire(Arc::clone(&repo), true).await?;
    let r = prune_locked(&repo, &opts, &lock).await;
    let released = lock.release().await;
    let out = r?;
    released?;
    Ok(out)
}

async fn prune_locked(repo: &Arc<Repository>, opts: &PruneOptions, lock: &LockGuard) -> Result<PruneOutcome> {
    // Strict: packs a damaged index file names would look unindexed and be deleted.
    repo.load_index_strict().await?;
    let used = used_blobs(repo).await?;
    // Every index object present, not only the loaded ones: a file superseded by an index a
    // killed prune wrote (and did not get to delete) must be superseded and deleted again, or
    // it resurfaces once that newer index is replaced, naming packs deleted since.
    let old_index_files: Vec<Id> = repo.list_ids("index").await?;
    // Usage per pack; a blob's first indexed copy is the used one.
    let (packs, locations) = {
        let idx = repo.index();
        let mut by_pack: HashMap<Id, Vec<(Id, u32, bool)>> = HashMap::new();
        for p in idx.packs() {
            by_pack.entry(*p).or_default();
        }
        for (id, loc) in idx.iter() {
            by_pack.entry(loc.pack).or_default().push((id, loc.stored_len, used.contains(&id)));
        }
        let locs: HashMap<Id, crate::index::BlobLocation> = idx.iter().collect();
        (by_pack, locs)
    };
    for id in &used {
        if !locations.contains_key(id) {
            return Err(Error::Missing {
                kind: ObjectKind::Blob,
                name: format!("{} (referenced by a snapshot; run `hoard check`)", id.to_hex()),
            });
        }
    }
    let listed: HashSet<Id> = repo.list_ids("packs").await?.into_iter().collect();
    let usage: Vec<PackUsage> = packs
        .iter()
        .filter(|(id, _)| listed.contains(*id))
        .map(|(id, blobs)| PackUsage { id: *id, blobs: blobs.clone() })
        .collect();
    let indexed: HashSet<Id> = packs.keys().copied().collect();
    let unindexed: Vec<Id> = listed.iter().filter(|p| !indexed.contains(*p)).copied().collect();
    let plan = plan(&usage, &unindexed, opts.max_unused);
    let mut out = PruneOutcome { plan: plan.clone(), ..Default::default() };
    if opts.dry_run {
        return Ok(out);
    }

    // 1. Repack: copy used blobs of repacked packs through a fresh writer.
    let repack: HashSet<Id> = plan.repack.iter().copied().collect();
    let mut new_packs = IndexFile::default();
    if !repack.is_empty() {
        // A writer that dedups only against what it writes now.
        *repo.index_mut() = crate::index::MasterIndex::default();
        let writer =
            BlobWriter::start(Arc::clone(repo), WriterConfig { lease: Some(lock.lease()), ..WriterConfig::default() });
        let sink = writer.sink();
        for id in &used {
            let loc = locations[id];
            if !repack.contains(&loc.pack) {
                continue;
            }
            let sealed = repo
                .store()
                .get_range(&pack_key(&loc.pack), loc.offset as u64..loc.offset as u64 + loc.stored_len as u64)
                .await?;
            let plain = repo.unseal_blob(id, loc.ty, loc.compression, loc.raw_len, &sealed)?;
            let s2 = sink.clone();
            let id = *id;
            tokio::task::spawn_blocking(move || s2.add(loc.ty, id, Bytes::from(plain), None))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
        }
        drop(sink);
        let stats = writer.stats();
        writer.finish().await?;
        out.packs_written = stats.packs.load(std::sync::atomic::Ordering::Relaxed);
        // The in-memory index now holds exactly the new packs.
        new_packs.packs = group_by_pack(repo.index().iter());
    }

    // 2. One index for everything kept, superseding every old index file.
    let mut full = IndexFile { supersedes: old_index_files, packs: Vec::new() };
    let keep: HashSet<Id> = plan.keep.iter().copied().collect();
    let mut kept_blobs: HashSet<Id> = new_packs.packs.iter().flat_map(|p| p.blobs.iter().map(|b| b.id)).collect();
    // Every blob of a kept pack stays indexed, used or not (the pack is kept; listing costs
    // nothing); a blob the new packs already hold is listed once.
    full.packs = group_by_pack(
        locations
            .iter()
            .filter(|(id, loc)| keep.contains(&loc.pack) && kept_blobs.insert(**id))
            .map(|(id, loc)| (*id, *loc)),
    );
    full.packs.extend(new_packs.packs);
    // 3. Old index files.
    out.index_files_removed = supersede_index(repo, lock, full).await?;
    // 4. Packs.
    let doomed: Vec<Id> = plan.delete.iter().chain(plan.repack.iter()).copied().collect();
    let results: Vec<Result<()>> = futures::stream::iter(doomed)
        .map(|p| {
            let repo = Arc::clone(repo);
            async move { repo.store().delete(&pack_key(&p)).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r?;
        out.packs_removed += 1;
    }
    // 5. Staging files.
    if let Some(root) = repo.store().local_file("config").and_then(|c| c.parent().map(|p| p.to_path_buf())) {
        lock.check()?;
        out.staging_files_removed = tokio::task::spawn_blocking(move || remove_staging_files(&root))
            .await
            .map_err(|e| Error::Internal(format!("remove staging files: {e}")))??;
    }
    repo.load_index().await?;
    Ok(out)
}

/// Writes `full` (packs in any order) as the one index file that supersedes every file in its
/// `supersedes`, then deletes those; returns how many were deleted. Under the exclusive lock.
pub(crate) async fn supersede_index(repo: &Repository, lock: &LockGuard, mut full: IndexFile) -> Result<usize> {
    full.packs.sort_by_key(|p| p.id);
    lock.check()?;
    let new_index = repo.save_file("index", full.encode(repo.keys())?).await?;
    lock.check()?;
    let mut removed = 0;
    for f in &full.supersedes {
        if *f != new_index {
            repo.store().delete(&format!("index/{}", f.to_hex())).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Directory levels of a repository that hold objects (`packs/ab/<id>` is the deepest).
const OBJECT_DEPTH: usize = 2;

/// Removes the staging files (names with a `#`, which no object has) under a local repository's
/// `root`, down to [`OBJECT_DEPTH`] levels; returns how many.
fn remove_staging_files(root: &std::path::Path) -> Result<usize> {
    fn walk(dir: &std::path::Path, depth: usize, removed: &mut usize) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
            let kind = e.file_type().map_err(|err| Error::io(format!("stat {}", e.path().display()), err))?;
            if kind.is_dir() && depth < OBJECT_DEPTH {
                walk(&e.path(), depth + 1, removed)?;
            } else if kind.is_file() && e.file_name().to_string_lossy().contains('#') {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => *removed += 1,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => return Err(Error::io(format!("remove {}", e.path().display()), err)),
                }
            }
        }
        Ok(())
    }
    let mut removed = 0;
    walk(root, 0, &mut removed)?;
    Ok(removed)
}

/// Rebuilds the index from the pack headers: every pack in the store is read (header only) and
/// one new index file supersedes all old ones. Needs the exclusive lock.
pub async fn repair_index(repo: Arc<Repository>) -> Result<(usize, Vec<String>)> {
    let lock = LockGuard::acquire(Arc::clone(&repo), true).await?;
    let old: Vec<Id> = repo.list_ids("index").await?;
    let objs = repo.store().list("packs/").await?;
    let mut file = IndexFile { supersedes: old, packs: Vec::new() };
    let mut problems = Vec::new();
    let results: Vec<(String, Result<IndexPack>)> = futures::stream::iter(objs)
        .map(|o| {
            let repo = Arc::clone(&repo);
            async move {
                let r = read_pack_header(&repo, &o.key, o.size).await;
                (o.key, r)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for (key, r) in results {
        match r {
            Ok(p) => file.packs.push(p),
            Err(e) => problems.push(format!("{key}: {e} (left out of the index)")),
        }
    }
    let n = file.packs.len();
    supersede_index(&repo, &lock, file).await?;
    lock.release().await?;
    repo.load_index().await?;
    Ok((n, problems))
}

/// Largest orphan pack downloaded for adoption (packs are normally `pack_size`, at most one
/// blob of [`crate::pack::MAX_BLOB_LEN`] more).
const MAX_ADOPTED_PACK: u64 = 256 * 1024 * 1024;

/// Makes the loaded index agree with the packs the store holds, before a backup dedups against
/// it; returns how many packs were adopted.
///
/// * Index entries whose pack is not listed are dropped (their blobs are stored again): an
///   index file replayed into the bucket after a prune deleted its packs, or a pack deleted
///   by hand, must not make a backup reference data that is gone.
/// * Packs named by no index file — left by an interrupted backup — are indexed so the backup
///   reuses them instead of uploading their blobs again, but only after the whole pack was
///   downloaded and its BLAKE3 matched its name: a pack whose header decrypts but whose body was
///   swapped is not adopted. An unreadable or oversized one is left for `check` and `prune`.
pub async fn align_index_with_packs(repo: &Repository, lease: Option<&crate::lock::Lease>) -> Result<usize> {
    let objs: Vec<(Id, ObjectInfo)> = repo
        .store()
        .list("packs/")
        .await?
        .into_iter()
        .filter_map(|o| Some((o.key.rsplit('/').next().and_then(|n| Id::from_hex(n).ok())?, o)))
        .collect();
    let listed: HashMap<Id, u64> = objs.iter().map(|(id, o)| (*id, o.size)).collect();
    // Cheap first look at the copies the master index uses; on damage, every copy is judged.
    let suspect =
        repo.index().packs().any(|id| !listed.contains_key(id)) || !truncated_packs(&repo.index(), &listed).is_empty();
    let mut dropped: HashSet<Id> = HashSet::new();
    if suspect {
        let faults = repo.reload_index_without(|p| pack_fault(p, &listed)).await?;
        let missing = faults.values().filter(|f| **f == PackFault::Missing).count();
        if missing > 0 {
            tracing::warn!(
                "the index names {missing} pack(s) the repository does not hold; blobs with no other copy are \
                 stored again (run `hoard check`)"
            );
        }
        if faults.len() > missing {
            tracing::warn!(
                "{} pack(s) are shorter than the index says; blobs with no other copy are stored again \
                 (run `hoard check`, then `hoard repair packs`)",
                faults.len() - missing
            );
        }
        dropped = faults.into_keys().collect();
    }
    let known: HashSet<Id> = repo.index().packs().copied().collect();
    let orphans: Vec<ObjectInfo> =
        objs.into_iter().filter(|(id, _)| !known.contains(id) && !dropped.contains(id)).map(|(_, o)| o).collect();
    if orphans.is_empty() {
        return Ok(0);
    }
    let read: Vec<Result<IndexPack>> = futures::stream::iter(orphans)
        .map(|o| async move { read_verified_pack(repo, &o.key, o.size).await })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut file = IndexFile::default();
    for r in read {
        match r {
            Ok(p) => file.packs.push(p),
            Err(e) => tracing::warn!("leaving an unindexed pack alone: {e}"),
        }
    }
    let n = file.packs.len();
    if n > 0 {
        // Under the caller's lease: a prune that ran while we were frozen may have deleted them.
        let id = crate::writer::save_index_under_lease(repo, &file, lease).await?;
        repo.index_mut().add_file(id, &file);
    }
    Ok(n)
}

/// What is known wrong with an indexed pack without reading a byte of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackFault {
    /// Not listed by the store.
    Missing,
    /// Too short to hold the blobs the index places in it and the pack's 4-byte trailer.
    Truncated,
}

/// Pure: the fault of one indexed pack given the listed pack sizes, if any.
pub fn pack_fault(pack: &IndexPack, listed: &HashMap<Id, u64>) -> Option<PackFault> {
    let end = pack.blobs.iter().map(|b| b.offset as u64 + b.stored_len as u64 + 4).max().unwrap_or(0);
    match listed.get(&pack.id) {
        None => Some(PackFault::Missing),
        Some(size) if *size < end => Some(PackFault::Truncated),
        Some(_) => None,
    }
}

/// Pure: the listed packs too short for the blob copies the master index uses from them (the
/// cheap check on every backup; [`pack_fault`] then judges every copy).
fn truncated_packs(index: &crate::index::MasterIndex, listed: &HashMap<Id, u64>) -> HashSet<Id> {
    let mut needed: HashMap<Id, u64> = HashMap::new();
    for (_, loc) in index.iter() {
        let end = needed.entry(loc.pack).or_default();
        *end = (*end).max(loc.offset as u64 + loc.stored_len as u64 + 4);
    }
    needed.into_iter().filter(|(p, end)| listed.get(p).is_some_and(|size| size < end)).map(|(p, _)| p).collect()
}

/// The id a pack's key names, if the key and size can be a pack at all.
fn pack_name(key: &str, size: u64) -> Result<Id> {
    let id = key
        .rsplit('/')
        .next()
        .and_then(|n| Id::from_hex(n).ok())
        .ok_or_else(|| Error::corrupt(ObjectKind::Pack, key, "bad name"))?;
    if size < 4 {
        return Err(Error::corrupt(ObjectKind::Pack, key, "too short"));
    }
    Ok(id)
}

/// Reads a pack's header only (two ranged reads): `repair index` over every pack. Unlike
/// adoption it does not check the body; `check --read-data` does.
async fn read_pack_header(repo: &Repository, key: &str, size: u64) -> Result<IndexPack> {
    let id = pack_name(key, size)?;
    let trailer = repo.store().get_range(key, size - 4..size).await?;
    let range = pack::header_range(size, &trailer)?;
    let sealed = repo.store().get_range(key, range.clone()).await?;
    let entries = pack::decode_header(repo.keys(), key, &sealed, size)?;
    Ok(IndexPack::from_entries(id, &entries))
}

/// Downloads a whole pack, checks that it hashes to its name, and reads its header.
async fn read_verified_pack(repo: &Repository, key: &str, size: u64) -> Result<IndexPack> {
    let id = pack_name(key, size)?;
    if size > MAX_ADOPTED_PACK {
        return Err(Error::corrupt(
            ObjectKind::Pack,
            key,
            format!("{size} bytes is larger than any pack hoard writes"),
        ));
    }
    let bytes = repo.store().get(key).await?;
    if bytes.len() as u64 != size || Id::of_bytes(&bytes) != id {
        return Err(Error::corrupt(ObjectKind::Pack, key, "content does not match its name"));
    }
    let trailer = &bytes[bytes.len() - 4..];
    let range = pack::header_range(size, trailer)?;
    let sealed = &bytes[range.start as usize..range.end as usize];
    let entries = pack::decode_header(repo.keys(), key, sealed, size)?;
    Ok(IndexPack::from_entries(id, &entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pk(n: u8, blobs: &[(u32, bool)]) -> PackUsage {
        PackUsage {
            id: Id([n; 32]),
            blobs: blobs
                .iter()
                .enumerate()
                .map(|(i, (l, u))| (Id([n.wrapping_mul(16).wrapping_add(i as u8); 32]), *l, *u))
                .collect(),
        }
    }

    #[test]
    fn deletes_unused_keeps_full_repacks_waste_beyond_threshold() {
        let packs = vec![
            pk(1, &[(100, true), (100, true)]),
            pk(2, &[(100, false)]),
            pk(3, &[(10, true), (90, false)]),
            pk(4, &[(90, true), (10, false)]),
        ];
        let p = plan(&packs, &[Id([9; 32])], 0.0);
        assert_eq!(p.delete, vec![Id([2; 32]), Id([9; 32])]);
        assert_eq!(p.repack, vec![Id([3; 32]), Id([4; 32])]);
        assert_eq!(p.keep, vec![Id([1; 32])]);
        assert_eq!(p.unused_after, 0);
        // Allowing 50% waste keeps the slightly wasteful pack.
        let p = plan(&packs, &[], 0.5);
        assert!(p.keep.contains(&Id([4; 32])) && p.keep.contains(&Id([3; 32])));
        assert!(p.unused_after <= (p.used_bytes as f64 * 0.5) as u64);
    }

    #[test]
    fn a_pack_shorter_than_its_last_blob_and_trailer_is_truncated() {
        let blob = |n: u8, offset: u32| crate::index::IndexBlob {
            id: Id([n; 32]),
            ty: pack::BlobType::Data,
            compression: pack::Compression::None,
            offset,
            stored_len: 100,
            raw_len: 84,
        };
        let mut index = crate::index::MasterIndex::default();
        index.add_pack(&IndexPack { id: Id([1; 32]), blobs: vec![blob(10, 0), blob(11, 100)] });
        index.add_pack(&IndexPack { id: Id([2; 32]), blobs: vec![blob(20, 0)] });
        // Pack 1 needs 204 bytes, pack 2 needs 104; pack 3 is in no index.
        let listed = |a: u64, b: u64| HashMap::from([(Id([1; 32]), a), (Id([2; 32]), b), (Id([3; 32]), 1)]);
        assert!(truncated_packs(&index, &listed(204, 104)).is_empty());
        assert_eq!(truncated_packs(&index, &listed(203, 104)), HashSet::from([Id([1; 32])]));
        assert_eq!(truncated_packs(&index, &listed(300, 50)), HashSet::from([Id([2; 32])]));
        // A missing pack is not truncated (it is handled as missing).
        assert!(truncated_packs(&index, &HashMap::new()).is_empty());
        let pack = IndexPack { id: Id([1; 32]), blobs: vec![blob(10, 0), blob(11, 100)] };
        assert_eq!(pack_fault(&pack, &listed(204, 0)), None);
        assert_eq!(pack_fault(&pack, &listed(203, 0)), Some(PackFault::Truncated));
        assert_eq!(pack_fault(&pack, &HashMap::new()), Some(PackFault::Missing));
    }

    #[test]
    fn most_wasteful_pack_is_repacked_first() {
        let packs = vec![pk(1, &[(50, true), (50, false)]), pk(2, &[(10, true), (90, false)])];
        let p = plan(&packs, &[], 0.9);
        assert_eq!(p.repack, vec![Id([2; 32])]);
        assert_eq!(p.keep, vec![Id([1; 32])]);
    }
}
