//! `vol_data.json` beside a CSI volume's mount (`hoard_agent::volume::parse_vol_data`), which
//! the agent reads to check that the volume is the one an order names.
//!
//! Invariants: no panic; nothing over the size bound is accepted; the fields taken from an
//! accepted object come back unchanged from a re-encoded object.
#![no_main]

use hoard_agent::volume::{MAX_VOL_DATA, parse_vol_data};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = parse_vol_data(data) else { return };
    assert!(data.len() <= MAX_VOL_DATA, "an oversized vol_data.json was accepted");
    let json = serde_json::json!({"driverName": v.driver_name, "specVolID": v.spec_vol_id});
    let again = parse_vol_data(&serde_json::to_vec(&json).expect("encode")).expect("re-encoded vol_data decodes");
    assert_eq!(again, v);
});
