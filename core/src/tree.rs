//! Trees: one directory listing per blob (type `Tree`), deduplicated like data.
//!
//! A tree is the postcard encoding of [`Tree`]. Names are raw bytes (non-UTF-8 names survive).
//! Decoding validates what restore relies on: every name is a single path component (no `/`,
//! no NUL, not `.` or `..`, not empty), names are strictly increasing (unique), directories
//! name a subtree, and file extents add up to the file size.

/// Directory levels below a root that backup, restore and the metadata scan go into. Each
/// level costs a walk one descriptor and one stack frame; a deeper directory is left out with a
/// warning naming it, so a depth bomb in a volume or a crafted snapshot cannot exhaust either.
pub const MAX_DEPTH: usize = 4096;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ObjectKind, Result};
use crate::id::Id;

/// Largest tree blob a reader accepts.
pub const MAX_TREE_LEN: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// A piece of a file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Extent {
    /// Bytes stored as a data blob.
    Data { id: Id, len: u32 },
    /// Zero bytes, restored as a hole.
    Hole { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { len, .. } => *len as u64,
            Extent::Hole { len } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission bits and set-id/sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub inode: u64,
    pub device: u64,
    pub links: u64,
    /// Device number of character and block devices.
    pub rdev: u64,
    pub link_target: Option<serde_bytes::ByteBuf>,
    pub xattrs: Vec<Xattr>,
    pub content: Vec<Extent>,
    pub subtree: Option<Id>,
}

impl Node {
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    pub fn new(name: Vec<u8>, kind: NodeKind) -> Node {
        Node {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            inode: 0,
            device: 0,
            links: 1,
            rdev: 0,
            link_target: None,
            xattrs: Vec::new(),
            content: Vec::new(),
            subtree: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

/// Whether `name` is one safe path component.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

impl Tree {
    /// Sorts nodes by name; callers add nodes in any order.
    pub fn sort(&mut self) {
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        postcard::to_stdvec(self).map_err(|e| Error::Internal(format!("encode tree: {e}")))
    }

    pub fn decode(id: &Id, data: &[u8]) -> Result<Tree> {
        let bad = |r: String| Error::corrupt(ObjectKind::Blob, format!("tree {}", id.short()), r);
        if data.len() > MAX_TREE_LEN {
            return Err(bad("tree blob too large".into()));
        }
        let tree: Tree = postcard::from_bytes(data).map_err(|e| bad(format!("undecodable: {e}")))?;
        tree.validate().map_err(bad)?;
        Ok(tree)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut prev: Option<&[u8]> = None;
        for n in &self.nodes {
            if !valid_name(&n.name) {
                return Err(format!("unsafe entry name {:?}", n.name_lossy()));
            }
            if prev.is_some_and(|p| p >= n.name.as_slice()) {
                return Err(format!("entry {:?} out of order or duplicated", n.name_lossy()));
            }
            prev = Some(&n.name);
            match n.kind {
                NodeKind::Dir if n.subtree.is_none() => {
                    return Err(format!("directory {:?} has no subtree", n.name_lossy()));
                }
                NodeKind::File => {
                    let sum = n.content.iter().try_fold(0u64, |acc, e| acc.checked_add(e.len()));
                    if sum != Some(n.size) {
                        return Err(format!("file {:?}: extents do not add up to its size", n.name_lossy()));
                    }
                }
                NodeKind::Symlink if n.link_target.is_none() => {
                    return Err(format!("symlink {:?} has no target", n.name_lossy()));
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok().map(|i| &self.nodes[i])
    }

    pub fn find_mut(&mut self, name: &[u8]) -> Option<&mut Node> {
        self.nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok().map(|i| &mut self.nodes[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_unsafe_names_and_duplicates() {
        for bad in [&b".."[..], b".", b"a/b", b"", b"a\0"] {
            let t = Tree { nodes: vec![Node::new(bad.to_vec(), NodeKind::Fifo)] };
            assert!(t.validate().is_err(), "{bad:?}");
        }
        let t =
            Tree { nodes: vec![Node::new(b"a".to_vec(), NodeKind::Fifo), Node::new(b"a".to_vec(), NodeKind::Fifo)] };
        assert!(t.validate().is_err());
    }

    #[test]
    fn round_trip_non_utf8() {
        let mut n = Node::new(vec![0xff, 0xfe, b'x'], NodeKind::File);
        n.size = 5;
        n.content = vec![Extent::Hole { len: 5 }];
        let t = Tree { nodes: vec![n] };
        let id = Id::default();
        assert_eq!(Tree::decode(&id, &t.encode().unwrap()).unwrap(), t);
    }

    proptest! {
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Tree::decode(&Id::default(), &data);
        }
    }
}
