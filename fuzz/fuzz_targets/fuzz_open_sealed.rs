//! Authenticated decryption: `Keys::open_blob` and `Keys::open_meta` on arbitrary bytes with a
//! fixed key, plus the sealed decoders that wrap `open_meta` (`IndexFile::decode`,
//! `Snapshot::decode`, `pack::decode_header`).
//!
//! Input: `selector (1) ‖ blob id (32) ‖ sealed bytes`; the selector picks the seal type.
//!
//! Invariants: no panic; nothing the fuzzer makes opens under the fixed key (forging AES-GCM is
//! not expected of it, and the seeds are sealed under another key); sealing the input under the
//! fixed key and opening it gives the input back, and flipping any one byte of that makes it fail.
#![no_main]

use hoard_core::crypto::{SEAL_OVERHEAD, SealType};
use hoard_core::error::ObjectKind;
use hoard_core::id::Id;
use hoard_core::index::IndexFile;
use hoard_core::pack::decode_header;
use hoard_core::snapshot::Snapshot;
use hoard_fuzz::{OPEN_PREFIX, SEAL_TYPES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < OPEN_PREFIX {
        return;
    }
    let keys = hoard_fuzz::keys();
    let ty = SEAL_TYPES[data[0] as usize % SEAL_TYPES.len()];
    let id = Id::from_slice(&data[1..OPEN_PREFIX]).expect("32 bytes");
    let sealed = &data[OPEN_PREFIX..];

    assert!(keys.open_blob(ty, &id, sealed).is_err(), "forged blob opened");
    assert!(keys.open_meta(ty, ObjectKind::Index, "fuzz", sealed).is_err(), "forged object opened");
    assert!(IndexFile::decode(&keys, "fuzz", sealed).is_err());
    assert!(Snapshot::decode(&keys, "fuzz", sealed).is_err());
    let pack_len = sealed.len() as u64 + 4 + u64::from(data[0]);
    assert!(decode_header(&keys, "fuzz", sealed, pack_len).is_err());

    // Round trip of the input as a plaintext, and tamper detection at one input-chosen byte.
    let mut blob = Vec::new();
    keys.seal_blob(ty, &id, sealed, &mut blob);
    assert_eq!(blob.len(), sealed.len() + SEAL_OVERHEAD);
    assert_eq!(keys.open_blob(ty, &id, &blob).expect("own blob must open"), sealed);
    let other = if ty == SealType::DataBlob { SealType::TreeBlob } else { SealType::DataBlob };
    assert!(keys.open_blob(other, &id, &blob).is_err(), "blob opened as another type");
    let at = (data[1] as usize * 256 + data[2] as usize) % blob.len();
    blob[at] ^= 1 << (data[3] % 8);
    assert!(keys.open_blob(ty, &id, &blob).is_err(), "tampered blob opened (byte {at})");

    if let Ok(meta) = keys.seal_meta(ty, sealed) {
        assert_eq!(keys.open_meta(ty, ObjectKind::Index, "fuzz", &meta).expect("own object must open"), sealed);
    }
});
