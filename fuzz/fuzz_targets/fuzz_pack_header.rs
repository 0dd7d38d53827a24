//! Pack headers: `pack::header_range` (the trailer) and `pack::decode_header_plain` (the decrypted
//! header), then the sealed path `pack::decode_header` on the same plaintext.
//!
//! Input: `data_len (u64 LE) ‖ trailer (4) ‖ plaintext header`; `data_len` doubles as the pack
//! length given to `header_range`.
//!
//! Invariants: no panic; an accepted trailer names a range of exactly that length ending 4 bytes
//! before the pack's end; an accepted header lists blobs back to back from offset 0, all inside
//! the data part, with in-range lengths, and re-encodes to exactly the input (the format has one
//! encoding per header); sealing that plaintext and decoding it through `decode_header` gives the
//! same entries.
#![no_main]

use hoard_core::crypto::{SEAL_OVERHEAD, SealType};
use hoard_core::pack::{MAX_BLOB_LEN, decode_header, decode_header_plain, header_range};
use hoard_fuzz::{PACK_PREFIX, encode_pack_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < PACK_PREFIX {
        return;
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&data[..8]);
    let len = u64::from_le_bytes(n);
    let trailer = &data[8..12];
    let plain = &data[PACK_PREFIX..];

    // Short trailers are refused, not indexed into.
    assert!(header_range(len, &trailer[..3]).is_err());
    if let Ok(r) = header_range(len, trailer) {
        let hlen = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]) as u64;
        assert_eq!(r.end, len - 4, "header must end right before the trailer");
        assert_eq!(r.end - r.start, hlen, "range length must be the trailer's length");
        assert!(hlen >= SEAL_OVERHEAD as u64);
    }

    let Ok(entries) = decode_header_plain("fuzz", plain, len) else { return };
    let mut offset = 0u64;
    for e in &entries {
        assert_eq!(e.offset as u64, offset, "blobs must be back to back");
        assert!(e.stored_len as usize >= SEAL_OVERHEAD && e.raw_len <= MAX_BLOB_LEN);
        offset += e.stored_len as u64;
        assert!(offset <= len, "blob past the data part");
    }
    assert_eq!(encode_pack_header(&entries), plain, "decoded header must re-encode to its input");

    // The sealed path, for a pack whose data part is exactly `len` bytes.
    let keys = hoard_fuzz::keys();
    let Ok(sealed) = keys.seal_meta(SealType::PackHeader, plain) else { return };
    let Some(pack_len) = len.checked_add(sealed.len() as u64 + 4) else { return };
    let r = header_range(pack_len, &(sealed.len() as u32).to_le_bytes());
    if sealed.len() <= 64 * 1024 * 1024 {
        let r = r.expect("a header hoard could write must be in range");
        assert_eq!(r.start, len);
    }
    let sealed_entries = decode_header(&keys, "fuzz", &sealed, pack_len).expect("sealed header must decode");
    assert_eq!(sealed_entries, entries);
});
