//! Blob unsealing as a restore does it from a pack: `repo::unseal_blob` and
//! `repo::unseal_blob_into`, including the zstd path (a blob's payload is decrypted, then
//! decompressed into at most its recorded raw length).
//!
//! Input: `selector (1) ‖ raw_len (u32 LE, its low 20 bits used: the chunker's blobs are far
//! smaller than 1 MiB's worth of headroom here) ‖ body`. Selector bit 0: zstd; bit 1: tree blob;
//! bit 2: round trip. In round-trip mode `body` is a blob's content: it is compressed (zstd)
//! or not, sealed under its id and must come back byte for byte through both functions. Otherwise
//! `body` is the payload itself — arbitrary bytes where a zstd frame is expected — sealed with
//! a valid seal, so every input reaches the decompressor: both functions must refuse it
//! (the id is not the content's) without panicking or writing past `raw_len`.
#![no_main]

use hoard_core::Id;
use hoard_core::pack::{BlobType, Compression};
use hoard_core::repo::{unseal_blob, unseal_blob_into};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Some((len, body)) = rest.split_first_chunk::<4>() else { return };
    let raw_len = u32::from_le_bytes(*len) & 0xF_FFFF;
    let compression = if selector & 1 == 1 { Compression::Zstd } else { Compression::None };
    let ty = if selector & 2 == 2 { BlobType::Tree } else { BlobType::Data };
    let keys = hoard_fuzz::keys();
    let round_trip = selector & 4 == 4;

    let (id, payload, raw_len) = if round_trip {
        let id = keys.blob_id(body);
        let payload = match compression {
            Compression::Zstd => zstd::bulk::compress(body, 1).expect("compress"),
            Compression::None => body.to_vec(),
        };
        (id, payload, body.len() as u32)
    } else {
        (Id([0x5a; 32]), body.to_vec(), raw_len)
    };
    let mut sealed = Vec::new();
    keys.seal_blob(ty.seal_type(), &id, &payload, &mut sealed);

    let whole = unseal_blob(&keys, &id, ty, compression, raw_len, &sealed);
    let mut out = vec![0u8; raw_len as usize];
    let into = unseal_blob_into(&keys, &id, ty, compression, &sealed, &mut out);
    if round_trip {
        assert_eq!(whole.expect("a sealed blob unseals"), body);
        into.expect("a sealed blob unseals into its buffer");
        assert_eq!(out, body);
    } else {
        assert!(whole.is_err() && into.is_err(), "content that is not its id's was accepted");
    }
});
