//! `config` and the repository parameters sealed in it: `ConfigFile::decode` (size bound,
//! format version, canonical form) and `RepoParams::decode` (JSON, then `validate`). The first
//! input byte picks the decoder (even: config, odd: parameters); the rest is the object.
//!
//! Invariants: no panic; an accepted config is canonical (re-encodes to exactly the input) and
//! never over 64 KiB; accepted parameters validate, survive JSON re-encoding unchanged, and open
//! again after sealing as `Repository::init` seals them.
#![no_main]

use hoard_core::crypto::SealType;
use hoard_core::error::ObjectKind;
use hoard_core::repo::{ConfigFile, RepoParams};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    if selector % 2 == 0 {
        let Ok(config) = ConfigFile::decode(body) else { return };
        assert!(body.len() <= 64 * 1024, "an oversized config was accepted");
        assert_eq!(config.encode().expect("an accepted config encodes"), body, "accepted config is not canonical");
        return;
    }
    let Ok(params) = RepoParams::decode(body) else { return };
    params.validate().expect("decoded parameters validate");
    let json = serde_json::to_vec(&params).expect("parameters encode");
    assert_eq!(RepoParams::decode(&json).expect("re-encoded parameters decode"), params);
    let keys = hoard_fuzz::keys();
    let sealed = keys.seal_meta(SealType::Config, &json).expect("seal");
    let opened = keys.open_meta(SealType::Config, ObjectKind::Config, "config", &sealed).expect("open");
    assert_eq!(RepoParams::decode(&opened).expect("sealed parameters decode"), params);
});
