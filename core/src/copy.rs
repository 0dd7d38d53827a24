//! `copy`: the same snapshots in a second repository (3-2-1), re-encrypted under its keys.
//!
//! Blob ids are keyed per repository, so every tree is rewritten with the target's ids; data is
//! deduplicated against what the target already holds. A snapshot counts as already copied when
//! the target has one with the same time, host, tags and component names and sources.
//! Writes follow the usual order (packs, index, snapshot) under a shared lock on the target.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::lock::LockGuard;
use crate::pack::BlobType;
use crate::repo::Repository;
use crate::snapshot::Snapshot;
use crate::tree::{Extent, Tree};
use crate::writer::{BlobSink, BlobWriter, WriterConfig};

fn same_snapshot(a: &Snapshot, b: &Snapshot) -> bool {
    a.time == b.time
        && a.host == b.host
        && a.tags == b.tags
        && a.components.len() == b.components.len()
        && a.components.iter().zip(&b.components).all(|(x, y)| x.name == y.name && x.source == y.source)
}

struct Copier<'a> {
    src: &'a Repository,
    sink: BlobSink,
    trees: HashMap<Id, Id>,
    blobs: HashMap<Id, Id>,
}

impl Copier<'_> {
    async fn add(&self, ty: BlobType, data: Vec<u8>) -> Result<Id> {
        let sink = self.sink.clone();
        tokio::task::spawn_blocking(move || sink.add_bytes(ty, Bytes::from(data)))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
    }

    fn copy_tree<'b>(
        &'b mut self,
        id: Id,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Id>> + Send + 'b>> {
        Box::pin(async move {
            if let Some(done) = self.trees.get(&id) {
                return Ok(*done);
            }
            let mut tree: Tree = self.src.load_tree(&id).await?;
            for node in &mut tree.nodes {
                if let Some(sub) = node.subtree {
                    node.subtree = Some(self.copy_tree(sub).await?);
                }
                for e in &mut node.content {
                    if let Extent::Data { id: bid, .. } = e {
                        let new = match self.blobs.get(bid) {
                            Some(n) => *n,
                            None => {
                                let data = self.src.read_blob(bid).await?;
                                let n = self.add(BlobType::Data, data).await?;
                                self.blobs.insert(*bid, n);
                                n
                            }
                        };
                        *bid = new;
                    }
                }
            }
            let new = self.add(BlobType::Tree, tree.encode()?).await?;
            self.trees.insert(id, new);
            Ok(new)
        })
    }
}

/// Copies the given snapshots (all when empty) from `src` to `dst`; returns (source id, new id)
/// for each snapshot copied now.
pub async fn copy(src: Arc<Repository>, dst: Arc<Repository>, only: &[Id]) -> Result<Vec<(Id, Id)>> {
    src.load_index().await?;
    let lock = LockGuard::acquire(Arc::clone(&dst), false).await?;
    dst.load_index().await?;
    let existing: Vec<Snapshot> = dst.list_snapshots().await?.into_iter().map(|(_, s)| s).collect();
    let todo: Vec<(Id, Snapshot)> = src
        .list_snapshots()
        .await?
        .into_iter()
        .filter(|(id, s)| (only.is_empty() || only.contains(id)) && !existing.iter().any(|e| same_snapshot(e, s)))
        .collect();
    let mut done = Vec::new();
    // Id translations survive across snapshots: they are indexed in `dst` once each writer finishes.
    let (mut trees, mut blobs) = (HashMap::new(), HashMap::new());
    for (sid, snap) in todo {
        let writer =
            BlobWriter::start(Arc::clone(&dst), WriterConfig { lease: Some(lock.lease()), ..WriterConfig::default() });
        let mut c = Copier {
            src: &src,
            sink: writer.sink(),
            trees: std::mem::take(&mut trees),
            blobs: std::mem::take(&mut blobs),
        };
        let mut new = snap.clone();
        let mut failed = None;
        for comp in &mut new.components {
            match c.copy_tree(comp.root).await {
                Ok(root) => comp.root = root,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Drop the sink before finishing: the writer's workers stop only when every sink is gone.
        let Copier { trees: t, blobs: b, sink, .. } = c;
        drop(sink);
        (trees, blobs) = (t, b);
        let finished = writer.finish().await;
        if let Some(e) = failed {
            let _ = lock.release().await;
            return Err(e);
        }
        finished?;
        new.parent = None;
        new.labels.insert("hoard.dev/copied-from".into(), sid.to_hex());
        lock.check()?;
        let nid = dst.save_snapshot(&new).await?;
        done.push((sid, nid));
    }
    lock.release().await?;
    Ok(done)
}
