//! Trees: `Tree::decode` on a tree blob's plaintext (postcard).
//!
//! Invariants: no panic; an accepted tree validates (safe, unique, sorted names; directories
//! have subtrees; extents add up); re-encoding and decoding again gives the same tree; `find`
//! finds every entry by name.
#![no_main]

use hoard_core::Id;
use hoard_core::tree::{Tree, valid_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = Id::default();
    let Ok(t) = Tree::decode(&id, data) else { return };
    assert!(t.validate().is_ok());
    for n in &t.nodes {
        assert!(valid_name(&n.name), "accepted unsafe name {:?}", n.name);
        let found = t.find(&n.name).expect("find must locate every entry");
        assert_eq!(found, n);
    }
    let enc = t.encode().expect("a decoded tree must encode");
    let u = Tree::decode(&id, &enc).expect("a re-encoded tree must decode");
    assert_eq!(t, u, "tree changed across encode/decode");
});
