//! Index files and the in-memory master index.
//!
//! An index file (`index/<id>`, id = BLAKE3 of its stored bytes) is a sealed postcard encoding of
//! [`IndexFile`]: the packs it covers and, per pack, every blob's type, compression, offset and
//! lengths. It is written only after all packs it names are stored. `supersedes` names index
//! files whose content this one fully contains (written by prune and repair), so readers can
//! ignore those and they can be deleted.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::crypto::{Keys, SealType};
use crate::error::{Error, ObjectKind, Result};
use crate::id::Id;
use crate::pack::{BlobType, Compression, MAX_BLOB_LEN, PackEntry};

/// Largest index file a reader accepts (decrypted).
pub const MAX_INDEX_LEN: usize = 512 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexBlob {
    pub id: Id,
    pub ty: BlobType,
    pub compression: Compression,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPack {
    pub id: Id,
    pub blobs: Vec<IndexBlob>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    pub supersedes: Vec<Id>,
    pub packs: Vec<IndexPack>,
}

impl IndexPack {
    pub fn from_entries(id: Id, entries: &[PackEntry]) -> IndexPack {
        IndexPack {
            id,
            blobs: entries
                .iter()
                .map(|e| IndexBlob {
                    id: e.id,
                    ty: e.ty,
                    compression: e.compression,
                    offset: e.offset,
                    stored_len: e.stored_len,
                    raw_len: e.raw_len,
                })
                .collect(),
        }
    }
}

impl IndexBlob {
    pub fn from_location(id: Id, loc: &BlobLocation) -> IndexBlob {
        IndexBlob {
            id,
            ty: loc.ty,
            compression: loc.compression,
            offset: loc.offset,
            stored_len: loc.stored_len,
            raw_len: loc.raw_len,
        }
    }
}

/// Groups blob locations into per-pack index entries (packs in id order).
pub fn group_by_pack(blobs: impl IntoIterator<Item = (Id, BlobLocation)>) -> Vec<IndexPack> {
    let mut by_pack: std::collections::BTreeMap<Id, Vec<IndexBlob>> = std::collections::BTreeMap::new();
    for (id, loc) in blobs {
        by_pack.entry(loc.pack).or_default().push(IndexBlob::from_location(id, &loc));
    }
    by_pack.into_iter().map(|(id, blobs)| IndexPack { id, blobs }).collect()
}

impl IndexFile {
    pub fn encode(&self, keys: &Keys) -> Result<Vec<u8>> {
        let plain = postcard::to_stdvec(self).map_err(|e| Error::Internal(format!("encode index: {e}")))?;
        keys.seal_meta(SealType::Index, &plain)
    }

    pub fn decode(keys: &Keys, name: &str, sealed: &[u8]) -> Result<IndexFile> {
        if sealed.len() > MAX_INDEX_LEN {
            return Err(Error::corrupt(ObjectKind::Index, name, "larger than any index hoard writes"));
        }
        let plain = keys.open_meta(SealType::Index, ObjectKind::Index, name, sealed)?;
        Self::decode_plain(name, &plain)
    }

    pub fn decode_plain(name: &str, plain: &[u8]) -> Result<IndexFile> {
        let f: IndexFile = postcard::from_bytes(plain)
            .map_err(|e| Error::corrupt(ObjectKind::Index, name, format!("undecodable: {e}")))?;
        for p in &f.packs {
            for b in &p.blobs {
                if b.raw_len > MAX_BLOB_LEN || b.offset.checked_add(b.stored_len).is_none() {
                    return Err(Error::corrupt(ObjectKind::Index, name, "blob lengths out of range"));
                }
            }
        }
        Ok(f)
    }

    pub fn blob_count(&self) -> usize {
        self.packs.iter().map(|p| p.blobs.len()).sum()
    }
}

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: Id,
    pub ty: BlobType,
    pub compression: Compression,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    pack: u32,
    ty: BlobType,
    compression: Compression,
    offset: u32,
    stored_len: u32,
    raw_len: u32,
}

/// All loaded index files merged: blob id → location. Packs are interned to keep entries small.
#[derive(Debug, Default)]
pub struct MasterIndex {
    packs: Vec<Id>,
    pack_numbers: HashMap<Id, u32>,
    blobs: HashMap<Id, Slot>,
    files: HashSet<Id>,
}

impl MasterIndex {
    pub fn contains(&self, id: &Id) -> bool {
        self.blobs.contains_key(id)
    }

    pub fn get(&self, id: &Id) -> Option<BlobLocation> {
        self.blobs.get(id).map(|s| BlobLocation {
            pack: self.packs[s.pack as usize],
            ty: s.ty,
            compression: s.compression,
            offset: s.offset,
            stored_len: s.stored_len,
            raw_len: s.raw_len,
        })
    }

    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }

    pub fn packs(&self) -> impl Iterator<Item = &Id> {
        self.packs.iter()
    }

    /// Index files merged so far.
    pub fn files(&self) -> &HashSet<Id> {
        &self.files
    }

    pub fn add_file(&mut self, file_id: Id, file: &IndexFile) {
        self.files.insert(file_id);
        for p in &file.packs {
            self.add_pack(p);
        }
    }

    pub fn add_pack(&mut self, p: &IndexPack) {
        let next = self.packs.len() as u32;
        let n = *self.pack_numbers.entry(p.id).or_insert_with(|| next);
        if n == next {
            self.packs.push(p.id);
        }
        for b in &p.blobs {
            // First writer wins: a duplicate copy of a blob in another pack is equivalent.
            self.blobs.entry(b.id).or_insert(Slot {
                pack: n,
                ty: b.ty,
                compression: b.compression,
                offset: b.offset,
                stored_len: b.stored_len,
                raw_len: b.raw_len,
            });
        }
    }

    /// Every blob with its location (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = (Id, BlobLocation)> + '_ {
        self.blobs.keys().filter_map(|id| self.get(id).map(|l| (*id, l)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_merge() {
        let k = Keys::from_master(SecretKey([1u8; 32]));
        let f = IndexFile {
            supersedes: vec![Id([4; 32])],
            packs: vec![IndexPack {
                id: Id([2; 32]),
                blobs: vec![IndexBlob {
                    id: Id([3; 32]),
                    ty: BlobType::Tree,
                    compression: Compression::Zstd,
                    offset: 10,
                    stored_len: 100,
                    raw_len: 300,
                }],
            }],
        };
        let sealed = f.encode(&k).unwrap();
        let g = IndexFile::decode(&k, "i", &sealed).unwrap();
        assert_eq!(f, g);
        let mut m = MasterIndex::default();
        m.add_file(Id([9; 32]), &g);
        assert_eq!(m.get(&Id([3; 32])).unwrap().pack, Id([2; 32]));
        assert_eq!(m.pack_count(), 1);
    }

    fn arb_id() -> impl Strategy<Value = Id> {
        any::<[u8; 32]>().prop_map(Id)
    }

    fn arb_blob() -> impl Strategy<Value = IndexBlob> {
        (arb_id(), any::<bool>(), any::<bool>(), any::<u32>(), any::<u32>(), 0..=MAX_BLOB_LEN).prop_map(
            |(id, tree, zstd, offset, stored_len, raw_len)| IndexBlob {
                id,
                ty: if tree { BlobType::Tree } else { BlobType::Data },
                compression: if zstd { Compression::Zstd } else { Compression::None },
                // Lengths a reader accepts: the blob ends within the 32-bit offset space.
                offset: offset.min(u32::MAX - stored_len.min(u32::MAX / 2)),
                stored_len: stored_len.min(u32::MAX / 2),
                raw_len,
            },
        )
    }

    fn arb_file() -> impl Strategy<Value = IndexFile> {
        let pack =
            (arb_id(), proptest::collection::vec(arb_blob(), 0..12)).prop_map(|(id, blobs)| IndexPack { id, blobs });
        (proptest::collection::vec(arb_id(), 0..4), proptest::collection::vec(pack, 0..8))
            .prop_map(|(supersedes, packs)| IndexFile { supersedes, packs })
    }

    proptest! {
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = IndexFile::decode_plain("fuzz", &data);
        }

        /// Any index file the writer can produce decodes to itself, sealed and as plain bytes,
        /// and a master index built from it finds every blob where the file put it.
        #[test]
        fn index_files_round_trip(f in arb_file()) {
            let k = Keys::from_master(SecretKey([7u8; 32]));
            let sealed = f.encode(&k).unwrap();
            prop_assert_eq!(&IndexFile::decode(&k, "i", &sealed).unwrap(), &f);
            let plain = postcard::to_stdvec(&f).unwrap();
            prop_assert_eq!(&IndexFile::decode_plain("i", &plain).unwrap(), &f);
            let mut m = MasterIndex::default();
            m.add_file(Id([9; 32]), &f);
            let mut first = std::collections::HashMap::new();
            for p in &f.packs {
                for b in &p.blobs {
                    first.entry(b.id).or_insert((p.id, b.clone()));
                }
            }
            prop_assert_eq!(m.len(), first.len());
            for (id, (pack, b)) in &first {
                let loc = m.get(id).unwrap();
                prop_assert_eq!(loc.pack, *pack);
                prop_assert_eq!(IndexBlob::from_location(*id, &loc), b.clone());
            }
        }
    }
}
