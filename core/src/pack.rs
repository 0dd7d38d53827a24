//! Packs: many sealed blobs followed by a sealed header that lists them.
//!
//! Layout: `blob_0 ‖ … ‖ blob_{n-1} ‖ sealed_header ‖ header_len (u32 LE)`. The plaintext header is
//! `"HPK1" ‖ count (u32 LE) ‖ count × entry`, each entry 42 bytes:
//! `type (u8) ‖ compression (u8) ‖ id (32) ‖ stored_len (u32 LE) ‖ raw_len (u32 LE)`; blob offsets
//! follow from the order. A pack's name is the BLAKE3 of all its bytes.
//!
//! [`PackBuilder`] is sans-IO: it collects sealed blobs and returns a finished pack as the list
//! of its parts (the blobs' own buffers, never copied into one) for a multi-part `put`.
//! Decoding checks every length against the pack size before allocating.

use bytes::Bytes;

use crate::crypto::{Keys, SEAL_OVERHEAD, SealType};
use crate::error::{Error, ObjectKind, Result};
use crate::id::Id;

const MAGIC: &[u8; 4] = b"HPK1";
const ENTRY_LEN: usize = 42;
/// Largest blob a repository accepts (plaintext); larger length fields are damage.
pub const MAX_BLOB_LEN: u32 = 64 * 1024 * 1024;
/// Largest header a reader accepts.
const MAX_HEADER_LEN: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum BlobType {
    Data = 0,
    Tree = 1,
}

impl BlobType {
    pub fn seal_type(self) -> SealType {
        match self {
            BlobType::Data => SealType::DataBlob,
            BlobType::Tree => SealType::TreeBlob,
        }
    }

    fn from_u8(v: u8) -> Option<BlobType> {
        match v {
            0 => Some(BlobType::Data),
            1 => Some(BlobType::Tree),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

impl Compression {
    fn from_u8(v: u8) -> Option<Compression> {
        match v {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// One blob inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub ty: BlobType,
    pub compression: Compression,
    pub id: Id,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

/// A blob sealed and ready to be placed in a pack.
#[derive(Debug)]
pub struct SealedBlob {
    pub ty: BlobType,
    pub compression: Compression,
    pub id: Id,
    pub raw_len: u32,
    pub bytes: Bytes,
}

/// A finished pack: its name, its bytes as consecutive parts, and its directory.
#[derive(Debug)]
pub struct FinishedPack {
    pub id: Id,
    pub parts: Vec<Bytes>,
    pub len: u64,
    pub entries: Vec<PackEntry>,
}

impl FinishedPack {
    /// The pack's bytes in one buffer (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.concat()
    }
}

/// Collects sealed blobs into one pack.
#[derive(Debug, Default)]
pub struct PackBuilder {
    parts: Vec<Bytes>,
    len: usize,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// Bytes of the blobs added so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn blob_count(&self) -> usize {
        self.entries.len()
    }

    pub fn add(&mut self, blob: SealedBlob) {
        self.add_written(&blob);
        self.parts.push(blob.bytes);
    }

    /// Records a blob whose bytes the caller has written out itself, right after the bytes of
    /// the blobs added before it (a spooled pack, [`crate::spool`]); only its entry is kept.
    pub fn add_written(&mut self, blob: &SealedBlob) {
        self.entries.push(PackEntry {
            ty: blob.ty,
            compression: blob.compression,
            id: blob.id,
            offset: self.len as u32,
            stored_len: blob.bytes.len() as u32,
            raw_len: blob.raw_len,
        });
        self.len += blob.bytes.len();
    }

    /// Seals the header, appends it and returns the pack; the builder is empty afterwards.
    pub fn finish(&mut self, keys: &Keys) -> Result<FinishedPack> {
        let trailer = self.finish_trailer(keys)?;
        let mut parts = std::mem::take(&mut self.parts);
        parts.push(Bytes::from(trailer.bytes));
        Ok(FinishedPack { id: Id::of_parts(&parts), parts, len: trailer.pack_len, entries: trailer.entries })
    }

    /// Seals the header of a pack whose blobs were added with [`PackBuilder::add_written`]:
    /// the bytes that end the pack (sealed header and its length) and the pack's entries. The
    /// builder is empty afterwards.
    pub fn finish_trailer(&mut self, keys: &Keys) -> Result<PackTrailer> {
        let mut header = Vec::with_capacity(8 + self.entries.len() * ENTRY_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            header.push(e.ty as u8);
            header.push(e.compression as u8);
            header.extend_from_slice(&e.id.0);
            header.extend_from_slice(&e.stored_len.to_le_bytes());
            header.extend_from_slice(&e.raw_len.to_le_bytes());
        }
        let mut sealed = keys.seal_meta(SealType::PackHeader, &header)?;
        let header_len = sealed.len() as u32;
        sealed.extend_from_slice(&header_len.to_le_bytes());
        let pack_len = std::mem::take(&mut self.len) as u64 + header_len as u64 + 4;
        Ok(PackTrailer { bytes: sealed, pack_len, entries: std::mem::take(&mut self.entries) })
    }
}

/// The end of a pack: what [`PackBuilder::finish_trailer`] returns.
#[derive(Debug)]
pub struct PackTrailer {
    /// The sealed header and its length, to write after the blobs.
    pub bytes: Vec<u8>,
    /// The whole pack's length, blobs and trailer.
    pub pack_len: u64,
    pub entries: Vec<PackEntry>,
}

/// Where the sealed header sits in a pack of `pack_len` bytes, given its last 4 bytes.
pub fn header_range(pack_len: u64, trailer: &[u8]) -> Result<std::ops::Range<u64>> {
    let bad = |r: &str| Error::corrupt(ObjectKind::Pack, "", r.to_string());
    let t: [u8; 4] = trailer.try_into().map_err(|_| bad("trailer is not 4 bytes"))?;
    let hlen = u32::from_le_bytes(t) as u64;
    if hlen < SEAL_OVERHEAD as u64 || hlen as usize > MAX_HEADER_LEN || hlen + 4 > pack_len {
        return Err(bad("header length out of range"));
    }
    Ok(pack_len - 4 - hlen..pack_len - 4)
}

/// Decodes a sealed pack header; checks every entry lies inside the data part of the pack.
pub fn decode_header(keys: &Keys, name: &str, sealed: &[u8], pack_len: u64) -> Result<Vec<PackEntry>> {
    let plain = keys.open_meta(SealType::PackHeader, ObjectKind::Pack, name, sealed)?;
    decode_header_plain(name, &plain, pack_len - 4 - sealed.len() as u64)
}

pub fn decode_header_plain(name: &str, plain: &[u8], data_len: u64) -> Result<Vec<PackEntry>> {
    let bad = |r: String| Error::corrupt(ObjectKind::Pack, name, r);
    if plain.len() < 8 || &plain[..4] != MAGIC {
        return Err(bad("header magic missing".into()));
    }
    let count = u32::from_le_bytes([plain[4], plain[5], plain[6], plain[7]]) as usize;
    if (plain.len() - 8) != count.saturating_mul(ENTRY_LEN) {
        return Err(bad(format!("header claims {count} entries but has {} bytes", plain.len())));
    }
    let mut entries = Vec::with_capacity(count);
    let mut offset: u64 = 0;
    for e in plain[8..].chunks_exact(ENTRY_LEN) {
        let ty = BlobType::from_u8(e[0]).ok_or_else(|| bad(format!("unknown blob type {}", e[0])))?;
        let compression = Compression::from_u8(e[1]).ok_or_else(|| bad(format!("unknown compression {}", e[1])))?;
        let id = Id::from_slice(&e[2..34]).ok_or_else(|| bad("short id".into()))?;
        let stored_len = u32::from_le_bytes([e[34], e[35], e[36], e[37]]);
        let raw_len = u32::from_le_bytes([e[38], e[39], e[40], e[41]]);
        if raw_len > MAX_BLOB_LEN || (stored_len as usize) < SEAL_OVERHEAD {
            return Err(bad(format!("blob {} has impossible lengths", id.short())));
        }
        if offset + stored_len as u64 > data_len || offset + stored_len as u64 > u32::MAX as u64 {
            return Err(bad(format!("blob {} extends past the pack's data or past 4 GiB", id.short())));
        }
        entries.push(PackEntry { ty, compression, id, offset: offset as u32, stored_len, raw_len });
        offset += stored_len as u64;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::from_master(SecretKey([3u8; 32]))
    }

    fn sealed(keys: &Keys, data: &[u8]) -> SealedBlob {
        let id = keys.blob_id(data);
        let mut bytes = Vec::new();
        keys.seal_blob(SealType::DataBlob, &id, data, &mut bytes);
        SealedBlob {
            ty: BlobType::Data,
            compression: Compression::None,
            id,
            raw_len: data.len() as u32,
            bytes: bytes.into(),
        }
    }

    #[test]
    fn round_trip() {
        let k = keys();
        let mut b = PackBuilder::default();
        for i in 0..10u8 {
            b.add(sealed(&k, &vec![i; 100 + i as usize]));
        }
        let p = b.finish(&k).unwrap();
        let bytes = p.to_vec();
        assert_eq!(p.id, Id::of_bytes(&bytes), "the name is the hash of the whole pack");
        let len = bytes.len() as u64;
        assert_eq!(p.len, len);
        let r = header_range(len, &bytes[bytes.len() - 4..]).unwrap();
        let entries = decode_header(&k, "p", &bytes[r.start as usize..r.end as usize], len).unwrap();
        assert_eq!(entries, p.entries);
        assert!(b.is_empty(), "finish empties the builder");
        assert_eq!(b.len(), 0, "finish resets the byte count");
        for e in &entries {
            let s = &bytes[e.offset as usize..(e.offset + e.stored_len) as usize];
            assert_eq!(k.open_blob(SealType::DataBlob, &e.id, s).unwrap().len(), e.raw_len as usize);
        }
    }

    proptest! {
        #[test]
        fn header_decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600), len in 0u64..10_000) {
            let _ = decode_header_plain("fuzz", &data, len);
            if data.len() >= 4 { let _ = header_range(len, &data[..4]); }
        }

        #[test]
        fn headers_round_trip(lens in proptest::collection::vec(1usize..300, 0..20)) {
            let k = keys();
            let mut b = PackBuilder::default();
            for (i, l) in lens.iter().enumerate() { b.add(sealed(&k, &vec![i as u8; *l])); }
            let p = b.finish(&k).unwrap();
            let bytes = p.to_vec();
            let len = bytes.len() as u64;
            let r = header_range(len, &bytes[bytes.len() - 4..]).unwrap();
            let e = decode_header(&k, "p", &bytes[r.start as usize..r.end as usize], len).unwrap();
            prop_assert_eq!(e, p.entries);
        }
    }
}
