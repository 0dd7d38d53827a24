//! Lock objects: `LockInfo` as `LockInfo::decode` parses it after decrypting, and the staleness
//! rule every observer applies to it (`LockInfo::is_stale_for`), with times taken from the
//! input, so extreme lock times (year ±262143) and stale ages are tried.
//!
//! Input: `now (i64 LE seconds) ‖ stale age (u32 LE seconds) ‖ lock JSON`.
//!
//! Invariants: no panic; an accepted lock re-encodes to JSON that decodes to the same value,
//! also sealed through `LockInfo::decode`; a lock whose time is not before `now` is never
//! stale by age.
#![no_main]

use std::time::Duration;

use hoard_core::Id;
use hoard_core::crypto::SealType;
use hoard_core::lock::{LockInfo, LockTimes, Observer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((now, rest)) = data.split_first_chunk::<8>() else { return };
    let Some((stale, json)) = rest.split_first_chunk::<4>() else { return };
    let Ok(info) = serde_json::from_slice::<LockInfo>(json) else { return };
    let again = serde_json::to_vec(&info).expect("a decoded lock encodes");
    assert_eq!(serde_json::from_slice::<LockInfo>(&again).expect("re-encoded lock decodes"), info);
    let keys = hoard_fuzz::keys();
    let sealed = keys.seal_meta(SealType::Lock, &again).expect("seal");
    assert_eq!(LockInfo::decode(&keys, &Id([1; 32]), &sealed).expect("sealed lock decodes"), info);

    let Some(now) = chrono::DateTime::from_timestamp(i64::from_le_bytes(*now), 0) else { return };
    let times = LockTimes::for_stale_age(Duration::from_secs(u64::from(u32::from_le_bytes(*stale)).max(1)));
    // An observer that is not the holder's process space: only age counts.
    let stranger = Observer { host: String::new(), boot_id: None, pid_ns: None };
    let stale = info.is_stale_for(now, &times, &stranger, |_| false);
    if info.time >= now {
        assert!(!stale, "a lock from the future (or now) was judged stale by age");
    }
    let _ = info.is_stale_for(
        now,
        &times,
        &Observer { host: info.host.clone(), boot_id: info.boot_id.clone(), pid_ns: info.pid_ns },
        |_| false,
    );
});
