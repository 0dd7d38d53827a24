//! Snapshots: the JSON decoding `Snapshot::decode` applies to the decrypted bytes
//! (`serde_json::from_slice::<Snapshot>`; hoard-core has no public plaintext-only decoder).
//!
//! Invariants: no panic; an accepted snapshot re-encodes (as `Snapshot::encode` does before
//! sealing) to JSON that decodes to the same value, both in plaintext and through the sealed
//! `encode`/`decode` pair.
#![no_main]

use hoard_core::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = serde_json::from_slice::<Snapshot>(data) else { return };
    for c in &s.components {
        assert!(s.component(&c.name).is_some());
    }
    let json = serde_json::to_vec(&s).expect("a decoded snapshot must encode");
    let t: Snapshot = match serde_json::from_slice(&json) {
        Ok(t) => t,
        Err(e) => panic!("re-encoded snapshot does not decode: {e}: {}", String::from_utf8_lossy(&json)),
    };
    assert_eq!(s, t, "snapshot changed across encode/decode");

    let keys = hoard_fuzz::keys();
    if let Ok(sealed) = s.encode(&keys) {
        assert_eq!(Snapshot::decode(&keys, "fuzz", &sealed).expect("sealed snapshot must decode"), s);
    }
});
