//! `check`: verifies a repository's structure and, optionally, every byte of its data.
//!
//! Structure: config (by opening), locks (stale ones are counted, not errors), every key slot (each decoded and its structure validated, a
//! bad one named `keys/<id>`; the slot that opened the repository is known good), every index file, every pack the index names exists
//! and is large enough, every snapshot decodes, every tree decodes, every blob a tree names is
//! indexed. With `read_data` (or a subset), packs are downloaded, their hash checked against
//! their name, their header compared with the index, and every blob decrypted and verified.
//! Damage is mapped back to the snapshots and file paths it affects.
//!
//! Reports problems; never modifies the repository.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;

use crate::crypto::{KeySlot, SEAL_OVERHEAD};
use crate::error::{Error, ObjectKind, Result};
use crate::id::Id;
use crate::index::{IndexFile, MasterIndex};
use crate::pack::{self, BlobType};
use crate::repo::{Repository, pack_key};
use crate::tree::{Extent, NodeKind, Tree};

#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Fraction of packs (0.0..=1.0) whose data is read and verified.
    pub read_data_fraction: f64,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The damaged object, e.g. `packs/ab/ab12…`, `index/…`, `snapshots/…`, `blob …`.
    pub object: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub errors: Vec<Problem>,
    /// Not damage: packs no index names (left by an interrupted backup), removable by prune.
    pub unreferenced_packs: Vec<String>,
    /// `snapshot id → file paths` whose data is affected by the errors.
    pub affected: Vec<(String, Vec<String>)>,
    pub snapshots: usize,
    pub trees: usize,
    pub packs: usize,
    pub packs_read: usize,
    /// Directory trees no snapshot reaches: a snapshot was forgotten or deleted. Not damage by
    /// itself, but the only trace a deleted snapshot leaves.
    pub unreferenced_trees: usize,
    /// Those of `unreferenced_trees` stored in packs that also hold referenced blobs. Prune
    /// keeps such a pack, with its unused blobs, while the repository's unused space stays
    /// within `--max-unused`, so these remain after `forget --prune`. The others are in packs
    /// holding nothing referenced, which any prune deletes.
    pub unreferenced_trees_in_used_packs: usize,
    pub blobs_read: usize,
    /// Locks held now, and those of them that are stale: left by a process that died or was
    /// killed (not damage; `unlock` removes them, and they block no one for long).
    pub locks: usize,
    pub stale_locks: usize,
    pub suggestion: Option<String>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

fn chance(fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    if fraction <= 0.0 {
        return false;
    }
    // Random per run: a different sample each time covers the repository over runs.
    let mut r = [0u8; 8];
    crate::crypto::fill_random(&mut r);
    (u64::from_le_bytes(r) as f64 / u64::MAX as f64) < fraction
}

pub async fn check(repo: Arc<Repository>, opts: CheckOptions) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let conc = opts.concurrency.max(1);

    // Every key slot, not only the one that opened the repository: a damaged spare slot is a
    // password that no longer works.
    for (id, slot) in repo.list_keys().await? {
        let problem = match slot {
            Err(e) => Some(e.to_string()),
            Ok(s) => slot_problem(&s),
        };
        if let Some(message) = problem {
            report.errors.push(Problem { object: format!("keys/{}", id.to_hex()), message });
        }
    }

    let now = chrono::Utc::now();
    for (_, info) in crate::lock::list_locks(&repo).await? {
        report.locks += 1;
        // An undecodable lock counts as stale, as `unlock` treats it.
        if info.is_ok_and(|i| !i.is_stale(now, &crate::lock::LockTimes::default())) {
            continue;
        }
        report.stale_locks += 1;
    }

    // Index files, one by one, so one damaged file does not hide the others.
    let mut index = MasterIndex::default();
    let mut files: Vec<(Id, IndexFile)> = Vec::new();
    for (id, size) in repo.list_sized("index").await? {
        let name = format!("index/{}", id.to_hex());
        match repo.load_listed(ObjectKind::Index, "index", &id, size, crate::index::MAX_INDEX_LEN).await {
            Ok(raw) => match IndexFile::decode(repo.keys(), &name, &raw) {
                Ok(f) => files.push((id, f)),
                Err(e) => report.errors.push(Problem { object: name, message: e.to_string() }),
            },
            Err(e) => report.errors.push(Problem { object: name, message: e.to_string() }),
        }
    }
    // Superseded files (an interrupted prune or repair) are ignored, as readers do.
    let superseded: HashSet<Id> = files.iter().flat_map(|(_, f)| f.supersedes.iter().copied()).collect();
    files.retain(|(id, _)| !superseded.contains(id));
    files.sort_by_key(|(id, _)| *id);
    for (id, f) in &files {
        index.add_file(*id, f);
    }
    // Packs: present and big enough for what the index says.
    let listed: HashMap<String, u64> =
        repo.store().list("packs/").await?.into_iter().map(|o| (o.key, o.size)).collect();
    // Every copy of every blob, not only the first one the master index keeps: a damaged pack
    // whose blobs also live elsewhere is still damage to report and repair.
    let mut needed_len: HashMap<Id, u64> = HashMap::new();
    for p in files.iter().flat_map(|(_, f)| &f.packs) {
        let end = p.blobs.iter().map(|b| b.offset as u64 + b.stored_len as u64).max().unwrap_or(0);
        let e = needed_len.entry(p.id).or_default();
        *e = (*e).max(end);
    }
    let mut missing_packs = HashSet::new();
    for (pack, need) in &needed_len {
        let key = pack_key(pack);
        match listed.get(&key) {
            None => {
                missing_packs.insert(*pack);
                report.errors.push(Problem { object: key, message: "pack is missing (the index names it)".into() });
            }
            Some(size) if *size < need + 4 => {
                missing_packs.insert(*pack);
                report.errors.push(Problem { object: key, message: format!("pack is truncated ({size} bytes)") });
            }
            _ => {}
        }
    }
    let indexed: HashSet<String> = needed_len.keys().map(pack_key).collect();
    report.unreferenced_packs = listed.keys().filter(|k| !indexed.contains(*k)).cloned().collect();
    report.unreferenced_packs.sort();
    report.packs = listed.len();

    // Snapshots and trees.
    let mut snapshots = Vec::new();
    for id in repo.list_ids("snapshots").await? {
        match repo.load_snapshot(&id).await {
            Ok(s) => snapshots.push((id, s)),
            Err(e) => {
                report.errors.push(Problem { object: format!("snapshots/{}", id.to_hex()), message: e.to_string() })
            }
        }
    }
    report.snapshots = snapshots.len();
    // Install the index we built so tree reads use it.
    *repo.index_mut() = index;

    // Data check before the tree walk, so damaged blobs can be mapped to files in one pass.
    let mut bad_blobs: HashSet<Id> = HashSet::new();
    if opts.read_data_fraction > 0.0 {
        let packs: Vec<Id> = needed_len
            .keys()
            .filter(|p| !missing_packs.contains(*p) && chance(opts.read_data_fraction))
            .copied()
            .collect();
        let expected: HashMap<Id, Vec<(Id, crate::index::BlobLocation)>> = {
            let idx = repo.index();
            let mut m: HashMap<Id, Vec<_>> = HashMap::new();
            for (id, loc) in idx.iter() {
                m.entry(loc.pack).or_default().push((id, loc));
            }
            m
        };
        let results: Vec<(Id, Vec<Problem>, Vec<Id>, usize)> = futures::stream::iter(packs)
            .map(|p| {
                let repo = Arc::clone(&repo);
                let blobs = expected.get(&p).cloned().unwrap_or_default();
                async move { read_pack(&repo, p, blobs).await }
            })
            .buffer_unordered(conc)
            .collect()
            .await;
        for (_, problems, bad, n) in results {
            report.packs_read += 1;
            report.blobs_read += n;
            report.errors.extend(problems);
            bad_blobs.extend(bad);
        }
    }
    for p in &missing_packs {
        let idx = repo.index();
        bad_blobs.extend(idx.iter().filter(|(_, l)| l.pack == *p).map(|(id, _)| id));
    }

    // Walk every tree once; map missing or bad blobs to snapshot paths.
    let mut affected: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut seen: HashSet<Id> = HashSet::new();
    // Packs holding a referenced data blob (trees are added after the walk).
    let mut used_packs: HashSet<Id> = HashSet::new();
    let mut stack: Vec<(Id, String, String)> = Vec::new();
    for (sid, snap) in &snapshots {
        for c in &snap.components {
            stack.push((c.root, sid.to_hex(), format!("/{}", c.name)));
        }
    }
    while let Some((tree_id, sid, path)) = stack.pop() {
        let first_visit = seen.insert(tree_id);
        let tree: Tree = match repo.load_tree(&tree_id).await {
            Ok(t) => t,
            Err(e) => {
                if first_visit {
                    report
                        .errors
                        .push(Problem { object: format!("tree {}", tree_id.to_hex()), message: e.to_string() });
                }
                affected.entry(sid.clone()).or_default().insert(format!("{path} (directory listing)"));
                continue;
            }
        };
        if first_visit {
            report.trees += 1;
        }
        for node in &tree.nodes {
            let p = format!("{path}/{}", node.name_lossy());
            match node.kind {
                NodeKind::Dir => {
                    if let Some(sub) = node.subtree {
                        // Revisit shared subtrees only when damage exists, to name paths per snapshot.
                        if !seen.contains(&sub) || !bad_blobs.is_empty() || !report.errors.is_empty() {
                            stack.push((sub, sid.clone(), p));
                        }
                    }
                }
                NodeKind::File => {
                    for e in &node.content {
                        if let Extent::Data { id, .. } = e {
                            let indexed = repo.index().get(id);
                            if let Some(loc) = &indexed {
                                used_packs.insert(loc.pack);
                            }
                            match indexed {
                                None => {
                                    if first_visit {
                                        report.errors.push(Problem {
                                            object: format!("blob {}", id.to_hex()),
                                            message: format!("missing from the index (used by {p})"),
                                        });
                                    }
                                    affected.entry(sid.clone()).or_default().insert(p.clone());
                                    break;
                                }
                                Some(_) if bad_blobs.contains(id) => {
                                    affected.entry(sid.clone()).or_default().insert(p.clone());
                                    break;
                                }
                                _ => {}
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    {
        let idx = repo.index();
        used_packs.extend(seen.iter().filter_map(|t| idx.get(t)).map(|l| l.pack));
        for (id, l) in idx.iter() {
            if l.ty == BlobType::Tree && !seen.contains(&id) {
                report.unreferenced_trees += 1;
                if used_packs.contains(&l.pack) {
                    report.unreferenced_trees_in_used_packs += 1;
                }
            }
        }
    }
    report.affected = affected.into_iter().map(|(s, p)| (s, p.into_iter().collect())).collect();
    report.affected.sort();
    report.errors.sort();
    report.errors.dedup();
    report.suggestion = advice(&report.errors);
    Ok(report)
}

/// Pure: the commands that heal the damage `errors` describe, in the order to run them.
pub fn advice(errors: &[Problem]) -> Option<String> {
    let any = |f: &dyn Fn(&Problem) -> bool| errors.iter().any(f);
    let index = any(&|p| p.object.starts_with("index/"));
    let unindexed = any(&|p| p.message.starts_with("missing from the index"));
    let packs =
        any(&|p| p.object.starts_with("packs/") || p.object.starts_with("blob ") && p.message.starts_with("damaged"));
    let trees = any(&|p| p.object.starts_with("tree "));
    let snapshots = any(&|p| p.object.starts_with("snapshots/"));
    let keys = any(&|p| p.object.starts_with("keys/"));
    let mut steps: Vec<&str> = Vec::new();
    if index || unindexed {
        steps.push("`hoard repair index` rebuilds the index from the packs");
    }
    if packs || trees {
        steps.push(
            "`hoard repair packs` keeps what damaged or missing packs still hold and drops the rest from the index",
        );
    }
    if packs || trees || unindexed {
        steps.push(
            "back up the same sources again: what was lost is stored anew, and the snapshots listed above become whole again",
        );
        steps.push(
            "for a source that is gone, `hoard repair snapshots --forget` rewrites its snapshots without the lost files (tagged `repaired`)",
        );
    }
    if snapshots {
        steps.push("an unreadable snapshot file cannot be repaired: `hoard forget <id>` removes it");
    }
    if keys {
        steps.push(
            "a damaged key slot is a password that no longer opens the repository: `hoard key remove <id>` removes it",
        );
    }
    if steps.is_empty() {
        return None;
    }
    let numbered: Vec<String> = steps.iter().enumerate().map(|(i, s)| format!("{}. {s}", i + 1)).collect();
    Some(numbered.join("; "))
}

/// Pure: why a decoded key slot cannot be opened by any password, if it cannot.
pub fn slot_problem(slot: &KeySlot) -> Option<String> {
    if slot.version != 1 {
        return Some(format!("unsupported key slot version {}", slot.version));
    }
    if !(16..=64).contains(&slot.salt.len()) {
        return Some(format!("salt of {} bytes (16..=64 expected)", slot.salt.len()));
    }
    if slot.wrapped.len() != 32 + SEAL_OVERHEAD {
        return Some(format!("wrapped key of {} bytes ({} expected)", slot.wrapped.len(), 32 + SEAL_OVERHEAD));
    }
    if let Err(e) = slot.kdf.validate() {
        return Some(format!("key derivation parameters: {e}"));
    }
    None
}

async fn read_pack(
    repo: &Repository,
    pack: Id,
    blobs: Vec<(Id, crate::index::BlobLocation)>,
) -> (Id, Vec<Problem>, Vec<Id>, usize) {
    let key = pack_key(&pack);
    let mut problems = Vec::new();
    let all_bad = || blobs.iter().map(|(id, _)| *id).collect::<Vec<_>>();
    let data = match repo.store().get(&key).await {
        Ok(d) => d,
        Err(e) => {
            problems.push(Problem { object: key, message: e.to_string() });
            return (pack, problems, all_bad(), 0);
        }
    };
    if Id::of_bytes(&data) != pack {
        problems.push(Problem { object: key.clone(), message: "content does not match its name".into() });
    }
    // The header must agree with the index.
    match pack::header_range(data.len() as u64, &data[data.len().saturating_sub(4)..]) {
        Ok(r) => {
            match pack::decode_header(repo.keys(), &key, &data[r.start as usize..r.end as usize], data.len() as u64) {
                Ok(entries) => {
                    let in_header: HashMap<Id, (u32, u32)> =
                        entries.iter().map(|e| (e.id, (e.offset, e.stored_len))).collect();
                    for (id, loc) in &blobs {
                        if in_header.get(id) != Some(&(loc.offset, loc.stored_len)) {
                            problems.push(Problem {
                                object: key.clone(),
                                message: format!("header does not list blob {} where the index says", id.short()),
                            });
                        }
                    }
                }
                Err(e) => problems.push(Problem { object: key.clone(), message: format!("header: {e}") }),
            }
        }
        Err(e) => problems.push(Problem { object: key.clone(), message: format!("header: {e}") }),
    }
    let mut bad = Vec::new();
    let mut n = 0;
    for (id, loc) in &blobs {
        let start = loc.offset as usize;
        let end = start + loc.stored_len as usize;
        n += 1;
        let ok =
            end <= data.len() && repo.unseal_blob(id, loc.ty, loc.compression, loc.raw_len, &data[start..end]).is_ok();
        if !ok {
            bad.push(*id);
            problems.push(Problem { object: format!("blob {}", id.to_hex()), message: format!("damaged (in {key})") });
        }
    }
    (pack, problems, bad, n)
}

/// Why `check` found the repository damaged, as an error for callers that need one.
pub fn into_result(report: &CheckReport) -> Result<()> {
    if report.is_ok() {
        Ok(())
    } else {
        Err(Error::corrupt(ObjectKind::Pack, "repository", format!("{} problems found", report.errors.len())))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::crypto::{KdfParams, SecretKey};

    fn problem(object: &str, message: &str) -> Problem {
        Problem { object: object.into(), message: message.into() }
    }

    #[test]
    fn advice_names_the_command_for_each_kind_of_damage() {
        assert_eq!(advice(&[]), None);
        let bit_flip = advice(&[problem("blob ab", "damaged (in packs/ab/ab12)")]).unwrap();
        assert!(bit_flip.starts_with("1. `hoard repair packs`") && bit_flip.contains("2. back up"), "{bit_flip}");
        let truncated = advice(&[problem("packs/ab/ab12", "pack is truncated (10 bytes)")]).unwrap();
        assert!(truncated.starts_with("1. `hoard repair packs`") && !truncated.contains("repair index"), "{truncated}");
        let missing = advice(&[problem("packs/ab/ab12", "pack is missing (the index names it)")]).unwrap();
        assert_eq!(missing, truncated);
        let index = advice(&[problem("index/cd34", "index cd34 is damaged: authentication failed")]).unwrap();
        assert!(index.starts_with("1. `hoard repair index`") && !index.contains("repair packs"), "{index}");
        let both = advice(&[problem("index/cd34", "x"), problem("blob ab", "damaged (in packs/ab/ab12)")]).unwrap();
        assert!(both.find("repair index").unwrap() < both.find("repair packs").unwrap(), "{both}");
        let unindexed = advice(&[problem("blob ab", "missing from the index (used by /c/f)")]).unwrap();
        assert!(unindexed.contains("repair index") && unindexed.contains("repair snapshots"), "{unindexed}");
        assert!(advice(&[problem("snapshots/ef", "undecodable")]).unwrap().contains("hoard forget"));
        assert!(advice(&[problem("keys/12", "salt of 3 bytes")]).unwrap().contains("hoard key remove"));
    }

    #[test]
    fn a_well_formed_slot_passes_and_each_structural_fault_is_named() {
        let kdf = KdfParams { memory_kib: 8 * 1024, iterations: 1, ..KdfParams::default() };
        let good = KeySlot::wrap(&SecretKey::random(), b"pw", &Id([1; 32]), kdf).unwrap();
        assert_eq!(slot_problem(&good), None);
        let mut s = good.clone();
        s.version = 2;
        assert!(slot_problem(&s).unwrap().contains("version"));
        let mut s = good.clone();
        s.salt.truncate(4);
        assert!(slot_problem(&s).unwrap().contains("salt"));
        let mut s = good.clone();
        s.wrapped.pop();
        assert!(slot_problem(&s).unwrap().contains("wrapped key"));
        let mut s = good;
        s.kdf.iterations = 0;
        assert!(slot_problem(&s).unwrap().contains("key derivation"));
    }
}
