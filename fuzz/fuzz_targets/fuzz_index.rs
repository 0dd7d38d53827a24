//! Index files: `IndexFile::decode_plain` on the decrypted postcard bytes.
//!
//! Invariants: no panic; an accepted index has in-range blob lengths; re-encoding it (postcard,
//! as `IndexFile::encode` does before sealing) and decoding again gives the same value, both in
//! plaintext and through the sealed `encode`/`decode` pair; merging it into a `MasterIndex` finds
//! every blob it lists.
#![no_main]

use hoard_core::index::{IndexFile, MasterIndex};
use hoard_core::pack::MAX_BLOB_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = IndexFile::decode_plain("fuzz", data) else { return };
    for p in &f.packs {
        for b in &p.blobs {
            assert!(b.raw_len <= MAX_BLOB_LEN && b.offset.checked_add(b.stored_len).is_some());
        }
    }
    let plain = postcard::to_stdvec(&f).expect("a decoded index must encode");
    let g = IndexFile::decode_plain("fuzz", &plain).expect("a re-encoded index must decode");
    assert_eq!(f, g, "index changed across encode/decode");

    let keys = hoard_fuzz::keys();
    if let Ok(sealed) = f.encode(&keys) {
        assert_eq!(IndexFile::decode(&keys, "fuzz", &sealed).expect("sealed index must decode"), f);
    }

    let mut m = MasterIndex::default();
    m.add_file(hoard_core::Id::default(), &f);
    for p in &f.packs {
        for b in &p.blobs {
            let loc = m.get(&b.id).expect("every listed blob is in the master index");
            assert!(f.packs.iter().any(|q| q.id == loc.pack));
        }
    }
    assert!(m.len() <= f.blob_count());
});
