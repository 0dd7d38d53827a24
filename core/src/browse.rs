//! Looking inside snapshots: resolve `/component/path`, walk trees, compare two snapshots.
//!
//! Paths inside a snapshot are `/<component>/<path below the component root>`.

use std::future::Future;
use std::pin::Pin;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;
use crate::snapshot::Snapshot;
use crate::tree::{Node, NodeKind, Tree};

/// What a snapshot path names.
#[derive(Debug, Clone)]
pub enum Located {
    /// A component root: its tree.
    Root { component: String, tree: Id },
    /// An entry below a component root.
    Node { path: String, node: Node },
}

/// Resolves a snapshot path. A bare component name (no leading `/`) is accepted too.
pub async fn locate(repo: &Repository, snap: &Snapshot, path: &str) -> Result<Located> {
    let trimmed = path.trim_matches('/');
    let mut parts = trimmed.split('/').filter(|p| !p.is_empty());
    let Some(comp_name) = parts.next() else {
        return Err(Error::PathNotFound(path.to_string()));
    };
    let comp = snap.component(comp_name).ok_or_else(|| Error::PathNotFound(path.to_string()))?;
    let rest: Vec<&str> = parts.collect();
    if rest.is_empty() {
        return Ok(Located::Root { component: comp.name.clone(), tree: comp.root });
    }
    let mut tree = repo.load_tree(&comp.root).await?;
    let mut cur_path = format!("/{}", comp.name);
    for (i, part) in rest.iter().enumerate() {
        let node = tree.find(part.as_bytes()).cloned().ok_or_else(|| Error::PathNotFound(path.to_string()))?;
        cur_path.push('/');
        cur_path.push_str(part);
        if i + 1 == rest.len() {
            return Ok(Located::Node { path: cur_path, node });
        }
        match (node.kind, node.subtree) {
            (NodeKind::Dir, Some(sub)) => tree = repo.load_tree(&sub).await?,
            _ => return Err(Error::PathNotFound(path.to_string())),
        }
    }
    Err(Error::PathNotFound(path.to_string()))
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Visits every node below `tree` depth-first in name order, with its full snapshot path.
pub fn walk<'a, F>(repo: &'a Repository, tree: Id, prefix: String, visit: &'a mut F) -> BoxFut<'a, Result<()>>
where
    F: FnMut(&str, &Node) + Send,
{
    Box::pin(async move {
        let t = repo.load_tree(&tree).await?;
        for node in &t.nodes {
            let path = format!("{prefix}/{}", node.name_lossy());
            visit(&path, node);
            if let (NodeKind::Dir, Some(sub)) = (node.kind, node.subtree) {
                walk(repo, sub, path, visit).await?;
            }
        }
        Ok(())
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Modified,
    /// Same content, other metadata.
    Metadata,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiffEntry {
    pub change: Change,
    pub path: String,
}

fn same_meta(a: &Node, b: &Node) -> bool {
    a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.mtime == b.mtime && a.xattrs == b.xattrs
}

/// Differences between two trees (either may be absent), recursing only where subtrees differ.
pub fn diff<'a>(
    repo: &'a Repository,
    a: Option<Id>,
    b: Option<Id>,
    prefix: String,
    out: &'a mut Vec<DiffEntry>,
) -> BoxFut<'a, Result<()>> {
    Box::pin(async move {
        if a == b {
            return Ok(());
        }
        let ta = match a {
            Some(id) => repo.load_tree(&id).await?,
            None => Tree::default(),
        };
        let tb = match b {
            Some(id) => repo.load_tree(&id).await?,
            None => Tree::default(),
        };
        let (mut i, mut j) = (0, 0);
        while i < ta.nodes.len() || j < tb.nodes.len() {
            let na = ta.nodes.get(i);
            let nb = tb.nodes.get(j);
            let ord = match (na, nb) {
                (Some(x), Some(y)) => x.name.cmp(&y.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match ord {
                std::cmp::Ordering::Less => {
                    let n = &ta.nodes[i];
                    let p = format!("{prefix}/{}", n.name_lossy());
                    out.push(DiffEntry { change: Change::Removed, path: p.clone() });
                    if n.kind == NodeKind::Dir {
                        diff(repo, n.subtree, None, p, out).await?;
                    }
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    let n = &tb.nodes[j];
                    let p = format!("{prefix}/{}", n.name_lossy());
                    out.push(DiffEntry { change: Change::Added, path: p.clone() });
                    if n.kind == NodeKind::Dir {
                        diff(repo, None, n.subtree, p, out).await?;
                    }
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (x, y) = (&ta.nodes[i], &tb.nodes[j]);
                    let p = format!("{prefix}/{}", x.name_lossy());
                    if x.kind != y.kind {
                        out.push(DiffEntry { change: Change::Removed, path: p.clone() });
                        out.push(DiffEntry { change: Change::Added, path: p });
                    } else if x.kind == NodeKind::Dir {
                        if !same_meta(x, y) {
                            out.push(DiffEntry { change: Change::Metadata, path: p.clone() });
                        }
                        diff(repo, x.subtree, y.subtree, p, out).await?;
                    } else if x.content != y.content || x.link_target != y.link_target || x.rdev != y.rdev {
                        out.push(DiffEntry { change: Change::Modified, path: p });
                    } else if !same_meta(x, y) {
                        out.push(DiffEntry { change: Change::Metadata, path: p });
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        Ok(())
    })
}
