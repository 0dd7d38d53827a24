//! Key slots: `serde_json::from_slice::<KeySlot>` (how `keys/<id>` is read) and
//! `KdfParams::validate`.
//!
//! Argon2 itself is not fuzzed: a slot may legitimately ask for up to 4 GiB and 64 passes, far too
//! slow per input. `unwrap_key` is called only for slots it must refuse before deriving anything
//! (wrong version, bad salt length, out-of-bounds KDF parameters), where it has to answer quickly
//! with `Ok(None)` or `Err` and never panic.
//!
//! Invariants: no panic; an accepted slot re-encodes to JSON that decodes to the same slot (the
//! JSON of both is compared: `KeySlot` has no `PartialEq`).
#![no_main]

use hoard_core::Id;
use hoard_core::crypto::KeySlot;
use hoard_fuzz::key_slot_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(slot) = serde_json::from_slice::<KeySlot>(data) else { return };
    let kdf_ok = slot.kdf.validate().is_ok();
    if kdf_ok {
        let k = slot.kdf;
        assert!(k.memory_kib >= 8 * 1024 && k.memory_kib <= 4 * 1024 * 1024);
        assert!(k.iterations >= 1 && k.iterations <= 64 && k.parallelism >= 1 && k.parallelism <= 64);
    }
    let json = key_slot_json(&slot);
    let again: KeySlot = serde_json::from_slice(&json).expect("a re-encoded key slot must decode");
    assert_eq!(key_slot_json(&again), json, "key slot changed across encode/decode");

    let refused_early = slot.version != 1 || slot.salt.len() < 16 || slot.salt.len() > 64;
    if refused_early || !kdf_ok {
        match slot.unwrap_key(b"password", &Id::default()) {
            Ok(None) | Err(_) => {}
            Ok(Some(_)) => panic!("a slot with invalid parameters unwrapped a key"),
        }
        if refused_early {
            assert!(matches!(slot.unwrap_key(b"password", &Id::default()), Ok(None)));
        }
    }
});
