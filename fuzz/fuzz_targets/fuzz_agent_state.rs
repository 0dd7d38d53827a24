//! The agent's state-dir records (`--state-dir`, `hoard_agent::state::decode`): files on the
//! node that a restarted agent reads back to answer a re-sent order.
//!
//! Invariants: no panic; an accepted record re-encodes (`state::encode`) to bytes that decode
//! to a record with the same encoding (bytes, not `==`: a float field may be NaN).
#![no_main]

use hoard_agent::state::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = decode(data) else { return };
    let bytes = encode(&record);
    let again = decode(&bytes).expect("a re-encoded record decodes");
    assert_eq!(encode(&again), bytes, "record changed across encode/decode");
});
